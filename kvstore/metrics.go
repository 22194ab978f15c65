package kvstore

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the Prometheus collectors shared by every Client, SyncStore
// and WatchStore of a process. A nil *Metrics disables them, so libraries
// and tests need not register anything.
type Metrics struct {
	operations *prometheus.CounterVec
	errors     *prometheus.CounterVec
	latency    *prometheus.HistogramVec
	entries    *prometheus.GaugeVec
	rejected   *prometheus.CounterVec
	events     *prometheus.CounterVec
}

// NewMetrics creates the collectors and registers them with reg (when reg is
// not nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		operations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "trellis", Subsystem: "kvstore", Name: "operations_total",
			Help: "etcd operations issued, by store scope and operation.",
		}, []string{"scope", "op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "trellis", Subsystem: "kvstore", Name: "errors_total",
			Help: "etcd operations that failed, by store scope and operation.",
		}, []string{"scope", "op"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "trellis", Subsystem: "kvstore", Name: "operation_duration_seconds",
			Help:    "Latency of etcd operations, by store scope and operation.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"scope", "op"}),
		entries: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "trellis", Subsystem: "kvstore", Name: "entries",
			Help: "Entries held by a store (desired entries for a SyncStore, cached entries for a WatchStore).",
		}, []string{"scope"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "trellis", Subsystem: "kvstore", Name: "rejected_total",
			Help: "Values a WatchStore could not decode or validate, by scope and reason.",
		}, []string{"scope", "reason"}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "trellis", Subsystem: "kvstore", Name: "events_total",
			Help: "Upsert and delete events delivered by WatchStores, by scope and type.",
		}, []string{"scope", "type"}),
	}
	if reg != nil {
		reg.MustRegister(m.operations, m.errors, m.latency, m.entries, m.rejected, m.events)
	}
	return m
}

// observe records one operation's outcome and latency.
func (m *Metrics) observe(scope, op string, start time.Time, err error) {
	if m == nil {
		return
	}
	m.operations.WithLabelValues(scope, op).Inc()
	m.latency.WithLabelValues(scope, op).Observe(time.Since(start).Seconds())
	if err != nil {
		m.errors.WithLabelValues(scope, op).Inc()
	}
}

func (m *Metrics) setEntries(scope string, n int) {
	if m == nil {
		return
	}
	m.entries.WithLabelValues(scope).Set(float64(n))
}

func (m *Metrics) reject(scope, reason string) {
	if m == nil {
		return
	}
	m.rejected.WithLabelValues(scope, reason).Inc()
}

func (m *Metrics) event(scope, typ string, n int) {
	if m == nil || n == 0 {
		return
	}
	m.events.WithLabelValues(scope, typ).Add(float64(n))
}
