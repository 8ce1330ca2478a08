package v1alpha1

import (
	"strings"
	"testing"

	"k8s.io/utils/ptr"
)

func TestDecodeVfioConfig(t *testing.T) {
	tests := map[string]struct {
		data      string
		fromClaim bool
		want      *VfioConfig
		wantErr   []string
	}{
		"class sets everything": {
			data: `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","driver":"auto","restoreDriver":false,"iommufd":true}`,
			want: &VfioConfig{Driver: "auto", RestoreDriver: ptr.To(false), IOMMUFD: ptr.To(true)},
		},
		"claim may choose iommufd": {
			data: `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","iommufd":true}`, fromClaim: true,
			want: &VfioConfig{IOMMUFD: ptr.To(true)},
		},
		"claim may not pick the driver": {
			data: `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","driver":"vfio-pci"}`, fromClaim: true,
			wantErr: []string{"driver: Forbidden", "only a DeviceClass"},
		},
		"claim may not keep devices from the host": {
			data: `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","restoreDriver":true}`, fromClaim: true,
			wantErr: []string{"restoreDriver: Forbidden"},
		},
		"unknown field": {
			data:    `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","iommuFD":true}`,
			wantErr: []string{`unknown field "iommuFD"`},
		},
		"wrong kind": {
			data:    `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"GpuConfig"}`,
			wantErr: []string{"kind: Unsupported value"},
		},
		"bad driver": {
			data:    `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","driver":"vfio pci"}`,
			wantErr: []string{"driver: Invalid value"},
		},
		// Whether a name is a VFIO driver is the node's kernel's to say
		// (modules.alias): prepare refuses host drivers, before it
		// writes anything (pkg/plugin TestPrepareRefusesHostDriver).
		"host driver is left to prepare": {
			data: `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","driver":"nvme"}`,
			want: &VfioConfig{Driver: "nvme"},
		},
		"name too long": {
			data:    `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","driver":"` + strings.Repeat("a", 60) + `_vfio_pci"}`,
			wantErr: []string{"driver: Invalid value", "at most 64"},
		},
		"path in the name": {
			data:    `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","driver":"../vfio-pci"}`,
			wantErr: []string{"driver: Invalid value"},
		},
		"vfio-pci": {
			data: `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","driver":"vfio-pci"}`,
			want: &VfioConfig{Driver: "vfio-pci"},
		},
		"variant with underscores": {
			data: `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","driver":"nvgrace_gpu_vfio_pci"}`,
			want: &VfioConfig{Driver: "nvgrace_gpu_vfio_pci"},
		},
		"variant with dashes": {
			data: `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","driver":"hisi-acc-vfio-pci"}`,
			want: &VfioConfig{Driver: "hisi-acc-vfio-pci"},
		},
		"wrong type": {
			data:    `{"apiVersion":"vfio.dra.dev/v1alpha1","kind":"VfioConfig","iommufd":"yes"}`,
			wantErr: []string{"iommufd"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := DecodeVfioConfig([]byte(tc.data), tc.fromClaim)
			if tc.wantErr != nil {
				if err == nil {
					t.Fatalf("no error, want %q", tc.wantErr)
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not contain %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Driver != tc.want.Driver || !ptrEq(got.RestoreDriver, tc.want.RestoreDriver) || !ptrEq(got.IOMMUFD, tc.want.IOMMUFD) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestMergeLaterWins(t *testing.T) {
	class := VfioConfig{Driver: "auto", RestoreDriver: ptr.To(false)}
	claim := &VfioConfig{IOMMUFD: ptr.To(true)}
	got := class.Merge(claim).Merge(&VfioConfig{RestoreDriver: ptr.To(true)})
	if got.Driver != "auto" || !*got.RestoreDriver || !*got.IOMMUFD {
		t.Errorf("Merge = %+v: want driver auto kept, restoreDriver overridden, iommufd added", got)
	}
}

func ptrEq(a, b *bool) bool {
	return (a == nil && b == nil) || (a != nil && b != nil && *a == *b)
}
