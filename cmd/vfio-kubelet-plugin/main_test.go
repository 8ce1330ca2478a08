package main

import (
	"os"
	"os/exec"
	"path/filepath"
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
