package pci

import "slices"

// Equal reports whether d and o describe the same function in the same
// state, field by field. A rescan compares what it read with the last
// scan, so that a node that did not change costs no rebuild of what is
// published.
func (d *Device) Equal(o *Device) bool {
	if d == nil || o == nil {
		return d == o
	}
	return d.Address == o.Address && d.Path == o.Path &&
		d.VendorID == o.VendorID && d.DeviceID == o.DeviceID &&
		d.SubsystemVendorID == o.SubsystemVendorID && d.SubsystemDeviceID == o.SubsystemDeviceID &&
		d.Class == o.Class && d.Driver == o.Driver && equalPtr(d.IOMMUGroup, o.IOMMUGroup) &&
		d.NUMANode == o.NUMANode && d.PCIeRoot == o.PCIeRoot && equalPtr(d.Parent, o.Parent) &&
		d.BootVGA == o.BootVGA && equalPtr(d.PhysFn, o.PhysFn) &&
		d.SRIOVTotalVFs == o.SRIOVTotalVFs && d.SRIOVNumVFs == o.SRIOVNumVFs && slices.Equal(d.VirtFns, o.VirtFns) &&
		equalPtr(d.HeaderType, o.HeaderType) && d.ConfigProblem == o.ConfigProblem &&
		equalPtr(d.BARs, o.BARs) && d.ResourceProblem == o.ResourceProblem
}

func equalPtr[T comparable](a, b *T) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}
