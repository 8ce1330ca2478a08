package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// These checks drive the project's Binder (package vfio) against the real
// kernel with sysfs root /sys and dev root /dev.

const target = "vfio-pci"

// recorder is a vfio.Writer that delegates to vfio.OSWriter, records every
// write and can fail chosen ones. The Binder calls it from a goroutine per
// write, and a write that blocks in the kernel may outlive the Binder's
// call, hence the lock.
type recorder struct {
	s  *suite
	mu sync.Mutex
	// writes holds "file <- data": file is "ADDR/driver_override",
	// "DRIVER/unbind" or "drivers_probe".
	writes []string
	// fail, when set, is asked before each write; a non-nil error is
	// returned instead of writing.
	fail     func(path, data string) error
	injected int
}

func (r *recorder) WriteFile(path string, data []byte) error {
	r.mu.Lock()
	r.writes = append(r.writes, fmt.Sprintf("%s <- %q", shortPath(path), data))
	var err error
	if r.fail != nil {
		if err = r.fail(path, string(data)); err != nil {
			r.injected++
		}
	}
	r.mu.Unlock()
	if err != nil {
		r.s.debugf("inject %v: %q > %s", err, data, path)
		return err
	}
	err = vfio.OSWriter{}.WriteFile(path, data)
	r.s.debugf("write %q > %s: %v", data, path, err)
	return err
}

// shortPath names a sysfs file by its last two elements, drivers_probe
// alone.
func shortPath(path string) string {
	if filepath.Base(path) == "drivers_probe" {
		return "drivers_probe"
	}
	return filepath.Base(filepath.Dir(path)) + "/" + filepath.Base(path)
}

// all returns the recorded writes.
func (r *recorder) all() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.writes)
}

func (r *recorder) injections() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.injected
}

// touching returns the recorded writes that concern a: to its own files or
// naming it in the data.
func (r *recorder) touching(a pci.Address) []string {
	var out []string
	for _, w := range r.all() {
		if strings.Contains(w, a.String()) {
			out = append(out, w)
		}
	}
	return out
}

func (r *recorder) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.writes = nil
}

// restoreWrites is what Restore writes to give a function on vfio-pci back
// to o.Driver when o has no driver_override: the original driver as the
// override, so that the probe can only pick it, unbind, probe, and the
// override cleared again.
func restoreWrites(o vfio.Original) []string {
	return []string{
		fmt.Sprintf("%s/driver_override <- %q", o.Address, o.Driver),
		fmt.Sprintf("%s/unbind <- %q", target, o.Address),
		fmt.Sprintf("drivers_probe <- %q", o.Address),
		fmt.Sprintf("%s/driver_override <- %q", o.Address, "\n"),
	}
}

// wantWrites checks the recorded writes against want.
func (s *suite) wantWrites(rec *recorder, want []string, format string, a ...any) bool {
	what := fmt.Sprintf(format, a...)
	got := rec.all()
	if !slices.Equal(got, want) {
		s.fail("%s: writes %q, want %q", what, got, want)
		return false
	}
	s.ok("%s: writes %q", what, got)
	return true
}

func (s *suite) binder() (*vfio.Binder, *recorder) {
	r := &recorder{s: s}
	return vfio.NewBinder(s.fs, s.devRoot, vfio.Options{Writer: r, Timeout: 5 * time.Second}), r
}

// snapshot runs GroupEndpoints and Snapshot and checks them against what
// discover saw.
func (s *suite) snapshot(b *vfio.Binder, g *iommuGroup, label string) ([]vfio.Original, bool) {
	eps, err := vfio.GroupEndpoints(s.fs, g.n)
	if err != nil {
		s.fail("%s: GroupEndpoints(%d): %v", label, g.n, err)
		return nil, false
	}
	if !slices.Equal(eps, g.endpointAddrs()) {
		s.fail("%s: GroupEndpoints(%d) = [%s], want the non-bridge members [%s]", label, g.n, addrs(eps), addrs(g.endpointAddrs()))
		return nil, false
	}
	origs, err := b.Snapshot(eps)
	if err != nil {
		s.fail("%s: Snapshot: %v", label, err)
		return nil, false
	}
	for i, o := range origs {
		st := s.state(eps[i])
		want := vfio.Original{Address: eps[i].String(), Driver: st.driver}
		if st.override != "(null)" {
			want.DriverOverride = st.override
		}
		if o != want {
			s.fail("%s: Snapshot[%d] = %+v, want %+v", label, i, o, want)
			return nil, false
		}
	}
	s.ok("%s: GroupEndpoints(%d) = [%s]; Snapshot = %+v", label, g.n, addrs(eps), origs)
	return origs, true
}

func addrsOf(origs []vfio.Original) []pci.Address {
	out := make([]pci.Address, len(origs))
	for i, o := range origs {
		out[i], _ = pci.ParseAddress(o.Address)
	}
	return out
}

// bind calls Bind and checks it succeeded.
func (s *suite) bind(b *vfio.Binder, g *iommuGroup, origs []vfio.Original, label string) bool {
	start := time.Now()
	err := b.Bind(context.Background(), g.n, origs, target)
	return s.check(err, "%s: Bind(group %d, %s) in %v", label, g.n, target, time.Since(start).Round(time.Millisecond))
}

// restore calls Restore and checks it succeeded.
func (s *suite) restore(b *vfio.Binder, origs []vfio.Original, label string) bool {
	start := time.Now()
	err := b.Restore(context.Background(), origs, target)
	return s.check(err, "%s: Restore in %v", label, time.Since(start).Round(time.Millisecond))
}

// wantOriginal checks that every function is as its Original says.
func (s *suite) wantOriginal(origs []vfio.Original, label string) bool {
	okAll := true
	var got []string
	for _, o := range origs {
		a, _ := pci.ParseAddress(o.Address)
		st := s.state(a)
		want := state{driver: o.Driver, override: o.DriverOverride}
		if want.override == "" {
			want.override = "(null)"
		}
		if st != want {
			s.fail("%s: %s has %v, want its original %v", label, a, st, want)
			okAll = false
		}
		got = append(got, fmt.Sprintf("%s %v", a, st))
	}
	if okAll {
		s.ok("%s: every function has its original driver and driver_override: %s", label, strings.Join(got, "; "))
	}
	return okAll
}

// wantOnTarget checks that every function is bound to vfio-pci.
func (s *suite) wantOnTarget(as []pci.Address, label string) bool {
	var bad []string
	for _, a := range as {
		if d, err := s.fs.CurrentDriver(a); err != nil || d != target {
			bad = append(bad, fmt.Sprintf("%s on %q (%v)", a, d, err))
		}
	}
	if len(bad) > 0 {
		s.fail("%s: not on %s: %s", label, target, strings.Join(bad, ", "))
		return false
	}
	s.ok("%s: every endpoint [%s] is on %s", label, addrs(as), target)
	return true
}

// useGroup opens /dev/vfio/N, checks the group is viable, attaches it to a
// type1v2 container, reads the device info of each endpoint and closes
// every fd again.
func (s *suite) useGroup(n int, endpoints []pci.Address, label string) bool {
	if !s.wantNode(n, true, "%s: group node is a character device", label) {
		return false
	}
	grp, err := openGroup(s.devRoot, n)
	if !s.check(err, "%s: open /dev/vfio/%d", label, n) {
		return false
	}
	defer grp.close()
	flags, err := grp.status()
	if err != nil || flags&vfioGroupFlagsViable == 0 {
		s.fail("%s: VFIO_GROUP_GET_STATUS = %#x, %v; want viable", label, flags, err)
		return false
	}
	c, err := openContainer(s.devRoot)
	if !s.check(err, "%s: open /dev/vfio/vfio", label) {
		return false
	}
	defer c.close()
	if err := grp.setContainer(c); err != nil {
		s.fail("%s: VFIO_GROUP_SET_CONTAINER: %v", label, err)
		return false
	}
	if err := c.setIOMMU(); err != nil {
		s.fail("%s: VFIO_SET_IOMMU(TYPE1v2): %v", label, err)
		return false
	}
	for _, a := range endpoints {
		fl, regions, irqs, err := grp.deviceInfo(a.String())
		if err != nil || fl&vfioDeviceFlagsPCI == 0 {
			s.fail("%s: device fd for %s: flags %#x, %v", label, a, fl, err)
			return false
		}
		s.debugf("%s: %s: %d regions, %d irqs", label, a, regions, irqs)
	}
	s.ok("%s: group %d viable; container attached with TYPE1v2; device fds for [%s]; fds closed", label, n, addrs(endpoints))
	return true
}

func (s *suite) binderSingle(t *topology) {
	g := t.single[0]
	label := fmt.Sprintf("single group %d", g.n)
	b, rec := s.binder()
	origs, ok := s.snapshot(b, g, label)
	if !ok {
		return
	}
	if origs[0].Driver == "" || origs[0].Driver == target || origs[0].DriverOverride != "" {
		s.fail("%s: want a device on its host driver without override, got %+v", label, origs[0])
		return
	}
	eps := addrsOf(origs)
	if s.bind(b, g, origs, label) {
		s.wantOnTarget(eps, label)
		s.useGroup(g.n, eps, label)
		s.deviceCDev(b, eps[0], label)
		rec.reset()
		s.check(b.Bind(context.Background(), g.n, origs, target), "%s: Bind again", label)
		if w := rec.all(); len(w) != 0 {
			s.fail("%s: Bind of a group already on %s wrote %v", label, target, w)
		} else {
			s.ok("%s: Bind of a group already on %s writes nothing", label, target)
		}
	}
	rec.reset()
	s.restore(b, origs, label)
	s.wantWrites(rec, restoreWrites(origs[0]), "%s: Restore probes with driver_override=%s, then clears it", label, origs[0].Driver)
	s.wantOriginal(origs, label)
	s.wantNode(g.n, false, "%s: group node gone after Restore", label)
	rec.reset()
	s.check(b.Restore(context.Background(), origs, target), "%s: Restore again", label)
	if w := rec.all(); len(w) != 0 {
		s.fail("%s: Restore of a restored group wrote %v", label, w)
	} else {
		s.ok("%s: Restore of a restored group writes nothing", label)
	}

	// A function on its driver with a leftover override (a Bind that
	// stopped after its first write): one write fixes it.
	a := eps[0]
	if !s.wantErrno(s.write(s.overridePath(a), target), 0, "%s: leftover driver_override=%s on %s", label, target, a) {
		return
	}
	rec.reset()
	s.restore(b, origs, label+": leftover override")
	s.wantWrites(rec, []string{fmt.Sprintf("%s/driver_override <- %q", a, "\n")}, "%s: Restore of a function on %s with a leftover override", label, origs[0].Driver)
	s.wantOriginal(origs, label+": leftover override")
}

func (s *suite) binderShared(t *topology) {
	groups := append(slices.Clone(t.bridged), t.multifunction...)
	for _, g := range groups {
		label := fmt.Sprintf("shared group %d", g.n)
		b, rec := s.binder()
		origs, ok := s.snapshot(b, g, label)
		if !ok {
			continue
		}
		eps := addrsOf(origs)
		if s.bind(b, g, origs, label) {
			s.wantOnTarget(eps, label)
			s.useGroup(g.n, eps, label)
		}
		// Bridges are left alone.
		for _, d := range g.members {
			if !leftOnHost(d) {
				continue
			}
			if w := rec.touching(d.Address); len(w) > 0 {
				s.fail("%s: bridge %s was written: %v", label, d.Address, w)
			} else {
				s.ok("%s: bridge %s untouched (driver %q)", label, d.Address, s.state(d.Address).driver)
			}
		}
		rec.reset()
		s.restore(b, origs, label)
		var want []string
		for _, o := range origs {
			want = append(want, restoreWrites(o)...)
		}
		s.wantWrites(rec, want, "%s: Restore probes each function with driver_override naming its driver", label)
		s.wantOriginal(origs, label)
		s.wantNode(g.n, false, "%s: group node gone after Restore", label)
	}
}

// binderNoDriver: one member of a shared group has no driver before Bind.
func (s *suite) binderNoDriver(t *topology) {
	g := t.bridged[0]
	a, other := g.endpoints[0], g.endpoints[1]
	label := fmt.Sprintf("no-driver group %d", g.n)
	if !s.wantErrno(s.write(s.unbindPath(a.Driver), a.Address.String()), 0, "%s: setup: unbind %s from %s", label, a.Address, a.Driver) {
		return
	}
	b, _ := s.binder()
	origs, ok := s.snapshot(b, g, label)
	if ok && (origs[0].Driver != "" || origs[1].Driver != other.Driver) {
		s.fail("%s: Snapshot %+v does not show %s driverless and %s on %s", label, origs, a.Address, other.Address, other.Driver)
		ok = false
	}
	for cycle := 1; ok && cycle <= 2; cycle++ {
		l := fmt.Sprintf("%s cycle %d", label, cycle)
		if s.bind(b, g, origs, l) {
			s.wantOnTarget(addrsOf(origs), l)
			s.useGroup(g.n, addrsOf(origs), l)
		}
		s.restore(b, origs, l)
		ok = s.wantOriginal(origs, l)
		s.wantNode(g.n, false, "%s: group node gone after Restore", l)
	}
	// Give the device its driver back for the checks that follow.
	s.wantErrno(s.write(s.probePath(), a.Address.String()), 0, "%s: cleanup: drivers_probe %s", label, a.Address)
	s.wantState(a.Address, state{a.Driver, "(null)"}, "%s: cleanup", label)
}

// binderPreBound: one member of a shared group is already on vfio-pci, with
// driver_override set, as an administrator would leave it.
func (s *suite) binderPreBound(t *topology) {
	g := t.bridged[1]
	a, other := g.endpoints[0], g.endpoints[1]
	label := fmt.Sprintf("pre-bound group %d", g.n)
	setup := s.wantErrno(s.write(s.overridePath(a.Address), target), 0, "%s: setup: driver_override %s", label, target) &&
		s.wantErrno(s.write(s.unbindPath(a.Driver), a.Address.String()), 0, "%s: setup: unbind %s", label, a.Address) &&
		s.wantErrno(s.write(s.probePath(), a.Address.String()), 0, "%s: setup: drivers_probe %s", label, a.Address) &&
		s.wantState(a.Address, state{target, target}, "%s: setup", label)
	if setup {
		b, rec := s.binder()
		origs, ok := s.snapshot(b, g, label)
		if ok && (origs[0] != vfio.Original{Address: a.Address.String(), Driver: target, DriverOverride: target} || origs[1].Driver != other.Driver) {
			s.fail("%s: Snapshot %+v does not show %s on %s and %s on %s", label, origs, a.Address, target, other.Address, other.Driver)
			ok = false
		}
		for cycle := 1; ok && cycle <= 2; cycle++ {
			l := fmt.Sprintf("%s cycle %d", label, cycle)
			rec.reset()
			if s.bind(b, g, origs, l) {
				s.wantOnTarget(addrsOf(origs), l)
				s.useGroup(g.n, addrsOf(origs), l)
			}
			if w := rec.touching(a.Address); len(w) > 0 {
				s.fail("%s: Bind wrote for %s, which was already on %s: %v", l, a.Address, target, w)
			} else {
				s.ok("%s: Bind wrote nothing for %s, already on %s (%d writes for %s)", l, a.Address, target, len(rec.touching(other.Address)), other.Address)
			}
			rec.reset()
			s.restore(b, origs, l)
			if w := rec.touching(a.Address); len(w) > 0 {
				s.fail("%s: Restore wrote for %s, which was on %s before Bind: %v", l, a.Address, target, w)
			} else {
				s.ok("%s: Restore wrote nothing for %s", l, a.Address)
			}
			ok = s.wantOriginal(origs, l)
			s.wantNode(g.n, true, "%s: group node stays while %s remains on %s", l, a.Address, target)
		}
	}
	// Undo the setup by hand.
	s.wantErrno(s.write(s.overridePath(a.Address), "\n"), 0, "%s: cleanup: clear driver_override", label)
	if d, _ := s.fs.CurrentDriver(a.Address); d != "" {
		s.wantErrno(s.write(s.unbindPath(d), a.Address.String()), 0, "%s: cleanup: unbind %s from %s", label, a.Address, d)
	}
	s.wantErrno(s.write(s.probePath(), a.Address.String()), 0, "%s: cleanup: drivers_probe %s", label, a.Address)
	s.wantState(a.Address, state{a.Driver, "(null)"}, "%s: cleanup", label)
	s.wantNode(g.n, false, "%s: cleanup: group node gone", label)
}

var errInjected = errors.New("injected by the VM test")

// binderRollback makes a write for the second member fail and checks that
// Bind names it and puts every member back.
func (s *suite) binderRollback(t *topology) {
	cases := []struct {
		g    *iommuGroup
		step string
		file string // the sysfs file whose write fails, for the 2nd member
	}{
		{t.bridged[0], vfio.StepUnbind, "unbind"},
		{t.multifunction[0], vfio.StepProbe, filepath.Base(pci.DriversProbe)},
	}
	for _, c := range cases {
		label := fmt.Sprintf("rollback group %d, failing %s", c.g.n, c.file)
		b, rec := s.binder()
		origs, ok := s.snapshot(b, c.g, label)
		if !ok {
			continue
		}
		second := origs[1].Address
		rec.fail = func(path, data string) error {
			// Called with rec.mu held.
			if rec.injected == 0 && filepath.Base(path) == c.file && strings.TrimSpace(data) == second {
				return fmt.Errorf("write %s: %w", path, errInjected)
			}
			return nil
		}
		err := b.Bind(context.Background(), c.g.n, origs, target)
		var se *vfio.StepError
		switch {
		case rec.injections() != 1:
			s.fail("%s: the failure was injected %d times, want 1; writes: %v", label, rec.injections(), rec.all())
		case err == nil:
			s.fail("%s: Bind succeeded despite the injected failure", label)
		case !errors.As(err, &se):
			s.fail("%s: Bind error %v is not a *vfio.StepError", label, err)
		case se.Address != second || se.Step != c.step || !errors.Is(err, errInjected):
			s.fail("%s: Bind error %q: StepError{Address: %q, Step: %q}, want Address %q, Step %q, wrapping the injected error", label, err, se.Address, se.Step, second, c.step)
		default:
			s.ok("%s: Bind returns StepError{Address: %s, Step: %q}: %v", label, se.Address, se.Step, err)
		}
		s.wantOriginal(origs, label)
		s.wantNode(c.g.n, false, "%s: group node gone after the rollback", label)
	}
}

// deviceCDev checks Binder.DeviceCDev against the kernel. Kernels from 6.1
// put a class device <device>/vfio-dev/vfioN in sysfs for every device bound
// to VFIO, but only kernels with CONFIG_VFIO_DEVICE_CDEV (6.6+) give it a
// character device: then vfioN has a "dev" attribute and
// /dev/vfio/devices/vfioN exists. On 6.1 to 6.5 vfioN has no "dev" and
// there is no /dev/vfio/devices, so DeviceCDev must return "".
func (s *suite) deviceCDev(b *vfio.Binder, a pci.Address, label string) {
	name, err := b.DeviceCDev(a)
	if err != nil {
		s.fail("%s: DeviceCDev(%s): %v", label, a, err)
		return
	}
	entries, err := os.ReadDir(s.fs.DevicePath(a, "vfio-dev"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		s.fail("%s: %s/vfio-dev: %v", label, a, err)
		return
	}
	want, class := "", "none"
	for _, e := range entries {
		class = e.Name()
		if _, err := os.Stat(s.fs.DevicePath(a, "vfio-dev", e.Name(), "dev")); err == nil {
			want = e.Name()
		}
	}
	if want != "" {
		if exists, err := charDev(filepath.Join(s.devRoot, "vfio", "devices", want)); !exists || err != nil {
			s.fail("%s: vfio-dev/%s has a dev attribute but /dev/vfio/devices/%s is missing (%v)", label, want, want, err)
			return
		}
	}
	if name != want {
		s.fail("%s: DeviceCDev(%s) = %q, want %q: class device vfio-dev/%s, character device: %v, /dev/vfio: %v",
			label, a, name, want, class, want != "", s.vfioNodes())
		return
	}
	s.ok("%s: DeviceCDev(%s) = %q (class device vfio-dev/%s, character device: %v)", label, a, name, class, want != "")
}

// binderGroupCheck: Bind of a group with a member left out, that member on
// its host driver, would give a group the kernel refuses to user space
// (kernel: VFIO_GROUP_SET_CONTAINER fails with EPERM). Bind must say so
// before it writes anything.
func (s *suite) binderGroupCheck(t *topology) {
	for _, g := range []*iommuGroup{t.bridged[0], t.multifunction[0]} {
		first, left := g.endpoints[0], g.endpoints[1]
		label := fmt.Sprintf("group check %d, %s left out", g.n, left.Address)
		b, rec := s.binder()
		origs, err := b.Snapshot([]pci.Address{first.Address})
		if !s.check(err, "%s: Snapshot of %s", label, first.Address) {
			continue
		}
		err = b.Bind(context.Background(), g.n, origs, target)
		var se *vfio.StepError
		switch {
		case !errors.As(err, &se):
			s.fail("%s: Bind error %v, want a *vfio.StepError", label, err)
		case se.Address != left.Address.String() || se.Step != vfio.StepCheckGroup || !strings.Contains(err.Error(), left.Driver):
			s.fail("%s: Bind error %q: StepError{Address: %q, Step: %q}, want %s at %q naming %s", label, err, se.Address, se.Step, left.Address, vfio.StepCheckGroup, left.Driver)
		default:
			s.ok("%s: Bind refuses: %v", label, err)
		}
		if w := rec.all(); len(w) > 0 {
			s.fail("%s: Bind wrote %q", label, w)
		} else {
			s.ok("%s: Bind wrote nothing", label)
		}
		s.wantState(first.Address, state{first.Driver, "(null)"}, "%s: unchanged", label)
		s.wantNode(g.n, false, "%s: no group node", label)
	}
}

// binderBlockedUnbind: while user space holds a device fd, unbinding the
// device from vfio-pci blocks in the kernel. Restore gives up after the
// Binder's timeout with ErrTimeout at the unbind; once the fd is closed the
// blocked write goes through, and a second Restore finishes the job.
func (s *suite) binderBlockedUnbind(t *topology) {
	g := t.single[len(t.single)-1]
	label := fmt.Sprintf("blocked unbind group %d", g.n)
	b, rec := s.binder()
	origs, ok := s.snapshot(b, g, label)
	if !ok || !s.bind(b, g, origs, label) {
		s.restore(b, origs, label)
		return
	}
	a := addrsOf(origs)[0]
	func() {
		grp, err := openGroup(s.devRoot, g.n)
		if !s.check(err, "%s: open /dev/vfio/%d", label, g.n) {
			return
		}
		defer grp.close()
		c, err := openContainer(s.devRoot)
		if !s.check(err, "%s: open container", label) {
			return
		}
		defer c.close()
		if !s.check(grp.setContainer(c), "%s: VFIO_GROUP_SET_CONTAINER", label) || !s.check(c.setIOMMU(), "%s: VFIO_SET_IOMMU", label) {
			return
		}
		fd, err := grp.openDevice(a.String())
		if !s.check(err, "%s: open a device fd for %s", label, a) {
			return
		}
		closed := false
		closeFD := func() {
			if !closed {
				closed = true
				_ = syscall.Close(fd)
			}
		}
		defer closeFD()

		const timeout = time.Second
		short := vfio.NewBinder(s.fs, s.devRoot, vfio.Options{Writer: rec, Timeout: timeout})
		start := time.Now()
		err = short.Restore(context.Background(), origs, target)
		took := time.Since(start)
		var se *vfio.StepError
		switch {
		case !errors.As(err, &se) || se.Address != a.String() || se.Step != vfio.StepUnbind || !errors.Is(err, vfio.ErrTimeout):
			s.fail("%s: Restore with the device open: %v, want ErrTimeout at %q of %s", label, err, vfio.StepUnbind, a)
		case took > timeout+2*time.Second:
			s.fail("%s: Restore returned after %v, want about %v", label, took, timeout)
		default:
			s.ok("%s: Restore with the device open returns after %v: %v", label, took.Round(time.Millisecond), err)
		}
		// Nothing here may read driver_override now: Linux takes the
		// device lock to show it, and the blocked unbind holds that lock.
		// The driver link is gone already: the driver core removes it
		// before it calls vfio-pci's remove, which is what waits.
		if d, err := s.fs.CurrentDriver(a); err != nil || d != "" {
			s.fail("%s: driver link %q (%v) while the unbind is blocked, want none", label, d, err)
		} else {
			s.ok("%s: the driver link is gone while the unbind is blocked", label)
		}
		// A retry (the kubelet's) must not start a second blocked access:
		// the binder knows the unbind is still stuck and fails at once.
		start = time.Now()
		err = short.Restore(context.Background(), origs, target)
		took = time.Since(start)
		switch {
		case !errors.As(err, &se) || se.Address != a.String() || se.Step != vfio.StepReadState || !errors.Is(err, vfio.ErrBlocked):
			s.fail("%s: a second Restore while the unbind is blocked: %v, want ErrBlocked at %q", label, err, vfio.StepReadState)
		case took > timeout/2:
			s.fail("%s: a second Restore while the unbind is blocked returned after %v, want at once", label, took)
		default:
			s.ok("%s: a second Restore while the unbind is blocked fails at once after %v: %v", label, took.Round(time.Millisecond), err)
		}

		// Closing the fd lets the blocked unbind finish and release the
		// device lock: driver_override can be read again, and holds what
		// Restore wrote before the unbind.
		closeFD()
		closedAt := time.Now()
		read := make(chan string, 1)
		go func() { read <- s.readRaw(s.overridePath(a)) }()
		select {
		case ov := <-read:
			if ov != origs[0].Driver {
				s.fail("%s: driver_override %q after the device fd was closed, want %q", label, ov, origs[0].Driver)
			} else {
				s.ok("%s: the unbind finished %v after the device fd was closed; driver_override=%s", label, time.Since(closedAt).Round(time.Millisecond), ov)
			}
		case <-time.After(10 * time.Second):
			s.fail("%s: driver_override still unreadable 10s after the device fd was closed", label)
		}
	}()
	s.restore(b, origs, label+": after the fds are closed")
	s.wantOriginal(origs, label)
	s.wantNode(g.n, false, "%s: group node gone after Restore", label)
}

// binderRemoved: a function removed (sysfs remove, as for a VF when
// sriov_numvfs goes to 0) while on vfio-pci counts as restored: Restore
// reports it gone, without error, and restores the rest. A rescan brings it
// back on its driver.
func (s *suite) binderRemoved(t *topology) {
	g := t.multifunction[0]
	label := fmt.Sprintf("removed function group %d", g.n)
	b, rec := s.binder()
	origs, ok := s.snapshot(b, g, label)
	if !ok || !s.bind(b, g, origs, label) {
		s.restore(b, origs, label)
		return
	}
	gone := g.endpoints[len(g.endpoints)-1]
	if s.wantErrno(s.write(s.fs.DevicePath(gone.Address, "remove"), "1"), 0, "%s: remove %s", label, gone.Address) {
		if _, err := os.Lstat(s.fs.DevicePath(gone.Address)); !errors.Is(err, os.ErrNotExist) {
			s.fail("%s: %s still there after remove: %v", label, s.fs.DevicePath(gone.Address), err)
		}
		rec.reset()
		got, err := b.RestoreReport(context.Background(), origs, target)
		s.check(err, "%s: RestoreReport", label)
		if !slices.Equal(got, []string{gone.Address.String()}) {
			s.fail("%s: RestoreReport says gone: %q, want [%s]", label, got, gone.Address)
		} else {
			s.ok("%s: RestoreReport says gone: %q", label, got)
		}
		if w := rec.touching(gone.Address); len(w) > 0 {
			s.fail("%s: Restore wrote for the removed %s: %q", label, gone.Address, w)
		}
		s.wantOriginal(slices.DeleteFunc(slices.Clone(origs), func(o vfio.Original) bool { return o.Address == gone.Address.String() }), label)
		s.wantNode(g.n, false, "%s: group node gone after Restore", label)
	}

	// Bring it back.
	s.wantErrno(s.write(s.fs.Path("bus/pci/rescan"), "1"), 0, "%s: rescan", label)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if d, err := s.fs.CurrentDriver(gone.Address); err == nil && d == gone.Driver {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	s.wantState(gone.Address, state{gone.Driver, "(null)"}, "%s: back after the rescan", label)
	// Linux 6.1 may put the function back in a new group of its own, so
	// the group is only reported.
	if d, err := s.fs.Device(gone.Address); err == nil && d.IOMMUGroup != nil {
		s.info("%s: %s is in group %d after the rescan (was %d)", label, gone.Address, *d.IOMMUGroup, g.n)
	}
}
