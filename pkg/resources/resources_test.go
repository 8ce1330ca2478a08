package resources_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"
	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
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

const (
	driverName = "vfio.dra.dev"
	nodeName   = "node-a"
	className  = "vfio.dra.dev"
)

func serverInventory(t *testing.T) *inventory.Inventory {
	t.Helper()
	root := t.TempDir()
	if _, err := pcitest.NewServer(root); err != nil {
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

func TestBuildServer(t *testing.T) {
	res := resources.Build(nodeName, serverInventory(t))
	pool, ok := res.Pools[nodeName]
	if !ok || len(res.Pools) != 1 {
		t.Fatalf("want exactly one pool named after the node, got %v", res.Pools)
	}
	if len(pool.Slices) != 2 {
		t.Fatalf("got %d slices, want one with devices and one with counters", len(pool.Slices))
	}
	devs, counters := pool.Slices[0], pool.Slices[1]
	if len(devs.SharedCounters) != 0 || len(counters.Devices) != 0 {
		t.Fatal("devices and shared counters must be in separate slices")
	}
	var names []string
	consumes := map[string]string{}
	for _, d := range devs.Devices {
		names = append(names, d.Name)
		if len(d.ConsumesCounters) > 0 {
			consumes[d.Name] = d.ConsumesCounters[0].CounterSet
		}
	}
	wantNames := []string{
		"pci-0000-01-00-0", "pci-0000-01-00-1", "pci-0000-02-01-0", "pci-0000-02-02-0",
		"pci-0000-03-00-0", "pci-0000-03-00-1", "pci-0000-81-00-2", "pci-0000-81-00-3", "pci-0000-82-00-0", "pci-0000-83-00-0", "pci-0000-84-00-0",
	}
	if diff := cmp.Diff(wantNames, names); diff != "" {
		t.Errorf("device names (-want +got):\n%s", diff)
	}
	wantConsumes := map[string]string{
		"pci-0000-01-00-0": "iommu-group-2", "pci-0000-01-00-1": "iommu-group-2",
		"pci-0000-02-01-0": "iommu-group-5", "pci-0000-02-02-0": "iommu-group-5",
		"pci-0000-03-00-0": "iommu-group-7", "pci-0000-03-00-1": "iommu-group-7",
	}
	if diff := cmp.Diff(wantConsumes, consumes); diff != "" {
		t.Errorf("counter consumption (-want +got):\n%s", diff)
	}
	var sets []string
	for _, cs := range counters.SharedCounters {
		sets = append(sets, cs.Name)
		if v := cs.Counters["members"].Value; v.Cmp(resource.MustParse("1")) != 0 {
			t.Errorf("counter set %s holds %s, want 1", cs.Name, v.String())
		}
	}
	if diff := cmp.Diff([]string{"iommu-group-2", "iommu-group-5", "iommu-group-7"}, sets); diff != "" {
		t.Errorf("counter sets (-want +got):\n%s", diff)
	}

	want := map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
		"resource.kubernetes.io/pciBusID": {StringValue: ptr.To("0000:01:00.0")},
		"resource.kubernetes.io/pcieRoot": {StringValue: ptr.To("pci0000:00")},
		"resource.kubernetes.io/numaNode": {IntValue: ptr.To[int64](0)},
		"vendorID":                        {StringValue: ptr.To("10de")},
		"deviceID":                        {StringValue: ptr.To("2204")},
		"subsystemVendorID":               {StringValue: ptr.To("10de")},
		"subsystemDeviceID":               {StringValue: ptr.To("1454")},
		"class":                           {StringValue: ptr.To("030000")},
		"iommuGroup":                      {IntValue: ptr.To[int64](2)},
		"iommuGroupSize":                  {IntValue: ptr.To[int64](2)},
		"driver":                          {StringValue: ptr.To("nvidia")},
	}
	if diff := cmp.Diff(want, devs.Devices[0].Attributes); diff != "" {
		t.Errorf("GPU attributes (-want +got):\n%s", diff)
	}
	vf := devs.Devices[6].Attributes
	if vf["sriovPhysFn"].StringValue == nil || *vf["sriovPhysFn"].StringValue != "0000:81:00.0" {
		t.Errorf("VF sriovPhysFn = %v, want 0000:81:00.0", vf["sriovPhysFn"])
	}
	if *vf["resource.kubernetes.io/numaNode"].IntValue != 1 || *vf["resource.kubernetes.io/pcieRoot"].StringValue != "pci0000:80" {
		t.Errorf("VF topology attributes wrong: %v", vf)
	}
}

func TestBuildNoDevices(t *testing.T) {
	res := resources.Build(nodeName, &inventory.Inventory{})
	if s := res.Pools[nodeName].Slices; len(s) != 1 || len(s[0].Devices) != 0 {
		t.Errorf("want one empty slice, got %+v", s)
	}
}

// TestBuildLimits: 1,024 functions, a third of them in two-device groups,
// must respect every per-slice limit of the API and lose no device.
func TestBuildLimits(t *testing.T) {
	inv := &inventory.Inventory{}
	groups := map[int]int{}
	for i := range 1024 {
		a := pci.Address{Bus: uint8(i / 32), Device: uint8(i % 32)}
		group := i
		if i%3 == 0 && i+1 < 1024 {
			group = i + 1 // pairs (i, i+1) share a group
		}
		if i%3 == 1 && i > 0 {
			group = i
		}
		groups[group]++
		g := group
		inv.Decisions = append(inv.Decisions, inventory.Decision{
			Device:  &pci.Device{Address: a, Class: 0x020000, IOMMUGroup: &g, NUMANode: -1},
			Offered: true,
		})
	}
	res := resources.Build(nodeName, inv)
	seen := map[string]bool{}
	counterSets := map[string]bool{}
	for i, s := range res.Pools[nodeName].Slices {
		if len(s.Devices) > 0 && len(s.SharedCounters) > 0 {
			t.Errorf("slice %d has devices and counters", i)
		}
		limit := resourceapi.ResourceSliceMaxDevices
		for _, d := range s.Devices {
			if len(d.ConsumesCounters) > 0 {
				limit = resourceapi.ResourceSliceMaxDevicesWithAdvancedFeatures
			}
			if seen[d.Name] {
				t.Errorf("device %s published twice", d.Name)
			}
			seen[d.Name] = true
			if n := len(d.Attributes) + len(d.Capacity); n > resourceapi.ResourceSliceMaxAttributesAndCapacitiesPerDevice {
				t.Errorf("device %s has %d attributes", d.Name, n)
			}
		}
		if len(s.Devices) > limit {
			t.Errorf("slice %d has %d devices, limit %d", i, len(s.Devices), limit)
		}
		if len(s.SharedCounters) > resourceapi.ResourceSliceMaxCounterSets {
			t.Errorf("slice %d has %d counter sets", i, len(s.SharedCounters))
		}
		for _, cs := range s.SharedCounters {
			counterSets[cs.Name] = true
		}
	}
	if len(seen) != 1024 {
		t.Errorf("published %d devices, want 1024", len(seen))
	}
	wantSets := 0
	for _, n := range groups {
		if n > 1 {
			wantSets++
		}
	}
	if len(counterSets) != wantSets {
		t.Errorf("published %d counter sets, want one per shared group (%d)", len(counterSets), wantSets)
	}
}

// allocator runs the scheduler's structured allocator over the published
// slices, with the features a 1.37 scheduler enables by default.
type allocator struct {
	t         *testing.T
	slices    []*resourceapi.ResourceSlice
	allocated sets.Set[structured.DeviceID]
}

func newAllocator(t *testing.T, inv *inventory.Inventory) *allocator {
	a := &allocator{t: t, allocated: sets.New[structured.DeviceID]()}
	for i, s := range resources.Slices(driverName, nodeName, resources.Build(nodeName, inv)) {
		s.Name = fmt.Sprintf("slice-%d", i)
		a.slices = append(a.slices, &s)
	}
	return a
}

type classes map[string]*resourceapi.DeviceClass

func (c classes) List() ([]*resourceapi.DeviceClass, error) {
	var out []*resourceapi.DeviceClass
	for _, dc := range c {
		out = append(out, dc)
	}
	return out, nil
}

func (c classes) Get(name string) (*resourceapi.DeviceClass, error) {
	if dc, ok := c[name]; ok {
		return dc, nil
	}
	return nil, fmt.Errorf("no class %s", name)
}

// allocate allocates claims together, as the scheduler does for one pod,
// and remembers the result as allocated. It returns the devices per claim,
// or nil when the claims cannot be allocated on the node.
func (a *allocator) allocate(claims ...*resourceapi.ResourceClaim) [][]string {
	a.t.Helper()
	ctx := context.Background()
	alloc, err := structured.NewAllocator(ctx,
		structured.Features{AdminAccess: true, PrioritizedList: true, PartitionableDevices: true, DeviceTaints: true,
			DeviceBindingAndStatus: true, ConsumableCapacity: true, FractionalCapacityRange: true},
		structured.AllocatedState{AllocatedDevices: a.allocated},
		classes{className: {ObjectMeta: metav1.ObjectMeta{Name: className}, Spec: resourceapi.DeviceClassSpec{
			Selectors: []resourceapi.DeviceSelector{{CEL: &resourceapi.CELDeviceSelector{Expression: `device.driver == "vfio.dra.dev"`}}},
		}}},
		a.slices, cel.NewCache(10, cel.Features{}))
	if err != nil {
		a.t.Fatal(err)
	}
	results, err := alloc.Allocate(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName}}, claims)
	if err != nil {
		a.t.Fatal(err)
	}
	if results == nil {
		return nil
	}
	var out [][]string
	for _, r := range results {
		var devs []string
		for _, d := range r.Devices.Results {
			a.allocated.Insert(structured.MakeDeviceID(d.Driver, d.Pool, d.Device))
			devs = append(devs, d.Device)
		}
		out = append(out, devs)
	}
	return out
}

func claim(name string, count int64, cel string, constraints ...resourceapi.DeviceConstraint) *resourceapi.ResourceClaim {
	req := &resourceapi.ExactDeviceRequest{
		DeviceClassName: className,
		AllocationMode:  resourceapi.DeviceAllocationModeExactCount,
		Count:           count,
	}
	if cel != "" {
		req.Selectors = []resourceapi.DeviceSelector{{CEL: &resourceapi.CELDeviceSelector{Expression: cel}}}
	}
	return &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name)},
		Spec: resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{
			Requests:    []resourceapi.DeviceRequest{{Name: "dev", Exactly: req}},
			Constraints: constraints,
		}},
	}
}

func attr(name, value string) string {
	return fmt.Sprintf(`device.attributes["vfio.dra.dev"].%s == %s`, name, value)
}

func TestAllocatorNeverSplitsAnIOMMUGroup(t *testing.T) {
	a := newAllocator(t, serverInventory(t))
	gpu := a.allocate(claim("gpu", 1, attr("deviceID", `"2204"`)))
	if diff := cmp.Diff([][]string{{"pci-0000-01-00-0"}}, gpu); diff != "" {
		t.Fatalf("GPU claim (-want +got):\n%s", diff)
	}
	// The audio function shares the GPU's group: no other claim may get it.
	if got := a.allocate(claim("audio", 1, attr("deviceID", `"1aef"`))); got != nil {
		t.Errorf("audio function of an allocated group was allocated to a second claim: %v", got)
	}
	// Nor may anything of group 2 by any other selector.
	if got := a.allocate(claim("group2", 1, attr("iommuGroup", "2"))); got != nil {
		t.Errorf("group 2 member allocated twice: %v", got)
	}
	// Two claims of one pod wanting the two members of the bridge group.
	if got := a.allocate(
		claim("left", 1, `device.attributes["resource.kubernetes.io"].pciBusID == "0000:02:01.0"`),
		claim("right", 1, `device.attributes["resource.kubernetes.io"].pciBusID == "0000:02:02.0"`),
	); got != nil {
		t.Errorf("two members of group 5 allocated to two claims at once: %v", got)
	}
	// Alone, each claim for group 5 works once.
	if got := a.allocate(claim("left", 1, attr("iommuGroup", "5"))); len(got) != 1 {
		t.Fatalf("first claim for group 5 = %v, want one device", got)
	}
	if got := a.allocate(claim("right", 1, attr("iommuGroup", "5"))); got != nil {
		t.Errorf("second claim for group 5 got %v", got)
	}
	// One claim cannot take two members of one group either: the claim
	// that gets a member gets the whole group at prepare.
	if got := a.allocate(claim("both", 2, attr("iommuGroup", "7"))); got != nil {
		t.Errorf("one claim got two members of group 7: %v", got)
	}
}

func TestAllocatorSingletonGroupsAreIndependent(t *testing.T) {
	a := newAllocator(t, serverInventory(t))
	got := a.allocate(
		claim("nfp", 1, attr("vendorID", `"19ee"`)+" && "+attr("deviceID", `"4000"`)),
		claim("fpga", 1, attr("vendorID", `"10ee"`)),
	)
	if diff := cmp.Diff([][]string{{"pci-0000-82-00-0"}, {"pci-0000-84-00-0"}}, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if got := a.allocate(claim("vfs", 2, `device.attributes["vfio.dra.dev"].?sriovPhysFn.orValue("") == "0000:81:00.0"`)); len(got) != 1 || len(got[0]) != 2 {
		t.Errorf("two VFs in their own groups = %v, want both", got)
	}
	if got := a.allocate(claim("again", 1, attr("vendorID", `"19ee"`))); got != nil {
		t.Errorf("allocated device handed out again: %v", got)
	}
}

func TestAllocatorMatchAttribute(t *testing.T) {
	a := newAllocator(t, serverInventory(t))
	// Two network functions on one PCIe root: they must come from two
	// different groups, and 80:xx has only the VFs and the SmartNIC.
	got := a.allocate(claim("pair", 2, `device.attributes["vfio.dra.dev"].class.startsWith("02") && device.attributes["resource.kubernetes.io"].numaNode == 1`,
		resourceapi.DeviceConstraint{MatchAttribute: ptr.To(resourceapi.FullyQualifiedName("resource.kubernetes.io/pcieRoot"))}))
	if len(got) != 1 || len(got[0]) != 2 {
		t.Fatalf("got %v, want two devices", got)
	}
	// numaNode alignment across groups: a GPU and a NIC on node 0.
	got = a.allocate(claim("aligned", 2, attr("class", `"030000"`)+" || "+attr("deviceID", `"1572"`),
		resourceapi.DeviceConstraint{MatchAttribute: ptr.To(resourceapi.FullyQualifiedName("resource.kubernetes.io/numaNode"))}))
	if diff := cmp.Diff([][]string{{"pci-0000-01-00-0", "pci-0000-03-00-0"}}, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// TestBuildTaintsLowerTheSliceLimit: a slice with a tainted device holds at
// most 64 devices, as the API validates, even when no device consumes
// counters.
func TestBuildTaintsLowerTheSliceLimit(t *testing.T) {
	inv := &inventory.Inventory{}
	for i := range 200 {
		g := i
		inv.Decisions = append(inv.Decisions, inventory.Decision{
			Device:  &pci.Device{Address: pci.Address{Bus: uint8(i / 32), Device: uint8(i % 32)}, Class: 0x020000, IOMMUGroup: &g, NUMANode: -1},
			Offered: true,
		})
	}
	taint := []resourceapi.DeviceTaint{{Key: "vfio.dra.dev/no-reset", Effect: resourceapi.DeviceTaintEffectNone}}
	tainted := inv.Decisions[150].Device.Address.DeviceName()
	res := resources.BuildTainted(nodeName, inv, map[string][]resourceapi.DeviceTaint{tainted: taint})
	found := 0
	for i, s := range res.Pools[nodeName].Slices {
		limit := resourceapi.ResourceSliceMaxDevices
		for _, d := range s.Devices {
			if len(d.Taints) > 0 {
				limit = resourceapi.ResourceSliceMaxDevicesWithAdvancedFeatures
				found++
				if d.Name != tainted || !cmp.Equal(d.Taints, taint) {
					t.Errorf("device %s has taints %v", d.Name, d.Taints)
				}
			}
		}
		if len(s.Devices) > limit {
			t.Errorf("slice %d has %d devices, limit %d", i, len(s.Devices), limit)
		}
	}
	if found != 1 {
		t.Errorf("%d tainted devices published, want 1", found)
	}
}

// TestAllocatorSkipsTaintedDevices: the scheduler's allocator does not
// hand out a NoSchedule or NoExecute device, but does hand out one whose
// taint is informational (None).
func TestAllocatorSkipsTaintedDevices(t *testing.T) {
	inv := serverInventory(t)
	for _, tc := range []struct {
		effect resourceapi.DeviceTaintEffect
		want   [][]string
	}{
		{resourceapi.DeviceTaintEffectNoSchedule, nil},
		{resourceapi.DeviceTaintEffectNoExecute, nil},
		{resourceapi.DeviceTaintEffectNone, [][]string{{"pci-0000-82-00-0"}}},
	} {
		t.Run(string(tc.effect), func(t *testing.T) {
			a := &allocator{t: t, allocated: sets.New[structured.DeviceID]()}
			res := resources.BuildTainted(nodeName, inv, map[string][]resourceapi.DeviceTaint{
				"pci-0000-82-00-0": {{Key: "vfio.dra.dev/unhealthy", Value: "off-bus", Effect: tc.effect}},
			})
			for i, s := range resources.Slices(driverName, nodeName, res) {
				s.Name = fmt.Sprintf("slice-%d", i)
				a.slices = append(a.slices, &s)
			}
			if diff := cmp.Diff(tc.want, a.allocate(claim("nfp", 1, attr("vendorID", `"19ee"`)))); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}
