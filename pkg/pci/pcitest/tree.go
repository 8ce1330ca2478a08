// Package pcitest lays out sysfs trees the way Linux does, for tests and
// demos: device directories nested below their bridges under
// devices/pciDDDD:BB, relative symlinks from bus/pci/devices, driver
// directories with their device links, and kernel/iommu_groups.
package pcitest

import (
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
}

// Tree is a sysfs tree under Root.
type Tree struct {
	Root string
}

// Open returns a Tree for an existing sysfs tree, e.g. one laid out by New
// in another process.
func Open(root string) *Tree { return &Tree{Root: root} }

// New creates the skeleton of a sysfs tree in root (usually t.TempDir()).
func New(root string) (*Tree, error) {
	t := &Tree{Root: root}
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
	}
	if err := os.MkdirAll(t.path(dir), 0o755); err != nil {
		return err
	}
	files := map[string]string{
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
