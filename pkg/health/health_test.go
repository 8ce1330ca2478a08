package health_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"

	"github.com/vfio-dra/vfio-dra-driver/pkg/health"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

const driverName = "vfio.dra.dev"

var (
	gpu   = mustAddr("0000:01:00.0")
	audio = mustAddr("0000:01:00.1")
	nic   = mustAddr("0000:82:00.0")
)

func mustAddr(s string) pci.Address {
	a, err := pci.ParseAddress(s)
	if err != nil {
		panic(err)
	}
	return a
}

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func setup(t testing.TB) (*pcitest.Tree, *health.Checker, *clock) {
	t.Helper()
	tree, err := pcitest.NewServer(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fs, err := pci.NewFS(tree.Root)
	if err != nil {
		t.Fatal(err)
	}
	clk := &clock{t: time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)}
	return tree, health.NewChecker(fs, health.Options{AERHold: time.Minute, Now: clk.now}), clk
}

func check(t *testing.T, c *health.Checker, deep bool, fns ...health.Function) map[pci.Address]health.Status {
	t.Helper()
	got, errs := c.Check(fns, deep)
	for _, err := range errs {
		t.Errorf("Check: %v", err)
	}
	return got
}

func reasons(s health.Status) []health.Reason {
	var out []health.Reason
	for _, p := range s.Problems {
		out = append(out, p.Reason)
	}
	return out
}

func TestHealthyServer(t *testing.T) {
	_, c, _ := setup(t)
	got := check(t, c, true, health.Function{Address: gpu}, health.Function{Address: nic}, health.Function{Address: audio, BoundTo: ""})
	for addr, s := range got {
		if !s.Healthy() || s.NoReset || len(s.Taints(driverName)) != 0 {
			t.Errorf("%s: %+v, want healthy without taints", addr, s)
		}
	}
}

func TestGone(t *testing.T) {
	tree, c, _ := setup(t)
	if err := tree.Remove(nic.String()); err != nil {
		t.Fatal(err)
	}
	s := check(t, c, false, health.Function{Address: nic, BoundTo: "vfio-pci"})[nic]
	if !s.Gone() || s.Healthy() {
		t.Fatalf("removed function: %+v, want gone", s)
	}
	want := []resourceapi.DeviceTaint{{Key: "vfio.dra.dev/gone", Effect: resourceapi.DeviceTaintEffectNoExecute}}
	if diff := cmp.Diff(want, s.Taints(driverName)); diff != "" {
		t.Errorf("taints (-want +got):\n%s", diff)
	}
	if !strings.Contains(s.Message(), "0000:82:00.0 is no longer on the bus") {
		t.Errorf("message %q does not say the device is gone", s.Message())
	}
}

func TestConfigAllOnes(t *testing.T) {
	tree, c, _ := setup(t)
	good := "\xde\x10\x04\x22" + strings.Repeat("\x00", 60)
	if err := tree.WriteDeviceFile(gpu.String(), "config", good); err != nil {
		t.Fatal(err)
	}
	fn := health.Function{Address: gpu}
	if s := check(t, c, true, fn)[gpu]; !s.Healthy() {
		t.Fatalf("readable config: %+v", s)
	}
	if err := tree.WriteDeviceFile(gpu.String(), "config", strings.Repeat("\xff", 64)); err != nil {
		t.Fatal(err)
	}
	// Only deep checks read config space.
	if s := check(t, c, false, fn)[gpu]; !s.Healthy() {
		t.Fatalf("shallow check read config space: %+v", s)
	}
	s := check(t, c, true, fn)[gpu]
	if diff := cmp.Diff([]health.Reason{health.ReasonOffBus}, reasons(s)); diff != "" {
		t.Fatalf("all-ones config: reasons (-want +got):\n%s", diff)
	}
	want := []resourceapi.DeviceTaint{{Key: "vfio.dra.dev/unhealthy", Value: "off-bus", Effect: resourceapi.DeviceTaintEffectNoSchedule}}
	if diff := cmp.Diff(want, s.Taints(driverName)); diff != "" {
		t.Errorf("taints (-want +got):\n%s", diff)
	}
	// The verdict stands between deep checks ...
	if s := check(t, c, false, fn)[gpu]; s.Healthy() {
		t.Errorf("shallow check forgot the deep verdict")
	}
	// ... and clears when the function answers again.
	if err := tree.WriteDeviceFile(gpu.String(), "config", good); err != nil {
		t.Fatal(err)
	}
	if s := check(t, c, true, fn)[gpu]; !s.Healthy() || len(s.Taints(driverName)) != 0 {
		t.Errorf("recovered function: %+v", s)
	}
}

func TestFatalAER(t *testing.T) {
	tree, c, clk := setup(t)
	set := func(n uint64) {
		t.Helper()
		if err := tree.WriteDeviceFile(nic.String(), "aer_dev_fatal", pcitest.AERFatal(map[string]uint64{"DLP": n, "MalfTLP": 1})); err != nil {
			t.Fatal(err)
		}
	}
	fn := health.Function{Address: nic}
	// Errors from before the plugin looked are history.
	set(2)
	if s := check(t, c, false, fn)[nic]; !s.Healthy() {
		t.Fatalf("counter already non-zero at first sight: %+v", s)
	}
	set(4)
	clk.t = clk.t.Add(time.Second)
	s := check(t, c, false, fn)[nic]
	if diff := cmp.Diff([]health.Reason{health.ReasonFatalAER}, reasons(s)); diff != "" {
		t.Fatalf("grown counter: reasons (-want +got):\n%s", diff)
	}
	if !strings.Contains(s.Message(), "reported 2 fatal PCIe error(s)") {
		t.Errorf("message %q does not count the new errors", s.Message())
	}
	if got := s.Taints(driverName); len(got) != 1 || got[0].Value != "aer-fatal" || got[0].Effect != resourceapi.DeviceTaintEffectNoSchedule {
		t.Errorf("taints %+v, want one NoSchedule unhealthy=aer-fatal", got)
	}
	// Still unhealthy within the hold time, healthy after a quiet hold.
	clk.t = clk.t.Add(59 * time.Second)
	if s := check(t, c, false, fn)[nic]; s.Healthy() {
		t.Errorf("healthy again within the hold time")
	}
	clk.t = clk.t.Add(time.Second)
	if s := check(t, c, false, fn)[nic]; !s.Healthy() {
		t.Errorf("still unhealthy after a quiet hold time: %+v", s)
	}
	// A new error starts the hold again.
	set(5)
	if s := check(t, c, false, fn)[nic]; s.Healthy() {
		t.Errorf("new fatal error not seen")
	}
}

func TestFatalAERUnreadable(t *testing.T) {
	tree, c, _ := setup(t)
	if err := tree.WriteDeviceFile(nic.String(), "aer_dev_fatal", "garbage\n"); err != nil {
		t.Fatal(err)
	}
	got, errs := c.Check([]health.Function{{Address: nic}}, false)
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "0000:82:00.0") || !strings.Contains(errs[0].Error(), "aer_dev_fatal") {
		t.Errorf("errors %v, want one naming the device and the file", errs)
	}
	if !got[nic].Healthy() {
		t.Errorf("an unreadable counter made the device unhealthy: %+v", got[nic])
	}
}

func TestDriverChanged(t *testing.T) {
	tree, c, _ := setup(t)
	fn := health.Function{Address: gpu, BoundTo: "vfio-pci"}
	s := check(t, c, false, fn)[gpu]
	if diff := cmp.Diff([]health.Reason{health.ReasonDriverChanged}, reasons(s)); diff != "" {
		t.Fatalf("reasons (-want +got):\n%s", diff)
	}
	if !strings.Contains(s.Message(), "bound to vfio-pci for a claim but has driver nvidia now") {
		t.Errorf("message %q", s.Message())
	}
	if err := tree.Unbind(gpu.String()); err != nil {
		t.Fatal(err)
	}
	if s := check(t, c, false, fn)[gpu]; !strings.Contains(s.Message(), "has no driver now") {
		t.Errorf("unbound function: message %q", s.Message())
	}
	if err := tree.Bind(gpu.String(), "vfio-pci"); err != nil {
		t.Fatal(err)
	}
	if s := check(t, c, false, fn)[gpu]; !s.Healthy() {
		t.Errorf("function back on vfio-pci: %+v", s)
	}
	// Not held by a claim: any driver is fine.
	if s := check(t, c, false, health.Function{Address: nic})[nic]; !s.Healthy() {
		t.Errorf("unclaimed function: %+v", s)
	}
}

func TestNoReset(t *testing.T) {
	tree, c, _ := setup(t)
	files := []struct{ addr, name, content string }{
		{gpu.String(), "reset_method", "flr bus\n"},
		{audio.String(), "reset_method", "\n"}, // an administrator turned every method off
		{"0000:83:00.0", "reset", ""},          // a kernel before 5.15
	}
	for _, f := range files {
		if err := tree.WriteDeviceFile(f.addr, f.name, f.content); err != nil {
			t.Fatal(err)
		}
	}
	nvme := mustAddr("0000:83:00.0")
	got := check(t, c, true, health.Function{Address: gpu}, health.Function{Address: audio}, health.Function{Address: nic}, health.Function{Address: nvme})
	for addr, want := range map[pci.Address]bool{gpu: false, audio: true, nic: true, nvme: false} {
		s := got[addr]
		if s.NoReset != want {
			t.Errorf("%s: NoReset %v, want %v", addr, s.NoReset, want)
		}
		if !s.Healthy() {
			t.Errorf("%s: a missing reset made it unhealthy: %+v", addr, s)
		}
	}
	wantTaints := []resourceapi.DeviceTaint{{Key: "vfio.dra.dev/no-reset", Effect: resourceapi.DeviceTaintEffectNone}}
	if diff := cmp.Diff(wantTaints, got[nic].Taints(driverName)); diff != "" {
		t.Errorf("taints (-want +got):\n%s", diff)
	}
	// A device is as resettable as its least resettable function.
	if merged := got[gpu].Merge(got[audio]); !merged.NoReset || !strings.Contains(merged.Message(), "0000:01:00.1") {
		t.Errorf("merged status %+v does not carry the member's missing reset", merged)
	}
	// A method turned back on clears the taint.
	if err := tree.WriteDeviceFile(audio.String(), "reset_method", "pm\n"); err != nil {
		t.Fatal(err)
	}
	if s := check(t, c, true, health.Function{Address: audio})[audio]; s.NoReset {
		t.Errorf("reset method back, still NoReset")
	}
}

// TestNoResetUnknown: a kernel that shows no reset file at all (before
// reset_method, or a tree without them) says nothing about resets.
func TestNoResetUnknown(t *testing.T) {
	_, c, _ := setup(t)
	if s := check(t, c, true, health.Function{Address: nic})[nic]; s.NoReset {
		t.Errorf("NoReset without any reset file on the node")
	}
}

func TestParseAERTotal(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     uint64
		err      string
	}{
		{name: "kernel", in: pcitest.AERFatal(map[string]uint64{"DLP": 3, "TLP": 4}), want: 7},
		{name: "unnamed bit", in: "DLP 0\ndev_fatal_errs_bit[27] 2\nTOTAL_ERR_FATAL 2\n", want: 2},
		{name: "no total", in: "DLP 1\n", err: "no TOTAL_ERR_FATAL line"},
		{name: "bad count", in: "TOTAL_ERR_FATAL x\n", err: `count "x" is not a number`},
		{name: "three fields", in: "TOTAL ERR FATAL\n", err: "not NAME COUNT"},
		{name: "twice", in: "TOTAL_ERR_FATAL 1\nTOTAL_ERR_FATAL 2\n", err: "appears twice"},
		{name: "negative", in: "TOTAL_ERR_FATAL -1\n", err: "not a number"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := health.ParseAERTotal([]byte(tc.in), "TOTAL_ERR_FATAL")
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("= %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}

func TestReporter(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	r := health.NewReporter()
	reports := make(chan kubeletplugin.DeviceHealthReport)
	done := make(chan error, 1)
	go func() { done <- r.Watch(ctx, reports) }()

	// Nothing is sent before the first check.
	select {
	case rep := <-reports:
		t.Fatalf("report before any check: %+v", rep)
	case <-time.After(50 * time.Millisecond):
	}
	first := []kubeletplugin.DeviceHealth{{PoolName: "node-a", DeviceName: "pci-0000-01-00-0", Health: kubeletplugin.HealthStatusHealthy}}
	r.Set(first)
	if rep := <-reports; rep.Devices[0].Health != kubeletplugin.HealthStatusHealthy {
		t.Fatalf("first report %+v", rep)
	}
	// A second watcher starts with the current report.
	second := make(chan kubeletplugin.DeviceHealthReport, 1)
	go func() { _ = r.Watch(ctx, second) }()
	if rep := <-second; rep.Devices[0].DeviceName != "pci-0000-01-00-0" {
		t.Fatalf("second watcher got %+v", rep)
	}
	// Every check is sent, changed or not: the kubelet's lease is renewed
	// only by fresh checks.
	r.Set(first)
	<-reports
	r.Set([]kubeletplugin.DeviceHealth{{PoolName: "node-a", DeviceName: "pci-0000-01-00-0", Health: kubeletplugin.HealthStatusUnhealthy, Message: "gone"}})
	if rep := <-reports; rep.Devices[0].Health != kubeletplugin.HealthStatusUnhealthy {
		t.Fatalf("update %+v", rep)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Watch returned %v after cancel, want nil", err)
	}
}
