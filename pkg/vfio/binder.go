// Package vfio moves PCI functions between their host drivers and a VFIO
// driver through sysfs, the way the kernel documents it
// (Documentation/driver-api/vfio.rst, ABI/testing/sysfs-bus-pci):
// driver_override, unbind and drivers_probe. Reads go through pci.FS; every
// write goes through a Writer, so tests can put a kernel emulator behind it.
//
// The kernel applies these writes synchronously, but the Binder never relies
// on that: after each write it polls, with a bound, until sysfs shows the
// effect.
package vfio

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// Steps named by StepError.
const (
	StepReadState     = "read state"
	StepCheckDriver   = "check driver"
	StepCheckGroup    = "check IOMMU group"
	StepSetOverride   = "set driver_override"
	StepUnbind        = "unbind"
	StepWaitUnbind    = "wait for unbind"
	StepProbe         = "probe"
	StepWaitDriver    = "wait for driver"
	StepWaitGroupNode = "wait for /dev/vfio/N"
)

const (
	defaultTimeout = 10 * time.Second
	defaultPoll    = 20 * time.Millisecond
	// clearOverride is what clears driver_override: the kernel keeps the
	// text up to the first newline, and an empty override means none.
	clearOverride = "\n"
)

// ErrDriverNotLoaded means the target driver has no bus/pci/drivers/<name>
// directory: its module is not loaded.
var ErrDriverNotLoaded = errors.New("driver not loaded")

// ErrTimeout means sysfs did not show the effect of a write within
// Options.Timeout.
var ErrTimeout = errors.New("timed out")

// Writer writes one sysfs attribute file (absolute path). Production code
// only ever writes sysfs files through it.
type Writer interface {
	WriteFile(path string, data []byte) error
}

// OSWriter writes with os.OpenFile(path, O_WRONLY|O_TRUNC, 0), so it never
// creates a file, and hands the data to the kernel in one write call: sysfs
// store callbacks see one buffer per write.
type OSWriter struct{}

// WriteFile implements Writer.
func (OSWriter) WriteFile(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, werr := f.Write(data)
	cerr := f.Close()
	if werr != nil {
		return werr
	}
	return cerr
}

// Original is what a function had before this driver touched it; it is
// checkpointed.
type Original struct {
	// Address in sysfs form, e.g. "0000:3b:00.0".
	Address string `json:"address"`
	// Driver is the bound driver; "" means the function had none.
	Driver string `json:"driver,omitempty"`
	// DriverOverride is the content of driver_override; "" means unset.
	DriverOverride string `json:"driverOverride,omitempty"`
}

// Options tune a Binder; zero values select the defaults.
type Options struct {
	// Writer writes sysfs files; default OSWriter{}.
	Writer Writer
	// Timeout bounds each wait (driver link change, /dev/vfio/N); default 10s.
	Timeout time.Duration
	// PollInterval is the pause between two looks at sysfs; default 20ms.
	PollInterval time.Duration
}

// StepError is the error of Bind and Restore: the function, the step that
// failed and the cause.
type StepError struct {
	// Address of the function; "" when the step concerns no single function.
	Address string
	// Step is one of the Step* constants.
	Step string
	Err  error
}

func (e *StepError) Error() string {
	if e.Address == "" {
		return e.Step + ": " + e.Err.Error()
	}
	return e.Address + ": " + e.Step + ": " + e.Err.Error()
}

func (e *StepError) Unwrap() error { return e.Err }

// Binder binds the functions of an IOMMU group to a VFIO driver and gives
// them back.
type Binder struct {
	fs      *pci.FS
	devRoot string
	w       Writer
	timeout time.Duration
	poll    time.Duration
}

// NewBinder returns a Binder that reads sysfs through fs, looks for group
// nodes below devRoot ("/dev" on a host) and writes through opts.Writer.
func NewBinder(fs *pci.FS, devRoot string, opts Options) *Binder {
	b := &Binder{fs: fs, devRoot: devRoot, w: opts.Writer, timeout: opts.Timeout, poll: opts.PollInterval}
	if b.w == nil {
		b.w = OSWriter{}
	}
	if b.timeout <= 0 {
		b.timeout = defaultTimeout
	}
	if b.poll <= 0 {
		b.poll = defaultPoll
	}
	return b
}

// GroupNodePath returns <devRoot>/vfio/<group>, the node the kernel creates
// once a member of the group is bound to a VFIO driver.
func (b *Binder) GroupNodePath(group int) string {
	return filepath.Join(b.devRoot, "vfio", strconv.Itoa(group))
}

// state is what sysfs shows for one function now.
type state struct {
	driver, override string
}

func (b *Binder) read(addr pci.Address) (state, error) {
	if _, err := os.Lstat(b.fs.DevicePath(addr)); err != nil {
		return state{}, err
	}
	drv, err := b.fs.CurrentDriver(addr)
	if err != nil {
		return state{}, err
	}
	ov, err := pci.ReadDriverOverride(b.fs.DevicePath(addr, "driver_override"))
	if err != nil {
		return state{}, err
	}
	return state{driver: drv, override: ov}, nil
}

// Snapshot reads the current driver and driver_override of each function.
// Checkpoint the result before calling Bind.
func (b *Binder) Snapshot(addrs []pci.Address) ([]Original, error) {
	out := make([]Original, 0, len(addrs))
	for _, a := range addrs {
		st, err := b.read(a)
		if err != nil {
			return nil, &StepError{Address: a.String(), Step: StepReadState, Err: err}
		}
		out = append(out, Original{Address: a.String(), Driver: st.driver, DriverOverride: st.override})
	}
	return out, nil
}

// Bind moves every function in originals to target ("vfio-pci" or a variant
// such as "mlx5_vfio_pci"): it writes target to driver_override, the address
// to the current driver's unbind file (then waits until the driver link is
// gone) and the address to bus/pci/drivers_probe, then waits until the
// driver link names target. Functions already on target get no write. At
// the end it waits for <devRoot>/vfio/<group>.
//
// Nothing is written when target is not loaded or a function is not in
// group. On any other failure Bind restores, in reverse order, the functions
// it changed and returns a *StepError; if that restore fails too, its error
// is joined to the StepError.
func (b *Binder) Bind(ctx context.Context, group int, originals []Original, target string) error {
	if len(originals) == 0 {
		return &StepError{Step: StepCheckGroup, Err: fmt.Errorf("IOMMU group %d: no functions to bind", group)}
	}
	addrs, err := parseAll(originals)
	if err != nil {
		return err
	}
	if !b.fs.DriverLoaded(target) {
		return &StepError{Step: StepCheckDriver, Err: fmt.Errorf("%s: %w: %s does not exist",
			target, ErrDriverNotLoaded, b.fs.Path(pci.BusDriversDir, target))}
	}
	for _, a := range addrs {
		if err := b.checkGroup(a, group); err != nil {
			return &StepError{Address: a.String(), Step: StepCheckGroup, Err: err}
		}
	}

	var changed []int
	fail := func(err error) error {
		// Roll back even when ctx is what failed; every wait in the
		// rollback is still bounded by the timeout.
		rctx := context.WithoutCancel(ctx)
		var errs []error
		for _, i := range slices.Backward(changed) {
			if rerr := b.restore(rctx, addrs[i], originals[i]); rerr != nil {
				errs = append(errs, rerr)
			}
		}
		if len(errs) == 0 {
			return err
		}
		return errors.Join(err, fmt.Errorf("roll back: %w", errors.Join(errs...)))
	}

	for i, a := range addrs {
		st, err := b.read(a)
		if err != nil {
			return fail(&StepError{Address: a.String(), Step: StepReadState, Err: err})
		}
		if st.driver == target {
			continue
		}
		if err := context.Cause(ctx); err != nil {
			return fail(&StepError{Address: a.String(), Step: StepSetOverride, Err: err})
		}
		changed = append(changed, i)
		if err := b.moveTo(ctx, a, st, target, target); err != nil {
			return fail(err)
		}
	}

	node := b.GroupNodePath(group)
	err = b.wait(ctx, func() (bool, string, error) {
		_, err := os.Stat(node)
		if errors.Is(err, fs.ErrNotExist) {
			return false, node + " does not exist", nil
		}
		return err == nil, "", err
	})
	if err != nil {
		return fail(&StepError{Address: originals[0].Address, Step: StepWaitGroupNode, Err: err})
	}
	return nil
}

// Restore gives functions back. Functions whose Original.Driver is target
// were on target before Bind and stay there. For every other function it
// puts driver_override back, unbinds the function from its current driver
// if that is not the original one, and probes for the original driver and
// waits for it; a function that had no driver stays without one. A function
// whose original driver is not loaded gets no write and an error wrapping
// ErrDriverNotLoaded, so a retry after loading the module finishes the job.
// A function already in its original state gets no write, so Restore is
// idempotent. It tries every function and returns the joined errors, each a
// *StepError.
func (b *Binder) Restore(ctx context.Context, originals []Original, target string) error {
	var errs []error
	for _, o := range originals {
		if o.Driver == target {
			continue
		}
		a, err := pci.ParseAddress(o.Address)
		if err != nil {
			errs = append(errs, &StepError{Address: o.Address, Step: StepReadState, Err: err})
			continue
		}
		if err := b.restore(ctx, a, o); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// restore brings one function back to o. driver_override is sticky: when
// the original override names another driver than the original one, the
// override is cleared for the probe and set afterwards, so the probe finds
// the original driver.
func (b *Binder) restore(ctx context.Context, a pci.Address, o Original) error {
	st, err := b.read(a)
	if err != nil {
		return &StepError{Address: o.Address, Step: StepReadState, Err: err}
	}
	if st.driver == o.Driver && st.override == o.DriverOverride {
		return nil
	}
	probeOverride := o.DriverOverride
	if o.Driver != "" && o.DriverOverride != "" && o.DriverOverride != o.Driver {
		probeOverride = ""
	}
	if err := b.moveTo(ctx, a, st, o.Driver, probeOverride); err != nil {
		return err
	}
	if probeOverride != o.DriverOverride {
		return b.setOverride(a, o.DriverOverride)
	}
	return nil
}

// moveTo makes driver the bound driver of a ("" = none), probing with
// driver_override set to override.
func (b *Binder) moveTo(ctx context.Context, a pci.Address, st state, driver, override string) error {
	if driver != "" && st.driver != driver && !b.fs.DriverLoaded(driver) {
		return &StepError{Address: a.String(), Step: StepCheckDriver, Err: fmt.Errorf("%s: %w: %s does not exist",
			driver, ErrDriverNotLoaded, b.fs.Path(pci.BusDriversDir, driver))}
	}
	if st.override != override {
		if err := b.setOverride(a, override); err != nil {
			return err
		}
	}
	if st.driver == driver {
		return nil
	}
	if st.driver != "" {
		unbind := b.fs.Path(pci.BusDriversDir, st.driver, "unbind")
		if err := b.w.WriteFile(unbind, []byte(a.String())); err != nil {
			return &StepError{Address: a.String(), Step: StepUnbind, Err: err}
		}
		if err := b.waitDriver(ctx, a, func(d string) (bool, error) { return d != st.driver, nil }); err != nil {
			return &StepError{Address: a.String(), Step: StepWaitUnbind, Err: err}
		}
	}
	if driver == "" {
		return nil
	}
	if err := b.w.WriteFile(b.fs.Path(pci.DriversProbe), []byte(a.String())); err != nil {
		return &StepError{Address: a.String(), Step: StepProbe, Err: err}
	}
	bound := func(d string) (bool, error) {
		if d != "" && d != driver {
			// A bound device stays where it is; no point in waiting.
			return false, fmt.Errorf("bound to %s instead", d)
		}
		return d == driver, nil
	}
	if err := b.waitDriver(ctx, a, bound); err != nil {
		return &StepError{Address: a.String(), Step: StepWaitDriver, Err: fmt.Errorf("want %s: %w", driver, err)}
	}
	return nil
}

// setOverride writes value to driver_override; a bare newline clears it.
func (b *Binder) setOverride(a pci.Address, value string) error {
	data := value
	if data == "" {
		data = clearOverride
	}
	if err := b.w.WriteFile(b.fs.DevicePath(a, "driver_override"), []byte(data)); err != nil {
		return &StepError{Address: a.String(), Step: StepSetOverride, Err: err}
	}
	return nil
}

func (b *Binder) waitDriver(ctx context.Context, a pci.Address, done func(driver string) (bool, error)) error {
	return b.wait(ctx, func() (bool, string, error) {
		d, err := b.fs.CurrentDriver(a)
		if err != nil {
			return false, "", err
		}
		if ok, err := done(d); ok || err != nil {
			return ok, "", err
		}
		if d == "" {
			return false, "no driver bound", nil
		}
		return false, "driver is " + d, nil
	})
}

// wait polls cond until it holds, fails, ctx ends or the timeout passes.
// cond describes the state it saw for the error message.
func (b *Binder) wait(ctx context.Context, cond func() (ok bool, seen string, err error)) error {
	timer := time.NewTimer(b.timeout)
	defer timer.Stop()
	ticker := time.NewTicker(b.poll)
	defer ticker.Stop()
	for {
		ok, seen, err := cond()
		if err != nil || ok {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", seen, context.Cause(ctx))
		case <-timer.C:
			if ok, seen, err = cond(); err != nil || ok {
				return err
			}
			return fmt.Errorf("%s after %s: %w", seen, b.timeout, ErrTimeout)
		case <-ticker.C:
		}
	}
}

func (b *Binder) checkGroup(a pci.Address, group int) error {
	link := b.fs.DevicePath(a, "iommu_group")
	target, err := os.Readlink(link)
	if err != nil {
		return err
	}
	if g := filepath.Base(target); g != strconv.Itoa(group) {
		return fmt.Errorf("%s names group %s, not %d", link, g, group)
	}
	return nil
}

func parseAll(originals []Original) ([]pci.Address, error) {
	addrs := make([]pci.Address, 0, len(originals))
	for _, o := range originals {
		a, err := pci.ParseAddress(o.Address)
		if err != nil {
			return nil, &StepError{Address: o.Address, Step: StepReadState, Err: err}
		}
		addrs = append(addrs, a)
	}
	return addrs, nil
}

// GroupEndpoints returns the members of an IOMMU group that are not
// bridges, sorted. Bridges stay with their host driver (pcieport, or none):
// a group is viable for VFIO with them in it.
func GroupEndpoints(fs *pci.FS, group int) ([]pci.Address, error) {
	members, err := fs.IOMMUGroupMembers(group)
	if err != nil {
		return nil, err
	}
	var out []pci.Address
	for _, a := range members {
		d, err := fs.Device(a)
		if err != nil {
			return nil, fmt.Errorf("IOMMU group %d: %w", group, err)
		}
		if !d.IsBridge() {
			out = append(out, a)
		}
	}
	return out, nil
}

// DeviceCDev returns the name of the iommufd character device of a function
// bound to a VFIO driver, e.g. "vfio3" for /dev/vfio/devices/vfio3, from the
// sysfs directory <device>/vfio-dev/. It returns "" when there is none:
// kernels without VFIO_DEVICE_CDEV, or a function not bound to VFIO.
func (b *Binder) DeviceCDev(addr pci.Address) (string, error) {
	dir := b.fs.DevicePath(addr, "vfio-dev")
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		if _, serr := os.Lstat(b.fs.DevicePath(addr)); serr != nil {
			return "", fmt.Errorf("PCI device %s: %w", addr, serr)
		}
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("PCI device %s: %w", addr, err)
	}
	for _, e := range entries {
		n, ok := strings.CutPrefix(e.Name(), "vfio")
		if !ok || n == "" || strings.Trim(n, "0123456789") != "" {
			continue
		}
		// Kernels 6.1 to 6.5 create vfio-dev/vfioN without a character
		// device (no dev file, no /dev/vfio/devices/vfioN): only
		// CONFIG_VFIO_DEVICE_CDEV (6.6+) gives one.
		if _, err := os.Stat(filepath.Join(dir, e.Name(), "dev")); err == nil {
			return e.Name(), nil
		}
	}
	return "", nil
}
