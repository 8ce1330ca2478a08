package inventory_test

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/vfio-dra/vfio-dra-driver/api/v1alpha1"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// Decisions expected on real machines, one per function, written from
// what each function is (lspci's names in the comments); offer means offered.
const offer = ""

// Reasons shared by the tables.
const (
	rootPort = "bridge: PCI-to-PCI (header type 1)"
	hostBr   = "chipset: host bridge (class 060000) stays with the host"
	isaBr    = "chipset: ISA bridge (class 060100) stays with the host"
)

// scanMachine lays out a machine of testdata/real-machines with the
// project's builder and scans it as the plugin does.
func scanMachine(t *testing.T, name string, cfg *v1alpha1.DriverConfiguration, host *inventory.HostUse) *inventory.Inventory {
	t.Helper()
	m, err := pcitest.LoadMachine(filepath.Join("testdata", "real-machines", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	if _, err := pcitest.NewMachine(root, m); err != nil {
		t.Fatal(err)
	}
	inv := scanTree(t, root, cfg, host)
	if len(inv.Decisions) != len(m.Functions) {
		t.Fatalf("%d decisions for %d functions", len(inv.Decisions), len(m.Functions))
	}
	for _, d := range inv.Decisions {
		if len(d.Notes) > 0 {
			t.Errorf("%s: notes %v: the builder lays out config and resource for every function", d.Device.Address, d.Notes)
		}
	}
	return inv
}

func inUse(t *testing.T, evidence map[string]string) *inventory.HostUse {
	t.Helper()
	h := &inventory.HostUse{InUse: map[pci.Address]string{}}
	for a, e := range evidence {
		addr, err := pci.ParseAddress(a)
		if err != nil {
			t.Fatal(err)
		}
		h.InUse[addr] = e
	}
	return h
}

func TestRealMachines(t *testing.T) {
	tests := map[string]struct {
		machine string
		cfg     *v1alpha1.DriverConfiguration
		host    func(t *testing.T) *inventory.HostUse
		want    map[string]string // address -> reason, offered for offered
	}{
		// A Proxmox host: a VM holds the SATA controller and both I350
		// ports through vfio-pci, the root file system is on the NVMe.
		"suprox as it runs": {
			machine: "suprox",
			host: func(t *testing.T) *inventory.HostUse {
				return inUse(t, map[string]string{
					"0000:00:17.0": "held by pid 4242 (kvm) through /dev/vfio/7",
					"0000:01:00.0": "held by pid 4242 (kvm) through /dev/vfio/1",
					"0000:01:00.1": "held by pid 4242 (kvm) through /dev/vfio/1",
					"0000:07:00.0": "/ (pve-root on nvme0n1p3)",
				})
			},
			want: map[string]string{
				"0000:00:00.0": hostBr,                                                                                           // host bridge on skl_uncore
				"0000:00:01.0": rootPort,                                                                                         // PCIe x16 root port
				"0000:00:08.0": offer,                                                                                            // Gaussian mixture model (GNA)
				"0000:00:12.0": "platform: platform thermal (intel_pch_thermal)",                                                 // PCH thermal controller
				"0000:00:14.0": "IOMMU group 4: member 0000:00:14.2 is not offered (platform: memory controller (class 050000))", // xHCI
				"0000:00:14.2": "platform: memory controller (class 050000)",                                                     // PCH shared SRAM
				"0000:00:15.0": "platform: LPSS serial controller (I2C, SPI, UART of the SoC) (intel-lpss)",                      // serial IO I2C
				"0000:00:15.1": "platform: LPSS serial controller (I2C, SPI, UART of the SoC) (intel-lpss)",
				"0000:00:16.0": "platform: management engine (class 078000 on a root bus)", // HECI
				"0000:00:16.4": "platform: management engine (class 078000 on a root bus)", // HECI #2
				"0000:00:17.0": "in use: held by pid 4242 (kvm) through /dev/vfio/7",       // SATA AHCI
				"0000:00:1b.0": rootPort,
				"0000:00:1b.6": rootPort,
				"0000:00:1c.0": rootPort,
				"0000:00:1c.1": rootPort,
				"0000:00:1d.0": rootPort,
				"0000:00:1e.0": "platform: LPSS serial controller (I2C, SPI, UART of the SoC) (intel-lpss)", // serial IO UART
				"0000:00:1f.0": isaBr,                                                                       // LPC/eSPI
				"0000:00:1f.4": "platform: SMBus controller (class 0c0500)",                                 // SMBus
				"0000:00:1f.5": "platform: firmware flash controller (intel-spi)",                           // SPI flash
				"0000:01:00.0": "in use: held by pid 4242 (kvm) through /dev/vfio/1",                        // I350 port 0
				"0000:01:00.1": "in use: held by pid 4242 (kvm) through /dev/vfio/1",                        // I350 port 1
				"0000:02:00.0": offer,                                                                       // I210
				"0000:03:00.0": offer,                                                                       // I210
				"0000:05:00.0": rootPort,                                                                    // ASPEED PCIe-to-PCI bridge
				"0000:06:00.0": "boot VGA device: the host console",                                         // ASPEED VGA
				"0000:07:00.0": "in use: / (pve-root on nvme0n1p3)",                                         // WD NVMe
			},
		},
		"suprox, platform functions named by address": {
			machine: "suprox",
			cfg: &v1alpha1.DriverConfiguration{Allow: []v1alpha1.DeviceSelector{
				{PCIAddress: "0000:00:12.0"}, {PCIAddress: "0000:00:14.0"}, {PCIAddress: "0000:00:14.2"},
				{Class: "0c80"}, {Driver: "intel-lpss"}, {VendorID: "8086", DeviceID: "a323"},
			}},
			host: func(*testing.T) *inventory.HostUse { return &inventory.HostUse{} },
			want: map[string]string{
				"0000:00:12.0": offer,
				"0000:00:14.0": offer,
				"0000:00:14.2": offer,
				// Selected by class, driver or ids: not enough for a
				// platform function.
				"0000:00:15.0": "platform: LPSS serial controller (I2C, SPI, UART of the SoC) (intel-lpss)",
				"0000:00:1f.4": "platform: SMBus controller (class 0c0500)",
				"0000:02:00.0": "not allowed by configuration",
			},
		},
		// An Alder Lake-S desktop: PCH platform functions, a GPU behind
		// its own switch, a second GPU pre-bound to vfio-pci and free.
		"adl": {
			machine: "adl",
			host:    func(*testing.T) *inventory.HostUse { return &inventory.HostUse{} },
			want: map[string]string{
				"0000:00:00.0": hostBr,
				"0000:00:01.0": rootPort, "0000:00:01.1": rootPort, "0000:00:06.0": rootPort,
				"0000:00:02.0": "boot VGA device: the host console",        // UHD graphics
				"0000:00:0a.0": "platform: platform telemetry (intel-pmt)", // PMT, class 1180
				"0000:00:0e.0": offer,                                      // VMD, no NVMe behind it in the capture
				"0000:00:14.0": "IOMMU group 7: member 0000:00:14.2 is not offered (platform: memory controller (class 050000))",
				"0000:00:14.2": "platform: memory controller (class 050000)", // shared SRAM
				"0000:00:15.0": "platform: LPSS serial controller (I2C, SPI, UART of the SoC) (intel-lpss)",
				"0000:00:15.1": "platform: LPSS serial controller (I2C, SPI, UART of the SoC) (intel-lpss)",
				"0000:00:15.2": "platform: LPSS serial controller (I2C, SPI, UART of the SoC) (intel-lpss)",
				"0000:00:16.0": "platform: management engine (mei_me)",
				"0000:00:17.0": offer, // SATA
				"0000:00:1a.0": rootPort, "0000:00:1b.0": rootPort, "0000:00:1c.0": rootPort, "0000:00:1c.2": rootPort,
				"0000:00:1c.3": rootPort, "0000:00:1c.4": rootPort, "0000:00:1d.0": rootPort,
				"0000:00:1f.0": isaBr,
				"0000:00:1f.3": "IOMMU group 18: member 0000:00:1f.0 is not offered (" + isaBr + ")", // HD audio
				"0000:00:1f.4": "platform: SMBus controller (class 0c0500)",
				"0000:00:1f.5": "IOMMU group 18: member 0000:00:1f.0 is not offered (" + isaBr + ")", // SPI, no driver
				"0000:01:00.0": rootPort, "0000:02:00.0": rootPort,                                   // the Navi's switch ports
				"0000:03:00.0": offer, "0000:03:00.1": offer, // RX 6700 XT and its audio, a group each
				"0000:04:00.0": offer, "0000:04:00.1": offer, // RX 560 pre-bound to vfio-pci, free
				"0000:05:00.0": offer, "0000:06:00.0": offer, // NVMe
				"0000:08:00.0": offer, "0000:09:00.0": offer, "0000:0a:00.0": offer, // AQC, AX210, I225
				"0000:0b:00.0": rootPort, "0000:0c:00.0": rootPort, "0000:0c:01.0": rootPort, "0000:0c:02.0": rootPort, "0000:0c:03.0": rootPort,
				"0000:0d:00.0": offer, // Thunderbolt NHI
				"0000:41:00.0": offer, // Thunderbolt xHCI
			},
		},
		// A Meteor Lake laptop (ThinkBook 14 G7 IML): what a laptop's SoC
		// and PCH hold stays with the host; the NPU, the GNA, the
		// Thunderbolt controller, both NVMe, the Wi-Fi and the card
		// reader are offered.
		"mtl-laptop": {
			machine: "mtl-laptop",
			host:    func(*testing.T) *inventory.HostUse { return &inventory.HostUse{} },
			want: map[string]string{
				"0000:00:00.0": hostBr,                                                       // host bridge on igen6_edac
				"0000:00:02.0": "boot VGA device: the host console",                          // Meteor Lake-P graphics
				"0000:00:04.0": "platform: processor thermal (proc_thermal_pci)",             // Dynamic Tuning Technology
				"0000:00:06.0": rootPort, "0000:00:06.2": rootPort, "0000:00:07.0": rootPort, // NVMe and Thunderbolt ports
				"0000:00:08.0": offer,                                       // GNA, class 0880
				"0000:00:0a.0": "platform: platform telemetry (intel_vsec)", // PMT
				"0000:00:0b.0": offer,                                       // NPU
				"0000:00:0d.0": offer, "0000:00:0d.3": offer,                // Thunderbolt xHCI and NHI, group 9
				"0000:00:14.0": "IOMMU group 10: member 0000:00:14.2 is not offered (platform: memory controller (class 050000))",
				"0000:00:14.2": "platform: memory controller (class 050000)", // shared SRAM
				"0000:00:15.0": "platform: LPSS serial controller (I2C, SPI, UART of the SoC) (intel-lpss)",
				"0000:00:15.1": "platform: LPSS serial controller (I2C, SPI, UART of the SoC) (intel-lpss)",
				"0000:00:15.2": "platform: LPSS serial controller (I2C, SPI, UART of the SoC) (intel-lpss)", // the touchpad's I2C
				"0000:00:16.0": "platform: management engine (mei_me)",
				"0000:00:1c.0": rootPort, "0000:00:1c.6": rootPort,
				"0000:00:1f.0": isaBr,
				"0000:00:1f.3": "IOMMU group 15: member 0000:00:1f.0 is not offered (" + isaBr + ")", // HD audio on SOF
				"0000:00:1f.4": "platform: SMBus controller (class 0c0500)",
				"0000:00:1f.5": "IOMMU group 15: member 0000:00:1f.0 is not offered (" + isaBr + ")", // SPI, no driver
				"0000:00:1f.6": "IOMMU group 15: member 0000:00:1f.0 is not offered (" + isaBr + ")", // the I219 Ethernet
				"0000:01:00.0": offer, "0000:02:00.0": offer,                                         // SN570 and SN550 NVMe
				"0000:44:00.0": offer, // RTL8852CE Wi-Fi
				"0000:45:00.0": offer, // SD card reader, class 0805
			},
		},
		// An Atom C3000 storage server, nothing of it in use.
		"nas": {
			machine: "nas",
			host:    func(*testing.T) *inventory.HostUse { return &inventory.HostUse{} },
			want: map[string]string{
				"0000:00:00.0": hostBr,                                                  // Atom C3000 host bridge
				"0000:00:04.0": hostBr,                                                  // error registers
				"0000:00:05.0": "platform: root complex event collector (class 080700)", // RCEC on pcieport
				"0000:00:06.0": rootPort,
				"0000:00:10.0": rootPort,
				"0000:00:11.0": rootPort,
				"0000:00:12.0": "platform: SMBus controller (ismt_smbus)", // SMBus host, class 0880
				"0000:00:13.0": offer,                                     // SATA
				"0000:00:14.0": offer,                                     // SATA
				"0000:00:15.0": offer,                                     // xHCI
				"0000:00:16.0": rootPort,
				"0000:00:17.0": rootPort,
				"0000:00:18.0": "platform: management engine (class 078000 on a root bus)", // ME HECI, no driver
				"0000:00:1f.0": isaBr,                                                      // LPC
				"0000:00:1f.2": "platform: memory controller (class 058000)",               // power management controller
				"0000:00:1f.4": "platform: SMBus controller (class 0c0500)",
				"0000:00:1f.5": "IOMMU group 13: member 0000:00:1f.0 is not offered (" + isaBr + ")", // SPI controller, no driver
				"0000:01:00.0": offer,                                                                // QuickAssist on c3xxx
				"0000:03:00.0": rootPort,                                                             // ASPEED bridge
				"0000:04:00.0": "boot VGA device: the host console",
				"0000:05:00.0": offer, // X553 10 GbE, each port alone in its group
				"0000:05:00.1": offer,
				"0000:06:00.0": offer,
				"0000:06:00.1": offer,
			},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			inv := scanMachine(t, tc.machine, tc.cfg, tc.host(t))
			got := map[string]string{}
			for _, d := range inv.Decisions {
				if d.Offered != (d.Reason == "") {
					t.Errorf("%s: Offered=%v but Reason=%q", d.Device.Address, d.Offered, d.Reason)
				}
				if _, ok := tc.want[d.Device.Address.String()]; ok || tc.cfg == nil {
					got[d.Device.Address.String()] = d.Reason
				}
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("decisions (-want +got):\n%s", diff)
			}
		})
	}
}

// TestRealMachineSapphireRapids: a 2-socket Sapphire Rapids server with 483
// functions, most of them CPU uncore registers. What anyone would pass
// through is offered: 8 QAT, 8 DLB, 8 DSA, 8 IAA, the I225 NIC, the SATA
// controller (nothing of the host view uses it here) and one PCH function
// with a BAR whose purpose the capture does not tell.
func TestRealMachineSapphireRapids(t *testing.T) {
	const noBAR = "platform: no memory or I/O BAR in resource, nothing to pass through (registers in config space only, like CPU uncore functions)"
	// By device ID: what the function is decides.
	byID := map[string]string{
		"0b23": "platform: root complex event collector (class 080700)", // one per IIO stack, on pcieport
		"09a2": noBAR, "09a3": noBAR, "09a4": noBAR, "09a6": noBAR,      // IIO memory map/VT-d, RAS, mesh, OOBMSM
		"3240": noBAR, "3241": noBAR, "3242": noBAR, "3245": noBAR, "3246": noBAR, "3247": noBAR, // UPI
		"324c": noBAR, "324d": noBAR, // CHA, 128 of each
		"3250": noBAR, "3251": noBAR, "3252": noBAR, "3255": noBAR, // PCU (3251 on isst_if_pci)
		"3258": noBAR, "3259": noBAR, "325a": noBAR, "325b": noBAR, "325c": noBAR, "325d": noBAR, "325e": noBAR, "325f": noBAR, // Ubox, M2M
		"344f": noBAR, "3457": noBAR,
		"2880": "platform: performance counters (class 110100)",
		"324a": "platform: performance counters (class 110100)",
		"0998": hostBr, "1bfe": hostBr, // integrated error handler, PCH host bridge
		"09a7": "platform: platform telemetry (intel_vsec)",
		"0b25": offer, "0cfe": offer, // DSA, IAA on idxd
		"4940": offer,                                        // QAT on 4xxx
		"2710": offer,                                        // DLB, no in-tree driver
		"1bbd": rootPort, "1bbf": rootPort, "1150": rootPort, // PCH root ports, ASPEED bridge
		"15f2": offer, // I225-LM
		"2000": "boot VGA device: the host console",
		"1ba2": offer,                                                                                             // SATA, alone in its group
		"1bff": offer,                                                                                             // PCH function 00:15.0 with a BAR and no driver
		"1bce": "platform: memory controller (class 050000)",                                                      // PCH shared SRAM
		"1bcd": "IOMMU group 57: member 0000:00:14.2 is not offered (platform: memory controller (class 050000))", // xHCI
		"1be0": "platform: management engine (mei_me)",
		"1be4": "platform: management engine (mei_me)",
		"1be1": "platform: management engine (class 078000 on a root bus)", // IDE-R
		"1b81": isaBr,
		"1bc8": "IOMMU group 62: member 0000:00:1f.0 is not offered (" + isaBr + ")", // HD audio
		"1bc9": "platform: SMBus controller (class 0c0500)",
		"1bca": "IOMMU group 62: member 0000:00:1f.0 is not offered (" + isaBr + ")", // SPI
	}
	inv := scanMachine(t, "spr", nil, &inventory.HostUse{})
	if len(inv.Decisions) != 483 {
		t.Fatalf("%d functions, want the capture's 483", len(inv.Decisions))
	}
	n := 0
	for _, d := range inv.Decisions {
		id := fmt.Sprintf("%04x", d.Device.DeviceID)
		want, ok := byID[id]
		if !ok {
			t.Errorf("%s: device %s has no expected decision", d.Device.Address, id)
			continue
		}
		if d.Reason != want {
			t.Errorf("%s (%s): %q, want %q", d.Device.Address, id, d.Reason, want)
		}
		if d.Offered {
			n++
		}
	}
	if n != 35 {
		t.Errorf("%d offered, want 35 (32 accelerators, the NIC, the SATA controller, 00:15.0)", n)
	}
}

// TestRealMachineHGX: an HGX H100 system. The NVSwitches are class 0680
// ("other bridge") but endpoints (header type 0): offered, as NVLink
// passthrough needs, beside the eight GPUs.
func TestRealMachineHGX(t *testing.T) {
	inv := scanMachine(t, "hgx", nil, &inventory.HostUse{})
	for _, d := range inv.Decisions {
		if !d.Offered {
			t.Errorf("%s (%04x:%04x): %q, want offered", d.Device.Address, d.Device.VendorID, d.Device.DeviceID, d.Reason)
		}
	}
	if len(inv.Offered()) != 12 {
		t.Errorf("%d offered, want 8 GPUs and 4 NVSwitches", len(inv.Offered()))
	}
	// Two GPUs that share group 29 are offered together, as one group.
	for _, d := range inv.Decisions {
		if d.Device.Address.String() == "0000:11:00.0" && len(d.GroupMembers) != 2 {
			t.Errorf("group of 0000:11:00.0: %v, want both GPUs", d.GroupMembers)
		}
	}
}
