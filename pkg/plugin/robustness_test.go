package plugin_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/utils/ptr"

	"github.com/google/go-cmp/cmp"

	"github.com/vfio-dra/vfio-dra-driver/pkg/cdispec"
	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/plugin"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

func TestAdminAccessIsRefused(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.start(ctx, t)
	r := result("nic", "0000:82:00.0")
	r.AdminAccess = ptr.To(true)
	claim := n.createClaim(ctx, t, "monitor", []resourceapi.DeviceRequestAllocationResult{r})
	before, writes := n.state(t), len(n.kernel.Writes())
	resp := n.prepare(ctx, t, claim)
	if !strings.Contains(resp.Error, "admin access is not supported") || !strings.Contains(resp.Error, "pci-0000-82-00-0") {
		t.Errorf("prepare error = %q, want admin access refused for the device", resp.Error)
	}
	if w := n.writesSince(writes); len(w) > 0 {
		t.Errorf("refused claim wrote sysfs: %v", w)
	}
	if diff := cmp.Diff(before, n.state(t)); diff != "" {
		t.Errorf("node changed:\n%s", diff)
	}
}

// A prepared claim that lost a function (an unprepare that failed half
// way, while a VM holds the group) is repaired by binding what is missing:
// the functions still bound get no write and the VM keeps the group.
func TestPreparedClaimThatLostAFunctionIsRepaired(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.start(ctx, t)
	const gpu, gpuAudio = "0000:01:00.0", "0000:01:00.1"
	claim := n.createClaim(ctx, t, "gpu", []resourceapi.DeviceRequestAllocationResult{result("gpu", gpu)})
	first := n.mustPrepare(ctx, t, claim)
	if err := n.kernel.SetGroupOwned(2, true); err != nil {
		t.Fatal(err)
	}
	// The unprepare got the audio function off vfio-pci, then its host
	// driver could not bind (the VM still holds the group).
	if err := n.kernel.WriteFile(n.fs.Path(pci.BusDriversDir, "vfio-pci", "unbind"), []byte(gpuAudio)); err != nil {
		t.Fatal(err)
	}
	writes := len(n.kernel.Writes())
	again := n.mustPrepare(ctx, t, claim)
	if got := n.driverOf(t, gpuAudio); got != "vfio-pci" {
		t.Errorf("audio function is on %q after the repair, want vfio-pci", got)
	}
	if w := writesFor(n.writesSince(writes), gpu); len(w) > 0 {
		t.Errorf("the repair wrote for the GPU, which stayed bound: %q", w)
	}
	if !n.kernel.GroupOwned(2) {
		t.Error("the VM lost the group during the repair")
	}
	if first[0].CdiDeviceIds[0] != again[0].CdiDeviceIds[0] {
		t.Errorf("CDI IDs changed: %v, then %v", first[0].CdiDeviceIds, again[0].CdiDeviceIds)
	}
	if err := n.kernel.SetGroupOwned(2, false); err != nil {
		t.Fatal(err)
	}
	n.mustUnprepare(ctx, t, claimRef(claim))
	for addr, want := range map[string]string{gpu: "nvidia", gpuAudio: "snd_hda_intel"} {
		if got := n.driverOf(t, addr); got != want {
			t.Errorf("%s on %q after unprepare, want %s", addr, got, want)
		}
	}
}

// hotAddWriter passes writes to the kernel and, after the first probe,
// runs hotAdd once: a function joins a group while it is being bound.
type hotAddWriter struct {
	k      *pcitest.Kernel
	once   sync.Once
	hotAdd func()
}

func (w *hotAddWriter) WriteFile(path string, data []byte) error {
	err := w.k.WriteFile(path, data)
	if filepath.Base(path) == "drivers_probe" {
		w.once.Do(w.hotAdd)
	}
	return err
}

// After binding, the group is read again: a function hot-added meanwhile
// fails the prepare, which is rolled back; the new function is left alone.
func TestHotAddedFunctionFailsThePrepare(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	const added = "0000:01:00.2"
	n.cfg.SysfsWriter = &hotAddWriter{k: n.kernel, hotAdd: func() {
		if err := n.tree.Add(pcitest.Function{Address: added, Parent: "0000:00:01.0", Vendor: 0x10de, Device: 0x1ad8, Class: 0x0c0330, Driver: "xhci_hcd", IOMMUGroup: 2}); err != nil {
			t.Error(err)
		}
	}}
	n.start(ctx, t)
	before := n.state(t)
	claim := n.createClaim(ctx, t, "gpu", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.0")})
	r := n.prepare(ctx, t, claim)
	for _, want := range []string{added, "joined IOMMU group 2", "pci-0000-01-00-0"} {
		if !strings.Contains(r.Error, want) {
			t.Errorf("prepare error %q lacks %q", r.Error, want)
		}
	}
	after := n.state(t)
	if got := after[added].Driver; got != "xhci_hcd" {
		t.Errorf("hot-added function on %q, want it left on xhci_hcd", got)
	}
	delete(after, added)
	if diff := cmp.Diff(before, after); diff != "" {
		t.Errorf("node after the failed prepare (-before +after):\n%s", diff)
	}
	if c := n.checkpoint(t).Claims[string(claim.UID)]; c != nil {
		t.Errorf("checkpoint keeps the failed claim: %+v", c)
	}
}

// A prepare that a crash cut short is rolled back when the plugin starts,
// not only when the kubelet asks for that claim again.
func TestStartRollsBackUnfinishedPrepares(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	const gpu = "0000:01:00.0"
	binder := vfio.NewBinder(n.fs, n.cfg.DevRoot, vfio.Options{Writer: n.kernel})
	members, err := binder.Snapshot([]pci.Address{mustAddr(t, gpu)})
	if err != nil {
		t.Fatal(err)
	}
	store := checkpoint.NewStore(filepath.Join(n.cfg.PluginDataDir, "checkpoint.json"))
	if err := store.Update(func(cp *checkpoint.Checkpoint) error {
		cp.BootID = "boot-1"
		cp.Claims["uid-crashed"] = &checkpoint.Claim{Namespace: "default", Name: "crashed", State: checkpoint.PrepareStarted,
			Groups: []checkpoint.Group{{Number: 2, Target: "vfio-pci", Restore: true, Members: []checkpoint.Member{checkpoint.Member(members[0])}}}}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := binder.Bind(ctx, 2, members, "vfio-pci"); err == nil {
		// Bind refuses a partial group or succeeds; either way the GPU
		// must end on nvidia after the start.
		t.Log("partial bind went through")
	}
	n.start(ctx, t)
	if got := n.driverOf(t, gpu); got != "nvidia" {
		t.Errorf("GPU on %q after the start, want nvidia", got)
	}
	if c := n.checkpoint(t).Claims["uid-crashed"]; c != nil {
		t.Errorf("unfinished claim still checkpointed: %+v", c)
	}
}

// The kubelet gives up on a call after its deadline; binding that has
// begun still finishes, so a retry does not undo and redo it.
func TestPrepareFinishesAfterTheCallerGaveUp(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.start(ctx, t)
	claim := n.createClaim(ctx, t, "nic", []resourceapi.DeviceRequestAllocationResult{result("nic", "0000:82:00.0")})
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	res, err := n.driver.PrepareResourceClaims(cancelled, []*resourceapi.ResourceClaim{claim})
	if err != nil {
		t.Fatal(err)
	}
	if r := res[claim.UID]; r.Err != nil || len(r.Devices) != 1 {
		t.Errorf("prepare with a cancelled context = %+v, want the device prepared", r)
	}
	if got := n.driverOf(t, "0000:82:00.0"); got != "vfio-pci" {
		t.Errorf("SmartNIC on %q, want vfio-pci", got)
	}
}

// publishedDevices returns the published device names and whether any
// slice has shared counters or a device consumes them.
func publishedDevices(slices []resourceapi.ResourceSlice) (map[string]bool, bool) {
	names, counters := map[string]bool{}, false
	for _, s := range slices {
		counters = counters || len(s.Spec.SharedCounters) > 0
		for _, d := range s.Spec.Devices {
			names[d.Name] = true
			counters = counters || len(d.ConsumesCounters) > 0
		}
	}
	return names, counters
}

// Without shared counters the scheduler cannot keep IOMMU groups whole: an
// API server that drops them gets only the devices of single-device groups,
// the plugin keeps preparing and unpreparing, and the other devices come
// back once the counters are kept again.
func TestNoCountersPublishesOnlySafeDevices(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.countersOff.Store(true)
	n.start(ctx, t)
	const gpu, nic = "pci-0000-01-00-0", "pci-0000-82-00-0"
	safe := func(slices []resourceapi.ResourceSlice) bool {
		names, counters := publishedDevices(slices)
		return names[nic] && !names[gpu] && !counters
	}
	got := n.publishedSlices(ctx, t, safe)
	if names, _ := publishedDevices(got); names["pci-0000-02-01-0"] || names["pci-0000-03-00-0"] || !names["pci-0000-83-00-0"] {
		t.Errorf("published without counters: %v; want only devices of single-device groups", names)
	}
	claim := n.createClaim(ctx, t, "nic", []resourceapi.DeviceRequestAllocationResult{result("nic", "0000:82:00.0")})
	n.mustPrepare(ctx, t, claim)
	n.mustUnprepare(ctx, t, claimRef(claim))

	n.countersOff.Store(false)
	if changed, err := n.driver.Resync(ctx); err != nil || !changed {
		t.Fatalf("Resync once the counters are kept = %v, %v; want the other devices published", changed, err)
	}
	n.publishedSlices(ctx, t, func(slices []resourceapi.ResourceSlice) bool {
		names, counters := publishedDevices(slices)
		return names[gpu] && counters
	})

	// The API server loses the feature while the plugin runs: the
	// resourceslice controller reports the dropped fields.
	n.countersOff.Store(true)
	desired := &resourceapi.ResourceSlice{Spec: resourceapi.ResourceSliceSpec{SharedCounters: []resourceapi.CounterSet{{Name: "iommu-group-2"}}}}
	dropped := &resourceslice.DroppedFieldsError{PoolName: nodeName, DesiredSlice: desired, ActualSlice: &resourceapi.ResourceSlice{}}
	if got := dropped.DisabledFeatures(); len(got) == 0 || got[0] != "DRAPartitionableDevices" {
		t.Fatalf("DisabledFeatures() = %v; the test does not build the error the library reports", got)
	}
	n.driver.HandleError(ctx, errors.Join(kubeletplugin.ErrRecoverable, dropped), "publishing")
	n.publishedSlices(ctx, t, safe)
	n.mustPrepare(ctx, t, claim)
	n.mustUnprepare(ctx, t, claimRef(claim))
	// Nothing fatal is pending: Wait runs until its context ends.
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := n.driver.Wait(short); err != nil {
		t.Errorf("Wait() = %v: the plugin stopped", err)
	}
}

// A crash cut a prepare short, and its rollback fails at the next start
// (the GPU's host driver module was unloaded meanwhile). The plugin starts
// all the same and serves other claims; the claim keeps its entry and its
// group, with the reason, and is rolled back in the background once the
// module is back.
func TestStartDoesNotBlockOnAFailingRollback(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	const (
		gpu      = "0000:01:00.0"
		gpuAudio = "0000:01:00.1"
	)
	binder := vfio.NewBinder(n.fs, n.cfg.DevRoot, vfio.Options{Writer: n.kernel})
	members, err := binder.Snapshot([]pci.Address{mustAddr(t, gpu), mustAddr(t, gpuAudio)})
	if err != nil {
		t.Fatal(err)
	}
	group := checkpoint.Group{Number: 2, Target: "vfio-pci", Restore: true}
	for _, m := range members {
		group.Members = append(group.Members, checkpoint.Member(m))
	}
	store := checkpoint.NewStore(filepath.Join(n.cfg.PluginDataDir, "checkpoint.json"))
	if err := store.Update(func(cp *checkpoint.Checkpoint) error {
		cp.BootID = "boot-1"
		cp.Claims["uid-crashed"] = &checkpoint.Claim{Namespace: "default", Name: "crashed", State: checkpoint.PrepareStarted, Groups: []checkpoint.Group{group}}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := binder.Bind(ctx, 2, members, "vfio-pci"); err != nil {
		t.Fatal(err)
	}
	nvidia := n.fs.Path(pci.BusDriversDir, "nvidia")
	unloaded := filepath.Join(t.TempDir(), "nvidia")
	if err := os.Rename(nvidia, unloaded); err != nil {
		t.Fatal(err)
	}

	n.start(ctx, t)
	c := n.checkpoint(t).Claims["uid-crashed"]
	if c == nil || c.State != checkpoint.PrepareStarted || !strings.Contains(c.LastError, "nvidia") || !strings.Contains(c.LastError, "driver not loaded") {
		t.Fatalf("checkpoint entry of the crashed claim = %+v, want it kept with the failed step", c)
	}
	if got := n.driverOf(t, gpuAudio); got != "snd_hda_intel" {
		t.Errorf("audio function on %q, want it given back although the GPU could not be", got)
	}
	// Other claims are served, but not on the held group.
	nic := n.createClaim(ctx, t, "nic", []resourceapi.DeviceRequestAllocationResult{result("nic", "0000:82:00.0")})
	n.mustPrepare(ctx, t, nic)
	audio := n.createClaim(ctx, t, "audio", []resourceapi.DeviceRequestAllocationResult{result("audio", gpuAudio)})
	if r := n.prepare(ctx, t, audio); !strings.Contains(r.Error, "prepared for ResourceClaim default/crashed") {
		t.Errorf("prepare on the held group: error %q, want it refused naming the crashed claim", r.Error)
	}
	n.mustUnprepare(ctx, t, claimRef(audio))

	if err := os.Rename(unloaded, nvidia); err != nil {
		t.Fatal(err)
	}
	if err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		return n.checkpoint(t).Claims["uid-crashed"] == nil, nil
	}); err != nil {
		t.Fatalf("the failed rollback was not retried: %+v", n.checkpoint(t).Claims["uid-crashed"])
	}
	if got := n.driverOf(t, gpu); got != "nvidia" {
		t.Errorf("GPU on %q after the retried rollback, want nvidia", got)
	}
	if got := n.driverOf(t, "0000:82:00.0"); got != "vfio-pci" {
		t.Errorf("SmartNIC of the other claim on %q, want vfio-pci", got)
	}
}

// A kernel built without CONFIG_VFIO_GROUP has no /dev/vfio/<group>: an
// iommufd prepare waits for the functions' cdevs instead.
func TestIOMMUFDWithoutGroupDevices(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNodeWith(t, pcitest.KernelOptions{DeviceCDev: true, NoVFIOGroup: true})
	n.mknodIOMMU(t)
	n.start(ctx, t)
	claim := n.createClaim(ctx, t, "gpu", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.0")},
		opaque(resourceapi.AllocationConfigSourceClaim, vfioConfig(`"iommufd": true`)))
	devs := n.mustPrepare(ctx, t, claim)
	paths := n.devicePaths(t, n.inject(t, allCDIIDs(devs)))
	if diff := cmp.Diff([]string{"/dev/iommu", "/dev/vfio/devices/vfio1", "/dev/vfio/devices/vfio2"}, paths); diff != "" {
		t.Errorf("injected device nodes (-want +got):\n%s", diff)
	}
	if exists(t, filepath.Join(n.cfg.DevRoot, "vfio", "2")) {
		t.Error("the kernel made a group node; the test does not test a kernel without CONFIG_VFIO_GROUP")
	}
	n.mustUnprepare(ctx, t, claimRef(claim))
}

// CDI specs and device metadata that no checkpointed claim owns (a reboot
// with a persistent /var/run/cdi, a lost checkpoint) are removed at start
// and at each resync; a prepared claim's files and other drivers' files
// stay.
func TestOrphanedSpecsAreRemoved(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	orphans := func(t *testing.T) []string {
		t.Helper()
		files := []string{
			filepath.Join(n.cfg.CDIRoot, cdispec.SpecFileName(plugin.DefaultDriverName, "uid-orphan")),
			filepath.Join(n.cfg.CDIRoot, plugin.DefaultDriverName+"_metadata_uid-orphan_nic.json"),
			filepath.Join(n.cfg.PluginDataDir, "dra-device-metadata", "default_orphan", "nic", "metadata.json"),
		}
		for _, f := range files {
			if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(f, []byte(`{}`), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return files
	}
	other := filepath.Join(n.cfg.CDIRoot, "k8s.gpu.example.com-gpu_uid-orphan.json")
	if err := os.MkdirAll(n.cfg.CDIRoot, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(other, []byte(`{}`), 0o644); err != nil {
		t.Fatal(err)
	}
	files := orphans(t)
	n.start(ctx, t)
	for _, f := range files {
		if exists(t, f) {
			t.Errorf("%s is still there after the start", f)
		}
	}
	if !exists(t, other) {
		t.Errorf("another driver's spec %s was removed", other)
	}

	claim := n.createClaim(ctx, t, "nic", []resourceapi.DeviceRequestAllocationResult{result("nic", "0000:82:00.0")})
	n.mustPrepare(ctx, t, claim)
	files = orphans(t)
	if _, err := n.driver.Resync(ctx); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if exists(t, f) {
			t.Errorf("%s is still there after a resync", f)
		}
	}
	owned := []string{n.specFile(claim), n.metadataSpecFile(claim, "nic")}
	for _, f := range owned {
		if !exists(t, f) {
			t.Errorf("the prepared claim's %s was removed", f)
		}
	}
	if dirs, _ := filepath.Glob(filepath.Join(n.cfg.PluginDataDir, "dra-device-metadata", "default_nic")); len(dirs) != 1 {
		t.Errorf("the prepared claim's metadata directory is gone")
	}
	n.mustUnprepare(ctx, t, claimRef(claim))
}
