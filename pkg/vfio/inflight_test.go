package vfio_test

import (
	"errors"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// TestBlockedWriteIsNotRepeated: while an unbind of a function is blocked
// in the kernel, a retry (the kubelet's) fails at once with ErrBlocked and
// writes nothing, so blocked threads cannot pile up; once the kernel lets
// the write go, the same Binder finishes the job.
func TestBlockedWriteIsNotRepeated(t *testing.T) {
	m := newMachine(t)
	originals, err := m.binder(nil, time.Second).Snapshot(addrs(t, nic))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.binder(nil, 5*time.Second).Bind(t.Context(), 4, originals, "vfio-pci"); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	var unbinds atomic.Int32
	w := &hookWriter{k: m.kernel, before: func(path string, _ []byte) bool {
		if filepath.Base(path) == "unbind" {
			if unbinds.Add(1) == 1 {
				<-release
			}
		}
		return true
	}}
	b := m.binder(w, 100*time.Millisecond)
	if err := b.Restore(t.Context(), originals, "vfio-pci"); !errors.Is(err, vfio.ErrTimeout) {
		close(release)
		t.Fatalf("first Restore: %v, want ErrTimeout", err)
	}
	start := time.Now()
	err = b.Restore(t.Context(), originals, "vfio-pci")
	if !errors.Is(err, vfio.ErrBlocked) {
		t.Errorf("retry while the unbind is blocked: %v, want ErrBlocked", err)
	}
	if d := time.Since(start); d > 90*time.Millisecond {
		t.Errorf("retry took %s: it waited instead of failing at once", d)
	}
	if n := unbinds.Load(); n != 1 {
		t.Errorf("%d unbind writes, want 1: the retry wrote again", n)
	}
	close(release)
	deadline := time.Now().Add(5 * time.Second)
	for {
		err = b.Restore(t.Context(), originals, "vfio-pci")
		if !errors.Is(err, vfio.ErrBlocked) || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if err != nil {
		t.Fatalf("Restore after the kernel let the unbind go: %v", err)
	}
	if d := m.state(t, nic)[0].Driver; d != originals[0].Driver {
		t.Errorf("driver %q after Restore, want %q", d, originals[0].Driver)
	}
}
