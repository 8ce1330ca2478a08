package plugin

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/utils/ptr"

	"github.com/vfio-dra/vfio-dra-driver/api/v1alpha1"
	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/resources"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

type decodedConfig struct {
	source   resourceapi.AllocationConfigSource
	requests []string
	config   *v1alpha1.VfioConfig
}

// plan works out, without changing anything, what preparing claim means:
// which IOMMU groups move to which driver, with every member's original
// state, and which devices the claim gets. The result is the claim's
// checkpoint entry in state PrepareStarted.
func (d *Driver) plan(claim *resourceapi.ResourceClaim, cp *checkpoint.Checkpoint) (*checkpoint.Claim, error) {
	alloc := claim.Status.Allocation
	if alloc == nil {
		return nil, fmt.Errorf("not allocated")
	}
	var configs []decodedConfig
	for i, c := range alloc.Devices.Config {
		if c.Opaque == nil || c.Opaque.Driver != d.cfg.DriverName {
			continue
		}
		vc, err := v1alpha1.DecodeVfioConfig(c.Opaque.Parameters.Raw, c.Source == resourceapi.AllocationConfigSourceClaim)
		if err != nil {
			return nil, fmt.Errorf("config[%d] (from %s): %w", i, c.Source, err)
		}
		configs = append(configs, decodedConfig{source: c.Source, requests: c.Requests, config: vc})
	}

	// The host view is read again here, just before anything is written:
	// a function mounted or opened by another process since the last scan
	// fails the claim with the mount or the process as the reason.
	// Only the claim's groups are read, and the processes' open files
	// only when one of them can be reached through VFIO: a prepare costs
	// the same on a node of 20 functions and of 1,024, and on a host of
	// few processes and of thousands.
	var addrs []pci.Address
	for _, r := range alloc.Devices.Results {
		if a, err := pci.ParseDeviceName(r.Device); err == nil && r.Driver == d.cfg.DriverName {
			addrs = append(addrs, a)
		}
	}
	inv, err := inventory.ScanGroups(d.fs, d.cfg.DriverConfig, cp.HostDrivers(), d.host.ReadFor(hostview.OwnOf(cp), addrs), addrs)
	if err != nil {
		return nil, err
	}
	decisions := map[pci.Address]inventory.Decision{}
	for _, dec := range inv.Decisions {
		decisions[dec.Device.Address] = dec
	}

	p := &checkpoint.Claim{Namespace: claim.Namespace, Name: claim.Name, State: checkpoint.PrepareStarted}
	for _, r := range alloc.Devices.Results {
		if r.Driver != d.cfg.DriverName {
			continue
		}
		if ptr.Deref(r.AdminAccess, false) {
			// Admin access may share a device with the claim that owns
			// it; binding the group would take it from that claim.
			return nil, fmt.Errorf("device %s: admin access is not supported by this driver", r.Device)
		}
		if r.Pool != d.cfg.NodeName {
			return nil, fmt.Errorf("device %s is from pool %q, not from this node's pool %q", r.Device, r.Pool, d.cfg.NodeName)
		}
		addr, err := pci.ParseDeviceName(r.Device)
		if err != nil {
			return nil, err
		}
		dec, ok := decisions[addr]
		if !ok {
			return nil, fmt.Errorf("device %s: there is no PCI function %s on this node", r.Device, addr)
		}
		if !dec.Offered {
			return nil, fmt.Errorf("device %s is not offered on this node: %s", r.Device, dec.Reason)
		}
		group := *dec.Device.IOMMUGroup
		if holder := holderOf(cp, string(claim.UID), dec.GroupMembers); holder != "" {
			return nil, fmt.Errorf("device %s: IOMMU group %d is prepared for ResourceClaim %s", r.Device, group, holder)
		}

		cfg := effectiveConfig(configs, r.Request)
		// Checked before any binding: nothing on the host moves for a
		// claim that cannot get its device nodes.
		if cfg.IOMMUFD != nil && *cfg.IOMMUFD {
			if err := d.checkIOMMUDevice(); err != nil {
				return nil, fmt.Errorf("device %s: %w", r.Device, err)
			}
		}
		i := slices.IndexFunc(p.Groups, func(g checkpoint.Group) bool { return g.Number == group })
		if i < 0 {
			endpoints, err := groupEndpoints(decisions, group, dec.GroupMembers)
			if err != nil {
				return nil, fmt.Errorf("device %s: %w", r.Device, err)
			}
			targets, err := d.targets(cfg, endpoints)
			if err != nil {
				return nil, fmt.Errorf("device %s: %w", r.Device, err)
			}
			snap, err := d.binder.Snapshot(endpoints)
			if err != nil {
				return nil, fmt.Errorf("device %s: %w", r.Device, err)
			}
			g := checkpoint.Group{
				Number:  group,
				Target:  groupTarget(targets),
				Restore: cfg.RestoreDriver == nil || *cfg.RestoreDriver,
				IOMMUFD: cfg.IOMMUFD != nil && *cfg.IOMMUFD,
			}
			for j, o := range snap {
				m := checkpoint.Member(o)
				if targets[j] != g.Target {
					m.Target = targets[j]
				}
				g.Members = append(g.Members, m)
			}
			p.Groups = append(p.Groups, g)
		} else if err := d.sameTargets(cfg, p.Groups[i]); err != nil {
			return nil, fmt.Errorf("device %s: %w", r.Device, err)
		}
		p.Devices = append(p.Devices, checkpoint.Device{
			Requests: []string{r.Request}, Pool: r.Pool, Device: r.Device, PCIAddress: addr.String(), IOMMUGroup: group,
			Attributes: resources.Device(dec).Attributes,
		})
	}
	return p, nil
}

// groupEndpoints is vfio.GroupEndpoints from what ScanGroups read just
// before, instead of reading the group's functions a second time.
func groupEndpoints(decisions map[pci.Address]inventory.Decision, group int, members []pci.Address) ([]pci.Address, error) {
	return vfio.Endpoints(group, members, func(a pci.Address) (*pci.Device, error) {
		dec, ok := decisions[a]
		if !ok {
			return nil, fmt.Errorf("PCI device %s could not be read", a)
		}
		return dec.Device, nil
	})
}

// targets resolves the configured driver for each of an IOMMU group's
// functions, in the order of members.
func (d *Driver) targets(cfg v1alpha1.VfioConfig, members []pci.Address) ([]string, error) {
	out := make([]string, len(members))
	switch cfg.Driver {
	case "", v1alpha1.DriverVfioPCI:
		for i := range out {
			out[i] = v1alpha1.DriverVfioPCI
		}
	case v1alpha1.DriverAuto:
		if d.cfg.ModulesAlias == "" {
			return nil, fmt.Errorf(`driver "auto" needs the kernel's modules.alias, and none is configured`)
		}
		// Per function: a variant that serves only VFs, or only a GPU,
		// is never forced onto the PF or the GPU's audio function.
		byAddr, err := vfio.MemberTargets(d.fs, members, d.cfg.ModulesAlias)
		if err != nil {
			return nil, err
		}
		for i, a := range members {
			out[i] = byAddr[a]
		}
	default:
		// Before anything moves: never a host driver.
		if err := vfio.CheckDriver(cfg.Driver, d.cfg.ModulesAlias); err != nil {
			return nil, err
		}
		for i := range out {
			out[i] = cfg.Driver
		}
	}
	return out, nil
}

// groupTarget is the checkpointed Group.Target for members' targets:
// vfio-pci when any member gets it, so that only the members on a variant
// carry a Target of their own.
func groupTarget(targets []string) string {
	if len(targets) == 0 || slices.Contains(targets, v1alpha1.DriverVfioPCI) {
		return v1alpha1.DriverVfioPCI
	}
	return targets[0]
}

// sameTargets fails when cfg, the configuration of a second device of the
// planned group g, would bind one of g's members to another driver.
func (d *Driver) sameTargets(cfg v1alpha1.VfioConfig, g checkpoint.Group) error {
	members := make([]pci.Address, len(g.Members))
	for i, m := range g.Members {
		a, err := pci.ParseAddress(m.Address)
		if err != nil {
			return err
		}
		members[i] = a
	}
	targets, err := d.targets(cfg, members)
	if err != nil {
		return err
	}
	for i, m := range g.Members {
		if t := g.TargetOf(m); t != targets[i] {
			return fmt.Errorf("IOMMU group %d would be bound to both %s and %s (PCI function %s)", g.Number, t, targets[i], m.Address)
		}
	}
	return nil
}

// holderOf names another claim in the checkpoint that holds one of the
// addresses; "" if none does.
func holderOf(cp *checkpoint.Checkpoint, self string, addrs []pci.Address) string {
	for uid, c := range cp.Claims {
		if uid == self {
			continue
		}
		for _, g := range c.Groups {
			for _, m := range g.Members {
				if slices.ContainsFunc(addrs, func(a pci.Address) bool { return a.String() == m.Address }) {
					return c.Namespace + "/" + c.Name
				}
			}
		}
	}
	return ""
}

// checkIOMMUDevice fails when the kernel has no /dev/iommu, which iommufd
// needs.
func (d *Driver) checkIOMMUDevice() error {
	if _, err := os.Stat(filepath.Join(d.cfg.DevRoot, "iommu")); err != nil {
		return fmt.Errorf("iommufd requested, but the kernel has no /dev/iommu: %w", err)
	}
	return nil
}
