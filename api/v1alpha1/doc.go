// Package v1alpha1 holds the versioned configuration types of the vfio.dra.dev
// driver: the node configuration file of the kubelet plugin
// (DriverConfiguration) and the opaque device configuration that
// DeviceClasses and ResourceClaims carry (VfioConfig).
//
// Both are decoded strictly: an unknown field is an error, never ignored.
package v1alpha1

// GroupName is the API group of every type in this package.
const GroupName = "vfio.dra.dev"

// Version is the API version of this package.
const Version = "v1alpha1"

// APIVersion is GroupName/Version, as written in apiVersion.
const APIVersion = GroupName + "/" + Version
