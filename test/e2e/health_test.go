package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/test/e2e/framework"
)

// waitForTaints waits until the published device has exactly the taints
// want (keys, values and effects; the API server's TimeAdded aside).
func waitForTaints(ctx context.Context, t *testing.T, cp *framework.ControlPlane, nodeName, device string, want []resourceapi.DeviceTaint) {
	t.Helper()
	err := framework.Poll(ctx, publishTimeout, fmt.Sprintf("taints %v on device %s", want, device), func(ctx context.Context) (bool, string, error) {
		items, err := framework.ListNodeSlices(ctx, cp.Client, nodeName)
		if err != nil {
			return false, "", err
		}
		for _, s := range items {
			for _, d := range s.Spec.Devices {
				if d.Name != device {
					continue
				}
				var got []resourceapi.DeviceTaint
				for _, taint := range d.Taints {
					taint.TimeAdded = nil
					got = append(got, taint)
				}
				same := len(got) == len(want)
				for i := 0; same && i < len(got); i++ {
					same = got[i].Key == want[i].Key && got[i].Value == want[i].Value && got[i].Effect == want[i].Effect
				}
				return same, fmt.Sprintf("published with taints %v", got), nil
			}
		}
		return false, "not published", nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestSchedulerHonoursHealthTaints: a function whose config space reads
// all ones (fell off the bus) is published with the driver's
// vfio.dra.dev/unhealthy NoSchedule taint, and the real kube-scheduler
// (DRADeviceTaints is GA and on in 1.37; the harness sets no feature gate)
// leaves a pod that can only use it unschedulable. Once the function
// answers again the plugin takes the taint away and the scheduler
// allocates it to the waiting pod.
func TestSchedulerHonoursHealthTaints(t *testing.T) {
	ctx := t.Context()
	cp, node := startDemoNode(t, "node-1")
	client := cp.Client
	ns, err := framework.CreateNamespace(ctx, client, "health")
	if err != nil {
		t.Fatal(err)
	}
	class := applyDeviceClass(ctx, t, cp)
	device := mustParseAddress(t, nicAddr).DeviceName()
	waitForTaints(ctx, t, cp, node.Name, device, nil)

	tree := pcitest.Open(node.SysfsRoot)
	dir, err := tree.DevicePath(nicAddr)
	if err != nil {
		t.Fatal(err)
	}
	config, err := os.ReadFile(filepath.Join(node.SysfsRoot, dir, "config"))
	if err != nil {
		t.Fatal(err)
	}
	if err := tree.WriteDeviceFile(nicAddr, "config", strings.Repeat("\xff", len(config))); err != nil {
		t.Fatal(err)
	}
	unhealthy := resourceapi.DeviceTaint{Key: driverName + "/unhealthy", Value: "off-bus", Effect: resourceapi.DeviceTaintEffectNoSchedule}
	waitForTaints(ctx, t, cp, node.Name, device, []resourceapi.DeviceTaint{unhealthy})

	createNICClaimAndPod(ctx, t, client, ns, class)
	pod, err := framework.WaitForPodUnschedulable(ctx, client, ns, "vm", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if msg := podCondition(pod, v1.PodScheduled).Message; !strings.Contains(msg, "cannot allocate all claims") {
		t.Errorf("pod unschedulable for an unexpected reason: %q", msg)
	}
	if err := framework.EnsurePodStaysUnscheduled(ctx, client, ns, "vm", 3*time.Second); err != nil {
		t.Fatal(err)
	}
	if c, err := client.ResourceV1().ResourceClaims(ns).Get(ctx, "nic", metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	} else if c.Status.Allocation != nil {
		t.Fatalf("claim for the tainted device was allocated: %v", c.Status.Allocation.Devices.Results)
	}

	// The function answers again: the next scan clears the taint.
	if err := tree.WriteDeviceFile(nicAddr, "config", string(config)); err != nil {
		t.Fatal(err)
	}
	waitForTaints(ctx, t, cp, node.Name, device, nil)
	pod, err = framework.WaitForPodScheduled(ctx, client, ns, "vm", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if pod.Spec.NodeName != node.Name {
		t.Errorf("pod bound to node %q, want %q", pod.Spec.NodeName, node.Name)
	}
	checkAllocatedDevice(t, waitForReservedClaim(ctx, t, client, pod, "nic"), node.Name, "nic", nicAddr)
}

// TestGoneDeviceEvictsPod: a prepared function that disappears from the
// bus is published with the driver's vfio.dra.dev/gone NoExecute taint,
// and the real device taint eviction controller evicts the pod that uses
// it; the claim is unprepared afterwards as the kubelet would.
func TestGoneDeviceEvictsPod(t *testing.T) {
	ctx := t.Context()
	cp := framework.StartControlPlane(t, framework.Options{
		Controllers: append(slices.Clone(framework.DefaultControllers), "device-taint-eviction-controller"),
	})
	client := cp.Client
	node, err := framework.StartNode(ctx, cp, framework.NodeOptions{
		Name:       "node-1",
		ConfigFile: filepath.Join(repoRoot(t), "demo", "config.yaml"),
		PluginArgs: []string{"--rescan-interval=1s", "--health-interval=1s"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := framework.WaitForPool(ctx, client, node.Name, publishTimeout); err != nil {
		t.Fatal(err)
	}
	ns, err := framework.CreateNamespace(ctx, client, "gone")
	if err != nil {
		t.Fatal(err)
	}
	class := applyDeviceClass(ctx, t, cp)
	createNICClaimAndPod(ctx, t, client, ns, class)
	pod, err := framework.WaitForPodScheduled(ctx, client, ns, "vm", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	claim := waitForReservedClaim(ctx, t, client, pod, "nic")
	if _, err := node.Prepare(ctx, framework.ClaimRef(claim)); err != nil {
		t.Fatal(err)
	}

	// The SmartNIC is hot-unplugged while the pod uses it.
	if err := pcitest.Open(node.SysfsRoot).Remove(nicAddr); err != nil {
		t.Fatal(err)
	}
	device := mustParseAddress(t, nicAddr).DeviceName()
	waitForTaints(ctx, t, cp, node.Name, device, []resourceapi.DeviceTaint{{Key: driverName + "/gone", Effect: resourceapi.DeviceTaintEffectNoExecute}})
	err = framework.Poll(ctx, schedulingTimeout, "pod evicted", func(ctx context.Context) (bool, string, error) {
		p, err := client.CoreV1().Pods(ns).Get(ctx, "vm", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, "deleted", nil
		}
		if err != nil {
			return false, "", err
		}
		return p.DeletionTimestamp != nil, fmt.Sprintf("deletionTimestamp %v, conditions %v", p.DeletionTimestamp, p.Status.Conditions), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := node.Unprepare(ctx, framework.ClaimRef(claim)); err != nil {
		t.Fatal(err)
	}
	checkNoSpec(t, node, string(claim.UID))
}
