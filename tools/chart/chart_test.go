// Package chart_test decodes the Helm chart's metrics objects, rendered
// with every option (ci/all-options-values.yaml), strictly into their Go
// API types: the ServiceMonitor into the Prometheus Operator's, which the
// end-to-end API server cannot check (it has no such CRD). It also checks
// that they fit together: the ServiceMonitor finds the Service, the Service
// the plugin pods' metrics port.
package chart_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

// rendered holds the objects of one rendering that this test looks at.
type rendered struct {
	daemonSet       *appsv1.DaemonSet
	services        []*corev1.Service
	serviceMonitors []*monitoringv1.ServiceMonitor
}

// render runs deployments/helm/chart.sh template (Helm as the chart's
// checks build and cache it) and decodes the objects of file.
func render(t *testing.T) map[string]rendered {
	t.Helper()
	dir := t.TempDir()
	out, err := exec.CommandContext(t.Context(), "../../deployments/helm/chart.sh", "template", dir).CombinedOutput()
	if err != nil {
		t.Fatalf("chart.sh template: %v\n%s", err, out)
	}
	result := map[string]rendered{}
	for _, file := range []string{"default.yaml", "all-options.yaml"} {
		data, err := os.ReadFile(filepath.Join(dir, file))
		if err != nil {
			t.Fatal(err)
		}
		var r rendered
		for i, doc := range strings.Split(string(data), "\n---\n") {
			var meta struct{ APIVersion, Kind string }
			if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
				t.Fatalf("%s document %d: %v", file, i, err)
			}
			var obj any
			switch meta.APIVersion + " " + meta.Kind {
			case "apps/v1 DaemonSet":
				r.daemonSet = &appsv1.DaemonSet{}
				obj = r.daemonSet
			case "v1 Service":
				s := &corev1.Service{}
				r.services = append(r.services, s)
				obj = s
			case "monitoring.coreos.com/v1 ServiceMonitor":
				sm := &monitoringv1.ServiceMonitor{}
				r.serviceMonitors = append(r.serviceMonitors, sm)
				obj = sm
			default:
				continue
			}
			if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
				t.Fatalf("%s document %d (%s): %v", file, i, meta.Kind, err)
			}
		}
		if r.daemonSet == nil {
			t.Fatalf("%s has no DaemonSet", file)
		}
		result[file] = r
	}
	return result
}

func TestMetricsObjects(t *testing.T) {
	r := render(t)
	if d := r["default.yaml"]; len(d.services) != 0 || len(d.serviceMonitors) != 0 {
		t.Errorf("default values render %d Services and %d ServiceMonitors, want none (metrics are off)", len(d.services), len(d.serviceMonitors))
	}
	all := r["all-options.yaml"]
	if len(all.services) != 1 || len(all.serviceMonitors) != 1 {
		t.Fatalf("all options render %d Services and %d ServiceMonitors, want one each", len(all.services), len(all.serviceMonitors))
	}
	ds, svc, sm := all.daemonSet, all.services[0], all.serviceMonitors[0]

	// The Service selects the plugin pods and points at their metrics
	// port, the one the plugin listens on.
	if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("Service selector %v does not match the plugin pods' labels %v", svc.Spec.Selector, ds.Spec.Template.Labels)
	}
	if svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("Service clusterIP %q, want None (every pod scraped)", svc.Spec.ClusterIP)
	}
	plugin := ds.Spec.Template.Spec.Containers[0]
	if len(svc.Spec.Ports) != 1 {
		t.Fatalf("Service ports %v, want one", svc.Spec.Ports)
	}
	port := svc.Spec.Ports[0]
	i := slices.IndexFunc(plugin.Ports, func(p corev1.ContainerPort) bool { return p.Name == port.TargetPort.String() })
	if i < 0 {
		t.Fatalf("Service targetPort %s is no container port of the plugin (%v)", port.TargetPort.String(), plugin.Ports)
	}
	listen := "--metrics-bind-address=:" + strconv.Itoa(int(plugin.Ports[i].ContainerPort))
	if !slices.Contains(plugin.Args, listen) || port.Port != plugin.Ports[i].ContainerPort {
		t.Errorf("container port %d, Service port %d, plugin args %v: want %s everywhere", plugin.Ports[i].ContainerPort, port.Port, plugin.Args, listen)
	}

	// The ServiceMonitor finds the Service and its port.
	sel, err := metav1.LabelSelectorAsSelector(&sm.Spec.Selector)
	if err != nil {
		t.Fatal(err)
	}
	if !sel.Matches(labels.Set(svc.Labels)) {
		t.Errorf("ServiceMonitor selector %v does not match the Service's labels %v", sel, svc.Labels)
	}
	if !slices.Contains(sm.Spec.NamespaceSelector.MatchNames, svc.Namespace) {
		t.Errorf("ServiceMonitor looks in namespaces %v, the Service is in %s", sm.Spec.NamespaceSelector.MatchNames, svc.Namespace)
	}
	if len(sm.Spec.Endpoints) != 1 {
		t.Fatalf("ServiceMonitor endpoints %v, want one", sm.Spec.Endpoints)
	}
	ep := sm.Spec.Endpoints[0]
	if ep.Port != port.Name || ep.Path != "/metrics" {
		t.Errorf("ServiceMonitor endpoint port %q path %q, want %q /metrics", ep.Port, ep.Path, port.Name)
	}
	// The knobs of ci/all-options-values.yaml reach it.
	if ep.Interval != "15s" || ep.ScrapeTimeout != "5s" || sm.Namespace != "monitoring" || sm.Labels["release"] != "kube-prometheus-stack" {
		t.Errorf("ServiceMonitor interval %q timeout %q namespace %q labels %v, want the values of ci/all-options-values.yaml", ep.Interval, ep.ScrapeTimeout, sm.Namespace, sm.Labels)
	}
	if len(ep.RelabelConfigs) != 2 || ep.RelabelConfigs[0].TargetLabel != "node" || len(ep.MetricRelabelConfigs) != 1 {
		t.Errorf("ServiceMonitor relabelings %+v, metric relabelings %+v: want the node label, then the values' one; one metric relabeling", ep.RelabelConfigs, ep.MetricRelabelConfigs)
	}
}
