package plugin

import (
	"errors"
	"path/filepath"
	"strings"
	"time"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/metrics"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// timedWriter times the sysfs writes in which the kernel does a driver's
// work: an unbind runs the driver's remove callback and drivers_probe its
// probe, both before the write returns.
type timedWriter struct {
	w  vfio.Writer
	fs *pci.FS
	m  *metrics.Metrics
}

func (t timedWriter) WriteFile(path string, data []byte) error {
	start := time.Now()
	err := t.w.WriteFile(path, data)
	if err != nil {
		return err
	}
	elapsed := time.Since(start)
	switch {
	case path == t.fs.Path(pci.DriversProbe):
		addr, perr := pci.ParseAddress(strings.TrimSpace(string(data)))
		if perr != nil {
			return nil
		}
		if driver, derr := t.fs.CurrentDriver(addr); derr == nil && driver != "" {
			t.m.ObserveBind(driver, elapsed)
		}
	case filepath.Base(path) == "unbind" && filepath.Dir(filepath.Dir(path)) == t.fs.Path(pci.BusDriversDir):
		t.m.ObserveUnbind(filepath.Base(filepath.Dir(path)), elapsed)
	}
	return nil
}

// stepOf names the step of a failed prepare or unprepare for metrics.
func stepOf(err error) string {
	var step *vfio.StepError
	if errors.As(err, &step) {
		return step.Step
	}
	return "other"
}

// preparedClaims counts the claims the checkpoint holds as prepared.
func (d *Driver) preparedClaims() (int, error) {
	cp, err := d.store.Get()
	if err != nil {
		return 0, err
	}
	n := 0
	for _, c := range cp.Claims {
		if c.State == checkpoint.PrepareCompleted {
			n++
		}
	}
	return n, nil
}
