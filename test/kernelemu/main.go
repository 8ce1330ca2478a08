// Command kernelemu reacts to writes to the PCI driver files of a fake
// sysfs tree (laid out by pcitest) as Linux would, so the real plugin binary
// can bind and unbind devices in end-to-end tests without hardware. It runs
// until SIGTERM or SIGINT. It prints "ready" on stdout once writes are seen,
// and every error the kernel would have returned to a writer on stderr.
//
//	kernelemu --sysfs-root /tmp/e2e/sys --dev-root /tmp/e2e/dev [--native 0000:01:00.0=e1000e] [--busy 0000:82:00.0]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
)

// natives collects --native ADDR=DRIVER flags.
type natives map[string]string

func (n natives) String() string { return fmt.Sprint(map[string]string(n)) }

func (n natives) Set(s string) error {
	addr, driver, ok := strings.Cut(s, "=")
	if !ok || addr == "" {
		return fmt.Errorf("want ADDRESS=DRIVER, got %q", s)
	}
	n[addr] = driver
	return nil
}

// addrList collects repeated ADDRESS flags.
type addrList []string

func (a *addrList) String() string { return strings.Join(*a, ",") }

func (a *addrList) Set(s string) error {
	if s == "" {
		return fmt.Errorf("want a PCI address")
	}
	*a = append(*a, s)
	return nil
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kernelemu:", err)
		os.Exit(1)
	}
}

func run() error {
	sysfsRoot := flag.String("sysfs-root", "", "root of the fake sysfs tree (required)")
	devRoot := flag.String("dev-root", "", "directory that stands for /dev (required)")
	native := natives{}
	flag.Var(native, "native", "ADDRESS=DRIVER: the driver drivers_probe picks for a function without override "+
		"(default: the driver bound at start, unless it is a VFIO driver); repeatable")
	var busy addrList
	flag.Var(&busy, "busy", "ADDRESS: the host keeps using the function, so every unbind from its driver fails with EBUSY; repeatable")
	deviceCDev := flag.Bool("device-cdev", true, "emulate Linux 6.6+ with VFIO device cdevs (/dev/vfio/devices/vfioN); false emulates 6.1-6.5")
	flag.Parse()
	if *sysfsRoot == "" || *devRoot == "" || flag.NArg() > 0 {
		flag.Usage()
		return fmt.Errorf("--sysfs-root and --dev-root are required, and nothing else")
	}

	k, err := pcitest.NewKernelWithOptions(*sysfsRoot, *devRoot, pcitest.KernelOptions{DeviceCDev: *deviceCDev})
	if err != nil {
		return err
	}
	for addr, driver := range native {
		k.SetNative(addr, driver)
	}
	// Armed again after each failure it caused: a busy function stays busy.
	armBusy := func() {
		for _, addr := range busy {
			k.FailNext(pcitest.OpUnbind, addr, syscall.EBUSY)
		}
	}
	armBusy()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	done := make(chan error, 1)
	go func() { done <- k.Watch(ctx) }()

	reported := 0
	report := func() {
		errs := k.Errors()
		for _, err := range errs[reported:] {
			fmt.Fprintln(os.Stderr, "kernelemu:", err)
		}
		if len(errs) > reported {
			armBusy()
		}
		reported = len(errs)
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	ready := k.Ready()
	for {
		select {
		case <-ready:
			fmt.Println("ready")
			ready = nil
		case <-tick.C:
			report()
		case err := <-done:
			report()
			return err
		}
	}
}
