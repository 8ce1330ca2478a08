package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/vfio-dra/vfio-dra-driver/test/e2e/framework"
)

// TestPrepareGPUWithItsAudioFunction follows a pod from its claim template to
// the container edits: the scheduler allocates the GPU from the plugin's
// slices and binds the pod; NodePrepareResources binds the GPU's whole IOMMU
// group (the GPU and its HDMI audio function) to vfio-pci and writes a CDI
// spec that a runtime can inject; NodeUnprepareResources gives both functions
// back to their drivers.
func TestPrepareGPUWithItsAudioFunction(t *testing.T) {
	ctx := t.Context()
	cp, node := startDemoNode(t, "node-1")
	client := cp.Client
	ns, err := framework.CreateNamespace(ctx, client, "gpu")
	if err != nil {
		t.Fatal(err)
	}
	class := applyDeviceClass(ctx, t, cp)
	template := &resourceapi.ResourceClaimTemplate{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gpu"},
		Spec: resourceapi.ResourceClaimTemplateSpec{Spec: resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{
			Requests: []resourceapi.DeviceRequest{celRequest("gpu", class, vendorDevice("10de", "2204"))},
		}}},
	}
	if _, err := client.ResourceV1().ResourceClaimTemplates(ns).Create(ctx, template, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create ResourceClaimTemplate: %v", err)
	}
	if _, err := client.CoreV1().Pods(ns).Create(ctx, newTemplatePod(ns, "vm", "gpu", "gpu"), metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod: %v", err)
	}
	pod, err := framework.WaitForPodScheduled(ctx, client, ns, "vm", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if pod.Spec.NodeName != node.Name {
		t.Fatalf("pod bound to node %q, want %q", pod.Spec.NodeName, node.Name)
	}
	claim := waitForGeneratedClaim(ctx, t, client, pod, "gpu")
	checkAllocatedDevice(t, claim, node.Name, "gpu", gpuAddr)

	before := allDrivers(t, node)
	checkDrivers(t, node, hostDrivers)
	checkGroupNode(t, node, gpuGroup, false)

	// The kubelet prepares the claim before it starts the pod's containers.
	resp, err := node.Prepare(ctx, framework.ClaimRef(claim))
	if err != nil {
		t.Fatal(err)
	}
	ids := preparedDevice(t, resp, node.Name, "gpu", gpuAddr)
	t.Logf("claim %s/%s prepared, CDI devices %v", claim.Namespace, claim.Name, ids)
	// The whole group moved, and nothing else.
	after := allDrivers(t, node)
	checkDrivers(t, node, with(before, "vfio-pci", gpuAddr, audioAddr))
	for addr, d := range after {
		if d != before[addr] && addr != gpuAddr && addr != audioAddr {
			t.Errorf("%s moved from %q to %q, it is not in IOMMU group %d", addr, before[addr], d, gpuGroup)
		}
	}
	checkGroupNode(t, node, gpuGroup, true)
	spec := injectCDI(t, node, string(claim.UID), ids)
	checkInjected(t, node, spec, []string{"/dev/vfio/vfio", fmt.Sprintf("/dev/vfio/%d", gpuGroup)}, map[string]string{
		"VFIO_PCI_ADDRESSES":                         gpuAddr,
		"VFIO_IOMMU_GROUPS":                          fmt.Sprint(gpuGroup),
		"VFIO_PCI_ADDRESSES_GPU":                     gpuAddr,
		"VFIO_IOMMU_GROUPS_GPU":                      fmt.Sprint(gpuGroup),
		fmt.Sprintf("VFIO_IOMMU_GROUP_%d", gpuGroup): gpuAddr + "," + audioAddr,
	})

	// After the containers are gone the kubelet unprepares the claim.
	if err := node.Unprepare(ctx, framework.ClaimRef(claim)); err != nil {
		t.Fatal(err)
	}
	checkDrivers(t, node, before)
	checkGroupNode(t, node, gpuGroup, false)
	checkNoSpec(t, node, string(claim.UID))
}

// TestIOMMUGroupIsAllocatedWhole checks IOMMU safety end to end. A pod gets
// the GPU, which takes its audio function too. A second pod that can only use
// the audio function stays unschedulable, and a claim that names the audio
// function anyway (as a buggy scheduler would allocate it) is refused at
// prepare. Once the first pod's claim is unprepared and the pod is gone, the
// second pod is scheduled and its claim prepared.
func TestIOMMUGroupIsAllocatedWhole(t *testing.T) {
	ctx := t.Context()
	cp, node := startDemoNode(t, "node-1")
	client := cp.Client
	ns, err := framework.CreateNamespace(ctx, client, "iommu")
	if err != nil {
		t.Fatal(err)
	}
	class := applyDeviceClass(ctx, t, cp)
	for name, addr := range map[string]string{"gpu": gpuAddr, "audio": audioAddr} {
		claim := &resourceapi.ResourceClaim{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{
				Requests: []resourceapi.DeviceRequest{celRequest("dev", class, pciBusID(addr))},
			}},
		}
		if _, err := client.ResourceV1().ResourceClaims(ns).Create(ctx, claim, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create ResourceClaim %s: %v", name, err)
		}
	}
	before := allDrivers(t, node)

	if _, err := client.CoreV1().Pods(ns).Create(ctx, framework.NewPod(ns, "pod-gpu", "gpu"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	podGPU, err := framework.WaitForPodScheduled(ctx, client, ns, "pod-gpu", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	claimGPU := waitForReservedClaim(ctx, t, client, podGPU, "gpu")
	checkAllocatedDevice(t, claimGPU, node.Name, "dev", gpuAddr)
	if _, err := node.Prepare(ctx, framework.ClaimRef(claimGPU)); err != nil {
		t.Fatal(err)
	}
	checkDrivers(t, node, with(before, "vfio-pci", gpuAddr, audioAddr))

	// The audio function is still published, but its group's counter is used up.
	if _, err := client.CoreV1().Pods(ns).Create(ctx, framework.NewPod(ns, "pod-audio", "audio"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	podAudio, err := framework.WaitForPodUnschedulable(ctx, client, ns, "pod-audio", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if msg := podCondition(podAudio, v1.PodScheduled).Message; !strings.Contains(msg, "cannot allocate all claims") {
		t.Errorf("pod-audio unschedulable for an unexpected reason: %q", msg)
	}
	if err := framework.EnsurePodStaysUnscheduled(ctx, client, ns, "pod-audio", 2*time.Second); err != nil {
		t.Fatal(err)
	}

	// Defence in depth: the plugin refuses a claim for a function whose group
	// another prepared claim holds, and changes nothing.
	rogue := &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "rogue"},
		Spec: resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{
			Requests: []resourceapi.DeviceRequest{celRequest("dev", class, pciBusID(audioAddr))},
		}},
	}
	rogue, err = client.ResourceV1().ResourceClaims(ns).Create(ctx, rogue, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rogue.Status.Allocation = &resourceapi.AllocationResult{
		Devices: resourceapi.DeviceAllocationResult{Results: []resourceapi.DeviceRequestAllocationResult{{
			Request: "dev", Driver: driverName, Pool: node.Name, Device: mustParseAddress(t, audioAddr).DeviceName(),
		}}},
		NodeSelector: claimGPU.Status.Allocation.NodeSelector,
	}
	rogue, err = client.ResourceV1().ResourceClaims(ns).UpdateStatus(ctx, rogue, metav1.UpdateOptions{})
	if err != nil {
		t.Fatalf("allocate the rogue claim: %v", err)
	}
	_, err = node.Prepare(ctx, framework.ClaimRef(rogue))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("IOMMU group %d", gpuGroup)) || !strings.Contains(err.Error(), ns+"/gpu") {
		t.Errorf("prepare of a claim for %s while %s/gpu holds its group: got %v, want an error naming IOMMU group %d and the holder", audioAddr, ns, err, gpuGroup)
	}
	t.Logf("prepare of a claim for %s while %s/gpu holds its group: %v", audioAddr, ns, err)
	checkDrivers(t, node, with(before, "vfio-pci", gpuAddr, audioAddr))
	checkNoSpec(t, node, string(rogue.UID))
	if err := client.ResourceV1().ResourceClaims(ns).Delete(ctx, rogue.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// The kubelet unprepares once pod-gpu's containers are gone; then the pod
	// is deleted, and resourceclaim-controller deallocates its claim.
	if err := node.Unprepare(ctx, framework.ClaimRef(claimGPU)); err != nil {
		t.Fatal(err)
	}
	checkDrivers(t, node, before)
	if err := framework.DeletePodNow(ctx, client, ns, "pod-gpu", schedulingTimeout); err != nil {
		t.Fatal(err)
	}
	if _, err := framework.WaitForClaim(ctx, client, ns, "gpu", schedulingTimeout, "deallocated", framework.ClaimDeallocated); err != nil {
		t.Fatal(err)
	}
	podAudio, err = framework.WaitForPodScheduled(ctx, client, ns, "pod-audio", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if podAudio.Spec.NodeName != node.Name {
		t.Errorf("pod-audio bound to node %q, want %q", podAudio.Spec.NodeName, node.Name)
	}
	claimAudio := waitForReservedClaim(ctx, t, client, podAudio, "audio")
	checkAllocatedDevice(t, claimAudio, node.Name, "dev", audioAddr)

	// The audio function brings the GPU along.
	resp, err := node.Prepare(ctx, framework.ClaimRef(claimAudio))
	if err != nil {
		t.Fatal(err)
	}
	ids := preparedDevice(t, resp, node.Name, "dev", audioAddr)
	checkDrivers(t, node, with(before, "vfio-pci", gpuAddr, audioAddr))
	spec := injectCDI(t, node, string(claimAudio.UID), ids)
	checkInjected(t, node, spec, []string{"/dev/vfio/vfio", fmt.Sprintf("/dev/vfio/%d", gpuGroup)}, map[string]string{
		"VFIO_PCI_ADDRESSES":                         audioAddr,
		fmt.Sprintf("VFIO_IOMMU_GROUP_%d", gpuGroup): gpuAddr + "," + audioAddr,
	})
	if err := node.Unprepare(ctx, framework.ClaimRef(claimAudio)); err != nil {
		t.Fatal(err)
	}
	checkDrivers(t, node, before)
}

// TestExtendedResourceSmartNIC checks the interface of the device plugin that
// this driver replaces: a DeviceClass with an extended resource name lets a
// pod that asks for "devices.example.com/19ee_4000: 1" in its limits, without
// any resource claim, be scheduled through DRA onto the 19ee:4000 SmartNIC,
// whose claim the plugin then prepares.
func TestExtendedResourceSmartNIC(t *testing.T) {
	ctx := t.Context()
	cp, node := startDemoNode(t, "node-1")
	client := cp.Client
	ns, err := framework.CreateNamespace(ctx, client, "smartnic")
	if err != nil {
		t.Fatal(err)
	}
	const extendedResource = v1.ResourceName("devices.example.com/19ee_4000")
	class := &resourceapi.DeviceClass{
		ObjectMeta: metav1.ObjectMeta{Name: "smartnic-19ee-4000"},
		Spec: resourceapi.DeviceClassSpec{
			Selectors: []resourceapi.DeviceSelector{{CEL: &resourceapi.CELDeviceSelector{
				Expression: fmt.Sprintf("device.driver == %q && %s", driverName, vendorDevice("19ee", "4000")),
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
	if _, err := client.CoreV1().Pods(ns).Create(ctx, newPod("dpdk"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod, err := framework.WaitForPodScheduled(ctx, client, ns, "dpdk", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if pod.Spec.NodeName != node.Name {
		t.Fatalf("pod bound to node %q, want %q", pod.Spec.NodeName, node.Name)
	}
	var claimName string
	err = framework.Poll(ctx, schedulingTimeout, "pod names its extended-resource claim", func(ctx context.Context) (bool, string, error) {
		p, err := client.CoreV1().Pods(ns).Get(ctx, "dpdk", metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		if p.Status.ExtendedResourceClaimStatus == nil {
			return false, "status.extendedResourceClaimStatus not set", nil
		}
		claimName = p.Status.ExtendedResourceClaimStatus.ResourceClaimName
		return true, "", nil
	})
	if err != nil {
		t.Fatal(err)
	}
	claim := waitForReservedClaim(ctx, t, client, pod, claimName)
	checkAllocatedDevice(t, claim, node.Name, "", nicAddr)

	// There is one such NIC.
	if _, err := client.CoreV1().Pods(ns).Create(ctx, newPod("dpdk-2"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := framework.WaitForPodUnschedulable(ctx, client, ns, "dpdk-2", schedulingTimeout); err != nil {
		t.Fatal(err)
	}

	before := allDrivers(t, node)
	resp, err := node.Prepare(ctx, framework.ClaimRef(claim))
	if err != nil {
		t.Fatal(err)
	}
	ids := preparedDevice(t, resp, node.Name, "", nicAddr)
	checkDrivers(t, node, with(before, "vfio-pci", nicAddr))
	checkGroupNode(t, node, nicGroup, true)
	spec := injectCDI(t, node, string(claim.UID), ids)
	checkInjected(t, node, spec, []string{"/dev/vfio/vfio", fmt.Sprintf("/dev/vfio/%d", nicGroup)}, map[string]string{
		"VFIO_PCI_ADDRESSES":                         nicAddr,
		"VFIO_IOMMU_GROUPS":                          fmt.Sprint(nicGroup),
		fmt.Sprintf("VFIO_IOMMU_GROUP_%d", nicGroup): nicAddr,
	})
	if err := node.Unprepare(ctx, framework.ClaimRef(claim)); err != nil {
		t.Fatal(err)
	}
	checkDrivers(t, node, before)
	checkGroupNode(t, node, nicGroup, false)
	checkNoSpec(t, node, string(claim.UID))
}
