package plugin

import (
	"github.com/vfio-dra/vfio-dra-driver/pkg/cdispec"
	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
)

// Events passed to Config.WriteHook around the writes of prepare and
// unprepare; each write is atomic (a rename), so a crash happens before or
// after it.
const (
	EventBeforeCheckpointWrite = "before checkpoint write"
	EventAfterCheckpointWrite  = "after checkpoint write"
	EventBeforeCDIWrite        = "before CDI spec write"
	EventAfterCDIWrite         = "after CDI spec write"
	EventBeforeCDIRemove       = "before CDI spec removal"
	EventAfterCDIRemove        = "after CDI spec removal"
)

// around runs write between the hook's before and after events.
func (d *Driver) around(before, after string, write func() error) error {
	if h := d.cfg.WriteHook; h != nil {
		if err := h(before); err != nil {
			return err
		}
	}
	if err := write(); err != nil {
		return err
	}
	if h := d.cfg.WriteHook; h != nil {
		return h(after)
	}
	return nil
}

func (d *Driver) updateCheckpoint(mutate func(*checkpoint.Checkpoint) error) error {
	return d.around(EventBeforeCheckpointWrite, EventAfterCheckpointWrite, func() error { return d.store.Update(mutate) })
}

func (d *Driver) writeCDISpec(c cdispec.Claim) (specName string, ids map[string][]string, err error) {
	err = d.around(EventBeforeCDIWrite, EventAfterCDIWrite, func() error {
		specName, ids, err = d.cdi.WriteClaim(c)
		return err
	})
	return specName, ids, err
}

func (d *Driver) removeCDISpec(uid string) error {
	return d.around(EventBeforeCDIRemove, EventAfterCDIRemove, func() error { return d.cdi.RemoveClaim(uid) })
}
