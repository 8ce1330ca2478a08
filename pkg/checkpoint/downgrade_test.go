package checkpoint

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
)

// The v1 checkpoint as the plugin at commit fe34d9d reads it: its types and
// its strict decoder, frozen here. A file this version writes must pass
// it, or a rollback of the plugin to that version refuses to start.
type (
	prevCheckpoint struct {
		BootID string                `json:"bootID"`
		Claims map[string]*prevClaim `json:"claims,omitempty"`
	}
	prevClaim struct {
		Namespace string       `json:"namespace"`
		Name      string       `json:"name"`
		State     string       `json:"state"`
		Devices   []prevDevice `json:"devices,omitempty"`
		Groups    []prevGroup  `json:"groups,omitempty"`
		CDISpec   string       `json:"cdiSpec,omitempty"`
	}
	prevDevice struct {
		Requests     []string `json:"requests"`
		Pool         string   `json:"pool"`
		Device       string   `json:"device"`
		PCIAddress   string   `json:"pciAddress"`
		IOMMUGroup   int      `json:"iommuGroup"`
		CDIDeviceIDs []string `json:"cdiDeviceIDs"`
	}
	prevGroup struct {
		Number  int          `json:"number"`
		Target  string       `json:"target"`
		Restore bool         `json:"restore"`
		IOMMUFD bool         `json:"iommufd,omitempty"`
		Members []prevMember `json:"members"`
	}
	prevMember struct {
		Address        string `json:"address"`
		Driver         string `json:"driver,omitempty"`
		DriverOverride string `json:"driverOverride,omitempty"`
	}
)

// prevDecode is fe34d9d's Decode.
func prevDecode(content []byte) (*prevCheckpoint, error) {
	strict := func(data []byte, v any) error {
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(v); err != nil {
			return err
		}
		if _, err := dec.Token(); !errors.Is(err, io.EOF) {
			return errors.New("unexpected content after the JSON value")
		}
		return nil
	}
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := json.Unmarshal(content, &meta); err != nil {
		return nil, err
	}
	if meta.APIVersion != "checkpoint.vfio.dra.dev/v1" || meta.Kind != "Checkpoint" {
		return nil, fmt.Errorf("unsupported checkpoint version %q %q", meta.APIVersion, meta.Kind)
	}
	var env struct {
		APIVersion string          `json:"apiVersion"`
		Kind       string          `json:"kind"`
		Checksum   string          `json:"checksum"`
		Data       json.RawMessage `json:"data"`
	}
	if err := strict(content, &env); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(env.Data)
	if hex.EncodeToString(sum[:]) != env.Checksum {
		return nil, errors.New("checksum mismatch")
	}
	cp := &prevCheckpoint{}
	if err := strict(env.Data, cp); err != nil {
		return nil, fmt.Errorf("data: %w", err)
	}
	for uid, c := range cp.Claims {
		if uid == "" || c == nil || (c.State != "PrepareStarted" && c.State != "PrepareCompleted") {
			return nil, fmt.Errorf("invalid claim %q", uid)
		}
	}
	return cp, nil
}

// withExtras is sample() with a failed rollback and device attributes.
func withExtras() *Checkpoint {
	cp := sample()
	cp.Claims["0b6f2b4e-9a41-4c3e-8f7e-1d2c3b4a5f60"].Devices[0].Attributes = map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
		"vendorID":   {StringValue: strPtr("8086")},
		"iommuGroup": {IntValue: int64Ptr(42)},
	}
	cp.Claims["7d9e0c1a-3f42-4b6d-a8c9-2e1f0a9b8c70"].LastError = "unbind 0000:81:00.0 from vfio-pci: device or resource busy"
	return cp
}

// TestOlderVersionReadsCheckpoint: what Update writes decodes with the
// previous version's strict decoder, to the same claims, groups and
// members; this version reads the fields that version does not know back
// from the extras file.
func TestOlderVersionReadsCheckpoint(t *testing.T) {
	dir := t.TempDir()
	s := NewStore(filepath.Join(dir, "checkpoint.json"))
	if err := s.Update(func(cp *Checkpoint) error {
		*cp = *withExtras()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	prev, err := prevDecode(data)
	if err != nil {
		t.Fatalf("the previous version refuses the checkpoint: %v\n%s", err, data)
	}
	// What the previous version sees is the golden v1 file's content.
	want, err := prevDecode(readGolden(t))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, prev); diff != "" {
		t.Errorf("the previous version reads (-want +got):\n%s", diff)
	}
	got, err := NewStore(s.Path()).Get()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(withExtras(), got); diff != "" {
		t.Errorf("this version reads back (-want +got):\n%s", diff)
	}
	st, err := os.Stat(ExtrasPath(s.Path()))
	if err != nil {
		t.Fatal(err)
	}
	if mode := st.Mode().Perm(); mode != 0o600 {
		t.Errorf("extras file mode %#o, want 0600", mode)
	}

	// Without extras left, the extras file goes.
	if err := s.Update(func(cp *Checkpoint) error {
		*cp = *sample()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(ExtrasPath(s.Path())); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("extras file after the last extra was cleared: %v", err)
	}
	assertNoTempFiles(t, dir)
}

// TestUpgradeMovesExtras: a checkpoint file written by the versions that
// kept lastError and attributes in it is read, and the next Update moves
// them to the extras file.
func TestUpgradeMovesExtras(t *testing.T) {
	data, err := json.MarshalIndent(withExtras(), "  ", "  ")
	if err != nil {
		t.Fatal(err)
	}
	s := storeWith(t, envelopeWith(APIVersion, Kind, string(data), ""))
	got, err := s.Get()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(withExtras(), got); diff != "" {
		t.Errorf("old file read as (-want +got):\n%s", diff)
	}
	if err := s.Update(func(*Checkpoint) error { return nil }); err != nil {
		t.Fatal(err)
	}
	content, err := os.ReadFile(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := prevDecode(content); err != nil {
		t.Errorf("after an Update the previous version refuses the checkpoint: %v", err)
	}
	if got, err = s.Get(); err != nil {
		t.Fatal(err)
	} else if diff := cmp.Diff(withExtras(), got); diff != "" {
		t.Errorf("after an Update (-want +got):\n%s", diff)
	}
}

// TestExtrasAfterDowngrade: the previous version ran meanwhile and wrote
// the checkpoint file alone. Extras of claims it gave back are dropped, a
// last error recorded for another state of the claim is not applied, and
// attributes of the devices it kept are.
func TestExtrasAfterDowngrade(t *testing.T) {
	s := storeWith(t, nil)
	if err := s.Update(func(cp *Checkpoint) error {
		*cp = *withExtras()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// The previous version retried the held claim's prepare, completed it,
	// and gave the other claim back.
	old := sample()
	delete(old.Claims, "0b6f2b4e-9a41-4c3e-8f7e-1d2c3b4a5f60")
	old.Claims["7d9e0c1a-3f42-4b6d-a8c9-2e1f0a9b8c70"].State = PrepareCompleted
	old.Claims["nic-again"] = withExtras().Claims["0b6f2b4e-9a41-4c3e-8f7e-1d2c3b4a5f60"]
	old.Claims["nic-again"].Devices[0].Attributes = nil
	data, err := json.MarshalIndent(old, "  ", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.Path(), envelopeWith(APIVersion, Kind, string(data), ""), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := s.Get()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(old, got); diff != "" {
		t.Errorf("after a downgrade (-want +got):\n%s", diff)
	}
}

// TestCrashBetweenWrites: Update writes the extras before the checkpoint
// file; a crash between the two leaves the old checkpoint file, whose
// claims all still have their extras, also those the Update removed.
func TestCrashBetweenWrites(t *testing.T) {
	s := storeWith(t, nil)
	if err := s.Update(func(cp *Checkpoint) error {
		*cp = *withExtras()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(func(cp *Checkpoint) error {
		delete(cp.Claims, "0b6f2b4e-9a41-4c3e-8f7e-1d2c3b4a5f60")
		delete(cp.Claims, "7d9e0c1a-3f42-4b6d-a8c9-2e1f0a9b8c70")
		cp.Claims["new"] = &Claim{Namespace: "n", Name: "new", State: PrepareStarted, Devices: []Device{{
			Device: "pci-0000-01-00-0", PCIAddress: "0000:01:00.0",
			Attributes: map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{"vendorID": {StringValue: strPtr("10de")}},
		}}}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// The crash: the checkpoint file as before the second Update.
	if err := os.WriteFile(s.Path(), before, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := s.Get()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(withExtras(), got); diff != "" {
		t.Errorf("after a crash between the writes (-want +got):\n%s", diff)
	}
}

// TestExtrasDecoding: fields a newer version added to the extras file are
// ignored; a checksum mismatch or another kind is an error naming the file.
func TestExtrasDecoding(t *testing.T) {
	for name, tc := range map[string]struct {
		content string
		want    error
	}{
		"newer fields": {content: string(envelopeWith(APIVersion, ExtrasKind,
			`{"claims":{"7d9e0c1a-3f42-4b6d-a8c9-2e1f0a9b8c70":{"state":"PrepareStarted","lastError":"busy","retries":3}},"future":{}}`, `,"signature":"x"`))},
		"checksum": {content: strings.Replace(string(envelopeWith(APIVersion, ExtrasKind, `{"claims":{}}`, "")), `{"claims":{}}`, `{"claims":null}`, 1), want: ErrCorrupt},
		"kind":     {content: string(envelopeWith(APIVersion, Kind, `{"claims":{}}`, "")), want: ErrUnsupportedVersion},
		"not json": {content: "{", want: ErrCorrupt},
	} {
		t.Run(name, func(t *testing.T) {
			s := storeWith(t, readGolden(t))
			if err := os.WriteFile(ExtrasPath(s.Path()), []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			cp, err := s.Get()
			if tc.want != nil {
				if !errors.Is(err, tc.want) || !strings.Contains(fmt.Sprint(err), ExtrasPath(s.Path())) {
					t.Errorf("Get = %v, want %v naming %s", err, tc.want, ExtrasPath(s.Path()))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := cp.Claims["7d9e0c1a-3f42-4b6d-a8c9-2e1f0a9b8c70"].LastError; got != "busy" {
				t.Errorf("last error %q, want busy", got)
			}
		})
	}
}

func strPtr(s string) *string { return &s }
func int64Ptr(i int64) *int64 { return &i }
