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
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"

	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview/hostviewtest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// DriverName is the name of the DRA driver under test.
const DriverName = "vfio.dra.dev"

// Binaries of the driver (DriverBinDirEnv) that a Node runs.
const (
	PluginBinary   = "vfio-kubelet-plugin"
	EmulatorBinary = "kernelemu"
)

// NodeOptions describe a Node. Name is required.
type NodeOptions struct {
	// Name of the Node object and of the plugin's pool.
	Name string
	// ConfigFile is the plugin's --config (a DriverConfiguration); "" offers
	// everything the built-in rules allow.
	ConfigFile string
	// PluginArgs are extra plugin flags, appended after the framework's own.
	PluginArgs []string
	// EmulatorArgs are extra kernelemu flags (e.g. --busy ADDRESS).
	EmulatorArgs []string
	// StartTimeout limits how long the emulator and each plugin start may
	// take; 0 means one minute.
	StartTimeout time.Duration
	// KubeletRootDir is the --root-dir of a real kubelet on this node
	// (StartRealNode): the plugin's sockets go below it, the Node object is
	// the kubelet's own, and the kubelet, not the caller, registers the
	// plugin and calls DRA; Node.DRA stays nil. "" plays the kubelet.
	KubeletRootDir string
	// Layout lays out the node's sysfs tree and host view below sysfsRoot
	// and procRoot instead of the demo server's (pcitest.NewServer and
	// hostviewtest.Server), e.g. pcitest.NewSRIOVNode and hostviewtest.New,
	// and returns the host view (Node.Host).
	Layout func(sysfsRoot, procRoot string) (*hostviewtest.Host, error)
	// Registrations, with KubeletRootDir, counts how often the kubelet has
	// connected to the plugin; StartPlugin waits until it grows.
	Registrations func() (int, error)
}

// Node is a Kubernetes node without a kubelet: a Node object, a copy of the
// demo server's sysfs tree (pcitest.NewServer), the kernel emulator that
// reacts to the plugin's sysfs writes as Linux does, and the production
// kubelet plugin binary running against the control plane. Callers play the
// kubelet through DRA.
//
// All directories live below the control plane's directory, so they are kept
// with the logs when a test fails. The processes are stopped with the control
// plane.
type Node struct {
	Name string
	// Dir holds the node's directories.
	Dir string
	// The plugin's host roots. DevRoot is also the plugin's --host-dev-root:
	// CDI specs name the emulator's device nodes.
	SysfsRoot, DevRoot, ProcRoot, CDIRoot, PluginDataDir, RegistrarDir string
	// BootID is what the plugin reads from ProcRoot.
	BootID string
	// Host is what the host uses, as the plugin's host view reads it
	// below SysfsRoot and ProcRoot; a test may add to it.
	Host *hostviewtest.Host

	Emulator, Plugin *Process
	// DRA is connected to the running plugin's DRA service; StartPlugin
	// replaces it.
	DRA *DRAPluginClient

	cp           *ControlPlane
	opts         NodeOptions
	pluginBinary string
	pluginStarts int
}

// StartNode creates the Node object, lays out the node's sysfs tree, and
// starts the kernel emulator and the kubelet plugin. It returns once the
// plugin has registered (as with the kubelet's plugin watcher) and its DRA
// socket exists. On error, the processes that were started stop with the
// control plane.
func StartNode(ctx context.Context, cp *ControlPlane, opts NodeOptions) (*Node, error) {
	return startNodeParts(ctx, cp, opts, true)
}

// startNodeParts is StartNode; without startPlugin the caller starts the
// plugin (StartPlugin) or deploys it.
func startNodeParts(ctx context.Context, cp *ControlPlane, opts NodeOptions, startPlugin bool) (*Node, error) {
	if opts.Name == "" {
		return nil, errors.New("node name is required")
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = time.Minute
	}
	pluginBinary, err := DriverBinary(PluginBinary)
	if err != nil {
		return nil, err
	}
	emulatorBinary, err := DriverBinary(EmulatorBinary)
	if err != nil {
		return nil, err
	}
	bootID, err := newBootID()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(cp.Dir, "node-"+opts.Name)
	n := &Node{
		Name:          opts.Name,
		Dir:           dir,
		SysfsRoot:     filepath.Join(dir, "sys"),
		DevRoot:       filepath.Join(dir, "dev"),
		ProcRoot:      filepath.Join(dir, "proc"),
		CDIRoot:       filepath.Join(dir, "cdi"),
		PluginDataDir: filepath.Join(dir, "plugins", DriverName),
		RegistrarDir:  filepath.Join(dir, "plugins_registry"),
		BootID:        bootID,
		cp:            cp,
		opts:          opts,
		pluginBinary:  pluginBinary,
	}
	if opts.KubeletRootDir != "" {
		// Where the kubelet's plugin watcher and the helper's defaults put them.
		n.PluginDataDir = filepath.Join(opts.KubeletRootDir, "plugins", DriverName)
		n.RegistrarDir = filepath.Join(opts.KubeletRootDir, "plugins_registry")
	}
	for _, d := range []string{n.DevRoot, n.CDIRoot, n.PluginDataDir, n.RegistrarDir, filepath.Join(n.ProcRoot, "sys", "kernel", "random")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := os.WriteFile(filepath.Join(n.ProcRoot, "sys", "kernel", "random", "boot_id"), []byte(bootID+"\n"), 0o644); err != nil {
		return nil, err
	}
	if opts.Layout != nil {
		if n.Host, err = opts.Layout(n.SysfsRoot, n.ProcRoot); err != nil {
			return nil, fmt.Errorf("lay out node %s: %w", opts.Name, err)
		}
	} else {
		if _, err := pcitest.NewServer(n.SysfsRoot); err != nil {
			return nil, fmt.Errorf("lay out the demo server's sysfs: %w", err)
		}
		// What the host uses: root on the chipset's SATA disk, the default
		// route on the SR-IOV PF; nothing the server offers.
		if n.Host, err = hostviewtest.Server(n.SysfsRoot, n.ProcRoot); err != nil {
			return nil, fmt.Errorf("lay out the demo server's host view: %w", err)
		}
	}
	// The plugin's ResourceSlices are owned by the Node; it must exist first.
	// A kubelet has registered its Node already.
	if opts.KubeletRootDir == "" {
		if _, err := CreateNode(ctx, cp.Client, opts.Name); err != nil {
			return nil, err
		}
	}

	n.Emulator, err = cp.StartProcess(opts.Name+"-kernelemu", emulatorBinary, nil,
		append([]string{"--sysfs-root=" + n.SysfsRoot, "--dev-root=" + n.DevRoot}, opts.EmulatorArgs...)...)
	if err != nil {
		return nil, err
	}
	// It prints "ready" once it watches the sysfs files the plugin writes.
	err = n.Emulator.WaitReady(ctx, opts.StartTimeout, func(context.Context) error {
		data, err := os.ReadFile(n.Emulator.LogPath)
		if err != nil {
			return err
		}
		if !hasLine(data, "ready") {
			return errors.New(`no "ready" line yet`)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if !startPlugin {
		return n, nil
	}
	if err := n.StartPlugin(ctx); err != nil {
		return n, err
	}
	return n, nil
}

func hasLine(data []byte, line string) bool {
	s := bufio.NewScanner(bytes.NewReader(data))
	for s.Scan() {
		if s.Text() == line {
			return true
		}
	}
	return false
}

// PluginArgs returns the plugin's command line flags.
func (n *Node) PluginArgs() []string {
	args := []string{
		"--kubeconfig=" + n.cp.KubeconfigPath,
		"--node-name=" + n.Name,
		"--driver-name=" + DriverName,
		"--sysfs-root=" + n.SysfsRoot,
		"--dev-root=" + n.DevRoot,
		"--host-dev-root=" + n.DevRoot,
		"--proc-root=" + n.ProcRoot,
		"--cdi-root=" + n.CDIRoot,
		"--plugin-data-dir=" + n.PluginDataDir,
		"--registrar-dir=" + n.RegistrarDir,
		// Driver "auto" would read the host kernel's modules.alias.
		"--modules-alias=",
		// Level 5 logs what the ResourceSlice controller compares and writes.
		"--v=5",
	}
	if n.opts.ConfigFile != "" {
		args = append(args, "--config="+n.opts.ConfigFile)
	}
	return append(args, n.opts.PluginArgs...)
}

// RegistrationSocket is where the plugin's registration service listens.
func (n *Node) RegistrationSocket() string {
	return filepath.Join(n.RegistrarDir, DriverName+"-reg.sock")
}

// StartPlugin starts the kubelet plugin on the node's directories: the first
// time from StartNode, again after StopPlugin. Each start gets a log of its
// own (<node>-plugin.log, <node>-plugin-2.log, ...). It registers the plugin
// the way the kubelet's plugin watcher does and connects DRA to the endpoint
// that the plugin reports.
func (n *Node) StartPlugin(ctx context.Context) error {
	if n.Plugin != nil {
		if exited, _ := n.Plugin.Exited(); !exited {
			return fmt.Errorf("plugin %s is still running", n.Plugin.Name)
		}
	}
	n.pluginStarts++
	name := n.Name + "-plugin"
	if n.pluginStarts > 1 {
		name += "-" + strconv.Itoa(n.pluginStarts)
	}
	registered := 0
	if n.opts.KubeletRootDir != "" {
		var err error
		if registered, err = n.opts.Registrations(); err != nil {
			return err
		}
	}
	p, err := n.cp.StartProcess(name, n.pluginBinary, nil, n.PluginArgs()...)
	if err != nil {
		return err
	}
	n.Plugin = p
	if n.opts.KubeletRootDir != "" {
		return p.WaitReady(ctx, n.opts.StartTimeout, func(context.Context) error {
			count, err := n.opts.Registrations()
			if err != nil {
				return err
			}
			if count <= registered {
				return fmt.Errorf("the kubelet has not connected to plugin %s yet", name)
			}
			// The kubelet connects as soon as the registration socket
			// listens, before the plugin has published.
			data, err := os.ReadFile(p.LogPath)
			if err != nil {
				return err
			}
			if !bytes.Contains(data, []byte(`"Kubelet plugin started"`)) {
				return fmt.Errorf("plugin %s has not finished starting", name)
			}
			return nil
		})
	}
	// A socket left behind by an earlier process exists before the new one
	// listens, so only an answer counts.
	var endpoint string
	err = p.WaitReady(ctx, n.opts.StartTimeout, func(ctx context.Context) error {
		info, err := RegisterPlugin(ctx, n.RegistrationSocket(), DriverName)
		if err != nil {
			return err
		}
		endpoint = info.Endpoint
		return nil
	})
	if err != nil {
		return err
	}
	if want := filepath.Join(n.PluginDataDir, "dra.sock"); endpoint != want {
		return fmt.Errorf("plugin %s reports endpoint %s, want %s", name, endpoint, want)
	}
	if err := WaitForSocket(ctx, p, endpoint, n.opts.StartTimeout); err != nil {
		return err
	}
	dra, err := NewDRAPluginClient(endpoint)
	if err != nil {
		return err
	}
	n.DRA = dra
	return nil
}

// StopPlugin sends SIGTERM to the plugin, waits until it has exited (after
// the grace period it is killed) and returns its exit error, nil
// for a clean exit.
func (n *Node) StopPlugin() error {
	if n.DRA != nil {
		_ = n.DRA.Close()
		n.DRA = nil
	}
	n.Plugin.Stop()
	return n.Plugin.Wait()
}

// Driver returns the driver that the sysfs tree shows bound to a PCI function
// ("" for none).
func (n *Node) Driver(addr string) (string, error) {
	link, err := os.Readlink(filepath.Join(n.SysfsRoot, pci.BusDevicesDir, addr, "driver"))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return filepath.Base(link), nil
}

// Drivers returns Driver for each address, keyed by address.
func (n *Node) Drivers(addrs ...string) (map[string]string, error) {
	out := make(map[string]string, len(addrs))
	for _, a := range addrs {
		d, err := n.Driver(a)
		if err != nil {
			return nil, err
		}
		out[a] = d
	}
	return out, nil
}

// Functions returns the addresses of all PCI functions of the node, sorted.
func (n *Node) Functions() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(n.SysfsRoot, pci.BusDevicesDir))
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	slices.Sort(out)
	return out, nil
}

// AllDrivers returns Driver for every PCI function of the node.
func (n *Node) AllDrivers() (map[string]string, error) {
	addrs, err := n.Functions()
	if err != nil {
		return nil, err
	}
	return n.Drivers(addrs...)
}

// CDISpecPath is the file in which the plugin writes the CDI spec of a claim.
func (n *Node) CDISpecPath(claimUID string) string {
	return filepath.Join(n.CDIRoot, "k8s."+DriverName+"-vfio_"+claimUID+".json")
}

// ClaimRef is how the kubelet names a claim in its DRA calls.
func ClaimRef(claim *resourceapi.ResourceClaim) *drapb.Claim {
	return &drapb.Claim{Namespace: claim.Namespace, Name: claim.Name, Uid: string(claim.UID)}
}

// Prepare calls NodePrepareResources for one claim, as the kubelet does
// before it starts a pod, and returns the plugin's answer for it. A claim
// that the plugin failed to prepare is an error.
func (n *Node) Prepare(ctx context.Context, claim *drapb.Claim) (*drapb.NodePrepareResourceResponse, error) {
	resp, err := n.DRA.NodePrepareResources(ctx, &drapb.NodePrepareResourcesRequest{Claims: []*drapb.Claim{claim}})
	if err != nil {
		return nil, fmt.Errorf("NodePrepareResources %s/%s: %w", claim.Namespace, claim.Name, err)
	}
	r := resp.Claims[claim.Uid]
	if r == nil || len(resp.Claims) != 1 {
		return nil, fmt.Errorf("NodePrepareResources %s/%s: want one answer for UID %s, got %v", claim.Namespace, claim.Name, claim.Uid, resp.Claims)
	}
	if r.Error != "" {
		return nil, fmt.Errorf("NodePrepareResources %s/%s: %s", claim.Namespace, claim.Name, r.Error)
	}
	return r, nil
}

// Unprepare calls NodeUnprepareResources for one claim, as the kubelet does
// after the pod's containers are gone.
func (n *Node) Unprepare(ctx context.Context, claim *drapb.Claim) error {
	resp, err := n.DRA.NodeUnprepareResources(ctx, &drapb.NodeUnprepareResourcesRequest{Claims: []*drapb.Claim{claim}})
	if err != nil {
		return fmt.Errorf("NodeUnprepareResources %s/%s: %w", claim.Namespace, claim.Name, err)
	}
	r := resp.Claims[claim.Uid]
	if r == nil || len(resp.Claims) != 1 {
		return fmt.Errorf("NodeUnprepareResources %s/%s: want one answer for UID %s, got %v", claim.Namespace, claim.Name, claim.Uid, resp.Claims)
	}
	if r.Error != "" {
		return fmt.Errorf("NodeUnprepareResources %s/%s: %s", claim.Namespace, claim.Name, r.Error)
	}
	return nil
}

// ListNodeSlices returns the driver's ResourceSlices of a node, sorted by name.
func ListNodeSlices(ctx context.Context, client kubernetes.Interface, nodeName string) ([]resourceapi.ResourceSlice, error) {
	list, err := client.ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{
		FieldSelector: fields.Set{resourceapi.ResourceSliceSelectorDriver: DriverName, resourceapi.ResourceSliceSelectorNodeName: nodeName}.String(),
	})
	if err != nil {
		return nil, fmt.Errorf("list ResourceSlices of node %s: %w", nodeName, err)
	}
	items := list.Items
	slices.SortFunc(items, func(a, b resourceapi.ResourceSlice) int { return strings.Compare(a.Name, b.Name) })
	return items, nil
}

// WaitForPool waits until the driver's pool of a node is complete: every
// slice has the newest generation and there are as many as the pool says.
// It returns the slices, sorted by name.
func WaitForPool(ctx context.Context, client kubernetes.Interface, nodeName string, timeout time.Duration) ([]resourceapi.ResourceSlice, error) {
	var items []resourceapi.ResourceSlice
	err := Poll(ctx, timeout, fmt.Sprintf("ResourceSlices of driver %s on node %s published", DriverName, nodeName), func(ctx context.Context) (bool, string, error) {
		var err error
		items, err = ListNodeSlices(ctx, client, nodeName)
		if err != nil {
			return false, "", err
		}
		if len(items) == 0 {
			return false, "no slices", nil
		}
		var newest int64
		for _, s := range items {
			newest = max(newest, s.Spec.Pool.Generation)
		}
		var current []resourceapi.ResourceSlice
		for _, s := range items {
			if s.Spec.Pool.Generation == newest {
				current = append(current, s)
			}
		}
		want := current[0].Spec.Pool.ResourceSliceCount
		state := fmt.Sprintf("%d slices, %d of generation %d, pool wants %d", len(items), len(current), newest, want)
		return len(current) == len(items) && int64(len(items)) == want, state, nil
	})
	if err != nil {
		return nil, err
	}
	return items, nil
}

// newBootID returns a random ID formatted like the kernel's
// /proc/sys/kernel/random/boot_id.
func newBootID() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("create boot ID: %w", err)
	}
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32], nil
}
