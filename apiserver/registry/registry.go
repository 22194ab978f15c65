// Package registry is the standalone source of the mesh API server: an
// HTTP/JSON API through which agents, the CLI and the lab register nodes,
// endpoints (with readiness and labels) and services, for clusters that
// have no Kubernetes API. docs/registry-api.md documents it.
//
// Registry state lives in the cluster's etcd under trellis/registry/<cluster>/
// (a prefix remote clusters cannot read). A request is checked whole at the
// door, stored, and only then applied: to memory (what GET serves) and to
// the Sink (what is published). So what is served and published is always
// what is stored, and a restarted API server reloads and republishes
// exactly what was acknowledged: watchers see no delete.
package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/source"
	"github.com/trellis-mesh/trellis/kvstore"
)

// Design notes.
//
// Store, then apply. Every write takes the lock of its record (one writer
// per record; different records proceed in parallel), checks the request
// against the cluster and the other records, writes the record to etcd
// with a compare on the revision it last saw (kvstore.RecordStore.PutIf),
// and only when that succeeded applies it to memory and the Sink. A
// delete is the same with DeleteIf. A compare that fails means the record
// changed behind this process's back (another replica, a hand edit): the
// write re-reads the revision and tries again, as a replacement (PUT) is
// meant to.
//
// Apply holds mu for the memory change and every Sink call it implies,
// so two writes never publish their aggregates (selector services) in the
// wrong order.
//
// Node writes hold nodeMu from the check to the apply: two nodes must not
// both pass the uniqueness checks (IPs, pod CIDRs) and both be stored.
//
// What cannot be published. The door checks make a refusal by the Sink
// unexpected, but an aggregate can still fail (a selector service grown
// past a limit by endpoint changes, a record stored by an older version
// that no longer validates). Such failures are never only logged: the
// object and the reason are in Problems, which the server reports in
// /readyz, its status and a metric, until the object publishes again.

// NamespaceLabel is the identity label every endpoint gets from its
// namespace, as the Kubernetes source does.
const NamespaceLabel = "k8s:io.kubernetes.pod.namespace"

// Prefix is where a cluster's registry keeps its records:
// trellis/registry/<cluster>/{nodes,endpoints,services}/<id>.
func Prefix(cluster string) string { return "trellis/registry/" + cluster + "/" }

// Config wires a Registry.
type Config struct {
	Cluster v1.ClusterConfig
	// ServiceCIDRs are where service VIPs may lie; empty allows any VIP
	// that is reachable unicast and no pod or node address.
	ServiceCIDRs []netip.Prefix
	Client       *kvstore.Client
	Sink         source.Sink
	Identities   source.IdentityAllocator
	Logger       *slog.Logger
}

// Registry holds the registered objects and publishes what they imply.
type Registry struct {
	cfg Config
	log *slog.Logger

	nodeRecords     *kvstore.RecordStore[v1.NodeRequest]
	endpointRecords *kvstore.RecordStore[v1.EndpointRequest]
	serviceRecords  *kvstore.RecordStore[v1.ServiceRequest]

	locks  keyLocks
	nodeMu sync.Mutex

	mu        sync.Mutex
	nodes     map[string]stored[v1.NodeRequest]
	endpoints map[netip.Addr]endpointState
	services  map[string]stored[v1.ServiceRequest] // "ns/name"
	problems  map[string]string                    // "service ns/name" → why it is not published

	// Indexes, kept by setEndpointLocked/setServiceLocked and their
	// deletes: the endpoints of each namespace, the selector services of
	// each namespace, and each selector service's backends as last built
	// (selection), which endpoint writes patch (refreshServicesLocked).
	nsEndpoints map[string]map[netip.Addr]struct{}
	nsSelectors map[string]map[string]struct{}
	selections  map[string]*selection

	// Selector services to republish after endpoint writes, coalesced
	// (refreshServicesLocked): marked counts the writes that marked some,
	// flushed the writes whose marks are published; flushing says a
	// writer is publishing, and flushedCond (on mu) wakes the writers
	// waiting for it.
	dirty       map[string]map[netip.Addr]struct{} // service → endpoints that changed
	marked      uint64
	flushed     uint64
	flushing    bool
	flushedCond *sync.Cond
}

// stored is a record as etcd holds it.
type stored[T any] struct {
	req T
	rev int64
}

// selection is a selector service's backends as resolved from the
// registered endpoints: sorted by IP, never modified once handed to the
// Sink (a patch builds a new slice).
type selection struct {
	backends []v1.Backend
	// ports every backend carries (the service ports without a target
	// port), shared by them.
	ports []v1.BackendPort
}

type endpointState struct {
	req      v1.EndpointRequest
	rev      int64
	identity v1.NumericIdentity
	labels   map[string]string // identity labels
}

// storeTimeout bounds the write that commits a request.
const storeTimeout = 10 * time.Second

// maxConflictRetries bounds how often a write re-reads a record that
// changed behind its back.
const maxConflictRetries = 3

// New creates an empty registry; Load fills it from etcd.
func New(cfg Config) (*Registry, error) {
	if cfg.Client == nil || cfg.Sink == nil || cfg.Identities == nil {
		return nil, fmt.Errorf("registry: Client, Sink and Identities are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	r := &Registry{
		cfg:       cfg,
		log:       cfg.Logger.With("source", "registry"),
		nodes:     make(map[string]stored[v1.NodeRequest]),
		endpoints: make(map[netip.Addr]endpointState),
		services:  make(map[string]stored[v1.ServiceRequest]),
		problems:  make(map[string]string),
		dirty:     make(map[string]map[netip.Addr]struct{}),

		nsEndpoints: make(map[string]map[netip.Addr]struct{}),
		nsSelectors: make(map[string]map[string]struct{}),
		selections:  make(map[string]*selection),
	}
	r.flushedCond = sync.NewCond(&r.mu)
	prefix := Prefix(cfg.Cluster.Name)
	var err error
	if r.nodeRecords, err = kvstore.NewRecordStore[v1.NodeRequest](cfg.Client, prefix+"nodes/"); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	if r.endpointRecords, err = kvstore.NewRecordStore[v1.EndpointRequest](cfg.Client, prefix+"endpoints/"); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	if r.serviceRecords, err = kvstore.NewRecordStore[v1.ServiceRequest](cfg.Client, prefix+"services/"); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	return r, nil
}

// Load reads the registered objects from etcd, publishes them, and marks
// every kind synced. A stored record that no longer passes the door (it
// was stored by an older version) is not published and is reported in
// Problems: one bad record must not keep a cluster offline, nor vanish
// without a word.
func (r *Registry) Load(ctx context.Context) error {
	nodes, err := loadRecords(ctx, r, "node", r.nodeRecords)
	if err != nil {
		return err
	}
	endpoints, err := loadRecords(ctx, r, "endpoint", r.endpointRecords)
	if err != nil {
		return err
	}
	services, err := loadRecords(ctx, r, "service", r.serviceRecords)
	if err != nil {
		return err
	}
	for _, rec := range nodes {
		n := rec.Value
		node, err := r.checkNode(n)
		if err == nil {
			r.mu.Lock()
			err = r.nodeConflictLocked(n)
			if err == nil {
				r.nodes[n.Name] = stored[v1.NodeRequest]{n, rec.Revision}
				r.publishLocked("node "+n.Name, r.cfg.Sink.UpsertNode(node))
			}
			r.mu.Unlock()
		}
		if err != nil {
			r.stale("node "+rec.ID, err)
		}
	}
	for _, rec := range endpoints {
		if err := r.loadEndpoint(ctx, rec); err != nil {
			r.stale("endpoint "+rec.ID, err)
		}
	}
	for _, rec := range services {
		s := rec.Value
		err := r.checkService(s)
		if err == nil {
			r.mu.Lock()
			r.setServiceLocked(stored[v1.ServiceRequest]{s, rec.Revision})
			r.publishServiceLocked(s)
			r.mu.Unlock()
		} else {
			r.stale("service "+rec.ID, err)
		}
	}
	for _, kind := range []v1.Kind{v1.KindNodes, v1.KindEndpoints, v1.KindServices, v1.KindIdentities} {
		r.cfg.Sink.Synced(kind)
	}
	r.log.Info("registry loaded", "nodes", len(nodes), "endpoints", len(endpoints), "services", len(services))
	return nil
}

func (r *Registry) loadEndpoint(ctx context.Context, rec kvstore.Record[v1.EndpointRequest]) error {
	e := rec.Value
	labels, err := r.checkEndpoint(e)
	if err != nil {
		return err
	}
	r.mu.Lock()
	e, err = r.endpointOnNodeLocked(e)
	r.mu.Unlock()
	if err != nil {
		return err
	}
	id, err := r.cfg.Identities.Acquire(ctx, labels)
	if err != nil {
		return fmt.Errorf("allocate identity: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.setEndpointLocked(endpointState{req: e, rev: rec.Revision, identity: id, labels: labels})
	r.publishLocked("endpoint "+e.IP.String(), r.cfg.Sink.UpsertEndpoint(r.endpointObject(e, id)))
	return nil
}

// stale reports a stored record that is not published.
func (r *Registry) stale(object string, err error) {
	r.mu.Lock()
	r.problems[object] = "stored record not published: " + err.Error()
	r.mu.Unlock()
	r.log.Error("stored registry record not published; fix or delete it", "object", object, "err", err)
}

// loadRecords lists one kind's records; one that does not decode is
// reported in Problems.
func loadRecords[T any](ctx context.Context, r *Registry, kind string, store *kvstore.RecordStore[T]) ([]kvstore.Record[T], error) {
	records, err := store.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("registry: load: %w", err)
	}
	out := make([]kvstore.Record[T], 0, len(records))
	for _, rec := range records {
		if rec.Err != nil {
			r.stale(kind+" "+rec.ID, rec.Err)
			continue
		}
		out = append(out, rec)
	}
	return out, nil
}

// Problems lists the objects whose stored record is not what is published
// now, and why: "service default/big" → the reason.
func (r *Registry) Problems() map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.problems)
}

// publishLocked records the outcome of publishing object.
func (r *Registry) publishLocked(object string, err error) {
	if err == nil {
		delete(r.problems, object)
		return
	}
	if r.problems[object] != err.Error() {
		r.log.Error("registry object not published", "object", object, "err", err)
	}
	r.problems[object] = err.Error()
}

// store writes a record with the revision compare, re-reading the revision
// when the record changed behind this process's back. cur is the revision
// memory holds (0: none).
func store[T any](ctx context.Context, s *kvstore.RecordStore[T], id string, v T, cur int64) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	for range maxConflictRetries {
		rev, err := s.PutIf(ctx, id, v, cur)
		if !errors.Is(err, kvstore.ErrConflict) {
			if err != nil {
				return 0, fmt.Errorf("store %s: %w", s.Key(id), err)
			}
			return rev, nil
		}
		now, ok, err := s.Get(ctx, id)
		if err != nil {
			return 0, fmt.Errorf("store %s: %w", s.Key(id), err)
		}
		cur = 0
		if ok {
			cur = now.Revision
		}
	}
	return 0, fmt.Errorf("store %s: changed by someone else %d times in a row; retry", s.Key(id), maxConflictRetries)
}

// unstore deletes a record with the revision compare, like store.
func unstore[T any](ctx context.Context, s *kvstore.RecordStore[T], id string, cur int64) error {
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	for range maxConflictRetries {
		err := s.DeleteIf(ctx, id, cur)
		if !errors.Is(err, kvstore.ErrConflict) {
			if err != nil {
				return fmt.Errorf("delete %s: %w", s.Key(id), err)
			}
			return nil
		}
		now, ok, err := s.Get(ctx, id)
		if err != nil {
			return fmt.Errorf("delete %s: %w", s.Key(id), err)
		}
		if !ok {
			return nil
		}
		cur = now.Revision
	}
	return fmt.Errorf("delete %s: changed by someone else %d times in a row; retry", s.Key(id), maxConflictRetries)
}

// Nodes.

// PutNode registers or replaces a node.
func (r *Registry) PutNode(ctx context.Context, n v1.NodeRequest) error {
	node, err := r.checkNode(n)
	if err != nil {
		return invalid(err)
	}
	r.nodeMu.Lock()
	defer r.nodeMu.Unlock()
	r.mu.Lock()
	err = r.nodeConflictLocked(n)
	cur := r.nodes[n.Name].rev
	r.mu.Unlock()
	if err != nil {
		return invalid(err)
	}
	rev, err := store(ctx, r.nodeRecords, n.Name, n, cur)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nodes[n.Name] = stored[v1.NodeRequest]{n, rev}
	r.publishLocked("node "+n.Name, r.cfg.Sink.UpsertNode(node))
	return nil
}

// DeleteNode removes a node. Its endpoints stay registered (as a pod
// outlives a deleted Node object in Kubernetes) until they are deleted.
func (r *Registry) DeleteNode(ctx context.Context, name string) error {
	r.nodeMu.Lock()
	defer r.nodeMu.Unlock()
	r.mu.Lock()
	cur, ok := r.nodes[name]
	r.mu.Unlock()
	if !ok {
		return notFound("node %s is not registered", name)
	}
	if err := unstore(ctx, r.nodeRecords, name, cur.rev); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.nodes, name)
	delete(r.problems, "node "+name)
	r.publishLocked("node "+name, r.cfg.Sink.DeleteNode(name))
	return nil
}

// Nodes lists the registered nodes.
func (r *Registry) Nodes() []v1.NodeRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]v1.NodeRequest, 0, len(r.nodes))
	for _, n := range r.nodes {
		out = append(out, n.req)
	}
	slices.SortFunc(out, func(a, b v1.NodeRequest) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Node returns a registered node.
func (r *Registry) Node(name string) (v1.NodeRequest, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n, ok := r.nodes[name]
	return n.req, ok
}

// Endpoints.

// PutEndpoint registers or replaces a pod endpoint and updates the
// services that select it.
func (r *Registry) PutEndpoint(ctx context.Context, e v1.EndpointRequest) error {
	labels, err := r.checkEndpoint(e)
	if err != nil {
		return invalid(err)
	}
	unlock := r.locks.lock("endpoints/" + e.IP.String())
	defer unlock()
	r.mu.Lock()
	e, err = r.endpointOnNodeLocked(e)
	cur := r.endpoints[e.IP].rev
	r.mu.Unlock()
	if err != nil {
		return invalid(err)
	}
	id, err := r.cfg.Identities.Acquire(ctx, labels)
	if err != nil {
		if errors.Is(err, v1.ErrInvalid) {
			return invalid(fmt.Errorf("endpoint %s: labels: %w", e.IP, err))
		}
		return fmt.Errorf("endpoint %s: allocate identity: %w", e.IP, err)
	}
	rev, err := store(ctx, r.endpointRecords, e.IP.String(), e, cur)
	if err != nil {
		r.release(ctx, labels)
		return err
	}
	r.mu.Lock()
	old, had := r.endpoints[e.IP]
	r.setEndpointLocked(endpointState{req: e, rev: rev, identity: id, labels: labels})
	r.publishLocked("endpoint "+e.IP.String(), r.cfg.Sink.UpsertEndpoint(r.endpointObject(e, id)))
	changed := []endpointState{r.endpoints[e.IP]}
	if had {
		changed = append(changed, old)
	}
	r.refreshServicesLocked(changed...)
	r.mu.Unlock()
	if had {
		r.release(ctx, old.labels)
	}
	return nil
}

// DeleteEndpoint removes an endpoint.
func (r *Registry) DeleteEndpoint(ctx context.Context, ip netip.Addr) error {
	unlock := r.locks.lock("endpoints/" + ip.String())
	defer unlock()
	r.mu.Lock()
	cur, ok := r.endpoints[ip]
	r.mu.Unlock()
	if !ok {
		return notFound("endpoint %s is not registered", ip)
	}
	if err := unstore(ctx, r.endpointRecords, ip.String(), cur.rev); err != nil {
		return err
	}
	r.mu.Lock()
	r.deleteEndpointLocked(ip)
	delete(r.problems, "endpoint "+ip.String())
	r.publishLocked("endpoint "+ip.String(), r.cfg.Sink.DeleteEndpoint(ip))
	r.refreshServicesLocked(cur)
	r.mu.Unlock()
	r.release(ctx, cur.labels)
	return nil
}

// release drops an identity reference; a failure is the allocator's to
// retry (its Run deletes references it could not).
func (r *Registry) release(ctx context.Context, labels map[string]string) {
	if err := r.cfg.Identities.Release(ctx, labels); err != nil {
		r.log.Warn("release identity reference", "labels", labels, "err", err)
	}
}

// Endpoints lists the registered endpoints.
func (r *Registry) Endpoints() []v1.EndpointView {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]v1.EndpointView, 0, len(r.endpoints))
	for _, e := range r.endpoints {
		out = append(out, v1.EndpointView{EndpointRequest: e.req, Identity: e.identity})
	}
	slices.SortFunc(out, func(a, b v1.EndpointView) int { return a.IP.Compare(b.IP) })
	return out
}

// Endpoint returns a registered endpoint.
func (r *Registry) Endpoint(ip netip.Addr) (v1.EndpointRequest, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.endpoints[ip]
	return e.req, ok
}

// identityLabels are the labels an endpoint's identity is derived from:
// its namespace plus its own labels, prefixed like the Kubernetes source's.
func identityLabels(e v1.EndpointRequest) map[string]string {
	labels := map[string]string{NamespaceLabel: e.Namespace}
	for k, v := range e.Labels {
		labels["k8s:"+k] = v
	}
	return labels
}

func (r *Registry) endpointObject(e v1.EndpointRequest, id v1.NumericIdentity) v1.Endpoint {
	return v1.Endpoint{Cluster: r.cfg.Cluster.Name, IP: e.IP, Identity: id, NodeIP: e.NodeIP,
		Namespace: e.Namespace, Pod: e.Pod, Ready: e.Ready == nil || *e.Ready}
}

// Services.

func serviceID(namespace, name string) string { return namespace + "/" + name }

// PutService registers or replaces a service.
func (r *Registry) PutService(ctx context.Context, s v1.ServiceRequest) error {
	if err := r.checkService(s); err != nil {
		return invalid(err)
	}
	id := serviceID(s.Namespace, s.Name)
	unlock := r.locks.lock("services/" + id)
	defer unlock()
	r.mu.Lock()
	prev, had := r.services[id]
	r.mu.Unlock()
	rev, err := store(ctx, r.serviceRecords, id, s, prev.rev)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.setServiceLocked(stored[v1.ServiceRequest]{s, rev})
	err = r.publishServiceLocked(s)
	r.mu.Unlock()
	if err == nil {
		return nil
	}
	// The Sink refused what the door let through (a limit the service
	// hits with its backends): put the stored record back as it was, so
	// that what is stored is what is published, and tell the client.
	if rerr := r.restoreService(ctx, id, prev, had, rev); rerr != nil {
		return fmt.Errorf("service %s was stored but cannot be published (%w), and restoring the previous version failed: %v", id, err, rerr)
	}
	return invalid(fmt.Errorf("service %s: %w", id, err))
}

// restoreService undoes a PutService whose result could not be published.
func (r *Registry) restoreService(ctx context.Context, id string, prev stored[v1.ServiceRequest], had bool, rev int64) error {
	if !had {
		if err := unstore(ctx, r.serviceRecords, id, rev); err != nil {
			return err
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		r.deleteServiceLocked(id)
		delete(r.problems, "service "+id)
		ns, name, _ := strings.Cut(id, "/")
		return r.cfg.Sink.DeleteService(ns, name)
	}
	back, err := store(ctx, r.serviceRecords, id, prev.req, rev)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.setServiceLocked(stored[v1.ServiceRequest]{prev.req, back})
	return r.publishServiceLocked(prev.req)
}

// DeleteService removes a service.
func (r *Registry) DeleteService(ctx context.Context, namespace, name string) error {
	id := serviceID(namespace, name)
	unlock := r.locks.lock("services/" + id)
	defer unlock()
	r.mu.Lock()
	cur, ok := r.services[id]
	r.mu.Unlock()
	if !ok {
		return notFound("service %s is not registered", id)
	}
	if err := unstore(ctx, r.serviceRecords, id, cur.rev); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.deleteServiceLocked(id)
	delete(r.problems, "service "+id)
	r.publishLocked("service "+id, r.cfg.Sink.DeleteService(namespace, name))
	return nil
}

// Services lists the registered services.
func (r *Registry) Services() []v1.ServiceRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]v1.ServiceRequest, 0, len(r.services))
	for _, s := range r.services {
		out = append(out, s.req)
	}
	slices.SortFunc(out, func(a, b v1.ServiceRequest) int {
		return strings.Compare(serviceID(a.Namespace, a.Name), serviceID(b.Namespace, b.Name))
	})
	return out
}

// publishServiceLocked publishes s as it is now, resolving its selector
// against every endpoint of its namespace, and records the outcome.
func (r *Registry) publishServiceLocked(s v1.ServiceRequest) error {
	id := serviceID(s.Namespace, s.Name)
	if s.Selector != nil {
		r.selections[id] = r.selectLocked(s)
	}
	return r.sendServiceLocked(s)
}

// sendServiceLocked hands s to the Sink with its current selection (for
// a selector service) and records the outcome.
func (r *Registry) sendServiceLocked(s v1.ServiceRequest) error {
	mesh, _ := source.ParseAnnotations(s.Annotations) // checked at the door
	svc := v1.Service{
		Cluster: r.cfg.Cluster.Name, Namespace: s.Namespace, Name: s.Name,
		Ports: s.Ports, FrontendIPs: s.FrontendIPs, Backends: s.Backends,
		Global: mesh.Global, Shared: mesh.Shared, Affinity: mesh.Affinity, FailoverRegions: mesh.FailoverRegions, HealthCheck: mesh.HealthCheck,
	}
	id := serviceID(s.Namespace, s.Name)
	if s.Selector != nil {
		svc.Backends = r.selections[id].backends
	}
	err := r.cfg.Sink.UpsertService(svc)
	r.publishLocked("service "+id, err)
	return err
}

// selectLocked resolves a selector service's backends from the endpoints
// of its namespace.
func (r *Registry) selectLocked(s v1.ServiceRequest) *selection {
	sel := &selection{}
	for _, p := range s.Ports {
		if p.TargetPort == 0 {
			sel.ports = append(sel.ports, v1.BackendPort{Name: p.Name, Port: p.Port})
		}
	}
	for ip := range r.nsEndpoints[s.Namespace] {
		if e := r.endpoints[ip]; selects(s.Selector, e.req.Labels) {
			sel.backends = append(sel.backends, sel.backend(e))
		}
	}
	slices.SortFunc(sel.backends, func(a, b v1.Backend) int { return a.IP.Compare(b.IP) })
	return sel
}

// backend is the backend an endpoint the selection selects gives.
func (sel *selection) backend(e endpointState) v1.Backend {
	state := v1.BackendActive
	if e.req.Ready != nil && !*e.req.Ready {
		state = v1.BackendUnready
	}
	return v1.Backend{IP: e.req.IP, State: state, Node: e.req.Node, Ports: sel.ports}
}

// patchLocked brings a selector service's selection up to date for the
// endpoints at ips (changed, added or deleted since it was built): each
// is looked up as it is now, so a patch is right whatever happened to it
// in between. The result is a new slice: the old one was handed to the
// Sink, which may keep it. Many changes at once rebuild instead, which is
// linear where one insert per change would not be.
func (r *Registry) patchLocked(s v1.ServiceRequest, sel *selection, ips map[netip.Addr]struct{}) *selection {
	if len(ips) > 16+len(sel.backends)/8 {
		return r.selectLocked(s)
	}
	next := &selection{ports: sel.ports, backends: slices.Clone(sel.backends)}
	for ip := range ips {
		i, found := slices.BinarySearchFunc(next.backends, ip, func(b v1.Backend, ip netip.Addr) int { return b.IP.Compare(ip) })
		e, ok := r.endpoints[ip]
		switch {
		case ok && e.req.Namespace == s.Namespace && selects(s.Selector, e.req.Labels):
			if b := next.backend(e); found {
				next.backends[i] = b
			} else {
				next.backends = slices.Insert(next.backends, i, b)
			}
		case found:
			next.backends = slices.Delete(next.backends, i, i+1)
		}
	}
	return next
}

func selects(selector, labels map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// setEndpointLocked stores an endpoint in memory and the indexes.
func (r *Registry) setEndpointLocked(e endpointState) {
	if old, ok := r.endpoints[e.req.IP]; ok && old.req.Namespace != e.req.Namespace {
		r.deleteEndpointLocked(e.req.IP)
	}
	r.endpoints[e.req.IP] = e
	m := r.nsEndpoints[e.req.Namespace]
	if m == nil {
		m = make(map[netip.Addr]struct{})
		r.nsEndpoints[e.req.Namespace] = m
	}
	m[e.req.IP] = struct{}{}
}

func (r *Registry) deleteEndpointLocked(ip netip.Addr) {
	e, ok := r.endpoints[ip]
	if !ok {
		return
	}
	delete(r.endpoints, ip)
	if m := r.nsEndpoints[e.req.Namespace]; m != nil {
		delete(m, ip)
		if len(m) == 0 {
			delete(r.nsEndpoints, e.req.Namespace)
		}
	}
}

// setServiceLocked stores a service in memory and the indexes; its
// selection is built when it is published.
func (r *Registry) setServiceLocked(s stored[v1.ServiceRequest]) {
	id := serviceID(s.req.Namespace, s.req.Name)
	r.deleteServiceLocked(id)
	r.services[id] = s
	if s.req.Selector == nil {
		return
	}
	m := r.nsSelectors[s.req.Namespace]
	if m == nil {
		m = make(map[string]struct{})
		r.nsSelectors[s.req.Namespace] = m
	}
	m[id] = struct{}{}
}

func (r *Registry) deleteServiceLocked(id string) {
	s, ok := r.services[id]
	if !ok {
		return
	}
	delete(r.services, id)
	delete(r.selections, id)
	delete(r.dirty, id)
	if m := r.nsSelectors[s.req.Namespace]; m != nil {
		delete(m, id)
		if len(m) == 0 {
			delete(r.nsSelectors, s.req.Namespace)
		}
	}
}

// refreshServicesLocked republishes the selector services that select
// any of the changed endpoints (as they are now, or were before), and
// returns once they are published.
//
// A republication patches the service's selection with the endpoints
// that changed (patchLocked) rather than resolving the selector again:
// one endpoint write costs O(log n) to find and O(n) only in copying the
// backends' slice, not a pass over every endpoint of the namespace.
//
// Writes are coalesced: a service of n endpoints still costs O(n) to
// publish (the Publisher's encoding), so one publication per endpoint
// write made a burst of writes to one large service quadratic (about 250
// writes/s at 1000 endpoints). The first writer to find nobody publishing
// becomes the flusher: it lets the writers queued on mu in to mark their
// services too, then publishes everything marked, until nothing is; the
// others wait on flushedCond until a flush that includes their marks is
// done. Every publish still happens under mu, in order, and no write
// returns before its change is published.
func (r *Registry) refreshServicesLocked(changed ...endpointState) {
	marked := false
	for _, e := range changed {
		for id := range r.nsSelectors[e.req.Namespace] {
			if !selects(r.services[id].req.Selector, e.req.Labels) {
				continue
			}
			ips := r.dirty[id]
			if ips == nil {
				ips = make(map[netip.Addr]struct{})
				r.dirty[id] = ips
			}
			ips[e.req.IP], marked = struct{}{}, true
		}
	}
	if !marked {
		return
	}
	r.marked++
	mine := r.marked
	if r.flushing {
		for r.flushed < mine {
			r.flushedCond.Wait()
		}
		return
	}
	r.flushing = true
	for r.flushed < r.marked {
		// Let the writers queued on mu add their marks to this batch.
		r.mu.Unlock()
		runtime.Gosched()
		r.mu.Lock()
		upTo, batch := r.marked, r.dirty
		r.dirty = make(map[string]map[netip.Addr]struct{})
		for id, ips := range batch {
			s, ok := r.services[id]
			if !ok || s.req.Selector == nil {
				continue
			}
			if sel := r.selections[id]; sel != nil {
				r.selections[id] = r.patchLocked(s.req, sel, ips)
				r.sendServiceLocked(s.req)
			} else {
				r.publishServiceLocked(s.req)
			}
		}
		r.flushed = upTo
		r.flushedCond.Broadcast()
	}
	r.flushing = false
}

// keyLocks serialises the writes of one record while letting different
// records proceed in parallel.
type keyLocks struct {
	mu sync.Mutex
	m  map[string]*keyLock
}

type keyLock struct {
	mu    sync.Mutex
	users int
}

// lock takes key's lock and returns the function that releases it.
func (l *keyLocks) lock(key string) (unlock func()) {
	l.mu.Lock()
	if l.m == nil {
		l.m = make(map[string]*keyLock)
	}
	k := l.m[key]
	if k == nil {
		k = &keyLock{}
		l.m[key] = k
	}
	k.users++
	l.mu.Unlock()
	k.mu.Lock()
	return func() {
		k.mu.Unlock()
		l.mu.Lock()
		if k.users--; k.users == 0 {
			delete(l.m, key)
		}
		l.mu.Unlock()
	}
}
