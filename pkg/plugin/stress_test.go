package plugin_test

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/klog/v2/ktesting"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// Shape of the crowded node: the demo server plus this many GPUs in IOMMU
// groups of their own, and this many groups of a GPU with its HDMI audio
// function.
const (
	crowdSingles = 24
	crowdPairs   = 8
	crowdClaims  = 100
)

// crowdFunctions are the functions added to the demo server: each on a
// root bus of its own (as behind separate host bridges), so that no bridge
// joins their groups.
func crowdFunctions() (fns []pcitest.Function, groups map[string]int) {
	groups = map[string]int{}
	for i := range crowdSingles {
		addr := fmt.Sprintf("0000:%02x:00.0", 0x10+i)
		fns = append(fns, pcitest.Function{Address: addr, Vendor: 0x10de, Device: 0x20b5, SubVendor: 0x10de, SubDevice: 0x1533,
			Class: 0x030200, Driver: "nvidia", IOMMUGroup: 100 + i, NUMANode: i % 2})
		groups[addr] = 100 + i
	}
	for i := range crowdPairs {
		gpu, audio := fmt.Sprintf("0000:%02x:00.0", 0x40+i), fmt.Sprintf("0000:%02x:00.1", 0x40+i)
		fns = append(fns,
			pcitest.Function{Address: gpu, Vendor: 0x10de, Device: 0x2204, SubVendor: 0x10de, SubDevice: 0x1454,
				Class: 0x030000, Driver: "nvidia", IOMMUGroup: 200 + i, NUMANode: i % 2},
			pcitest.Function{Address: audio, Vendor: 0x10de, Device: 0x1aef, SubVendor: 0x10de, SubDevice: 0x1454,
				Class: 0x040300, Driver: "snd_hda_intel", IOMMUGroup: 200 + i, NUMANode: i % 2})
		groups[gpu], groups[audio] = 200+i, 200+i
	}
	return fns, groups
}

// newCrowdedNode is newNode on the demo server with crowdFunctions added.
func newCrowdedNode(t *testing.T) (*node, map[string]int) {
	t.Helper()
	e := newEnv(t)
	fns, groups := crowdFunctions()
	if err := e.tree.Add(fns...); err != nil {
		t.Fatal(err)
	}
	k, err := pcitest.NewKernel(e.tree.Root, e.cfg.DevRoot)
	if err != nil {
		t.Fatal(err)
	}
	e.cfg.SysfsWriter = k
	e.cfg.BindTimeout = 5 * time.Second
	fs, err := pci.NewFS(e.tree.Root)
	if err != nil {
		t.Fatal(err)
	}
	return &node{env: e, kernel: k, fs: fs}, groups
}

// holding is when one claim certainly held its groups: from the moment its
// prepare returned to the moment its unprepare was called, in ticks of a
// clock shared by all claims.
type holding struct {
	claim      string
	groups     []int
	from, till int64
}

// TestHundredConcurrentClaims: 100 claims on 40 devices (single-device
// groups and groups of two, claims of one or two devices, some across
// groups, some prepared by two calls at once, every one unprepared while
// the others prepare) through the kubelet's gRPC API at the same time.
// No two claims ever hold one IOMMU group, in the checkpoint or by the
// answers the plugin gave; a refused claim is refused because another
// claim holds its group; nothing deadlocks; at the end every function is
// on its original driver and there is no checkpoint entry and no CDI spec.
// Run under -race.
func TestHundredConcurrentClaims(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n, groupOf := newCrowdedNode(t)
	n.start(ctx, t)
	before := n.state(t)
	// A fixed order and seed: a failure can be run again.
	addrs := slices.Sorted(maps.Keys(groupOf))
	rng := rand.New(rand.NewPCG(9, 100))

	// One claim holds group 100 from before the others start until after
	// they end: every claim that wants it must be refused.
	blocker := n.createClaim(ctx, t, "blocker", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:10:00.0")})
	n.mustPrepare(ctx, t, blocker)

	type claimPlan struct {
		claim  *resourceapi.ResourceClaim
		groups []int
		twice  bool
	}
	plans := make([]claimPlan, crowdClaims)
	for i := range plans {
		picked := map[string]bool{addrs[rng.IntN(len(addrs))]: true}
		if rng.IntN(3) == 0 {
			picked[addrs[rng.IntN(len(addrs))]] = true
		}
		if i%17 == 0 {
			picked["0000:10:00.0"] = true // the blocker's group
		}
		var results []resourceapi.DeviceRequestAllocationResult
		groups := map[int]bool{}
		for _, a := range slices.Sorted(maps.Keys(picked)) {
			results = append(results, result(fmt.Sprintf("dev%d", len(results)), a))
			groups[groupOf[a]] = true
		}
		plans[i] = claimPlan{
			claim:  n.createClaim(ctx, t, fmt.Sprintf("claim-%03d", i), results),
			groups: slices.Sorted(maps.Keys(groups)),
			twice:  i%10 == 3,
		}
	}

	// The checkpoint never lists one group for two claims.
	done := make(chan struct{})
	var watcher sync.WaitGroup
	watcher.Go(func() {
		reported := map[string]bool{}
		for {
			select {
			case <-done:
				return
			default:
			}
			cp, err := checkpoint.NewStore(n.cfg.PluginDataDir + "/checkpoint.json").Get()
			if err != nil {
				t.Errorf("read checkpoint during the run: %v", err)
				return
			}
			holder := map[int]string{}
			for uid, c := range cp.Claims {
				for _, g := range c.Groups {
					if other, ok := holder[g.Number]; ok && !reported[other+" "+uid] {
						reported[other+" "+uid] = true
						t.Errorf("checkpoint: IOMMU group %d held by claims %s and %s", g.Number, other, uid)
					}
					holder[g.Number] = uid
				}
			}
			time.Sleep(5 * time.Millisecond)
		}
	})

	var clock atomic.Int64
	var mu sync.Mutex
	var held []holding
	var refused, prepared atomic.Int32
	var wg sync.WaitGroup
	for _, p := range plans {
		wg.Go(func() {
			c := p.claim
			answers := make([]*drapb.NodePrepareResourceResponse, 1, 2)
			var calls sync.WaitGroup
			call := func(i int) {
				resp, err := n.dra.NodePrepareResources(ctx, &drapb.NodePrepareResourcesRequest{Claims: []*drapb.Claim{claimRef(c)}})
				if err != nil {
					t.Errorf("prepare %s: %v", c.Name, err)
					answers[i] = &drapb.NodePrepareResourceResponse{Error: err.Error()}
					return
				}
				answers[i] = resp.Claims[string(c.UID)]
			}
			if p.twice {
				answers = answers[:2]
				calls.Go(func() { call(1) })
			}
			call(0)
			calls.Wait()
			from := clock.Add(1)
			// Of two calls for one claim, the first to get its locks may
			// be refused and the second, after the other claim left,
			// prepare it.
			var won *drapb.NodePrepareResourceResponse
			for _, a := range answers {
				if a.GetError() == "" {
					won = a
				} else if msg := a.GetError(); !strings.Contains(msg, "is prepared for ResourceClaim") {
					t.Errorf("claim %s refused with %q, want a group held by another claim", c.Name, msg)
				}
			}
			ok := won != nil
			if ok {
				prepared.Add(1)
				for _, dev := range won.Devices {
					a, err := pci.ParseDeviceName(dev.DeviceName)
					if err != nil {
						t.Errorf("claim %s got device %q: %v", c.Name, dev.DeviceName, err)
						continue
					}
					if d, err := n.fs.Device(a); err != nil || d.Driver != "vfio-pci" {
						t.Errorf("claim %s: device %s prepared but on %v (%v)", c.Name, a, d, err)
					}
				}
				time.Sleep(time.Duration(rng2(c.Name)) * time.Millisecond)
			} else {
				refused.Add(1)
			}
			till := clock.Add(1)
			if ok {
				mu.Lock()
				held = append(held, holding{claim: c.Name, groups: p.groups, from: from, till: till})
				mu.Unlock()
			}
			// The kubelet unprepares refused claims too, once their pod
			// is gone.
			resp, err := n.dra.NodeUnprepareResources(ctx, &drapb.NodeUnprepareResourcesRequest{Claims: []*drapb.Claim{claimRef(c)}})
			if err != nil {
				t.Errorf("unprepare %s: %v", c.Name, err)
			} else if msg := resp.Claims[string(c.UID)].GetError(); msg != "" {
				t.Errorf("unprepare %s: %s", c.Name, msg)
			}
		})
	}
	wg.Wait()
	close(done)
	watcher.Wait()

	for i, a := range held {
		for _, b := range held[i+1:] {
			if a.from < b.till && b.from < a.till && overlap(a.groups, b.groups) {
				t.Errorf("claims %s and %s held IOMMU groups %v and %v at the same time", a.claim, b.claim, a.groups, b.groups)
			}
		}
	}
	for _, p := range plans {
		if p.groups[0] == 100 {
			for _, h := range held {
				if h.claim == p.claim.Name {
					t.Errorf("claim %s got group 100 while the blocker held it", h.claim)
				}
			}
		}
	}
	t.Logf("%d claims prepared, %d refused", prepared.Load(), refused.Load())
	if prepared.Load() == 0 {
		t.Errorf("no claim was prepared")
	}

	n.mustUnprepare(ctx, t, claimRef(blocker))
	if diff := cmp.Diff(before, n.state(t)); diff != "" {
		t.Errorf("after all unprepares (-before +now):\n%s", diff)
	}
	if cp := n.checkpoint(t); len(cp.Claims) != 0 {
		t.Errorf("checkpoint still holds %d claims", len(cp.Claims))
	}
	entries, err := os.ReadDir(n.cfg.CDIRoot)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		t.Errorf("CDI directory still holds %s", e.Name())
	}
}

// rng2 is a hold time of 0 to 4 ms derived from name, so that claims leave
// in another order than they came.
func rng2(name string) int {
	h := 0
	for _, c := range name {
		h = h*31 + int(c)
	}
	return h % 5
}

func overlap(a, b []int) bool {
	return slices.ContainsFunc(a, func(g int) bool { return slices.Contains(b, g) })
}
