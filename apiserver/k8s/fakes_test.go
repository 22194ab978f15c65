package k8s

import (
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// recordingSink is an in-memory source.Sink. Like the server, it validates
// every value and refuses endpoints outside the cluster's pod CIDRs (when
// podCIDRs is set).
type recordingSink struct {
	podCIDRs []netip.Prefix

	mu        sync.Mutex
	nodes     map[string]v1.Node
	endpoints map[netip.Addr]v1.Endpoint
	services  map[string]v1.Service
	// synced lists Synced calls in order; atSynced snapshots how many
	// objects of the kind the sink held at that moment.
	synced   []v1.Kind
	atSynced map[v1.Kind]int
	// writes counts every accepted upsert and delete.
	writes int
	// refused counts, per IP, the endpoints refused for being outside
	// podCIDRs; lastRefused is the latest such endpoint per IP. The source
	// offers a refused endpoint again each time it processes its pod, so
	// this counts how often a pod was processed (resyncs included).
	refused     map[netip.Addr]int
	lastRefused map[netip.Addr]v1.Endpoint
	log         []string
	changed     chan struct{}
}

func newRecordingSink(podCIDRs ...string) *recordingSink {
	s := &recordingSink{
		nodes:       map[string]v1.Node{},
		endpoints:   map[netip.Addr]v1.Endpoint{},
		services:    map[string]v1.Service{},
		atSynced:    map[v1.Kind]int{},
		refused:     map[netip.Addr]int{},
		lastRefused: map[netip.Addr]v1.Endpoint{},
		changed:     make(chan struct{}),
	}
	for _, c := range podCIDRs {
		s.podCIDRs = append(s.podCIDRs, netip.MustParsePrefix(c))
	}
	return s
}

// note records an event and wakes waiters; mu is held.
func (s *recordingSink) note(format string, args ...any) {
	s.log = append(s.log, fmt.Sprintf(format, args...))
	s.wake()
}

// wake wakes waitFor's waiters; mu is held.
func (s *recordingSink) wake() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *recordingSink) UpsertNode(n v1.Node) error {
	if err := n.Validate(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nodes[n.Name] = n
	s.writes++
	s.note("upsert node %s", n.Name)
	return nil
}

func (s *recordingSink) DeleteNode(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.nodes, name)
	s.writes++
	s.note("delete node %s", name)
	return nil
}

func (s *recordingSink) UpsertEndpoint(ep v1.Endpoint) error {
	if err := ep.Validate(); err != nil {
		return err
	}
	if len(s.podCIDRs) > 0 && !slices.ContainsFunc(s.podCIDRs, func(p netip.Prefix) bool { return p.Contains(ep.IP) }) {
		s.mu.Lock()
		defer s.mu.Unlock()
		// Not in the history: a refused endpoint is offered again on
		// every resync, and the history is for what the sink holds.
		s.refused[ep.IP]++
		s.lastRefused[ep.IP] = ep
		s.wake()
		return fmt.Errorf("endpoint %s: IP outside the cluster's pod CIDRs %v", ep.IP, s.podCIDRs)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.endpoints[ep.IP] = ep
	s.writes++
	s.note("upsert endpoint %s", ep.IP)
	return nil
}

func (s *recordingSink) DeleteEndpoint(ip netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.endpoints, ip)
	s.writes++
	s.note("delete endpoint %s", ip)
	return nil
}

func (s *recordingSink) UpsertService(svc v1.Service) error {
	if err := svc.Validate(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.services[svc.Namespace+"/"+svc.Name] = svc
	s.writes++
	s.note("upsert service %s/%s", svc.Namespace, svc.Name)
	return nil
}

func (s *recordingSink) DeleteService(namespace, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.services, namespace+"/"+name)
	s.writes++
	s.note("delete service %s/%s", namespace, name)
	return nil
}

func (s *recordingSink) Synced(kind v1.Kind) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.synced = append(s.synced, kind)
	switch kind {
	case v1.KindNodes:
		s.atSynced[kind] = len(s.nodes)
	case v1.KindEndpoints:
		s.atSynced[kind] = len(s.endpoints)
	case v1.KindServices:
		s.atSynced[kind] = len(s.services)
	}
	s.note("synced %s", kind)
}

func (s *recordingSink) node(name string) (v1.Node, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, ok := s.nodes[name]
	return n, ok
}

func (s *recordingSink) endpoint(ip string) (v1.Endpoint, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ep, ok := s.endpoints[netip.MustParseAddr(ip)]
	return ep, ok
}

func (s *recordingSink) service(ns, name string) (v1.Service, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	svc, ok := s.services[ns+"/"+name]
	return svc, ok
}

func (s *recordingSink) syncedKinds() []v1.Kind {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.synced)
}

// refusals returns how often the endpoint at ip was refused, and the
// latest refused version of it.
func (s *recordingSink) refusals(ip string) (int, v1.Endpoint) {
	s.mu.Lock()
	defer s.mu.Unlock()
	addr := netip.MustParseAddr(ip)
	return s.refused[addr], s.lastRefused[addr]
}

func (s *recordingSink) writeCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.writes
}

func (s *recordingSink) history() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.log, "\n")
}

// waitFor polls cond (under no lock) until it returns nil, waking on every
// sink change, and fails the test with cond's last error after timeout.
func (s *recordingSink) waitFor(t *testing.T, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		ch := s.changed
		s.mu.Unlock()
		err := cond()
		if err == nil {
			return
		}
		select {
		case <-ch:
		case <-time.After(50 * time.Millisecond):
		case <-deadline.C:
			t.Fatalf("waiting for %s: %v\nsink history:\n%s", what, err, s.history())
		}
	}
}

// testLogger sends logs to t.Log.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
