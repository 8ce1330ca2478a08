package hostview

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"unicode"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

var (
	groupNode = regexp.MustCompile(`^/dev/vfio/([0-9]{1,9})$`)
	cdevNode  = regexp.MustCompile(`^/dev/vfio/devices/(vfio[0-9]{1,9})$`)
	pidName   = regexp.MustCompile(`^[1-9][0-9]{0,9}$`)
	// pcieRoot names a PCI domain's directory (pci0000:00, pci10000:e0).
	pcieRoot = regexp.MustCompile(`^pci[0-9a-f]{4,8}:[0-9a-f]{2}$`)
)

// holder is a process with a VFIO device open.
type holder struct {
	pid, comm, node string
}

func (h holder) String() string {
	return fmt.Sprintf("held by pid %s (%s) through %s", h.pid, h.comm, h.node)
}

// readVFIOHolders marks the functions whose VFIO group or device another
// process has open: a VM that libvirt or Proxmox started on a function
// bound to vfio-pci, for instance. The file descriptors' links name the
// device node as the process sees it (/dev/vfio/60). Groups and devices of
// own are skipped.
func (v *view) readVFIOHolders(own Own) {
	pids, err := os.ReadDir(v.r.proc)
	if err != nil {
		v.fail("VFIO users: %v", err)
		return
	}
	denied := 0
	var firstDenied error
	for _, e := range pids {
		pid := e.Name()
		if !pidName.MatchString(pid) {
			continue
		}
		fds, err := os.ReadDir(v.r.procPath(pid + "/fd"))
		if errors.Is(err, fs.ErrPermission) {
			denied++
			if firstDenied == nil {
				firstDenied = err
			}
			continue
		}
		if err != nil {
			continue // the process ended, or is a zombie
		}
		comm := ""
		for _, fd := range fds {
			target, err := os.Readlink(v.r.procPath(pid + "/fd/" + fd.Name()))
			if err != nil {
				continue // closed meanwhile, or dangling
			}
			target = strings.TrimSuffix(target, " (deleted)")
			if !strings.HasPrefix(target, "/dev/vfio/") {
				continue
			}
			if comm == "" {
				comm = v.r.comm(pid)
			}
			h := holder{pid: pid, comm: comm, node: target}
			if m := groupNode.FindStringSubmatch(target); m != nil {
				group, _ := strconv.Atoi(m[1])
				if own.Groups[group] {
					continue
				}
				members, err := listDir(v.r.sysPath("kernel/iommu_groups/" + m[1] + "/devices"))
				if err != nil {
					continue
				}
				for _, name := range members {
					if fn, err := pci.ParseAddress(name); err == nil {
						v.use(fn, h.String())
					}
				}
			} else if m := cdevNode.FindStringSubmatch(target); m != nil {
				if fn, ok := v.r.cdevFunction(m[1]); ok && !own.Functions[fn] {
					v.use(fn, h.String())
				}
			}
		}
	}
	if denied > 0 {
		v.fail("VFIO users: the open files of %d processes cannot be read (%v): the host view needs CAP_SYS_PTRACE and the host's /proc", denied, firstDenied)
	}
}

// comm returns a process's command name, "?" when it cannot be read.
func (r *Reader) comm(pid string) string {
	data, err := readFile(r.procPath(pid+"/comm"), maxAttrSize)
	if err != nil {
		return "?"
	}
	s := strings.TrimSpace(string(data))
	if s == "" {
		return "?"
	}
	if strings.IndexFunc(s, func(r rune) bool { return !unicode.IsGraphic(r) }) >= 0 {
		return strconv.Quote(s)
	}
	return s
}

// cdevFunction returns the PCI function of a VFIO device cdev (vfio3):
// class/vfio-dev/vfio3, or the function's vfio-dev/vfio3 directory where
// the class link is missing.
func (r *Reader) cdevFunction(cdev string) (pci.Address, bool) {
	if rel, err := r.resolve("class/vfio-dev/" + cdev); err == nil {
		return lastPCI(rel)
	}
	matches, _ := filepath.Glob(filepath.Join(r.sys, pci.BusDevicesDir, "*", "vfio-dev", cdev))
	for _, m := range matches {
		if fn, err := pci.ParseAddress(filepath.Base(filepath.Dir(filepath.Dir(m)))); err == nil {
			return fn, true
		}
	}
	return pci.Address{}, false
}
