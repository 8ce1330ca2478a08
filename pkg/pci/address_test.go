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
	endpoint, bridge, cardbus := HeaderEndpoint, HeaderBridge, HeaderCardBus
	tests := []struct {
		class  uint32
		header *int // nil: config unreadable
		driver string
		want   bool
	}{
		{0x060000, &endpoint, "", true},            // host bridge
		{0x060000, &endpoint, "skl_uncore", false}, // host bridge with a perf driver
		{0x060400, &bridge, "pcieport", true},      // root port
		{0x060401, &bridge, "", true},              // subtractive-decode PCI bridge
		{0x060400, &bridge, "pci-stub", true},      //
		{0x060400, &bridge, "shpchp", false},       // a hotplug driver owns it
		{0x060400, nil, "pcieport", true},          // config unreadable: the class decides
		{0x060900, nil, "", true},                  // semi-transparent bridge, config unreadable
		{0x060700, &cardbus, "", true},             // CardBus bridge without its driver
		{0x060700, &cardbus, "yenta_cardbus", false},
		{0x060100, &endpoint, "lpc_ich", false}, // ISA bridge with its host driver
		{0x060100, &endpoint, "", false},        // ISA bridge: moves with the group
		{0x068000, &endpoint, "", false},        // NVSwitch: an endpoint whatever the class
		{0x068000, nil, "", false},              // other bridge, config unreadable
		{0x088000, &bridge, "pcieport", true},   // forwards: the header type decides
		{0x020000, &endpoint, "", false},        // not a bridge
	}
	for _, tc := range tests {
		d := &Device{Class: tc.class, Driver: tc.driver, HeaderType: tc.header}
		if got := d.IsPassiveBridge(); got != tc.want {
			t.Errorf("IsPassiveBridge(class %06x, header %v, driver %q) = %v, want %v", tc.class, tc.header, tc.driver, got, tc.want)
		}
	}
}
