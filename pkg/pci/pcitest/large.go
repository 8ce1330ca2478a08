package pcitest

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// SRIOVNode returns a node of pfs SR-IOV physical functions, each below its
// own root port with vfsPerPF virtual functions enabled (at most 256: a bus
// of their own, as the kernel numbers VFs past the PF's bus), every VF in an
// IOMMU group of its own. With 4 and 256 it is the 1,024-device node of the
// benchmarks: the PFs are not offered (VFs enabled), every VF is.
func SRIOVNode(pfs, vfsPerPF int) []Function {
	var out []Function
	group := 0
	for p := range pfs {
		port := fmt.Sprintf("0000:00:%02x.0", p+1)
		bus := 0x10 + 2*p
		pf := fmt.Sprintf("0000:%02x:00.0", bus)
		out = append(out,
			Function{Address: port, Vendor: 0x8086, Device: 0x2030, Class: 0x060400, Driver: "pcieport", IOMMUGroup: group, NUMANode: p % 2},
			Function{Address: pf, Parent: port, Vendor: 0x8086, Device: 0x1593, SubVendor: 0x8086, SubDevice: 0x0002,
				Class: 0x020000, Driver: "ice", IOMMUGroup: group + 1, NUMANode: p % 2, SRIOVTotalVFs: 256},
		)
		group += 2
		for v := range vfsPerPF {
			out = append(out, Function{
				Address: fmt.Sprintf("0000:%02x:%02x.%d", bus+1, v/8, v%8), Parent: port,
				Vendor: 0x8086, Device: 0x1889, SubVendor: 0x8086, SubDevice: 0x0000,
				Class: 0x020000, Driver: "iavf", IOMMUGroup: group, NUMANode: p % 2, PhysFn: pf,
			})
			group++
		}
	}
	return out
}

// NewSRIOVNode lays out SRIOVNode(pfs, vfsPerPF) below root with vfio-pci
// loaded.
func NewSRIOVNode(root string, pfs, vfsPerPF int) (*Tree, error) {
	t, err := New(root)
	if err != nil {
		return nil, err
	}
	if err := t.Add(SRIOVNode(pfs, vfsPerPF)...); err != nil {
		return nil, err
	}
	if err := t.AddDriver("vfio-pci"); err != nil {
		return nil, err
	}
	return t, nil
}

// ReadRaw reads every file and link below root that discovery reads, the
// way the simplest program would (whole files, no parsing, no checks): the
// floor of any discovery, for benchmarks. It returns the bytes read.
func ReadRaw(root string) (int, error) {
	devDir := filepath.Join(root, pci.BusDevicesDir)
	entries, err := os.ReadDir(devDir)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(devDir, e.Name()))
		if err != nil {
			return 0, err
		}
		dir := filepath.Join(devDir, target)
		for _, f := range []string{"vendor", "device", "subsystem_vendor", "subsystem_device", "class", "numa_node",
			"sriov_totalvfs", "sriov_numvfs", "boot_vga", "config", "resource"} {
			if data, err := os.ReadFile(filepath.Join(dir, f)); err == nil {
				n += len(data)
			}
		}
		for _, l := range []string{"driver", "iommu_group", "physfn"} {
			if t, err := os.Readlink(filepath.Join(dir, l)); err == nil {
				n += len(t)
			}
		}
		virtfns, err := filepath.Glob(filepath.Join(dir, "virtfn*"))
		if err != nil {
			return 0, err
		}
		for _, v := range virtfns {
			if t, err := os.Readlink(v); err == nil {
				n += len(t)
			}
		}
		if t, err := os.Readlink(filepath.Join(dir, "iommu_group")); err == nil {
			members, err := os.ReadDir(filepath.Join(dir, t, "devices"))
			if err != nil {
				return 0, err
			}
			n += len(members)
		}
	}
	return n, nil
}
