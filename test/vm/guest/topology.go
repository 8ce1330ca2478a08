package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// iommuGroup is one IOMMU group as found at start.
type iommuGroup struct {
	n         int
	members   []*pci.Device // every function, bridges included
	endpoints []*pci.Device // the functions Bind has to move (not leftOnHost)
}

func (g *iommuGroup) endpointAddrs() []pci.Address {
	as := make([]pci.Address, len(g.endpoints))
	for i, d := range g.endpoints {
		as[i] = d.Address
	}
	return as
}

func (g *iommuGroup) String() string {
	as := make([]pci.Address, len(g.members))
	for i, d := range g.members {
		as[i] = d.Address
	}
	return fmt.Sprintf("group %d [%s]", g.n, addrs(as))
}

// topology is what discover found: the devices as they were at start and
// the groups picked for each kind of test.
type topology struct {
	devices []*pci.Device
	// start is every function's binding as discover found it.
	start  map[pci.Address]state
	groups map[int]*iommuGroup
	// single: groups whose only member is an endpoint with a driver.
	single []*iommuGroup
	// bridged: two or more endpoints with drivers behind a PCI bridge
	// that belongs to the same group.
	bridged []*iommuGroup
	// multifunction: two or more functions of one slot, with drivers,
	// behind a root port that is not in the group.
	multifunction []*iommuGroup
}

// Class and subclass (the upper 16 bits of the class code).
const (
	classHostBridge = 0x0600
	classISABridge  = 0x0601
	classPCIBridge  = 0x0604 // PCI-to-PCI bridge
)

// leftOnHost reports whether Bind leaves a group member where it is: a host
// or PCI-to-PCI bridge that is driverless or on pcieport or pci-stub. The
// group is viable with it. Every other function is an endpoint, an ISA
// bridge (0x0601) for example, whatever its driver.
func leftOnHost(d *pci.Device) bool {
	switch d.Class >> 8 {
	case classHostBridge, classPCIBridge:
		return d.Driver == "" || d.Driver == "pcieport" || d.Driver == "pci-stub"
	}
	return false
}

func (s *suite) discover() (*topology, error) {
	devices, problems, err := s.fs.Scan()
	if err != nil {
		return nil, err
	}
	for _, p := range problems {
		s.fail("scan: %v", p)
	}
	t := &topology{devices: devices, start: map[pci.Address]state{}, groups: map[int]*iommuGroup{}}
	byAddr := map[pci.Address]*pci.Device{}
	for _, d := range devices {
		byAddr[d.Address] = d
		t.start[d.Address] = s.state(d.Address)
		grp := "-"
		if d.IOMMUGroup != nil {
			grp = fmt.Sprint(*d.IOMMUGroup)
			g := t.groups[*d.IOMMUGroup]
			if g == nil {
				g = &iommuGroup{n: *d.IOMMUGroup}
				t.groups[g.n] = g
			}
			g.members = append(g.members, d)
			if !leftOnHost(d) {
				g.endpoints = append(g.endpoints, d)
			}
		}
		drv := d.Driver
		if drv == "" {
			drv = "-"
		}
		s.info("device %s class %06x %04x:%04x group %s driver %s", d.Address, d.Class, d.VendorID, d.DeviceID, grp, drv)
	}
	if len(t.groups) == 0 {
		return nil, errors.New("no IOMMU groups: is the emulated intel-iommu there and intel_iommu=on set?")
	}
	s.ok("IOMMU active: %d PCI functions in %d groups", len(devices), len(t.groups))

	// The group lists in kernel/iommu_groups agree with the iommu_group links.
	var nums []int
	for n := range t.groups {
		nums = append(nums, n)
	}
	sort.Ints(nums)
	for _, n := range nums {
		g := t.groups[n]
		members, err := s.fs.IOMMUGroupMembers(n)
		want := make([]pci.Address, len(g.members))
		for i, d := range g.members {
			want[i] = d.Address
		}
		if err != nil || !slices.Equal(members, want) {
			s.fail("group %d: kernel/iommu_groups lists [%s] (%v), iommu_group links give [%s]", n, addrs(members), err, addrs(want))
		}
	}

	// GroupEndpoints agrees with leftOnHost for every group, the chipset
	// group with its ISA bridge included.
	agree := true
	for _, n := range nums {
		g := t.groups[n]
		eps, err := vfio.GroupEndpoints(s.fs, n)
		if err != nil || !slices.Equal(eps, g.endpointAddrs()) {
			s.fail("group %d: GroupEndpoints = [%s] (%v), want [%s]", n, addrs(eps), err, addrs(g.endpointAddrs()))
			agree = false
		}
		for _, d := range g.members {
			if d.Class>>8 != classISABridge {
				continue
			}
			if !slices.Contains(eps, d.Address) {
				s.fail("group %d: ISA bridge %s (driver %q) missing from GroupEndpoints = [%s]", n, d.Address, d.Driver, addrs(eps))
			} else {
				s.ok("group %d: ISA bridge %s (class %06x, driver %q) is an endpoint: GroupEndpoints = [%s]", n, d.Address, d.Class, d.Driver, addrs(eps))
			}
		}
	}
	if agree {
		s.ok("GroupEndpoints leaves out exactly the host and PCI-to-PCI bridges that are driverless or on pcieport, in all %d groups", len(nums))
	}

	withDrivers := func(g *iommuGroup) bool {
		for _, d := range g.endpoints {
			if d.Driver == "" {
				return false
			}
		}
		return len(g.endpoints) > 0
	}
	for _, n := range nums {
		g := t.groups[n]
		if !withDrivers(g) || slices.ContainsFunc(g.endpoints, func(d *pci.Device) bool { return d.SRIOVTotalVFs > 0 }) {
			// The SR-IOV PF has its own block (sriovFacts).
			continue
		}
		switch {
		case len(g.members) == 1:
			t.single = append(t.single, g)
		case len(g.endpoints) >= 2 && behindBridgeInGroup(g, byAddr):
			t.bridged = append(t.bridged, g)
		case len(g.endpoints) >= 2 && multifunctionBehindRootPort(g, byAddr):
			t.multifunction = append(t.multifunction, g)
		}
	}
	for _, c := range []struct {
		what   string
		groups []*iommuGroup
		min    int
	}{
		{"single-device groups", t.single, 1},
		{"groups of endpoints behind a bridge in the same group", t.bridged, 2},
		{"multifunction groups behind a root port", t.multifunction, 1},
	} {
		if len(c.groups) < c.min {
			s.fail("topology: found %d %s, want at least %d", len(c.groups), c.what, c.min)
			continue
		}
		var names []string
		for _, g := range c.groups {
			names = append(names, g.String())
		}
		s.ok("topology: %d %s: %v", len(c.groups), c.what, names)
	}
	if len(t.single) == 0 || len(t.bridged) < 2 || len(t.multifunction) == 0 {
		return nil, errors.New("the device layout does not give the groups the tests need")
	}
	return t, nil
}

// behindBridgeInGroup: every endpoint's parent is a PCI bridge that is a
// member of the same group.
func behindBridgeInGroup(g *iommuGroup, byAddr map[pci.Address]*pci.Device) bool {
	for _, d := range g.endpoints {
		if d.Parent == nil {
			return false
		}
		p := byAddr[*d.Parent]
		if p == nil || p.Class>>8 != classPCIBridge || p.IOMMUGroup == nil || *p.IOMMUGroup != g.n {
			return false
		}
	}
	return true
}

// multifunctionBehindRootPort: the endpoints are functions of one slot whose
// parent is a bridge on a root bus, outside the group.
func multifunctionBehindRootPort(g *iommuGroup, byAddr map[pci.Address]*pci.Device) bool {
	first := g.endpoints[0]
	if first.Parent == nil {
		return false
	}
	p := byAddr[*first.Parent]
	if p == nil || p.Class>>8 != classPCIBridge || p.Parent != nil || (p.IOMMUGroup != nil && *p.IOMMUGroup == g.n) {
		return false
	}
	for _, d := range g.endpoints[1:] {
		a, b := d.Address, first.Address
		if d.Parent == nil || *d.Parent != *first.Parent || a.Domain != b.Domain || a.Bus != b.Bus || a.Device != b.Device {
			return false
		}
	}
	return true
}

// state is what a function looks like from sysfs: its driver and raw
// driver_override.
type state struct {
	driver   string
	override string // raw, e.g. "(null)" or "vfio-pci"
}

func (s *suite) state(a pci.Address) state {
	drv, err := s.fs.CurrentDriver(a)
	if err != nil {
		drv = "?" + err.Error()
	}
	return state{driver: drv, override: s.readRaw(s.fs.DevicePath(a, "driver_override"))}
}

func (st state) String() string {
	d := st.driver
	if d == "" {
		d = "(none)"
	}
	return fmt.Sprintf("driver=%s driver_override=%s", d, st.override)
}

// readRaw reads a sysfs attribute without trimming anything but the final
// newline, so "(null)" stays visible.
func (s *suite) readRaw(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "<" + err.Error() + ">"
	}
	if n := len(b); n > 0 && b[n-1] == '\n' {
		b = b[:n-1]
	}
	return string(b)
}

// vfioNodes lists /dev/vfio.
func (s *suite) vfioNodes() []string {
	entries, err := os.ReadDir(filepath.Join(s.devRoot, "vfio"))
	if err != nil {
		return []string{"<" + err.Error() + ">"}
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// groupNode reports whether /dev/vfio/N exists and is a character device.
func (s *suite) groupNode(n int) (exists bool, err error) {
	return charDev(filepath.Join(s.devRoot, "vfio", fmt.Sprint(n)))
}

// charDev reports whether path exists; it is an error when it exists but is
// no character device.
func charDev(path string) (exists bool, err error) {
	st, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if st.Mode()&os.ModeCharDevice == 0 {
		return true, fmt.Errorf("%s is %v, not a character device", path, st.Mode())
	}
	return true, nil
}

// checkFinalState compares every function with how discover found it.
func (s *suite) checkFinalState(t *topology) {
	bad := 0
	for _, d := range t.devices {
		if st, want := s.state(d.Address), t.start[d.Address]; st != want {
			bad++
			s.fail("final state: %s has %v, had %v at start", d.Address, st, want)
		}
	}
	if bad == 0 {
		s.ok("final state: all %d functions have the driver and driver_override they had at start", len(t.devices))
	}
	if nodes := s.vfioNodes(); !slices.Equal(nodes, []string{"vfio"}) {
		s.fail("final state: /dev/vfio holds %v, want only [vfio]", nodes)
	} else {
		s.ok("final state: /dev/vfio holds only the container node")
	}
}
