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
	// Notes say which rules could not look at the function because a file
	// they need could not be read, and that the class decided instead.
	Notes []string
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
	host = behindEndpoints(devices, byAddr, host)
	inv := &Inventory{}
	// First each function on its own, then whole groups: binding one
	// member takes every endpoint of its group away from the host.
	own := make(map[pci.Address]string, len(devices))
	for _, d := range devices {
		own[d.Address] = ownReason(d, cfg, host)
	}
	for _, d := range devices {
		dec := Decision{Device: d, Reason: own[d.Address], Notes: notes(d)}
		if d.IOMMUGroup != nil {
			members, ok := groups[*d.IOMMUGroup]
			if !ok && dec.Reason == "" {
				dec.Reason = fmt.Sprintf("IOMMU group %d could not be read", *d.IOMMUGroup)
			}
			dec.GroupMembers = members
			if dec.Reason == "" {
				dec.Reason = groupReason(d, members, byAddr, own, host)
			}
		}
		dec.Offered = dec.Reason == ""
		inv.Decisions = append(inv.Decisions, dec)
	}
	return inv
}

// ownReason applies the rules that look at one function alone. Each
// reason starts with the rule that decided.
func ownReason(d *pci.Device, cfg *v1alpha1.DriverConfiguration, host *HostUse) string {
	if r := hostReason(d, host); r != "" {
		return r
	}
	switch {
	case d.IsBridge():
		return bridgeReason(d)
	case d.IsChipsetBridge():
		return fmt.Sprintf("chipset: %s (class %06x) stays with the host", chipsetBridges[d.Class>>8], d.Class)
	case d.IOMMUGroup == nil:
		return "no IOMMU group: VFIO cannot use it (is the IOMMU enabled?)"
	case d.BootVGA:
		return "boot VGA device: the host console"
	case d.SRIOVNumVFs > 0:
		return fmt.Sprintf("SR-IOV physical function with %d VFs enabled: unbinding it would remove them", d.SRIOVNumVFs)
	}
	if r := platformReason(d); r != "" && !exactlyAllowed(d, cfg) {
		return r
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

var chipsetBridges = map[uint32]string{0x0600: "host bridge", 0x0601: "ISA bridge", 0x0602: "EISA bridge", 0x0603: "MCA bridge"}

// bridgeReason names what makes d a bridge: its header type, or its class
// when config could not be read.
func bridgeReason(d *pci.Device) string {
	if d.HeaderType == nil {
		return fmt.Sprintf("bridge: class %06x (header type unknown, %s)", d.Class, d.ConfigProblem)
	}
	if *d.HeaderType == pci.HeaderCardBus {
		return "bridge: CardBus (header type 2)"
	}
	return "bridge: PCI-to-PCI (header type 1)"
}

// Classes (base class and sub-class) of the platform's own functions.
var platformClasses = map[uint32]string{
	0x0800: "interrupt controller",
	0x0801: "DMA controller",
	0x0802: "timer",
	0x0803: "real-time clock",
	0x0804: "PCI hot-plug controller",
	0x0806: "IOMMU",
	0x0807: "root complex event collector",
	0x0c05: "SMBus controller",
	0x1101: "performance counters",
}

// Host drivers of the platform's own functions, whatever their class.
var platformDrivers = map[string]string{
	"pcieport":          "PCIe port services",
	"i801_smbus":        "SMBus controller",
	"ismt_smbus":        "SMBus controller",
	"mei_me":            "management engine",
	"intel-lpss":        "LPSS serial controller (I2C, SPI, UART of the SoC)",
	"intel-spi":         "firmware flash controller",
	"intel_pch_thermal": "platform thermal",
	"proc_thermal_pci":  "processor thermal",
	"proc_thermal":      "processor thermal",
	"intel_vsec":        "platform telemetry",
	"intel-pmt":         "platform telemetry",
}

// platformReason names the built-in rule that keeps one of the platform's
// own functions with the host; "" when none applies. Only an allow entry
// naming the function's exact address overrides it (exactlyAllowed).
func platformReason(d *pci.Device) string {
	sub := d.Class >> 8
	if what, ok := platformClasses[sub]; ok {
		return fmt.Sprintf("platform: %s (class %06x)", what, d.Class)
	}
	if what, ok := platformDrivers[d.Driver]; ok {
		return fmt.Sprintf("platform: %s (%s)", what, d.Driver)
	}
	switch {
	case d.Class>>16 == 0x05:
		return fmt.Sprintf("platform: memory controller (class %06x)", d.Class)
	case strings.HasSuffix(d.Driver, "_edac"):
		return fmt.Sprintf("platform: memory error reporting (%s)", d.Driver)
	case sub == 0x0780 && d.Parent == nil:
		return fmt.Sprintf("platform: management engine (class %06x on a root bus)", d.Class)
	case d.BARs != nil && *d.BARs == 0:
		return "platform: no memory or I/O BAR in resource, nothing to pass through (registers in config space only, like CPU uncore functions)"
	}
	return ""
}

// exactlyAllowed reports whether an allow entry names d by its exact
// address: the only way to hand out a platform function.
func exactlyAllowed(d *pci.Device, cfg *v1alpha1.DriverConfiguration) bool {
	return cfg != nil && slices.ContainsFunc(cfg.Allow, func(s v1alpha1.DeviceSelector) bool {
		return s.PCIAddress == d.Address.String() && Matches(s, d)
	})
}

// notes says which files could not be read and what decided instead.
func notes(d *pci.Device) []string {
	var out []string
	if d.ConfigProblem != "" {
		out = append(out, "header type unknown, the class decided whether it is a bridge: "+d.ConfigProblem)
	}
	if d.ResourceProblem != "" {
		out = append(out, "BARs unknown, the class decided without the BAR rule: "+d.ResourceProblem)
	}
	return out
}

// hostReason keeps what the host uses with the host; it comes before the
// configuration, so that no allow entry can take it.
func hostReason(d *pci.Device, host *HostUse) string {
	if host != nil {
		// What was seen is evidence even when another part of the
		// view could not be read.
		if evidence, ok := host.inUse(d.Address); ok {
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

// behindEndpoints adds to the host view the endpoints that a function in
// use sits below: a VMD controller (an endpoint that owns a PCI domain of
// its own) whose NVMe drive holds the root file system takes that drive
// with it when it is bound to vfio-pci. Bridges above a function in use
// are no such case: they are never handed out.
func behindEndpoints(devices []*pci.Device, byAddr map[pci.Address]*pci.Device, host *HostUse) *HostUse {
	if host == nil || len(host.InUse) == 0 {
		return host
	}
	var added map[pci.Address]string
	for _, d := range devices {
		evidence, ok := host.InUse[d.Address]
		if !ok {
			continue
		}
		for _, elem := range strings.Split(d.Path, "/") {
			a, err := pci.ParseAddress(elem)
			if err != nil || a == d.Address {
				continue
			}
			up, ok := byAddr[a]
			if !ok || up.IsBridge() {
				continue
			}
			if _, done := host.InUse[a]; done {
				continue
			}
			if added == nil {
				added = map[pci.Address]string{}
			}
			if _, done := added[a]; !done {
				added[a] = fmt.Sprintf("%s, through %s below it", evidence, d.Address)
			}
		}
	}
	if added == nil {
		return host
	}
	out := &HostUse{InUse: make(map[pci.Address]string, len(host.InUse)+len(added)), Unavailable: host.Unavailable}
	for a, e := range host.InUse {
		out.InUse[a] = e
	}
	for a, e := range added {
		out.InUse[a] = e
	}
	return out
}

func (h *HostUse) inUse(a pci.Address) (string, bool) {
	if h == nil {
		return "", false
	}
	evidence, ok := h.InUse[a]
	return evidence, ok
}

// groupReason refuses a function whose IOMMU group has an endpoint that may
// not be taken from the host.
func groupReason(d *pci.Device, members []pci.Address, byAddr map[pci.Address]*pci.Device, own map[pci.Address]string, host *HostUse) string {
	for _, m := range members {
		if m == d.Address {
			continue
		}
		other, ok := byAddr[m]
		if !ok {
			return fmt.Sprintf("IOMMU group %d: member %s could not be read", *d.IOMMUGroup, m)
		}
		if _, inUse := host.inUse(m); other.IsPassiveBridge() && !inUse {
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
