// Package health judges, from what sysfs shows, whether the PCI functions
// the driver offers or has prepared still work, and says so in the two
// forms Kubernetes reads: device taints in the ResourceSlices (so that the
// scheduler stops handing out a bad function and the eviction controller
// moves pods off a gone one) and per-device health for the kubelet
// (KEP-4680, shown in the pod's status).
package health

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	resourceapi "k8s.io/api/resource/v1"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// Taint key names, below the driver name ("vfio.dra.dev/unhealthy"). They
// are contracts: users write tolerations for them.
const (
	// KeyGone (effect NoExecute) marks a function that is no longer on the
	// PCI bus while a claim still holds it: pods using it are evicted.
	KeyGone = "gone"
	// KeyUnhealthy (effect NoSchedule) marks a function that is there but
	// not working; the value names the first Reason.
	KeyUnhealthy = "unhealthy"
	// KeyNoReset (effect None, informational) marks a function the kernel
	// cannot reset, so one user's state may reach the next.
	KeyNoReset = "no-reset"
)

// TaintKey returns the full taint key of name for the driver driverName.
func TaintKey(driverName, name string) string { return driverName + "/" + name }

// Reason is why a function is unhealthy; it is the value of the unhealthy
// taint, so it is a label value.
type Reason string

const (
	// ReasonGone: the function disappeared from sysfs.
	ReasonGone Reason = "gone"
	// ReasonOffBus: its config space reads all ones.
	ReasonOffBus Reason = "off-bus"
	// ReasonFatalAER: its fatal AER counter grew.
	ReasonFatalAER Reason = "aer-fatal"
	// ReasonDriverChanged: a claim bound it to vfio and another driver (or
	// none) has it now.
	ReasonDriverChanged Reason = "driver-changed"
)

// Problem is one reason a function is unhealthy.
type Problem struct {
	Reason  Reason
	Message string
}

// Status is the verdict on one function (or, merged, on one device and the
// functions that move with it).
type Status struct {
	Problems []Problem
	// NoReset is true when the kernel offers no reset method for the
	// function. It does not make the function unhealthy.
	NoReset bool
	// NoResetMessage says which function cannot be reset.
	NoResetMessage string
}

// Healthy reports whether there is no problem.
func (s Status) Healthy() bool { return len(s.Problems) == 0 }

// Gone reports whether the function is no longer on the bus.
func (s Status) Gone() bool {
	return slices.ContainsFunc(s.Problems, func(p Problem) bool { return p.Reason == ReasonGone })
}

// Message joins the problems (and the missing reset) into one line for the
// kubelet.
func (s Status) Message() string {
	var parts []string
	for _, p := range s.Problems {
		parts = append(parts, p.Message)
	}
	if s.NoReset {
		parts = append(parts, s.NoResetMessage)
	}
	return strings.Join(parts, "; ")
}

// Merge adds the verdict on another function of the same device (a member
// of its IOMMU group that moved with it).
func (s Status) Merge(o Status) Status {
	s.Problems = append(slices.Clone(s.Problems), o.Problems...)
	if o.NoReset && !s.NoReset {
		s.NoReset, s.NoResetMessage = true, o.NoResetMessage
	}
	return s
}

// Taints returns the device taints for s, at most one per key, in a fixed
// order so that an unchanged verdict publishes nothing new. TimeAdded is
// left to the API server.
func (s Status) Taints(driverName string) []resourceapi.DeviceTaint {
	var out []resourceapi.DeviceTaint
	if s.Gone() {
		// A function that is gone cannot serve the pod any more: evict.
		out = append(out, resourceapi.DeviceTaint{Key: TaintKey(driverName, KeyGone), Effect: resourceapi.DeviceTaintEffectNoExecute})
	} else if len(s.Problems) > 0 {
		// Still there but failing: keep new claims away, and leave it to
		// the user (who sees the health in the pod status) whether a
		// running VM can live with it.
		out = append(out, resourceapi.DeviceTaint{Key: TaintKey(driverName, KeyUnhealthy), Value: string(s.Problems[0].Reason), Effect: resourceapi.DeviceTaintEffectNoSchedule})
	}
	if s.NoReset {
		// Informational: such functions are used, e.g. by one tenant for
		// good, but users who hand them on can select on the taint.
		out = append(out, resourceapi.DeviceTaint{Key: TaintKey(driverName, KeyNoReset), Effect: resourceapi.DeviceTaintEffectNone})
	}
	return out
}

// Function is one PCI function to judge.
type Function struct {
	Address pci.Address
	// BoundTo is the vfio driver a prepared claim bound the function to;
	// "" when no claim holds it.
	BoundTo string
}

// Options tune a Checker.
type Options struct {
	// AERHold is how long a function stays unhealthy after its fatal AER
	// counter last grew; zero selects DefaultAERHold.
	AERHold time.Duration
	// Now is the clock; nil selects time.Now.
	Now func() time.Time
	// StateFile, when set, keeps the fatal AER counts across restarts
	// (written atomically, mode 0600, when they change): a count that grew
	// while the plugin was down is then a fault, one already counted is
	// not.
	StateFile string
	// StateReadOnly reads StateFile but never writes it: another process
	// (the plugin) owns it.
	StateReadOnly bool
}

// DefaultAERHold keeps a function that reported a fatal PCIe error
// unhealthy long enough to be seen and for the kernel's recovery (a link
// reset) to prove itself.
const DefaultAERHold = 10 * time.Minute

// Checker judges functions and remembers what it needs between checks:
// the fatal AER counts it saw first (a counter that was already non-zero
// when the plugin started is history, not news) and the verdicts of the
// checks that touch the device.
type Checker struct {
	fs        *pci.FS
	hold      time.Duration
	now       func() time.Time
	stateFile string
	readOnly  bool

	mu sync.Mutex
	// aer is the fatal AER count of each function as first seen, and when
	// it last grew.
	aer map[pci.Address]*aerState
	// offBus and noReset are the verdicts of the last deep check.
	offBus  map[pci.Address]bool
	noReset map[pci.Address]bool
	// loaded is set once the state file was read; saved is what was last
	// written to it.
	loaded bool
	saved  map[string]stateFunction
}

type aerState struct {
	baseline, last uint64
	grewAt         time.Time
}

// NewChecker returns a Checker reading below fs.
func NewChecker(fs *pci.FS, opts Options) *Checker {
	c := &Checker{
		fs: fs, hold: opts.AERHold, now: opts.Now, stateFile: opts.StateFile, readOnly: opts.StateReadOnly,
		aer: map[pci.Address]*aerState{}, offBus: map[pci.Address]bool{}, noReset: map[pci.Address]bool{},
	}
	if c.hold <= 0 {
		c.hold = DefaultAERHold
	}
	if c.now == nil {
		c.now = time.Now
	}
	return c
}

// Check judges fns. Without deep it reads only what the kernel keeps in
// memory (the device link, the driver link, the AER counters), which is
// cheap enough for a short interval; deep also reads config space, which
// reaches the hardware and resumes a function in D3cold, and looks for
// reset methods. Between deep checks their last verdicts stand.
//
// Attributes that cannot be read or parsed are returned as errors and do
// not make a function unhealthy: the driver does not guess.
func (c *Checker) Check(fns []Function, deep bool) (map[pci.Address]Status, []error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	var errs []error
	if c.stateFile != "" && !c.loaded {
		c.loaded = true
		if err := c.loadState(); err != nil {
			errs = append(errs, fmt.Errorf("%w; fatal AER counts are judged from now on", err))
		}
	}
	resetsShown := false
	if deep {
		var err error
		if resetsShown, err = c.kernelShowsResets(); err != nil {
			errs = append(errs, err)
		}
	}
	out := make(map[pci.Address]Status, len(fns))
	seen := map[pci.Address]bool{}
	for _, fn := range fns {
		seen[fn.Address] = true
		st, err := c.check(fn, deep, resetsShown, now)
		if err != nil {
			errs = append(errs, fmt.Errorf("health of PCI device %s: %w", fn.Address, err))
		}
		out[fn.Address] = st
	}
	// Forget functions no longer asked about: one that comes back starts
	// afresh.
	for a := range c.aer {
		if !seen[a] {
			delete(c.aer, a)
		}
	}
	for a := range c.offBus {
		if !seen[a] {
			delete(c.offBus, a)
			delete(c.noReset, a)
		}
	}
	if c.stateFile != "" && !c.readOnly {
		if err := c.saveState(); err != nil {
			errs = append(errs, err)
		}
	}
	return out, errs
}

func (c *Checker) check(fn Function, deep, resetsShown bool, now time.Time) (Status, error) {
	addr := fn.Address
	if _, err := os.Stat(c.fs.DevicePath(addr)); errors.Is(err, fs.ErrNotExist) {
		delete(c.aer, addr)
		return Status{Problems: []Problem{{ReasonGone, fmt.Sprintf("PCI device %s is no longer on the bus (removed or hot-unplugged)", addr)}}}, nil
	} else if err != nil {
		return Status{}, err
	}
	var st Status
	var errs []error
	if deep {
		off, err := c.readsAllOnes(addr)
		if err != nil {
			errs = append(errs, err)
		}
		c.offBus[addr] = off
		nr, err := c.cannotReset(addr, resetsShown)
		if err != nil {
			errs = append(errs, err)
		}
		c.noReset[addr] = nr
	}
	if c.offBus[addr] {
		st.Problems = append(st.Problems, Problem{ReasonOffBus, fmt.Sprintf("config space of PCI device %s reads all ones: it no longer answers (link down, surprise removal or a dead device)", addr)})
	}
	if p, err := c.fatalAER(addr, now); err != nil {
		errs = append(errs, err)
	} else if p != nil {
		st.Problems = append(st.Problems, *p)
	}
	if fn.BoundTo != "" {
		drv, err := c.fs.CurrentDriver(addr)
		switch {
		case err != nil:
			errs = append(errs, err)
		case drv != fn.BoundTo:
			now := "no driver"
			if drv != "" {
				now = "driver " + drv
			}
			st.Problems = append(st.Problems, Problem{ReasonDriverChanged, fmt.Sprintf("PCI device %s was bound to %s for a claim but has %s now", addr, fn.BoundTo, now)})
		}
	}
	if c.noReset[addr] {
		st.NoReset = true
		st.NoResetMessage = fmt.Sprintf("the kernel has no reset method for PCI device %s: state left by one user can reach the next", addr)
	}
	return st, errors.Join(errs...)
}

// readsAllOnes reports whether the vendor and device ID in config space
// read 0xffffffff, which is what a read of a function that no longer
// answers returns. No config file (a fake tree, or an unusual platform)
// reads as fine.
func (c *Checker) readsAllOnes(addr pci.Address) (bool, error) {
	head, err := readHead(c.fs.DevicePath(addr, "config"), 4)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return ConfigReadsAllOnes(head), nil
}

// ConfigReadsAllOnes reports whether the first four bytes of a config
// space read (vendor and device ID) are all ones. Fewer bytes cannot tell.
func ConfigReadsAllOnes(head []byte) bool {
	return len(head) >= 4 && bytes.Equal(head[:4], []byte{0xff, 0xff, 0xff, 0xff})
}

// fatalAER compares the function's fatal AER total with the first one
// seen. A function without the file (no AER capability, or AER handled
// by the firmware) has nothing to say.
func (c *Checker) fatalAER(addr pci.Address, now time.Time) (*Problem, error) {
	content, err := readHead(c.fs.DevicePath(addr, "aer_dev_fatal"), maxAttrSize)
	if errors.Is(err, fs.ErrNotExist) {
		delete(c.aer, addr)
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	total, err := ParseAERTotal(content, "TOTAL_ERR_FATAL")
	if err != nil {
		return nil, fmt.Errorf("aer_dev_fatal: %w", err)
	}
	s := c.aer[addr]
	if s == nil || total < s.last {
		// First sight, or the counters were reset (the function was
		// removed and added again): start from here.
		c.aer[addr] = &aerState{baseline: total, last: total}
		return nil, nil
	}
	if total > s.last {
		s.last, s.grewAt = total, now
	}
	if s.last == s.baseline {
		return nil, nil
	}
	if now.Sub(s.grewAt) >= c.hold {
		// Quiet for the hold time: the function recovered.
		s.baseline = s.last
		return nil, nil
	}
	return &Problem{ReasonFatalAER, fmt.Sprintf("PCI device %s reported %d fatal PCIe error(s) (AER), the last at %s", addr, s.last-s.baseline, s.grewAt.UTC().Format(time.RFC3339))}, nil
}

// ParseAERTotal parses an AER statistics file (aer_dev_fatal,
// aer_dev_nonfatal, aer_dev_correctable): lines of "NAME COUNT", one of
// them the total named totalName, which it returns.
func ParseAERTotal(content []byte, totalName string) (uint64, error) {
	var total uint64
	found := false
	sc := bufio.NewScanner(bytes.NewReader(content))
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" {
			continue
		}
		fields := strings.Fields(text)
		if len(fields) != 2 {
			return 0, fmt.Errorf("line %d: %q is not NAME COUNT", line, text)
		}
		n, err := strconv.ParseUint(fields[1], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("line %d: count %q is not a number", line, fields[1])
		}
		if fields[0] == totalName {
			if found {
				return 0, fmt.Errorf("line %d: %s appears twice", line, totalName)
			}
			total, found = n, true
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	if !found {
		return 0, fmt.Errorf("no %s line", totalName)
	}
	return total, nil
}

// cannotReset reports whether the kernel has no reset method for the
// function. Since Linux 5.15, reset_method lists the methods and is
// absent (like the older reset file) when there is none; it reads empty
// when an administrator turned every method off. On a kernel that shows
// neither file for any function, nothing can be told.
func (c *Checker) cannotReset(addr pci.Address, resetsShown bool) (bool, error) {
	content, err := readHead(c.fs.DevicePath(addr, "reset_method"), maxAttrSize)
	switch {
	case err == nil:
		return len(ParseResetMethods(content)) == 0, nil
	case !errors.Is(err, fs.ErrNotExist):
		return false, err
	}
	if _, err := os.Stat(c.fs.DevicePath(addr, "reset")); err == nil {
		return false, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return false, err
	}
	return resetsShown, nil
}

// ParseResetMethods splits reset_method ("flr bus") into method names.
func ParseResetMethods(content []byte) []string {
	return strings.Fields(string(content))
}

// kernelShowsResets reports whether any PCI function has a reset or
// reset_method file, i.e. whether the absence of both means "no reset".
func (c *Checker) kernelShowsResets() (bool, error) {
	entries, err := os.ReadDir(c.fs.Path(pci.BusDevicesDir))
	if err != nil {
		return false, fmt.Errorf("list PCI devices: %w", err)
	}
	for _, e := range entries {
		for _, f := range []string{"reset_method", "reset"} {
			if _, err := os.Stat(c.fs.Path(pci.BusDevicesDir, e.Name(), f)); err == nil {
				return true, nil
			}
		}
	}
	return false, nil
}

// maxAttrSize bounds attribute reads: sysfs attributes fit in a page.
const maxAttrSize = 4096

// readHead reads at most n bytes of a file with one bounded read.
func readHead(file string, n int) ([]byte, error) {
	fh, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer fh.Close() //nolint:errcheck // opened read-only
	buf := make([]byte, n)
	got, err := io.ReadFull(fh, buf)
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	return buf[:got], nil
}
