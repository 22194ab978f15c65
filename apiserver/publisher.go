package apiserver

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
)

// Publisher is the source.Sink the server hands to its source: it checks
// each object against the cluster's config, encodes it and gives it to the
// SyncStore of its kind.
type Publisher struct {
	cluster v1.ClusterConfig
	client  *kvstore.Client
	stores  map[v1.Kind]*kvstore.SyncStore

	identitiesOnce   sync.Once
	identitiesSynced chan struct{}

	mu     sync.Mutex
	synced map[v1.Kind]bool
}

// publishedKinds are the kinds a Publisher owns a SyncStore for;
// identities are written by the allocator.
var publishedKinds = []v1.Kind{v1.KindNodes, v1.KindEndpoints, v1.KindServices}

// NewPublisher creates one SyncStore per kind. withLease binds the keys to
// the writer's leases (the Kubernetes source, whose truth lives elsewhere);
// the registry keeps its keys without a lease because they are its truth.
func NewPublisher(client *kvstore.Client, cluster v1.ClusterConfig, withLease bool) (*Publisher, error) {
	p := &Publisher{cluster: cluster, client: client, stores: make(map[v1.Kind]*kvstore.SyncStore),
		synced: make(map[v1.Kind]bool), identitiesSynced: make(chan struct{})}
	for _, kind := range publishedKinds {
		s, err := kvstore.NewSyncStore(client, kvstore.SyncStoreConfig{
			Prefix:    v1.KindPrefix(kind, cluster.Name),
			SyncedKey: v1.SyncedKey(cluster.Name, kind),
			WithLease: withLease,
			Name:      string(kind),
		})
		if err != nil {
			return nil, err
		}
		p.stores[kind] = s
	}
	return p, nil
}

// Run runs the SyncStores until ctx ends.
func (p *Publisher) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		p.writeIdentityCanary(ctx)
	}()
	for _, s := range p.stores {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.Run(ctx)
		}()
	}
	wg.Wait()
}

// AllSynced reports whether every kind, identities included, has written
// its canary.
func (p *Publisher) AllSynced() bool {
	for _, s := range p.stores {
		if !s.Stats().Synced {
			return false
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.synced[v1.KindIdentities]
}

// Stats reports each store's state.
func (p *Publisher) Stats() map[v1.Kind]kvstore.SyncStoreStats {
	out := make(map[v1.Kind]kvstore.SyncStoreStats, len(p.stores))
	for k, s := range p.stores {
		out[k] = s.Stats()
	}
	return out
}

func (p *Publisher) ownCluster(kind, name, cluster string) error {
	if cluster != p.cluster.Name {
		return fmt.Errorf("%s %s names cluster %q, but this API server publishes cluster %q", kind, name, cluster, p.cluster.Name)
	}
	return nil
}

func (p *Publisher) inPodCIDRs(what string, ip netip.Addr) error {
	if !p.cluster.Contains(ip) {
		return fmt.Errorf("%s %s is outside the cluster's pod CIDRs %v", what, ip, p.cluster.PodCIDRs)
	}
	return nil
}

// UpsertNode publishes a node. Its pod CIDRs must lie inside the
// cluster's.
func (p *Publisher) UpsertNode(n v1.Node) error {
	if n.Cluster == "" {
		n.Cluster = p.cluster.Name
	}
	if err := p.ownCluster("node", n.Name, n.Cluster); err != nil {
		return err
	}
	for _, cidr := range n.PodCIDRs {
		if !p.cluster.Contains(cidr.Addr()) || !p.cluster.Contains(lastAddr(cidr)) {
			return fmt.Errorf("node %s: pod CIDR %s is outside the cluster's pod CIDRs %v", n.Name, cidr, p.cluster.PodCIDRs)
		}
	}
	data, err := v1.Encode(n)
	if err != nil {
		return fmt.Errorf("node %s: %w", n.Name, err)
	}
	return p.stores[v1.KindNodes].Upsert(v1.NodeKey(n.Cluster, n.Name), data)
}

// DeleteNode withdraws a node.
func (p *Publisher) DeleteNode(name string) error {
	return p.stores[v1.KindNodes].Delete(v1.NodeKey(p.cluster.Name, name))
}

// UpsertEndpoint publishes an endpoint. Its IP must be in the cluster's
// pod CIDRs and its identity must carry the cluster's ID.
func (p *Publisher) UpsertEndpoint(ep v1.Endpoint) error {
	if ep.Cluster == "" {
		ep.Cluster = p.cluster.Name
	}
	if err := p.ownCluster("endpoint", ep.IP.String(), ep.Cluster); err != nil {
		return err
	}
	if err := p.inPodCIDRs("endpoint IP", ep.IP); err != nil {
		return err
	}
	if got := ep.Identity.ClusterID(); got != p.cluster.ID {
		return fmt.Errorf("endpoint %s: identity %d carries cluster id %d, this cluster's id is %d", ep.IP, ep.Identity, got, p.cluster.ID)
	}
	data, err := v1.Encode(ep)
	if err != nil {
		return fmt.Errorf("endpoint %s: %w", ep.IP, err)
	}
	return p.stores[v1.KindEndpoints].Upsert(v1.EndpointKey(ep.Cluster, ep.IP), data)
}

// DeleteEndpoint withdraws an endpoint.
func (p *Publisher) DeleteEndpoint(ip netip.Addr) error {
	return p.stores[v1.KindEndpoints].Delete(v1.EndpointKey(p.cluster.Name, ip))
}

// UpsertService publishes a service. Its backends must be in the
// cluster's pod CIDRs.
func (p *Publisher) UpsertService(svc v1.Service) error {
	if svc.Cluster == "" {
		svc.Cluster = p.cluster.Name
	}
	name := svc.Namespace + "/" + svc.Name
	if err := p.ownCluster("service", name, svc.Cluster); err != nil {
		return err
	}
	for _, b := range svc.Backends {
		if err := p.inPodCIDRs("service "+name+" backend", b.IP); err != nil {
			return err
		}
	}
	data, err := v1.Encode(svc)
	if err != nil {
		return fmt.Errorf("service %s: %w", name, err)
	}
	return p.stores[v1.KindServices].Upsert(v1.ServiceKey(svc.Cluster, svc.Namespace, svc.Name), data)
}

// DeleteService withdraws a service.
func (p *Publisher) DeleteService(namespace, name string) error {
	return p.stores[v1.KindServices].Delete(v1.ServiceKey(p.cluster.Name, namespace, name))
}

// Synced marks kind's initial state complete. For identities, whose keys
// the allocator writes directly, Run writes the canary.
func (p *Publisher) Synced(kind v1.Kind) {
	if s, ok := p.stores[kind]; ok {
		s.MarkSynced()
		return
	}
	if kind == v1.KindIdentities {
		p.identitiesOnce.Do(func() { close(p.identitiesSynced) })
	}
}

// writeIdentityCanary waits for the source's identities to be synced, then
// writes the canary, retrying until it lands or ctx ends.
func (p *Publisher) writeIdentityCanary(ctx context.Context) {
	select {
	case <-p.identitiesSynced:
	case <-ctx.Done():
		return
	}
	key := v1.SyncedKey(p.cluster.Name, v1.KindIdentities)
	for delay := 100 * time.Millisecond; ; delay = min(2*delay, 5*time.Second) {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := p.client.Put(rctx, key, v1.EncodeTimestamp(time.Now()))
		cancel()
		if err == nil {
			p.mu.Lock()
			p.synced[v1.KindIdentities] = true
			p.mu.Unlock()
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
	}
}

// lastAddr is the highest address in p.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().AsSlice()
	bits := p.Bits()
	for i := range a {
		for b := 0; b < 8; b++ {
			if i*8+b >= bits {
				a[i] |= 0x80 >> b
			}
		}
	}
	out, _ := netip.AddrFromSlice(a)
	return out
}
