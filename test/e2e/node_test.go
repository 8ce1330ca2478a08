package e2e

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"
	"k8s.io/utils/ptr"
	"tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/vfio-dra/vfio-dra-driver/test/e2e/framework"
)

// Functions of the demo server (pcitest.Server) that the node tests use.
const (
	gpuAddr   = "0000:01:00.0" // NVIDIA 10de:2204, IOMMU group 2
	audioAddr = "0000:01:00.1" // its HDMI audio function, also group 2
	nicAddr   = "0000:82:00.0" // Netronome 19ee:4000 SmartNIC, group 25 alone
	gpuGroup  = 2
	nicGroup  = 25

	// publishTimeout covers the plugin's start, its first scan and the
	// ResourceSlice controller's writes.
	publishTimeout = 30 * time.Second
)

// hostDrivers are the drivers the demo server's functions have at start.
var hostDrivers = map[string]string{
	gpuAddr:   "nvidia",
	audioAddr: "snd_hda_intel",
	nicAddr:   "nfp",
}

// repoRoot is the driver's repository, two levels above this module.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "demo", "config.yaml")); err != nil {
		t.Fatalf("repository root %s: %v", root, err)
	}
	return root
}

// startDemoNode starts a control plane and a node that runs the kubelet plugin
// on a copy of the demo server with the demo's node configuration, and waits
// until the plugin has published its pool. The plugin rescans every second,
// so a scan that changes what is published shows up within a test.
func startDemoNode(t *testing.T, nodeName string) (*framework.ControlPlane, *framework.Node) {
	t.Helper()
	ctx := t.Context()
	cp := framework.StartControlPlane(t, framework.Options{})
	node, err := framework.StartNode(ctx, cp, framework.NodeOptions{
		Name:       nodeName,
		ConfigFile: filepath.Join(repoRoot(t), "demo", "config.yaml"),
		PluginArgs: []string{"--rescan-interval=1s"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := framework.WaitForPool(ctx, cp.Client, nodeName, publishTimeout); err != nil {
		t.Fatal(err)
	}
	return cp, node
}

// applyDeviceClass creates the DeviceClass that deployments/kubernetes ships,
// with kubectl as an administrator would. Its name is the driver name.
func applyDeviceClass(ctx context.Context, t *testing.T, cp *framework.ControlPlane) string {
	t.Helper()
	path := filepath.Join(repoRoot(t), "deployments", "kubernetes", "deviceclass.yaml")
	out, err := cp.Kubectl(ctx, "apply", "-f", path)
	if err != nil {
		t.Fatal(err)
	}
	if want := "deviceclass.resource.k8s.io/" + driverName + " created"; strings.TrimSpace(out) != want {
		t.Fatalf("kubectl apply -f %s: got %q, want %q", path, out, want)
	}
	return driverName
}

// celRequest is a request for one device of class that matches expression.
func celRequest(name, class, expression string) resourceapi.DeviceRequest {
	return resourceapi.DeviceRequest{
		Name: name,
		Exactly: &resourceapi.ExactDeviceRequest{
			DeviceClassName: class,
			Selectors: []resourceapi.DeviceSelector{{CEL: &resourceapi.CELDeviceSelector{
				Expression: expression,
			}}},
		},
	}
}

// createNICClaimAndPod creates the claim "nic" for the demo node's SmartNIC
// (nicAddr) of class and the pod "vm" that uses it.
func createNICClaimAndPod(ctx context.Context, t *testing.T, client kubernetes.Interface, ns, class string) {
	t.Helper()
	claim := &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "nic"},
		Spec: resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{
			Requests: []resourceapi.DeviceRequest{celRequest("nic", class, pciBusID(nicAddr))},
		}},
	}
	if _, err := client.ResourceV1().ResourceClaims(ns).Create(ctx, claim, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().Pods(ns).Create(ctx, framework.NewPod(ns, "vm", "nic"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// pciBusID selects the function with the given address.
func pciBusID(addr string) string {
	return fmt.Sprintf(`device.attributes["resource.kubernetes.io"].pciBusID == %q`, addr)
}

// vendorDevice selects functions by PCI vendor and device ID.
func vendorDevice(vendor, device string) string {
	return fmt.Sprintf(`device.attributes[%q].vendorID == %q && device.attributes[%q].deviceID == %q`,
		driverName, vendor, driverName, device)
}

// newTemplatePod returns a pod whose container uses one claim generated from
// a ResourceClaimTemplate.
func newTemplatePod(namespace, name, podClaim, template string) *v1.Pod {
	pod := framework.NewPod(namespace, name)
	pod.Spec.ResourceClaims = []v1.PodResourceClaim{{Name: podClaim, ResourceClaimTemplateName: ptr.To(template)}}
	pod.Spec.Containers[0].Resources.Claims = []v1.ResourceClaim{{Name: podClaim}}
	return pod
}

// waitForGeneratedClaim waits until resourceclaim-controller has created the
// claim of a pod's template and recorded its name in the pod status, then
// until the claim is allocated and reserved for the pod.
func waitForGeneratedClaim(ctx context.Context, t *testing.T, client kubernetes.Interface, pod *v1.Pod, podClaim string) *resourceapi.ResourceClaim {
	t.Helper()
	var name string
	err := framework.Poll(ctx, schedulingTimeout, fmt.Sprintf("pod %s/%s names the claim for %s", pod.Namespace, pod.Name, podClaim), func(ctx context.Context) (bool, string, error) {
		p, err := client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		for _, s := range p.Status.ResourceClaimStatuses {
			if s.Name == podClaim && s.ResourceClaimName != nil {
				name = *s.ResourceClaimName
				return true, "", nil
			}
		}
		return false, fmt.Sprintf("resourceClaimStatuses %v", p.Status.ResourceClaimStatuses), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return waitForReservedClaim(ctx, t, client, pod, name)
}

// waitForReservedClaim waits until a claim is allocated and reserved for pod.
func waitForReservedClaim(ctx context.Context, t *testing.T, client kubernetes.Interface, pod *v1.Pod, claimName string) *resourceapi.ResourceClaim {
	t.Helper()
	claim, err := framework.WaitForClaim(ctx, client, pod.Namespace, claimName, schedulingTimeout, "reserved for pod "+pod.Name, func(c *resourceapi.ResourceClaim) bool {
		return c.Status.Allocation != nil && slices.ContainsFunc(c.Status.ReservedFor, func(r resourceapi.ResourceClaimConsumerReference) bool {
			return r.UID == pod.UID
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return claim
}

// checkAllocatedDevice checks that the claim got exactly one device, the
// function addr of nodeName's pool, for request.
func checkAllocatedDevice(t *testing.T, claim *resourceapi.ResourceClaim, nodeName, request, addr string) {
	t.Helper()
	device := mustParseAddress(t, addr).DeviceName()
	results := claim.Status.Allocation.Devices.Results
	if len(results) != 1 {
		t.Fatalf("ResourceClaim %s: got %d allocated devices, want 1 (%s): %+v", claim.Name, len(results), device, results)
	}
	r := results[0]
	if r.Driver != driverName || r.Pool != nodeName || r.Device != device || (request != "" && r.Request != request) {
		t.Errorf("ResourceClaim %s: allocated %s/%s/%s for request %q, want %s/%s/%s for request %q",
			claim.Name, r.Driver, r.Pool, r.Device, r.Request, driverName, nodeName, device, request)
	}
}

// checkDrivers checks the driver link of each function in want.
func checkDrivers(t *testing.T, node *framework.Node, want map[string]string) {
	t.Helper()
	for _, addr := range slices.Sorted(maps.Keys(want)) {
		got, err := node.Driver(addr)
		if err != nil {
			t.Errorf("driver of %s: %v", addr, err)
			continue
		}
		if got != want[addr] {
			t.Errorf("%s is bound to %q, want %q", addr, got, want[addr])
		}
	}
}

// allDrivers returns the driver of every PCI function of the node.
func allDrivers(t *testing.T, node *framework.Node) map[string]string {
	t.Helper()
	drivers, err := node.AllDrivers()
	if err != nil {
		t.Fatal(err)
	}
	return drivers
}

// with returns a copy of m with the given addresses set to driver.
func with(m map[string]string, driver string, addrs ...string) map[string]string {
	out := maps.Clone(m)
	for _, a := range addrs {
		out[a] = driver
	}
	return out
}

// checkGroupNode checks whether the emulated kernel has created the VFIO
// group device <dev>/vfio/<group> (a character device).
func checkGroupNode(t *testing.T, node *framework.Node, group int, wantExists bool) {
	t.Helper()
	path := filepath.Join(node.DevRoot, "vfio", fmt.Sprint(group))
	info, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if wantExists {
			t.Errorf("%s does not exist", path)
		}
	case err != nil:
		t.Error(err)
	case !wantExists:
		t.Errorf("%s exists (%v)", path, info.Mode())
	case info.Mode().Type() != fs.ModeDevice|fs.ModeCharDevice:
		t.Errorf("%s is %v, want a character device", path, info.Mode())
	}
}

// preparedDevice checks the answer to NodePrepareResources for a claim with
// one device and returns its CDI device IDs.
func preparedDevice(t *testing.T, resp *drapb.NodePrepareResourceResponse, nodeName, request, addr string) []string {
	t.Helper()
	device := mustParseAddress(t, addr).DeviceName()
	if len(resp.Devices) != 1 {
		t.Fatalf("NodePrepareResources returned %d devices, want 1 (%s): %v", len(resp.Devices), device, resp.Devices)
	}
	d := resp.Devices[0]
	if d.PoolName != nodeName || d.DeviceName != device || (request != "" && !slices.Equal(d.RequestNames, []string{request})) {
		t.Errorf("NodePrepareResources returned %s/%s for requests %v, want %s/%s for request %q", d.PoolName, d.DeviceName, d.RequestNames, nodeName, device, request)
	}
	if len(d.CdiDeviceIds) == 0 {
		t.Fatalf("NodePrepareResources returned no CDI device IDs for %s", device)
	}
	return d.CdiDeviceIds
}

// injectCDI does what a container runtime does with the CDI device IDs of a
// container: it reads the spec directory and edits an OCI spec. Every ID must
// resolve, and the ID of the driver's own device must come from the claim's
// spec file.
func injectCDI(t *testing.T, node *framework.Node, claimUID string, ids []string) *oci.Spec {
	t.Helper()
	cache, err := cdi.NewCache(cdi.WithSpecDirs(node.CDIRoot), cdi.WithAutoRefresh(false))
	if err != nil {
		t.Fatalf("CDI cache on %s: %v", node.CDIRoot, err)
	}
	if errs := cache.GetErrors(); len(errs) > 0 {
		t.Fatalf("CDI directory %s holds invalid specs: %v", node.CDIRoot, errs)
	}
	specFile := node.CDISpecPath(claimUID)
	fromClaimSpec := 0
	for _, id := range ids {
		dev := cache.GetDevice(id)
		if dev == nil {
			t.Errorf("CDI device %s is not in any spec in %s", id, node.CDIRoot)
			continue
		}
		if dev.GetSpec().GetPath() == specFile {
			fromClaimSpec++
		}
	}
	if fromClaimSpec != 1 {
		t.Errorf("%d of the CDI device IDs %v resolve in the claim's spec %s, want 1", fromClaimSpec, ids, specFile)
	}
	spec := &oci.Spec{Process: &oci.Process{}, Linux: &oci.Linux{}}
	unresolved, err := cache.InjectDevices(spec, ids...)
	if err != nil {
		t.Fatalf("InjectDevices(%v): unresolved %v: %v", ids, unresolved, err)
	}
	return spec
}

// checkInjected checks the device nodes and environment that injection gave
// a container: exactly wantPaths (container paths), each the same character
// device as the emulator's node below the node's dev root, and at least the
// variables in wantEnv.
func checkInjected(t *testing.T, node *framework.Node, spec *oci.Spec, wantPaths []string, wantEnv map[string]string) {
	t.Helper()
	var paths []string
	for _, d := range spec.Linux.Devices {
		paths = append(paths, d.Path)
		host := filepath.Join(node.DevRoot, strings.TrimPrefix(d.Path, "/dev/"))
		var st unix.Stat_t
		if err := unix.Stat(host, &st); err != nil {
			t.Errorf("injected device %s: host node: %v", d.Path, err)
			continue
		}
		if d.Type != "c" || d.Major != int64(unix.Major(st.Rdev)) || d.Minor != int64(unix.Minor(st.Rdev)) {
			t.Errorf("injected device %s is %s %d:%d, host node %s is c %d:%d", d.Path, d.Type, d.Major, d.Minor, host, unix.Major(st.Rdev), unix.Minor(st.Rdev))
		}
	}
	slices.Sort(paths)
	slices.Sort(wantPaths)
	if !slices.Equal(paths, wantPaths) {
		t.Errorf("injected device nodes %v, want %v", paths, wantPaths)
	}
	env := map[string]string{}
	for _, kv := range spec.Process.Env {
		k, v, _ := strings.Cut(kv, "=")
		env[k] = v
	}
	for k, want := range wantEnv {
		if got, ok := env[k]; !ok || got != want {
			t.Errorf("injected environment: %s=%q (set: %t), want %q; all: %v", k, got, ok, want, spec.Process.Env)
		}
	}
}

// checkNoSpec checks that the claim's CDI spec is gone.
func checkNoSpec(t *testing.T, node *framework.Node, claimUID string) {
	t.Helper()
	if _, err := os.Stat(node.CDISpecPath(claimUID)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("CDI spec %s: got %v, want it removed", node.CDISpecPath(claimUID), err)
	}
}

// driverCommand runs one of the driver's binaries and returns its stdout.
func driverCommand(ctx context.Context, t *testing.T, name string, args ...string) []byte {
	t.Helper()
	bin, err := framework.DriverBinary(name)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, stderr.String())
	}
	return out
}
