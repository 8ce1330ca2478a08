package health_test

import (
	"bufio"
	"bytes"
	"strconv"
	"strings"
	"testing"

	"github.com/vfio-dra/vfio-dra-driver/pkg/health"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// FuzzParseAERTotal: an accepted file has exactly one total line, and the
// total is what it says.
func FuzzParseAERTotal(f *testing.F) {
	f.Add([]byte(pcitest.AERFatal(map[string]uint64{"DLP": 1, "TLP": 2})))
	f.Add([]byte("DLP 0\ndev_fatal_errs_bit[27] 2\nTOTAL_ERR_FATAL 2\n"))
	f.Add([]byte("TOTAL_ERR_FATAL 18446744073709551615\n"))
	f.Add([]byte("TOTAL_ERR_FATAL 18446744073709551616\n"))
	f.Add([]byte("TOTAL_ERR_FATAL\t1\r\n"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, content []byte) {
		total, err := health.ParseAERTotal(content, "TOTAL_ERR_FATAL")
		if err != nil {
			return
		}
		found := 0
		sc := bufio.NewScanner(bytes.NewReader(content))
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) == 2 && fields[0] == "TOTAL_ERR_FATAL" {
				found++
				if n, err := strconv.ParseUint(fields[1], 10, 64); err != nil || n != total {
					t.Fatalf("total %d, but the line says %q", total, fields[1])
				}
			}
		}
		if found != 1 {
			t.Fatalf("accepted with %d total lines", found)
		}
	})
}

// FuzzHealthFiles writes arbitrary content into the files the checker
// reads: it never panics, an unreadable file is an error rather than a
// verdict, and a function with a reset method is never NoReset.
func FuzzHealthFiles(f *testing.F) {
	f.Add(uint8(0), pcitest.AERFatal(nil))
	f.Add(uint8(0), "TOTAL_ERR_FATAL x\n")
	f.Add(uint8(1), "flr bus\n")
	f.Add(uint8(1), " \n")
	f.Add(uint8(2), "\xff\xff\xff\xff")
	f.Add(uint8(2), "\xff\xff")
	tree, c, _ := setup(f)
	files := []string{"aer_dev_fatal", "reset_method", "config"}
	f.Fuzz(func(t *testing.T, sel uint8, content string) {
		name := files[int(sel)%len(files)]
		if err := tree.WriteDeviceFile(nic.String(), name, content); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = tree.RemoveDeviceFile(nic.String(), name) }()
		got, errs := c.Check([]health.Function{{Address: nic}}, true)
		s := got[nic]
		switch name {
		case "aer_dev_fatal":
			if _, err := health.ParseAERTotal([]byte(content), "TOTAL_ERR_FATAL"); err != nil && len(errs) == 0 {
				t.Fatalf("unparsable aer_dev_fatal %q gave no error", content)
			}
			// A first reading is a baseline, never a verdict.
			if !s.Healthy() {
				t.Fatalf("first AER reading made the function unhealthy: %+v", s)
			}
		case "reset_method":
			if strings.TrimSpace(content) != "" && s.NoReset {
				t.Fatalf("reset_method %q read as no reset", content)
			}
			if strings.TrimSpace(content) == "" && !s.NoReset {
				t.Fatalf("empty reset_method %q read as resettable", content)
			}
		case "config":
			if s.Healthy() == health.ConfigReadsAllOnes([]byte(content)) {
				t.Fatalf("config %q: healthy %v", content, s.Healthy())
			}
		}
	})
}
