package plugin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	metadatav1beta1 "k8s.io/dynamic-resource-allocation/api/metadata/v1beta1"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"
	"tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/vfio-dra/vfio-dra-driver/pkg/cdispec"
	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/plugin"
)

const claimNamespace = "default"

// node is the demo server (pcitest.Server) behind the kernel emulator, the
// plugin started with plugin.Start, and a gRPC client on its DRA socket, the
// way the kubelet talks to it.
type node struct {
	*env
	kernel *pcitest.Kernel
	fs     *pci.FS
	driver *plugin.Driver
	dra    drapb.DRAPluginClient
}

func newNode(t *testing.T) *node {
	t.Helper()
	return newNodeWith(t, pcitest.DefaultKernelOptions())
}

// newNodeWith is newNode with a kernel that opts describe.
func newNodeWith(t *testing.T, opts pcitest.KernelOptions) *node {
	t.Helper()
	e := newEnv(t)
	// The kernel creates <dev>/vfio/vfio and /dev/vfio/23 (81:00.3 is on
	// vfio-pci already).
	k, err := pcitest.NewKernelWithOptions(e.tree.Root, e.cfg.DevRoot, opts)
	if err != nil {
		t.Fatal(err)
	}
	e.cfg.SysfsWriter = k
	e.cfg.BindTimeout = 2 * time.Second
	fs, err := pci.NewFS(e.tree.Root)
	if err != nil {
		t.Fatal(err)
	}
	return &node{env: e, kernel: k, fs: fs}
}

// start starts the plugin and connects to <PluginDataDir>/dra.sock. The
// plugin is stopped when the test ends; stopping it earlier is fine.
func (n *node) start(ctx context.Context, t *testing.T) {
	t.Helper()
	d, err := plugin.Start(ctx, n.cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(d.Stop)
	conn, err := grpc.NewClient("unix://"+filepath.Join(n.cfg.PluginDataDir, "dra.sock"),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	n.driver, n.dra = d, drapb.NewDRAPluginClient(conn)
}

// result is an allocation result for a device of this node's pool.
func result(request, addr string) resourceapi.DeviceRequestAllocationResult {
	a, err := pci.ParseAddress(addr)
	if err != nil {
		panic(err)
	}
	return resourceapi.DeviceRequestAllocationResult{
		Request: request, Driver: plugin.DefaultDriverName, Pool: nodeName, Device: a.DeviceName(),
	}
}

// opaque is an opaque config of this driver with the given parameters.
func opaque(source resourceapi.AllocationConfigSource, params string, requests ...string) resourceapi.DeviceAllocationConfiguration {
	return resourceapi.DeviceAllocationConfiguration{
		Source:   source,
		Requests: requests,
		DeviceConfiguration: resourceapi.DeviceConfiguration{Opaque: &resourceapi.OpaqueDeviceConfiguration{
			Driver:     plugin.DefaultDriverName,
			Parameters: runtime.RawExtension{Raw: []byte(params)},
		}},
	}
}

// vfioConfig is a VfioConfig with the given fields, e.g. `"iommufd": true`.
func vfioConfig(fields string) string {
	s := `{"apiVersion": "vfio.dra.dev/v1alpha1", "kind": "VfioConfig"`
	if fields != "" {
		s += ", " + fields
	}
	return s + "}"
}

// createClaim stores an allocated ResourceClaim in the fake API server,
// where the helper reads it (UID "uid-<name>").
func (n *node) createClaim(ctx context.Context, t *testing.T, name string, results []resourceapi.DeviceRequestAllocationResult, configs ...resourceapi.DeviceAllocationConfiguration) *resourceapi.ResourceClaim {
	t.Helper()
	claim := &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: claimNamespace, UID: types.UID("uid-" + name)},
		Status: resourceapi.ResourceClaimStatus{Allocation: &resourceapi.AllocationResult{
			Devices: resourceapi.DeviceAllocationResult{Results: results, Config: configs},
		}},
	}
	claim, err := n.client.ResourceV1().ResourceClaims(claimNamespace).Create(ctx, claim, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return claim
}

func claimRef(c *resourceapi.ResourceClaim) *drapb.Claim {
	return &drapb.Claim{Namespace: c.Namespace, Name: c.Name, Uid: string(c.UID)}
}

// prepare calls NodePrepareResources for one claim and returns its answer.
func (n *node) prepare(ctx context.Context, t *testing.T, c *resourceapi.ResourceClaim) *drapb.NodePrepareResourceResponse {
	t.Helper()
	resp, err := n.dra.NodePrepareResources(ctx, &drapb.NodePrepareResourcesRequest{Claims: []*drapb.Claim{claimRef(c)}})
	if err != nil {
		t.Fatalf("NodePrepareResources: %v", err)
	}
	r := resp.Claims[string(c.UID)]
	if r == nil || len(resp.Claims) != 1 {
		t.Fatalf("NodePrepareResources answered %v, want one answer for claim %s", resp.Claims, c.UID)
	}
	return r
}

// mustPrepare is prepare for a claim that must succeed.
func (n *node) mustPrepare(ctx context.Context, t *testing.T, c *resourceapi.ResourceClaim) []*drapb.Device {
	t.Helper()
	r := n.prepare(ctx, t, c)
	if r.Error != "" {
		t.Fatalf("prepare %s: %s", c.Name, r.Error)
	}
	return r.Devices
}

// unprepare calls NodeUnprepareResources for one claim and returns its error.
func (n *node) unprepare(ctx context.Context, t *testing.T, ref *drapb.Claim) string {
	t.Helper()
	resp, err := n.dra.NodeUnprepareResources(ctx, &drapb.NodeUnprepareResourcesRequest{Claims: []*drapb.Claim{ref}})
	if err != nil {
		t.Fatalf("NodeUnprepareResources: %v", err)
	}
	r := resp.Claims[ref.Uid]
	if r == nil || len(resp.Claims) != 1 {
		t.Fatalf("NodeUnprepareResources answered %v, want one answer for claim %s", resp.Claims, ref.Uid)
	}
	return r.Error
}

func (n *node) mustUnprepare(ctx context.Context, t *testing.T, ref *drapb.Claim) {
	t.Helper()
	if msg := n.unprepare(ctx, t, ref); msg != "" {
		t.Fatalf("unprepare %s: %s", ref.Name, msg)
	}
}

// fnState is what sysfs shows of one function's binding.
type fnState struct{ Driver, Override string }

// state returns the binding of every PCI function of the node.
func (n *node) state(t *testing.T) map[string]fnState {
	t.Helper()
	devices, problems, err := n.fs.Scan()
	if err != nil || len(problems) > 0 {
		t.Fatalf("scan sysfs: %v %v", err, problems)
	}
	out := map[string]fnState{}
	for _, d := range devices {
		ov, err := pci.ReadDriverOverride(n.fs.DevicePath(d.Address, "driver_override"))
		if err != nil {
			t.Fatal(err)
		}
		out[d.Address.String()] = fnState{Driver: d.Driver, Override: ov}
	}
	return out
}

func (n *node) driverOf(t *testing.T, addr string) string {
	t.Helper()
	return n.state(t)[addr].Driver
}

// checkpoint reads the plugin's checkpoint file.
func (n *node) checkpoint(t *testing.T) *checkpoint.Checkpoint {
	t.Helper()
	cp, err := checkpoint.NewStore(filepath.Join(n.cfg.PluginDataDir, "checkpoint.json")).Get()
	if err != nil {
		t.Fatal(err)
	}
	return cp
}

// specFile is the driver's CDI spec file of a claim.
func (n *node) specFile(c *resourceapi.ResourceClaim) string {
	return filepath.Join(n.cfg.CDIRoot, cdispec.SpecFileName(plugin.DefaultDriverName, string(c.UID)))
}

// metadataSpecFile is the spec file the helper writes for the KEP-5304
// metadata of one request.
func (n *node) metadataSpecFile(c *resourceapi.ResourceClaim, request string) string {
	return filepath.Join(n.cfg.CDIRoot, plugin.DefaultDriverName+"_metadata_"+string(c.UID)+"_"+request+".json")
}

// cdiFilesOf lists the files in the CDI directory that belong to a claim.
func (n *node) cdiFilesOf(t *testing.T, c *resourceapi.ResourceClaim) []string {
	t.Helper()
	entries, err := os.ReadDir(n.cfg.CDIRoot)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if strings.Contains(e.Name(), string(c.UID)) {
			out = append(out, e.Name())
		}
	}
	return out
}

// writesSince returns the sysfs writes after the first n.
func (n *node) writesSince(from int) []string { return n.kernel.Writes()[from:] }

// writesFor returns the writes that name addr.
func writesFor(writes []string, addr string) []string {
	var out []string
	for _, w := range writes {
		if slices.Contains(strings.Fields(w), addr) {
			out = append(out, w)
		}
	}
	return out
}

// inject does what containerd does with the CDI device IDs of a container:
// a fresh cache on the spec directory, then InjectDevices into an OCI spec.
func (n *node) inject(t *testing.T, ids []string) *oci.Spec {
	t.Helper()
	cache, err := cdi.NewCache(cdi.WithSpecDirs(n.cfg.CDIRoot), cdi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	if errs := cache.GetErrors(); len(errs) > 0 {
		t.Fatalf("the CDI directory has invalid specs: %v", errs)
	}
	spec := &oci.Spec{Process: &oci.Process{}, Linux: &oci.Linux{}}
	unresolved, err := cache.InjectDevices(spec, ids...)
	if err != nil {
		t.Fatalf("InjectDevices(%v): unresolved %v: %v", ids, unresolved, err)
	}
	return spec
}

// devicePaths returns the container paths of the injected device nodes,
// sorted. Each must be the host node below DevRoot with the same number.
func (n *node) devicePaths(t *testing.T, spec *oci.Spec) []string {
	t.Helper()
	var out []string
	for _, d := range spec.Linux.Devices {
		var st unix.Stat_t
		host := filepath.Join(n.cfg.DevRoot, strings.TrimPrefix(d.Path, "/dev/"))
		if err := unix.Stat(host, &st); err != nil {
			t.Errorf("injected device %s: host node: %v", d.Path, err)
		} else if d.Type != "c" || d.Major != int64(unix.Major(st.Rdev)) || d.Minor != int64(unix.Minor(st.Rdev)) {
			t.Errorf("injected device %s is %s %d:%d, host node %s is c %d:%d",
				d.Path, d.Type, d.Major, d.Minor, host, unix.Major(st.Rdev), unix.Minor(st.Rdev))
		}
		out = append(out, d.Path)
	}
	slices.Sort(out)
	return out
}

// envOf returns the injected environment as a map.
func envOf(spec *oci.Spec) map[string]string {
	out := map[string]string{}
	for _, kv := range spec.Process.Env {
		k, v, _ := strings.Cut(kv, "=")
		out[k] = v
	}
	return out
}

// readMetadata reads the first document of a KEP-5304 metadata file (the
// helper writes one document per API version).
func readMetadata(t *testing.T, path string) *metadatav1beta1.DeviceMetadata {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("metadata file: %v", err)
	}
	var md metadatav1beta1.DeviceMetadata
	if err := json.NewDecoder(bytes.NewReader(data)).Decode(&md); err != nil {
		t.Fatalf("metadata file %s: %v", path, err)
	}
	return &md
}

// mknodIOMMU creates <dev>/iommu, the iommufd character device (10:123 on
// Linux).
func (n *node) mknodIOMMU(t *testing.T) {
	t.Helper()
	if err := unix.Mknod(filepath.Join(n.cfg.DevRoot, "iommu"), unix.S_IFCHR|0o666, int(unix.Mkdev(10, 123))); err != nil {
		t.Fatal(err)
	}
}

func exists(t *testing.T, path string) bool {
	t.Helper()
	_, err := os.Lstat(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	return err == nil
}
