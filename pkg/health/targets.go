package health

import (
	"slices"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// Targets are the functions whose health a node publishes, and which
// devices each verdict belongs to. The plugin and `vfio-dra inspect` judge
// the same set.
type Targets struct {
	// Functions to Check.
	Functions []Function
	// Owners names the devices whose health each function is part of: an
	// offered function its own, a member of a prepared claim's group the
	// claim's devices in that group too (it moved with them).
	Owners map[pci.Address][]string
	// Held are the devices of prepared claims, by PCI address.
	Held map[pci.Address]checkpoint.Device
}

// TargetsOf returns the offered functions of decisions and every member of
// the groups of cp's prepared claims. Claims still being prepared (or cut
// short) are in flux and judged once they are prepared or undone.
func TargetsOf(decisions []inventory.Decision, cp *checkpoint.Checkpoint) Targets {
	byAddr := map[pci.Address]Function{}
	t := Targets{Owners: map[pci.Address][]string{}, Held: map[pci.Address]checkpoint.Device{}}
	for _, dec := range decisions {
		if !dec.Offered {
			continue
		}
		a := dec.Device.Address
		byAddr[a] = Function{Address: a}
		t.Owners[a] = []string{a.DeviceName()}
	}
	if cp != nil {
		for _, c := range cp.Claims {
			if c.State != checkpoint.PrepareCompleted {
				continue
			}
			for _, dev := range c.Devices {
				i := slices.IndexFunc(c.Groups, func(g checkpoint.Group) bool { return g.Number == dev.IOMMUGroup })
				if i < 0 {
					continue
				}
				if a, err := pci.ParseAddress(dev.PCIAddress); err == nil {
					t.Held[a] = dev
				}
				for _, m := range c.Groups[i].Members {
					a, err := pci.ParseAddress(m.Address)
					if err != nil {
						continue
					}
					byAddr[a] = Function{Address: a, BoundTo: c.Groups[i].TargetOf(m)}
					if !slices.Contains(t.Owners[a], dev.Device) {
						t.Owners[a] = append(t.Owners[a], dev.Device)
					}
				}
			}
		}
	}
	for _, fn := range byAddr {
		t.Functions = append(t.Functions, fn)
	}
	slices.SortFunc(t.Functions, func(x, y Function) int { return x.Address.Compare(y.Address) })
	return t
}

// ByDevice merges the verdicts on functions into verdicts on the devices
// that own them, keyed by device name.
func (t Targets) ByDevice(results map[pci.Address]Status) map[string]Status {
	out := map[string]Status{}
	for _, fn := range t.Functions {
		st, ok := results[fn.Address]
		if !ok {
			continue
		}
		for _, name := range t.Owners[fn.Address] {
			out[name] = out[name].Merge(st)
		}
	}
	return out
}
