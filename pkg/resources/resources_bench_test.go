package resources_test

import (
	"testing"

	"k8s.io/dynamic-resource-allocation/resourceslice"

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
