package pcitest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Machine is the PCI topology of a real host, as the JSON files in
// testdata/real-machines describe it: every value as the files under
// /sys/bus/pci/devices/<addr>/ print it.
type Machine struct {
	Name string `json:"name"`
	// Source names the public capture: repository, commit and files, or
	// the URL of the issue it was taken from.
	Source string `json:"source"`
	// Notes say what was inferred rather than captured.
	Notes     []string          `json:"notes"`
	Functions []MachineFunction `json:"functions"`
}

// MachineFunction is one function of a Machine.
type MachineFunction struct {
	Addr            string  `json:"addr"`
	Parent          *string `json:"parent"`
	Class           string  `json:"class"`
	Vendor          string  `json:"vendor"`
	Device          string  `json:"device"`
	SubsystemVendor string  `json:"subsystem_vendor"`
	SubsystemDevice string  `json:"subsystem_device"`
	Revision        string  `json:"revision"`
	Driver          *string `json:"driver"`
	// IOMMUGroup is null for a function without a group.
	IOMMUGroup *int `json:"iommu_group"`
	NUMANode   int  `json:"numa_node"`
	BootVGA    int  `json:"boot_vga,omitempty"`
	// PhysFn, SRIOVTotalVFs: SR-IOV, where the capture shows it.
	PhysFn        string `json:"physfn,omitempty"`
	SRIOVTotalVFs int    `json:"sriov_totalvfs,omitempty"`
	// BARs, where the capture shows them (lspci -v "Region" lines): an
	// empty list is a function without any; absent gives the builder's
	// DefaultBARs for the class.
	BARs *[]MachineBAR `json:"bars,omitempty"`
}

// MachineBAR is one BAR: "mem32", "mem64" or "io", and its size.
type MachineBAR struct {
	Type     string `json:"type"`
	Size     string `json:"size"`
	Prefetch bool   `json:"prefetch,omitempty"`
}

// LoadMachine reads a Machine from a JSON file, strictly.
func LoadMachine(file string) (*Machine, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var m Machine
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if m.Source == "" {
		return nil, fmt.Errorf("%s: no source: every real machine names the capture it was rebuilt from", file)
	}
	return &m, nil
}

// TreeFunctions converts the machine to builder functions, parents and PFs
// before the functions below them.
func (m *Machine) TreeFunctions() ([]Function, error) {
	pending := make([]Function, 0, len(m.Functions))
	for _, mf := range m.Functions {
		fn, err := mf.function()
		if err != nil {
			return nil, fmt.Errorf("machine %s: function %s: %w", m.Name, mf.Addr, err)
		}
		pending = append(pending, fn)
	}
	done := map[string]bool{}
	var out []Function
	for len(pending) > 0 {
		var rest []Function
		for _, fn := range pending {
			if (fn.Parent == "" || done[fn.Parent]) && (fn.PhysFn == "" || done[fn.PhysFn]) {
				out = append(out, fn)
				done[fn.Address] = true
			} else {
				rest = append(rest, fn)
			}
		}
		if len(rest) == len(pending) {
			return nil, fmt.Errorf("machine %s: function %s: parent %q or PF %q is not in the machine", m.Name, rest[0].Address, rest[0].Parent, rest[0].PhysFn)
		}
		pending = rest
	}
	return out, nil
}

func (mf MachineFunction) function() (Function, error) {
	fn := Function{Address: mf.Addr, NUMANode: mf.NUMANode, BootVGA: mf.BootVGA == 1, PhysFn: mf.PhysFn, SRIOVTotalVFs: mf.SRIOVTotalVFs}
	if mf.Parent != nil {
		fn.Parent = *mf.Parent
	}
	if mf.Driver != nil {
		fn.Driver = *mf.Driver
	}
	if mf.IOMMUGroup == nil {
		fn.NoIOMMU = true
	} else {
		fn.IOMMUGroup = *mf.IOMMUGroup
	}
	hex := []struct {
		name string
		s    string
		bits int
		dst  func(uint64)
		opt  bool
	}{
		{"vendor", mf.Vendor, 16, func(v uint64) { fn.Vendor = uint16(v) }, false},
		{"device", mf.Device, 16, func(v uint64) { fn.Device = uint16(v) }, false},
		{"subsystem_vendor", mf.SubsystemVendor, 16, func(v uint64) { fn.SubVendor = uint16(v) }, true},
		{"subsystem_device", mf.SubsystemDevice, 16, func(v uint64) { fn.SubDevice = uint16(v) }, true},
		{"class", mf.Class, 24, func(v uint64) { fn.Class = uint32(v) }, false},
		{"revision", mf.Revision, 8, func(v uint64) { fn.Revision = uint8(v) }, true},
	}
	for _, h := range hex {
		if h.s == "" && h.opt {
			continue
		}
		v, err := parseHex(h.s, h.bits)
		if err != nil {
			return Function{}, fmt.Errorf("%s: %w", h.name, err)
		}
		h.dst(v)
	}
	if mf.BARs != nil {
		fn.NoBARs = len(*mf.BARs) == 0
		for _, b := range *mf.BARs {
			size, err := parseHex(b.Size, 64)
			if err != nil {
				return Function{}, fmt.Errorf("BAR size: %w", err)
			}
			bar := BAR{Size: size, Prefetch: b.Prefetch}
			switch b.Type {
			case "io":
				bar.IO = true
			case "mem64":
				bar.Mem64 = true
			case "mem32":
			default:
				return Function{}, fmt.Errorf("BAR type %q: want mem32, mem64 or io", b.Type)
			}
			fn.BARs = append(fn.BARs, bar)
		}
	}
	return fn, nil
}

func parseHex(s string, bits int) (uint64, error) {
	digits, ok := strings.CutPrefix(s, "0x")
	if !ok {
		return 0, fmt.Errorf("%q is not a 0x-prefixed hex number", s)
	}
	v, err := strconv.ParseUint(digits, 16, bits)
	if err != nil {
		return 0, fmt.Errorf("%q is not a %d-bit hex number", s, bits)
	}
	return v, nil
}

// NewMachine lays out m below root, with vfio-pci loaded.
func NewMachine(root string, m *Machine) (*Tree, error) {
	fns, err := m.TreeFunctions()
	if err != nil {
		return nil, err
	}
	t, err := New(root)
	if err != nil {
		return nil, err
	}
	if err := t.Add(fns...); err != nil {
		return nil, fmt.Errorf("machine %s: %w", m.Name, err)
	}
	if err := t.AddDriver("vfio-pci"); err != nil {
		return nil, err
	}
	return t, nil
}
