package checkpoint_test

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
)

// roundTrip checks that a decoded checkpoint is valid, and that a Store
// writes it to files (the checkpoint and its extras) that read back as the
// same checkpoint.
func roundTrip(t *testing.T, cp *checkpoint.Checkpoint) {
	t.Helper()
	if err := cp.Validate(); err != nil {
		t.Fatalf("decoded checkpoint is invalid: %v", err)
	}
	if _, err := checkpoint.Encode(cp); err != nil {
		t.Fatalf("decoded checkpoint does not encode: %v", err)
	}
	s := checkpoint.NewStore(filepath.Join(t.TempDir(), "checkpoint.json"))
	if err := s.Update(func(c *checkpoint.Checkpoint) error {
		*c = *cp
		return nil
	}); err != nil {
		t.Fatalf("decoded checkpoint cannot be written: %v", err)
	}
	again, err := s.Get()
	if err != nil {
		t.Fatalf("written checkpoint cannot be read: %v", err)
	}
	// An empty list and no list mean the same, and the encoding leaves
	// empty lists out.
	if diff := cmp.Diff(cp, again, cmpopts.EquateEmpty()); diff != "" {
		t.Fatalf("round trip changed the checkpoint (-first +again):\n%s", diff)
	}
}

// FuzzDecode: any file content decodes to a valid checkpoint or fails.
func FuzzDecode(f *testing.F) {
	if data, err := os.ReadFile("testdata/checkpoint-v1.json"); err == nil {
		f.Add(data)
	}
	f.Add([]byte(`{"apiVersion":"checkpoint.vfio.dra.dev/v1","kind":"Checkpoint","checksum":"","data":null}`))
	f.Add([]byte(`{"apiVersion":"checkpoint.vfio.dra.dev/v2","kind":"Checkpoint"}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, content []byte) {
		cp, err := checkpoint.Decode(content)
		if err != nil {
			return
		}
		roundTrip(t, cp)
	})
}

// FuzzDecodeData reaches the decoding of the data itself: the fuzzer's
// bytes are wrapped in an envelope with the right checksum.
func FuzzDecodeData(f *testing.F) {
	for _, s := range []string{
		`{"bootID":"b","claims":{"uid-1":{"namespace":"default","name":"c","state":"PrepareCompleted","devices":[{"requests":["gpu"],"pool":"node-a","device":"pci-0000-01-00-0","pciAddress":"0000:01:00.0","iommuGroup":2,"cdiDeviceIDs":["k8s.vfio.dra.dev/vfio=uid-1-pci-0000-01-00-0"]}],"groups":[{"number":2,"target":"vfio-pci","restore":true,"members":[{"address":"0000:01:00.0","driver":"nvidia"}]}],"cdiSpec":"x.json"}}}`,
		`{"bootID":"b","claims":{"":{"state":"PrepareStarted"}}}`,
		`{"bootID":"b","claims":{"u":null}}`,
		`{"bootID":"b","claims":{"u":{"state":"Prepared"}}}`,
		`{"bootID":"b","bootID":"c"}`,
		`{"bootID":"b"} {}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		sum := sha256.Sum256(data)
		content := fmt.Appendf(nil, `{"apiVersion":%q,"kind":%q,"checksum":%q,"data":%s}`,
			checkpoint.APIVersion, checkpoint.Kind, hex.EncodeToString(sum[:]), data)
		cp, err := checkpoint.Decode(content)
		if err != nil {
			return
		}
		roundTrip(t, cp)
	})
}
