package inventory_test

import (
	"testing"

	"github.com/vfio-dra/vfio-dra-driver/api/v1alpha1"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
)

// TestReasonKind: every reason Decide gives on the demo server has a kind,
// and the kind is the one of its rule.
func TestReasonKind(t *testing.T) {
	cfg := &v1alpha1.DriverConfiguration{Deny: []v1alpha1.DeviceSelector{{VendorID: "19ee"}}}
	inv := scanServer(t, cfg)
	want := map[string]string{
		"0000:00:00.0": inventory.KindChipset,
		"0000:00:01.0": inventory.KindBridge,
		"0000:00:1f.4": inventory.KindPlatform,
		"0000:00:14.0": inventory.KindNoIOMMUGroup,
		"0000:00:02.0": inventory.KindBootVGA,
		"0000:81:00.0": inventory.KindSRIOVPF,
		"0000:82:00.0": inventory.KindDenied,
		"0000:00:1f.2": inventory.KindGroupMember,
	}
	got := map[string]string{}
	for _, d := range inv.Decisions {
		if d.Offered {
			continue
		}
		kind := inventory.ReasonKind(d.Reason)
		if kind == inventory.KindOther {
			t.Errorf("%s: reason %q has no kind", d.Device.Address, d.Reason)
		}
		got[d.Device.Address.String()] = kind
	}
	for addr, kind := range want {
		if got[addr] != kind {
			t.Errorf("%s: kind %q, want %q", addr, got[addr], kind)
		}
	}
	total := 0
	for _, n := range inv.NotOfferedByKind() {
		total += n
	}
	if total != len(got) {
		t.Errorf("NotOfferedByKind counts %d functions, want %d", total, len(got))
	}
	for _, tc := range []struct{ reason, kind string }{
		{"not allowed by configuration", inventory.KindNotAllowed},
		{"IOMMU group 7 could not be read", inventory.KindGroupUnreadable},
		{"IOMMU group 7: member 0000:01:00.1 could not be read", inventory.KindGroupUnreadable},
		{"something new", inventory.KindOther},
	} {
		if got := inventory.ReasonKind(tc.reason); got != tc.kind {
			t.Errorf("ReasonKind(%q) = %q, want %q", tc.reason, got, tc.kind)
		}
	}
}
