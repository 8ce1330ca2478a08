// Package hostviewtest lays out a running host the way Linux shows it, for
// tests of package hostview and of the plugin: block devices, network
// interfaces and ttys in a sysfs tree whose PCI functions package pcitest
// laid out, and a proc tree with PID 1's mounts and network tables, swaps,
// and processes with open files.
package hostviewtest

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
)

// Host is a sysfs tree and a proc tree of one running host.
type Host struct {
	Sys  string
	Proc string

	nextMountID int
	mounts      []string
	swaps       []string
	routes      []string
	routes6     []string
	addrs6      []string
	neighbours  []string
}

// New lays out PID 1 (systemd) and 2 (kthreadd) in procRoot with empty tables and the
// sysfs directories the host view reads. sysRoot must hold a pcitest tree.
func New(sysRoot, procRoot string) (*Host, error) {
	h := &Host{Sys: sysRoot, Proc: procRoot, nextMountID: 21}
	for _, d := range []string{"class/block", "dev/block", "block", "class/net", "class/tty", "devices/virtual/block", "devices/virtual/net", "devices/virtual/tty"} {
		if err := os.MkdirAll(h.sys(d), 0o755); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(filepath.Join(procRoot, "1", "net"), 0o755); err != nil {
		return nil, err
	}
	if err := h.AddProcess(1, "systemd"); err != nil {
		return nil, err
	}
	// PID 2 is kthreadd in the host's PID namespace only.
	if err := h.AddProcess(2, "kthreadd"); err != nil {
		return nil, err
	}
	return h, h.writeTables()
}

func (h *Host) sys(rel string) string { return filepath.Join(h.Sys, filepath.FromSlash(rel)) }

// symlink creates a relative link like the kernel's; both paths are
// relative to the sysfs root.
func (h *Host) symlink(link, target string) error {
	rel, err := filepath.Rel(path.Dir(link), target)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(h.sys(link)), 0o755); err != nil {
		return err
	}
	return os.Symlink(rel, h.sys(link))
}

func (h *Host) writeFiles(dir string, files map[string]string) error {
	if err := os.MkdirAll(h.sys(dir), 0o755); err != nil {
		return err
	}
	for name, content := range files {
		if err := os.WriteFile(h.sys(dir+"/"+name), []byte(content), 0o444); err != nil {
			return err
		}
	}
	return nil
}

// devicePath returns the device directory of a PCI function relative to
// the sysfs root.
func (h *Host) devicePath(fn string) (string, error) {
	link := "bus/pci/devices/" + fn
	target, err := os.Readlink(h.sys(link))
	if err != nil {
		return "", fmt.Errorf("PCI function %s: %w", fn, err)
	}
	return path.Clean(path.Join(path.Dir(link), target)), nil
}

// blockDir returns the directory of a block device by name.
func (h *Host) blockDir(name string) (string, error) {
	link := "class/block/" + name
	target, err := os.Readlink(h.sys(link))
	if err != nil {
		return "", fmt.Errorf("block device %s: %w", name, err)
	}
	return path.Clean(path.Join(path.Dir(link), target)), nil
}

// Disk is a whole disk on a PCI storage controller.
type Disk struct {
	// Name is the kernel name: nvme0n1, sda, vda.
	Name string
	// Function is the PCI address of the controller.
	Function string
	// Under is the path from the controller to the disk's directory:
	// "nvme/nvme0" for NVMe, "ata1/host0/target0:0:0/0:0:0:0/block"
	// for SATA, "virtio1/block" for virtio.
	Under        string
	Major, Minor int
	// Partitions is how many partitions to add (minors follow the
	// disk's); they are named nvme0n1p1 or sda1 as Linux names them.
	Partitions int
}

// PartitionName returns the name of partition n of disk, as Linux forms it.
func PartitionName(disk string, n int) string {
	if last := disk[len(disk)-1]; last >= '0' && last <= '9' {
		return fmt.Sprintf("%sp%d", disk, n)
	}
	return fmt.Sprintf("%s%d", disk, n)
}

// AddDisk lays out a disk and its partitions: the block directories below
// the controller, class/block, block and dev/block links.
func (h *Host) AddDisk(d Disk) error {
	parent, err := h.devicePath(d.Function)
	if err != nil {
		return err
	}
	dir := parent + "/" + d.Under + "/" + d.Name
	if err := h.blockDevice(dir, d.Name, d.Major, d.Minor, "disk"); err != nil {
		return err
	}
	if err := os.MkdirAll(h.sys(dir+"/slaves"), 0o755); err != nil {
		return err
	}
	if err := h.symlink("block/"+d.Name, dir); err != nil {
		return err
	}
	for i := 1; i <= d.Partitions; i++ {
		name := PartitionName(d.Name, i)
		pdir := dir + "/" + name
		if err := h.blockDevice(pdir, name, d.Major, d.Minor+i, "partition"); err != nil {
			return err
		}
		if err := h.writeFiles(pdir, map[string]string{"partition": fmt.Sprintf("%d\n", i), "start": fmt.Sprintf("%d\n", 2048*i)}); err != nil {
			return err
		}
	}
	return nil
}

// blockDevice writes what every block device directory has.
func (h *Host) blockDevice(dir, name string, major, minor int, devtype string) error {
	if err := h.writeFiles(dir, map[string]string{
		"dev":    fmt.Sprintf("%d:%d\n", major, minor),
		"size":   "1953525168\n",
		"ro":     "0\n",
		"uevent": fmt.Sprintf("MAJOR=%d\nMINOR=%d\nDEVNAME=%s\nDEVTYPE=%s\n", major, minor, name, devtype),
	}); err != nil {
		return err
	}
	if err := os.MkdirAll(h.sys(dir+"/holders"), 0o755); err != nil {
		return err
	}
	if err := h.symlink(dir+"/subsystem", "class/block"); err != nil {
		return err
	}
	if err := h.symlink("class/block/"+name, dir); err != nil {
		return err
	}
	return h.symlink(fmt.Sprintf("dev/block/%d:%d", major, minor), dir)
}

// Stacked is a device-mapper (LVM, dm-crypt, multipath) or md device built
// on other block devices.
type Stacked struct {
	// Name is the kernel name: dm-0, md0.
	Name string
	// DMName is the device-mapper name (vg0-root); "" for md.
	DMName       string
	Major, Minor int
	// Slaves are the block devices it is built on, by name.
	Slaves []string
}

// AddStacked lays out a dm or md device below devices/virtual/block with
// its slaves/ links, and a holders/ link in each slave.
func (h *Host) AddStacked(s Stacked) error {
	dir := "devices/virtual/block/" + s.Name
	if err := h.blockDevice(dir, s.Name, s.Major, s.Minor, "disk"); err != nil {
		return err
	}
	if err := h.symlink("block/"+s.Name, dir); err != nil {
		return err
	}
	if s.DMName != "" {
		if err := h.writeFiles(dir+"/dm", map[string]string{"name": s.DMName + "\n", "uuid": "LVM-" + s.DMName + "\n", "suspended": "0\n"}); err != nil {
			return err
		}
	} else {
		if err := h.writeFiles(dir+"/md", map[string]string{"level": "raid1\n", "array_state": "clean\n"}); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(h.sys(dir+"/slaves"), 0o755); err != nil {
		return err
	}
	for _, sl := range s.Slaves {
		sdir, err := h.blockDir(sl)
		if err != nil {
			return err
		}
		if err := h.symlink(dir+"/slaves/"+sl, sdir); err != nil {
			return err
		}
		if err := h.symlink(sdir+"/holders/"+s.Name, dir); err != nil {
			return err
		}
	}
	return nil
}

// Interface is a network interface.
type Interface struct {
	Name string
	// Function is the PCI address of the NIC; "" for a virtual interface.
	Function string
	// Kind of a virtual interface: "bond", "bridge", "vlan" or "" (e.g.
	// an Open vSwitch internal port or ovs-system).
	Kind string
	// Lowers are the interfaces below it: bond slaves, bridge ports, the
	// VLAN's parent. They must exist already.
	Lowers []string
}

// AddInterface lays out an interface with its class/net link, and for
// stacked ones the lower_*/upper_* and master links (and brif/ and
// brport/ for a bridge) the kernel creates.
func (h *Host) AddInterface(i Interface) error {
	dir := "devices/virtual/net/" + i.Name
	if i.Function != "" {
		parent, err := h.devicePath(i.Function)
		if err != nil {
			return err
		}
		dir = parent + "/net/" + i.Name
		if err := h.symlink(dir+"/device", parent); err != nil {
			return err
		}
	}
	n, _ := os.ReadDir(h.sys("class/net"))
	if err := h.writeFiles(dir, map[string]string{
		"ifindex":   fmt.Sprintf("%d\n", len(n)+2),
		"address":   fmt.Sprintf("02:00:00:00:00:%02x\n", len(n)+2),
		"operstate": "up\n",
		"type":      "1\n",
		"mtu":       "1500\n",
		"uevent":    fmt.Sprintf("INTERFACE=%s\nIFINDEX=%d\n", i.Name, len(n)+2),
	}); err != nil {
		return err
	}
	if err := h.symlink(dir+"/subsystem", "class/net"); err != nil {
		return err
	}
	if err := h.symlink("class/net/"+i.Name, dir); err != nil {
		return err
	}
	switch i.Kind {
	case "bond":
		if err := h.writeFiles(dir+"/bonding", map[string]string{"slaves": strings.Join(i.Lowers, " ") + "\n", "mode": "802.3ad 4\n"}); err != nil {
			return err
		}
	case "bridge":
		if err := h.writeFiles(dir+"/bridge", map[string]string{"stp_state": "0\n"}); err != nil {
			return err
		}
		if err := os.MkdirAll(h.sys(dir+"/brif"), 0o755); err != nil {
			return err
		}
	}
	for _, l := range i.Lowers {
		ldir, err := h.netDir(l)
		if err != nil {
			return err
		}
		if err := h.symlink(dir+"/lower_"+l, ldir); err != nil {
			return err
		}
		if err := h.symlink(ldir+"/upper_"+i.Name, dir); err != nil {
			return err
		}
		if i.Kind == "vlan" {
			continue
		}
		if err := h.symlink(ldir+"/master", dir); err != nil {
			return err
		}
		if i.Kind == "bridge" {
			if err := h.writeFiles(ldir+"/brport", map[string]string{"state": "3\n"}); err != nil {
				return err
			}
			if err := h.symlink(dir+"/brif/"+l, ldir+"/brport"); err != nil {
				return err
			}
		}
	}
	return nil
}

func (h *Host) netDir(name string) (string, error) {
	link := "class/net/" + name
	target, err := os.Readlink(h.sys(link))
	if err != nil {
		return "", fmt.Errorf("interface %s: %w", name, err)
	}
	return path.Clean(path.Join(path.Dir(link), target)), nil
}

// AddSerial lays out a serial port (ttyS4) on a PCI UART, below a serial
// core port device as Linux 6.5 and later show it
// (0000:00:16.3/0000:00:16.3:0/0000:00:16.3:0.0/tty/ttyS4).
func (h *Host) AddSerial(tty, function string, minor int) error {
	parent, err := h.devicePath(function)
	if err != nil {
		return err
	}
	port := parent + "/" + function + ":0/" + function + ":0.0"
	dir := port + "/tty/" + tty
	if err := h.writeFiles(dir, map[string]string{"dev": fmt.Sprintf("4:%d\n", minor), "uevent": fmt.Sprintf("MAJOR=4\nMINOR=%d\nDEVNAME=%s\n", minor, tty)}); err != nil {
		return err
	}
	if err := h.symlink(dir+"/device", port); err != nil {
		return err
	}
	if err := h.symlink(dir+"/subsystem", "class/tty"); err != nil {
		return err
	}
	return h.symlink("class/tty/"+tty, dir)
}

// SetConsole writes class/tty/console/active (e.g. "tty0 ttyS4"), with
// virtual ttys laid out for names that are not there yet.
func (h *Host) SetConsole(ttys ...string) error {
	for _, t := range append([]string{"console"}, ttys...) {
		if _, err := os.Lstat(h.sys("class/tty/" + t)); err == nil {
			continue
		}
		dir := "devices/virtual/tty/" + t
		if err := h.writeFiles(dir, map[string]string{"dev": "5:1\n"}); err != nil {
			return err
		}
		if err := h.symlink("class/tty/"+t, dir); err != nil {
			return err
		}
	}
	return h.writeFiles("devices/virtual/tty/console", map[string]string{"active": strings.Join(ttys, " ") + "\n"})
}

// AddVFIODevice lays out the VFIO device cdev of a function bound to VFIO
// (<device>/vfio-dev/vfioN and class/vfio-dev/vfioN), as Linux 6.6+ does.
func (h *Host) AddVFIODevice(function, cdev string) error {
	parent, err := h.devicePath(function)
	if err != nil {
		return err
	}
	dir := parent + "/vfio-dev/" + cdev
	if err := h.writeFiles(dir, map[string]string{"dev": "511:0\n"}); err != nil {
		return err
	}
	return h.symlink("class/vfio-dev/"+cdev, dir)
}

// AddVFIOGroup lays out the kernel's VFIO group device of an IOMMU group
// (devices/virtual/vfio/N and class/vfio/N, behind /dev/vfio/N): there is
// one while a function of the group is bound to a VFIO driver, and, on
// kernels before 6.2, as long as a process keeps the group open.
func (h *Host) AddVFIOGroup(group int) error {
	dir := "devices/virtual/vfio/" + strconv.Itoa(group)
	if err := h.writeFiles(dir, map[string]string{"dev": fmt.Sprintf("510:%d\n", group)}); err != nil {
		return err
	}
	return h.symlink("class/vfio/"+strconv.Itoa(group), dir)
}

// Mount is one mounted file system.
type Mount struct {
	Major, Minor int
	MountPoint   string
	FSType       string
	Source       string
	// Optional are the optional fields (shared:1, master:2); none when
	// nil.
	Optional []string
}

// AddMount appends a line to PID 1's mountinfo, escaping the paths as the
// kernel does.
func (h *Host) AddMount(m Mount) error {
	fields := []string{strconv.Itoa(h.nextMountID), strconv.Itoa(max(h.nextMountID-1, 1)),
		fmt.Sprintf("%d:%d", m.Major, m.Minor), "/", Escape(m.MountPoint), "rw,relatime"}
	fields = append(fields, m.Optional...)
	fields = append(fields, "-", m.FSType, Escape(m.Source), "rw")
	h.nextMountID++
	h.mounts = append(h.mounts, strings.Join(fields, " "))
	return h.writeTables()
}

// Escape is the kernel's escaping of paths in mountinfo and swaps.
func Escape(s string) string {
	var b strings.Builder
	for _, c := range []byte(s) {
		switch c {
		case ' ', '\t', '\n', '\\':
			fmt.Fprintf(&b, `\%03o`, c)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// AddSwap adds an active swap area ("partition" or "file").
func (h *Host) AddSwap(filename, kind string) error {
	h.swaps = append(h.swaps, fmt.Sprintf("%-40s%s\t%d\t\t%d\t\t%d", Escape(filename), kind, 8388604, 0, -2))
	return h.writeTables()
}

// AddRoute adds an IPv4 route of the main table through iface; the zero
// prefix with a gateway is the default route.
func (h *Host) AddRoute(iface string, dest netip.Prefix, gateway netip.Addr) error {
	flags := 0x1 // RTF_UP
	gw := uint32(0)
	if gateway.IsValid() {
		flags |= 0x2 // RTF_GATEWAY
		gw = word(gateway)
	}
	mask := uint32(0)
	if dest.Bits() > 0 {
		m := ^uint32(0) << (32 - dest.Bits())
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], m)
		mask = binary.NativeEndian.Uint32(b[:])
	}
	h.routes = append(h.routes, fmt.Sprintf("%s\t%08X\t%08X\t%04X\t0\t0\t100\t%08X\t0\t0\t0", iface, word(dest.Addr()), gw, flags, mask))
	return h.writeTables()
}

// word is an IPv4 address as net/route prints it: the network-order bytes
// read as a host-order word.
func word(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

// AddDefaultRoute6 adds an IPv6 default route through iface.
func (h *Host) AddDefaultRoute6(iface string, gateway netip.Addr) error {
	zero := strings.Repeat("0", 32)
	g := gateway.As16()
	h.routes6 = append(h.routes6, fmt.Sprintf("%s 00 %s 00 %s 00000400 00000001 00000000 00000003 %8s", zero, zero, hex.EncodeToString(g[:]), iface))
	return h.writeTables()
}

// AddAddress6 adds an IPv6 address of iface to if_inet6.
func (h *Host) AddAddress6(iface string, addr netip.Prefix) error {
	a := addr.Addr().As16()
	scope := 0x00
	switch {
	case addr.Addr().IsLoopback():
		scope = 0x10
	case addr.Addr().IsLinkLocalUnicast():
		scope = 0x20
	}
	h.addrs6 = append(h.addrs6, fmt.Sprintf("%s %02x %02x %02x %02x %8s", hex.EncodeToString(a[:]), len(h.addrs6)+2, addr.Bits(), scope, 0x80, iface))
	return h.writeTables()
}

// AddNeighbour adds an IPv4 neighbour on iface to net/arp, with the
// kernel's flags: 0x2 resolved, 0x4 permanent, 0x0 a resolution under way
// or failed.
func (h *Host) AddNeighbour(iface string, addr netip.Addr, flags int) error {
	mac := "00:00:00:00:00:00"
	if flags != 0 {
		b := addr.As4()
		mac = fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[1], b[2], b[3])
	}
	h.neighbours = append(h.neighbours, fmt.Sprintf("%-16s 0x%-10x0x%-10x%-17s     %-8s %s", addr, 1, flags, mac, "*", iface))
	return h.writeTables()
}

// writeTables writes PID 1's mountinfo and network tables and swaps.
func (h *Host) writeTables() error {
	lines := func(header string, l []string) []byte {
		s := header
		for _, x := range l {
			s += x + "\n"
		}
		return []byte(s)
	}
	for file, data := range map[string][]byte{
		"1/mountinfo":      lines("", h.mounts),
		"swaps":            lines("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n", h.swaps),
		"1/net/route":      lines("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n", h.routes),
		"1/net/ipv6_route": lines("", h.routes6),
		"1/net/if_inet6":   lines("", h.addrs6),
		"1/net/arp":        lines("IP address       HW type     Flags       HW address            Mask     Device\n", h.neighbours),
	} {
		if err := os.WriteFile(filepath.Join(h.Proc, filepath.FromSlash(file)), data, 0o444); err != nil {
			return err
		}
	}
	return nil
}

// AddProcess lays out a process with its comm and one open file per
// target, as /proc/<pid>/fd/<n> links (0, 1, 2 ...). A target such as
// "/dev/vfio/60" need not exist: the kernel's links name the path the
// process opened.
func (h *Host) AddProcess(pid int, comm string, targets ...string) error {
	dir := filepath.Join(h.Proc, strconv.Itoa(pid))
	if err := os.MkdirAll(filepath.Join(dir, "fd"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "comm"), []byte(comm+"\n"), 0o444); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "cmdline"), []byte(comm+"\x00"), 0o444); err != nil {
		return err
	}
	for n, t := range targets {
		if err := os.Symlink(t, filepath.Join(dir, "fd", strconv.Itoa(n))); err != nil {
			return err
		}
	}
	return nil
}

// AddNVMeSubsystem lays out an NVMe subsystem with native multipath: the
// namespace's block device below devices/virtual/nvme-subsystem/<subsys>,
// and one link per controller (nvme0 -> the controller below its PCI
// function), controllers by name to PCI address.
func (h *Host) AddNVMeSubsystem(subsys, namespace string, major, minor int, controllers map[string]string) error {
	dir := "devices/virtual/nvme-subsystem/" + subsys
	if err := h.writeFiles(dir, map[string]string{"subsysnqn": "nqn.2014.08.org.nvmexpress:" + subsys + "\n", "iopolicy": "numa\n"}); err != nil {
		return err
	}
	if err := h.symlink("class/nvme-subsystem/"+subsys, dir); err != nil {
		return err
	}
	for ctrl, fn := range controllers {
		parent, err := h.devicePath(fn)
		if err != nil {
			return err
		}
		cdir := parent + "/nvme/" + ctrl
		if err := h.writeFiles(cdir, map[string]string{"state": "live\n", "transport": "pcie\n"}); err != nil {
			return err
		}
		if err := h.symlink(dir+"/"+ctrl, cdir); err != nil {
			return err
		}
	}
	ndir := dir + "/" + namespace
	if err := h.blockDevice(ndir, namespace, major, minor, "disk"); err != nil {
		return err
	}
	if err := os.MkdirAll(h.sys(ndir+"/slaves"), 0o755); err != nil {
		return err
	}
	return h.symlink("block/"+namespace, ndir)
}

// SetNetNamespace makes PID 1's network namespace the one at ns (a
// /proc/<pid>/ns/net of a real process): the host view asks it over netlink
// for the IPv4 addresses, as it asks the host's.
func (h *Host) SetNetNamespace(ns string) error {
	if err := os.MkdirAll(filepath.Join(h.Proc, "1", "ns"), 0o755); err != nil {
		return err
	}
	return os.Symlink(ns, filepath.Join(h.Proc, "1", "ns", "net"))
}
