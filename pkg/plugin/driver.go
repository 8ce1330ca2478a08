package plugin

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/klog/v2"

	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/resources"
)

// Driver implements kubeletplugin.DRAPlugin.
type Driver struct {
	cfg    Config
	fs     *pci.FS
	cancel context.CancelCauseFunc

	// publisher is the kubeletplugin helper once started.
	publisher interface {
		PublishResources(context.Context, resourceslice.DriverResources) error
	}

	mu sync.Mutex
	// published is what was last handed to the publisher.
	published *resourceslice.DriverResources
	// logged remembers which functions without an IOMMU group were
	// reported, so that each is said once, not on every rescan.
	logged map[pci.Address]bool
}

var _ kubeletplugin.DRAPlugin = &Driver{}

// Run starts the plugin and blocks until ctx is done or a fatal error
// happens in the background.
func Run(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("invalid configuration: %w", err)
	}
	logger := klog.FromContext(ctx)
	fs, err := pci.NewFS(cfg.SysfsRoot)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.PluginDataDir, 0o750); err != nil {
		return fmt.Errorf("plugin data directory: %w", err)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	d := &Driver{cfg: cfg, fs: fs, cancel: cancel, logged: map[pci.Address]bool{}}

	helper, err := kubeletplugin.Start(ctx, d,
		kubeletplugin.DriverName(cfg.DriverName),
		kubeletplugin.KubeClient(cfg.KubeClient),
		kubeletplugin.NodeName(cfg.NodeName),
		kubeletplugin.RegistrarDirectoryPath(cfg.RegistrarDir),
		kubeletplugin.PluginDataDirectoryPath(cfg.PluginDataDir),
	)
	if err != nil {
		return fmt.Errorf("start kubelet plugin: %w", err)
	}
	defer helper.Stop()
	d.publisher = helper

	if _, err := d.Resync(ctx); err != nil {
		return err
	}
	logger.Info("Kubelet plugin started", "driver", cfg.DriverName, "node", cfg.NodeName)

	ticker := time.NewTicker(cfg.RescanInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			if err := context.Cause(ctx); !errors.Is(err, context.Canceled) {
				return err
			}
			return nil
		case <-ticker.C:
			if _, err := d.Resync(ctx); err != nil {
				// The next scan may succeed; keep publishing what we had.
				logger.Error(err, "Rescanning PCI devices failed")
			}
		}
	}
}

// Resync scans sysfs and publishes the result if it differs from what was
// published last. It reports whether it published.
func (d *Driver) Resync(ctx context.Context) (bool, error) {
	logger := klog.FromContext(ctx)
	inv, err := inventory.Scan(d.fs, d.cfg.DriverConfig)
	if err != nil {
		return false, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range inv.Problems {
		logger.Error(p, "Skipping PCI device that cannot be read")
	}
	for _, dec := range inv.Decisions {
		if dec.Device.IOMMUGroup == nil && !dec.Device.IsBridge() && !d.logged[dec.Device.Address] {
			d.logged[dec.Device.Address] = true
			logger.Info("PCI device has no IOMMU group, VFIO cannot use it", "pciAddress", dec.Device.Address)
		}
	}
	res := resources.Build(d.cfg.NodeName, inv)
	if d.published != nil && equality.Semantic.DeepEqual(*d.published, res) {
		return false, nil
	}
	if err := d.publisher.PublishResources(ctx, res); err != nil {
		return false, fmt.Errorf("publish ResourceSlices: %w", err)
	}
	d.published = &res
	logger.Info("Published devices", "offered", len(inv.Offered()), "functions", len(inv.Decisions))
	return true, nil
}

// PrepareResourceClaims is called by the kubelet before a pod's containers
// start.
func (d *Driver) PrepareResourceClaims(ctx context.Context, claims []*resourceapi.ResourceClaim) (map[types.UID]kubeletplugin.PrepareResult, error) {
	result := make(map[types.UID]kubeletplugin.PrepareResult, len(claims))
	for _, c := range claims {
		result[c.UID] = kubeletplugin.PrepareResult{Err: fmt.Errorf("ResourceClaim %s: prepare is not implemented yet", klog.KObj(c))}
	}
	return result, nil
}

// UnprepareResourceClaims is called by the kubelet after a pod is done.
func (d *Driver) UnprepareResourceClaims(ctx context.Context, claims []kubeletplugin.NamespacedObject) (map[types.UID]error, error) {
	result := make(map[types.UID]error, len(claims))
	for _, c := range claims {
		result[c.UID] = fmt.Errorf("ResourceClaim %s: unprepare is not implemented yet", c.NamespacedName)
	}
	return result, nil
}

// HandleError is called by the helper for errors in the background. The
// recoverable ones (publishing) are logged; anything else stops the plugin.
func (d *Driver) HandleError(ctx context.Context, err error, msg string) {
	logger := klog.FromContext(ctx)
	if errors.Is(err, kubeletplugin.ErrRecoverable) {
		logger.Error(err, msg)
		return
	}
	d.cancel(fmt.Errorf("%s: %w", msg, err))
}

// WatchHealthStatus reports that per-device health is not supported yet, so
// the kubelet stops asking.
func (d *Driver) WatchHealthStatus(ctx context.Context, reports chan<- kubeletplugin.DeviceHealthReport) error {
	return kubeletplugin.ErrHealthNotSupported
}
