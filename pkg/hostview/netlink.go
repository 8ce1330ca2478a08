package hostview

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// readIPv4Addresses marks interfaces with an IPv4 address. No procfs file
// names the interface of one (fib_trie lists addresses alone), and a /32 or
// noprefixroute address adds no route that net/route would show, so the
// kernel is asked over netlink, in the network namespace of the host's
// PID 1. A proc root without namespace files (a fixture) has none to ask.
func (v *view) readIPv4Addresses() {
	ns := v.r.procPath("1/ns/net")
	if _, err := os.Lstat(ns); errors.Is(err, fs.ErrNotExist) {
		return
	}
	addrs, err := ipv4Addresses(ns)
	if err != nil {
		v.fail("network addresses: %v", err)
		return
	}
	for _, a := range addrs {
		v.useInterface(a.iface, "address "+a.prefix.String())
	}
}

// ifaceAddr is an IPv4 address and the interface that has it.
type ifaceAddr struct {
	iface  string
	prefix netip.Prefix
}

// ipv4Addresses lists the IPv4 addresses of the network namespace ns, in
// the order of interface and address. A netlink socket belongs to the
// namespace of the thread that opens it, so the dump runs on a locked
// thread, which enters ns when it is not there already. A thread that
// entered it is never handed back: the runtime ends it with its goroutine
// (or parks it, if it is the main thread), and no other code runs there.
func ipv4Addresses(ns string) ([]ifaceAddr, error) {
	f, err := os.Open(ns)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	type result struct {
		addrs []ifaceAddr
		err   error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		same, err := sameFile(f, "/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: err}
			return
		}
		if same {
			defer runtime.UnlockOSThread()
		} else if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- result{err: fmt.Errorf("enter the network namespace of %s: %w", ns, err)}
			return
		}
		addrs, err := dumpIPv4Addresses()
		done <- result{addrs, err}
	}()
	r := <-done
	return r.addrs, r.err
}

// sameFile reports whether f and the file at path are one inode.
func sameFile(f *os.File, path string) (bool, error) {
	a, err := f.Stat()
	if err != nil {
		return false, err
	}
	b, err := os.Stat(path)
	if err != nil {
		return false, err
	}
	return os.SameFile(a, b), nil
}

// dumpIPv4Addresses asks the kernel, in the calling thread's network
// namespace, for its interfaces and their IPv4 addresses.
func dumpIPv4Addresses() ([]ifaceAddr, error) {
	names, err := linkNames()
	if err != nil {
		return nil, err
	}
	msgs, err := netlinkDump("addresses", syscall.RTM_GETADDR, syscall.AF_INET)
	if err != nil {
		return nil, err
	}
	var out []ifaceAddr
	for _, m := range msgs {
		if m.Header.Type != syscall.RTM_NEWADDR || len(m.Data) < syscall.SizeofIfAddrmsg {
			continue
		}
		bits := int(m.Data[1])
		index := binary.NativeEndian.Uint32(m.Data[4:8])
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return nil, fmt.Errorf("netlink address of interface %d: %w", index, err)
		}
		// IFA_LOCAL is the address of a point-to-point link (IFA_ADDRESS
		// is then the peer's); otherwise there is only IFA_ADDRESS.
		var ip netip.Addr
		for _, a := range attrs {
			if (a.Attr.Type == syscall.IFA_LOCAL || (a.Attr.Type == syscall.IFA_ADDRESS && !ip.IsValid())) && len(a.Value) == 4 {
				ip = netip.AddrFrom4([4]byte(a.Value))
			}
		}
		name, ok := names[index]
		if !ip.IsValid() || !ok {
			continue
		}
		p := netip.PrefixFrom(ip, bits)
		if !p.IsValid() {
			return nil, fmt.Errorf("netlink address %s of %s: prefix length %d is not valid", ip, name, bits)
		}
		out = append(out, ifaceAddr{iface: name, prefix: p})
	}
	slices.SortFunc(out, func(a, b ifaceAddr) int {
		return cmp.Or(strings.Compare(a.iface, b.iface), a.prefix.Addr().Compare(b.prefix.Addr()))
	})
	return out, nil
}

// linkNames maps interface indexes to names.
func linkNames() (map[uint32]string, error) {
	msgs, err := netlinkDump("links", syscall.RTM_GETLINK, syscall.AF_UNSPEC)
	if err != nil {
		return nil, err
	}
	names := map[uint32]string{}
	for _, m := range msgs {
		if m.Header.Type != syscall.RTM_NEWLINK || len(m.Data) < syscall.SizeofIfInfomsg {
			continue
		}
		index := binary.NativeEndian.Uint32(m.Data[4:8])
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return nil, fmt.Errorf("netlink link %d: %w", index, err)
		}
		for _, a := range attrs {
			if a.Attr.Type == syscall.IFLA_IFNAME {
				names[index] = string(bytes.TrimRight(a.Value, "\x00"))
			}
		}
	}
	return names, nil
}

// netlinkDump runs one rtnetlink dump request for what.
func netlinkDump(what string, request, family int) ([]syscall.NetlinkMessage, error) {
	rib, err := syscall.NetlinkRIB(request, family)
	if err != nil {
		return nil, fmt.Errorf("netlink dump of %s: %w", what, err)
	}
	msgs, err := syscall.ParseNetlinkMessage(rib)
	if err != nil {
		return nil, fmt.Errorf("netlink dump of %s: %w", what, err)
	}
	return msgs, nil
}
