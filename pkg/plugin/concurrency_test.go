package plugin_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/klog/v2/ktesting"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"

	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// barrierWriter holds the first unbind from each of the named host drivers
// until all of them are under way: if the plugin serialized the claims,
// the first would wait alone and fail.
type barrierWriter struct {
	w       vfio.Writer
	mu      sync.Mutex
	want    map[string]bool
	release chan struct{}
}

func newBarrier(w vfio.Writer, drivers ...string) *barrierWriter {
	b := &barrierWriter{w: w, want: map[string]bool{}, release: make(chan struct{})}
	for _, d := range drivers {
		b.want[d] = true
	}
	return b
}

func (b *barrierWriter) WriteFile(path string, data []byte) error {
	b.mu.Lock()
	var wait bool
	for d := range b.want {
		if strings.HasSuffix(path, "/"+d+"/unbind") {
			delete(b.want, d)
			wait = true
			if len(b.want) == 0 {
				close(b.release)
			}
		}
	}
	b.mu.Unlock()
	if wait {
		select {
		case <-b.release:
		case <-time.After(20 * time.Second):
			return fmt.Errorf("unbinds of claims on disjoint IOMMU groups did not run at the same time")
		}
	}
	return b.w.WriteFile(path, data)
}

// TestConcurrentClaims: claims on disjoint IOMMU groups bind at the same
// time; two claims for one group never both get it; a claim prepared by
// two overlapping calls is bound once; after a restart, unprepares at
// once give every function back; the checkpoint and the CDI directory
// hold exactly the prepared claims throughout. Run under -race.
func TestConcurrentClaims(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	n.cfg.SysfsWriter = newBarrier(n.kernel, "nfp", "mlx5_core", "e1000")
	n.start(ctx, t)
	before := n.state(t)

	nic := n.createClaim(ctx, t, "nic", []resourceapi.DeviceRequestAllocationResult{result("nic", "0000:82:00.0")})
	vf := n.createClaim(ctx, t, "vf", []resourceapi.DeviceRequestAllocationResult{result("vf", "0000:81:00.2")})
	e1000 := n.createClaim(ctx, t, "e1000", []resourceapi.DeviceRequestAllocationResult{result("nic", "0000:02:01.0")})
	// Both GPU functions are in group 2: whichever claim comes second must
	// be refused.
	gpuA := n.createClaim(ctx, t, "gpu-a", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.0")})
	gpuB := n.createClaim(ctx, t, "gpu-b", []resourceapi.DeviceRequestAllocationResult{result("gpu", "0000:01:00.1")})

	type answer struct {
		claim string
		devs  []*drapb.Device
		err   string
	}
	prepareAll := func(claims ...*resourceapi.ResourceClaim) []answer {
		answers := make([]answer, len(claims))
		var wg sync.WaitGroup
		for i, c := range claims {
			wg.Go(func() {
				resp, err := n.dra.NodePrepareResources(ctx, &drapb.NodePrepareResourcesRequest{Claims: []*drapb.Claim{claimRef(c)}})
				answers[i].claim = c.Name
				if err != nil {
					answers[i].err = err.Error()
					return
				}
				answers[i].devs, answers[i].err = resp.Claims[string(c.UID)].GetDevices(), resp.Claims[string(c.UID)].GetError()
			})
		}
		wg.Wait()
		return answers
	}
	answers := prepareAll(nic, vf, e1000, gpuA, gpuB, nic)
	gpuWinners := 0
	for _, a := range answers {
		switch {
		case strings.HasPrefix(a.claim, "gpu") && a.err == "":
			gpuWinners++
		case strings.HasPrefix(a.claim, "gpu"):
			if !strings.Contains(a.err, "IOMMU group 2 is prepared for ResourceClaim") {
				t.Errorf("claim %s: %s, want the group held by the other GPU claim", a.claim, a.err)
			}
		case a.err != "":
			t.Errorf("claim %s: %s", a.claim, a.err)
		}
	}
	if gpuWinners != 1 {
		t.Errorf("%d claims got IOMMU group 2, want exactly 1", gpuWinners)
	}
	if diff := cmp.Diff(preparedDevices(answers[0].devs), preparedDevices(answers[5].devs)); diff != "" {
		t.Errorf("two overlapping prepares of one claim answered differently:\n%s", diff)
	}
	if w := writesFor(n.kernel.Writes(), "0000:82:00.0"); len(w) != 3 {
		t.Errorf("the claim prepared by two overlapping calls got writes %q, want one bind (override, unbind, probe)", w)
	}
	for addr, want := range map[string]string{"0000:82:00.0": "vfio-pci", "0000:81:00.2": "vfio-pci", "0000:02:01.0": "vfio-pci", "0000:02:02.0": "vfio-pci", "0000:01:00.0": "vfio-pci", "0000:01:00.1": "vfio-pci"} {
		if got := n.driverOf(t, addr); got != want {
			t.Errorf("%s is on %q while prepared, want %s", addr, got, want)
		}
	}
	cp := n.checkpoint(t)
	if len(cp.Claims) != 4 {
		t.Errorf("checkpoint holds %d claims, want 4 (nic, vf, e1000, one GPU claim)", len(cp.Claims))
	}
	for _, c := range []*resourceapi.ResourceClaim{nic, vf, e1000, gpuA, gpuB} {
		_, held := cp.Claims[string(c.UID)]
		if files := n.cdiFilesOf(t, c); held != (len(files) > 0) {
			t.Errorf("claim %s: in the checkpoint %v, CDI files %v", c.Name, held, files)
		}
	}

	// A new process unprepares everything at once, the refused claim too.
	n.driver.Stop()
	n.start(ctx, t)
	var wg sync.WaitGroup
	for _, c := range []*resourceapi.ResourceClaim{nic, vf, e1000, gpuA, gpuB, vf} {
		wg.Go(func() {
			resp, err := n.dra.NodeUnprepareResources(context.WithoutCancel(ctx), &drapb.NodeUnprepareResourcesRequest{Claims: []*drapb.Claim{claimRef(c)}})
			if err != nil {
				t.Errorf("unprepare %s: %v", c.Name, err)
			} else if e := resp.Claims[string(c.UID)].GetError(); e != "" {
				t.Errorf("unprepare %s: %s", c.Name, e)
			}
		})
	}
	wg.Wait()
	if diff := cmp.Diff(before, n.state(t)); diff != "" {
		t.Errorf("after concurrent unprepares (-before +now):\n%s", diff)
	}
	if cp := n.checkpoint(t); len(cp.Claims) != 0 {
		t.Errorf("checkpoint still holds %d claims", len(cp.Claims))
	}
	for _, c := range []*resourceapi.ResourceClaim{nic, vf, e1000, gpuA, gpuB} {
		if files := n.cdiFilesOf(t, c); len(files) > 0 {
			t.Errorf("claim %s: CDI files %v left", c.Name, files)
		}
	}
}

// blockingWriter blocks the first unbind from driver until release closes.
type blockingWriter struct {
	w       vfio.Writer
	driver  string
	release chan struct{}
	unbinds atomic.Int32
}

func (b *blockingWriter) WriteFile(path string, data []byte) error {
	if strings.HasSuffix(path, "/"+b.driver+"/unbind") && b.unbinds.Add(1) == 1 {
		<-b.release
	}
	return b.w.WriteFile(path, data)
}

// TestRetryWhileUnbindBlocked: the kubelet's retries of a claim whose
// unbind is still blocked in the kernel fail at once with that reason and
// start no other write to the function; once the kernel lets the unbind
// go, a retry prepares the claim.
func TestRetryWhileUnbindBlocked(t *testing.T) {
	t.Parallel()
	_, ctx := ktesting.NewTestContext(t)
	n := newNode(t)
	bw := &blockingWriter{w: n.kernel, driver: "nfp", release: make(chan struct{})}
	released := false
	defer func() {
		if !released {
			close(bw.release)
		}
	}()
	n.cfg.SysfsWriter = bw
	n.cfg.BindTimeout = 200 * time.Millisecond
	n.start(ctx, t)
	nic := n.createClaim(ctx, t, "nic", []resourceapi.DeviceRequestAllocationResult{result("nic", "0000:82:00.0")})
	if r := n.prepare(ctx, t, nic); !strings.Contains(r.Error, "timed out") {
		t.Fatalf("first prepare: %q, want a timeout", r.Error)
	}
	for range 3 {
		r := n.prepare(ctx, t, nic)
		if !strings.Contains(r.Error, vfio.ErrBlocked.Error()) {
			t.Errorf("retry while the unbind is blocked: %q, want %q", r.Error, vfio.ErrBlocked)
		}
	}
	if got := bw.unbinds.Load(); got != 1 {
		t.Errorf("%d unbinds from nfp, want 1: a retry wrote again", got)
	}
	close(bw.release)
	released = true
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := n.prepare(ctx, t, nic)
		if r.Error == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("prepare after the unbind went through: %s", r.Error)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if d := n.driverOf(t, "0000:82:00.0"); d != "vfio-pci" {
		t.Errorf("driver %q after the prepare, want vfio-pci", d)
	}
}
