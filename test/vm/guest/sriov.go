package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// sriovFacts pins down SR-IOV on the emulated NVMe controller (QEMU 7.2 has
// no igb; its nvme device has SR-IOV): sriov_drivers_autoprobe=0 keeps new
// VFs driverless, vfio-pci refuses the PF while VFs are enabled although
// drivers_probe succeeds, and the Binder reports that refusal at once. The
// nvme driver leaves SR-IOV enabled when it is unbound (it does not call
// pci_disable_sriov), so the VFs stay until sriov_numvfs is set to 0.
func (s *suite) sriovFacts(t *topology) {
	var pf *pci.Device
	for _, d := range t.devices {
		if d.SRIOVTotalVFs > 0 {
			pf = d
		}
	}
	if pf == nil {
		s.fail("sriov: no function with sriov_totalvfs in the VM")
		return
	}
	a, drv := pf.Address, pf.Driver
	s.info("sriov: PF %s on %q, sriov_totalvfs %d", a, drv, pf.SRIOVTotalVFs)
	numVFs := s.fs.DevicePath(a, "sriov_numvfs")
	autoprobe := s.fs.DevicePath(a, "sriov_drivers_autoprobe")
	if got := strings.TrimSpace(s.readRaw(autoprobe)); got != "1" {
		s.fail("sriov: sriov_drivers_autoprobe reads %q, want the default 1", got)
	} else {
		s.ok("sriov: sriov_drivers_autoprobe defaults to 1")
	}
	// Autoprobe off: the VFs' controllers are offline in QEMU, and the
	// nvme driver would wait for them.
	s.wantErrno(s.write(autoprobe, "0"), 0, "sriov: write 0 to sriov_drivers_autoprobe")
	s.wantErrno(s.write(numVFs, "1"), 0, "sriov: enable one VF")
	vfs, _ := filepath.Glob(s.fs.DevicePath(a, "virtfn*"))
	if len(vfs) != 1 {
		s.fail("sriov: %d virtfn links after enabling one VF", len(vfs))
		return
	}
	vfDir, err := filepath.EvalSymlinks(vfs[0])
	if err != nil {
		s.fail("sriov: %v", err)
		return
	}
	vf, err := pci.ParseAddress(filepath.Base(vfDir))
	if err != nil {
		s.fail("sriov: %v", err)
		return
	}
	defer func() {
		// Give the PF back to its driver, then drop the VF: only a
		// bound driver can change sriov_numvfs.
		if st := s.state(a); st.driver != drv {
			_ = s.write(s.overridePath(a), "\n")
			_ = s.write(s.probePath(), a.String())
		}
		s.wantErrno(s.write(numVFs, "0"), 0, "sriov: disable the VFs")
		_ = s.write(autoprobe, "1")
		if _, err := os.Lstat(s.fs.DevicePath(vf)); errors.Is(err, os.ErrNotExist) {
			s.ok("sriov: sriov_numvfs=0 removes the VF")
		} else {
			s.fail("sriov: VF %s still there after sriov_numvfs=0: %v", vf, err)
		}
	}()
	s.wantState(vf, state{"", "(null)"}, "sriov: with sriov_drivers_autoprobe=0 a new VF gets no driver")
	s.wantErrno(s.write(s.probePath(), vf.String()), 0, "sriov: drivers_probe of the VF without an override")
	s.wantState(vf, state{"", "(null)"}, "sriov: drivers_probe binds no VF of a PF with sriov_drivers_autoprobe=0 without an override")

	// The Binder: unbind from nvme works, vfio-pci refuses, the probe
	// counts as refused at once (not after the timeout), and the rollback
	// gives the PF back to nvme.
	grp, err := s.fs.Device(a)
	if err != nil || grp.IOMMUGroup == nil {
		s.fail("sriov: PF group: %v", err)
		return
	}
	b := vfio.NewBinder(s.fs, s.devRoot, vfio.Options{Timeout: time.Hour})
	orig, err := b.Snapshot([]pci.Address{a})
	if err != nil {
		s.fail("sriov: Snapshot: %v", err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err = b.Bind(ctx, *grp.IOMMUGroup, orig, "vfio-pci")
	if errors.Is(err, vfio.ErrProbeRefused) && strings.Contains(err.Error(), "kernel log") {
		s.ok("sriov: Bind of a PF with VFs fails at once with ErrProbeRefused: %v", err)
	} else {
		s.fail("sriov: Bind of a PF with VFs: %v, want ErrProbeRefused", err)
	}
	s.wantState(a, state{drv, "(null)"}, "sriov: the failed Bind gave the PF back to %s", drv)
	if _, err := os.Lstat(s.fs.DevicePath(vf)); err == nil {
		s.ok("sriov: the VF survived the PF's unbind from %s (the driver leaves SR-IOV enabled)", drv)
	} else {
		s.info("sriov: the VF went with the PF's unbind from %s: %v", drv, err)
	}
	if log := kernelLog(); strings.Contains(log, a.String()+": Cannot bind to PF with SR-IOV enabled") {
		s.ok("sriov: the kernel log says vfio-pci cannot bind to a PF with SR-IOV enabled")
	} else {
		s.fail("sriov: no \"Cannot bind to PF with SR-IOV enabled\" for %s in the kernel log", a)
	}

	// Raw: with the PF driverless and VFs enabled, drivers_probe for
	// vfio-pci succeeds and binds nothing; bind fails with EBUSY.
	s.wantErrno(s.write(s.overridePath(a), "vfio-pci"), 0, "sriov: driver_override=vfio-pci on the PF")
	s.wantErrno(s.write(s.unbindPath(drv), a.String()), 0, "sriov: unbind the PF from %s", drv)
	s.wantErrno(s.write(s.probePath(), a.String()), 0, "sriov: drivers_probe of the PF with VFs for vfio-pci succeeds")
	s.wantState(a, state{"", "vfio-pci"}, "sriov: ... and leaves the PF without a driver")
	s.wantErrno(s.write(s.bindPath("vfio-pci"), a.String()), syscall.EBUSY, "sriov: vfio-pci/bind of the PF with VFs")
}

// kernelLog is the kernel's message buffer (dmesg).
func kernelLog() string {
	buf := make([]byte, 1<<20)
	n, err := unix.Klogctl(unix.SYSLOG_ACTION_READ_ALL, buf)
	if err != nil {
		return ""
	}
	return string(buf[:n])
}
