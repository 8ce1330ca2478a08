package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The kernel emulator and the fixture builder are for tests: the plugin
// that runs on nodes must never contain them.
func TestNoTestCodeLinked(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, pkg := range strings.Fields(string(out)) {
		if strings.HasSuffix(pkg, "/pcitest") || strings.Contains(pkg, "/test/") {
			t.Errorf("the plugin links %s", pkg)
		}
	}
}

// TestUnusedMethodsDropped builds the plugin with the Makefile's build tags
// and checks that the linker could drop the methods nothing calls. It
// cannot once a function that looks methods up by name at run time
// (reflect's MethodByName, as text/template and html/template do) is
// reachable: then it keeps every exported method of every type put in an
// interface, all of client-go's typed clients among them, and the plugin
// grows by 20 MB. Dropping them needs gRPC's grpcnotrace tag (else
// golang.org/x/net/trace serves pages through html/template).
func TestUnusedMethodsDropped(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the plugin")
	}
	makefile, err := os.ReadFile("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	tags := regexp.MustCompile(`(?m)^GO_BUILD_FLAGS \?=.*(-tags=\S+)`).FindSubmatch(makefile)
	if tags == nil {
		t.Fatal("the Makefile's GO_BUILD_FLAGS set no -tags")
	}
	bin := filepath.Join(t.TempDir(), "vfio-kubelet-plugin")
	if out, err := exec.Command("go", "build", "-trimpath", string(tags[1]), "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command("go", "tool", "nm", bin).Output()
	if err != nil {
		t.Fatalf("go tool nm: %v", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		// Nothing calls the Clientset's StorageV1: only a linker that keeps
		// every method keeps it.
		if sym := f[len(f)-1]; sym == "k8s.io/client-go/kubernetes.(*Clientset).StorageV1" || strings.HasPrefix(sym, "html/template.") {
			t.Errorf("the plugin links %s: the linker keeps every exported method (is a template or a MethodByName reachable?)", sym)
			break
		}
	}
}

func TestOptions(t *testing.T) {
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
`), 0o600); err != nil {
		t.Fatal(err)
	}
	badConfig := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(badConfig, []byte("apiVersion: vfio.dra.dev/v1alpha1\nkind: DriverConfiguration\ndeny: [{klass: \"01\"}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	cmd, o := newCommand()
	if err := cmd.ParseFlags([]string{"--kubeconfig", kubeconfig, "--node-name", "n1", "--driver-name", "gpu.example.com", "--bind-timeout", "3s"}); err != nil {
		t.Fatal(err)
	}
	if err := o.complete(); err != nil {
		t.Fatal(err)
	}
	if o.cfg.BindTimeout != 3*time.Second {
		t.Errorf("bind timeout = %v, want the flag's 3s", o.cfg.BindTimeout)
	}
	if o.cfg.PluginDataDir != "/var/lib/kubelet/plugins/gpu.example.com" {
		t.Errorf("plugin data dir = %q, want it derived from the driver name", o.cfg.PluginDataDir)
	}
	if o.cfg.KubeClient == nil || o.cfg.NodeName != "n1" || o.cfg.SysfsRoot != "/sys" || o.cfg.HostDevRoot != "/dev" {
		t.Errorf("unexpected configuration: %+v", o.cfg)
	}
	if err := o.cfg.Validate(); err != nil {
		t.Errorf("defaults do not validate: %v", err)
	}
	// 8 pods starting at once must not wait for client-side throttling.
	if o.restConfig.QPS < 8 || o.restConfig.Burst < 16 {
		t.Errorf("default client limits QPS %v burst %d are below what 8 concurrent prepares need", o.restConfig.QPS, o.restConfig.Burst)
	}

	cmd, o = newCommand()
	if err := cmd.ParseFlags([]string{"--kubeconfig", kubeconfig, "--node-name", "n1", "--kube-api-qps", "7.5", "--kube-api-burst", "9"}); err != nil {
		t.Fatal(err)
	}
	if err := o.complete(); err != nil {
		t.Fatal(err)
	}
	if o.restConfig.QPS != 7.5 || o.restConfig.Burst != 9 {
		t.Errorf("--kube-api-qps 7.5 --kube-api-burst 9 gave QPS %v burst %d", o.restConfig.QPS, o.restConfig.Burst)
	}
	cmd, o = newCommand()
	if err := cmd.ParseFlags([]string{"--kubeconfig", kubeconfig, "--node-name", "n1", "--kube-api-burst", "0"}); err != nil {
		t.Fatal(err)
	}
	if err := o.complete(); err == nil || !strings.Contains(err.Error(), "--kube-api-burst") {
		t.Errorf("complete() with --kube-api-burst 0 = %v, want an error naming the flag", err)
	}

	cmd, o = newCommand()
	if err := cmd.ParseFlags([]string{"--kubeconfig", kubeconfig, "--node-name", "n1", "--config", badConfig}); err != nil {
		t.Fatal(err)
	}
	err := o.complete()
	if err == nil || !strings.Contains(err.Error(), badConfig) || !strings.Contains(err.Error(), "deny[0].klass") {
		t.Errorf("complete() with a malformed config = %v, want an error naming the file and the field", err)
	}
}
