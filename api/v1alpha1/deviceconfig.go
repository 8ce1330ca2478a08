package v1alpha1

import (
	"regexp"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// VfioConfigKind is the kind of the opaque device configuration.
const VfioConfigKind = "VfioConfig"

// Values of VfioConfig.Driver besides a driver name.
const (
	// DriverVfioPCI is the kernel's generic VFIO PCI driver, the default.
	DriverVfioPCI = "vfio-pci"
	// DriverAuto picks the vfio variant driver that the kernel's
	// modules.alias names for the device (e.g. mlx5_vfio_pci), or vfio-pci
	// when there is none.
	DriverAuto = "auto"
)

// VfioConfig is the opaque device configuration of the vfio.dra.dev
// driver, set in a DeviceClass's or a ResourceClaim's config:
//
//	config:
//	- opaque:
//	    driver: vfio.dra.dev
//	    parameters:
//	      apiVersion: vfio.dra.dev/v1alpha1
//	      kind: VfioConfig
//	      iommufd: true
//
// Configurations apply in order, DeviceClass ones first; a later one
// overrides the fields it sets. Fields that decide what the host gives up
// (Driver, RestoreDriver) are only honoured from a DeviceClass, which the
// cluster administrator owns; a ResourceClaim that sets them fails to
// prepare.
type VfioConfig struct {
	metav1.TypeMeta `json:",inline"`

	// Driver is the driver the IOMMU group is bound to: "vfio-pci"
	// (default), "auto" (per function, the variant that the kernel's
	// modules.alias names for it, or vfio-pci), or the name of a loaded
	// vfio variant driver such as "mlx5_vfio_pci". Never a host driver:
	// prepare, which can read the node's modules.alias, accepts only a
	// name that ends in _vfio_pci or that modules.alias maps to a
	// *vfio*pci* module, and fails before it changes anything otherwise.
	// DeviceClass only.
	// +optional
	Driver string `json:"driver,omitempty"`

	// RestoreDriver gives every function back to the driver it had when the
	// claim is unprepared (default true). False leaves the group on its vfio
	// driver, for nodes that keep devices for VMs. DeviceClass only.
	// +optional
	RestoreDriver *bool `json:"restoreDriver,omitempty"`

	// IOMMUFD gives the container /dev/iommu and one
	// /dev/vfio/devices/vfioN per function (the iommufd interface) instead
	// of /dev/vfio/vfio and the legacy group device. The kernel must have
	// iommufd and VFIO device cdevs (Linux 6.6+); otherwise prepare fails.
	// +optional
	IOMMUFD *bool `json:"iommufd,omitempty"`
}

// kernelDriverName is what a PCI driver may be called in sysfs; it becomes
// a path element, so no dots.
var kernelDriverName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// Validate checks the fields. fromClaim is true for configuration that
// came from a ResourceClaim: it may not set the administrator's fields.
func (c *VfioConfig) Validate(fromClaim bool) field.ErrorList {
	var errs field.ErrorList
	if c.APIVersion != APIVersion {
		errs = append(errs, field.NotSupported(field.NewPath("apiVersion"), c.APIVersion, []string{APIVersion}))
	}
	if c.Kind != VfioConfigKind {
		errs = append(errs, field.NotSupported(field.NewPath("kind"), c.Kind, []string{VfioConfigKind}))
	}
	// Whether a name is a VFIO driver depends on the node's kernel
	// (modules.alias): prepare decides, here only the form is checked.
	if c.Driver != "" && c.Driver != DriverAuto && !kernelDriverName.MatchString(c.Driver) {
		errs = append(errs, field.Invalid(field.NewPath("driver"), c.Driver,
			`must be "vfio-pci", "auto" or a vfio variant driver such as mlx5_vfio_pci: letters, digits, "_" and "-", at most 64`))
	}
	if fromClaim {
		const why = "only a DeviceClass may set this: it decides what the host gives up"
		if c.Driver != "" {
			errs = append(errs, field.Forbidden(field.NewPath("driver"), why))
		}
		if c.RestoreDriver != nil {
			errs = append(errs, field.Forbidden(field.NewPath("restoreDriver"), why))
		}
	}
	return errs
}

// DecodeVfioConfig strictly decodes and validates opaque parameters.
func DecodeVfioConfig(data []byte, fromClaim bool) (*VfioConfig, error) {
	var c VfioConfig
	if err := decodeStrict(data, &c); err != nil {
		return nil, err
	}
	if errs := c.Validate(fromClaim); len(errs) > 0 {
		return nil, errs.ToAggregate()
	}
	return &c, nil
}

// Merge returns c with the fields that o sets taken from o.
func (c VfioConfig) Merge(o *VfioConfig) VfioConfig {
	if o.Driver != "" {
		c.Driver = o.Driver
	}
	if o.RestoreDriver != nil {
		c.RestoreDriver = o.RestoreDriver
	}
	if o.IOMMUFD != nil {
		c.IOMMUFD = o.IOMMUFD
	}
	return c
}
