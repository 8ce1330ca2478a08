package pci

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Paths below the sysfs root, as Linux lays them out.
const (
	BusDevicesDir = "bus/pci/devices"
	BusDriversDir = "bus/pci/drivers"
	DriversProbe  = "bus/pci/drivers_probe"
	IOMMUGroupDir = "kernel/iommu_groups"
)

// maxAttrSize bounds every attribute read: sysfs attributes fit in a page,
// and a misbehaving file must not make discovery read without end.
const maxAttrSize = 4096

var pcieRootPattern = regexp.MustCompile(`^pci[0-9a-f]{4,8}:[0-9a-f]{2}$`)

// FS reads PCI functions below a sysfs root ("/sys" on a host).
type FS struct {
	root string
}

// NewFS returns an FS for the sysfs tree at root. It fails when root is not
// a directory, so that a wrong flag is reported at start-up.
func NewFS(root string) (*FS, error) {
	st, err := os.Stat(root)
	if err != nil {
		return nil, fmt.Errorf("sysfs root: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("sysfs root %s: not a directory", root)
	}
	return &FS{root: filepath.Clean(root)}, nil
}

// Path joins relative sysfs path elements below the root.
func (f *FS) Path(elem ...string) string {
	return filepath.Join(append([]string{f.root}, elem...)...)
}

// DevicePath returns the directory of one function, through its
// bus/pci/devices symlink.
func (f *FS) DevicePath(addr Address, elem ...string) string {
	return f.Path(append([]string{BusDevicesDir, addr.String()}, elem...)...)
}

// Device is one PCI function as sysfs describes it.
type Device struct {
	Address Address
	// Path is the resolved device directory relative to the sysfs root,
	// e.g. "devices/pci0000:00/0000:00:01.0/0000:01:00.0".
	Path string
	// VendorID, DeviceID, SubsystemVendorID and SubsystemDeviceID come from
	// the files vendor, device, subsystem_vendor and subsystem_device.
	VendorID          uint16
	DeviceID          uint16
	SubsystemVendorID uint16
	SubsystemDeviceID uint16
	// Class is the 24-bit class code from the file class.
	Class uint32
	// Driver is the name of the bound driver (the driver link), "" if none.
	Driver string
	// IOMMUGroup is the group number from the iommu_group link, nil when the
	// function has none (no IOMMU, or IOMMU disabled).
	IOMMUGroup *int
	// NUMANode is from numa_node; -1 when unknown.
	NUMANode int
	// PCIeRoot is the root complex element of the device path, e.g. "pci0000:00".
	PCIeRoot string
	// Parent is the upstream bridge, nil for functions on a root bus.
	Parent *Address
	// BootVGA is true when boot_vga reads 1: the console of the host.
	BootVGA bool
	// PhysFn is the physical function of an SR-IOV virtual function.
	PhysFn *Address
	// SRIOVTotalVFs and SRIOVNumVFs are from sriov_totalvfs and
	// sriov_numvfs; zero for functions without SR-IOV.
	SRIOVTotalVFs int
	SRIOVNumVFs   int
	// VirtFns lists the enabled virtual functions of a PF (virtfnN links).
	VirtFns []Address
	// HeaderType is from byte 0x0e of config: HeaderEndpoint,
	// HeaderBridge or HeaderCardBus; nil when config could not be read,
	// and then ConfigProblem says why.
	HeaderType    *int
	ConfigProblem string
	// BARs counts the memory and I/O BARs listed in resource; nil when
	// resource could not be read, and then ResourceProblem says why.
	BARs            *int
	ResourceProblem string
}

// IsBridge reports whether the function forwards to a bus below it: a
// PCI-to-PCI (header type 1) or CardBus (type 2) bridge. The header type
// decides, not the class: an NVSwitch (class 0680, type 0) is an endpoint.
// Only when config could not be read does the class decide (0604 PCI-to-PCI,
// 0609 semi-transparent).
func (d *Device) IsBridge() bool {
	if d.HeaderType == nil {
		return d.Class>>8 == 0x0604 || d.Class>>8 == 0x0609
	}
	return *d.HeaderType == HeaderBridge || *d.HeaderType == HeaderCardBus
}

// IsChipsetBridge reports whether the function is a host, ISA, EISA or MCA
// bridge (class 0600-0603) that does not forward to a bus of its own: part
// of the chipset, which stays with the host.
func (d *Device) IsChipsetBridge() bool {
	return !d.IsBridge() && d.Class>>8 >= 0x0600 && d.Class>>8 <= 0x0603
}

// IsPassiveBridge reports whether the function is a host bridge or a
// forwarding bridge that no host driver uses for DMA (no driver, pcieport
// or pci-stub). Such a bridge stays where it is when its IOMMU group is
// given to VFIO; the kernel still lets userspace use the group. Any other
// member of a group, an ISA bridge on lpc_ich included, must move with the
// group.
func (d *Device) IsPassiveBridge() bool {
	hostBridge := d.IsChipsetBridge() && d.Class>>8 == 0x0600
	if !d.IsBridge() && !hostBridge {
		return false
	}
	switch d.Driver {
	case "", "pcieport", "pci-stub":
		return true
	}
	return false
}

// Scan reads every PCI function under bus/pci/devices, sorted by address.
// A function that cannot be read is left out and reported in the second
// result, so one odd device does not hide the others.
func (f *FS) Scan() ([]*Device, []error, error) {
	entries, err := os.ReadDir(f.Path(BusDevicesDir))
	if err != nil {
		return nil, nil, fmt.Errorf("list PCI devices: %w", err)
	}
	var devices []*Device
	var problems []error
	for _, e := range entries {
		addr, err := ParseAddress(e.Name())
		if err != nil {
			problems = append(problems, fmt.Errorf("%s: %w", f.Path(BusDevicesDir, e.Name()), err))
			continue
		}
		d, err := f.Device(addr)
		if err != nil {
			problems = append(problems, err)
			continue
		}
		devices = append(devices, d)
	}
	slices.SortFunc(devices, func(a, b *Device) int { return a.Address.Compare(b.Address) })
	return devices, problems, nil
}

// Device reads one PCI function. The error names the function and the file.
func (f *FS) Device(addr Address) (*Device, error) {
	d := &Device{Address: addr, NUMANode: -1}
	if err := f.read(d); err != nil {
		return nil, fmt.Errorf("PCI device %s: %w", addr, err)
	}
	return d, nil
}

func (f *FS) read(d *Device) error {
	link := f.Path(BusDevicesDir, d.Address.String())
	target, err := os.Readlink(link)
	if err != nil {
		return err
	}
	rel := path.Clean(path.Join(BusDevicesDir, target))
	elems := strings.Split(rel, "/")
	if len(elems) < 3 || elems[0] != "devices" || elems[len(elems)-1] != d.Address.String() {
		return fmt.Errorf("%s points to %q, not to a device below devices/", link, target)
	}
	d.Path = rel
	if pcieRootPattern.MatchString(elems[1]) {
		d.PCIeRoot = elems[1]
	}
	if parent, err := ParseAddress(elems[len(elems)-2]); err == nil {
		d.Parent = &parent
	}

	// dir is clean: the attributes' paths are joined by hand, once each.
	dir := f.root + "/" + rel
	hex16 := []struct {
		file     string
		dst      *uint16
		required bool
	}{
		{"vendor", &d.VendorID, true},
		{"device", &d.DeviceID, true},
		{"subsystem_vendor", &d.SubsystemVendorID, false},
		{"subsystem_device", &d.SubsystemDeviceID, false},
	}
	for _, h := range hex16 {
		v, err := readHex(dir+"/"+h.file, 16)
		if errors.Is(err, fs.ErrNotExist) && !h.required {
			continue
		}
		if err != nil {
			return err
		}
		*h.dst = uint16(v)
	}
	class, err := readHex(dir+"/class", 24)
	if err != nil {
		return err
	}
	d.Class = uint32(class)

	if d.Driver, err = linkBase(dir + "/driver"); err != nil {
		return err
	}
	// driver_override is not read here: the kernel blocks reads of it
	// while an unbind of the device waits for a VFIO user, and discovery
	// must not hang. The binder reads it, bounded, when it needs it.
	if d.IOMMUGroup, err = readGroupLink(dir + "/iommu_group"); err != nil {
		return err
	}

	ints := []struct {
		file  string
		dst   *int
		count bool
	}{
		{"numa_node", &d.NUMANode, false},
		{"sriov_totalvfs", &d.SRIOVTotalVFs, true},
		{"sriov_numvfs", &d.SRIOVNumVFs, true},
	}
	// Only a function with SR-IOV has sriov_totalvfs, and only such a
	// physical function has virtfnN links.
	sriov := false
	for _, i := range ints {
		v, ok, err := readInt(dir + "/" + i.file)
		if err != nil {
			return err
		}
		sriov = sriov || (ok && i.file == "sriov_totalvfs")
		if ok && i.count && v < 0 {
			// A negative VF count would read as "no VFs enabled".
			return fmt.Errorf("%s: %d is not a count", dir+"/"+i.file, v)
		}
		if ok {
			*i.dst = v
		}
	}
	if d.NUMANode < 0 {
		d.NUMANode = -1
	}
	bootVGA, ok, err := readInt(dir + "/boot_vga")
	if err != nil {
		return err
	}
	d.BootVGA = ok && bootVGA == 1

	physfn, err := linkBase(dir + "/physfn")
	if err != nil {
		return err
	}
	if physfn != "" {
		a, err := ParseAddress(physfn)
		if err != nil {
			return fmt.Errorf("%s: %w", dir+"/physfn", err)
		}
		d.PhysFn = &a
	}
	var virtfns []string
	if sriov {
		if virtfns, err = filepath.Glob(dir + "/virtfn*"); err != nil {
			return err
		}
	}
	for _, v := range virtfns {
		base, err := linkBase(v)
		if err != nil {
			return err
		}
		a, err := ParseAddress(base)
		if err != nil {
			return fmt.Errorf("%s: %w", v, err)
		}
		d.VirtFns = append(d.VirtFns, a)
	}
	slices.SortFunc(d.VirtFns, Address.Compare)

	// A function whose config or resource cannot be read is still listed:
	// the rules that need them say so and fall back to the class.
	if h, err := readHeaderType(dir); err != nil {
		d.ConfigProblem = err.Error()
	} else {
		d.HeaderType = &h
	}
	if n, err := readBARs(dir); err != nil {
		d.ResourceProblem = err.Error()
	} else {
		d.BARs = &n
	}
	return nil
}

// IOMMUGroupMembers lists the functions of an IOMMU group, sorted, from
// kernel/iommu_groups/N/devices.
func (f *FS) IOMMUGroupMembers(group int) ([]Address, error) {
	dir := f.Path(IOMMUGroupDir, strconv.Itoa(group), "devices")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("IOMMU group %d: %w", group, err)
	}
	members := make([]Address, 0, len(entries))
	for _, e := range entries {
		a, err := ParseAddress(e.Name())
		if err != nil {
			return nil, fmt.Errorf("IOMMU group %d: %s: %w", group, dir, err)
		}
		members = append(members, a)
	}
	slices.SortFunc(members, Address.Compare)
	return members, nil
}

// IOMMUGroup returns the IOMMU group of addr from its iommu_group link, nil
// when it has none or is not there. It reads that one link, for callers
// that need the group and nothing else (Device reads every attribute).
func (f *FS) IOMMUGroup(addr Address) (*int, error) {
	g, err := readGroupLink(f.DevicePath(addr, "iommu_group"))
	if err != nil {
		return nil, fmt.Errorf("PCI device %s: %w", addr, err)
	}
	return g, nil
}

// readGroupLink returns the group number an iommu_group link names, nil
// when there is no link.
func readGroupLink(link string) (*int, error) {
	group, err := linkBase(link)
	if err != nil || group == "" {
		return nil, err
	}
	n, err := strconv.Atoi(group)
	if err != nil || n < 0 {
		return nil, fmt.Errorf("%s: group %q is not a number", link, group)
	}
	return &n, nil
}

// CurrentDriver returns the driver bound to addr now, "" if none.
func (f *FS) CurrentDriver(addr Address) (string, error) {
	return linkBase(f.DevicePath(addr, "driver"))
}

// DriverLoaded reports whether a PCI driver is registered, i.e. whether
// bus/pci/drivers/NAME exists.
func (f *FS) DriverLoaded(name string) bool {
	st, err := os.Stat(f.Path(BusDriversDir, name))
	return err == nil && st.IsDir()
}

// ReadDriverOverride reads a driver_override file; the kernel prints
// "(null)" when no override is set. A missing file (kernels before 3.16)
// reads as no override.
func ReadDriverOverride(file string) (string, error) {
	s, err := readAttr(file)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	if s == "(null)" {
		return "", nil
	}
	return s, nil
}

// readAttr reads a sysfs attribute with one bounded read and trims
// surrounding white space.
func readAttr(file string) (string, error) {
	var buf [maxAttrSize]byte
	n, err := readOnce(file, buf[:])
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(buf[:n])), nil
}

// readHex parses attributes such as "0x10de" and checks they fit in bits.
func readHex(file string, bits int) (uint64, error) {
	s, err := readAttr(file)
	if err != nil {
		return 0, err
	}
	digits, ok := strings.CutPrefix(s, "0x")
	if !ok {
		return 0, fmt.Errorf("%s: %q is not a 0x-prefixed hex number", file, s)
	}
	v, err := strconv.ParseUint(digits, 16, bits)
	if err != nil {
		return 0, fmt.Errorf("%s: %q is not a %d-bit hex number", file, s, bits)
	}
	return v, nil
}

// readInt reads an optional decimal attribute; ok is false when it is absent.
func readInt(file string) (v int, ok bool, err error) {
	s, err := readAttr(file)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	v, err = strconv.Atoi(s)
	if err != nil {
		return 0, false, fmt.Errorf("%s: %q is not a number", file, s)
	}
	return v, true, nil
}

// linkBase returns the last element of a symlink's target, "" when there
// is no link.
func linkBase(link string) (string, error) {
	target, err := os.Readlink(link)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return path.Base(target), nil
}
