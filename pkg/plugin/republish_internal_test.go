package plugin

import (
	"context"
	"testing"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/utils/ptr"
)

// TestSliceInformerStoresSummaries: the informer that notices deleted
// slices keeps of each slice only its name, driver, node and pool, not its
// devices, and publishedSlices counts the newest generation from that.
func TestSliceInformerStoresSummaries(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	slice := func(name string, generation int64) *resourceapi.ResourceSlice {
		return &resourceapi.ResourceSlice{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"a": "b"}},
			Spec: resourceapi.ResourceSliceSpec{
				Driver:   "vfio.dra.dev",
				NodeName: ptr.To("node-a"),
				Pool:     resourceapi.ResourcePool{Name: "node-a", Generation: generation, ResourceSliceCount: 2},
				Devices:  []resourceapi.Device{{Name: "pci-0000-01-00-0"}},
			},
		}
	}
	client := fake.NewClientset(slice("old", 1), slice("new-1", 2), slice("new-2", 2))
	informer := sliceInformer(client, "node-a", "vfio.dra.dev")
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go informer.RunWithContext(ctx)
	if !cache.WaitForCacheSync(ctx.Done(), informer.HasSynced) {
		t.Fatal("informer did not sync")
	}
	objs := informer.GetStore().List()
	if len(objs) != 3 {
		t.Fatalf("store holds %d slices, want 3", len(objs))
	}
	for _, obj := range objs {
		s := obj.(*resourceapi.ResourceSlice)
		want := slice(s.Name, s.Spec.Pool.Generation)
		want.Labels, want.Spec.Devices = nil, nil
		want.ResourceVersion, want.UID = s.ResourceVersion, s.UID
		if diff := cmp.Diff(want, s); diff != "" {
			t.Errorf("stored slice %s (-want +got):\n%s", s.Name, diff)
		}
	}
	if got := publishedSlices(objs, "node-a"); got != 2 {
		t.Errorf("publishedSlices = %d, want 2 (generation 2)", got)
	}
}
