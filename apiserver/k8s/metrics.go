package k8s

import (
	"maps"

	"github.com/prometheus/client_golang/prometheus"
)

// Problem names a reason the source could not publish an object (or part of
// one) as Kubernetes described it. Problems are counted once per object and
// distinct detail, when they are logged.
type Problem string

// Problems.
const (
	// ProblemMalformedAnnotation: a mesh annotation of a Service has a value
	// the source does not understand.
	ProblemMalformedAnnotation Problem = "malformed-annotation"
	// ProblemNodeWithoutInternalIP: a Node has no InternalIP address; it is
	// not published.
	ProblemNodeWithoutInternalIP Problem = "node-without-internal-ip"
	// ProblemUnparsable: an address, CIDR or port could not be mapped and
	// was left out of the object.
	ProblemUnparsable Problem = "unparsable"
	// ProblemPodWithoutHostIP: a running pod has no usable status.hostIP;
	// its endpoints are not published.
	ProblemPodWithoutHostIP Problem = "pod-without-host-ip"
	// ProblemTooManyLabels: a pod has more identity labels than an identity
	// may hold; it is not published.
	ProblemTooManyLabels Problem = "too-many-labels"
	// ProblemIdentityRefused: the allocator refused a label set for good
	// (its error matches v1.ErrInvalid) or returned an identity of another
	// cluster.
	ProblemIdentityRefused Problem = "identity-refused"
	// ProblemSinkRefused: the sink refused an object (for example a pod IP
	// outside the cluster's pod CIDRs).
	ProblemSinkRefused Problem = "sink-refused"
)

// Stats is a snapshot of a Source's counters.
type Stats struct {
	// Problems counts logged problems by kind of problem.
	Problems map[Problem]int
	// Retries counts transient failures that were retried.
	Retries int
}

// Metrics are the Prometheus collectors of the Kubernetes source. A nil
// *Metrics disables them.
type Metrics struct {
	problems *prometheus.CounterVec
	retries  prometheus.Counter
}

// NewMetrics creates the collectors and registers them with reg (when reg is
// not nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		problems: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "trellis", Subsystem: "k8s_source", Name: "problems_total",
			Help: "Kubernetes objects (or parts of them) the source could not publish, by problem.",
		}, []string{"problem"}),
		retries: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "trellis", Subsystem: "k8s_source", Name: "retries_total",
			Help: "Transient failures (identity allocation) that were retried.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.problems, m.retries)
	}
	return m
}

func (m *Metrics) problem(p Problem) {
	if m != nil {
		m.problems.WithLabelValues(string(p)).Inc()
	}
}

func (m *Metrics) retry() {
	if m != nil {
		m.retries.Inc()
	}
}

func (s Stats) clone() Stats {
	s.Problems = maps.Clone(s.Problems)
	if s.Problems == nil {
		s.Problems = map[Problem]int{}
	}
	return s
}
