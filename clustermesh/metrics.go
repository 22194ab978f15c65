package clustermesh

import "github.com/prometheus/client_golang/prometheus"

// Collector exports what the Mesh holds back: the nodes it keeps out of
// the merged state, by cluster and reason. (What fails validation is
// counted by the WatchStores, in Config.Metrics.)
func (m *Mesh) Collector() prometheus.Collector {
	return meshCollector{m: m, excluded: prometheus.NewDesc("trellis_clustermesh_excluded_nodes",
		"Nodes a cluster published that decoded but are kept out of the merged state, by cluster and reason.",
		[]string{"cluster", "reason"}, nil)}
}

type meshCollector struct {
	m        *Mesh
	excluded *prometheus.Desc
}

func (c meshCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.excluded }

func (c meshCollector) Collect(ch chan<- prometheus.Metric) {
	for cluster, reasons := range c.m.state.excludedNodes() {
		for reason, n := range reasons {
			ch <- prometheus.MustNewConstMetric(c.excluded, prometheus.GaugeValue, float64(n), cluster, reason)
		}
	}
}
