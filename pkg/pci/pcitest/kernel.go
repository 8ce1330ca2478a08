package pcitest

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// Character device numbers the emulator gives its nodes. /dev/vfio/vfio is
// the misc device 10:196 on every kernel; group and iommufd device nodes get
// dynamic majors on a real kernel, so any free number will do here.
const (
	vfioMiscMajor   = 10
	vfioMiscMinor   = 196
	vfioGroupMajor  = 246
	vfioDeviceMajor = 237
)

// Operations, as FailNext names them.
const (
	OpDriverOverride = "driver_override"
	OpUnbind         = "unbind"
	OpBind           = "bind"
	OpProbe          = "probe"
)

// pageSize is the sysfs buffer size: kernfs hands a store callback at most
// this many bytes of one write.
const pageSize = 4096

// KernelOptions selects kernel behaviour that depends on the version or the
// configuration. The zero value is a 6.1 to 6.5 kernel (5.19 or later);
// NewKernel uses DefaultKernelOptions.
type KernelOptions struct {
	// DeviceCDev is CONFIG_VFIO_DEVICE_CDEV (Linux 6.6 and later): a
	// function bound to VFIO gets <device>/vfio-dev/vfioN with a dev
	// attribute and the node <devRoot>/vfio/devices/vfioN. Without it
	// (6.1 to 6.5) vfio-dev/vfioN still exists but holds no dev attribute
	// and its uevent is empty, and no node is made.
	DeviceCDev bool
	// NoVFIOGroup is CONFIG_VFIO_GROUP=n (6.6 and later, with DeviceCDev):
	// there is no group interface, so neither /dev/vfio/vfio nor any
	// /dev/vfio/<group> is made; only the device cdevs exist.
	NoVFIOGroup bool
}

// DefaultKernelOptions is what NewKernel emulates: a 6.6 or later kernel
// with VFIO_DEVICE_CDEV.
func DefaultKernelOptions() KernelOptions { return KernelOptions{DeviceCDev: true} }

// Kernel emulates what Linux (5.19 or later) does when user space writes
// the PCI driver files of a sysfs tree laid out by Tree: driver_override,
// the drivers' bind and unbind files and bus/pci/drivers_probe. Binding
// moves the driver links; binding to a VFIO driver ("vfio-pci" or
// "*_vfio_pci") creates <devRoot>/vfio/<group> while a member of the group
// is bound to VFIO, and the sysfs directory <device>/vfio-dev/vfioN, with
// the iommufd node <devRoot>/vfio/devices/vfioN when KernelOptions.DeviceCDev
// is set. SetGroupOwned models user space holding a group (DMA ownership).
//
// test/vm/README.md lists the real kernel's behaviour this follows and what
// is not modelled.
//
// WriteFile applies a write synchronously (use the Kernel as the Binder's
// Writer); Watch applies writes that other processes make to the files.
type Kernel struct {
	tree     *Tree
	fs       *pci.FS
	root     string // sysfs root with symlinks resolved
	devRoot  string
	opts     KernelOptions
	ready    chan struct{}
	onceMark sync.Once

	mu     sync.Mutex
	native map[string]string
	fail   map[failKey]error
	owned  map[int]bool // groups user space holds with a container set
	writes []string
	errs   []error
	dmesg  []string
}

type failKey struct{ op, addr string }

// NewKernel returns a Kernel with DefaultKernelOptions for the tree at
// sysfsRoot. Each function's native driver, the one drivers_probe picks
// without an override, is its current driver unless that is a VFIO driver
// (see SetNative). It creates <devRoot>/vfio/vfio and the nodes of
// functions already bound to VFIO. Device nodes are made with mknod, which
// needs CAP_MKNOD.
func NewKernel(sysfsRoot, devRoot string) (*Kernel, error) {
	return NewKernelWithOptions(sysfsRoot, devRoot, DefaultKernelOptions())
}

// NewKernelWithOptions is NewKernel for the kernel that opts describe.
func NewKernelWithOptions(sysfsRoot, devRoot string, opts KernelOptions) (*Kernel, error) {
	root, err := filepath.EvalSymlinks(sysfsRoot)
	if err != nil {
		return nil, fmt.Errorf("sysfs root: %w", err)
	}
	pfs, err := pci.NewFS(root)
	if err != nil {
		return nil, err
	}
	k := &Kernel{
		tree:    Open(root),
		fs:      pfs,
		root:    root,
		devRoot: devRoot,
		opts:    opts,
		ready:   make(chan struct{}),
		native:  map[string]string{},
		fail:    map[failKey]error{},
		owned:   map[int]bool{},
	}
	if err := os.MkdirAll(filepath.Join(devRoot, "vfio"), 0o755); err != nil {
		return nil, err
	}
	if !opts.NoVFIOGroup {
		if err := mknodChar(filepath.Join(devRoot, "vfio", "vfio"), vfioMiscMajor, vfioMiscMinor, 0o666); err != nil {
			return nil, err
		}
	}
	devices, problems, err := pfs.Scan()
	if err != nil {
		return nil, err
	}
	if len(problems) > 0 {
		return nil, errors.Join(problems...)
	}
	for _, d := range devices {
		if !IsVFIODriver(d.Driver) {
			k.native[d.Address.String()] = d.Driver
			continue
		}
		if err := k.vfioAttached(d.Address); err != nil {
			return nil, err
		}
	}
	return k, nil
}

// IsVFIODriver reports whether name is vfio-pci or a vendor variant of it
// such as mlx5_vfio_pci.
func IsVFIODriver(name string) bool {
	return name == "vfio-pci" || strings.HasSuffix(name, "_vfio_pci")
}

// SetNative sets the driver that drivers_probe binds addr to when it has no
// override; "" makes no driver match it.
func (k *Kernel) SetNative(addr, driver string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.native[addr] = driver
}

// SetGroupOwned models user space taking (owned true) or dropping (false)
// DMA ownership of an IOMMU group: opening /dev/vfio/<group> and setting a
// container on it, as a VMM does, or closing the fds again. While a group
// is owned, a driver that uses the kernel's DMA API cannot bind to a member:
// drivers_probe fails with EINVAL and a host driver's bind with EBUSY, and
// the device stays driverless. VFIO drivers, pci-stub and pcieport manage
// DMA themselves and still bind. The kernel drops the ownership itself when
// the last member leaves VFIO and the group node goes; so does the Kernel.
// Device fds are not modelled: unbinding a member from VFIO succeeds while
// the group is owned, as on Linux while no fd of that device is open.
//
// Taking ownership fails as Linux fails it: ENOENT without the group node
// (no member bound to VFIO), EBUSY when the group is owned already (a
// second open of the node), and EPERM while a member is bound to a driver
// that uses the kernel's DMA API (VFIO_GROUP_SET_CONTAINER on a group that
// is not viable). Dropping ownership never fails.
func (k *Kernel) SetGroupOwned(group int, owned bool) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !owned {
		delete(k.owned, group)
		return nil
	}
	node := k.groupNode(group)
	if _, err := os.Lstat(node); err != nil {
		return &fs.PathError{Op: "open", Path: node, Err: syscall.ENOENT}
	}
	if k.owned[group] {
		return &fs.PathError{Op: "open", Path: node, Err: syscall.EBUSY}
	}
	members, err := k.fs.IOMMUGroupMembers(group)
	if err != nil {
		return err
	}
	for _, m := range members {
		drv, err := k.fs.CurrentDriver(m)
		if err != nil {
			return err
		}
		if drv != "" && !managesDMA(drv) {
			return fmt.Errorf("VFIO_GROUP_SET_CONTAINER on group %d: %s is bound to %s: %w", group, m, drv, syscall.EPERM)
		}
	}
	k.owned[group] = true
	return nil
}

// GroupOwned reports whether user space owns the group (SetGroupOwned).
func (k *Kernel) GroupOwned(group int) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.owned[group]
}

// managesDMA reports whether a driver sets driver_managed_dma, so that
// binding it leaves a group's DMA ownership alone.
func managesDMA(driver string) bool {
	return IsVFIODriver(driver) || driver == "pci-stub" || driver == "pcieport"
}

// FailNext makes the next op ("driver_override", "unbind", "bind" or
// "probe") for addr fail with err and change nothing.
func (k *Kernel) FailNext(op, addr string, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.fail[failKey{op, addr}] = err
}

// Writes returns the log of writes, failed ones included, in order:
// "driver_override ADDR VALUE" (VALUE "(null)" when cleared),
// "unbind ADDR DRIVER", "bind ADDR DRIVER" and "probe ADDR". A zero-length
// write, which Linux ignores, shows "" for VALUE or ADDR. Watch does not log
// zero-length writes to bind, unbind and drivers_probe.
func (k *Kernel) Writes() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.writes)
}

// KernelLog returns what the emulated kernel logged (dmesg), e.g. why a
// driver refused a device.
func (k *Kernel) KernelLog() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.dmesg)
}

// Errors returns the errors of the writes Watch applied: the ones the
// kernel would have returned to the writing process.
func (k *Kernel) Errors() []error {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.errs)
}

// WriteFile applies a write to a driver file of the tree, as the kernel
// does when a process writes it, and returns the error the write would
// return. Paths through symlinks (bus/pci/devices/ADDR/driver/unbind) work.
func (k *Kernel) WriteFile(path string, data []byte) error {
	op, arg, err := k.classify(path)
	if err == nil {
		k.mu.Lock()
		err = k.apply(op, arg, data)
		k.mu.Unlock()
	}
	if err != nil {
		return &fs.PathError{Op: "write", Path: path, Err: err}
	}
	return nil
}

// classify maps a path to an operation and its argument: the driver for
// bind and unbind, the device for driver_override.
func (k *Kernel) classify(path string) (op, arg string, err error) {
	dir, err := filepath.EvalSymlinks(filepath.Dir(path))
	if err != nil {
		return "", "", err
	}
	rel, err := filepath.Rel(k.root, dir)
	if err != nil || strings.HasPrefix(rel, "..") {
		return "", "", fmt.Errorf("%s is not below the sysfs root %s: %w", path, k.root, syscall.EACCES)
	}
	rel = filepath.ToSlash(rel)
	name := filepath.Base(path)
	switch {
	case rel == "bus/pci" && name == "drivers_probe":
		return OpProbe, "", nil
	case (name == OpBind || name == OpUnbind) && filepath.ToSlash(filepath.Dir(rel)) == pci.BusDriversDir:
		return name, filepath.Base(rel), nil
	case name == OpDriverOverride:
		addr := filepath.Base(rel)
		if devDir, err := filepath.EvalSymlinks(filepath.Join(k.root, pci.BusDevicesDir, addr)); err == nil && devDir == dir {
			return OpDriverOverride, addr, nil
		}
	}
	return "", "", fmt.Errorf("the emulator has no handler for %s: %w", rel+"/"+name, syscall.EACCES)
}

// apply runs one write; k.mu is held.
func (k *Kernel) apply(op, arg string, data []byte) error {
	if len(data) == 0 {
		// sysfs never calls the store callback for a zero-length write
		// and reports success; only "\n" clears driver_override.
		switch op {
		case OpDriverOverride:
			k.logf("driver_override %s \"\"", arg)
		case OpProbe:
			k.logf("probe \"\"")
		default:
			k.logf("%s \"\" %s", op, arg)
		}
		return nil
	}
	switch op {
	case OpDriverOverride:
		value := overrideValue(data)
		k.logf("driver_override %s %s", arg, showOverride(value))
		if err := k.takeFailure(op, arg); err != nil {
			return err
		}
		if _, err := k.lookup(arg); err != nil {
			return err
		}
		if len(data) >= pageSize-1 {
			// The override, its newline and the NUL must fit the page
			// that show fills.
			return syscall.EINVAL
		}
		return k.writeOverride(arg, value)
	case OpUnbind:
		addr := busName(data)
		k.logf("unbind %s %s", addr, arg)
		if err := k.takeFailure(op, addr); err != nil {
			return err
		}
		a, err := k.lookup(addr)
		if err != nil {
			return err
		}
		cur, err := k.fs.CurrentDriver(a)
		if err != nil {
			return err
		}
		if cur != arg {
			return syscall.ENODEV
		}
		return k.detach(a, cur)
	case OpBind:
		addr := busName(data)
		k.logf("bind %s %s", addr, arg)
		if err := k.takeFailure(op, addr); err != nil {
			return err
		}
		a, err := k.lookup(addr)
		if err != nil {
			return err
		}
		ok, err := k.matches(a, arg)
		if err != nil {
			return err
		}
		if !ok {
			return syscall.ENODEV
		}
		cur, err := k.fs.CurrentDriver(a)
		if err != nil {
			return err
		}
		if cur != "" {
			return syscall.EBUSY
		}
		canProbe, err := k.canProbe(a)
		if err != nil {
			return err
		}
		if !canProbe {
			// pci_device_probe refuses it.
			return syscall.ENODEV
		}
		// bind passes the error of the driver core's probe on: EBUSY
		// from a DMA ownership conflict, the driver's own error from a
		// failed probe.
		err = k.attach(a, arg)
		var pe *probeError
		if errors.As(err, &pe) {
			return pe.errno
		}
		return err
	case OpProbe:
		addr := busName(data)
		k.logf("probe %s", addr)
		if err := k.takeFailure(op, addr); err != nil {
			return err
		}
		a, err := k.lookup(addr)
		if err != nil {
			return err
		}
		return k.probe(a)
	}
	return fmt.Errorf("unknown operation %q: %w", op, syscall.EINVAL)
}

// probeError is a driver's probe failing: the driver core logs it and,
// for drivers_probe, tries the next driver (none here) and reports
// success; bind returns errno.
type probeError struct{ errno syscall.Errno }

func (e *probeError) Error() string { return "probe failed: " + e.errno.Error() }
func (e *probeError) Unwrap() error { return e.errno }

// probe binds an unbound device to the first matching loaded driver: the
// override when one is set (and no other driver then), else the native
// driver. No match leaves the device unbound and is no error, and neither
// is a failing probe (vfio-pci without an IOMMU group, or on a PF with VFs
// enabled). A VF of a PF with sriov_drivers_autoprobe 0 is only probed
// with an override. A DMA ownership conflict is an error: drivers_probe
// turns every error into EINVAL.
func (k *Kernel) probe(a pci.Address) error {
	cur, err := k.fs.CurrentDriver(a)
	if err != nil || cur != "" {
		return err
	}
	override, err := k.override(a)
	if err != nil {
		return err
	}
	if canProbe, err := k.canProbe(a); err != nil || !canProbe {
		return err
	}
	driver := override
	if driver == "" {
		driver = k.native[a.String()]
	}
	if driver == "" || !k.fs.DriverLoaded(driver) {
		return nil
	}
	err = k.attach(a, driver)
	var pe *probeError
	switch {
	case errors.As(err, &pe):
		return nil
	case errors.Is(err, syscall.EBUSY):
		return syscall.EINVAL
	}
	return err
}

// canProbe is pci_device_can_probe: a VF whose PF has
// sriov_drivers_autoprobe 0 is probed only when it has a driver_override.
func (k *Kernel) canProbe(a pci.Address) (bool, error) {
	d, err := k.fs.Device(a)
	if err != nil || d.PhysFn == nil {
		return err == nil, err
	}
	override, err := k.override(a)
	if err != nil || override != "" {
		return err == nil, err
	}
	data, err := os.ReadFile(k.fs.DevicePath(*d.PhysFn, "sriov_drivers_autoprobe"))
	if errors.Is(err, fs.ErrNotExist) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return strings.TrimSpace(string(data)) != "0", nil
}

// matches is the PCI core's match: an override matches only the driver it
// names; without one, the native driver matches.
func (k *Kernel) matches(a pci.Address, driver string) (bool, error) {
	override, err := k.override(a)
	if err != nil {
		return false, err
	}
	if override != "" {
		return override == driver, nil
	}
	return driver == k.native[a.String()], nil
}

// attach binds addr to driver. A driver that uses the kernel's DMA API
// cannot bind while user space owns the group (EBUSY), and vfio-pci refuses
// a device without an IOMMU group (EINVAL); the device stays unbound.
func (k *Kernel) attach(a pci.Address, driver string) error {
	d, err := k.fs.Device(a)
	if err != nil {
		return err
	}
	if d.IOMMUGroup != nil && k.owned[*d.IOMMUGroup] && !managesDMA(driver) {
		return syscall.EBUSY
	}
	if IsVFIODriver(driver) && d.IOMMUGroup == nil {
		k.klog("%s %s: probe with driver %s failed with error -22", driver, a, driver)
		return &probeError{syscall.EINVAL}
	}
	if IsVFIODriver(driver) && d.SRIOVNumVFs > 0 {
		// vfio_pci_core_register_device: the VFs may be in use by
		// the host; disabling SR-IOV here could block.
		k.klog("%s %s: Cannot bind to PF with SR-IOV enabled", driver, a)
		k.klog("%s: probe of %s failed with error -16", driver, a)
		return &probeError{syscall.EBUSY}
	}
	// The driver's probe runs before the driver core links the device, so
	// VFIO nodes exist by the time the driver link appears.
	if IsVFIODriver(driver) {
		if err := k.vfioAttached(a); err != nil {
			return err
		}
	}
	if err := k.tree.Bind(a.String(), driver); err != nil {
		if IsVFIODriver(driver) {
			return errors.Join(err, k.vfioDetached(a))
		}
		return err
	}
	return nil
}

// detach unbinds addr. The driver core removes the links before it calls
// the driver's remove, so VFIO nodes go after the driver link. A PF
// driver's remove disables SR-IOV: the VFs go away.
func (k *Kernel) detach(a pci.Address, driver string) error {
	if err := k.tree.Unbind(a.String()); err != nil {
		return err
	}
	if IsVFIODriver(driver) {
		if err := k.vfioDetached(a); err != nil {
			return err
		}
	}
	return k.disableSRIOV(a)
}

// disableSRIOV removes the VFs of a PF, as pci_disable_sriov does: each VF
// is unbound, then its directory and every link to it go, and
// sriov_numvfs reads 0.
func (k *Kernel) disableSRIOV(pf pci.Address) error {
	virtfns, err := filepath.Glob(k.fs.DevicePath(pf, "virtfn*"))
	if err != nil || len(virtfns) == 0 {
		return err
	}
	for _, link := range virtfns {
		dir, err := filepath.EvalSymlinks(link)
		if err != nil {
			return err
		}
		vf, err := pci.ParseAddress(filepath.Base(dir))
		if err != nil {
			return err
		}
		if err := k.removeFunction(vf); err != nil {
			return err
		}
		if err := os.Remove(link); err != nil {
			return err
		}
	}
	return k.writeAttr(pf, "sriov_numvfs", "0\n")
}

// removeFunction removes a function from the bus (pci_stop_and_remove_bus_device).
func (k *Kernel) removeFunction(a pci.Address) error {
	d, err := k.fs.Device(a)
	if err != nil {
		return err
	}
	if d.Driver != "" {
		if err := k.detach(a, d.Driver); err != nil {
			return err
		}
	}
	dir, err := filepath.EvalSymlinks(k.fs.DevicePath(a))
	if err != nil {
		return err
	}
	if d.IOMMUGroup != nil {
		if err := removeIfExists(k.fs.Path(pci.IOMMUGroupDir, strconv.Itoa(*d.IOMMUGroup), "devices", a.String())); err != nil {
			return err
		}
	}
	if err := os.Remove(k.fs.DevicePath(a)); err != nil {
		return err
	}
	k.klog("pci %s: removed", a)
	return os.RemoveAll(dir)
}

// writeAttr replaces a sysfs attribute of a device by a rename.
func (k *Kernel) writeAttr(a pci.Address, name, content string) error {
	dir, err := filepath.EvalSymlinks(k.fs.DevicePath(a))
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, "."+name+".new")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, name))
}

// vfioAttached creates the group node (if this is the first VFIO member)
// and the iommufd device of a device just bound to VFIO.
func (k *Kernel) vfioAttached(a pci.Address) error {
	d, err := k.fs.Device(a)
	if err != nil {
		return err
	}
	if d.IOMMUGroup != nil && !k.opts.NoVFIOGroup {
		if err := mknodChar(k.groupNode(*d.IOMMUGroup), vfioGroupMajor, uint32(*d.IOMMUGroup), 0o600); err != nil {
			return err
		}
	}
	if existing, err := os.ReadDir(k.fs.Path(d.Path, "vfio-dev")); err == nil && len(existing) > 0 {
		return nil
	}
	n, err := k.freeCDev()
	if err != nil {
		return err
	}
	// The class device: device, power, subsystem (left out here) and
	// uevent; dev and a non-empty uevent only with a character device.
	name := "vfio" + strconv.Itoa(n)
	dir := k.fs.Path(d.Path, "vfio-dev", name)
	if err := os.MkdirAll(filepath.Join(dir, "power"), 0o755); err != nil {
		return err
	}
	if err := os.Symlink("../..", filepath.Join(dir, "device")); err != nil {
		return err
	}
	files := map[string]string{"uevent": ""}
	if k.opts.DeviceCDev {
		files["dev"] = fmt.Sprintf("%d:%d\n", vfioDeviceMajor, n)
		files["uevent"] = fmt.Sprintf("MAJOR=%d\nMINOR=%d\nDEVNAME=vfio/devices/%s\n", vfioDeviceMajor, n, name)
	}
	for f, content := range files {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(content), 0o644); err != nil {
			return err
		}
	}
	if !k.opts.DeviceCDev {
		return nil
	}
	if err := os.MkdirAll(filepath.Join(k.devRoot, "vfio", "devices"), 0o755); err != nil {
		return err
	}
	return mknodChar(filepath.Join(k.devRoot, "vfio", "devices", name), vfioDeviceMajor, uint32(n), 0o600)
}

// vfioDetached removes the iommufd device of addr, and the group node when
// no member of the group is bound to VFIO any more. With the node goes the
// group's DMA ownership: Linux detaches the container then.
func (k *Kernel) vfioDetached(a pci.Address) error {
	d, err := k.fs.Device(a)
	if err != nil {
		return err
	}
	vfioDev := k.fs.Path(d.Path, "vfio-dev")
	entries, err := os.ReadDir(vfioDev)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	for _, e := range entries {
		if err := removeIfExists(filepath.Join(k.devRoot, "vfio", "devices", e.Name())); err != nil {
			return err
		}
	}
	if err := os.RemoveAll(vfioDev); err != nil {
		return err
	}
	if d.IOMMUGroup == nil {
		return nil
	}
	members, err := k.fs.IOMMUGroupMembers(*d.IOMMUGroup)
	if err != nil {
		return err
	}
	for _, m := range members {
		drv, err := k.fs.CurrentDriver(m)
		if err != nil {
			return err
		}
		if IsVFIODriver(drv) {
			return nil
		}
	}
	delete(k.owned, *d.IOMMUGroup)
	return removeIfExists(k.groupNode(*d.IOMMUGroup))
}

func (k *Kernel) groupNode(group int) string {
	return filepath.Join(k.devRoot, "vfio", strconv.Itoa(group))
}

// freeCDev returns the lowest VFIO device number that no vfio-dev/vfioN
// directory uses.
func (k *Kernel) freeCDev() (int, error) {
	dirs, err := filepath.Glob(filepath.Join(k.root, pci.BusDevicesDir, "*", "vfio-dev", "vfio*"))
	if err != nil {
		return 0, err
	}
	used := map[int]bool{}
	for _, dir := range dirs {
		if n, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(dir), "vfio")); err == nil {
			used[n] = true
		}
	}
	n := 0
	for used[n] {
		n++
	}
	return n, nil
}

// lookup returns the address of an existing device; the kernel answers
// ENODEV for a name that is no device on the bus.
func (k *Kernel) lookup(name string) (pci.Address, error) {
	a, err := pci.ParseAddress(name)
	if err != nil {
		return pci.Address{}, syscall.ENODEV
	}
	if _, err := os.Stat(k.fs.DevicePath(a)); err != nil {
		return pci.Address{}, syscall.ENODEV
	}
	return a, nil
}

func (k *Kernel) override(a pci.Address) (string, error) {
	return pci.ReadDriverOverride(k.fs.DevicePath(a, "driver_override"))
}

// writeOverride stores the override as the kernel shows it.
func (k *Kernel) writeOverride(addr, value string) error {
	return k.replaceOverrideFile(addr, []byte(showOverride(value)+"\n"))
}

// replaceOverrideFile replaces driver_override of addr by a rename, so that
// Watch sees no write event of its own.
func (k *Kernel) replaceOverrideFile(addr string, content []byte) error {
	file := k.fs.Path(pci.BusDevicesDir, addr, "driver_override")
	dir, err := filepath.EvalSymlinks(filepath.Dir(file))
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, ".driver_override.new")
	if err := os.WriteFile(tmp, content, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, "driver_override"))
}

func (k *Kernel) takeFailure(op, addr string) error {
	key := failKey{op, addr}
	err, ok := k.fail[key]
	if ok {
		delete(k.fail, key)
	}
	return err
}

// klog adds a line to the emulated kernel log; k.mu is held.
func (k *Kernel) klog(format string, args ...any) {
	k.dmesg = append(k.dmesg, fmt.Sprintf(format, args...))
}

func (k *Kernel) logf(format string, args ...any) {
	k.writes = append(k.writes, fmt.Sprintf(format, args...))
}

// overrideValue is what driver_override keeps of a write: the text up to the
// first NUL or newline; empty clears it.
func overrideValue(data []byte) string {
	s := string(data)
	if i := strings.IndexByte(s, 0); i >= 0 {
		s = s[:i]
	}
	s, _, _ = strings.Cut(s, "\n")
	return s
}

func showOverride(value string) string {
	if value == "" {
		return "(null)"
	}
	return value
}

// busName is the device name written to bind, unbind or drivers_probe; the
// kernel compares it with sysfs_streq, which stops at a NUL and ignores one
// trailing newline.
func busName(data []byte) string {
	s, _, _ := strings.Cut(string(data), "\x00")
	return strings.TrimSuffix(s, "\n")
}

// mknodChar creates a character device node unless the path exists.
func mknodChar(path string, major, minor, perm uint32) error {
	if _, err := os.Lstat(path); err == nil {
		return nil
	}
	if err := unix.Mknod(path, unix.S_IFCHR|perm, int(unix.Mkdev(major, minor))); err != nil {
		return &fs.PathError{Op: "mknod", Path: path, Err: err}
	}
	// mknod applies the umask.
	return os.Chmod(path, fs.FileMode(perm))
}

func removeIfExists(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
