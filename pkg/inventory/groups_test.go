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

// TestScanGroupsDecidesAsScan: for every function of the demo server, the
// real machines and an SR-IOV node, reading only its IOMMU group gives the
// decision that reading the whole node gives, with host drivers of
// prepared claims, a configuration and a host view applied.
func TestScanGroupsDecidesAsScan(t *testing.T) {
	layouts := map[string]func(root string) error{
		"server": func(root string) error { _, err := pcitest.NewServer(root); return err },
		"sriov":  func(root string) error { _, err := pcitest.NewSRIOVNode(root, 2, 8); return err },
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
	host := &inventory.HostUse{InUse: map[pci.Address]string{}}
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
				if want.Device.IOMMUGroup != nil && len(part.Decisions) > len(want.GroupMembers) {
					t.Errorf("%s: read %d functions, its group has %d", want.Device.Address, len(part.Decisions), len(want.GroupMembers))
				}
			}
			missing, _ := pci.ParseAddress("0000:ff:1f.7")
			part, err := inventory.ScanGroups(fs, cfg, nil, host, []pci.Address{missing})
			if err != nil || len(part.Decisions) != 0 || len(part.Problems) != 0 {
				t.Errorf("a function not on the node: %+v %v", part, err)
			}
		})
	}
}
