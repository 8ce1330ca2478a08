package plugin_test

import (
	"bytes"
	"encoding/json"
	"maps"
	"os"
	"regexp"
	"testing"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/dynamic-resource-allocation/api/metadata"
	"k8s.io/dynamic-resource-allocation/deviceattribute"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/utils/ptr"

	"github.com/vfio-dra/vfio-dra-driver/pkg/plugin"
	"github.com/vfio-dra/vfio-dra-driver/pkg/resources"
)

// kubevirtMetadata is the shape virt-launcher decodes the metadata file into
// (kubevirt/kubevirt pkg/dra/metadata, which mirrors KEP-5304 v1alpha1).
type kubevirtMetadata struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
		UID  string `json:"uid"`
	} `json:"metadata"`
	Requests []struct {
		Name    string `json:"name"`
		Devices []struct {
			Driver     string                                                    `json:"driver"`
			Pool       string                                                    `json:"pool"`
			Name       string                                                    `json:"name"`
			Attributes map[resourceapi.QualifiedName]resourceapi.DeviceAttribute `json:"attributes"`
		} `json:"devices"`
	} `json:"requests"`
}

// decodeLikeKubeVirt reads a metadata stream as virt-launcher does: the
// first object whose apiVersion is metadata.resource.k8s.io/v1alpha1; other
// versions are skipped. It also returns every apiVersion in the stream.
func decodeLikeKubeVirt(t *testing.T, data []byte) (*kubevirtMetadata, []string) {
	t.Helper()
	var found *kubevirtMetadata
	var versions []string
	dec := json.NewDecoder(bytes.NewReader(data))
	for dec.More() {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			t.Fatalf("metadata stream: %v", err)
		}
		var peek struct {
			APIVersion string `json:"apiVersion"`
		}
		if err := json.Unmarshal(raw, &peek); err != nil {
			t.Fatalf("metadata object: %v", err)
		}
		versions = append(versions, peek.APIVersion)
		if peek.APIVersion != "metadata.resource.k8s.io/v1alpha1" || found != nil {
			continue
		}
		found = &kubevirtMetadata{}
		if err := json.Unmarshal(raw, found); err != nil {
			t.Fatalf("decode v1alpha1 metadata: %v", err)
		}
	}
	if found == nil {
		t.Fatalf("no metadata.resource.k8s.io/v1alpha1 object in the stream (versions %v): KubeVirt cannot read it", versions)
	}
	return found, versions
}

// extendedBDF is the form KubeVirt hands to libvirt: lower-case
// domain:bus:device.function.
var extendedBDF = regexp.MustCompile(`^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$`)

// TestMetadataKubeVirtReads: the metadata file a container gets for each
// request decodes the way KubeVirt's virt-launcher decodes it, names the one
// allocated function of the request by its pciBusID, and carries every
// attribute the device was published with.
func TestMetadataKubeVirtReads(t *testing.T) {
	t.Parallel()
	const (
		gpu      = "0000:01:00.0" // group 2, with its audio function
		smartNIC = "0000:82:00.0"
	)
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.start(ctx, t)

	published := map[string]resourceapi.Device{}
	for _, s := range n.publishedSlices(ctx, t, func(s []resourceapi.ResourceSlice) bool { return len(s) > 0 }) {
		for _, d := range s.Spec.Devices {
			published[d.Name] = d
		}
	}
	results := []resourceapi.DeviceRequestAllocationResult{result("gpu", gpu), result("nic", smartNIC)}
	claim := n.createClaim(ctx, t, "vm", results)
	devs := n.mustPrepare(ctx, t, claim)

	spec := n.inject(t, allCDIIDs(devs))
	mounts := map[string]string{}
	for _, m := range spec.Mounts {
		mounts[m.Destination] = m.Source
	}
	for _, r := range results {
		// The path virt-launcher opens for a claim named in the VMI's
		// resourceClaims (resourceClaimName).
		dest := metadata.ResourceClaimFilePath(plugin.DefaultDriverName, claim.Name, r.Request)
		src, ok := mounts[dest]
		if !ok {
			t.Errorf("request %s: the container gets no metadata file at %s; mounts %v", r.Request, dest, mounts)
			continue
		}
		data, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		md, versions := decodeLikeKubeVirt(t, data)
		if diff := cmp.Diff([]string{"metadata.resource.k8s.io/v1beta1", "metadata.resource.k8s.io/v1alpha1"}, versions); diff != "" {
			t.Errorf("request %s: versions in the stream (-want +got):\n%s", r.Request, diff)
		}
		if md.Kind != "DeviceMetadata" || md.Metadata.Name != claim.Name || md.Metadata.UID != string(claim.UID) {
			t.Errorf("request %s: metadata is %s for %s/%s, want DeviceMetadata for %s/%s", r.Request, md.Kind, md.Metadata.Name, md.Metadata.UID, claim.Name, claim.UID)
		}
		if len(md.Requests) != 1 || md.Requests[0].Name != r.Request {
			t.Errorf("request %s: metadata has requests %+v, want only %s", r.Request, md.Requests, r.Request)
			continue
		}
		// KubeVirt refuses a request with more than one device.
		if len(md.Requests[0].Devices) != 1 {
			t.Errorf("request %s: %d devices, KubeVirt takes exactly one", r.Request, len(md.Requests[0].Devices))
			continue
		}
		got := md.Requests[0].Devices[0]
		if got.Driver != plugin.DefaultDriverName || got.Pool != nodeName || got.Name != r.Device {
			t.Errorf("request %s: device %s/%s/%s, want %s/%s/%s", r.Request, got.Driver, got.Pool, got.Name, plugin.DefaultDriverName, nodeName, r.Device)
		}
		bus := got.Attributes[deviceattribute.StandardDeviceAttributePCIBusID].StringValue
		if bus == nil || !extendedBDF.MatchString(*bus) {
			t.Errorf("request %s: pciBusID %v is not a lower-case extended BDF", r.Request, bus)
		} else if want := map[string]string{"gpu": gpu, "nic": smartNIC}[r.Request]; *bus != want {
			t.Errorf("request %s: pciBusID %s, want %s", r.Request, *bus, want)
		}
		if _, ok := got.Attributes["mdevUUID"]; ok {
			t.Errorf("request %s: a whole PCI function has no mdevUUID, but the metadata has one", r.Request)
		}
		pub, ok := published[r.Device]
		if !ok {
			t.Fatalf("device %s was not published", r.Device)
		}
		// Every published attribute, and the driver prepare bound the
		// device to.
		want := maps.Clone(pub.Attributes)
		want[resources.AttrVFIODriver] = resourceapi.DeviceAttribute{StringValue: ptr.To("vfio-pci")}
		if diff := cmp.Diff(want, got.Attributes); diff != "" {
			t.Errorf("request %s: metadata attributes differ from the published ones and vfioDriver (-want +metadata):\n%s", r.Request, diff)
		}
	}

	// A restarted plugin answers a repeated prepare from its checkpoint
	// with the same metadata.
	before, err := os.ReadFile(mounts[metadata.ResourceClaimFilePath(plugin.DefaultDriverName, claim.Name, "gpu")])
	if err != nil {
		t.Fatal(err)
	}
	n.driver.Stop()
	n.start(ctx, t)
	devs = n.mustPrepare(ctx, t, claim)
	spec = n.inject(t, allCDIIDs(devs))
	for _, m := range spec.Mounts {
		if m.Destination != metadata.ResourceClaimFilePath(plugin.DefaultDriverName, claim.Name, "gpu") {
			continue
		}
		after, err := os.ReadFile(m.Source)
		if err != nil {
			t.Fatal(err)
		}
		a, _ := decodeLikeKubeVirt(t, before)
		b, _ := decodeLikeKubeVirt(t, after)
		if diff := cmp.Diff(a.Requests, b.Requests); diff != "" {
			t.Errorf("metadata after a restart (-before +after):\n%s", diff)
		}
	}
}
