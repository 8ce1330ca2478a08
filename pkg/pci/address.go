// Package pci discovers PCI functions, their drivers and IOMMU groups from a
// sysfs tree. It only reads; changing drivers is the job of package vfio.
package pci

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// addressPattern is the kernel's extended BDF as it appears in sysfs:
// lower-case hex, a domain of at least four digits.
var addressPattern = regexp.MustCompile(`^([0-9a-f]{4,8}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$`)

// Address is a PCI function address (domain:bus:device.function).
type Address struct {
	Domain   uint32
	Bus      uint8
	Device   uint8
	Function uint8
}

// ParseAddress parses an address such as "0000:3b:00.0". Upper-case hex is
// rejected, because sysfs never uses it and the name must match sysfs entries.
func ParseAddress(s string) (Address, error) {
	m := addressPattern.FindStringSubmatch(s)
	if m == nil {
		return Address{}, fmt.Errorf("invalid PCI address %q: want DDDD:BB:DD.F in lower-case hex", s)
	}
	dom, _ := strconv.ParseUint(m[1], 16, 32)
	bus, _ := strconv.ParseUint(m[2], 16, 8)
	dev, _ := strconv.ParseUint(m[3], 16, 8)
	fn, _ := strconv.ParseUint(m[4], 16, 8)
	if dev > 0x1f {
		return Address{}, fmt.Errorf("invalid PCI address %q: device number %#x is above 0x1f", s, dev)
	}
	a := Address{Domain: uint32(dom), Bus: uint8(bus), Device: uint8(dev), Function: uint8(fn)}
	// One function, one name: a domain with extra leading zeros would
	// give a device a second DRA name and match no sysfs entry.
	if a.String() != s {
		return Address{}, fmt.Errorf("invalid PCI address %q: the kernel writes it %q", s, a.String())
	}
	return a, nil
}

// String returns the sysfs form, e.g. "0000:3b:00.0".
func (a Address) String() string {
	return fmt.Sprintf("%04x:%02x:%02x.%x", a.Domain, a.Bus, a.Device, a.Function)
}

// DeviceName returns the DRA device name for the function: a DNS label
// derived from the address, e.g. "pci-0000-3b-00-0".
func (a Address) DeviceName() string {
	return fmt.Sprintf("pci-%04x-%02x-%02x-%x", a.Domain, a.Bus, a.Device, a.Function)
}

// ParseDeviceName is the inverse of Address.DeviceName.
func ParseDeviceName(name string) (Address, error) {
	rest, ok := strings.CutPrefix(name, "pci-")
	parts := strings.Split(rest, "-")
	if !ok || len(parts) != 4 {
		return Address{}, fmt.Errorf("invalid device name %q: want pci-DDDD-BB-DD-F", name)
	}
	return ParseAddress(parts[0] + ":" + parts[1] + ":" + parts[2] + "." + parts[3])
}

// Less orders addresses numerically.
func (a Address) Less(b Address) bool {
	if a.Domain != b.Domain {
		return a.Domain < b.Domain
	}
	if a.Bus != b.Bus {
		return a.Bus < b.Bus
	}
	if a.Device != b.Device {
		return a.Device < b.Device
	}
	return a.Function < b.Function
}

// Compare is Less in the form slices.SortFunc wants.
func (a Address) Compare(b Address) int {
	switch {
	case a.Less(b):
		return -1
	case b.Less(a):
		return 1
	}
	return 0
}
