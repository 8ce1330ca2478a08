package framework

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/yaml"
)

// ImageTarEnv names the OCI layout tarball that "make image" writes; its
// image is the one the chart's DaemonSet runs on a real node.
const ImageTarEnv = "VFIO_E2E_IMAGE_TAR"

// ImageNameEnv names the image in ImageTarEnv's tarball.
const ImageNameEnv = "VFIO_E2E_IMAGE"

// ChartManifests are the files of deployments/kubernetes (the chart
// rendered with its defaults) that DeployChart applies, in order. The
// DeviceClass is the test's.
var ChartManifests = []string{"namespace.yaml", "rbac.yaml", "admission-policy.yaml", "configmap.yaml", "daemonset.yaml"}

// ChartPlugin is the chart's DaemonSet running the plugin on a real node.
type ChartPlugin struct {
	Namespace, Name string
}

// DeployChart runs the plugin as the chart's DaemonSet from the manifests
// in dir (deployments/kubernetes), with the chart's ServiceAccount, RBAC
// and admission policy, on the image that "make image" built (imported
// into the node's containerd from its tarball). The control plane must
// run with Options.ServiceAccounts. What the test changes is what a user
// would set in the chart's values or what this node lacks: the kubelet
// and CDI directories, the image and pull policy, the node configuration
// of the demo; and, because the node's sysfs, /dev and /proc are the
// emulator's, the host paths of those mounts and --host-dev-root; and
// because this node has no Service network, host networking with the
// apiserver's address in KUBERNETES_SERVICE_HOST/PORT (what in-cluster
// configuration reads) and a free port for the health check. It waits until
// the kubelet has connected to the plugin and the node's pool is
// published. The DaemonSet is deleted in the node's cleanup, after the
// other pods.
func (n *RealNode) DeployChart(ctx context.Context, dir string) (*ChartPlugin, error) {
	tar, image := os.Getenv(ImageTarEnv), os.Getenv(ImageNameEnv)
	if tar == "" || image == "" {
		return nil, fmt.Errorf("%s and %s must name the tarball of \"make image\" and its image (run the tests with test/e2e/run-node.sh)", ImageTarEnv, ImageNameEnv)
	}
	if out, err := n.ctr(ctx, "images", "import", "--local", "--platform=linux/amd64", tar); err != nil {
		return nil, fmt.Errorf("import %s: %w: %s", tar, err, out)
	}
	node, err := n.cp.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	patch := []byte(`{"metadata":{"labels":{"vfio.dra.dev/enabled":"true"}}}`)
	if _, err := n.cp.Client.CoreV1().Nodes().Patch(ctx, node.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return nil, fmt.Errorf("label node %s: %w", n.Name, err)
	}
	ports, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	apiserver, err := url.Parse(n.cp.Config.Host)
	if err != nil {
		return nil, err
	}
	modules := filepath.Join(n.dir, "modules")
	if err := os.MkdirAll(modules, 0o755); err != nil {
		return nil, err
	}
	var docs []string
	plugin := &ChartPlugin{}
	for _, f := range ChartManifests {
		data, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			return nil, err
		}
		// The chart's values kubeletPlugin.kubeletDir and cdiDir.
		text := strings.NewReplacer("/var/lib/kubelet", n.KubeletRootDir, "/var/run/cdi", n.CDIRoot).Replace(string(data))
		for _, doc := range strings.Split(text, "\n---") {
			var meta struct {
				Kind string `json:"kind"`
			}
			if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
				return nil, fmt.Errorf("%s: %w", f, err)
			}
			switch meta.Kind {
			case "":
				continue
			case "ConfigMap":
				doc, err = n.withNodeConfig(doc)
			case "DaemonSet":
				doc, err = n.chartDaemonSet(doc, image, modules, apiserver, ports[0], plugin)
			}
			if err != nil {
				return nil, fmt.Errorf("%s: %w", f, err)
			}
			docs = append(docs, doc)
		}
	}
	registered, err := n.PluginConnections()
	if err != nil {
		return nil, err
	}
	if out, err := n.cp.KubectlWithInput(ctx, strings.NewReader(strings.Join(docs, "\n---\n")), "apply", "-f", "-"); err != nil {
		return nil, fmt.Errorf("apply the chart's manifests: %w: %s", err, out)
	}
	n.chart = plugin
	if _, err := n.WaitForChartPlugin(ctx, registered, "", n.opts.StartTimeout); err != nil {
		return nil, err
	}
	return plugin, nil
}

// withNodeConfig replaces the chart's node configuration with the
// plugin's --config of the node (NodeOptions.ConfigFile).
func (n *RealNode) withNodeConfig(doc string) (string, error) {
	var cm v1.ConfigMap
	if err := yaml.Unmarshal([]byte(doc), &cm); err != nil {
		return "", err
	}
	if n.opts.Node.ConfigFile != "" {
		data, err := os.ReadFile(n.opts.Node.ConfigFile)
		if err != nil {
			return "", err
		}
		cm.Data["config.yaml"] = string(data)
	}
	out, err := yaml.Marshal(&cm)
	return string(out), err
}

func (n *RealNode) chartDaemonSet(doc, image, modules string, apiserver *url.URL, healthPort int, plugin *ChartPlugin) (string, error) {
	var ds appsv1.DaemonSet
	if err := yaml.Unmarshal([]byte(doc), &ds); err != nil {
		return "", err
	}
	plugin.Namespace, plugin.Name = ds.Namespace, ds.Name
	spec := &ds.Spec.Template.Spec
	spec.HostNetwork = true
	if len(spec.Containers) != 1 {
		return "", fmt.Errorf("DaemonSet %s has %d containers, want 1", ds.Name, len(spec.Containers))
	}
	c := &spec.Containers[0]
	c.Image, c.ImagePullPolicy = image, v1.PullNever
	c.Env = append(c.Env,
		v1.EnvVar{Name: "KUBERNETES_SERVICE_HOST", Value: apiserver.Hostname()},
		v1.EnvVar{Name: "KUBERNETES_SERVICE_PORT", Value: apiserver.Port()})
	var args []string
	for _, a := range c.Args {
		if !strings.HasPrefix(a, "--healthcheck-port=") {
			args = append(args, a)
		}
	}
	c.Args = append(args, "--healthcheck-port="+strconv.Itoa(healthPort), "--host-dev-root="+n.DevRoot, "--modules-alias=", "--rescan-interval=1s")
	for i := range c.Ports {
		if c.Ports[i].Name == "healthcheck" {
			c.Ports[i].ContainerPort = int32(healthPort)
		}
	}
	for _, p := range []*v1.Probe{c.StartupProbe, c.LivenessProbe} {
		if p != nil && p.GRPC != nil {
			p.GRPC.Port = int32(healthPort)
		}
	}
	hostPaths := map[string]string{"/sys": n.SysfsRoot, "/dev/vfio": filepath.Join(n.DevRoot, "vfio"), "/proc": n.ProcRoot, "/lib/modules": modules}
	for _, v := range spec.Volumes {
		if v.HostPath == nil {
			continue
		}
		if p, ok := hostPaths[v.HostPath.Path]; ok {
			v.HostPath.Path = p
		}
	}
	out, err := yaml.Marshal(&ds)
	return string(out), err
}

// WaitForChartPlugin waits until the chart's DaemonSet runs a plugin pod
// on the node other than old (a pod name, "" for any), the kubelet has
// connected to it (more connections than registered) and the pool is
// published, and returns the pod.
func (n *RealNode) WaitForChartPlugin(ctx context.Context, registered int, old string, timeout time.Duration) (*v1.Pod, error) {
	var pod *v1.Pod
	err := Poll(ctx, timeout, "the chart's plugin pod on node "+n.Name+" running and connected", func(ctx context.Context) (bool, string, error) {
		var err error
		pod, err = n.ChartPluginPod(ctx)
		if err != nil {
			return false, err.Error(), nil
		}
		if pod.Name == old || pod.Status.Phase != v1.PodRunning {
			return false, "pod " + pod.Name + ": " + describePod(pod), nil
		}
		if cs := pod.Status.ContainerStatuses; len(cs) > 0 && cs[0].RestartCount > 0 {
			// What made the container exit.
			tail := int64(5)
			data, err := n.cp.Client.CoreV1().Pods(pod.Namespace).GetLogs(pod.Name, &v1.PodLogOptions{Container: cs[0].Name, Previous: true, TailLines: &tail}).DoRaw(ctx)
			if err != nil {
				data = []byte(err.Error())
			}
			var last string
			if t := cs[0].LastTerminationState.Terminated; t != nil {
				last = fmt.Sprintf("exit %d %s %s", t.ExitCode, t.Reason, t.Message)
			}
			return false, fmt.Sprintf("pod %s restarted %d times; the last container ended (%s) with:\n%s", pod.Name, cs[0].RestartCount, last, data), nil
		}
		count, err := n.PluginConnections()
		if err != nil {
			return false, "", err
		}
		if count <= registered {
			return false, "the kubelet has not connected to pod " + pod.Name + " yet", nil
		}
		logs, err := n.PodLogs(ctx, pod.Namespace, pod.Name, pod.Spec.Containers[0].Name)
		if err != nil {
			return false, err.Error(), nil
		}
		if !strings.Contains(logs, `"Kubelet plugin started"`) {
			return false, "pod " + pod.Name + " has not finished starting", nil
		}
		return true, "", nil
	})
	if err != nil {
		return nil, err
	}
	if _, err := WaitForPool(ctx, n.cp.Client, n.Name, timeout); err != nil {
		return nil, err
	}
	return pod, nil
}

// ChartPluginPod returns the chart's plugin pod on the node (not one
// being deleted).
func (n *RealNode) ChartPluginPod(ctx context.Context) (*v1.Pod, error) {
	if n.chart == nil {
		return nil, errors.New("the chart is not deployed")
	}
	pods, err := n.cp.Client.CoreV1().Pods(n.chart.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + n.Name})
	if err != nil {
		return nil, err
	}
	for i, p := range pods.Items {
		if p.DeletionTimestamp == nil && isOwnedBy(&p, n.chart.Name) {
			return &pods.Items[i], nil
		}
	}
	return nil, fmt.Errorf("no pod of DaemonSet %s/%s on node %s", n.chart.Namespace, n.chart.Name, n.Name)
}

func isOwnedBy(p *v1.Pod, daemonSet string) bool {
	for _, o := range p.OwnerReferences {
		if o.Kind == "DaemonSet" && o.Name == daemonSet {
			return true
		}
	}
	return false
}

// RollChartPlugin starts a rolling update of the chart's DaemonSet, as
// "kubectl rollout restart" does, and waits until a new pod runs and the
// kubelet has connected to it. It returns the new pod.
func (n *RealNode) RollChartPlugin(ctx context.Context) (*v1.Pod, error) {
	old, err := n.ChartPluginPod(ctx)
	if err != nil {
		return nil, err
	}
	registered, err := n.PluginConnections()
	if err != nil {
		return nil, err
	}
	patch := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":%q}}}}}`, time.Now().Format(time.RFC3339Nano))
	if _, err := n.cp.Client.AppsV1().DaemonSets(n.chart.Namespace).Patch(ctx, n.chart.Name, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		return nil, fmt.Errorf("roll DaemonSet %s/%s: %w", n.chart.Namespace, n.chart.Name, err)
	}
	return n.WaitForChartPlugin(ctx, registered, old.Name, n.opts.StartTimeout)
}

// deleteChart deletes the chart's DaemonSet and waits until its pods are
// gone.
func (n *RealNode) deleteChart(ctx context.Context) error {
	err := n.cp.Client.AppsV1().DaemonSets(n.chart.Namespace).Delete(ctx, n.chart.Name, metav1.DeleteOptions{PropagationPolicy: new(metav1.DeletePropagationBackground)})
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return Poll(ctx, time.Minute, "pods of DaemonSet "+n.chart.Name+" gone", func(ctx context.Context) (bool, string, error) {
		pods, err := n.cp.Client.CoreV1().Pods(n.chart.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + n.Name})
		if err != nil {
			return false, "", err
		}
		for _, p := range pods.Items {
			if isOwnedBy(&p, n.chart.Name) {
				return false, "pod " + p.Name + " is left", nil
			}
		}
		return true, "", nil
	})
}
