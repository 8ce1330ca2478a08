package plugin

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/runtime/schema"
	metadatav1alpha1 "k8s.io/dynamic-resource-allocation/api/metadata/v1alpha1"
	metadatav1beta1 "k8s.io/dynamic-resource-allocation/api/metadata/v1beta1"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/klog/v2"

	"github.com/vfio-dra/vfio-dra-driver/pkg/cdispec"
	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/health"
	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/metrics"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/resources"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// Driver implements kubeletplugin.DRAPlugin.
type Driver struct {
	cfg    Config
	fs     *pci.FS
	host   *hostview.Reader
	binder *vfio.Binder
	store  *checkpoint.Store
	cdi    *cdispec.Writer
	helper *kubeletplugin.Helper
	// health judges the devices; reporter streams its verdicts to the
	// kubelet.
	health   *health.Checker
	reporter *health.Reporter
	// seen is the last offered decision of each function that is offered
	// or held by a claim, to publish a device that disappeared while held
	// as it was. Guarded by scanMu, held for writing.
	seen map[pci.Address]inventory.Decision
	// fatal receives the first background error that ends the plugin.
	fatal chan error
	// stopBackground ends the goroutines in background (rollback retries,
	// republishing), which Stop waits for.
	stopBackground context.CancelFunc
	background     sync.WaitGroup
	// rollbackFailed wakes the retry loop of failed rollbacks.
	rollbackFailed chan struct{}
	// countersDropped is set while the API server does not keep shared
	// counters (DRAPartitionableDevices off): then only devices whose
	// IOMMU group has no other offered member are published.
	countersDropped atomic.Bool
	// lastHealth is the verdict of the last check, for the metrics.
	lastHealth atomic.Pointer[[]metrics.DeviceHealth]
	// backgroundCtx is the context of the background work.
	backgroundCtx context.Context

	// locks serialize the prepares and unprepares of one claim and of
	// claims that share an IOMMU group (see lockClaim); others run in
	// parallel.
	locks keyedLocks
	// scanMu is held for reading by every prepare and unprepare, and for
	// writing by what must not see a function half way between the
	// checkpoint and sysfs: a rescan, a health check, removing orphans.
	scanMu sync.RWMutex

	mu sync.Mutex
	// published is what was last handed to the helper, as decisions and
	// taints: the helper keeps the slices themselves, a second copy here
	// would only cost memory.
	published *publication
	// scanned is the inventory of the last scan, for the health checks
	// between scans.
	scanned *inventory.Inventory
	// logged remembers which functions without an IOMMU group were
	// reported, so that each is said once, not on every rescan.
	logged map[pci.Address]bool
	// hostUnavailable is why the host view could not be read at the last
	// scan, so that a change is logged once.
	hostUnavailable string
}

var _ kubeletplugin.DRAPlugin = &Driver{}

// Start starts the kubeletplugin helper (registration, DRA and health
// gRPC services) and publishes the node's devices once.
func Start(ctx context.Context, cfg Config) (*Driver, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid configuration: %w", err)
	}
	if cfg.HealthInterval <= 0 {
		cfg.HealthInterval = DefaultHealthInterval
	}
	fs, err := pci.NewFS(cfg.SysfsRoot)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.PluginDataDir, 0o750); err != nil {
		return nil, fmt.Errorf("plugin data directory: %w", err)
	}
	cdi, err := cdispec.NewWriter(cfg.CDIRoot, cfg.DriverName)
	if err != nil {
		return nil, err
	}
	var w vfio.Writer = vfio.OSWriter{}
	if cfg.SysfsWriter != nil {
		w = cfg.SysfsWriter
	}
	opts := vfio.Options{Writer: w, Timeout: cfg.BindTimeout}
	if cfg.Metrics != nil {
		opts.Observer = cfg.Metrics
	}
	d := &Driver{
		cfg:            cfg,
		fs:             fs,
		host:           hostview.New(cfg.SysfsRoot, cfg.ProcRoot),
		binder:         vfio.NewBinder(fs, cfg.DevRoot, opts),
		store:          checkpoint.NewStore(filepath.Join(cfg.PluginDataDir, checkpointFile)),
		cdi:            cdi,
		fatal:          make(chan error, 1),
		rollbackFailed: make(chan struct{}, 1),
		logged:         map[pci.Address]bool{},

		health:   health.NewChecker(fs, health.Options{StateFile: filepath.Join(cfg.PluginDataDir, healthStateFile)}),
		reporter: health.NewReporter(),
		seen:     map[pci.Address]inventory.Decision{},
	}
	if err := d.forgetOtherBoots(ctx); err != nil {
		return nil, err
	}
	if err := d.rollBackUnfinished(ctx); err != nil {
		return nil, err
	}
	if err := d.removeOrphans(ctx); err != nil {
		return nil, err
	}
	d.backgroundCtx, d.stopBackground = context.WithCancel(context.WithoutCancel(ctx))
	d.background.Go(func() { d.retryRollbacks(d.backgroundCtx) })
	if !fs.DriverLoaded("vfio-pci") {
		klog.FromContext(ctx).Info("Warning: the vfio-pci driver is not loaded; preparing claims fails until it is (modprobe vfio-pci)")
	}
	d.helper, err = kubeletplugin.Start(ctx, d,
		kubeletplugin.DriverName(cfg.DriverName),
		kubeletplugin.KubeClient(cfg.KubeClient),
		kubeletplugin.NodeName(cfg.NodeName),
		kubeletplugin.RegistrarDirectoryPath(cfg.RegistrarDir),
		kubeletplugin.PluginDataDirectoryPath(cfg.PluginDataDir),
		kubeletplugin.CDIDirectory(cfg.CDIRoot),
		// KEP-5304: every published attribute of each device reaches the
		// container as metadata. KubeVirt's virt-launcher reads only
		// v1alpha1 (the first object of that version in the stream).
		kubeletplugin.EnableDeviceMetadata(true, []schema.GroupVersion{metadatav1beta1.SchemeGroupVersion, metadatav1alpha1.SchemeGroupVersion}),
		// Claims on disjoint IOMMU groups are prepared in parallel; the
		// plugin serializes what must be (lockClaim).
		kubeletplugin.Serialize(false),
	)
	if err != nil {
		d.stopBackgroundWork()
		return nil, fmt.Errorf("start kubelet plugin: %w", err)
	}
	if _, err := d.Resync(ctx); err != nil {
		d.Stop()
		return nil, err
	}
	d.watchSlices(d.backgroundCtx)
	cfg.Metrics.SetPreparedClaimsSource(d.preparedClaims)
	cfg.Metrics.SetHealthSource(d.deviceHealth)
	cfg.Metrics.SetReady(true)
	return d, nil
}

// Stop shuts the gRPC services down and ends the background work.
// Published slices stay: the plugin comes back with the same devices after
// a restart.
func (d *Driver) Stop() {
	d.helper.Stop()
	d.stopBackgroundWork()
}

func (d *Driver) stopBackgroundWork() {
	d.stopBackground()
	d.background.Wait()
}

// Run starts the plugin and blocks until ctx is done or a fatal error
// happens in the background.
func Run(ctx context.Context, cfg Config) error {
	logger := klog.FromContext(ctx)
	d, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	defer d.Stop()
	logger.Info("Kubelet plugin started", "driver", cfg.DriverName, "node", cfg.NodeName)

	return d.Wait(ctx)
}

// Wait rescans periodically until ctx is done (nil) or a fatal background
// error happens (that error).
func (d *Driver) Wait(ctx context.Context) error {
	logger := klog.FromContext(ctx)
	ticker := time.NewTicker(d.cfg.RescanInterval)
	defer ticker.Stop()
	healthTicker := time.NewTicker(d.cfg.HealthInterval)
	defer healthTicker.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-d.fatal:
			return err
		case <-ticker.C:
			if _, err := d.Resync(ctx); err != nil {
				// The next scan may succeed; keep publishing what we had.
				d.cfg.Metrics.Failure(metrics.OpRescan, "")
				logger.Error(err, "Rescanning PCI devices failed")
			}
		case <-healthTicker.C:
			if err := d.CheckHealth(ctx); err != nil {
				logger.Error(err, "Checking device health failed")
			}
		}
	}
}

// Resync scans sysfs and publishes the result if it differs from what was
// published last. It reports whether it published.
func (d *Driver) Resync(ctx context.Context) (published bool, err error) {
	start := time.Now()
	defer func() { d.cfg.Metrics.ObserveRescan(time.Since(start), published, err) }()
	logger := klog.FromContext(ctx)
	if err := d.removeOrphans(ctx); err != nil {
		logger.Error(err, "Removing CDI specs and device metadata that no claim owns")
	}
	inv, host, v, err := d.scan(ctx)
	if err != nil {
		return false, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if host.Unavailable != d.hostUnavailable {
		if host.Unavailable != "" {
			logger.Info("Warning: the host view cannot be read, storage and network controllers are not offered", "reason", host.Unavailable)
		} else {
			logger.Info("The host view can be read again")
		}
		d.hostUnavailable = host.Unavailable
	}
	for _, p := range inv.Problems {
		logger.Error(p, "Skipping PCI device that cannot be read")
	}
	for _, dec := range inv.Decisions {
		if dec.Device.IOMMUGroup == nil && !dec.Device.IsBridge() && !d.logged[dec.Device.Address] {
			d.logged[dec.Device.Address] = true
			logger.Info("PCI device has no IOMMU group, VFIO cannot use it", "pciAddress", dec.Device.Address)
		}
	}
	d.cfg.Metrics.SetFunctions(len(inv.Offered()), inv.NotOfferedByKind())
	d.scanned = inv
	defer d.report(v)
	if resources.NeedsCounters(v.inv) {
		d.checkCounters(ctx, d.published == nil)
	}
	p := v.publication(d.cfg.DriverName, d.countersDropped.Load())
	if p.equal(d.published) {
		return false, nil
	}
	if err := d.helper.PublishResources(ctx, p.resources(d.cfg.NodeName)); err != nil {
		return false, fmt.Errorf("publish ResourceSlices: %w", err)
	}
	d.published = &p
	logger.Info("Published devices", "offered", len(inv.Offered()), "functions", len(inv.Decisions), "withoutCounters", d.countersDropped.Load())
	return true, nil
}

// checkCounters asks the API server whether it keeps shared counters: at
// the first publish (always), and while it is known to drop them, so that
// the devices of multi-device groups come back once it keeps them again.
func (d *Driver) checkCounters(ctx context.Context, first bool) {
	dropped := d.countersDropped.Load()
	if !first && !dropped {
		// A change is reported by the resourceslice controller
		// (HandleError).
		return
	}
	logger := klog.FromContext(ctx)
	ok, err := resources.CountersAccepted(ctx, d.cfg.KubeClient, d.cfg.DriverName, d.cfg.NodeName)
	if err != nil {
		logger.Error(err, "Cannot tell whether the API server keeps IOMMU group counters; publishing as before", "withoutCounters", dropped)
		return
	}
	switch {
	case !ok && !dropped:
		logger.Info("Warning: the API server drops shared counters (feature gate DRAPartitionableDevices off): publishing only devices whose IOMMU group has no other offered member; prepare and unprepare go on")
	case ok && dropped:
		logger.Info("The API server keeps shared counters again: publishing the devices of multi-device IOMMU groups")
	}
	d.countersDropped.Store(!ok)
}

// HandleError is called by the helper for errors in the background. An API
// server that dropped the IOMMU group counters gets only the devices that
// are safe without them, republished at once; everything else is logged
// (publishing is retried by the helper).
func (d *Driver) HandleError(ctx context.Context, err error, msg string) {
	logger := klog.FromContext(ctx)
	var dropped *resourceslice.DroppedFieldsError
	if errors.As(err, &dropped) && slices.Contains(dropped.DisabledFeatures(), "DRAPartitionableDevices") {
		// Without shared counters the scheduler could hand two members
		// of one IOMMU group to two claims: take those devices away now.
		if !d.countersDropped.Swap(true) {
			logger.Info("Warning: the API server dropped the IOMMU group counters (feature gate DRAPartitionableDevices off): publishing only devices whose IOMMU group has no other offered member; prepare and unprepare go on", "err", err)
		}
		d.background.Go(func() {
			if _, err := d.Resync(d.backgroundCtx); err != nil {
				klog.FromContext(d.backgroundCtx).Error(err, "Publishing the devices that are safe without counters")
			}
		})
		return
	}
	if errors.Is(err, kubeletplugin.ErrRecoverable) {
		logger.Error(err, msg)
		return
	}
	select {
	case d.fatal <- fmt.Errorf("%s: %w", msg, err):
	default: // The first fatal error is enough.
	}
}

// scan reads the node as it is published: functions that claims moved to
// vfio are described by their host drivers, and what the host uses is not
// offered. It judges their health too.
func (d *Driver) scan(ctx context.Context) (*inventory.Inventory, *inventory.HostUse, verdict, error) {
	// No prepare may move a driver between reading the checkpoint and
	// reading sysfs, or a bound function would be published with vfio-pci.
	d.scanMu.Lock()
	defer d.scanMu.Unlock()
	cp, err := d.store.Get()
	if err != nil {
		return nil, nil, verdict{}, err
	}
	host := d.host.Read(hostview.OwnOf(cp))
	inv, err := inventory.Scan(d.fs, d.cfg.DriverConfig, cp.HostDrivers(), host)
	if err != nil {
		return nil, nil, verdict{}, err
	}
	return inv, host, d.judge(ctx, inv, cp, true), nil
}

// metadataDir is where the kubeletplugin helper keeps the KEP-5304
// metadata files of claims, in the plugin data directory: one directory
// <namespace>_<name> per claim.
const metadataDir = "dra-device-metadata"

// removeOrphans removes this driver's CDI specs, the helper's device
// metadata specs (<driver>_metadata_<uid>_<request>.json) and metadata
// directories that no checkpointed claim owns: what a reboot left behind
// (a persistent /var/run/cdi), or an earlier version, or a hand-edited
// checkpoint. The checkpoint is written before any of them, so a claim
// being prepared owns its files already.
func (d *Driver) removeOrphans(ctx context.Context) error {
	d.scanMu.Lock()
	defer d.scanMu.Unlock()
	// Files first, then the checkpoint: a file listed belongs to a claim
	// whose entry was written before it, so the entry is seen too.
	var errs []error
	entries, err := os.ReadDir(d.cfg.CDIRoot)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	dirs, err := os.ReadDir(filepath.Join(d.cfg.PluginDataDir, metadataDir))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	cp, err := d.store.Get()
	if err != nil {
		return err
	}
	names := map[string]bool{}
	for _, c := range cp.Claims {
		names[c.Namespace+"_"+c.Name] = true
	}
	logger := klog.FromContext(ctx)
	metadataPrefix := d.cfg.DriverName + "_metadata_"
	for _, e := range entries {
		if uid, ok := cdispec.ClaimOfSpecFile(d.cfg.DriverName, e.Name()); ok {
			if cp.Claims[uid] == nil {
				logger.Info("Removing a CDI spec that no claim owns", "path", filepath.Join(d.cfg.CDIRoot, e.Name()))
				errs = append(errs, d.cdi.RemoveClaim(uid))
			}
			continue
		}
		rest, ok := strings.CutPrefix(e.Name(), metadataPrefix)
		uid, _, found := strings.Cut(rest, "_")
		if !ok || !found || !strings.HasSuffix(rest, ".json") || cp.Claims[uid] != nil {
			continue
		}
		path := filepath.Join(d.cfg.CDIRoot, e.Name())
		logger.Info("Removing a device metadata spec that no claim owns", "path", path)
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	for _, e := range dirs {
		if !e.IsDir() || names[e.Name()] {
			continue
		}
		path := filepath.Join(d.cfg.PluginDataDir, metadataDir, e.Name())
		logger.Info("Removing device metadata that no claim owns", "path", path)
		if err := os.RemoveAll(path); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// checkpointFile is the checkpoint's name in the plugin data directory;
// healthStateFile keeps the health checks' fatal AER counts there.
const (
	checkpointFile  = "checkpoint.json"
	healthStateFile = "health.json"
)

// forgetOtherBoots drops claims checkpointed in an earlier boot: a reboot
// reset every driver binding and driver_override, so there is nothing left
// to undo, and their CDI specs are stale.
func (d *Driver) forgetOtherBoots(ctx context.Context) error {
	bootID, err := checkpoint.ReadBootID(d.cfg.ProcRoot)
	if err != nil {
		return err
	}
	return d.store.Update(func(cp *checkpoint.Checkpoint) error {
		if cp.BootID == bootID {
			return nil
		}
		for uid, c := range cp.Claims {
			klog.FromContext(ctx).Info("Forgetting claim prepared before the last reboot", "claim", klog.KRef(c.Namespace, c.Name), "uid", uid)
			if err := d.cdi.RemoveClaim(uid); err != nil {
				return err
			}
			// The kubeletplugin helper's device metadata specs of the
			// claim (KEP-5304), named <driver>_metadata_<uid>_<request>.json.
			stale, err := filepath.Glob(filepath.Join(d.cfg.CDIRoot, d.cfg.DriverName+"_metadata_"+uid+"_*.json"))
			if err != nil {
				return err
			}
			for _, f := range stale {
				if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
					return fmt.Errorf("remove stale device metadata: %w", err)
				}
			}
			delete(cp.Claims, uid)
		}
		cp.BootID = bootID
		return nil
	})
}

// rollBackUnfinished undoes prepares that a crash cut short, so that their
// groups go back to the host now rather than when the kubelet happens to
// ask for that claim again. A rollback that fails does not stop the plugin:
// the claim keeps its entry, and with it its groups (no other claim can be
// prepared on them, and they are published with their host drivers), and
// retryRollbacks tries again. Only an unreadable checkpoint is an error.
func (d *Driver) rollBackUnfinished(ctx context.Context) error {
	cp, err := d.store.Get()
	if err != nil {
		return err
	}
	for uid, c := range cp.Claims {
		if c.State != checkpoint.PrepareStarted {
			continue
		}
		logger := klog.FromContext(ctx).WithValues("claim", klog.KRef(c.Namespace, c.Name), "uid", uid)
		logger.Info("Rolling back a prepare that did not finish before the plugin stopped")
		err := d.unprepareClaim(klog.NewContext(ctx, logger), uid)
		d.cfg.Metrics.Rollback(err)
		if err != nil {
			logger.Error(err, "Rolling back an unfinished prepare failed; its IOMMU groups stay held and it is retried in the background")
		}
	}
	return nil
}

// Bounds of the retry of failed rollbacks: doubled after each failed round.
const (
	rollbackRetryFirst = time.Second
	rollbackRetryMax   = 5 * time.Minute
)

// retryRollbacks gives back, with backoff, the groups of claims whose
// prepare did not finish and whose rollback failed (state PrepareStarted
// with a LastError), until ctx is done. The kubelet may never ask for such
// a claim again (its pod is gone), so nobody else would.
func (d *Driver) retryRollbacks(ctx context.Context) {
	logger := klog.FromContext(ctx)
	for {
		// Idle until a rollback fails.
		select {
		case <-ctx.Done():
			return
		case <-d.rollbackFailed:
		}
		for delay := rollbackRetryFirst; ; delay = min(2*delay, rollbackRetryMax) {
			timer := time.NewTimer(delay)
			select {
			case <-ctx.Done():
				timer.Stop()
				return
			case <-timer.C:
			}
			// Failures of this round must not wake the next one early.
			select {
			case <-d.rollbackFailed:
			default:
			}
			pending, err := d.retryRollbacksOnce(ctx)
			if err != nil {
				logger.Error(err, "Retrying failed rollbacks")
			} else if pending == 0 {
				break
			}
		}
	}
}

// retryRollbacksOnce tries each failed rollback once and reports how many
// are still failing.
func (d *Driver) retryRollbacksOnce(ctx context.Context) (int, error) {
	cp, err := d.store.Get()
	if err != nil {
		return 0, err
	}
	pending := 0
	for uid, c := range cp.Claims {
		if c.State != checkpoint.PrepareStarted || c.LastError == "" {
			continue
		}
		logger := klog.FromContext(ctx).WithValues("claim", klog.KRef(c.Namespace, c.Name), "uid", uid)
		retried, err := d.retryRollbackLocked(klog.NewContext(ctx, logger), uid)
		if err != nil {
			logger.V(2).Info("Rollback still fails", "err", err)
			pending++
			continue
		}
		if retried {
			logger.Info("Rolled back an unfinished prepare on retry")
		}
	}
	return pending, nil
}
