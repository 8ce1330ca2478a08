// Package vfio moves PCI functions between their host drivers and a VFIO
// driver through sysfs, the way the kernel documents it
// (Documentation/driver-api/vfio.rst, ABI/testing/sysfs-bus-pci):
// driver_override, unbind and drivers_probe. Reads go through pci.FS; every
// write goes through a Writer, so tests can put a kernel emulator behind it.
//
// The kernel applies these writes synchronously, but the Binder never relies
// on that: after each write it polls, with a bound, until sysfs shows the
// effect. Each write, and each read of driver_override, is bounded too (see
// Options.Timeout), because they can block in the kernel: unbinding a
// function from a VFIO driver waits until user space has closed the device.
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
	StepWaitCDev      = "wait for vfio-dev/vfioN"
)

// WaitFor selects what BindFor waits for once every function is bound.
type WaitFor int

const (
	// WaitGroupNode waits for <devRoot>/vfio/<group>, what the legacy
	// container interface opens.
	WaitGroupNode WaitFor = iota
	// WaitDeviceCDevs waits, for every function, for its iommufd
	// character device (<device>/vfio-dev/vfioN/dev and
	// <devRoot>/vfio/devices/vfioN). A kernel built without
	// CONFIG_VFIO_GROUP never creates the group node.
	WaitDeviceCDevs
)

const (
	defaultTimeout = 10 * time.Second
	defaultPoll    = 20 * time.Millisecond
	// probeGrace is how long a function may stay driverless after a
	// drivers_probe write returned before the probe counts as refused.
	// Linux probes synchronously within the write (device_attach), so
	// this only covers writers that apply it later (the kernel emulator
	// behind inotify); it stays well below the timeout.
	probeGrace = time.Second
	// clearOverride is what clears driver_override: the kernel keeps the
	// text up to the first newline, and an empty override means none.
	clearOverride = "\n"
)

// ErrDriverNotLoaded means the target driver has no bus/pci/drivers/<name>
// directory: its module is not loaded.
var ErrDriverNotLoaded = errors.New("driver not loaded")

// ErrProbeRefused means a function stayed without a driver after
// drivers_probe: the driver refused it (its probe failed, a denylist, a
// variant that only takes VFs, a PF with SR-IOV enabled) or does not match
// it. The kernel log says which.
var ErrProbeRefused = errors.New("probe refused")

// ErrTimeout means a write did not return, or sysfs did not show its effect,
// within Options.Timeout.
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
	// Target, when set, is the VFIO driver this function goes to instead
	// of the one Bind and Restore are given for the group: driver "auto"
	// picks a variant per function, so a group can hold a VF on its
	// variant next to its PF on vfio-pci. Not what the function had, but
	// checkpointed with it.
	Target string `json:"target,omitempty"`
}

// TargetOr returns the function's own Target, or def, the group's.
func (o Original) TargetOr(def string) string {
	if o.Target != "" {
		return o.Target
	}
	return def
}

// Options tune a Binder; zero values select the defaults.
type Options struct {
	// Writer writes sysfs files; default OSWriter{}.
	Writer Writer
	// Timeout bounds each write, each read of driver_override and each
	// wait (driver link change, /dev/vfio/N); default 10s. A write that
	// has not returned by then fails with ErrTimeout, but the goroutine
	// that made it stays until the Writer returns: a sysfs write can stay
	// blocked in the kernel (an unbind from vfio-pci waits until user
	// space closes the device), and nothing can call it back. Such a
	// write may still take effect later. While it is blocked it holds
	// the device lock, so reads of that function's driver_override block
	// as well; they are bounded the same way.
	Timeout time.Duration
	// PollInterval is the pause between two looks at sysfs; default 20ms.
	PollInterval time.Duration
	// Observer, when set, is told how long each bind and unbind took.
	Observer Observer
}

// Observer is told how long the kernel took to move a function: a bind
// from the write to drivers_probe until sysfs shows the function on its
// target driver, an unbind from the write to the driver's unbind file
// until the function's driver link is gone. Linux does the work within
// the write, a kernel emulator may do it a moment later; either way this
// is what the caller waited for. Only moves that succeeded are observed.
// Its methods are called from the goroutine of Bind or Restore.
type Observer interface {
	ObserveBind(driver string, d time.Duration)
	ObserveUnbind(driver string, d time.Duration)
}

type noObserver struct{}

func (noObserver) ObserveBind(string, time.Duration)   {}
func (noObserver) ObserveUnbind(string, time.Duration) {}

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
	obs     Observer
	// busy holds the accesses under way, so that none is repeated while
	// an earlier one is blocked in the kernel.
	busy inflight
}

// NewBinder returns a Binder that reads sysfs through fs, looks for group
// nodes below devRoot ("/dev" on a host) and writes through opts.Writer.
func NewBinder(fs *pci.FS, devRoot string, opts Options) *Binder {
	b := &Binder{fs: fs, devRoot: devRoot, w: opts.Writer, timeout: opts.Timeout, poll: opts.PollInterval, obs: opts.Observer}
	if b.w == nil {
		b.w = OSWriter{}
	}
	if b.obs == nil {
		b.obs = noObserver{}
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

// read reads the state of addr. Reading driver_override is bounded like a
// write: Linux takes the device lock to show it, and an unbind blocked in
// the kernel holds that lock.
func (b *Binder) read(addr pci.Address) (state, error) {
	if _, err := os.Lstat(b.fs.DevicePath(addr)); err != nil {
		return state{}, err
	}
	drv, err := b.fs.CurrentDriver(addr)
	if err != nil {
		return state{}, err
	}
	file := b.fs.DevicePath(addr, "driver_override")
	key := accessKey(file, nil)
	if err := b.busy.begin(key, "read "+file); err != nil {
		return state{}, err
	}
	ov, err := bounded(b.timeout, "read "+file, func() (string, error) {
		defer b.busy.end(key)
		return pci.ReadDriverOverride(file)
	})
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
// such as "mlx5_vfio_pci"), or to its own Original.Target where set: it
// writes target to driver_override, the address to the current driver's
// unbind file (then waits until the driver link is gone) and the address to
// bus/pci/drivers_probe, then waits until the driver link names target.
// Functions already on target get no write. At the end it waits for
// <devRoot>/vfio/<group>.
//
// Nothing is written when target is not loaded, a function is not in group,
// or the group could not be used afterwards: the kernel refuses user space a
// group (EPERM) while any member is bound to a driver that does not manage
// DMA itself, so every member of the group (kernel/iommu_groups/N/devices)
// that is not in originals must be driverless or bound to pcieport,
// pci-stub or a VFIO driver (vfio-pci, *_vfio_pci). Bind returns a
// *StepError at StepCheckGroup naming the first member that is not.
//
// On any other failure Bind gives back, in reverse order and as Restore
// does, the functions it changed, and returns a *StepError; if that fails
// too, its error is joined to the StepError. A function that no longer
// exists needs no rollback and adds no error.
func (b *Binder) Bind(ctx context.Context, group int, originals []Original, target string) error {
	return b.BindFor(ctx, group, originals, target, WaitGroupNode)
}

// BindFor is Bind, waiting at the end for what waitFor names instead of
// always for the group node.
func (b *Binder) BindFor(ctx context.Context, group int, originals []Original, target string, waitFor WaitFor) error {
	if len(originals) == 0 {
		return &StepError{Step: StepCheckGroup, Err: fmt.Errorf("IOMMU group %d: no functions to bind", group)}
	}
	addrs, err := parseAll(originals)
	if err != nil {
		return err
	}
	for _, o := range originals {
		if t := o.TargetOr(target); !b.fs.DriverLoaded(t) {
			return &StepError{Step: StepCheckDriver, Err: fmt.Errorf("%s: %w: %s does not exist",
				t, ErrDriverNotLoaded, b.fs.Path(pci.BusDriversDir, t))}
		}
	}
	for _, a := range addrs {
		if err := b.checkGroup(a, group); err != nil {
			return &StepError{Address: a.String(), Step: StepCheckGroup, Err: err}
		}
	}
	if err := b.checkOthers(group, addrs); err != nil {
		return err
	}

	var changed []int
	fail := func(err error) error {
		// Roll back even when ctx is what failed; every wait in the
		// rollback is still bounded by the timeout.
		rctx := context.WithoutCancel(ctx)
		var errs []error
		for _, i := range slices.Backward(changed) {
			if _, rerr := b.restore(rctx, addrs[i], originals[i]); rerr != nil {
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
		t := originals[i].TargetOr(target)
		if st.driver == t {
			continue
		}
		if err := context.Cause(ctx); err != nil {
			return fail(&StepError{Address: a.String(), Step: StepSetOverride, Err: err})
		}
		changed = append(changed, i)
		if err := b.moveTo(ctx, a, st, t); err != nil {
			return fail(err)
		}
	}

	if waitFor == WaitDeviceCDevs {
		for _, a := range addrs {
			if err := b.wait(ctx, b.timeout, func() (bool, string, error) { return b.cdevReady(a) }); err != nil {
				return fail(&StepError{Address: a.String(), Step: StepWaitCDev, Err: err})
			}
		}
		return nil
	}
	node := b.GroupNodePath(group)
	err = b.wait(ctx, b.timeout, func() (bool, string, error) {
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

// cdevReady reports whether the iommufd character device of a function on
// a VFIO driver is there, in sysfs and as a node below devRoot. A class
// device without a dev attribute is a kernel without
// CONFIG_VFIO_DEVICE_CDEV: that will not change, so it is an error.
func (b *Binder) cdevReady(a pci.Address) (bool, string, error) {
	dir := b.fs.DevicePath(a, "vfio-dev")
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return false, dir + " does not exist", nil
	}
	if err != nil {
		return false, "", err
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "vfio") {
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, e.Name(), "dev")); errors.Is(err, fs.ErrNotExist) {
			return false, "", fmt.Errorf("%s has no dev attribute: the kernel has no VFIO device cdev (needs Linux 6.6+ with CONFIG_VFIO_DEVICE_CDEV)", filepath.Join(dir, e.Name()))
		} else if err != nil {
			return false, "", err
		}
		node := filepath.Join(b.devRoot, "vfio", "devices", e.Name())
		if _, err := os.Stat(node); errors.Is(err, fs.ErrNotExist) {
			return false, node + " does not exist", nil
		} else if err != nil {
			return false, "", err
		}
		return true, "", nil
	}
	return false, dir + " is empty", nil
}

// Restore gives functions back. It is RestoreReport without the list of
// functions that no longer exist: those count as restored and add no error.
func (b *Binder) Restore(ctx context.Context, originals []Original, target string) error {
	_, err := b.RestoreReport(ctx, originals, target)
	return err
}

// RestoreReport gives functions back. Functions whose Original.Driver is
// their target (Original.TargetOr(target)) were on it before Bind and stay
// there. For every other
// function with an original driver D it writes D to driver_override (so
// that the probe can only pick D, whatever other drivers match, and a VF
// is probed even when its PF has sriov_drivers_autoprobe=0), unbinds the
// function from its current driver and waits until the link is gone,
// probes it and waits until the driver link names D, and last writes the
// original driver_override back (a newline clears it). A function that had
// no driver gets its original driver_override, is unbound and stays
// without driver. A function on D that only has another driver_override
// gets that one write.
//
// A function already in its original state gets no write, so
// RestoreReport is idempotent. A function whose original driver is not
// loaded gets no write and an error wrapping ErrDriverNotLoaded, so a retry
// after loading the module finishes the job. After a failure a function
// may be left with D in driver_override; a retry finishes the job as well.
//
// A function that no longer exists (its bus/pci/devices entry is gone: a
// VF removed when sriov_numvfs went to 0, a hot-unplugged device) has
// nothing left to restore: it adds no error and its address is returned in
// gone, in the order of originals, for the caller to log.
//
// RestoreReport tries every function and returns the joined errors, each a
// *StepError.
func (b *Binder) RestoreReport(ctx context.Context, originals []Original, target string) (gone []string, err error) {
	var errs []error
	for _, o := range originals {
		if o.Driver == o.TargetOr(target) {
			continue
		}
		a, err := pci.ParseAddress(o.Address)
		if err != nil {
			errs = append(errs, &StepError{Address: o.Address, Step: StepReadState, Err: err})
			continue
		}
		isGone, err := b.restore(ctx, a, o)
		if isGone {
			gone = append(gone, o.Address)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return gone, errors.Join(errs...)
}

// restore brings one function back to o. When it fails and the function
// no longer exists, it reports the function gone and no error.
func (b *Binder) restore(ctx context.Context, a pci.Address, o Original) (gone bool, err error) {
	err = b.restoreFunction(ctx, a, o)
	if err == nil {
		return false, nil
	}
	if _, lerr := os.Lstat(b.fs.DevicePath(a)); errors.Is(lerr, fs.ErrNotExist) {
		return true, nil
	}
	return false, err
}

func (b *Binder) restoreFunction(ctx context.Context, a pci.Address, o Original) error {
	st, err := b.read(a)
	if err != nil {
		return &StepError{Address: o.Address, Step: StepReadState, Err: err}
	}
	if st.driver == o.Driver {
		if st.override != o.DriverOverride {
			return b.setOverride(a, o.DriverOverride)
		}
		return nil
	}
	if o.Driver == "" {
		if st.override != o.DriverOverride {
			if err := b.setOverride(a, o.DriverOverride); err != nil {
				return err
			}
		}
		return b.unbind(ctx, a, st.driver)
	}
	if !b.fs.DriverLoaded(o.Driver) {
		return &StepError{Address: o.Address, Step: StepCheckDriver, Err: fmt.Errorf("%s: %w: %s does not exist",
			o.Driver, ErrDriverNotLoaded, b.fs.Path(pci.BusDriversDir, o.Driver))}
	}
	if err := b.moveTo(ctx, a, st, o.Driver); err != nil {
		return err
	}
	if o.DriverOverride != o.Driver {
		return b.setOverride(a, o.DriverOverride)
	}
	return nil
}

// moveTo binds a, whose state is st, to driver: it sets driver_override to
// driver, unbinds a from its current driver, probes and waits for driver.
func (b *Binder) moveTo(ctx context.Context, a pci.Address, st state, driver string) error {
	if st.override != driver {
		if err := b.setOverride(a, driver); err != nil {
			return err
		}
	}
	if st.driver != "" {
		if err := b.unbind(ctx, a, st.driver); err != nil {
			return err
		}
	}
	start := time.Now()
	if err := b.write(b.fs.Path(pci.DriversProbe), []byte(a.String())); err != nil {
		return &StepError{Address: a.String(), Step: StepProbe, Err: err}
	}
	bound := func(d string) (bool, error) {
		if d != "" && d != driver {
			// A bound device stays where it is; no point in waiting.
			return false, fmt.Errorf("bound to %s instead", d)
		}
		return d == driver, nil
	}
	err := b.waitDriverFor(ctx, min(probeGrace, b.timeout), a, bound)
	if errors.Is(err, ErrTimeout) {
		// Still driverless: the kernel probed and the driver said no.
		err = fmt.Errorf("%w: %s has no driver after drivers_probe, so %s refused or does not match it; the kernel log (dmesg) says why",
			ErrProbeRefused, a, driver)
	}
	if err != nil {
		return &StepError{Address: a.String(), Step: StepWaitDriver, Err: fmt.Errorf("want %s: %w", driver, err)}
	}
	b.obs.ObserveBind(driver, time.Since(start))
	return nil
}

// unbind writes a to the unbind file of driver, its current driver, and
// waits until the driver link is gone.
func (b *Binder) unbind(ctx context.Context, a pci.Address, driver string) error {
	start := time.Now()
	if err := b.write(b.fs.Path(pci.BusDriversDir, driver, "unbind"), []byte(a.String())); err != nil {
		return &StepError{Address: a.String(), Step: StepUnbind, Err: err}
	}
	if err := b.waitDriver(ctx, a, func(d string) (bool, error) { return d != driver, nil }); err != nil {
		return &StepError{Address: a.String(), Step: StepWaitUnbind, Err: err}
	}
	b.obs.ObserveUnbind(driver, time.Since(start))
	return nil
}

// setOverride writes value to driver_override; a bare newline clears it.
func (b *Binder) setOverride(a pci.Address, value string) error {
	data := value
	if data == "" {
		data = clearOverride
	}
	if err := b.write(b.fs.DevicePath(a, "driver_override"), []byte(data)); err != nil {
		return &StepError{Address: a.String(), Step: StepSetOverride, Err: err}
	}
	return nil
}

// write passes one write to the Writer and waits for it at most the
// timeout (see bounded): a write that does not return in time fails with
// ErrTimeout, and may still take effect later.
//
// While a write for a function has not returned, every other access to that
// function fails at once with ErrBlocked.
func (b *Binder) write(path string, data []byte) error {
	what := fmt.Sprintf("write %q to %s", data, path)
	key := accessKey(path, data)
	if err := b.busy.begin(key, what); err != nil {
		return err
	}
	_, err := bounded(b.timeout, what, func() (struct{}, error) {
		defer b.busy.end(key)
		return struct{}{}, b.w.WriteFile(path, data)
	})
	return err
}

// bounded runs fn in a goroutine and waits at most timeout for it to
// return. When it does not, bounded returns an error wrapping ErrTimeout
// and leaves the goroutine behind: a sysfs access blocked in the kernel
// cannot be called back, so the goroutine stays until the kernel lets it
// go, and its result is dropped.
func bounded[T any](timeout time.Duration, what string, fn func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := fn()
		done <- result{v, err}
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case r := <-done:
		return r.v, r.err
	case <-timer.C:
		var zero T
		return zero, fmt.Errorf("%s: no return after %s: %w", what, timeout, ErrTimeout)
	}
}

func (b *Binder) waitDriver(ctx context.Context, a pci.Address, done func(driver string) (bool, error)) error {
	return b.waitDriverFor(ctx, b.timeout, a, done)
}

func (b *Binder) waitDriverFor(ctx context.Context, timeout time.Duration, a pci.Address, done func(driver string) (bool, error)) error {
	return b.wait(ctx, timeout, func() (bool, string, error) {
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

// wait polls cond until it holds, fails, ctx ends or timeout passes.
// cond describes the state it saw for the error message.
func (b *Binder) wait(ctx context.Context, timeout time.Duration, cond func() (ok bool, seen string, err error)) error {
	timer := time.NewTimer(timeout)
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
			return fmt.Errorf("%s after %s: %w", seen, timeout, ErrTimeout)
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

// checkOthers checks that the members of group that Bind leaves alone (not
// in addrs) would not keep user space from using the group.
func (b *Binder) checkOthers(group int, addrs []pci.Address) error {
	members, err := b.fs.IOMMUGroupMembers(group)
	if err != nil {
		return &StepError{Step: StepCheckGroup, Err: err}
	}
	for _, m := range members {
		if slices.Contains(addrs, m) {
			continue
		}
		drv, err := b.fs.CurrentDriver(m)
		if err != nil {
			return &StepError{Address: m.String(), Step: StepCheckGroup, Err: err}
		}
		if drv != "" && !managesDMA(drv) {
			return &StepError{Address: m.String(), Step: StepCheckGroup, Err: fmt.Errorf(
				"not among the functions to bind, but bound to %s, which keeps IOMMU group %d from being used (the driver does not manage DMA itself)",
				drv, group)}
		}
	}
	return nil
}

// managesDMA reports whether a bound driver leaves a group usable by user
// space: VFIO drivers, pci-stub and pcieport manage DMA themselves.
func managesDMA(driver string) bool {
	return driver == "vfio-pci" || strings.HasSuffix(driver, "_vfio_pci") || driver == "pci-stub" || driver == "pcieport"
}

// GroupEndpoints returns the members of an IOMMU group that Bind has to
// move, sorted: every member except host bridges and PCI-to-PCI bridges
// (class 0x0600xx and 0x0604xx) that are driverless or on pcieport or
// pci-stub. Those stay as they are: a group is viable for VFIO with them
// in it (pci.Device.IsPassiveBridge). Any other member, an ISA bridge on
// lpc_ich (class 0x0601) for example, counts as an endpoint.
func GroupEndpoints(fs *pci.FS, group int) ([]pci.Address, error) {
	members, err := fs.IOMMUGroupMembers(group)
	if err != nil {
		return nil, err
	}
	return Endpoints(group, members, fs.Device)
}

// Endpoints is GroupEndpoints for members, the sorted members of group,
// whose state device gives: a caller that read them already passes what
// it read instead of reading sysfs again.
func Endpoints(group int, members []pci.Address, device func(pci.Address) (*pci.Device, error)) ([]pci.Address, error) {
	var out []pci.Address
	for _, a := range members {
		d, err := device(a)
		if err != nil {
			return nil, fmt.Errorf("IOMMU group %d: %w", group, err)
		}
		if !d.IsPassiveBridge() {
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
