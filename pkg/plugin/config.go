// Package plugin is the kubelet plugin of the vfio.dra.dev driver: it
// publishes the node's PCI functions as ResourceSlices and prepares and
// unprepares claims for the kubelet through the kubeletplugin helper.
package plugin

import (
	"errors"
	"fmt"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"

	"github.com/vfio-dra/vfio-dra-driver/api/v1alpha1"
	"github.com/vfio-dra/vfio-dra-driver/pkg/metrics"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// DefaultDriverName is the DRA driver name unless a flag changes it.
const DefaultDriverName = "vfio.dra.dev"

// Config is everything the plugin needs from its command line.
type Config struct {
	DriverName string
	NodeName   string
	KubeClient kubernetes.Interface

	// SysfsRoot is where the plugin sees the host's /sys.
	SysfsRoot string
	// DevRoot is where the plugin sees the host's /dev; it waits for
	// <DevRoot>/vfio/<group> there.
	DevRoot string
	// HostDevRoot is the host's /dev as written into CDI specs: the runtime
	// reads those paths on the host.
	HostDevRoot string
	// CDIRoot is the directory for CDI spec files.
	CDIRoot string
	// PluginDataDir holds dra.sock and the checkpoint.
	PluginDataDir string
	// RegistrarDir is the kubelet's plugin registration directory.
	RegistrarDir string
	// ProcRoot is where the plugin sees the host's /proc; the boot ID there
	// tells whether the checkpoint is from this boot, and the host view
	// (package hostview) is read there.
	ProcRoot string
	// ModulesAlias is the kernel's modules.alias file, for finding vfio
	// variant drivers (VfioConfig driver "auto"); "" disables "auto".
	ModulesAlias string

	// DriverConfig filters the offered devices; nil offers every function the
	// built-in rules allow.
	DriverConfig *v1alpha1.DriverConfiguration

	// RescanInterval is how often sysfs is read again; the slices are only
	// published again when the result changed.
	RescanInterval time.Duration

	// HealthInterval is how often the cheap device health checks run
	// (device and driver links, AER counters); config space and reset
	// methods are read at each rescan. Zero selects DefaultHealthInterval.
	HealthInterval time.Duration

	// SysfsWriter writes the sysfs driver files (driver_override, unbind,
	// drivers_probe); nil writes the files under SysfsRoot directly
	// (vfio.OSWriter). Tests put a kernel emulator here.
	SysfsWriter vfio.Writer
	// WriteHook, when set, is called before and after each checkpoint and
	// CDI spec write of prepare and unprepare with one of the Event*
	// constants; an error stops the write (before) or fails the step
	// (after). Tests stop the plugin at every such point with it, as a
	// crash would; nil in production.
	WriteHook func(event string) error
	// BindTimeout bounds each wait for sysfs or /dev to show the effect of
	// a write; zero selects the vfio package's default.
	BindTimeout time.Duration

	// Metrics records what the plugin does; nil records nothing.
	Metrics *metrics.Metrics
}

// Validate reports every missing or malformed setting at once.
func (c *Config) Validate() error {
	var errs []error
	if msgs := validation.IsDNS1123Subdomain(c.DriverName); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("driver name %q: %v", c.DriverName, msgs))
	}
	if c.NodeName == "" {
		errs = append(errs, errors.New("node name is required"))
	}
	for name, v := range map[string]string{
		"sysfs root": c.SysfsRoot, "dev root": c.DevRoot, "host dev root": c.HostDevRoot,
		"CDI root": c.CDIRoot, "plugin data directory": c.PluginDataDir, "registrar directory": c.RegistrarDir,
		"proc root": c.ProcRoot,
	} {
		if v == "" {
			errs = append(errs, fmt.Errorf("%s is required", name))
		}
	}
	if c.BindTimeout < 0 {
		errs = append(errs, fmt.Errorf("bind timeout %v must not be negative", c.BindTimeout))
	}
	if c.RescanInterval <= 0 {
		errs = append(errs, fmt.Errorf("rescan interval %v must be positive", c.RescanInterval))
	}
	return errors.Join(errs...)
}
