package pcitest_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// Two NICs sharing group 3 behind a conventional PCI bridge, one NIC alone
// in group 5, one function already on vfio-pci in group 6 and one without
// an IOMMU group.
const (
	bridge = "0000:00:1e.0"
	nicA   = "0000:03:01.0"
	nicB   = "0000:03:02.0"
	nicC   = "0000:00:19.0"
	onVFIO = "0000:00:1f.6"
	noMMU  = "0000:00:14.0"
)

type fixture struct {
	tree *pcitest.Tree
	fs   *pci.FS
	dev  string
	k    *pcitest.Kernel
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	return newFixtureWith(t, pcitest.DefaultKernelOptions())
}

func newFixtureWith(t *testing.T, opts pcitest.KernelOptions) *fixture {
	t.Helper()
	dir := t.TempDir()
	tree, err := pcitest.New(filepath.Join(dir, "sys"))
	if err != nil {
		t.Fatal(err)
	}
	err = tree.Add(
		pcitest.Function{Address: bridge, Vendor: 0x8086, Device: 0x244e, Class: 0x060401, IOMMUGroup: 3},
		pcitest.Function{Address: nicA, Parent: bridge, Vendor: 0x8086, Device: 0x100e, Class: 0x020000, Driver: "e1000", IOMMUGroup: 3},
		pcitest.Function{Address: nicB, Parent: bridge, Vendor: 0x8086, Device: 0x100e, Class: 0x020000, Driver: "e1000", IOMMUGroup: 3},
		pcitest.Function{Address: nicC, Vendor: 0x8086, Device: 0x15bb, Class: 0x020000, Driver: "e1000e", IOMMUGroup: 5},
		pcitest.Function{Address: onVFIO, Vendor: 0x8086, Device: 0x15bb, Class: 0x020000, Driver: "vfio-pci", IOMMUGroup: 6},
		pcitest.Function{Address: noMMU, Vendor: 0x8086, Device: 0xa36d, Class: 0x0c0330, Driver: "xhci_hcd", NoIOMMU: true},
	)
	if err != nil {
		t.Fatal(err)
	}
	fs, err := pci.NewFS(tree.Root)
	if err != nil {
		t.Fatal(err)
	}
	dev := filepath.Join(dir, "dev")
	k, err := pcitest.NewKernelWithOptions(tree.Root, dev, opts)
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{tree: tree, fs: fs, dev: dev, k: k}
}

func (f *fixture) driver(t *testing.T, addr string) string {
	t.Helper()
	a, _ := pci.ParseAddress(addr)
	d, err := f.fs.CurrentDriver(a)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func (f *fixture) overrideFile(addr string) string {
	return filepath.Join(f.tree.Root, pci.BusDevicesDir, addr, "driver_override")
}

func (f *fixture) driverFile(driver, name string) string {
	return filepath.Join(f.tree.Root, pci.BusDriversDir, driver, name)
}

func (f *fixture) probeFile() string { return filepath.Join(f.tree.Root, pci.DriversProbe) }

// write is one write(2) on the path, as the kernel emulator sees it.
func (f *fixture) write(t *testing.T, path, data string) error {
	t.Helper()
	return f.k.WriteFile(path, []byte(data))
}

func mustWrite(t *testing.T, f *fixture, path, data string) {
	t.Helper()
	if err := f.write(t, path, data); err != nil {
		t.Fatalf("write %q to %s: %v", data, path, err)
	}
}

// charDev returns the device number of a character device node, ok false
// when the path does not exist.
func charDev(t *testing.T, path string) (major, minor uint32, ok bool) {
	t.Helper()
	var st unix.Stat_t
	err := unix.Stat(path, &st)
	if errors.Is(err, unix.ENOENT) {
		return 0, 0, false
	}
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR {
		t.Fatalf("%s is not a character device (mode %o)", path, st.Mode)
	}
	return unix.Major(st.Rdev), unix.Minor(st.Rdev), true
}

func TestNewKernel(t *testing.T) {
	f := newFixture(t)
	maj, min, ok := charDev(t, filepath.Join(f.dev, "vfio", "vfio"))
	if !ok || maj != 10 || min != 196 {
		t.Errorf("/dev/vfio/vfio: %d:%d exists=%v, want 10:196", maj, min, ok)
	}
	if st, err := os.Stat(filepath.Join(f.dev, "vfio", "vfio")); err != nil || st.Mode().Perm() != 0o666 {
		t.Errorf("/dev/vfio/vfio mode: %v %v, want 0666", st.Mode(), err)
	}
	if _, _, ok := charDev(t, filepath.Join(f.dev, "vfio", "6")); !ok {
		t.Error("/dev/vfio/6 missing for a function bound to vfio-pci at start")
	}
	if _, _, ok := charDev(t, filepath.Join(f.dev, "vfio", "devices", "vfio0")); !ok {
		t.Error("/dev/vfio/devices/vfio0 missing")
	}
	for _, g := range []string{"3", "5"} {
		if _, _, ok := charDev(t, filepath.Join(f.dev, "vfio", g)); ok {
			t.Errorf("/dev/vfio/%s exists for a group on host drivers", g)
		}
	}
}

func TestDriverOverride(t *testing.T) {
	tests := []struct {
		write string
		want  string // file content afterwards
		log   string
	}{
		{"vfio-pci", "vfio-pci\n", "driver_override 0000:00:19.0 vfio-pci"},
		{"vfio-pci\n", "vfio-pci\n", "driver_override 0000:00:19.0 vfio-pci"},
		{"vfio-pci\nrest", "vfio-pci\n", "driver_override 0000:00:19.0 vfio-pci"},
		{"\n", "(null)\n", "driver_override 0000:00:19.0 (null)"},
		{"", "e1000e\n", `driver_override 0000:00:19.0 ""`}, // ignored, as Linux does
		{"\nvfio-pci", "(null)\n", "driver_override 0000:00:19.0 (null)"},
		{"vfio-pci\x00\x00", "vfio-pci\n", "driver_override 0000:00:19.0 vfio-pci"},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.write, "\n", `\n`), func(t *testing.T) {
			f := newFixture(t)
			mustWrite(t, f, f.overrideFile(nicC), "e1000e")
			mustWrite(t, f, f.overrideFile(nicC), tt.write)
			got, err := os.ReadFile(f.overrideFile(nicC))
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Errorf("driver_override holds %q, want %q", got, tt.want)
			}
			if w := f.k.Writes(); w[len(w)-1] != tt.log {
				t.Errorf("log %q, want %q last", w, tt.log)
			}
			if d := f.driver(t, nicC); d != "e1000e" {
				t.Errorf("setting the override changed the driver to %q", d)
			}
		})
	}
}

func TestWriteErrors(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, f *fixture)
		path  func(f *fixture) string
		data  string
		want  error
	}{
		{name: "unbind from a driver the device is not on",
			path: func(f *fixture) string { return f.driverFile("e1000", "unbind") }, data: nicC, want: syscall.ENODEV},
		{name: "unbind of an unknown device",
			path: func(f *fixture) string { return f.driverFile("e1000", "unbind") }, data: "0000:7f:00.0", want: syscall.ENODEV},
		{name: "unbind of garbage",
			path: func(f *fixture) string { return f.driverFile("e1000", "unbind") }, data: "eth0", want: syscall.ENODEV},
		{name: "bind to a driver that does not match",
			setup: func(t *testing.T, f *fixture) { mustWrite(t, f, f.driverFile("e1000e", "unbind"), nicC) },
			path:  func(f *fixture) string { return f.driverFile("vfio-pci", "bind") }, data: nicC, want: syscall.ENODEV},
		{name: "bind of a bound device",
			setup: func(t *testing.T, f *fixture) { mustWrite(t, f, f.overrideFile(nicC), "vfio-pci") },
			path:  func(f *fixture) string { return f.driverFile("vfio-pci", "bind") }, data: nicC, want: syscall.EBUSY},
		{name: "native driver no longer matches with an override set",
			setup: func(t *testing.T, f *fixture) {
				mustWrite(t, f, f.overrideFile(nicC), "vfio-pci")
				mustWrite(t, f, f.driverFile("e1000e", "unbind"), nicC)
			},
			path: func(f *fixture) string { return f.driverFile("e1000e", "bind") }, data: nicC, want: syscall.ENODEV},
		{name: "vfio-pci refuses a device without IOMMU group",
			setup: func(t *testing.T, f *fixture) {
				mustWrite(t, f, f.overrideFile(noMMU), "vfio-pci")
				mustWrite(t, f, f.driverFile("xhci_hcd", "unbind"), noMMU)
			},
			path: func(f *fixture) string { return f.driverFile("vfio-pci", "bind") }, data: noMMU, want: syscall.EINVAL},
		{name: "unbind with two newlines",
			path: func(f *fixture) string { return f.driverFile("e1000", "unbind") }, data: nicA + "\n\n", want: syscall.ENODEV},
		{name: "driver_override of a page less one byte",
			path: func(f *fixture) string { return f.overrideFile(nicC) }, data: strings.Repeat("x", 4095), want: syscall.EINVAL},
		{name: "driver_override longer than a page",
			path: func(f *fixture) string { return f.overrideFile(nicC) }, data: strings.Repeat("x", 5000), want: syscall.EINVAL},
		{name: "probe of an unknown device",
			path: func(f *fixture) string { return f.probeFile() }, data: "0000:7f:00.0", want: syscall.ENODEV},
		{name: "override of a device that is not there",
			path: func(f *fixture) string { return filepath.Join(f.tree.Root, "devices", "driver_override") }, data: "x", want: syscall.EACCES},
		{name: "a file the emulator does not handle",
			path: func(f *fixture) string { return f.driverFile("e1000", "new_id") }, data: "8086 100f", want: syscall.EACCES},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			if tt.setup != nil {
				tt.setup(t, f)
			}
			before := snapshotTree(t, f.tree.Root)
			err := f.write(t, tt.path(f), tt.data)
			if !errors.Is(err, tt.want) {
				t.Fatalf("write %q: %v, want %v", tt.data, err, tt.want)
			}
			var pe *os.PathError
			if !errors.As(err, &pe) || pe.Path != tt.path(f) {
				t.Errorf("error %v does not name the path", err)
			}
			if diff := cmp.Diff(before, snapshotTree(t, f.tree.Root)); diff != "" {
				t.Errorf("a failed write changed the tree (-before +after):\n%s", diff)
			}
		})
	}
}

// snapshotTree lists every link target and small file below root.
func snapshotTree(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		switch {
		case info.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(p)
			out[rel] = "-> " + target
			return err
		case info.Mode().IsRegular():
			data, err := os.ReadFile(p)
			out[rel] = string(data)
			return err
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestBindUnbindProbe(t *testing.T) {
	f := newFixture(t)
	// Unbind through the device's driver link, as a shell user does.
	mustWrite(t, f, filepath.Join(f.tree.Root, pci.BusDevicesDir, nicC, "driver", "unbind"), nicC+"\n")
	if d := f.driver(t, nicC); d != "" {
		t.Fatalf("driver %q after unbind", d)
	}
	if _, err := os.Lstat(f.driverFile("e1000e", nicC)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("driver's device link left after unbind: %v", err)
	}
	// Without an override drivers_probe finds the native driver.
	mustWrite(t, f, f.probeFile(), nicC)
	if d := f.driver(t, nicC); d != "e1000e" {
		t.Fatalf("driver %q after probe, want e1000e", d)
	}
	if target, err := os.Readlink(f.driverFile("e1000e", nicC)); err != nil || !strings.HasSuffix(target, "/"+nicC) {
		t.Errorf("driver's device link: %q %v", target, err)
	}
	// Probing a bound device changes nothing.
	mustWrite(t, f, f.overrideFile(nicC), "vfio-pci")
	mustWrite(t, f, f.probeFile(), nicC)
	if d := f.driver(t, nicC); d != "e1000e" {
		t.Fatalf("probe of a bound device moved it to %q", d)
	}
	// bind with a matching override.
	mustWrite(t, f, f.driverFile("e1000e", "unbind"), nicC)
	mustWrite(t, f, f.driverFile("vfio-pci", "bind"), nicC)
	if d := f.driver(t, nicC); d != "vfio-pci" {
		t.Fatalf("driver %q after bind, want vfio-pci", d)
	}
	// An override naming a driver that is not loaded: no driver matches.
	mustWrite(t, f, f.driverFile("vfio-pci", "unbind"), nicC)
	mustWrite(t, f, f.overrideFile(nicC), "igb")
	mustWrite(t, f, f.probeFile(), nicC)
	if d := f.driver(t, nicC); d != "" {
		t.Fatalf("driver %q after probe with override igb, want none", d)
	}
	// vfio-pci's probe fails without an IOMMU group: drivers_probe
	// succeeds, the device stays unbound.
	mustWrite(t, f, f.overrideFile(noMMU), "vfio-pci")
	mustWrite(t, f, f.driverFile("xhci_hcd", "unbind"), noMMU)
	mustWrite(t, f, f.probeFile(), noMMU)
	if d := f.driver(t, noMMU); d != "" {
		t.Fatalf("device without IOMMU group bound to %q", d)
	}
	want := []string{
		"unbind 0000:00:19.0 e1000e",
		"probe 0000:00:19.0",
		"driver_override 0000:00:19.0 vfio-pci",
		"probe 0000:00:19.0",
		"unbind 0000:00:19.0 e1000e",
		"bind 0000:00:19.0 vfio-pci",
		"unbind 0000:00:19.0 vfio-pci",
		"driver_override 0000:00:19.0 igb",
		"probe 0000:00:19.0",
		"driver_override 0000:00:14.0 vfio-pci",
		"unbind 0000:00:14.0 xhci_hcd",
		"probe 0000:00:14.0",
	}
	if diff := cmp.Diff(want, f.k.Writes()); diff != "" {
		t.Errorf("writes (-want +got):\n%s", diff)
	}
}

func TestSetNative(t *testing.T) {
	f := newFixture(t)
	mustWrite(t, f, f.driverFile("vfio-pci", "unbind"), onVFIO)
	mustWrite(t, f, f.probeFile(), onVFIO)
	if d := f.driver(t, onVFIO); d != "" {
		t.Fatalf("a function found on vfio-pci has no native driver, but probe bound %q", d)
	}
	if err := f.tree.AddDriver("e1000e"); err != nil {
		t.Fatal(err)
	}
	f.k.SetNative(onVFIO, "e1000e")
	mustWrite(t, f, f.probeFile(), onVFIO)
	if d := f.driver(t, onVFIO); d != "e1000e" {
		t.Fatalf("driver %q after SetNative and probe, want e1000e", d)
	}
}

func TestVFIONodes(t *testing.T) {
	f := newFixture(t)
	group := filepath.Join(f.dev, "vfio", "3")
	toVFIO := func(addr string) {
		mustWrite(t, f, f.overrideFile(addr), "vfio-pci")
		mustWrite(t, f, f.driverFile("e1000", "unbind"), addr)
		mustWrite(t, f, f.probeFile(), addr)
	}
	cdev := func(addr string) string {
		entries, err := os.ReadDir(filepath.Join(f.tree.Root, pci.BusDevicesDir, addr, "vfio-dev"))
		if errors.Is(err, os.ErrNotExist) {
			return ""
		}
		if err != nil || len(entries) != 1 {
			t.Fatalf("vfio-dev of %s: %v %v", addr, entries, err)
		}
		return entries[0].Name()
	}

	toVFIO(nicA)
	maj, min, ok := charDev(t, group)
	if !ok || maj != 246 || min != 3 {
		t.Fatalf("/dev/vfio/3 after binding the first member: %d:%d exists=%v", maj, min, ok)
	}
	if got := cdev(nicA); got != "vfio1" { // vfio0 belongs to the function bound at start
		t.Errorf("iommufd device of %s: %q, want vfio1", nicA, got)
	}
	dev, err := os.ReadFile(filepath.Join(f.tree.Root, pci.BusDevicesDir, nicA, "vfio-dev", "vfio1", "dev"))
	if err != nil || string(dev) != "237:1\n" {
		t.Errorf("vfio-dev/vfio1/dev: %q %v", dev, err)
	}
	if maj, min, ok := charDev(t, filepath.Join(f.dev, "vfio", "devices", "vfio1")); !ok || maj != 237 || min != 1 {
		t.Errorf("/dev/vfio/devices/vfio1: %d:%d exists=%v", maj, min, ok)
	}
	toVFIO(nicB)
	if got := cdev(nicB); got != "vfio2" {
		t.Errorf("iommufd device of %s: %q, want vfio2", nicB, got)
	}

	mustWrite(t, f, f.driverFile("vfio-pci", "unbind"), nicA)
	if _, _, ok := charDev(t, group); !ok {
		t.Fatal("/dev/vfio/3 removed while a member is still on vfio-pci")
	}
	if cdev(nicA) != "" {
		t.Error("vfio-dev left after unbind")
	}
	if _, _, ok := charDev(t, filepath.Join(f.dev, "vfio", "devices", "vfio1")); ok {
		t.Error("/dev/vfio/devices/vfio1 left after unbind")
	}
	// The lowest free number is reused.
	mustWrite(t, f, f.probeFile(), nicA)
	if got := cdev(nicA); got != "vfio1" {
		t.Errorf("iommufd device of %s after rebinding: %q, want vfio1", nicA, got)
	}
	mustWrite(t, f, f.driverFile("vfio-pci", "unbind"), nicA)
	mustWrite(t, f, f.driverFile("vfio-pci", "unbind"), nicB)
	if _, _, ok := charDev(t, group); ok {
		t.Error("/dev/vfio/3 left after the last member left vfio-pci")
	}
	if d := f.driver(t, bridge); d != "" {
		t.Errorf("bridge got driver %q", d)
	}
}

func TestFailNext(t *testing.T) {
	f := newFixture(t)
	f.k.FailNext(pcitest.OpUnbind, nicA, syscall.EBUSY)
	f.k.FailNext(pcitest.OpDriverOverride, nicA, syscall.ENOMEM)
	if err := f.write(t, f.overrideFile(nicA), "vfio-pci"); !errors.Is(err, syscall.ENOMEM) {
		t.Fatalf("driver_override: %v, want ENOMEM", err)
	}
	if ov, _ := pci.ReadDriverOverride(f.overrideFile(nicA)); ov != "" {
		t.Errorf("failed write set the override to %q", ov)
	}
	// Another device is not affected.
	mustWrite(t, f, f.driverFile("e1000", "unbind"), nicB)
	if err := f.write(t, f.driverFile("e1000", "unbind"), nicA); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("unbind: %v, want EBUSY", err)
	}
	if d := f.driver(t, nicA); d != "e1000" {
		t.Errorf("failed unbind changed the driver to %q", d)
	}
	// Only the next write fails.
	mustWrite(t, f, f.driverFile("e1000", "unbind"), nicA)
	if d := f.driver(t, nicA); d != "" {
		t.Errorf("driver %q after unbind", d)
	}
}

func writeOS(t *testing.T, path, data string) {
	t.Helper()
	fh, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fh.Write([]byte(data)); err != nil {
		t.Fatal(err)
	}
	if err := fh.Close(); err != nil {
		t.Fatal(err)
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestWatch(t *testing.T) {
	f := newFixture(t)
	// A write made before Watch starts is applied when it does.
	writeOS(t, f.driverFile("e1000", "unbind"), nicA)

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- f.k.Watch(ctx) }()
	select {
	case <-f.k.Ready():
	case err := <-done:
		t.Fatalf("Watch: %v", err)
	}
	eventually(t, "the pending unbind", func() bool { return f.driver(t, nicA) == "" })

	writeOS(t, f.overrideFile(nicC), "vfio-pci\n")
	writeOS(t, f.driverFile("e1000e", "unbind"), nicC)
	writeOS(t, f.probeFile(), nicC)
	eventually(t, nicC+" on vfio-pci", func() bool { return f.driver(t, nicC) == "vfio-pci" })
	if _, _, ok := charDev(t, filepath.Join(f.dev, "vfio", "5")); !ok {
		t.Error("/dev/vfio/5 missing")
	}
	for _, file := range []string{f.driverFile("e1000e", "unbind"), f.probeFile()} {
		if data, err := os.ReadFile(file); err != nil || len(data) != 0 {
			t.Errorf("%s holds %q after it was applied (%v)", file, data, err)
		}
	}

	// Clearing the override shows "(null)".
	writeOS(t, f.overrideFile(nicC), "\n")
	eventually(t, "(null) in driver_override", func() bool {
		data, _ := os.ReadFile(f.overrideFile(nicC))
		return string(data) == "(null)\n"
	})

	// A driver loaded while Watch runs is watched too.
	writeOS(t, f.overrideFile(nicA), "igb")
	eventually(t, "igb in driver_override", func() bool {
		data, _ := os.ReadFile(f.overrideFile(nicA))
		return string(data) == "igb\n"
	})
	if err := f.tree.AddDriver("igb"); err != nil {
		t.Fatal(err)
	}
	writeOS(t, f.driverFile("igb", "bind"), nicA)
	eventually(t, nicA+" on igb", func() bool { return f.driver(t, nicA) == "igb" })

	// Errors the writer could not see are kept.
	writeOS(t, f.driverFile("e1000", "unbind"), nicC)
	eventually(t, "the ENODEV", func() bool { return len(f.k.Errors()) > 0 })
	if errs := f.k.Errors(); len(errs) != 1 || !errors.Is(errs[0], syscall.ENODEV) {
		t.Errorf("errors %v, want one ENODEV", errs)
	}

	// The writer truncated driver_override; the kernel would have kept
	// the override, so the emulator puts it back: after a zero-length
	// write, and after a failed one.
	writeOS(t, f.overrideFile(nicA), "")
	eventually(t, "the zero-length write", func() bool {
		w := f.k.Writes()
		return w[len(w)-1] == `driver_override 0000:03:01.0 ""`
	})
	if data, err := os.ReadFile(f.overrideFile(nicA)); err != nil || string(data) != "igb\n" {
		t.Errorf("driver_override after a zero-length write: %q %v, want igb", data, err)
	}
	f.k.FailNext(pcitest.OpDriverOverride, nicA, syscall.ENOMEM)
	writeOS(t, f.overrideFile(nicA), "vfio-pci")
	eventually(t, "the ENOMEM", func() bool { return len(f.k.Errors()) > 1 })
	if data, err := os.ReadFile(f.overrideFile(nicA)); err != nil || string(data) != "igb\n" {
		t.Errorf("driver_override after a failed write: %q %v, want igb", data, err)
	}
	if errs := f.k.Errors(); len(errs) != 2 || !errors.Is(errs[1], syscall.ENOMEM) {
		t.Errorf("errors %v, want ENODEV and ENOMEM", errs)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Watch returned %v after cancel, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Watch did not return after cancel")
	}

	want := []string{
		"unbind 0000:03:01.0 e1000",
		"driver_override 0000:00:19.0 vfio-pci",
		"unbind 0000:00:19.0 e1000e",
		"probe 0000:00:19.0",
		"driver_override 0000:00:19.0 (null)",
		"driver_override 0000:03:01.0 igb",
		"bind 0000:03:01.0 igb",
		"unbind 0000:00:19.0 e1000",
		`driver_override 0000:03:01.0 ""`,
		"driver_override 0000:03:01.0 vfio-pci",
	}
	if diff := cmp.Diff(want, f.k.Writes()); diff != "" {
		t.Errorf("writes (-want +got):\n%s", diff)
	}
}

func TestOverrideLimit(t *testing.T) {
	f := newFixture(t)
	long := strings.Repeat("x", 4094) // with "\n" and the NUL, the page is full
	mustWrite(t, f, f.overrideFile(nicC), long)
	if got, err := os.ReadFile(f.overrideFile(nicC)); err != nil || string(got) != long+"\n" {
		t.Errorf("driver_override holds %d bytes (%v), want the %d written and a newline", len(got), err, len(long))
	}
	if err := f.write(t, f.overrideFile(nicC), long+"x"); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("one byte more: %v, want EINVAL", err)
	}
}

// TestZeroLengthWrites: sysfs ignores a write of no bytes to any of the
// files and reports success.
func TestZeroLengthWrites(t *testing.T) {
	f := newFixture(t)
	mustWrite(t, f, f.overrideFile(nicA), "vfio-pci")
	mustWrite(t, f, f.driverFile("e1000", "unbind"), nicB)
	f.k.FailNext(pcitest.OpDriverOverride, nicA, syscall.ENOMEM)
	before := snapshotTree(t, f.tree.Root)
	from := len(f.k.Writes())
	for _, path := range []string{
		f.overrideFile(nicA),
		f.driverFile("e1000", "unbind"),
		f.driverFile("e1000", "bind"),
		f.driverFile("vfio-pci", "bind"),
		f.probeFile(),
	} {
		if err := f.write(t, path, ""); err != nil {
			t.Errorf("zero-length write to %s: %v", path, err)
		}
	}
	if diff := cmp.Diff(before, snapshotTree(t, f.tree.Root)); diff != "" {
		t.Errorf("zero-length writes changed the tree (-before +after):\n%s", diff)
	}
	want := []string{
		`driver_override 0000:03:01.0 ""`,
		`unbind "" e1000`,
		`bind "" e1000`,
		`bind "" vfio-pci`,
		`probe ""`,
	}
	if diff := cmp.Diff(want, f.k.Writes()[from:]); diff != "" {
		t.Errorf("writes (-want +got):\n%s", diff)
	}
	// The store callback never ran, so the injected failure is still due.
	if err := f.write(t, f.overrideFile(nicA), "\n"); !errors.Is(err, syscall.ENOMEM) {
		t.Errorf("first non-empty write after FailNext: %v, want ENOMEM", err)
	}
}

// TestDeviceName: the device name written to unbind, bind and drivers_probe
// ends at a NUL, and one trailing newline is ignored.
func TestDeviceName(t *testing.T) {
	f := newFixture(t)
	mustWrite(t, f, f.driverFile("e1000", "unbind"), nicA+"\x00junk")
	if d := f.driver(t, nicA); d != "" {
		t.Fatalf("driver %q after unbind of %q", d, nicA+`\0junk`)
	}
	mustWrite(t, f, f.probeFile(), nicA+"\n\x00")
	if d := f.driver(t, nicA); d != "e1000" {
		t.Fatalf("driver %q after probe, want e1000", d)
	}
}

// vfioDevDir lists <device>/vfio-dev: the class device names, or nil.
func (f *fixture) vfioDevDir(t *testing.T, addr string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(f.tree.Root, pci.BusDevicesDir, addr, "vfio-dev"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// TestDeviceCDevOption: Linux 6.6+ (DeviceCDev) against 6.1 to 6.5. Both
// create the class device vfio-dev/vfioN; only 6.6+ gives it a dev
// attribute and /dev/vfio/devices/vfioN.
func TestDeviceCDevOption(t *testing.T) {
	tests := []struct {
		name     string
		opts     pcitest.KernelOptions
		files    []string // of vfio-dev/vfio1
		uevent   string
		cdev     string // what vfio.Binder.DeviceCDev says
		devNodes bool
	}{
		{name: "6.6 with VFIO_DEVICE_CDEV", opts: pcitest.KernelOptions{DeviceCDev: true},
			files:  []string{"dev", "device", "power", "uevent"},
			uevent: "MAJOR=237\nMINOR=1\nDEVNAME=vfio/devices/vfio1\n", cdev: "vfio1", devNodes: true},
		{name: "6.1", opts: pcitest.KernelOptions{},
			files: []string{"device", "power", "uevent"}, uevent: "", cdev: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixtureWith(t, tt.opts)
			b := vfio.NewBinder(f.fs, f.dev, vfio.Options{Writer: f.k, Timeout: time.Second, PollInterval: time.Millisecond})
			eps := []pci.Address{mustAddr(t, nicA), mustAddr(t, nicB)}
			originals, err := b.Snapshot(eps)
			if err != nil {
				t.Fatal(err)
			}
			if err := b.Bind(t.Context(), 3, originals, "vfio-pci"); err != nil {
				t.Fatalf("Bind: %v", err)
			}
			if _, _, ok := charDev(t, filepath.Join(f.dev, "vfio", "3")); !ok {
				t.Error("/dev/vfio/3 missing after Bind")
			}
			// vfio0 is the function bound at start.
			for addr, name := range map[string]string{onVFIO: "vfio0", nicA: "vfio1", nicB: "vfio2"} {
				if got := f.vfioDevDir(t, addr); !slices.Equal(got, []string{name}) {
					t.Errorf("vfio-dev of %s: %v, want [%s]", addr, got, name)
				}
			}
			dir := filepath.Join(f.tree.Root, pci.BusDevicesDir, nicA, "vfio-dev", "vfio1")
			entries, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			var files []string
			for _, e := range entries {
				files = append(files, e.Name())
			}
			if diff := cmp.Diff(tt.files, files); diff != "" {
				t.Errorf("vfio-dev/vfio1 (-want +got):\n%s", diff)
			}
			if uevent, err := os.ReadFile(filepath.Join(dir, "uevent")); err != nil || string(uevent) != tt.uevent {
				t.Errorf("uevent %q (%v), want %q", uevent, err, tt.uevent)
			}
			pciDev, err := filepath.EvalSymlinks(f.fs.DevicePath(mustAddr(t, nicA)))
			if err != nil {
				t.Fatal(err)
			}
			if dev, err := filepath.EvalSymlinks(filepath.Join(dir, "device")); err != nil || dev != pciDev {
				t.Errorf("vfio-dev/vfio1/device -> %q (%v), want %s", dev, err, pciDev)
			}
			if got, err := b.DeviceCDev(eps[0]); err != nil || got != tt.cdev {
				t.Errorf("DeviceCDev(%s) = %q, %v; want %q", nicA, got, err, tt.cdev)
			}
			_, _, ok := charDev(t, filepath.Join(f.dev, "vfio", "devices", "vfio1"))
			if ok != tt.devNodes {
				t.Errorf("/dev/vfio/devices/vfio1 exists=%v, want %v", ok, tt.devNodes)
			}
			if _, err := os.Stat(filepath.Join(f.dev, "vfio", "devices")); errors.Is(err, os.ErrNotExist) == tt.devNodes {
				t.Errorf("/dev/vfio/devices: %v, want it to exist=%v", err, tt.devNodes)
			}

			// Numbers come back: the lowest free one is taken.
			mustWrite(t, f, f.driverFile("vfio-pci", "unbind"), nicA)
			if got := f.vfioDevDir(t, nicA); got != nil {
				t.Errorf("vfio-dev of %s after unbind: %v", nicA, got)
			}
			if _, _, ok := charDev(t, filepath.Join(f.dev, "vfio", "devices", "vfio1")); ok {
				t.Error("/dev/vfio/devices/vfio1 left after unbind")
			}
			mustWrite(t, f, f.probeFile(), nicA)
			if got := f.vfioDevDir(t, nicA); !slices.Equal(got, []string{"vfio1"}) {
				t.Errorf("vfio-dev of %s after rebinding: %v, want [vfio1]", nicA, got)
			}
			if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
				t.Fatalf("Restore: %v", err)
			}
			if _, _, ok := charDev(t, filepath.Join(f.dev, "vfio", "3")); ok {
				t.Error("/dev/vfio/3 left after Restore")
			}
		})
	}
}

func mustAddr(t *testing.T, s string) pci.Address {
	t.Helper()
	a, err := pci.ParseAddress(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestGroupOwned follows the kernel: checks of test/vm on Linux 6.1, with
// group 3 (a bridge without driver, nicA and nicB) in the role of the
// multifunction group there.
func TestGroupOwned(t *testing.T) {
	f := newFixture(t)
	if err := f.k.SetGroupOwned(3, true); !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("owning a group without node: %v, want ENOENT", err)
	}
	mustWrite(t, f, f.overrideFile(nicA), "vfio-pci")
	mustWrite(t, f, f.driverFile("e1000", "unbind"), nicA)
	mustWrite(t, f, f.probeFile(), nicA)
	if err := f.k.SetGroupOwned(3, true); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("owning a group with %s on e1000: %v, want EPERM", nicB, err)
	}
	if f.k.GroupOwned(3) {
		t.Fatal("group owned after a failed SetGroupOwned")
	}
	mustWrite(t, f, f.driverFile("e1000", "unbind"), nicB)
	if err := f.k.SetGroupOwned(3, true); err != nil {
		t.Fatalf("owning a viable group: %v", err)
	}
	if !f.k.GroupOwned(3) {
		t.Fatal("GroupOwned false after SetGroupOwned")
	}
	if err := f.k.SetGroupOwned(3, true); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("owning an owned group: %v, want EBUSY", err)
	}

	// Host drivers cannot bind; nothing changes.
	before := snapshotTree(t, f.tree.Root)
	if err := f.write(t, f.probeFile(), nicB); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("drivers_probe while owned: %v, want EINVAL", err)
	}
	if err := f.write(t, f.driverFile("e1000", "bind"), nicB); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("e1000/bind while owned: %v, want EBUSY", err)
	}
	if diff := cmp.Diff(before, snapshotTree(t, f.tree.Root)); diff != "" {
		t.Errorf("failed binds changed the tree (-before +after):\n%s", diff)
	}
	// Other groups are not affected.
	mustWrite(t, f, f.driverFile("e1000e", "unbind"), nicC)
	mustWrite(t, f, f.probeFile(), nicC)
	if d := f.driver(t, nicC); d != "e1000e" {
		t.Errorf("%s in another group: driver %q after probe, want e1000e", nicC, d)
	}
	// Drivers that manage DMA themselves still bind.
	mustWrite(t, f, f.overrideFile(nicB), "vfio-pci")
	mustWrite(t, f, f.probeFile(), nicB)
	if d := f.driver(t, nicB); d != "vfio-pci" {
		t.Errorf("probe with override vfio-pci while owned: driver %q", d)
	}
	mustWrite(t, f, f.driverFile("vfio-pci", "unbind"), nicB)
	mustWrite(t, f, f.driverFile("vfio-pci", "bind"), nicB)
	if d := f.driver(t, nicB); d != "vfio-pci" {
		t.Errorf("vfio-pci/bind while owned: driver %q", d)
	}
	mustWrite(t, f, f.driverFile("vfio-pci", "unbind"), nicB)
	mustWrite(t, f, f.overrideFile(nicB), "\n")
	if err := f.tree.AddDriver("pcieport"); err != nil {
		t.Fatal(err)
	}
	f.k.SetNative(bridge, "pcieport")
	mustWrite(t, f, f.probeFile(), bridge)
	if d := f.driver(t, bridge); d != "pcieport" {
		t.Errorf("bridge: driver %q after probe while owned, want pcieport", d)
	}
	mustWrite(t, f, f.driverFile("pcieport", "unbind"), bridge)

	// Dropping ownership lets the host driver bind again.
	if err := f.k.SetGroupOwned(3, false); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, f, f.probeFile(), nicB)
	if d := f.driver(t, nicB); d != "e1000" {
		t.Fatalf("driver %q after probe of a released group, want e1000", d)
	}

	// The kernel drops ownership when the last member leaves VFIO and the
	// node goes, even while user space still holds its fds.
	mustWrite(t, f, f.driverFile("e1000", "unbind"), nicB)
	if err := f.k.SetGroupOwned(3, true); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, f, f.driverFile("vfio-pci", "unbind"), nicA)
	if _, _, ok := charDev(t, filepath.Join(f.dev, "vfio", "3")); ok {
		t.Error("/dev/vfio/3 left after the last member left vfio-pci")
	}
	if f.k.GroupOwned(3) {
		t.Error("group still owned after its node went")
	}
	mustWrite(t, f, f.probeFile(), nicB)
	if d := f.driver(t, nicB); d != "e1000" {
		t.Errorf("driver %q after probe, want e1000", d)
	}
}

// TestRestoreWhileGroupOwned shows what vfio.Binder.Restore returns when a
// VM still holds the group: the probe for the host driver fails with EINVAL
// and the function is left without driver. The last member to leave
// vfio-pci takes the node, and with it the ownership, so it gets its driver
// back. A later Restore finishes the job.
func TestRestoreWhileGroupOwned(t *testing.T) {
	f := newFixture(t)
	b := vfio.NewBinder(f.fs, f.dev, vfio.Options{Writer: f.k, Timeout: time.Second, PollInterval: time.Millisecond})
	originals, err := b.Snapshot([]pci.Address{mustAddr(t, nicA), mustAddr(t, nicB)})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Bind(t.Context(), 3, originals, "vfio-pci"); err != nil {
		t.Fatalf("Bind: %v", err)
	}
	if err := f.k.SetGroupOwned(3, true); err != nil {
		t.Fatal(err)
	}

	err = b.Restore(t.Context(), originals, "vfio-pci")
	var se *vfio.StepError
	if !errors.As(err, &se) || se.Address != nicA || se.Step != vfio.StepProbe || !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("Restore: %v; want a StepError for %s, step %q, wrapping EINVAL", err, nicA, vfio.StepProbe)
	}
	if want := nicA + ": probe: write "; !strings.HasPrefix(err.Error(), want) || strings.Contains(err.Error(), nicB) {
		t.Errorf("Restore error %q: want it to start with %q and not to name %s", err, want, nicB)
	}
	got := []string{f.driver(t, nicA), f.driver(t, nicB)}
	if diff := cmp.Diff([]string{"", "e1000"}, got); diff != "" {
		t.Errorf("drivers of %s and %s (-want +got):\n%s", nicA, nicB, diff)
	}
	// Restore set the override to the original driver before the probe;
	// the probe failed, so it was not put back yet.
	if ov, err := pci.ReadDriverOverride(f.overrideFile(nicA)); err != nil || ov != "e1000" {
		t.Errorf("driver_override of %s: %q %v, want e1000", nicA, ov, err)
	}
	if f.k.GroupOwned(3) {
		t.Error("group still owned after the last member left vfio-pci")
	}
	if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
		t.Fatalf("second Restore: %v", err)
	}
	if d := f.driver(t, nicA); d != "e1000" {
		t.Errorf("%s: driver %q after the second Restore, want e1000", nicA, d)
	}
	if ov, err := pci.ReadDriverOverride(f.overrideFile(nicA)); err != nil || ov != "" {
		t.Errorf("driver_override of %s: %q %v after the second Restore, want cleared", nicA, ov, err)
	}
}

// SR-IOV as Linux does it: vfio-pci refuses a PF with VFs enabled while
// drivers_probe still succeeds, a PF driver's unbind removes the VFs, and a
// VF of a PF with sriov_drivers_autoprobe 0 is probed only with an
// override.
func TestSRIOV(t *testing.T) {
	const (
		pf  = "0000:05:00.0"
		vf0 = "0000:05:10.0"
		vf1 = "0000:05:10.2"
	)
	setup := func(t *testing.T, pfDriver string) *fixture {
		t.Helper()
		dir := t.TempDir()
		tree, err := pcitest.New(filepath.Join(dir, "sys"))
		if err != nil {
			t.Fatal(err)
		}
		if err := tree.Add(
			pcitest.Function{Address: pf, Vendor: 0x8086, Device: 0x10fb, Class: 0x020000, Driver: pfDriver, IOMMUGroup: 9, SRIOVTotalVFs: 2},
			pcitest.Function{Address: vf0, Vendor: 0x8086, Device: 0x10ed, Class: 0x020000, Driver: "ixgbevf", IOMMUGroup: 10, PhysFn: pf},
			pcitest.Function{Address: vf1, Vendor: 0x8086, Device: 0x10ed, Class: 0x020000, Driver: "ixgbevf", IOMMUGroup: 11, PhysFn: pf},
		); err != nil {
			t.Fatal(err)
		}
		for _, d := range []string{"vfio-pci", "ixgbe"} {
			if err := tree.AddDriver(d); err != nil {
				t.Fatal(err)
			}
		}
		fs, err := pci.NewFS(tree.Root)
		if err != nil {
			t.Fatal(err)
		}
		k, err := pcitest.NewKernel(tree.Root, filepath.Join(dir, "dev"))
		if err != nil {
			t.Fatal(err)
		}
		return &fixture{tree: tree, fs: fs, dev: filepath.Join(dir, "dev"), k: k}
	}

	t.Run("vfio-pci refuses a PF with VFs", func(t *testing.T) {
		f := setup(t, "")
		mustWrite(t, f, f.overrideFile(pf), "vfio-pci")
		mustWrite(t, f, f.probeFile(), pf)
		if d := f.driver(t, pf); d != "" {
			t.Fatalf("PF with VFs on %q after drivers_probe, want it refused", d)
		}
		if log := strings.Join(f.k.KernelLog(), "\n"); !strings.Contains(log, "vfio-pci "+pf+": Cannot bind to PF with SR-IOV enabled") {
			t.Errorf("kernel log %q does not say why", log)
		}
		if err := f.write(t, f.driverFile("vfio-pci", "bind"), pf); !errors.Is(err, syscall.EBUSY) {
			t.Errorf("bind of a PF with VFs: %v, want EBUSY", err)
		}
		if _, err := os.Stat(filepath.Join(f.dev, "vfio", "9")); err == nil {
			t.Error("the refused PF got a group node")
		}
	})

	t.Run("PF driver unbind removes the VFs", func(t *testing.T) {
		f := setup(t, "ixgbe")
		mustWrite(t, f, f.driverFile("ixgbe", "unbind"), pf)
		for _, vf := range []string{vf0, vf1} {
			if _, err := os.Lstat(filepath.Join(f.tree.Root, pci.BusDevicesDir, vf)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("VF %s still on the bus: %v", vf, err)
			}
			if entries, _ := filepath.Glob(filepath.Join(f.tree.Root, pci.BusDriversDir, "ixgbevf", vf)); len(entries) > 0 {
				t.Errorf("ixgbevf still links %s", vf)
			}
		}
		if links, _ := filepath.Glob(f.fs.DevicePath(mustAddr(t, pf), "virtfn*")); len(links) > 0 {
			t.Errorf("PF keeps %v", links)
		}
		d, err := f.fs.Device(mustAddr(t, pf))
		if err != nil || d.SRIOVNumVFs != 0 {
			t.Fatalf("PF after unbind: %+v, %v; want sriov_numvfs 0", d, err)
		}
		// Without VFs vfio-pci takes it.
		mustWrite(t, f, f.overrideFile(pf), "vfio-pci")
		mustWrite(t, f, f.probeFile(), pf)
		if d := f.driver(t, pf); d != "vfio-pci" {
			t.Errorf("PF without VFs on %q, want vfio-pci", d)
		}
	})

	t.Run("sriov_drivers_autoprobe", func(t *testing.T) {
		f := setup(t, "ixgbe")
		autoprobe := f.fs.DevicePath(mustAddr(t, pf), "sriov_drivers_autoprobe")
		if data, err := os.ReadFile(autoprobe); err != nil || string(data) != "1\n" {
			t.Fatalf("sriov_drivers_autoprobe = %q, %v; want the kernel's default 1", data, err)
		}
		mustWrite(t, f, f.driverFile("ixgbevf", "unbind"), vf0)
		if err := os.WriteFile(autoprobe, []byte("0\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		mustWrite(t, f, f.probeFile(), vf0)
		if d := f.driver(t, vf0); d != "" {
			t.Errorf("VF probed to %q with autoprobe 0 and no override", d)
		}
		if err := f.write(t, f.driverFile("ixgbevf", "bind"), vf0); !errors.Is(err, syscall.ENODEV) {
			t.Errorf("bind with autoprobe 0 and no override: %v, want ENODEV", err)
		}
		mustWrite(t, f, f.overrideFile(vf0), "ixgbevf")
		mustWrite(t, f, f.probeFile(), vf0)
		if d := f.driver(t, vf0); d != "ixgbevf" {
			t.Errorf("VF with an override on %q, want ixgbevf", d)
		}
		mustWrite(t, f, f.driverFile("ixgbevf", "unbind"), vf0)
		mustWrite(t, f, f.overrideFile(vf0), "\n")
		if err := os.WriteFile(autoprobe, []byte("1\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		mustWrite(t, f, f.probeFile(), vf0)
		if d := f.driver(t, vf0); d != "ixgbevf" {
			t.Errorf("VF with autoprobe 1 on %q, want ixgbevf", d)
		}
	})
}
