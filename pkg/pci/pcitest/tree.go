// Package pcitest lays out sysfs trees the way Linux does, for tests and
// demos: device directories nested below their bridges under
// devices/pciDDDD:BB, relative symlinks from bus/pci/devices, driver
// directories with their device links, and kernel/iommu_groups.
package pcitest

import (
	"encoding/binary"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// Function describes one PCI function to lay out.
type Function struct {
	// Address in sysfs form, e.g. "0000:3b:00.0".
	Address string
	// Parent is the address of the upstream bridge; "" puts the function
	// on the root bus of its domain and bus number.
	Parent string
	// Vendor, Device, SubVendor and SubDevice are the PCI ids.
	Vendor, Device, SubVendor, SubDevice uint16
	// Class is the 24-bit class code, e.g. 0x030000 for a VGA controller.
	Class uint32
	// Driver is the bound driver; "" leaves the function without one.
	Driver string
	// IOMMUGroup is the group number; NoIOMMU leaves the link out.
	IOMMUGroup int
	NoIOMMU    bool
	// NUMANode is written to numa_node as is; the kernel writes -1 when it
	// does not know.
	NUMANode int
	// BootVGA writes boot_vga=1 (only VGA-class functions have the file).
	BootVGA bool
	// SRIOVTotalVFs makes the function an SR-IOV PF.
	SRIOVTotalVFs int
	// PhysFn is the PF of a virtual function; the builder adds the physfn
	// link here and a virtfnN link in the PF (which must exist already).
	PhysFn string
	// Revision is the revision ID (file revision, config byte 0x08).
	Revision uint8
	// BARs are the function's standard BARs, written to resource and
	// config; nil gives what most functions of the class have (see
	// DefaultBARs), NoBARs none at all (CPU uncore register functions).
	BARs   []BAR
	NoBARs bool
}

// BAR is one standard base address register.
type BAR struct {
	// IO is an I/O port BAR; otherwise a memory BAR, 64-bit with Mem64.
	IO, Mem64, Prefetch bool
	// Size in bytes, a power of two.
	Size uint64
}

// DefaultBARs is what the builder gives a function without BARs set: one
// 32-bit memory BAR of 16 KiB, except for bridges and chipset bridges
// (class 0600-0604, 0609), which usually have none.
func DefaultBARs(class uint32) []BAR {
	switch class >> 8 {
	case 0x0600, 0x0601, 0x0602, 0x0603, 0x0604, 0x0609:
		return nil
	}
	return []BAR{{Size: 16 << 10}}
}

// HeaderTypeOf is the header type a function of class has: 1 for
// PCI-to-PCI bridges (0604, 0609), 2 for CardBus bridges (0607), 0 else.
func HeaderTypeOf(class uint32) uint8 {
	switch class >> 8 {
	case 0x0604, 0x0609:
		return 1
	case 0x0607:
		return 2
	}
	return 0
}

// Tree is a sysfs tree under Root.
type Tree struct {
	Root string
	// nextMem and nextIO are where the next BAR goes, so that the
	// addresses in resource do not overlap.
	nextMem, nextMem64, nextIO uint64
}

// Open returns a Tree for an existing sysfs tree, e.g. one laid out by New
// in another process.
func Open(root string) *Tree {
	return &Tree{Root: root, nextMem: memBase, nextMem64: mem64Base, nextIO: ioBase}
}

// Where BARs are placed: 32-bit memory below 4 GiB, 64-bit prefetchable
// memory high up as firmware puts it, I/O above the legacy ports.
const (
	memBase   = 0xc0000000
	mem64Base = 0x380000000000
	ioBase    = 0x2000
)

// New creates the skeleton of a sysfs tree in root (usually t.TempDir()).
func New(root string) (*Tree, error) {
	t := Open(root)
	for _, d := range []string{pci.BusDevicesDir, pci.BusDriversDir, pci.IOMMUGroupDir, "devices"} {
		if err := os.MkdirAll(t.path(d), 0o755); err != nil {
			return nil, err
		}
	}
	for file, content := range map[string]string{pci.DriversProbe: "", "bus/pci/drivers_autoprobe": "1\n"} {
		if err := os.WriteFile(t.path(file), []byte(content), 0o644); err != nil {
			return nil, err
		}
	}
	return t, nil
}

func (t *Tree) path(rel string) string { return filepath.Join(t.Root, filepath.FromSlash(rel)) }

// DevicePath returns the device directory of addr relative to Root,
// resolved through its bus/pci/devices link.
func (t *Tree) DevicePath(addr string) (string, error) {
	target, err := os.Readlink(t.path(pci.BusDevicesDir + "/" + addr))
	if err != nil {
		return "", fmt.Errorf("unknown device %s: %w", addr, err)
	}
	return path.Clean(path.Join(pci.BusDevicesDir, target)), nil
}

// Add lays out the functions in order; parents and PFs must come first.
func (t *Tree) Add(fns ...Function) error {
	for _, fn := range fns {
		if err := t.add(fn); err != nil {
			return fmt.Errorf("add %s: %w", fn.Address, err)
		}
	}
	return nil
}

func (t *Tree) add(fn Function) error {
	addr, err := pci.ParseAddress(fn.Address)
	if err != nil {
		return err
	}
	if _, err := t.DevicePath(fn.Address); err == nil {
		return fmt.Errorf("already exists")
	}
	var dir string
	if fn.Parent == "" {
		dir = fmt.Sprintf("devices/pci%04x:%02x/%s", addr.Domain, addr.Bus, fn.Address)
	} else {
		parent, err := t.DevicePath(fn.Parent)
		if err != nil {
			return fmt.Errorf("parent: %w", err)
		}
		dir = parent + "/" + fn.Address
		if err := t.routeBus(parent, addr.Bus); err != nil {
			return fmt.Errorf("parent: %w", err)
		}
	}
	if err := os.MkdirAll(t.path(dir), 0o755); err != nil {
		return err
	}
	header := HeaderTypeOf(fn.Class)
	bars := fn.BARs
	if bars == nil && !fn.NoBARs {
		bars = DefaultBARs(fn.Class)
	}
	if fn.NoBARs {
		bars = nil
	}
	config, resource, err := t.hardware(addr, fn, header, bars)
	if err != nil {
		return err
	}
	files := map[string]string{
		"config":           string(config),
		"resource":         resource,
		"revision":         fmt.Sprintf("0x%02x\n", fn.Revision),
		"vendor":           fmt.Sprintf("0x%04x\n", fn.Vendor),
		"device":           fmt.Sprintf("0x%04x\n", fn.Device),
		"subsystem_vendor": fmt.Sprintf("0x%04x\n", fn.SubVendor),
		"subsystem_device": fmt.Sprintf("0x%04x\n", fn.SubDevice),
		"class":            fmt.Sprintf("0x%06x\n", fn.Class),
		"numa_node":        fmt.Sprintf("%d\n", fn.NUMANode),
		"driver_override":  "(null)\n",
		"modalias": fmt.Sprintf("pci:v%08Xd%08Xsv%08Xsd%08Xbc%02Xsc%02Xi%02X\n",
			fn.Vendor, fn.Device, fn.SubVendor, fn.SubDevice, fn.Class>>16, (fn.Class>>8)&0xff, fn.Class&0xff),
		"uevent": fmt.Sprintf("PCI_CLASS=%X\nPCI_ID=%04X:%04X\nPCI_SUBSYS_ID=%04X:%04X\nPCI_SLOT_NAME=%s\n",
			fn.Class, fn.Vendor, fn.Device, fn.SubVendor, fn.SubDevice, fn.Address),
	}
	if fn.Class>>8 == 0x0300 {
		files["boot_vga"] = map[bool]string{true: "1\n", false: "0\n"}[fn.BootVGA]
	}
	if fn.SRIOVTotalVFs > 0 {
		files["sriov_totalvfs"] = fmt.Sprintf("%d\n", fn.SRIOVTotalVFs)
		files["sriov_numvfs"] = "0\n"
		files["sriov_drivers_autoprobe"] = "1\n"
	}
	for name, content := range files {
		if err := os.WriteFile(t.path(dir+"/"+name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	if err := t.symlink(dir+"/subsystem", "bus/pci"); err != nil {
		return err
	}
	if err := t.symlink(pci.BusDevicesDir+"/"+fn.Address, dir); err != nil {
		return err
	}
	if !fn.NoIOMMU {
		groupDir := pci.IOMMUGroupDir + "/" + strconv.Itoa(fn.IOMMUGroup)
		if err := os.MkdirAll(t.path(groupDir+"/devices"), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(t.path(groupDir+"/type"), []byte("DMA\n"), 0o644); err != nil {
			return err
		}
		if err := t.symlink(groupDir+"/devices/"+fn.Address, dir); err != nil {
			return err
		}
		if err := t.symlink(dir+"/iommu_group", groupDir); err != nil {
			return err
		}
	}
	if fn.PhysFn != "" {
		pf, err := t.DevicePath(fn.PhysFn)
		if err != nil {
			return fmt.Errorf("physical function: %w", err)
		}
		existing, err := filepath.Glob(t.path(pf + "/virtfn*"))
		if err != nil {
			return err
		}
		n := len(existing)
		if err := t.symlink(dir+"/physfn", pf); err != nil {
			return err
		}
		if err := t.symlink(fmt.Sprintf("%s/virtfn%d", pf, n), dir); err != nil {
			return err
		}
		if err := os.WriteFile(t.path(pf+"/sriov_numvfs"), []byte(fmt.Sprintf("%d\n", n+1)), 0o644); err != nil {
			return err
		}
	}
	if fn.Driver != "" {
		return t.Bind(fn.Address, fn.Driver)
	}
	return nil
}

// hardware lays out config (the 256 bytes of a conventional header) and
// resource (the kernel's "0x%016x 0x%016x 0x%016x" lines: 13 for
// endpoints, 17 for bridges with their windows) for fn.
func (t *Tree) hardware(addr pci.Address, fn Function, header uint8, bars []BAR) ([]byte, string, error) {
	cfg := make([]byte, 256)
	binary.LittleEndian.PutUint16(cfg[0x00:], fn.Vendor)
	binary.LittleEndian.PutUint16(cfg[0x02:], fn.Device)
	cfg[0x08] = fn.Revision
	cfg[0x09], cfg[0x0a], cfg[0x0b] = byte(fn.Class), byte(fn.Class>>8), byte(fn.Class>>16)
	cfg[0x0e] = header
	if addr.Function != 0 {
		cfg[0x0e] |= 0x80 // multi-function device
	}
	maxBARs := 6
	switch header {
	case 0:
		binary.LittleEndian.PutUint16(cfg[0x2c:], fn.SubVendor)
		binary.LittleEndian.PutUint16(cfg[0x2e:], fn.SubDevice)
	case 1:
		maxBARs = 2
		cfg[0x18], cfg[0x19], cfg[0x1a] = addr.Bus, 0, 0 // secondary buses: set by routeBus
	case 2:
		maxBARs = 1
	}
	lines := 13
	if header == 1 {
		lines = 17
	}
	res := make([][3]uint64, lines)
	command := uint16(0x0004) // bus master
	slot := 0
	for _, b := range bars {
		if b.Size == 0 || b.Size&(b.Size-1) != 0 {
			return nil, "", fmt.Errorf("BAR size %#x is not a power of two", b.Size)
		}
		width := 1
		if b.Mem64 && !b.IO {
			width = 2
		}
		if slot+width > maxBARs {
			return nil, "", fmt.Errorf("more BARs than header type %d has", header)
		}
		var start, flags, reg uint64
		if b.IO {
			t.nextIO = alignUp(t.nextIO, b.Size)
			start, t.nextIO = t.nextIO, t.nextIO+b.Size
			flags, reg = 0x40101, start|0x1
			command |= 0x1
		} else {
			next := &t.nextMem
			if b.Mem64 && b.Prefetch {
				next = &t.nextMem64
			}
			*next = alignUp(*next, b.Size)
			start, *next = *next, *next+b.Size
			flags, reg = 0x40200, start
			if b.Mem64 {
				flags |= 0x100000 | 0x4
				reg |= 0x4
			}
			if b.Prefetch {
				flags |= 0x2000 | 0x8
				reg |= 0x8
			}
			command |= 0x2
		}
		res[slot] = [3]uint64{start, start + b.Size - 1, flags}
		binary.LittleEndian.PutUint32(cfg[0x10+4*slot:], uint32(reg))
		if width == 2 {
			binary.LittleEndian.PutUint32(cfg[0x10+4*(slot+1):], uint32(reg>>32))
		}
		slot += width
	}
	binary.LittleEndian.PutUint16(cfg[0x04:], command)
	var sb strings.Builder
	for _, r := range res {
		fmt.Fprintf(&sb, "0x%016x 0x%016x 0x%016x\n", r[0], r[1], r[2])
	}
	return cfg, sb.String(), nil
}

// routeBus records in a bridge's config that bus is below it, as firmware
// numbers buses: the secondary bus is the first, the subordinate the last.
func (t *Tree) routeBus(bridgeDir string, bus uint8) error {
	file := t.path(bridgeDir + "/config")
	cfg, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	if len(cfg) < 0x1b || cfg[0x0e]&0x7f != 1 {
		return nil
	}
	if cfg[0x19] == 0 || bus < cfg[0x19] {
		cfg[0x19] = bus
	}
	if bus > cfg[0x1a] {
		cfg[0x1a] = bus
	}
	return os.WriteFile(file, cfg, 0o644)
}

func alignUp(v, align uint64) uint64 { return (v + align - 1) &^ (align - 1) }

// AddDriver registers a PCI driver directory (bind, unbind, new_id ...)
// without devices, as a loaded module does.
func (t *Tree) AddDriver(name string) error {
	dir := pci.BusDriversDir + "/" + name
	if err := os.MkdirAll(t.path(dir), 0o755); err != nil {
		return err
	}
	for _, f := range []string{"bind", "unbind", "new_id", "remove_id", "uevent"} {
		if _, err := os.Stat(t.path(dir + "/" + f)); err == nil {
			continue
		}
		if err := os.WriteFile(t.path(dir+"/"+f), nil, 0o200); err != nil {
			return err
		}
	}
	return nil
}

// Bind links addr to driver the way the driver core does: the device's
// driver link and the driver's device link.
func (t *Tree) Bind(addr, driver string) error {
	dir, err := t.DevicePath(addr)
	if err != nil {
		return err
	}
	if err := t.AddDriver(driver); err != nil {
		return err
	}
	if err := t.symlink(dir+"/driver", pci.BusDriversDir+"/"+driver); err != nil {
		return err
	}
	return t.symlink(pci.BusDriversDir+"/"+driver+"/"+addr, dir)
}

// Unbind removes both links of a binding; no binding is no error.
func (t *Tree) Unbind(addr string) error {
	dir, err := t.DevicePath(addr)
	if err != nil {
		return err
	}
	target, err := os.Readlink(t.path(dir + "/driver"))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	driver := path.Base(target)
	if err := os.Remove(t.path(pci.BusDriversDir + "/" + driver + "/" + addr)); err != nil && !os.IsNotExist(err) {
		return err
	}
	return os.Remove(t.path(dir + "/driver"))
}

// symlink creates link -> target, both relative to Root, as a relative
// link like the kernel's.
func (t *Tree) symlink(link, target string) error {
	rel, err := filepath.Rel(path.Dir(link), target)
	if err != nil {
		return err
	}
	if strings.HasPrefix(rel, "/") {
		return fmt.Errorf("link %s -> %s is not relative", link, target)
	}
	return os.Symlink(rel, t.path(link))
}
