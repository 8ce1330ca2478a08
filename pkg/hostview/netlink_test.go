package hostview_test

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview"
	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview/hostviewtest"
)

// TestIPv4AddressesThroughNetlink runs the host view against a real
// kernel's network namespace, one of its own held by a sleeping process: an
// IPv4 /32 noprefixroute address adds no route and, before anyone talks to
// it, no neighbour, so only netlink shows that its interface is in use.
func TestIPv4AddressesThroughNetlink(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("needs root to create a network namespace; CI runs as root")
		}
		t.Skip("needs root to create a network namespace")
	}
	for _, tool := range []string{"unshare", "nsenter", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed (util-linux, iproute2): %v", tool, err)
		}
	}
	holder := exec.Command("unshare", "--net", "sleep", "600")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = holder.Process.Kill()
		_ = holder.Wait()
	})
	ns := fmt.Sprintf("/proc/%d/ns/net", holder.Process.Pid)
	waitForOwnNamespace(t, ns)
	inNS := func(args ...string) {
		t.Helper()
		cmd := append([]string{"-t", fmt.Sprint(holder.Process.Pid), "-n", "ip"}, args...)
		if out, err := exec.Command("nsenter", cmd...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	// veth pairs stand in for the NICs' interfaces (the kernel here has
	// no dummy module); the peers have no address, so nothing asks for
	// them.
	inNS("link", "add", "ens1f0", "type", "veth", "peer", "name", "peer0")
	inNS("link", "add", "ens1f1", "type", "veth", "peer", "name", "peer1")

	h := host(t, nic1, nic2)
	must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f0", Function: nic1.Address}))
	must(t, h.AddInterface(hostviewtest.Interface{Name: "ens1f1", Function: nic2.Address}))
	must(t, h.SetNetNamespace(ns))
	read := func(want map[string]string) {
		t.Helper()
		got := hostview.New(h.Sys, h.Proc).Read(hostview.Own{})
		if got.Unavailable != "" {
			t.Errorf("Unavailable = %q", got.Unavailable)
		}
		if diff := cmp.Diff(inUse(t, want), got.InUse); diff != "" {
			t.Errorf("in use (-want +got):\n%s", diff)
		}
	}
	read(map[string]string{})

	inNS("addr", "add", "192.0.2.7/32", "dev", "ens1f1", "noprefixroute")
	read(map[string]string{nic2.Address: "address 192.0.2.7/32 (ens1f1)"})

	// An interface that sysfs does not show (the sysfs of another network
	// namespace is mounted): the view cannot say who uses what.
	inNS("link", "add", "tun9", "type", "veth", "peer", "name", "peer9")
	inNS("addr", "add", "198.51.100.1/24", "dev", "tun9")
	got := hostview.New(h.Sys, h.Proc).Read(hostview.Own{})
	if !strings.Contains(got.Unavailable, "interface tun9 is not in") {
		t.Errorf("Unavailable = %q, want it to name tun9", got.Unavailable)
	}
}

// waitForOwnNamespace waits until ns, of a process just started by unshare,
// is no longer this process's network namespace.
func waitForOwnNamespace(t *testing.T, ns string) {
	t.Helper()
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if other, err := os.Readlink(ns); err == nil && other != self {
			return
		}
	}
	t.Fatalf("%s did not get a network namespace of its own", ns)
}
