package registry

import (
	"context"
	"errors"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Endpoint writes patch a selector service's published backends
// (patchLocked) instead of resolving the selector again. After many
// random writes from concurrent writers (label changes, readiness flips,
// namespace moves, deletes, and the odd service replacement in between),
// every selector service's published backends are exactly what resolving
// its selector from scratch over the registered endpoints gives, and
// every write found its own change published when it returned.
func TestIncrementalMatchesFullBuild(t *testing.T) {
	e := startEtcd(t)
	r, sink, _ := newRegistry(t, e)
	ctx := context.Background()
	putNode1(t, r)
	seed := uint64(rand.Int64())
	t.Logf("seed %d", seed)
	ports := []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}, {Name: "metrics", Protocol: v1.ProtocolTCP, Port: 9090}}
	namespaces := []string{"default", "other"}
	labelSets := []map[string]string{
		{"app": "web"}, {"app": "web", "track": "canary"}, {"app": "db"}, nil,
	}
	services := []v1.ServiceRequest{
		{Namespace: "default", Name: "web", Ports: ports, Selector: map[string]string{"app": "web"}},
		{Namespace: "default", Name: "canary", Ports: ports, Selector: map[string]string{"track": "canary"}},
		{Namespace: "default", Name: "all", Ports: ports, Selector: map[string]string{}},
		{Namespace: "other", Name: "web", Ports: ports[:1], Selector: map[string]string{"app": "web"}},
		{Namespace: "other", Name: "db", Ports: ports, Selector: map[string]string{"app": "db"}},
	}
	for _, s := range services {
		if err := r.PutService(ctx, s); err != nil {
			t.Fatal(err)
		}
	}

	// Each writer owns a range of IPs, so it knows what its last write to
	// each left, and checks it is published when the write returns.
	const writers, writes, perWriter = 8, 60, 12
	var wg sync.WaitGroup
	for w := range writers {
		rng := rand.New(rand.NewPCG(seed, uint64(w)))
		wg.Go(func() {
			for range writes {
				ip := netip.AddrFrom4([4]byte{10, 1, 1, byte(10 + w*perWriter + rng.IntN(perWriter))})
				if rng.IntN(6) == 0 {
					if err := r.DeleteEndpoint(ctx, ip); err != nil && !isNotFound(err) {
						t.Errorf("delete %s: %v", ip, err)
						return
					}
					checkPublished(t, r, sink, services, ip)
					continue
				}
				ep := endpoint(ip.String(), namespaces[rng.IntN(len(namespaces))], rng.IntN(3) > 0, labelSets[rng.IntN(len(labelSets))])
				if err := r.PutEndpoint(ctx, ep); err != nil {
					t.Errorf("put %s: %v", ip, err)
					return
				}
				checkPublished(t, r, sink, services, ip)
			}
		})
	}
	// A service replaced while the endpoint writes go on rebuilds its
	// selection; the patches that follow start from it.
	rng := rand.New(rand.NewPCG(seed, writers))
	for range 5 {
		s := services[rng.IntN(len(services))]
		if err := r.PutService(ctx, s); err != nil {
			t.Error(err)
		}
	}
	wg.Wait()
	for _, s := range services {
		want := fullBuild(r, s)
		sink.mu.Lock()
		got := sink.services[s.Namespace+"/"+s.Name].Backends
		sink.mu.Unlock()
		if !slices.EqualFunc(got, want, sameBackend) {
			t.Errorf("%s/%s: published %v, a full build gives %v", s.Namespace, s.Name, got, want)
		}
	}
}

func isNotFound(err error) bool { return errors.Is(err, ErrNotFound) }

// checkPublished checks, right after a write to ip returned, that every
// service's published backends hold ip as the registry holds it now (the
// writer owns ip: nobody else changed it since).
func checkPublished(t *testing.T, r *Registry, sink *recordingSink, services []v1.ServiceRequest, ip netip.Addr) {
	t.Helper()
	for _, s := range services {
		var want *v1.Backend
		for _, b := range fullBuild(r, s) {
			if b.IP == ip {
				want = &b
			}
		}
		sink.mu.Lock()
		var got *v1.Backend
		for _, b := range sink.services[s.Namespace+"/"+s.Name].Backends {
			if b.IP == ip {
				got = &b
			}
		}
		sink.mu.Unlock()
		if (got == nil) != (want == nil) || got != nil && !sameBackend(*got, *want) {
			t.Errorf("write to %s returned; %s/%s publishes it as %v, want %v", ip, s.Namespace, s.Name, got, want)
		}
	}
}

// fullBuild resolves s's selector over the registered endpoints, as the
// registry did before it patched: the reference the patches must match.
func fullBuild(r *Registry, s v1.ServiceRequest) []v1.Backend {
	var out []v1.Backend
	for _, e := range r.Endpoints() {
		if e.Namespace != s.Namespace || !selects(s.Selector, e.Labels) {
			continue
		}
		state := v1.BackendActive
		if e.Ready != nil && !*e.Ready {
			state = v1.BackendUnready
		}
		b := v1.Backend{IP: e.IP, State: state, Node: e.Node}
		for _, p := range s.Ports {
			if p.TargetPort == 0 {
				b.Ports = append(b.Ports, v1.BackendPort{Name: p.Name, Port: p.Port})
			}
		}
		out = append(out, b)
	}
	return out // Endpoints() is sorted by IP
}

func sameBackend(a, b v1.Backend) bool {
	return a.IP == b.IP && a.State == b.State && a.Node == b.Node && a.Zone == b.Zone && slices.Equal(a.Ports, b.Ports)
}
