package hostviewtest

import (
	"net/netip"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// Functions of RunningHost.
const (
	RootNVMe    = "0000:01:00.0" // nvme0n1: /boot on p2, LVM (/ and swap) on p3
	PCIBridge   = "0000:00:1e.0" // conventional PCI bridge, group 3
	MgmtNIC     = "0000:02:00.0" // eno1, behind the PCI bridge: default route
	MgmtNICMate = "0000:02:01.0" // eno2, same group as eno1, no address
	VMGPU       = "0000:03:00.0" // on vfio-pci, group 60 held by a VM
	VMGPUAudio  = "0000:03:00.1"
	UART        = "0000:00:16.3" // ttyS4, the serial console
	FreeVFIO    = "0000:04:00.0" // on vfio-pci, group 61, nobody holds it
	FreeNVMe    = "0000:05:00.0" // nvme1n1, not mounted
	OwnNIC      = "0000:06:00.0" // on vfio-pci for one of the driver's own claims, group 63
)

// VMPID is the pid of the VM in RunningHost; OwnGroup the group of the
// driver's own prepared claim that a container holds.
const (
	VMPID    = 4242
	OwnGroup = 63
)

// RunningHostFunctions are the PCI functions of RunningHost.
func RunningHostFunctions() []pcitest.Function {
	return []pcitest.Function{
		{Address: "0000:00:00.0", Vendor: 0x8086, Device: 0x3e30, Class: 0x060000, IOMMUGroup: 0},
		{Address: "0000:00:1d.0", Vendor: 0x8086, Device: 0xa330, Class: 0x060400, Driver: "pcieport", IOMMUGroup: 1},
		{Address: RootNVMe, Parent: "0000:00:1d.0", Vendor: 0x144d, Device: 0xa808, Class: 0x010802, Driver: "nvme", IOMMUGroup: 2},
		{Address: PCIBridge, Vendor: 0x8086, Device: 0x244e, Class: 0x060401, IOMMUGroup: 3},
		{Address: MgmtNIC, Parent: PCIBridge, Vendor: 0x8086, Device: 0x107c, Class: 0x020000, Driver: "e1000", IOMMUGroup: 3},
		{Address: MgmtNICMate, Parent: PCIBridge, Vendor: 0x8086, Device: 0x107c, Class: 0x020000, Driver: "e1000", IOMMUGroup: 3},
		{Address: "0000:00:1c.0", Vendor: 0x8086, Device: 0xa338, Class: 0x060400, Driver: "pcieport", IOMMUGroup: 4},
		{Address: VMGPU, Parent: "0000:00:1c.0", Vendor: 0x10de, Device: 0x2204, Class: 0x030000, Driver: "vfio-pci", IOMMUGroup: 60},
		{Address: VMGPUAudio, Parent: "0000:00:1c.0", Vendor: 0x10de, Device: 0x1aef, Class: 0x040300, Driver: "vfio-pci", IOMMUGroup: 60},
		{Address: UART, Vendor: 0x8086, Device: 0xa363, Class: 0x070002, Driver: "serial", IOMMUGroup: 5},
		{Address: "0000:00:1b.0", Vendor: 0x8086, Device: 0xa340, Class: 0x060400, Driver: "pcieport", IOMMUGroup: 6},
		{Address: FreeVFIO, Parent: "0000:00:1b.0", Vendor: 0x8086, Device: 0x1521, Class: 0x020000, Driver: "vfio-pci", IOMMUGroup: 61},
		{Address: "0000:00:1a.0", Vendor: 0x8086, Device: 0xa341, Class: 0x060400, Driver: "pcieport", IOMMUGroup: 7},
		{Address: FreeNVMe, Parent: "0000:00:1a.0", Vendor: 0x144d, Device: 0xa80a, Class: 0x010802, Driver: "nvme", IOMMUGroup: 62},
		{Address: "0000:00:19.0", Vendor: 0x8086, Device: 0xa342, Class: 0x060400, Driver: "pcieport", IOMMUGroup: 8},
		{Address: OwnNIC, Parent: "0000:00:19.0", Vendor: 0x19ee, Device: 0x4000, Class: 0x020000, Driver: "vfio-pci", IOMMUGroup: OwnGroup},
	}
}

// RunningHost lays out a host in use: root on LVM over an NVMe with /boot
// on a partition of it and swap on LVM, the default route on a NIC behind a
// conventional PCI bridge (its group-mate has no address), a VM (pid 4242)
// holding a GPU's group on vfio-pci, a serial console on a PCI UART, a free
// function on vfio-pci, a free NVMe, and a container holding the group of
// one of the driver's own claims (OwnGroup). sysRoot and procRoot must not
// exist yet or be empty.
func RunningHost(sysRoot, procRoot string) (*pcitest.Tree, *Host, error) {
	tree, err := pcitest.New(sysRoot)
	if err != nil {
		return nil, nil, err
	}
	if err := tree.Add(RunningHostFunctions()...); err != nil {
		return nil, nil, err
	}
	h, err := New(sysRoot, procRoot)
	if err != nil {
		return nil, nil, err
	}
	return tree, h, h.layOutRunningHost()
}

func (h *Host) layOutRunningHost() error {
	steps := []func() error{
		func() error {
			return h.AddDisk(Disk{Name: "nvme0n1", Function: RootNVMe, Under: "nvme/nvme0", Major: 259, Minor: 0, Partitions: 3})
		},
		func() error {
			return h.AddDisk(Disk{Name: "nvme1n1", Function: FreeNVMe, Under: "nvme/nvme1", Major: 259, Minor: 4, Partitions: 1})
		},
		func() error {
			return h.AddStacked(Stacked{Name: "dm-0", DMName: "vg0-root", Major: 253, Minor: 0, Slaves: []string{"nvme0n1p3"}})
		},
		func() error {
			return h.AddStacked(Stacked{Name: "dm-1", DMName: "vg0-swap", Major: 253, Minor: 1, Slaves: []string{"nvme0n1p3"}})
		},
		func() error {
			return h.AddMount(Mount{Major: 253, Minor: 0, MountPoint: "/", FSType: "ext4", Source: "/dev/mapper/vg0-root", Optional: []string{"shared:1"}})
		},
		func() error {
			return h.AddMount(Mount{Major: 0, Minor: 22, MountPoint: "/sys", FSType: "sysfs", Source: "sysfs", Optional: []string{"shared:2"}})
		},
		func() error {
			return h.AddMount(Mount{Major: 0, Minor: 23, MountPoint: "/proc", FSType: "proc", Source: "proc", Optional: []string{"shared:3"}})
		},
		func() error {
			return h.AddMount(Mount{Major: 259, Minor: 2, MountPoint: "/boot", FSType: "ext4", Source: "/dev/nvme0n1p2", Optional: []string{"shared:4"}})
		},
		func() error {
			return h.AddMount(Mount{Major: 259, Minor: 1, MountPoint: "/boot/efi", FSType: "vfat", Source: "/dev/nvme0n1p1", Optional: []string{"shared:5"}})
		},
		func() error {
			return h.AddMount(Mount{Major: 0, Minor: 45, MountPoint: "/run/user/1000", FSType: "tmpfs", Source: "tmpfs", Optional: []string{"shared:6", "master:1"}})
		},
		func() error { return h.AddSwap("/dev/dm-1", "partition") },
		func() error { return h.AddInterface(Interface{Name: "eno1", Function: MgmtNIC}) },
		func() error { return h.AddInterface(Interface{Name: "eno2", Function: MgmtNICMate}) },
		func() error { return h.AddInterface(Interface{Name: "lo"}) },
		func() error {
			return h.AddRoute("eno1", netip.MustParsePrefix("0.0.0.0/0"), netip.MustParseAddr("192.168.1.1"))
		},
		func() error { return h.AddRoute("eno1", netip.MustParsePrefix("192.168.1.0/24"), netip.Addr{}) },
		func() error { return h.AddAddress6("lo", netip.MustParsePrefix("::1/128")) },
		func() error { return h.AddAddress6("eno1", netip.MustParsePrefix("fe80::1/64")) },
		func() error { return h.AddAddress6("eno2", netip.MustParsePrefix("fe80::2/64")) },
		func() error { return h.AddSerial("ttyS4", UART, 68) },
		func() error { return h.SetConsole("tty0", "ttyS4") },
		func() error { return h.AddProcess(812, "sshd", "/dev/null", "socket:[20431]", "/var/log/auth.log") },
		func() error {
			return h.AddProcess(VMPID, "qemu-system-x86", "/dev/null", "/dev/vfio/vfio", "/dev/vfio/60", "anon_inode:[vfio-device]", "/dev/kvm", "anon_inode:kvm-vm")
		},
		func() error { return h.AddProcess(5000, "dpdk-testpmd", "/dev/null", "/dev/vfio/vfio", "/dev/vfio/63") },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return err
		}
	}
	return nil
}

// Server lays out a host view for pcitest.Server: root on the SATA disk of
// the chipset's AHCI controller (00:1f.2, which stays with the host anyway)
// and the default route on the SR-IOV PF 81:00.0 (not offered while its VFs
// are enabled), so that the host uses nothing the Server offers. sysRoot
// must hold the Server's tree.
func Server(sysRoot, procRoot string) (*Host, error) {
	h, err := New(sysRoot, procRoot)
	if err != nil {
		return nil, err
	}
	for _, s := range []func() error{
		func() error {
			return h.AddDisk(Disk{Name: "sda", Function: "0000:00:1f.2", Under: "ata1/host0/target0:0:0/0:0:0:0/block", Major: 8, Minor: 0, Partitions: 2})
		},
		func() error {
			return h.AddMount(Mount{Major: 8, Minor: 2, MountPoint: "/", FSType: "xfs", Source: "/dev/sda2", Optional: []string{"shared:1"}})
		},
		func() error {
			return h.AddMount(Mount{Major: 8, Minor: 1, MountPoint: "/boot", FSType: "xfs", Source: "/dev/sda1", Optional: []string{"shared:2"}})
		},
		func() error { return h.AddInterface(Interface{Name: "ens1f0np0", Function: "0000:81:00.0"}) },
		func() error {
			return h.AddRoute("ens1f0np0", netip.MustParsePrefix("0.0.0.0/0"), netip.MustParseAddr("10.0.0.1"))
		},
		func() error { return h.AddRoute("ens1f0np0", netip.MustParsePrefix("10.0.0.0/16"), netip.Addr{}) },
	} {
		if err := s(); err != nil {
			return nil, err
		}
	}
	return h, nil
}
