package plugin

import (
	"context"
	"maps"
	"slices"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/klog/v2"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/health"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/metrics"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/resources"
)

// DefaultHealthInterval is how often the cheap health checks run unless
// configured otherwise.
const DefaultHealthInterval = 10 * time.Second

// verdict is the health of the node's devices after one check.
type verdict struct {
	// inv is the scanned inventory plus the devices that are gone but
	// still held by a prepared claim.
	inv *inventory.Inventory
	// status is keyed by device name.
	status map[string]health.Status
}

// judge checks the offered functions of inv and every function a prepared
// claim holds. The caller holds scanMu for writing, so that no prepare or unprepare
// moves a driver between reading cp and reading sysfs.
//
// A device that disappeared while a claim holds it stays published, with a
// NoExecute taint: the scheduler keeps its IOMMU group's counter consumed
// (another member must not go to a second claim while the group is still
// bound for the first), and the device taint eviction controller, which
// only sees devices in ResourceSlices, evicts the pods that lost it. Once
// the claim is unprepared, the device is no longer published. An unclaimed
// device that disappeared is simply no longer published.
func (d *Driver) judge(ctx context.Context, inv *inventory.Inventory, cp *checkpoint.Checkpoint, deep bool) verdict {
	byAddr := map[pci.Address]health.Function{}
	owners := map[pci.Address][]string{}
	offered := map[pci.Address]bool{}
	for _, dec := range inv.Offered() {
		a := dec.Device.Address
		offered[a] = true
		byAddr[a] = health.Function{Address: a}
		owners[a] = []string{a.DeviceName()}
		d.seen[a] = dec
	}
	held := map[pci.Address]checkpoint.Device{}
	for _, c := range cp.Claims {
		if c.State != checkpoint.PrepareCompleted {
			continue // in flux: judged once the prepare finished or was undone
		}
		for _, dev := range c.Devices {
			i := slices.IndexFunc(c.Groups, func(g checkpoint.Group) bool { return g.Number == dev.IOMMUGroup })
			if i < 0 {
				continue
			}
			if a, err := pci.ParseAddress(dev.PCIAddress); err == nil {
				held[a] = dev
			}
			// The functions that moved with the device are its health too.
			for _, m := range c.Groups[i].Members {
				a, err := pci.ParseAddress(m.Address)
				if err != nil {
					continue
				}
				byAddr[a] = health.Function{Address: a, BoundTo: c.Groups[i].TargetOf(m)}
				if !slices.Contains(owners[a], dev.Device) {
					owners[a] = append(owners[a], dev.Device)
				}
			}
		}
	}
	for a := range d.seen {
		if _, ok := byAddr[a]; !ok {
			delete(d.seen, a)
		}
	}

	fns := make([]health.Function, 0, len(byAddr))
	for _, fn := range byAddr {
		fns = append(fns, fn)
	}
	results, errs := d.health.Check(fns, deep)
	logger := klog.FromContext(ctx)
	for _, err := range errs {
		if deep {
			logger.Error(err, "Device health check could not read an attribute")
		} else {
			logger.V(4).Info("Device health check could not read an attribute", "err", err)
		}
	}
	v := verdict{inv: &inventory.Inventory{Decisions: slices.Clone(inv.Decisions), Problems: inv.Problems}, status: map[string]health.Status{}}
	for a, st := range results {
		for _, name := range owners[a] {
			v.status[name] = v.status[name].Merge(st)
		}
	}
	for a, dev := range held {
		if offered[a] || !v.status[dev.Device].Gone() {
			continue
		}
		ghost, ok := d.seen[a]
		if !ok {
			// Gone before this process saw it (the plugin restarted):
			// publish what the checkpoint knows, enough for the group's
			// counter and for eviction.
			group := dev.IOMMUGroup
			ghost = inventory.Decision{Device: &pci.Device{Address: a, IOMMUGroup: &group, NUMANode: -1}}
			for _, c := range cp.Claims {
				for _, g := range c.Groups {
					if g.Number == group {
						for _, m := range g.Members {
							if ma, err := pci.ParseAddress(m.Address); err == nil {
								ghost.GroupMembers = append(ghost.GroupMembers, ma)
							}
						}
					}
				}
			}
		}
		ghost.Offered, ghost.Reason = true, ""
		v.inv.Decisions = slices.DeleteFunc(v.inv.Decisions, func(x inventory.Decision) bool { return x.Device.Address == a })
		v.inv.Decisions = append(v.inv.Decisions, ghost)
	}
	slices.SortFunc(v.inv.Decisions, func(x, y inventory.Decision) int { return x.Device.Address.Compare(y.Device.Address) })
	return v
}

// publication is what a verdict publishes: the decisions on the functions
// and the devices' taints. Resources are built from it alone, so two equal
// publications publish the same slices.
type publication struct {
	inv    *inventory.Inventory
	taints map[string][]resourceapi.DeviceTaint
}

// publication returns what to publish for the verdict; withoutCounters
// leaves out the devices that need shared counters.
func (v verdict) publication(driverName string, withoutCounters bool) publication {
	taints := map[string][]resourceapi.DeviceTaint{}
	for name, st := range v.status {
		if t := st.Taints(driverName); len(t) > 0 {
			taints[name] = t
		}
	}
	inv := v.inv
	if withoutCounters {
		inv = resources.WithoutSharedGroups(inv)
	}
	return publication{inv: inv, taints: taints}
}

// resources builds the slices of the publication.
func (p publication) resources(nodeName string) resourceslice.DriverResources {
	return resources.BuildTainted(nodeName, p.inv, p.taints)
}

// equal reports whether p publishes what o (nil: nothing yet) published,
// without building either: an unchanged rescan costs no rebuild and no
// deep comparison of the slices.
func (p publication) equal(o *publication) bool {
	return o != nil && inventory.EqualDecisions(p.inv.Decisions, o.inv.Decisions) &&
		maps.EqualFunc(p.taints, o.taints, slices.Equal[[]resourceapi.DeviceTaint])
}

// report tells the kubelet the health of every published device.
func (d *Driver) report(v verdict) {
	now := time.Now()
	var out []kubeletplugin.DeviceHealth
	var forMetrics []metrics.DeviceHealth
	for _, dec := range v.inv.Offered() {
		name := dec.Device.Address.DeviceName()
		st := v.status[name]
		h := kubeletplugin.DeviceHealth{
			PoolName: d.cfg.NodeName, DeviceName: name, Health: kubeletplugin.HealthStatusHealthy,
			LastUpdated: now, Message: st.Message(),
			// Three missed checks before the kubelet says Unknown.
			HealthCheckTimeout: 3 * d.cfg.HealthInterval,
		}
		if !st.Healthy() {
			h.Health = kubeletplugin.HealthStatusUnhealthy
		}
		out = append(out, h)
		mh := metrics.DeviceHealth{Device: name, Healthy: st.Healthy()}
		for _, t := range st.Taints(d.cfg.DriverName) {
			mh.Taints = append(mh.Taints, metrics.Taint{Key: t.Key, Effect: string(t.Effect)})
		}
		forMetrics = append(forMetrics, mh)
	}
	d.reporter.Set(out)
	d.lastHealth.Store(&forMetrics)
}

// deviceHealth is the metrics' health source: the verdict of the last
// check, as reported to the kubelet.
func (d *Driver) deviceHealth() []metrics.DeviceHealth {
	if h := d.lastHealth.Load(); h != nil {
		return *h
	}
	return nil
}

// CheckHealth runs the cheap health checks on what was last scanned and
// the prepared claims. When a taint changes it rescans and publishes;
// otherwise it only reports to the kubelet.
func (d *Driver) CheckHealth(ctx context.Context) error {
	d.mu.Lock()
	inv, published := d.scanned, d.published
	d.mu.Unlock()
	if inv == nil {
		return nil
	}
	d.scanMu.Lock()
	cp, err := d.store.Get()
	if err != nil {
		d.scanMu.Unlock()
		return err
	}
	v := d.judge(ctx, inv, cp, false)
	d.scanMu.Unlock()
	if !v.publication(d.cfg.DriverName, d.countersDropped.Load()).equal(published) {
		_, err := d.Resync(ctx)
		return err
	}
	d.report(v)
	return nil
}

// WatchHealthStatus streams the health of the published devices to the
// kubelet: a report after every check.
func (d *Driver) WatchHealthStatus(ctx context.Context, reports chan<- kubeletplugin.DeviceHealthReport) error {
	return d.reporter.Watch(ctx, reports)
}
