package main

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// TestMain lets the test binary stand in for kernelemu in a child process.
func TestMain(m *testing.M) {
	if os.Getenv("KERNELEMU_TEST_MAIN") == "1" {
		os.Args = append([]string{"kernelemu"}, strings.Fields(os.Getenv("KERNELEMU_TEST_ARGS"))...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestBindThroughAnotherProcess binds a GPU and its audio function with the
// production Binder (OSWriter) while kernelemu runs as a separate process.
func TestBindThroughAnotherProcess(t *testing.T) {
	dir := t.TempDir()
	tree, err := pcitest.New(filepath.Join(dir, "sys"))
	if err != nil {
		t.Fatal(err)
	}
	err = tree.Add(
		pcitest.Function{Address: "0000:00:01.0", Vendor: 0x8086, Device: 0x1901, Class: 0x060400, Driver: "pcieport", IOMMUGroup: 1},
		pcitest.Function{Address: "0000:01:00.0", Parent: "0000:00:01.0", Vendor: 0x10de, Device: 0x2204, Class: 0x030000, Driver: "nvidia", IOMMUGroup: 2},
		pcitest.Function{Address: "0000:01:00.1", Parent: "0000:00:01.0", Vendor: 0x10de, Device: 0x1aef, Class: 0x040300, Driver: "snd_hda_intel", IOMMUGroup: 2},
		pcitest.Function{Address: "0000:02:00.0", Vendor: 0x8086, Device: 0x10d3, Class: 0x020000, Driver: "vfio-pci", IOMMUGroup: 3},
	)
	if err != nil {
		t.Fatal(err)
	}
	if err := tree.AddDriver("e1000e"); err != nil {
		t.Fatal(err)
	}
	dev := filepath.Join(dir, "dev")

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "KERNELEMU_TEST_MAIN=1",
		"KERNELEMU_TEST_ARGS=--sysfs-root "+tree.Root+" --dev-root "+dev+" --native 0000:02:00.0=e1000e")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		if err := <-exited; err != nil {
			t.Logf("kernelemu: %v", err)
		}
	})
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		exited <- cmd.Wait()
	}()
	select {
	case l := <-lines:
		if l != "ready" {
			t.Fatalf("kernelemu printed %q, want ready; stderr: %s", l, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("kernelemu not ready; stderr: %s", stderr.String())
	}

	fs, err := pci.NewFS(tree.Root)
	if err != nil {
		t.Fatal(err)
	}
	b := vfio.NewBinder(fs, dev, vfio.Options{Timeout: 5 * time.Second, PollInterval: 5 * time.Millisecond})
	eps, err := vfio.GroupEndpoints(fs, 2)
	if err != nil {
		t.Fatal(err)
	}
	originals, err := b.Snapshot(eps)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Bind(t.Context(), 2, originals, "vfio-pci"); err != nil {
		t.Fatalf("Bind: %v; kernelemu stderr: %s", err, stderr.String())
	}
	for _, a := range eps {
		if d, _ := fs.CurrentDriver(a); d != "vfio-pci" {
			t.Errorf("%s on %q after Bind", a, d)
		}
	}
	if err := b.Restore(t.Context(), originals, "vfio-pci"); err != nil {
		t.Fatalf("Restore: %v; kernelemu stderr: %s", err, stderr.String())
	}
	for _, o := range originals {
		a, _ := pci.ParseAddress(o.Address)
		if d, _ := fs.CurrentDriver(a); d != o.Driver {
			t.Errorf("%s on %q after Restore, want %s", a, d, o.Driver)
		}
	}
	if _, err := os.Stat(filepath.Join(dev, "vfio", "2")); !os.IsNotExist(err) {
		t.Errorf("/dev/vfio/2 after Restore: %v", err)
	}

	// --native: the function found on vfio-pci goes to e1000e when given back.
	nic := []vfio.Original{{Address: "0000:02:00.0", Driver: "e1000e"}}
	if err := b.Restore(t.Context(), nic, "vfio-pci"); err != nil {
		t.Fatalf("Restore of 0000:02:00.0: %v; kernelemu stderr: %s", err, stderr.String())
	}
	if d, _ := fs.CurrentDriver(pci.Address{Bus: 2}); d != "e1000e" {
		t.Errorf("0000:02:00.0 on %q after Restore, want e1000e", d)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err // for the cleanup
		if err != nil {
			t.Errorf("kernelemu exit: %v; stderr: %s", err, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("kernelemu did not stop on SIGTERM")
	}
	if stderr.Len() > 0 {
		t.Errorf("kernelemu reported errors: %s", stderr.String())
	}
}
