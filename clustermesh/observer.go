package clustermesh

import (
	"net/netip"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
)

// Observers feed one cluster's WatchStores into the merged state. On
// OnSync they prune what an earlier session of the same cluster left in
// the state and the new session no longer has: the synced-before-delete
// rule across sessions.

type nodeObserver struct {
	cluster string
	state   *state
	store   func() *kvstore.WatchStore[v1.Node]
}

func (o nodeObserver) OnUpsert(_ string, n v1.Node) { o.state.upsertNode(o.cluster, n) }
func (o nodeObserver) OnDelete(_ string, n v1.Node) { o.state.deleteNode(o.cluster, n.Name) }
func (o nodeObserver) OnSync() {
	ws := o.store()
	o.state.pruneNodes(o.cluster, func(name string) bool {
		_, ok := ws.Get(v1.NodeKey(o.cluster, name))
		return ok
	})
}

type endpointObserver struct {
	cluster string
	state   *state
	store   func() *kvstore.WatchStore[v1.Endpoint]
}

func (o endpointObserver) OnUpsert(_ string, ep v1.Endpoint) { o.state.upsertEndpoint(o.cluster, ep) }
func (o endpointObserver) OnDelete(_ string, ep v1.Endpoint) {
	o.state.deleteEndpoint(o.cluster, ep.IP)
}
func (o endpointObserver) OnSync() {
	ws := o.store()
	o.state.pruneEndpoints(o.cluster, func(ip netip.Addr) bool {
		_, ok := ws.Get(v1.EndpointKey(o.cluster, ip))
		return ok
	})
}

type serviceObserver struct {
	cluster string
	state   *state
	store   func() *kvstore.WatchStore[v1.Service]
	// noShards: the cluster publishes no backend shards (it does not
	// advertise them), so none an earlier session held is wanted.
	noShards bool
}

func (o serviceObserver) OnUpsert(_ string, s v1.Service) { o.state.upsertService(o.cluster, s) }
func (o serviceObserver) OnDelete(_ string, s v1.Service) {
	o.state.deleteService(o.cluster, ServiceName{s.Namespace, s.Name})
}
func (o serviceObserver) OnSync() {
	ws := o.store()
	o.state.pruneServices(o.cluster, func(n ServiceName) bool {
		_, ok := ws.Get(v1.ServiceKey(o.cluster, n.Namespace, n.Name))
		return ok
	})
	if o.noShards {
		o.state.pruneShards(o.cluster, func(ServiceName, int) bool { return false })
	}
}

type backendShardObserver struct {
	cluster string
	state   *state
	store   func() *kvstore.WatchStore[v1.BackendShard]
}

func (o backendShardObserver) OnUpsert(_ string, sh v1.BackendShard) {
	o.state.upsertShard(o.cluster, sh)
}
func (o backendShardObserver) OnDelete(_ string, sh v1.BackendShard) {
	o.state.deleteShard(o.cluster, ServiceName{sh.Namespace, sh.Service}, sh.Shard)
}
func (o backendShardObserver) OnSync() {
	ws := o.store()
	o.state.pruneShards(o.cluster, func(n ServiceName, i int) bool {
		_, ok := ws.Get(v1.BackendShardKey(o.cluster, n.Namespace, n.Name, i))
		return ok
	})
}

// identityObserver needs no merged state (identities are read from the
// store for status and, later, policy).
type identityObserver struct{}

func (identityObserver) OnUpsert(string, v1.Identity) {}
func (identityObserver) OnDelete(string, v1.Identity) {}
func (identityObserver) OnSync()                      {}
