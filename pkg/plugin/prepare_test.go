package plugin_test

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/dynamic-resource-allocation/api/metadata"
	"k8s.io/dynamic-resource-allocation/deviceattribute"
	"k8s.io/klog/v2/ktesting"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview/hostviewtest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/plugin"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

const (
	fromClass = resourceapi.AllocationConfigSourceClass
	fromClaim = resourceapi.AllocationConfigSourceClaim
)

// preparedDevice is the part of a drapb.Device that a test compares.
type preparedDevice struct {
	Requests     []string
	Pool, Device string
	CDIDeviceIDs []string
}

func preparedDevices(devs []*drapb.Device) []preparedDevice {
	var out []preparedDevice
	for _, d := range devs {
		out = append(out, preparedDevice{Requests: d.RequestNames, Pool: d.PoolName, Device: d.DeviceName, CDIDeviceIDs: d.CdiDeviceIds})
	}
	return out
}

func baseRequest(request string) string {
	base, _, _ := strings.Cut(request, "/")
	return base
}

// wantDevices is what NodePrepareResources must return for results: one
// device each, with the driver's CDI device and, on the first device of
// each request, the helper's KEP-5304 metadata device.
func wantDevices(claim *resourceapi.ResourceClaim, results []resourceapi.DeviceRequestAllocationResult) []preparedDevice {
	var out []preparedDevice
	seen := sets.New[string]()
	for _, r := range results {
		req := baseRequest(r.Request)
		ids := []string{"k8s.vfio.dra.dev/vfio=" + string(claim.UID) + "-" + r.Device}
		if !seen.Has(req) {
			seen.Insert(req)
			ids = append(ids, "vfio.dra.dev/metadata="+string(claim.UID)+"_"+req)
		}
		out = append(out, preparedDevice{Requests: []string{req}, Pool: nodeName, Device: r.Device, CDIDeviceIDs: ids})
	}
	return out
}

func allCDIIDs(devs []*drapb.Device) []string {
	var ids []string
	for _, d := range devs {
		ids = append(ids, d.CdiDeviceIds...)
	}
	return ids
}

// checkMetadata checks the KEP-5304 metadata the container gets for each
// request: a mount of the metadata file that names every device of the
// request with its pciBusID and IOMMU group.
func (n *node) checkMetadata(t *testing.T, claim *resourceapi.ResourceClaim, results []resourceapi.DeviceRequestAllocationResult, groups []int, mounts map[string]string) {
	t.Helper()
	byRequest := map[string][]int{}
	for i, r := range results {
		byRequest[baseRequest(r.Request)] = append(byRequest[baseRequest(r.Request)], i)
	}
	for req, idx := range byRequest {
		if !exists(t, n.metadataSpecFile(claim, req)) {
			t.Errorf("request %s: no metadata spec %s", req, n.metadataSpecFile(claim, req))
		}
		dest := metadata.ResourceClaimFilePath(plugin.DefaultDriverName, claim.Name, req)
		src, ok := mounts[dest]
		if !ok {
			t.Errorf("request %s: the container gets no metadata file at %s; mounts %v", req, dest, mounts)
			continue
		}
		md := readMetadata(t, src)
		if md.Name != claim.Name || md.UID != claim.UID || len(md.Requests) != 1 || baseRequest(md.Requests[0].Name) != req {
			t.Errorf("request %s: metadata is for %s/%s %v", req, md.Name, md.UID, md.Requests)
			continue
		}
		var got, want []string
		for _, d := range md.Requests[0].Devices {
			var bus string
			var group int64 = -1
			if a, ok := d.Attributes[deviceattribute.StandardDeviceAttributePCIBusID]; ok && a.StringValue != nil {
				bus = *a.StringValue
			}
			if a, ok := d.Attributes["iommuGroup"]; ok && a.IntValue != nil {
				group = *a.IntValue
			}
			got = append(got, strings.Join([]string{d.Driver, d.Pool, d.Name, bus, strconv.FormatInt(group, 10)}, " "))
		}
		for _, i := range idx {
			a, err := pci.ParseDeviceName(results[i].Device)
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, strings.Join([]string{plugin.DefaultDriverName, nodeName, results[i].Device, a.String(), strconv.Itoa(groups[i])}, " "))
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("request %s: metadata devices (driver pool name pciBusID iommuGroup) (-want +got):\n%s", req, diff)
		}
	}
}

func TestPrepareUnprepare(t *testing.T) {
	t.Parallel()
	const (
		gpu        = "0000:01:00.0"
		gpuAudio   = "0000:01:00.1"
		bridge     = "0000:00:1e.0"
		e1000a     = "0000:02:01.0"
		e1000b     = "0000:02:02.0"
		vf2        = "0000:81:00.2"
		vf3        = "0000:81:00.3"
		smartNIC   = "0000:82:00.0"
		fpga       = "0000:84:00.0"
		vfioPCI    = "vfio-pci"
		mlx5Vfio   = "mlx5_vfio_pci"
		legacyNode = "/dev/vfio/vfio"
	)
	for _, tc := range []struct {
		name    string
		setup   func(t *testing.T, n *node)
		results []resourceapi.DeviceRequestAllocationResult
		config  []resourceapi.DeviceAllocationConfiguration
		// groups are the IOMMU groups of results.
		groups []int
		// bound are drivers that functions have while the claim is prepared.
		bound map[string]string
		// nodes are the container paths of the injected device nodes.
		nodes []string
		// env are injected variables.
		env map[string]string
		// kept are functions whose state after unprepare is not the one
		// before prepare; every other function is as it was.
		kept map[string]fnState
		// untouched are functions that get no sysfs write at all.
		untouched []string
	}{
		{
			name:    "single-device group",
			results: []resourceapi.DeviceRequestAllocationResult{result("nic", smartNIC)},
			groups:  []int{25},
			bound:   map[string]string{smartNIC: vfioPCI},
			nodes:   []string{"/dev/vfio/25", legacyNode},
			env: map[string]string{
				"VFIO_PCI_ADDRESSES": smartNIC, "VFIO_IOMMU_GROUPS": "25",
				"VFIO_PCI_ADDRESSES_NIC": smartNIC, "VFIO_IOMMU_GROUPS_NIC": "25",
				"VFIO_IOMMU_GROUP_25": smartNIC,
			},
		},
		{
			name:    "GPU and its audio function share a group",
			results: []resourceapi.DeviceRequestAllocationResult{result("gpu", gpu)},
			groups:  []int{2},
			bound:   map[string]string{gpu: vfioPCI, gpuAudio: vfioPCI},
			nodes:   []string{"/dev/vfio/2", legacyNode},
			env: map[string]string{
				"VFIO_PCI_ADDRESSES": gpu, "VFIO_IOMMU_GROUPS": "2",
				"VFIO_PCI_ADDRESSES_GPU": gpu, "VFIO_IOMMU_GROUPS_GPU": "2",
				"VFIO_IOMMU_GROUP_2": gpu + "," + gpuAudio,
			},
		},
		{
			name:      "endpoints behind a PCI bridge, which stays as it is",
			results:   []resourceapi.DeviceRequestAllocationResult{result("nic", e1000b)},
			groups:    []int{5},
			bound:     map[string]string{e1000a: vfioPCI, e1000b: vfioPCI, bridge: ""},
			nodes:     []string{"/dev/vfio/5", legacyNode},
			env:       map[string]string{"VFIO_PCI_ADDRESSES": e1000b, "VFIO_IOMMU_GROUP_5": e1000a + "," + e1000b},
			untouched: []string{bridge},
		},
		{
			name:    "device already on vfio-pci and device without driver",
			results: []resourceapi.DeviceRequestAllocationResult{result("vf", vf3), result("fpga", fpga)},
			groups:  []int{23, 27},
			bound:   map[string]string{vf3: vfioPCI, fpga: vfioPCI},
			nodes:   []string{"/dev/vfio/23", "/dev/vfio/27", legacyNode},
			env: map[string]string{
				"VFIO_PCI_ADDRESSES": vf3 + "," + fpga, "VFIO_IOMMU_GROUPS": "23,27",
				"VFIO_PCI_ADDRESSES_VF": vf3, "VFIO_PCI_ADDRESSES_FPGA": fpga,
				"VFIO_IOMMU_GROUP_23": vf3, "VFIO_IOMMU_GROUP_27": fpga,
			},
			untouched: []string{vf3},
		},
		{
			name:    "two devices of one request",
			results: []resourceapi.DeviceRequestAllocationResult{result("nics", smartNIC), result("nics", fpga)},
			groups:  []int{25, 27},
			bound:   map[string]string{smartNIC: vfioPCI, fpga: vfioPCI},
			nodes:   []string{"/dev/vfio/25", "/dev/vfio/27", legacyNode},
			env: map[string]string{
				"VFIO_PCI_ADDRESSES_NICS": smartNIC + "," + fpga, "VFIO_IOMMU_GROUPS_NICS": "25,27",
			},
		},
		{
			name:    "subrequest of a prioritized list",
			results: []resourceapi.DeviceRequestAllocationResult{result("nic/smartnic", smartNIC)},
			groups:  []int{25},
			bound:   map[string]string{smartNIC: vfioPCI},
			nodes:   []string{"/dev/vfio/25", legacyNode},
			// The container refers to the request, not to the subrequest.
			env: map[string]string{"VFIO_PCI_ADDRESSES_NIC": smartNIC, "VFIO_IOMMU_GROUPS_NIC": "25"},
		},
		{
			name:    "class config restoreDriver false keeps the group on vfio-pci",
			results: []resourceapi.DeviceRequestAllocationResult{result("nic", smartNIC)},
			config:  []resourceapi.DeviceAllocationConfiguration{opaque(fromClass, vfioConfig(`"restoreDriver": false`))},
			groups:  []int{25},
			bound:   map[string]string{smartNIC: vfioPCI},
			nodes:   []string{"/dev/vfio/25", legacyNode},
			kept:    map[string]fnState{smartNIC: {Driver: vfioPCI, Override: vfioPCI}},
		},
		{
			name:    "class config for one request only",
			results: []resourceapi.DeviceRequestAllocationResult{result("keep", smartNIC), result("give", fpga)},
			config:  []resourceapi.DeviceAllocationConfiguration{opaque(fromClass, vfioConfig(`"restoreDriver": false`), "keep")},
			groups:  []int{25, 27},
			bound:   map[string]string{smartNIC: vfioPCI, fpga: vfioPCI},
			nodes:   []string{"/dev/vfio/25", "/dev/vfio/27", legacyNode},
			kept:    map[string]fnState{smartNIC: {Driver: vfioPCI, Override: vfioPCI}},
		},
		{
			name: "class config selects a vfio variant driver",
			setup: func(t *testing.T, n *node) {
				if err := n.tree.AddDriver(mlx5Vfio); err != nil {
					t.Fatal(err)
				}
			},
			results: []resourceapi.DeviceRequestAllocationResult{result("vf", vf2)},
			config:  []resourceapi.DeviceAllocationConfiguration{opaque(fromClass, vfioConfig(`"driver": "mlx5_vfio_pci"`))},
			groups:  []int{22},
			bound:   map[string]string{vf2: mlx5Vfio},
			nodes:   []string{"/dev/vfio/22", legacyNode},
			env:     map[string]string{"VFIO_PCI_ADDRESSES_VF": vf2, "VFIO_IOMMU_GROUP_22": vf2},
		},
		{
			name:    "iommufd from the claim",
			setup:   func(t *testing.T, n *node) { n.mknodIOMMU(t) },
			results: []resourceapi.DeviceRequestAllocationResult{result("nic", smartNIC)},
			config:  []resourceapi.DeviceAllocationConfiguration{opaque(fromClaim, vfioConfig(`"iommufd": true`))},
			groups:  []int{25},
			bound:   map[string]string{smartNIC: vfioPCI},
			// The emulator numbers VFIO device cdevs from 0; vfio0 is
			// 81:00.3's, which is on vfio-pci from the start.
			nodes: []string{"/dev/iommu", "/dev/vfio/devices/vfio1"},
			env:   map[string]string{"VFIO_PCI_ADDRESSES": smartNIC, "VFIO_IOMMU_GROUP_25": smartNIC},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, ctx := ktesting.NewTestContext(t)
			n := newNode(t)
			if tc.setup != nil {
				tc.setup(t, n)
			}
			n.start(ctx, t)
			before := n.state(t)
			claim := n.createClaim(ctx, t, "claim", tc.results, tc.config...)

			devs := n.mustPrepare(ctx, t, claim)
			if diff := cmp.Diff(wantDevices(claim, tc.results), preparedDevices(devs)); diff != "" {
				t.Errorf("prepared devices (-want +got):\n%s", diff)
			}
			for addr, drv := range tc.bound {
				if got := n.driverOf(t, addr); got != drv {
					t.Errorf("after prepare %s is on %q, want %q", addr, got, drv)
				}
			}
			if c := n.checkpoint(t).Claims[string(claim.UID)]; c == nil || c.State != checkpoint.PrepareCompleted {
				t.Errorf("checkpoint has claim %+v, want it PrepareCompleted", c)
			}
			if !exists(t, n.specFile(claim)) {
				t.Errorf("no CDI spec %s", n.specFile(claim))
			}

			spec := n.inject(t, allCDIIDs(devs))
			if diff := cmp.Diff(tc.nodes, n.devicePaths(t, spec)); diff != "" {
				t.Errorf("injected device nodes (-want +got):\n%s", diff)
			}
			env := envOf(spec)
			for k, v := range tc.env {
				if env[k] != v {
					t.Errorf("injected %s=%q, want %q", k, env[k], v)
				}
			}
			mounts := map[string]string{}
			for _, m := range spec.Mounts {
				mounts[m.Destination] = m.Source
			}
			n.checkMetadata(t, claim, tc.results, tc.groups, mounts)

			n.mustUnprepare(ctx, t, claimRef(claim))
			want := before
			for addr, st := range tc.kept {
				want[addr] = st
			}
			if diff := cmp.Diff(want, n.state(t)); diff != "" {
				t.Errorf("after unprepare (-want +got):\n%s", diff)
			}
			if files := n.cdiFilesOf(t, claim); len(files) > 0 {
				t.Errorf("CDI specs left after unprepare: %v", files)
			}
			if c := n.checkpoint(t).Claims[string(claim.UID)]; c != nil {
				t.Errorf("checkpoint still has the claim after unprepare: %+v", c)
			}
			for _, addr := range tc.untouched {
				if w := writesFor(n.kernel.Writes(), addr); len(w) > 0 {
					t.Errorf("%s got sysfs writes: %q", addr, w)
				}
			}
		})
	}
}

func TestPrepareFailureChangesNothing(t *testing.T) {
	t.Parallel()
	const (
		gpu      = "0000:01:00.0"
		gpuAudio = "0000:01:00.1"
		vf2      = "0000:81:00.2"
		smartNIC = "0000:82:00.0"
		nvme     = "0000:83:00.0"
		fpga     = "0000:84:00.0"
	)
	for _, tc := range []struct {
		name    string
		setup   func(t *testing.T, n *node)
		results []resourceapi.DeviceRequestAllocationResult
		config  []resourceapi.DeviceAllocationConfiguration
		// wantErr are parts of the claim's error.
		wantErr []string
		// noWrites: the failure is found before sysfs is written.
		noWrites bool
		// retry: the same prepare succeeds once the fault is gone.
		retry bool
	}{
		{
			name: "unbind fails half way through a group",
			setup: func(t *testing.T, n *node) {
				n.kernel.FailNext(pcitest.OpUnbind, gpuAudio, syscall.EBUSY)
			},
			results: []resourceapi.DeviceRequestAllocationResult{result("gpu", gpu)},
			wantErr: []string{"pci-0000-01-00-0", gpuAudio, vfio.StepUnbind, syscall.EBUSY.Error()},
			retry:   true,
		},
		{
			name: "second group fails and the first has restoreDriver false",
			setup: func(t *testing.T, n *node) {
				n.kernel.FailNext(pcitest.OpProbe, fpga, syscall.EIO)
			},
			results: []resourceapi.DeviceRequestAllocationResult{result("nic", smartNIC), result("fpga", fpga)},
			config:  []resourceapi.DeviceAllocationConfiguration{opaque(fromClass, vfioConfig(`"restoreDriver": false`))},
			wantErr: []string{"pci-0000-84-00-0", vfio.StepProbe, syscall.EIO.Error()},
			retry:   true,
		},
		{
			name:     "malformed config",
			results:  []resourceapi.DeviceRequestAllocationResult{result("nic", smartNIC)},
			config:   []resourceapi.DeviceAllocationConfiguration{opaque(fromClaim, vfioConfig(`"iommuFD": true, "bogus": 1`))},
			wantErr:  []string{"config[0]", `unknown field "bogus"`},
			noWrites: true,
		},
		{
			name:     "claim config sets driver",
			results:  []resourceapi.DeviceRequestAllocationResult{result("nic", smartNIC)},
			config:   []resourceapi.DeviceAllocationConfiguration{opaque(fromClaim, vfioConfig(`"driver": "vfio-pci"`))},
			wantErr:  []string{"driver: Forbidden", "only a DeviceClass may set this"},
			noWrites: true,
		},
		{
			name:    "claim config sets restoreDriver",
			results: []resourceapi.DeviceRequestAllocationResult{result("nic", smartNIC)},
			config: []resourceapi.DeviceAllocationConfiguration{
				opaque(fromClass, vfioConfig(`"restoreDriver": true`)),
				opaque(fromClaim, vfioConfig(`"restoreDriver": false`)),
			},
			wantErr:  []string{"config[1]", "restoreDriver: Forbidden"},
			noWrites: true,
		},
		{
			name:     "iommufd without /dev/iommu",
			results:  []resourceapi.DeviceRequestAllocationResult{result("nic", smartNIC)},
			config:   []resourceapi.DeviceAllocationConfiguration{opaque(fromClaim, vfioConfig(`"iommufd": true`))},
			wantErr:  []string{"pci-0000-82-00-0", "iommufd", "/dev/iommu"},
			noWrites: true,
		},
		{
			name:     "variant driver not loaded",
			results:  []resourceapi.DeviceRequestAllocationResult{result("vf", vf2)},
			config:   []resourceapi.DeviceAllocationConfiguration{opaque(fromClass, vfioConfig(`"driver": "mlx5_vfio_pci"`))},
			wantErr:  []string{"pci-0000-81-00-2", "mlx5_vfio_pci", vfio.ErrDriverNotLoaded.Error()},
			noWrites: true,
		},
		{
			name:     "host driver configured",
			results:  []resourceapi.DeviceRequestAllocationResult{result("nic", smartNIC)},
			config:   []resourceapi.DeviceAllocationConfiguration{opaque(fromClass, vfioConfig(`"driver": "nfp"`))},
			wantErr:  []string{"pci-0000-82-00-0", `driver "nfp"`, vfio.ErrNotVFIODriver.Error()},
			noWrites: true,
		},
		{
			name: "function mounted since the last scan",
			setup: func(t *testing.T, n *node) {
				must(t, n.host.AddDisk(hostviewtest.Disk{Name: "nvme0n1", Function: nvme, Under: "nvme/nvme0", Major: 259, Minor: 0, Partitions: 1}))
				must(t, n.host.AddMount(hostviewtest.Mount{Major: 259, Minor: 1, MountPoint: "/var/lib/images", FSType: "xfs", Source: "/dev/nvme0n1p1"}))
			},
			results:  []resourceapi.DeviceRequestAllocationResult{result("disk", nvme)},
			wantErr:  []string{"pci-0000-83-00-0", "in use: /var/lib/images (nvme0n1p1)"},
			noWrites: true,
		},
		{
			name: "group opened by another process since the last scan",
			setup: func(t *testing.T, n *node) {
				// The kernel keeps the group while a process holds it.
				must(t, n.host.AddVFIOGroup(27))
				must(t, n.host.AddProcess(4242, "qemu-system-x86", "/dev/null", "/dev/vfio/vfio", "/dev/vfio/27"))
			},
			results:  []resourceapi.DeviceRequestAllocationResult{result("nic", smartNIC), result("fpga", fpga)},
			wantErr:  []string{"pci-0000-84-00-0", "in use: held by pid 4242 (qemu-system-x86) through /dev/vfio/27"},
			noWrites: true,
		},
		{
			name: "host view unreadable at prepare",
			setup: func(t *testing.T, n *node) {
				must(t, os.Remove(filepath.Join(n.cfg.ProcRoot, "1", "mountinfo")))
			},
			results:  []resourceapi.DeviceRequestAllocationResult{result("nic", smartNIC)},
			wantErr:  []string{"pci-0000-82-00-0", "host view", "mountinfo"},
			noWrites: true,
		},
		{
			name: "device of another node",
			results: []resourceapi.DeviceRequestAllocationResult{{
				Request: "nic", Driver: plugin.DefaultDriverName, Pool: "node-b", Device: "pci-0000-82-00-0",
			}},
			wantErr:  []string{"pci-0000-82-00-0", `pool "node-b"`},
			noWrites: true,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, ctx := ktesting.NewTestContext(t)
			n := newNode(t)
			n.start(ctx, t)
			before := n.state(t)
			claim := n.createClaim(ctx, t, "claim", tc.results, tc.config...)
			if tc.setup != nil {
				tc.setup(t, n)
			}
			from := len(n.kernel.Writes())

			r := n.prepare(ctx, t, claim)
			if r.Error == "" {
				t.Fatalf("prepare succeeded with devices %v", r.Devices)
			}
			for _, want := range append([]string{"prepare ResourceClaim default/claim"}, tc.wantErr...) {
				if !strings.Contains(r.Error, want) {
					t.Errorf("error %q does not mention %q", r.Error, want)
				}
			}
			if len(r.Devices) > 0 {
				t.Errorf("failed prepare returned devices %v", r.Devices)
			}
			if diff := cmp.Diff(before, n.state(t)); diff != "" {
				t.Errorf("node changed (-before +after):\n%s", diff)
			}
			if w := n.writesSince(from); tc.noWrites && len(w) > 0 {
				t.Errorf("sysfs writes: %q", w)
			}
			if files := n.cdiFilesOf(t, claim); len(files) > 0 {
				t.Errorf("CDI specs of a failed claim: %v", files)
			}
			if c := n.checkpoint(t).Claims[string(claim.UID)]; c != nil {
				t.Errorf("checkpoint has the failed claim: %+v", c)
			}

			if tc.retry {
				// Nothing of the failed attempt is in the way.
				n.mustPrepare(ctx, t, claim)
				n.mustUnprepare(ctx, t, claimRef(claim))
			}
		})
	}
}

func TestRepeatedCalls(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.start(ctx, t)
	claim := n.createClaim(ctx, t, "claim", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.0")})

	first := n.mustPrepare(ctx, t, claim)
	writes := len(n.kernel.Writes())
	again := n.mustPrepare(ctx, t, claim)
	if diff := cmp.Diff(preparedDevices(first), preparedDevices(again)); diff != "" {
		t.Errorf("second prepare returned other devices (-first +second):\n%s", diff)
	}
	if w := n.writesSince(writes); len(w) > 0 {
		t.Errorf("second prepare wrote to sysfs: %q", w)
	}

	// A spec that went missing (/var/run/cdi emptied) is written again.
	if err := os.Remove(n.specFile(claim)); err != nil {
		t.Fatal(err)
	}
	third := n.mustPrepare(ctx, t, claim)
	if diff := cmp.Diff(preparedDevices(first), preparedDevices(third)); diff != "" {
		t.Errorf("prepare after the CDI spec vanished returned other devices (-first +third):\n%s", diff)
	}
	if !exists(t, n.specFile(claim)) {
		t.Errorf("prepare did not write the missing CDI spec again")
	}
	if w := n.writesSince(writes); len(w) > 0 {
		t.Errorf("prepare after the CDI spec vanished wrote to sysfs: %q", w)
	}
	n.inject(t, allCDIIDs(third))

	n.mustUnprepare(ctx, t, claimRef(claim))
	writes = len(n.kernel.Writes())
	if got := n.driverOf(t, "0000:01:00.0"); got != "nvidia" {
		t.Fatalf("GPU on %q after unprepare, want nvidia", got)
	}
	n.mustUnprepare(ctx, t, claimRef(claim))
	if w := n.writesSince(writes); len(w) > 0 {
		t.Errorf("second unprepare wrote to sysfs: %q", w)
	}
	// The kubelet may unprepare a claim this plugin never saw.
	n.mustUnprepare(ctx, t, &drapb.Claim{Namespace: claimNamespace, Name: "unknown", Uid: "uid-unknown"})
	if w := n.writesSince(writes); len(w) > 0 {
		t.Errorf("unpreparing an unknown claim wrote to sysfs: %q", w)
	}
}

// TestRestart: a new plugin process unprepares what the old one prepared,
// from its checkpoint alone.
func TestRestart(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.start(ctx, t)
	before := n.state(t)
	claim := n.createClaim(ctx, t, "claim", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.0")})
	first := n.mustPrepare(ctx, t, claim)
	n.driver.Stop()

	n.start(ctx, t)
	writes := len(n.kernel.Writes())
	again := n.mustPrepare(ctx, t, claim)
	if diff := cmp.Diff(preparedDevices(first), preparedDevices(again)); diff != "" {
		t.Errorf("prepare after restart returned other devices (-before +after restart):\n%s", diff)
	}
	if w := n.writesSince(writes); len(w) > 0 {
		t.Errorf("prepare after restart wrote to sysfs: %q", w)
	}
	n.driver.Stop()

	n.start(ctx, t)
	// The claim is gone from the API server by now: unprepare has only
	// the checkpoint.
	if err := n.client.ResourceV1().ResourceClaims(claimNamespace).Delete(ctx, claim.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	n.mustUnprepare(ctx, t, claimRef(claim))
	if diff := cmp.Diff(before, n.state(t)); diff != "" {
		t.Errorf("after unprepare in a new process (-before prepare +now):\n%s", diff)
	}
	if files := n.cdiFilesOf(t, claim); len(files) > 0 {
		t.Errorf("CDI specs left after unprepare: %v", files)
	}
	if c := n.checkpoint(t).Claims[string(claim.UID)]; c != nil {
		t.Errorf("checkpoint still has the claim: %+v", c)
	}
}

func TestStartForgetsClaimsOfOtherBoots(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.start(ctx, t)
	claim := n.createClaim(ctx, t, "claim", []resourceapi.DeviceRequestAllocationResult{result("nic", "0000:82:00.0")})
	n.mustPrepare(ctx, t, claim)
	n.driver.Stop()
	if !exists(t, n.metadataSpecFile(claim, "nic")) {
		t.Fatal("the helper wrote no device metadata spec; the test cannot check it is removed")
	}

	bootID := filepath.Join(n.cfg.ProcRoot, "sys/kernel/random/boot_id")
	if err := os.Chmod(bootID, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bootID, []byte("boot-2\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	n.start(ctx, t)
	cp := n.checkpoint(t)
	if cp.BootID != "boot-2" || len(cp.Claims) > 0 {
		t.Errorf("checkpoint after a reboot: boot ID %q, claims %v; want boot-2 and none", cp.BootID, cp.Claims)
	}
	if exists(t, n.specFile(claim)) {
		t.Errorf("the CDI spec of a claim from another boot is still there")
	}
	if exists(t, n.metadataSpecFile(claim, "nic")) {
		t.Errorf("the device metadata spec of a claim from another boot is still there")
	}
	// A reboot reset every binding, so there is nothing to undo: the
	// emulator still shows the binding, and unprepare must leave it alone.
	writes := len(n.kernel.Writes())
	n.mustUnprepare(ctx, t, claimRef(claim))
	if w := n.writesSince(writes); len(w) > 0 {
		t.Errorf("unprepare of a forgotten claim wrote to sysfs: %q", w)
	}
}

// TestCrashMidPrepare: a plugin crashed after it bound the GPU but before
// the audio function; its checkpoint has the claim in PrepareStarted.
func TestCrashMidPrepare(t *testing.T) {
	t.Parallel()
	const (
		gpu      = "0000:01:00.0"
		gpuAudio = "0000:01:00.1"
	)
	// restoreGPU is what giving the GPU back to nvidia writes.
	restoreGPU := []string{
		"driver_override " + gpu + " nvidia", "unbind " + gpu + " vfio-pci", "probe " + gpu, "driver_override " + gpu + " (null)",
	}
	bindGroup := []string{
		"driver_override " + gpu + " vfio-pci", "unbind " + gpu + " nvidia", "probe " + gpu,
		"driver_override " + gpuAudio + " vfio-pci", "unbind " + gpuAudio + " snd_hda_intel", "probe " + gpuAudio,
	}
	for _, tc := range []struct {
		name string
		// prepare: the kubelet retries prepare, else it unprepares.
		prepare bool
		writes  []string
	}{
		{name: "next prepare rolls back first", prepare: true, writes: append(slices.Clone(restoreGPU), bindGroup...)},
		{name: "unprepare restores", writes: restoreGPU},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, ctx := ktesting.NewTestContext(t)
			n := newNode(t)
			before := n.state(t)
			claim := n.createClaim(ctx, t, "claim", []resourceapi.DeviceRequestAllocationResult{result("gpu", gpu)})

			// What the crashed process did: checkpoint, then bind the
			// first member of the group.
			binder := vfio.NewBinder(n.fs, n.cfg.DevRoot, vfio.Options{Writer: n.kernel})
			members, err := binder.Snapshot([]pci.Address{mustAddr(t, gpu), mustAddr(t, gpuAudio)})
			if err != nil {
				t.Fatal(err)
			}
			group := checkpoint.Group{Number: 2, Target: "vfio-pci", Restore: true}
			for _, m := range members {
				group.Members = append(group.Members, checkpoint.Member(m))
			}
			store := checkpoint.NewStore(filepath.Join(n.cfg.PluginDataDir, "checkpoint.json"))
			if err := store.Update(func(cp *checkpoint.Checkpoint) error {
				cp.BootID = "boot-1"
				cp.Claims[string(claim.UID)] = &checkpoint.Claim{
					Namespace: claim.Namespace, Name: claim.Name, State: checkpoint.PrepareStarted,
					Groups: []checkpoint.Group{group},
					Devices: []checkpoint.Device{{
						Requests: []string{"gpu"}, Pool: nodeName, Device: "pci-0000-01-00-0", PCIAddress: gpu, IOMMUGroup: 2,
					}},
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			// Bind refuses half a group, so make Bind's writes for the
			// GPU by hand.
			for _, w := range []struct{ file, data string }{
				{n.fs.DevicePath(mustAddr(t, gpu), "driver_override"), "vfio-pci"},
				{n.fs.Path(pci.BusDriversDir, "nvidia", "unbind"), gpu},
				{n.fs.Path(pci.DriversProbe), gpu},
			} {
				if err := n.kernel.WriteFile(w.file, []byte(w.data)); err != nil {
					t.Fatal(err)
				}
			}
			if d := n.driverOf(t, gpu); d != "vfio-pci" {
				t.Fatalf("%s on %q after the crashed process's writes, want vfio-pci", gpu, d)
			}
			from := len(n.kernel.Writes())

			n.start(ctx, t)
			if tc.prepare {
				devs := n.mustPrepare(ctx, t, claim)
				if env := envOf(n.inject(t, allCDIIDs(devs))); env["VFIO_IOMMU_GROUP_2"] != gpu+","+gpuAudio {
					t.Errorf("VFIO_IOMMU_GROUP_2=%q after the retried prepare", env["VFIO_IOMMU_GROUP_2"])
				}
				if c := n.checkpoint(t).Claims[string(claim.UID)]; c == nil || c.State != checkpoint.PrepareCompleted {
					t.Errorf("checkpoint has %+v, want the claim PrepareCompleted", c)
				}
			} else {
				n.mustUnprepare(ctx, t, claimRef(claim))
			}
			if diff := cmp.Diff(tc.writes, n.writesSince(from)); diff != "" {
				t.Errorf("sysfs writes (-want +got):\n%s", diff)
			}
			if tc.prepare {
				// The original drivers were recorded again after the
				// rollback, not taken from the half-bound group.
				n.mustUnprepare(ctx, t, claimRef(claim))
			}
			if diff := cmp.Diff(before, n.state(t)); diff != "" {
				t.Errorf("after unprepare (-before the crash +now):\n%s", diff)
			}
			if c := n.checkpoint(t).Claims[string(claim.UID)]; c != nil {
				t.Errorf("checkpoint still has the claim: %+v", c)
			}
		})
	}
}

// TestOverlappingClaims: the scheduler never allocates two members of an
// IOMMU group to different claims (they share a counter); if that happens
// anyway the second prepare fails and the first claim keeps its devices.
func TestOverlappingClaims(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name          string
		first, second string
		group         int
	}{
		{name: "GPU and audio function", first: "0000:01:00.0", second: "0000:01:00.1", group: 2},
		{name: "endpoints behind a PCI bridge", first: "0000:02:01.0", second: "0000:02:02.0", group: 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, ctx := ktesting.NewTestContext(t)
			n := newNode(t)
			n.start(ctx, t)
			before := n.state(t)
			first := n.createClaim(ctx, t, "first", []resourceapi.DeviceRequestAllocationResult{result("dev", tc.first)})
			second := n.createClaim(ctx, t, "second", []resourceapi.DeviceRequestAllocationResult{result("dev", tc.second)})

			devs := n.mustPrepare(ctx, t, first)
			cpBefore := n.checkpoint(t).Claims[string(first.UID)]
			specBefore, err := os.ReadFile(n.specFile(first))
			if err != nil {
				t.Fatal(err)
			}
			bound := n.state(t)
			writes := len(n.kernel.Writes())

			r := n.prepare(ctx, t, second)
			for _, want := range []string{"prepare ResourceClaim default/second", "IOMMU group " + strconv.Itoa(tc.group), "default/first"} {
				if !strings.Contains(r.Error, want) {
					t.Errorf("error %q does not mention %q", r.Error, want)
				}
			}
			// The kubelet unprepares the failed claim; that must not touch
			// the first claim's group either.
			n.mustUnprepare(ctx, t, claimRef(second))

			if w := n.writesSince(writes); len(w) > 0 {
				t.Errorf("sysfs writes: %q", w)
			}
			if diff := cmp.Diff(bound, n.state(t)); diff != "" {
				t.Errorf("bindings changed (-before +after):\n%s", diff)
			}
			if diff := cmp.Diff(cpBefore, n.checkpoint(t).Claims[string(first.UID)]); diff != "" {
				t.Errorf("checkpoint entry of the first claim changed (-before +after):\n%s", diff)
			}
			if specAfter, err := os.ReadFile(n.specFile(first)); err != nil || string(specAfter) != string(specBefore) {
				t.Errorf("CDI spec of the first claim changed: %v\n%s", err, specAfter)
			}
			if c := n.checkpoint(t).Claims[string(second.UID)]; c != nil {
				t.Errorf("checkpoint has the second claim: %+v", c)
			}
			n.inject(t, allCDIIDs(devs))

			n.mustUnprepare(ctx, t, claimRef(first))
			if diff := cmp.Diff(before, n.state(t)); diff != "" {
				t.Errorf("after unprepare (-before +after):\n%s", diff)
			}
		})
	}
}

// TestResyncAfterPrepare: a prepared device is still published with its
// host driver, so that preparing a claim does not change the slices.
func TestResyncAfterPrepare(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.start(ctx, t)
	claim := n.createClaim(ctx, t, "claim", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.0")})
	n.mustPrepare(ctx, t, claim)
	if got := n.driverOf(t, "0000:01:00.0"); got != "vfio-pci" {
		t.Fatalf("GPU is on %q, want vfio-pci", got)
	}

	// The claim's container opens its group: that is no other user.
	must(t, n.host.AddProcess(3100, "virt-launcher", "/dev/vfio/vfio", "/dev/vfio/2"))
	if changed, err := n.driver.Resync(ctx); err != nil || changed {
		t.Errorf("Resync after prepare = %v, %v; want nothing to publish", changed, err)
	}
	want := map[string]string{"pci-0000-01-00-0": "nvidia", "pci-0000-01-00-1": "snd_hda_intel"}
	got := map[string]string{}
	n.publishedSlices(ctx, t, func(slices []resourceapi.ResourceSlice) bool {
		for _, s := range slices {
			for _, dev := range s.Spec.Devices {
				if _, ok := want[dev.Name]; ok {
					got[dev.Name] = *dev.Attributes["driver"].StringValue
				}
			}
		}
		return len(got) == len(want)
	})
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("published driver attribute (-want +got):\n%s", diff)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func mustAddr(t *testing.T, s string) pci.Address {
	t.Helper()
	a, err := pci.ParseAddress(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
