// Command workload is the only program in the image that the real-node e2e
// tests and the demo run in containers (the framework packs it with
// framework.WriteImage). It has no shell and no libc, so it is its own pod
// sandbox and its own tools:
//
//	workload pause              the sandbox's process: waits for SIGTERM and reaps children
//	workload probe DIR...       prints what a VFIO consumer sees (devices, env, metadata) and waits for SIGTERM
//	workload ls DIR             a listing like "ls -l", for kubectl exec
//	workload open PATH...       opens each path read-write and says whether that worked
package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// MetadataDir is where the kubelet mounts the KEP-5304 device metadata of a
// container's claims, as virt-launcher reads it.
const MetadataDir = "/var/run/kubernetes.io/dra-device-attributes"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: workload pause | probe DIR... | ls DIR | open PATH...")
		os.Exit(2)
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "pause":
		pause()
	case "probe":
		if len(args) == 0 {
			args = []string{"/dev/vfio"}
		}
		for _, dir := range args {
			list(dir)
		}
		for _, dir := range args {
			openAll(dir)
		}
		env()
		metadata()
		fmt.Println("== ready")
		waitForSignal()
	case "ls":
		for _, dir := range args {
			list(dir)
		}
	case "open":
		for _, p := range args {
			openOne(p)
		}
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
}

// pause is PID 1 of a pod sandbox: it holds the namespaces and reaps
// orphans until it is told to stop.
func pause() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

func waitForSignal() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
}

// list prints each entry below dir as "ls -l" would, device numbers included:
//
//	crw-rw-rw- 0 0 10, 196 /dev/vfio/vfio
func list(dir string) {
	fmt.Printf("== ls -l %s\n", dir)
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return err
		}
		size := fmt.Sprint(st.Size)
		if st.Mode&unix.S_IFMT == unix.S_IFCHR || st.Mode&unix.S_IFMT == unix.S_IFBLK {
			size = fmt.Sprintf("%d, %d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		}
		fmt.Printf("%s %d %d %s %s\n", modeString(st.Mode), st.Uid, st.Gid, size, path)
		return nil
	})
	if err != nil {
		fmt.Printf("ls %s: %v\n", dir, err)
	}
}

func modeString(mode uint32) string {
	kind := map[uint32]byte{unix.S_IFCHR: 'c', unix.S_IFBLK: 'b', unix.S_IFDIR: 'd', unix.S_IFLNK: 'l', unix.S_IFREG: '-'}[mode&unix.S_IFMT]
	if kind == 0 {
		kind = '?'
	}
	b := []byte{kind}
	for i := 8; i >= 0; i-- {
		if mode&(1<<uint(i)) != 0 {
			b = append(b, "rwxrwxrwx"[8-i])
		} else {
			b = append(b, '-')
		}
	}
	return string(b)
}

// openAll opens every character device below dir.
func openAll(dir string) {
	_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.Type()&fs.ModeCharDevice != 0 {
			openOne(path)
		}
		return nil
	})
}

// openOne prints "open PATH: ok" or "open PATH: <errno text>". Opening the
// fake VFIO nodes reaches no driver (their numbers belong to none), so ENXIO
// after the devices cgroup let the open through counts as allowed.
func openOne(path string) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	switch {
	case err == nil:
		_ = f.Close()
		fmt.Printf("open %s: ok\n", path)
	case errors.Is(err, unix.ENXIO), errors.Is(err, unix.ENODEV):
		fmt.Printf("open %s: ok (no driver: %v)\n", path, errors.Unwrap(err))
	default:
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		fmt.Printf("open %s: %v\n", path, err)
	}
}

func env() {
	fmt.Println("== env")
	vars := os.Environ()
	slices.Sort(vars)
	for _, v := range vars {
		fmt.Println(v)
	}
}

// metadata prints every file below MetadataDir with its content.
func metadata() {
	fmt.Printf("== metadata %s\n", MetadataDir)
	_ = filepath.WalkDir(MetadataDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			fmt.Printf("%s: %v\n", path, err)
			return nil
		}
		if d.IsDir() {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			fmt.Printf("%s: %v\n", path, err)
			return nil
		}
		fmt.Printf("-- %s\n%s\n", path, strings.TrimRight(string(data), "\n"))
		return nil
	})
}
