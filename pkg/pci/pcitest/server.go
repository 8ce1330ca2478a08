package pcitest

// Server returns the PCI functions of a two-socket server that has every
// case the driver must handle. The demo node in demo/sysfs is this server.
//
//	group  functions                               case
//	0      00:00.0 host bridge                     bridge, never offered
//	1      00:01.0 root port                       bridge
//	2      01:00.0 GPU, 01:00.1 its HDMI audio     two endpoints, one group
//	3      00:02.0 ASPEED VGA, boot_vga=1          the host console
//	4      00:1f.0 ISA bridge, 1f.2 SATA, 1f.4 SMBus   chipset functions sharing a group
//	5      00:1e.0 PCI bridge, 02:01.0, 02:02.0    conventional PCI: bridge and endpoints share a group
//	6      00:03.0 root port                       bridge
//	7      03:00.0, 03:00.1 dual-port NIC          multi-function device without ACS
//	-      00:14.0 USB controller                  no IOMMU group
//	20     80:01.0 root port (NUMA 1)              bridge
//	21     81:00.0 SR-IOV PF, 2 VFs enabled        PF with VFs: not offered
//	22,23  81:00.2, 81:00.3 VFs                    one group each (81:00.3 already on vfio-pci)
//	24     80:02.0 root port                       bridge
//	25     82:00.0 Netronome 19ee:4000 SmartNIC    single-device group
//	26     83:00.0 NVMe SSD                        single-device group
//	27     84:00.0 Xilinx FPGA, no driver          single-device group, no host driver
func Server() []Function {
	return []Function{
		{Address: "0000:00:00.0", Vendor: 0x8086, Device: 0x2020, SubVendor: 0x15d9, SubDevice: 0x095d, Class: 0x060000, IOMMUGroup: 0, NUMANode: 0},
		{Address: "0000:00:01.0", Vendor: 0x8086, Device: 0x2030, Class: 0x060400, Driver: "pcieport", IOMMUGroup: 1, NUMANode: 0},
		{Address: "0000:01:00.0", Parent: "0000:00:01.0", Vendor: 0x10de, Device: 0x2204, SubVendor: 0x10de, SubDevice: 0x1454, Class: 0x030000, Driver: "nvidia", IOMMUGroup: 2, NUMANode: 0},
		{Address: "0000:01:00.1", Parent: "0000:00:01.0", Vendor: 0x10de, Device: 0x1aef, SubVendor: 0x10de, SubDevice: 0x1454, Class: 0x040300, Driver: "snd_hda_intel", IOMMUGroup: 2, NUMANode: 0},
		{Address: "0000:00:02.0", Vendor: 0x1a03, Device: 0x2000, SubVendor: 0x15d9, SubDevice: 0x095d, Class: 0x030000, Driver: "ast", IOMMUGroup: 3, NUMANode: 0, BootVGA: true},
		{Address: "0000:00:03.0", Vendor: 0x8086, Device: 0x2032, Class: 0x060400, Driver: "pcieport", IOMMUGroup: 6, NUMANode: 0},
		{Address: "0000:03:00.0", Parent: "0000:00:03.0", Vendor: 0x8086, Device: 0x1572, SubVendor: 0x8086, SubDevice: 0x0007, Class: 0x020000, Driver: "i40e", IOMMUGroup: 7, NUMANode: 0},
		{Address: "0000:03:00.1", Parent: "0000:00:03.0", Vendor: 0x8086, Device: 0x1572, SubVendor: 0x8086, SubDevice: 0x0007, Class: 0x020000, Driver: "i40e", IOMMUGroup: 7, NUMANode: 0},
		{Address: "0000:00:14.0", Vendor: 0x8086, Device: 0xa1af, SubVendor: 0x15d9, SubDevice: 0x095d, Class: 0x0c0330, Driver: "xhci_hcd", NoIOMMU: true, NUMANode: -1},
		{Address: "0000:00:1e.0", Vendor: 0x8086, Device: 0x244e, Class: 0x060401, IOMMUGroup: 5, NUMANode: 0},
		{Address: "0000:02:01.0", Parent: "0000:00:1e.0", Vendor: 0x8086, Device: 0x1076, SubVendor: 0x8086, SubDevice: 0x1076, Class: 0x020000, Driver: "e1000", IOMMUGroup: 5, NUMANode: 0},
		{Address: "0000:02:02.0", Parent: "0000:00:1e.0", Vendor: 0x8086, Device: 0x1076, SubVendor: 0x8086, SubDevice: 0x1076, Class: 0x020000, Driver: "e1000", IOMMUGroup: 5, NUMANode: 0},
		{Address: "0000:00:1f.0", Vendor: 0x8086, Device: 0xa1c1, SubVendor: 0x15d9, SubDevice: 0x095d, Class: 0x060100, IOMMUGroup: 4, NUMANode: 0},
		{Address: "0000:00:1f.2", Vendor: 0x8086, Device: 0xa182, SubVendor: 0x15d9, SubDevice: 0x095d, Class: 0x010601, Driver: "ahci", IOMMUGroup: 4, NUMANode: 0},
		{Address: "0000:00:1f.4", Vendor: 0x8086, Device: 0xa1a3, SubVendor: 0x15d9, SubDevice: 0x095d, Class: 0x0c0500, Driver: "i801_smbus", IOMMUGroup: 4, NUMANode: 0},
		{Address: "0000:80:01.0", Vendor: 0x8086, Device: 0x2030, Class: 0x060400, Driver: "pcieport", IOMMUGroup: 20, NUMANode: 1},
		{Address: "0000:81:00.0", Parent: "0000:80:01.0", Vendor: 0x15b3, Device: 0x1017, SubVendor: 0x15b3, SubDevice: 0x0007, Class: 0x020000, Driver: "mlx5_core", IOMMUGroup: 21, NUMANode: 1, SRIOVTotalVFs: 8},
		{Address: "0000:81:00.2", Parent: "0000:80:01.0", Vendor: 0x15b3, Device: 0x1018, SubVendor: 0x15b3, SubDevice: 0x0007, Class: 0x020000, Driver: "mlx5_core", IOMMUGroup: 22, NUMANode: 1, PhysFn: "0000:81:00.0"},
		{Address: "0000:81:00.3", Parent: "0000:80:01.0", Vendor: 0x15b3, Device: 0x1018, SubVendor: 0x15b3, SubDevice: 0x0007, Class: 0x020000, Driver: "vfio-pci", IOMMUGroup: 23, NUMANode: 1, PhysFn: "0000:81:00.0"},
		{Address: "0000:80:02.0", Vendor: 0x8086, Device: 0x2031, Class: 0x060400, Driver: "pcieport", IOMMUGroup: 24, NUMANode: 1},
		{Address: "0000:82:00.0", Parent: "0000:80:02.0", Vendor: 0x19ee, Device: 0x4000, SubVendor: 0x19ee, SubDevice: 0x4000, Class: 0x020000, Driver: "nfp", IOMMUGroup: 25, NUMANode: 1},
		{Address: "0000:83:00.0", Parent: "0000:80:02.0", Vendor: 0x144d, Device: 0xa808, SubVendor: 0x144d, SubDevice: 0xa801, Class: 0x010802, Driver: "nvme", IOMMUGroup: 26, NUMANode: 1},
		{Address: "0000:84:00.0", Parent: "0000:80:02.0", Vendor: 0x10ee, Device: 0x903f, SubVendor: 0x10ee, SubDevice: 0x0007, Class: 0x120000, IOMMUGroup: 27, NUMANode: 1},
	}
}

// Drivers returns the PCI drivers loaded on Server besides those bound to
// its functions: vfio-pci must be there to bind anything.
func Drivers() []string { return []string{"vfio-pci"} }

// NewServer lays out Server below root with Drivers loaded.
func NewServer(root string) (*Tree, error) {
	t, err := New(root)
	if err != nil {
		return nil, err
	}
	if err := t.Add(Server()...); err != nil {
		return nil, err
	}
	for _, d := range Drivers() {
		if err := t.AddDriver(d); err != nil {
			return nil, err
		}
	}
	return t, nil
}
