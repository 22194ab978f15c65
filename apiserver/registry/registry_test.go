package registry

import (
	"context"
	"errors"
	"fmt"
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
	// limit, when positive, makes UpsertService refuse services with
	// more backends, as a Sink with a size limit would.
	limit     int
	mu        sync.Mutex
	services  map[string]v1.Service
	endpoints map[netip.Addr]v1.Endpoint
	synced    []v1.Kind
	upserts   int // UpsertService calls
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
	if s.limit > 0 && len(svc.Backends) > s.limit {
		return fmt.Errorf("service %s/%s: %d backends, limit %d", svc.Namespace, svc.Name, len(svc.Backends), s.limit)
	}
	s.services[svc.Namespace+"/"+svc.Name] = svc
	s.upserts++
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
	return v1.EndpointRequest{IP: netip.MustParseAddr(ip), Namespace: ns, Pod: "pod-" + ip, Node: "n1", NodeIP: netip.MustParseAddr("192.0.2.1"), Ready: &ready, Labels: labels}
}

// node1 is the node the test endpoints run on.
var node1 = v1.NodeRequest{Name: "n1", IPs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24")}}

func putNode1(t *testing.T, r *Registry) {
	t.Helper()
	if err := r.PutNode(context.Background(), node1); err != nil {
		t.Fatal(err)
	}
}

// A selector service's backends are exactly the endpoints of its namespace
// whose labels include the selector, unready ones marked so, in IP order;
// they follow every endpoint change.
func TestSelectorResolution(t *testing.T) {
	e := startEtcd(t)
	r, sink, ids := newRegistry(t, e)
	ctx := context.Background()
	putNode1(t, r)
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
	putNode1(t, r)
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
	putNode1(t, r)
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
	if p := again.Problems()["endpoint 10.1.1.99"]; p == "" {
		t.Errorf("problems %v: want the undecodable endpoint record", again.Problems())
	}
	if len(sink.synced) != 4 {
		t.Errorf("synced kinds after load: %v, want all four", sink.synced)
	}
}

// The probes of what used to be accepted though wrong: each is refused
// with ErrInvalid (a 400) naming what is wrong, and nothing is stored or
// published.
func TestDoorRefuses(t *testing.T) {
	e := startEtcd(t)
	r, sink, ids := newRegistry(t, e)
	r.cfg.ServiceCIDRs = []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")}
	ctx := context.Background()
	putNode1(t, r)
	ep := func(mod func(*v1.EndpointRequest)) v1.EndpointRequest {
		e := endpoint("10.1.1.10", "default", true, map[string]string{"app": "web"})
		mod(&e)
		return e
	}
	many := map[string]string{}
	for i := range 65 {
		many[fmt.Sprintf("l%d", i)] = "v"
	}
	node := func(name, ip, cidr string) v1.NodeRequest {
		return v1.NodeRequest{Name: name, IPs: []netip.Addr{netip.MustParseAddr(ip)}, PodCIDRs: []netip.Prefix{netip.MustParsePrefix(cidr)}}
	}
	svc := func(vip string) v1.ServiceRequest {
		return v1.ServiceRequest{Namespace: "default", Name: "web", Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}},
			FrontendIPs: []netip.Addr{netip.MustParseAddr(vip)}, Selector: map[string]string{"app": "web"}}
	}
	for _, tc := range []struct {
		name    string
		put     func() error
		mention string
	}{
		{"endpoint nodeIP loopback", func() error {
			return r.PutEndpoint(ctx, ep(func(e *v1.EndpointRequest) { e.NodeIP = netip.MustParseAddr("127.0.0.1") }))
		}, "nodeIP 127.0.0.1 is not an IP of node n1"},
		{"endpoint nodeIP elsewhere", func() error {
			return r.PutEndpoint(ctx, ep(func(e *v1.EndpointRequest) { e.NodeIP = netip.MustParseAddr("8.8.8.8") }))
		}, "nodeIP 8.8.8.8"},
		{"endpoint on an unregistered node", func() error {
			return r.PutEndpoint(ctx, ep(func(e *v1.EndpointRequest) { e.Node = "ghost" }))
		}, `node "ghost" is not registered`},
		{"endpoint on a node named in invalid UTF-8", func() error {
			return r.PutEndpoint(ctx, ep(func(e *v1.EndpointRequest) { e.Node = "n\xff1" }))
		}, "is not registered"},
		{"endpoint without a node", func() error {
			return r.PutEndpoint(ctx, ep(func(e *v1.EndpointRequest) { e.Node = "" }))
		}, "node is required"},
		{"endpoint with 65 labels", func() error {
			return r.PutEndpoint(ctx, ep(func(e *v1.EndpointRequest) { e.Labels = many }))
		}, "labels"},
		{"endpoint outside the pod CIDRs", func() error {
			return r.PutEndpoint(ctx, ep(func(e *v1.EndpointRequest) { e.IP = netip.MustParseAddr("10.9.0.1") }))
		}, "outside the cluster's pod CIDRs"},
		{"node underlay loopback", func() error { return r.PutNode(ctx, node("n2", "127.0.0.1", "10.1.2.0/24")) }, "loopback"},
		{"node underlay link-local", func() error { return r.PutNode(ctx, node("n2", "169.254.169.254", "10.1.2.0/24")) }, "link-local"},
		{"node with another node's IP", func() error { return r.PutNode(ctx, node("n2", "192.0.2.1", "10.1.2.0/24")) }, "node n1's already"},
		{"node with the whole cluster range", func() error { return r.PutNode(ctx, node("n2", "192.0.2.2", "10.1.0.0/16")) }, "whole cluster pod CIDR"},
		{"node overlapping another node", func() error { return r.PutNode(ctx, node("n2", "192.0.2.2", "10.1.0.0/20")) }, "overlaps 10.1.1.0/24 of node n1"},
		{"node outside the pod CIDRs", func() error { return r.PutNode(ctx, node("n2", "192.0.2.2", "10.2.0.0/24")) }, "not inside the cluster's pod CIDRs"},
		{"node IP inside the pod CIDRs", func() error { return r.PutNode(ctx, node("n2", "10.1.7.7", "10.1.2.0/24")) }, "inside the cluster's pod CIDRs"},
		{"VIP loopback", func() error { return r.PutService(ctx, svc("127.0.0.1")) }, "loopback"},
		{"VIP a node IP", func() error {
			r.cfg.ServiceCIDRs = nil
			defer func() { r.cfg.ServiceCIDRs = []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")} }()
			return r.PutService(ctx, svc("192.0.2.1"))
		}, "node n1's IP"},
		{"VIP outside the service CIDRs", func() error { return r.PutService(ctx, svc("10.200.0.1")) }, "outside the service CIDRs"},
		{"VIP a pod IP", func() error {
			r.cfg.ServiceCIDRs = nil
			defer func() { r.cfg.ServiceCIDRs = []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")} }()
			return r.PutService(ctx, svc("10.1.1.10"))
		}, "inside the cluster's pod CIDRs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.put()
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.mention) {
				t.Fatalf("err %v, want ErrInvalid mentioning %q", err, tc.mention)
			}
		})
	}
	// Nothing of it stored or published: only node n1.
	if got := len(r.Nodes()) + len(r.Endpoints()) + len(r.Services()); got != 1 {
		t.Errorf("registry holds %d objects, want only node n1", got)
	}
	for _, kind := range []string{"nodes/", "endpoints/", "services/"} {
		n := 0
		if _, err := r.cfg.Client.List(ctx, Prefix("eu")+kind, kvstore.ListOptions{KeysOnly: true}, func(kvstore.KeyValue) { n++ }); err != nil {
			t.Fatal(err)
		}
		if want := map[string]int{"nodes/": 1}[kind]; n != want {
			t.Errorf("%d %s records stored, want %d", n, kind, want)
		}
	}
	if len(sink.endpoints) != 0 || len(sink.services) != 0 || ids.TotalRefs() != 0 {
		t.Errorf("published %d endpoints, %d services, %d identity references; want none", len(sink.endpoints), len(sink.services), ids.TotalRefs())
	}
}

// Concurrent writers on one record: whatever order they land in, what is
// served, what is stored and what is published agree after every round.
// (Applying to memory before storing, and deletes leaving memory first,
// made them differ in 6 of 40 rounds.)
func TestConcurrentWritersOneRecord(t *testing.T) {
	e := startEtcd(t)
	r, sink, _ := newRegistry(t, e)
	ctx := context.Background()
	putNode1(t, r)
	ip := netip.MustParseAddr("10.1.1.10")
	for round := range 40 {
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Go(func() {
				ready := w%2 == 0
				e := endpoint(ip.String(), "default", ready, map[string]string{"app": "web", "writer": fmt.Sprint(w)})
				if round%5 == 4 && w == 7 {
					if err := r.DeleteEndpoint(ctx, ip); err != nil && !errors.Is(err, ErrNotFound) {
						t.Errorf("round %d delete: %v", round, err)
					}
					return
				}
				if err := r.PutEndpoint(ctx, e); err != nil {
					t.Errorf("round %d writer %d: %v", round, w, err)
				}
			})
		}
		wg.Wait()
		served, isServed := r.Endpoint(ip)
		rec, isStored, err := r.endpointRecords.Get(ctx, ip.String())
		if err != nil {
			t.Fatal(err)
		}
		sink.mu.Lock()
		pub, isPublished := sink.endpoints[ip]
		sink.mu.Unlock()
		if isServed != isStored || isStored != isPublished {
			t.Fatalf("round %d: served %v, stored %v, published %v", round, isServed, isStored, isPublished)
		}
		if !isStored {
			continue
		}
		if served.Labels["writer"] != rec.Value.Labels["writer"] || *served.Ready != *rec.Value.Ready || pub.Ready != *rec.Value.Ready {
			t.Fatalf("round %d: served writer %s ready %v, stored writer %s ready %v, published ready %v",
				round, served.Labels["writer"], *served.Ready, rec.Value.Labels["writer"], *rec.Value.Ready, pub.Ready)
		}
	}
}

// Concurrent endpoint writes to one selector service are coalesced into
// fewer republications, and still none returns before the service as
// published holds its change.
func TestEndpointWritesCoalesce(t *testing.T) {
	e := startEtcd(t)
	r, sink, _ := newRegistry(t, e)
	ctx := context.Background()
	putNode1(t, r)
	web := map[string]string{"app": "web"}
	if err := r.PutService(ctx, v1.ServiceRequest{Namespace: "default", Name: "web", Selector: web,
		Ports: []v1.ServicePort{{Name: "http", Port: 80, Protocol: "TCP", TargetPort: 8080}}}); err != nil {
		t.Fatal(err)
	}
	// An endpoint of another app republishes nothing.
	sink.mu.Lock()
	before := sink.upserts
	sink.mu.Unlock()
	if err := r.PutEndpoint(ctx, endpoint("10.1.1.200", "default", true, map[string]string{"app": "db"})); err != nil {
		t.Fatal(err)
	}
	sink.mu.Lock()
	if sink.upserts != before {
		t.Errorf("an endpoint no selector selects republished %d services", sink.upserts-before)
	}
	before = sink.upserts
	sink.mu.Unlock()

	const writers, writes = 16, 20
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			ip := fmt.Sprintf("10.1.1.%d", 10+w)
			for i := range writes {
				ready := i%2 == 0
				if err := r.PutEndpoint(ctx, endpoint(ip, "default", ready, web)); err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
				// Published before the write returned.
				want := v1.BackendActive
				if !ready {
					want = v1.BackendUnready
				}
				sink.mu.Lock()
				var got v1.BackendState
				for _, b := range sink.services["default/web"].Backends {
					if b.IP.String() == ip {
						got = b.State
					}
				}
				sink.mu.Unlock()
				if got != want {
					t.Errorf("writer %d write %d returned, and the published service has %s as %q, want %q", w, i, ip, got, want)
					return
				}
			}
		})
	}
	wg.Wait()
	sink.mu.Lock()
	n := sink.upserts - before
	sink.mu.Unlock()
	t.Logf("%d endpoint writes republished the service %d times", writers*writes, n)
	if n >= writers*writes {
		t.Errorf("%d republications for %d concurrent writes: not coalesced", n, writers*writes)
	}
}

// An aggregate that cannot be published is not only logged: Problems
// names it until it publishes again. A service the Sink refuses at PUT
// is not stored (the previous version stays) and the client hears why.
func TestUnpublishableIsReported(t *testing.T) {
	e := startEtcd(t)
	r, sink, _ := newRegistry(t, e)
	ctx := context.Background()
	putNode1(t, r)
	ports := []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}}
	web := v1.ServiceRequest{Namespace: "default", Name: "web", Ports: ports, Selector: map[string]string{"app": "web"}}
	if err := r.PutService(ctx, web); err != nil {
		t.Fatal(err)
	}
	// The Sink refuses services with more than two backends from now on.
	sink.limit = 2
	for i := range 3 {
		if err := r.PutEndpoint(ctx, endpoint(fmt.Sprintf("10.1.1.%d", 10+i), "default", true, map[string]string{"app": "web"})); err != nil {
			t.Fatal(err)
		}
	}
	if p := r.Problems()["service default/web"]; !strings.Contains(p, "limit") {
		t.Errorf("problems %v: want service default/web with the reason", r.Problems())
	}
	if err := r.DeleteEndpoint(ctx, netip.MustParseAddr("10.1.1.12")); err != nil {
		t.Fatal(err)
	}
	if len(r.Problems()) != 0 {
		t.Errorf("problems %v after the service publishes again", r.Problems())
	}

	// A PUT the Sink refuses: 400, and the stored record is the old one.
	other := web
	other.Name, other.Selector, other.Backends = "fixed", nil, []v1.Backend{{IP: netip.MustParseAddr("10.1.1.20"), State: v1.BackendActive}}
	if err := r.PutService(ctx, other); err != nil {
		t.Fatal(err)
	}
	grown := other
	grown.Backends = append(slices.Clone(other.Backends), v1.Backend{IP: netip.MustParseAddr("10.1.1.21"), State: v1.BackendActive}, v1.Backend{IP: netip.MustParseAddr("10.1.1.22"), State: v1.BackendActive})
	if err := r.PutService(ctx, grown); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "limit") {
		t.Fatalf("PUT of a service the sink refuses: %v, want ErrInvalid naming the limit", err)
	}
	rec, _, err := r.serviceRecords.Get(ctx, "default/fixed")
	if err != nil || len(rec.Value.Backends) != 1 {
		t.Errorf("stored record after the refused PUT: %+v, %v; want the old one", rec.Value, err)
	}
	if got := sink.backends(t, "default/fixed"); len(got) != 1 {
		t.Errorf("published %v after the refused PUT, want the old version", got)
	}
}

// The failover regions annotation is published in the service; a
// malformed one is refused at the door, naming the annotation and the
// value, and the published service stays as it was.
func TestServiceFailoverRegions(t *testing.T) {
	e := startEtcd(t)
	r, sink, _ := newRegistry(t, e)
	ctx := context.Background()
	svc := func(regions string) v1.ServiceRequest {
		return v1.ServiceRequest{Namespace: "default", Name: "web", Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}},
			Selector:    map[string]string{"app": "web"},
			Annotations: map[string]string{"trellis.io/global": "true", "trellis.io/affinity": "local", "trellis.io/failover-regions": regions}}
	}
	published := func() []string {
		t.Helper()
		sink.mu.Lock()
		defer sink.mu.Unlock()
		s, ok := sink.services["default/web"]
		if !ok {
			t.Fatal("service default/web not published")
		}
		return s.FailoverRegions
	}
	if err := r.PutService(ctx, svc("ap, us")); err != nil {
		t.Fatal(err)
	}
	if got := published(); !slices.Equal(got, []string{"ap", "us"}) {
		t.Errorf("failover regions %v; want [ap us]", got)
	}
	for _, bad := range []string{"ap,,us", "ap,us,ap", "ap us", "ap,"} {
		err := r.PutService(ctx, svc(bad))
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "trellis.io/failover-regions") || !strings.Contains(err.Error(), fmt.Sprintf("%q", bad)) {
			t.Errorf("failover regions %q: err %v; want ErrInvalid naming the annotation and the value", bad, err)
		}
	}
	if got := published(); !slices.Equal(got, []string{"ap", "us"}) {
		t.Errorf("failover regions after refused changes %v; want [ap us]", got)
	}
	s := svc("")
	delete(s.Annotations, "trellis.io/failover-regions")
	if err := r.PutService(ctx, s); err != nil {
		t.Fatal(err)
	}
	if got := published(); got != nil {
		t.Errorf("failover regions after the annotation was removed %v; want none", got)
	}
}
