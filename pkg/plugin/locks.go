package plugin

import (
	"context"
	"slices"
	"strconv"
	"sync"

	resourceapi "k8s.io/api/resource/v1"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// keyedLocks is a set of mutexes named by strings, created on first use and
// dropped when nobody holds or waits for them. A caller that needs several
// takes them in one call (sorted, so two callers never wait for each other
// in a circle).
type keyedLocks struct {
	mu    sync.Mutex
	locks map[string]*keyedLock
}

type keyedLock struct {
	mu   sync.Mutex
	refs int
}

// lock takes every named lock and returns what releases them.
func (k *keyedLocks) lock(keys ...string) (unlock func()) {
	keys = slices.Compact(slices.Sorted(slices.Values(keys)))
	held := make([]*keyedLock, 0, len(keys))
	for _, key := range keys {
		k.mu.Lock()
		if k.locks == nil {
			k.locks = map[string]*keyedLock{}
		}
		l := k.locks[key]
		if l == nil {
			l = &keyedLock{}
			k.locks[key] = l
		}
		l.refs++
		k.mu.Unlock()
		l.mu.Lock()
		held = append(held, l)
	}
	return func() {
		for i, l := range slices.Backward(held) {
			l.mu.Unlock()
			k.mu.Lock()
			if l.refs--; l.refs == 0 {
				delete(k.locks, keys[i])
			}
			k.mu.Unlock()
		}
	}
}

func claimKey(uid string) string { return "claim " + uid }
func groupKey(group int) string  { return "group " + strconv.Itoa(group) }

// lockClaim takes what preparing or unpreparing the claim uid needs: the
// claim itself (a kubelet retry waits for the call still running), then
// every IOMMU group the claim holds in the checkpoint or, for a prepare, is
// allocated. Claims on disjoint groups run in parallel; claims that share
// a group take turns. It returns the locked groups and what releases them.
// Callers hold scanMu for reading (see Driver.scan).
func (d *Driver) lockClaim(uid string, allocated []resourceapi.DeviceRequestAllocationResult) (map[int]bool, func()) {
	unlockClaim := d.locks.lock(claimKey(uid))
	groups := map[int]bool{}
	if cp, err := d.store.Get(); err == nil && cp.Claims[uid] != nil {
		for _, g := range cp.Claims[uid].Groups {
			groups[g.Number] = true
		}
	}
	for _, r := range allocated {
		if r.Driver != d.cfg.DriverName {
			continue
		}
		// A device that cannot be read fails the prepare later, in plan.
		// Only its iommu_group link is read: plan reads the rest.
		if a, err := pci.ParseDeviceName(r.Device); err == nil {
			if g, err := d.fs.IOMMUGroup(a); err == nil && g != nil {
				groups[*g] = true
			}
		}
	}
	keys := make([]string, 0, len(groups))
	for g := range groups {
		keys = append(keys, groupKey(g))
	}
	unlockGroups := d.locks.lock(keys...)
	return groups, func() {
		unlockGroups()
		unlockClaim()
	}
}

// retryRollbackLocked rolls back the unfinished prepare of uid under the
// claim's locks, unless a call of the kubelet finished or redid it
// meanwhile (then it reports false).
func (d *Driver) retryRollbackLocked(ctx context.Context, uid string) (bool, error) {
	d.scanMu.RLock()
	defer d.scanMu.RUnlock()
	_, unlock := d.lockClaim(uid, nil)
	defer unlock()
	cp, err := d.store.Get()
	if err != nil {
		return false, err
	}
	if c := cp.Claims[uid]; c == nil || c.State != checkpoint.PrepareStarted {
		return false, nil
	}
	err = d.unprepareClaim(ctx, uid)
	d.cfg.Metrics.Rollback(err)
	return true, err
}
