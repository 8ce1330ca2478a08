// Package resources turns the offered PCI functions of a node into the
// ResourceSlices the kubelet plugin publishes: one device per function with
// its attributes, and a shared counter per multi-device IOMMU group that
// every member consumes whole, so that the scheduler never hands two members
// of one group to two claims.
package resources

import (
	"fmt"
	"strconv"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/dynamic-resource-allocation/deviceattribute"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/utils/ptr"

	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
)

// Attribute names in the driver's domain. They are contracts: CEL selectors
// in users' DeviceClasses and claims refer to them.
const (
	AttrVendorID          resourceapi.QualifiedName = "vendorID"
	AttrDeviceID          resourceapi.QualifiedName = "deviceID"
	AttrSubsystemVendorID resourceapi.QualifiedName = "subsystemVendorID"
	AttrSubsystemDeviceID resourceapi.QualifiedName = "subsystemDeviceID"
	AttrClass             resourceapi.QualifiedName = "class"
	AttrIOMMUGroup        resourceapi.QualifiedName = "iommuGroup"
	AttrIOMMUGroupSize    resourceapi.QualifiedName = "iommuGroupSize"
	AttrDriver            resourceapi.QualifiedName = "driver"
	AttrSRIOVPhysFn       resourceapi.QualifiedName = "sriovPhysFn"
	AttrSRIOVTotalVFs     resourceapi.QualifiedName = "sriovTotalVFs"
	// AttrVFIODriver is not published: prepare adds it to a device's
	// metadata, naming the VFIO driver the device was bound to.
	AttrVFIODriver resourceapi.QualifiedName = "vfioDriver"
)

// Limits of the resource.k8s.io/v1 API that shape the slices.
const (
	maxDevicesPerSlice                     = resourceapi.ResourceSliceMaxDevices
	maxDevicesPerSliceWithAdvancedFeatures = resourceapi.ResourceSliceMaxDevicesWithAdvancedFeatures
	maxCounterSetsPerSlice                 = resourceapi.ResourceSliceMaxCounterSets
)

// groupCounter is the one counter of an IOMMU group's counter set. The set
// holds 1 and every member consumes 1: whoever gets a member gets the group.
const groupCounter = "members"

// CounterSetName names the shared counter set of an IOMMU group.
func CounterSetName(group int) string { return "iommu-group-" + strconv.Itoa(group) }

// Build returns the pool of nodeName: the devices in address order, and the
// counter sets of multi-device groups in slices of their own, as the API
// requires.
func Build(nodeName string, inv *inventory.Inventory) resourceslice.DriverResources {
	return BuildTainted(nodeName, inv, nil)
}

// BuildTainted is Build with device taints, keyed by device name.
func BuildTainted(nodeName string, inv *inventory.Inventory, taints map[string][]resourceapi.DeviceTaint) resourceslice.DriverResources {
	offered := inv.Offered()
	perGroup := map[int]int{}
	for _, d := range offered {
		perGroup[*d.Device.IOMMUGroup]++
	}

	var out []resourceslice.Slice
	var cur []resourceapi.Device
	// curAdvanced: a device of the current slice consumes counters or has
	// taints, which lowers the slice's device limit.
	curAdvanced := false
	var counterSets []resourceapi.CounterSet
	written := map[int]bool{}
	for _, d := range offered {
		dev := Device(d)
		dev.Taints = taints[dev.Name]
		group := *d.Device.IOMMUGroup
		shared := perGroup[group] > 1
		if shared {
			dev.ConsumesCounters = []resourceapi.DeviceCounterConsumption{{
				CounterSet: CounterSetName(group),
				Counters:   map[string]resourceapi.Counter{groupCounter: {Value: resource.MustParse("1")}},
			}}
			if !written[group] {
				written[group] = true
				counterSets = append(counterSets, resourceapi.CounterSet{
					Name:     CounterSetName(group),
					Counters: map[string]resourceapi.Counter{groupCounter: {Value: resource.MustParse("1")}},
				})
			}
		}
		// A slice in which any device consumes counters or has taints
		// holds fewer devices.
		advanced := shared || len(dev.Taints) > 0
		limit := maxDevicesPerSlice
		if curAdvanced || advanced {
			limit = maxDevicesPerSliceWithAdvancedFeatures
		}
		if len(cur) >= limit {
			out = append(out, resourceslice.Slice{Devices: cur})
			cur, curAdvanced = nil, false
		}
		cur = append(cur, dev)
		curAdvanced = curAdvanced || advanced
	}
	// The API wants at least one slice per pool, even an empty one.
	if len(cur) > 0 || len(out) == 0 {
		out = append(out, resourceslice.Slice{Devices: cur})
	}
	for len(counterSets) > 0 {
		n := min(len(counterSets), maxCounterSetsPerSlice)
		out = append(out, resourceslice.Slice{SharedCounters: counterSets[:n]})
		counterSets = counterSets[n:]
	}
	return resourceslice.DriverResources{
		Pools: map[string]resourceslice.Pool{nodeName: {Slices: out}},
	}
}

// Device returns the DRA device of one offered function, without counters.
func Device(d inventory.Decision) resourceapi.Device {
	p := d.Device
	attrs := map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
		deviceattribute.StandardDeviceAttributePCIBusID: {StringValue: ptr.To(p.Address.String())},
		AttrVendorID:          {StringValue: ptr.To(fmt.Sprintf("%04x", p.VendorID))},
		AttrDeviceID:          {StringValue: ptr.To(fmt.Sprintf("%04x", p.DeviceID))},
		AttrSubsystemVendorID: {StringValue: ptr.To(fmt.Sprintf("%04x", p.SubsystemVendorID))},
		AttrSubsystemDeviceID: {StringValue: ptr.To(fmt.Sprintf("%04x", p.SubsystemDeviceID))},
		AttrClass:             {StringValue: ptr.To(fmt.Sprintf("%06x", p.Class))},
		AttrIOMMUGroup:        {IntValue: ptr.To(int64(*p.IOMMUGroup))},
		AttrIOMMUGroupSize:    {IntValue: ptr.To(int64(len(d.GroupMembers)))},
		AttrDriver:            {StringValue: ptr.To(p.Driver)},
	}
	if p.PCIeRoot != "" {
		attrs[deviceattribute.StandardDeviceAttributePCIeRoot] = resourceapi.DeviceAttribute{StringValue: ptr.To(p.PCIeRoot)}
	}
	if p.NUMANode >= 0 {
		attrs[deviceattribute.StandardDeviceAttributeNUMANode] = resourceapi.DeviceAttribute{IntValue: ptr.To(int64(p.NUMANode))}
	}
	if p.PhysFn != nil {
		attrs[AttrSRIOVPhysFn] = resourceapi.DeviceAttribute{StringValue: ptr.To(p.PhysFn.String())}
	}
	if p.SRIOVTotalVFs > 0 {
		attrs[AttrSRIOVTotalVFs] = resourceapi.DeviceAttribute{IntValue: ptr.To(int64(p.SRIOVTotalVFs))}
	}
	return resourceapi.Device{Name: p.Address.DeviceName(), Attributes: attrs}
}

// Slices returns the ResourceSlice objects that the resourceslice
// controller creates for res when it publishes for nodeName, without the
// server-side fields (name, owner UID). It is what `vfio-dra inspect`
// prints.
func Slices(driverName, nodeName string, res resourceslice.DriverResources) []resourceapi.ResourceSlice {
	var out []resourceapi.ResourceSlice
	for poolName, pool := range res.Pools {
		for i, s := range pool.Slices {
			out = append(out, resourceapi.ResourceSlice{
				TypeMeta: metav1.TypeMeta{APIVersion: resourceapi.SchemeGroupVersion.String(), Kind: "ResourceSlice"},
				ObjectMeta: metav1.ObjectMeta{
					GenerateName: fmt.Sprintf("%0*x-%s-%s-", indexLength(len(pool.Slices)), i, driverName, nodeName),
				},
				Spec: resourceapi.ResourceSliceSpec{
					Driver: driverName,
					Pool: resourceapi.ResourcePool{
						Name:               poolName,
						Generation:         max(pool.Generation, 1),
						ResourceSliceCount: int64(len(pool.Slices)),
					},
					NodeName:       ptr.To(nodeName),
					Devices:        s.Devices,
					SharedCounters: s.SharedCounters,
				},
			})
		}
	}
	return out
}

// indexLength is the width of the slice index at the start of generated
// slice names, as the resourceslice controller computes it.
func indexLength(n int) int {
	return max(5, len(strconv.FormatInt(int64(max(n-1, 0)), 16)))
}
