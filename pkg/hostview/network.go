package hostview

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math/bits"
	"net/netip"
	"strconv"
	"strings"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// Route flags from linux/route.h.
const (
	rtfUp     = 0x0001
	rtfReject = 0x0200
)

// IPv6 address scopes as if_inet6 prints them.
const (
	scopeGlobal = 0x00
	scopeSite   = 0x40
)

// readNetwork marks the functions below every interface that the host's
// routes, addresses or neighbours use. The files of PID 1 are those of the
// host's network namespace, whatever namespace the plugin runs in; its IPv4
// addresses, which no procfs file names, come from netlink in that
// namespace.
func (v *view) readNetwork() {
	v.readIPv4Routes()
	v.readIPv6Routes()
	v.readIPv4Addresses()
	v.readIPv6Addresses()
	v.readIPv4Neighbours()
}

func (v *view) readIPv4Routes() {
	file := v.r.procPath("1/net/route")
	data, err := readFile(file, maxTableSize)
	if err != nil {
		v.fail("network routes: %v", err)
		return
	}
	lines := strings.Split(string(data), "\n")
	for i, line := range lines[1:] { // header
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) < 8 {
			v.fail("network routes: %s line %d: %q is not a route", file, i+2, line)
			continue
		}
		dest, err1 := strconv.ParseUint(f[1], 16, 32)
		flags, err2 := strconv.ParseUint(f[3], 16, 32)
		mask, err3 := strconv.ParseUint(f[7], 16, 32)
		if err := errors.Join(err1, err2, err3); err != nil {
			v.fail("network routes: %s line %d: %v", file, i+2, err)
			continue
		}
		if flags&rtfUp == 0 || flags&rtfReject != 0 {
			continue
		}
		what := "default route"
		if dest != 0 || mask != 0 {
			what = "route " + ipv4(uint32(dest)) + "/" + strconv.Itoa(bits.OnesCount32(uint32(mask)))
		}
		v.useInterface(f[0], what)
	}
}

// ipv4 formats an address that net/route prints as the hex of the
// network-order word read in host byte order.
func ipv4(w uint32) string {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], w)
	return netip.AddrFrom4(b).String()
}

func (v *view) readIPv6Routes() {
	file := v.r.procPath("1/net/ipv6_route")
	data, err := readFile(file, maxTableSize)
	if errors.Is(err, fs.ErrNotExist) {
		return // IPv6 disabled
	}
	if err != nil {
		v.fail("network routes: %v", err)
		return
	}
	for i, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) < 10 {
			v.fail("network routes: %s line %d: %q is not a route", file, i+1, line)
			continue
		}
		flags, err := strconv.ParseUint(f[8], 16, 32)
		if err != nil {
			v.fail("network routes: %s line %d: %v", file, i+1, err)
			continue
		}
		// Only the default route: every interface with IPv6 has
		// fe80::/64 and multicast routes, which say nothing.
		if f[0] != strings.Repeat("0", 32) || f[1] != "00" || flags&rtfUp == 0 || flags&rtfReject != 0 || f[9] == "lo" {
			continue
		}
		v.useInterface(f[9], "default route")
	}
}

// readIPv6Addresses marks interfaces with a global or site-local IPv6
// address. Link-local addresses are left out: the kernel gives one to
// every interface that is up, used or not.
func (v *view) readIPv6Addresses() {
	file := v.r.procPath("1/net/if_inet6")
	data, err := readFile(file, maxTableSize)
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	if err != nil {
		v.fail("network addresses: %v", err)
		return
	}
	for i, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		raw, err1 := hex.DecodeString(f[0])
		var scope uint64
		var err2 error
		if len(f) >= 6 {
			scope, err2 = strconv.ParseUint(f[3], 16, 8)
		}
		if len(f) < 6 || len(raw) != 16 || err1 != nil || err2 != nil {
			v.fail("network addresses: %s line %d: %q is not an address", file, i+1, line)
			continue
		}
		if scope != scopeGlobal && scope != scopeSite {
			continue
		}
		v.useInterface(f[5], "address "+netip.AddrFrom16([16]byte(raw)).String())
	}
}

// arpComplete and arpPermanent are the neighbour flags (linux/if_arp.h) of
// an entry the host resolved or an administrator set; an entry with
// neither is one whose resolution failed or is under way.
const (
	arpComplete  = 0x2
	arpPermanent = 0x4
)

// readIPv4Neighbours marks interfaces on which the host exchanges IPv4
// traffic with a neighbour. They catch what net/route does not show: an
// address without a prefix route (a /32, noprefixroute) that neighbours
// talk to, and an interface that only routes of other tables (policy
// routing) use. The kernel flushes an interface's entries when its last
// IPv4 address goes.
func (v *view) readIPv4Neighbours() {
	file := v.r.procPath("1/net/arp")
	data, err := readFile(file, maxTableSize)
	if errors.Is(err, fs.ErrNotExist) {
		return // no IPv4
	}
	if err != nil {
		v.fail("network neighbours: %v", err)
		return
	}
	seen := map[string]bool{}
	lines := strings.Split(string(data), "\n")
	for i, line := range lines[1:] { // header
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		addr, err1 := netip.ParseAddr(f[0])
		var flags uint64
		var err2 error
		if len(f) >= 6 {
			flags, err2 = strconv.ParseUint(strings.TrimPrefix(f[2], "0x"), 16, 32)
		}
		if len(f) < 6 || err1 != nil || err2 != nil {
			v.fail("network neighbours: %s line %d: %q is not a neighbour", file, i+2, line)
			continue
		}
		// One look at each interface: a host on a large L2 segment has
		// thousands of neighbours.
		if flags&(arpComplete|arpPermanent) == 0 || seen[f[5]] {
			continue
		}
		seen[f[5]] = true
		v.useInterface(f[5], "IPv4 neighbour "+addr.String())
	}
}

// useInterface marks the functions below a network interface with the
// evidence "<what> (<interface> on <port>)".
func (v *view) useInterface(name, what string) {
	if name == "lo" {
		return
	}
	if !validName(name) {
		v.fail("%s: interface name %q is not valid", what, name)
		return
	}
	fns, err := v.r.netFunctions(name, map[string]bool{}, 0)
	if err != nil {
		v.fail("%s (%s): %v", what, name, err)
		return
	}
	for fn, port := range fns {
		v.use(fn, fmt.Sprintf("%s (%s)", what, chain(name, port)))
	}
}

// netFunctions returns the PCI functions that carry an interface's
// traffic, each with the name of the interface on it: its own device, or
// the devices below a bond, bridge, VLAN or macvlan (lower_* links, brif/).
func (r *Reader) netFunctions(name string, seen map[string]bool, depth int) (map[pci.Address]string, error) {
	out := map[pci.Address]string{}
	if seen[name] || depth > maxDepth {
		return out, nil
	}
	seen[name] = true
	rel, err := r.resolve("class/net/" + name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("interface %s is not in %s (is the sysfs of the host's network namespace mounted?)", name, r.sysPath("class/net"))
	}
	if err != nil {
		return nil, err
	}
	if fn, ok := lastPCI(rel); ok {
		out[fn] = name
		return out, nil
	}
	var lowers []string
	entries, err := listDir(r.sysPath(rel))
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		if l, ok := strings.CutPrefix(e, "lower_"); ok {
			lowers = append(lowers, l)
		}
	}
	ports, err := listDir(r.sysPath(rel + "/brif"))
	if err != nil {
		return nil, err
	}
	lowers = append(lowers, ports...)
	if len(lowers) == 0 && exists(r.sysPath("class/net/ovs-system")) {
		// Open vSwitch bridges (br-ex) do not link their ports; the
		// datapath device ovs-system has every port as a lower device.
		// Keep them all with the host.
		lowers = append(lowers, "ovs-system")
	}
	for _, l := range lowers {
		if !validName(l) {
			continue
		}
		sub, err := r.netFunctions(l, seen, depth+1)
		if err != nil {
			continue // a port that went away
		}
		for fn, port := range sub {
			if _, ok := out[fn]; !ok {
				out[fn] = port
			}
		}
	}
	return out, nil
}

// readConsole marks the PCI UART of a serial console. The boot VGA device
// is the other console; package pci reads it (boot_vga).
func (v *view) readConsole() {
	data, err := readFile(v.r.sysPath("class/tty/console/active"), maxAttrSize)
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	if err != nil {
		v.fail("console: %v", err)
		return
	}
	for _, tty := range strings.Fields(string(data)) {
		if !validName(tty) {
			continue
		}
		rel, err := v.r.resolve("class/tty/" + tty)
		if err != nil {
			continue
		}
		if fn, ok := lastPCI(rel); ok {
			v.use(fn, "serial console "+tty)
		}
	}
}
