package vfio_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// The test machine; groups by number:
//
//	0  0000:00:00.0 host bridge, no driver
//	1  0000:00:01.0 PCIe root port (pcieport)
//	2  0000:01:00.0 GPU 10de:2204 (nvidia) + 0000:01:00.1 HDMI audio (snd_hda_intel)
//	3  0000:00:1c.0 PCIe root port (pcieport)
//	4  0000:02:00.0 NIC alone (e1000e)
//	5  0000:00:1e.0 conventional PCI bridge, no driver, + 0000:03:01.0 and 0000:03:02.0 (e1000)
//	6  0000:00:02.0 NIC without a driver
//	7  0000:00:03.0 NIC already on vfio-pci
//	8  0000:00:04.0 on vfio-pci + 0000:00:04.1 on e1000e
//	9  0000:05:00.0 SR-IOV PF (ixgbe) with sriov_drivers_autoprobe=0
//	10 0000:05:10.0 its VF (ixgbevf)
//	11 0000:05:10.2 its VF (ixgbevf)
//	12 0000:00:1f.0 ISA bridge (lpc_ich) + 0000:00:1f.4 SMBus (i801_smbus)
const (
	hostBridge = "0000:00:00.0"
	gpu        = "0000:01:00.0"
	gpuAudio   = "0000:01:00.1"
	nic        = "0000:02:00.0"
	pciBridge  = "0000:00:1e.0"
	oldNIC1    = "0000:03:01.0"
	oldNIC2    = "0000:03:02.0"
	bareNIC    = "0000:00:02.0"
	vfioNIC    = "0000:00:03.0"
	mixedVFIO  = "0000:00:04.0"
	mixedHost  = "0000:00:04.1"
	pf         = "0000:05:00.0"
	vf1        = "0000:05:10.0"
	vf2        = "0000:05:10.2"
	isaBridge  = "0000:00:1f.0"
	smbus      = "0000:00:1f.4"
)

type machine struct {
	tree   *pcitest.Tree
	fs     *pci.FS
	dev    string
	kernel *pcitest.Kernel
}

func newMachine(t *testing.T) *machine {
	t.Helper()
	dir := t.TempDir()
	tree, err := pcitest.New(filepath.Join(dir, "sys"))
	if err != nil {
		t.Fatal(err)
	}
	const (
		intel  = 0x8086
		nvidia = 0x10de
		bridge = 0x060400
		netCls = 0x020000
	)
	err = tree.Add(
		pcitest.Function{Address: hostBridge, Vendor: intel, Device: 0x3e30, Class: 0x060000, IOMMUGroup: 0},
		pcitest.Function{Address: "0000:00:01.0", Vendor: intel, Device: 0x1901, Class: bridge, Driver: "pcieport", IOMMUGroup: 1},
		pcitest.Function{Address: gpu, Parent: "0000:00:01.0", Vendor: nvidia, Device: 0x2204, Class: 0x030000, Driver: "nvidia", IOMMUGroup: 2},
		pcitest.Function{Address: gpuAudio, Parent: "0000:00:01.0", Vendor: nvidia, Device: 0x1aef, Class: 0x040300, Driver: "snd_hda_intel", IOMMUGroup: 2},
		pcitest.Function{Address: "0000:00:1c.0", Vendor: intel, Device: 0xa33c, Class: bridge, Driver: "pcieport", IOMMUGroup: 3},
		pcitest.Function{Address: nic, Parent: "0000:00:1c.0", Vendor: intel, Device: 0x10d3, Class: netCls, Driver: "e1000e", IOMMUGroup: 4},
		pcitest.Function{Address: pciBridge, Vendor: intel, Device: 0x244e, Class: 0x060401, IOMMUGroup: 5},
		pcitest.Function{Address: oldNIC1, Parent: pciBridge, Vendor: intel, Device: 0x100e, Class: netCls, Driver: "e1000", IOMMUGroup: 5},
		pcitest.Function{Address: oldNIC2, Parent: pciBridge, Vendor: intel, Device: 0x100e, Class: netCls, Driver: "e1000", IOMMUGroup: 5},
		pcitest.Function{Address: bareNIC, Vendor: 0x1af4, Device: 0x1000, Class: netCls, IOMMUGroup: 6},
		pcitest.Function{Address: vfioNIC, Vendor: intel, Device: 0x10d3, Class: netCls, Driver: "vfio-pci", IOMMUGroup: 7},
		pcitest.Function{Address: mixedVFIO, Vendor: intel, Device: 0x10d3, Class: netCls, Driver: "vfio-pci", IOMMUGroup: 8},
		pcitest.Function{Address: mixedHost, Vendor: intel, Device: 0x10d3, Class: netCls, Driver: "e1000e", IOMMUGroup: 8},
		pcitest.Function{Address: pf, Vendor: intel, Device: 0x10fb, Class: netCls, Driver: "ixgbe", IOMMUGroup: 9, SRIOVTotalVFs: 2},
		pcitest.Function{Address: vf1, Vendor: intel, Device: 0x10ed, Class: netCls, Driver: "ixgbevf", IOMMUGroup: 10, PhysFn: pf},
		pcitest.Function{Address: vf2, Vendor: intel, Device: 0x10ed, Class: netCls, Driver: "ixgbevf", IOMMUGroup: 11, PhysFn: pf},
		pcitest.Function{Address: isaBridge, Vendor: intel, Device: 0xa305, Class: 0x060100, Driver: "lpc_ich", IOMMUGroup: 12},
		pcitest.Function{Address: smbus, Vendor: intel, Device: 0xa323, Class: 0x0c0500, Driver: "i801_smbus", IOMMUGroup: 12},
	)
	if err != nil {
		t.Fatal(err)
	}
	if err := tree.AddDriver("mlx5_vfio_pci"); err != nil {
		t.Fatal(err)
	}
	fs, err := pci.NewFS(tree.Root)
	if err != nil {
		t.Fatal(err)
	}
	dev := filepath.Join(dir, "dev")
	k, err := pcitest.NewKernel(tree.Root, dev)
	if err != nil {
		t.Fatal(err)
	}
	k.SetNative(vfioNIC, "e1000e")
	k.SetNative(mixedVFIO, "e1000e")
	// The PF has sriov_drivers_autoprobe=0: drivers_probe binds its VFs
	// only to the driver their override names.
	if err := os.WriteFile(fs.DevicePath(addrs(t, pf)[0], "sriov_drivers_autoprobe"), []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return &machine{tree: tree, fs: fs, dev: dev, kernel: k}
}

func (m *machine) binder(w vfio.Writer, timeout time.Duration) *vfio.Binder {
	return m.binderWith(w, vfio.Options{Timeout: timeout})
}

// binderWith is binder with opts, whose Writer (m's kernel when w is nil)
// and PollInterval it sets.
func (m *machine) binderWith(w vfio.Writer, opts vfio.Options) *vfio.Binder {
	if w == nil {
		w = m.kernel
	}
	opts.Writer, opts.PollInterval = w, time.Millisecond
	return vfio.NewBinder(m.fs, m.dev, opts)
}

// refusingFirstProbe writes to m's kernel, but drops the first probe: the
// kernel probed and the driver said no, the write succeeds and the
// function stays driverless.
func (m *machine) refusingFirstProbe() *hookWriter {
	refused := false
	return &hookWriter{k: m.kernel, before: func(path string, _ []byte) bool {
		if isProbe(path) && !refused {
			refused = true
			return false
		}
		return true
	}}
}

// state returns driver and driver_override of each function, as Snapshot
// does but read independently.
func (m *machine) state(t *testing.T, addrs ...string) []vfio.Original {
	t.Helper()
	var out []vfio.Original
	for _, s := range addrs {
		a, err := pci.ParseAddress(s)
		if err != nil {
			t.Fatal(err)
		}
		d, err := m.fs.Device(a)
		if err != nil {
			t.Fatal(err)
		}
		ov, err := pci.ReadDriverOverride(m.fs.DevicePath(a, "driver_override"))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, vfio.Original{Address: s, Driver: d.Driver, DriverOverride: ov})
	}
	return out
}

func (m *machine) groupNode(group int) string {
	return filepath.Join(m.dev, "vfio", strconv.Itoa(group))
}

func isCharDevice(t *testing.T, path string) bool {
	t.Helper()
	st, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeCharDevice == 0 {
		t.Fatalf("%s exists but is %v, not a character device", path, st.Mode())
	}
	return true
}

func addrs(t *testing.T, ss ...string) []pci.Address {
	t.Helper()
	var out []pci.Address
	for _, s := range ss {
		a, err := pci.ParseAddress(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}

func TestBindRestore(t *testing.T) {
	tests := []struct {
		name      string
		group     int
		target    string
		endpoints []string
		untouched []string // other group members that must not change
		// nodeBefore: /dev/vfio/N exists before Bind (and after Restore).
		nodeBefore   bool
		bindWrites   []string
		restoreState []vfio.Original
		restoreWrite []string
	}{
		{
			name:      "NIC alone in its group",
			group:     4,
			target:    "vfio-pci",
			endpoints: []string{nic},
			bindWrites: []string{
				"driver_override 0000:02:00.0 vfio-pci",
				"unbind 0000:02:00.0 e1000e",
				"probe 0000:02:00.0",
			},
			restoreWrite: []string{
				"driver_override 0000:02:00.0 e1000e",
				"unbind 0000:02:00.0 vfio-pci",
				"probe 0000:02:00.0",
				"driver_override 0000:02:00.0 (null)",
			},
		},
		{
			name:      "vendor variant driver",
			group:     4,
			target:    "mlx5_vfio_pci",
			endpoints: []string{nic},
			bindWrites: []string{
				"driver_override 0000:02:00.0 mlx5_vfio_pci",
				"unbind 0000:02:00.0 e1000e",
				"probe 0000:02:00.0",
			},
			restoreWrite: []string{
				"driver_override 0000:02:00.0 e1000e",
				"unbind 0000:02:00.0 mlx5_vfio_pci",
				"probe 0000:02:00.0",
				"driver_override 0000:02:00.0 (null)",
			},
		},
		{
			name:      "GPU and its HDMI audio",
			group:     2,
			target:    "vfio-pci",
			endpoints: []string{gpu, gpuAudio},
			untouched: []string{"0000:00:01.0"},
			bindWrites: []string{
				"driver_override 0000:01:00.0 vfio-pci",
				"unbind 0000:01:00.0 nvidia",
				"probe 0000:01:00.0",
				"driver_override 0000:01:00.1 vfio-pci",
				"unbind 0000:01:00.1 snd_hda_intel",
				"probe 0000:01:00.1",
			},
			restoreWrite: []string{
				"driver_override 0000:01:00.0 nvidia",
				"unbind 0000:01:00.0 vfio-pci",
				"probe 0000:01:00.0",
				"driver_override 0000:01:00.0 (null)",
				"driver_override 0000:01:00.1 snd_hda_intel",
				"unbind 0000:01:00.1 vfio-pci",
				"probe 0000:01:00.1",
				"driver_override 0000:01:00.1 (null)",
			},
		},
		{
			name:      "two endpoints behind a conventional PCI bridge",
			group:     5,
			target:    "vfio-pci",
			endpoints: []string{oldNIC1, oldNIC2},
			untouched: []string{pciBridge},
			bindWrites: []string{
				"driver_override 0000:03:01.0 vfio-pci",
				"unbind 0000:03:01.0 e1000",
				"probe 0000:03:01.0",
				"driver_override 0000:03:02.0 vfio-pci",
				"unbind 0000:03:02.0 e1000",
				"probe 0000:03:02.0",
			},
			restoreWrite: []string{
				"driver_override 0000:03:01.0 e1000",
				"unbind 0000:03:01.0 vfio-pci",
				"probe 0000:03:01.0",
				"driver_override 0000:03:01.0 (null)",
				"driver_override 0000:03:02.0 e1000",
				"unbind 0000:03:02.0 vfio-pci",
				"probe 0000:03:02.0",
				"driver_override 0000:03:02.0 (null)",
			},
		},
		{
			name:      "device without a driver stays without one",
			group:     6,
			target:    "vfio-pci",
			endpoints: []string{bareNIC},
			bindWrites: []string{
				"driver_override 0000:00:02.0 vfio-pci",
				"probe 0000:00:02.0",
			},
			restoreWrite: []string{
				"driver_override 0000:00:02.0 (null)",
				"unbind 0000:00:02.0 vfio-pci",
			},
		},
		{
			name:       "device already on vfio-pci is not touched",
			group:      7,
			target:     "vfio-pci",
			endpoints:  []string{vfioNIC},
			nodeBefore: true,
		},
		{
			name:       "group with one member on vfio-pci already",
			group:      8,
			target:     "vfio-pci",
			endpoints:  []string{mixedVFIO, mixedHost},
			nodeBefore: true,
			bindWrites: []string{
				"driver_override 0000:00:04.1 vfio-pci",
				"unbind 0000:00:04.1 e1000e",
				"probe 0000:00:04.1",
			},
			restoreWrite: []string{
				"driver_override 0000:00:04.1 e1000e",
				"unbind 0000:00:04.1 vfio-pci",
				"probe 0000:00:04.1",
				"driver_override 0000:00:04.1 (null)",
			},
		},
		{
			// Without an override, drivers_probe would leave the VF
			// driverless.
			name:      "VF of a PF with sriov_drivers_autoprobe=0",
			group:     10,
			target:    "vfio-pci",
			endpoints: []string{vf1},
			bindWrites: []string{
				"driver_override 0000:05:10.0 vfio-pci",
				"unbind 0000:05:10.0 ixgbevf",
				"probe 0000:05:10.0",
			},
			restoreWrite: []string{
				"driver_override 0000:05:10.0 ixgbevf",
				"unbind 0000:05:10.0 vfio-pci",
				"probe 0000:05:10.0",
				"driver_override 0000:05:10.0 (null)",
			},
		},
		{
			// An ISA bridge on lpc_ich is no bridge to leave alone: the
			// group is usable only with it off lpc_ich.
			name:      "chipset group: ISA bridge and SMBus",
			group:     12,
			target:    "vfio-pci",
			endpoints: []string{isaBridge, smbus},
			bindWrites: []string{
				"driver_override 0000:00:1f.0 vfio-pci",
				"unbind 0000:00:1f.0 lpc_ich",
				"probe 0000:00:1f.0",
				"driver_override 0000:00:1f.4 vfio-pci",
				"unbind 0000:00:1f.4 i801_smbus",
				"probe 0000:00:1f.4",
			},
			restoreWrite: []string{
				"driver_override 0000:00:1f.0 lpc_ich",
				"unbind 0000:00:1f.0 vfio-pci",
				"probe 0000:00:1f.0",
				"driver_override 0000:00:1f.0 (null)",
				"driver_override 0000:00:1f.4 i801_smbus",
				"unbind 0000:00:1f.4 vfio-pci",
				"probe 0000:00:1f.4",
				"driver_override 0000:00:1f.4 (null)",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMachine(t)
			b := m.binder(nil, 5*time.Second)
			ctx := t.Context()

			eps, err := vfio.GroupEndpoints(m.fs, tt.group)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(addrs(t, tt.endpoints...), eps); diff != "" {
				t.Fatalf("GroupEndpoints (-want +got):\n%s", diff)
			}
			untouched := m.state(t, tt.untouched...)
			originals, err := b.Snapshot(eps)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(m.state(t, tt.endpoints...), originals); diff != "" {
				t.Fatalf("Snapshot (-want +got):\n%s", diff)
			}
			if got := isCharDevice(t, m.groupNode(tt.group)); got != tt.nodeBefore {
				t.Fatalf("/dev/vfio/%d exists before Bind: %v, want %v", tt.group, got, tt.nodeBefore)
			}

			if err := b.Bind(ctx, tt.group, originals, tt.target); err != nil {
				t.Fatalf("Bind: %v", err)
			}
			if diff := cmp.Diff(tt.bindWrites, m.kernel.Writes(), cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("Bind writes (-want +got):\n%s", diff)
			}
			for _, o := range originals {
				st := m.state(t, o.Address)[0]
				if st.Driver != tt.target {
					t.Errorf("%s: driver %q after Bind, want %s", o.Address, st.Driver, tt.target)
				}
				a, _ := pci.ParseAddress(o.Address)
				cdev, err := b.DeviceCDev(a)
				if err != nil {
					t.Fatal(err)
				}
				if !strings.HasPrefix(cdev, "vfio") || !isCharDevice(t, filepath.Join(m.dev, "vfio", "devices", cdev)) {
					t.Errorf("%s: iommufd device %q has no node", o.Address, cdev)
				}
			}
			if !isCharDevice(t, m.groupNode(tt.group)) {
				t.Errorf("/dev/vfio/%d missing after Bind", tt.group)
			}
			if diff := cmp.Diff(untouched, m.state(t, tt.untouched...)); diff != "" {
				t.Errorf("other members changed (-before +after):\n%s", diff)
			}

			// Bind again: everything is on target, nothing is written.
			n := len(m.kernel.Writes())
			if err := b.Bind(ctx, tt.group, originals, tt.target); err != nil {
				t.Fatalf("second Bind: %v", err)
			}
			if extra := m.kernel.Writes()[n:]; len(extra) > 0 {
				t.Errorf("second Bind wrote %q", extra)
			}

			n = len(m.kernel.Writes())
			if err := b.Restore(ctx, originals, tt.target); err != nil {
				t.Fatalf("Restore: %v", err)
			}
			if diff := cmp.Diff(tt.restoreWrite, m.kernel.Writes()[n:], cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("Restore writes (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(originals, m.state(t, tt.endpoints...)); diff != "" {
				t.Errorf("state after Restore (-original +now):\n%s", diff)
			}
			if got := isCharDevice(t, m.groupNode(tt.group)); got != tt.nodeBefore {
				t.Errorf("/dev/vfio/%d exists after Restore: %v, want %v", tt.group, got, tt.nodeBefore)
			}
			if diff := cmp.Diff(untouched, m.state(t, tt.untouched...)); diff != "" {
				t.Errorf("other members changed (-before +after):\n%s", diff)
			}

			// Restore again: already restored, nothing is written.
			n = len(m.kernel.Writes())
			if err := b.Restore(ctx, originals, tt.target); err != nil {
				t.Fatalf("second Restore: %v", err)
			}
			if extra := m.kernel.Writes()[n:]; len(extra) > 0 {
				t.Errorf("second Restore wrote %q", extra)
			}
		})
	}
}

func TestBindFailureRollsBack(t *testing.T) {
	tests := []struct {
		name      string
		op, addr  string
		err       error
		wantAddr  string
		wantStep  string
		wantWrite []string
	}{
		{
			name: "unbind of the second member busy",
			op:   "unbind", addr: gpuAudio, err: syscall.EBUSY,
			wantAddr: gpuAudio, wantStep: vfio.StepUnbind,
			wantWrite: []string{
				"driver_override 0000:01:00.0 vfio-pci",
				"unbind 0000:01:00.0 nvidia",
				"probe 0000:01:00.0",
				"driver_override 0000:01:00.1 vfio-pci",
				"unbind 0000:01:00.1 snd_hda_intel",
				// rollback, last changed first; the audio function is
				// still on its driver and only needs its override back
				"driver_override 0000:01:00.1 (null)",
				"driver_override 0000:01:00.0 nvidia",
				"unbind 0000:01:00.0 vfio-pci",
				"probe 0000:01:00.0",
				"driver_override 0000:01:00.0 (null)",
			},
		},
		{
			name: "driver_override of the first member refused",
			op:   "driver_override", addr: gpu, err: syscall.EINVAL,
			wantAddr: gpu, wantStep: vfio.StepSetOverride,
			wantWrite: []string{
				"driver_override 0000:01:00.0 vfio-pci",
			},
		},
		{
			name: "probe of the second member fails",
			op:   "probe", addr: gpuAudio, err: syscall.ENOMEM,
			wantAddr: gpuAudio, wantStep: vfio.StepProbe,
			wantWrite: []string{
				"driver_override 0000:01:00.0 vfio-pci",
				"unbind 0000:01:00.0 nvidia",
				"probe 0000:01:00.0",
				"driver_override 0000:01:00.1 vfio-pci",
				"unbind 0000:01:00.1 snd_hda_intel",
				"probe 0000:01:00.1",
				// rollback: the audio function is driverless
				"driver_override 0000:01:00.1 snd_hda_intel",
				"probe 0000:01:00.1",
				"driver_override 0000:01:00.1 (null)",
				"driver_override 0000:01:00.0 nvidia",
				"unbind 0000:01:00.0 vfio-pci",
				"probe 0000:01:00.0",
				"driver_override 0000:01:00.0 (null)",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMachine(t)
			b := m.binder(nil, 5*time.Second)
			originals, err := b.Snapshot(addrs(t, gpu, gpuAudio))
			if err != nil {
				t.Fatal(err)
			}
			m.kernel.FailNext(tt.op, tt.addr, tt.err)

			err = b.Bind(t.Context(), 2, originals, "vfio-pci")
			var se *vfio.StepError
			if !errors.As(err, &se) {
				t.Fatalf("Bind error %v (%T), want a *StepError", err, err)
			}
			if se.Address != tt.wantAddr || se.Step != tt.wantStep {
				t.Errorf("StepError names %s / %q, want %s / %q", se.Address, se.Step, tt.wantAddr, tt.wantStep)
			}
			if !errors.Is(err, tt.err) {
				t.Errorf("errors.Is(%v, %v) = false", err, tt.err)
			}
			if !strings.Contains(err.Error(), tt.wantAddr) || !strings.Contains(err.Error(), tt.wantStep) {
				t.Errorf("message %q does not name the device and the step", err)
			}
			if diff := cmp.Diff(tt.wantWrite, m.kernel.Writes()); diff != "" {
				t.Errorf("writes (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(originals, m.state(t, gpu, gpuAudio)); diff != "" {
				t.Errorf("state after the failed Bind (-original +now):\n%s", diff)
			}
			if isCharDevice(t, m.groupNode(2)) {
				t.Error("/dev/vfio/2 left behind")
			}
		})
	}
}

// TestBindRollbackFunctionGone: a function that disappears while Bind runs
// needs no rollback and adds no error.
func TestBindRollbackFunctionGone(t *testing.T) {
	m := newMachine(t)
	m.kernel.FailNext("unbind", gpuAudio, syscall.EBUSY)
	w := &hookWriter{k: m.kernel, before: func(path string, data []byte) bool {
		// The GPU is unplugged while Bind works on the audio function.
		if filepath.Base(path) == "unbind" && string(data) == gpuAudio {
			if err := m.hotRemove(gpu); err != nil {
				t.Error(err)
			}
		}
		return true
	}}
	b := m.binder(w, time.Second)
	originals, err := b.Snapshot(addrs(t, gpu, gpuAudio))
	if err != nil {
		t.Fatal(err)
	}
	err = b.Bind(t.Context(), 2, originals, "vfio-pci")
	var se *vfio.StepError
	if !errors.As(err, &se) || se.Address != gpuAudio || se.Step != vfio.StepUnbind || !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("Bind error %v, want EBUSY at the unbind of %s", err, gpuAudio)
	}
	if strings.Contains(err.Error(), "roll back") {
		t.Errorf("Bind error %q: the rollback of the removed GPU failed", err)
	}
	if diff := cmp.Diff(originals[1:], m.state(t, gpuAudio)); diff != "" {
		t.Errorf("state after the failed Bind (-original +now):\n%s", diff)
	}
	if isCharDevice(t, m.groupNode(2)) {
		t.Error("/dev/vfio/2 left behind")
	}
}

// TestWriteTimeout: an unbind from vfio-pci blocks in the kernel while user
// space holds the device open. The Binder gives up after its timeout; the
// write goes through once the device is closed.
func TestWriteTimeout(t *testing.T) {
	m := newMachine(t)
	originals, err := m.binder(nil, time.Second).Snapshot(addrs(t, nic))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.binder(nil, 5*time.Second).Bind(t.Context(), 4, originals, "vfio-pci"); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()
	w := &hookWriter{k: m.kernel, before: func(path string, _ []byte) bool {
		if filepath.Base(path) == "unbind" {
			<-release
		}
		return true
	}}
	start := time.Now()
	err = m.binder(w, 100*time.Millisecond).Restore(t.Context(), originals, "vfio-pci")
	var se *vfio.StepError
	if !errors.As(err, &se) || se.Address != nic || se.Step != vfio.StepUnbind || !errors.Is(err, vfio.ErrTimeout) {
		t.Fatalf("Restore error %v, want ErrTimeout at the unbind of %s", err, nic)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Restore took %s with a 100ms timeout", d)
	}
	if !strings.Contains(err.Error(), "vfio-pci/unbind") {
		t.Errorf("message %q does not name the file", err)
	}
	if d := m.state(t, nic)[0].Driver; d != "vfio-pci" {
		t.Errorf("driver %q while the unbind is blocked, want vfio-pci", d)
	}

	// User space closes the device: the blocked write goes through.
	close(release)
	released = true
	deadline := time.Now().Add(5 * time.Second)
	for m.state(t, nic)[0].Driver != "" {
		if time.Now().After(deadline) {
			t.Fatal("the blocked unbind never went through")
		}
		time.Sleep(time.Millisecond)
	}
	if err := m.binder(nil, 5*time.Second).Restore(t.Context(), originals, "vfio-pci"); err != nil {
		t.Fatalf("second Restore: %v", err)
	}
	if diff := cmp.Diff(originals, m.state(t, nic)); diff != "" {
		t.Errorf("state after Restore (-original +now):\n%s", diff)
	}
}

// TestReadTimeout: while an unbind is blocked in the kernel it holds the
// device lock, and reading driver_override (which takes that lock) blocks
// too. A FIFO stands in for such an attribute: opening it blocks until a
// writer comes.
func TestReadTimeout(t *testing.T) {
	m := newMachine(t)
	file := m.fs.DevicePath(addrs(t, nic)[0], "driver_override")
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(file, 0o644); err != nil {
		t.Fatal(err)
	}
	defer func() {
		// Let the readers left behind go.
		f, err := os.OpenFile(file, os.O_WRONLY, 0)
		if err != nil {
			t.Error(err)
			return
		}
		_, _ = f.WriteString("(null)\n")
		_ = f.Close()
	}()
	b := m.binder(nil, 100*time.Millisecond)
	start := time.Now()
	_, err := b.Snapshot(addrs(t, nic))
	var se *vfio.StepError
	if !errors.As(err, &se) || se.Address != nic || se.Step != vfio.StepReadState || !errors.Is(err, vfio.ErrTimeout) {
		t.Errorf("Snapshot error %v, want ErrTimeout at %q of %s", err, vfio.StepReadState, nic)
	}
	// The first read is still blocked: the Restore does not start another.
	err = b.Restore(t.Context(), []vfio.Original{{Address: nic, Driver: "e1000e"}, {Address: gpu, Driver: "nvidia"}}, "vfio-pci")
	if !errors.As(err, &se) || se.Address != nic || se.Step != vfio.StepReadState || !errors.Is(err, vfio.ErrBlocked) {
		t.Errorf("Restore error %v, want ErrBlocked at %q of %s", err, vfio.StepReadState, nic)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Snapshot and Restore took %s with a 100ms timeout", d)
	}
	if w := m.kernel.Writes(); len(w) > 0 {
		t.Errorf("wrote %q", w)
	}
}

func TestBindRefusesBeforeWriting(t *testing.T) {
	tests := []struct {
		name    string
		group   int
		addrs   []string
		target  string
		wantIs  error
		wantMsg string
	}{
		{name: "target driver not loaded", group: 4, addrs: []string{nic}, target: "nvgrace_gpu_vfio_pci",
			wantIs: vfio.ErrDriverNotLoaded, wantMsg: "nvgrace_gpu_vfio_pci"},
		{name: "function from another group", group: 4, addrs: []string{nic, gpu}, target: "vfio-pci",
			wantMsg: "0000:01:00.0: check IOMMU group"},
		{name: "no functions", group: 4, target: "vfio-pci", wantMsg: "no functions"},
		// The kernel would refuse user space the group: a member left
		// out is on a driver that does not manage DMA itself.
		{name: "SMBus without the ISA bridge on lpc_ich", group: 12, addrs: []string{smbus}, target: "vfio-pci",
			wantMsg: "0000:00:1f.0: check IOMMU group: not among the functions to bind, but bound to lpc_ich"},
		{name: "GPU without its audio function", group: 2, addrs: []string{gpu}, target: "vfio-pci",
			wantMsg: "0000:01:00.1: check IOMMU group: not among the functions to bind, but bound to snd_hda_intel"},
		{name: "one NIC behind the PCI bridge", group: 5, addrs: []string{oldNIC2}, target: "vfio-pci",
			wantMsg: "0000:03:01.0: check IOMMU group: not among the functions to bind, but bound to e1000"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMachine(t)
			b := m.binder(nil, time.Second)
			originals, err := b.Snapshot(addrs(t, tt.addrs...))
			if err != nil {
				t.Fatal(err)
			}
			err = b.Bind(t.Context(), tt.group, originals, tt.target)
			var se *vfio.StepError
			if !errors.As(err, &se) {
				t.Fatalf("Bind error %v, want a *StepError", err)
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("errors.Is(%v, %v) = false", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %q does not contain %q", err, tt.wantMsg)
			}
			if w := m.kernel.Writes(); len(w) > 0 {
				t.Errorf("wrote %q", w)
			}
		})
	}
}

// TestBindOtherMembers: members that Bind leaves alone are fine when they
// are driverless or on a driver that manages DMA itself, whatever their
// class; GroupEndpoints leaves out only host and PCI-to-PCI bridges that
// are driverless or on pcieport or pci-stub.
func TestBindOtherMembers(t *testing.T) {
	tests := []struct {
		name   string
		class  uint32
		driver string
		// endpoint: GroupEndpoints lists the other member.
		endpoint bool
		// bindAlone: Bind of the NIC alone passes the group check.
		bindAlone bool
	}{
		{name: "host bridge without driver", class: 0x060000, bindAlone: true},
		{name: "host bridge on pci-stub", class: 0x060000, driver: "pci-stub", bindAlone: true},
		{name: "root port on pcieport", class: 0x060400, driver: "pcieport", bindAlone: true},
		{name: "subtractive decode PCI bridge without driver", class: 0x060401, bindAlone: true},
		{name: "PCI bridge on vfio-pci", class: 0x060400, driver: "vfio-pci", endpoint: true, bindAlone: true},
		{name: "PCI bridge on shpchp", class: 0x060400, driver: "shpchp", endpoint: true},
		{name: "ISA bridge on lpc_ich", class: 0x060100, driver: "lpc_ich", endpoint: true},
		{name: "ISA bridge without driver", class: 0x060100, endpoint: true, bindAlone: true},
		{name: "ISA bridge on pci-stub", class: 0x060100, driver: "pci-stub", endpoint: true, bindAlone: true},
		{name: "CardBus bridge on yenta_cardbus", class: 0x060700, driver: "yenta_cardbus", endpoint: true},
		{name: "SMBus on i801_smbus", class: 0x0c0500, driver: "i801_smbus", endpoint: true},
		{name: "NIC on a variant driver", class: 0x020000, driver: "mlx5_vfio_pci", endpoint: true, bindAlone: true},
	}
	dir := t.TempDir()
	tree, err := pcitest.New(filepath.Join(dir, "sys"))
	if err != nil {
		t.Fatal(err)
	}
	if err := tree.AddDriver("vfio-pci"); err != nil {
		t.Fatal(err)
	}
	other := func(i int) string { return fmt.Sprintf("0000:00:%02x.0", i+1) }
	nicOf := func(i int) string { return fmt.Sprintf("0000:00:%02x.1", i+1) }
	for i, tt := range tests {
		err := tree.Add(
			pcitest.Function{Address: other(i), Vendor: 0x8086, Device: 0x1234, Class: tt.class, Driver: tt.driver, IOMMUGroup: i},
			pcitest.Function{Address: nicOf(i), Vendor: 0x8086, Device: 0x10d3, Class: 0x020000, Driver: "e1000e", IOMMUGroup: i},
		)
		if err != nil {
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
	b := vfio.NewBinder(fs, filepath.Join(dir, "dev"), vfio.Options{Writer: k, Timeout: time.Second, PollInterval: time.Millisecond})
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want := addrs(t, nicOf(i))
			if tt.endpoint {
				want = addrs(t, other(i), nicOf(i))
			}
			got, err := vfio.GroupEndpoints(fs, i)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("GroupEndpoints (-want +got):\n%s", diff)
			}

			originals, err := b.Snapshot(addrs(t, nicOf(i)))
			if err != nil {
				t.Fatal(err)
			}
			n := len(k.Writes())
			err = b.Bind(t.Context(), i, originals, "vfio-pci")
			if tt.bindAlone {
				if err != nil {
					t.Fatalf("Bind of the NIC alone: %v", err)
				}
				if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
					t.Fatalf("Restore: %v", err)
				}
				return
			}
			var se *vfio.StepError
			if !errors.As(err, &se) || se.Address != other(i) || se.Step != vfio.StepCheckGroup || !strings.Contains(err.Error(), tt.driver) {
				t.Errorf("Bind of the NIC alone: %v; want a StepError at %q naming %s and %s", err, vfio.StepCheckGroup, other(i), tt.driver)
			}
			if w := k.Writes()[n:]; len(w) > 0 {
				t.Errorf("wrote %q", w)
			}
		})
	}
}

// hookWriter passes writes to the kernel and lets a test intervene.
type hookWriter struct {
	k *pcitest.Kernel
	// before runs before a write; returning false drops the write.
	before func(path string, data []byte) bool
	// after runs after a write that was passed on.
	after func(path string, data []byte)
}

func (w *hookWriter) WriteFile(path string, data []byte) error {
	if w.before != nil && !w.before(path, data) {
		return nil
	}
	if err := w.k.WriteFile(path, data); err != nil {
		return err
	}
	if w.after != nil {
		w.after(path, data)
	}
	return nil
}

func isProbe(path string) bool { return filepath.Base(path) == "drivers_probe" }

func TestBindWaits(t *testing.T) {
	t.Run("context cancelled while waiting for the driver", func(t *testing.T) {
		m := newMachine(t)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		dropped := false
		w := &hookWriter{k: m.kernel, before: func(path string, _ []byte) bool {
			if isProbe(path) && !dropped {
				// The probe never happens and the caller gives up.
				dropped = true
				cancel()
				return false
			}
			return true
		}}
		b := m.binder(w, time.Minute)
		originals, err := b.Snapshot(addrs(t, nic))
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		err = b.Bind(ctx, 4, originals, "vfio-pci")
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Bind error %v, want context.Canceled", err)
		}
		var se *vfio.StepError
		if !errors.As(err, &se) || se.Step != vfio.StepWaitDriver || se.Address != nic {
			t.Errorf("error %v, want step %q for %s", err, vfio.StepWaitDriver, nic)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("Bind took %s: it did not stop at cancellation", d)
		}
		// The rollback ran although ctx was cancelled.
		if diff := cmp.Diff(originals, m.state(t, nic)); diff != "" {
			t.Errorf("state after the failed Bind (-original +now):\n%s", diff)
		}
	})

	t.Run("probe refused", func(t *testing.T) {
		m := newMachine(t)
		// Far longer than the test may take: a refused probe must not
		// wait for the timeout.
		b := m.binder(m.refusingFirstProbe(), time.Hour)
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		originals, err := b.Snapshot(addrs(t, nic))
		if err != nil {
			t.Fatal(err)
		}
		err = b.Bind(ctx, 4, originals, "vfio-pci")
		if !errors.Is(err, vfio.ErrProbeRefused) {
			t.Fatalf("Bind error %v, want ErrProbeRefused", err)
		}
		for _, want := range []string{"0000:02:00.0: wait for driver: want vfio-pci", "has no driver after drivers_probe", "kernel log"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("message %q lacks %q", err, want)
			}
		}
		if diff := cmp.Diff(originals, m.state(t, nic)); diff != "" {
			t.Errorf("state after the failed Bind (-original +now):\n%s", diff)
		}
	})

	t.Run("probe binds another driver", func(t *testing.T) {
		m := newMachine(t)
		// Something sets the override back to the host driver behind the
		// Binder's back; the probe then binds e1000e.
		w := &hookWriter{k: m.kernel, before: func(path string, data []byte) bool {
			if isProbe(path) {
				if err := m.kernel.WriteFile(m.fs.DevicePath(addrs(t, nic)[0], "driver_override"), []byte("e1000e")); err != nil {
					t.Error(err)
				}
			}
			return true
		}}
		b := m.binder(w, time.Minute)
		originals, err := b.Snapshot(addrs(t, nic))
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		err = b.Bind(t.Context(), 4, originals, "vfio-pci")
		if err == nil || !strings.Contains(err.Error(), "0000:02:00.0: wait for driver: want vfio-pci: bound to e1000e instead") {
			t.Fatalf("Bind error %v, want bound to e1000e instead", err)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("Bind waited %s for a device bound elsewhere", d)
		}
	})

	t.Run("group node appears late", func(t *testing.T) {
		m := newMachine(t)
		node := m.groupNode(4)
		done := make(chan error, 1)
		w := &hookWriter{k: m.kernel, after: func(path string, _ []byte) {
			if !isProbe(path) {
				return
			}
			// Like a slow udev: the node shows up 50ms after the bind.
			if err := os.Rename(node, node+".late"); err != nil {
				t.Error(err)
				return
			}
			go func() {
				time.Sleep(50 * time.Millisecond)
				done <- os.Rename(node+".late", node)
			}()
		}}
		b := m.binder(w, 5*time.Second)
		originals, err := b.Snapshot(addrs(t, nic))
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Bind(t.Context(), 4, originals, "vfio-pci"); err != nil {
			t.Fatalf("Bind: %v", err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if !isCharDevice(t, node) {
			t.Error("group node missing")
		}
	})

	t.Run("group node never appears", func(t *testing.T) {
		m := newMachine(t)
		node := m.groupNode(4)
		removed := false
		w := &hookWriter{k: m.kernel, after: func(path string, _ []byte) {
			if isProbe(path) && !removed {
				removed = true
				if err := os.Remove(node); err != nil {
					t.Error(err)
				}
			}
		}}
		b := m.binder(w, 100*time.Millisecond)
		originals, err := b.Snapshot(addrs(t, nic))
		if err != nil {
			t.Fatal(err)
		}
		err = b.Bind(t.Context(), 4, originals, "vfio-pci")
		var se *vfio.StepError
		if !errors.As(err, &se) || se.Step != vfio.StepWaitGroupNode || !errors.Is(err, vfio.ErrTimeout) {
			t.Fatalf("Bind error %v, want a timeout at step %q", err, vfio.StepWaitGroupNode)
		}
		if !strings.Contains(err.Error(), node) {
			t.Errorf("message %q does not name %s", err, node)
		}
		if diff := cmp.Diff(originals, m.state(t, nic)); diff != "" {
			t.Errorf("state after the failed Bind (-original +now):\n%s", diff)
		}
	})
}

func TestRestore(t *testing.T) {
	t.Run("original override naming another driver is set after the probe", func(t *testing.T) {
		m := newMachine(t)
		b := m.binder(nil, 5*time.Second)
		// The administrator pinned the NIC to igb (not loaded) while e1000e
		// had it: drivers_probe with that override would find no driver.
		if err := m.kernel.WriteFile(m.fs.DevicePath(addrs(t, nic)[0], "driver_override"), []byte("igb\n")); err != nil {
			t.Fatal(err)
		}
		originals, err := b.Snapshot(addrs(t, nic))
		if err != nil {
			t.Fatal(err)
		}
		want := []vfio.Original{{Address: nic, Driver: "e1000e", DriverOverride: "igb"}}
		if diff := cmp.Diff(want, originals); diff != "" {
			t.Fatalf("Snapshot (-want +got):\n%s", diff)
		}
		if err := b.Bind(t.Context(), 4, originals, "vfio-pci"); err != nil {
			t.Fatal(err)
		}
		n := len(m.kernel.Writes())
		if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
			t.Fatal(err)
		}
		wantWrites := []string{
			"driver_override 0000:02:00.0 e1000e",
			"unbind 0000:02:00.0 vfio-pci",
			"probe 0000:02:00.0",
			"driver_override 0000:02:00.0 igb",
		}
		if diff := cmp.Diff(wantWrites, m.kernel.Writes()[n:]); diff != "" {
			t.Errorf("Restore writes (-want +got):\n%s", diff)
		}
		if diff := cmp.Diff(originals, m.state(t, nic)); diff != "" {
			t.Errorf("state after Restore (-original +now):\n%s", diff)
		}
	})

	t.Run("every function is tried", func(t *testing.T) {
		m := newMachine(t)
		b := m.binder(nil, 5*time.Second)
		originals, err := b.Snapshot(addrs(t, oldNIC1, oldNIC2))
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Bind(t.Context(), 5, originals, "vfio-pci"); err != nil {
			t.Fatal(err)
		}
		m.kernel.FailNext("unbind", oldNIC1, syscall.EBUSY)
		err = b.Restore(t.Context(), originals, "vfio-pci")
		var se *vfio.StepError
		if !errors.As(err, &se) || se.Address != oldNIC1 || se.Step != vfio.StepUnbind || !errors.Is(err, syscall.EBUSY) {
			t.Fatalf("Restore error %v, want EBUSY at unbind of %s", err, oldNIC1)
		}
		if got := m.state(t, oldNIC2)[0].Driver; got != "e1000" {
			t.Errorf("%s: driver %q after Restore, want e1000", oldNIC2, got)
		}
		if !isCharDevice(t, m.groupNode(5)) {
			t.Error("/dev/vfio/5 gone although 0000:03:01.0 is still on vfio-pci")
		}
		// A retry finishes the job.
		if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
			t.Fatalf("second Restore: %v", err)
		}
		if diff := cmp.Diff(originals, m.state(t, oldNIC1, oldNIC2)); diff != "" {
			t.Errorf("state after Restore (-original +now):\n%s", diff)
		}
		if isCharDevice(t, m.groupNode(5)) {
			t.Error("/dev/vfio/5 left behind")
		}
	})

	t.Run("functions that were on target stay", func(t *testing.T) {
		m := newMachine(t)
		b := m.binder(nil, 5*time.Second)
		originals := []vfio.Original{{Address: vfioNIC, Driver: "vfio-pci"}}
		if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
			t.Fatal(err)
		}
		if w := m.kernel.Writes(); len(w) > 0 {
			t.Errorf("wrote %q", w)
		}
	})

	t.Run("original driver not loaded", func(t *testing.T) {
		m := newMachine(t)
		b := m.binder(nil, 5*time.Second)
		originals := []vfio.Original{{Address: vfioNIC, Driver: "igb"}}
		err := b.Restore(t.Context(), originals, "vfio-pci")
		var se *vfio.StepError
		if !errors.As(err, &se) || se.Address != vfioNIC || se.Step != vfio.StepCheckDriver || !errors.Is(err, vfio.ErrDriverNotLoaded) {
			t.Fatalf("Restore error %v, want ErrDriverNotLoaded at %q for %s", err, vfio.StepCheckDriver, vfioNIC)
		}
		if w := m.kernel.Writes(); len(w) > 0 {
			t.Errorf("wrote %q", w)
		}
		if d := m.state(t, vfioNIC)[0].Driver; d != "vfio-pci" {
			t.Errorf("driver %q, want the device left on vfio-pci", d)
		}
	})

	t.Run("leftover override on the original driver is one write", func(t *testing.T) {
		m := newMachine(t)
		b := m.binder(nil, 5*time.Second)
		originals, err := b.Snapshot(addrs(t, nic))
		if err != nil {
			t.Fatal(err)
		}
		// A Bind that stopped after its first write.
		if err := m.kernel.WriteFile(m.fs.DevicePath(addrs(t, nic)[0], "driver_override"), []byte("vfio-pci")); err != nil {
			t.Fatal(err)
		}
		n := len(m.kernel.Writes())
		if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff([]string{"driver_override 0000:02:00.0 (null)"}, m.kernel.Writes()[n:]); diff != "" {
			t.Errorf("Restore writes (-want +got):\n%s", diff)
		}
		if diff := cmp.Diff(originals, m.state(t, nic)); diff != "" {
			t.Errorf("state after Restore (-original +now):\n%s", diff)
		}
	})

	t.Run("driverless function gets its override back", func(t *testing.T) {
		m := newMachine(t)
		b := m.binder(nil, 5*time.Second)
		originals := []vfio.Original{{Address: bareNIC, DriverOverride: "virtio-pci"}}
		if err := m.kernel.WriteFile(m.fs.DevicePath(addrs(t, bareNIC)[0], "driver_override"), []byte("virtio-pci")); err != nil {
			t.Fatal(err)
		}
		if err := b.Bind(t.Context(), 6, originals, "vfio-pci"); err != nil {
			t.Fatal(err)
		}
		n := len(m.kernel.Writes())
		if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
			t.Fatal(err)
		}
		want := []string{"driver_override 0000:00:02.0 virtio-pci", "unbind 0000:00:02.0 vfio-pci"}
		if diff := cmp.Diff(want, m.kernel.Writes()[n:]); diff != "" {
			t.Errorf("Restore writes (-want +got):\n%s", diff)
		}
		if diff := cmp.Diff(originals, m.state(t, bareNIC)); diff != "" {
			t.Errorf("state after Restore (-original +now):\n%s", diff)
		}
	})

	// Without an override, drivers_probe binds the first driver that
	// matches: the wrong one here.
	for _, tt := range []struct {
		name      string
		group     int
		addr      string
		other     string // what drivers_probe picks without override
		endpoints []string
	}{
		{name: "nouveau loaded next to nvidia", group: 2, addr: gpu, other: "nouveau", endpoints: []string{gpu, gpuAudio}},
		{name: "vfio-pci new_id matches the NIC", group: 4, addr: nic, other: "vfio-pci", endpoints: []string{nic}},
	} {
		t.Run("original driver although "+tt.name, func(t *testing.T) {
			m := newMachine(t)
			if err := m.tree.AddDriver(tt.other); err != nil {
				t.Fatal(err)
			}
			m.kernel.SetNative(tt.addr, tt.other)
			b := m.binder(nil, 5*time.Second)
			originals, err := b.Snapshot(addrs(t, tt.endpoints...))
			if err != nil {
				t.Fatal(err)
			}
			if err := b.Bind(t.Context(), tt.group, originals, "vfio-pci"); err != nil {
				t.Fatal(err)
			}
			if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(originals, m.state(t, tt.endpoints...)); diff != "" {
				t.Errorf("state after Restore (-original +now):\n%s", diff)
			}
		})
	}

	t.Run("VF removed between Bind and Restore", func(t *testing.T) {
		m := newMachine(t)
		b := m.binder(nil, 5*time.Second)
		origs1, err := b.Snapshot(addrs(t, vf1))
		if err != nil {
			t.Fatal(err)
		}
		origs2, err := b.Snapshot(addrs(t, vf2))
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Bind(t.Context(), 10, origs1, "vfio-pci"); err != nil {
			t.Fatal(err)
		}
		if err := b.Bind(t.Context(), 11, origs2, "vfio-pci"); err != nil {
			t.Fatal(err)
		}
		if err := m.hotRemove(vf1); err != nil {
			t.Fatal(err)
		}
		n := len(m.kernel.Writes())
		gone, err := b.RestoreReport(t.Context(), origs1, "vfio-pci")
		if err != nil {
			t.Errorf("RestoreReport of a removed VF: %v, want no error", err)
		}
		if diff := cmp.Diff([]string{vf1}, gone); diff != "" {
			t.Errorf("gone (-want +got):\n%s", diff)
		}
		if err := b.Restore(t.Context(), origs1, "vfio-pci"); err != nil {
			t.Errorf("Restore of a removed VF: %v, want no error", err)
		}
		if w := m.kernel.Writes()[n:]; len(w) > 0 {
			t.Errorf("wrote %q for a removed VF", w)
		}
		// The other VF is given back as usual.
		gone, err = b.RestoreReport(t.Context(), origs2, "vfio-pci")
		if err != nil || len(gone) > 0 {
			t.Errorf("RestoreReport of the other VF: gone %q, %v; want none and no error", gone, err)
		}
		if diff := cmp.Diff(origs2, m.state(t, vf2)); diff != "" {
			t.Errorf("state after Restore (-original +now):\n%s", diff)
		}
	})

	t.Run("function removed while Restore runs", func(t *testing.T) {
		m := newMachine(t)
		originals, err := m.binder(nil, time.Second).Snapshot(addrs(t, oldNIC1, oldNIC2))
		if err != nil {
			t.Fatal(err)
		}
		if err := m.binder(nil, time.Second).Bind(t.Context(), 5, originals, "vfio-pci"); err != nil {
			t.Fatal(err)
		}
		removed := false
		w := &hookWriter{k: m.kernel, before: func(path string, data []byte) bool {
			// Unplugged just before its unbind: the write fails with
			// ENODEV.
			if filepath.Base(path) == "unbind" && string(data) == oldNIC1 && !removed {
				removed = true
				if err := m.hotRemove(oldNIC1); err != nil {
					t.Error(err)
				}
			}
			return true
		}}
		gone, err := m.binder(w, time.Second).RestoreReport(t.Context(), originals, "vfio-pci")
		if err != nil || !slices.Equal(gone, []string{oldNIC1}) {
			t.Errorf("RestoreReport: gone %q, %v; want [%s] and no error", gone, err, oldNIC1)
		}
		if !removed {
			t.Error("the function was not removed")
		}
		if diff := cmp.Diff(originals[1:], m.state(t, oldNIC2)); diff != "" {
			t.Errorf("state after Restore (-original +now):\n%s", diff)
		}
	})

	t.Run("device that does not exist", func(t *testing.T) {
		m := newMachine(t)
		b := m.binder(nil, 5*time.Second)
		originals := []vfio.Original{
			{Address: "0000:7f:00.0", Driver: "e1000e"},
			{Address: "0000:7f:00", Driver: "e1000e"},
		}
		gone, err := b.RestoreReport(t.Context(), originals, "vfio-pci")
		if diff := cmp.Diff([]string{"0000:7f:00.0"}, gone); diff != "" {
			t.Errorf("gone (-want +got):\n%s", diff)
		}
		// An address that cannot be parsed is an error, not gone.
		var se *vfio.StepError
		if !errors.As(err, &se) || se.Address != "0000:7f:00" || se.Step != vfio.StepReadState || strings.Contains(err.Error(), "0000:7f:00.0") {
			t.Errorf("RestoreReport error %v, want a read state error for 0000:7f:00 only", err)
		}
		if w := m.kernel.Writes(); len(w) > 0 {
			t.Errorf("wrote %q", w)
		}
	})
}

// hotRemove removes a function as Linux does when a VF goes (sriov_numvfs
// set to 0) or a device is unplugged: the driver lets go of it, then its
// directory and the links to it go.
func (m *machine) hotRemove(addr string) error {
	a, err := pci.ParseAddress(addr)
	if err != nil {
		return err
	}
	d, err := m.fs.Device(a)
	if err != nil {
		return err
	}
	if d.Driver != "" {
		if err := m.kernel.WriteFile(m.fs.Path(pci.BusDriversDir, d.Driver, "unbind"), []byte(addr)); err != nil {
			return err
		}
	}
	dir, err := filepath.EvalSymlinks(m.fs.DevicePath(a))
	if err != nil {
		return err
	}
	links := []string{m.fs.DevicePath(a)}
	if d.IOMMUGroup != nil {
		links = append(links, m.fs.Path(pci.IOMMUGroupDir, strconv.Itoa(*d.IOMMUGroup), "devices", addr))
	}
	if d.PhysFn != nil {
		virtfns, err := filepath.Glob(m.fs.DevicePath(*d.PhysFn, "virtfn*"))
		if err != nil {
			return err
		}
		for _, v := range virtfns {
			if target, err := filepath.EvalSymlinks(v); err == nil && target == dir {
				links = append(links, v)
			}
		}
	}
	for _, l := range links {
		if err := os.Remove(l); err != nil {
			return err
		}
	}
	return os.RemoveAll(dir)
}

func TestSnapshot(t *testing.T) {
	m := newMachine(t)
	b := m.binder(nil, time.Second)
	got, err := b.Snapshot(addrs(t, gpu, bareNIC, vfioNIC))
	if err != nil {
		t.Fatal(err)
	}
	want := []vfio.Original{
		{Address: gpu, Driver: "nvidia"},
		{Address: bareNIC},
		{Address: vfioNIC, Driver: "vfio-pci"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Snapshot (-want +got):\n%s", diff)
	}
	if _, err := b.Snapshot(addrs(t, gpu, "0000:7f:00.0")); err == nil || !strings.Contains(err.Error(), "0000:7f:00.0") {
		t.Errorf("Snapshot of a missing device: %v, want an error naming it", err)
	}
}

func TestGroupEndpoints(t *testing.T) {
	m := newMachine(t)
	tests := []struct {
		group int
		want  []pci.Address
	}{
		{0, nil},
		{1, nil},
		{2, addrs(t, gpu, gpuAudio)},
		{5, addrs(t, oldNIC1, oldNIC2)},
		{6, addrs(t, bareNIC)},
		{12, addrs(t, isaBridge, smbus)},
	}
	for _, tt := range tests {
		got, err := vfio.GroupEndpoints(m.fs, tt.group)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("group %d (-want +got):\n%s", tt.group, diff)
		}
	}
	if _, err := vfio.GroupEndpoints(m.fs, 99); err == nil {
		t.Error("GroupEndpoints of a missing group: no error")
	}
}

func TestDeviceCDev(t *testing.T) {
	m := newMachine(t)
	b := m.binder(nil, 5*time.Second)
	tests := []struct {
		addr string
		want string
	}{
		{vfioNIC, "vfio0"},   // bound at start-up, in address order
		{mixedVFIO, "vfio1"}, //
		{nic, ""},            // on e1000e
		{bareNIC, ""},        // no driver
	}
	for _, tt := range tests {
		got, err := b.DeviceCDev(addrs(t, tt.addr)[0])
		if err != nil {
			t.Fatal(err)
		}
		if got != tt.want {
			t.Errorf("DeviceCDev(%s) = %q, want %q", tt.addr, got, tt.want)
		}
	}
	if _, err := b.DeviceCDev(addrs(t, "0000:7f:00.0")[0]); err == nil {
		t.Error("DeviceCDev of a missing device: no error")
	}

	// Linux 6.1-6.5 without VFIO_DEVICE_CDEV: vfio-dev/vfioN exists, but
	// has no dev file and there is no character device to hand out.
	if err := os.Remove(m.fs.DevicePath(addrs(t, vfioNIC)[0], "vfio-dev", "vfio0", "dev")); err != nil {
		t.Fatal(err)
	}
	if got, err := b.DeviceCDev(addrs(t, vfioNIC)[0]); err != nil || got != "" {
		t.Errorf("DeviceCDev without a dev file = %q, %v; want no cdev", got, err)
	}
}

// An iommufd prepare waits for the functions' cdevs, which is all a kernel
// without CONFIG_VFIO_GROUP makes.
func TestBindForDeviceCDevs(t *testing.T) {
	for _, tc := range []struct {
		name    string
		opts    pcitest.KernelOptions
		wantErr string
	}{
		{name: "no VFIO group interface", opts: pcitest.KernelOptions{DeviceCDev: true, NoVFIOGroup: true}},
		{name: "group and cdevs", opts: pcitest.DefaultKernelOptions()},
		{name: "kernel without device cdevs", opts: pcitest.KernelOptions{}, wantErr: "the kernel has no VFIO device cdev"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMachine(t)
			m.dev = filepath.Join(t.TempDir(), "dev")
			k, err := pcitest.NewKernelWithOptions(m.tree.Root, m.dev, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			b := m.binder(k, time.Hour)
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			originals, err := b.Snapshot(addrs(t, gpu, gpuAudio))
			if err != nil {
				t.Fatal(err)
			}
			err = b.BindFor(ctx, 2, originals, "vfio-pci", vfio.WaitDeviceCDevs)
			if tc.wantErr != "" {
				var se *vfio.StepError
				if !errors.As(err, &se) || se.Step != vfio.StepWaitCDev || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("BindFor error %v, want %q at step %q", err, tc.wantErr, vfio.StepWaitCDev)
				}
				if diff := cmp.Diff(originals, m.state(t, gpu, gpuAudio)); diff != "" {
					t.Errorf("state after the failed Bind (-original +now):\n%s", diff)
				}
				return
			}
			if err != nil {
				t.Fatalf("BindFor: %v", err)
			}
			for _, a := range []string{gpu, gpuAudio} {
				cdev, err := b.DeviceCDev(addrs(t, a)[0])
				if err != nil || cdev == "" || !isCharDevice(t, filepath.Join(m.dev, "vfio", "devices", cdev)) {
					t.Errorf("%s: cdev %q, %v after BindFor", a, cdev, err)
				}
			}
			if tc.opts.NoVFIOGroup && isCharDevice(t, m.groupNode(2)) {
				t.Error("the emulator made a group node without CONFIG_VFIO_GROUP")
			}
		})
	}
}

func TestOSWriter(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "driver_override")
	if err := os.WriteFile(file, []byte("(null)\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := (vfio.OSWriter{}).WriteFile(file, []byte("vfio-pci")); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(file); string(got) != "vfio-pci" {
		t.Errorf("file holds %q, want %q", got, "vfio-pci")
	}
	missing := filepath.Join(dir, "no_such_attribute")
	if err := (vfio.OSWriter{}).WriteFile(missing, []byte("x")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("write to a missing file: %v, want ErrNotExist", err)
	}
	if _, err := os.Stat(missing); !errors.Is(err, os.ErrNotExist) {
		t.Error("OSWriter created a file")
	}
}

// TestBindAsync runs the emulator the way the end-to-end tests do: it reacts
// to files written by OSWriter, after the write returned.
func TestBindAsync(t *testing.T) {
	m := newMachine(t)
	ctx, cancel := context.WithCancel(t.Context())
	watchErr := make(chan error, 1)
	go func() { watchErr <- m.kernel.Watch(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-watchErr; err != nil {
			t.Errorf("Watch: %v", err)
		}
	})
	select {
	case <-m.kernel.Ready():
	case err := <-watchErr:
		t.Fatalf("Watch: %v", err)
	}

	obs := &observer{}
	b := vfio.NewBinder(m.fs, m.dev, vfio.Options{Timeout: 5 * time.Second, PollInterval: time.Millisecond, Observer: obs})
	originals, err := b.Snapshot(addrs(t, gpu, gpuAudio))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Bind(ctx, 2, originals, "vfio-pci"); err != nil {
		t.Fatalf("Bind: %v", err)
	}
	for _, o := range m.state(t, gpu, gpuAudio) {
		if o.Driver != "vfio-pci" || o.DriverOverride != "vfio-pci" {
			t.Errorf("%s after Bind: %+v", o.Address, o)
		}
	}
	if !isCharDevice(t, m.groupNode(2)) {
		t.Error("/dev/vfio/2 missing after Bind")
	}
	if err := b.Restore(ctx, originals, "vfio-pci"); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if diff := cmp.Diff(originals, m.state(t, gpu, gpuAudio)); diff != "" {
		t.Errorf("state after Restore (-original +now):\n%s", diff)
	}
	if isCharDevice(t, m.groupNode(2)) {
		t.Error("/dev/vfio/2 left behind")
	}
	// The emulator moves the links after the writes returned; every
	// move is observed all the same.
	obs.check(t, "after Bind and Restore", []string{"vfio-pci", "vfio-pci", "nvidia", "snd_hda_intel"},
		[]string{"nvidia", "snd_hda_intel", "vfio-pci", "vfio-pci"})

	// A write the kernel refuses: OSWriter cannot see the error, so the
	// Binder times out waiting and rolls the first member back.
	m.kernel.FailNext("unbind", gpuAudio, syscall.EBUSY)
	obs = &observer{}
	b = vfio.NewBinder(m.fs, m.dev, vfio.Options{Timeout: 500 * time.Millisecond, PollInterval: time.Millisecond, Observer: obs})
	err = b.Bind(ctx, 2, originals, "vfio-pci")
	var se *vfio.StepError
	if !errors.As(err, &se) || se.Address != gpuAudio || se.Step != vfio.StepWaitUnbind || !errors.Is(err, vfio.ErrTimeout) {
		t.Fatalf("Bind error %v, want a timeout waiting for the unbind of %s", err, gpuAudio)
	}
	if diff := cmp.Diff(originals, m.state(t, gpu, gpuAudio)); diff != "" {
		t.Errorf("state after the failed Bind (-original +now):\n%s", diff)
	}
	if errs := m.kernel.Errors(); len(errs) != 1 || !errors.Is(errs[0], syscall.EBUSY) {
		t.Errorf("kernel errors %v, want the one EBUSY", errs)
	}
	// The write to unbind returned, but the link stayed: not an unbind.
	obs.check(t, "after the failed Bind", []string{"vfio-pci", "nvidia"}, []string{"nvidia", "vfio-pci"})
}

// TestBindPerMemberTarget: a function with a Target of its own goes to that
// driver, its group-mates to the group's target; Restore gives each back
// from the driver it is on, and a function that was on its own target
// before stays there.
func TestBindPerMemberTarget(t *testing.T) {
	m := newMachine(t)
	if err := m.tree.AddDriver("nvgrace_gpu_vfio_pci"); err != nil {
		t.Fatal(err)
	}
	b := m.binder(nil, 5*time.Second)
	before := m.state(t, gpu, gpuAudio)
	originals := m.state(t, gpu, gpuAudio)
	originals[0].Target = "nvgrace_gpu_vfio_pci"
	if err := b.Bind(t.Context(), 2, originals, "vfio-pci"); err != nil {
		t.Fatal(err)
	}
	got := m.state(t, gpu, gpuAudio)
	if got[0].Driver != "nvgrace_gpu_vfio_pci" || got[1].Driver != "vfio-pci" {
		t.Fatalf("bound GPU to %q and audio to %q, want nvgrace_gpu_vfio_pci and vfio-pci", got[0].Driver, got[1].Driver)
	}
	if !isCharDevice(t, m.groupNode(2)) {
		t.Error("no group node after Bind")
	}
	// Bind again: both are on their targets already, nothing is written.
	writes := len(m.kernel.Writes())
	if err := b.Bind(t.Context(), 2, originals, "vfio-pci"); err != nil {
		t.Fatal(err)
	}
	if w := m.kernel.Writes()[writes:]; len(w) > 0 {
		t.Errorf("second Bind wrote %v", w)
	}
	if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(before, m.state(t, gpu, gpuAudio)); diff != "" {
		t.Errorf("after Restore (-before +after):\n%s", diff)
	}

	// A per-member target that is not loaded fails before any write.
	originals[1].Target = "pds_vfio_pci"
	writes = len(m.kernel.Writes())
	err := b.Bind(t.Context(), 2, originals, "vfio-pci")
	if !errors.Is(err, vfio.ErrDriverNotLoaded) || !strings.Contains(err.Error(), "pds_vfio_pci") {
		t.Errorf("Bind with an unloaded member target: %v, want ErrDriverNotLoaded naming pds_vfio_pci", err)
	}
	if w := m.kernel.Writes()[writes:]; len(w) > 0 {
		t.Errorf("refused Bind wrote %v", w)
	}

	// A function that was on its own target before Bind stays there.
	if err := m.tree.Unbind(bareNIC); err != nil {
		t.Fatal(err)
	}
	if err := m.tree.Bind(bareNIC, "mlx5_vfio_pci"); err != nil {
		t.Fatal(err)
	}
	on := m.state(t, bareNIC)
	on[0].Target = "mlx5_vfio_pci"
	writes = len(m.kernel.Writes())
	if err := b.Restore(t.Context(), on, "vfio-pci"); err != nil {
		t.Fatal(err)
	}
	if w := m.kernel.Writes()[writes:]; len(w) > 0 {
		t.Errorf("Restore of a function that was on its target wrote %v", w)
	}
}

// observer records what a Binder reports to its Observer.
type observer struct {
	mu             sync.Mutex
	binds, unbinds []string
	// bindTimes and unbindTimes hold the durations, in the same order.
	bindTimes, unbindTimes []time.Duration
}

func (o *observer) ObserveBind(driver string, d time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.binds = append(o.binds, driver)
	o.bindTimes = append(o.bindTimes, d)
}

func (o *observer) ObserveUnbind(driver string, d time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.unbinds = append(o.unbinds, driver)
	o.unbindTimes = append(o.unbindTimes, d)
}

// check compares the drivers observed so far.
func (o *observer) check(t *testing.T, when string, binds, unbinds []string) {
	t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	if diff := cmp.Diff(binds, o.binds, cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("%s: binds observed (-want +got):\n%s", when, diff)
	}
	if diff := cmp.Diff(unbinds, o.unbinds, cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("%s: unbinds observed (-want +got):\n%s", when, diff)
	}
}

// TestObserver: the Observer hears of every bind and unbind that
// succeeded, by driver, timed until sysfs shows the move, also when the
// kernel moves the driver link only after the write has returned; a
// refused probe and a failed unbind are not observed.
func TestObserver(t *testing.T) {
	t.Run("bind and restore", func(t *testing.T) {
		m := newMachine(t)
		obs := &observer{}
		b := m.binderWith(nil, vfio.Options{Timeout: 5 * time.Second, Observer: obs})
		originals, err := b.Snapshot(addrs(t, gpu, gpuAudio))
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Bind(t.Context(), 2, originals, "vfio-pci"); err != nil {
			t.Fatalf("Bind: %v", err)
		}
		obs.check(t, "after Bind", []string{"vfio-pci", "vfio-pci"}, []string{"nvidia", "snd_hda_intel"})
		if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
			t.Fatalf("Restore: %v", err)
		}
		obs.check(t, "after Restore", []string{"vfio-pci", "vfio-pci", "nvidia", "snd_hda_intel"},
			[]string{"nvidia", "snd_hda_intel", "vfio-pci", "vfio-pci"})
	})

	t.Run("kernel moves the link after the write returned", func(t *testing.T) {
		m := newMachine(t)
		const delay = 50 * time.Millisecond
		var wg sync.WaitGroup
		t.Cleanup(wg.Wait)
		// Like the kernel emulator, a process of its own: every unbind
		// and probe takes effect delay after its write returned.
		w := &hookWriter{k: m.kernel, before: func(path string, data []byte) bool {
			if !isProbe(path) && filepath.Base(path) != "unbind" {
				return true
			}
			wg.Go(func() {
				time.Sleep(delay)
				if err := m.kernel.WriteFile(path, data); err != nil {
					t.Error(err)
				}
			})
			return false
		}}
		obs := &observer{}
		b := m.binderWith(w, vfio.Options{Timeout: 5 * time.Second, Observer: obs})
		originals, err := b.Snapshot(addrs(t, nic))
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Bind(t.Context(), 4, originals, "vfio-pci"); err != nil {
			t.Fatalf("Bind: %v", err)
		}
		if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
			t.Fatalf("Restore: %v", err)
		}
		obs.check(t, "after Bind and Restore", []string{"vfio-pci", "e1000e"}, []string{"e1000e", "vfio-pci"})
		// Each move was timed until the link moved, not until the write
		// returned (a lower bound, whatever the machine's load).
		obs.mu.Lock()
		defer obs.mu.Unlock()
		for i, d := range append(slices.Clone(obs.bindTimes), obs.unbindTimes...) {
			if d < delay {
				t.Errorf("move %d observed after %v, before the kernel made it (%v)", i, d, delay)
			}
		}
	})

	t.Run("refused probe and failed unbind", func(t *testing.T) {
		m := newMachine(t)
		obs := &observer{}
		b := m.binderWith(m.refusingFirstProbe(), vfio.Options{Timeout: 5 * time.Second, Observer: obs})
		originals, err := b.Snapshot(addrs(t, nic))
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Bind(t.Context(), 4, originals, "vfio-pci"); !errors.Is(err, vfio.ErrProbeRefused) {
			t.Fatalf("Bind error %v, want ErrProbeRefused", err)
		}
		// The unbind from e1000e, then the rollback's probe back to it.
		obs.check(t, "after the refused probe", []string{"e1000e"}, []string{"e1000e"})

		obs = &observer{}
		b = m.binderWith(nil, vfio.Options{Timeout: 5 * time.Second, Observer: obs})
		originals, err = b.Snapshot(addrs(t, gpu, gpuAudio))
		if err != nil {
			t.Fatal(err)
		}
		m.kernel.FailNext(pcitest.OpUnbind, gpuAudio, syscall.EBUSY)
		if err := b.Bind(t.Context(), 2, originals, "vfio-pci"); err == nil {
			t.Fatal("Bind with a failing unbind succeeded")
		}
		// The GPU moved and was given back; the audio function's
		// unbind failed.
		obs.check(t, "after the failed unbind", []string{"vfio-pci", "nvidia"}, []string{"nvidia", "vfio-pci"})
	})
}
