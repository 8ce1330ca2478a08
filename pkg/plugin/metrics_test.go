package plugin_test

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/klog/v2/ktesting"

	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/metrics"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
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
		rec := httptest.NewRecorder()
		m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
		for _, line := range strings.Split(rec.Body.String(), "\n") {
			if strings.HasPrefix(line, name+" ") {
				return strings.TrimPrefix(line, name+" ")
			}
		}
		return ""
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
