package pci

import "testing"

func TestParseAddress(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    Address
		wantErr bool
	}{
		"plain":                {in: "0000:3b:00.0", want: Address{Bus: 0x3b}},
		"function 7":           {in: "0000:00:1f.7", want: Address{Device: 0x1f, Function: 7}},
		"wide domain":          {in: "10000:e1:00.1", want: Address{Domain: 0x10000, Bus: 0xe1, Function: 1}},
		"upper case":           {in: "0000:3B:00.0", wantErr: true},
		"device above 1f":      {in: "0000:00:20.0", wantErr: true},
		"function 8":           {in: "0000:00:00.8", wantErr: true},
		"short domain":         {in: "00:3b:00.0", wantErr: true},
		"trailing newline":     {in: "0000:3b:00.0\n", wantErr: true},
		"path traversal":       {in: "../../0:00.0", wantErr: true},
		"empty":                {in: "", wantErr: true},
		"missing the function": {in: "0000:3b:00", wantErr: true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ParseAddress(tc.in)
			if (err != nil) != tc.wantErr {
				t.Fatalf("ParseAddress(%q) error = %v, want error %v", tc.in, err, tc.wantErr)
			}
			if err != nil {
				return
			}
			if got != tc.want {
				t.Errorf("ParseAddress(%q) = %+v, want %+v", tc.in, got, tc.want)
			}
			if got.String() != tc.in {
				t.Errorf("String() = %q, want %q", got.String(), tc.in)
			}
		})
	}
}

func TestDeviceNameRoundTrip(t *testing.T) {
	a, err := ParseAddress("0000:3b:00.0")
	if err != nil {
		t.Fatal(err)
	}
	if got := a.DeviceName(); got != "pci-0000-3b-00-0" {
		t.Errorf("DeviceName() = %q, want pci-0000-3b-00-0", got)
	}
	back, err := ParseDeviceName(a.DeviceName())
	if err != nil || back != a {
		t.Errorf("ParseDeviceName(%q) = %v, %v; want %v", a.DeviceName(), back, err, a)
	}
	for _, bad := range []string{"gpu-0", "pci-0000-3b-00", "pci-0000-3B-00-0", "pci-0000-3b-00-0-1"} {
		if _, err := ParseDeviceName(bad); err == nil {
			t.Errorf("ParseDeviceName(%q) succeeded, want error", bad)
		}
	}
}

func TestIsPassiveBridge(t *testing.T) {
	tests := []struct {
		class  uint32
		driver string
		want   bool
	}{
		{0x060000, "", true},         // host bridge
		{0x060400, "pcieport", true}, // root port
		{0x060401, "", true},         // subtractive-decode PCI bridge
		{0x060400, "pci-stub", true}, //
		{0x060400, "shpchp", false},  // a hotplug driver owns it
		{0x060100, "lpc_ich", false}, // ISA bridge with its host driver
		{0x060100, "", false},        // ISA bridge: moves with the group
		{0x068000, "", false},        // other bridge
		{0x020000, "", false},        // not a bridge
	}
	for _, tc := range tests {
		d := &Device{Class: tc.class, Driver: tc.driver}
		if got := d.IsPassiveBridge(); got != tc.want {
			t.Errorf("IsPassiveBridge(class %06x, driver %q) = %v, want %v", tc.class, tc.driver, got, tc.want)
		}
	}
}
