// Package hostview reads which PCI functions the host is using: the disks
// of mounted file systems and active swap, the network interfaces that carry
// its routes and addresses, its serial console, and the VFIO devices that
// other processes hold open. It reads only files, below a sysfs root and a
// proc root, as Linux shows them, so that a fixture can describe a running
// host and a container can read the host through mounts.
package hostview

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// Size limits of the files read. A node with many pods has thousands of
// mounts; a file larger than its limit makes the view unavailable rather
// than silently cut.
const (
	maxTableSize = 16 << 20 // mountinfo, swaps, routes, addresses
	maxAttrSize  = 4096     // sysfs attributes, comm
	// maxDepth bounds walks through stacked block devices and network
	// interfaces; real stacks are a few levels deep.
	maxDepth = 16
)

// Own names what this driver's own prepared claims hold. Their containers
// open these groups and devices; that is not another user, and what is
// published must not change because of it.
type Own struct {
	Groups    map[int]bool
	Functions map[pci.Address]bool
}

// OwnOf names the groups and functions of the claims in the plugin's
// checkpoint.
func OwnOf(cp *checkpoint.Checkpoint) Own {
	own := Own{Groups: map[int]bool{}, Functions: map[pci.Address]bool{}}
	for _, c := range cp.Claims {
		for _, g := range c.Groups {
			own.Groups[g.Number] = true
			for _, m := range g.Members {
				if a, err := pci.ParseAddress(m.Address); err == nil {
					own.Functions[a] = true
				}
			}
		}
	}
	return own
}

// Reader reads the host view below a sysfs root and a proc root ("/sys" and
// "/proc" on a host).
type Reader struct {
	sys  string
	proc string
}

// New returns a Reader of the host seen through sysfsRoot and procRoot.
func New(sysfsRoot, procRoot string) *Reader {
	return &Reader{sys: sysfsRoot, proc: procRoot}
}

// view collects the result of one read.
type view struct {
	r           *Reader
	inUse       map[pci.Address]string
	unavailable []string
}

// Read returns the functions the host uses, each with the evidence. When a
// part of the view cannot be read at all, Unavailable says why; what could
// be read is still returned. Processes, file descriptors and links that
// vanish while being read are skipped.
func (r *Reader) Read(own Own) *inventory.HostUse {
	return r.read(own, true)
}

// ReadFor is Read for preparing the functions fns. The host's tables
// (mounts, swap, held block devices, network, console) are read as Read
// reads them, one file each. The open files of every process, which cost
// more the more processes the host runs, are only walked when a process
// can hold one of the IOMMU groups of fns through VFIO now (vfioReachable):
// otherwise nothing there can name them.
func (r *Reader) ReadFor(own Own, fns []pci.Address) *inventory.HostUse {
	return r.read(own, r.vfioReachable(fns))
}

// read reads the host's tables and, with holders, the VFIO devices that
// processes hold open.
func (r *Reader) read(own Own, holders bool) *inventory.HostUse {
	v := &view{r: r, inUse: map[pci.Address]string{}}
	v.checkHostPIDNamespace()
	v.readMounts()
	v.readSwaps()
	v.readHeldBlockDevices()
	v.readNetwork()
	v.readConsole()
	if holders {
		v.readVFIOHolders(own)
	}
	return &inventory.HostUse{InUse: v.inUse, Unavailable: strings.Join(v.unavailable, "; ")}
}

// vfioReachable reports whether a process may hold an IOMMU group of fns,
// or a function below one of its members, through VFIO: the kernel has a
// VFIO group device for the group (class/vfio/N), or such a function is
// bound to a VFIO driver (the group node and the device cdevs exist only
// then; when the last function leaves VFIO the kernel detaches the group
// from open group files). Whatever cannot be read counts as reachable.
func (r *Reader) vfioReachable(fns []pci.Address) bool {
	for _, fn := range fns {
		rel, err := r.resolve(pci.BusDevicesDir + "/" + fn.String() + "/iommu_group")
		if errors.Is(err, fs.ErrNotExist) {
			continue // no such function, or no group: the prepare refuses it
		}
		if err != nil {
			return true
		}
		group := path.Base(rel)
		if !validName(group) || exists(r.sysPath("class/vfio/"+group)) || exists(r.sysPath("class/vfio/noiommu-"+group)) {
			return true
		}
		members, err := listDir(r.sysPath(pci.IOMMUGroupDir + "/" + group + "/devices"))
		if err != nil {
			return true
		}
		for _, m := range members {
			dir, err := r.resolve(pci.IOMMUGroupDir + "/" + group + "/devices/" + m)
			if err != nil || r.vfioBelow(dir, 0) {
				return true
			}
		}
	}
	return false
}

// vfioBelow reports whether the function in the device directory dir
// (relative to the sysfs root), or a function below it (behind a bridge,
// or in the PCI domain of a VMD controller), is bound to a VFIO driver.
func (r *Reader) vfioBelow(dir string, depth int) bool {
	if depth > maxDepth {
		return true
	}
	if driver, err := os.Readlink(r.sysPath(dir + "/driver")); err == nil && strings.Contains(path.Base(driver), "vfio") {
		return true
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return true
	}
	entries, err := os.ReadDir(r.sysPath(dir))
	if err != nil {
		return true
	}
	for _, e := range entries {
		name := e.Name()
		if !e.IsDir() {
			continue
		}
		if _, err := pci.ParseAddress(name); err == nil {
			if r.vfioBelow(dir+"/"+name, depth+1) {
				return true
			}
		} else if pcieRoot.MatchString(name) && r.vfioBelow(dir+"/"+name, depth+1) {
			// A PCI domain below an endpoint: a VMD controller's.
			return true
		}
	}
	return false
}

// checkHostPIDNamespace fails the view when the proc root is not the
// host's: kthreadd is PID 2 only in the initial PID namespace. A container's
// own /proc would show the container's mounts and none of the host's
// processes, and everything would look free.
func (v *view) checkHostPIDNamespace() {
	data, err := readFile(v.r.procPath("2/comm"), maxAttrSize)
	if err == nil && strings.TrimSpace(string(data)) == "kthreadd" {
		return
	}
	v.fail("%s is not the host's /proc (PID 2 is not kthreadd): mount the host's /proc or run with hostPID", v.r.proc)
}

// use records evidence for fn; the first evidence found is kept, so that
// the order of the readers decides what is shown.
func (v *view) use(fn pci.Address, evidence string) {
	if _, ok := v.inUse[fn]; !ok {
		v.inUse[fn] = evidence
	}
}

func (v *view) fail(format string, args ...any) {
	v.unavailable = append(v.unavailable, fmt.Sprintf(format, args...))
}

// procPath and sysPath join checked, relative elements below the roots.
func (r *Reader) procPath(rel string) string { return filepath.Join(r.proc, filepath.FromSlash(rel)) }
func (r *Reader) sysPath(rel string) string  { return filepath.Join(r.sys, filepath.FromSlash(rel)) }

// validName reports whether s can be used as one path element: names taken
// from proc files (interfaces, block devices, ttys) must not walk anywhere.
func validName(s string) bool {
	return s != "" && s != "." && s != ".." && len(s) <= 255 &&
		!strings.ContainsAny(s, "/\x00") && strings.TrimSpace(s) == s
}

// readFile reads a whole file, failing when it is larger than limit.
func readFile(file string, limit int64) ([]byte, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close() //nolint:errcheck // opened read-only
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", file, limit)
	}
	return data, nil
}

// resolve follows the sysfs symlink at rel (relative to the sysfs root) and
// returns its target relative to the root. Kernel links are relative and
// stay below the root; anything else is refused.
func (r *Reader) resolve(rel string) (string, error) {
	target, err := os.Readlink(r.sysPath(rel))
	if err != nil {
		return "", err
	}
	if path.IsAbs(target) {
		return "", fmt.Errorf("%s: absolute link %q", r.sysPath(rel), target)
	}
	out := path.Clean(path.Join(path.Dir(rel), target))
	if out == ".." || strings.HasPrefix(out, "../") {
		return "", fmt.Errorf("%s: link %q leaves the sysfs root", r.sysPath(rel), target)
	}
	return out, nil
}

// lastPCI returns the PCI function nearest to the device at rel: the last
// element of the device path that is a PCI address. Serial ports of newer
// kernels sit below port devices named like "0000:00:16.3:0.0", which do
// not parse as addresses.
func lastPCI(rel string) (pci.Address, bool) {
	elems := strings.Split(rel, "/")
	for i := len(elems) - 1; i >= 0; i-- {
		if a, err := pci.ParseAddress(elems[i]); err == nil {
			return a, true
		}
	}
	return pci.Address{}, false
}

// listDir returns the entry names of a directory; a missing directory has
// none.
func listDir(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	names := make([]string, len(entries))
	for i, e := range entries {
		names[i] = e.Name()
	}
	slices.Sort(names)
	return names, nil
}

func exists(file string) bool {
	_, err := os.Lstat(file)
	return err == nil
}

// chain describes a stack for evidence: "vg0-root on nvme0n1p3", or one
// name when the top is the device itself.
func chain(top, leaf string) string {
	if top == leaf {
		return top
	}
	return top + " on " + leaf
}
