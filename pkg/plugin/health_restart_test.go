package plugin_test

import (
	"testing"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/klog/v2/ktesting"
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
