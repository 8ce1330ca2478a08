package resources_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/dynamic-resource-allocation/cel"
	"k8s.io/dynamic-resource-allocation/structured"
	"k8s.io/utils/ptr"

	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/resources"
)

// groupedNode is a node made for the random test: IOMMU groups of one to
// four offered functions on two PCIe roots and two NUMA nodes.
func groupedNode() *inventory.Inventory {
	inv := &inventory.Inventory{}
	sizes := []int{1, 2, 3, 4, 2, 1, 3, 2, 1, 4, 2, 2, 1, 3}
	bus := 1
	for g, size := range sizes {
		var members []pci.Address
		for f := range size {
			members = append(members, pci.Address{Bus: uint8(bus), Function: uint8(f)})
		}
		for _, a := range members {
			group := g
			inv.Decisions = append(inv.Decisions, inventory.Decision{
				Device: &pci.Device{
					Address: a, VendorID: 0x8086, DeviceID: uint16(0x1000 + size), Class: 0x020000 + uint32(g%2)<<16,
					IOMMUGroup: &group, NUMANode: g % 2, PCIeRoot: fmt.Sprintf("pci0000:%02x", 0x80*(g%2)),
				},
				Offered:      true,
				GroupMembers: members,
			})
		}
		bus++
	}
	return inv
}

// machineInventory scans a real machine of ../inventory/testdata as the
// plugin does, with a host that uses nothing.
func machineInventory(t *testing.T, name string) *inventory.Inventory {
	t.Helper()
	m, err := pcitest.LoadMachine(filepath.Join("..", "inventory", "testdata", "real-machines", name+".json"))
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
	inv, err := inventory.Scan(fs, nil, nil, &inventory.HostUse{})
	if err != nil {
		t.Fatal(err)
	}
	return inv
}

// randomRun drives the scheduler's allocator over the published slices of
// one node with random claims and releases.
type randomRun struct {
	t      *testing.T
	rng    *rand.Rand
	slices []*resourceapi.ResourceSlice
	cache  *cel.Cache
	// group of every published device, from its attribute.
	group map[string]int64
	// members counts the published devices of each group.
	members map[int64]int
	// held maps a group to the claim that holds it.
	held      map[int64]string
	claims    map[string][]string
	allocated sets.Set[structured.DeviceID]
	n         int
	// granted and refused count allocations.
	granted, refused int
}

func newRandomRun(t *testing.T, seed uint64, inv *inventory.Inventory) *randomRun {
	r := &randomRun{
		t: t, rng: rand.New(rand.NewPCG(seed, seed)), cache: cel.NewCache(100, cel.Features{}),
		group: map[string]int64{}, members: map[int64]int{}, held: map[int64]string{},
		claims: map[string][]string{}, allocated: sets.New[structured.DeviceID](),
	}
	for i, s := range resources.Slices(driverName, nodeName, resources.Build(nodeName, inv)) {
		s.Name = fmt.Sprintf("slice-%d", i)
		r.slices = append(r.slices, &s)
		for _, d := range s.Spec.Devices {
			g := *d.Attributes[resources.AttrIOMMUGroup].IntValue
			r.group[d.Name] = g
			r.members[g]++
		}
	}
	return r
}

// request builds a random request: any device, or one of a group, of a
// NUMA node or of a class, one or two devices.
func (r *randomRun) request(name string) resourceapi.DeviceRequest {
	groups := slices.Sorted(func(yield func(int64) bool) {
		for g := range r.members {
			if !yield(g) {
				return
			}
		}
	})
	var sel string
	switch r.rng.IntN(4) {
	case 1:
		sel = fmt.Sprintf(`device.attributes["vfio.dra.dev"].iommuGroup == %d`, groups[r.rng.IntN(len(groups))])
	case 2:
		sel = fmt.Sprintf(`device.attributes["resource.kubernetes.io"].?numaNode.orValue(0) == %d`, r.rng.IntN(2))
	case 3:
		sel = `device.attributes["vfio.dra.dev"].class.startsWith("02")`
	}
	req := &resourceapi.ExactDeviceRequest{
		DeviceClassName: className, AllocationMode: resourceapi.DeviceAllocationModeExactCount, Count: int64(1 + r.rng.IntN(2)),
	}
	if sel != "" {
		req.Selectors = []resourceapi.DeviceSelector{{CEL: &resourceapi.CELDeviceSelector{Expression: sel}}}
	}
	return resourceapi.DeviceRequest{Name: name, Exactly: req}
}

func (r *randomRun) newClaim() *resourceapi.ResourceClaim {
	r.n++
	name := fmt.Sprintf("c%d", r.n)
	c := &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name)},
		Spec:       resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{Requests: []resourceapi.DeviceRequest{r.request("a")}}},
	}
	// A second request, or a constraint: both together make the
	// allocator's search exponential on a full node.
	switch r.rng.IntN(6) {
	case 0:
		c.Spec.Devices.Requests = append(c.Spec.Devices.Requests, r.request("b"))
	case 1:
		c.Spec.Devices.Constraints = []resourceapi.DeviceConstraint{{MatchAttribute: ptr.To(resourceapi.FullyQualifiedName("resource.kubernetes.io/pcieRoot"))}}
	}
	return c
}

// allocate allocates one or two claims together (the claims of one pod)
// and checks the result against every claim that holds devices now.
func (r *randomRun) allocate() {
	r.t.Helper()
	claims := []*resourceapi.ResourceClaim{r.newClaim()}
	if r.rng.IntN(3) == 0 {
		claims = append(claims, r.newClaim())
	}
	r.allocateClaims(claims...)
}

func (r *randomRun) allocateClaims(claims ...*resourceapi.ResourceClaim) {
	r.t.Helper()
	ctx := context.Background()
	alloc, err := structured.NewAllocator(ctx,
		structured.Features{AdminAccess: true, PrioritizedList: true, PartitionableDevices: true, DeviceTaints: true},
		structured.AllocatedState{AllocatedDevices: r.allocated},
		classes{className: {ObjectMeta: metav1.ObjectMeta{Name: className}, Spec: resourceapi.DeviceClassSpec{
			Selectors: []resourceapi.DeviceSelector{{CEL: &resourceapi.CELDeviceSelector{Expression: `device.driver == "vfio.dra.dev"`}}},
		}}},
		r.slices, r.cache)
	if err != nil {
		r.t.Fatal(err)
	}
	results, err := alloc.Allocate(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName}}, claims)
	if err != nil {
		r.t.Fatalf("claims %s: %v", claims[0].Name, err)
	}
	if results == nil {
		r.refused++
		return
	}
	r.granted++
	for i, res := range results {
		name := claims[i].Name
		for _, d := range res.Devices.Results {
			g, ok := r.group[d.Device]
			if !ok {
				r.t.Fatalf("claim %s got %s, which is not published", name, d.Device)
			}
			if holder, ok := r.held[g]; ok {
				r.t.Fatalf("claim %s got %s of IOMMU group %d, which claim %s holds (%v)", name, d.Device, g, holder, r.claims[holder])
			}
			id := structured.MakeDeviceID(d.Driver, d.Pool, d.Device)
			if r.allocated.Has(id) {
				r.t.Fatalf("claim %s got %s, which is allocated already", name, d.Device)
			}
			r.allocated.Insert(id)
			r.claims[name] = append(r.claims[name], d.Device)
		}
		// Only now: one claim may not take two members of a group either.
		for _, dev := range r.claims[name] {
			g := r.group[dev]
			if holder, ok := r.held[g]; ok && holder == name {
				r.t.Fatalf("claim %s got two members of IOMMU group %d: %v", name, g, r.claims[name])
			}
			r.held[g] = name
		}
	}
}

// release gives back a random claim's devices.
func (r *randomRun) release() {
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range r.claims {
			if !yield(n) {
				return
			}
		}
	})
	if len(names) == 0 {
		return
	}
	name := names[r.rng.IntN(len(names))]
	for _, dev := range r.claims[name] {
		r.allocated.Delete(structured.MakeDeviceID(driverName, nodeName, dev))
		delete(r.held, r.group[dev])
	}
	delete(r.claims, name)
}

// freeGroup reports whether some group has no holder: then a claim for
// any one device must succeed.
func (r *randomRun) freeGroup() bool {
	for g := range r.members {
		if _, ok := r.held[g]; !ok {
			return true
		}
	}
	return false
}

// TestRandomAllocation: 10,000 random claim and release steps through the
// scheduler's structured allocator, on a node with groups of one to four
// devices, the demo server and real machines: no two claims ever hold
// functions of one IOMMU group, and a claim for any one device is granted
// whenever a group is free.
func TestRandomAllocation(t *testing.T) {
	nodes := []struct {
		name  string
		inv   func(t *testing.T) *inventory.Inventory
		steps int
	}{
		{"grouped", func(*testing.T) *inventory.Inventory { return groupedNode() }, 4000},
		{"server", serverInventory, 2000},
	}
	for _, m := range []string{"suprox", "nas", "adl", "spr", "hgx"} {
		nodes = append(nodes, struct {
			name  string
			inv   func(t *testing.T) *inventory.Inventory
			steps int
		}{m, func(t *testing.T) *inventory.Inventory { return machineInventory(t, m) }, 800})
	}
	total := 0
	for i, n := range nodes {
		t.Run(n.name, func(t *testing.T) {
			t.Parallel()
			r := newRandomRun(t, uint64(i+1), n.inv(t))
			if len(r.group) == 0 {
				t.Fatalf("node %s offers no devices", n.name)
			}
			for range n.steps {
				if r.rng.IntN(5) < 3 {
					r.allocate()
				} else {
					r.release()
				}
			}
			// Liveness: with a free group, one device for anyone.
			for r.freeGroup() {
				before := len(r.held)
				r.n++
				c := &resourceapi.ResourceClaim{
					ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("any%d", r.n), Namespace: "default", UID: types.UID(fmt.Sprintf("uid-any%d", r.n))},
					Spec: resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{Requests: []resourceapi.DeviceRequest{{
						Name: "a", Exactly: &resourceapi.ExactDeviceRequest{DeviceClassName: className, AllocationMode: resourceapi.DeviceAllocationModeExactCount, Count: 1},
					}}}},
				}
				r.allocateClaims(c)
				if len(r.held) != before+1 {
					t.Fatalf("a group is free, but a claim for any one device was refused (held %d of %d groups)", len(r.held), len(r.members))
				}
			}
			if r.granted == 0 || r.refused == 0 {
				t.Errorf("%d granted, %d refused: the steps did not exercise both outcomes", r.granted, r.refused)
			}
			t.Logf("%d groups, %d devices: %d allocations granted, %d refused", len(r.members), len(r.group), r.granted, r.refused)
		})
		total += n.steps
	}
	if total < 10000 {
		t.Errorf("%d steps, want at least 10,000", total)
	}
}
