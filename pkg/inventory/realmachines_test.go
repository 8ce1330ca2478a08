package inventory_test

import (
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
