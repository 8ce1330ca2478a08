package pci_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// FuzzParseAddress: an accepted address is the one canonical sysfs name
// of the function, and its DRA device name leads back to it.
func FuzzParseAddress(f *testing.F) {
	for _, s := range []string{"0000:3b:00.0", "10000:e1:00.1", "0000:00:1f.7", "00000:00:00.0", "0000:3B:00.0", "../0:00.0", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := pci.ParseAddress(s)
		if err != nil {
			return
		}
		if a.String() != s {
			t.Fatalf("ParseAddress(%q) accepted a name sysfs never uses: it prints as %q", s, a.String())
		}
		if a.Device > 0x1f || a.Function > 7 {
			t.Fatalf("ParseAddress(%q) = %+v: out of range", s, a)
		}
		b, err := pci.ParseDeviceName(a.DeviceName())
		if err != nil || b != a {
			t.Fatalf("ParseDeviceName(%q) = %+v, %v; want %+v", a.DeviceName(), b, err, a)
		}
	})
}

// FuzzParseDeviceName: one device, one name; names are DNS labels.
func FuzzParseDeviceName(f *testing.F) {
	for _, s := range []string{"pci-0000-3b-00-0", "pci-10000-e1-00-1", "pci-00000-3b-00-0", "pci-0000-3b-00", "pci-0000:3b:00.0", "gpu"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		a, err := pci.ParseDeviceName(name)
		if err != nil {
			return
		}
		if a.DeviceName() != name {
			t.Fatalf("ParseDeviceName(%q) = %s, whose name is %q: two names for one device", name, a, a.DeviceName())
		}
		if len(name) > 63 || strings.ContainsAny(name, ":./_") {
			t.Fatalf("device name %q is not a DNS label", name)
		}
	})
}

// attrFiles are the attributes discovery parses, in the order the fuzzer's
// selector byte picks them.
var attrFiles = []string{"vendor", "device", "subsystem_vendor", "subsystem_device", "class", "numa_node", "sriov_totalvfs", "sriov_numvfs", "boot_vga", "driver_override", "config", "resource"}

// FuzzDeviceAttribute writes arbitrary content into one attribute of a
// function laid out as Linux does and reads the function: discovery
// either names the file in an error or returns values the content says.
func FuzzDeviceAttribute(f *testing.F) {
	seeds := []struct {
		file    uint8
		content string
	}{
		{0, "0x10de\n"}, {0, "10de\n"}, {0, "0x10de0\n"}, {0, "0x\n"}, {0, ""}, {0, "0x-1\n"},
		{4, "0x030000\n"}, {4, "0x1000000\n"}, {4, "0x+30000"},
		{5, "-1\n"}, {5, "1\n"}, {5, "99999999999999999999\n"}, {5, " 0 \n"}, {5, "-7"},
		{6, "8\n"}, {7, "x"}, {8, "1\n"}, {8, "2"},
		{9, "(null)\n"}, {9, "vfio-pci\n"}, {9, "\n"},
		{10, "\xde\x10\x04\x22" + strings.Repeat("\x00", 10) + "\x01" + strings.Repeat("\x00", 49)}, {10, strings.Repeat("\xff", 64)}, {10, "\x00"},
		{11, strings.Repeat("0x00000000fb000000 0x00000000fbffffff 0x0000000000040200\n", 13)}, {11, "0x1 0x2\n"}, {11, ""},
	}
	for _, s := range seeds {
		f.Add(s.file, s.content)
	}
	root := f.TempDir()
	tree, err := pcitest.New(root)
	if err != nil {
		f.Fatal(err)
	}
	const addr = "0000:01:00.0"
	if err := tree.Add(pcitest.Function{Address: addr, Vendor: 0x10de, Device: 0x2204, Class: 0x030000, IOMMUGroup: 1, SRIOVTotalVFs: 8}); err != nil {
		f.Fatal(err)
	}
	fs, err := pci.NewFS(root)
	if err != nil {
		f.Fatal(err)
	}
	a, _ := pci.ParseAddress(addr)
	dir := fs.DevicePath(a)
	// boot_vga exists only on VGA functions; the others exist already.
	originals := map[string][]byte{}
	for _, name := range attrFiles {
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err == nil {
			originals[name] = data
		}
	}
	f.Fuzz(func(t *testing.T, sel uint8, content string) {
		name := attrFiles[int(sel)%len(attrFiles)]
		file := filepath.Join(dir, name)
		if err := os.WriteFile(file, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if orig, ok := originals[name]; ok {
				_ = os.WriteFile(file, orig, 0o644)
			} else {
				_ = os.Remove(file)
			}
		}()
		if name == "driver_override" {
			got, err := pci.ReadDriverOverride(file)
			if err != nil {
				t.Fatalf("ReadDriverOverride: %v", err)
			}
			if got != strings.TrimSpace(got) || got == "(null)" {
				t.Fatalf("ReadDriverOverride(%q) = %q", content, got)
			}
			return
		}
		d, err := fs.Device(a)
		if err != nil {
			if !strings.Contains(err.Error(), name) || !strings.Contains(err.Error(), addr) {
				t.Fatalf("error %q names neither the file %s nor the device", err, name)
			}
			return
		}
		trimmed := strings.TrimSpace(content)
		var shown string
		switch name {
		case "vendor":
			shown = fmt.Sprintf("%#x", d.VendorID)
		case "device":
			shown = fmt.Sprintf("%#x", d.DeviceID)
		case "subsystem_vendor":
			shown = fmt.Sprintf("%#x", d.SubsystemVendorID)
		case "subsystem_device":
			shown = fmt.Sprintf("%#x", d.SubsystemDeviceID)
		case "class":
			shown = fmt.Sprintf("%#x", d.Class)
			if d.Class > 0xffffff {
				t.Fatalf("class %#x is wider than 24 bits", d.Class)
			}
		case "config":
			if (d.HeaderType == nil) == (d.ConfigProblem == "") || (d.ConfigProblem != "" && !strings.Contains(d.ConfigProblem, "config")) {
				t.Fatalf("config %q: header type %v, problem %q", content, d.HeaderType, d.ConfigProblem)
			}
			return
		case "resource":
			if (d.BARs == nil) == (d.ResourceProblem == "") || (d.ResourceProblem != "" && !strings.Contains(d.ResourceProblem, "resource")) {
				t.Fatalf("resource %q: BARs %v, problem %q", content, d.BARs, d.ResourceProblem)
			}
			if d.BARs != nil && (*d.BARs < 0 || *d.BARs > 6) {
				t.Fatalf("resource %q: %d standard BARs", content, *d.BARs)
			}
			return
		case "numa_node":
			if d.NUMANode < -1 {
				t.Fatalf("numa_node %q read as %d", content, d.NUMANode)
			}
			return
		case "sriov_totalvfs", "sriov_numvfs":
			if d.SRIOVTotalVFs < 0 || d.SRIOVNumVFs < 0 {
				t.Fatalf("%s %q read as a negative count: total %d, enabled %d", name, content, d.SRIOVTotalVFs, d.SRIOVNumVFs)
			}
			return
		default:
			return
		}
		// The value read is the one the file holds, leading zeros aside.
		digits := strings.TrimLeft(strings.TrimPrefix(trimmed, "0x"), "0")
		if digits == "" {
			digits = "0"
		}
		if !strings.EqualFold(digits, strings.TrimPrefix(shown, "0x")) {
			t.Fatalf("%s %q read as %s", name, content, shown)
		}
	})
}
