package plugin_test

import (
	"testing"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/klog/v2/ktesting"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// TestHealthGoneBeforeRestart: a prepared function that disappeared while
// the plugin was down is published by the new process as it was published
// when the claim was prepared (its attributes from the checkpoint, its
// group's counter), with the NoExecute gone taint.
func TestHealthGoneBeforeRestart(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.start(ctx, t)
	before := devicesByName(n.publishedSlices(ctx, t, func(s []resourceapi.ResourceSlice) bool {
		_, ok := devicesByName(s)["pci-0000-01-00-0"]
		return ok
	}))["pci-0000-01-00-0"]
	claim := n.createClaim(ctx, t, "gpu", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.0")})
	n.mustPrepare(ctx, t, claim)

	n.driver.Stop()
	if err := n.tree.Remove("0000:01:00.0"); err != nil {
		t.Fatal(err)
	}
	n.start(ctx, t)
	gone := resourceapi.DeviceTaint{Key: "vfio.dra.dev/gone", Effect: resourceapi.DeviceTaintEffectNoExecute}
	gpu := devicesByName(n.waitTaints(ctx, t, map[string][]resourceapi.DeviceTaint{"pci-0000-01-00-0": {gone}}))["pci-0000-01-00-0"]
	if diff := cmp.Diff(before.Attributes, gpu.Attributes); diff != "" {
		t.Errorf("the gone GPU is published with other attributes than before (-before +now):\n%s", diff)
	}
	if diff := cmp.Diff(before.ConsumesCounters, gpu.ConsumesCounters); diff != "" {
		t.Errorf("the gone GPU consumes other counters than before (-before +now):\n%s", diff)
	}

	n.mustUnprepare(ctx, t, claimRef(claim))
	if _, err := n.driver.Resync(ctx); err != nil {
		t.Fatal(err)
	}
	n.publishedSlices(ctx, t, func(s []resourceapi.ResourceSlice) bool {
		_, ok := devicesByName(s)["pci-0000-01-00-0"]
		return !ok
	})
}

// TestHealthAERAcrossRestart: a fatal AER count that grew while the plugin
// was down taints the device after the restart; one counted before does
// not.
func TestHealthAERAcrossRestart(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	for _, a := range []string{"0000:82:00.0", "0000:83:00.0"} {
		if err := n.tree.WriteDeviceFile(a, "aer_dev_fatal", pcitest.AERFatal(map[string]uint64{"DLP": 1})); err != nil {
			t.Fatal(err)
		}
	}
	n.start(ctx, t)
	if err := n.driver.CheckHealth(ctx); err != nil {
		t.Fatal(err)
	}
	n.waitTaints(ctx, t, map[string][]resourceapi.DeviceTaint{})
	n.driver.Stop()

	// The SmartNIC reports a fatal error while no plugin runs.
	if err := n.tree.WriteDeviceFile("0000:82:00.0", "aer_dev_fatal", pcitest.AERFatal(map[string]uint64{"DLP": 2})); err != nil {
		t.Fatal(err)
	}
	n.start(ctx, t)
	n.waitTaints(ctx, t, map[string][]resourceapi.DeviceTaint{
		"pci-0000-82-00-0": {noSchedule("vfio.dra.dev/unhealthy", "aer-fatal")},
	})
}
