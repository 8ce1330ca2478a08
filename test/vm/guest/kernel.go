package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// The "kernel:" checks drive sysfs by hand, without package vfio, and pin
// down what the real kernel does at each step. They are the reference that
// the fake kernel used by the unit tests has to match; README.md lists the
// same facts in prose.

// write writes one sysfs attribute with a single write(2), as the kernel
// wants, and returns the bare errno on failure.
func (s *suite) write(path, data string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.Write([]byte(data))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	s.debugf("write %q > %s: %v", data, path, err)
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return err
}

// Paths of the sysfs files that change bindings.
func (s *suite) unbindPath(drv string) string      { return s.fs.Path(pci.BusDriversDir, drv, "unbind") }
func (s *suite) bindPath(drv string) string        { return s.fs.Path(pci.BusDriversDir, drv, "bind") }
func (s *suite) probePath() string                 { return s.fs.Path(pci.DriversProbe) }
func (s *suite) overridePath(a pci.Address) string { return s.fs.DevicePath(a, "driver_override") }

// wantErrno checks that err is the errno want (0: no error).
func (s *suite) wantErrno(err error, want syscall.Errno, format string, a ...any) bool {
	what := fmt.Sprintf(format, a...)
	var got syscall.Errno
	switch {
	case err == nil && want == 0:
		s.ok("%s: succeeds", what)
		return true
	case err != nil && errors.As(err, &got) && got == want:
		s.ok("%s: %s (%v)", what, errnoName(want), want)
		return true
	case want == 0:
		s.fail("%s: %v, want success", what, err)
	default:
		s.fail("%s: %v, want %s", what, err, errnoName(want))
	}
	return false
}

func errnoName(e syscall.Errno) string {
	switch e {
	case syscall.EBUSY:
		return "EBUSY"
	case syscall.ENODEV:
		return "ENODEV"
	case syscall.EINVAL:
		return "EINVAL"
	case syscall.EPERM:
		return "EPERM"
	case syscall.ENOENT:
		return "ENOENT"
	}
	return fmt.Sprintf("errno %d", int(e))
}

// wantState checks a function's driver and raw driver_override.
func (s *suite) wantState(a pci.Address, want state, format string, args ...any) bool {
	got := s.state(a)
	what := fmt.Sprintf(format, args...)
	if got != want {
		s.fail("%s: %s has %v, want %v", what, a, got, want)
		return false
	}
	s.ok("%s: %s has %v", what, a, got)
	return true
}

// wantNode checks whether /dev/vfio/N exists right now, without waiting.
func (s *suite) wantNode(n int, want bool, format string, args ...any) bool {
	what := fmt.Sprintf(format, args...)
	exists, err := s.groupNode(n)
	switch {
	case err != nil:
		s.fail("%s: %v", what, err)
	case exists != want:
		s.fail("%s: /dev/vfio/%d exists=%v, want %v (/dev/vfio: %v)", what, n, exists, want, s.vfioNodes())
	default:
		s.ok("%s: /dev/vfio/%d exists=%v", what, n, exists)
		return true
	}
	return false
}

func (s *suite) kernelFacts(t *topology) {
	g := t.multifunction[0]
	a, b := g.endpoints[0].Address, g.endpoints[1].Address
	drvA, drvB := g.endpoints[0].Driver, g.endpoints[1].Driver
	s.info("kernel: using %v, %s on %s, %s on %s", g, a, drvA, b, drvB)
	const null = "(null)"

	// driver_override: "(null)" when unset; setting it does not rebind.
	s.wantState(a, state{drvA, null}, "kernel: driver_override of an unset device reads (null)")
	s.wantErrno(s.write(s.overridePath(a), "vfio-pci"), 0, "kernel: write vfio-pci to driver_override")
	s.wantState(a, state{drvA, "vfio-pci"}, "kernel: setting driver_override does not rebind")
	s.wantErrno(s.write(s.probePath(), a.String()), 0, "kernel: drivers_probe of a bound device")
	s.wantState(a, state{drvA, "vfio-pci"}, "kernel: drivers_probe leaves a bound device alone")
	s.wantErrno(s.write(s.bindPath("vfio-pci"), a.String()), syscall.EBUSY, "kernel: vfio-pci/bind of a device bound elsewhere")
	s.wantErrno(s.write(s.unbindPath("vfio-pci"), a.String()), syscall.ENODEV, "kernel: vfio-pci/unbind of a device not bound to vfio-pci")

	// Unbind, then probe: the override picks vfio-pci; the group node
	// appears with the first member, before the group is viable.
	const nowhere = "0000:ff:1f.7"
	s.wantErrno(s.write(s.probePath(), nowhere), syscall.ENODEV, "kernel: drivers_probe of an address with no device")
	s.wantErrno(s.write(s.unbindPath(drvA), nowhere), syscall.ENODEV, "kernel: %s/unbind of an address with no device", drvA)
	s.wantErrno(s.write(s.unbindPath(drvA), a.String()+"\n"), 0, "kernel: %s/unbind with a trailing newline", drvA)
	s.wantState(a, state{"", "vfio-pci"}, "kernel: after unbind")
	s.wantNode(g.n, false, "kernel: no group node while no member is on vfio-pci")
	s.wantErrno(s.write(s.probePath(), a.String()), 0, "kernel: drivers_probe with driver_override=vfio-pci")
	s.wantState(a, state{"vfio-pci", "vfio-pci"}, "kernel: probe honours driver_override")
	s.wantNode(g.n, true, "kernel: the group node appears with the first member bound to vfio-pci, before the probe write returns")
	s.nodeModes(g.n)

	func() {
		grp, err := openGroup(s.devRoot, g.n)
		if !s.check(err, "kernel: open /dev/vfio/%d with another member still on %s", g.n, drvB) {
			return
		}
		defer grp.close()
		flags, err := grp.status()
		if err != nil || flags&vfioGroupFlagsViable != 0 {
			s.fail("kernel: VFIO_GROUP_GET_STATUS = %#x, %v; want not viable while %s is on %s", flags, err, b, drvB)
		} else {
			s.ok("kernel: group not viable (flags %#x) while %s is on %s", flags, b, drvB)
		}
		_, err = openGroup(s.devRoot, g.n)
		s.wantErrno(err, syscall.EBUSY, "kernel: a second open of /dev/vfio/%d", g.n)
		c, err := openContainer(s.devRoot)
		if !s.check(err, "kernel: open /dev/vfio/vfio, API version 0, TYPE1v2 supported") {
			return
		}
		defer c.close()
		s.wantErrno(grp.setContainer(c), syscall.EPERM, "kernel: VFIO_GROUP_SET_CONTAINER on a non-viable group")
	}()

	// A driverless member makes the group viable.
	s.wantErrno(s.write(s.unbindPath(drvB), b.String()), 0, "kernel: %s/unbind of %s", drvB, b)
	func() {
		grp, err := openGroup(s.devRoot, g.n)
		if !s.check(err, "kernel: open /dev/vfio/%d", g.n) {
			return
		}
		defer grp.close()
		flags, err := grp.status()
		if err != nil || flags != vfioGroupFlagsViable {
			s.fail("kernel: VFIO_GROUP_GET_STATUS = %#x, %v; want viable (1) with one member on vfio-pci and one driverless", flags, err)
		} else {
			s.ok("kernel: group viable with one member on vfio-pci and one driverless")
		}
		c, err := openContainer(s.devRoot)
		if !s.check(err, "kernel: open container") {
			return
		}
		defer c.close()
		s.wantErrno(grp.setContainer(c), 0, "kernel: VFIO_GROUP_SET_CONTAINER on a viable group")
		s.wantErrno(c.setIOMMU(), 0, "kernel: VFIO_SET_IOMMU(TYPE1v2)")
		if flags, err := grp.status(); err != nil || flags != vfioGroupFlagsViable|vfioGroupFlagsContainerSet {
			s.fail("kernel: VFIO_GROUP_GET_STATUS = %#x, %v; want viable|container_set (3)", flags, err)
		} else {
			s.ok("kernel: VFIO_GROUP_GET_STATUS reports viable|container_set")
		}
		if fl, regions, irqs, err := grp.deviceInfo(a.String()); err != nil || fl&vfioDeviceFlagsPCI == 0 {
			s.fail("kernel: device info of %s: flags %#x, %v", a, fl, err)
		} else {
			s.ok("kernel: VFIO device fd for %s: PCI, %d regions, %d irqs", a, regions, irqs)
		}
		_, _, _, err = grp.deviceInfo(b.String())
		s.wantErrno(err, syscall.ENODEV, "kernel: VFIO_GROUP_GET_DEVICE_FD for the driverless member %s", b)

		// DMA ownership: no host driver may bind while userspace owns the group.
		s.wantErrno(s.write(s.probePath(), b.String()), syscall.EINVAL, "kernel: drivers_probe of %s while the group is owned by userspace", b)
		s.wantState(b, state{"", null}, "kernel: a failed probe leaves the device driverless")
	}()
	s.wantErrno(s.write(s.probePath(), b.String()), 0, "kernel: drivers_probe of %s after the group fds are closed", b)
	s.wantState(b, state{drvB, null}, "kernel: %s back on its driver", b)

	// Clearing driver_override: a bare newline clears it.
	// A zero-length write is accepted but changes nothing.
	s.wantErrno(s.write(s.overridePath(a), ""), 0, "kernel: zero-length write to driver_override")
	s.wantState(a, state{"vfio-pci", "vfio-pci"}, "kernel: a zero-length write does not clear driver_override")
	s.wantErrno(s.write(s.overridePath(a), "\n"), 0, "kernel: write \"\\n\" to driver_override")
	s.wantState(a, state{"vfio-pci", null}, "kernel: a newline clears driver_override; the binding stays")

	// The node goes with the last member's unbind.
	s.wantErrno(s.write(s.unbindPath("vfio-pci"), a.String()), 0, "kernel: vfio-pci/unbind")
	s.wantNode(g.n, false, "kernel: the group node is gone when the unbind write returns")
	s.wantErrno(s.write(s.bindPath("vfio-pci"), a.String()), syscall.ENODEV, "kernel: vfio-pci/bind without driver_override (vfio-pci matches by override only)")
	s.wantState(a, state{"", null}, "kernel: the refused bind leaves the device driverless")

	// An override naming a driver that does not exist: probe succeeds, no driver.
	s.wantErrno(s.write(s.overridePath(a), "no-such-driver"), 0, "kernel: driver_override naming a missing driver")
	s.wantErrno(s.write(s.probePath(), a.String()), 0, "kernel: drivers_probe with an override that matches nothing")
	s.wantState(a, state{"", "no-such-driver"}, "kernel: the device stays driverless")
	// An override naming the host driver binds it: this is how Restore
	// gives a function back to its original driver and no other.
	s.wantErrno(s.write(s.overridePath(a), drvA), 0, "kernel: driver_override naming the host driver %s", drvA)
	start := time.Now()
	s.wantErrno(s.write(s.probePath(), a.String()), 0, "kernel: drivers_probe with driver_override=%s", drvA)
	s.wantState(a, state{drvA, drvA}, "kernel: %s back on %s through its override (probe took %v)", a, drvA, time.Since(start).Round(time.Millisecond))
	s.wantErrno(s.write(s.overridePath(a), "\n"), 0, "kernel: clear driver_override")
	s.wantState(a, state{drvA, null}, "kernel: clearing the override leaves %s on %s", a, drvA)
}

// nodeModes checks the modes and numbers of the VFIO nodes: the group node
// is root-only, the container node is the world-usable misc device 10:196.
func (s *suite) nodeModes(n int) {
	for _, c := range []struct {
		name  string
		perm  os.FileMode
		major uint64 // 0: dynamic, not checked
		minor uint64
	}{
		{fmt.Sprint(n), 0o600, 0, 0},
		{"vfio", 0o666, 10, 196},
	} {
		path := filepath.Join(s.devRoot, "vfio", c.name)
		fi, err := os.Stat(path)
		if err != nil {
			s.fail("kernel: stat %s: %v", path, err)
			continue
		}
		st := fi.Sys().(*syscall.Stat_t)
		major, minor := (st.Rdev>>8)&0xfff, (st.Rdev&0xff)|(st.Rdev>>12)&^0xff
		switch {
		case fi.Mode()&os.ModeCharDevice == 0 || fi.Mode().Perm() != c.perm || st.Uid != 0 || st.Gid != 0:
			s.fail("kernel: %s is %v uid %d gid %d, want a character device %v owned by root", path, fi.Mode(), st.Uid, st.Gid, c.perm)
		case c.major != 0 && (major != c.major || minor != c.minor):
			s.fail("kernel: %s is %d:%d, want %d:%d", path, major, minor, c.major, c.minor)
		default:
			s.ok("kernel: %s is a character device %d:%d, mode %04o, root:root", path, major, minor, fi.Mode().Perm())
		}
	}
}
