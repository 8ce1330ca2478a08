package checkpoint

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// FuzzDecodeExtras: any extras file is refused or read; what it adds to a
// valid checkpoint never changes a claim's state, groups or members (what
// unprepare undoes comes from the checkpoint file alone), and encodes to a
// file that adds the same.
func FuzzDecodeExtras(f *testing.F) {
	for _, data := range []string{
		`{"claims":{"7d9e0c1a-3f42-4b6d-a8c9-2e1f0a9b8c70":{"state":"PrepareStarted","lastError":"busy"},"0b6f2b4e-9a41-4c3e-8f7e-1d2c3b4a5f60":{"devices":[{"device":"pci-0000-3b-00-0","pciAddress":"0000:3b:00.0","attributes":{"vendorID":{"string":"8086"}}}]}}}`,
		`{"claims":{"x":{"lastError":"e"}}}`,
		`{"claims":{"0b6f2b4e-9a41-4c3e-8f7e-1d2c3b4a5f60":{"targets":[{"group":0,"member":1,"address":"0000:3b:00.1","target":"mlx5_vfio_pci"},{"group":0,"member":0,"address":"0000:3b:00.0","target":"ixgbe"}]}}}`,
		`{"claims":null}`,
		`[]`,
	} {
		sum := sha256.Sum256([]byte(data))
		f.Add(fmt.Appendf(nil, `{"apiVersion":%q,"kind":%q,"checksum":%q,"data":%s}`,
			APIVersion, ExtrasKind, hex.EncodeToString(sum[:]), data))
	}
	f.Fuzz(func(t *testing.T, content []byte) {
		e, err := decodeExtras(content)
		if err != nil {
			return
		}
		cp := sample()
		e.apply(cp)
		ignore := cmp.Options{cmpopts.IgnoreFields(Claim{}, "LastError"), cmpopts.IgnoreFields(Device{}, "Attributes"), cmpopts.IgnoreFields(Member{}, "Target")}
		if diff := cmp.Diff(sample(), cp, ignore); diff != "" {
			t.Fatalf("the extras file changed the checkpoint (-file +read):\n%s", diff)
		}
		// A member's own target only ever names a VFIO driver other than
		// the one the member goes back to.
		for _, c := range cp.Claims {
			for _, g := range c.Groups {
				for _, m := range g.Members {
					if m.Target != "" && (!vfioTarget(m.Target) || m.Target == m.Driver) {
						t.Fatalf("member %s got target %q (original driver %q)", m.Address, m.Target, m.Driver)
					}
				}
			}
		}
		out, _, err := encodeExtras(cp, nil)
		if err != nil {
			t.Fatalf("extras do not encode: %v", err)
		}
		again := sample()
		if out != nil {
			e2, err := decodeExtras(out)
			if err != nil {
				t.Fatalf("encoded extras do not decode: %v\n%s", err, out)
			}
			e2.apply(again)
		}
		if diff := cmp.Diff(cp, again, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("round trip changed the extras (-first +again):\n%s", diff)
		}
	})
}
