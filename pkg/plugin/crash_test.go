package plugin_test

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/klog/v2/ktesting"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

var errCrashed = errors.New("the process died here")

// crasher sees every side effect of the plugin: each sysfs write (as its
// Writer) and each checkpoint and CDI spec event (as its WriteHook). Armed
// with a limit, it lets that many happen and none after, as if the process
// had died right there: later writes change nothing.
type crasher struct {
	k      *pcitest.Kernel
	root   string
	mu     sync.Mutex
	armed  bool
	limit  int // < 0: no limit
	events []string
}

func (c *crasher) arm(limit int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.armed, c.limit, c.events = true, limit, nil
}

// disarm is the next process: nothing is stopped any more.
func (c *crasher) disarm() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.armed = false
	return c.events
}

func (c *crasher) dead() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.armed && c.limit >= 0 && len(c.events) >= c.limit
}

func (c *crasher) step(event string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.armed {
		return nil
	}
	if c.limit >= 0 && len(c.events) >= c.limit {
		return errCrashed
	}
	c.events = append(c.events, event)
	return nil
}

func (c *crasher) WriteFile(path string, data []byte) error {
	rel, _ := filepath.Rel(c.root, path)
	if err := c.step(fmt.Sprintf("write %q to %s", data, rel)); err != nil {
		return err
	}
	return c.k.WriteFile(path, data)
}

func (c *crasher) hook(event string) error { return c.step(event) }

// crashNode is a node whose plugin runs behind a crasher, with a claim for
// three IOMMU groups: the GPU and its audio function, the SmartNIC alone,
// and two conventional PCI NICs behind a bridge. The claim's driver is
// "auto", so the GPU goes to its variant and its audio function to
// vfio-pci: a group whose members have different targets.
func crashNode(t *testing.T) (*node, *crasher, *resourceapi.ResourceClaim) {
	t.Helper()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	withVariants(t, n)
	c := &crasher{k: n.kernel, root: n.tree.Root, limit: -1}
	n.cfg.SysfsWriter, n.cfg.WriteHook = c, c.hook
	n.start(ctx, t)
	claim := n.createClaim(ctx, t, "claim", []resourceapi.DeviceRequestAllocationResult{
		result("gpu", "0000:01:00.0"), result("nic", "0000:82:00.0"), result("legacy", "0000:02:01.0"),
	}, autoClass())
	return n, c, claim
}

// checkConsistent: no CDI spec without a checkpoint entry, and no entry
// whose functions are not on the node.
func (n *node) checkConsistent(t *testing.T, claim *resourceapi.ResourceClaim) {
	t.Helper()
	entry := n.checkpoint(t).Claims[string(claim.UID)]
	if exists(t, n.specFile(claim)) && entry == nil {
		t.Errorf("CDI spec %s without a checkpoint entry", n.specFile(claim))
	}
	if entry == nil {
		return
	}
	st := n.state(t)
	for _, g := range entry.Groups {
		for _, m := range g.Members {
			if _, ok := st[m.Address]; !ok {
				t.Errorf("checkpoint entry names %s, which the node does not have", m.Address)
			}
		}
	}
}

// TestCrashAtEveryPoint derives the points at which the plugin can die
// from a recorded prepare and unprepare of a three-group claim: after each
// of its sysfs writes and before and after each checkpoint and CDI spec
// write. For each point it stops the plugin there, starts a new one on the
// same state, lets the kubelet retry, and requires the node to be exactly
// prepared (prepare retried) or exactly as before (unprepare).
func TestCrashAtEveryPoint(t *testing.T) {
	t.Parallel()
	// The recorded run.
	_, ctx := ktesting.NewTestContext(t)
	n, c, claim := crashNode(t)
	before := n.state(t)
	c.arm(-1)
	n.mustPrepare(ctx, t, claim)
	prepared := n.state(t)
	if got := prepared["0000:01:00.0"].Driver; got != "nvgrace_gpu_vfio_pci" {
		t.Fatalf("the recorded run bound the GPU to %q, want its variant", got)
	}
	if got := prepared["0000:01:00.1"].Driver; got != "vfio-pci" {
		t.Fatalf("the recorded run bound the GPU's audio function to %q, want vfio-pci", got)
	}
	preparePoints := len(c.events)
	n.mustUnprepare(ctx, t, claimRef(claim))
	events := c.disarm()
	if diff := cmp.Diff(before, n.state(t)); diff != "" {
		t.Fatalf("the recorded run did not give the node back (-before +after):\n%s", diff)
	}
	var writes, checkpoints, specs int
	for _, e := range events {
		switch {
		case strings.HasPrefix(e, "write "):
			writes++
		case strings.Contains(e, "checkpoint"):
			checkpoints++
		case strings.Contains(e, "CDI"):
			specs++
		}
	}
	// 5 functions, 3 writes each to bind and 4 to give back; the claim
	// checkpointed ahead, completed and forgotten; its spec written and
	// removed. Fewer means the recording missed a kind of write.
	if writes != 35 || checkpoints != 6 || specs != 4 {
		t.Fatalf("recorded %d sysfs writes, %d checkpoint and %d CDI events, want 35, 6 and 4:\n%s", writes, checkpoints, specs, strings.Join(events, "\n"))
	}

	for point := range events {
		phase, retries := "unprepare", []string{"unprepare"}
		if point < preparePoints {
			phase, retries = "prepare", []string{"prepare", "unprepare"}
		}
		for _, retry := range retries {
			t.Run(fmt.Sprintf("%02d %s: died after %s, kubelet retries %s", point, phase, events[point], retry), func(t *testing.T) {
				t.Parallel()
				_, ctx := ktesting.NewTestContext(t)
				n, c, claim := crashNode(t)
				c.arm(point + 1)
				n.prepare(ctx, t, claim)
				if !c.dead() {
					n.unprepare(ctx, t, claimRef(claim))
				}
				if !c.dead() {
					t.Fatalf("the run did not reach point %d", point)
				}
				n.driver.Stop()
				c.disarm()

				n.start(ctx, t)
				n.checkConsistent(t, claim)
				if retry == "prepare" {
					devs := n.mustPrepare(ctx, t, claim)
					if diff := cmp.Diff(prepared, n.state(t)); diff != "" {
						t.Errorf("after the retried prepare (-prepared +now):\n%s", diff)
					}
					if e := n.checkpoint(t).Claims[string(claim.UID)]; e == nil || e.State != checkpoint.PrepareCompleted {
						t.Errorf("checkpoint entry %+v, want the claim prepared", e)
					}
					n.inject(t, allCDIIDs(devs))
				}
				n.mustUnprepare(ctx, t, claimRef(claim))
				if diff := cmp.Diff(before, n.state(t)); diff != "" {
					t.Errorf("after unprepare (-before +now):\n%s", diff)
				}
				if files := n.cdiFilesOf(t, claim); len(files) > 0 {
					t.Errorf("CDI files left: %v", files)
				}
				if e := n.checkpoint(t).Claims[string(claim.UID)]; e != nil {
					t.Errorf("checkpoint keeps the claim: %+v", e)
				}
			})
		}
	}
}
