package inventory

import (
	"errors"
	"io/fs"
	"slices"
	"strings"

	"github.com/vfio-dra/vfio-dra-driver/api/v1alpha1"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// ScanGroups is Scan restricted to the IOMMU groups of addrs: it reads
// those functions, their groups and the groups' members, nothing else, and
// decides on them exactly as Scan does (the rules look at a function, the
// members of its group and, for what the host uses, the functions in use
// and the endpoints above them, which are read too). A prepare needs no more, and so costs the
// same on a node of 20 functions and of 1,024. An address that is not on
// the node has no Decision.
func ScanGroups(fsys *pci.FS, cfg *v1alpha1.DriverConfiguration, hostDrivers map[string]string, host *HostUse, addrs []pci.Address) (*Inventory, error) {
	var problems []error
	read := map[pci.Address]*pci.Device{}
	groups := map[int][]pci.Address{}
	readDevice := func(a pci.Address) (*pci.Device, error) {
		if d, ok := read[a]; ok {
			return d, nil
		}
		d, err := fsys.Device(a)
		if err != nil {
			return nil, err
		}
		if driver, ok := hostDrivers[a.String()]; ok {
			d.Driver = driver
		}
		read[a] = d
		return d, nil
	}
	for _, a := range addrs {
		d, err := readDevice(a)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			problems = append(problems, err)
			continue
		}
		if d.IOMMUGroup == nil {
			continue
		}
		if _, done := groups[*d.IOMMUGroup]; done {
			continue
		}
		members, err := fsys.IOMMUGroupMembers(*d.IOMMUGroup)
		if err != nil {
			problems = append(problems, err)
			continue
		}
		groups[*d.IOMMUGroup] = members
		for _, m := range members {
			if _, err := readDevice(m); err != nil {
				// Decide refuses the group: a member it cannot see.
				problems = append(problems, err)
			}
		}
	}
	// A function in use takes the endpoints above it with it (a VMD
	// controller and its NVMe drive): Decide needs them and their paths.
	if host != nil {
		for a := range host.InUse {
			d, err := readDevice(a)
			if err != nil {
				continue
			}
			for _, elem := range strings.Split(d.Path, "/") {
				if up, err := pci.ParseAddress(elem); err == nil {
					_, _ = readDevice(up)
				}
			}
		}
	}
	devices := make([]*pci.Device, 0, len(read))
	for _, d := range read {
		devices = append(devices, d)
	}
	slices.SortFunc(devices, func(a, b *pci.Device) int { return a.Address.Compare(b.Address) })
	inv := Decide(devices, groups, cfg, host)
	inv.Problems = append(problems, inv.Problems...)
	return inv, nil
}
