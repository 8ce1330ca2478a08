package v1alpha1

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestLoadDriverConfiguration(t *testing.T) {
	tests := map[string]struct {
		content string
		want    *DriverConfiguration
		wantErr []string // substrings, besides the file name
	}{
		"allow and deny": {
			content: `apiVersion: vfio.dra.dev/v1alpha1
kind: DriverConfiguration
allow:
- vendorID: "19ee"
  deviceID: "4000"
- class: "0302"
deny:
- pciAddress: "0000:3b:00.1"
- driver: nvme
`,
			want: &DriverConfiguration{
				Allow: []DeviceSelector{{VendorID: "19ee", DeviceID: "4000"}, {Class: "0302"}},
				Deny:  []DeviceSelector{{PCIAddress: "0000:3b:00.1"}, {Driver: "nvme"}},
			},
		},
		"empty lists": {
			content: "apiVersion: vfio.dra.dev/v1alpha1\nkind: DriverConfiguration\n",
			want:    &DriverConfiguration{},
		},
		"JSON": {
			content: `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"DriverConfiguration","deny":[{"class":"01"}]}`,
			want:    &DriverConfiguration{Deny: []DeviceSelector{{Class: "01"}}},
		},
		"unknown field": {
			content: "apiVersion: vfio.dra.dev/v1alpha1\nkind: DriverConfiguration\nallow:\n- vendor: \"10de\"\n",
			wantErr: []string{`unknown field "allow[0].vendor"`},
		},
		"unknown top-level field": {
			content: "apiVersion: vfio.dra.dev/v1alpha1\nkind: DriverConfiguration\nalow: []\n",
			wantErr: []string{`unknown field "alow"`},
		},
		"bad values, all reported": {
			content: `apiVersion: vfio.dra.dev/v1alpha1
kind: DriverConfiguration
allow:
- vendorID: "10DE"
- class: "030"
deny:
- pciAddress: "3b:00.1"
- {}
`,
			wantErr: []string{"allow[0].vendorID", "allow[1].class", "deny[0].pciAddress", "deny[1]: Required"},
		},
		"wrong kind and version": {
			content: "apiVersion: vfio.dra.dev/v1\nkind: Config\n",
			wantErr: []string{"apiVersion: Unsupported value", "kind: Unsupported value"},
		},
		"not YAML": {
			content: "allow: [",
			wantErr: []string{"yaml"},
		},
		"wrong type": {
			content: "apiVersion: vfio.dra.dev/v1alpha1\nkind: DriverConfiguration\nallow: 12\n",
			wantErr: []string{"allow"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "config.yaml")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := LoadDriverConfiguration(path)
			if tc.wantErr != nil {
				if err == nil {
					t.Fatalf("no error, want one containing %q", tc.wantErr)
				}
				for _, want := range append(tc.wantErr, path) {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("error %q does not contain %q", err, want)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.want.APIVersion, tc.want.Kind = APIVersion, DriverConfigurationKind
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestLoadDriverConfigurationMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nope.yaml")
	if _, err := LoadDriverConfiguration(path); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("error = %v, want one naming %s", err, path)
	}
}

func TestDriverNamesCannotBePaths(t *testing.T) {
	for _, name := range []string{"..", "../nvidia", "a/b", "."} {
		c := VfioConfig{TypeMeta: metav1.TypeMeta{APIVersion: APIVersion, Kind: VfioConfigKind}, Driver: name}
		if errs := c.Validate(false); len(errs) == 0 {
			t.Errorf("VfioConfig driver %q accepted", name)
		}
		d := DriverConfiguration{TypeMeta: metav1.TypeMeta{APIVersion: APIVersion, Kind: DriverConfigurationKind},
			Deny: []DeviceSelector{{Driver: name}}}
		if errs := d.Validate(); len(errs) == 0 {
			t.Errorf("selector driver %q accepted", name)
		}
	}
}
