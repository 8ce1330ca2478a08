package plugin_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/klog/v2/ktesting"

	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview"
	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview/hostviewtest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inspect"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/plugin"
)

const nodeName = "node-a"

type env struct {
	cfg  plugin.Config
	tree *pcitest.Tree
	// host is what the host uses (hostviewtest.Server: nothing offered).
	host   *hostviewtest.Host
	client *fake.Clientset
	// countersOff makes the fake API server behave as one with
	// DRAPartitionableDevices off: it drops shared counters.
	countersOff *atomic.Bool
}

func newEnv(t *testing.T) *env {
	t.Helper()
	// Unix socket paths are limited to 108 bytes: keep the directories short.
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	tree, err := pcitest.NewServer(filepath.Join(dir, "sys"))
	if err != nil {
		t.Fatal(err)
	}
	proc := filepath.Join(dir, "proc")
	if err := os.MkdirAll(filepath.Join(proc, "sys/kernel/random"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(proc, "sys/kernel/random/boot_id"), []byte("boot-1\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	host, err := hostviewtest.Server(tree.Root, proc)
	if err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset(&v1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName, UID: "node-uid"}})
	// The fake API server does not implement generateName; the controller
	// relies on it.
	var n int
	client.PrependReactor("create", "resourceslices", func(action k8stesting.Action) (bool, runtime.Object, error) {
		s := action.(k8stesting.CreateAction).GetObject().(*resourceapi.ResourceSlice)
		if s.Name == "" {
			n++
			s.Name = fmt.Sprintf("%s%d", s.GenerateName, n)
		}
		return false, nil, nil
	})
	// A real API server stores nothing for a dry run, and drops shared
	// counters when DRAPartitionableDevices is off.
	countersOff := &atomic.Bool{}
	for _, verb := range []string{"create", "update"} {
		client.PrependReactor(verb, "resourceslices", func(action k8stesting.Action) (bool, runtime.Object, error) {
			var s *resourceapi.ResourceSlice
			dryRun := false
			switch a := action.(type) {
			case k8stesting.CreateActionImpl:
				s, dryRun = a.GetObject().(*resourceapi.ResourceSlice), len(a.CreateOptions.DryRun) > 0
			case k8stesting.UpdateActionImpl:
				s, dryRun = a.GetObject().(*resourceapi.ResourceSlice), len(a.UpdateOptions.DryRun) > 0
			default:
				return false, nil, nil
			}
			if countersOff.Load() {
				s.Spec.SharedCounters = nil
				for i := range s.Spec.Devices {
					s.Spec.Devices[i].ConsumesCounters = nil
				}
			}
			if dryRun {
				return true, s, nil
			}
			return false, nil, nil
		})
	}
	return &env{
		tree:        tree,
		host:        host,
		client:      client,
		countersOff: countersOff,
		cfg: plugin.Config{
			DriverName:     plugin.DefaultDriverName,
			NodeName:       nodeName,
			KubeClient:     client,
			SysfsRoot:      tree.Root,
			DevRoot:        filepath.Join(dir, "dev"),
			HostDevRoot:    filepath.Join(dir, "dev"),
			CDIRoot:        filepath.Join(dir, "cdi"),
			PluginDataDir:  filepath.Join(dir, "plugin"),
			RegistrarDir:   dir,
			ProcRoot:       proc,
			RescanInterval: time.Hour,
		},
	}
}

// publishedSlices waits until the fake API server holds want slices and
// returns them in index order.
func (e *env) publishedSlices(ctx context.Context, t *testing.T, done func([]resourceapi.ResourceSlice) bool) []resourceapi.ResourceSlice {
	t.Helper()
	var got []resourceapi.ResourceSlice
	err := wait.PollUntilContextTimeout(ctx, 10*time.Millisecond, 10*time.Second, true, func(ctx context.Context) (bool, error) {
		list, err := e.client.ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		got = list.Items
		sort.Slice(got, func(i, j int) bool { return got[i].GenerateName < got[j].GenerateName })
		return done(got), nil
	})
	if err != nil {
		t.Fatalf("slices not published as expected: %v; have %d slices", err, len(got))
	}
	return got
}

// TestPublishMatchesInspect: what the plugin publishes through the real
// resourceslice controller is what `vfio-dra inspect -o json` prints.
func TestPublishMatchesInspect(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	e := newEnv(t)
	d, err := plugin.Start(ctx, e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Stop()

	fs, err := pci.NewFS(e.tree.Root)
	if err != nil {
		t.Fatal(err)
	}
	inv, err := inventory.Scan(fs, nil, nil, hostview.New(e.tree.Root, e.cfg.ProcRoot).Read(hostview.Own{}))
	if err != nil {
		t.Fatal(err)
	}
	list, err := inspect.SliceList(e.cfg.DriverName, nodeName, inv)
	if err != nil {
		t.Fatal(err)
	}
	var want []resourceapi.ResourceSlice
	for _, item := range list.Items {
		var s resourceapi.ResourceSlice
		if err := json.Unmarshal(item.Raw, &s); err != nil {
			t.Fatal(err)
		}
		want = append(want, s)
	}
	got := e.publishedSlices(ctx, t, func(s []resourceapi.ResourceSlice) bool { return len(s) == len(want) })
	for i := range want {
		if diff := cmp.Diff(want[i].Spec, got[i].Spec); diff != "" {
			t.Errorf("slice %d: inspect (-) and published (+) differ:\n%s", i, diff)
		}
		if got[i].GenerateName != want[i].GenerateName {
			t.Errorf("slice %d: generateName %q, inspect says %q", i, got[i].GenerateName, want[i].GenerateName)
		}
		if len(got[i].OwnerReferences) != 1 || got[i].OwnerReferences[0].Name != nodeName {
			t.Errorf("slice %d is not owned by the node: %v", i, got[i].OwnerReferences)
		}
	}
}

func TestResyncPublishesOnlyChanges(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	e := newEnv(t)
	d, err := plugin.Start(ctx, e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Stop()
	if changed, err := d.Resync(ctx); err != nil || changed {
		t.Fatalf("Resync on an unchanged node = %v, %v; want no publication", changed, err)
	}

	// The SmartNIC loses its driver: its driver attribute must follow.
	if err := e.tree.Unbind("0000:82:00.0"); err != nil {
		t.Fatal(err)
	}
	if changed, err := d.Resync(ctx); err != nil || !changed {
		t.Fatalf("Resync after a driver change = %v, %v; want a publication", changed, err)
	}
	e.publishedSlices(ctx, t, func(slices []resourceapi.ResourceSlice) bool {
		for _, s := range slices {
			for _, dev := range s.Spec.Devices {
				if dev.Name == "pci-0000-82-00-0" {
					return *dev.Attributes["driver"].StringValue == ""
				}
			}
		}
		return false
	})
	if changed, err := d.Resync(ctx); err != nil || changed {
		t.Fatalf("second Resync = %v, %v; want no publication", changed, err)
	}
}

// TestDeletedSlicesComeBack: a starting kubelet deletes its node's slices
// (no plugin has registered with it yet), often after this plugin has
// registered again. The plugin publishes them again within a few seconds,
// not after the ResourceSlice controller's 30 s sync delay (which
// publishedSlices' 10 s wait would not reach).
func TestDeletedSlicesComeBack(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	e := newEnv(t)
	d, err := plugin.Start(ctx, e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Stop()
	fs, err := pci.NewFS(e.tree.Root)
	if err != nil {
		t.Fatal(err)
	}
	inv, err := inventory.Scan(fs, nil, nil, hostview.New(e.tree.Root, e.cfg.ProcRoot).Read(hostview.Own{}))
	if err != nil {
		t.Fatal(err)
	}
	list, err := inspect.SliceList(e.cfg.DriverName, nodeName, inv)
	if err != nil {
		t.Fatal(err)
	}
	published := e.publishedSlices(ctx, t, func(s []resourceapi.ResourceSlice) bool { return len(s) == len(list.Items) })
	for round := range 2 {
		for _, s := range published {
			if err := e.client.ResourceV1().ResourceSlices().Delete(ctx, s.Name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		again := e.publishedSlices(ctx, t, func(s []resourceapi.ResourceSlice) bool { return len(s) == len(published) })
		for i := range published {
			if diff := cmp.Diff(published[i].Spec.Devices, again[i].Spec.Devices); diff != "" {
				t.Errorf("round %d: slice %d: devices before (-) and after (+) the deletion differ:\n%s", round, i, diff)
			}
		}
		published = again
	}
}

func TestRunStopsOnFatalError(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	e := newEnv(t)
	d, err := plugin.Start(ctx, e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Stop()
	// Recoverable errors are only logged; others end Run.
	d.HandleError(ctx, errors.Join(kubeletplugin.ErrRecoverable, errors.New("publish failed")), "publishing")
	d.HandleError(ctx, errors.New("gRPC server died"), "serving")
	if err := d.Wait(ctx); err == nil || err.Error() != "serving: gRPC server died" {
		t.Errorf("Wait() = %v, want the fatal error", err)
	}
}

func TestStartRejectsBadConfig(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	e := newEnv(t)
	e.cfg.NodeName = ""
	e.cfg.DriverName = "Not_A_Name"
	_, err := plugin.Start(ctx, e.cfg)
	if err == nil {
		t.Fatal("Start accepted a configuration without node name")
	}
	for _, want := range []string{"node name is required", `driver name "Not_A_Name"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}
