package plugin

import (
	"context"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

// Delays of republishing after this node's slices were deleted, doubled
// after each round that did not bring them back: the first lets the
// ResourceSlice controller's own informer see the deletions (it recreates
// only what its cache lacks); the later ones cover a controller whose
// informer lagged behind ours. After the last, the controller's own sync
// (30 s after the deletion) is what is left.
const (
	republishFirst = time.Second
	republishLast  = 8 * time.Second
)

// watchSlices starts watching this node's slices of the driver and, in
// the background, republishes the devices at once when someone else
// deletes them, rather than after the ResourceSlice controller's 30 s sync
// delay. A starting kubelet does that: it wipes its node's slices because no
// plugin has registered with it yet, in the background and often after this
// plugin has registered again. It returns once the watch is established; a
// watch that cannot be set up is logged, not fatal (the controller brings
// the slices back later).
func (d *Driver) watchSlices(ctx context.Context) {
	logger := klog.FromContext(ctx)
	if d.cfg.KubeClient == nil {
		return
	}
	informer := sliceInformer(d.cfg.KubeClient, d.cfg.NodeName, d.cfg.DriverName)
	deleted := make(chan struct{}, 1)
	_, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		DeleteFunc: func(obj any) {
			if tombstone, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tombstone.Obj
			}
			// A fake API server ignores field selectors.
			if s, ok := obj.(*resourceapi.ResourceSlice); !ok || s.Spec.Driver != d.cfg.DriverName || s.Spec.NodeName == nil || *s.Spec.NodeName != d.cfg.NodeName {
				return
			}
			select {
			case deleted <- struct{}{}:
			default:
			}
		},
	})
	if err != nil {
		logger.Error(err, "Watching this node's ResourceSlices; deleted slices come back after the ResourceSlice controller's delay")
		return
	}
	d.background.Go(func() { informer.RunWithContext(ctx) })
	syncCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if !cache.WaitForCacheSync(syncCtx.Done(), informer.HasSynced) {
		logger.Info("Warning: this node's ResourceSlices could not be listed; the watch that republishes deleted slices starts later")
	}
	d.background.Go(func() {
		d.republishDeleted(ctx, informer.GetStore(), deleted)
	})
}

// sliceInformer returns an informer of this node's ResourceSlices of the
// driver that stores only what the delete handler and publishedSlices read
// (name, driver, node, pool). It does not go through an informer factory:
// that would link every API group's informers and listers into the
// plugin, and store a second copy of all published devices.
func sliceInformer(client kubernetes.Interface, nodeName, driverName string) cache.SharedIndexInformer {
	selector := fields.Set{
		resourceapi.ResourceSliceSelectorNodeName: nodeName,
		resourceapi.ResourceSliceSelectorDriver:   driverName,
	}.String()
	api := client.ResourceV1().ResourceSlices()
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = selector
			return api.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = selector
			return api.Watch(ctx, o)
		},
	}
	informer := cache.NewSharedIndexInformer(cache.ToListWatcherWithWatchListSemantics(lw, client), &resourceapi.ResourceSlice{}, 0, cache.Indexers{})
	// Only fails once the informer runs.
	_ = informer.SetTransform(sliceSummary)
	return informer
}

// sliceSummary keeps of a ResourceSlice what the informer of watchSlices
// needs. It returns a new object, so that neither the devices nor the
// list the slice was decoded in (which the slice's own memory is part of)
// stay referenced by the informer's store.
func sliceSummary(obj any) (any, error) {
	s, ok := obj.(*resourceapi.ResourceSlice)
	if !ok {
		return obj, nil
	}
	return &resourceapi.ResourceSlice{
		ObjectMeta: metav1.ObjectMeta{Name: s.Name, UID: s.UID, ResourceVersion: s.ResourceVersion},
		Spec: resourceapi.ResourceSliceSpec{
			Driver:   s.Spec.Driver,
			NodeName: s.Spec.NodeName,
			Pool:     s.Spec.Pool,
		},
	}, nil
}

// republishDeleted republishes after each deletion that deleted signals
// until ctx is done.
func (d *Driver) republishDeleted(ctx context.Context, store cache.Store, deleted <-chan struct{}) {
	logger := klog.FromContext(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-deleted:
		}
		start := time.Now()
		for delay := republishFirst; delay <= republishLast; delay *= 2 {
			if !sleep(ctx, delay) {
				return
			}
			// Deletions seen by now are handled by this round.
			select {
			case <-deleted:
			default:
			}
			want := d.republish(ctx)
			if !sleep(ctx, delay) {
				return
			}
			if have := publishedSlices(store.List(), d.cfg.NodeName); have >= want {
				logger.Info("Republished ResourceSlices that were deleted", "slices", have, "after", time.Since(start).Round(time.Millisecond))
				break
			}
		}
	}
}

// republish hands the last published devices to the ResourceSlice
// controller again, which makes it sync the pool now, and returns how many
// slices the pool has.
func (d *Driver) republish(ctx context.Context) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.published == nil {
		return 0
	}
	res := d.published.resources(d.cfg.NodeName)
	if err := d.helper.PublishResources(ctx, res); err != nil {
		klog.FromContext(ctx).Error(err, "Republishing deleted ResourceSlices")
	}
	return len(res.Pools[d.cfg.NodeName].Slices)
}

// publishedSlices counts the slices of pool with its highest generation.
func publishedSlices(objs []any, pool string) int {
	var generation int64
	count := 0
	for _, obj := range objs {
		s, ok := obj.(*resourceapi.ResourceSlice)
		if !ok || s.Spec.Pool.Name != pool {
			continue
		}
		switch {
		case s.Spec.Pool.Generation > generation:
			generation, count = s.Spec.Pool.Generation, 1
		case s.Spec.Pool.Generation == generation:
			count++
		}
	}
	return count
}

// sleep waits for d and reports false if ctx ended first.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
