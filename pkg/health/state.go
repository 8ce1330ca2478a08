package health

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"time"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// What the state file holds, so that a restarted plugin judges the fatal
// AER counters as the process before it would have: a count that grew
// while no plugin ran is news, one that was counted already is not, and a
// function still in its hold time stays unhealthy.
const (
	stateAPIVersion = "health.vfio.dra.dev/v1"
	stateKind       = "AERBaselines"
)

type stateFile struct {
	APIVersion string                   `json:"apiVersion"`
	Kind       string                   `json:"kind"`
	Functions  map[string]stateFunction `json:"functions,omitempty"`
}

type stateFunction struct {
	// Baseline is the count that is history; Last the count last seen.
	Baseline uint64 `json:"baseline"`
	Last     uint64 `json:"last"`
	// GrewAt is when Last was last seen to grow (RFC 3339).
	GrewAt string `json:"grewAt,omitempty"`
}

// loadState reads the state file into c.aer. A missing file is no state;
// one that cannot be read or parsed is an error, and the checker starts
// afresh (first sight is the baseline, as without a file).
func (c *Checker) loadState() error {
	data, err := os.ReadFile(c.stateFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read health state: %w", err)
	}
	var st stateFile
	if err := json.Unmarshal(data, &st); err != nil {
		return fmt.Errorf("health state %s: %w", c.stateFile, err)
	}
	if st.APIVersion != stateAPIVersion || st.Kind != stateKind {
		return fmt.Errorf("health state %s: apiVersion %q kind %q, want %q %q", c.stateFile, st.APIVersion, st.Kind, stateAPIVersion, stateKind)
	}
	aer := map[pci.Address]*aerState{}
	for addr, f := range st.Functions {
		a, err := pci.ParseAddress(addr)
		if err != nil || f.Last < f.Baseline {
			return fmt.Errorf("health state %s: function %q: bad entry", c.stateFile, addr)
		}
		s := &aerState{baseline: f.Baseline, last: f.Last}
		if f.GrewAt != "" {
			if s.grewAt, err = time.Parse(time.RFC3339Nano, f.GrewAt); err != nil {
				return fmt.Errorf("health state %s: function %s: %w", c.stateFile, addr, err)
			}
		}
		aer[a] = s
	}
	c.aer = aer
	return nil
}

// saveState writes c.aer to the state file, atomically, when it changed
// since the last save.
func (c *Checker) saveState() error {
	st := stateFile{APIVersion: stateAPIVersion, Kind: stateKind, Functions: map[string]stateFunction{}}
	for a, s := range c.aer {
		f := stateFunction{Baseline: s.baseline, Last: s.last}
		if !s.grewAt.IsZero() {
			f.GrewAt = s.grewAt.UTC().Format(time.RFC3339Nano)
		}
		st.Functions[a.String()] = f
	}
	if c.saved != nil && maps.Equal(c.saved, st.Functions) {
		return nil
	}
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode health state: %w", err)
	}
	if err := checkpoint.WriteFileAtomic(c.stateFile, append(data, '\n')); err != nil {
		return fmt.Errorf("write health state %s: %w", c.stateFile, err)
	}
	c.saved = st.Functions
	return nil
}
