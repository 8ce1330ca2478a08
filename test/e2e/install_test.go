package e2e

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/vfio-dra/vfio-dra-driver/test/e2e/framework"
)

// manifestObject is the identity of one document of a manifest.
type manifestObject struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
}

// splitManifest returns the non-empty documents of a multi-document YAML
// stream with their identities.
func splitManifest(t *testing.T, name, data string) ([]string, []manifestObject) {
	t.Helper()
	var docs []string
	var objs []manifestObject
	for _, doc := range strings.Split("\n"+data, "\n---") {
		var o manifestObject
		if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
			t.Fatalf("%s: %v\n%s", name, err, doc)
		}
		if o.Kind == "" {
			continue // only comments
		}
		docs = append(docs, doc)
		objs = append(objs, o)
	}
	return docs, objs
}

// dryRunApply applies documents with --dry-run=server and checks that the
// API server accepted every object: each is created (or, for a namespace
// that exists, unchanged or configured).
func dryRunApply(ctx context.Context, t *testing.T, cp *framework.ControlPlane, name string, docs []string, objs []manifestObject, args ...string) {
	t.Helper()
	out, err := cp.KubectlWithInput(ctx, strings.NewReader(strings.Join(docs, "\n---\n")),
		append([]string{"apply", "--dry-run=server", "-f", "-"}, args...)...)
	if err != nil {
		t.Fatalf("%s: %v\n%s", name, err, out)
	}
	var got, want []string
	for _, o := range objs {
		want = append(want, strings.ToLower(o.Kind)+"/"+o.Metadata.Name)
	}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		ref, result, _ := strings.Cut(line, " ")
		kind, objName, _ := strings.Cut(ref, "/")
		kind, _, _ = strings.Cut(kind, ".")
		switch {
		case result == "created (server dry run)":
		case kind == "namespace" && (result == "unchanged (server dry run)" || result == "configured (server dry run)"):
		default:
			t.Errorf("%s: unexpected line %q", name, line)
			continue
		}
		got = append(got, kind+"/"+objName)
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("%s: the API server accepted %v, want %v", name, got, want)
	}
}

// TestChartManifests applies the Helm chart's output, with default values
// and with every option set (rendered by deployments/helm/chart.sh template,
// which run.sh calls), with --dry-run=server: every object passes the API
// server's validation and admission.
func TestChartManifests(t *testing.T) {
	ctx := t.Context()
	dir := filepath.Join(os.Getenv(framework.DriverBinDirEnv), "chart")
	cp := framework.StartControlPlane(t, framework.Options{})
	// A dry run creates nothing, so the namespaced objects would not find
	// their namespace: that one is created for real.
	if _, err := cp.Kubectl(ctx, "create", "namespace", "vfio-dra-driver"); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"default.yaml", "all-options.yaml"} {
		data, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatalf("the chart's rendered output (deployments/helm/chart.sh template %s): %v", dir, err)
		}
		docs, objs := splitManifest(t, f, string(data))
		kinds := map[string]int{}
		for _, o := range objs {
			kinds[o.Kind]++
		}
		// This API server has no Prometheus Operator CRDs: the tools
		// module decodes the ServiceMonitor into the operator's types
		// (tools/chart).
		for i := 0; i < len(objs); i++ {
			if objs[i].APIVersion == "monitoring.coreos.com/v1" && objs[i].Kind == "ServiceMonitor" {
				docs, objs = slices.Delete(docs, i, i+1), slices.Delete(objs, i, i+1)
				i--
			}
		}
		// What an install needs, whatever the values.
		for _, k := range []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "ConfigMap", "DaemonSet", "DeviceClass"} {
			if kinds[k] == 0 {
				t.Errorf("%s has no %s", f, k)
			}
		}
		if f == "all-options.yaml" && (kinds["DeviceClass"] != 4 || kinds["Service"] != 1 || kinds["ServiceMonitor"] != 1) {
			t.Errorf("%s has %d DeviceClasses, %d Services and %d ServiceMonitors, want the generic class and 3 models, and the metrics Service and ServiceMonitor", f, kinds["DeviceClass"], kinds["Service"], kinds["ServiceMonitor"])
		}
		dryRunApply(ctx, t, cp, f, docs, objs)
	}
}

// TestExamples applies every example under examples/ with --dry-run=server.
// KubeVirt's objects are left out (KubeVirt is not installed): the tools
// module decodes them strictly into KubeVirt's own API types.
func TestExamples(t *testing.T) {
	ctx := t.Context()
	cp := framework.StartControlPlane(t, framework.Options{})
	if _, err := cp.Kubectl(ctx, "create", "namespace", "examples"); err != nil {
		t.Fatal(err)
	}
	files, err := filepath.Glob(filepath.Join(repoRoot(t), "examples", "*.yaml"))
	if err != nil || len(files) < 4 {
		t.Fatalf("examples: %v %v", files, err)
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		docs, objs := splitManifest(t, f, string(data))
		var keptDocs []string
		var kept []manifestObject
		for i, o := range objs {
			if strings.HasPrefix(o.APIVersion, "kubevirt.io/") {
				continue
			}
			keptDocs, kept = append(keptDocs, docs[i]), append(kept, o)
		}
		if len(kept) == 0 {
			t.Fatalf("%s has nothing Kubernetes itself serves", f)
		}
		dryRunApply(ctx, t, cp, filepath.Base(f), keptDocs, kept, "-n", "examples")
	}
}
