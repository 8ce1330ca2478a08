package plugin_test

import (
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/klog/v2/ktesting"

	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/metrics"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/plugin"
)

// TestMetrics: what the plugin does through the kubelet's gRPC API shows
// in its metrics: the functions of the rescan, the prepare and unprepare
// latencies, each driver's bind and unbind, a failure by its step and its
// rollback, the prepared claims and readiness.
func TestMetrics(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	m := metrics.New()
	n.cfg.Metrics = m
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	if rec.Code != http.StatusServiceUnavailable {
		t.Errorf("/readyz before start = %d, want 503", rec.Code)
	}
	n.start(ctx, t)
	rec = httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	if rec.Code != http.StatusOK {
		t.Errorf("/readyz after start = %d, want 200", rec.Code)
	}

	gpu := n.createClaim(ctx, t, "gpu", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.0")})
	n.mustPrepare(ctx, t, gpu)
	gauge := func(name string) string {
		t.Helper()
		return scrape(t, m, name)
	}
	if got := gauge("vfio_dra_prepared_claims"); got != "1" {
		t.Errorf("vfio_dra_prepared_claims = %q after one prepare, want 1", got)
	}
	n.mustUnprepare(ctx, t, claimRef(gpu))
	if got := gauge("vfio_dra_prepared_claims"); got != "0" {
		t.Errorf("vfio_dra_prepared_claims = %q after unprepare, want 0", got)
	}

	// A prepare that fails at its second function's unbind is rolled back.
	n.kernel.FailNext(pcitest.OpUnbind, "0000:01:00.1", syscall.EBUSY)
	if r := n.prepare(ctx, t, gpu); r.Error == "" {
		t.Fatal("prepare with a failing unbind succeeded")
	}

	// The gauge counts what the slices hold, and every other function by
	// the kind of its reason.
	slices := n.publishedSlices(ctx, t, func([]resourceapi.ResourceSlice) bool { return true })
	devices := 0
	for _, s := range slices {
		devices += len(s.Spec.Devices)
	}
	functions, _, err := n.fs.Scan()
	if err != nil {
		t.Fatal(err)
	}
	if got := gauge(`vfio_dra_functions{offered="true",reason=""}`); got != strconv.Itoa(devices) {
		t.Errorf("offered functions = %s, the slices hold %d devices", got, devices)
	}
	notOffered := 0
	for _, kind := range []string{inventory.KindBridge, inventory.KindChipset, inventory.KindPlatform, inventory.KindNoIOMMUGroup,
		inventory.KindBootVGA, inventory.KindSRIOVPF, inventory.KindGroupMember, inventory.KindHostInUse, inventory.KindHostUnknown, inventory.KindOther} {
		if v := gauge(`vfio_dra_functions{offered="false",reason="` + kind + `"}`); v != "" {
			n, _ := strconv.Atoi(v)
			notOffered += n
		}
	}
	if devices+notOffered != len(functions) {
		t.Errorf("%d offered and %d not offered functions, the node has %d", devices, notOffered, len(functions))
	}
	if got := gauge(`vfio_dra_functions{offered="false",reason="boot_vga"}`); got != "1" {
		t.Errorf("boot VGA functions = %q, want 1", got)
	}
	for _, tc := range []struct{ line, want string }{
		{`vfio_dra_prepare_duration_seconds_count{result="success"}`, "1"},
		{`vfio_dra_prepare_duration_seconds_count{result="error"}`, "1"},
		{`vfio_dra_unprepare_duration_seconds_count{result="success"}`, "1"},
		// Prepare binds the GPU and its audio function to vfio-pci; the
		// unprepare probes them back to their drivers; the failed
		// prepare binds the GPU and gives it back.
		{`vfio_dra_bind_duration_seconds_count{driver="vfio-pci"}`, "3"},
		{`vfio_dra_bind_duration_seconds_count{driver="nvidia"}`, "2"},
		{`vfio_dra_bind_duration_seconds_count{driver="snd_hda_intel"}`, "1"},
		{`vfio_dra_unbind_duration_seconds_count{driver="nvidia"}`, "2"},
		{`vfio_dra_unbind_duration_seconds_count{driver="vfio-pci"}`, "3"},
		{`vfio_dra_failures_total{operation="prepare",step="unbind"}`, "1"},
		{`vfio_dra_rollbacks_total{result="success"}`, "1"},
	} {
		if got := gauge(tc.line); got != tc.want {
			t.Errorf("%s = %q, want %s", tc.line, got, tc.want)
		}
	}
	if n, err := testutil.GatherAndCount(m.Registry(), "vfio_dra_functions"); err != nil || n < 3 {
		t.Errorf("vfio_dra_functions has %d series (%v)", n, err)
	}
}

// lateKernel applies every unbind and drivers_probe write delay after the
// write returned, as the kernel emulator, a process of its own, does.
type lateKernel struct {
	k     *pcitest.Kernel
	delay time.Duration
	wg    sync.WaitGroup
}

func (l *lateKernel) WriteFile(path string, data []byte) error {
	if name := filepath.Base(path); name != "unbind" && name != "drivers_probe" {
		return l.k.WriteFile(path, data)
	}
	l.wg.Go(func() {
		time.Sleep(l.delay)
		// An error shows as a driver link that does not move.
		_ = l.k.WriteFile(path, data)
	})
	return nil
}

// TestMetricsBindAfterWrite: with a kernel that moves the driver link
// only after the write returned, every bind and unbind of a prepare and
// its unprepare is counted by driver, each timed at least until the link
// moved.
func TestMetricsBindAfterWrite(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	m := metrics.New()
	n.cfg.Metrics = m
	late := &lateKernel{k: n.kernel, delay: 50 * time.Millisecond}
	t.Cleanup(late.wg.Wait)
	n.cfg.SysfsWriter = late
	n.start(ctx, t)

	gpu := n.createClaim(ctx, t, "gpu", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.0")})
	n.mustPrepare(ctx, t, gpu)
	n.mustUnprepare(ctx, t, claimRef(gpu))
	for _, tc := range []struct {
		series string
		want   int
	}{
		{`vfio_dra_bind_duration_seconds{driver="vfio-pci"}`, 2},
		{`vfio_dra_bind_duration_seconds{driver="nvidia"}`, 1},
		{`vfio_dra_bind_duration_seconds{driver="snd_hda_intel"}`, 1},
		{`vfio_dra_unbind_duration_seconds{driver="nvidia"}`, 1},
		{`vfio_dra_unbind_duration_seconds{driver="snd_hda_intel"}`, 1},
		{`vfio_dra_unbind_duration_seconds{driver="vfio-pci"}`, 2},
	} {
		name, labels, _ := strings.Cut(tc.series, "{")
		count := scrape(t, m, name+"_count{"+labels)
		if count != strconv.Itoa(tc.want) {
			t.Errorf("%s count = %q, want %d", tc.series, count, tc.want)
			continue
		}
		// A lower bound, whatever the machine's load.
		sum, err := strconv.ParseFloat(scrape(t, m, name+"_sum{"+labels), 64)
		if err != nil || sum < float64(tc.want)*late.delay.Seconds() {
			t.Errorf("%s sum = %v (%v), want at least %d x %v", tc.series, sum, err, tc.want, late.delay)
		}
	}
}

// TestMetricsHealth: the verdicts of the health checks show in the
// health and taint metrics, from the first publication on, and follow a
// device that fails and recovers.
func TestMetricsHealth(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	e := newEnv(t)
	m := metrics.New()
	e.cfg.Metrics = m
	// Every offered function but the FPGA can be reset.
	for _, a := range []string{"0000:01:00.0", "0000:01:00.1", "0000:02:01.0", "0000:02:02.0", "0000:03:00.0", "0000:03:00.1", "0000:81:00.2", "0000:81:00.3", "0000:82:00.0", "0000:83:00.0"} {
		if err := e.tree.WriteDeviceFile(a, "reset_method", "flr bus\n"); err != nil {
			t.Fatal(err)
		}
	}
	d, err := plugin.Start(ctx, e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Stop()

	check := func(when string, want string, names ...string) {
		t.Helper()
		if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want), names...); err != nil {
			t.Errorf("%s: %v", when, err)
		}
	}
	const head = `
# HELP vfio_dra_devices Published devices by health.
# TYPE vfio_dra_devices gauge
# HELP vfio_dra_device_unhealthy 1 for each published device that is unhealthy.
# TYPE vfio_dra_device_unhealthy gauge
# HELP vfio_dra_device_taints Taints on published devices, by key and effect.
# TYPE vfio_dra_device_taints gauge
`
	names := []string{"vfio_dra_devices", "vfio_dra_device_unhealthy", "vfio_dra_device_taints"}
	check("after start", head+`
vfio_dra_devices{health="healthy"} 11
vfio_dra_devices{health="unhealthy"} 0
vfio_dra_device_taints{effect="None",key="vfio.dra.dev/no-reset"} 1
`, names...)

	// The SmartNIC falls off the bus.
	if err := e.tree.WriteDeviceFile("0000:82:00.0", "config", strings.Repeat("\xff", 256)); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Resync(ctx); err != nil {
		t.Fatal(err)
	}
	check("off the bus", head+`
vfio_dra_devices{health="healthy"} 10
vfio_dra_devices{health="unhealthy"} 1
vfio_dra_device_unhealthy{device="pci-0000-82-00-0"} 1
vfio_dra_device_taints{effect="None",key="vfio.dra.dev/no-reset"} 1
vfio_dra_device_taints{effect="NoSchedule",key="vfio.dra.dev/unhealthy"} 1
`, names...)

	// It answers again (config space is read at each rescan).
	if err := e.tree.WriteDeviceFile("0000:82:00.0", "config", "\xee\x19\x00\x40"+strings.Repeat("\x00", 252)); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Resync(ctx); err != nil {
		t.Fatal(err)
	}
	check("back on the bus", head+`
vfio_dra_devices{health="healthy"} 11
vfio_dra_devices{health="unhealthy"} 0
vfio_dra_device_taints{effect="None",key="vfio.dra.dev/no-reset"} 1
`, names...)

	// A fatal AER error is seen by the cheap check alone.
	if err := e.tree.WriteDeviceFile("0000:83:00.0", "aer_dev_fatal", pcitest.AERFatal(nil)); err != nil {
		t.Fatal(err)
	}
	if err := d.CheckHealth(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.tree.WriteDeviceFile("0000:83:00.0", "aer_dev_fatal", pcitest.AERFatal(map[string]uint64{"CmpltTO": 1})); err != nil {
		t.Fatal(err)
	}
	if err := d.CheckHealth(ctx); err != nil {
		t.Fatal(err)
	}
	check("fatal AER error", head+`
vfio_dra_devices{health="healthy"} 10
vfio_dra_devices{health="unhealthy"} 1
vfio_dra_device_unhealthy{device="pci-0000-83-00-0"} 1
vfio_dra_device_taints{effect="None",key="vfio.dra.dev/no-reset"} 1
vfio_dra_device_taints{effect="NoSchedule",key="vfio.dra.dev/unhealthy"} 1
`, names...)

	// Each rescan is timed by its result: the start, the three changes
	// above (the AER error through the cheap check's rescan), and one that
	// finds nothing new.
	if changed, err := d.Resync(ctx); err != nil || changed {
		t.Fatalf("Resync with nothing changed = %v, %v", changed, err)
	}
	for result, want := range map[string]int{metrics.RescanPublished: 4, metrics.RescanUnchanged: 1} {
		line := `vfio_dra_rescan_duration_seconds_count{result="` + result + `"}`
		if got := scrape(t, m, line); got != strconv.Itoa(want) {
			t.Errorf("%s = %q, want %d", line, got, want)
		}
	}
}

// scrape returns the value of one line of /metrics ("" if missing).
func scrape(t *testing.T, m *metrics.Metrics, name string) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		if strings.HasPrefix(line, name+" ") {
			return strings.TrimPrefix(line, name+" ")
		}
	}
	return ""
}
