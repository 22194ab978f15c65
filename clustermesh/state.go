package clustermesh

import (
	"context"
	"log/slog"
	"maps"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// state is the merged desired state. Observers of every cluster's
// WatchStores record changes as pending deltas; one publisher goroutine
// folds them into a new immutable Snapshot, copying only the maps that
// changed. Under a burst (an initial sync of thousands of entries) many
// deltas fold into one copy, which keeps the cost per update small.
type state struct {
	local string
	log   *slog.Logger

	mu       sync.Mutex
	underlay *underlay                            // every decoded node, and who holds which node IP
	services map[string]map[ServiceName]published // cluster → name → what it publishes of the service
	clusters map[string]clusterInfo
	// encryption is the local cluster's setting as last published. A lost
	// session keeps it: an unreachable API server must not switch a
	// node's encryption off.
	encryption v1.EncryptionConfig
	pending    pendingChanges
	version    uint64

	snap   atomic.Pointer[Snapshot]
	wake   chan struct{}
	subsMu sync.Mutex
	subs   map[chan struct{}]struct{}
}

type pendingChanges struct {
	nodes    map[string]map[string]*v1.Node          // cluster → name → node, nil deletes
	ipcache  map[string]map[netip.Addr]*IPCacheEntry // cluster → ip → entry, nil deletes
	services map[ServiceName]struct{}                // names to merge again
	dropped  map[string]bool                         // clusters drained since the last publication
	clusters bool                                    // a cluster's config changed
	any      bool
}

func (p *pendingChanges) reset() {
	*p = pendingChanges{
		nodes:    make(map[string]map[string]*v1.Node),
		ipcache:  make(map[string]map[netip.Addr]*IPCacheEntry),
		services: make(map[ServiceName]struct{}),
		dropped:  make(map[string]bool),
	}
}

// newState is the merged state of an agent of cluster local whose own
// node has localIPs.
func newState(local string, localIPs []netip.Addr, log *slog.Logger) *state {
	s := &state{
		local:    local,
		log:      log,
		underlay: newUnderlay(local, localIPs),
		services: make(map[string]map[ServiceName]published),
		clusters: make(map[string]clusterInfo),
		wake:     make(chan struct{}, 1),
		subs:     make(map[chan struct{}]struct{}),
	}
	s.pending.reset()
	s.snap.Store(&Snapshot{
		Time:       time.Now(),
		Services:   map[ServiceName]*MergedService{},
		Nodes:      map[string]map[string]*v1.Node{},
		IPCache:    map[string]map[netip.Addr]IPCacheEntry{},
		ClusterIDs: map[string]v1.ClusterID{},
	})
	return s
}

func (s *state) changed() {
	s.pending.any = true
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *state) upsertNode(cluster string, n v1.Node) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.applyNodesLocked(s.underlay.upsert(cluster, n))
}

func (s *state) deleteNode(cluster, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.applyNodesLocked(s.underlay.remove(cluster, name))
}

// applyNodesLocked records the underlay's verdicts as pending node
// changes: an accepted node is upserted, any other removed from the next
// snapshot.
func (s *state) applyNodesLocked(verdicts []verdict) {
	for _, v := range verdicts {
		if s.pending.nodes[v.ref.cluster] == nil {
			s.pending.nodes[v.ref.cluster] = make(map[string]*v1.Node)
		}
		s.pending.nodes[v.ref.cluster][v.ref.name] = v.node
		if v.why != "" {
			s.log.Warn("node kept out of the merged state", "node", v.ref.String(), "reason", v.why)
		}
	}
	if len(verdicts) > 0 {
		s.changed()
	}
}

// excludedNodes counts, per cluster and reason, the nodes kept out of the
// merged state.
func (s *state) excludedNodes() map[string]map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.underlay.excluded()
}

func (s *state) upsertEndpoint(cluster string, ep v1.Endpoint) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pending.ipcache[cluster] == nil {
		s.pending.ipcache[cluster] = make(map[netip.Addr]*IPCacheEntry)
	}
	s.pending.ipcache[cluster][ep.IP] = &IPCacheEntry{Identity: ep.Identity, NodeIP: ep.NodeIP, Cluster: cluster}
	s.changed()
}

func (s *state) deleteEndpoint(cluster string, ip netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pending.ipcache[cluster] == nil {
		s.pending.ipcache[cluster] = make(map[netip.Addr]*IPCacheEntry)
	}
	s.pending.ipcache[cluster][ip] = nil
	s.changed()
}

func (s *state) upsertService(cluster string, svc v1.Service) {
	s.mu.Lock()
	defer s.mu.Unlock()
	name := ServiceName{svc.Namespace, svc.Name}
	p := s.services[cluster][name]
	prev, hadHead := p.head, p.hasHead
	p.head, p.hasHead = svc, true
	p.refresh(prev, hadHead)
	s.setPublishedLocked(cluster, name, p)
}

func (s *state) deleteService(cluster string, name ServiceName) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deleteServiceLocked(cluster, name)
}

func (s *state) deleteServiceLocked(cluster string, name ServiceName) {
	p, ok := s.services[cluster][name]
	if !ok || !p.hasHead {
		return
	}
	p.head, p.hasHead, p.parts, p.complete = v1.Service{}, false, nil, false
	s.setPublishedLocked(cluster, name, p)
}

func (s *state) upsertShard(cluster string, sh v1.BackendShard) {
	s.mu.Lock()
	defer s.mu.Unlock()
	name := ServiceName{sh.Namespace, sh.Service}
	p := s.services[cluster][name]
	if p.shards == nil {
		p.shards = make(map[int]v1.BackendShard)
	}
	p.shards[sh.Shard] = sh
	p.refresh(p.head, p.hasHead)
	s.setPublishedLocked(cluster, name, p)
}

func (s *state) deleteShard(cluster string, name ServiceName, shard int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deleteShardLocked(cluster, name, shard)
}

func (s *state) deleteShardLocked(cluster string, name ServiceName, shard int) {
	p, ok := s.services[cluster][name]
	if _, has := p.shards[shard]; !ok || !has {
		return
	}
	delete(p.shards, shard)
	p.refresh(p.head, p.hasHead)
	s.setPublishedLocked(cluster, name, p)
}

// setPublishedLocked stores what cluster publishes of name, forgetting it
// once there is nothing left, and has the service merged again.
func (s *state) setPublishedLocked(cluster string, name ServiceName, p published) {
	if !p.hasHead && len(p.shards) == 0 {
		delete(s.services[cluster], name)
	} else {
		if s.services[cluster] == nil {
			s.services[cluster] = make(map[ServiceName]published)
		}
		s.services[cluster][name] = p
	}
	s.pending.services[name] = struct{}{}
	s.changed()
}

// setCluster records a cluster's config (its region changes which
// backends are preferred).
func (s *state) setCluster(cfg v1.ClusterConfig) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.clusters[cfg.Name]; ok && old.region == cfg.Region && old.id == cfg.ID {
		return
	}
	s.clusters[cfg.Name] = clusterInfo{region: cfg.Region, id: cfg.ID}
	s.pending.clusters = true
	s.remergeAllLocked()
}

// setEncryption records cluster's encryption setting; only the local
// cluster's matters to this agent (a pair of nodes is encrypted when both
// publish keys, whatever their clusters' settings).
func (s *state) setEncryption(cluster string, enc v1.EncryptionConfig) {
	if cluster != s.local {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.encryption == enc {
		return
	}
	s.log.Info("local cluster's encryption setting", "type", enc.Type, "strict", enc.Strict, "rotation", enc.Rotation)
	s.encryption = enc
	s.changed()
}

// drain removes everything a cluster contributed.
func (s *state) drain(cluster string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for name := range s.services[cluster] {
		s.pending.services[name] = struct{}{}
	}
	delete(s.services, cluster)
	delete(s.clusters, cluster)
	s.pending.clusters = true
	delete(s.pending.nodes, cluster)
	delete(s.pending.ipcache, cluster)
	s.pending.dropped[cluster] = true
	s.changed()
	// Node IPs the cluster held are free for claims it kept out.
	s.applyNodesLocked(s.underlay.drop(cluster))
}

func (s *state) remergeAllLocked() {
	for _, svcs := range s.services {
		for name := range svcs {
			s.pending.services[name] = struct{}{}
		}
	}
	s.changed()
}

// resync asks for a new snapshot even without changes, so reconcilers run
// a full pass and repair drift.
func (s *state) resync() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.changed()
}

// publish folds the pending changes into a new snapshot. It reports
// whether there was anything to publish.
func (s *state) publish() bool {
	s.mu.Lock()
	if !s.pending.any {
		s.mu.Unlock()
		return false
	}
	old := s.snap.Load()
	next := &Snapshot{Services: old.Services, Nodes: old.Nodes, IPCache: old.IPCache, ClusterIDs: old.ClusterIDs, Encryption: s.encryption, Time: time.Now()}
	p := s.pending
	if p.clusters {
		next.ClusterIDs = make(map[string]v1.ClusterID, len(s.clusters))
		for name, c := range s.clusters {
			next.ClusterIDs[name] = c.id
		}
	}

	if len(p.nodes) > 0 || len(p.dropped) > 0 {
		next.Nodes = maps.Clone(old.Nodes)
		for cluster := range p.dropped {
			delete(next.Nodes, cluster)
		}
		for cluster, changes := range p.nodes {
			m := maps.Clone(next.Nodes[cluster])
			if m == nil {
				m = make(map[string]*v1.Node, len(changes))
			}
			applyDeltas(m, changes)
			next.Nodes[cluster] = m
		}
	}
	if len(p.ipcache) > 0 || len(p.dropped) > 0 {
		next.IPCache = maps.Clone(old.IPCache)
		for cluster := range p.dropped {
			delete(next.IPCache, cluster)
		}
		for cluster, changes := range p.ipcache {
			m := maps.Clone(next.IPCache[cluster])
			if m == nil {
				m = make(map[netip.Addr]IPCacheEntry, len(changes))
			}
			for ip, e := range changes {
				if e == nil {
					delete(m, ip)
				} else {
					m[ip] = *e
				}
			}
			next.IPCache[cluster] = m
		}
	}
	if len(p.services) > 0 {
		next.Services = maps.Clone(old.Services)
		for name := range p.services {
			if m := mergeService(name, s.local, s.services, s.clusters); m != nil {
				next.Services[name] = m
			} else {
				delete(next.Services, name)
			}
		}
	}
	s.version++
	next.Version = s.version
	s.pending.reset()
	s.snap.Store(next)
	s.mu.Unlock()

	s.subsMu.Lock()
	for ch := range s.subs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
	s.subsMu.Unlock()
	return true
}

func applyDeltas[K comparable, V any](m map[K]*V, changes map[K]*V) {
	for k, v := range changes {
		if v == nil {
			delete(m, k)
		} else {
			m[k] = v
		}
	}
}

// run publishes whenever something changed, and every resync interval.
func (s *state) run(ctx context.Context, resync time.Duration) {
	t := time.NewTicker(resync)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.wake:
			s.publish()
		case <-t.C:
			s.resync()
		}
	}
}

// subscribe returns a channel that receives a value after each new
// snapshot (coalesced: a slow reader sees one, then reads the latest).
func (s *state) subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	s.subsMu.Lock()
	s.subs[ch] = struct{}{}
	s.subsMu.Unlock()
	return ch, func() {
		s.subsMu.Lock()
		delete(s.subs, ch)
		s.subsMu.Unlock()
	}
}

// pruneNodes deletes the cluster's nodes for which keep is false.
func (s *state) pruneNodes(cluster string, keep func(name string) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, name := range s.underlay.names(cluster) {
		if !keep(name) {
			s.applyNodesLocked(s.underlay.remove(cluster, name))
		}
	}
}

// pruneEndpoints deletes the cluster's endpoints for which keep is false.
func (s *state) pruneEndpoints(cluster string, keep func(ip netip.Addr) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	current := make(map[netip.Addr]bool)
	if !s.pending.dropped[cluster] {
		for ip := range s.snap.Load().IPCache[cluster] {
			current[ip] = true
		}
	}
	for ip, e := range s.pending.ipcache[cluster] {
		current[ip] = e != nil
	}
	for ip, present := range current {
		if present && !keep(ip) {
			if s.pending.ipcache[cluster] == nil {
				s.pending.ipcache[cluster] = make(map[netip.Addr]*IPCacheEntry)
			}
			s.pending.ipcache[cluster][ip] = nil
			s.changed()
		}
	}
}

// pruneServices deletes the cluster's services for which keep is false.
func (s *state) pruneServices(cluster string, keep func(ServiceName) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, p := range s.services[cluster] {
		if p.hasHead && !keep(name) {
			s.deleteServiceLocked(cluster, name)
		}
	}
}

// pruneShards deletes the cluster's backend shards for which keep is
// false.
func (s *state) pruneShards(cluster string, keep func(ServiceName, int) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, p := range s.services[cluster] {
		for i := range p.shards {
			if !keep(name, i) {
				s.deleteShardLocked(cluster, name, i)
			}
		}
	}
}
