package hostview

import (
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strconv"
	"strings"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// Mount is one line of /proc/<pid>/mountinfo.
type Mount struct {
	Major, Minor int
	MountPoint   string
	FSType       string
	Source       string
}

// ParseMountinfo parses proc_pid_mountinfo(5): ID, parent ID,
// major:minor, root, mount point, options, optional fields up to a lone
// "-", file system type, source, super options. Spaces, tabs, newlines and
// backslashes in paths are octal escapes (\040).
func ParseMountinfo(data []byte) ([]Mount, error) {
	var mounts []Mount
	for i, line := range strings.Split(string(data), "\n") {
		if line == "" {
			continue
		}
		f := strings.Split(line, " ")
		sep := -1
		for j := 6; j < len(f); j++ {
			if f[j] == "-" {
				sep = j
				break
			}
		}
		if len(f) < 10 || sep < 0 || sep+3 > len(f) {
			return nil, fmt.Errorf("line %d: %q is not a mountinfo line", i+1, line)
		}
		maj, min, ok := strings.Cut(f[2], ":")
		major, err1 := strconv.Atoi(maj)
		minor, err2 := strconv.Atoi(min)
		if !ok || err1 != nil || err2 != nil || major < 0 || minor < 0 {
			return nil, fmt.Errorf("line %d: %q is not major:minor", i+1, f[2])
		}
		mounts = append(mounts, Mount{
			Major: major, Minor: minor,
			MountPoint: unescape(f[4]), FSType: f[sep+1], Source: unescape(f[sep+2]),
		})
	}
	return mounts, nil
}

// unescape undoes the kernel's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// readMounts marks the functions below every mounted block device. The
// mounts of PID 1 are the host's: the plugin's own mount namespace is a
// container's.
func (v *view) readMounts() {
	file := v.r.procPath("1/mountinfo")
	data, err := readFile(file, maxTableSize)
	if err != nil {
		v.fail("mounted file systems: %v", err)
		return
	}
	mounts, err := ParseMountinfo(data)
	if err != nil {
		v.fail("mounted file systems: %s: %v", file, err)
		return
	}
	for _, m := range mounts {
		var dev string
		switch {
		case m.Major != 0:
			dev, err = v.r.resolve(fmt.Sprintf("dev/block/%d:%d", m.Major, m.Minor))
			if err != nil {
				v.fail("mount %s: block device %d:%d: %v", m.MountPoint, m.Major, m.Minor, err)
				continue
			}
		case m.FSType == "zfs":
			// ZFS keeps its pool's disks open without any sysfs link.
			v.fail("mount %s: ZFS pool %s: sysfs does not show which disks it uses", m.MountPoint, m.Source)
			continue
		case strings.HasPrefix(m.Source, "/dev/"):
			// Btrfs (and others with anonymous device numbers) name
			// their device only in the source.
			if dev, err = v.r.blockByName(path.Base(m.Source)); err != nil || dev == "" {
				continue
			}
		default:
			continue // tmpfs, proc, overlay, network file systems ...
		}
		v.useBlock(dev, m.MountPoint)
	}
	v.readBtrfs()
}

// readBtrfs marks every device of a mounted btrfs file system: a
// multi-device file system names only one of them in mountinfo.
func (v *view) readBtrfs() {
	fsys, err := listDir(v.r.sysPath("fs/btrfs"))
	if err != nil {
		v.fail("btrfs file systems: %v", err)
		return
	}
	for _, uuid := range fsys {
		if !validName(uuid) || uuid == "features" {
			continue
		}
		devs, err := listDir(v.r.sysPath("fs/btrfs/" + uuid + "/devices"))
		if err != nil {
			continue
		}
		for _, d := range devs {
			if !validName(d) {
				continue
			}
			if rel, err := v.r.resolve("fs/btrfs/" + uuid + "/devices/" + d); err == nil {
				v.useBlock(rel, "btrfs "+uuid)
			}
		}
	}
}

// readSwaps marks the disks of active swap partitions. Swap files live on
// a mounted file system, which readMounts covers.
func (v *view) readSwaps() {
	file := v.r.procPath("swaps")
	data, err := readFile(file, maxTableSize)
	if errors.Is(err, fs.ErrNotExist) {
		return // a kernel without swap support
	}
	if err != nil {
		v.fail("swap: %v", err)
		return
	}
	lines := strings.Split(string(data), "\n")
	for _, line := range lines[1:] { // the first line is the header
		f := strings.Fields(line)
		if len(f) < 2 || f[1] != "partition" {
			continue
		}
		name := unescape(f[0])
		dev, err := v.r.blockByName(path.Base(name))
		if err != nil || dev == "" {
			v.fail("swap %s: its block device is not in sysfs", name)
			continue
		}
		v.useBlock(dev, "swap "+name)
	}
}

// readHeldBlockDevices marks disks and partitions that another block
// device is built on (an active LVM volume group, md array, dm-crypt or
// multipath map), mounted or not.
func (v *view) readHeldBlockDevices() {
	names, err := listDir(v.r.sysPath("class/block"))
	if err != nil {
		v.fail("block devices: %v", err)
		return
	}
	for _, name := range names {
		if !validName(name) {
			continue
		}
		holders, err := listDir(v.r.sysPath("class/block/" + name + "/holders"))
		if err != nil || len(holders) == 0 {
			continue
		}
		rel, err := v.r.resolve("class/block/" + name)
		if err != nil {
			continue // vanished
		}
		holder := holders[0]
		if !validName(holder) {
			holder = strconv.Quote(holder)
		} else if top, err := v.r.resolve(rel + "/holders/" + holder); err == nil {
			holder = v.r.blockName(top)
		}
		for fn, leaf := range v.r.blockFunctions(rel, "", 0) {
			v.use(fn, chain(holder, leaf))
		}
	}
}

// useBlock marks the PCI functions below the block device at rel with the
// evidence "<what> (<device> on <leaf>)".
func (v *view) useBlock(rel, what string) {
	top := v.r.blockName(rel)
	for fn, leaf := range v.r.blockFunctions(rel, "", 0) {
		v.use(fn, fmt.Sprintf("%s (%s)", what, chain(top, leaf)))
	}
}

// blockName is the name an administrator knows a block device by: the
// device-mapper name (vg0-root) where there is one.
func (r *Reader) blockName(rel string) string {
	if data, err := readFile(r.sysPath(rel+"/dm/name"), maxAttrSize); err == nil {
		if s := strings.TrimSpace(string(data)); s != "" {
			return s
		}
	}
	return path.Base(rel)
}

// blockByName finds a block device by its kernel name (dm-1) or its
// device-mapper name (vg0-swap); "" when there is none.
func (r *Reader) blockByName(name string) (string, error) {
	if !validName(name) {
		return "", nil
	}
	rel, err := r.resolve("class/block/" + name)
	if err == nil {
		return rel, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	names, err := listDir(r.sysPath("class/block"))
	if err != nil {
		return "", err
	}
	for _, n := range names {
		if !validName(n) || !strings.HasPrefix(n, "dm-") {
			continue
		}
		if rel, err := r.resolve("class/block/" + n); err == nil && r.blockName(rel) == name {
			return rel, nil
		}
	}
	return "", nil
}

// blockFunctions returns the PCI functions a block device is stored on,
// each with the name of the device next to the hardware (the partition or
// disk that a stacked device is built on).
func (r *Reader) blockFunctions(rel, leaf string, depth int) map[pci.Address]string {
	out := map[pci.Address]string{}
	if depth > maxDepth {
		return out
	}
	if leaf == "" {
		leaf = path.Base(rel)
	}
	slaves, _ := listDir(r.sysPath(rel + "/slaves"))
	if len(slaves) > 0 {
		for _, s := range slaves {
			if !validName(s) {
				continue
			}
			sub, err := r.resolve(rel + "/slaves/" + s)
			if err != nil {
				continue
			}
			for fn, l := range r.blockFunctions(sub, s, depth+1) {
				if _, ok := out[fn]; !ok {
					out[fn] = l
				}
			}
		}
		return out
	}
	if exists(r.sysPath(rel + "/partition")) {
		// The whole disk is the parent directory.
		return r.blockFunctions(path.Dir(rel), leaf, depth+1)
	}
	// NVMe multipath: the namespace hangs below its subsystem, whose
	// controllers (nvme0, nvme1 ...) are links to the PCI functions.
	if elems := strings.Split(rel, "/"); len(elems) >= 5 && elems[0] == "devices" && elems[1] == "virtual" && elems[2] == "nvme-subsystem" {
		subsys := strings.Join(elems[:4], "/")
		ctrls, _ := listDir(r.sysPath(subsys))
		for _, c := range ctrls {
			if !strings.HasPrefix(c, "nvme") || !validName(c) {
				continue
			}
			if _, err := strconv.Atoi(strings.TrimPrefix(c, "nvme")); err != nil {
				continue
			}
			if ctrl, err := r.resolve(subsys + "/" + c); err == nil {
				if fn, ok := lastPCI(ctrl); ok {
					out[fn] = leaf
				}
			}
		}
		return out
	}
	if fn, ok := lastPCI(rel); ok {
		out[fn] = leaf
	}
	return out
}
