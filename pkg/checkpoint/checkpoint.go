// Package checkpoint keeps the driver's record of prepared ResourceClaims in
// one versioned, checksummed file that is replaced atomically on every change.
//
// The file is an envelope around the checkpoint data:
//
//	{
//	  "apiVersion": "checkpoint.vfio.dra.dev/v1",
//	  "kind": "Checkpoint",
//	  "checksum": "<sha256 hex of the exact bytes of data>",
//	  "data": {...}
//	}
//
// The checksum covers the bytes of "data" as they appear in the file, not a
// re-encoding of Go values, so adding a field later never invalidates files
// that were written before.
//
// The file holds only fields that every v1 reader knows, since readers
// reject unknown fields: a plugin rolled back to an older version must
// still read it. Fields added later are kept in a second file beside it
// with the same envelope (kind CheckpointExtras, see ExtrasPath), which
// older versions do not read and which is written before the checkpoint
// file, so that a crash between the two loses nothing.
package checkpoint

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	resourceapi "k8s.io/api/resource/v1"
)

// APIVersion and Kind identify the on-disk format this package reads and
// writes.
const (
	APIVersion = "checkpoint.vfio.dra.dev/v1"
	Kind       = "Checkpoint"
)

// ClaimState is the phase of a claim's preparation.
type ClaimState string

const (
	// PrepareStarted is recorded before the first side effect of a prepare:
	// the claim may have moved some devices and must be rolled back.
	PrepareStarted ClaimState = "PrepareStarted"
	// PrepareCompleted is recorded after every device of the claim was bound
	// and its CDI spec written.
	PrepareCompleted ClaimState = "PrepareCompleted"
)

// Checkpoint is everything the driver must remember across restarts.
type Checkpoint struct {
	// BootID is /proc/sys/kernel/random/boot_id at the time of writing.
	// Driver bindings do not survive a reboot, so a different boot ID means
	// the recorded claims no longer describe the host.
	BootID string `json:"bootID"`
	// Claims maps a ResourceClaim UID to its state.
	Claims map[string]*Claim `json:"claims,omitempty"`
}

// Claim is the state of one ResourceClaim on this node.
type Claim struct {
	Namespace string     `json:"namespace"`
	Name      string     `json:"name"`
	State     ClaimState `json:"state"`
	// Devices is what prepare returns, one per allocated device.
	Devices []Device `json:"devices,omitempty"`
	// Groups lists every IOMMU group the claim moved, with the original
	// state of each member, so that unprepare can undo it.
	Groups []Group `json:"groups,omitempty"`
	// CDISpec is the name of the CDI spec file written for the claim.
	CDISpec string `json:"cdiSpec,omitempty"`
	// LastError is why the last attempt to give the claim's groups back
	// failed; the entry stays, and keeps its groups, until one succeeds.
	// Stored in the extras file (see ExtrasKind).
	LastError string `json:"lastError,omitempty"`
}

// Device is one allocated device as returned to the kubelet.
type Device struct {
	Requests     []string `json:"requests"`
	Pool         string   `json:"pool"`
	Device       string   `json:"device"`
	PCIAddress   string   `json:"pciAddress"`
	IOMMUGroup   int      `json:"iommuGroup"`
	CDIDeviceIDs []string `json:"cdiDeviceIDs"`
	// Attributes are the device's published attributes at prepare time,
	// handed to the container as KEP-5304 metadata. A restarted plugin
	// returns the same metadata even if a rescan would now differ.
	// Stored in the extras file (see ExtrasKind).
	Attributes map[resourceapi.QualifiedName]resourceapi.DeviceAttribute `json:"attributes,omitempty"`
}

// Group is one IOMMU group whose members the driver bound to Target.
type Group struct {
	Number int `json:"number"`
	// Target is the driver the members were bound to, e.g. "vfio-pci",
	// except those with a Target of their own.
	Target string `json:"target"`
	// Restore says whether unprepare gives the members back to their
	// original drivers.
	Restore bool `json:"restore"`
	// IOMMUFD says whether the container got the iommufd device nodes
	// instead of the legacy group device.
	IOMMUFD bool     `json:"iommufd,omitempty"`
	Members []Member `json:"members"`
}

// Member is the original state of one PCI function before the driver
// touched it.
type Member struct {
	Address        string `json:"address"`
	Driver         string `json:"driver,omitempty"`
	DriverOverride string `json:"driverOverride,omitempty"`
	// Target is the driver this member was bound to when it is not the
	// group's: driver "auto" picks a variant per function. Stored only in
	// the extras file (see ExtrasKind), never in the checkpoint file.
	Target string `json:"-"`
}

// TargetOf returns the driver member m of g was bound to.
func (g Group) TargetOf(m Member) string {
	if m.Target != "" {
		return m.Target
	}
	return g.Target
}

// New returns an empty checkpoint whose Claims map is ready for use.
func New() *Checkpoint {
	return &Checkpoint{Claims: map[string]*Claim{}}
}

// Validate reports content that no correct writer produces: an empty claim
// UID, a nil claim or a state this version does not know.
func (c *Checkpoint) Validate() error {
	var errs []string
	for _, uid := range slices.Sorted(maps.Keys(c.Claims)) {
		claim := c.Claims[uid]
		switch {
		case uid == "":
			errs = append(errs, "claim with empty UID")
		case claim == nil:
			errs = append(errs, fmt.Sprintf("claim %s: no state", uid))
		case claim.State != PrepareStarted && claim.State != PrepareCompleted:
			errs = append(errs, fmt.Sprintf("claim %s: unknown state %q", uid, claim.State))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("invalid checkpoint: %s", strings.Join(errs, "; "))
	}
	return nil
}

// HostDrivers returns, for every function that a claim moved to a vfio
// driver, the driver it goes back to ("" for none), keyed by PCI address.
func (c *Checkpoint) HostDrivers() map[string]string {
	out := map[string]string{}
	for _, claim := range c.Claims {
		for _, g := range claim.Groups {
			for _, m := range g.Members {
				out[m.Address] = m.Driver
			}
		}
	}
	return out
}

// Clone returns a deep copy of c: changing one never changes the other.
func (c *Checkpoint) Clone() *Checkpoint {
	if c == nil {
		return nil
	}
	out := &Checkpoint{BootID: c.BootID}
	if c.Claims != nil {
		out.Claims = make(map[string]*Claim, len(c.Claims))
		for uid, claim := range c.Claims {
			out.Claims[uid] = claim.Clone()
		}
	}
	return out
}

// Clone returns a deep copy of c.
func (c *Claim) Clone() *Claim {
	if c == nil {
		return nil
	}
	out := *c
	if c.Devices != nil {
		out.Devices = make([]Device, len(c.Devices))
		for i, d := range c.Devices {
			out.Devices[i] = d.clone()
		}
	}
	if c.Groups != nil {
		out.Groups = make([]Group, len(c.Groups))
		for i, g := range c.Groups {
			out.Groups[i] = g
			// Members hold only strings: a shallow copy of the slice
			// is a deep one.
			out.Groups[i].Members = slices.Clone(g.Members)
		}
	}
	return &out
}

func (d Device) clone() Device {
	d.Requests = slices.Clone(d.Requests)
	d.CDIDeviceIDs = slices.Clone(d.CDIDeviceIDs)
	if d.Attributes != nil {
		attrs := make(map[resourceapi.QualifiedName]resourceapi.DeviceAttribute, len(d.Attributes))
		for k, v := range d.Attributes {
			attrs[k] = *v.DeepCopy()
		}
		d.Attributes = attrs
	}
	return d
}
