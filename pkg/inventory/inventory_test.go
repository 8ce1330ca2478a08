package inventory_test

import (
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/vfio-dra/vfio-dra-driver/api/v1alpha1"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

func scanServer(t *testing.T, cfg *v1alpha1.DriverConfiguration) *inventory.Inventory {
	t.Helper()
	return scanServerHost(t, cfg, &inventory.HostUse{})
}

func scanServerHost(t *testing.T, cfg *v1alpha1.DriverConfiguration, host *inventory.HostUse) *inventory.Inventory {
	t.Helper()
	root := t.TempDir()
	if _, err := pcitest.NewServer(root); err != nil {
		t.Fatal(err)
	}
	return scanTree(t, root, cfg, host)
}

// scanTree scans the sysfs tree laid out at root as the plugin does and
// fails the test on any problem.
func scanTree(t *testing.T, root string, cfg *v1alpha1.DriverConfiguration, host *inventory.HostUse) *inventory.Inventory {
	t.Helper()
	fs, err := pci.NewFS(root)
	if err != nil {
		t.Fatal(err)
	}
	inv, err := inventory.Scan(fs, cfg, nil, host)
	if err != nil {
		t.Fatal(err)
	}
	if len(inv.Problems) > 0 {
		t.Fatalf("problems: %v", inv.Problems)
	}
	return inv
}

func offered(inv *inventory.Inventory) []string {
	var out []string
	for _, d := range inv.Offered() {
		out = append(out, d.Device.Address.String())
	}
	sort.Strings(out)
	return out
}

func reasons(inv *inventory.Inventory) map[string]string {
	out := map[string]string{}
	for _, d := range inv.Decisions {
		out[d.Device.Address.String()] = d.Reason
	}
	return out
}

func TestDecide(t *testing.T) {
	gpuGroup := []string{"0000:01:00.0", "0000:01:00.1"}
	bridgeGroup := []string{"0000:02:01.0", "0000:02:02.0"}
	nic := []string{"0000:03:00.0", "0000:03:00.1"}
	singles := []string{"0000:81:00.2", "0000:81:00.3", "0000:82:00.0", "0000:83:00.0", "0000:84:00.0"}
	join := func(parts ...[]string) []string {
		var out []string
		for _, p := range parts {
			out = append(out, p...)
		}
		sort.Strings(out)
		return out
	}
	tests := map[string]struct {
		cfg         *v1alpha1.DriverConfiguration
		wantOffered []string
		wantReasons map[string]string // substrings
	}{
		"built-in rules only": {
			wantOffered: join(gpuGroup, bridgeGroup, nic, singles),
			wantReasons: map[string]string{
				// The ISA bridge (no passive bridge) moves with the group
				// and may not: the chipset group stays with the host.
				"0000:00:1f.2": "IOMMU group 4: member 0000:00:1f.0 is not offered (chipset: ISA bridge (class 060100) stays with the host)",
				"0000:00:1f.4": "platform: SMBus controller (class 0c0500)",
				"0000:00:00.0": "chipset: host bridge (class 060000) stays with the host",
				"0000:00:1e.0": "bridge: PCI-to-PCI (header type 1)",
				"0000:00:1f.0": "chipset: ISA bridge",
				"0000:00:02.0": "boot VGA",
				"0000:00:14.0": "no IOMMU group",
				"0000:81:00.0": "2 VFs enabled",
			},
		},
		"deny storage": {
			cfg:         &v1alpha1.DriverConfiguration{Deny: []v1alpha1.DeviceSelector{{Class: "01"}}},
			wantOffered: join(gpuGroup, bridgeGroup, nic, []string{"0000:81:00.2", "0000:81:00.3", "0000:82:00.0", "0000:84:00.0"}),
			wantReasons: map[string]string{
				"0000:00:1f.2": "denied by configuration (deny[0])",
				"0000:83:00.0": "denied by configuration",
			},
		},
		"deny the audio function takes the GPU too": {
			cfg:         &v1alpha1.DriverConfiguration{Deny: []v1alpha1.DeviceSelector{{PCIAddress: "0000:01:00.1"}}},
			wantOffered: join(bridgeGroup, nic, singles),
			wantReasons: map[string]string{"0000:01:00.0": "member 0000:01:00.1 is not offered"},
		},
		"allow by vendor and device (the seed's 19ee_4000)": {
			cfg:         &v1alpha1.DriverConfiguration{Allow: []v1alpha1.DeviceSelector{{VendorID: "19ee", DeviceID: "4000"}}},
			wantOffered: []string{"0000:82:00.0"},
			wantReasons: map[string]string{"0000:83:00.0": "not allowed by configuration"},
		},
		"allow NVIDIA alone leaves the audio function out, so the GPU too": {
			cfg:         &v1alpha1.DriverConfiguration{Allow: []v1alpha1.DeviceSelector{{VendorID: "10de", Class: "03"}}},
			wantOffered: nil,
			wantReasons: map[string]string{"0000:01:00.0": "member 0000:01:00.1 is not offered (not allowed by configuration)"},
		},
		"allow by driver, deny wins": {
			cfg: &v1alpha1.DriverConfiguration{
				Allow: []v1alpha1.DeviceSelector{{Driver: "i40e"}, {Driver: "mlx5_core"}},
				Deny:  []v1alpha1.DeviceSelector{{PCIAddress: "0000:81:00.2"}},
			},
			wantOffered: nic,
			wantReasons: map[string]string{"0000:81:00.2": "denied", "0000:81:00.0": "VFs enabled"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			inv := scanServer(t, tc.cfg)
			if len(inv.Decisions) != len(pcitest.Server()) {
				t.Errorf("got %d decisions, want one per function (%d)", len(inv.Decisions), len(pcitest.Server()))
			}
			if diff := cmp.Diff(tc.wantOffered, offered(inv)); diff != "" {
				t.Errorf("offered (-want +got):\n%s", diff)
			}
			got := reasons(inv)
			for addr, want := range tc.wantReasons {
				if !strings.Contains(got[addr], want) {
					t.Errorf("reason for %s = %q, want it to contain %q", addr, got[addr], want)
				}
			}
			for _, d := range inv.Decisions {
				if d.Offered != (d.Reason == "") {
					t.Errorf("%s: Offered=%v but Reason=%q", d.Device.Address, d.Offered, d.Reason)
				}
			}
		})
	}
}

// TestDecideUnreadableGroupMember: a member that could not be read may be
// anything, so its group is not offered.
func TestDecideUnreadableGroupMember(t *testing.T) {
	a, _ := pci.ParseAddress("0000:01:00.0")
	b, _ := pci.ParseAddress("0000:01:00.1")
	group := 7
	devices := []*pci.Device{{Address: a, Class: 0x020000, IOMMUGroup: &group, NUMANode: -1}}
	inv := inventory.Decide(devices, map[int][]pci.Address{7: {a, b}}, nil, &inventory.HostUse{})
	if inv.Decisions[0].Offered || !strings.Contains(inv.Decisions[0].Reason, "0000:01:00.1 could not be read") {
		t.Errorf("decision = %+v, want not offered because the member could not be read", inv.Decisions[0])
	}
	inv = inventory.Decide(devices, map[int][]pci.Address{}, nil, &inventory.HostUse{})
	if inv.Decisions[0].Offered {
		t.Error("offered a device whose group could not be listed")
	}
}

// TestDecideHostUse: what the host uses is never offered, whatever the
// configuration, and takes its IOMMU group with it; without a host view
// storage and network controllers stay with the host.
func TestDecideHostUse(t *testing.T) {
	addr := func(s string) pci.Address {
		a, err := pci.ParseAddress(s)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	inUse := &inventory.HostUse{InUse: map[pci.Address]string{
		addr("0000:83:00.0"): "/ (vg0-root on nvme0n1p3)",
		addr("0000:02:01.0"): "default route (eno1)",
	}}
	tests := map[string]struct {
		host        *inventory.HostUse
		cfg         *v1alpha1.DriverConfiguration
		wantOffered []string
		wantReasons map[string]string // exact
	}{
		"in use, and its group-mate behind the conventional bridge": {
			host:        inUse,
			wantOffered: []string{"0000:01:00.0", "0000:01:00.1", "0000:03:00.0", "0000:03:00.1", "0000:81:00.2", "0000:81:00.3", "0000:82:00.0", "0000:84:00.0"},
			wantReasons: map[string]string{
				"0000:83:00.0": "in use: / (vg0-root on nvme0n1p3)",
				"0000:02:01.0": "in use: default route (eno1)",
				"0000:02:02.0": "IOMMU group 5: member 0000:02:01.0 is not offered (in use: default route (eno1))",
			},
		},
		"an exact-address allow does not hand out what the host uses": {
			host: inUse,
			cfg: &v1alpha1.DriverConfiguration{Allow: []v1alpha1.DeviceSelector{
				{PCIAddress: "0000:83:00.0"}, {PCIAddress: "0000:02:02.0"}, {PCIAddress: "0000:82:00.0"},
			}},
			wantOffered: []string{"0000:82:00.0"},
			wantReasons: map[string]string{
				"0000:83:00.0": "in use: / (vg0-root on nvme0n1p3)",
				"0000:02:02.0": "IOMMU group 5: member 0000:02:01.0 is not offered (in use: default route (eno1))",
			},
		},
		"host view unavailable": {
			host:        &inventory.HostUse{Unavailable: "open /proc/1/mountinfo: permission denied"},
			wantOffered: []string{"0000:01:00.0", "0000:01:00.1", "0000:84:00.0"},
			wantReasons: map[string]string{
				"0000:83:00.0": "host view unavailable (open /proc/1/mountinfo: permission denied): storage and network controllers stay with the host",
				"0000:82:00.0": "host view unavailable (open /proc/1/mountinfo: permission denied): storage and network controllers stay with the host",
			},
		},
		"no host view": {
			host:        nil,
			wantOffered: []string{"0000:01:00.0", "0000:01:00.1", "0000:84:00.0"},
			wantReasons: map[string]string{
				"0000:03:00.0": "host view unavailable (not read): storage and network controllers stay with the host",
			},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			inv := scanServerHost(t, tc.cfg, tc.host)
			if diff := cmp.Diff(tc.wantOffered, offered(inv)); diff != "" {
				t.Errorf("offered (-want +got):\n%s", diff)
			}
			got := reasons(inv)
			for a, want := range tc.wantReasons {
				if got[a] != want {
					t.Errorf("reason for %s = %q, want %q", a, got[a], want)
				}
			}
		})
	}
}

func TestMatches(t *testing.T) {
	a, _ := pci.ParseAddress("0000:3b:00.1")
	d := &pci.Device{Address: a, VendorID: 0x15b3, DeviceID: 0x1018, Class: 0x020000, Driver: "mlx5_core"}
	tests := []struct {
		sel  v1alpha1.DeviceSelector
		want bool
	}{
		{v1alpha1.DeviceSelector{VendorID: "15b3"}, true},
		{v1alpha1.DeviceSelector{VendorID: "15b3", DeviceID: "1017"}, false},
		{v1alpha1.DeviceSelector{Class: "02"}, true},
		{v1alpha1.DeviceSelector{Class: "0200"}, true},
		{v1alpha1.DeviceSelector{Class: "020001"}, false},
		{v1alpha1.DeviceSelector{PCIAddress: "0000:3b:00.1", Driver: "mlx5_core"}, true},
		{v1alpha1.DeviceSelector{Driver: "vfio-pci"}, false},
	}
	for _, tc := range tests {
		if got := inventory.Matches(tc.sel, d); got != tc.want {
			t.Errorf("Matches(%+v) = %v, want %v", tc.sel, got, tc.want)
		}
	}
}

// TestDecideHardwareRules: what the hardware is decides, from config and
// resource, and when they cannot be read the class does and a note says so.
func TestDecideHardwareRules(t *testing.T) {
	endpoint, bridge := pci.HeaderEndpoint, pci.HeaderBridge
	none, one := 0, 1
	tests := map[string]struct {
		dev        pci.Device
		cfg        *v1alpha1.DriverConfiguration
		wantReason string
		wantNotes  int
	}{
		"NVSwitch: class 0680, header type 0, an endpoint": {
			dev: pci.Device{Class: 0x068000, Driver: "nvidia", HeaderType: &endpoint, BARs: &one},
		},
		"class 0880 with header type 1 forwards": {
			dev:        pci.Device{Class: 0x088000, Driver: "pcieport", HeaderType: &bridge, BARs: &none},
			wantReason: "bridge: PCI-to-PCI (header type 1)",
		},
		"PCI bridge whose config cannot be read: the class decides": {
			dev:        pci.Device{Class: 0x060400, ConfigProblem: "config: 3 bytes, too short", BARs: &none},
			wantReason: "bridge: class 060400 (header type unknown, config: 3 bytes, too short)",
			wantNotes:  1,
		},
		"other bridge whose config cannot be read: an endpoint": {
			dev:       pci.Device{Class: 0x068000, ConfigProblem: "config: no such file", BARs: &one},
			wantNotes: 1,
		},
		"uncore function: no BAR": {
			dev:        pci.Device{Class: 0x088000, HeaderType: &endpoint, BARs: &none},
			wantReason: "platform: no memory or I/O BAR in resource, nothing to pass through (registers in config space only, like CPU uncore functions)",
		},
		"uncore function whose resource cannot be read: the class decides": {
			dev:       pci.Device{Class: 0x088000, HeaderType: &endpoint, ResourceProblem: "resource: line 2: odd"},
			wantNotes: 1,
		},
		"no BAR, handed out by its exact address": {
			dev: pci.Device{Class: 0x088000, HeaderType: &endpoint, BARs: &none},
			cfg: &v1alpha1.DriverConfiguration{Allow: []v1alpha1.DeviceSelector{{PCIAddress: "0000:00:05.0"}}},
		},
		"no BAR, an exact address that another field rules out": {
			dev:        pci.Device{Class: 0x088000, HeaderType: &endpoint, BARs: &none},
			cfg:        &v1alpha1.DriverConfiguration{Allow: []v1alpha1.DeviceSelector{{PCIAddress: "0000:00:05.0", VendorID: "10de"}}},
			wantReason: "platform: no memory or I/O BAR",
		},
		"exact address, but denied": {
			dev: pci.Device{Class: 0x0c0500, HeaderType: &endpoint, BARs: &one},
			cfg: &v1alpha1.DriverConfiguration{
				Allow: []v1alpha1.DeviceSelector{{PCIAddress: "0000:00:05.0"}},
				Deny:  []v1alpha1.DeviceSelector{{Class: "0c"}},
			},
			wantReason: "denied by configuration (deny[0])",
		},
		"EDAC driver":                 {dev: pci.Device{Class: 0x088000, Driver: "pnd2_edac", HeaderType: &endpoint, BARs: &one}, wantReason: "platform: memory error reporting (pnd2_edac)"},
		"performance counters":        {dev: pci.Device{Class: 0x110100, HeaderType: &endpoint, BARs: &one}, wantReason: "platform: performance counters (class 110100)"},
		"IOMMU":                       {dev: pci.Device{Class: 0x080600, HeaderType: &endpoint, BARs: &one}, wantReason: "platform: IOMMU (class 080600)"},
		"processor thermal":           {dev: pci.Device{Class: 0x118000, Driver: "proc_thermal_pci", HeaderType: &endpoint, BARs: &one}, wantReason: "platform: processor thermal (proc_thermal_pci)"},
		"telemetry":                   {dev: pci.Device{Class: 0x118000, Driver: "intel_vsec", HeaderType: &endpoint, BARs: &one}, wantReason: "platform: platform telemetry (intel_vsec)"},
		"management engine on mei_me": {dev: pci.Device{Class: 0x078000, Driver: "mei_me", HeaderType: &endpoint, BARs: &one}, wantReason: "platform: management engine (mei_me)"},
		"pcieport, not a bridge":      {dev: pci.Device{Class: 0x088000, Driver: "pcieport", HeaderType: &endpoint, BARs: &one}, wantReason: "platform: PCIe port services (pcieport)"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			a, _ := pci.ParseAddress("0000:00:05.0")
			group := 3
			d := tc.dev
			d.Address, d.IOMMUGroup, d.NUMANode = a, &group, -1
			inv := inventory.Decide([]*pci.Device{&d}, map[int][]pci.Address{3: {a}}, tc.cfg, &inventory.HostUse{})
			got := inv.Decisions[0]
			if !strings.HasPrefix(got.Reason, tc.wantReason) || (tc.wantReason == "") != got.Offered {
				t.Errorf("decision %v %q, want reason %q", got.Offered, got.Reason, tc.wantReason)
			}
			if len(got.Notes) != tc.wantNotes {
				t.Errorf("notes %q, want %d", got.Notes, tc.wantNotes)
			}
		})
	}
}

// TestDecidePlatformGroup: a group holding a platform function stays with
// the host, a passive root port does not keep it.
func TestDecidePlatformGroup(t *testing.T) {
	endpoint, bridge, one := pci.HeaderEndpoint, pci.HeaderBridge, 1
	addr := func(s string) pci.Address { a, _ := pci.ParseAddress(s); return a }
	g := 9
	port := &pci.Device{Address: addr("0000:00:1c.0"), Class: 0x060400, Driver: "pcieport", HeaderType: &bridge, IOMMUGroup: &g}
	usb := &pci.Device{Address: addr("0000:00:14.0"), Class: 0x0c0330, Driver: "xhci_hcd", HeaderType: &endpoint, BARs: &one, IOMMUGroup: &g}
	nic := &pci.Device{Address: addr("0000:01:00.0"), Parent: &port.Address, Class: 0x020000, Driver: "igb", HeaderType: &endpoint, BARs: &one, IOMMUGroup: &g}
	thermal := &pci.Device{Address: addr("0000:00:14.2"), Class: 0x118000, Driver: "intel_pch_thermal", HeaderType: &endpoint, BARs: &one, IOMMUGroup: &g}
	members := []pci.Address{port.Address, usb.Address, thermal.Address, nic.Address}

	inv := inventory.Decide([]*pci.Device{port, usb, thermal, nic}, map[int][]pci.Address{9: members}, nil, &inventory.HostUse{})
	want := "IOMMU group 9: member 0000:00:14.2 is not offered (platform: platform thermal (intel_pch_thermal))"
	for _, d := range inv.Decisions {
		if d.Device == usb || d.Device == nic {
			if d.Reason != want {
				t.Errorf("%s: %q, want %q", d.Device.Address, d.Reason, want)
			}
		}
	}
	// Without the thermal function the root port stays behind.
	inv = inventory.Decide([]*pci.Device{port, usb, nic}, map[int][]pci.Address{9: {port.Address, usb.Address, nic.Address}}, nil, &inventory.HostUse{})
	if got := offered(inv); !cmp.Equal(got, []string{"0000:00:14.0", "0000:01:00.0"}) {
		t.Errorf("offered %v, want the USB controller and the NIC", got)
	}
}

// TestDecideInUseBehindAnEndpoint: an NVMe drive behind a VMD controller
// holds the root file system; handing out the VMD would take the drive, so
// the VMD is in use too. The root port above both is a bridge as before.
func TestDecideInUseBehindAnEndpoint(t *testing.T) {
	endpoint, bridge, one := pci.HeaderEndpoint, pci.HeaderBridge, 1
	addr := func(s string) pci.Address { a, _ := pci.ParseAddress(s); return a }
	g1, g2 := 1, 2
	port := &pci.Device{Address: addr("0000:00:1c.0"), Path: "devices/pci0000:00/0000:00:1c.0", Class: 0x060400, Driver: "pcieport", HeaderType: &bridge, IOMMUGroup: &g1}
	vmd := &pci.Device{Address: addr("0000:00:0e.0"), Path: "devices/pci0000:00/0000:00:0e.0", Class: 0x010400, Driver: "vmd", HeaderType: &endpoint, BARs: &one, IOMMUGroup: &g2}
	nvme := &pci.Device{Address: addr("10000:01:00.0"), Path: "devices/pci0000:00/0000:00:0e.0/pci10000:00/10000:00:01.0/10000:01:00.0",
		Class: 0x010802, Driver: "nvme", HeaderType: &endpoint, BARs: &one}
	host := &inventory.HostUse{InUse: map[pci.Address]string{nvme.Address: "/ (nvme0n1p2)"}}
	inv := inventory.Decide([]*pci.Device{port, vmd, nvme}, map[int][]pci.Address{1: {port.Address}, 2: {vmd.Address}}, nil, host)
	got := reasons(inv)
	if want := "in use: / (nvme0n1p2), through 10000:01:00.0 below it"; got["0000:00:0e.0"] != want {
		t.Errorf("VMD: %q, want %q", got["0000:00:0e.0"], want)
	}
	if want := "bridge: PCI-to-PCI (header type 1)"; got["0000:00:1c.0"] != want {
		t.Errorf("root port: %q, want %q", got["0000:00:1c.0"], want)
	}
	if len(host.InUse) != 1 {
		t.Errorf("the caller's host view was changed: %v", host.InUse)
	}
}
