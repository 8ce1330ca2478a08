// Command vmtest runs inside the test VM that test/vm/run.sh boots. It drives
// the project's binding code (package vfio) against the real kernel's
// vfio-pci, and checks what the kernel does along the way.
//
// It prints one line per check, "OK: ..." or "FAIL: ...", informational
// "INFO: ..." lines, and last "VFIO-TEST-RESULT: PASS" or
// "VFIO-TEST-RESULT: FAIL". It exits 0 on pass and 1 on failure; /init turns
// that into QEMU's exit status.
//
// Devices are found by the shape of their IOMMU group, not by address, so a
// different firmware (which numbers buses differently) does not break it.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// suite collects the verdict of the checks.
type suite struct {
	fs      *pci.FS
	devRoot string
	verbose bool
	failed  int
	passed  int
	start   time.Time
}

func (s *suite) ok(format string, a ...any) {
	s.passed++
	fmt.Printf("OK: "+format+"\n", a...)
}

func (s *suite) fail(format string, a ...any) {
	s.failed++
	fmt.Printf("FAIL: "+format+"\n", a...)
}

// check records a pass when err is nil, a failure otherwise.
func (s *suite) check(err error, format string, a ...any) bool {
	if err != nil {
		s.fail(format+": %v", append(a, err)...)
		return false
	}
	s.ok(format, a...)
	return true
}

func (s *suite) info(format string, a ...any) {
	fmt.Printf("INFO: "+format+"\n", a...)
}

func (s *suite) debugf(format string, a ...any) {
	if s.verbose {
		fmt.Printf("DEBUG: "+format+"\n", a...)
	}
}

// section prints a header with the time since the start.
func (s *suite) section(name string) {
	fmt.Printf("--- [%5.2fs] %s\n", time.Since(s.start).Seconds(), name)
}

func main() {
	sysRoot := flag.String("sys", "/sys", "sysfs root")
	devRoot := flag.String("dev", "/dev", "dev root")
	verbose := flag.Bool("verbose", false, "print DEBUG lines (every sysfs write)")
	flag.Parse()

	s := &suite{devRoot: *devRoot, verbose: *verbose, start: time.Now()}
	if err := s.run(*sysRoot); err != nil {
		s.fail("%v", err)
	}
	fmt.Printf("INFO: %d checks passed, %d failed, %.1fs\n", s.passed, s.failed, time.Since(s.start).Seconds())
	if s.failed > 0 || s.passed == 0 {
		fmt.Println("VFIO-TEST-RESULT: FAIL")
		os.Exit(1)
	}
	fmt.Println("VFIO-TEST-RESULT: PASS")
}

func (s *suite) run(sysRoot string) error {
	fs, err := pci.NewFS(sysRoot)
	if err != nil {
		return err
	}
	s.fs = fs
	s.section("topology")
	topo, err := s.discover()
	if err != nil {
		return err
	}
	for _, c := range checks {
		s.section(c.name)
		c.run(s, topo)
	}
	s.section("final state")
	s.checkFinalState(topo)
	return nil
}

// check is one named block of checks.
type checkFunc struct {
	name string
	run  func(*suite, *topology)
}

// checks run in order; each leaves every device as it found it. The raw
// kernel checks come first: when they fail, the kernel (or the VM layout)
// is not what the binder checks assume.
var checks = []checkFunc{
	{"kernel behaviour (raw sysfs, multifunction group)", (*suite).kernelFacts},
	{"binder: single-device group", (*suite).binderSingle},
	{"binder: shared groups", (*suite).binderShared},
	{"binder: a member without a driver", (*suite).binderNoDriver},
	{"binder: a member already on vfio-pci", (*suite).binderPreBound},
	{"binder: failure half way, rollback", (*suite).binderRollback},
	{"binder: a member left out of Bind", (*suite).binderGroupCheck},
	{"binder: an unbind that blocks while the device is open", (*suite).binderBlockedUnbind},
	{"binder: a function removed between Bind and Restore", (*suite).binderRemoved},
	{"kernel behaviour: SR-IOV (nvme PF)", (*suite).sriovFacts},
}

func addrs(as []pci.Address) string {
	ss := make([]string, len(as))
	for i, a := range as {
		ss[i] = a.String()
	}
	return strings.Join(ss, " ")
}
