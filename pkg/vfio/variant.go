package vfio

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path"
	"strings"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// VariantDriver returns the vfio variant driver (e.g. mlx5_vfio_pci) that
// the kernel's modules.alias file names for a function, or "" when only
// plain vfio-pci fits. Variant drivers announce themselves with
// "vfio_pci:" aliases that match the device's modalias; the most specific
// alias wins, as in modprobe. The driver must be loaded: the plugin never
// loads kernel modules itself.
func VariantDriver(fs *pci.FS, addr pci.Address, modulesAlias string) (string, error) {
	data, err := os.ReadFile(fs.DevicePath(addr, "modalias"))
	if err != nil {
		return "", fmt.Errorf("PCI device %s: %w", addr, err)
	}
	modalias, ok := strings.CutPrefix(strings.TrimSpace(string(data)), "pci:")
	if !ok {
		return "", fmt.Errorf("PCI device %s: modalias %q is not a PCI modalias", addr, data)
	}
	want := "vfio_pci:" + modalias

	f, err := os.Open(modulesAlias)
	if err != nil {
		return "", fmt.Errorf("find vfio variant driver for %s: %w", addr, err)
	}
	defer f.Close() //nolint:errcheck // opened read-only
	best, bestWild := "", -1
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 3 || fields[0] != "alias" || !strings.HasPrefix(fields[1], "vfio_pci:") {
			continue
		}
		module := fields[2]
		if module == "vfio_pci" {
			continue
		}
		if ok, _ := path.Match(fields[1], want); !ok {
			continue
		}
		// Fewer wildcards means a more specific match.
		wild := strings.Count(fields[1], "*")
		if bestWild < 0 || wild < bestWild {
			best, bestWild = module, wild
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read %s: %w", modulesAlias, err)
	}
	if best == "" {
		return "", nil
	}
	// Module names use underscores; some drivers register with dashes.
	for _, name := range []string{best, strings.ReplaceAll(best, "_", "-")} {
		if fs.DriverLoaded(name) {
			return name, nil
		}
	}
	return "", fmt.Errorf("PCI device %s: vfio variant driver %s: %w (load the module first)", addr, best, ErrDriverNotLoaded)
}

// MemberTargets resolves driver "auto" for each function of an IOMMU group
// on its own: a member gets the variant driver that modules.alias names
// for its own modalias, or vfio-pci when none does. A variant that serves
// only VFs (mlx5_vfio_pci) or only the GPU (nvgrace_gpu_vfio_pci) is thus
// never forced onto the PF or onto the GPU's audio function, whose probe
// would fail.
func MemberTargets(fs *pci.FS, members []pci.Address, modulesAlias string) (map[pci.Address]string, error) {
	out := make(map[pci.Address]string, len(members))
	for _, a := range members {
		variant, err := VariantDriver(fs, a, modulesAlias)
		if err != nil {
			return nil, err
		}
		if variant == "" {
			variant = "vfio-pci"
		}
		out[a] = variant
	}
	return out, nil
}

// ErrNotVFIODriver means a configured driver is not vfio-pci or a vfio
// variant driver: binding a group to it would hand the devices back to the
// host instead of to VFIO.
var ErrNotVFIODriver = errors.New("not a VFIO driver")

// CheckDriver accepts name, the driver a DeviceClass configures, only when
// it is vfio-pci or a vfio variant driver, never a host driver: a name
// ending in _vfio_pci (every variant in Linux: mlx5_vfio_pci,
// hisi_acc_vfio_pci, pds_vfio_pci, virtio_vfio_pci, nvgrace_gpu_vfio_pci,
// qat_vfio_pci), or one that a line of modulesAlias (the
// running kernel's modules.alias; "" for none) maps to a module named
// *vfio*pci*, or that is such a module itself. Dashes and underscores are
// the same, as in module names.
func CheckDriver(name, modulesAlias string) error {
	norm := moduleName(name)
	if norm == "vfio_pci" || strings.HasSuffix(norm, "_vfio_pci") {
		return nil
	}
	why := "its name does not end in _vfio_pci and no modules.alias is configured"
	if modulesAlias != "" {
		f, err := os.Open(modulesAlias)
		if err != nil {
			return fmt.Errorf("check driver %s: %w", name, err)
		}
		defer f.Close() //nolint:errcheck // opened read-only
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) != 3 || fields[0] != "alias" {
				continue
			}
			module := moduleName(fields[2])
			if ok, _ := path.Match("*vfio*pci*", module); !ok {
				continue
			}
			if module == norm || moduleName(fields[1]) == norm {
				return nil
			}
		}
		if err := sc.Err(); err != nil {
			return fmt.Errorf("check driver %s: read %s: %w", name, modulesAlias, err)
		}
		why = fmt.Sprintf("its name does not end in _vfio_pci and %s maps it to no *vfio*pci* module", modulesAlias)
	}
	return fmt.Errorf("driver %q: %w: %s; a host driver would take the devices back from VFIO", name, ErrNotVFIODriver, why)
}

// moduleName is a module or driver name as modprobe compares them.
func moduleName(s string) string {
	return strings.ReplaceAll(s, "-", "_")
}
