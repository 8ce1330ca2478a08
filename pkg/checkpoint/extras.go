package checkpoint

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	resourceapi "k8s.io/api/resource/v1"
)

// ExtrasKind is the kind of the extras file.
//
// The checkpoint file holds only the fields that every version of the v1
// format reads: its decoder is strict, so a field it does not know makes an
// older plugin refuse the whole file, and a downgrade would not start. A
// field added later goes to the extras file beside it instead (the older
// version does not read it). The extras file is decoded leniently: what a
// newer version added there is ignored, never an error.
const ExtrasKind = "CheckpointExtras"

// extras is the data of the extras file: per claim UID, what the
// checkpoint file must not hold.
type extras struct {
	Claims map[string]*claimExtras `json:"claims,omitempty"`
}

type claimExtras struct {
	// State is the claim's state when LastError was written: an older
	// plugin may have changed the claim since (a downgrade and an upgrade
	// again), and then the error no longer applies. Only set with
	// LastError, so that a claim's entry does not change with its state.
	State     ClaimState     `json:"state,omitempty"`
	LastError string         `json:"lastError,omitempty"`
	Devices   []deviceExtras `json:"devices,omitempty"`
	// Targets are the Member.Target of the claim's group members that
	// have one (driver "auto" bound them to another driver than their
	// group's). An older version, which reads only the group's target,
	// still gives every member back to its own original driver.
	Targets []memberTarget `json:"targets,omitempty"`
}

// memberTarget is Groups[Group].Members[Member].Target of a claim; Address
// is that member's, so that a claim whose groups changed since gets none.
type memberTarget struct {
	Group   int    `json:"group"`
	Member  int    `json:"member"`
	Address string `json:"address"`
	Target  string `json:"target"`
}

type deviceExtras struct {
	// Device and PCIAddress name the Device of the claim.
	Device     string                                                    `json:"device"`
	PCIAddress string                                                    `json:"pciAddress"`
	Attributes map[resourceapi.QualifiedName]resourceapi.DeviceAttribute `json:"attributes,omitempty"`
}

// ExtrasPath is the extras file of the checkpoint file path:
// checkpoint.json has checkpoint.extras.json.
func ExtrasPath(path string) string {
	base, ok := strings.CutSuffix(path, ".json")
	if !ok {
		return path + ".extras"
	}
	return base + ".extras.json"
}

// extrasOf returns the fields of cp that go to the extras file; claims
// without any are left out.
func extrasOf(cp *Checkpoint) map[string]*claimExtras {
	out := map[string]*claimExtras{}
	for uid, c := range cp.Claims {
		if c == nil {
			continue
		}
		e := &claimExtras{LastError: c.LastError}
		if e.LastError != "" {
			e.State = c.State
		}
		// Every device once any has attributes, so that the n-th device of
		// a name finds its own (see apply).
		if slices.ContainsFunc(c.Devices, func(d Device) bool { return len(d.Attributes) > 0 }) {
			for _, d := range c.Devices {
				e.Devices = append(e.Devices, deviceExtras{Device: d.Device, PCIAddress: d.PCIAddress, Attributes: d.Attributes})
			}
		}
		for i, g := range c.Groups {
			for j, m := range g.Members {
				if m.Target != "" {
					e.Targets = append(e.Targets, memberTarget{Group: i, Member: j, Address: m.Address, Target: m.Target})
				}
			}
		}
		if e.LastError != "" || len(e.Devices) > 0 || len(e.Targets) > 0 {
			out[uid] = e
		}
	}
	return out
}

// withoutExtras returns a copy of cp without the fields of the extras file,
// sharing what it does not change.
func withoutExtras(cp *Checkpoint) *Checkpoint {
	out := &Checkpoint{BootID: cp.BootID, Claims: make(map[string]*Claim, len(cp.Claims))}
	for uid, c := range cp.Claims {
		if c == nil {
			out.Claims[uid] = nil
			continue
		}
		cc := *c
		cc.LastError = ""
		cc.Devices = slices.Clone(c.Devices)
		for i := range cc.Devices {
			cc.Devices[i].Attributes = nil
		}
		out.Claims[uid] = &cc
	}
	return out
}

// apply sets the fields of the extras file on the claims of cp. Fields the
// checkpoint file holds already (written by a version that kept them there)
// win.
func (e *extras) apply(cp *Checkpoint) {
	for uid, ce := range e.Claims {
		c := cp.Claims[uid]
		if c == nil || ce == nil {
			continue // a claim given back since
		}
		if c.LastError == "" && ce.State == c.State {
			c.LastError = ce.LastError
		}
		for _, mt := range ce.Targets {
			if mt.Group < 0 || mt.Group >= len(c.Groups) || mt.Member < 0 || mt.Member >= len(c.Groups[mt.Group].Members) {
				continue
			}
			// What unprepare gives back comes from the checkpoint file
			// alone: a target can only be a VFIO driver and never the
			// member's original driver, so it never keeps a member from
			// going back, and a repair never binds it to a host driver.
			if m := &c.Groups[mt.Group].Members[mt.Member]; m.Address == mt.Address && m.Target == "" && vfioTarget(mt.Target) && mt.Target != m.Driver {
				m.Target = mt.Target
			}
		}
		// The n-th device of a name and address gets the n-th extras of
		// them (one device can be listed twice, for two requests).
		used := make([]bool, len(ce.Devices))
		for i := range c.Devices {
			d := &c.Devices[i]
			j := slices.IndexFunc(ce.Devices, func(x deviceExtras) bool { return x.Device == d.Device && x.PCIAddress == d.PCIAddress })
			for j >= 0 && used[j] {
				k := slices.IndexFunc(ce.Devices[j+1:], func(x deviceExtras) bool { return x.Device == d.Device && x.PCIAddress == d.PCIAddress })
				if k < 0 {
					j = -1
				} else {
					j += 1 + k
				}
			}
			if j < 0 {
				continue
			}
			used[j] = true
			if len(d.Attributes) == 0 {
				d.Attributes = ce.Devices[j].Attributes
			}
		}
	}
}

// encodeExtras returns the extras file for cp and the data inside it, and
// nil when cp has nothing for it. kept are entries of claims that cp no
// longer has and that the file must still hold (see Store.Update).
func encodeExtras(cp *Checkpoint, kept map[string]*claimExtras) (file, data []byte, err error) {
	e := extras{Claims: extrasOf(cp)}
	for uid, ce := range kept {
		if _, ok := cp.Claims[uid]; !ok {
			e.Claims[uid] = ce
		}
	}
	if len(e.Claims) == 0 {
		return nil, nil, nil
	}
	data, err = json.MarshalIndent(e, "  ", "  ")
	if err != nil {
		return nil, nil, fmt.Errorf("encode checkpoint extras: %w", err)
	}
	return envelopeFile(ExtrasKind, data), data, nil
}

// decodeExtras parses an extras file: the type and the checksum must be
// right (ErrUnsupportedVersion, ErrCorrupt); fields it does not know are
// ignored.
func decodeExtras(content []byte) (*extras, error) {
	var env envelope
	if err := json.Unmarshal(content, &env); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if env.APIVersion != APIVersion || env.Kind != ExtrasKind {
		return nil, fmt.Errorf("%w: apiVersion %q kind %q, want %q %q",
			ErrUnsupportedVersion, env.APIVersion, env.Kind, APIVersion, ExtrasKind)
	}
	if len(env.Data) == 0 || string(env.Data) == "null" {
		return nil, fmt.Errorf("%w: no data", ErrCorrupt)
	}
	if sum := checksum(env.Data); sum != env.Checksum {
		return nil, fmt.Errorf("%w: checksum mismatch: file says %q, data hashes to %q",
			ErrCorrupt, env.Checksum, sum)
	}
	return decodeExtrasData(env.Data)
}

// decodeExtrasData decodes the data of an extras file whose envelope was
// checked.
func decodeExtrasData(data []byte) (*extras, error) {
	e := &extras{}
	if err := json.Unmarshal(data, e); err != nil {
		return nil, fmt.Errorf("%w: data: %w", ErrCorrupt, err)
	}
	return e, nil
}

// vfioTarget reports whether a member's target from the extras file names a
// VFIO driver as Linux names them: vfio-pci or a variant *_vfio_pci. A
// variant named otherwise loses its member's target (the member counts as
// on its group's target), which costs a rebind to vfio-pci, never safety.
func vfioTarget(name string) bool {
	n := strings.ReplaceAll(name, "-", "_")
	return n == "vfio_pci" || (strings.HasSuffix(n, "_vfio_pci") && len(n) <= 64 && !strings.ContainsAny(n, "/. "))
}
