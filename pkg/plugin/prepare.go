package plugin

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/dynamic-resource-allocation/deviceattribute"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceclaim"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"

	"github.com/vfio-dra/vfio-dra-driver/api/v1alpha1"
	"github.com/vfio-dra/vfio-dra-driver/pkg/cdispec"
	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/resources"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// PrepareResourceClaims binds the IOMMU groups of each claim's devices to
// vfio and writes the claim's CDI spec. Each claim succeeds or fails on its
// own; a failed claim leaves the node as it was.
func (d *Driver) PrepareResourceClaims(ctx context.Context, claims []*resourceapi.ResourceClaim) (map[types.UID]kubeletplugin.PrepareResult, error) {
	result := make(map[types.UID]kubeletplugin.PrepareResult, len(claims))
	for _, c := range claims {
		logger := klog.FromContext(ctx).WithValues("claim", klog.KObj(c))
		start := time.Now()
		devices, err := d.prepareLocked(klog.NewContext(ctx, logger), c)
		d.cfg.Metrics.ObservePrepare(time.Since(start), stepOf(err), err)
		if err != nil {
			// The kubelet gets the error too, but only this log has it
			// next to what the plugin did before.
			logger.Error(err, "Preparing claim failed", "duration", time.Since(start))
			err = fmt.Errorf("prepare ResourceClaim %s: %w", klog.KObj(c), err)
		}
		result[c.UID] = kubeletplugin.PrepareResult{Devices: devices, Err: err}
	}
	return result, nil
}

// UnprepareResourceClaims removes the claims' CDI specs and gives their
// devices back to the host. Unknown claims succeed: they were never
// prepared, or already unprepared.
func (d *Driver) UnprepareResourceClaims(ctx context.Context, claims []kubeletplugin.NamespacedObject) (map[types.UID]error, error) {
	result := make(map[types.UID]error, len(claims))
	for _, c := range claims {
		logger := klog.FromContext(ctx).WithValues("claim", c.NamespacedName)
		start := time.Now()
		err := d.unprepareLocked(klog.NewContext(ctx, logger), string(c.UID))
		d.cfg.Metrics.ObserveUnprepare(time.Since(start), stepOf(err), err)
		if err != nil {
			logger.Error(err, "Unpreparing claim failed", "duration", time.Since(start))
			result[c.UID] = fmt.Errorf("unprepare ResourceClaim %s: %w", c.NamespacedName, err)
			continue
		}
		result[c.UID] = nil
	}
	return result, nil
}

// prepareLocked is prepareClaim under the claim's locks.
func (d *Driver) prepareLocked(ctx context.Context, claim *resourceapi.ResourceClaim) ([]kubeletplugin.Device, error) {
	d.scanMu.RLock()
	defer d.scanMu.RUnlock()
	var allocated []resourceapi.DeviceRequestAllocationResult
	if claim.Status.Allocation != nil {
		allocated = claim.Status.Allocation.Devices.Results
	}
	locked, unlock := d.lockClaim(string(claim.UID), allocated)
	defer unlock()
	return d.prepareClaim(ctx, claim, locked)
}

// unprepareLocked is unprepareClaim under the claim's locks.
func (d *Driver) unprepareLocked(ctx context.Context, uid string) error {
	d.scanMu.RLock()
	defer d.scanMu.RUnlock()
	_, unlock := d.lockClaim(uid, nil)
	defer unlock()
	return d.unprepareClaim(ctx, uid)
}

// prepareClaim prepares claim; the caller holds the locks of the claim
// and of the IOMMU groups in locked.
func (d *Driver) prepareClaim(ctx context.Context, claim *resourceapi.ResourceClaim, locked map[int]bool) ([]kubeletplugin.Device, error) {
	start := time.Now()
	logger := klog.FromContext(ctx)
	uid := string(claim.UID)
	cp, err := d.store.Get()
	if err != nil {
		return nil, err
	}
	if prev := cp.Claims[uid]; prev != nil {
		if prev.State == checkpoint.PrepareCompleted {
			if intact, err := d.intact(prev); err != nil || intact {
				if err != nil {
					return nil, err
				}
				logger.Info("Claim is prepared already", append(claimFields(prev), "duration", time.Since(start))...)
				return d.completed(ctx, uid, prev)
			}
			// An unprepare that failed half way gave some functions
			// back already, or one was hot-removed and came back.
			logger.Info("Prepared claim lost some of its functions, binding them again; the others stay as they are")
			if err := d.repair(context.WithoutCancel(ctx), uid, prev); err != nil {
				return nil, fmt.Errorf("bind the functions the prepared claim lost: %w", err)
			}
			return d.completed(ctx, uid, prev)
		}
		// A prepare that did not finish (crash, or a rollback that
		// failed): undo what it did, then start over.
		logger.Info("Rolling back an unfinished prepare")
		if err := d.unprepareClaim(ctx, uid); err != nil {
			return nil, fmt.Errorf("roll back the unfinished prepare: %w", err)
		}
		if cp, err = d.store.Get(); err != nil {
			return nil, err
		}
	}

	p, err := d.plan(claim, cp)
	if err != nil {
		return nil, err
	}
	for _, g := range p.Groups {
		if !locked[g.Number] {
			// The device moved to another group after lockClaim read
			// it (hot-plug): nothing is written, the retry locks it.
			return nil, fmt.Errorf("IOMMU group %d of the claim changed while it was being prepared; the kubelet retries", g.Number)
		}
	}
	// Write ahead: the original drivers are on disk before sysfs changes.
	if err := d.updateCheckpoint(func(cp *checkpoint.Checkpoint) error {
		cp.Claims[uid] = p
		return nil
	}); err != nil {
		return nil, err
	}

	// Once started, binding runs to its end (every wait in it is bounded)
	// even when the kubelet's call times out: cancelling half way would
	// roll back and redo the same work on every retry.
	ctx = context.WithoutCancel(ctx)
	devices, specName, err := d.apply(ctx, uid, p)
	if err == nil {
		err = d.updateCheckpoint(func(cp *checkpoint.Checkpoint) error {
			c := cp.Claims[uid]
			c.State, c.Devices, c.CDISpec = checkpoint.PrepareCompleted, devices, specName
			return nil
		})
	}
	if err != nil {
		rerr := d.unprepareClaim(ctx, uid)
		d.cfg.Metrics.Rollback(rerr)
		if rerr != nil {
			// The claim stays PrepareStarted: the next prepare or
			// unprepare, or the next start, tries again.
			return nil, fmt.Errorf("%w; rolling back failed too: %w", err, rerr)
		}
		return nil, err
	}
	p.State, p.Devices, p.CDISpec = checkpoint.PrepareCompleted, devices, specName
	logger.Info("Prepared claim", append(claimFields(p), "duration", time.Since(start))...)
	return d.completed(ctx, uid, p)
}

// apply binds the planned groups and writes the CDI spec. It returns the
// claim's devices with their CDI IDs.
func (d *Driver) apply(ctx context.Context, uid string, p *checkpoint.Claim) ([]checkpoint.Device, string, error) {
	for _, g := range p.Groups {
		if err := d.bindGroup(ctx, p, g); err != nil {
			return nil, "", err
		}
	}
	return d.writeSpec(uid, p)
}

// bindGroup binds every planned member of g that is not on its target yet;
// members already there get no write. Then it reads the group again: a
// function that joined it meanwhile (hot-added) is not in the plan, would
// be handed to the claim's user with the group, and fails the call.
func (d *Driver) bindGroup(ctx context.Context, p *checkpoint.Claim, g checkpoint.Group) error {
	// An iommufd user opens the functions' cdevs, never the group node,
	// which a kernel without CONFIG_VFIO_GROUP does not make.
	waitFor := vfio.WaitGroupNode
	if g.IOMMUFD {
		waitFor = vfio.WaitDeviceCDevs
	}
	if err := d.binder.BindFor(ctx, g.Number, originals(g.Members), g.Target, waitFor); err != nil {
		var step *vfio.StepError
		if errors.As(err, &step) && step.Address != "" {
			return fmt.Errorf("device %s (IOMMU group %d): %w", deviceOf(p, step.Address), g.Number, err)
		}
		return fmt.Errorf("device %s (IOMMU group %d): %w", devicesOfGroup(p, g.Number), g.Number, err)
	}
	if err := d.checkNoneJoined(g); err != nil {
		return fmt.Errorf("device %s: %w", devicesOfGroup(p, g.Number), err)
	}
	klog.FromContext(ctx).V(2).Info("Bound IOMMU group", "iommuGroup", g.Number, "driver", g.Target, "functions", len(g.Members))
	return nil
}

// checkNoneJoined fails when the group has an endpoint that is not among
// the planned members g.Members: one hot-added since plan. It lists the
// group and reads only the functions that are not planned (the passive
// bridges plan left out, and newcomers), as vfio.GroupEndpoints would.
func (d *Driver) checkNoneJoined(g checkpoint.Group) error {
	members, err := d.fs.IOMMUGroupMembers(g.Number)
	if err != nil {
		return fmt.Errorf("IOMMU group %d after binding: %w", g.Number, err)
	}
	for _, a := range members {
		if slices.ContainsFunc(g.Members, func(m checkpoint.Member) bool { return m.Address == a.String() }) {
			continue
		}
		dev, err := d.fs.Device(a)
		if err != nil {
			return fmt.Errorf("IOMMU group %d after binding: %w", g.Number, err)
		}
		if !dev.IsPassiveBridge() {
			return fmt.Errorf("PCI function %s joined IOMMU group %d while it was being bound (hot-added); the group is not what was planned", a, g.Number)
		}
	}
	return nil
}

// repair binds again the functions that a prepared claim lost (an
// unprepare that failed half way, a function hot-removed that came back),
// without unbinding the ones still bound: a VM may be using them. The CDI
// spec is written again, since a rebound function may have another cdev.
func (d *Driver) repair(ctx context.Context, uid string, c *checkpoint.Claim) error {
	for _, g := range c.Groups {
		if err := d.bindGroup(ctx, c, g); err != nil {
			return err
		}
	}
	_, _, err := d.writeSpec(uid, c)
	return err
}

// writeSpec writes the CDI spec of a claim whose groups are bound.
func (d *Driver) writeSpec(uid string, p *checkpoint.Claim) ([]checkpoint.Device, string, error) {
	spec := cdispec.Claim{UID: uid, HostDevRoot: d.cfg.HostDevRoot}
	needLegacy, needIOMMUFD := false, false
	byGroup := map[int]cdispec.Group{}
	for _, g := range p.Groups {
		cg := cdispec.Group{Number: g.Number, Drivers: map[string]string{}}
		for _, m := range g.Members {
			cg.Addresses = append(cg.Addresses, m.Address)
			cg.Drivers[m.Address] = g.TargetOf(m)
		}
		if g.IOMMUFD {
			needIOMMUFD = true
			for _, m := range g.Members {
				addr, err := pci.ParseAddress(m.Address)
				if err != nil {
					return nil, "", err
				}
				cdev, err := d.binder.DeviceCDev(addr)
				if err != nil {
					return nil, "", err
				}
				if cdev == "" {
					return nil, "", fmt.Errorf("device %s: iommufd requested, but the kernel has no VFIO device cdev for %s (needs Linux 6.6+ with VFIO_DEVICE_CDEV)", deviceOf(p, m.Address), m.Address)
				}
				cg.DeviceNodes = append(cg.DeviceNodes, filepath.Join(d.cfg.HostDevRoot, "vfio", "devices", cdev))
			}
		} else {
			needLegacy = true
			cg.DeviceNodes = []string{filepath.Join(d.cfg.HostDevRoot, "vfio", fmt.Sprint(g.Number))}
		}
		byGroup[g.Number] = cg
	}
	if needLegacy {
		spec.CommonNodes = append(spec.CommonNodes, filepath.Join(d.cfg.HostDevRoot, "vfio", "vfio"))
	}
	if needIOMMUFD {
		// plan checked this already; a spec written again for a prepared
		// claim has not been through plan.
		if err := d.checkIOMMUDevice(); err != nil {
			return nil, "", err
		}
		spec.CommonNodes = append(spec.CommonNodes, filepath.Join(d.cfg.HostDevRoot, "iommu"))
	}
	for _, dev := range p.Devices {
		spec.Devices = append(spec.Devices, cdispec.Device{
			// The container knows the request, not the subrequest that
			// a prioritized list picked.
			Request: resourceclaim.BaseRequestRef(dev.Requests[0]), Name: dev.Device, PCIAddress: dev.PCIAddress, Group: byGroup[dev.IOMMUGroup],
		})
	}
	specName, ids, err := d.writeCDISpec(spec)
	if err != nil {
		return nil, "", fmt.Errorf("write CDI spec: %w", err)
	}
	devices := slices.Clone(p.Devices)
	for i := range devices {
		devices[i].CDIDeviceIDs = ids[devices[i].Device]
	}
	return devices, specName, nil
}

// intact reports whether every function of a prepared claim is still on the
// driver the claim moved it to.
func (d *Driver) intact(c *checkpoint.Claim) (bool, error) {
	for _, g := range c.Groups {
		for _, m := range g.Members {
			addr, err := pci.ParseAddress(m.Address)
			if err != nil {
				return false, err
			}
			drv, err := d.fs.CurrentDriver(addr)
			if err != nil {
				return false, fmt.Errorf("PCI device %s: %w", addr, err)
			}
			if drv != g.TargetOf(m) {
				return false, nil
			}
		}
	}
	return true, nil
}

// completed turns a prepared claim into the prepare result. It writes a CDI
// spec that went missing (e.g. /var/run/cdi was emptied) again, since the
// runtime cannot start the container without it.
func (d *Driver) completed(ctx context.Context, uid string, c *checkpoint.Claim) ([]kubeletplugin.Device, error) {
	if _, err := os.Stat(filepath.Join(d.cfg.CDIRoot, c.CDISpec)); errors.Is(err, os.ErrNotExist) {
		klog.FromContext(ctx).Info("CDI spec of a prepared claim is missing, writing it again", "path", c.CDISpec)
		if _, _, err := d.writeSpec(uid, c); err != nil {
			return nil, err
		}
	}
	var out []kubeletplugin.Device
	for _, dev := range c.Devices {
		out = append(out, kubeletplugin.Device{
			Requests: dev.Requests, PoolName: dev.Pool, DeviceName: dev.Device, CDIDeviceIDs: dev.CDIDeviceIDs,
			Metadata: &kubeletplugin.DeviceMetadata{Attributes: metadataAttributes(dev, vfioDriverOf(c, dev.PCIAddress))},
		})
	}
	return out, nil
}

// metadataAttributes are the KEP-5304 metadata attributes of a prepared
// device: every attribute it was published with, and the VFIO driver it was
// bound to (driver "auto" picks one per function). Claims checkpointed
// before attributes were recorded get the two KubeVirt needs.
func metadataAttributes(dev checkpoint.Device, vfioDriver string) map[string]resourceapi.DeviceAttribute {
	out := make(map[string]resourceapi.DeviceAttribute, max(len(dev.Attributes), 2)+1)
	for k, v := range dev.Attributes {
		out[string(k)] = v
	}
	if len(out) == 0 {
		out[string(deviceattribute.StandardDeviceAttributePCIBusID)] = resourceapi.DeviceAttribute{StringValue: ptr.To(dev.PCIAddress)}
		out[string(resources.AttrIOMMUGroup)] = resourceapi.DeviceAttribute{IntValue: ptr.To(int64(dev.IOMMUGroup))}
	}
	if vfioDriver != "" {
		out[string(resources.AttrVFIODriver)] = resourceapi.DeviceAttribute{StringValue: ptr.To(vfioDriver)}
	}
	return out
}

// vfioDriverOf returns the driver the claim bound the function at addr to.
func vfioDriverOf(c *checkpoint.Claim, addr string) string {
	for _, g := range c.Groups {
		for _, m := range g.Members {
			if m.Address == addr {
				return g.TargetOf(m)
			}
		}
	}
	return ""
}

// deviceOf names the allocated device for a PCI address of the claim: the
// address itself, or the allocated member of its group.
func deviceOf(c *checkpoint.Claim, addr string) string {
	for _, dev := range c.Devices {
		if dev.PCIAddress == addr {
			return dev.Device
		}
	}
	for _, g := range c.Groups {
		for _, m := range g.Members {
			if m.Address != addr {
				continue
			}
			for _, dev := range c.Devices {
				if dev.IOMMUGroup == g.Number {
					return fmt.Sprintf("%s (group member %s)", dev.Device, addr)
				}
			}
		}
	}
	return addr
}

// devicesOfGroup names the allocated devices of a claim in an IOMMU group.
func devicesOfGroup(c *checkpoint.Claim, group int) string {
	var names []string
	for _, dev := range c.Devices {
		if dev.IOMMUGroup == group {
			names = append(names, dev.Device)
		}
	}
	return strings.Join(names, ", ")
}

// unprepareClaim undoes a prepared or half-prepared claim. When that fails
// the claim keeps its entry, with the error as its LastError.
func (d *Driver) unprepareClaim(ctx context.Context, uid string) (err error) {
	start := time.Now()
	logger := klog.FromContext(ctx)
	defer func() {
		if err != nil {
			d.recordFailure(ctx, uid, err)
		}
	}()
	if err := d.removeCDISpec(uid); err != nil {
		return fmt.Errorf("remove CDI spec: %w", err)
	}
	cp, err := d.store.Get()
	if err != nil {
		return err
	}
	c := cp.Claims[uid]
	if c == nil {
		logger.Info("Claim is not prepared, nothing to unprepare", "duration", time.Since(start))
		return nil
	}
	var errs []error
	for _, g := range slices.Backward(c.Groups) {
		// restoreDriver false keeps a group on vfio once a claim got it;
		// a prepare that did not complete is rolled back all the same.
		if !g.Restore && c.State == checkpoint.PrepareCompleted {
			logger.V(2).Info("Leaving IOMMU group on its vfio driver, as configured", "iommuGroup", g.Number, "driver", g.Target)
			continue
		}
		gone, err := d.binder.RestoreReport(ctx, originals(g.Members), g.Target)
		if len(gone) > 0 {
			logger.Info("PCI functions of the group are gone from the node, nothing to give back", "iommuGroup", g.Number, "pciAddresses", gone)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("IOMMU group %d: %w", g.Number, err))
			continue
		}
		logger.V(2).Info("Gave IOMMU group back to the host", "iommuGroup", g.Number)
	}
	if err := errors.Join(errs...); err != nil {
		// Keep the claim so that the kubelet's retry finishes the job.
		return err
	}
	if err := d.updateCheckpoint(func(cp *checkpoint.Checkpoint) error {
		delete(cp.Claims, uid)
		return nil
	}); err != nil {
		return err
	}
	logger.Info("Unprepared claim", append(claimFields(c), "duration", time.Since(start))...)
	return nil
}

// claimFields are the log values that say what a claim holds: its devices,
// its IOMMU groups and each function's move between drivers.
func claimFields(c *checkpoint.Claim) []any {
	devices := make([]string, 0, len(c.Devices))
	for _, dev := range c.Devices {
		devices = append(devices, dev.Device)
	}
	groups := make([]int, 0, len(c.Groups))
	var drivers []string
	for _, g := range c.Groups {
		groups = append(groups, g.Number)
		for _, m := range g.Members {
			from := m.Driver
			if from == "" {
				from = "none"
			}
			drivers = append(drivers, m.Address+" "+from+"->"+g.TargetOf(m))
		}
	}
	return []any{"devices", devices, "iommuGroups", groups, "drivers", drivers}
}

// errNoEntry tells Store.Update that there is nothing to write.
var errNoEntry = errors.New("no checkpoint entry")

// recordFailure keeps why giving a claim's groups back failed in its entry,
// for `vfio-dra inspect --checkpoint`, and has a claim whose prepare did
// not finish retried in the background.
func (d *Driver) recordFailure(ctx context.Context, uid string, failure error) {
	started := false
	err := d.updateCheckpoint(func(cp *checkpoint.Checkpoint) error {
		c := cp.Claims[uid]
		if c == nil {
			return errNoEntry
		}
		c.LastError = failure.Error()
		started = c.State == checkpoint.PrepareStarted
		return nil
	})
	if err != nil && !errors.Is(err, errNoEntry) {
		klog.FromContext(ctx).Error(err, "Recording a failed unprepare in the checkpoint")
	}
	if started {
		select {
		case d.rollbackFailed <- struct{}{}:
		default: // The retry loop is awake already.
		}
	}
}

func originals(members []checkpoint.Member) []vfio.Original {
	out := make([]vfio.Original, len(members))
	for i, m := range members {
		out[i] = vfio.Original(m)
	}
	return out
}

// requestMatches reports whether a config that lists requests applies to
// request (a subrequest "req/sub" is matched by "req" as well).
func requestMatches(requests []string, request string) bool {
	if len(requests) == 0 {
		return true
	}
	base, _, _ := strings.Cut(request, "/")
	return slices.Contains(requests, request) || slices.Contains(requests, base)
}

// effectiveConfig merges the opaque configs for request, DeviceClass ones
// first (the API server lists them first), each later one overriding.
func effectiveConfig(configs []decodedConfig, request string) v1alpha1.VfioConfig {
	var c v1alpha1.VfioConfig
	for _, src := range []resourceapi.AllocationConfigSource{resourceapi.AllocationConfigSourceClass, resourceapi.AllocationConfigSourceClaim} {
		for _, dc := range configs {
			if dc.source == src && requestMatches(dc.requests, request) {
				c = c.Merge(dc.config)
			}
		}
	}
	return c
}
