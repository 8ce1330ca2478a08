package resources_test

import (
	"context"
	"fmt"
	"testing"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/dynamic-resource-allocation/cel"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/dynamic-resource-allocation/structured"

	"github.com/vfio-dra/vfio-dra-driver/pkg/benchmark"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/resources"
)

func sriovNode(b *testing.B) (string, *pci.FS) {
	root := b.TempDir()
	if _, err := pcitest.NewSRIOVNode(root, 4, 256); err != nil {
		b.Fatal(err)
	}
	fs, err := pci.NewFS(root)
	if err != nil {
		b.Fatal(err)
	}
	return root, fs
}

// BenchmarkDiscoveryAndBuild1024 reads the 1,024-VF node and builds its
// ResourceSlices, against reading the same files raw. Goal: 1.25x.
func BenchmarkDiscoveryAndBuild1024(b *testing.B) {
	root, fs := sriovNode(b)
	build := func() resourceslice.DriverResources {
		inv, err := inventory.Scan(fs, nil, nil, &inventory.HostUse{})
		if err != nil {
			b.Fatal(err)
		}
		return resources.Build(nodeName, inv)
	}
	res := build()
	if got := len(res.Pools[nodeName].Slices[0].Devices); got == 0 {
		b.Fatal("no devices offered")
	}
	devices := 0
	for _, s := range res.Pools[nodeName].Slices {
		devices += len(s.Devices)
	}
	if devices != 1024 {
		b.Fatalf("%d devices offered, want 1024", devices)
	}
	b.ReportAllocs()
	benchmark.Compare(b, 1.25, func() {
		if _, err := pcitest.ReadRaw(root); err != nil {
			b.Fatal(err)
		}
	}, func() { build() })
}

// BenchmarkAllocatorCounters: the scheduler's structured allocator
// allocating one claim on a node of 512 GPUs with their audio functions
// (1,024 devices, 512 IOMMU group counter sets), against the same devices
// without counters. The selector matches the last GPU only, so every
// device is looked at. Goal: 1.2x.
func BenchmarkAllocatorCounters(b *testing.B) {
	tree, err := pcitest.New(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	var fns []pcitest.Function
	for i := range 512 {
		bus, dev := 1+i/32, i%32
		fns = append(fns,
			pcitest.Function{Address: fmt.Sprintf("0000:%02x:%02x.0", bus, dev), Vendor: 0x10de, Device: 0x2204, Class: 0x030000, Driver: "nvidia", IOMMUGroup: i},
			pcitest.Function{Address: fmt.Sprintf("0000:%02x:%02x.1", bus, dev), Vendor: 0x10de, Device: 0x1aef, Class: 0x040300, Driver: "snd_hda_intel", IOMMUGroup: i},
		)
	}
	if err := tree.Add(fns...); err != nil {
		b.Fatal(err)
	}
	fs, err := pci.NewFS(tree.Root)
	if err != nil {
		b.Fatal(err)
	}
	inv, err := inventory.Scan(fs, nil, nil, &inventory.HostUse{})
	if err != nil {
		b.Fatal(err)
	}
	var with, without []*resourceapi.ResourceSlice
	counterSets := 0
	for i, s := range resources.Slices(driverName, nodeName, resources.Build(nodeName, inv)) {
		s.Name = fmt.Sprintf("slice-%d", i)
		counterSets += len(s.Spec.SharedCounters)
		with = append(with, s.DeepCopy())
		if len(s.Spec.SharedCounters) > 0 {
			continue
		}
		for j := range s.Spec.Devices {
			s.Spec.Devices[j].ConsumesCounters = nil
		}
		without = append(without, &s)
	}
	// The pool without counters has fewer slices.
	for _, s := range without {
		s.Spec.Pool.ResourceSliceCount = int64(len(without))
	}
	if n := len(inv.Offered()); n != 1024 {
		b.Fatalf("%d devices offered, want 1024: %v", n, inv.Decisions[0].Reason)
	}
	if counterSets != 512 {
		b.Fatalf("%d counter sets, want 512", counterSets)
	}
	c := claim("last", 1, attr("iommuGroup", "511")+` && device.attributes["vfio.dra.dev"].class == "030000"`)
	cache := cel.NewCache(10, cel.Features{})
	allocate := func(slices []*resourceapi.ResourceSlice) {
		ctx := context.Background()
		alloc, err := structured.NewAllocator(ctx,
			structured.Features{AdminAccess: true, PrioritizedList: true, PartitionableDevices: true, DeviceTaints: true,
				DeviceBindingAndStatus: true, ConsumableCapacity: true, FractionalCapacityRange: true},
			structured.AllocatedState{AllocatedDevices: sets.New[structured.DeviceID]()},
			classes{className: {ObjectMeta: metav1.ObjectMeta{Name: className}, Spec: resourceapi.DeviceClassSpec{
				Selectors: []resourceapi.DeviceSelector{{CEL: &resourceapi.CELDeviceSelector{Expression: `device.driver == "vfio.dra.dev"`}}},
			}}},
			slices, cache)
		if err != nil {
			b.Fatal(err)
		}
		results, err := alloc.Allocate(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName}}, []*resourceapi.ResourceClaim{c})
		if err != nil || len(results) != 1 || results[0].Devices.Results[0].Device != "pci-0000-10-1f-0" {
			b.Fatalf("allocation %+v, %v; want the last GPU", results, err)
		}
	}
	benchmark.Compare(b, 1.2, func() { allocate(without) }, func() { allocate(with) })
}
