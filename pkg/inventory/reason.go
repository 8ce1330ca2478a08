package inventory

import "strings"

// Kinds of reasons a function is not offered, as metrics label them. The
// reason texts carry addresses and numbers; these do not.
const (
	KindBridge          = "bridge"
	KindChipset         = "chipset"
	KindPlatform        = "platform"
	KindNoIOMMUGroup    = "no_iommu_group"
	KindBootVGA         = "boot_vga"
	KindSRIOVPF         = "sriov_pf_with_vfs"
	KindDenied          = "denied_by_config"
	KindNotAllowed      = "not_allowed_by_config"
	KindGroupUnreadable = "iommu_group_unreadable"
	KindGroupMember     = "iommu_group_member_not_offered"
	KindHostInUse       = "used_by_host"
	KindHostUnknown     = "host_view_unavailable"
	KindOther           = "other"
)

// reasonKinds maps the start of a reason text to its kind; the first match
// wins, so longer prefixes of one family come first.
var reasonKinds = []struct{ prefix, kind string }{
	{"bridge", KindBridge},
	{"chipset", KindChipset},
	{"platform", KindPlatform},
	{"no IOMMU group", KindNoIOMMUGroup},
	{"boot VGA", KindBootVGA},
	{"SR-IOV physical function", KindSRIOVPF},
	{"denied by configuration", KindDenied},
	{"not allowed by configuration", KindNotAllowed},
	{"in use", KindHostInUse},
	{"host view unavailable", KindHostUnknown},
}

// ReasonKind returns the kind of a Decision's Reason: a short label with a
// fixed set of values, for counting.
func ReasonKind(reason string) string {
	for _, k := range reasonKinds {
		if strings.HasPrefix(reason, k.prefix) {
			return k.kind
		}
	}
	if strings.HasPrefix(reason, "IOMMU group ") {
		if strings.HasSuffix(reason, "could not be read") {
			return KindGroupUnreadable
		}
		if strings.Contains(reason, "is not offered") {
			return KindGroupMember
		}
	}
	return KindOther
}

// NotOfferedByKind counts the functions that are not offered, by the kind
// of their reason.
func (inv *Inventory) NotOfferedByKind() map[string]int {
	out := map[string]int{}
	for _, d := range inv.Decisions {
		if !d.Offered {
			out[ReasonKind(d.Reason)]++
		}
	}
	return out
}
