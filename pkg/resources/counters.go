package resources

import (
	"context"
	"fmt"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/utils/ptr"

	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
)

// ReasonNoCounters is why a device of a multi-device IOMMU group is left
// out while the API server does not keep shared counters.
const ReasonNoCounters = "its IOMMU group has other offered members and the API server drops shared counters (feature gate DRAPartitionableDevices off), so the scheduler could hand members to different claims"

// BuildWithoutCounters is Build for an API server that drops shared
// counters: only devices whose IOMMU group has no other offered member are
// published. They need no counter to be safe.
func BuildWithoutCounters(nodeName string, inv *inventory.Inventory) resourceslice.DriverResources {
	return Build(nodeName, WithoutSharedGroups(inv))
}

// WithoutSharedGroups returns a copy of inv in which the offered members of
// groups with two or more offered devices are not offered any more.
func WithoutSharedGroups(inv *inventory.Inventory) *inventory.Inventory {
	perGroup := map[int]int{}
	for _, d := range inv.Offered() {
		perGroup[*d.Device.IOMMUGroup]++
	}
	out := &inventory.Inventory{Problems: inv.Problems, Decisions: make([]inventory.Decision, len(inv.Decisions))}
	for i, d := range inv.Decisions {
		if d.Offered && perGroup[*d.Device.IOMMUGroup] > 1 {
			d.Offered, d.Reason = false, ReasonNoCounters
		}
		out.Decisions[i] = d
	}
	return out
}

// NeedsCounters reports whether Build publishes shared counters for inv:
// whether an IOMMU group has two or more offered devices.
func NeedsCounters(inv *inventory.Inventory) bool {
	perGroup := map[int]int{}
	for _, d := range inv.Decisions {
		if !d.Offered {
			continue
		}
		if perGroup[*d.Device.IOMMUGroup]++; perGroup[*d.Device.IOMMUGroup] > 1 {
			return true
		}
	}
	return false
}

// HasSharedCounters reports whether res publishes any shared counter.
func HasSharedCounters(res resourceslice.DriverResources) bool {
	for _, p := range res.Pools {
		for _, s := range p.Slices {
			if len(s.SharedCounters) > 0 {
				return true
			}
		}
	}
	return false
}

// CountersAccepted asks the API server, with a dry-run create of a
// ResourceSlice of nodeName that holds one counter set, whether it keeps
// shared counters. An API server with DRAPartitionableDevices off drops
// them from what it would store. Nothing is stored.
func CountersAccepted(ctx context.Context, client kubernetes.Interface, driverName, nodeName string) (bool, error) {
	probe := &resourceapi.ResourceSlice{
		ObjectMeta: metav1.ObjectMeta{Name: nodeName + "-" + driverName + "-counter-probe"},
		Spec: resourceapi.ResourceSliceSpec{
			Driver:   driverName,
			Pool:     resourceapi.ResourcePool{Name: nodeName, ResourceSliceCount: 1},
			NodeName: ptr.To(nodeName),
			SharedCounters: []resourceapi.CounterSet{{
				Name:     CounterSetName(0),
				Counters: map[string]resourceapi.Counter{groupCounter: {Value: resource.MustParse("1")}},
			}},
		},
	}
	got, err := client.ResourceV1().ResourceSlices().Create(ctx, probe, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	if err != nil {
		return false, fmt.Errorf("dry-run create of ResourceSlice %s to check for shared counters: %w", probe.Name, err)
	}
	return len(got.Spec.SharedCounters) > 0, nil
}
