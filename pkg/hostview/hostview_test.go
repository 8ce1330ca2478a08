package hostview_test

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview"
	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview/hostviewtest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

func addr(t *testing.T, s string) pci.Address {
	t.Helper()
	a, err := pci.ParseAddress(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func inUse(t *testing.T, m map[string]string) map[pci.Address]string {
	out := map[pci.Address]string{}
	for k, v := range m {
		out[addr(t, k)] = v
	}
	return out
}

func TestRunningHost(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	_, h, err := hostviewtest.RunningHost(filepath.Join(dir, "sys"), filepath.Join(dir, "proc"))
	if err != nil {
		t.Fatal(err)
	}
	own := hostview.Own{Groups: map[int]bool{hostviewtest.OwnGroup: true}}
	got := hostview.New(h.Sys, h.Proc).Read(own)
	if got.Unavailable != "" {
		t.Errorf("Unavailable = %q", got.Unavailable)
	}
	want := inUse(t, map[string]string{
		hostviewtest.RootNVMe:   "/ (vg0-root on nvme0n1p3)",
		hostviewtest.MgmtNIC:    "default route (eno1)",
		hostviewtest.VMGPU:      "held by pid 4242 (qemu-system-x86) through /dev/vfio/60",
		hostviewtest.VMGPUAudio: "held by pid 4242 (qemu-system-x86) through /dev/vfio/60",
		hostviewtest.UART:       "serial console ttyS4",
	})
	if diff := cmp.Diff(want, got.InUse); diff != "" {
		t.Errorf("in use (-want +got):\n%s", diff)
	}

	// Without the claim in own, its container is another user.
	got = hostview.New(h.Sys, h.Proc).Read(hostview.Own{})
	if e := got.InUse[addr(t, hostviewtest.OwnNIC)]; e != "held by pid 5000 (dpdk-testpmd) through /dev/vfio/63" {
		t.Errorf("own NIC without own: %q", e)
	}
}

// TestRunningHostDecisions: what the running host uses, and its group-mate,
// is not offered; the free functions are, one on vfio-pci and one NVMe
// among them, and so is the function of the driver's own claim.
func TestRunningHostDecisions(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	tree, h, err := hostviewtest.RunningHost(filepath.Join(dir, "sys"), filepath.Join(dir, "proc"))
	if err != nil {
		t.Fatal(err)
	}
	fs, err := pci.NewFS(tree.Root)
	if err != nil {
		t.Fatal(err)
	}
	own := hostview.Own{Groups: map[int]bool{hostviewtest.OwnGroup: true}}
	inv, err := inventory.Scan(fs, nil, nil, hostview.New(h.Sys, h.Proc).Read(own))
	if err != nil {
		t.Fatal(err)
	}
	var offered []string
	reasons := map[string]string{}
	for _, d := range inv.Decisions {
		if d.Offered {
			offered = append(offered, d.Device.Address.String())
		}
		reasons[d.Device.Address.String()] = d.Reason
	}
	if diff := cmp.Diff([]string{hostviewtest.FreeVFIO, hostviewtest.FreeNVMe, hostviewtest.OwnNIC}, offered); diff != "" {
		t.Errorf("offered (-want +got):\n%s", diff)
	}
	for fn, want := range map[string]string{
		hostviewtest.RootNVMe:    "in use: / (vg0-root on nvme0n1p3)",
		hostviewtest.MgmtNIC:     "in use: default route (eno1)",
		hostviewtest.MgmtNICMate: "IOMMU group 3: member " + hostviewtest.MgmtNIC + " is not offered (in use: default route (eno1))",
		hostviewtest.VMGPU:       "in use: held by pid 4242 (qemu-system-x86) through /dev/vfio/60",
		hostviewtest.VMGPUAudio:  "in use: held by pid 4242 (qemu-system-x86) through /dev/vfio/60",
		hostviewtest.UART:        "in use: serial console ttyS4",
	} {
		if reasons[fn] != want {
			t.Errorf("%s: reason %q, want %q", fn, reasons[fn], want)
		}
	}
}

// TestPartialHostView: what could be read still counts when another part
// of the view cannot be read.
func TestPartialHostView(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	tree, h, err := hostviewtest.RunningHost(filepath.Join(dir, "sys"), filepath.Join(dir, "proc"))
	if err != nil {
		t.Fatal(err)
	}
	must(t, os.Remove(filepath.Join(h.Proc, "1", "mountinfo")))
	fs, err := pci.NewFS(tree.Root)
	if err != nil {
		t.Fatal(err)
	}
	host := hostview.New(h.Sys, h.Proc).Read(hostview.Own{})
	inv, err := inventory.Scan(fs, nil, nil, host)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range inv.Decisions {
		switch d.Device.Address.String() {
		case hostviewtest.VMGPU:
			if want := "in use: held by pid 4242 (qemu-system-x86) through /dev/vfio/60"; d.Reason != want {
				t.Errorf("GPU held by the VM: reason %q, want %q", d.Reason, want)
			}
		case hostviewtest.FreeNVMe, hostviewtest.FreeVFIO:
			if d.Offered || !strings.Contains(d.Reason, "mountinfo") {
				t.Errorf("%s without a readable mountinfo: offered %v, reason %q", d.Device.Address, d.Offered, d.Reason)
			}
		}
	}
}

// host lays out a few PCI functions and an empty host view.
func host(t *testing.T, fns ...pcitest.Function) *hostviewtest.Host {
	t.Helper()
	dir := t.TempDir()
	tree, err := pcitest.New(filepath.Join(dir, "sys"))
	if err != nil {
		t.Fatal(err)
	}
	if err := tree.Add(fns...); err != nil {
		t.Fatal(err)
	}
	h, err := hostviewtest.New(tree.Root, filepath.Join(dir, "proc"))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func endpoint(a string, class uint32, driver string, group int) pcitest.Function {
	return pcitest.Function{Address: a, Vendor: 0x8086, Device: 0x1234, Class: class, Driver: driver, IOMMUGroup: group}
}

var (
	sata1 = endpoint("0000:00:17.0", 0x010601, "ahci", 1)
	sata2 = endpoint("0000:00:18.0", 0x010601, "ahci", 2)
	nvme  = endpoint("0000:01:00.0", 0x010802, "nvme", 3)
	nvme2 = endpoint("0000:02:00.0", 0x010802, "nvme", 4)
	nic1  = endpoint("0000:03:00.0", 0x020000, "ice", 5)
	nic2  = endpoint("0000:03:00.1", 0x020000, "ice", 6)
	gpu   = endpoint("0000:04:00.0", 0x030000, "vfio-pci", 7)
)

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestHostView(t *testing.T) {
	t.Parallel()
	sda := hostviewtest.Disk{Name: "sda", Function: sata1.Address, Under: "ata1/host0/target0:0:0/0:0:0:0/block", Major: 8, Minor: 0, Partitions: 1}
	sdb := hostviewtest.Disk{Name: "sdb", Function: sata2.Address, Under: "ata2/host1/target1:0:0/1:0:0:0/block", Major: 8, Minor: 16, Partitions: 1}
	nvme0 := hostviewtest.Disk{Name: "nvme0n1", Function: nvme.Address, Under: "nvme/nvme0", Major: 259, Minor: 0, Partitions: 2}
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, h *hostviewtest.Host)
		own   hostview.Own
		want  map[string]string
		// unavailable are parts of Unavailable; none when empty.
		unavailable []string
	}{
		{
			name: "nothing in use",
			want: map[string]string{},
		},
		{
			name: "md RAID1 over two controllers, path with a space",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddDisk(sda))
				must(t, h.AddDisk(sdb))
				must(t, h.AddStacked(hostviewtest.Stacked{Name: "md0", Major: 9, Minor: 0, Slaves: []string{"sda1", "sdb1"}}))
				must(t, h.AddMount(hostviewtest.Mount{Major: 9, Minor: 0, MountPoint: "/srv/my data", FSType: "ext4", Source: "/dev/md0", Optional: []string{"shared:7", "master:2", "propagate_from:1"}}))
			},
			want: map[string]string{sata1.Address: "/srv/my data (md0 on sda1)", sata2.Address: "/srv/my data (md0 on sdb1)"},
		},
		{
			name: "btrfs names its device only in the source",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddDisk(nvme0))
				must(t, h.AddMount(hostviewtest.Mount{Major: 0, Minor: 31, MountPoint: "/home", FSType: "btrfs", Source: "/dev/nvme0n1p2"}))
			},
			want: map[string]string{nvme.Address: "/home (nvme0n1p2)"},
		},
		{
			name: "swap on an LVM volume named by its dm name, volume group not mounted",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddDisk(nvme0))
				must(t, h.AddDisk(sda))
				must(t, h.AddStacked(hostviewtest.Stacked{Name: "dm-0", DMName: "vg0-swap", Major: 253, Minor: 0, Slaves: []string{"nvme0n1p1"}}))
				must(t, h.AddStacked(hostviewtest.Stacked{Name: "dm-1", DMName: "vms-disk0", Major: 253, Minor: 1, Slaves: []string{"sda1"}}))
				must(t, h.AddSwap("/dev/mapper/vg0-swap", "partition"))
				must(t, h.AddSwap("/swap file", "file"))
			},
			want: map[string]string{nvme.Address: "swap /dev/mapper/vg0-swap (vg0-swap on nvme0n1p1)", sata1.Address: "vms-disk0 on sda1"},
		},
		{
			name: "NVMe multipath: the namespace below its subsystem",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddNVMeSubsystem("nvme-subsys0", "nvme0n1", 259, 0, map[string]string{"nvme0": nvme.Address, "nvme1": nvme2.Address}))
				must(t, h.AddMount(hostviewtest.Mount{Major: 259, Minor: 0, MountPoint: "/", FSType: "ext4", Source: "/dev/nvme0n1"}))
			},
			want: map[string]string{nvme.Address: "/ (nvme0n1)", nvme2.Address: "/ (nvme0n1)"},
		},
		{
			name: "ZFS: its disks cannot be found",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddMount(hostviewtest.Mount{Major: 0, Minor: 40, MountPoint: "/", FSType: "zfs", Source: "rpool/ROOT/pve-1"}))
			},
			want:        map[string]string{},
			unavailable: []string{"mount /", "ZFS pool rpool/ROOT/pve-1"},
		},
		{
			name: "a mounted block device that sysfs does not show",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddMount(hostviewtest.Mount{Major: 8, Minor: 3, MountPoint: "/var", FSType: "xfs", Source: "/dev/sda3"}))
			},
			want:        map[string]string{},
			unavailable: []string{"mount /var", "8:3"},
		},
		{
			name: "bond, VLAN on it, IPv6 default route",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f0", Function: nic1.Address}))
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f1", Function: nic2.Address}))
				must(t, h.AddInterface(hostviewtest.Interface{Name: "bond0", Kind: "bond", Lowers: []string{"ens1f0", "ens1f1"}}))
				must(t, h.AddInterface(hostviewtest.Interface{Name: "bond0.100", Kind: "vlan", Lowers: []string{"bond0"}}))
				must(t, h.AddDefaultRoute6("bond0.100", netip.MustParseAddr("fe80::1")))
			},
			want: map[string]string{nic1.Address: "default route (bond0.100 on ens1f0)", nic2.Address: "default route (bond0.100 on ens1f1)"},
		},
		{
			name: "bridge with an IPv4 prefix route, IPv6 global address on a VLAN",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f0", Function: nic1.Address}))
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f1", Function: nic2.Address}))
				must(t, h.AddInterface(hostviewtest.Interface{Name: "vmbr0", Kind: "bridge", Lowers: []string{"ens1f0"}}))
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f1.20", Kind: "vlan", Lowers: []string{"ens1f1"}}))
				must(t, h.AddRoute("vmbr0", netip.MustParsePrefix("192.168.10.0/24"), netip.Addr{}))
				must(t, h.AddAddress6("ens1f1.20", netip.MustParsePrefix("2001:db8::5/64")))
				must(t, h.AddAddress6("ens1f1", netip.MustParsePrefix("fe80::5/64")))
			},
			want: map[string]string{nic1.Address: "route 192.168.10.0/24 (vmbr0 on ens1f0)", nic2.Address: "address 2001:db8::5 (ens1f1.20 on ens1f1)"},
		},
		{
			// A /32 (or noprefixroute) address adds no route; the
			// neighbours the host talks to on the interface show it.
			// A resolution that failed or is under way says nothing.
			name: "IPv4 address without a route, seen through its neighbours",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f0", Function: nic1.Address}))
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f1", Function: nic2.Address}))
				must(t, h.AddInterface(hostviewtest.Interface{Name: "vmbr1", Kind: "bridge", Lowers: []string{"ens1f1"}}))
				must(t, h.AddNeighbour("ens1f0", netip.MustParseAddr("10.20.0.1"), 0x0))
				must(t, h.AddNeighbour("ens1f0", netip.MustParseAddr("10.20.0.7"), 0x2))
				must(t, h.AddNeighbour("ens1f0", netip.MustParseAddr("10.20.0.9"), 0x2))
				must(t, h.AddNeighbour("vmbr1", netip.MustParseAddr("192.0.2.1"), 0x6))
			},
			want: map[string]string{nic1.Address: "IPv4 neighbour 10.20.0.7 (ens1f0)", nic2.Address: "IPv4 neighbour 192.0.2.1 (vmbr1 on ens1f1)"},
		},
		{
			name: "failed neighbour resolutions only: not in use",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f0", Function: nic1.Address}))
				must(t, h.AddNeighbour("ens1f0", netip.MustParseAddr("10.20.0.1"), 0x0))
			},
			want: map[string]string{},
		},
		{
			name: "a route's evidence wins over a neighbour's",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f0", Function: nic1.Address}))
				must(t, h.AddNeighbour("ens1f0", netip.MustParseAddr("10.0.0.1"), 0x2))
				must(t, h.AddRoute("ens1f0", netip.MustParsePrefix("0.0.0.0/0"), netip.MustParseAddr("10.0.0.1")))
			},
			want: map[string]string{nic1.Address: "default route (ens1f0)"},
		},
		{
			name: "link-local addresses only: not in use",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f0", Function: nic1.Address}))
				must(t, h.AddAddress6("ens1f0", netip.MustParsePrefix("fe80::5/64")))
			},
			want: map[string]string{},
		},
		{
			name: "Open vSwitch bridge keeps every datapath port",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f0", Function: nic1.Address}))
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ovs-system", Lowers: []string{"ens1f0"}}))
				must(t, h.AddInterface(hostviewtest.Interface{Name: "br-ex"}))
				must(t, h.AddRoute("br-ex", netip.MustParsePrefix("0.0.0.0/0"), netip.MustParseAddr("10.0.0.1")))
			},
			want: map[string]string{nic1.Address: "default route (br-ex on ens1f0)"},
		},
		{
			name: "route through an interface that sysfs does not show",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddRoute("eth9", netip.MustParsePrefix("0.0.0.0/0"), netip.MustParseAddr("10.0.0.1")))
			},
			want:        map[string]string{},
			unavailable: []string{"default route (eth9)", "not in"},
		},
		{
			name: "an interface name that would leave class/net",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f0", Function: nic1.Address}))
				must(t, h.AddRoute("..", netip.MustParsePrefix("0.0.0.0/0"), netip.MustParseAddr("10.0.0.1")))
			},
			want:        map[string]string{},
			unavailable: []string{`interface name ".." is not valid`},
		},
		{
			name: "serial console on a legacy port: no PCI function",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.SetConsole("ttyS0"))
			},
			want: map[string]string{},
		},
		{
			name: "VFIO device cdev, own function, dangling and odd fd links",
			setup: func(t *testing.T, h *hostviewtest.Host) {
				must(t, h.AddVFIODevice(gpu.Address, "vfio0"))
				must(t, h.AddVFIODevice(nic1.Address, "vfio1"))
				must(t, h.AddProcess(100, "cloud-hypervisor", "/dev/iommu", "/dev/vfio/devices/vfio0 (deleted)"))
				must(t, h.AddProcess(101, "crosvm", "/dev/vfio/devices/vfio1"))
				// A group that no longer exists, a path that only looks
				// like a group, a cdev without sysfs.
				must(t, h.AddProcess(102, "stale", "/dev/vfio/99", "/dev/vfio/../../sys/bus/pci/devices/0000:04:00.0", "/dev/vfio/devices/vfio7"))
				// A process that ended between listing and reading.
				must(t, os.RemoveAll(filepath.Join(h.Proc, "103", "fd")))
				must(t, os.MkdirAll(filepath.Join(h.Proc, "103"), 0o755))
				// An fd that is not a link (closed and reused) and a
				// directory that is not a process.
				must(t, os.WriteFile(filepath.Join(h.Proc, "101", "fd", "9"), nil, 0o600))
				must(t, os.MkdirAll(filepath.Join(h.Proc, "self", "fd"), 0o755))
			},
			own:  hostview.Own{Functions: map[pci.Address]bool{addr(t, nic1.Address): true}},
			want: map[string]string{gpu.Address: "held by pid 100 (cloud-hypervisor) through /dev/vfio/devices/vfio0"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := host(t, sata1, sata2, nvme, nvme2, nic1, nic2, gpu)
			if tc.setup != nil {
				tc.setup(t, h)
			}
			got := hostview.New(h.Sys, h.Proc).Read(tc.own)
			if diff := cmp.Diff(inUse(t, tc.want), got.InUse); diff != "" {
				t.Errorf("in use (-want +got):\n%s", diff)
			}
			if len(tc.unavailable) == 0 && got.Unavailable != "" {
				t.Errorf("Unavailable = %q", got.Unavailable)
			}
			for _, w := range tc.unavailable {
				if !strings.Contains(got.Unavailable, w) {
					t.Errorf("Unavailable %q does not mention %q", got.Unavailable, w)
				}
			}
		})
	}
}

func TestUnreadable(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		break_ func(t *testing.T, h *hostviewtest.Host)
		want   string
	}{
		{"no mountinfo (proc root of a container, not the host's)", func(t *testing.T, h *hostviewtest.Host) {
			must(t, os.Remove(filepath.Join(h.Proc, "1", "mountinfo")))
		}, "mounted file systems"},
		{"no route table", func(t *testing.T, h *hostviewtest.Host) {
			must(t, os.Remove(filepath.Join(h.Proc, "1", "net", "route")))
		}, "network routes"},
		{"malformed mountinfo", func(t *testing.T, h *hostviewtest.Host) {
			must(t, os.WriteFile(filepath.Join(h.Proc, "1", "mountinfo"), []byte("21 1 8:1 / / rw shared:1 ext4 /dev/sda1 rw\n"), 0o644))
		}, "line 1"},
		{"malformed neighbour", func(t *testing.T, h *hostviewtest.Host) {
			must(t, os.WriteFile(filepath.Join(h.Proc, "1", "net", "arp"), []byte("IP address       HW type     Flags       HW address            Mask     Device\n10.0.0.300 0x1 0x2 52:54:00:00:00:01 * ens1f0\n"), 0o644))
		}, "network neighbours"},
		{"malformed route", func(t *testing.T, h *hostviewtest.Host) {
			must(t, os.WriteFile(filepath.Join(h.Proc, "1", "net", "route"), []byte("Iface\tDestination\nens1f0\tzz\t0\t0003\t0\t0\t0\t00000000\n"), 0o644))
		}, "line 2"},
		{"the proc root of a container's own PID namespace", func(t *testing.T, h *hostviewtest.Host) {
			must(t, os.RemoveAll(filepath.Join(h.Proc, "2")))
		}, "is not the host's /proc"},
		{"no proc root at all", func(t *testing.T, h *hostviewtest.Host) {
			must(t, os.RemoveAll(h.Proc))
		}, "VFIO users"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := host(t, nic1)
			tc.break_(t, h)
			got := hostview.New(h.Sys, h.Proc).Read(hostview.Own{})
			if !strings.Contains(got.Unavailable, tc.want) {
				t.Errorf("Unavailable = %q, want it to mention %q", got.Unavailable, tc.want)
			}
		})
	}
}

func TestParseMountinfo(t *testing.T) {
	for _, tc := range []struct {
		name    string
		line    string
		want    []hostview.Mount
		wantErr string
	}{
		{
			name: "no optional fields",
			line: "25 1 8:2 / / rw,relatime - ext4 /dev/sda2 rw",
			want: []hostview.Mount{{Major: 8, Minor: 2, MountPoint: "/", FSType: "ext4", Source: "/dev/sda2"}},
		},
		{
			name: "several optional fields, escaped space, tab and backslash",
			line: `36 35 98:0 /mnt1 /mnt/my\040disk\011x\134y rw,noatime master:1 shared:3 propagate_from:2 - ext3 /dev/my\040root rw,errors=continue`,
			want: []hostview.Mount{{Major: 98, Minor: 0, MountPoint: "/mnt/my disk\tx\\y", FSType: "ext3", Source: "/dev/my root"}},
		},
		{
			name: "a mount point ending in a dash",
			line: "40 1 0:50 / /- rw - tmpfs none rw",
			want: []hostview.Mount{{Major: 0, Minor: 50, MountPoint: "/-", FSType: "tmpfs", Source: "none"}},
		},
		{name: "no separator", line: "25 1 8:2 / / rw,relatime shared:1 ext4 /dev/sda2 rw", wantErr: "line 1"},
		{name: "truncated", line: "25 1 8:2 / / rw - ext4", wantErr: "line 1"},
		{name: "bad device number", line: "25 1 8-2 / / rw - ext4 /dev/sda2 rw", wantErr: `"8-2" is not major:minor`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := hostview.ParseMountinfo([]byte(tc.line + "\n"))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// TestReadForSeesWhatReadSees: for each function of the running host,
// the read for preparing it sees what the full read sees about its group
// and the functions below it; the walk of the processes' open files is
// left out only where no process can hold them through VFIO.
func TestReadForSeesWhatReadSees(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	tree, h, err := hostviewtest.RunningHost(filepath.Join(dir, "sys"), filepath.Join(dir, "proc"))
	if err != nil {
		t.Fatal(err)
	}
	// A process still holding the node of a group that left VFIO: the
	// kernel detached that group, nothing of the NVMe drive is reachable.
	must(t, h.AddProcess(7000, "stale", "/dev/vfio/62"))
	fs, err := pci.NewFS(tree.Root)
	if err != nil {
		t.Fatal(err)
	}
	r := hostview.New(h.Sys, h.Proc)
	own := hostview.Own{Groups: map[int]bool{hostviewtest.OwnGroup: true}}
	full := r.Read(own)
	devices, _, err := fs.Scan()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devices {
		got := r.ReadFor(own, []pci.Address{d.Address})
		if got.Unavailable != full.Unavailable {
			t.Errorf("%s: Unavailable = %q, the full read says %q", d.Address, got.Unavailable, full.Unavailable)
		}
		// The functions whose use decides on d: its group's and those
		// below them.
		var members []pci.Address
		if d.IOMMUGroup != nil {
			if members, err = fs.IOMMUGroupMembers(*d.IOMMUGroup); err != nil {
				t.Fatal(err)
			}
		}
		for _, o := range devices {
			for _, m := range members {
				if !strings.Contains(o.Path, "/"+m.String()+"/") && o.Address != m {
					continue
				}
				if o.Address.String() == hostviewtest.FreeNVMe {
					continue // the stale holder below
				}
				if got.InUse[o.Address] != full.InUse[o.Address] {
					t.Errorf("ReadFor(%s): %s in use %q, the full read says %q", d.Address, o.Address, got.InUse[o.Address], full.InUse[o.Address])
				}
			}
		}
	}
	// The VM's GPU sits below the root port 0000:00:1c.0: preparing the
	// port (were it offered) must see it held.
	if e := r.ReadFor(own, []pci.Address{addr(t, "0000:00:1c.0")}).InUse[addr(t, hostviewtest.VMGPU)]; e == "" {
		t.Error("ReadFor of the root port above the VM's GPU does not see the GPU held")
	}
	if e := full.InUse[addr(t, hostviewtest.FreeNVMe)]; e == "" {
		t.Error("the full read does not see the stale holder of the NVMe drive's group")
	}
	if e := r.ReadFor(own, []pci.Address{addr(t, hostviewtest.FreeNVMe)}).InUse[addr(t, hostviewtest.FreeNVMe)]; e != "" {
		t.Errorf("ReadFor of the NVMe drive on its host driver walked the processes: %q", e)
	}
	// A kernel before 6.2 keeps the group while the process holds it:
	// then the group is walked.
	must(t, h.AddVFIOGroup(62))
	if e := r.ReadFor(own, []pci.Address{addr(t, hostviewtest.FreeNVMe)}).InUse[addr(t, hostviewtest.FreeNVMe)]; e != "held by pid 7000 (stale) through /dev/vfio/62" {
		t.Errorf("ReadFor of the NVMe drive whose VFIO group the kernel keeps: in use %q", e)
	}
	must(t, os.Remove(filepath.Join(h.Sys, "class/vfio/62")))
	// Bound to vfio-pci, the same group is walked.
	must(t, tree.Unbind(hostviewtest.FreeNVMe))
	must(t, tree.Bind(hostviewtest.FreeNVMe, "vfio-pci"))
	if e := r.ReadFor(own, []pci.Address{addr(t, hostviewtest.FreeNVMe)}).InUse[addr(t, hostviewtest.FreeNVMe)]; e != "held by pid 7000 (stale) through /dev/vfio/62" {
		t.Errorf("ReadFor of the NVMe drive on vfio-pci: in use %q", e)
	}
}
