package plugin

import (
	"errors"

	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

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
