// Package benchmark measures code against its floor in the same process:
// the shared, noisy machines of CI make absolute times meaningless, a ratio
// to a floor measured in the same iterations is not.
package benchmark

import (
	"runtime"
	"testing"
	"time"
)

// Compare runs floor and subject alternately, once each per iteration, and
// reports their times per operation (floor-ns/op, subject-ns/op), subject
// over floor (x-floor), the goal for that ratio (goal-x; 0 for none) and
// what the subject alone allocates (subject-B/op, subject-allocs/op; b's
// own B/op covers both). b's own ns/op covers both.
func Compare(b *testing.B, goal float64, floor, subject func()) {
	b.Helper()
	var tf, ts time.Duration
	var bytes, allocs uint64
	var before, after runtime.MemStats
	for b.Loop() {
		t0 := time.Now()
		floor()
		tf += time.Since(t0)
		// Outside the timed parts: reading the statistics stops the world.
		runtime.ReadMemStats(&before)
		t1 := time.Now()
		subject()
		ts += time.Since(t1)
		runtime.ReadMemStats(&after)
		bytes += after.TotalAlloc - before.TotalAlloc
		allocs += after.Mallocs - before.Mallocs
	}
	Report(b, goal, tf, ts)
	b.ReportMetric(float64(bytes)/float64(b.N), "subject-B/op")
	b.ReportMetric(float64(allocs)/float64(b.N), "subject-allocs/op")
}

// Report reports the totals of floor and subject over b.N iterations as
// Compare does, for benchmarks that time their parts themselves.
func Report(b *testing.B, goal float64, floor, subject time.Duration) {
	b.Helper()
	n := float64(b.N)
	b.ReportMetric(float64(floor.Nanoseconds())/n, "floor-ns/op")
	b.ReportMetric(float64(subject.Nanoseconds())/n, "subject-ns/op")
	if floor > 0 {
		b.ReportMetric(subject.Seconds()/floor.Seconds(), "x-floor")
	}
	b.ReportMetric(goal, "goal-x")
}
