package pcitest

import (
	"flag"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
)

var update = flag.Bool("update", false, "rewrite demo/sysfs from Server()")

// demoSysfs is the fixture shipped for `make demo`; it must be exactly what
// NewServer lays out, so that the demo shows what the tests test.
const demoSysfs = "../../../demo/sysfs"

func TestDemoFixtureIsServer(t *testing.T) {
	want := t.TempDir()
	if _, err := NewServer(want); err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.RemoveAll(demoSysfs); err != nil {
			t.Fatal(err)
		}
		if _, err := NewServer(demoSysfs); err != nil {
			t.Fatal(err)
		}
	}
	if diff := cmp.Diff(snapshot(t, want), snapshot(t, demoSysfs)); diff != "" {
		t.Errorf("demo/sysfs differs from Server() (-want +got); run go test ./pkg/pci/pcitest -run TestDemoFixtureIsServer -update:\n%s", diff)
	}
}

// snapshot describes a tree: link targets, file contents and directories.
func snapshot(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			out[rel] = "-> " + target
		case d.IsDir():
			out[rel] = "dir"
		default:
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out[rel] = string(data)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
