package registry

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/source/sourcetest"
	"github.com/trellis-mesh/trellis/kvstore"
)

// recordingSink keeps the last published version of every service and
// endpoint.
type recordingSink struct {
	mu        sync.Mutex
	services  map[string]v1.Service
	endpoints map[netip.Addr]v1.Endpoint
	synced    []v1.Kind
}

func newSink() *recordingSink {
	return &recordingSink{services: map[string]v1.Service{}, endpoints: map[netip.Addr]v1.Endpoint{}}
}

func (s *recordingSink) UpsertNode(v1.Node) error { return nil }
func (s *recordingSink) DeleteNode(string) error  { return nil }
func (s *recordingSink) Synced(kind v1.Kind)      { s.synced = append(s.synced, kind) }
func (s *recordingSink) DeleteService(ns, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.services, ns+"/"+name)
	return nil
}
func (s *recordingSink) UpsertService(svc v1.Service) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.services[svc.Namespace+"/"+svc.Name] = svc
	return nil
}
func (s *recordingSink) UpsertEndpoint(ep v1.Endpoint) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.endpoints[ep.IP] = ep
	return nil
}
func (s *recordingSink) DeleteEndpoint(ip netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.endpoints, ip)
	return nil
}

// backends renders a published service's backends as "ip:state".
func (s *recordingSink) backends(t *testing.T, name string) []string {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	svc, ok := s.services[name]
	if !ok {
		t.Fatalf("service %s not published", name)
	}
	var out []string
	for _, b := range svc.Backends {
		out = append(out, b.IP.String()+":"+string(b.State))
	}
	return out
}

// newRegistry runs a registry of cluster eu (pod CIDR 10.1.0.0/16) on a
// real embedded etcd.
func newRegistry(t *testing.T, e *kvstore.Embedded) (*Registry, *recordingSink, *sourcetest.Allocator) {
	t.Helper()
	c, err := kvstore.NewClient(kvstore.Config{Endpoints: e.Endpoints(), QPS: -1, DialTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	sink, ids := newSink(), sourcetest.NewAllocator(1)
	r, err := New(Config{
		Cluster: v1.ClusterConfig{Name: "eu", ID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}},
		Client:  c, Sink: sink, Identities: ids,
	})
	if err != nil {
		t.Fatal(err)
	}
	return r, sink, ids
}

func startEtcd(t *testing.T) *kvstore.Embedded {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

func endpoint(ip, ns string, ready bool, labels map[string]string) v1.EndpointRequest {
	return v1.EndpointRequest{IP: netip.MustParseAddr(ip), Namespace: ns, Pod: "pod-" + ip, NodeIP: netip.MustParseAddr("192.0.2.1"), Ready: &ready, Labels: labels}
}

// A selector service's backends are exactly the endpoints of its namespace
// whose labels include the selector, unready ones marked so, in IP order;
// they follow every endpoint change.
func TestSelectorResolution(t *testing.T) {
	e := startEtcd(t)
	r, sink, ids := newRegistry(t, e)
	ctx := context.Background()
	web := map[string]string{"app": "web"}
	webCanary := map[string]string{"app": "web", "track": "canary"}
	for _, ep := range []v1.EndpointRequest{
		endpoint("10.1.0.30", "default", true, web),
		endpoint("10.1.0.4", "default", true, webCanary), // more labels than the selector: selected
		endpoint("10.1.0.5", "default", false, web),      // unready: listed as such
		endpoint("10.1.0.6", "default", true, map[string]string{"app": "db"}),
		endpoint("10.1.0.7", "other", true, web), // another namespace
		endpoint("10.1.0.8", "default", true, nil),
	} {
		if err := r.PutEndpoint(ctx, ep); err != nil {
			t.Fatalf("put endpoint %s: %v", ep.IP, err)
		}
	}
	ports := []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}}
	if err := r.PutService(ctx, v1.ServiceRequest{Namespace: "default", Name: "web", Ports: ports, Selector: web}); err != nil {
		t.Fatal(err)
	}
	if err := r.PutService(ctx, v1.ServiceRequest{Namespace: "default", Name: "canary", Ports: ports, Selector: webCanary}); err != nil {
		t.Fatal(err)
	}
	// An empty selector selects every endpoint of the namespace.
	if err := r.PutService(ctx, v1.ServiceRequest{Namespace: "other", Name: "all", Ports: ports, Selector: map[string]string{}}); err != nil {
		t.Fatal(err)
	}
	check := func(name string, want ...string) {
		t.Helper()
		if got := sink.backends(t, name); !slices.Equal(got, want) {
			t.Errorf("%s backends %v, want %v", name, got, want)
		}
	}
	check("default/web", "10.1.0.4:active", "10.1.0.5:unready", "10.1.0.30:active")
	check("default/canary", "10.1.0.4:active")
	check("other/all", "10.1.0.7:active")

	// Label change, readiness change, namespace move, delete: each
	// republishes the services it touches.
	if err := r.PutEndpoint(ctx, endpoint("10.1.0.6", "default", true, web)); err != nil {
		t.Fatal(err)
	}
	if err := r.PutEndpoint(ctx, endpoint("10.1.0.5", "default", true, web)); err != nil {
		t.Fatal(err)
	}
	if err := r.PutEndpoint(ctx, endpoint("10.1.0.4", "other", true, webCanary)); err != nil {
		t.Fatal(err)
	}
	if err := r.DeleteEndpoint(ctx, netip.MustParseAddr("10.1.0.30")); err != nil {
		t.Fatal(err)
	}
	check("default/web", "10.1.0.5:active", "10.1.0.6:active")
	check("default/canary")
	check("other/all", "10.1.0.4:active", "10.1.0.7:active")

	// Every endpoint holds one identity reference, no more.
	if got := ids.TotalRefs(); got != 5 {
		t.Errorf("identity references held: %d, want 5 (one per registered endpoint)", got)
	}
}

// Ports: a backend of a service whose port has no target port serves the
// service port under that name; explicit backends pass through as given.
func TestServiceBackendPorts(t *testing.T) {
	e := startEtcd(t)
	r, sink, _ := newRegistry(t, e)
	ctx := context.Background()
	if err := r.PutEndpoint(ctx, endpoint("10.1.0.4", "default", true, map[string]string{"app": "dns"})); err != nil {
		t.Fatal(err)
	}
	ports := []v1.ServicePort{
		{Name: "dns", Protocol: v1.ProtocolUDP, Port: 53},
		{Name: "metrics", Protocol: v1.ProtocolTCP, Port: 9153, TargetPort: 9100},
	}
	if err := r.PutService(ctx, v1.ServiceRequest{Namespace: "default", Name: "dns", Ports: ports, Selector: map[string]string{"app": "dns"}}); err != nil {
		t.Fatal(err)
	}
	svc := sink.services["default/dns"]
	if len(svc.Backends) != 1 || !slices.Equal(svc.Backends[0].Ports, []v1.BackendPort{{Name: "dns", Port: 53}}) {
		t.Errorf("selector backend ports %+v, want only dns:53 (metrics has a target port)", svc.Backends)
	}

	explicit := []v1.Backend{{IP: netip.MustParseAddr("10.1.9.9"), State: v1.BackendTerminating}}
	if err := r.PutService(ctx, v1.ServiceRequest{Namespace: "default", Name: "fixed", Ports: ports, Backends: explicit}); err != nil {
		t.Fatal(err)
	}
	if got := sink.backends(t, "default/fixed"); !slices.Equal(got, []string{"10.1.9.9:terminating"}) {
		t.Errorf("explicit backends %v", got)
	}
	err := r.PutService(ctx, v1.ServiceRequest{Namespace: "default", Name: "both", Ports: ports, Backends: explicit, Selector: map[string]string{"app": "dns"}})
	if err == nil || !strings.Contains(err.Error(), "not both") {
		t.Errorf("selector and backends together: %v", err)
	}
}

// What was acknowledged comes back after a restart: a new registry on the
// same etcd loads every record, republishes the same objects and marks
// every kind synced; a record that no longer decodes is skipped.
func TestLoadAfterRestart(t *testing.T) {
	e := startEtcd(t)
	r, _, _ := newRegistry(t, e)
	ctx := context.Background()
	if err := r.PutNode(ctx, v1.NodeRequest{Name: "n1", IPs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24")}}); err != nil {
		t.Fatal(err)
	}
	if err := r.PutEndpoint(ctx, endpoint("10.1.1.10", "default", true, map[string]string{"app": "web"})); err != nil {
		t.Fatal(err)
	}
	ports := []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}}
	if err := r.PutService(ctx, v1.ServiceRequest{Namespace: "default", Name: "web", Ports: ports, Selector: map[string]string{"app": "web"}}); err != nil {
		t.Fatal(err)
	}
	if err := r.cfg.Client.Put(ctx, Prefix("eu")+"endpoints/10.1.1.99", []byte("{garbage")); err != nil {
		t.Fatal(err)
	}

	again, sink, _ := newRegistry(t, e)
	if err := again.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if got := len(again.Nodes()); got != 1 {
		t.Errorf("nodes after reload: %d, want 1", got)
	}
	if got := again.Endpoints(); len(got) != 1 || got[0].IP != netip.MustParseAddr("10.1.1.10") {
		t.Errorf("endpoints after reload: %+v", got)
	}
	if got := sink.backends(t, "default/web"); !slices.Equal(got, []string{"10.1.1.10:active"}) {
		t.Errorf("service after reload: %v", got)
	}
	if len(sink.synced) != 4 {
		t.Errorf("synced kinds after load: %v, want all four", sink.synced)
	}
}
