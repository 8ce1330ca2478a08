package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/test/e2e/framework"
)

const (
	driverName = "vfio.dra.dev"
	// schedulingTimeout covers the scheduler's retry back-off (up to 10s by
	// default) on a busy machine.
	schedulingTimeout = 30 * time.Second
)

// TestControlPlaneSharedCounters proves the harness against the real scheduler:
// two PCI functions of one IOMMU group are published as devices that consume the
// same counter set, which has room for one of them. A pod that gets the first
// function blocks a pod that wants the second until the first pod is gone.
func TestControlPlaneSharedCounters(t *testing.T) {
	ctx := t.Context()
	cp := framework.StartControlPlane(t, framework.Options{})
	client := cp.Client

	checkServerVersion(ctx, t, cp)

	const nodeName = "node-1"
	if _, err := framework.CreateNode(ctx, client, nodeName); err != nil {
		t.Fatal(err)
	}
	ns, err := framework.CreateNamespace(ctx, client, "shared-counters")
	if err != nil {
		t.Fatal(err)
	}

	fn0 := mustParseAddress(t, "0000:81:00.0")
	fn1 := mustParseAddress(t, "0000:81:00.1")
	createIOMMUGroupSlices(ctx, t, client, nodeName, 40, fn0, fn1)

	class := &resourceapi.DeviceClass{
		ObjectMeta: metav1.ObjectMeta{Name: "vfio-pci"},
		Spec: resourceapi.DeviceClassSpec{
			Selectors: []resourceapi.DeviceSelector{{CEL: &resourceapi.CELDeviceSelector{
				Expression: fmt.Sprintf("device.driver == %q", driverName),
			}}},
		},
	}
	if _, err := client.ResourceV1().DeviceClasses().Create(ctx, class, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create DeviceClass: %v", err)
	}
	for _, c := range []struct {
		name string
		addr pci.Address
	}{{"claim-a", fn0}, {"claim-b", fn1}} {
		claim := &resourceapi.ResourceClaim{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: c.name},
			Spec: resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{
				Requests: []resourceapi.DeviceRequest{{
					Name: "pci",
					Exactly: &resourceapi.ExactDeviceRequest{
						DeviceClassName: class.Name,
						Selectors: []resourceapi.DeviceSelector{{CEL: &resourceapi.CELDeviceSelector{
							Expression: fmt.Sprintf(`device.attributes["resource.kubernetes.io"].pciBusID == %q`, c.addr),
						}}},
					},
				}},
			}},
		}
		if _, err := client.ResourceV1().ResourceClaims(ns).Create(ctx, claim, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create ResourceClaim %s: %v", c.name, err)
		}
	}

	// The first pod gets function 0 and uses up the group's counter.
	start := time.Now()
	if _, err := client.CoreV1().Pods(ns).Create(ctx, framework.NewPod(ns, "pod-a", "claim-a"), metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod-a: %v", err)
	}
	podA, err := framework.WaitForPodScheduled(ctx, client, ns, "pod-a", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if podA.Spec.NodeName != nodeName {
		t.Errorf("pod-a bound to node %q, want %q", podA.Spec.NodeName, nodeName)
	}
	claimA, err := framework.WaitForClaim(ctx, client, ns, "claim-a", schedulingTimeout, "reserved for pod-a", func(c *resourceapi.ResourceClaim) bool {
		return c.Status.Allocation != nil && len(c.Status.ReservedFor) == 1 && c.Status.ReservedFor[0].UID == podA.UID
	})
	if err != nil {
		t.Fatal(err)
	}
	checkAllocation(t, claimA, nodeName, fn0.DeviceName())
	t.Logf("pod-a bound to %s with %s after %v", podA.Spec.NodeName, fn0.DeviceName(), time.Since(start).Round(time.Millisecond))

	// The second pod wants function 1, which needs the same counter.
	if _, err := client.CoreV1().Pods(ns).Create(ctx, framework.NewPod(ns, "pod-b", "claim-b"), metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod-b: %v", err)
	}
	podB, err := framework.WaitForPodUnschedulable(ctx, client, ns, "pod-b", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	const wantMessage = "cannot allocate all claims"
	msg := podCondition(podB, v1.PodScheduled).Message
	if !strings.Contains(msg, wantMessage) {
		t.Errorf("pod-b unschedulable for an unexpected reason: %q does not contain %q", msg, wantMessage)
	}
	t.Logf("pod-b unschedulable: %s", msg)
	// The scheduler retries; it must keep failing while pod-a holds the counter.
	if err := framework.EnsurePodStaysUnscheduled(ctx, client, ns, "pod-b", 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if claimB, err := client.ResourceV1().ResourceClaims(ns).Get(ctx, "claim-b", metav1.GetOptions{}); err != nil {
		t.Fatalf("get claim-b: %v", err)
	} else if claimB.Status.Allocation != nil {
		t.Fatalf("claim-b allocated while pod-b is unschedulable: %+v", claimB.Status.Allocation)
	}

	// Once pod-a is gone, kube-controller-manager deallocates claim-a and the
	// scheduler places pod-b.
	start = time.Now()
	if err := framework.DeletePodNow(ctx, client, ns, "pod-a", schedulingTimeout); err != nil {
		t.Fatal(err)
	}
	if _, err := framework.WaitForClaim(ctx, client, ns, "claim-a", schedulingTimeout, "deallocated", framework.ClaimDeallocated); err != nil {
		t.Fatal(err)
	}
	podB, err = framework.WaitForPodScheduled(ctx, client, ns, "pod-b", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if podB.Spec.NodeName != nodeName {
		t.Errorf("pod-b bound to node %q, want %q", podB.Spec.NodeName, nodeName)
	}
	claimB, err := framework.WaitForClaim(ctx, client, ns, "claim-b", schedulingTimeout, "allocated", framework.ClaimAllocated)
	if err != nil {
		t.Fatal(err)
	}
	checkAllocation(t, claimB, nodeName, fn1.DeviceName())
	t.Logf("pod-b bound to %s with %s %v after pod-a was deleted", podB.Spec.NodeName, fn1.DeviceName(), time.Since(start).Round(time.Millisecond))

	// kubectl sees the same state.
	out, err := cp.Kubectl(ctx, "get", "resourceclaims", "-n", ns, "-o", "jsonpath={range .items[*]}{.metadata.name}={.status.allocation.devices.results[0].device};{end}")
	if err != nil {
		t.Fatal(err)
	}
	if want := "claim-a=;claim-b=" + fn1.DeviceName() + ";"; out != want {
		t.Errorf("kubectl get resourceclaims: got %q, want %q", out, want)
	}
}

// createIOMMUGroupSlices publishes the functions of one IOMMU group as a pool of
// two ResourceSlices: one with a counter set that has room for a single device,
// one with the devices, each consuming that counter.
func createIOMMUGroupSlices(ctx context.Context, t *testing.T, client kubernetes.Interface, nodeName string, group int64, addrs ...pci.Address) {
	t.Helper()
	counterSet := fmt.Sprintf("iommu-group-%d", group)
	pool := resourceapi.ResourcePool{Name: nodeName, Generation: 1, ResourceSliceCount: 2}
	counters := &resourceapi.ResourceSlice{
		ObjectMeta: metav1.ObjectMeta{Name: nodeName + "-counters"},
		Spec: resourceapi.ResourceSliceSpec{
			Driver:   driverName,
			NodeName: ptr.To(nodeName),
			Pool:     pool,
			SharedCounters: []resourceapi.CounterSet{{
				Name:     counterSet,
				Counters: map[string]resourceapi.Counter{"owners": {Value: resource.MustParse("1")}},
			}},
		},
	}
	devices := &resourceapi.ResourceSlice{
		ObjectMeta: metav1.ObjectMeta{Name: nodeName + "-devices"},
		Spec: resourceapi.ResourceSliceSpec{
			Driver:   driverName,
			NodeName: ptr.To(nodeName),
			Pool:     pool,
		},
	}
	for _, addr := range addrs {
		devices.Spec.Devices = append(devices.Spec.Devices, resourceapi.Device{
			Name: addr.DeviceName(),
			Attributes: map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
				"resource.kubernetes.io/pciBusID": {StringValue: ptr.To(addr.String())},
				"iommuGroup":                      {IntValue: ptr.To(group)},
			},
			ConsumesCounters: []resourceapi.DeviceCounterConsumption{{
				CounterSet: counterSet,
				Counters:   map[string]resourceapi.Counter{"owners": {Value: resource.MustParse("1")}},
			}},
		})
	}
	for _, slice := range []*resourceapi.ResourceSlice{counters, devices} {
		if _, err := client.ResourceV1().ResourceSlices().Create(ctx, slice, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create ResourceSlice %s: %v", slice.Name, err)
		}
	}
}

func checkAllocation(t *testing.T, claim *resourceapi.ResourceClaim, nodeName, device string) {
	t.Helper()
	results := claim.Status.Allocation.Devices.Results
	if len(results) != 1 {
		t.Fatalf("ResourceClaim %s: got %d allocated devices, want 1: %+v", claim.Name, len(results), results)
	}
	r := results[0]
	if r.Driver != driverName || r.Pool != nodeName || r.Device != device || r.Request != "pci" {
		t.Errorf("ResourceClaim %s: allocated %s/%s/%s for request %q, want %s/%s/%s for request \"pci\"",
			claim.Name, r.Driver, r.Pool, r.Device, r.Request, driverName, nodeName, device)
	}
	sel := claim.Status.Allocation.NodeSelector
	if sel == nil || len(sel.NodeSelectorTerms) != 1 || len(sel.NodeSelectorTerms[0].MatchFields) != 1 ||
		sel.NodeSelectorTerms[0].MatchFields[0].Key != "metadata.name" ||
		len(sel.NodeSelectorTerms[0].MatchFields[0].Values) != 1 || sel.NodeSelectorTerms[0].MatchFields[0].Values[0] != nodeName {
		t.Errorf("ResourceClaim %s: node selector %+v does not select exactly node %s", claim.Name, sel, nodeName)
	}
}

// checkServerVersion checks that kubectl talks to the binaries built by
// hack/build-control-plane.sh, stamped with the Kubernetes release.
func checkServerVersion(ctx context.Context, t *testing.T, cp *framework.ControlPlane) {
	t.Helper()
	out, err := cp.Kubectl(ctx, "version", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var version struct {
		ClientVersion struct{ GitVersion string } `json:"clientVersion"`
		ServerVersion struct{ GitVersion string } `json:"serverVersion"`
	}
	if err := json.Unmarshal([]byte(out), &version); err != nil {
		t.Fatalf("decode kubectl version output %q: %v", out, err)
	}
	const want = "v1.37.2"
	if version.ClientVersion.GitVersion != want || version.ServerVersion.GitVersion != want {
		t.Errorf("kubectl version: client %q, server %q, want %s for both", version.ClientVersion.GitVersion, version.ServerVersion.GitVersion, want)
	}
}

func mustParseAddress(t *testing.T, s string) pci.Address {
	t.Helper()
	addr, err := pci.ParseAddress(s)
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

func podCondition(pod *v1.Pod, condType v1.PodConditionType) v1.PodCondition {
	for _, c := range pod.Status.Conditions {
		if c.Type == condType {
			return c
		}
	}
	return v1.PodCondition{}
}

// TestControlPlaneExtendedResource checks the controllers that extended
// resources backed by DRA need: the scheduler creates a ResourceClaim for a pod
// that asks for "vfio.dra.dev/pci: 1"; when the pod is deleted,
// resourceclaim-controller deallocates that claim, which lets a second pod have
// the device, and the garbage collector deletes the claim.
func TestControlPlaneExtendedResource(t *testing.T) {
	ctx := t.Context()
	cp := framework.StartControlPlane(t, framework.Options{})
	client := cp.Client

	const nodeName = "node-1"
	const extendedResource = v1.ResourceName("vfio.dra.dev/pci")
	if _, err := framework.CreateNode(ctx, client, nodeName); err != nil {
		t.Fatal(err)
	}
	ns, err := framework.CreateNamespace(ctx, client, "extended-resource")
	if err != nil {
		t.Fatal(err)
	}
	fn := mustParseAddress(t, "0000:3b:00.0")
	createIOMMUGroupSlices(ctx, t, client, nodeName, 12, fn)
	class := &resourceapi.DeviceClass{
		ObjectMeta: metav1.ObjectMeta{Name: "vfio-pci"},
		Spec: resourceapi.DeviceClassSpec{
			Selectors: []resourceapi.DeviceSelector{{CEL: &resourceapi.CELDeviceSelector{
				Expression: fmt.Sprintf("device.driver == %q", driverName),
			}}},
			ExtendedResourceName: ptr.To(string(extendedResource)),
		},
	}
	if _, err := client.ResourceV1().DeviceClasses().Create(ctx, class, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create DeviceClass: %v", err)
	}
	newPod := func(name string) *v1.Pod {
		pod := framework.NewPod(ns, name)
		pod.Spec.Containers[0].Resources.Limits = v1.ResourceList{extendedResource: resource.MustParse("1")}
		return pod
	}

	if _, err := client.CoreV1().Pods(ns).Create(ctx, newPod("pod-a"), metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod-a: %v", err)
	}
	if _, err := framework.WaitForPodScheduled(ctx, client, ns, "pod-a", schedulingTimeout); err != nil {
		t.Fatal(err)
	}
	var claimName string
	err = framework.Poll(ctx, schedulingTimeout, "pod-a names its extended-resource claim", func(ctx context.Context) (bool, string, error) {
		pod, err := client.CoreV1().Pods(ns).Get(ctx, "pod-a", metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		if pod.Status.ExtendedResourceClaimStatus == nil {
			return false, "status.extendedResourceClaimStatus not set", nil
		}
		claimName = pod.Status.ExtendedResourceClaimStatus.ResourceClaimName
		return true, "", nil
	})
	if err != nil {
		t.Fatal(err)
	}
	claim, err := framework.WaitForClaim(ctx, client, ns, claimName, schedulingTimeout, "allocated", framework.ClaimAllocated)
	if err != nil {
		t.Fatal(err)
	}
	if claim.Annotations[resourceapi.ExtendedResourceClaimAnnotation] != "true" {
		t.Errorf("ResourceClaim %s lacks annotation %s=true: %v", claimName, resourceapi.ExtendedResourceClaimAnnotation, claim.Annotations)
	}
	if results := claim.Status.Allocation.Devices.Results; len(results) != 1 || results[0].Device != fn.DeviceName() {
		t.Errorf("ResourceClaim %s: allocated %+v, want device %s", claimName, results, fn.DeviceName())
	}

	// The only device is taken.
	if _, err := client.CoreV1().Pods(ns).Create(ctx, newPod("pod-b"), metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod-b: %v", err)
	}
	if _, err := framework.WaitForPodUnschedulable(ctx, client, ns, "pod-b", schedulingTimeout); err != nil {
		t.Fatal(err)
	}

	if err := framework.DeletePodNow(ctx, client, ns, "pod-a", schedulingTimeout); err != nil {
		t.Fatal(err)
	}
	podB, err := framework.WaitForPodScheduled(ctx, client, ns, "pod-b", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if podB.Status.ExtendedResourceClaimStatus != nil && podB.Status.ExtendedResourceClaimStatus.ResourceClaimName == claimName {
		t.Errorf("pod-b reuses pod-a's claim %s", claimName)
	}
	err = framework.Poll(ctx, schedulingTimeout, fmt.Sprintf("ResourceClaim %s of deleted pod-a garbage-collected", claimName), func(ctx context.Context) (bool, string, error) {
		claim, err := client.ResourceV1().ResourceClaims(ns).Get(ctx, claimName, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, "", nil
		}
		if err != nil {
			return false, "", err
		}
		return false, fmt.Sprintf("still exists, owners %v, allocated %t", claim.OwnerReferences, claim.Status.Allocation != nil), nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
