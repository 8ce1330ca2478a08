// Package metrics holds the kubelet plugin's Prometheus metrics and serves
// them, with /healthz and /readyz, on --metrics-bind-address. Every method
// of a nil *Metrics does nothing, so code paths can record unconditionally.
package metrics

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const namespace = "vfio_dra"

// Operations, as the operation label of vfio_dra_failures_total names them.
const (
	OpPrepare   = "prepare"
	OpUnprepare = "unprepare"
	OpRollback  = "rollback"
	OpRescan    = "rescan"
)

// Taint is one device taint, as the health code sets it.
type Taint struct {
	Key, Effect string
}

// DeviceHealth is the health of one published device.
type DeviceHealth struct {
	// Device is the published device name, e.g. pci-0000-3b-00-0.
	Device  string
	Healthy bool
	Taints  []Taint
}

// HealthSource returns the health of every published device; it is called
// on each scrape, so it must be cheap and safe for concurrent use.
type HealthSource func() []DeviceHealth

// Metrics is the plugin's metrics registry.
type Metrics struct {
	reg *prometheus.Registry

	functions        *prometheus.GaugeVec
	prepareSeconds   *prometheus.HistogramVec
	unprepareSeconds *prometheus.HistogramVec
	bindSeconds      *prometheus.HistogramVec
	unbindSeconds    *prometheus.HistogramVec
	rescanSeconds    *prometheus.HistogramVec
	failures         *prometheus.CounterVec
	rollbacks        *prometheus.CounterVec

	ready atomic.Bool

	mu       sync.Mutex
	health   HealthSource
	prepared func() (int, error)
}

// Buckets for the latency histograms: a prepare is milliseconds without a
// host driver to unbind and seconds with a GPU's.
var latencyBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}

// New returns a registry with every metric of the plugin, the Go runtime's
// and the process's.
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		functions: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "functions",
			Help: "PCI functions of the node at the last rescan, by whether they are offered and, if not, why.",
		}, []string{"offered", "reason"}),
		prepareSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "prepare_duration_seconds", Buckets: latencyBuckets,
			Help: "Time to prepare one ResourceClaim, by result.",
		}, []string{"result"}),
		unprepareSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "unprepare_duration_seconds", Buckets: latencyBuckets,
			Help: "Time to unprepare one ResourceClaim, by result.",
		}, []string{"result"}),
		bindSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "bind_duration_seconds", Buckets: latencyBuckets,
			Help: "Time from the write to drivers_probe until one PCI function shows on its driver, by the driver that bound it.",
		}, []string{"driver"}),
		unbindSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "unbind_duration_seconds", Buckets: latencyBuckets,
			Help: "Time from the write to unbind until one PCI function shows no driver, by the driver it was unbound from.",
		}, []string{"driver"}),
		rescanSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "rescan_duration_seconds", Buckets: latencyBuckets,
			Help: "Time to rescan the node and compare with what is published, by result: unchanged, published or error.",
		}, []string{"result"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "failures_total",
			Help: "Failed operations, by operation and by the step that failed.",
		}, []string{"operation", "step"}),
		rollbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "rollbacks_total",
			Help: "Prepares rolled back (after a failure, or unfinished at start), by result.",
		}, []string{"result"}),
	}
	m.reg.MustRegister(m.functions, m.prepareSeconds, m.unprepareSeconds, m.bindSeconds, m.unbindSeconds,
		m.rescanSeconds, m.failures, m.rollbacks, &hooks{m: m},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry is where the metrics are registered, for tests and for adding
// collectors of other packages.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// SetFunctions records the result of a rescan: how many functions are
// offered, and how many are not, by reason.
func (m *Metrics) SetFunctions(offered int, notOffered map[string]int) {
	if m == nil {
		return
	}
	m.functions.Reset()
	m.functions.WithLabelValues("true", "").Set(float64(offered))
	for reason, n := range notOffered {
		m.functions.WithLabelValues("false", reason).Set(float64(n))
	}
}

func result(err error) string {
	if err != nil {
		return "error"
	}
	return "success"
}

// ObservePrepare records one claim's prepare; step names what failed ("" on
// success).
func (m *Metrics) ObservePrepare(d time.Duration, step string, err error) {
	if m == nil {
		return
	}
	m.prepareSeconds.WithLabelValues(result(err)).Observe(d.Seconds())
	if err != nil {
		m.failures.WithLabelValues(OpPrepare, step).Inc()
	}
}

// ObserveUnprepare records one claim's unprepare, as ObservePrepare.
func (m *Metrics) ObserveUnprepare(d time.Duration, step string, err error) {
	if m == nil {
		return
	}
	m.unprepareSeconds.WithLabelValues(result(err)).Observe(d.Seconds())
	if err != nil {
		m.failures.WithLabelValues(OpUnprepare, step).Inc()
	}
}

// ObserveBind records a probe that bound a function to driver: d is from
// the write to drivers_probe until sysfs showed the function on driver.
// It implements vfio.Observer.
func (m *Metrics) ObserveBind(driver string, d time.Duration) {
	if m == nil {
		return
	}
	m.bindSeconds.WithLabelValues(driver).Observe(d.Seconds())
}

// ObserveUnbind records an unbind of a function from driver: d is from
// the write to its unbind file until the driver link was gone.
func (m *Metrics) ObserveUnbind(driver string, d time.Duration) {
	if m == nil {
		return
	}
	m.unbindSeconds.WithLabelValues(driver).Observe(d.Seconds())
}

// Rescan results, as the result label of vfio_dra_rescan_duration_seconds
// names them.
const (
	RescanUnchanged = "unchanged"
	RescanPublished = "published"
	RescanError     = "error"
)

// ObserveRescan records one rescan: whether it published (something
// changed) or failed.
func (m *Metrics) ObserveRescan(d time.Duration, published bool, err error) {
	if m == nil {
		return
	}
	r := RescanUnchanged
	switch {
	case err != nil:
		r = RescanError
	case published:
		r = RescanPublished
	}
	m.rescanSeconds.WithLabelValues(r).Observe(d.Seconds())
}

// Failure counts a failed operation that has no latency of its own (a
// rescan, for instance).
func (m *Metrics) Failure(operation, step string) {
	if m == nil {
		return
	}
	m.failures.WithLabelValues(operation, step).Inc()
}

// Rollback counts a rolled back prepare.
func (m *Metrics) Rollback(err error) {
	if m == nil {
		return
	}
	m.rollbacks.WithLabelValues(result(err)).Inc()
	if err != nil {
		m.failures.WithLabelValues(OpRollback, "").Inc()
	}
}

// SetHealthSource installs what reports device health and taints at each
// scrape; nil removes it.
func (m *Metrics) SetHealthSource(src HealthSource) {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.health = src
}

// SetPreparedClaimsSource installs what counts the prepared claims at each
// scrape.
func (m *Metrics) SetPreparedClaimsSource(src func() (int, error)) {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.prepared = src
}

// SetReady sets what /readyz answers: ready once the plugin serves the
// kubelet and has published its devices.
func (m *Metrics) SetReady(ready bool) {
	if m == nil {
		return
	}
	m.ready.Store(ready)
}

var (
	preparedDesc = prometheus.NewDesc(namespace+"_prepared_claims",
		"ResourceClaims prepared on the node, as the checkpoint lists them.", nil, nil)
	devicesDesc = prometheus.NewDesc(namespace+"_devices",
		"Published devices by health.", []string{"health"}, nil)
	unhealthyDesc = prometheus.NewDesc(namespace+"_device_unhealthy",
		"1 for each published device that is unhealthy.", []string{"device"}, nil)
	taintsDesc = prometheus.NewDesc(namespace+"_device_taints",
		"Taints on published devices, by key and effect.", []string{"key", "effect"}, nil)
)

// hooks collects the values that other code owns, at scrape time.
type hooks struct{ m *Metrics }

func (h *hooks) Describe(ch chan<- *prometheus.Desc) {
	ch <- preparedDesc
	ch <- devicesDesc
	ch <- unhealthyDesc
	ch <- taintsDesc
}

func (h *hooks) Collect(ch chan<- prometheus.Metric) {
	h.m.mu.Lock()
	health, prepared := h.m.health, h.m.prepared
	h.m.mu.Unlock()
	if prepared != nil {
		if n, err := prepared(); err != nil {
			ch <- prometheus.NewInvalidMetric(preparedDesc, err)
		} else {
			ch <- prometheus.MustNewConstMetric(preparedDesc, prometheus.GaugeValue, float64(n))
		}
	}
	if health == nil {
		return
	}
	counts := map[string]int{"healthy": 0, "unhealthy": 0}
	taints := map[Taint]int{}
	for _, d := range health() {
		if d.Healthy {
			counts["healthy"]++
		} else {
			counts["unhealthy"]++
			ch <- prometheus.MustNewConstMetric(unhealthyDesc, prometheus.GaugeValue, 1, d.Device)
		}
		for _, t := range d.Taints {
			taints[t]++
		}
	}
	for state, n := range counts {
		ch <- prometheus.MustNewConstMetric(devicesDesc, prometheus.GaugeValue, float64(n), state)
	}
	for t, n := range taints {
		ch <- prometheus.MustNewConstMetric(taintsDesc, prometheus.GaugeValue, float64(n), t.Key, t.Effect)
	}
}

// Handler serves /metrics, /healthz (the process answers) and /readyz (see
// SetReady).
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !m.ready.Load() {
			http.Error(w, "not ready: the plugin has not registered and published its devices yet", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}

// Serve answers on ln until ctx is done.
func (m *Metrics) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{Handler: m.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
