package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
)

// full is sample with every field of the checkpoint's own types set, the
// extras file's included.
func full() *Checkpoint {
	cp := sample()
	c := cp.Claims["0b6f2b4e-9a41-4c3e-8f7e-1d2c3b4a5f60"]
	c.LastError = "unbind 0000:3b:00.0: device or resource busy"
	c.Devices[0].Attributes = map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
		"resource.kubernetes.io/pcieRoot": {StringValue: ptr("pci0000:3a")},
		"iommuGroup":                      {IntValue: new(int64(42))},
	}
	c.Groups[0].IOMMUFD = true
	c.Groups[0].Members[1].Target = "mlx5_vfio_pci"
	return cp
}

// TestCloneSharesNothing walks a clone of a checkpoint with every field
// set beside the original: equal values, and no map, slice or pointer in
// common, so that a field added later without a copy in Clone fails it.
func TestCloneSharesNothing(t *testing.T) {
	orig := full()
	requireAllSet(t, reflect.ValueOf(orig))
	clone := orig.Clone()
	if diff := cmp.Diff(orig, clone); diff != "" {
		t.Fatalf("clone differs (-orig +clone):\n%s", diff)
	}
	requireDisjoint(t, reflect.ValueOf(orig), reflect.ValueOf(clone), "Checkpoint")
}

// requireAllSet fails for a field of this package's types that is zero
// everywhere in v (others, such as resourceapi.DeviceAttribute, are
// copied with their generated DeepCopy).
func requireAllSet(t *testing.T, v reflect.Value) {
	t.Helper()
	set, all := map[string]bool{}, map[string]bool{}
	walkFields(v, set, all)
	for f := range all {
		if !set[f] {
			t.Errorf("%s is not set anywhere in the sample: set it, so that Clone is checked for it", f)
		}
	}
}

// walkFields records, as "Type.Field", every field of this package's
// types in v in all and those not zero in set.
func walkFields(v reflect.Value, set, all map[string]bool) {
	switch v.Kind() {
	case reflect.Pointer:
		if !v.IsNil() {
			walkFields(v.Elem(), set, all)
		}
	case reflect.Struct:
		if v.Type().PkgPath() != reflect.TypeFor[Checkpoint]().PkgPath() {
			return
		}
		for i := range v.NumField() {
			name := v.Type().Name() + "." + v.Type().Field(i).Name
			all[name] = true
			if !v.Field(i).IsZero() {
				set[name] = true
			}
			walkFields(v.Field(i), set, all)
		}
	case reflect.Slice:
		for i := range v.Len() {
			walkFields(v.Index(i), set, all)
		}
	case reflect.Map:
		for _, k := range v.MapKeys() {
			walkFields(v.MapIndex(k), set, all)
		}
	}
}

// requireDisjoint fails when a and b, equal values, share memory.
func requireDisjoint(t *testing.T, a, b reflect.Value, path string) {
	t.Helper()
	switch a.Kind() {
	case reflect.Pointer:
		if a.IsNil() {
			return
		}
		if a.Pointer() == b.Pointer() {
			t.Errorf("%s: clone shares the pointer", path)
			return
		}
		requireDisjoint(t, a.Elem(), b.Elem(), path)
	case reflect.Struct:
		for i := range a.NumField() {
			requireDisjoint(t, a.Field(i), b.Field(i), path+"."+a.Type().Field(i).Name)
		}
	case reflect.Slice:
		if a.Len() > 0 && a.Pointer() == b.Pointer() {
			t.Errorf("%s: clone shares the slice", path)
			return
		}
		for i := range a.Len() {
			requireDisjoint(t, a.Index(i), b.Index(i), fmt.Sprintf("%s[%d]", path, i))
		}
	case reflect.Map:
		if a.Len() > 0 && a.Pointer() == b.Pointer() {
			t.Errorf("%s: clone shares the map", path)
			return
		}
		for _, k := range a.MapKeys() {
			requireDisjoint(t, a.MapIndex(k), b.MapIndex(k), fmt.Sprintf("%s[%v]", path, k))
		}
	}
}

// scribble changes every claim of cp deeply, as a careless caller could.
func scribble(cp *Checkpoint) {
	for _, c := range cp.Claims {
		c.State = "Scribbled"
		for i := range c.Devices {
			c.Devices[i].Requests[0] = "scribbled"
			for k, v := range c.Devices[i].Attributes {
				if v.StringValue != nil {
					*v.StringValue = "scribbled"
				}
				if v.IntValue != nil {
					*v.IntValue = -1
				}
				c.Devices[i].Attributes[k] = v
			}
		}
		for i := range c.Groups {
			c.Groups[i].Members[0].Driver = "scribbled"
		}
	}
	cp.Claims["scribbled"] = &Claim{State: PrepareStarted}
}

// TestGetReturnsCopies: what Get returns, and the value that mutate
// changed in Update, belong to the caller; changing them later changes
// nothing that the Store returns next.
func TestGetReturnsCopies(t *testing.T) {
	s := storeWith(t, nil)
	var kept *Checkpoint
	if err := s.Update(func(cp *Checkpoint) error {
		*cp = *full()
		kept = cp
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	scribble(kept)
	for i := range 3 {
		got, err := s.Get()
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(full(), got); diff != "" {
			t.Fatalf("Get %d (-want +got):\n%s", i, diff)
		}
		scribble(got)
	}
	if err := s.Update(func(cp *Checkpoint) error {
		if diff := cmp.Diff(full(), cp); diff != "" {
			return fmt.Errorf("mutate got (-want +got):\n%s", diff)
		}
		scribble(cp)
		return errors.New("changed my mind")
	}); err == nil {
		t.Fatal("Update with a failing mutate succeeded")
	}
	got, err := s.Get()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(full(), got); diff != "" {
		t.Errorf("after a failed Update (-want +got):\n%s", diff)
	}
}

// TestReadSeesFilesChangedBehind: a Store that read or wrote the files
// still sees every change made behind its back, however small, even one
// that keeps the file's size and modification time.
func TestReadSeesFilesChangedBehind(t *testing.T) {
	s := storeWith(t, nil)
	if err := s.Update(func(cp *Checkpoint) error { *cp = *full(); return nil }); err != nil {
		t.Fatal(err)
	}
	get := func(step string) *Checkpoint {
		t.Helper()
		got, err := s.Get()
		if err != nil {
			t.Fatalf("%s: Get: %v", step, err)
		}
		return got
	}
	_ = get("cached")

	// Another Store (another process) writes.
	other := NewStore(s.Path())
	if err := other.Update(func(cp *Checkpoint) error { cp.BootID = "boot-2"; return nil }); err != nil {
		t.Fatal(err)
	}
	if got := get("other store"); got.BootID != "boot-2" {
		t.Errorf("after another Store's write: boot ID %q, want boot-2", got.BootID)
	}

	// The file rewritten in place with content of the same size and the
	// same modification time.
	st, err := os.Stat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	same := full()
	same.BootID = "boot-3"
	data, err := Encode(same)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(data)) != st.Size() {
		t.Fatalf("test setup: sizes %d and %d differ", len(data), st.Size())
	}
	if err := os.WriteFile(s.Path(), data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(s.Path(), time.Time{}, st.ModTime()); err != nil {
		t.Fatal(err)
	}
	if got := get("same size and time"); got.BootID != "boot-3" {
		t.Errorf("after an in-place write of the same size and time: boot ID %q, want boot-3", got.BootID)
	}

	// The extras file gone: the claim has no attributes any more.
	if err := os.Remove(ExtrasPath(s.Path())); err != nil {
		t.Fatal(err)
	}
	for _, c := range get("extras removed").Claims {
		for _, d := range c.Devices {
			if d.Attributes != nil {
				t.Errorf("extras file removed, device %s still has attributes %v", d.Device, d.Attributes)
			}
		}
	}

	// A corrupt file is an error again, and Update does not write over it.
	corrupt := append([]byte{}, data[:len(data)/2]...)
	if err := os.WriteFile(s.Path(), corrupt, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Get on a truncated file: %v, want ErrCorrupt", err)
	}
	if err := s.Update(func(*Checkpoint) error { return nil }); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Update on a truncated file: %v, want ErrCorrupt", err)
	}

	// The file gone: an empty checkpoint.
	if err := os.Remove(s.Path()); err != nil {
		t.Fatal(err)
	}
	if got := get("removed"); len(got.Claims) != 0 || got.BootID != "" {
		t.Errorf("after the file was removed: %+v, want an empty checkpoint", got)
	}
}

// TestConcurrentReadersOwnTheirCopies: readers that change what Get
// returned, beside writers, share nothing (run with -race).
func TestConcurrentReadersOwnTheirCopies(t *testing.T) {
	s := NewStore(filepath.Join(t.TempDir(), "checkpoint.json"))
	if err := s.Update(func(cp *Checkpoint) error { *cp = *full(); return nil }); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 4 {
		wg.Go(func() {
			for j := range 10 {
				if err := s.Update(func(cp *Checkpoint) error {
					cp.Claims[fmt.Sprintf("uid-%d-%d", i, j)] = &Claim{Namespace: "ns", Name: "c", State: PrepareStarted}
					return nil
				}); err != nil {
					errs <- err
					return
				}
			}
		})
		wg.Go(func() {
			for range 20 {
				cp, err := s.Get()
				if err != nil {
					errs <- err
					return
				}
				if c := cp.Claims["0b6f2b4e-9a41-4c3e-8f7e-1d2c3b4a5f60"]; c == nil || c.State != PrepareCompleted {
					errs <- fmt.Errorf("a reader saw another reader's change: %+v", c)
					return
				}
				scribble(cp)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	cp, err := NewStore(s.Path()).Get()
	if err != nil {
		t.Fatal(err)
	}
	if len(cp.Claims) != 2+40 {
		t.Errorf("%d claims, want 42", len(cp.Claims))
	}
}
