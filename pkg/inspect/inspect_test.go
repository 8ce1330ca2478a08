package inspect_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	"sigs.k8s.io/yaml"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview/hostviewtest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inspect"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// server lays out pcitest.Server in <dir>/sys and its host view in
// <dir>/proc, and returns the sysfs root.
func server(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	root := filepath.Join(dir, "sys")
	if _, err := pcitest.NewServer(root); err != nil {
		t.Fatal(err)
	}
	if _, err := hostviewtest.Server(root, filepath.Join(dir, "proc")); err != nil {
		t.Fatal(err)
	}
	return root
}

// run runs inspect; without a proc root, the one beside the sysfs root.
func run(t *testing.T, o inspect.Options) (string, string, error) {
	t.Helper()
	if o.ProcRoot == "" {
		o.ProcRoot = filepath.Join(filepath.Dir(o.SysfsRoot), "proc")
	}
	var out, errOut bytes.Buffer
	err := inspect.Run(&out, &errOut, o)
	return out.String(), errOut.String(), err
}

func TestTable(t *testing.T) {
	out, _, err := run(t, inspect.Options{SysfsRoot: server(t), NodeName: "n", DriverName: "vfio.dra.dev", Output: inspect.FormatTable})
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != len(pcitest.Server())+1 {
		t.Fatalf("got %d lines, want a header and one line per function:\n%s", len(lines), out)
	}
	for _, want := range []string{
		"0000:01:00.0  10de:2204      030000  2 (2)        nvidia         0     pci-0000-01-00-0  offered",
		"0000:00:02.0  1a03:2000      030000  3 (1)        ast            0     -                 not offered: boot VGA device",
		"0000:00:14.0  8086:a1af      0c0330  -            xhci_hcd       -     -                 not offered: no IOMMU group",
		"0000:84:00.0  10ee:903f      120000  27 (1)       -              1     pci-0000-84-00-0  offered",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

func TestSlicesAsJSONAndYAML(t *testing.T) {
	root := server(t)
	config := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(config, []byte("apiVersion: vfio.dra.dev/v1alpha1\nkind: DriverConfiguration\nallow:\n- vendorID: \"19ee\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	o := inspect.Options{SysfsRoot: root, NodeName: "worker-1", DriverName: "vfio.example.com", ConfigFile: config}
	var lists []corev1.List
	for _, format := range []string{inspect.FormatJSON, inspect.FormatYAML} {
		o.Output = format
		out, _, err := run(t, o)
		if err != nil {
			t.Fatal(err)
		}
		var list corev1.List
		if err := yaml.UnmarshalStrict([]byte(out), &list); err != nil {
			t.Fatalf("%s output is not a List: %v", format, err)
		}
		lists = append(lists, list)
	}
	if len(lists[0].Items) != 1 || string(lists[0].Items[0].Raw) == "" {
		t.Fatalf("want one slice, got %+v", lists[0])
	}
	if lists[0].APIVersion != "v1" || lists[0].Kind != "List" {
		t.Errorf("list type = %s/%s", lists[0].APIVersion, lists[0].Kind)
	}
	var fromJSON, fromYAML resourceapi.ResourceSlice
	if err := json.Unmarshal(lists[0].Items[0].Raw, &fromJSON); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(lists[1].Items[0].Raw, &fromYAML); err != nil {
		t.Fatal(err)
	}
	if fromJSON.Kind != "ResourceSlice" || fromJSON.APIVersion != "resource.k8s.io/v1" {
		t.Errorf("item type = %s/%s", fromJSON.APIVersion, fromJSON.Kind)
	}
	s := fromJSON.Spec
	if s.Driver != "vfio.example.com" || *s.NodeName != "worker-1" || s.Pool.Name != "worker-1" || s.Pool.ResourceSliceCount != 1 {
		t.Errorf("slice spec header wrong: %+v", s)
	}
	if len(s.Devices) != 1 || s.Devices[0].Name != "pci-0000-82-00-0" {
		t.Errorf("devices = %+v, want only the 19ee SmartNIC", s.Devices)
	}
	if fromJSON.GenerateName != "00000-vfio.example.com-worker-1-" {
		t.Errorf("generateName = %q", fromJSON.GenerateName)
	}
	j, _ := json.Marshal(fromJSON)
	y, _ := json.Marshal(fromYAML)
	if !bytes.Equal(j, y) {
		t.Errorf("json and yaml output differ:\n%s\n%s", j, y)
	}
}

func TestErrors(t *testing.T) {
	root := server(t)
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("apiVersion: vfio.dra.dev/v1alpha1\nkind: DriverConfiguration\nallow:\n- vendor: x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := map[string]struct {
		o    inspect.Options
		want []string
	}{
		"unknown format":            {inspect.Options{SysfsRoot: root, NodeName: "n", Output: "xml"}, []string{`"xml"`}},
		"no node":                   {inspect.Options{SysfsRoot: root, Output: "table"}, []string{"node name"}},
		"node name with upper case": {inspect.Options{SysfsRoot: root, NodeName: "Worker-1", Output: "table"}, []string{`node name "Worker-1" is not a valid node name`, "lower case"}},
		"node name with a slash":    {inspect.Options{SysfsRoot: root, NodeName: "../etc", Output: "table"}, []string{`"../etc" is not a valid node name`}},
		"node name too long":        {inspect.Options{SysfsRoot: root, NodeName: strings.Repeat("a", 254), Output: "json"}, []string{"not a valid node name", "253"}},
		"missing sysfs":             {inspect.Options{SysfsRoot: filepath.Join(root, "nope"), NodeName: "n", Output: "table"}, []string{"nope"}},
		"malformed config":          {inspect.Options{SysfsRoot: root, NodeName: "n", Output: "table", ConfigFile: bad}, []string{bad, "allow[0].vendor"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, _, err := run(t, tc.o)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestUnreadableDeviceIsReported(t *testing.T) {
	root := server(t)
	tree := pcitest.Open(root)
	dir, err := tree.DevicePath("0000:82:00.0")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, dir, "vendor"), []byte("garbage\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, errOut, err := run(t, inspect.Options{SysfsRoot: root, NodeName: "n", Output: inspect.FormatTable})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(errOut, "0000:82:00.0") || strings.Contains(out, "0000:82:00.0") {
		t.Errorf("want the unreadable device on stderr only; stdout:\n%s\nstderr:\n%s", out, errOut)
	}
}

// TestUnreadableConfigIsNoted: a function whose config cannot be read is
// still decided, by its class, and the table says so.
func TestUnreadableConfigIsNoted(t *testing.T) {
	root := server(t)
	dir, err := pcitest.Open(root).DevicePath("0000:84:00.0")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, dir, "config"), []byte{0xee, 0x10}, 0o644); err != nil {
		t.Fatal(err)
	}
	out, _, err := run(t, inspect.Options{SysfsRoot: root, NodeName: "n", Output: inspect.FormatTable})
	if err != nil {
		t.Fatal(err)
	}
	want := "pci-0000-84-00-0  offered (note: header type unknown, the class decided whether it is a bridge: " + filepath.Join(root, dir, "config") + ": 2 bytes, too short"
	if !strings.Contains(out, want) {
		t.Errorf("table lacks %q:\n%s", want, out)
	}
}

// TestCheckpointHostDrivers: with the plugin's checkpoint, a function that
// a prepared claim moved to vfio-pci shows the driver it goes back to, and
// the claim's container holding its group is no other user.
func TestCheckpointHostDrivers(t *testing.T) {
	root := server(t)
	tree := pcitest.Open(root)
	if err := tree.Unbind("0000:82:00.0"); err != nil {
		t.Fatal(err)
	}
	if err := tree.Bind("0000:82:00.0", "vfio-pci"); err != nil {
		t.Fatal(err)
	}
	cpFile := filepath.Join(t.TempDir(), "checkpoint.json")
	if err := checkpoint.NewStore(cpFile).Update(func(cp *checkpoint.Checkpoint) error {
		cp.Claims["uid-1"] = &checkpoint.Claim{Namespace: "ns", Name: "nic", State: checkpoint.PrepareCompleted,
			Groups: []checkpoint.Group{{Number: 25, Target: "vfio-pci", Restore: true,
				Members: []checkpoint.Member{{Address: "0000:82:00.0", Driver: "nfp"}}}}}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// The claim's container holds the group.
	h := &hostviewtest.Host{Sys: root, Proc: filepath.Join(filepath.Dir(root), "proc")}
	if err := h.AddProcess(3100, "testpmd", "/dev/vfio/vfio", "/dev/vfio/25"); err != nil {
		t.Fatal(err)
	}
	o := inspect.Options{SysfsRoot: root, NodeName: "n", Output: inspect.FormatTable}
	without, _, err := run(t, o)
	if err != nil {
		t.Fatal(err)
	}
	o.CheckpointFile = cpFile
	with, _, err := run(t, o)
	if err != nil {
		t.Fatal(err)
	}
	row := func(table string) string {
		for _, l := range strings.Split(table, "\n") {
			if strings.HasPrefix(l, "0000:82:00.0") {
				return l
			}
		}
		return ""
	}
	if !strings.Contains(row(without), "vfio-pci") || !strings.Contains(row(with), " nfp ") {
		t.Errorf("want vfio-pci without and nfp with the checkpoint:\n%s\n%s", row(without), row(with))
	}
	// Without the checkpoint the container is another user; with it, the
	// function is the claim's and published as before.
	if !strings.HasSuffix(row(without), "in use: held by pid 3100 (testpmd) through /dev/vfio/25") || !strings.HasSuffix(row(with), " offered") {
		t.Errorf("want the function held without and offered with the checkpoint:\n%s\n%s", row(without), row(with))
	}
	o.CheckpointFile = filepath.Join(t.TempDir(), "missing.json")
	if _, _, err := run(t, o); err == nil {
		t.Error("a missing checkpoint file was accepted")
	}
}

// TestCheckpointClaims: the checkpoint's claims are listed, a claim whose
// groups are held because giving them back failed shows why, and a
// checkpoint from another boot is said to be so and not applied.
func TestCheckpointClaims(t *testing.T) {
	root := server(t)
	proc := t.TempDir()
	if err := os.MkdirAll(filepath.Join(proc, "sys/kernel/random"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(proc, "sys/kernel/random/boot_id"), []byte("boot-1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cpFile := filepath.Join(t.TempDir(), "checkpoint.json")
	write := func(bootID string) {
		t.Helper()
		if err := checkpoint.NewStore(cpFile).Update(func(cp *checkpoint.Checkpoint) error {
			cp.BootID = bootID
			cp.Claims["uid-held"] = &checkpoint.Claim{Namespace: "ns", Name: "crashed", State: checkpoint.PrepareStarted,
				LastError: "IOMMU group 2: 0000:01:00.0: check driver: nvidia: driver not loaded",
				Groups: []checkpoint.Group{{Number: 2, Target: "vfio-pci", Restore: true,
					Members: []checkpoint.Member{{Address: "0000:01:00.0", Driver: "nvidia"}}}}}
			cp.Claims["uid-ok"] = &checkpoint.Claim{Namespace: "ns", Name: "nic", State: checkpoint.PrepareCompleted,
				Groups: []checkpoint.Group{{Number: 25, Target: "vfio-pci", Restore: true,
					Members: []checkpoint.Member{{Address: "0000:82:00.0", Driver: "nfp"}}}}}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	write("boot-1")
	o := inspect.Options{SysfsRoot: root, NodeName: "n", Output: inspect.FormatTable, CheckpointFile: cpFile, ProcRoot: proc}
	out, errOut, err := run(t, o)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"ns/crashed  uid-held  2             held: prepare did not finish and giving its groups back failed",
		"nvidia: driver not loaded",
		"ns/nic      uid-ok    25            prepared",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(errOut, "another boot") || strings.Contains(errOut, "ResourceClaim") {
		t.Errorf("warnings for a checkpoint of this boot in table output: %s", errOut)
	}
	o.Output = inspect.FormatJSON
	if _, errOut, err = run(t, o); err != nil || !strings.Contains(errOut, "ResourceClaim ns/crashed (uid-held), IOMMU groups 2: held") || strings.Contains(errOut, "ns/nic") {
		t.Errorf("JSON output: err %v, want only the held claim warned about on stderr: %s", err, errOut)
	}

	write("boot-0")
	o.Output = inspect.FormatTable
	out, errOut, err = run(t, o)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(errOut, "from another boot (boot ID boot-0, this boot boot-1)") {
		t.Errorf("no warning about the other boot: %q", errOut)
	}
	if strings.Contains(out, "uid-held") {
		t.Errorf("claims of another boot are listed as current:\n%s", out)
	}
}

// TestRunningHost shows, function by function, what the host uses and why
// it is not offered.
func TestRunningHost(t *testing.T) {
	dir := t.TempDir()
	tree, h, err := hostviewtest.RunningHost(filepath.Join(dir, "sys"), filepath.Join(dir, "proc"))
	if err != nil {
		t.Fatal(err)
	}
	out, errOut, err := run(t, inspect.Options{SysfsRoot: tree.Root, ProcRoot: h.Proc, NodeName: "n", Output: inspect.FormatTable})
	if err != nil {
		t.Fatal(err)
	}
	if errOut != "" {
		t.Errorf("warnings: %s", errOut)
	}
	for addr, want := range map[string]string{
		hostviewtest.RootNVMe:    "not offered: in use: / (vg0-root on nvme0n1p3)",
		hostviewtest.MgmtNIC:     "not offered: in use: default route (eno1)",
		hostviewtest.MgmtNICMate: "not offered: IOMMU group 3: member " + hostviewtest.MgmtNIC + " is not offered (in use: default route (eno1))",
		hostviewtest.VMGPU:       "not offered: in use: held by pid 4242 (qemu-system-x86) through /dev/vfio/60",
		hostviewtest.UART:        "not offered: in use: serial console ttyS4",
		hostviewtest.FreeVFIO:    "offered",
		hostviewtest.FreeNVMe:    "offered",
		// Its container is another user without the plugin's checkpoint.
		hostviewtest.OwnNIC: "not offered: in use: held by pid 5000 (dpdk-testpmd) through /dev/vfio/63",
	} {
		line := ""
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, addr) {
				line = l
			}
		}
		if !strings.HasSuffix(line, want) {
			t.Errorf("%s: line %q, want it to end in %q", addr, line, want)
		}
	}
}

func TestHostViewUnavailable(t *testing.T) {
	root := server(t)
	out, errOut, err := run(t, inspect.Options{SysfsRoot: root, ProcRoot: filepath.Join(t.TempDir(), "empty"), NodeName: "n", Output: inspect.FormatTable})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(errOut, "warning: the host view cannot be read") || !strings.Contains(errOut, "mountinfo") {
		t.Errorf("warnings %q do not say the host view is unavailable", errOut)
	}
	if !strings.Contains(out, "0000:82:00.0") || !strings.Contains(out, "host view unavailable") {
		t.Errorf("the SmartNIC's decision does not name the host view:\n%s", out)
	}
}

// TestHealthTaints: the table and the slices show the taints the plugin
// publishes: a function that fell off the bus, one without a reset method,
// and a prepared claim's function that another driver took (from the
// checkpoint).
func TestHealthTaints(t *testing.T) {
	root := server(t)
	tree := pcitest.Open(root)
	// Every function but the FPGA can be reset.
	for _, a := range []string{"0000:01:00.0", "0000:01:00.1", "0000:02:01.0", "0000:02:02.0", "0000:03:00.0", "0000:03:00.1", "0000:81:00.2", "0000:81:00.3", "0000:82:00.0", "0000:83:00.0"} {
		if err := tree.WriteDeviceFile(a, "reset_method", "flr\n"); err != nil {
			t.Fatal(err)
		}
	}
	if err := tree.WriteDeviceFile("0000:82:00.0", "config", strings.Repeat("\xff", 256)); err != nil {
		t.Fatal(err)
	}
	// A claim bound the GPU's group to vfio-pci; the audio function is
	// back on its host driver behind the plugin's back.
	if err := tree.Unbind("0000:01:00.0"); err != nil {
		t.Fatal(err)
	}
	if err := tree.Bind("0000:01:00.0", "vfio-pci"); err != nil {
		t.Fatal(err)
	}
	cpFile := filepath.Join(t.TempDir(), "checkpoint.json")
	if err := checkpoint.NewStore(cpFile).Update(func(cp *checkpoint.Checkpoint) error {
		cp.Claims["uid-1"] = &checkpoint.Claim{Namespace: "ns", Name: "gpu", State: checkpoint.PrepareCompleted,
			Devices: []checkpoint.Device{{Requests: []string{"gpu"}, Pool: "n", Device: "pci-0000-01-00-0", PCIAddress: "0000:01:00.0", IOMMUGroup: 2}},
			Groups: []checkpoint.Group{{Number: 2, Target: "vfio-pci", Restore: true, Members: []checkpoint.Member{
				{Address: "0000:01:00.0", Driver: "nvidia"}, {Address: "0000:01:00.1", Driver: "snd_hda_intel"}}}}}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	o := inspect.Options{SysfsRoot: root, NodeName: "n", DriverName: "vfio.dra.dev", CheckpointFile: cpFile, Output: inspect.FormatTable}
	out, _, err := run(t, o)
	if err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[string]string{
		"0000:82:00.0": "offered, tainted vfio.dra.dev/unhealthy=off-bus:NoSchedule",
		"0000:84:00.0": "offered, tainted vfio.dra.dev/no-reset:None",
		"0000:01:00.0": "offered, tainted vfio.dra.dev/unhealthy=driver-changed:NoSchedule",
		"0000:01:00.1": "offered, tainted vfio.dra.dev/unhealthy=driver-changed:NoSchedule",
		"0000:03:00.0": "offered",
	} {
		var row string
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, addr) {
				row = l
			}
		}
		if !strings.Contains(row, " "+want) || want == "offered" && strings.Contains(row, "tainted") {
			t.Errorf("row of %s: %q, want %q", addr, row, want)
		}
	}

	o.Output = inspect.FormatJSON
	out, _, err = run(t, o)
	if err != nil {
		t.Fatal(err)
	}
	var list corev1.List
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatal(err)
	}
	taints := map[string][]resourceapi.DeviceTaint{}
	for _, item := range list.Items {
		var s resourceapi.ResourceSlice
		if err := json.Unmarshal(item.Raw, &s); err != nil {
			t.Fatal(err)
		}
		for _, d := range s.Spec.Devices {
			if len(d.Taints) > 0 {
				taints[d.Name] = d.Taints
			}
		}
	}
	driverChanged := []resourceapi.DeviceTaint{{Key: "vfio.dra.dev/unhealthy", Value: "driver-changed", Effect: resourceapi.DeviceTaintEffectNoSchedule}}
	want := map[string][]resourceapi.DeviceTaint{
		"pci-0000-82-00-0": {{Key: "vfio.dra.dev/unhealthy", Value: "off-bus", Effect: resourceapi.DeviceTaintEffectNoSchedule}},
		"pci-0000-84-00-0": {{Key: "vfio.dra.dev/no-reset", Effect: resourceapi.DeviceTaintEffectNone}},
		"pci-0000-01-00-0": driverChanged,
		"pci-0000-01-00-1": driverChanged,
	}
	if diff := cmp.Diff(want, taints); diff != "" {
		t.Errorf("taints in the slices (-want +got):\n%s", diff)
	}
}

// TestHealthState: with the plugin's health state, a fatal AER count that
// grew since the plugin last looked is an aer-fatal taint; one the plugin
// counted already is not; the state file is not written.
func TestHealthState(t *testing.T) {
	root := server(t)
	tree := pcitest.Open(root)
	for addr, n := range map[string]uint64{"0000:82:00.0": 3, "0000:83:00.0": 1} {
		if err := tree.WriteDeviceFile(addr, "aer_dev_fatal", pcitest.AERFatal(map[string]uint64{"DLP": n})); err != nil {
			t.Fatal(err)
		}
	}
	state := filepath.Join(t.TempDir(), "health.json")
	content := `{"apiVersion": "health.vfio.dra.dev/v1", "kind": "AERBaselines", "functions": {
  "0000:82:00.0": {"baseline": 1, "last": 1},
  "0000:83:00.0": {"baseline": 1, "last": 1}}}
`
	if err := os.WriteFile(state, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	out, _, err := run(t, inspect.Options{SysfsRoot: root, NodeName: "n", DriverName: "vfio.dra.dev", HealthStateFile: state, Output: inspect.FormatTable})
	if err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[string]string{
		"0000:82:00.0": "offered, tainted vfio.dra.dev/unhealthy=aer-fatal:NoSchedule",
		"0000:83:00.0": "offered",
	} {
		var row string
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, addr) {
				row = l
			}
		}
		if !strings.HasSuffix(row, " "+want) {
			t.Errorf("row of %s: %q, want it to end in %q", addr, row, want)
		}
	}
	if data, err := os.ReadFile(state); err != nil || string(data) != content {
		t.Errorf("inspect changed the plugin's health state: %q, %v", data, err)
	}
}
