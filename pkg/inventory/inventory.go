// Package inventory decides which PCI functions of a node the driver offers.
// The decision is pure: it takes what package pci read and the node's
// DriverConfiguration, and says for every function whether it is offered and,
// if not, why.
package inventory

import (
	"fmt"
	"slices"
	"strings"

	"github.com/vfio-dra/vfio-dra-driver/api/v1alpha1"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// Decision is the verdict on one PCI function.
type Decision struct {
	Device *pci.Device
	// Offered is true when the function is published as a DRA device.
	Offered bool
	// Reason says why the function is not offered; empty when it is.
	Reason string
	// GroupMembers are all functions of the function's IOMMU group as the
	// kernel lists them, bridges included; nil without a group.
	GroupMembers []pci.Address
}

// Inventory is the verdict on every PCI function of a node.
type Inventory struct {
	// Decisions covers every function that could be read, sorted by address.
	Decisions []Decision
	// Problems lists functions and groups that could not be read; their
	// devices are not offered.
	Problems []error
}

// HostUse is what the host itself is using, as package hostview reads it.
type HostUse struct {
	// InUse maps a function the host is using to the evidence, e.g.
	// "/ (vg0-root on nvme0n1p3)" or "default route (eno1)".
	InUse map[pci.Address]string
	// Unavailable says why the host view could not be read; "" when it was read.
	Unavailable string
}

// Offered returns the offered functions, sorted by address.
func (inv *Inventory) Offered() []Decision {
	var out []Decision
	for _, d := range inv.Decisions {
		if d.Offered {
			out = append(out, d)
		}
	}
	return out
}

// Scan reads the PCI functions below fs and decides on each. cfg may be nil
// (no configuration file): then every function the built-in rules allow is
// offered. hostDrivers names, for functions that the driver moved to vfio
// for a claim, the host driver they go back to: that is the driver they
// are described and selected by, so that preparing a claim does not change
// what is published.
// hostDrivers is keyed by PCI address ("0000:3b:00.0"). host is what the
// host itself uses; nil means it is not known (see Decide).
func Scan(fs *pci.FS, cfg *v1alpha1.DriverConfiguration, hostDrivers map[string]string, host *HostUse) (*Inventory, error) {
	devices, problems, err := fs.Scan()
	if err != nil {
		return nil, err
	}
	for _, d := range devices {
		if driver, ok := hostDrivers[d.Address.String()]; ok {
			d.Driver = driver
		}
	}
	groups := map[int][]pci.Address{}
	for _, d := range devices {
		if d.IOMMUGroup == nil {
			continue
		}
		if _, done := groups[*d.IOMMUGroup]; done {
			continue
		}
		members, err := fs.IOMMUGroupMembers(*d.IOMMUGroup)
		if err != nil {
			problems = append(problems, err)
			continue
		}
		groups[*d.IOMMUGroup] = members
	}
	inv := Decide(devices, groups, cfg, host)
	inv.Problems = append(problems, inv.Problems...)
	return inv, nil
}

// Decide applies the rules to devices, whose IOMMU groups list their
// members in groups. It does no I/O. A function the host uses is never
// offered, nor any function of its group, whatever cfg says. When host is
// nil or could not be read, storage and network controllers are not
// offered either: one of them may hold the root file system or the node's
// network, and nothing tells which.
func Decide(devices []*pci.Device, groups map[int][]pci.Address, cfg *v1alpha1.DriverConfiguration, host *HostUse) *Inventory {
	byAddr := make(map[pci.Address]*pci.Device, len(devices))
	for _, d := range devices {
		byAddr[d.Address] = d
	}
	inv := &Inventory{}
	// First each function on its own, then whole groups: binding one
	// member takes every endpoint of its group away from the host.
	own := make(map[pci.Address]string, len(devices))
	for _, d := range devices {
		own[d.Address] = ownReason(d, cfg, host)
	}
	for _, d := range devices {
		dec := Decision{Device: d, Reason: own[d.Address]}
		if d.IOMMUGroup != nil {
			members, ok := groups[*d.IOMMUGroup]
			if !ok && dec.Reason == "" {
				dec.Reason = fmt.Sprintf("IOMMU group %d could not be read", *d.IOMMUGroup)
			}
			dec.GroupMembers = members
			if dec.Reason == "" {
				dec.Reason = groupReason(d, members, byAddr, own)
			}
		}
		dec.Offered = dec.Reason == ""
		inv.Decisions = append(inv.Decisions, dec)
	}
	return inv
}

// ownReason applies the rules that look at one function alone.
func ownReason(d *pci.Device, cfg *v1alpha1.DriverConfiguration, host *HostUse) string {
	if r := hostReason(d, host); r != "" {
		return r
	}
	switch {
	case d.IsBridge():
		return fmt.Sprintf("bridge (class %06x)", d.Class)
	case d.IOMMUGroup == nil:
		return "no IOMMU group: VFIO cannot use it (is the IOMMU enabled?)"
	case d.BootVGA:
		return "boot VGA device: the host console"
	case d.SRIOVNumVFs > 0:
		return fmt.Sprintf("SR-IOV physical function with %d VFs enabled: unbinding it would remove them", d.SRIOVNumVFs)
	}
	if cfg == nil {
		return ""
	}
	for i, s := range cfg.Deny {
		if Matches(s, d) {
			return fmt.Sprintf("denied by configuration (deny[%d])", i)
		}
	}
	if len(cfg.Allow) > 0 && !slices.ContainsFunc(cfg.Allow, func(s v1alpha1.DeviceSelector) bool { return Matches(s, d) }) {
		return "not allowed by configuration"
	}
	return ""
}

// hostReason keeps what the host uses with the host; it comes before the
// configuration, so that no allow entry can take it.
func hostReason(d *pci.Device, host *HostUse) string {
	if host != nil {
		// What was seen is evidence even when another part of the
		// view could not be read.
		if evidence, ok := host.InUse[d.Address]; ok {
			return "in use: " + evidence
		}
		if host.Unavailable == "" {
			return ""
		}
	}
	switch d.Class >> 16 {
	case 0x01, 0x02:
	default:
		return ""
	}
	why := "not read"
	if host != nil {
		why = host.Unavailable
	}
	return fmt.Sprintf("host view unavailable (%s): storage and network controllers stay with the host", why)
}

// groupReason refuses a function whose IOMMU group has an endpoint that may
// not be taken from the host.
func groupReason(d *pci.Device, members []pci.Address, byAddr map[pci.Address]*pci.Device, own map[pci.Address]string) string {
	for _, m := range members {
		if m == d.Address {
			continue
		}
		other, ok := byAddr[m]
		if !ok {
			return fmt.Sprintf("IOMMU group %d: member %s could not be read", *d.IOMMUGroup, m)
		}
		if other.IsPassiveBridge() {
			continue
		}
		if r := own[m]; r != "" {
			return fmt.Sprintf("IOMMU group %d: member %s is not offered (%s)", *d.IOMMUGroup, m, r)
		}
	}
	return ""
}

// Matches reports whether every field set in s matches d.
func Matches(s v1alpha1.DeviceSelector, d *pci.Device) bool {
	return (s.VendorID == "" || s.VendorID == fmt.Sprintf("%04x", d.VendorID)) &&
		(s.DeviceID == "" || s.DeviceID == fmt.Sprintf("%04x", d.DeviceID)) &&
		(s.Class == "" || strings.HasPrefix(fmt.Sprintf("%06x", d.Class), s.Class)) &&
		(s.PCIAddress == "" || s.PCIAddress == d.Address.String()) &&
		(s.Driver == "" || s.Driver == d.Driver)
}
