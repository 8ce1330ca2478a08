package vfio

import (
	"bufio"
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
