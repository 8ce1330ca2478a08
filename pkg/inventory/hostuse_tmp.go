package inventory

import "github.com/vfio-dra/vfio-dra-driver/pkg/pci"

// HostUse: temporary copy of the contract with hostrules; removed when their change is merged.
type HostUse struct {
	InUse       map[pci.Address]string
	Unavailable string
}
