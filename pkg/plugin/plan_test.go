package plugin

import (
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// TestGroupEndpointsAsVFIO: the endpoints plan takes from what ScanGroups
// read are the ones vfio.GroupEndpoints reads from sysfs, for the group of
// every function of the demo server (bridges, chipset functions, multi-
// function groups) and of a small SR-IOV node.
func TestGroupEndpointsAsVFIO(t *testing.T) {
	for name, layout := range map[string]func(string) (*pcitest.Tree, error){
		"demo":  pcitest.NewServer,
		"sriov": func(root string) (*pcitest.Tree, error) { return pcitest.NewSRIOVNode(root, 2, 4) },
	} {
		t.Run(name, func(t *testing.T) {
			root := filepath.Join(t.TempDir(), "sys")
			if _, err := layout(root); err != nil {
				t.Fatal(err)
			}
			fsys, err := pci.NewFS(root)
			if err != nil {
				t.Fatal(err)
			}
			devices, _, err := fsys.Scan()
			if err != nil {
				t.Fatal(err)
			}
			checked := 0
			for _, d := range devices {
				if d.IOMMUGroup == nil {
					continue
				}
				inv, err := inventory.ScanGroups(fsys, nil, nil, nil, []pci.Address{d.Address})
				if err != nil {
					t.Fatal(err)
				}
				decisions := map[pci.Address]inventory.Decision{}
				var members []pci.Address
				for _, dec := range inv.Decisions {
					decisions[dec.Device.Address] = dec
					if dec.Device.Address == d.Address {
						members = dec.GroupMembers
					}
				}
				got, err := groupEndpoints(decisions, *d.IOMMUGroup, members)
				if err != nil {
					t.Fatalf("%s: %v", d.Address, err)
				}
				want, err := vfio.GroupEndpoints(fsys, *d.IOMMUGroup)
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(want, got, cmpopts.EquateEmpty(), cmp.Comparer(func(a, b pci.Address) bool { return a == b })); diff != "" {
					t.Errorf("%s (group %d): endpoints (-vfio.GroupEndpoints +groupEndpoints):\n%s", d.Address, *d.IOMMUGroup, diff)
				}
				checked++
			}
			if checked == 0 {
				t.Fatal("no function with an IOMMU group")
			}
		})
	}
}
