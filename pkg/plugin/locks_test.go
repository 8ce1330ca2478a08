package plugin

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestKeyedLocks: holders of one key exclude each other, holders of
// disjoint keys do not, overlapping sets taken in any order do not
// deadlock, and released locks are forgotten.
func TestKeyedLocks(t *testing.T) {
	var k keyedLocks
	unlock := k.lock("a", "b")
	got := make(chan struct{})
	go func() {
		u := k.lock("c")
		close(got)
		u()
	}()
	select {
	case <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("a disjoint key waited for a held one")
	}
	waited := make(chan struct{})
	go func() {
		u := k.lock("b")
		close(waited)
		u()
	}()
	select {
	case <-waited:
		t.Fatal("a held key was taken twice")
	case <-time.After(50 * time.Millisecond):
	}
	unlock()
	<-waited

	var wg sync.WaitGroup
	var inside [3]atomic.Int32
	sets := [][]string{{"x", "y"}, {"y", "z"}, {"z", "x"}, {"x"}}
	for i := range 40 {
		wg.Go(func() {
			keys := sets[i%len(sets)]
			u := k.lock(keys...)
			defer u()
			for _, key := range keys {
				if n := inside[key[0]-'x'].Add(1); n != 1 {
					t.Errorf("%d holders of %s", n, key)
				}
			}
			time.Sleep(time.Millisecond)
			for _, key := range keys {
				inside[key[0]-'x'].Add(-1)
			}
		})
	}
	wg.Wait()
	if len(k.locks) != 0 {
		t.Errorf("%d locks left after every holder released them", len(k.locks))
	}
}
