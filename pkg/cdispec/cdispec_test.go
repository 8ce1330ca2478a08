package cdispec

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	oci "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"tags.cncf.io/container-device-interface/pkg/cdi"
	specs "tags.cncf.io/container-device-interface/specs-go"
)

const (
	driverName = "vfio.dra.dev"
	uidA       = "4f1c2d3e-0a1b-4c5d-8e9f-a0b1c2d3e4f5"
	uidB       = "9e8d7c6b-5a49-4382-b1a0-f9e8d7c6b5a4"
)

// charDev is a character device node to create below the fake host /dev.
type charDev struct {
	rel          string
	major, minor uint32
}

// Nodes as a host with the legacy VFIO container API and with iommufd has them.
var hostNodes = []charDev{
	{"vfio/vfio", 10, 196},
	{"vfio/42", 511, 3},
	{"vfio/7", 511, 4},
	{"iommu", 10, 123},
	{"vfio/devices/vfio0", 237, 0},
	{"vfio/devices/vfio1", 237, 1},
}

// makeDevRoot creates real character devices below a temp dir, so that the
// CDI library reads their type and numbers the way a runtime does on a host.
func makeDevRoot(t *testing.T) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "dev")
	for _, d := range hostNodes {
		p := filepath.Join(root, d.rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mknod(p, unix.S_IFCHR|0o660, int(unix.Mkdev(d.major, d.minor))); err != nil {
			t.Fatalf("mknod %s (the test needs root or CAP_MKNOD): %v", p, err)
		}
	}
	return root
}

// legacyClaim allocates two devices for two requests: one function of the
// two-function group 42, and the single function of group 7.
func legacyClaim(devRoot string) Claim {
	return Claim{
		UID:         uidA,
		HostDevRoot: devRoot,
		CommonNodes: []string{devRoot + "/vfio/vfio"},
		Devices: []Device{
			{
				Request:    "nic",
				Name:       "pci-0000-3b-00-0",
				PCIAddress: "0000:3b:00.0",
				Group: Group{
					Number:      42,
					Addresses:   []string{"0000:3b:00.1", "0000:3b:00.0"},
					DeviceNodes: []string{devRoot + "/vfio/42"},
				},
			},
			{
				Request:    "accel",
				Name:       "pci-0000-81-00-0",
				PCIAddress: "0000:81:00.0",
				Group: Group{
					Number:      7,
					Addresses:   []string{"0000:81:00.0"},
					DeviceNodes: []string{devRoot + "/vfio/7"},
				},
			},
		},
	}
}

// iommufdClaim allocates both functions of group 42 as separate devices of
// one request, each group exposing one cdev per function.
func iommufdClaim(devRoot string) Claim {
	group := Group{
		Number:      42,
		Addresses:   []string{"0000:3b:00.0", "0000:3b:00.1"},
		DeviceNodes: []string{devRoot + "/vfio/devices/vfio1", devRoot + "/vfio/devices/vfio0"},
	}
	return Claim{
		UID:         uidB,
		HostDevRoot: devRoot,
		CommonNodes: []string{devRoot + "/iommu"},
		Devices: []Device{
			{Request: "ports", Name: "pci-0000-3b-00-1", PCIAddress: "0000:3b:00.1", Group: group},
			{Request: "ports", Name: "pci-0000-3b-00-0", PCIAddress: "0000:3b:00.0", Group: group},
		},
	}
}

func TestSpecContent(t *testing.T) {
	devRoot := "/host/dev"
	spec, ids, err := Spec(driverName, legacyClaim(devRoot))
	if err != nil {
		t.Fatalf("Spec: %v", err)
	}
	want := &specs.Spec{
		Version: "0.5.0", // hostPath needs 0.5.0
		Kind:    "k8s.vfio.dra.dev/vfio",
		ContainerEdits: specs.ContainerEdits{
			Env: []string{
				"VFIO_IOMMU_GROUPS=7,42",
				"VFIO_IOMMU_GROUPS_ACCEL=7",
				"VFIO_IOMMU_GROUPS_NIC=42",
				"VFIO_IOMMU_GROUP_42=0000:3b:00.0,0000:3b:00.1",
				"VFIO_IOMMU_GROUP_7=0000:81:00.0",
				"VFIO_PCI_ADDRESSES=0000:3b:00.0,0000:81:00.0",
				"VFIO_PCI_ADDRESSES_ACCEL=0000:81:00.0",
				"VFIO_PCI_ADDRESSES_NIC=0000:3b:00.0",
			},
			DeviceNodes: []*specs.DeviceNode{{Path: "/dev/vfio/vfio", HostPath: "/host/dev/vfio/vfio", Permissions: "rw"}},
		},
		Devices: []specs.Device{
			{
				Name: uidA + "-pci-0000-3b-00-0",
				ContainerEdits: specs.ContainerEdits{
					DeviceNodes: []*specs.DeviceNode{{Path: "/dev/vfio/42", HostPath: "/host/dev/vfio/42", Permissions: "rw"}},
				},
			},
			{
				Name: uidA + "-pci-0000-81-00-0",
				ContainerEdits: specs.ContainerEdits{
					DeviceNodes: []*specs.DeviceNode{{Path: "/dev/vfio/7", HostPath: "/host/dev/vfio/7", Permissions: "rw"}},
				},
			},
		},
	}
	if diff := cmp.Diff(want, spec); diff != "" {
		t.Errorf("spec (-want +got):\n%s", diff)
	}
	wantIDs := map[string][]string{
		"pci-0000-3b-00-0": {"k8s.vfio.dra.dev/vfio=" + uidA + "-pci-0000-3b-00-0"},
		"pci-0000-81-00-0": {"k8s.vfio.dra.dev/vfio=" + uidA + "-pci-0000-81-00-0"},
	}
	if diff := cmp.Diff(wantIDs, ids); diff != "" {
		t.Errorf("ids (-want +got):\n%s", diff)
	}
}

// wantNode is what the runtime should put into the OCI spec for one node.
type wantNode struct {
	path         string
	major, minor int64
}

// TestSpecDrivers: a group whose functions went to different VFIO drivers
// (driver "auto") tells the container which driver each function got.
func TestSpecDrivers(t *testing.T) {
	c := legacyClaim("/host/dev")
	c.Devices[0].Group.Drivers = map[string]string{"0000:3b:00.1": "mlx5_vfio_pci", "0000:3b:00.0": "vfio-pci"}
	spec, _, err := Spec(driverName, c)
	if err != nil {
		t.Fatal(err)
	}
	want := "VFIO_IOMMU_GROUP_42_DRIVERS=0000:3b:00.0=vfio-pci,0000:3b:00.1=mlx5_vfio_pci"
	if !slices.Contains(spec.ContainerEdits.Env, want) {
		t.Errorf("env %v lacks %s", spec.ContainerEdits.Env, want)
	}
	for _, e := range spec.ContainerEdits.Env {
		if strings.HasPrefix(e, "VFIO_IOMMU_GROUP_7_DRIVERS=") {
			t.Errorf("group 7 names no drivers, but the spec has %s", e)
		}
	}
}

func TestWriteAndInject(t *testing.T) {
	devRoot := makeDevRoot(t)
	tests := map[string]struct {
		claim func(devRoot string) Claim
		// inject lists device names whose IDs the container gets; nil: all.
		inject    []string
		wantNodes []wantNode
		wantEnv   []string
	}{
		"legacy, all devices": {
			claim: legacyClaim,
			wantNodes: []wantNode{
				{"/dev/vfio/42", 511, 3},
				{"/dev/vfio/7", 511, 4},
				{"/dev/vfio/vfio", 10, 196},
			},
			wantEnv: []string{
				"PATH=/usr/bin",
				"VFIO_IOMMU_GROUPS=7,42",
				"VFIO_IOMMU_GROUPS_ACCEL=7",
				"VFIO_IOMMU_GROUPS_NIC=42",
				"VFIO_IOMMU_GROUP_42=0000:3b:00.0,0000:3b:00.1",
				"VFIO_IOMMU_GROUP_7=0000:81:00.0",
				"VFIO_PCI_ADDRESSES=0000:3b:00.0,0000:81:00.0",
				"VFIO_PCI_ADDRESSES_ACCEL=0000:81:00.0",
				"VFIO_PCI_ADDRESSES_NIC=0000:3b:00.0",
			},
		},
		"legacy, one device": {
			claim:  legacyClaim,
			inject: []string{"pci-0000-3b-00-0"},
			wantNodes: []wantNode{
				{"/dev/vfio/42", 511, 3},
				{"/dev/vfio/vfio", 10, 196},
			},
			wantEnv: []string{
				"PATH=/usr/bin",
				"VFIO_IOMMU_GROUPS=7,42",
				"VFIO_IOMMU_GROUPS_ACCEL=7",
				"VFIO_IOMMU_GROUPS_NIC=42",
				"VFIO_IOMMU_GROUP_42=0000:3b:00.0,0000:3b:00.1",
				"VFIO_IOMMU_GROUP_7=0000:81:00.0",
				"VFIO_PCI_ADDRESSES=0000:3b:00.0,0000:81:00.0",
				"VFIO_PCI_ADDRESSES_ACCEL=0000:81:00.0",
				"VFIO_PCI_ADDRESSES_NIC=0000:3b:00.0",
			},
		},
		"iommufd, two functions of one group": {
			claim: iommufdClaim,
			wantNodes: []wantNode{
				{"/dev/iommu", 10, 123},
				{"/dev/vfio/devices/vfio0", 237, 0},
				{"/dev/vfio/devices/vfio1", 237, 1},
			},
			wantEnv: []string{
				"PATH=/usr/bin",
				"VFIO_IOMMU_GROUPS=42",
				"VFIO_IOMMU_GROUPS_PORTS=42",
				"VFIO_IOMMU_GROUP_42=0000:3b:00.0,0000:3b:00.1",
				"VFIO_PCI_ADDRESSES=0000:3b:00.0,0000:3b:00.1",
				"VFIO_PCI_ADDRESSES_PORTS=0000:3b:00.0,0000:3b:00.1",
			},
		},
		"request name that is no env name": {
			claim: func(devRoot string) Claim {
				c := legacyClaim(devRoot)
				c.Devices = c.Devices[:1]
				c.Devices[0].Request = "nic.fast/port-0"
				return c
			},
			wantNodes: []wantNode{
				{"/dev/vfio/42", 511, 3},
				{"/dev/vfio/vfio", 10, 196},
			},
			wantEnv: []string{
				"PATH=/usr/bin",
				"VFIO_IOMMU_GROUPS=42",
				"VFIO_IOMMU_GROUPS_NIC_FAST_PORT_0=42",
				"VFIO_IOMMU_GROUP_42=0000:3b:00.0,0000:3b:00.1",
				"VFIO_PCI_ADDRESSES=0000:3b:00.0",
				"VFIO_PCI_ADDRESSES_NIC_FAST_PORT_0=0000:3b:00.0",
			},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			specDir := filepath.Join(t.TempDir(), "cdi")
			w, err := NewWriter(specDir, driverName)
			if err != nil {
				t.Fatalf("NewWriter: %v", err)
			}
			claim := tc.claim(devRoot)
			specName, ids, err := w.WriteClaim(claim)
			if err != nil {
				t.Fatalf("WriteClaim: %v", err)
			}
			if want := SpecFileName(driverName, claim.UID); specName != want {
				t.Errorf("spec name %q, want %q", specName, want)
			}
			if len(ids) != len(claim.Devices) {
				t.Errorf("got IDs for %d devices, want %d", len(ids), len(claim.Devices))
			}

			var inject []string
			for _, d := range claim.Devices {
				if tc.inject == nil || slices.Contains(tc.inject, d.Name) {
					if len(ids[d.Name]) != 1 {
						t.Fatalf("device %s: IDs %v, want one", d.Name, ids[d.Name])
					}
					inject = append(inject, ids[d.Name]...)
				}
			}
			ociSpec := injectFresh(t, specDir, inject)

			var gotNodes []wantNode
			for _, d := range ociSpec.Linux.Devices {
				if d.Type != "c" {
					t.Errorf("device %s has type %q, want c", d.Path, d.Type)
				}
				gotNodes = append(gotNodes, wantNode{d.Path, d.Major, d.Minor})
			}
			slices.SortFunc(gotNodes, func(a, b wantNode) int { return strings.Compare(a.path, b.path) })
			if diff := cmp.Diff(tc.wantNodes, gotNodes, cmp.AllowUnexported(wantNode{})); diff != "" {
				t.Errorf("OCI device nodes (-want +got):\n%s", diff)
			}

			// The runtime must also allow the cgroup access to every node:
			// read and write, not mknod.
			allowed := map[[2]int64]bool{}
			for _, r := range ociSpec.Linux.Resources.Devices {
				if r.Allow && r.Type == "c" && r.Major != nil && r.Minor != nil {
					if r.Access != "rw" {
						t.Errorf("cgroup rule for %d:%d allows %q, want rw", *r.Major, *r.Minor, r.Access)
					}
					allowed[[2]int64{*r.Major, *r.Minor}] = true
				}
			}
			for _, n := range tc.wantNodes {
				if !allowed[[2]int64{n.major, n.minor}] {
					t.Errorf("no cgroup rule allows %s (%d:%d)", n.path, n.major, n.minor)
				}
			}

			gotEnv := slices.Sorted(slices.Values(ociSpec.Process.Env))
			if diff := cmp.Diff(tc.wantEnv, gotEnv); diff != "" {
				t.Errorf("env (-want +got):\n%s", diff)
			}
		})
	}
}

// injectFresh loads specDir with a new cache, as containerd and CRI-O do,
// and injects the devices into a container's OCI spec.
func injectFresh(t *testing.T, specDir string, ids []string) *oci.Spec {
	t.Helper()
	cache, err := cdi.NewCache(cdi.WithSpecDirs(specDir), cdi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	if errs := cache.GetErrors(); len(errs) != 0 {
		t.Fatalf("the CDI cache rejected specs: %v", errs)
	}
	ociSpec := &oci.Spec{
		Process: &oci.Process{Env: []string{"PATH=/usr/bin"}},
		Linux:   &oci.Linux{},
	}
	unresolved, err := cache.InjectDevices(ociSpec, ids...)
	if err != nil {
		t.Fatalf("InjectDevices(%v): unresolved %v: %v", ids, unresolved, err)
	}
	return ociSpec
}

func TestWriteClaimFile(t *testing.T) {
	devRoot := makeDevRoot(t)
	specDir := t.TempDir()
	w, err := NewWriter(specDir, driverName)
	if err != nil {
		t.Fatal(err)
	}
	name, _, err := w.WriteClaim(legacyClaim(devRoot))
	if err != nil {
		t.Fatalf("WriteClaim: %v", err)
	}
	if want := "k8s.vfio.dra.dev-vfio_" + uidA + ".json"; name != want {
		t.Errorf("spec name %q, want %q", name, want)
	}
	st, err := os.Stat(filepath.Join(specDir, name))
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm&^0o644 != 0 {
		t.Errorf("spec file mode %#o is wider than 0644", perm)
	}
	content, err := os.ReadFile(filepath.Join(specDir, name))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(content, []byte(`{"cdiVersion":"0.5.0","kind":"k8s.vfio.dra.dev/vfio"`)) {
		t.Errorf("spec file is not the expected JSON:\n%s", content)
	}

	// Writing the claim again (a repeated prepare) replaces the spec and
	// leaves no temp files.
	changed := legacyClaim(devRoot)
	changed.Devices = changed.Devices[1:]
	if _, _, err := w.WriteClaim(changed); err != nil {
		t.Fatalf("WriteClaim again: %v", err)
	}
	assertFiles(t, specDir, name)
	ociSpec := injectFresh(t, specDir, []string{"k8s.vfio.dra.dev/vfio=" + uidA + "-pci-0000-81-00-0"})
	if !slices.Contains(ociSpec.Process.Env, "VFIO_PCI_ADDRESSES=0000:81:00.0") {
		t.Errorf("rewritten spec not in effect: env %v", ociSpec.Process.Env)
	}
}

func TestDeterministic(t *testing.T) {
	devRoot := makeDevRoot(t)
	base := legacyClaim(devRoot)
	shuffled := legacyClaim(devRoot)
	slices.Reverse(shuffled.Devices)
	shuffled.CommonNodes = []string{devRoot + "/iommu", devRoot + "/vfio/vfio", devRoot + "/vfio/vfio"}
	base.CommonNodes = []string{devRoot + "/vfio/vfio", devRoot + "/iommu"}
	slices.Reverse(shuffled.Devices[1].Group.Addresses)

	var files [][]byte
	for i, c := range []Claim{base, shuffled, base} {
		dir := t.TempDir()
		w, err := NewWriter(dir, driverName)
		if err != nil {
			t.Fatal(err)
		}
		name, _, err := w.WriteClaim(c)
		if err != nil {
			t.Fatalf("WriteClaim %d: %v", i, err)
		}
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, b)
	}
	for i := 1; i < len(files); i++ {
		if !bytes.Equal(files[0], files[i]) {
			t.Errorf("spec %d differs from spec 0:\n%s\n%s", i, files[0], files[i])
		}
	}
}

func TestTwoClaimsAndRemove(t *testing.T) {
	devRoot := makeDevRoot(t)
	specDir := t.TempDir()
	w, err := NewWriter(specDir, driverName)
	if err != nil {
		t.Fatal(err)
	}
	// Claim B uses the same device names and group as claim A.
	a := legacyClaim(devRoot)
	b := legacyClaim(devRoot)
	b.UID = uidB
	nameA, idsA, err := w.WriteClaim(a)
	if err != nil {
		t.Fatal(err)
	}
	nameB, idsB, err := w.WriteClaim(b)
	if err != nil {
		t.Fatal(err)
	}
	if nameA == nameB {
		t.Fatalf("both claims wrote %s", nameA)
	}
	assertFiles(t, specDir, nameA, nameB)
	for dev := range idsA {
		if slices.Equal(idsA[dev], idsB[dev]) {
			t.Errorf("device %s has the same IDs %v in both claims", dev, idsA[dev])
		}
	}
	injectFresh(t, specDir, slices.Concat(idsA["pci-0000-3b-00-0"], idsB["pci-0000-3b-00-0"]))

	if err := w.RemoveClaim(uidA); err != nil {
		t.Fatalf("RemoveClaim: %v", err)
	}
	assertFiles(t, specDir, nameB)
	if err := w.RemoveClaim(uidA); err != nil {
		t.Errorf("second RemoveClaim: %v", err)
	}
	if err := w.RemoveClaim("never-written"); err != nil {
		t.Errorf("RemoveClaim of an unknown claim: %v", err)
	}
	assertFiles(t, specDir, nameB)
	// Claim B is still usable.
	injectFresh(t, specDir, idsB["pci-0000-81-00-0"])

	if err := w.RemoveClaim(""); err == nil {
		t.Error("RemoveClaim with an empty UID succeeded")
	}
}

func assertFiles(t *testing.T, dir string, want ...string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
	}
	slices.Sort(want)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("files in %s (-want +got):\n%s", dir, diff)
	}
}

var envNamePattern = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

func TestEnvName(t *testing.T) {
	tests := map[string]struct {
		request string
		want    string
	}{
		"dns label":           {"gpu-0", "VFIO_PCI_ADDRESSES_GPU_0"},
		"upper case":          {"NIC", "VFIO_PCI_ADDRESSES_NIC"},
		"leading digit":       {"0nic", "VFIO_PCI_ADDRESSES_0NIC"},
		"subrequest and dots": {"a.b/c", "VFIO_PCI_ADDRESSES_A_B_C"},
		"spaces and equals":   {"x y=z", "VFIO_PCI_ADDRESSES_X_Y_Z"},
		"non-ASCII":           {"Ünï", "VFIO_PCI_ADDRESSES__N_"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got := EnvName(EnvPCIAddresses, tc.request)
			if got != tc.want {
				t.Errorf("EnvName(%q) = %q, want %q", tc.request, got, tc.want)
			}
			if !envNamePattern.MatchString(got) {
				t.Errorf("%q is not a valid environment variable name", got)
			}
		})
	}
}

func TestSpecErrors(t *testing.T) {
	devRoot := "/host/dev"
	tests := map[string]struct {
		driver string
		edit   func(c *Claim)
		want   string
	}{
		"bad driver name": {
			driver: "vfio-",
			edit:   func(*Claim) {},
			want:   "driver name",
		},
		"no UID": {
			edit: func(c *Claim) { c.UID = "" },
			want: "no UID",
		},
		"no devices": {
			edit: func(c *Claim) { c.Devices = nil },
			want: "no devices",
		},
		"relative dev root": {
			edit: func(c *Claim) { c.HostDevRoot = "dev" },
			want: "not an absolute path",
		},
		"node outside the dev root": {
			edit: func(c *Claim) { c.Devices[0].Group.DeviceNodes = []string{"/host/devices/vfio/42"} },
			want: "not below",
		},
		"node escaping the dev root": {
			edit: func(c *Claim) { c.CommonNodes = []string{"/host/dev/../etc/passwd"} },
			want: "not below",
		},
		"dev root itself as a node": {
			edit: func(c *Claim) { c.CommonNodes = []string{"/host/dev/"} },
			want: "not below",
		},
		"no request": {
			edit: func(c *Claim) { c.Devices[0].Request = "" },
			want: "no request",
		},
		"no device name": {
			edit: func(c *Claim) { c.Devices[0].Name = "" },
			want: "without a name",
		},
		"device name not allowed by CDI": {
			edit: func(c *Claim) { c.Devices[0].Name = "pci 3b!" },
			want: "CDI device name",
		},
		"device twice": {
			edit: func(c *Claim) { c.Devices[1] = c.Devices[0] },
			want: "listed twice",
		},
		"no group nodes": {
			edit: func(c *Claim) { c.Devices[0].Group.DeviceNodes = nil },
			want: "no device nodes",
		},
		"address not in its group": {
			edit: func(c *Claim) { c.Devices[0].PCIAddress = "0000:3c:00.0" },
			want: "not among the bound functions",
		},
		"one group described two ways": {
			edit: func(c *Claim) {
				c.Devices[1].Group.Number = 42
				c.Devices[1].Group.Addresses = append(c.Devices[1].Group.Addresses, "0000:3b:00.0")
			},
			want: "differs",
		},
		"a bound function without a driver": {
			edit: func(c *Claim) { c.Devices[0].Group.Drivers = map[string]string{"0000:3b:00.0": "vfio-pci"} },
			want: "no valid driver",
		},
		"a driver that would break the list": {
			edit: func(c *Claim) {
				c.Devices[0].Group.Drivers = map[string]string{"0000:3b:00.0": "vfio-pci", "0000:3b:00.1": "a=b"}
			},
			want: "no valid driver",
		},
		"requests colliding in env names": {
			edit: func(c *Claim) {
				c.Devices[0].Request = "nic-a"
				c.Devices[1].Request = "nic.a"
			},
			want: "same environment variable",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			c := legacyClaim(devRoot)
			tc.edit(&c)
			driver := driverName
			if tc.driver != "" {
				driver = tc.driver
			}
			spec, _, err := Spec(driver, c)
			if err == nil {
				t.Fatalf("Spec succeeded: %+v", spec)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
		})
	}
}

func TestNewWriterErrors(t *testing.T) {
	if _, err := NewWriter("", driverName); err == nil {
		t.Error("NewWriter with no directory succeeded")
	}
	if _, err := NewWriter(t.TempDir(), "vfio dra"); err == nil {
		t.Error("NewWriter with an invalid driver name succeeded")
	}

	// An invalid claim writes nothing.
	dir := t.TempDir()
	w, err := NewWriter(dir, driverName)
	if err != nil {
		t.Fatal(err)
	}
	bad := legacyClaim("/host/dev")
	bad.Devices[0].Group.DeviceNodes = []string{"/elsewhere/vfio/42"}
	if _, _, err := w.WriteClaim(bad); err == nil || !strings.Contains(err.Error(), uidA) {
		t.Errorf("WriteClaim of an invalid claim: %v, want an error naming the claim", err)
	}
	assertFiles(t, dir)
}

func TestUIDCannotLeaveTheSpecDir(t *testing.T) {
	dir := t.TempDir()
	w, err := NewWriter(dir, "vfio.dra.dev")
	if err != nil {
		t.Fatal(err)
	}
	for _, uid := range []string{"../../etc/x", "a/b", "", ".hidden"} {
		if err := w.RemoveClaim(uid); err == nil {
			t.Errorf("RemoveClaim(%q) succeeded", uid)
		}
		if _, _, err := w.WriteClaim(Claim{UID: uid, HostDevRoot: "/dev"}); err == nil {
			t.Errorf("WriteClaim(%q) succeeded", uid)
		}
	}
}
