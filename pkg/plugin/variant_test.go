package plugin_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/dynamic-resource-allocation/api/metadata"
	"k8s.io/klog/v2/ktesting"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/plugin"
	"github.com/vfio-dra/vfio-dra-driver/pkg/resources"
)

// variantAliases is a modules.alias as depmod writes it, cut down to the
// lines that matter for the demo server: the catch-all of vfio-pci, a GPU
// variant that matches every NVIDIA display controller (class 03) but not
// its audio function, and the ConnectX variant, which matches the VF
// (15b3:1018) and not the PF (15b3:1017).
const variantAliases = `# Aliases extracted from modules themselves.
alias pci:v000010DEd*sv*sd*bc03sc*i* nvidia
alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci
alias vfio_pci:v000010DEd*sv*sd*bc03sc*i* nvgrace_gpu_vfio_pci
alias vfio_pci:v000015B3d00001018sv*sd*bc*sc*i* mlx5_vfio_pci
`

// withVariants gives the node a modules.alias naming two vfio variant
// drivers and loads both.
func withVariants(t *testing.T, n *node) {
	t.Helper()
	alias := filepath.Join(t.TempDir(), "modules.alias")
	if err := os.WriteFile(alias, []byte(variantAliases), 0o644); err != nil {
		t.Fatal(err)
	}
	n.cfg.ModulesAlias = alias
	for _, d := range []string{"nvgrace_gpu_vfio_pci", "mlx5_vfio_pci"} {
		if err := n.tree.AddDriver(d); err != nil {
			t.Fatal(err)
		}
	}
}

// autoClass is the DeviceClass config that selects driver "auto".
func autoClass() resourceapi.DeviceAllocationConfiguration {
	return opaque(resourceapi.AllocationConfigSourceClass, vfioConfig(`"driver": "auto"`))
}

// TestPrepareAutoPerMember: driver "auto" picks the variant for each
// function of a group on its own, through the kubelet's gRPC path. The
// GPU's variant is not forced onto the GPU's audio function; the VF gets
// the ConnectX variant. The checkpoint, the CDI spec and the metadata say
// which driver each function got; a restarted plugin finds the claim
// intact, and unprepare gives every function back.
func TestPrepareAutoPerMember(t *testing.T) {
	t.Parallel()
	const gpu, audio, vf = "0000:01:00.0", "0000:01:00.1", "0000:81:00.2"
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	withVariants(t, n)
	n.start(ctx, t)
	before := n.state(t)

	claim := n.createClaim(ctx, t, "auto", []resourceapi.DeviceRequestAllocationResult{
		result("gpu", gpu), result("vf", vf),
	}, autoClass())
	devs := n.mustPrepare(ctx, t, claim)

	want := map[string]string{gpu: "nvgrace_gpu_vfio_pci", audio: "vfio-pci", vf: "mlx5_vfio_pci"}
	for addr, drv := range want {
		if got := n.driverOf(t, addr); got != drv {
			t.Errorf("%s is on %q, want %q", addr, got, drv)
		}
	}

	// Only the member that differs from its group carries a target of
	// its own; a group all on one driver writes nothing new.
	entry := n.checkpoint(t).Claims[string(claim.UID)]
	if entry == nil {
		t.Fatal("no checkpoint entry")
	}
	wantGroups := map[int]checkpoint.Group{
		2: {Number: 2, Target: "vfio-pci", Restore: true, Members: []checkpoint.Member{
			{Address: gpu, Driver: "nvidia", Target: "nvgrace_gpu_vfio_pci"},
			{Address: audio, Driver: "snd_hda_intel"},
		}},
		22: {Number: 22, Target: "mlx5_vfio_pci", Restore: true, Members: []checkpoint.Member{
			{Address: vf, Driver: "mlx5_core"},
		}},
	}
	for _, g := range entry.Groups {
		if diff := cmp.Diff(wantGroups[g.Number], g); diff != "" {
			t.Errorf("checkpointed group %d (-want +got):\n%s", g.Number, diff)
		}
	}
	if len(entry.Groups) != len(wantGroups) {
		t.Errorf("checkpoint has %d groups, want %d", len(entry.Groups), len(wantGroups))
	}
	// The GPU's own target is in the extras file: the previous
	// version's strict decoder reads checkpoint.json.
	main, err := os.ReadFile(filepath.Join(n.cfg.PluginDataDir, "checkpoint.json"))
	if err != nil {
		t.Fatal(err)
	}
	extras, err := os.ReadFile(checkpoint.ExtrasPath(filepath.Join(n.cfg.PluginDataDir, "checkpoint.json")))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(main), "nvgrace_gpu_vfio_pci") || !strings.Contains(string(extras), "nvgrace_gpu_vfio_pci") {
		t.Errorf("the GPU's own target belongs in the extras file; checkpoint.json:\n%s\nextras:\n%s", main, extras)
	}

	spec := n.inject(t, allCDIIDs(devs))
	env := envOf(spec)
	if got, want := env["VFIO_IOMMU_GROUP_2_DRIVERS"], gpu+"=nvgrace_gpu_vfio_pci,"+audio+"=vfio-pci"; got != want {
		t.Errorf("VFIO_IOMMU_GROUP_2_DRIVERS=%q, want %q", got, want)
	}
	if got, want := env["VFIO_IOMMU_GROUP_22_DRIVERS"], vf+"=mlx5_vfio_pci"; got != want {
		t.Errorf("VFIO_IOMMU_GROUP_22_DRIVERS=%q, want %q", got, want)
	}
	mounts := map[string]string{}
	for _, m := range spec.Mounts {
		mounts[m.Destination] = m.Source
	}
	for request, drv := range map[string]string{"gpu": "nvgrace_gpu_vfio_pci", "vf": "mlx5_vfio_pci"} {
		data, err := os.ReadFile(mounts[metadata.ResourceClaimFilePath(plugin.DefaultDriverName, claim.Name, request)])
		if err != nil {
			t.Fatalf("request %s: metadata: %v", request, err)
		}
		md, _ := decodeLikeKubeVirt(t, data)
		got := md.Requests[0].Devices[0].Attributes[resources.AttrVFIODriver].StringValue
		if got == nil || *got != drv {
			t.Errorf("request %s: metadata vfioDriver %v, want %s", request, got, drv)
		}
	}

	// A restarted plugin checks each function against its own target:
	// the claim is intact and nothing is written again.
	n.driver.Stop()
	n.start(ctx, t)
	writes := len(n.kernel.Writes())
	n.mustPrepare(ctx, t, claim)
	if w := n.writesSince(writes); len(w) > 0 {
		t.Errorf("prepare of the prepared claim wrote %v", w)
	}

	n.mustUnprepare(ctx, t, claimRef(claim))
	if diff := cmp.Diff(before, n.state(t)); diff != "" {
		t.Errorf("after unprepare (-before +now):\n%s", diff)
	}
}

// TestPrepareAutoUniformCheckpointIsOld: a claim whose groups each go to
// one driver is checkpointed exactly as before per-member targets existed,
// so a plugin of the version before can still read the file after a
// downgrade.
func TestPrepareAutoUniformCheckpointIsOld(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	withVariants(t, n)
	n.start(ctx, t)
	claim := n.createClaim(ctx, t, "uniform", []resourceapi.DeviceRequestAllocationResult{
		result("vf", "0000:81:00.2"), result("nic", "0000:82:00.0"),
	}, autoClass())
	n.mustPrepare(ctx, t, claim)
	data, err := os.ReadFile(filepath.Join(n.cfg.PluginDataDir, "checkpoint.json"))
	if err != nil {
		t.Fatal(err)
	}
	// "target" appears once per group, never inside a member.
	if got := strings.Count(string(data), `"target"`); got != 2 {
		t.Errorf("checkpoint has %d target fields, want 2 (one per group):\n%s", got, data)
	}
	if got := n.driverOf(t, "0000:82:00.0"); got != "vfio-pci" {
		t.Errorf("the NIC without a variant is on %q, want vfio-pci", got)
	}
	n.mustUnprepare(ctx, t, claimRef(claim))
}

// TestPrepareRefusesHostDriver: a DeviceClass that names a host driver,
// even one modules.alias lists, or pci-stub, fails the prepare before the
// checkpoint or sysfs change; a variant named explicitly is bound.
func TestPrepareRefusesHostDriver(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	withVariants(t, n)
	n.start(ctx, t)
	before := n.state(t)
	for _, drv := range []string{"nvidia", "snd_hda_intel", "pci-stub"} {
		claim := n.createClaim(ctx, t, "host-"+strings.ReplaceAll(drv, "_", "-"), []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.0")},
			opaque(resourceapi.AllocationConfigSourceClass, vfioConfig(`"driver": "`+drv+`"`)))
		writes := len(n.kernel.Writes())
		r := n.prepare(ctx, t, claim)
		for _, want := range []string{"pci-0000-01-00-0", `driver "` + drv + `"`, "not a VFIO driver", n.cfg.ModulesAlias} {
			if !strings.Contains(r.Error, want) {
				t.Errorf("driver %s: prepare error %q does not mention %q", drv, r.Error, want)
			}
		}
		if w := n.writesSince(writes); len(w) > 0 {
			t.Errorf("driver %s: refused prepare wrote %v", drv, w)
		}
		if e := n.checkpoint(t).Claims[string(claim.UID)]; e != nil {
			t.Errorf("driver %s: refused prepare left a checkpoint entry %+v", drv, e)
		}
	}
	if diff := cmp.Diff(before, n.state(t)); diff != "" {
		t.Errorf("refused prepares changed the node (-before +now):\n%s", diff)
	}

	claim := n.createClaim(ctx, t, "variant", []resourceapi.DeviceRequestAllocationResult{result("vf", "0000:81:00.2")},
		opaque(resourceapi.AllocationConfigSourceClass, vfioConfig(`"driver": "mlx5_vfio_pci"`)))
	n.mustPrepare(ctx, t, claim)
	if got := n.driverOf(t, "0000:81:00.2"); got != "mlx5_vfio_pci" {
		t.Errorf("VF is on %q, want mlx5_vfio_pci", got)
	}
	n.mustUnprepare(ctx, t, claimRef(claim))
}
