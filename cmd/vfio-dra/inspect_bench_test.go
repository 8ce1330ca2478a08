package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	resourceapi "k8s.io/api/resource/v1"

	"github.com/vfio-dra/vfio-dra-driver/pkg/benchmark"
	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview/hostviewtest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// rawReadEnv makes the test binary the floor of BenchmarkInspectProcess1024:
// a process that reads the node's sysfs files raw and exits.
const rawReadEnv = "VFIO_DRA_BENCH_READ_RAW"

func TestMain(m *testing.M) {
	if root := os.Getenv(rawReadEnv); root != "" {
		n, err := pcitest.ReadRaw(root)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println(n)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// BenchmarkInspectProcess1024 runs `vfio-dra inspect -o json`, built as
// make build builds it, on the 1,024-VF node, against a process that reads
// the same sysfs files raw. Goal: 1.25x. The subject also reads the host
// view (an idle host) and encodes the JSON; both pay a process start.
func BenchmarkInspectProcess1024(b *testing.B) {
	dir := b.TempDir()
	sys, proc := filepath.Join(dir, "sys"), filepath.Join(dir, "proc")
	if _, err := pcitest.NewSRIOVNode(sys, 4, 256); err != nil {
		b.Fatal(err)
	}
	if _, err := hostviewtest.New(sys, proc); err != nil {
		b.Fatal(err)
	}
	bin := filepath.Join(dir, "vfio-dra")
	if out, err := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".").CombinedOutput(); err != nil {
		b.Fatalf("go build: %v: %s", err, out)
	}
	self, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	run := func(cmd *exec.Cmd) []byte {
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			b.Fatalf("%s: %v: %s", cmd, err, stderr.Bytes())
		}
		return out
	}
	inspect := func() []byte {
		return run(exec.Command(bin, "inspect", "--sysfs-root", sys, "--proc-root", proc, "--node-name", "bench-node", "-o", "json"))
	}
	raw := func() {
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), rawReadEnv+"="+sys)
		run(cmd)
	}

	var slices resourceapi.ResourceSliceList
	if err := json.Unmarshal(inspect(), &slices); err != nil {
		b.Fatalf("inspect -o json: %v", err)
	}
	devices := 0
	for _, s := range slices.Items {
		devices += len(s.Spec.Devices)
	}
	if devices != 1024 {
		b.Fatalf("inspect publishes %d devices, want 1024", devices)
	}
	benchmark.Compare(b, 1.25, raw, func() { inspect() })
}
