package plugin_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2/ktesting"
	drahealthv1 "k8s.io/kubelet/pkg/apis/dra-health/v1"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/plugin"
)

// devicesByName indexes the published devices.
func devicesByName(slices []resourceapi.ResourceSlice) map[string]resourceapi.Device {
	out := map[string]resourceapi.Device{}
	for _, s := range slices {
		for _, d := range s.Spec.Devices {
			out[d.Name] = d
		}
	}
	return out
}

// taintsOf returns the published taints of every device that has some,
// without the API server's TimeAdded.
func taintsOf(slices []resourceapi.ResourceSlice) map[string][]resourceapi.DeviceTaint {
	out := map[string][]resourceapi.DeviceTaint{}
	for name, d := range devicesByName(slices) {
		for _, t := range d.Taints {
			t.TimeAdded = nil
			out[name] = append(out[name], t)
		}
	}
	return out
}

// waitTaints waits until the published taints are want.
func (e *env) waitTaints(ctx context.Context, t *testing.T, want map[string][]resourceapi.DeviceTaint) []resourceapi.ResourceSlice {
	t.Helper()
	var last map[string][]resourceapi.DeviceTaint
	var got []resourceapi.ResourceSlice
	err := wait.PollUntilContextTimeout(ctx, 10*time.Millisecond, 10*time.Second, true, func(ctx context.Context) (bool, error) {
		list, err := e.client.ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		got, last = list.Items, taintsOf(list.Items)
		return cmp.Equal(want, last, cmpopts.EquateEmpty()), nil
	})
	if err != nil {
		t.Fatalf("published taints %v, want %v", last, want)
	}
	return got
}

func noSchedule(key, value string) resourceapi.DeviceTaint {
	return resourceapi.DeviceTaint{Key: key, Value: value, Effect: resourceapi.DeviceTaintEffectNoSchedule}
}

// TestHealthTaintsInSlices: verdicts of the health checks reach the
// ResourceSlices through the real resourceslice controller, and recovery
// takes them away again.
func TestHealthTaintsInSlices(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	e := newEnv(t)
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
	noReset := resourceapi.DeviceTaint{Key: "vfio.dra.dev/no-reset", Effect: resourceapi.DeviceTaintEffectNone}
	e.waitTaints(ctx, t, map[string][]resourceapi.DeviceTaint{"pci-0000-84-00-0": {noReset}})

	// The SmartNIC falls off the bus.
	if err := e.tree.WriteDeviceFile("0000:82:00.0", "config", strings.Repeat("\xff", 256)); err != nil {
		t.Fatal(err)
	}
	if changed, err := d.Resync(ctx); err != nil || !changed {
		t.Fatalf("Resync after the NIC fell off the bus = %v, %v; want a publication", changed, err)
	}
	e.waitTaints(ctx, t, map[string][]resourceapi.DeviceTaint{
		"pci-0000-84-00-0": {noReset},
		"pci-0000-82-00-0": {noSchedule("vfio.dra.dev/unhealthy", "off-bus")},
	})

	// It answers again.
	if err := e.tree.WriteDeviceFile("0000:82:00.0", "config", "\xee\x19\x00\x40"+strings.Repeat("\x00", 252)); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Resync(ctx); err != nil {
		t.Fatal(err)
	}
	e.waitTaints(ctx, t, map[string][]resourceapi.DeviceTaint{"pci-0000-84-00-0": {noReset}})

	// A fatal AER error is cheap to see: the fast check publishes it.
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
	e.waitTaints(ctx, t, map[string][]resourceapi.DeviceTaint{
		"pci-0000-84-00-0": {noReset},
		"pci-0000-83-00-0": {noSchedule("vfio.dra.dev/unhealthy", "aer-fatal")},
	})
}

// healthWatch is the kubelet's end of the DRAResourceHealth stream.
type healthWatch struct {
	stream grpc.ServerStreamingClient[drahealthv1.NodeWatchResourcesResponse]
}

func (n *node) watchHealth(ctx context.Context, t *testing.T) *healthWatch {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+filepath.Join(n.cfg.PluginDataDir, "dra.sock"),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	stream, err := drahealthv1.NewDRAResourceHealthClient(conn).NodeWatchResources(ctx, &drahealthv1.NodeWatchResourcesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return &healthWatch{stream: stream}
}

// until receives reports until one has device with health, and returns
// its message. Reports come after each check; check runs one.
func (w *healthWatch) until(t *testing.T, check func() error, device string, health drahealthv1.HealthStatus) string {
	t.Helper()
	for range 20 {
		if err := check(); err != nil {
			t.Fatal(err)
		}
		resp, err := w.stream.Recv()
		if err != nil {
			t.Fatalf("health stream: %v", err)
		}
		for _, d := range resp.Devices {
			if d.Device.PoolName != nodeName {
				t.Errorf("health of %s reported in pool %q", d.Device.DeviceName, d.Device.PoolName)
			}
			if d.Device.DeviceName == device && d.Health == health {
				if d.HealthCheckTimeoutSeconds != 30 || d.LastUpdatedTime == 0 {
					t.Errorf("device %s: timeout %ds, last updated %d; want 30s and a time", device, d.HealthCheckTimeoutSeconds, d.LastUpdatedTime)
				}
				return d.Message
			}
		}
	}
	t.Fatalf("device %s never reported %v", device, health)
	return ""
}

// TestHealthGoneWhilePrepared: a prepared function that disappears stays
// published with a NoExecute taint (the eviction controller needs it in
// the slice, and its group's counter stays consumed), is reported
// Unhealthy to the kubelet over the real gRPC stream, and is no longer
// published once its claim is unprepared.
func TestHealthGoneWhilePrepared(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.start(ctx, t)
	w := n.watchHealth(ctx, t)
	check := func() error { return n.driver.CheckHealth(ctx) }
	w.until(t, check, "pci-0000-01-00-0", drahealthv1.HealthStatus_HEALTHY)

	claim := n.createClaim(ctx, t, "gpu", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.0")})
	n.mustPrepare(ctx, t, claim)
	if err := n.tree.Remove("0000:01:00.0"); err != nil {
		t.Fatal(err)
	}
	msg := w.until(t, check, "pci-0000-01-00-0", drahealthv1.HealthStatus_UNHEALTHY)
	if !strings.Contains(msg, "0000:01:00.0 is no longer on the bus") {
		t.Errorf("health message %q", msg)
	}
	slices := n.waitTaints(ctx, t, map[string][]resourceapi.DeviceTaint{
		"pci-0000-01-00-0": {{Key: "vfio.dra.dev/gone", Effect: resourceapi.DeviceTaintEffectNoExecute}},
	})
	gpu := devicesByName(slices)["pci-0000-01-00-0"]
	if len(gpu.ConsumesCounters) != 1 || gpu.ConsumesCounters[0].CounterSet != "iommu-group-2" {
		t.Errorf("gone GPU consumes %v, want its group's counter", gpu.ConsumesCounters)
	}
	if got := *gpu.Attributes["vendorID"].StringValue; got != "10de" {
		t.Errorf("gone GPU published with vendorID %q, want it as it was seen", got)
	}
	if _, ok := devicesByName(slices)["pci-0000-01-00-1"]; !ok {
		t.Errorf("the audio function of the group is no longer published")
	}

	n.mustUnprepare(ctx, t, claimRef(claim))
	if _, err := n.driver.Resync(ctx); err != nil {
		t.Fatal(err)
	}
	n.publishedSlices(ctx, t, func(s []resourceapi.ResourceSlice) bool {
		_, ok := devicesByName(s)["pci-0000-01-00-0"]
		return !ok
	})
	n.waitTaints(ctx, t, map[string][]resourceapi.DeviceTaint{})
}

// TestHealthDriverChanged: a function of a prepared claim that another
// driver took makes the claim's device unhealthy and tainted NoSchedule;
// back on vfio-pci, it is healthy again.
func TestHealthDriverChanged(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.start(ctx, t)
	w := n.watchHealth(ctx, t)
	check := func() error { return n.driver.CheckHealth(ctx) }

	claim := n.createClaim(ctx, t, "gpu", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.0")})
	n.mustPrepare(ctx, t, claim)
	w.until(t, check, "pci-0000-01-00-0", drahealthv1.HealthStatus_HEALTHY)

	// The audio function, which moved with the GPU, is taken by its host
	// driver behind the plugin's back.
	if err := n.tree.Unbind("0000:01:00.1"); err != nil {
		t.Fatal(err)
	}
	if err := n.tree.Bind("0000:01:00.1", "snd_hda_intel"); err != nil {
		t.Fatal(err)
	}
	msg := w.until(t, check, "pci-0000-01-00-0", drahealthv1.HealthStatus_UNHEALTHY)
	if !strings.Contains(msg, "0000:01:00.1 was bound to vfio-pci for a claim but has driver snd_hda_intel now") {
		t.Errorf("health message %q", msg)
	}
	// Both the claim's device and the function itself, published too.
	n.waitTaints(ctx, t, map[string][]resourceapi.DeviceTaint{
		"pci-0000-01-00-0": {noSchedule("vfio.dra.dev/unhealthy", "driver-changed")},
		"pci-0000-01-00-1": {noSchedule("vfio.dra.dev/unhealthy", "driver-changed")},
	})

	if err := n.tree.Unbind("0000:01:00.1"); err != nil {
		t.Fatal(err)
	}
	if err := n.tree.Bind("0000:01:00.1", "vfio-pci"); err != nil {
		t.Fatal(err)
	}
	w.until(t, check, "pci-0000-01-00-0", drahealthv1.HealthStatus_HEALTHY)
	n.waitTaints(ctx, t, map[string][]resourceapi.DeviceTaint{})
	n.mustUnprepare(ctx, t, claimRef(claim))
}
