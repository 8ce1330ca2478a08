package e2e

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/vfio-dra/vfio-dra-driver/test/e2e/framework"
)

// TestPluginRestart stops the plugin with SIGTERM, as the kubelet does on a
// DaemonSet update, and starts it again on the same directories. The node's
// ResourceSlices are neither duplicated nor rewritten, the devices of a claim
// prepared before the restart stay bound, a repeated NodePrepareResources
// returns the same CDI devices, and NodeUnprepareResources after the restart
// gives the functions back to their host drivers.
func TestPluginRestart(t *testing.T) {
	ctx := t.Context()
	cp, node := startDemoNode(t, "node-1")
	client := cp.Client

	// From here on nothing may write the node's slices: preparing does not
	// change what is published (a function on vfio-pci shows the driver it
	// goes back to), and a restarted plugin finds its slices up to date.
	sliceSelector := fields.Set{
		resourceapi.ResourceSliceSelectorDriver:   driverName,
		resourceapi.ResourceSliceSelectorNodeName: node.Name,
	}.String()
	list, err := client.ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{FieldSelector: sliceSelector})
	if err != nil {
		t.Fatal(err)
	}
	sliceWatch, err := client.ResourceV1().ResourceSlices().Watch(ctx, metav1.ListOptions{FieldSelector: sliceSelector, ResourceVersion: list.ResourceVersion})
	if err != nil {
		t.Fatal(err)
	}
	defer sliceWatch.Stop()
	var (
		eventsMu sync.Mutex
		events   []string
	)
	go func() {
		for e := range sliceWatch.ResultChan() {
			desc := string(e.Type)
			if s, ok := e.Object.(*resourceapi.ResourceSlice); ok {
				desc += fmt.Sprintf(" %s (resourceVersion %s, generation %d)", s.Name, s.ResourceVersion, s.Spec.Pool.Generation)
			}
			eventsMu.Lock()
			events = append(events, desc)
			eventsMu.Unlock()
		}
	}()
	checkSlicesUntouched := func(when string) {
		t.Helper()
		now, err := framework.ListNodeSlices(ctx, client, node.Name)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := sliceIdentities(now), sliceIdentities(list.Items); got != want {
			t.Errorf("%s: ResourceSlices (name uid resourceVersion) changed:\n got %s\nwant %s", when, got, want)
		}
		eventsMu.Lock()
		defer eventsMu.Unlock()
		if len(events) > 0 {
			t.Errorf("%s: the node's ResourceSlices were written: %s", when, strings.Join(events, "; "))
		}
	}

	ns, err := framework.CreateNamespace(ctx, client, "restart")
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
	claim := waitForGeneratedClaim(ctx, t, client, pod, "gpu")
	checkAllocatedDevice(t, claim, node.Name, "gpu", gpuAddr)
	before := allDrivers(t, node)
	prepared, err := node.Prepare(ctx, framework.ClaimRef(claim))
	if err != nil {
		t.Fatal(err)
	}
	ids := preparedDevice(t, prepared, node.Name, "gpu", gpuAddr)
	bound := with(before, "vfio-pci", gpuAddr, audioAddr)
	checkDrivers(t, node, bound)
	// Two rescans.
	time.Sleep(2500 * time.Millisecond)
	checkSlicesUntouched("after prepare")

	start := time.Now()
	exit := node.StopPlugin()
	t.Logf("plugin stopped with SIGTERM after %v: %v", time.Since(start).Round(time.Millisecond), exit)
	if exit != nil {
		t.Errorf("the plugin did not shut down cleanly on SIGTERM (grace period %v): %v", framework.DefaultStopGracePeriod, exit)
	}
	// A clean shutdown removes the sockets, so the kubelet does not dial
	// a dead plugin.
	for _, sock := range []string{filepath.Join(node.PluginDataDir, "dra.sock"), node.RegistrationSocket()} {
		if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket %s left behind after SIGTERM (stat: %v)", sock, err)
		}
	}
	// The pod keeps its devices while the plugin is away.
	checkDrivers(t, node, bound)
	checkGroupNode(t, node, gpuGroup, true)

	if err := node.StartPlugin(ctx); err != nil {
		t.Fatal(err)
	}
	// The restarted plugin publishes once and its ResourceSlice controller
	// compares that with the slices of the pool (log level 5).
	if err := node.Plugin.WaitForLog(ctx, publishTimeout, `"Completed comparison"`); err != nil {
		t.Fatal(err)
	}
	// Two more rescans of the new process.
	time.Sleep(2500 * time.Millisecond)
	checkSlicesUntouched("after the restart")
	checkDrivers(t, node, bound)

	// The kubelet prepares again, e.g. after its own restart: same answer.
	again, err := node.Prepare(ctx, framework.ClaimRef(claim))
	if err != nil {
		t.Fatal(err)
	}
	if len(again.Devices) != len(prepared.Devices) {
		t.Fatalf("NodePrepareResources after the restart returned %d devices, before %d", len(again.Devices), len(prepared.Devices))
	}
	for i := range again.Devices {
		if !proto.Equal(again.Devices[i], prepared.Devices[i]) {
			t.Errorf("NodePrepareResources after the restart returned device %v, before %v", again.Devices[i], prepared.Devices[i])
		}
	}
	checkDrivers(t, node, bound)
	spec := injectCDI(t, node, string(claim.UID), ids)
	checkInjected(t, node, spec, []string{"/dev/vfio/vfio", fmt.Sprintf("/dev/vfio/%d", gpuGroup)}, map[string]string{
		fmt.Sprintf("VFIO_IOMMU_GROUP_%d", gpuGroup): gpuAddr + "," + audioAddr,
	})

	// The new process gives back what the old one took.
	if err := node.Unprepare(ctx, framework.ClaimRef(claim)); err != nil {
		t.Fatal(err)
	}
	checkDrivers(t, node, before)
	checkGroupNode(t, node, gpuGroup, false)
	checkNoSpec(t, node, string(claim.UID))
	checkSlicesUntouched("after unprepare")
}

// sliceIdentities describes what must not churn: each slice's name, UID and
// resourceVersion, in name order.
func sliceIdentities(items []resourceapi.ResourceSlice) string {
	ids := make([]string, 0, len(items))
	for _, s := range items {
		ids = append(ids, fmt.Sprintf("[%s %s %s]", s.Name, s.UID, s.ResourceVersion))
	}
	slices.Sort(ids)
	return strings.Join(ids, " ")
}
