package pci

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// Header types: byte 0x0e of the configuration space, without the
// multi-function bit. They say what the hardware is, whatever the class.
const (
	HeaderEndpoint = 0 // type 0: an endpoint, whatever its class says
	HeaderBridge   = 1 // type 1: PCI-to-PCI bridge, forwards to a secondary bus
	HeaderCardBus  = 2 // type 2: CardBus bridge
)

// configHeaderSize is what any reader of config gets: the kernel hands
// unprivileged readers the first 64 bytes, the standard header.
const configHeaderSize = 64

// Resource flags of the kernel (include/linux/ioport.h), as the resource
// file prints them in its third column.
const (
	ioResourceIO  = 0x100
	ioResourceMem = 0x200
)

// numStdBARs is the number of standard BARs: lines 0-5 of resource. Line 6
// is the expansion ROM, 7-12 the SR-IOV BARs and, on bridges, 13-16 the
// bridge windows.
const numStdBARs = 6

// readHeaderType reads the header type from the first bytes of config.
func readHeaderType(dir string) (int, error) {
	file := dir + "/config"
	var buf [configHeaderSize]byte
	n, err := readFull(file, buf[:])
	if err != nil {
		return 0, err
	}
	if n <= 0x0e {
		return 0, fmt.Errorf("%s: %d bytes, too short for a header type (byte 0x0e)", file, n)
	}
	if buf[0] == 0xff && buf[1] == 0xff {
		// What a read of a function that does not answer returns.
		return 0, fmt.Errorf("%s: vendor ID reads 0xffff, the function does not answer", file)
	}
	switch t := int(buf[0x0e] & 0x7f); t {
	case HeaderEndpoint, HeaderBridge, HeaderCardBus:
		return t, nil
	default:
		return 0, fmt.Errorf("%s: unknown header type %#02x", file, t)
	}
}

// readBARs counts the memory and I/O BARs in the kernel's resource file:
// one "0x<start> 0x<end> 0x<flags>" line per resource, the six standard
// BARs first. A BAR counts when its flags say memory or I/O, assigned or
// not: the function has registers to hand out either way.
func readBARs(dir string) (int, error) {
	file := dir + "/resource"
	// The kernel prints 13 to 17 lines of 57 bytes: a page read whole on
	// the stack, and only a longer file is read again without that bound.
	var buf [maxAttrSize]byte
	n, err := readFull(file, buf[:])
	if err != nil {
		return 0, err
	}
	s := string(buf[:n])
	if n == len(buf) {
		if s, err = readAttrLimit(file, 64*1024); err != nil {
			return 0, err
		}
	}
	rest := strings.TrimRight(s, "\n")
	bars, nlines := 0, 0
	for i := 0; rest != ""; i++ {
		var line string
		line, rest, _ = strings.Cut(rest, "\n")
		nlines++
		var fields [3]string
		nf := 0
		for f := range strings.FieldsSeq(line) {
			if nf == len(fields) {
				nf++
				break
			}
			fields[nf] = f
			nf++
		}
		if nf != len(fields) {
			return 0, fmt.Errorf("%s: line %d: %q is not 3 hex columns", file, i+1, line)
		}
		var v [3]uint64
		for j, f := range fields {
			digits, ok := strings.CutPrefix(f, "0x")
			if !ok {
				return 0, fmt.Errorf("%s: line %d: %q is not a 0x-prefixed hex number", file, i+1, f)
			}
			if v[j], err = strconv.ParseUint(digits, 16, 64); err != nil {
				return 0, fmt.Errorf("%s: line %d: %q is not a 64-bit hex number", file, i+1, f)
			}
		}
		if i < numStdBARs && v[2]&(ioResourceIO|ioResourceMem) != 0 {
			bars++
		}
	}
	if bars == 0 && nlines < numStdBARs {
		return 0, fmt.Errorf("%s: %d lines, fewer than the %d standard BARs", file, nlines, numStdBARs)
	}
	return bars, nil
}

// readAttrLimit reads a whole attribute of at most limit bytes.
func readAttrLimit(file string, limit int64) (string, error) {
	fh, err := os.Open(file)
	if err != nil {
		return "", err
	}
	defer fh.Close() //nolint:errcheck // opened read-only
	data, err := io.ReadAll(io.LimitReader(fh, limit+1))
	if err != nil {
		return "", fmt.Errorf("read %s: %w", file, err)
	}
	if int64(len(data)) > limit {
		return "", fmt.Errorf("%s: longer than %d bytes", file, limit)
	}
	return string(data), nil
}
