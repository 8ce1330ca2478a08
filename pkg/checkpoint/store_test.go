package checkpoint

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
)

const goldenV1 = "testdata/checkpoint-v1.json"

// sample is the content of the v1 golden file.
func sample() *Checkpoint {
	return &Checkpoint{
		BootID: "5c1f7a4e-2b7d-4d8e-9a55-0f3c2e9d1a10",
		Claims: map[string]*Claim{
			"0b6f2b4e-9a41-4c3e-8f7e-1d2c3b4a5f60": {
				Namespace: "default",
				Name:      "nic-claim",
				State:     PrepareCompleted,
				Devices: []Device{{
					Requests:     []string{"nic"},
					Pool:         "node-a",
					Device:       "pci-0000-3b-00-0",
					PCIAddress:   "0000:3b:00.0",
					IOMMUGroup:   42,
					CDIDeviceIDs: []string{"k8s.vfio.dra.dev/vfio=0b6f2b4e-9a41-4c3e-8f7e-1d2c3b4a5f60-pci-0000-3b-00-0"},
				}},
				Groups: []Group{{
					Number:  42,
					Target:  "vfio-pci",
					Restore: true,
					Members: []Member{
						{Address: "0000:3b:00.0", Driver: "ixgbe"},
						{Address: "0000:3b:00.1", Driver: "ixgbe", DriverOverride: "ixgbe"},
					},
				}},
				CDISpec: "k8s.vfio.dra.dev-vfio_0b6f2b4e-9a41-4c3e-8f7e-1d2c3b4a5f60.json",
			},
			"7d9e0c1a-3f42-4b6d-a8c9-2e1f0a9b8c70": {
				Namespace: "team-b",
				Name:      "accel",
				State:     PrepareStarted,
				Groups: []Group{{
					Number:  7,
					Target:  "vfio-pci",
					Members: []Member{{Address: "0000:81:00.0"}},
				}},
			},
		},
	}
}

func readGolden(t *testing.T) []byte {
	t.Helper()
	data, err := os.ReadFile(goldenV1)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// storeWith puts content (if not nil) at <tmp>/checkpoint.json and returns a
// Store for that path.
func storeWith(t *testing.T, content []byte) *Store {
	t.Helper()
	path := filepath.Join(t.TempDir(), "checkpoint.json")
	if content != nil {
		if err := os.WriteFile(path, content, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return NewStore(path)
}

// envelopeWith builds a file by hand with a correct checksum over data.
func envelopeWith(apiVersion, kind, data, extra string) []byte {
	sum := sha256.Sum256([]byte(data))
	return fmt.Appendf(nil, `{"apiVersion":%q,"kind":%q,"checksum":%q,"data":%s%s}`,
		apiVersion, kind, hex.EncodeToString(sum[:]), data, extra)
}

func TestGoldenV1(t *testing.T) {
	golden := readGolden(t)

	got, err := storeWith(t, golden).Get()
	if err != nil {
		t.Fatalf("Get golden: %v", err)
	}
	if diff := cmp.Diff(sample(), got); diff != "" {
		t.Errorf("decoded golden file (-want +got):\n%s", diff)
	}

	encoded, err := Encode(sample())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(encoded, golden) {
		t.Errorf("Encode no longer produces %s; a change of the v1 format needs a new apiVersion.\ngot:\n%s", goldenV1, encoded)
	}
}

func TestRoundTripAndRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "plugin", "checkpoint.json")
	s := NewStore(path)
	want := sample()
	if err := s.Update(func(cp *Checkpoint) error {
		*cp = *sample()
		return nil
	}); err != nil {
		t.Fatalf("Update: %v", err)
	}

	got, err := s.Get()
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("round trip (-want +got):\n%s", diff)
	}

	// A new process opens the same file.
	restarted := NewStore(path)
	got, err = restarted.Get()
	if err != nil {
		t.Fatalf("Get after restart: %v", err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("after restart (-want +got):\n%s", diff)
	}

	// It can change it, and an Update sees the earlier content.
	if err := restarted.Update(func(cp *Checkpoint) error {
		if len(cp.Claims) != 2 {
			return fmt.Errorf("mutate saw %d claims, want 2", len(cp.Claims))
		}
		delete(cp.Claims, "7d9e0c1a-3f42-4b6d-a8c9-2e1f0a9b8c70")
		return nil
	}); err != nil {
		t.Fatalf("Update after restart: %v", err)
	}
	got, err = s.Get()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := got.Claims["7d9e0c1a-3f42-4b6d-a8c9-2e1f0a9b8c70"]; ok || len(got.Claims) != 1 {
		t.Errorf("claims after delete: %v", slices.Sorted(maps.Keys(got.Claims)))
	}
}

func TestGetMissingFile(t *testing.T) {
	s := storeWith(t, nil)
	cp, err := s.Get()
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	if cp.Claims == nil || len(cp.Claims) != 0 || cp.BootID != "" {
		t.Errorf("Get on a missing file = %+v, want an empty checkpoint with a non-nil Claims map", cp)
	}
	if _, err := os.Stat(s.Path()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Get created the file: %v", err)
	}
}

func TestGetRejectsBadFiles(t *testing.T) {
	golden := readGolden(t)
	validData := `{"bootID":"b","claims":{"u":{"namespace":"n","name":"c","state":"PrepareStarted"}}}`

	tests := map[string]struct {
		content []byte
		wantErr error
		wantMsg string
	}{
		"bad checksum": {
			content: bytes.Replace(golden, []byte(`"nic-claim"`), []byte(`"nic-claiM"`), 1),
			wantErr: ErrCorrupt,
			wantMsg: "checksum mismatch",
		},
		"checksum of other data": {
			content: bytes.Replace(envelopeWith(APIVersion, Kind, validData, ""),
				[]byte(`"state":"PrepareStarted"`), []byte(`"state":"PrepareCompleted"`), 1),
			wantErr: ErrCorrupt,
			wantMsg: "checksum mismatch",
		},
		"reformatted data": {
			// The checksum covers the bytes, not the values they encode.
			content: bytes.Replace(envelopeWith(APIVersion, Kind, validData, ""),
				[]byte(`{"bootID":"b",`), []byte(`{"bootID": "b",`), 1),
			wantErr: ErrCorrupt,
			wantMsg: "checksum mismatch",
		},
		"truncated": {
			content: golden[:len(golden)/2],
			wantErr: ErrCorrupt,
		},
		"truncated before data": {
			content: golden[:bytes.Index(golden, []byte(`"data"`))],
			wantErr: ErrCorrupt,
		},
		"empty file": {
			content: []byte{},
			wantErr: ErrCorrupt,
		},
		"garbage after the object": {
			content: append(slices.Clone(golden), []byte("{}")...),
			wantErr: ErrCorrupt,
		},
		"unknown apiVersion": {
			content: bytes.Replace(golden, []byte(APIVersion), []byte("checkpoint.vfio.dra.dev/v2"), 1),
			wantErr: ErrUnsupportedVersion,
			wantMsg: "checkpoint.vfio.dra.dev/v2",
		},
		"unknown apiVersion with new fields": {
			content: envelopeWith("checkpoint.vfio.dra.dev/v2", Kind, validData, `,"compression":"none"`),
			wantErr: ErrUnsupportedVersion,
		},
		"unknown kind": {
			content: envelopeWith(APIVersion, "Other", validData, ""),
			wantErr: ErrUnsupportedVersion,
		},
		"no apiVersion": {
			content: []byte(`{"kind":"Checkpoint","checksum":"","data":{}}`),
			wantErr: ErrUnsupportedVersion,
		},
		"unknown envelope field": {
			content: envelopeWith(APIVersion, Kind, validData, `,"extra":1`),
			wantErr: ErrCorrupt,
			wantMsg: "extra",
		},
		"unknown data field": {
			content: envelopeWith(APIVersion, Kind, `{"bootID":"b","owner":"x"}`, ""),
			wantErr: ErrCorrupt,
			wantMsg: "owner",
		},
		"unknown claim field": {
			content: envelopeWith(APIVersion, Kind,
				`{"bootID":"b","claims":{"u":{"namespace":"n","name":"c","state":"PrepareStarted","pod":"p"}}}`, ""),
			wantErr: ErrCorrupt,
			wantMsg: "pod",
		},
		"wrong type": {
			content: envelopeWith(APIVersion, Kind, `{"bootID":1}`, ""),
			wantErr: ErrCorrupt,
		},
		"no data": {
			content: []byte(`{"apiVersion":"checkpoint.vfio.dra.dev/v1","kind":"Checkpoint","checksum":"x"}`),
			wantErr: ErrCorrupt,
		},
		"null data": {
			content: envelopeWith(APIVersion, Kind, `null`, ""),
			wantErr: ErrCorrupt,
		},
		"unknown claim state": {
			content: envelopeWith(APIVersion, Kind,
				`{"bootID":"b","claims":{"u":{"namespace":"n","name":"c","state":"Prepared"}}}`, ""),
			wantErr: ErrCorrupt,
			wantMsg: "Prepared",
		},
		"null claim": {
			content: envelopeWith(APIVersion, Kind, `{"bootID":"b","claims":{"u":null}}`, ""),
			wantErr: ErrCorrupt,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			s := storeWith(t, tc.content)
			cp, err := s.Get()
			if err == nil {
				t.Fatalf("Get = %+v, want an error", cp)
			}
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("Get error %q is not %q", err, tc.wantErr)
			}
			if !strings.Contains(err.Error(), s.Path()) {
				t.Errorf("Get error %q does not name the file", err)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("Get error %q does not mention %q", err, tc.wantMsg)
			}

			// Update must not overwrite a file it cannot read.
			called := false
			if err := s.Update(func(*Checkpoint) error { called = true; return nil }); err == nil {
				t.Error("Update on a bad file succeeded")
			}
			if called {
				t.Error("Update called mutate on a bad file")
			}
			after, err := os.ReadFile(s.Path())
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(after, tc.content) {
				t.Error("Update changed a file it could not read")
			}
		})
	}
}

func TestDecodeAcceptsOtherLayout(t *testing.T) {
	// A compact file with the checksum over its compact data is valid: the
	// reader hashes the bytes it finds, whatever their layout.
	data := `{"bootID":"b","claims":{"u":{"namespace":"n","name":"c","state":"PrepareStarted"}}}`
	cp, err := Decode(envelopeWith(APIVersion, Kind, data, ""))
	if err != nil {
		t.Fatalf("Decode: %v", err)
	}
	want := &Checkpoint{BootID: "b", Claims: map[string]*Claim{"u": {Namespace: "n", Name: "c", State: PrepareStarted}}}
	if diff := cmp.Diff(want, cp); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// TestMemberTarget: a member with a Target of its own (driver "auto") is on
// it, every other member on its group's, and so is every member of a file
// written before members had targets. The target goes to the extras file:
// the previous version reads the checkpoint file, as if the member were on
// its group's target. An extras file never gives a member a host driver or
// its own original driver as its target.
func TestMemberTarget(t *testing.T) {
	const uid = "0b6f2b4e-9a41-4c3e-8f7e-1d2c3b4a5f60"
	g := sample().Claims[uid].Groups[0]
	for _, m := range g.Members {
		if got := g.TargetOf(m); got != "vfio-pci" {
			t.Errorf("golden member %s: target %q, want the group's vfio-pci", m.Address, got)
		}
	}

	want := sample()
	want.Claims[uid].Groups[0].Members[1].Target = "mlx5_vfio_pci"
	s := storeWith(t, nil)
	if err := s.Update(func(cp *Checkpoint) error {
		*cp = *want
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data, readGolden(t)) {
		t.Errorf("checkpoint file with a member target is not the golden v1 file:\n%s", data)
	}
	got, err := s.Get()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("read back (-want +got):\n%s", diff)
	}
	g = got.Claims[uid].Groups[0]
	if a, b := g.TargetOf(g.Members[0]), g.TargetOf(g.Members[1]); a != "vfio-pci" || b != "mlx5_vfio_pci" {
		t.Errorf("targets %q and %q, want vfio-pci and mlx5_vfio_pci", a, b)
	}

	for _, bad := range []string{"ixgbe", "nvme", "../vfio-pci"} {
		e := &extras{Claims: map[string]*claimExtras{uid: {Targets: []memberTarget{{Group: 0, Member: 1, Address: "0000:3b:00.1", Target: bad}}}}}
		cp := sample()
		e.apply(cp)
		if got := cp.Claims[uid].Groups[0].Members[1].Target; got != "" {
			t.Errorf("extras target %q applied as %q", bad, got)
		}
	}
}

func TestUpdateErrorWritesNothing(t *testing.T) {
	errMutate := errors.New("device busy")
	tests := map[string]struct {
		initial []byte
		mutate  func(*Checkpoint) error
		wantErr error
	}{
		"mutate fails, no file": {
			mutate: func(cp *Checkpoint) error {
				cp.BootID = "changed"
				return errMutate
			},
			wantErr: errMutate,
		},
		"mutate fails, existing file": {
			initial: readGolden(t),
			mutate: func(cp *Checkpoint) error {
				cp.Claims = nil
				return fmt.Errorf("prepare: %w", errMutate)
			},
			wantErr: errMutate,
		},
		"invalid result": {
			initial: readGolden(t),
			mutate: func(cp *Checkpoint) error {
				cp.Claims["new"] = nil
				return nil
			},
		},
		"unknown state": {
			mutate: func(cp *Checkpoint) error {
				cp.Claims["new"] = &Claim{State: "Half"}
				return nil
			},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			s := storeWith(t, tc.initial)
			err := s.Update(tc.mutate)
			if err == nil {
				t.Fatal("Update succeeded, want an error")
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Errorf("Update error %q is not %q", err, tc.wantErr)
			}
			after, readErr := os.ReadFile(s.Path())
			switch {
			case tc.initial == nil && !errors.Is(readErr, os.ErrNotExist):
				t.Errorf("Update created the file: %v", readErr)
			case tc.initial != nil && !bytes.Equal(after, tc.initial):
				t.Errorf("Update changed the file")
			}
			assertNoTempFiles(t, filepath.Dir(s.Path()))
		})
	}
}

func TestFileModeAndNoTempFiles(t *testing.T) {
	dir := t.TempDir()
	s := NewStore(filepath.Join(dir, "checkpoint.json"))
	for i := range 3 {
		if err := s.Update(func(cp *Checkpoint) error {
			cp.BootID = fmt.Sprintf("boot-%d", i)
			cp.Claims[fmt.Sprintf("uid-%d", i)] = &Claim{Name: "c", Namespace: "n", State: PrepareStarted}
			return nil
		}); err != nil {
			t.Fatalf("Update %d: %v", i, err)
		}
		st, err := os.Stat(s.Path())
		if err != nil {
			t.Fatal(err)
		}
		if mode := st.Mode().Perm(); mode != 0o600 {
			t.Errorf("after Update %d the file mode is %#o, want 0600", i, mode)
		}
	}
	assertNoTempFiles(t, dir)
	cp, err := s.Get()
	if err != nil {
		t.Fatal(err)
	}
	if cp.BootID != "boot-2" || len(cp.Claims) != 3 {
		t.Errorf("Get = bootID %q with %d claims, want boot-2 with 3", cp.BootID, len(cp.Claims))
	}
}

func TestWriteFailureLeavesNoTempFile(t *testing.T) {
	// A directory where the file should go makes the rename fail after the
	// temp file was written.
	dir := t.TempDir()
	path := filepath.Join(dir, "checkpoint.json")
	if err := os.MkdirAll(filepath.Join(path, "occupied"), 0o700); err != nil {
		t.Fatal(err)
	}
	data, err := Encode(sample())
	if err != nil {
		t.Fatal(err)
	}
	if err := writeFileAtomic(path, data); err == nil {
		t.Fatal("writeFileAtomic over a non-empty directory succeeded")
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "checkpoint.json" || !entries[0].IsDir() {
		t.Errorf("directory holds %v, want only the occupied checkpoint.json", entries)
	}
}

func assertNoTempFiles(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() != "checkpoint.json" && e.Name() != "checkpoint.extras.json" {
			t.Errorf("unexpected file %s left in %s", e.Name(), dir)
		}
	}
}

func TestConcurrentUpdatesLoseNothing(t *testing.T) {
	s := storeWith(t, nil)
	const writers = 16
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for i := range writers {
		wg.Go(func() {
			errs <- s.Update(func(cp *Checkpoint) error {
				cp.Claims[fmt.Sprintf("uid-%02d", i)] = &Claim{
					Namespace: "ns", Name: fmt.Sprintf("claim-%d", i), State: PrepareCompleted,
				}
				return nil
			})
		})
	}
	// Readers run alongside and must never see a partial file.
	for range 4 {
		wg.Go(func() {
			for range 20 {
				if _, err := s.Get(); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}

	cp, err := NewStore(s.Path()).Get()
	if err != nil {
		t.Fatal(err)
	}
	for i := range writers {
		uid := fmt.Sprintf("uid-%02d", i)
		if c := cp.Claims[uid]; c == nil || c.Name != fmt.Sprintf("claim-%d", i) {
			t.Errorf("claim %s lost: %+v", uid, c)
		}
	}
	if len(cp.Claims) != writers {
		t.Errorf("got %d claims, want %d", len(cp.Claims), writers)
	}
	assertNoTempFiles(t, filepath.Dir(s.Path()))
}

func TestReadBootID(t *testing.T) {
	tests := map[string]struct {
		content *string
		want    string
		wantErr bool
	}{
		"trimmed":   {content: ptr("1a2b3c4d-0000-4000-8000-123456789abc\n"), want: "1a2b3c4d-0000-4000-8000-123456789abc"},
		"missing":   {wantErr: true},
		"empty":     {content: ptr("\n"), wantErr: true},
		"no spaces": {content: ptr("abc"), want: "abc"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			procRoot := t.TempDir()
			if tc.content != nil {
				path := filepath.Join(procRoot, "sys", "kernel", "random", "boot_id")
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(*tc.content), 0o444); err != nil {
					t.Fatal(err)
				}
			}
			got, err := ReadBootID(procRoot)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("ReadBootID = %q, want an error", got)
				}
				if !strings.Contains(err.Error(), procRoot) {
					t.Errorf("error %q does not name the file", err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("ReadBootID = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func ptr(s string) *string { return &s }
