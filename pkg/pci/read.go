package pci

import (
	"errors"
	"io/fs"
	"syscall"
)

// readOnce reads the start of file into buf with one read: a sysfs
// attribute is produced whole by the first read. It goes through the
// system calls directly, because an os.File per attribute costs
// allocations, an fstat and a poller registration, and a scan reads some
// twenty attributes of every function. The errors are what os.Open and
// Read would return.
func readOnce(file string, buf []byte) (int, error) {
	fd, err := open(file)
	if err != nil {
		return 0, err
	}
	defer syscall.Close(fd) //nolint:errcheck // opened read-only
	n, err := read(fd, buf)
	if err != nil {
		return 0, &fs.PathError{Op: "read", Path: file, Err: err}
	}
	return n, nil
}

// readFull reads file into buf until buf is full or the file ends, and
// reports how many bytes it read.
func readFull(file string, buf []byte) (int, error) {
	fd, err := open(file)
	if err != nil {
		return 0, err
	}
	defer syscall.Close(fd) //nolint:errcheck // opened read-only
	n := 0
	for n < len(buf) {
		m, err := read(fd, buf[n:])
		if err != nil {
			return n, &fs.PathError{Op: "read", Path: file, Err: err}
		}
		if m == 0 {
			break
		}
		n += m
	}
	return n, nil
}

func open(file string) (int, error) {
	for {
		fd, err := syscall.Open(file, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return -1, &fs.PathError{Op: "open", Path: file, Err: err}
		}
		return fd, nil
	}
}

func read(fd int, buf []byte) (int, error) {
	for {
		n, err := syscall.Read(fd, buf)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		return max(n, 0), err
	}
}
