package health

import (
	"context"
	"slices"
	"sync"

	"k8s.io/dynamic-resource-allocation/kubeletplugin"
)

// Reporter hands the verdicts of each check to every kubelet that watches
// (WatchHealthStatus may be called once per stream, concurrently).
//
// It sends a report after every check and never re-sends an old one by
// itself: when checks stop (a sysfs read hangs), the kubelet lets the
// devices' health decay to Unknown, as it should.
type Reporter struct {
	mu      sync.Mutex
	devices []kubeletplugin.DeviceHealth
	seq     uint64
	// wake is closed and replaced on every Set.
	wake chan struct{}
}

// NewReporter returns a Reporter with no report yet.
func NewReporter() *Reporter { return &Reporter{wake: make(chan struct{})} }

// Set records the result of a check and wakes the watchers.
func (r *Reporter) Set(devices []kubeletplugin.DeviceHealth) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.devices = slices.Clone(devices)
	r.seq++
	close(r.wake)
	r.wake = make(chan struct{})
}

// Current returns the last report.
func (r *Reporter) Current() []kubeletplugin.DeviceHealth {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.devices)
}

func (r *Reporter) snapshot() ([]kubeletplugin.DeviceHealth, uint64, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.devices), r.seq, r.wake
}

// Watch implements kubeletplugin.DRAPlugin.WatchHealthStatus: it sends
// the last report (once there is one), then each new one, until ctx is
// done.
func (r *Reporter) Watch(ctx context.Context, reports chan<- kubeletplugin.DeviceHealthReport) error {
	var sent uint64
	for {
		devices, seq, wake := r.snapshot()
		if seq != sent {
			select {
			case reports <- kubeletplugin.DeviceHealthReport{Devices: devices}:
				sent = seq
			case <-ctx.Done():
				return nil
			}
			continue
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return nil
		}
	}
}
