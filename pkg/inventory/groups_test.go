package inventory_test

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/vfio-dra/vfio-dra-driver/api/v1alpha1"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// TestScanGroupsDecidesAsScan: for every function of the demo server, the
// real machines and an SR-IOV node, reading only its IOMMU group gives the
// decision that reading the whole node gives, with host drivers of
// prepared claims, a configuration and a host view applied.
func TestScanGroupsDecidesAsScan(t *testing.T) {
	layouts := map[string]func(root string) error{
		"server": func(root string) error { _, err := pcitest.NewServer(root); return err },
		"sriov":  func(root string) error { _, err := pcitest.NewSRIOVNode(root, 2, 8); return err },
		// An NVMe drive in use behind a VMD controller, an endpoint of
		// another IOMMU group: the VMD is in use too.
		"vmd": func(root string) error {
			tree, err := pcitest.New(root)
			if err != nil {
				return err
			}
			return tree.Add(
				pcitest.Function{Address: "0000:00:0e.0", Vendor: 0x8086, Device: 0x467f, Class: 0x010400, Driver: "vmd", IOMMUGroup: 1},
				pcitest.Function{Address: "0000:01:00.0", Parent: "0000:00:0e.0", Vendor: 0x144d, Device: 0xa808, Class: 0x010802, Driver: "nvme", IOMMUGroup: 2},
			)
		},
	}
	for _, name := range []string{"nas", "suprox", "adl"} {
		layouts[name] = func(root string) error {
			m, err := pcitest.LoadMachine(filepath.Join("testdata", "real-machines", name+".json"))
			if err != nil {
				return err
			}
			_, err = pcitest.NewMachine(root, m)
			return err
		}
	}
	cfg := &v1alpha1.DriverConfiguration{Deny: []v1alpha1.DeviceSelector{{VendorID: "19ee"}}}
	hostDrivers := map[string]string{"0000:01:00.0": "nvidia", "0000:11:00.1": "iavf"}
	nvme, _ := pci.ParseAddress("0000:01:00.0")
	host := &inventory.HostUse{InUse: map[pci.Address]string{nvme: "/ (nvme0n1p2)"}}
	for name, layout := range layouts {
		t.Run(name, func(t *testing.T) {
			root := t.TempDir()
			if err := layout(root); err != nil {
				t.Fatal(err)
			}
			fs, err := pci.NewFS(root)
			if err != nil {
				t.Fatal(err)
			}
			full, err := inventory.Scan(fs, cfg, hostDrivers, host)
			if err != nil {
				t.Fatal(err)
			}
			if len(full.Decisions) == 0 {
				t.Fatal("no functions")
			}
			// The function in use and the functions above it are read
			// for every claim.
			inUseChain := map[pci.Address]bool{}
			for _, d := range full.Decisions {
				if d.Device.Address == nvme {
					for _, elem := range strings.Split(d.Device.Path, "/") {
						if a, err := pci.ParseAddress(elem); err == nil {
							inUseChain[a] = true
						}
					}
				}
			}
			for _, want := range full.Decisions {
				part, err := inventory.ScanGroups(fs, cfg, hostDrivers, host, []pci.Address{want.Device.Address})
				if err != nil {
					t.Fatal(err)
				}
				var got *inventory.Decision
				for i := range part.Decisions {
					if part.Decisions[i].Device.Address == want.Device.Address {
						got = &part.Decisions[i]
					}
				}
				if got == nil {
					t.Errorf("%s: no decision", want.Device.Address)
					continue
				}
				if diff := cmp.Diff(want, *got); diff != "" {
					t.Errorf("%s: decision differs from the full scan (-full +group):\n%s", want.Device.Address, diff)
				}
				for _, d := range part.Decisions {
					if d.Device.Address != want.Device.Address && !slices.Contains(want.GroupMembers, d.Device.Address) && !inUseChain[d.Device.Address] {
						t.Errorf("%s: read %s, neither in its group nor in use", want.Device.Address, d.Device.Address)
					}
				}
			}
			missing, _ := pci.ParseAddress("0000:ff:1f.7")
			part, err := inventory.ScanGroups(fs, cfg, nil, host, []pci.Address{missing})
			if err != nil || len(part.Decisions) != len(inUseChain) || len(part.Problems) != 0 {
				t.Errorf("a function not on the node: %+v %v", part, err)
			}
		})
	}
}
