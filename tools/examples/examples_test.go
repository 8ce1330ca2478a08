// Package examples_test decodes every example under examples/ strictly into
// the Go API types of the objects it holds: Kubernetes' own and KubeVirt's
// (kubevirt.io/api), so that a field KubeVirt does not know fails here.
package examples_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

const (
	examples   = "../../examples"
	deviceClss = "vfio.dra.dev"
)

// objects holds the decoded documents of one example file.
type objects struct {
	templates map[string]*resourceapi.ResourceClaimTemplate
	pods      []*corev1.Pod
	vmis      []*kubevirtv1.VirtualMachineInstance
}

func decode(t *testing.T, file string) objects {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(examples, file))
	if err != nil {
		t.Fatal(err)
	}
	o := objects{templates: map[string]*resourceapi.ResourceClaimTemplate{}}
	for i, doc := range strings.Split(string(data), "\n---\n") {
		var meta struct{ APIVersion, Kind string }
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatalf("%s document %d: %v", file, i, err)
		}
		var obj any
		switch meta.APIVersion + " " + meta.Kind {
		case "resource.k8s.io/v1 ResourceClaimTemplate":
			obj = &resourceapi.ResourceClaimTemplate{}
		case "v1 Pod":
			obj = &corev1.Pod{}
		case "kubevirt.io/v1 VirtualMachineInstance":
			obj = &kubevirtv1.VirtualMachineInstance{}
		default:
			t.Fatalf("%s document %d: unexpected %s %s", file, i, meta.APIVersion, meta.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			t.Fatalf("%s document %d (%s): %v", file, i, meta.Kind, err)
		}
		switch v := obj.(type) {
		case *resourceapi.ResourceClaimTemplate:
			o.templates[v.Name] = v
		case *corev1.Pod:
			o.pods = append(o.pods, v)
		case *kubevirtv1.VirtualMachineInstance:
			o.vmis = append(o.vmis, v)
		}
	}
	return o
}

// request returns the named request of a template, checking that it asks
// the driver's class for exactly one device.
func (o objects) request(t *testing.T, template, name string) *resourceapi.ExactDeviceRequest {
	t.Helper()
	tmpl, ok := o.templates[template]
	if !ok {
		t.Fatalf("ResourceClaimTemplate %s is not in the example", template)
	}
	for _, r := range tmpl.Spec.Spec.Devices.Requests {
		if r.Name != name {
			continue
		}
		if r.Exactly == nil || r.Exactly.DeviceClassName != deviceClss {
			t.Fatalf("template %s request %s does not ask DeviceClass %s", template, name, deviceClss)
		}
		if r.Exactly.Count > 1 {
			t.Errorf("template %s request %s asks for %d devices", template, name, r.Exactly.Count)
		}
		return r.Exactly
	}
	t.Fatalf("template %s has no request %s", template, name)
	return nil
}

// checkPodClaims checks that every claim a container uses is one of the
// pod's, from a template of the example.
func (o objects) checkPodClaims(t *testing.T, p *corev1.Pod) {
	t.Helper()
	for _, c := range p.Spec.Containers {
		for _, rc := range c.Resources.Claims {
			i := slices.IndexFunc(p.Spec.ResourceClaims, func(pc corev1.PodResourceClaim) bool { return pc.Name == rc.Name })
			if i < 0 {
				t.Fatalf("pod %s container %s uses claim %s, which the pod does not have", p.Name, c.Name, rc.Name)
			}
			tmpl := p.Spec.ResourceClaims[i].ResourceClaimTemplateName
			if tmpl == nil {
				t.Fatalf("pod %s claim %s has no template", p.Name, rc.Name)
			}
			if _, ok := o.templates[*tmpl]; !ok {
				t.Fatalf("pod %s claim %s: template %s is not in the example", p.Name, rc.Name, *tmpl)
			}
		}
	}
}

func TestVFIOLs(t *testing.T) {
	o := decode(t, "vfio-ls.yaml")
	if len(o.pods) != 1 {
		t.Fatalf("%d pods", len(o.pods))
	}
	o.checkPodClaims(t, o.pods[0])
	o.request(t, "smartnic", "nic")
	if !strings.Contains(strings.Join(o.pods[0].Spec.Containers[0].Command, " "), "ls -l /dev/vfio") {
		t.Errorf("the pod does not list /dev/vfio")
	}
}

// TestKubeVirtVMI: the VMI takes its host device from a claim the way
// KubeVirt resolves it (claimName is a spec.resourceClaims entry,
// requestName a request of its template, one device per request).
func TestKubeVirtVMI(t *testing.T) {
	o := decode(t, "kubevirt-vmi.yaml")
	if len(o.vmis) != 1 {
		t.Fatalf("%d VMIs", len(o.vmis))
	}
	vmi := o.vmis[0]
	if len(vmi.Spec.Domain.Devices.HostDevices) == 0 {
		t.Fatal("the VMI has no host devices")
	}
	for _, hd := range vmi.Spec.Domain.Devices.HostDevices {
		if hd.ClaimRequest == nil || hd.DeviceName != "" {
			t.Fatalf("host device %s does not come from a claim", hd.Name)
		}
		i := slices.IndexFunc(vmi.Spec.ResourceClaims, func(rc kubevirtv1.VirtualMachineInstanceResourceClaim) bool {
			return rc.Name == hd.ClaimName
		})
		if i < 0 {
			t.Fatalf("host device %s names claim %s, which is not in spec.resourceClaims", hd.Name, hd.ClaimName)
		}
		rc := vmi.Spec.ResourceClaims[i]
		if rc.ResourceClaimTemplateName == nil {
			t.Fatalf("claim %s has no template", rc.Name)
		}
		o.request(t, *rc.ResourceClaimTemplateName, hd.RequestName)
	}
}

// TestExtendedResource: the seed-style pod asks for an extended resource
// that a DeviceClass of the chart's example values provides.
func TestExtendedResource(t *testing.T) {
	o := decode(t, "extended-resource.yaml")
	if len(o.pods) != 1 || len(o.pods[0].Spec.ResourceClaims) != 0 {
		t.Fatalf("want one pod without claims")
	}
	data, err := os.ReadFile("../../deployments/helm/vfio-dra-driver/ci/all-options-values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var values struct {
		DeviceClasses struct {
			Models []struct {
				Name                 string `json:"name"`
				ExtendedResourceName string `json:"extendedResourceName"`
			} `json:"models"`
		} `json:"deviceClasses"`
	}
	if err := yaml.Unmarshal(data, &values); err != nil {
		t.Fatal(err)
	}
	limits := o.pods[0].Spec.Containers[0].Resources.Limits
	if len(limits) != 1 {
		t.Fatalf("limits %v, want one extended resource", limits)
	}
	for res, q := range limits {
		if res != "devices.example.com/19ee_4000" || q.Value() != 1 {
			t.Errorf("the pod asks for %s: %s, want devices.example.com/19ee_4000: 1", res, q.String())
		}
		if !slices.ContainsFunc(values.DeviceClasses.Models, func(m struct {
			Name                 string `json:"name"`
			ExtendedResourceName string `json:"extendedResourceName"`
		}) bool {
			return m.ExtendedResourceName == string(res)
		}) {
			t.Errorf("no DeviceClass of the chart's example values provides %s", res)
		}
	}
}

func TestDPDK(t *testing.T) {
	o := decode(t, "dpdk.yaml")
	if len(o.pods) != 1 {
		t.Fatalf("%d pods", len(o.pods))
	}
	p := o.pods[0]
	o.checkPodClaims(t, p)
	o.request(t, "dpdk-vf", "vf")
	c := p.Spec.Containers[0]
	if c.SecurityContext == nil || c.SecurityContext.Capabilities == nil || !slices.Contains(c.SecurityContext.Capabilities.Add, "IPC_LOCK") {
		t.Errorf("the DPDK container cannot lock memory for DMA: no IPC_LOCK")
	}
	if _, ok := c.Resources.Limits["hugepages-2Mi"]; !ok {
		t.Errorf("the DPDK container has no hugepages")
	}
}
