package e2e

import (
	"bytes"
	"encoding/json"
	"maps"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	resourceapi "k8s.io/api/resource/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/diff"
	"sigs.k8s.io/yaml"

	"github.com/vfio-dra/vfio-dra-driver/test/e2e/framework"
)

// offeredOnDemoNode are the devices the plugin offers on the demo server with
// demo/config.yaml (storage denied), and the IOMMU groups with more than one
// of them, which get a shared counter set.
var (
	offeredOnDemoNode = []string{
		"pci-0000-01-00-0", "pci-0000-01-00-1", // GPU and its audio function, group 2
		"pci-0000-02-01-0", "pci-0000-02-02-0", // conventional PCI behind a bridge, group 5
		"pci-0000-03-00-0", "pci-0000-03-00-1", // dual-port NIC without ACS, group 7
		"pci-0000-81-00-2", "pci-0000-81-00-3", // SR-IOV VFs, groups 22 and 23
		"pci-0000-82-00-0", // SmartNIC, group 25
		"pci-0000-84-00-0", // FPGA without a host driver, group 27
	}
	sharedGroupsOnDemoNode = map[string][]string{
		"iommu-group-2": {"pci-0000-01-00-0", "pci-0000-01-00-1"},
		"iommu-group-5": {"pci-0000-02-01-0", "pci-0000-02-02-0"},
		"iommu-group-7": {"pci-0000-03-00-0", "pci-0000-03-00-1"},
	}
)

// TestPluginPublishesResourceSlices checks what the plugin publishes against
// the real API server: the slices, shared counters included, are accepted,
// offer what the demo server has to offer, are what "vfio-dra inspect" prints
// for the same tree, and kubectl lists them. The inspect output for another
// node name passes the API server's validation too.
func TestPluginPublishesResourceSlices(t *testing.T) {
	ctx := t.Context()
	cp, node := startDemoNode(t, "node-1")
	published, err := framework.WaitForPool(ctx, cp.Client, node.Name, publishTimeout)
	if err != nil {
		t.Fatal(err)
	}

	// What the pool offers, independent of how the driver builds it.
	var devices []string
	consumers := map[string][]string{}
	counterSets := map[string]resourceapi.CounterSet{}
	for _, s := range published {
		if s.Spec.Driver != driverName || s.Spec.NodeName == nil || *s.Spec.NodeName != node.Name || s.Spec.Pool.Name != node.Name {
			t.Errorf("ResourceSlice %s: driver %q, node %v, pool %q; want %s, %s, %s", s.Name, s.Spec.Driver, s.Spec.NodeName, s.Spec.Pool.Name, driverName, node.Name, node.Name)
		}
		for _, cs := range s.Spec.SharedCounters {
			counterSets[cs.Name] = cs
		}
		for _, d := range s.Spec.Devices {
			devices = append(devices, d.Name)
			for _, c := range d.ConsumesCounters {
				consumers[c.CounterSet] = append(consumers[c.CounterSet], d.Name)
			}
		}
	}
	slices.Sort(devices)
	if !slices.Equal(devices, offeredOnDemoNode) {
		t.Errorf("published devices %v, want %v", devices, offeredOnDemoNode)
	}
	for name, want := range sharedGroupsOnDemoNode {
		cs, ok := counterSets[name]
		if !ok {
			t.Errorf("no shared counter set %s", name)
			continue
		}
		if len(cs.Counters) != 1 {
			t.Errorf("counter set %s has counters %v, want one", name, cs.Counters)
		}
		for counter, c := range cs.Counters {
			if c.Value.Value() != 1 {
				t.Errorf("counter set %s: counter %s holds %s, want 1", name, counter, c.Value.String())
			}
		}
		got := slices.Sorted(slices.Values(consumers[name]))
		if !slices.Equal(got, want) {
			t.Errorf("devices consuming %s: %v, want %v", name, got, want)
		}
	}
	if got, want := slices.Sorted(maps.Keys(counterSets)), slices.Sorted(maps.Keys(sharedGroupsOnDemoNode)); !slices.Equal(got, want) {
		t.Errorf("shared counter sets %v, want %v", got, want)
	}

	// The same content as "vfio-dra inspect" for this tree and configuration.
	inspectArgs := []string{"inspect", "--sysfs-root", node.SysfsRoot, "--proc-root", node.ProcRoot, "--config", filepath.Join(repoRoot(t), "demo", "config.yaml"), "-o", "json"}
	want := decodeSliceList(t, driverCommand(ctx, t, "vfio-dra", append(inspectArgs, "--node-name", node.Name)...))
	if len(want) != len(published) {
		t.Fatalf("vfio-dra inspect prints %d ResourceSlices, the plugin published %d", len(want), len(published))
	}
	// Both lists are in the driver's slice order: published names start with
	// the slice's index, and inspect prints them in order.
	for i := range want {
		if !apiequality.Semantic.DeepEqual(published[i].Spec, want[i].Spec) {
			t.Errorf("ResourceSlice %s differs from slice %d of vfio-dra inspect (- published, + inspect):\n%s",
				published[i].Name, i, diff.Diff(published[i].Spec, want[i].Spec))
		}
	}

	// kubectl lists each slice with its node and driver.
	out, err := cp.Kubectl(ctx, "get", "resourceslices")
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string][]string{}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if header := strings.Fields(lines[0]); !slices.Equal(header[:4], []string{"NAME", "NODE", "DRIVER", "POOL"}) {
		t.Fatalf("kubectl get resourceslices: unexpected header %q", lines[0])
	}
	for _, line := range lines[1:] {
		f := strings.Fields(line)
		listed[f[0]] = f[1:4]
	}
	if len(listed) != len(published) {
		t.Errorf("kubectl get resourceslices lists %d slices, want %d:\n%s", len(listed), len(published), out)
	}
	for _, s := range published {
		if got, want := listed[s.Name], []string{node.Name, driverName, node.Name}; !slices.Equal(got, want) {
			t.Errorf("kubectl get resourceslices: %s shows node, driver, pool %v, want %v", s.Name, got, want)
		}
	}
	t.Logf("kubectl get resourceslices:\n%s", out)

	// The inspect output for another node is valid as it is.
	const otherNode = "node-2"
	other := driverCommand(ctx, t, "vfio-dra", append(inspectArgs, "--node-name", otherNode)...)
	if n := len(decodeSliceList(t, other)); n != len(published) {
		t.Errorf("vfio-dra inspect prints %d ResourceSlices for %s, want %d", n, otherNode, len(published))
	}
	out, err = cp.KubectlWithInput(ctx, bytes.NewReader(other), "create", "--dry-run=server", "-f", "-")
	if err != nil {
		t.Fatal(err)
	}
	created := strings.Split(strings.TrimSpace(out), "\n")
	if len(created) != len(published) {
		t.Errorf("kubectl create --dry-run=server: %d lines, want one per slice (%d):\n%s", len(created), len(published), out)
	}
	line := regexp.MustCompile(`^resourceslice\.resource\.k8s\.io/[0-9]{5}-` + regexp.QuoteMeta(driverName+"-"+otherNode+"-") + `[a-z0-9]+ created \(server dry run\)$`)
	for _, l := range created {
		if !line.MatchString(l) {
			t.Errorf("kubectl create --dry-run=server: line %q does not match %s", l, line)
		}
	}
	if items, err := framework.ListNodeSlices(ctx, cp.Client, otherNode); err != nil {
		t.Fatal(err)
	} else if len(items) != 0 {
		t.Errorf("a server-side dry run stored %d ResourceSlices of %s", len(items), otherNode)
	}
}

// decodeSliceList decodes the v1 List of ResourceSlices that "vfio-dra
// inspect -o json" prints.
func decodeSliceList(t *testing.T, data []byte) []resourceapi.ResourceSlice {
	t.Helper()
	var list struct {
		APIVersion string                      `json:"apiVersion"`
		Kind       string                      `json:"kind"`
		Metadata   metav1.ListMeta             `json:"metadata"`
		Items      []resourceapi.ResourceSlice `json:"items"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&list); err != nil {
		t.Fatalf("decode vfio-dra inspect output: %v\n%s", err, data)
	}
	if list.APIVersion != "v1" || list.Kind != "List" {
		t.Fatalf("vfio-dra inspect printed apiVersion %q kind %q, want v1 List", list.APIVersion, list.Kind)
	}
	for i, s := range list.Items {
		if s.APIVersion != "resource.k8s.io/v1" || s.Kind != "ResourceSlice" {
			t.Fatalf("item %d of vfio-dra inspect is %s %s, want resource.k8s.io/v1 ResourceSlice", i, s.APIVersion, s.Kind)
		}
	}
	return list.Items
}

// TestDeploymentManifests checks that the manifests in deployments/kubernetes
// pass the API server's validation and admission as a whole, rendered by
// kustomize as "kubectl apply -k" does.
func TestDeploymentManifests(t *testing.T) {
	ctx := t.Context()
	cp := framework.StartControlPlane(t, framework.Options{})
	dir := filepath.Join(repoRoot(t), "deployments", "kubernetes")

	// A dry run creates nothing, so the namespaced objects would not find
	// their namespace: that one is created for real.
	if _, err := cp.Kubectl(ctx, "apply", "-f", filepath.Join(dir, "namespace.yaml")); err != nil {
		t.Fatal(err)
	}
	out, err := cp.Kubectl(ctx, "apply", "--dry-run=server", "-k", dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kubectl apply --dry-run=server -k %s:\n%s", dir, out)
	// Every object that kustomize renders is accepted.
	rendered, err := cp.Kubectl(ctx, "kustomize", dir)
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, doc := range strings.Split(rendered, "\n---\n") {
		var obj struct {
			Kind     string
			Metadata struct{ Name string }
		}
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
			t.Fatalf("decode kustomize output: %v\n%s", err, doc)
		}
		want = append(want, strings.ToLower(obj.Kind)+"/"+obj.Metadata.Name)
	}
	var got []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		ref, result, ok := strings.Cut(line, " ")
		if ref == "namespace/vfio-dra-driver" && result == "unchanged (server dry run)" {
			got = append(got, ref)
			continue
		}
		if !ok || result != "created (server dry run)" {
			t.Errorf("unexpected line %q", line)
			continue
		}
		kind, name, _ := strings.Cut(ref, "/")
		kind, _, _ = strings.Cut(kind, ".")
		got = append(got, kind+"/"+name)
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("kubectl apply --dry-run=server -k created %v, want %v", got, want)
	}
}
