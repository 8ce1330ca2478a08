package health_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vfio-dra/vfio-dra-driver/pkg/health"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// TestFatalAERAcrossRestart: with a state file, a new Checker (a restarted
// plugin) judges the fatal AER counts as the one before it would have.
func TestFatalAERAcrossRestart(t *testing.T) {
	tree, err := pcitest.NewServer(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fs, err := pci.NewFS(tree.Root)
	if err != nil {
		t.Fatal(err)
	}
	stateFile := filepath.Join(t.TempDir(), "plugin", "health.json")
	clk := &clock{t: time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)}
	restart := func() *health.Checker {
		return health.NewChecker(fs, health.Options{AERHold: time.Minute, Now: clk.now, StateFile: stateFile})
	}
	set := func(n uint64) {
		t.Helper()
		if err := tree.WriteDeviceFile(nic.String(), "aer_dev_fatal", pcitest.AERFatal(map[string]uint64{"DLP": n})); err != nil {
			t.Fatal(err)
		}
	}
	fn := health.Function{Address: nic}
	healthy := func(c *health.Checker) bool {
		t.Helper()
		return check(t, c, false, fn)[nic].Healthy()
	}

	set(2)
	if !healthy(restart()) {
		t.Fatal("errors counted before the first look made the function unhealthy")
	}
	st, err := os.Stat(stateFile)
	if err != nil {
		t.Fatal(err)
	}
	if mode := st.Mode().Perm(); mode != 0o600 {
		t.Errorf("state file mode %#o, want 0600", mode)
	}

	// The count grew while no plugin ran: a fault.
	set(3)
	clk.t = clk.t.Add(time.Hour)
	if healthy(restart()) {
		t.Error("a fatal error while the plugin was down was not seen after the restart")
	}
	// Restarted within the hold time: still unhealthy.
	clk.t = clk.t.Add(30 * time.Second)
	if healthy(restart()) {
		t.Error("a restart within the hold time forgot the fault")
	}
	// After a quiet hold the fault is history, also for the next process.
	clk.t = clk.t.Add(30 * time.Second)
	if !healthy(restart()) {
		t.Error("still unhealthy after a quiet hold time")
	}
	clk.t = clk.t.Add(time.Hour)
	if !healthy(restart()) {
		t.Error("an error counted already made the function unhealthy after a restart")
	}
	// The counters were reset (the function was removed and came back):
	// a new baseline, not a fault.
	set(0)
	if !healthy(restart()) {
		t.Error("reset counters made the function unhealthy")
	}
	set(1)
	if healthy(restart()) {
		t.Error("an error after the counters were reset was not seen")
	}

	// A state file that cannot be parsed is reported, and the checker
	// starts afresh.
	if err := os.WriteFile(stateFile, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, errs := restart().Check([]health.Function{fn}, false)
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), stateFile) {
		t.Errorf("errors %v, want one naming %s", errs, stateFile)
	}
	entries, err := os.ReadDir(filepath.Dir(stateFile))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Errorf("state directory holds %v, want only the state file", entries)
	}
}
