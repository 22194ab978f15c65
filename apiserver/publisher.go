package apiserver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
)

// Publisher is the source.Sink the server hands to its source: it checks
// each object against the cluster's config, encodes it and gives it to the
// SyncStore of its kind. A service too large for one value is split into
// backend shards (see shards.go).
type Publisher struct {
	cluster v1.ClusterConfig
	client  *kvstore.Client
	stores  map[v1.Kind]*kvstore.SyncStore
	log     *slog.Logger

	// shardMu serialises service publications: a sharded service's layout
	// and the order of its writes.
	shardMu sync.Mutex
	// layouts are the sharded services' assignments, by namespace/name.
	layouts map[string]*shardLayout
	// seen are the services published in this run, by namespace/name: a
	// service not seen yet may have shards from an earlier run to adopt.
	seen map[string]bool
	// encoded are the services published as one value, by
	// namespace/name: their backends' JSON, so that republishing one
	// encodes only the backends that changed (wholeEncoder).
	encoded map[string]*wholeEncoder

	identitiesOnce   sync.Once
	identitiesSynced chan struct{}

	mu     sync.Mutex
	synced map[v1.Kind]bool
}

// publishedKinds are the kinds a Publisher owns a SyncStore for;
// identities are written by the allocator.
var publishedKinds = []v1.Kind{v1.KindNodes, v1.KindEndpoints, v1.KindServices, v1.KindBackends}

// NewPublisher creates one SyncStore per kind. withLease binds the keys to
// the writer's leases (the Kubernetes source, whose truth lives elsewhere);
// the registry keeps its keys without a lease because they are its truth.
func NewPublisher(client *kvstore.Client, cluster v1.ClusterConfig, withLease bool) (*Publisher, error) {
	p := &Publisher{cluster: cluster, client: client, stores: make(map[v1.Kind]*kvstore.SyncStore),
		synced: make(map[v1.Kind]bool), identitiesSynced: make(chan struct{}),
		log: slog.Default().With("component", "publisher"), layouts: make(map[string]*shardLayout), seen: make(map[string]bool),
		encoded: make(map[string]*wholeEncoder)}
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

// adoptTimeout bounds the read of a service's shards from an earlier run.
const adoptTimeout = 5 * time.Second

// UpsertService publishes a service. Its backends must be in the
// cluster's pod CIDRs. A service whose value would pass v1.MaxValueSize is
// published in backend shards. The errors that refuse a service (nothing
// is stored then) match v1.ErrInvalid (the service does not validate, or
// a source set BackendShards) or v1.ErrTooLarge (a limit of the wire
// format: a backend larger than a shard, more than v1.MaxBackendShards
// shards, or ports and frontends that alone pass the value limit), and
// name the service and the limit.
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
	if len(svc.BackendShards) > 0 {
		return fmt.Errorf("service %s: backendShards is set by the server, not the source: %w", name, v1.ErrInvalid)
	}
	if err := svc.Validate(); err != nil {
		return fmt.Errorf("service %s: %w", name, err)
	}

	p.shardMu.Lock()
	defer p.shardMu.Unlock()
	services, backends := p.stores[v1.KindServices], p.stores[v1.KindBackends]
	key := v1.ServiceKey(svc.Cluster, svc.Namespace, svc.Name)
	prev := p.layouts[name]
	// Back to one value only when the backends fit in half of it, so a
	// service near the limit does not flip between the two forms.
	limit := v1.MaxValueSize
	if prev != nil {
		limit /= 2
	}
	enc := p.encoded[name]
	if enc == nil {
		enc = &wholeEncoder{}
	}
	data, fits, err := enc.encode(svc, limit)
	if err != nil {
		return fmt.Errorf("service %s: %w", name, err)
	}
	if !fits {
		delete(p.encoded, name)
	}
	if fits {
		if err := services.Upsert(key, data); err != nil {
			return err
		}
		p.encoded[name] = enc
		if prev != nil {
			for i := range prev.shards {
				backends.Delete(v1.BackendShardKey(svc.Cluster, svc.Namespace, svc.Name, i))
			}
			delete(p.layouts, name)
		}
		p.seen[name] = true
		return nil
	}

	from := prev
	if from == nil && !p.seen[name] {
		ctx, cancel := context.WithTimeout(context.Background(), adoptTimeout)
		from, err = adoptLayout(ctx, p.client, svc.Cluster, svc.Namespace, svc.Name)
		cancel()
		if err != nil {
			p.log.Warn("publishing a sharded service without its earlier shards' layout: every shard is rewritten", "service", name, "err", err)
		}
	}
	if from == nil {
		from = freshLayout()
	}
	next, err := from.next(svc, clock())
	if err != nil {
		return err
	}
	w, err := next.writes(svc, from)
	if err != nil {
		return err
	}
	// The order does not matter to readers (shards.go); shards first only
	// makes the service value usually find them in place.
	for i, data := range w.upserts {
		if err := backends.Upsert(v1.BackendShardKey(svc.Cluster, svc.Namespace, svc.Name, i), data); err != nil {
			return err
		}
	}
	for _, i := range w.deletes {
		if err := backends.Delete(v1.BackendShardKey(svc.Cluster, svc.Namespace, svc.Name, i)); err != nil {
			return err
		}
	}
	if err := services.Upsert(key, w.head); err != nil {
		return err
	}
	next.published()
	p.layouts[name] = next
	p.seen[name] = true
	return nil
}

// wholeEncoder encodes a service published as one value, keeping each
// backend's JSON from the last encode: a republication that changes one
// backend of a thousand marshals that one and copies the others' bytes,
// where v1.Encode would marshal all of them again. The bytes are the
// same as v1.Encode's (TestWholeEncoderMatchesEncode).
type wholeEncoder struct {
	// last are the backends of the last encode, in its order; spare is
	// the slice the next encode fills (the two swap).
	last, spare []*encodedBackend
}

type encodedBackend struct {
	b    v1.Backend
	json []byte
}

// encode encodes svc (validated) with its backends in its own value, and
// reports whether that is at most limit bytes. Large services are not
// encoded: a backend is at least 30 bytes of JSON.
//
// Backends are matched with the last encode's in order (a source sends
// them in a stable order, so an insert or a removal shifts the rest by
// one), falling back to a lookup by IP built only when the order breaks.
//
// The service is encoded by v1.Encode with its first backend only (which
// sets the version and checks the rest of the value), and the backends'
// JSON replaces that one's: the first `"backends":[` in the value is the
// field's, because the fields before it (names, ports, frontend IPs)
// cannot hold that text unescaped.
func (e *wholeEncoder) encode(svc v1.Service, limit int) ([]byte, bool, error) {
	if len(svc.Backends)*30 > limit {
		return nil, false, nil
	}
	if len(svc.Backends) == 0 {
		data, err := v1.Encode(svc)
		if err != nil {
			return nil, false, err
		}
		return data, len(data) <= limit, nil
	}
	next := e.spare[:0]
	var byIP map[netip.Addr]int
	size, j := 0, 0
	for _, b := range svc.Backends {
		k := -1
		if j < len(e.last) && e.last[j].b.IP == b.IP {
			k = j
		} else {
			if byIP == nil {
				byIP = make(map[netip.Addr]int, len(e.last))
				for i, c := range e.last {
					byIP[c.b.IP] = i
				}
			}
			if i, ok := byIP[b.IP]; ok {
				k = i
			}
		}
		var c *encodedBackend
		if k >= 0 {
			j = k + 1
			c = e.last[k]
		}
		if k < 0 || !sameBackend(c.b, b) {
			data, err := json.Marshal(b)
			if err != nil {
				return nil, false, fmt.Errorf("backend %s: %w", b.IP, err)
			}
			c = &encodedBackend{b: b, json: data}
		}
		next = append(next, c)
		size += len(c.json) + 1
	}
	clear(e.last) // drop the references the spare would keep
	e.last, e.spare = next, e.last[:0]

	head := svc
	head.Backends = svc.Backends[:1]
	one, err := v1.Encode(head)
	if errors.Is(err, v1.ErrTooLarge) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	field := []byte(`"backends":[`)
	at := bytes.Index(one, field)
	first := next[0].json
	if at < 0 || !bytes.HasPrefix(one[at+len(field):], first) || len(one) <= at+len(field)+len(first) || one[at+len(field)+len(first)] != ']' {
		// Not the layout this relies on: a bug here, not in the input.
		return nil, false, fmt.Errorf("encode service %s/%s: backends field not where expected in %q", svc.Namespace, svc.Name, one)
	}
	start, rest := at+len(field), one[at+len(field)+len(first):]
	data := make([]byte, 0, len(one)+size)
	data = append(data, one[:start]...)
	for i, c := range next {
		if i > 0 {
			data = append(data, ',')
		}
		data = append(data, c.json...)
	}
	data = append(data, rest...)
	if len(data) > v1.MaxValueSize {
		return nil, false, nil
	}
	return data, len(data) <= limit, nil
}

// DeleteService withdraws a service and its shards.
func (p *Publisher) DeleteService(namespace, name string) error {
	p.shardMu.Lock()
	defer p.shardMu.Unlock()
	id := namespace + "/" + name
	delete(p.encoded, id)
	if l := p.layouts[id]; l != nil {
		for i := range l.shards {
			if err := p.stores[v1.KindBackends].Delete(v1.BackendShardKey(p.cluster.Name, namespace, name, i)); err != nil {
				return err
			}
		}
		delete(p.layouts, id)
	}
	p.seen[id] = true
	return p.stores[v1.KindServices].Delete(v1.ServiceKey(p.cluster.Name, namespace, name))
}

// Synced marks kind's initial state complete. For identities, whose keys
// the allocator writes directly, Run writes the canary. Services include
// their shards.
func (p *Publisher) Synced(kind v1.Kind) {
	if s, ok := p.stores[kind]; ok {
		s.MarkSynced()
		if kind == v1.KindServices {
			p.stores[v1.KindBackends].MarkSynced()
		}
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
