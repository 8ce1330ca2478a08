package pcitest

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// AERFatalNames are the lines of aer_dev_fatal before the total, in the
// order Linux 6.x prints them (aer_uncorrectable_error_string).
var AERFatalNames = []string{
	"Undefined", "DLP", "SDES", "TLP", "FCP", "CmpltTO", "CmpltAbrt", "UnxCmplt", "RxOF",
	"MalfTLP", "ECRC", "UnsupReq", "ACSViol", "UncorrIntErr", "BlockedTLP", "AtomicOpBlocked",
	"TLPBlockedErr", "PoisonTLPBlocked",
}

// AERFatal renders aer_dev_fatal as the kernel prints it: one "NAME COUNT"
// line per error type, then TOTAL_ERR_FATAL. counts maps names to counts;
// the total is their sum.
func AERFatal(counts map[string]uint64) string {
	var b strings.Builder
	var total uint64
	for _, name := range AERFatalNames {
		fmt.Fprintf(&b, "%s %d\n", name, counts[name])
		total += counts[name]
	}
	fmt.Fprintf(&b, "TOTAL_ERR_FATAL %d\n", total)
	return b.String()
}

// WriteDeviceFile writes a file in the device directory of addr, e.g.
// "aer_dev_fatal", "reset_method" or "config", replacing its content.
func (t *Tree) WriteDeviceFile(addr, name, content string) error {
	if strings.Contains(name, "/") {
		return fmt.Errorf("device file %q: not a file name", name)
	}
	dir, err := t.DevicePath(addr)
	if err != nil {
		return err
	}
	return os.WriteFile(t.path(dir+"/"+name), []byte(content), 0o644)
}

// RemoveDeviceFile removes a file from the device directory of addr; an
// absent file is no error.
func (t *Tree) RemoveDeviceFile(addr, name string) error {
	dir, err := t.DevicePath(addr)
	if err != nil {
		return err
	}
	if err := os.Remove(t.path(dir + "/" + name)); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// Remove takes a function off the bus as a hot removal does: its driver
// binding, its IOMMU group entry (and the group when it was the last
// member), its bus/pci/devices link and its directory go away.
func (t *Tree) Remove(addr string) error {
	a, err := pci.ParseAddress(addr)
	if err != nil {
		return err
	}
	dir, err := t.DevicePath(a.String())
	if err != nil {
		return err
	}
	if err := t.Unbind(addr); err != nil {
		return err
	}
	if target, err := os.Readlink(t.path(dir + "/iommu_group")); err == nil {
		group := path.Clean(path.Join(dir, target))
		if err := os.Remove(t.path(group + "/devices/" + addr)); err != nil && !os.IsNotExist(err) {
			return err
		}
		if left, err := os.ReadDir(t.path(group + "/devices")); err == nil && len(left) == 0 {
			if err := os.RemoveAll(t.path(group)); err != nil {
				return err
			}
		}
	}
	if err := os.Remove(t.path(pci.BusDevicesDir + "/" + addr)); err != nil {
		return err
	}
	return os.RemoveAll(filepath.Join(t.Root, filepath.FromSlash(dir)))
}
