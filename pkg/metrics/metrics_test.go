package metrics_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vfio-dra/vfio-dra-driver/pkg/metrics"
)

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code, rec.Body.String()
}

func TestMetrics(t *testing.T) {
	m := metrics.New()
	m.SetFunctions(3, map[string]int{"bridge": 2, "boot_vga": 1})
	m.SetFunctions(4, map[string]int{"bridge": 2})
	m.ObservePrepare(20*time.Millisecond, "", nil)
	m.ObservePrepare(time.Second, "unbind", errors.New("busy"))
	m.ObserveUnprepare(time.Millisecond, "", nil)
	m.ObserveBind("vfio-pci", 500*time.Millisecond)
	m.ObserveUnbind("nvidia", time.Second)
	m.ObserveRescan(2*time.Millisecond, true, nil)
	m.ObserveRescan(time.Millisecond, false, nil)
	m.ObserveRescan(time.Millisecond, false, nil)
	m.ObserveRescan(time.Millisecond, false, errors.New("unreadable"))
	m.Rollback(nil)
	m.Rollback(errors.New("stuck"))
	m.SetPreparedClaimsSource(func() (int, error) { return 2, nil })
	m.SetHealthSource(func() []metrics.DeviceHealth {
		return []metrics.DeviceHealth{
			{Device: "pci-0000-01-00-0", Healthy: true},
			{Device: "pci-0000-02-00-0", Healthy: false, Taints: []metrics.Taint{{Key: "vfio.dra.dev/gone", Effect: "NoExecute"}}},
		}
	})

	want := `
# HELP vfio_dra_functions PCI functions of the node at the last rescan, by whether they are offered and, if not, why.
# TYPE vfio_dra_functions gauge
vfio_dra_functions{offered="false",reason="bridge"} 2
vfio_dra_functions{offered="true",reason=""} 4
# HELP vfio_dra_failures_total Failed operations, by operation and by the step that failed.
# TYPE vfio_dra_failures_total counter
vfio_dra_failures_total{operation="prepare",step="unbind"} 1
vfio_dra_failures_total{operation="rollback",step=""} 1
# HELP vfio_dra_rollbacks_total Prepares rolled back (after a failure, or unfinished at start), by result.
# TYPE vfio_dra_rollbacks_total counter
vfio_dra_rollbacks_total{result="error"} 1
vfio_dra_rollbacks_total{result="success"} 1
# HELP vfio_dra_prepared_claims ResourceClaims prepared on the node, as the checkpoint lists them.
# TYPE vfio_dra_prepared_claims gauge
vfio_dra_prepared_claims 2
# HELP vfio_dra_devices Published devices by health.
# TYPE vfio_dra_devices gauge
vfio_dra_devices{health="healthy"} 1
vfio_dra_devices{health="unhealthy"} 1
# HELP vfio_dra_device_unhealthy 1 for each published device that is unhealthy.
# TYPE vfio_dra_device_unhealthy gauge
vfio_dra_device_unhealthy{device="pci-0000-02-00-0"} 1
# HELP vfio_dra_device_taints Taints on published devices, by key and effect.
# TYPE vfio_dra_device_taints gauge
vfio_dra_device_taints{effect="NoExecute",key="vfio.dra.dev/gone"} 1
`
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want),
		"vfio_dra_functions", "vfio_dra_failures_total", "vfio_dra_rollbacks_total",
		"vfio_dra_prepared_claims", "vfio_dra_devices", "vfio_dra_device_unhealthy", "vfio_dra_device_taints"); err != nil {
		t.Error(err)
	}
	for name, count := range map[string]int{
		"vfio_dra_prepare_duration_seconds": 2, "vfio_dra_unprepare_duration_seconds": 1,
		"vfio_dra_bind_duration_seconds": 1, "vfio_dra_unbind_duration_seconds": 1,
		"vfio_dra_rescan_duration_seconds": 3,
	} {
		n, err := testutil.GatherAndCount(m.Registry(), name)
		if err != nil || n != count {
			t.Errorf("%s: %d series (%v), want %d", name, n, err, count)
		}
	}

	code, body := get(t, m.Handler(), "/metrics")
	if code != http.StatusOK || !strings.Contains(body, `vfio_dra_unbind_duration_seconds_bucket{driver="nvidia",le="1"} 1`) ||
		!strings.Contains(body, `vfio_dra_rescan_duration_seconds_count{result="unchanged"} 2`) ||
		!strings.Contains(body, "process_resident_memory_bytes") {
		t.Errorf("/metrics answered %d without the unbind histogram or the process metrics:\n%s", code, body)
	}
}

func TestHealthAndReady(t *testing.T) {
	m := metrics.New()
	h := m.Handler()
	if code, _ := get(t, h, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz = %d, want 200", code)
	}
	if code, _ := get(t, h, "/readyz"); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz before SetReady = %d, want 503", code)
	}
	m.SetReady(true)
	if code, _ := get(t, h, "/readyz"); code != http.StatusOK {
		t.Errorf("/readyz after SetReady = %d, want 200", code)
	}
}

// TestNil: a nil *Metrics records nothing and does not panic, so the
// plugin runs without metrics.
func TestNil(t *testing.T) {
	var m *metrics.Metrics
	m.SetFunctions(1, nil)
	m.ObservePrepare(time.Second, "x", errors.New("x"))
	m.ObserveUnprepare(time.Second, "", nil)
	m.ObserveBind("vfio-pci", time.Second)
	m.ObserveUnbind("nvidia", time.Second)
	m.Failure(metrics.OpRescan, "scan")
	m.Rollback(nil)
	m.SetReady(true)
	m.SetHealthSource(nil)
	m.SetPreparedClaimsSource(nil)
}

func TestServe(t *testing.T) {
	m := metrics.New()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- m.Serve(ctx, ln) }()
	resp, err := http.Get("http://" + ln.Addr().String() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "ok\n" {
		t.Errorf("/healthz = %d %q", resp.StatusCode, body)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Serve after cancel: %v", err)
	}
}
