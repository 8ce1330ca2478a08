package plugin

import (
	"context"
	"maps"
	"slices"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/equality"
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
	// attributes are what a held device that was gone before this process
	// saw it was published with, from the checkpoint: they replace what
	// can be told from the address alone.
	attributes map[string]map[resourceapi.QualifiedName]resourceapi.DeviceAttribute
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
	targets := health.TargetsOf(inv.Decisions, cp)
	offered := map[pci.Address]bool{}
	for _, dec := range inv.Offered() {
		offered[dec.Device.Address] = true
		d.seen[dec.Device.Address] = dec
	}
	for a := range d.seen {
		if _, ok := targets.Owners[a]; !ok {
			delete(d.seen, a)
		}
	}

	results, errs := d.health.Check(targets.Functions, deep)
	logger := klog.FromContext(ctx)
	for _, err := range errs {
		if deep {
			logger.Error(err, "Device health check could not read an attribute")
		} else {
			logger.V(4).Info("Device health check could not read an attribute", "err", err)
		}
	}
	v := verdict{inv: &inventory.Inventory{Decisions: slices.Clone(inv.Decisions), Problems: inv.Problems}, status: targets.ByDevice(results)}
	for a, dev := range targets.Held {
		if offered[a] || !v.status[dev.Device].Gone() {
			continue
		}
		ghost, ok := d.seen[a]
		if !ok {
			// Gone before this process saw it (the plugin restarted):
			// publish what the checkpoint knows: the attributes it was
			// published with when the claim was prepared, the group for
			// its counter, and the taint for eviction.
			if len(dev.Attributes) > 0 {
				if v.attributes == nil {
					v.attributes = map[string]map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{}
				}
				v.attributes[dev.Device] = dev.Attributes
			}
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
	// attributes replace the built attributes of gone held devices (see
	// verdict).
	attributes map[string]map[resourceapi.QualifiedName]resourceapi.DeviceAttribute
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
	return publication{inv: inv, taints: taints, attributes: v.attributes}
}

// resources builds the slices of the publication.
func (p publication) resources(nodeName string) resourceslice.DriverResources {
	res := resources.BuildTainted(nodeName, p.inv, p.taints)
	if len(p.attributes) > 0 {
		for _, pool := range res.Pools {
			for _, slice := range pool.Slices {
				for i := range slice.Devices {
					if attrs, ok := p.attributes[slice.Devices[i].Name]; ok {
						slice.Devices[i].Attributes = maps.Clone(attrs)
					}
				}
			}
		}
	}
	return res
}

// equal reports whether p publishes what o (nil: nothing yet) published,
// without building either: an unchanged rescan costs no rebuild and no
// deep comparison of the slices.
func (p publication) equal(o *publication) bool {
	return o != nil && inventory.EqualDecisions(p.inv.Decisions, o.inv.Decisions) &&
		maps.EqualFunc(p.taints, o.taints, slices.Equal[[]resourceapi.DeviceTaint]) &&
		equality.Semantic.DeepEqual(p.attributes, o.attributes)
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
