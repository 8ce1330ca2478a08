package v1alpha1

import (
	"fmt"
	"os"
	"regexp"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// DriverConfigurationKind is the kind of the node configuration file.
const DriverConfigurationKind = "DriverConfiguration"

// DriverConfiguration decides which PCI functions of a node the plugin
// offers, on top of the built-in rules (endpoints only, never the boot VGA
// device, never a function without an IOMMU group, whole groups only).
//
// Example:
//
//	apiVersion: vfio.dra.dev/v1alpha1
//	kind: DriverConfiguration
//	allow:
//	- vendorID: "19ee"
//	deny:
//	- pciAddress: "0000:3b:00.1"
type DriverConfiguration struct {
	metav1.TypeMeta `json:",inline"`

	// Allow, when not empty, offers only functions that match at least one
	// selector. Empty offers every function the built-in rules allow.
	// +optional
	Allow []DeviceSelector `json:"allow,omitempty"`

	// Deny never offers functions that match any selector. Deny wins over
	// Allow.
	// +optional
	Deny []DeviceSelector `json:"deny,omitempty"`
}

// DeviceSelector matches PCI functions. Every field that is set must match;
// at least one must be set.
type DeviceSelector struct {
	// VendorID is the PCI vendor id, 4 lower-case hex digits, e.g. "10de".
	// +optional
	VendorID string `json:"vendorID,omitempty"`

	// DeviceID is the PCI device id, 4 lower-case hex digits.
	// +optional
	DeviceID string `json:"deviceID,omitempty"`

	// Class is a prefix of the 6-digit class code: 2 digits for the base
	// class ("02", network), 4 for base and subclass ("0302", 3D
	// controller), 6 for an exact class.
	// +optional
	Class string `json:"class,omitempty"`

	// PCIAddress is one function, e.g. "0000:3b:00.0".
	// +optional
	PCIAddress string `json:"pciAddress,omitempty"`

	// Driver is the host driver bound to the function when the plugin
	// scans, e.g. "nvme".
	// +optional
	Driver string `json:"driver,omitempty"`
}

var (
	hexID       = regexp.MustCompile(`^[0-9a-f]{4}$`)
	classPrefix = regexp.MustCompile(`^([0-9a-f]{2}){1,3}$`)
	pciAddress  = regexp.MustCompile(`^[0-9a-f]{4,8}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$`)
)

// Validate checks every field and returns all problems at once.
func (c *DriverConfiguration) Validate() field.ErrorList {
	var errs field.ErrorList
	if c.APIVersion != APIVersion {
		errs = append(errs, field.NotSupported(field.NewPath("apiVersion"), c.APIVersion, []string{APIVersion}))
	}
	if c.Kind != DriverConfigurationKind {
		errs = append(errs, field.NotSupported(field.NewPath("kind"), c.Kind, []string{DriverConfigurationKind}))
	}
	for i, s := range c.Allow {
		errs = append(errs, s.validate(field.NewPath("allow").Index(i))...)
	}
	for i, s := range c.Deny {
		errs = append(errs, s.validate(field.NewPath("deny").Index(i))...)
	}
	return errs
}

func (s DeviceSelector) validate(path *field.Path) field.ErrorList {
	var errs field.ErrorList
	if s == (DeviceSelector{}) {
		return append(errs, field.Required(path, "a selector needs at least one of vendorID, deviceID, class, pciAddress, driver"))
	}
	check := func(name, value string, re *regexp.Regexp, want string) {
		if value != "" && !re.MatchString(value) {
			errs = append(errs, field.Invalid(path.Child(name), value, want))
		}
	}
	check("vendorID", s.VendorID, hexID, "must be 4 lower-case hex digits")
	check("deviceID", s.DeviceID, hexID, "must be 4 lower-case hex digits")
	check("class", s.Class, classPrefix, "must be 2, 4 or 6 lower-case hex digits")
	check("pciAddress", s.PCIAddress, pciAddress, "must be a PCI address such as 0000:3b:00.0")
	check("driver", s.Driver, kernelDriverName, "must be a kernel driver name")
	return errs
}

// LoadDriverConfiguration reads, strictly decodes and validates a
// DriverConfiguration file (YAML or JSON). Errors name the file and the field.
func LoadDriverConfiguration(path string) (*DriverConfiguration, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("driver configuration: %w", err)
	}
	return DecodeDriverConfiguration(path, data)
}

// DecodeDriverConfiguration is LoadDriverConfiguration for data already read
// from source (a file name, used in errors).
func DecodeDriverConfiguration(source string, data []byte) (*DriverConfiguration, error) {
	var c DriverConfiguration
	if err := decodeStrict(data, &c); err != nil {
		return nil, fmt.Errorf("driver configuration %s: %w", source, err)
	}
	if errs := c.Validate(); len(errs) > 0 {
		return nil, fmt.Errorf("driver configuration %s: %w", source, errs.ToAggregate())
	}
	return &c, nil
}
