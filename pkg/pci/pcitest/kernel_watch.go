package pcitest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// watched is what an inotify watch descriptor stands for.
type watched struct {
	dir  string // real directory
	kind int
	name string // driver (watchDriver) or device address (watchDevice)
}

const (
	watchBus     = iota // bus/pci: drivers_probe
	watchDrivers        // bus/pci/drivers: new driver directories
	watchDriver         // bus/pci/drivers/NAME: bind, unbind
	watchDevice         // a device directory: driver_override
)

// Ready is closed once a Watch call has its watches in place: writes made
// after that are seen.
func (k *Kernel) Ready() <-chan struct{} { return k.ready }

// Watch applies the writes that any process makes to the tree's
// bus/pci/drivers_probe, the drivers' bind and unbind files and the devices'
// driver_override files, until ctx is done; then it returns nil. It uses
// inotify and reacts when the writer closes a file, so the writer should
// write each file with one open, write and close, as vfio.OSWriter does.
// It empties bind, unbind and drivers_probe after reading them, and
// rewrites driver_override the way the kernel shows it; after a write that
// fails or has zero length, driver_override gets back the content it had
// before. The errors the kernel would have returned to the writer are kept
// for Errors. Drivers added to the tree while Watch runs are watched too;
// devices are not.
func (k *Kernel) Watch(ctx context.Context) error {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return fmt.Errorf("inotify: %w", err)
	}
	// A non-blocking descriptor goes to the runtime poller, so a read
	// deadline can interrupt Read.
	f := os.NewFile(uintptr(fd), "inotify")
	defer f.Close() //nolint:errcheck // opened read-only
	w := &watcher{k: k, fd: fd, wds: map[int32]watched{}, overrides: map[string][]byte{}}

	if err := w.add(filepath.Join(k.root, "bus/pci"), watchBus, ""); err != nil {
		return err
	}
	drivers := filepath.Join(k.root, pci.BusDriversDir)
	if err := w.add(drivers, watchDrivers, ""); err != nil {
		return err
	}
	entries, err := os.ReadDir(drivers)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := w.add(filepath.Join(drivers, e.Name()), watchDriver, e.Name()); err != nil {
				return err
			}
		}
	}
	devices, err := os.ReadDir(filepath.Join(k.root, pci.BusDevicesDir))
	if err != nil {
		return err
	}
	for _, e := range devices {
		dir, err := filepath.EvalSymlinks(filepath.Join(k.root, pci.BusDevicesDir, e.Name()))
		if err != nil {
			return err
		}
		if err := w.add(dir, watchDevice, e.Name()); err != nil {
			return err
		}
		content, err := os.ReadFile(filepath.Join(dir, OpDriverOverride))
		if err != nil {
			return err
		}
		w.overrides[e.Name()] = content
	}
	// Writes made before the watches were in place are still in the files.
	w.pending(filepath.Join(k.root, pci.DriversProbe), OpProbe, "")
	for _, e := range entries {
		for _, op := range []string{OpUnbind, OpBind} {
			w.pending(filepath.Join(drivers, e.Name(), op), op, e.Name())
		}
	}
	k.onceMark.Do(func() { close(k.ready) })

	stop := context.AfterFunc(ctx, func() { _ = f.SetReadDeadline(time.Now()) })
	defer stop()
	buf := make([]byte, 64<<10)
	for {
		n, err := f.Read(buf)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read inotify events: %w", err)
		}
		if err := w.handle(buf[:n]); err != nil {
			return err
		}
	}
}

type watcher struct {
	k   *Kernel
	fd  int
	wds map[int32]watched
	// overrides holds each device's driver_override as the kernel shows
	// it, to put back what a write the kernel does not apply replaced.
	overrides map[string][]byte
}

func (w *watcher) add(dir string, kind int, name string) error {
	mask := uint32(unix.IN_CLOSE_WRITE)
	if kind == watchDrivers {
		mask = unix.IN_CREATE | unix.IN_MOVED_TO
	}
	wd, err := unix.InotifyAddWatch(w.fd, dir, mask)
	if err != nil {
		return fmt.Errorf("watch %s: %w", dir, err)
	}
	w.wds[int32(wd)] = watched{dir: dir, kind: kind, name: name}
	return nil
}

// handle applies a buffer of inotify events.
func (w *watcher) handle(buf []byte) error {
	for len(buf) >= unix.SizeofInotifyEvent {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[0]))
		end := unix.SizeofInotifyEvent + int(ev.Len)
		if end > len(buf) {
			return fmt.Errorf("short inotify event")
		}
		name := string(bytes.TrimRight(buf[unix.SizeofInotifyEvent:end], "\x00"))
		buf = buf[end:]
		if ev.Mask&unix.IN_Q_OVERFLOW != 0 {
			return fmt.Errorf("inotify queue overflow: writes were lost")
		}
		wt, ok := w.wds[ev.Wd]
		if !ok || ev.Mask&unix.IN_IGNORED != 0 {
			continue
		}
		path := filepath.Join(wt.dir, name)
		switch {
		case wt.kind == watchBus && name == "drivers_probe":
			w.consume(path, OpProbe, "")
		case wt.kind == watchDriver && (name == OpBind || name == OpUnbind):
			w.consume(path, name, wt.name)
		case wt.kind == watchDevice && name == OpDriverOverride:
			w.override(path, wt.name)
		case wt.kind == watchDrivers && ev.Mask&unix.IN_ISDIR != 0:
			if err := w.add(path, watchDriver, name); err != nil {
				return err
			}
			for _, op := range []string{OpUnbind, OpBind} {
				w.pending(filepath.Join(path, op), op, name)
			}
		}
	}
	return nil
}

// pending applies a write that is in a file already.
func (w *watcher) pending(path, op, arg string) {
	if st, err := os.Stat(path); err == nil && st.Size() > 0 {
		w.consume(path, op, arg)
	}
}

// consume reads a write-only trigger file (bind, unbind, drivers_probe),
// empties it and applies what was written. Truncating gives no close
// event, so the emulator does not see its own change.
func (w *watcher) consume(path, op, arg string) {
	data, err := os.ReadFile(path)
	if err == nil && len(data) > 0 {
		err = os.Truncate(path, 0)
	}
	if err != nil {
		w.record(fmt.Errorf("%s: %w", path, err))
		return
	}
	if len(data) == 0 {
		return
	}
	w.k.mu.Lock()
	defer w.k.mu.Unlock()
	_ = w.apply(path, op, arg, data) // kept for Errors
}

// override applies a write to driver_override of addr. The writer has
// replaced the file's content; when the kernel would not have changed the
// override (a failed or zero-length write), the old content is put back.
func (w *watcher) override(path, addr string) {
	data, err := os.ReadFile(path)
	if err != nil {
		w.record(fmt.Errorf("read %s: %w", path, err))
		return
	}
	w.k.mu.Lock()
	defer w.k.mu.Unlock()
	if err := w.apply(path, OpDriverOverride, addr, data); err == nil && len(data) > 0 {
		w.overrides[addr] = []byte(showOverride(overrideValue(data)) + "\n")
		return
	}
	if old, ok := w.overrides[addr]; ok {
		if err := w.k.replaceOverrideFile(addr, old); err != nil {
			w.k.errs = append(w.k.errs, fmt.Errorf("restore %s: %w", path, err))
		}
	}
}

// apply applies a write and keeps its error; w.k.mu is held.
func (w *watcher) apply(path, op, arg string, data []byte) error {
	err := w.k.apply(op, arg, data)
	if err != nil {
		w.k.errs = append(w.k.errs, fmt.Errorf("write %q to %s: %w", bytes.TrimSpace(data), path, err))
	}
	return err
}

func (w *watcher) record(err error) {
	w.k.mu.Lock()
	defer w.k.mu.Unlock()
	w.k.errs = append(w.k.errs, err)
}
