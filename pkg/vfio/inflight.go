package vfio

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// ErrBlocked means an earlier sysfs access to the same function has not
// returned from the kernel yet (an unbind from a VFIO driver waits until
// user space closes the device). The Binder does not start another one: a
// retry of the kubelet must not add a thread blocked in the kernel each
// time.
var ErrBlocked = errors.New("an earlier access to the function is still blocked in the kernel")

// inflight tracks the sysfs accesses under way, by function.
type inflight struct {
	mu  sync.Mutex
	ops map[string]inflightOp
}

type inflightOp struct {
	what  string
	start time.Time
}

// begin registers an access to the function key, or fails with ErrBlocked
// when one is still under way.
func (f *inflight) begin(key, what string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if op, busy := f.ops[key]; busy {
		return fmt.Errorf("%w: %s has not returned after %s (a process may still hold the device open); not trying again until it does",
			ErrBlocked, op.what, time.Since(op.start).Round(time.Millisecond))
	}
	if f.ops == nil {
		f.ops = map[string]inflightOp{}
	}
	f.ops[key] = inflightOp{what: what, start: time.Now()}
	return nil
}

func (f *inflight) end(key string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.ops, key)
}

// accessKey names the function a sysfs access is about: the address that
// unbind, bind and drivers_probe are written, or the device directory of an
// attribute such as driver_override.
func accessKey(path string, data []byte) string {
	switch filepath.Base(path) {
	case "unbind", "bind", "drivers_probe":
		return strings.TrimSpace(string(data))
	}
	return filepath.Base(filepath.Dir(path))
}
