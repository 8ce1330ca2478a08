package cdispec_test

import (
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"tags.cncf.io/container-device-interface/pkg/cdi"
	"tags.cncf.io/container-device-interface/pkg/parser"

	"github.com/vfio-dra/vfio-dra-driver/pkg/cdispec"
)

var envNamePattern = regexp.MustCompile(`^[A-Z_][A-Z0-9_]*$`)

// FuzzEnvName: any request name gives a valid variable name with the
// prefix, the same length in characters, and upper case.
func FuzzEnvName(f *testing.F) {
	for _, s := range []string{"gpu", "nic-0", "a.b/c", "Ünïcode", "", "x=y"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, request string) {
		got := cdispec.EnvName(cdispec.EnvPCIAddresses, request)
		if !envNamePattern.MatchString(got) {
			t.Fatalf("EnvName(%q) = %q: not a variable name", request, got)
		}
		suffix, ok := strings.CutPrefix(got, cdispec.EnvPCIAddresses+"_")
		if !ok || len([]rune(suffix)) != len([]rune(request)) {
			t.Fatalf("EnvName(%q) = %q", request, got)
		}
	})
}

// FuzzSpec builds the spec of a claim from arbitrary claim UIDs, request
// and device names and node paths: either an error, or a spec the CDI
// library accepts, whose file stays in the spec directory and whose IDs
// parse.
func FuzzSpec(f *testing.F) {
	f.Add("4f1c2d3e-0a1b-4c5d-8e9f-a0b1c2d3e4f5", "gpu", "pci-0000-01-00-0", "0000:01:00.0", 2, "vfio/2")
	f.Add("../../etc", "gpu", "pci-0000-01-00-0", "0000:01:00.0", 2, "vfio/2")
	f.Add("uid", "a b", "x", "0000:01:00.0", 0, "../vfio/2")
	f.Add("uid", "r", "-bad-", "addr", -1, "vfio/devices/vfio0")
	hostDev := "/host/dev"
	f.Fuzz(func(t *testing.T, uid, request, name, addr string, group int, node string) {
		claim := cdispec.Claim{
			UID: uid, HostDevRoot: hostDev,
			CommonNodes: []string{hostDev + "/vfio/vfio"},
			Devices: []cdispec.Device{{
				Request: request, Name: name, PCIAddress: addr,
				Group: cdispec.Group{Number: group, Addresses: []string{addr}, DeviceNodes: []string{filepath.Join(hostDev, node)}},
			}},
		}
		spec, ids, err := cdispec.Spec("vfio.dra.dev", claim)
		if err != nil {
			return
		}
		file := cdispec.SpecFileName("vfio.dra.dev", uid)
		if file != filepath.Base(file) || strings.HasPrefix(file, ".") {
			t.Fatalf("spec file name %q for claim UID %q leaves the spec directory", file, uid)
		}
		for _, d := range spec.Devices {
			for _, n := range d.ContainerEdits.DeviceNodes {
				if !strings.HasPrefix(n.HostPath, hostDev+"/") || !strings.HasPrefix(n.Path, "/dev/") {
					t.Fatalf("device node %+v is not below %s and /dev", n, hostDev)
				}
				if n.Permissions != "rw" {
					t.Fatalf("device node %s has permissions %q, want rw", n.Path, n.Permissions)
				}
			}
		}
		for _, list := range ids {
			for _, id := range list {
				if _, _, _, err := parser.ParseQualifiedName(id); err != nil {
					t.Fatalf("CDI device ID %q: %v", id, err)
				}
			}
		}
		dir := t.TempDir()
		cache, err := cdi.NewCache(cdi.WithSpecDirs(dir), cdi.WithAutoRefresh(false))
		if err != nil {
			t.Fatal(err)
		}
		if err := cache.WriteSpec(spec, strings.TrimSuffix(file, ".json")+".json"); err != nil {
			t.Fatalf("the CDI library rejects the spec of claim %q: %v", uid, err)
		}
	})
}
