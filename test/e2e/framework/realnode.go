package framework

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/template"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// NodeBinDirEnv names the directory with the kubelet, containerd, ctr and
// containerd-shim-runc-v2 that hack/build-node.sh builds.
const NodeBinDirEnv = "VFIO_E2E_NODE_BIN_DIR"

// NodeBinaries must exist in the directory named by NodeBinDirEnv.
var NodeBinaries = []string{"kubelet", "containerd", "ctr", "containerd-shim-runc-v2"}

// WorkloadBinary is test/e2e/cmd/workload, built statically into the
// driver's binary directory (run-node.sh does that). It is the whole
// content of WorkloadImage.
const WorkloadBinary = "vfio-e2e-workload"

// WorkloadImage is the image that every container of a real node runs,
// the pod sandboxes included; it is imported from a tarball, never pulled.
const WorkloadImage = "registry.local/vfio-e2e-workload:1"

// Debian's runc and CNI plugins (packages runc and containernetworking-plugins).
const (
	RuncBinary   = "/usr/sbin/runc"
	CNIPluginDir = "/usr/lib/cni"
)

// kubeletSysctls are the host-wide values the kubelet sets at start. In the
// node's mount namespace files with these values hide the real ones, so the
// kubelet finds nothing to change and the host keeps its settings.
var kubeletSysctls = map[string]string{
	"vm/overcommit_memory":      "1",
	"vm/panic_on_oom":           "0",
	"kernel/panic":              "10",
	"kernel/panic_on_oops":      "1",
	"kernel/keys/root_maxkeys":  "1000000",
	"kernel/keys/root_maxbytes": "25000000",
}

// RealNodeOptions describe a real node. Node.Name is required; the other
// NodeOptions fields are the plugin's (KubeletRootDir and Registrations are
// set by StartRealNode).
type RealNodeOptions struct {
	Node NodeOptions
	// NoPlugin leaves the plugin out: the caller deploys it (as a DaemonSet)
	// or starts it later with StartPlugin.
	NoPlugin bool
	// StartTimeout limits each wait for containerd, the kubelet and the Node's
	// readiness; 0 means two minutes.
	StartTimeout time.Duration
}

// RealNode is a Kubernetes node with a real kubelet, containerd, runc and
// CNI, and the driver's plugin (a host process unless NoPlugin) on the
// emulated PCI devices of Node. The kubelet registers the plugin and calls
// NodePrepareResources and NodeUnprepareResources itself; containerd
// applies the CDI specs the plugin writes.
//
// containerd and the kubelet run in a private mount namespace, in which
// tmpfs hides /var/lib and /var/log and bind-mounted files hide the sysctls
// the kubelet would set, so nothing of theirs lands on the host's file
// systems or in its sysctls. What is shared with the host: an address on lo
// (the kubelet refuses a loopback node IP), a bridge for the pods' network
// (no IP, no forwarding, no NAT), and a cgroup subtree. The control plane's
// Stop removes all of it, pods and containers first, whether the test
// passed or not.
type RealNode struct {
	*Node
	// IP is the node's InternalIP, an address on lo.
	IP string
	// KubeletRootDir is the kubelet's --root-dir.
	KubeletRootDir string
	// CgroupRoot is the kubelet's cgroupRoot, below every cgroup hierarchy.
	CgroupRoot string
	// Bridge is the CNI bridge of the node's pods.
	Bridge string

	Namespace, Containerd, Kubelet *Process

	cp            *ControlPlane
	opts          RealNodeOptions
	binDir        string
	dir           string
	mountNS       string
	shimDir       string
	kubeletArgs   []string
	kubeletStarts int
	// chart is the plugin's DaemonSet (DeployChart).
	chart *ChartPlugin
}

// StartRealNode starts containerd and the kubelet for a node named
// opts.Node.Name, imports WorkloadImage, waits until the Node is Ready, and
// then starts the plugin (unless NoPlugin) and waits until the kubelet has
// connected to it. It needs root. The node is removed by cp.Stop, also when
// StartRealNode fails.
func StartRealNode(ctx context.Context, cp *ControlPlane, opts RealNodeOptions) (*RealNode, error) {
	if opts.Node.Name == "" {
		return nil, errors.New("node name is required")
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 2 * time.Minute
	}
	binDir := os.Getenv(NodeBinDirEnv)
	if binDir == "" {
		return nil, fmt.Errorf("%s is not set: it must name the directory that test/e2e/hack/build-node.sh builds (run the tests with test/e2e/run-node.sh)", NodeBinDirEnv)
	}
	for _, b := range NodeBinaries {
		if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
			return nil, fmt.Errorf("%s=%s lacks %s: build it with test/e2e/hack/build-node.sh", NodeBinDirEnv, binDir, b)
		}
	}
	for _, p := range []string{RuncBinary, filepath.Join(CNIPluginDir, "bridge"), filepath.Join(CNIPluginDir, "host-local"), filepath.Join(CNIPluginDir, "loopback")} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("a real node needs %s: apt-get install runc containernetworking-plugins", p)
		}
	}
	workload, err := DriverBinary(WorkloadBinary)
	if err != nil {
		return nil, err
	}
	for _, tool := range []string{"unshare", "nsenter", "ip", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("a real node needs %s (packages util-linux, mount and iproute2): %w", tool, err)
		}
	}

	id, err := randomHex(3)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(cp.Dir, "node-"+opts.Node.Name)
	n := &RealNode{
		KubeletRootDir: filepath.Join(dir, "kubelet"),
		CgroupRoot:     "/vfio-e2e-" + id,
		Bridge:         "vfioe2e" + id,
		cp:             cp,
		opts:           opts,
		binDir:         binDir,
		dir:            dir,
	}
	// Registered before anything is created, so that a failed start is
	// cleaned up too.
	cp.AddCleanup(n.cleanup)
	for _, d := range []string{"containerd", "cni/net.d", "cni/ipam", "cdi", "sysctl", "images", "pod-logs", "kubelet-pki"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(n.KubeletRootDir, 0o750); err != nil {
		return nil, err
	}
	// containerd refuses a shim socket directory longer than 42 bytes.
	if n.shimDir, err = os.MkdirTemp("", "vfe2e-"); err != nil {
		return nil, err
	}
	n.IP, err = n.addNodeIP(ctx)
	if err != nil {
		return nil, err
	}
	subnet, err := n.freeSubnet(ctx)
	if err != nil {
		return nil, err
	}
	if err := n.createCgroups(); err != nil {
		return nil, err
	}
	if err := n.writeConfigs(subnet); err != nil {
		return nil, err
	}
	image := filepath.Join(dir, "images", "workload.tar")
	err = WriteImage(Image{
		Name:       WorkloadImage,
		Entrypoint: []string{"/workload", "pause"},
		Files:      []ImageFile{{Path: "workload", Source: workload, Mode: 0o755}},
	}, image)
	if err != nil {
		return nil, err
	}

	if err := n.startNamespace(ctx); err != nil {
		return nil, err
	}
	if err := n.startContainerd(ctx); err != nil {
		return nil, err
	}
	if out, err := n.ctr(ctx, "images", "import", "--local", image); err != nil {
		return nil, fmt.Errorf("import %s: %w: %s", image, err, out)
	}
	if err := n.StartKubelet(ctx); err != nil {
		return nil, err
	}

	opts.Node.KubeletRootDir = n.KubeletRootDir
	opts.Node.Registrations = n.PluginConnections
	node, err := startNodeParts(ctx, cp, opts.Node, !opts.NoPlugin)
	n.Node = node
	if err != nil {
		return n, err
	}
	return n, nil
}

func (n *RealNode) containerdSocket() string {
	return filepath.Join(n.dir, "containerd", "containerd.sock")
}

// ctr runs containerd's client in the kubelet's containerd namespace.
func (n *RealNode) ctr(ctx context.Context, args ...string) (string, error) {
	args = append([]string{"--address=" + n.containerdSocket(), "--namespace=k8s.io"}, args...)
	out, err := exec.CommandContext(ctx, filepath.Join(n.binDir, "ctr"), args...).CombinedOutput()
	return string(out), err
}

// addNodeIP puts a free address of 10.250.0.0/16 on lo.
func (n *RealNode) addNodeIP(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "ip", "-o", "addr", "show").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("ip addr show: %w: %s", err, out)
	}
	for range 10 {
		b, err := randomBytes(2)
		if err != nil {
			return "", err
		}
		if b[1] == 0 || b[1] == 255 {
			continue
		}
		ip := fmt.Sprintf("10.250.%d.%d", b[0], b[1])
		if strings.Contains(string(out), " "+ip+"/") {
			continue
		}
		if out, err := exec.CommandContext(ctx, "ip", "addr", "add", ip+"/32", "dev", "lo").CombinedOutput(); err != nil {
			return "", fmt.Errorf("add node IP %s to lo: %w: %s", ip, err, out)
		}
		return ip, nil
	}
	return "", errors.New("no free node IP in 10.250.0.0/16")
}

// freeSubnet picks a /24 of 10.251.0.0/16 that no route uses.
func (n *RealNode) freeSubnet(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "ip", "-o", "route", "show", "table", "all").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("ip route show: %w: %s", err, out)
	}
	for range 10 {
		b, err := randomBytes(1)
		if err != nil {
			return "", err
		}
		subnet := fmt.Sprintf("10.251.%d.0/24", b[0])
		if !strings.Contains(string(out), subnet) {
			return subnet, nil
		}
	}
	return "", errors.New("no free pod subnet in 10.251.0.0/16")
}

// cgroupMounts returns the mount points of the cgroup hierarchies (v1 and v2).
func cgroupMounts() (v1s, v2s []string, err error) {
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return nil, nil, err
	}
	s := bufio.NewScanner(bytes.NewReader(data))
	for s.Scan() {
		f := strings.Fields(s.Text())
		if len(f) < 3 {
			continue
		}
		switch f[2] {
		case "cgroup":
			v1s = append(v1s, f[1])
		case "cgroup2":
			v2s = append(v2s, f[1])
		}
	}
	return v1s, v2s, s.Err()
}

// createCgroups creates the kubelet's cgroupRoot in every v1 hierarchy
// (the kubelet wants it to exist; the kubelet and runc create it in a v2
// hierarchy themselves).
func (n *RealNode) createCgroups() error {
	v1s, v2s, err := cgroupMounts()
	if err != nil {
		return err
	}
	if len(v1s) == 0 {
		for _, m := range v2s {
			if err := os.MkdirAll(filepath.Join(m, n.CgroupRoot), 0o755); err != nil {
				return err
			}
		}
		return nil
	}
	for _, m := range v1s {
		dir := filepath.Join(m, n.CgroupRoot)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("create cgroup %s: %w", dir, err)
		}
		// A cpuset cgroup without CPUs and memory nodes takes no tasks.
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			parent, err := os.ReadFile(filepath.Join(m, f))
			if err != nil {
				continue
			}
			if err := os.WriteFile(filepath.Join(dir, f), parent, 0o644); err != nil {
				return fmt.Errorf("set %s of cgroup %s: %w", f, dir, err)
			}
		}
	}
	return nil
}

type nodeConfig struct {
	Dir, NodeIP, Subnet, Bridge, CgroupRoot, CDIDir, Runc, CNIDir, Image, ShimDir string
	KubeletPort, HealthzPort                                                      int
	ContainerdSocket                                                              string
}

const containerdConfig = `version = 3
root = '{{.Dir}}/containerd/root'
state = '{{.Dir}}/containerd/state'
temp = '{{.Dir}}/containerd/tmp'
disabled_plugins = ['io.containerd.nri.v1.nri', 'io.containerd.snapshotter.v1.blockfile', 'io.containerd.snapshotter.v1.erofs', 'io.containerd.differ.v1.erofs', 'io.containerd.internal.v1.tracing', 'io.containerd.tracing.processor.v1.otlp']

[grpc]
  address = '{{.ContainerdSocket}}'
[ttrpc]
  address = '{{.ContainerdSocket}}.ttrpc'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{{.Image}}'
  [plugins.'io.containerd.cri.v1.runtime']
    # containerd 2.x always applies CDI; this is where it reads specs.
    cdi_spec_dirs = ['{{.CDIDir}}']
    # Without CAP_SYS_RESOURCE (as in Firecracker VMs) runc cannot lower
    # oom_score_adj, and every sandbox would fail.
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '{{.Runc}}'
          Root = '{{.Dir}}/containerd/runc'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['{{.CNIDir}}']
      conf_dir = '{{.Dir}}/cni/net.d'
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
  [plugins.'io.containerd.internal.v1.opt']
    path = '{{.Dir}}/containerd/opt'
  [plugins.'io.containerd.image-verifier.v1.bindir']
    bin_dir = '{{.Dir}}/containerd/image-verifier'
  [plugins.'io.containerd.shim.v1.manager']
    socket_dir = '{{.ShimDir}}'
`

// A bridge without an address: pods reach each other and nothing else, and
// the host needs no forwarding or NAT.
const cniConfig = `{
  "cniVersion": "1.0.0",
  "name": "vfio-e2e",
  "plugins": [{
    "type": "bridge",
    "bridge": "{{.Bridge}}",
    "isGateway": false,
    "ipMasq": false,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": "{{.Subnet}}"}]], "dataDir": "{{.Dir}}/cni/ipam"}
  }]
}
`

const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {{.NodeIP}}
port: {{.KubeletPort}}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {{.HealthzPort}}
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: unix://{{.ContainerdSocket}}
cgroupDriver: cgroupfs
cgroupRoot: {{.CgroupRoot}}
# Firecracker VMs and older hosts mount cgroup v1; 1.37 refuses it by default.
failCgroupV1: false
failSwapOn: false
podLogsDir: {{.Dir}}/pod-logs
resolvConf: ""
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
nodeStatusReportFrequency: 10s
nodeStatusUpdateFrequency: 2s
syncFrequency: 10s
fileCheckFrequency: 10s
`

func (n *RealNode) writeConfigs(subnet string) error {
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	cfg := nodeConfig{
		Dir: n.dir, NodeIP: n.IP, Subnet: subnet, Bridge: n.Bridge, CgroupRoot: n.CgroupRoot,
		CDIDir: filepath.Join(n.dir, "cdi"), Runc: RuncBinary, CNIDir: CNIPluginDir, Image: WorkloadImage,
		KubeletPort: ports[0], HealthzPort: ports[1], ContainerdSocket: n.containerdSocket(), ShimDir: n.shimDir,
	}
	files := map[string]string{
		"containerd/config.toml":         containerdConfig,
		"cni/net.d/10-vfio-e2e.conflist": cniConfig,
		"kubelet-config.yaml":            kubeletConfig,
	}
	for name, text := range files {
		var b bytes.Buffer
		if err := template.Must(template.New(name).Parse(text)).Execute(&b, cfg); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(n.dir, name), b.Bytes(), 0o644); err != nil {
			return err
		}
	}
	for key, value := range kubeletSysctls {
		if err := os.WriteFile(filepath.Join(n.dir, "sysctl", strings.ReplaceAll(key, "/", ".")), []byte(value+"\n"), 0o644); err != nil {
			return err
		}
	}
	n.kubeletArgs = []string{
		"--config=" + filepath.Join(n.dir, "kubelet-config.yaml"),
		"--kubeconfig=" + n.cp.KubeconfigPath,
		"--root-dir=" + n.KubeletRootDir,
		"--cert-dir=" + filepath.Join(n.dir, "kubelet-pki"),
		"--hostname-override=" + n.opts.Node.Name,
		"--node-ip=" + n.IP,
		// Level 2 logs the DRA plugin connections that PluginConnections counts.
		"--v=2",
	}
	return nil
}

// startNamespace starts the process that holds the node's mount namespace
// and sets it up.
func (n *RealNode) startNamespace(ctx context.Context) error {
	var script strings.Builder
	script.WriteString("set -e\n")
	// Hard-coded paths of the kubelet (device-plugins/kubelet.sock, the
	// /var/log/containers links) and of libcni (/var/lib/cni) stay private.
	script.WriteString("mount -t tmpfs -o mode=0755 vfio-e2e /var/lib\nmount -t tmpfs -o mode=0755 vfio-e2e /var/log\n")
	for key := range kubeletSysctls {
		fmt.Fprintf(&script, "mount --bind %s /proc/sys/%s\n", filepath.Join(n.dir, "sysctl", strings.ReplaceAll(key, "/", ".")), key)
	}
	script.WriteString("echo ready\nexec sleep infinity\n")
	unshare, _ := exec.LookPath("unshare")
	p, err := n.cp.StartProcess(n.opts.Node.Name+"-mountns", unshare, nil, "--mount", "--propagation", "slave", "--", "/bin/sh", "-c", script.String())
	if err != nil {
		return err
	}
	n.Namespace = p
	err = p.WaitReady(ctx, n.opts.StartTimeout, func(context.Context) error {
		data, err := os.ReadFile(p.LogPath)
		if err != nil {
			return err
		}
		if !hasLine(data, "ready") {
			return errors.New(`no "ready" line yet`)
		}
		return nil
	})
	if err != nil {
		return err
	}
	n.mountNS, err = os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", p.Pid()))
	return err
}

// startInNamespace starts binary in the node's mount namespace.
func (n *RealNode) startInNamespace(name, binary string, args ...string) (*Process, error) {
	nsenter, _ := exec.LookPath("nsenter")
	return n.cp.StartProcess(name, nsenter, nil, append([]string{"--target=" + strconv.Itoa(n.Namespace.Pid()), "--mount", "--", binary}, args...)...)
}

func (n *RealNode) startContainerd(ctx context.Context) error {
	p, err := n.startInNamespace(n.opts.Node.Name+"-containerd", filepath.Join(n.binDir, "containerd"),
		"--config="+filepath.Join(n.dir, "containerd", "config.toml"), "--log-level=info")
	if err != nil {
		return err
	}
	n.Containerd = p
	return p.WaitReady(ctx, n.opts.StartTimeout, func(ctx context.Context) error {
		out, err := n.ctr(ctx, "version")
		if err != nil {
			return fmt.Errorf("ctr version: %w: %s", err, out)
		}
		return nil
	})
}

// StartKubelet starts the kubelet (the first time from StartRealNode, again
// after StopKubelet) and waits until its Node is Ready. Each start logs to a
// file of its own.
func (n *RealNode) StartKubelet(ctx context.Context) error {
	if n.Kubelet != nil {
		if exited, _ := n.Kubelet.Exited(); !exited {
			return fmt.Errorf("kubelet %s is still running", n.Kubelet.Name)
		}
	}
	n.kubeletStarts++
	name := n.opts.Node.Name + "-kubelet"
	if n.kubeletStarts > 1 {
		name += "-" + strconv.Itoa(n.kubeletStarts)
	}
	started := time.Now()
	p, err := n.startInNamespace(name, filepath.Join(n.binDir, "kubelet"), n.kubeletArgs...)
	if err != nil {
		return err
	}
	n.Kubelet = p
	// Ready with a heartbeat of this kubelet, not one left by the last.
	return p.WaitReady(ctx, n.opts.StartTimeout, func(ctx context.Context) error {
		node, err := n.cp.Client.CoreV1().Nodes().Get(ctx, n.opts.Node.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range node.Status.Conditions {
			if c.Type == v1.NodeReady {
				if c.Status != v1.ConditionTrue || c.LastHeartbeatTime.Time.Before(started.Add(-time.Second)) {
					return fmt.Errorf("node %s: Ready=%s (%s: %s), last heartbeat %v", node.Name, c.Status, c.Reason, c.Message, c.LastHeartbeatTime)
				}
				return nil
			}
		}
		return fmt.Errorf("node %s has no Ready condition yet", node.Name)
	})
}

// StopKubelet stops the kubelet with SIGTERM, as systemd would. Its pods
// keep running.
func (n *RealNode) StopKubelet() {
	n.Kubelet.Stop()
}

// WaitForKubeletSync waits until the running kubelet (this start of it)
// has received pod from the API server, which starts its first sync of the
// pod.
func (n *RealNode) WaitForKubeletSync(ctx context.Context, pod *v1.Pod, timeout time.Duration) error {
	line := fmt.Sprintf(`"SyncLoop ADD" source="api" pods=["%s/%s"]`, pod.Namespace, pod.Name)
	return Poll(ctx, timeout, "kubelet "+n.Kubelet.Name+" syncs pod "+pod.Namespace+"/"+pod.Name, func(context.Context) (bool, string, error) {
		data, err := os.ReadFile(n.Kubelet.LogPath)
		if err != nil {
			return false, "", err
		}
		return bytes.Contains(data, []byte(line)), "no " + line + " in its log", nil
	})
}

// PluginConnections counts the kubelet's log lines (all starts) that report
// a new connection to the driver's plugin.
func (n *RealNode) PluginConnections() (int, error) {
	logs, err := filepath.Glob(filepath.Join(n.cp.Dir, n.opts.Node.Name+"-kubelet*.log"))
	if err != nil {
		return 0, err
	}
	count := 0
	for _, l := range logs {
		data, err := os.ReadFile(l)
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(string(data), "\n") {
			if strings.Contains(line, `"Connection changed"`) && strings.Contains(line, `driverName="`+DriverName+`"`) && strings.Contains(line, "connected=true") {
				count++
			}
		}
	}
	return count, nil
}

// cleanup removes the node: its pods (while the kubelet still runs, so that
// it unprepares their claims), then the plugin, the kubelet and containerd,
// every process left in the node's cgroups and mount namespace, the cgroups,
// the bridge and the node IP. It does what it can and logs the rest to the
// control plane's directory.
func (n *RealNode) cleanup() {
	var problems []string
	note := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if n.Kubelet != nil {
		if exited, _ := n.Kubelet.Exited(); !exited {
			if err := n.deleteAllPods(ctx, 60*time.Second); err != nil {
				note("delete pods: %v", err)
			}
			// The plugin's DaemonSet last: its pod unprepares the others'
			// claims.
			if n.chart != nil {
				if err := n.deleteChart(ctx); err != nil {
					note("delete the plugin's DaemonSet: %v", err)
				}
			}
		}
	}
	if n.Node != nil && n.Plugin != nil {
		n.Plugin.Stop()
	}
	for _, p := range []*Process{n.Kubelet, n.Containerd} {
		if p != nil {
			p.Stop()
		}
	}
	// Shims and containers outlive containerd; they are the node's if they
	// are in its mount namespace (shims) or its cgroups (containers).
	for range 20 {
		pids := n.cgroupProcesses()
		if n.mountNS != "" {
			pids = append(pids, processesInMountNS(n.mountNS, n.Namespace.Pid())...)
		}
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n.Namespace != nil {
		n.Namespace.Stop()
	}
	if err := n.removeCgroups(); err != nil {
		note("%v", err)
	}
	if out, err := exec.Command("ip", "link", "show", n.Bridge).CombinedOutput(); err == nil {
		if out, err := exec.Command("ip", "link", "del", n.Bridge).CombinedOutput(); err != nil {
			note("delete bridge %s: %v: %s", n.Bridge, err, out)
		}
	} else if !strings.Contains(string(out), "does not exist") {
		note("ip link show %s: %v: %s", n.Bridge, err, out)
	}
	if n.IP != "" {
		if out, err := exec.Command("ip", "addr", "del", n.IP+"/32", "dev", "lo").CombinedOutput(); err != nil {
			note("remove node IP %s from lo: %v: %s", n.IP, err, out)
		}
	}
	if n.shimDir != "" {
		if err := os.RemoveAll(n.shimDir); err != nil {
			note("%v", err)
		}
	}
	if len(problems) > 0 {
		msg := "cleanup of node " + n.opts.Node.Name + ":\n" + strings.Join(problems, "\n") + "\n"
		_ = os.WriteFile(filepath.Join(n.cp.Dir, n.opts.Node.Name+"-cleanup.log"), []byte(msg), 0o644)
		fmt.Fprint(os.Stderr, msg)
	}
}

// deleteAllPods deletes every pod on the node and waits until the kubelet
// has confirmed that they are gone.
func (n *RealNode) deleteAllPods(ctx context.Context, timeout time.Duration) error {
	client := n.cp.Client
	field := "spec.nodeName=" + n.opts.Node.Name
	pods, err := client.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: field})
	if err != nil {
		return err
	}
	plugin := func(p *v1.Pod) bool {
		return n.chart != nil && p.Namespace == n.chart.Namespace && isOwnedBy(p, n.chart.Name)
	}
	for _, p := range pods.Items {
		if plugin(&p) {
			continue
		}
		err := client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64(1))})
		if err != nil && !apierrors.IsNotFound(err) {
			return err
		}
	}
	return Poll(ctx, timeout, "pods of node "+n.opts.Node.Name+" gone", func(ctx context.Context) (bool, string, error) {
		pods, err := client.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: field})
		if err != nil {
			return false, "", err
		}
		left := 0
		for _, p := range pods.Items {
			if !plugin(&p) {
				left++
			}
		}
		return left == 0, fmt.Sprintf("%d pods left", left), nil
	})
}

// cgroupProcesses lists the processes in the node's cgroups.
func (n *RealNode) cgroupProcesses() []int {
	v1s, v2s, _ := cgroupMounts()
	var pids []int
	for _, m := range append(v1s, v2s...) {
		_ = filepath.WalkDir(filepath.Join(m, n.CgroupRoot), func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
				return nil
			}
			data, _ := os.ReadFile(path)
			for _, f := range strings.Fields(string(data)) {
				if pid, err := strconv.Atoi(f); err == nil {
					pids = append(pids, pid)
				}
			}
			return nil
		})
	}
	return pids
}

// processesInMountNS lists the processes in mount namespace ns, except
// the holder.
func processesInMountNS(ns string, holder int) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == holder {
			continue
		}
		if link, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid)); err == nil && link == ns {
			pids = append(pids, pid)
		}
	}
	return pids
}

// removeCgroups removes the node's cgroups, deepest first.
func (n *RealNode) removeCgroups() error {
	v1s, v2s, err := cgroupMounts()
	if err != nil {
		return err
	}
	var failed []string
	for _, m := range append(v1s, v2s...) {
		root := filepath.Join(m, n.CgroupRoot)
		var dirs []string
		_ = filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, path)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			var err error
			// A cgroup whose last task just died can be busy for a moment.
			for range 20 {
				if err = syscall.Rmdir(dirs[i]); err == nil || errors.Is(err, syscall.ENOENT) {
					err = nil
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if err != nil {
				failed = append(failed, fmt.Sprintf("%s: %v", dirs[i], err))
			}
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("remove cgroups: %s", strings.Join(failed, "; "))
	}
	return nil
}

// PodLogs returns the logs of a pod's container, through the apiserver and
// the kubelet.
func (n *RealNode) PodLogs(ctx context.Context, namespace, pod, container string) (string, error) {
	data, err := n.cp.Client.CoreV1().Pods(namespace).GetLogs(pod, &v1.PodLogOptions{Container: container}).DoRaw(ctx)
	if err != nil {
		return "", fmt.Errorf("logs of pod %s/%s container %s: %w", namespace, pod, container, err)
	}
	return string(data), nil
}

// WaitForPodLog waits until the logs of a pod's container contain text and
// returns them.
func (n *RealNode) WaitForPodLog(ctx context.Context, namespace, pod, container, text string, timeout time.Duration) (string, error) {
	var logs string
	err := Poll(ctx, timeout, fmt.Sprintf("pod %s/%s logs %q", namespace, pod, text), func(ctx context.Context) (bool, string, error) {
		var err error
		logs, err = n.PodLogs(ctx, namespace, pod, container)
		if err != nil {
			return false, err.Error(), nil
		}
		return strings.Contains(logs, text), fmt.Sprintf("%d bytes of logs", len(logs)), nil
	})
	return logs, err
}

// WaitForPodRunning waits until a pod's phase is Running and returns it.
func WaitForPodRunning(ctx context.Context, client kubernetes.Interface, namespace, name string, timeout time.Duration) (*v1.Pod, error) {
	var pod *v1.Pod
	err := Poll(ctx, timeout, fmt.Sprintf("pod %s/%s running", namespace, name), func(ctx context.Context) (bool, string, error) {
		var err error
		pod, err = client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		if pod.Status.Phase == v1.PodFailed || pod.Status.Phase == v1.PodSucceeded {
			return false, "", fmt.Errorf("pod %s/%s ended: %s", namespace, name, describePod(pod))
		}
		return pod.Status.Phase == v1.PodRunning, describePod(pod), nil
	})
	return pod, err
}

func describePod(pod *v1.Pod) string {
	parts := []string{"phase " + string(pod.Status.Phase)}
	for _, c := range pod.Status.Conditions {
		if c.Status != v1.ConditionTrue {
			parts = append(parts, fmt.Sprintf("%s=%s %s %s", c.Type, c.Status, c.Reason, c.Message))
		}
	}
	for _, cs := range pod.Status.ContainerStatuses {
		if w := cs.State.Waiting; w != nil {
			parts = append(parts, fmt.Sprintf("container %s waiting: %s %s", cs.Name, w.Reason, w.Message))
		}
		if t := cs.State.Terminated; t != nil {
			parts = append(parts, fmt.Sprintf("container %s terminated: %s (exit %d) %s", cs.Name, t.Reason, t.ExitCode, t.Message))
		}
	}
	return strings.Join(parts, "; ")
}

func randomBytes(n int) ([]byte, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("random bytes: %w", err)
	}
	return b, nil
}

func randomHex(n int) (string, error) {
	b, err := randomBytes(n)
	if err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}
