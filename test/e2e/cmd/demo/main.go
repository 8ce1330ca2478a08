// Command demo shows the vfio.dra.dev driver at work, end to end, on one
// machine: a real etcd, kube-apiserver, kube-scheduler and
// kube-controller-manager on 127.0.0.1, a real node (kubelet, containerd,
// runc, CNI) whose PCI devices are a copy of the demo node's sysfs tree with
// the kernel emulator beside it, the production kubelet plugin registered
// with that kubelet, and a pod that asks for the node's GPU. The kubelet
// prepares the pod's claim, the container sees its VFIO group, and deleting
// the pod makes the kubelet unprepare. At the end it tears everything down.
//
// demo/run.sh ("make demo") builds what it needs and runs it:
//
//	VFIO_E2E_BIN_DIR=~/.cache/vfio-dra-driver/control-plane VFIO_E2E_NODE_BIN_DIR=~/.cache/vfio-dra-driver/node \
//	  VFIO_E2E_DRIVER_BIN_DIR=bin demo --repo-root .
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/vfio-dra/vfio-dra-driver/test/e2e/framework"
)

const (
	nodeName = "demo-node"
	// waitTimeout bounds each wait for the plugin, the scheduler and the
	// controllers; on a busy machine they take seconds, not minutes.
	waitTimeout = time.Minute
)

func main() {
	repoRoot := flag.String("repo-root", ".", "the driver's repository (for demo/ and the configuration)")
	manifest := flag.String("manifest", "demo/gpu.yaml", "the workload to apply, relative to --repo-root: a DeviceClass, a claim template and a Pod")
	keep := flag.Bool("keep", false, "keep the logs and the node's directories after a successful run")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	d := &demo{out: os.Stdout, repoRoot: *repoRoot, manifest: *manifest}
	err := d.run(ctx)
	if ctx.Err() != nil {
		err = errors.New("interrupted")
	}
	d.teardown(*keep || (err != nil && ctx.Err() == nil))
	if err != nil {
		fmt.Fprintf(os.Stderr, "\ndemo failed: %v\n", err)
		os.Exit(1)
	}
}

type demo struct {
	out      io.Writer
	repoRoot string
	manifest string
	step     int

	cp   *framework.ControlPlane
	node *framework.RealNode
}

// steps is the number of headings run prints.
const steps = 9

func (d *demo) heading(format string, args ...any) {
	d.step++
	fmt.Fprintf(d.out, "\n==> [%d/%d] %s\n", d.step, steps, fmt.Sprintf(format, args...))
}

func (d *demo) say(format string, args ...any) {
	fmt.Fprintf(d.out, "    "+format+"\n", args...)
}

// show prints a command as a user would type it, then its output.
func (d *demo) show(output string, command ...string) {
	fmt.Fprintf(d.out, "\n$ %s\n", strings.Join(command, " "))
	fmt.Fprint(d.out, strings.TrimRight(output, "\n")+"\n")
}

// kubectl runs kubectl against the demo's control plane and shows it.
func (d *demo) kubectl(ctx context.Context, args ...string) error {
	out, err := d.cp.Kubectl(ctx, args...)
	if err != nil {
		return err
	}
	d.show(out, append([]string{"kubectl"}, args...)...)
	return nil
}

func (d *demo) run(ctx context.Context) error {
	configFile := filepath.Join(d.repoRoot, "demo", "config.yaml")
	manifest := filepath.Join(d.repoRoot, d.manifest)
	pod, err := podOf(manifest)
	if err != nil {
		return err
	}
	// Fail before starting anything when a binary is missing.
	for _, name := range []string{framework.PluginBinary, framework.EmulatorBinary, framework.WorkloadBinary, "vfio-dra"} {
		if _, err := framework.DriverBinary(name); err != nil {
			return err
		}
	}

	d.heading("Starting a control plane on 127.0.0.1: etcd, kube-apiserver, kube-scheduler, kube-controller-manager")
	start := time.Now()
	d.cp, err = framework.Start(ctx, framework.Options{})
	if err != nil {
		return fmt.Errorf("start control plane: %w", err)
	}
	version, err := d.cp.Client.Discovery().ServerVersion()
	if err != nil {
		return err
	}
	d.say("Kubernetes %s ready in %v at %s", version.GitVersion, time.Since(start).Round(100*time.Millisecond), d.cp.Config.Host)
	d.say("kubeconfig and logs: %s", d.cp.Dir)

	d.heading("Starting node %s: containerd, the kubelet, and the kubelet plugin on a copy of demo/sysfs", nodeName)
	start = time.Now()
	d.node, err = framework.StartRealNode(ctx, d.cp, framework.RealNodeOptions{Node: framework.NodeOptions{Name: nodeName, ConfigFile: configFile}})
	if err != nil {
		return err
	}
	d.say("kubelet v1.37.2 and containerd v2.4.2 (runc, CNI bridge %s) in a private mount namespace; node IP %s", d.node.Bridge, d.node.IP)
	d.say("sysfs of the node:  %s (the emulator moves driver links as Linux does)", d.node.SysfsRoot)
	d.say("/dev of the node:   %s", d.node.DevRoot)
	d.say("CDI spec directory: %s (containerd reads it)", d.node.CDIRoot)
	d.say("$ vfio-kubelet-plugin %s", strings.Join(d.node.PluginArgs(), " \\\n        "))
	d.say("node Ready and the plugin registered with the kubelet in %v; DRA service: %s", time.Since(start).Round(100*time.Millisecond),
		filepath.Join(d.node.PluginDataDir, "dra.sock"))
	if err := d.kubectl(ctx, "get", "nodes", "-o", "wide"); err != nil {
		return err
	}

	d.heading("What the plugin sees on the node: one decision per PCI function")
	inspectBin, _ := framework.DriverBinary("vfio-dra")
	args := []string{"inspect", "--sysfs-root", d.node.SysfsRoot, "--proc-root", d.node.ProcRoot, "--node-name", nodeName, "--config", configFile}
	out, err := exec.CommandContext(ctx, inspectBin, args...).Output()
	if err != nil {
		return fmt.Errorf("vfio-dra %s: %w", strings.Join(args, " "), err)
	}
	d.show(string(out), append([]string{"vfio-dra"}, args...)...)

	d.heading("The ResourceSlices the plugin published: devices, and a counter per shared IOMMU group")
	if _, err := framework.WaitForPool(ctx, d.cp.Client, nodeName, waitTimeout); err != nil {
		return err
	}
	if err := d.kubectl(ctx, "get", "resourceslices"); err != nil {
		return err
	}
	if err := d.kubectl(ctx, "get", "resourceslices", "-o",
		"custom-columns=NAME:.metadata.name,COUNTER SETS:.spec.sharedCounters[*].name,DEVICES:.spec.devices[*].name"); err != nil {
		return err
	}

	d.heading("A pod that asks for the GPU: scheduled, its claim prepared by the kubelet, its container started")
	data, err := os.ReadFile(manifest)
	if err != nil {
		return err
	}
	d.show(string(data), "cat", d.manifest)
	before, err := d.node.AllDrivers()
	if err != nil {
		return err
	}
	start = time.Now()
	if err := d.kubectl(ctx, "apply", "-f", manifest); err != nil {
		return err
	}
	running, err := framework.WaitForPodRunning(ctx, d.cp.Client, pod.Namespace, pod.Name, waitTimeout)
	if err != nil {
		return err
	}
	container := running.Spec.Containers[0].Name
	logs, err := d.node.WaitForPodLog(ctx, pod.Namespace, pod.Name, container, "== ready", waitTimeout)
	if err != nil {
		return err
	}
	d.say("Running %v after kubectl apply", time.Since(start).Round(100*time.Millisecond))
	if err := d.kubectl(ctx, "get", "pods", "-n", pod.Namespace, "-o", "wide"); err != nil {
		return err
	}
	claims, err := waitForClaims(ctx, d.cp, running)
	if err != nil {
		return err
	}
	if err := d.kubectl(ctx, "get", "resourceclaims", "-n", pod.Namespace, "-o",
		"custom-columns=NAME:.metadata.name,DRIVER:.status.allocation.devices.results[*].driver,POOL:.status.allocation.devices.results[*].pool,DEVICE:.status.allocation.devices.results[*].device,RESERVED FOR:.status.reservedFor[*].name"); err != nil {
		return err
	}

	d.heading("What the kubelet's NodePrepareResources did on the node: the whole IOMMU group on vfio-pci, a CDI spec")
	if err := d.showDrivers(before); err != nil {
		return err
	}
	for _, c := range claims {
		spec := d.node.CDISpecPath(string(c.UID))
		data, err := os.ReadFile(spec)
		if err != nil {
			return fmt.Errorf("CDI spec of claim %s/%s: %w", c.Namespace, c.Name, err)
		}
		var pretty bytes.Buffer
		if err := json.Indent(&pretty, data, "", "  "); err != nil {
			pretty.Reset()
			pretty.Write(data)
		}
		d.show(pretty.String(), "cat", spec)
	}

	d.heading("Inside the container: its VFIO devices, environment and device metadata")
	if err := d.kubectl(ctx, "exec", "-n", pod.Namespace, pod.Name, "--", "/workload", "ls", "/dev/vfio"); err != nil {
		return err
	}
	d.show(vfioLines(logs), "kubectl", "logs", "-n", pod.Namespace, pod.Name, "# the opens, the VFIO_ variables and the metadata files")

	d.heading("Deleting the pod: the kubelet stops the container and calls NodeUnprepareResources")
	prepared, err := d.node.AllDrivers()
	if err != nil {
		return err
	}
	if err := d.kubectl(ctx, "delete", "pod", "-n", pod.Namespace, pod.Name, "--wait=true"); err != nil {
		return err
	}
	err = framework.Poll(ctx, waitTimeout, "functions back on their drivers", func(context.Context) (bool, string, error) {
		now, err := d.node.AllDrivers()
		return maps.Equal(now, before), fmt.Sprintf("drivers %v", now), err
	})
	if err != nil {
		return err
	}
	if err := d.showDrivers(prepared); err != nil {
		return err
	}
	for _, c := range claims {
		spec := d.node.CDISpecPath(string(c.UID))
		_, err := os.Stat(spec)
		if err == nil {
			return fmt.Errorf("CDI spec %s of claim %s/%s still exists after unprepare", spec, c.Namespace, c.Name)
		}
		if !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	d.say("CDI spec removed.")
	return d.kubectl(ctx, "get", "resourceclaims", "-n", pod.Namespace)
}

// vfioLines picks from the probe's output what a VFIO consumer does and
// reads: opening the device nodes, the VFIO_ variables and the metadata files.
func vfioLines(logs string) string {
	var out []string
	inMetadata := false
	for _, l := range strings.Split(logs, "\n") {
		switch {
		case strings.HasPrefix(l, "== metadata"):
			inMetadata = true
		case strings.HasPrefix(l, "== "):
			inMetadata = false
		case inMetadata, strings.HasPrefix(l, "open "), strings.HasPrefix(l, "VFIO_"):
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// showDrivers prints the driver link of every function whose driver is not
// the one in before, and whether the VFIO device of its IOMMU group exists.
func (d *demo) showDrivers(before map[string]string) error {
	now, err := d.node.AllDrivers()
	if err != nil {
		return err
	}
	changed := 0
	for _, addr := range slices.Sorted(maps.Keys(now)) {
		if now[addr] == before[addr] {
			continue
		}
		changed++
		dir := filepath.Join(d.node.SysfsRoot, "bus", "pci", "devices", addr)
		target, err := os.Readlink(filepath.Join(dir, "driver"))
		if err != nil {
			return err
		}
		d.show(target, "readlink", filepath.Join(dir, "driver"))
		group, err := os.Readlink(filepath.Join(dir, "iommu_group"))
		if err != nil {
			return err
		}
		groupDev := filepath.Join(d.node.DevRoot, "vfio", filepath.Base(group))
		state := "absent"
		var st unix.Stat_t
		if err := unix.Stat(groupDev, &st); err == nil {
			state = fmt.Sprintf("character device %d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		}
		d.say("%s: %s -> %s; %s: %s", addr, orNone(before[addr]), orNone(now[addr]), groupDev, state)
	}
	if changed == 0 {
		return errors.New("no PCI function changed its driver")
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

// teardown stops every process; the directory with the logs is removed
// unless keep is set.
func (d *demo) teardown(keep bool) {
	d.step = steps - 1
	d.heading("Tearing down: pods, the plugin, the kubelet, containerd, the emulator and the control plane")
	if d.cp == nil {
		d.say("nothing was started")
		return
	}
	if keep {
		fmt.Fprint(d.out, d.cp.LogDump(20))
	}
	d.cp.Stop()
	d.say("all processes stopped; the node's cgroups, bridge and address removed")
	if keep {
		d.say("logs, kubeconfig and the node's directories kept in %s", d.cp.Dir)
		return
	}
	if err := os.RemoveAll(d.cp.Dir); err != nil {
		d.say("could not remove %s: %v", d.cp.Dir, err)
		return
	}
	d.say("removed %s", d.cp.Dir)
}

// podOf returns the namespace and name of the Pod in a manifest.
func podOf(path string) (metav1.ObjectMeta, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return metav1.ObjectMeta{}, err
	}
	var found []metav1.ObjectMeta
	for _, doc := range strings.Split(string(data), "\n---") {
		var obj struct {
			metav1.TypeMeta   `json:",inline"`
			metav1.ObjectMeta `json:"metadata"`
		}
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
			return metav1.ObjectMeta{}, fmt.Errorf("%s: %w", path, err)
		}
		if obj.Kind == "Pod" {
			if obj.Namespace == "" {
				obj.Namespace = metav1.NamespaceDefault
			}
			found = append(found, obj.ObjectMeta)
		}
	}
	if len(found) != 1 {
		return metav1.ObjectMeta{}, fmt.Errorf("%s: want one Pod, found %d", path, len(found))
	}
	return found[0], nil
}

// waitForClaims waits until every claim of the pod exists and is allocated
// and reserved for it, and returns them: claims named in the pod spec, those
// generated from templates, and the one for extended resources.
func waitForClaims(ctx context.Context, cp *framework.ControlPlane, pod *v1.Pod) ([]*resourceapi.ResourceClaim, error) {
	var names []string
	err := framework.Poll(ctx, waitTimeout, fmt.Sprintf("claims of pod %s/%s created", pod.Namespace, pod.Name), func(ctx context.Context) (bool, string, error) {
		p, err := cp.Client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		names = names[:0]
		generated := map[string]string{}
		for _, s := range p.Status.ResourceClaimStatuses {
			if s.ResourceClaimName != nil {
				generated[s.Name] = *s.ResourceClaimName
			}
		}
		for _, c := range p.Spec.ResourceClaims {
			switch {
			case c.ResourceClaimName != nil:
				names = append(names, *c.ResourceClaimName)
			case generated[c.Name] != "":
				names = append(names, generated[c.Name])
			default:
				return false, fmt.Sprintf("no claim generated for %s yet", c.Name), nil
			}
		}
		if s := p.Status.ExtendedResourceClaimStatus; s != nil {
			names = append(names, s.ResourceClaimName)
		}
		return len(names) > 0, "the pod has no claims", nil
	})
	if err != nil {
		return nil, err
	}
	var claims []*resourceapi.ResourceClaim
	for _, name := range names {
		c, err := framework.WaitForClaim(ctx, cp.Client, pod.Namespace, name, waitTimeout, "reserved for the pod", func(c *resourceapi.ResourceClaim) bool {
			return c.Status.Allocation != nil && slices.ContainsFunc(c.Status.ReservedFor, func(r resourceapi.ResourceClaimConsumerReference) bool {
				return r.UID == pod.UID
			})
		})
		if err != nil {
			return nil, err
		}
		claims = append(claims, c)
	}
	return claims, nil
}
