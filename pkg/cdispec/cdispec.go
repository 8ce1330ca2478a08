// Package cdispec builds and writes one transient CDI spec per prepared
// ResourceClaim. The container runtime reads the spec when it creates a
// container and injects the VFIO device nodes and environment it describes.
package cdispec

import (
	"errors"
	"fmt"
	"maps"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"tags.cncf.io/container-device-interface/pkg/cdi"
	"tags.cncf.io/container-device-interface/pkg/parser"
	specs "tags.cncf.io/container-device-interface/specs-go"
)

// Class is the CDI device class of every device this driver hands out.
const Class = "vfio"

// containerDevRoot is where the container sees the host's device nodes.
const containerDevRoot = "/dev"

// Names of the environment variables set in every container of a claim.
const (
	// EnvPCIAddresses lists the PCI addresses of all allocated devices.
	EnvPCIAddresses = "VFIO_PCI_ADDRESSES"
	// EnvIOMMUGroups lists the IOMMU group numbers of all allocated devices.
	EnvIOMMUGroups = "VFIO_IOMMU_GROUPS"
	// EnvIOMMUGroupPrefix, followed by a group number, lists every function
	// of that group that was bound.
	EnvIOMMUGroupPrefix = "VFIO_IOMMU_GROUP_"
	// EnvDriversSuffix follows EnvIOMMUGroupPrefix and a group number: the
	// variable lists "<address>=<driver>" for every function of the group
	// that was bound, e.g. a VF on mlx5_vfio_pci next to its PF on
	// vfio-pci.
	EnvDriversSuffix = "_DRIVERS"
)

// Vendor returns the CDI vendor of a driver: "k8s." + driverName.
func Vendor(driverName string) string {
	return "k8s." + driverName
}

// SpecFileName returns the name of the spec file for a claim, e.g.
// "k8s.vfio.dra.dev-vfio_<claimUID>.json".
func SpecFileName(driverName, claimUID string) string {
	return cdi.GenerateTransientSpecName(Vendor(driverName), Class, claimUID) + ".json"
}

// ClaimOfSpecFile returns the claim UID of a file name that SpecFileName
// made for driverName, and false for any other name.
func ClaimOfSpecFile(driverName, name string) (string, bool) {
	prefix := strings.TrimSuffix(SpecFileName(driverName, ""), ".json")
	uid, ok := strings.CutPrefix(name, prefix)
	if !ok {
		return "", false
	}
	uid, ok = strings.CutSuffix(uid, ".json")
	return uid, ok && validUID(uid) == nil
}

// EnvName returns the variable name for a per-request list: the prefix, "_",
// and the request name upper-cased with every character other than an ASCII
// letter or digit replaced by "_".
func EnvName(prefix, request string) string {
	var b strings.Builder
	b.Grow(len(prefix) + 1 + len(request))
	b.WriteString(prefix)
	b.WriteByte('_')
	for _, r := range request {
		switch {
		case r >= 'a' && r <= 'z':
			b.WriteRune(r - 'a' + 'A')
		case r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	return b.String()
}

// Group is one IOMMU group handed to the container.
type Group struct {
	Number int
	// Addresses are the PCI addresses of every function of the group that
	// was bound.
	Addresses []string
	// Drivers maps each of Addresses to the VFIO driver it was bound to;
	// optional.
	Drivers map[string]string
	// DeviceNodes are the host paths to give the container for this group:
	// legacy "<hostDevRoot>/vfio/<N>" or, for iommufd,
	// "<hostDevRoot>/vfio/devices/vfioX" per function. The container path
	// is the host path with hostDevRoot replaced by "/dev".
	DeviceNodes []string
}

// Device is one allocated device of the claim.
type Device struct {
	// Request is the request name from the allocation result, already
	// stripped of a subrequest.
	Request string
	// Name is the DRA device name, e.g. "pci-0000-3b-00-0".
	Name       string
	PCIAddress string
	Group      Group
}

// Claim is what the spec of one ResourceClaim is built from.
type Claim struct {
	UID string
	// HostDevRoot is the host's /dev as the paths in the spec name it: "/dev"
	// in production, a temp dir in tests.
	HostDevRoot string
	// CommonNodes are host paths every container of the claim gets, e.g.
	// "<hostDevRoot>/vfio/vfio" or "<hostDevRoot>/iommu".
	CommonNodes []string
	Devices     []Device
}

// Spec builds the CDI spec of a claim and returns it with, for each
// Device.Name, the CDI device IDs to return in the prepare result. It is pure
// and deterministic: devices, nodes and environment variables are sorted.
//
// The spec-wide edits give every container the CommonNodes and the variables
// VFIO_PCI_ADDRESSES, VFIO_IOMMU_GROUPS, VFIO_PCI_ADDRESSES_<REQ>,
// VFIO_IOMMU_GROUPS_<REQ> (see EnvName) and VFIO_IOMMU_GROUP_<N>; each
// Device becomes a CDI device "<claimUID>-<name>" carrying its group's nodes.
func Spec(driverName string, c Claim) (*specs.Spec, map[string][]string, error) {
	vendor := Vendor(driverName)
	if err := parser.ValidateVendorName(vendor); err != nil {
		return nil, nil, fmt.Errorf("driver name %q: %w", driverName, err)
	}
	if err := validUID(c.UID); err != nil {
		return nil, nil, err
	}
	if len(c.Devices) == 0 {
		return nil, nil, fmt.Errorf("claim %s has no devices", c.UID)
	}
	if !filepath.IsAbs(c.HostDevRoot) {
		return nil, nil, fmt.Errorf("claim %s: host dev root %q is not an absolute path", c.UID, c.HostDevRoot)
	}
	devRoot := filepath.Clean(c.HostDevRoot)

	var (
		allAddresses = map[string]struct{}{}
		allGroups    = map[int]struct{}{}
		byRequest    = map[string]*requestEnv{} // key: env suffix
		groups       = map[int]Group{}
		devices      = make([]specs.Device, 0, len(c.Devices))
		ids          = make(map[string][]string, len(c.Devices))
	)
	for _, d := range c.Devices {
		if err := checkDevice(d); err != nil {
			return nil, nil, fmt.Errorf("claim %s: %w", c.UID, err)
		}
		if _, dup := ids[d.Name]; dup {
			return nil, nil, fmt.Errorf("claim %s: device %s listed twice", c.UID, d.Name)
		}
		if seen, ok := groups[d.Group.Number]; ok && !sameGroup(seen, d.Group) {
			return nil, nil, fmt.Errorf("claim %s: device %s: IOMMU group %d differs from the one of another device",
				c.UID, d.Name, d.Group.Number)
		}
		groups[d.Group.Number] = d.Group
		allAddresses[d.PCIAddress] = struct{}{}
		allGroups[d.Group.Number] = struct{}{}

		suffix := EnvName("", d.Request)
		r := byRequest[suffix]
		if r == nil {
			r = &requestEnv{name: d.Request, addresses: map[string]struct{}{}, groups: map[int]struct{}{}}
			byRequest[suffix] = r
		} else if r.name != d.Request {
			return nil, nil, fmt.Errorf("claim %s: requests %q and %q map to the same environment variable suffix %q",
				c.UID, r.name, d.Request, suffix)
		}
		r.addresses[d.PCIAddress] = struct{}{}
		r.groups[d.Group.Number] = struct{}{}

		nodes, err := deviceNodes(devRoot, d.Group.DeviceNodes)
		if err != nil {
			return nil, nil, fmt.Errorf("claim %s: device %s: %w", c.UID, d.Name, err)
		}
		name := c.UID + "-" + d.Name
		if err := parser.ValidateDeviceName(name); err != nil {
			return nil, nil, fmt.Errorf("claim %s: device %s: CDI device name: %w", c.UID, d.Name, err)
		}
		devices = append(devices, specs.Device{
			Name:           name,
			ContainerEdits: specs.ContainerEdits{DeviceNodes: nodes},
		})
		ids[d.Name] = []string{parser.QualifiedName(vendor, Class, name)}
	}
	slices.SortFunc(devices, func(a, b specs.Device) int { return strings.Compare(a.Name, b.Name) })

	env := []string{
		EnvPCIAddresses + "=" + joinSorted(allAddresses),
		EnvIOMMUGroups + "=" + joinInts(allGroups),
	}
	for _, suffix := range slices.Sorted(maps.Keys(byRequest)) {
		r := byRequest[suffix]
		env = append(env,
			EnvPCIAddresses+suffix+"="+joinSorted(r.addresses),
			EnvIOMMUGroups+suffix+"="+joinInts(r.groups),
		)
	}
	for _, n := range slices.Sorted(maps.Keys(groups)) {
		addrs := sortedUnique(groups[n].Addresses)
		env = append(env, EnvIOMMUGroupPrefix+strconv.Itoa(n)+"="+strings.Join(addrs, ","))
		if len(groups[n].Drivers) == 0 {
			continue
		}
		pairs := make([]string, 0, len(addrs))
		for _, a := range addrs {
			drv := groups[n].Drivers[a]
			if drv == "" || strings.ContainsAny(drv, ",=") {
				return nil, nil, fmt.Errorf("claim %s: IOMMU group %d: function %s has no valid driver %q", c.UID, n, a, drv)
			}
			pairs = append(pairs, a+"="+drv)
		}
		env = append(env, EnvIOMMUGroupPrefix+strconv.Itoa(n)+EnvDriversSuffix+"="+strings.Join(pairs, ","))
	}
	slices.Sort(env)

	common, err := deviceNodes(devRoot, c.CommonNodes)
	if err != nil {
		return nil, nil, fmt.Errorf("claim %s: common nodes: %w", c.UID, err)
	}
	spec := &specs.Spec{
		Kind:           vendor + "/" + Class,
		Devices:        devices,
		ContainerEdits: specs.ContainerEdits{Env: env, DeviceNodes: common},
	}
	edits := cdi.ContainerEdits{ContainerEdits: &spec.ContainerEdits}
	if err := edits.Validate(); err != nil {
		return nil, nil, fmt.Errorf("claim %s: %w", c.UID, err)
	}
	version, err := specs.MinimumRequiredVersion(spec)
	if err != nil {
		return nil, nil, fmt.Errorf("claim %s: CDI version: %w", c.UID, err)
	}
	spec.Version = version
	return spec, ids, nil
}

type requestEnv struct {
	name      string
	addresses map[string]struct{}
	groups    map[int]struct{}
}

func checkDevice(d Device) error {
	switch {
	case d.Name == "":
		return errors.New("device without a name")
	case d.Request == "":
		return fmt.Errorf("device %s: no request name", d.Name)
	case d.PCIAddress == "":
		return fmt.Errorf("device %s: no PCI address", d.Name)
	case d.Group.Number < 0:
		return fmt.Errorf("device %s: invalid IOMMU group %d", d.Name, d.Group.Number)
	case len(d.Group.DeviceNodes) == 0:
		return fmt.Errorf("device %s: IOMMU group %d has no device nodes", d.Name, d.Group.Number)
	case !slices.Contains(d.Group.Addresses, d.PCIAddress):
		return fmt.Errorf("device %s: %s is not among the bound functions of IOMMU group %d",
			d.Name, d.PCIAddress, d.Group.Number)
	}
	return nil
}

func sameGroup(a, b Group) bool {
	return slices.Equal(sortedUnique(a.Addresses), sortedUnique(b.Addresses)) &&
		slices.Equal(sortedUnique(a.DeviceNodes), sortedUnique(b.DeviceNodes)) &&
		maps.Equal(a.Drivers, b.Drivers)
}

// deviceNodes maps host paths below devRoot to device nodes whose container
// path is the same path below /dev. The result is sorted and free of
// duplicates.
func deviceNodes(devRoot string, hostPaths []string) ([]*specs.DeviceNode, error) {
	cleaned := make([]string, len(hostPaths))
	for i, p := range hostPaths {
		cleaned[i] = filepath.Clean(p)
	}
	var nodes []*specs.DeviceNode
	for _, host := range sortedUnique(cleaned) {
		rel, err := filepath.Rel(devRoot, host)
		if err != nil || !filepath.IsAbs(host) || rel == "." || rel == ".." ||
			strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
			return nil, fmt.Errorf("device node %s is not below %s", host, devRoot)
		}
		nodes = append(nodes, &specs.DeviceNode{
			Path:     path.Join(containerDevRoot, filepath.ToSlash(rel)),
			HostPath: host,
			// Read and write are all a VFIO user needs; without "m" the
			// container cannot mknod more nodes of the same number. The
			// runtime creates the node before the cgroup rule applies.
			Permissions: "rw",
		})
	}
	return nodes, nil
}

func sortedUnique(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return slices.Compact(out)
}

func joinSorted(set map[string]struct{}) string {
	return strings.Join(slices.Sorted(maps.Keys(set)), ",")
}

func joinInts(set map[int]struct{}) string {
	nums := slices.Sorted(maps.Keys(set))
	s := make([]string, len(nums))
	for i, n := range nums {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}

// Writer writes one transient CDI spec per claim into a directory, through
// the CDI library's cache for that single directory without auto refresh.
type Writer struct {
	dir        string
	driverName string
	cache      *cdi.Cache
}

// NewWriter returns a Writer for the spec directory dir (e.g. /var/run/cdi).
// The CDI vendor is "k8s." + driverName and the class "vfio", so device IDs
// look like "k8s.vfio.dra.dev/vfio=<claimUID>-<device>".
func NewWriter(dir, driverName string) (*Writer, error) {
	if dir == "" {
		return nil, errors.New("CDI spec directory not set")
	}
	if err := parser.ValidateVendorName(Vendor(driverName)); err != nil {
		return nil, fmt.Errorf("driver name %q: %w", driverName, err)
	}
	cache, err := cdi.NewCache(cdi.WithSpecDirs(dir), cdi.WithAutoRefresh(false))
	if err != nil {
		return nil, fmt.Errorf("CDI cache for %s: %w", dir, err)
	}
	return &Writer{dir: dir, driverName: driverName, cache: cache}, nil
}

// WriteClaim builds the claim's spec and writes it atomically (temp file and
// rename, by the CDI library, which also validates it) as JSON under
// SpecFileName. It returns the spec file name and, for each Device.Name, the
// CDI device IDs. Writing the same claim again replaces its spec.
func (w *Writer) WriteClaim(c Claim) (specName string, ids map[string][]string, err error) {
	spec, ids, err := Spec(w.driverName, c)
	if err != nil {
		return "", nil, fmt.Errorf("build CDI spec: %w", err)
	}
	name := SpecFileName(w.driverName, c.UID)
	if err := w.cache.WriteSpec(spec, name); err != nil {
		return "", nil, fmt.Errorf("write CDI spec %s: %w", filepath.Join(w.dir, name), err)
	}
	return name, ids, nil
}

// RemoveClaim removes the claim's spec; a missing spec is not an error.
func (w *Writer) RemoveClaim(claimUID string) error {
	if err := validUID(claimUID); err != nil {
		return fmt.Errorf("remove CDI spec: %w", err)
	}
	name := SpecFileName(w.driverName, claimUID)
	if err := w.cache.RemoveSpec(name); err != nil {
		return fmt.Errorf("remove CDI spec %s: %w", filepath.Join(w.dir, name), err)
	}
	return nil
}

// uidPattern is what a claim UID may look like here: it becomes part of a
// file name, so nothing that could leave the spec directory.
var uidPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

func validUID(uid string) error {
	if uid == "" {
		return errors.New("claim has no UID")
	}
	if !uidPattern.MatchString(uid) {
		return fmt.Errorf("claim UID %q is not a UID", uid)
	}
	return nil
}
