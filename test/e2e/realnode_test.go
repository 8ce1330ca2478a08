package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/dynamic-resource-allocation/api/metadata"
	"k8s.io/utils/ptr"

	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview/hostviewtest"
	"github.com/vfio-dra/vfio-dra-driver/test/e2e/framework"
)

// The tests named TestRealNode* run a real kubelet, containerd, runc and
// CNI (run-node.sh, "make e2e-node"); run.sh leaves them out.

const (
	// podStartTimeout covers scheduling, the kubelet's prepare call, the
	// sandbox (CNI included) and the container.
	podStartTimeout = 2 * time.Minute
	// podGoneTimeout covers the kubelet stopping the containers (grace
	// period one second), unpreparing the claims and deleting the pod.
	podGoneTimeout = 2 * time.Minute
)

// hostSysctls are host-wide settings that a kubelet would change; a real
// node must leave them alone.
var hostSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward",
}

// startRealNode starts a control plane and a real node named nodeName that
// runs the plugin (a host process) with the demo's configuration, and waits
// until the plugin's pool is published. When the test ends, after the node
// is gone, it checks that the host's sysctls, addresses, links and cgroups
// are as before.
func startRealNode(t *testing.T, nodeName string, opts framework.RealNodeOptions) (*framework.ControlPlane, *framework.RealNode) {
	t.Helper()
	return startRealNodeWith(t, nodeName, framework.Options{}, opts)
}

// startRealNodeWith is startRealNode with a control plane started with
// cpOpts.
func startRealNodeWith(t *testing.T, nodeName string, cpOpts framework.Options, opts framework.RealNodeOptions) (*framework.ControlPlane, *framework.RealNode) {
	t.Helper()
	ctx := t.Context()
	checkHostUnchanged(t)
	cp := framework.StartControlPlane(t, cpOpts)
	opts.Node.Name = nodeName
	opts.Node.ConfigFile = filepath.Join(repoRoot(t), "demo", "config.yaml")
	opts.Node.PluginArgs = append(opts.Node.PluginArgs, "--rescan-interval=1s")
	start := time.Now()
	node, err := framework.StartRealNode(ctx, cp, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !opts.NoPlugin {
		if _, err := framework.WaitForPool(ctx, cp.Client, nodeName, publishTimeout); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("real node %s ready in %v (IP %s, bridge %s, cgroup root %s)", nodeName, time.Since(start).Round(time.Millisecond), node.IP, node.Bridge, node.CgroupRoot)
	return cp, node
}

// checkHostUnchanged records the host's sysctls, addresses, links and
// cgroups now and registers a cleanup, which runs after the control plane's
// and the node's, that compares them.
func checkHostUnchanged(t *testing.T) {
	t.Helper()
	before := hostState(t)
	t.Cleanup(func() {
		// The kernel removes the pods' veths a moment after their network
		// namespaces go.
		var diffs []string
		for range 50 {
			after := hostState(t)
			diffs = nil
			for k, v := range before {
				if after[k] != v {
					diffs = append(diffs, fmt.Sprintf("host %s changed:\nbefore: %s\nafter:  %s", k, v, after[k]))
				}
			}
			if len(diffs) == 0 {
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Error(strings.Join(diffs, "\n"))
	})
}

func hostState(t *testing.T) map[string]string {
	t.Helper()
	state := map[string]string{}
	for _, s := range hostSysctls {
		data, err := os.ReadFile(filepath.Join("/proc/sys", s))
		if err != nil {
			t.Fatalf("read sysctl %s: %v", s, err)
		}
		state["sysctl "+s] = strings.TrimSpace(string(data))
	}
	for name, args := range map[string][]string{"addresses": {"-o", "addr", "show"}, "links": {"-o", "link", "show"}} {
		out, err := exec.Command("ip", args...).Output()
		if err != nil {
			t.Fatalf("ip %v: %v", args, err)
		}
		// Only names and addresses: counters and flags of other links move.
		var lines []string
		for _, l := range strings.Split(string(out), "\n") {
			f := strings.Fields(l)
			if len(f) >= 4 && name == "addresses" {
				lines = append(lines, f[1]+" "+f[3])
			} else if len(f) >= 2 && name == "links" {
				lines = append(lines, f[1])
			}
		}
		state[name] = strings.Join(lines, " ")
	}
	entries, err := filepath.Glob("/sys/fs/cgroup/*/vfio-e2e-*")
	if err != nil {
		t.Fatal(err)
	}
	top, _ := filepath.Glob("/sys/fs/cgroup/vfio-e2e-*")
	state["node cgroups"] = strings.Join(append(entries, top...), " ")
	for _, p := range []string{"/var/lib/kubelet", "/var/lib/cni", "/var/log/containers", "/var/log/pods", "/run/containerd", "/var/run/netns"} {
		_, err := os.Stat(p)
		state["path "+p] = fmt.Sprintf("exists=%t", err == nil)
	}
	return state
}

// newWorkloadPod returns a pod whose one container, "probe", runs the
// workload image's probe: it lists and opens the VFIO device nodes, prints
// its environment and the device metadata, and then waits.
func newWorkloadPod(namespace, name string) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: v1.PodSpec{
			RestartPolicy:                 v1.RestartPolicyNever,
			TerminationGracePeriodSeconds: ptr.To[int64](1),
			Containers: []v1.Container{{
				Name:            "probe",
				Image:           framework.WorkloadImage,
				ImagePullPolicy: v1.PullNever,
				Command:         []string{"/workload", "probe", "/dev/vfio"},
			}},
		},
	}
}

// withTemplateClaim makes pod's container use a claim generated from
// template.
func withTemplateClaim(pod *v1.Pod, podClaim, template string) *v1.Pod {
	pod.Spec.ResourceClaims = append(pod.Spec.ResourceClaims, v1.PodResourceClaim{Name: podClaim, ResourceClaimTemplateName: ptr.To(template)})
	pod.Spec.Containers[0].Resources.Claims = append(pod.Spec.Containers[0].Resources.Claims, v1.ResourceClaim{Name: podClaim})
	return pod
}

// createTemplate creates a ResourceClaimTemplate with one request for a
// device of class that matches expression.
func createTemplate(ctx context.Context, t *testing.T, cp *framework.ControlPlane, ns, name, request, class, expression string) {
	t.Helper()
	template := &resourceapi.ResourceClaimTemplate{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: resourceapi.ResourceClaimTemplateSpec{Spec: resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{
			Requests: []resourceapi.DeviceRequest{celRequest(request, class, expression)},
		}}},
	}
	if _, err := cp.Client.ResourceV1().ResourceClaimTemplates(ns).Create(ctx, template, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create ResourceClaimTemplate %s: %v", name, err)
	}
}

// startPod creates pod and waits until it runs and its probe is done.
// It returns the pod and the probe's output.
func startPod(ctx context.Context, t *testing.T, cp *framework.ControlPlane, node *framework.RealNode, pod *v1.Pod) (*v1.Pod, string) {
	t.Helper()
	start := time.Now()
	if _, err := cp.Client.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod %s: %v", pod.Name, err)
	}
	running, err := framework.WaitForPodRunning(ctx, cp.Client, pod.Namespace, pod.Name, podStartTimeout)
	if err != nil {
		t.Fatal(err)
	}
	logs, err := node.WaitForPodLog(ctx, pod.Namespace, pod.Name, "probe", "== ready", podStartTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pod %s/%s running in %v on %s; its container says:\n%s", pod.Namespace, pod.Name, time.Since(start).Round(time.Millisecond), running.Spec.NodeName, logs)
	return running, logs
}

// deletePod deletes a pod and waits until the kubelet has confirmed that it
// is gone (after unpreparing its claims).
func deletePod(ctx context.Context, t *testing.T, cp *framework.ControlPlane, pod *v1.Pod) {
	t.Helper()
	start := time.Now()
	if err := cp.Client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete pod %s: %v", pod.Name, err)
	}
	err := framework.Poll(ctx, podGoneTimeout, fmt.Sprintf("pod %s/%s gone", pod.Namespace, pod.Name), func(ctx context.Context) (bool, string, error) {
		_, err := cp.Client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, "", nil
		}
		return false, fmt.Sprint(err), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pod %s/%s gone %v after deletion", pod.Namespace, pod.Name, time.Since(start).Round(time.Millisecond))
}

// checkProbe checks what the container saw: each device is a character
// device it could open, and each variable has its value.
func checkProbe(t *testing.T, logs string, devices map[string]string, env map[string]string) {
	t.Helper()
	lines := strings.Split(logs, "\n")
	has := func(pred func(string) bool) bool {
		for _, l := range lines {
			if pred(l) {
				return true
			}
		}
		return false
	}
	for path, numbers := range devices {
		if !has(func(l string) bool { return strings.HasPrefix(l, "c") && strings.HasSuffix(l, " "+numbers+" "+path) }) {
			t.Errorf("the container has no character device %s with numbers %s", path, numbers)
		}
		if !has(func(l string) bool { return strings.HasPrefix(l, "open "+path+": ok") }) {
			t.Errorf("the container could not open %s", path)
		}
	}
	for k, v := range env {
		if !has(func(l string) bool { return l == k+"="+v }) {
			t.Errorf("the container's environment lacks %s=%s", k, v)
		}
	}
}

// waitForDrivers waits until the functions have the given drivers (the
// kubelet's calls are asynchronous to the test).
func waitForDrivers(ctx context.Context, t *testing.T, node *framework.RealNode, want map[string]string) {
	t.Helper()
	err := framework.Poll(ctx, podGoneTimeout, fmt.Sprintf("drivers %v", want), func(context.Context) (bool, string, error) {
		got, err := node.AllDrivers()
		if err != nil {
			return false, "", err
		}
		for addr, d := range want {
			if got[addr] != d {
				return false, fmt.Sprintf("%s is on %q", addr, got[addr]), nil
			}
		}
		return true, "", nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// generatedClaim returns the claim that resourceclaim-controller created for
// a running pod's podClaim.
func generatedClaim(ctx context.Context, t *testing.T, cp *framework.ControlPlane, pod *v1.Pod, podClaim string) *resourceapi.ResourceClaim {
	t.Helper()
	for _, s := range pod.Status.ResourceClaimStatuses {
		if s.Name == podClaim && s.ResourceClaimName != nil {
			claim, err := cp.Client.ResourceV1().ResourceClaims(pod.Namespace).Get(ctx, *s.ResourceClaimName, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			return claim
		}
	}
	t.Fatalf("pod %s/%s names no claim for %s: %v", pod.Namespace, pod.Name, podClaim, pod.Status.ResourceClaimStatuses)
	return nil
}

// TestRealNodeSmartNIC is the whole user path on real parts: a pod with a
// ResourceClaimTemplate for the NFP4000 SmartNIC (19ee:4000) is scheduled,
// the kubelet calls the plugin's NodePrepareResources, containerd applies
// the CDI spec and runc starts the container, which finds /dev/vfio/vfio
// and its group's node as character devices it can open, and the PCI
// address and group in its environment. A pod without the claim that mounts
// the same nodes cannot open them: only the CDI spec's device rule lets a
// container in. Deleting the pod makes the kubelet unprepare: the spec goes
// and the function is back on its driver.
func TestRealNodeSmartNIC(t *testing.T) {
	ctx := t.Context()
	cp, node := startRealNode(t, "node-1", framework.RealNodeOptions{})
	ns, err := framework.CreateNamespace(ctx, cp.Client, "nic")
	if err != nil {
		t.Fatal(err)
	}
	class := applyDeviceClass(ctx, t, cp)
	createTemplate(ctx, t, cp, ns, "nic", "nic", class, vendorDevice("19ee", "4000"))
	before := allDrivers(t, node.Node)

	pod, logs := startPod(ctx, t, cp, node, withTemplateClaim(newWorkloadPod(ns, "dpdk"), "nic", "nic"))
	checkProbe(t, logs, map[string]string{
		"/dev/vfio/vfio":                      "10, 196",
		fmt.Sprintf("/dev/vfio/%d", nicGroup): fmt.Sprintf("246, %d", nicGroup),
	}, map[string]string{
		"VFIO_PCI_ADDRESSES": nicAddr,
		"VFIO_IOMMU_GROUPS":  fmt.Sprint(nicGroup),
	})
	claim := generatedClaim(ctx, t, cp, pod, "nic")
	checkAllocatedDevice(t, claim, node.Name, "nic", nicAddr)
	checkDrivers(t, node.Node, with(before, "vfio-pci", nicAddr))
	// A KubeVirt-shaped consumer: virt-launcher finds the PCI address and
	// group of its claim's device in the metadata file the kubelet mounts.
	checkMetadata(t, logs, metadata.ResourceClaimTemplateFilePath(driverName, "nic", "nic"), claim.Name, map[string]int64{nicAddr: nicGroup})
	if _, err := os.Stat(node.CDISpecPath(string(claim.UID))); err != nil {
		t.Errorf("CDI spec of the running pod's claim: %v", err)
	}

	// The same device nodes without the claim: mounted, but the devices
	// cgroup that runc sets up refuses them.
	intruder := newWorkloadPod(ns, "intruder")
	intruder.Spec.Volumes = []v1.Volume{{Name: "vfio", VolumeSource: v1.VolumeSource{HostPath: &v1.HostPathVolumeSource{Path: filepath.Join(node.DevRoot, "vfio")}}}}
	intruder.Spec.Containers[0].VolumeMounts = []v1.VolumeMount{{Name: "vfio", MountPath: "/dev/vfio"}}
	_, intruderLogs := startPod(ctx, t, cp, node, intruder)
	for _, path := range []string{"/dev/vfio/vfio", fmt.Sprintf("/dev/vfio/%d", nicGroup)} {
		if want := "open " + path + ": operation not permitted"; !strings.Contains(intruderLogs, want) {
			t.Errorf("a container without the claim that mounts %s: want %q in its output", path, want)
		}
	}

	deletePod(ctx, t, cp, pod)
	waitForDrivers(ctx, t, node, before)
	checkNoSpec(t, node.Node, string(claim.UID))
}

// metadataFile returns the content of one metadata file from the probe's
// output (the lines after "-- PATH" up to the next heading).
func metadataFile(logs, path string) (string, bool) {
	_, rest, ok := strings.Cut(logs, "-- "+path+"\n")
	if !ok {
		return "", false
	}
	var b strings.Builder
	for _, l := range strings.Split(rest, "\n") {
		if strings.HasPrefix(l, "-- ") || strings.HasPrefix(l, "== ") {
			break
		}
		b.WriteString(l + "\n")
	}
	return b.String(), true
}

// kubevirtMetadata is the part of a KEP-5304 metadata object that
// virt-launcher reads (kubevirt/kubevirt pkg/dra/metadata mirrors v1alpha1).
type kubevirtMetadata struct {
	APIVersion string `json:"apiVersion"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
	Requests []struct {
		Devices []struct {
			Name       string                                                    `json:"name"`
			Attributes map[resourceapi.QualifiedName]resourceapi.DeviceAttribute `json:"attributes"`
		} `json:"devices"`
	} `json:"requests"`
}

// checkMetadata checks the KEP-5304 metadata a container found for a
// claim's request, the way virt-launcher reads it: in the file at the
// well-known path, the first metadata.resource.k8s.io/v1alpha1 object names
// the claim and, for each device, its pciBusID and IOMMU group.
func checkMetadata(t *testing.T, logs, path, claimName string, wantDevices map[string]int64) {
	t.Helper()
	data, ok := metadataFile(logs, path)
	if !ok {
		t.Errorf("the container has no metadata file %s", path)
		return
	}
	var md *kubevirtMetadata
	var versions []string
	dec := json.NewDecoder(strings.NewReader(data))
	for dec.More() {
		var obj kubevirtMetadata
		if err := dec.Decode(&obj); err != nil {
			t.Errorf("metadata file %s: %v:\n%s", path, err, data)
			return
		}
		versions = append(versions, obj.APIVersion)
		if obj.APIVersion == "metadata.resource.k8s.io/v1alpha1" && md == nil {
			md = &obj
		}
	}
	if md == nil {
		t.Errorf("metadata file %s has no metadata.resource.k8s.io/v1alpha1 object (versions %v): virt-launcher cannot read it", path, versions)
		return
	}
	if md.Metadata.Name != claimName || len(md.Requests) != 1 {
		t.Errorf("metadata file %s is for claim %q with %d requests, want %q with 1", path, md.Metadata.Name, len(md.Requests), claimName)
		return
	}
	got := map[string]int64{}
	for _, d := range md.Requests[0].Devices {
		bus, group := d.Attributes["resource.kubernetes.io/pciBusID"], d.Attributes["iommuGroup"]
		if bus.StringValue == nil || group.IntValue == nil {
			t.Errorf("metadata file %s: device %s lacks pciBusID or iommuGroup: %v", path, d.Name, d.Attributes)
			continue
		}
		got[*bus.StringValue] = *group.IntValue
	}
	if !maps.Equal(got, wantDevices) {
		t.Errorf("metadata file %s: devices (pciBusID: iommuGroup) %v, want %v", path, got, wantDevices)
	}
}

// TestRealNodeGPUAndItsAudioFunction: a pod gets the GPU, and with it the
// whole IOMMU group (the GPU and its HDMI audio function) on vfio-pci. A
// second pod that asks for the audio function stays Pending while the first
// runs. Deleting the first pod makes the kubelet unprepare (its CDI spec is
// gone); then the second pod is scheduled and starts with the group. (It is
// prepared within a second of the first claim's unprepare, so the drivers in
// between are not observable.) Deleting it gives both functions back to their
// drivers.
func TestRealNodeGPUAndItsAudioFunction(t *testing.T) {
	ctx := t.Context()
	cp, node := startRealNode(t, "node-1", framework.RealNodeOptions{})
	ns, err := framework.CreateNamespace(ctx, cp.Client, "gpu")
	if err != nil {
		t.Fatal(err)
	}
	class := applyDeviceClass(ctx, t, cp)
	createTemplate(ctx, t, cp, ns, "gpu", "gpu", class, vendorDevice("10de", "2204"))
	createTemplate(ctx, t, cp, ns, "audio", "audio", class, pciBusID(audioAddr))
	before := allDrivers(t, node.Node)
	group := fmt.Sprintf("/dev/vfio/%d", gpuGroup)

	vm, logs := startPod(ctx, t, cp, node, withTemplateClaim(newWorkloadPod(ns, "vm"), "gpu", "gpu"))
	checkProbe(t, logs, map[string]string{"/dev/vfio/vfio": "10, 196", group: fmt.Sprintf("246, %d", gpuGroup)}, map[string]string{
		"VFIO_PCI_ADDRESSES":                         gpuAddr,
		"VFIO_IOMMU_GROUPS":                          fmt.Sprint(gpuGroup),
		fmt.Sprintf("VFIO_IOMMU_GROUP_%d", gpuGroup): gpuAddr + "," + audioAddr,
	})
	claim := generatedClaim(ctx, t, cp, vm, "gpu")
	checkDrivers(t, node.Node, with(before, "vfio-pci", gpuAddr, audioAddr))

	audio := withTemplateClaim(newWorkloadPod(ns, "audio"), "audio", "audio")
	if _, err := cp.Client.CoreV1().Pods(ns).Create(ctx, audio, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := framework.WaitForPodUnschedulable(ctx, cp.Client, ns, "audio", schedulingTimeout); err != nil {
		t.Fatal(err)
	}
	if err := framework.EnsurePodStaysUnscheduled(ctx, cp.Client, ns, "audio", 2*time.Second); err != nil {
		t.Fatal(err)
	}

	deletePod(ctx, t, cp, vm)
	checkNoSpec(t, node.Node, string(claim.UID))

	running, err := framework.WaitForPodRunning(ctx, cp.Client, ns, "audio", podStartTimeout)
	if err != nil {
		t.Fatal(err)
	}
	logs, err = node.WaitForPodLog(ctx, ns, "audio", "probe", "== ready", podStartTimeout)
	if err != nil {
		t.Fatal(err)
	}
	checkProbe(t, logs, map[string]string{group: fmt.Sprintf("246, %d", gpuGroup)}, map[string]string{
		"VFIO_PCI_ADDRESSES": audioAddr,
		"VFIO_IOMMU_GROUPS":  fmt.Sprint(gpuGroup),
	})
	checkDrivers(t, node.Node, with(before, "vfio-pci", gpuAddr, audioAddr))
	audioClaim := generatedClaim(ctx, t, cp, running, "audio")
	deletePod(ctx, t, cp, running)
	waitForDrivers(ctx, t, node, before)
	checkNoSpec(t, node.Node, string(audioClaim.UID))
}

// nodeSnapshot is what a restart must not change: the drivers, the CDI
// specs and the published slices.
func nodeSnapshot(ctx context.Context, t *testing.T, cp *framework.ControlPlane, node *framework.RealNode) string {
	t.Helper()
	var b strings.Builder
	drivers := allDrivers(t, node.Node)
	for _, addr := range slices.Sorted(maps.Keys(drivers)) {
		fmt.Fprintf(&b, "%s %s\n", addr, drivers[addr])
	}
	specs, err := os.ReadDir(node.CDIRoot)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range specs {
		data, err := os.ReadFile(filepath.Join(node.CDIRoot, s.Name()))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s %x\n", s.Name(), sha256.Sum256(data))
	}
	items, err := framework.ListNodeSlices(ctx, cp.Client, node.Name)
	if err != nil {
		t.Fatal(err)
	}
	b.WriteString(sliceIdentities(items))
	return b.String()
}

// checkStillRunning checks that the pod runs the container it started with.
func checkStillRunning(ctx context.Context, t *testing.T, cp *framework.ControlPlane, pod *v1.Pod, what string) {
	t.Helper()
	p, err := cp.Client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p.Status.Phase != v1.PodRunning || len(p.Status.ContainerStatuses) != 1 || p.Status.ContainerStatuses[0].RestartCount != 0 ||
		p.Status.ContainerStatuses[0].ContainerID != pod.Status.ContainerStatuses[0].ContainerID {
		t.Errorf("%s: pod %s/%s is %s, container %+v; want the same container running", what, pod.Namespace, pod.Name, p.Status.Phase, p.Status.ContainerStatuses)
	}
}

// TestRealNodeRestarts restarts the kubelet and the plugin (SIGTERM, as
// on a DaemonSet update) while a pod with a prepared claim runs, in both
// orders, the second time with the kubelet restarted about a second after
// the plugin: no restart changes the functions' drivers or the CDI specs,
// the plugin's restart does not touch the slices, the pod's container keeps
// running, the kubelet connects to the new plugin, and deleting the pod
// afterwards unprepares the claim. A starting kubelet deletes its node's
// slices (no driver has registered with it yet); the plugin sees that and
// publishes the same devices again at once.
func TestRealNodeRestarts(t *testing.T) {
	ctx := t.Context()
	cp, node := startRealNode(t, "node-1", framework.RealNodeOptions{})
	ns, err := framework.CreateNamespace(ctx, cp.Client, "restart")
	if err != nil {
		t.Fatal(err)
	}
	class := applyDeviceClass(ctx, t, cp)
	createTemplate(ctx, t, cp, ns, "nic", "nic", class, vendorDevice("19ee", "4000"))
	before := allDrivers(t, node.Node)
	pod, _ := startPod(ctx, t, cp, node, withTemplateClaim(newWorkloadPod(ns, "dpdk"), "nic", "nic"))
	claim := generatedClaim(ctx, t, cp, pod, "nic")
	wantNoSlices := nodeSnapshotWithoutSlices(t, node)
	published, err := framework.ListNodeSlices(ctx, cp.Client, node.Name)
	if err != nil {
		t.Fatal(err)
	}
	wantDevices := deviceNames(published)

	restartKubelet := func(what string) {
		t.Helper()
		old, err := framework.ListNodeSlices(ctx, cp.Client, node.Name)
		if err != nil {
			t.Fatal(err)
		}
		connections, err := node.PluginConnections()
		if err != nil {
			t.Fatal(err)
		}
		node.StopKubelet()
		start := time.Now()
		if err := node.StartKubelet(ctx); err != nil {
			t.Fatal(err)
		}
		// The new kubelet finds the plugin's socket and connects again.
		if err := framework.Poll(ctx, publishTimeout, "kubelet connects to the plugin again", func(context.Context) (bool, string, error) {
			n, err := node.PluginConnections()
			return n > connections, fmt.Sprintf("%d connections in the kubelets' logs, %d before", n, connections), err
		}); err != nil {
			t.Fatal(err)
		}
		items := waitForSlicesReplaced(ctx, t, cp, node, old)
		t.Logf("%s: the plugin's slices are back %v after the kubelet's start", what, time.Since(start).Round(time.Millisecond))
		if got := deviceNames(items); got != wantDevices {
			t.Errorf("%s: the plugin publishes %s, want %s", what, got, wantDevices)
		}
		// The new kubelet's first syncs of the pod are done within its
		// sync period; the container must survive them.
		if err := node.WaitForKubeletSync(ctx, pod, podStartTimeout); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Second)
		if got := nodeSnapshotWithoutSlices(t, node); got != wantNoSlices {
			t.Errorf("%s: the node changed:\nbefore:\n%s\nafter:\n%s", what, wantNoSlices, got)
		}
		checkStillRunning(ctx, t, cp, pod, what)
	}
	restartPlugin := func(what string) {
		t.Helper()
		want := nodeSnapshot(ctx, t, cp, node)
		if err := node.StopPlugin(); err != nil {
			t.Errorf("%s: plugin exit after SIGTERM: %v", what, err)
		}
		if err := node.StartPlugin(ctx); err != nil {
			t.Fatal(err)
		}
		if got := nodeSnapshot(ctx, t, cp, node); got != want {
			t.Errorf("%s: the node changed:\nbefore:\n%s\nafter:\n%s", what, want, got)
		}
		checkStillRunning(ctx, t, cp, pod, what)
	}

	restartKubelet("after the kubelet's restart")
	restartPlugin("after the plugin's restart")
	restartPlugin("after the plugin's second restart")
	time.Sleep(time.Second)
	restartKubelet("after the kubelet's restart a second after the plugin's")

	deletePod(ctx, t, cp, pod)
	waitForDrivers(ctx, t, node, before)
	checkNoSpec(t, node.Node, string(claim.UID))
}

// waitForSlicesReplaced waits until none of old is left and the node's
// pool is complete again, and returns its slices.
func waitForSlicesReplaced(ctx context.Context, t *testing.T, cp *framework.ControlPlane, node *framework.RealNode, old []resourceapi.ResourceSlice) []resourceapi.ResourceSlice {
	t.Helper()
	gone := map[string]bool{}
	for _, s := range old {
		gone[string(s.UID)] = true
	}
	var items []resourceapi.ResourceSlice
	err := framework.Poll(ctx, 2*time.Minute, "the node's slices deleted by the kubelet and published again", func(ctx context.Context) (bool, string, error) {
		var err error
		items, err = framework.ListNodeSlices(ctx, cp.Client, node.Name)
		if err != nil {
			return false, "", err
		}
		for _, s := range items {
			if gone[string(s.UID)] {
				return false, "slice " + s.Name + " is still the one from before the restart", nil
			}
		}
		if len(items) == 0 || int64(len(items)) != items[0].Spec.Pool.ResourceSliceCount {
			return false, fmt.Sprintf("%d slices", len(items)), nil
		}
		return true, "", nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return items
}

// TestRealNodeBusyFunction: the SmartNIC was free when the scheduler
// allocated it, and the host started using it before the kubelet prepared
// the claim (an interface on it now carries a route of the host; the
// kubelet is stopped meanwhile so that the window is certain). The plugin
// reads the host view again before it writes anything and refuses the
// claim at once: the kubelet reports the plugin's error, which names the
// device and the holder (the route and the interface), in an event of the
// pod; the pod stays Pending, and nothing on the node changes.
func TestRealNodeBusyFunction(t *testing.T) {
	ctx := t.Context()
	cp, node := startRealNode(t, "node-1", framework.RealNodeOptions{})
	ns, err := framework.CreateNamespace(ctx, cp.Client, "host-use")
	if err != nil {
		t.Fatal(err)
	}
	class := applyDeviceClass(ctx, t, cp)
	createTemplate(ctx, t, cp, ns, "nic", "nic", class, vendorDevice("19ee", "4000"))
	before := nodeSnapshotWithoutSlices(t, node)

	node.StopKubelet()
	pod := withTemplateClaim(newWorkloadPod(ns, "dpdk"), "nic", "nic")
	if _, err := cp.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	err = framework.Poll(ctx, schedulingTimeout, "pod "+pod.Name+" scheduled with its claim allocated", func(ctx context.Context) (bool, string, error) {
		p, err := cp.Client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		if p.Spec.NodeName == "" || len(p.Status.ResourceClaimStatuses) == 0 || p.Status.ResourceClaimStatuses[0].ResourceClaimName == nil {
			return false, describePodScheduling(p), nil
		}
		claim, err := cp.Client.ResourceV1().ResourceClaims(ns).Get(ctx, *p.Status.ResourceClaimStatuses[0].ResourceClaimName, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		return claim.Status.Allocation != nil, "claim " + claim.Name + " not allocated", nil
	})
	if err != nil {
		t.Fatal(err)
	}
	const iface, route = "enp130s0np0", "192.168.82.0/24"
	if err := node.Host.AddInterface(hostviewtest.Interface{Name: iface, Function: nicAddr}); err != nil {
		t.Fatal(err)
	}
	if err := node.Host.AddRoute(iface, netip.MustParsePrefix(route), netip.Addr{}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := node.StartKubelet(ctx); err != nil {
		t.Fatal(err)
	}

	device := mustParseAddress(t, nicAddr).DeviceName()
	cause := fmt.Sprintf("in use: route %s (%s)", route, iface)
	var message string
	err = framework.Poll(ctx, podStartTimeout, "an event of pod "+pod.Name+" that names the device and the cause", func(ctx context.Context) (bool, string, error) {
		events, err := cp.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + pod.Name})
		if err != nil {
			return false, "", err
		}
		var seen []string
		for _, e := range events.Items {
			if e.Type == v1.EventTypeWarning && strings.Contains(e.Message, device) && strings.Contains(e.Message, cause) {
				message = e.Reason + ": " + e.Message
				return true, "", nil
			}
			seen = append(seen, e.Reason+": "+e.Message)
		}
		return false, fmt.Sprintf("events %q", seen), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("event %v after the kubelet's start: %s", time.Since(start).Round(time.Millisecond), message)
	p, err := cp.Client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p.Status.Phase != v1.PodPending || len(p.Status.ContainerStatuses) > 0 && p.Status.ContainerStatuses[0].State.Running != nil {
		t.Errorf("pod %s is %s, want Pending without a running container", pod.Name, p.Status.Phase)
	}
	if got := nodeSnapshotWithoutSlices(t, node); got != before {
		t.Errorf("the refused claim changed the node:\nbefore:\n%s\nafter:\n%s", before, got)
	}
}

// describePodScheduling says why a pod is not bound yet.
func describePodScheduling(p *v1.Pod) string {
	for _, c := range p.Status.Conditions {
		if c.Type == v1.PodScheduled {
			return fmt.Sprintf("PodScheduled=%s %s %s", c.Status, c.Reason, c.Message)
		}
	}
	return "not scheduled yet"
}

// deviceNames lists the devices of slices, sorted.
func deviceNames(items []resourceapi.ResourceSlice) string {
	var names []string
	for _, s := range items {
		for _, d := range s.Spec.Devices {
			names = append(names, d.Name)
		}
	}
	slices.Sort(names)
	return strings.Join(names, " ")
}

// nodeSnapshotWithoutSlices is nodeSnapshot without the slices (which a
// changed function changes).
func nodeSnapshotWithoutSlices(t *testing.T, node *framework.RealNode) string {
	t.Helper()
	var b strings.Builder
	drivers := allDrivers(t, node.Node)
	for _, addr := range slices.Sorted(maps.Keys(drivers)) {
		fmt.Fprintf(&b, "%s %s\n", addr, drivers[addr])
	}
	specs, err := os.ReadDir(node.CDIRoot)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range specs {
		fmt.Fprintf(&b, "%s\n", s.Name())
	}
	return b.String()
}

// TestRealNodeExtendedResource: the seed-style pod asks for the
// DeviceClass's extended resource in resources.limits and has no claim. The
// scheduler allocates the SmartNIC through DRA, the kubelet prepares the
// claim the scheduler made, and the container sees its device.
func TestRealNodeExtendedResource(t *testing.T) {
	ctx := t.Context()
	cp, node := startRealNode(t, "node-1", framework.RealNodeOptions{})
	ns, err := framework.CreateNamespace(ctx, cp.Client, "seed")
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
	if _, err := cp.Client.ResourceV1().DeviceClasses().Create(ctx, class, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create DeviceClass: %v", err)
	}
	before := allDrivers(t, node.Node)
	pod := newWorkloadPod(ns, "dpdk")
	pod.Spec.Containers[0].Resources.Limits = v1.ResourceList{extendedResource: resource.MustParse("1")}
	running, logs := startPod(ctx, t, cp, node, pod)
	checkProbe(t, logs, map[string]string{
		"/dev/vfio/vfio":                      "10, 196",
		fmt.Sprintf("/dev/vfio/%d", nicGroup): fmt.Sprintf("246, %d", nicGroup),
	}, map[string]string{"VFIO_PCI_ADDRESSES": nicAddr, "VFIO_IOMMU_GROUPS": fmt.Sprint(nicGroup)})
	if running.Status.ExtendedResourceClaimStatus == nil {
		t.Errorf("pod %s has no extendedResourceClaimStatus", pod.Name)
	}
	checkDrivers(t, node.Node, with(before, "vfio-pci", nicAddr))
	deletePod(ctx, t, cp, running)
	waitForDrivers(ctx, t, node, before)
}

// TestRealNodeDaemonSet runs the plugin as production does: the chart's
// DaemonSet (deployments/kubernetes) on the image "make image" built,
// imported into the node's containerd from its tarball, with the chart's
// ServiceAccount, RBAC and admission policy in force on an API server with
// Node and RBAC authorization, whose ServiceAccount tokens are bound to the
// pod and so to the node. A pod's claim is prepared by that plugin; a
// rolling update of the DaemonSet while the pod runs changes nothing on the
// node and keeps the container; deleting the pod afterwards makes the new
// plugin unprepare.
func TestRealNodeDaemonSet(t *testing.T) {
	ctx := t.Context()
	cp, node := startRealNodeWith(t, "node-1", framework.Options{ServiceAccounts: true}, framework.RealNodeOptions{NoPlugin: true})
	plugin, err := node.DeployChart(ctx, filepath.Join(repoRoot(t), "deployments", "kubernetes"))
	if err != nil {
		t.Fatal(err)
	}
	first, err := node.ChartPluginPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("plugin pod %s/%s runs as service account %s", first.Namespace, first.Name, first.Spec.ServiceAccountName)
	checkUnboundTokenRefused(ctx, t, cp, node, plugin.Namespace, first.Spec.ServiceAccountName)

	ns, err := framework.CreateNamespace(ctx, cp.Client, "ds")
	if err != nil {
		t.Fatal(err)
	}
	class := applyDeviceClass(ctx, t, cp)
	createTemplate(ctx, t, cp, ns, "nic", "nic", class, vendorDevice("19ee", "4000"))
	before := allDrivers(t, node.Node)
	pod, logs := startPod(ctx, t, cp, node, withTemplateClaim(newWorkloadPod(ns, "dpdk"), "nic", "nic"))
	checkProbe(t, logs, map[string]string{
		"/dev/vfio/vfio":                      "10, 196",
		fmt.Sprintf("/dev/vfio/%d", nicGroup): fmt.Sprintf("246, %d", nicGroup),
	}, map[string]string{"VFIO_PCI_ADDRESSES": nicAddr, "VFIO_IOMMU_GROUPS": fmt.Sprint(nicGroup)})
	claim := generatedClaim(ctx, t, cp, pod, "nic")
	checkDrivers(t, node.Node, with(before, "vfio-pci", nicAddr))

	want := nodeSnapshot(ctx, t, cp, node)
	second, err := node.RollChartPlugin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("rolling update: plugin pod %s replaced by %s", first.Name, second.Name)
	if got := nodeSnapshot(ctx, t, cp, node); got != want {
		t.Errorf("after the rolling update the node changed:\nbefore:\n%s\nafter:\n%s", want, got)
	}
	checkStillRunning(ctx, t, cp, pod, "after the rolling update")

	deletePod(ctx, t, cp, pod)
	waitForDrivers(ctx, t, node, before)
	checkNoSpec(t, node.Node, string(claim.UID))
}

// checkUnboundTokenRefused checks that the chart's admission policy is in
// force: the plugin's service account with a token that is not bound to a
// pod (so to no node) may not write this node's slices, although RBAC
// lets it. The plugin's pod did, so its token is bound to the node.
func checkUnboundTokenRefused(ctx context.Context, t *testing.T, cp *framework.ControlPlane, node *framework.RealNode, namespace, serviceAccount string) {
	t.Helper()
	tr, err := cp.Client.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, serviceAccount, &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := rest.AnonymousClientConfig(cp.Config)
	cfg.BearerToken = tr.Status.Token
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	items, err := framework.ListNodeSlices(ctx, client, node.Name)
	if err != nil {
		t.Fatalf("the plugin's service account cannot list slices: %v", err)
	}
	if len(items) == 0 {
		t.Fatalf("node %s has no slices", node.Name)
	}
	err = client.ResourceV1().ResourceSlices().Delete(ctx, items[0].Name, metav1.DeleteOptions{})
	if err == nil || !strings.Contains(err.Error(), "not bound to a node") {
		t.Errorf("deleting slice %s with an unbound token of %s/%s: %v, want the admission policy's refusal", items[0].Name, namespace, serviceAccount, err)
	}
}
