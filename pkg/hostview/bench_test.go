package hostview_test

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview"
	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview/hostviewtest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// BenchmarkScanWithHostView scans 1,024 functions with the host view of a
// busy node (2,000 processes, a few VMs holding groups, 200 mounts) and
// reports the time against the scan without it, measured in the same
// iterations.
func BenchmarkScanWithHostView(b *testing.B) {
	const functions, processes = 1024, 2000
	dir := b.TempDir()
	tree, err := pcitest.New(filepath.Join(dir, "sys"))
	if err != nil {
		b.Fatal(err)
	}
	var fns []pcitest.Function
	for i := range functions {
		fns = append(fns, pcitest.Function{
			Address: fmt.Sprintf("0000:%02x:%02x.%x", 1+i/64, (i/8)%8, i%8),
			Vendor:  0x15b3, Device: 0x101e, Class: 0x020000, Driver: "mlx5_core", IOMMUGroup: i,
		})
	}
	if err := tree.Add(fns...); err != nil {
		b.Fatal(err)
	}
	h, err := hostviewtest.New(tree.Root, filepath.Join(dir, "proc"))
	if err != nil {
		b.Fatal(err)
	}
	check := func(err error) {
		if err != nil {
			b.Fatal(err)
		}
	}
	check(h.AddDisk(hostviewtest.Disk{Name: "nvme0n1", Function: fns[0].Address, Under: "nvme/nvme0", Major: 259, Minor: 0, Partitions: 2}))
	check(h.AddStacked(hostviewtest.Stacked{Name: "dm-0", DMName: "vg0-root", Major: 253, Minor: 0, Slaves: []string{"nvme0n1p2"}}))
	check(h.AddMount(hostviewtest.Mount{Major: 253, Minor: 0, MountPoint: "/", FSType: "ext4", Source: "/dev/mapper/vg0-root"}))
	for i := range 200 { // container overlays and volumes
		check(h.AddMount(hostviewtest.Mount{Major: 0, Minor: 100 + i, MountPoint: fmt.Sprintf("/run/containerd/io.containerd.runtime.v2.task/k8s.io/%064d/rootfs", i), FSType: "overlay", Source: "overlay", Optional: []string{"shared:9"}}))
	}
	check(h.AddInterface(hostviewtest.Interface{Name: "ens1f0", Function: fns[1].Address}))
	check(h.AddRoute("ens1f0", netip.MustParsePrefix("0.0.0.0/0"), netip.MustParseAddr("10.0.0.1")))
	check(h.AddRoute("ens1f0", netip.MustParsePrefix("10.0.0.0/16"), netip.Addr{}))
	for pid := 100; pid < 100+processes-2; pid++ {
		targets := []string{"/dev/null", "socket:[1234]", "pipe:[5678]", "/var/log/app.log", "anon_inode:[eventfd]"}
		if pid%200 == 0 {
			targets = append(targets, "/dev/vfio/vfio", fmt.Sprintf("/dev/vfio/%d", pid/200+10))
		}
		check(h.AddProcess(pid, "worker", targets...))
	}
	fs, err := pci.NewFS(tree.Root)
	if err != nil {
		b.Fatal(err)
	}
	reader := hostview.New(h.Sys, h.Proc)

	var without, with time.Duration
	for b.Loop() {
		start := time.Now()
		if _, err := inventory.Scan(fs, nil, nil, &inventory.HostUse{}); err != nil {
			b.Fatal(err)
		}
		mid := time.Now()
		host := reader.Read(hostview.Own{})
		inv, err := inventory.Scan(fs, nil, nil, host)
		if err != nil {
			b.Fatal(err)
		}
		with += time.Since(mid)
		without += mid.Sub(start)
		if host.Unavailable != "" || len(host.InUse) != 2+processes/200 || len(inv.Offered()) != functions-len(host.InUse) {
			b.Fatalf("host view: %d in use (%q), %d offered", len(host.InUse), host.Unavailable, len(inv.Offered()))
		}
	}
	b.ReportMetric(float64(with)/float64(without), "with/without")
	b.ReportMetric(float64(with.Microseconds())/float64(b.N), "µs-with/op")
	b.ReportMetric(float64(without.Microseconds())/float64(b.N), "µs-without/op")
}
