package v1alpha1_test

import (
	"encoding/json"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/vfio-dra/vfio-dra-driver/api/v1alpha1"
)

// FuzzDecodeDriverConfiguration: whatever the bytes, decoding returns an
// error or a valid configuration that survives a round trip unchanged.
func FuzzDecodeDriverConfiguration(f *testing.F) {
	for _, s := range []string{
		"apiVersion: vfio.dra.dev/v1alpha1\nkind: DriverConfiguration\nallow:\n- vendorID: \"19ee\"\n- class: \"0302\"\ndeny:\n- pciAddress: \"0000:3b:00.1\"\n- driver: nvme\n",
		`{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"DriverConfiguration","deny":[{"class":"01"}]}`,
		"apiVersion: vfio.dra.dev/v1alpha1\nkind: DriverConfiguration\nallow:\n- vendor: \"19ee\"\n",
		"apiVersion: vfio.dra.dev/v1alpha1\nkind: DriverConfiguration\nallow: &a [*a]\n",
		"kind: VfioConfig\n", "", "- [", "{}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := v1alpha1.DecodeDriverConfiguration("fuzz.yaml", data)
		if err != nil {
			return
		}
		if errs := c.Validate(); len(errs) > 0 {
			t.Fatalf("decoded configuration is invalid: %v", errs)
		}
		out, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		again, err := v1alpha1.DecodeDriverConfiguration("again.json", out)
		if err != nil {
			t.Fatalf("re-encoded configuration %s does not decode: %v", out, err)
		}
		// An empty list and no list mean the same, and the JSON form
		// leaves empty lists out.
		if diff := cmp.Diff(c, again, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("round trip changed the configuration (-first +again):\n%s", diff)
		}
	})
}

// FuzzDecodeVfioConfig: the same for the opaque device configuration, from
// a DeviceClass and from a claim.
func FuzzDecodeVfioConfig(f *testing.F) {
	for _, s := range []string{
		`{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","driver":"auto","restoreDriver":true,"iommufd":false}`,
		`{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","driver":"mlx5_vfio_pci"}`,
		`{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","driver":"../../x"}`,
		`{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","iommufd":true,"iommufd":false}`,
		`{"kind":"VfioConfig"}`, `null`, ``,
	} {
		f.Add([]byte(s), false)
		f.Add([]byte(s), true)
	}
	f.Fuzz(func(t *testing.T, data []byte, fromClaim bool) {
		c, err := v1alpha1.DecodeVfioConfig(data, fromClaim)
		if err != nil {
			return
		}
		if errs := c.Validate(fromClaim); len(errs) > 0 {
			t.Fatalf("decoded config is invalid: %v", errs)
		}
		out, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		again, err := v1alpha1.DecodeVfioConfig(out, fromClaim)
		if err != nil {
			t.Fatalf("re-encoded config %s does not decode: %v", out, err)
		}
		if diff := cmp.Diff(c, again); diff != "" {
			t.Fatalf("round trip changed the config (-first +again):\n%s", diff)
		}
	})
}
