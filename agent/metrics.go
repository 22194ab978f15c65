package agent

import (
	"slices"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trellis-mesh/trellis/clustermesh"
)

// applyMetrics counts what the applies did to each service: which
// clusters serve it now, and how often it failed over to other clusters
// and back. It is fed the snapshot each successful apply handed the
// datapath (after gossip's and local health's exclusions), so the figures
// are what the node serves, not what the mesh offers.
type applyMetrics struct {
	local string // this node's cluster

	mu       sync.Mutex
	serving  map[string][]string // service → clusters with active backends, sorted
	active   *prometheus.GaugeVec
	failover *prometheus.CounterVec
}

func newApplyMetrics(local string) *applyMetrics {
	return &applyMetrics{
		local:   local,
		serving: make(map[string][]string),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "trellis_agent_service_active_backends",
			Help: "Backends this node sends a global service's traffic to, by the cluster they are in.",
		}, []string{"service", "cluster"}),
		failover: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trellis_agent_service_failovers_total",
			Help: "Times a service's traffic from this node left its own cluster for others (direction away) or came back (direction back).",
		}, []string{"service", "direction"}),
	}
}

func (m *applyMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.active, m.failover}
}

// observe records an applied snapshot.
func (m *applyMetrics) observe(snap *clustermesh.Snapshot) {
	if snap == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	seen := make(map[string]bool, len(snap.Services))
	for _, svc := range snap.Services {
		name := svc.Namespace + "/" + svc.Name
		seen[name] = true
		count := map[string]int{}
		for _, b := range svc.Backends {
			count[b.Cluster]++
		}
		var clusters []string
		for c, n := range count {
			clusters = append(clusters, c)
			m.active.WithLabelValues(name, c).Set(float64(n))
		}
		slices.Sort(clusters)
		prev, known := m.serving[name]
		for _, c := range prev {
			if count[c] == 0 {
				m.active.DeleteLabelValues(name, c)
			}
		}
		if known {
			wasLocal, isLocal := slices.Contains(prev, m.local), slices.Contains(clusters, m.local)
			switch {
			case wasLocal && !isLocal && len(clusters) > 0:
				m.failover.WithLabelValues(name, "away").Inc()
			case !wasLocal && isLocal && len(prev) > 0:
				m.failover.WithLabelValues(name, "back").Inc()
			}
		}
		m.serving[name] = clusters
	}
	for name, clusters := range m.serving {
		if seen[name] {
			continue
		}
		for _, c := range clusters {
			m.active.DeleteLabelValues(name, c)
		}
		delete(m.serving, name)
	}
}

// stateCollector exports local health and gossip as they are when
// scraped.
type stateCollector struct {
	a                           *Agent
	endpoints, members, trusted *prometheus.Desc
}

func newStateCollector(a *Agent) stateCollector {
	return stateCollector{a: a,
		endpoints: prometheus.NewDesc("trellis_agent_local_endpoints",
			"Endpoints of this node that local health probes, by state (up, down).", []string{"state"}, nil),
		members: prometheus.NewDesc("trellis_agent_gossip_members",
			"Members of the mesh-wide gossip by the state this node believes (alive, suspect, dead, left).", []string{"state"}, nil),
		trusted: prometheus.NewDesc("trellis_agent_gossip_dead_set_trusted",
			"1 when this node acts on the gossip's dead set, 0 when its partition rule distrusts it or gossip is off.", nil, nil),
	}
}

func (c stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.endpoints
	ch <- c.members
	ch <- c.trusted
}

func (c stateCollector) Collect(ch chan<- prometheus.Metric) {
	if hs := c.a.health.status(); hs != nil {
		var up, down int
		for _, e := range hs.Endpoints {
			if e.Down {
				down++
			} else {
				up++
			}
		}
		ch <- prometheus.MustNewConstMetric(c.endpoints, prometheus.GaugeValue, float64(up), "up")
		ch <- prometheus.MustNewConstMetric(c.endpoints, prometheus.GaugeValue, float64(down), "down")
	}
	trusted := 0.0
	if gs := c.a.gossip.statusOf(); gs != nil && gs.Off == "" {
		for state, n := range map[string]int{"alive": gs.Alive, "suspect": gs.Suspect, "dead": gs.Dead, "left": gs.Left} {
			ch <- prometheus.MustNewConstMetric(c.members, prometheus.GaugeValue, float64(n), state)
		}
		if gs.Trusted {
			trusted = 1
		}
	}
	ch <- prometheus.MustNewConstMetric(c.trusted, prometheus.GaugeValue, trusted)
}
