package pci_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"k8s.io/utils/ptr"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

func mustAddr(t *testing.T, s string) pci.Address {
	t.Helper()
	a, err := pci.ParseAddress(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func addrPtr(t *testing.T, s string) *pci.Address {
	a := mustAddr(t, s)
	return &a
}

// scanServer lays out the demo server and scans it.
func scanServer(t *testing.T) (*pci.FS, []*pci.Device, []error) {
	t.Helper()
	root := t.TempDir()
	if _, err := pcitest.NewServer(root); err != nil {
		t.Fatal(err)
	}
	fs, err := pci.NewFS(root)
	if err != nil {
		t.Fatal(err)
	}
	devices, problems, err := fs.Scan()
	if err != nil {
		t.Fatal(err)
	}
	return fs, devices, problems
}

func TestScanServer(t *testing.T) {
	fs, devices, problems := scanServer(t)
	if len(problems) > 0 {
		t.Fatalf("unexpected problems: %v", problems)
	}
	if len(devices) != len(pcitest.Server()) {
		t.Fatalf("got %d devices, want %d", len(devices), len(pcitest.Server()))
	}
	for i := 1; i < len(devices); i++ {
		if !devices[i-1].Address.Less(devices[i].Address) {
			t.Errorf("devices not sorted: %s before %s", devices[i-1].Address, devices[i].Address)
		}
	}
	byAddr := map[string]*pci.Device{}
	for _, d := range devices {
		byAddr[d.Address.String()] = d
	}
	want := map[string]*pci.Device{
		"0000:01:00.0": {
			Address: mustAddr(t, "0000:01:00.0"), Path: "devices/pci0000:00/0000:00:01.0/0000:01:00.0",
			VendorID: 0x10de, DeviceID: 0x2204, SubsystemVendorID: 0x10de, SubsystemDeviceID: 0x1454, Class: 0x030000,
			Driver: "nvidia", IOMMUGroup: ptr.To(2), NUMANode: 0, PCIeRoot: "pci0000:00", Parent: addrPtr(t, "0000:00:01.0"),
			HeaderType: ptr.To(0), BARs: ptr.To(1),
		},
		"0000:00:02.0": {
			Address: mustAddr(t, "0000:00:02.0"), Path: "devices/pci0000:00/0000:00:02.0",
			VendorID: 0x1a03, DeviceID: 0x2000, SubsystemVendorID: 0x15d9, SubsystemDeviceID: 0x095d, Class: 0x030000,
			Driver: "ast", IOMMUGroup: ptr.To(3), NUMANode: 0, PCIeRoot: "pci0000:00", BootVGA: true,
			HeaderType: ptr.To(0), BARs: ptr.To(1),
		},
		"0000:00:14.0": {
			Address: mustAddr(t, "0000:00:14.0"), Path: "devices/pci0000:00/0000:00:14.0",
			VendorID: 0x8086, DeviceID: 0xa1af, SubsystemVendorID: 0x15d9, SubsystemDeviceID: 0x095d, Class: 0x0c0330,
			Driver: "xhci_hcd", NUMANode: -1, PCIeRoot: "pci0000:00",
			HeaderType: ptr.To(0), BARs: ptr.To(1),
		},
		"0000:02:02.0": {
			Address: mustAddr(t, "0000:02:02.0"), Path: "devices/pci0000:00/0000:00:1e.0/0000:02:02.0",
			VendorID: 0x8086, DeviceID: 0x1076, SubsystemVendorID: 0x8086, SubsystemDeviceID: 0x1076, Class: 0x020000,
			Driver: "e1000", IOMMUGroup: ptr.To(5), NUMANode: 0, PCIeRoot: "pci0000:00", Parent: addrPtr(t, "0000:00:1e.0"),
			HeaderType: ptr.To(0), BARs: ptr.To(1),
		},
		"0000:81:00.0": {
			Address: mustAddr(t, "0000:81:00.0"), Path: "devices/pci0000:80/0000:80:01.0/0000:81:00.0",
			VendorID: 0x15b3, DeviceID: 0x1017, SubsystemVendorID: 0x15b3, SubsystemDeviceID: 0x0007, Class: 0x020000,
			Driver: "mlx5_core", IOMMUGroup: ptr.To(21), NUMANode: 1, PCIeRoot: "pci0000:80", Parent: addrPtr(t, "0000:80:01.0"),
			SRIOVTotalVFs: 8, SRIOVNumVFs: 2, VirtFns: []pci.Address{mustAddr(t, "0000:81:00.2"), mustAddr(t, "0000:81:00.3")},
			HeaderType: ptr.To(0), BARs: ptr.To(1),
		},
		"0000:81:00.3": {
			Address: mustAddr(t, "0000:81:00.3"), Path: "devices/pci0000:80/0000:80:01.0/0000:81:00.3",
			VendorID: 0x15b3, DeviceID: 0x1018, SubsystemVendorID: 0x15b3, SubsystemDeviceID: 0x0007, Class: 0x020000,
			Driver: "vfio-pci", IOMMUGroup: ptr.To(23), NUMANode: 1, PCIeRoot: "pci0000:80", Parent: addrPtr(t, "0000:80:01.0"),
			PhysFn: addrPtr(t, "0000:81:00.0"), HeaderType: ptr.To(0), BARs: ptr.To(1),
		},
		"0000:84:00.0": {
			Address: mustAddr(t, "0000:84:00.0"), Path: "devices/pci0000:80/0000:80:02.0/0000:84:00.0",
			VendorID: 0x10ee, DeviceID: 0x903f, SubsystemVendorID: 0x10ee, SubsystemDeviceID: 0x0007, Class: 0x120000,
			IOMMUGroup: ptr.To(27), NUMANode: 1, PCIeRoot: "pci0000:80", Parent: addrPtr(t, "0000:80:02.0"),
			HeaderType: ptr.To(0), BARs: ptr.To(1),
		},
	}
	for addr, w := range want {
		if diff := cmp.Diff(w, byAddr[addr]); diff != "" {
			t.Errorf("device %s (-want +got):\n%s", addr, diff)
		}
	}
	if !byAddr["0000:00:1e.0"].IsBridge() || byAddr["0000:00:00.0"].IsBridge() || byAddr["0000:01:00.0"].IsBridge() {
		t.Error("IsBridge wrong for the PCI bridge, the host bridge or the GPU")
	}
	if !byAddr["0000:00:00.0"].IsChipsetBridge() || !byAddr["0000:00:1f.0"].IsChipsetBridge() || byAddr["0000:00:1e.0"].IsChipsetBridge() {
		t.Error("IsChipsetBridge wrong for the host bridge, the ISA bridge or the PCI bridge")
	}
	if h := byAddr["0000:00:1e.0"].HeaderType; h == nil || *h != pci.HeaderBridge {
		t.Errorf("PCI bridge header type = %v, want 1", h)
	}
	if n := byAddr["0000:00:00.0"].BARs; n == nil || *n != 0 {
		t.Errorf("host bridge BARs = %v, want 0", n)
	}

	members, err := fs.IOMMUGroupMembers(5)
	if err != nil {
		t.Fatal(err)
	}
	wantMembers := []pci.Address{mustAddr(t, "0000:00:1e.0"), mustAddr(t, "0000:02:01.0"), mustAddr(t, "0000:02:02.0")}
	if diff := cmp.Diff(wantMembers, members); diff != "" {
		t.Errorf("group 5 members (-want +got):\n%s", diff)
	}
	if _, err := fs.IOMMUGroupMembers(99); err == nil || !strings.Contains(err.Error(), "IOMMU group 99") {
		t.Errorf("IOMMUGroupMembers(99) error = %v, want one naming the group", err)
	}
	if drv, err := fs.CurrentDriver(mustAddr(t, "0000:01:00.1")); err != nil || drv != "snd_hda_intel" {
		t.Errorf("CurrentDriver = %q, %v; want snd_hda_intel", drv, err)
	}
	if !fs.DriverLoaded("vfio-pci") || fs.DriverLoaded("mlx5_vfio_pci") {
		t.Error("DriverLoaded: want vfio-pci loaded and mlx5_vfio_pci not")
	}
}

// TestScanOddFiles damages one function of a small tree at a time and
// checks that the function is either read with the kernel's meaning or
// reported, and that its neighbour is always read.
func TestScanOddFiles(t *testing.T) {
	tests := map[string]struct {
		damage      func(t *testing.T, root, dir string)
		wantProblem string // substring of the reported problem; "" = read fine
		check       func(t *testing.T, d *pci.Device)
	}{
		"numa_node missing": {
			damage: func(t *testing.T, _, dir string) { remove(t, dir, "numa_node") },
			check:  func(t *testing.T, d *pci.Device) { wantInt(t, "NUMANode", d.NUMANode, -1) },
		},
		"numa_node -1": {
			damage: func(t *testing.T, _, dir string) { write(t, dir, "numa_node", "-1\n") },
			check:  func(t *testing.T, d *pci.Device) { wantInt(t, "NUMANode", d.NUMANode, -1) },
		},
		"numa_node with trailing spaces": {
			damage: func(t *testing.T, _, dir string) { write(t, dir, "numa_node", "1  \n") },
			check:  func(t *testing.T, d *pci.Device) { wantInt(t, "NUMANode", d.NUMANode, 1) },
		},
		"vendor with trailing spaces": {
			damage: func(t *testing.T, _, dir string) { write(t, dir, "vendor", "0x10de \n") },
			check:  func(t *testing.T, d *pci.Device) { wantInt(t, "VendorID", int(d.VendorID), 0x10de) },
		},
		"config truncated": {
			damage: func(t *testing.T, _, dir string) { write(t, dir, "config", "\xde\x10\x04\x22\x07\x00") },
			check:  wantConfigProblem("6 bytes, too short"),
		},
		"config missing": {
			damage: func(t *testing.T, _, dir string) { remove(t, dir, "config") },
			check:  wantConfigProblem("no such file"),
		},
		"config of a function that does not answer": {
			damage: func(t *testing.T, _, dir string) { write(t, dir, "config", strings.Repeat("\xff", 64)) },
			check:  wantConfigProblem("vendor ID reads 0xffff"),
		},
		"config with an unknown header type": {
			damage: func(t *testing.T, _, dir string) {
				cfg := []byte(strings.Repeat("\x00", 64))
				cfg[0], cfg[0x0e] = 0x86, 0xff
				write(t, dir, "config", string(cfg))
			},
			check: wantConfigProblem("unknown header type 0x7f"),
		},
		"config of 64 bytes, as an unprivileged reader sees it": {
			damage: func(t *testing.T, _, dir string) {
				cfg, err := os.ReadFile(filepath.Join(dir, "config"))
				if err != nil {
					t.Fatal(err)
				}
				write(t, dir, "config", string(cfg[:64]))
			},
			check: func(t *testing.T, d *pci.Device) {
				if d.HeaderType == nil || *d.HeaderType != pci.HeaderEndpoint || d.ConfigProblem != "" {
					t.Errorf("header type %v, problem %q; want 0 and none", d.HeaderType, d.ConfigProblem)
				}
			},
		},
		"resource line with two columns": {
			damage: func(t *testing.T, _, dir string) {
				write(t, dir, "resource", "0x00000000c0000000 0x00000000c0003fff\n")
			},
			check: wantResourceProblem("line 1: \"0x00000000c0000000 0x00000000c0003fff\" is not 3 hex columns"),
		},
		"resource line that is not hex": {
			damage: func(t *testing.T, _, dir string) {
				write(t, dir, "resource", strings.Repeat("0x0000000000000000 0x0000000000000000 0x0000000000000000\n", 3)+"0x0 0xzz 0x200\n")
			},
			check: wantResourceProblem("line 4: \"0xzz\""),
		},
		"resource empty": {
			damage: func(t *testing.T, _, dir string) { write(t, dir, "resource", "") },
			check:  wantResourceProblem("0 lines, fewer than the 6 standard BARs"),
		},
		"resource missing": {
			damage: func(t *testing.T, _, dir string) { remove(t, dir, "resource") },
			check:  wantResourceProblem("no such file"),
		},
		"resource of an old kernel: 7 lines, an I/O and a 64-bit memory BAR": {
			damage: func(t *testing.T, _, dir string) {
				write(t, dir, "resource", "0x0000000000002000 0x000000000000201f 0x0000000000040101\n"+
					"0x0000380000000000 0x00003800000fffff 0x000000000014220c\n"+
					strings.Repeat("0x0000000000000000 0x0000000000000000 0x0000000000000000\n", 5))
			},
			check: func(t *testing.T, d *pci.Device) {
				if d.BARs == nil || *d.BARs != 2 {
					t.Errorf("BARs = %v (%s), want 2", d.BARs, d.ResourceProblem)
				}
			},
		},
		"resource with the ROM only": {
			damage: func(t *testing.T, _, dir string) {
				write(t, dir, "resource", strings.Repeat("0x0000000000000000 0x0000000000000000 0x0000000000000000\n", 6)+
					"0x00000000c0100000 0x00000000c01fffff 0x0000000000046200\n"+
					strings.Repeat("0x0000000000000000 0x0000000000000000 0x0000000000000000\n", 6))
			},
			check: func(t *testing.T, d *pci.Device) {
				if d.BARs == nil || *d.BARs != 0 {
					t.Errorf("BARs = %v (%s), want 0", d.BARs, d.ResourceProblem)
				}
			},
		},
		"vendor garbage":    {damage: func(t *testing.T, _, dir string) { write(t, dir, "vendor", "zz\n") }, wantProblem: "vendor"},
		"vendor too wide":   {damage: func(t *testing.T, _, dir string) { write(t, dir, "vendor", "0x10de0\n") }, wantProblem: "16-bit"},
		"vendor missing":    {damage: func(t *testing.T, _, dir string) { remove(t, dir, "vendor") }, wantProblem: "vendor"},
		"class empty":       {damage: func(t *testing.T, _, dir string) { write(t, dir, "class", "") }, wantProblem: "class"},
		"numa_node garbage": {damage: func(t *testing.T, _, dir string) { write(t, dir, "numa_node", "node0\n") }, wantProblem: "numa_node"},
		"iommu_group not a number": {
			damage: func(t *testing.T, _, dir string) {
				remove(t, dir, "iommu_group")
				if err := os.Symlink("../../../kernel/iommu_groups/x", filepath.Join(dir, "iommu_group")); err != nil {
					t.Fatal(err)
				}
			},
			wantProblem: "iommu_group",
		},
		"bus link outside devices": {
			damage: func(t *testing.T, root, _ string) {
				link := filepath.Join(root, pci.BusDevicesDir, "0000:01:00.0")
				remove(t, filepath.Dir(link), "0000:01:00.0")
				if err := os.Symlink("../../../../etc", link); err != nil {
					t.Fatal(err)
				}
			},
			wantProblem: "not to a device below devices/",
		},
		"entry that is not an address": {
			damage: func(t *testing.T, root, _ string) {
				write(t, filepath.Join(root, pci.BusDevicesDir), "new_id", "")
			},
			wantProblem: "new_id",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			root := t.TempDir()
			tree, err := pcitest.New(root)
			if err != nil {
				t.Fatal(err)
			}
			if err := tree.Add(
				pcitest.Function{Address: "0000:00:01.0", Vendor: 0x8086, Device: 0x2030, Class: 0x060400, Driver: "pcieport", IOMMUGroup: 1},
				pcitest.Function{Address: "0000:01:00.0", Parent: "0000:00:01.0", Vendor: 0x10de, Device: 0x2204, Class: 0x030000, Driver: "nvidia", IOMMUGroup: 2},
			); err != nil {
				t.Fatal(err)
			}
			rel, err := tree.DevicePath("0000:01:00.0")
			if err != nil {
				t.Fatal(err)
			}
			tc.damage(t, root, filepath.Join(root, rel))
			fs, err := pci.NewFS(root)
			if err != nil {
				t.Fatal(err)
			}
			devices, problems, err := fs.Scan()
			if err != nil {
				t.Fatal(err)
			}
			var gpu, bridge *pci.Device
			for _, d := range devices {
				switch d.Address.String() {
				case "0000:01:00.0":
					gpu = d
				case "0000:00:01.0":
					bridge = d
				}
			}
			if bridge == nil {
				t.Fatal("the undamaged neighbour was not read")
			}
			if tc.wantProblem == "" {
				if len(problems) > 0 || gpu == nil {
					t.Fatalf("want the device read, got problems %v", problems)
				}
				tc.check(t, gpu)
				return
			}
			if len(problems) != 1 || !strings.Contains(problems[0].Error(), tc.wantProblem) {
				t.Fatalf("problems = %v, want one containing %q", problems, tc.wantProblem)
			}
			if strings.Contains(name, "address") {
				return
			}
			if gpu != nil {
				t.Errorf("damaged device was read: %+v", gpu)
			}
			if !strings.Contains(problems[0].Error(), "0000:01:00.0") {
				t.Errorf("problem %q does not name the device", problems[0])
			}
		})
	}
}

func TestNewFSRejectsFile(t *testing.T) {
	f := filepath.Join(t.TempDir(), "file")
	write(t, filepath.Dir(f), "file", "")
	if _, err := pci.NewFS(f); err == nil {
		t.Error("NewFS on a file succeeded")
	}
	if _, err := pci.NewFS(filepath.Join(f, "missing")); err == nil {
		t.Error("NewFS on a missing path succeeded")
	}
}

func wantConfigProblem(want string) func(t *testing.T, d *pci.Device) {
	return func(t *testing.T, d *pci.Device) {
		t.Helper()
		if d.HeaderType != nil || !strings.Contains(d.ConfigProblem, want) || !strings.Contains(d.ConfigProblem, "config") {
			t.Errorf("header type %v, config problem %q; want none and a problem containing %q", d.HeaderType, d.ConfigProblem, want)
		}
		if d.IsBridge() {
			t.Error("a VGA-class function without a readable config is taken for a bridge")
		}
	}
}

func wantResourceProblem(want string) func(t *testing.T, d *pci.Device) {
	return func(t *testing.T, d *pci.Device) {
		t.Helper()
		if d.BARs != nil || !strings.Contains(d.ResourceProblem, want) || !strings.Contains(d.ResourceProblem, "resource") {
			t.Errorf("BARs %v, resource problem %q; want none and a problem containing %q", d.BARs, d.ResourceProblem, want)
		}
	}
}

func write(t *testing.T, dir, name, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func remove(t *testing.T, dir, name string) {
	t.Helper()
	if err := os.Remove(filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

func wantInt(t *testing.T, what string, got, want int) {
	t.Helper()
	if got != want {
		t.Errorf("%s = %d, want %d", what, got, want)
	}
}

// TestIOMMUGroupAsDevice: the one-link read gives every function of the
// demo server the group that the full read gives it, and a function that
// is not there none.
func TestIOMMUGroupAsDevice(t *testing.T) {
	fs, devices, _ := scanServer(t)
	withGroup := 0
	for _, d := range devices {
		g, err := fs.IOMMUGroup(d.Address)
		if err != nil {
			t.Errorf("%s: %v", d.Address, err)
			continue
		}
		if diff := cmp.Diff(d.IOMMUGroup, g); diff != "" {
			t.Errorf("%s: IOMMUGroup differs from Device (-Device +IOMMUGroup):\n%s", d.Address, diff)
		}
		if g != nil {
			withGroup++
		}
	}
	if withGroup == 0 {
		t.Error("no function of the demo server has a group: the test checks nothing")
	}
	if g, err := fs.IOMMUGroup(mustAddr(t, "0000:ff:1f.7")); g != nil || err != nil {
		t.Errorf("IOMMUGroup of a missing function = %v, %v; want nil, nil", g, err)
	}
}
