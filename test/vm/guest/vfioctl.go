package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"unsafe"
)

// VFIO ioctls from <linux/vfio.h>: _IO(VFIO_TYPE, VFIO_BASE + n) with
// VFIO_TYPE ';' and VFIO_BASE 100. They carry no size in the number.
const (
	vfioGetAPIVersion     = 0x3b64 // VFIO_GET_API_VERSION
	vfioCheckExtension    = 0x3b65 // VFIO_CHECK_EXTENSION
	vfioSetIOMMU          = 0x3b66 // VFIO_SET_IOMMU
	vfioGroupGetStatus    = 0x3b67 // VFIO_GROUP_GET_STATUS
	vfioGroupSetContainer = 0x3b68 // VFIO_GROUP_SET_CONTAINER
	vfioGroupGetDeviceFD  = 0x3b6a // VFIO_GROUP_GET_DEVICE_FD
	vfioDeviceGetInfo     = 0x3b6b // VFIO_DEVICE_GET_INFO

	vfioAPIVersion   = 0
	vfioType1v2IOMMU = 3

	vfioGroupFlagsViable       = 1 << 0
	vfioGroupFlagsContainerSet = 1 << 1
	vfioDeviceFlagsPCI         = 1 << 1
)

// ioctlPtr passes a pointer. It stays an unsafe.Pointer until the
// Syscall call itself, so the Go runtime keeps the memory in place.
func ioctlPtr(fd, req uintptr, arg unsafe.Pointer) (uintptr, error) {
	r, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, req, uintptr(arg))
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

// ioctlInt passes an integer argument.
func ioctlInt(fd, req, arg uintptr) (uintptr, error) {
	r, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, req, arg)
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

// group is an open /dev/vfio/N.
type group struct {
	f *os.File
}

// openGroup opens the group node below devRoot.
func openGroup(devRoot string, n int) (*group, error) {
	f, err := os.OpenFile(filepath.Join(devRoot, "vfio", strconv.Itoa(n)), os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return &group{f: f}, nil
}

// close closes the group fd; nothing useful can be done about an error.
func (g *group) close() { _ = g.f.Close() }

// status returns the flags of VFIO_GROUP_GET_STATUS.
func (g *group) status() (uint32, error) {
	st := struct{ argsz, flags uint32 }{argsz: 8}
	_, err := ioctlPtr(g.f.Fd(), vfioGroupGetStatus, unsafe.Pointer(&st))
	return st.flags, err
}

func (g *group) setContainer(c *container) error {
	fd := int32(c.f.Fd())
	_, err := ioctlPtr(g.f.Fd(), vfioGroupSetContainer, unsafe.Pointer(&fd))
	return err
}

// deviceInfo opens a device fd by its PCI address, reads VFIO_DEVICE_GET_INFO
// and closes the fd again, so that no device fd outlives the check (an open
// device fd makes unbinding from vfio-pci wait).
func (g *group) deviceInfo(addr string) (flags, regions, irqs uint32, err error) {
	name := append([]byte(addr), 0)
	fd, err := ioctlPtr(g.f.Fd(), vfioGroupGetDeviceFD, unsafe.Pointer(&name[0]))
	if err != nil {
		return 0, 0, 0, fmt.Errorf("VFIO_GROUP_GET_DEVICE_FD %s: %w", addr, err)
	}
	defer func() { _ = syscall.Close(int(fd)) }()
	info := struct{ argsz, flags, regions, irqs uint32 }{argsz: 16}
	if _, err := ioctlPtr(fd, vfioDeviceGetInfo, unsafe.Pointer(&info)); err != nil {
		return 0, 0, 0, fmt.Errorf("VFIO_DEVICE_GET_INFO %s: %w", addr, err)
	}
	return info.flags, info.regions, info.irqs, nil
}

// openDevice returns a device fd for a PCI address, which the caller must
// close: while it is open, unbinding the device from vfio-pci blocks.
func (g *group) openDevice(addr string) (int, error) {
	name := append([]byte(addr), 0)
	fd, err := ioctlPtr(g.f.Fd(), vfioGroupGetDeviceFD, unsafe.Pointer(&name[0]))
	if err != nil {
		return -1, fmt.Errorf("VFIO_GROUP_GET_DEVICE_FD %s: %w", addr, err)
	}
	return int(fd), nil
}

// container is an open /dev/vfio/vfio.
type container struct {
	f *os.File
}

func openContainer(devRoot string) (*container, error) {
	f, err := os.OpenFile(filepath.Join(devRoot, "vfio", "vfio"), os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	c := &container{f: f}
	v, err := ioctlInt(f.Fd(), vfioGetAPIVersion, 0)
	if err != nil || v != vfioAPIVersion {
		c.close()
		return nil, fmt.Errorf("VFIO_GET_API_VERSION = %d (%w); want %d", v, err, vfioAPIVersion)
	}
	if ok, err := ioctlInt(f.Fd(), vfioCheckExtension, vfioType1v2IOMMU); err != nil || ok != 1 {
		c.close()
		return nil, fmt.Errorf("VFIO_CHECK_EXTENSION(TYPE1v2) = %d (%w); want 1", ok, err)
	}
	return c, nil
}

func (c *container) close() { _ = c.f.Close() }

func (c *container) setIOMMU() error {
	_, err := ioctlInt(c.f.Fd(), vfioSetIOMMU, vfioType1v2IOMMU)
	return err
}
