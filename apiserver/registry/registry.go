// Package registry is the standalone source of the mesh API server: an
// HTTP/JSON API through which agents, the CLI and the lab register nodes,
// endpoints (with readiness and labels) and services, for clusters that
// have no Kubernetes API. docs/registry-api.md documents it.
//
// Registry state lives in the cluster's etcd under trellis/registry/<cluster>/
// (a prefix remote clusters cannot read), written before a request is
// answered, so a restarted API server reloads every object and republishes
// the same keys: watchers see no delete.
package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/source"
	"github.com/trellis-mesh/trellis/kvstore"
)

// NamespaceLabel is the identity label every endpoint gets from its
// namespace, as the Kubernetes source does.
const NamespaceLabel = "k8s:io.kubernetes.pod.namespace"

// Prefix is where a cluster's registry keeps its records:
// trellis/registry/<cluster>/{nodes,endpoints,services}/<id>.
func Prefix(cluster string) string { return "trellis/registry/" + cluster + "/" }

// Config wires a Registry.
type Config struct {
	Cluster    v1.ClusterConfig
	Client     *kvstore.Client
	Sink       source.Sink
	Identities source.IdentityAllocator
	Logger     *slog.Logger
}

// Registry holds the registered objects and publishes what they imply.
type Registry struct {
	cfg Config
	log *slog.Logger

	// The records, one store per kind; a record is written before a
	// request is answered.
	nodeRecords     *kvstore.RecordStore[v1.NodeRequest]
	endpointRecords *kvstore.RecordStore[v1.EndpointRequest]
	serviceRecords  *kvstore.RecordStore[v1.ServiceRequest]

	mu        sync.Mutex
	nodes     map[string]v1.NodeRequest
	endpoints map[netip.Addr]endpointState
	services  map[string]v1.ServiceRequest // "ns/name"
}

type endpointState struct {
	req      v1.EndpointRequest
	identity v1.NumericIdentity
	labels   map[string]string // identity labels
}

// storeTimeout bounds the write that commits a request.
const storeTimeout = 10 * time.Second

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
		nodes:     make(map[string]v1.NodeRequest),
		endpoints: make(map[netip.Addr]endpointState),
		services:  make(map[string]v1.ServiceRequest),
	}
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
// every kind synced. A stored record that no longer validates is logged
// and skipped, not fatal: one bad record must not keep a cluster offline.
func (r *Registry) Load(ctx context.Context) error {
	nodes, err := loadRecords(ctx, r, r.nodeRecords)
	if err != nil {
		return err
	}
	endpoints, err := loadRecords(ctx, r, r.endpointRecords)
	if err != nil {
		return err
	}
	services, err := loadRecords(ctx, r, r.serviceRecords)
	if err != nil {
		return err
	}
	for _, n := range nodes {
		if err := r.applyNode(n); err != nil {
			r.log.Warn("skipping stored node that no longer validates", "node", n.Name, "err", err)
		}
	}
	for _, e := range endpoints {
		if err := r.applyEndpoint(ctx, e); err != nil {
			r.log.Warn("skipping stored endpoint that no longer validates", "ip", e.IP, "err", err)
		}
	}
	for _, s := range services {
		if err := r.applyService(s); err != nil {
			r.log.Warn("skipping stored service that no longer validates", "service", s.Namespace+"/"+s.Name, "err", err)
		}
	}
	for _, kind := range []v1.Kind{v1.KindNodes, v1.KindEndpoints, v1.KindServices, v1.KindIdentities} {
		r.cfg.Sink.Synced(kind)
	}
	r.log.Info("registry loaded", "nodes", len(nodes), "endpoints", len(endpoints), "services", len(services))
	return nil
}

// loadRecords lists one kind's records, logging and skipping those that
// do not decode.
func loadRecords[T any](ctx context.Context, r *Registry, store *kvstore.RecordStore[T]) ([]T, error) {
	records, err := store.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("registry: load: %w", err)
	}
	out := make([]T, 0, len(records))
	for _, rec := range records {
		if rec.Err != nil {
			r.log.Warn("skipping unreadable registry record", "err", rec.Err)
			continue
		}
		out = append(out, rec.Value)
	}
	return out, nil
}

// persist writes a record; it is the commit point of a request.
func persist[T any](ctx context.Context, store *kvstore.RecordStore[T], id string, v T) error {
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	if err := store.Put(ctx, id, v); err != nil {
		return fmt.Errorf("store %s: %w", store.Key(id), err)
	}
	return nil
}

func unpersist[T any](ctx context.Context, store *kvstore.RecordStore[T], id string) error {
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	if err := store.Delete(ctx, id); err != nil {
		return fmt.Errorf("delete %s: %w", store.Key(id), err)
	}
	return nil
}

// PutNode registers or replaces a node.
func (r *Registry) PutNode(ctx context.Context, n v1.NodeRequest) error {
	if err := r.applyNode(n); err != nil {
		return invalid(err)
	}
	return persist(ctx, r.nodeRecords, n.Name, n)
}

func (r *Registry) applyNode(n v1.NodeRequest) error {
	if err := r.cfg.Sink.UpsertNode(v1.Node{
		Cluster: r.cfg.Cluster.Name, Name: n.Name, IPs: n.IPs, PodCIDRs: n.PodCIDRs,
		WireGuardPublicKey: n.WireGuardPublicKey, HealthAddr: n.HealthAddr, Region: n.Region, Zone: n.Zone,
	}); err != nil {
		return err
	}
	r.mu.Lock()
	r.nodes[n.Name] = n
	r.mu.Unlock()
	return nil
}

// DeleteNode removes a node.
func (r *Registry) DeleteNode(ctx context.Context, name string) error {
	r.mu.Lock()
	_, ok := r.nodes[name]
	delete(r.nodes, name)
	r.mu.Unlock()
	if !ok {
		return notFound("node %s is not registered", name)
	}
	if err := r.cfg.Sink.DeleteNode(name); err != nil {
		return err
	}
	return unpersist(ctx, r.nodeRecords, name)
}

// Nodes lists the registered nodes.
func (r *Registry) Nodes() []v1.NodeRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.SortedFunc(maps.Values(r.nodes), func(a, b v1.NodeRequest) int { return strings.Compare(a.Name, b.Name) })
}

// PutEndpoint registers or replaces a pod endpoint and updates the
// services that select it.
func (r *Registry) PutEndpoint(ctx context.Context, e v1.EndpointRequest) error {
	if err := r.applyEndpoint(ctx, e); err != nil {
		return err
	}
	return persist(ctx, r.endpointRecords, e.IP.String(), e)
}

func (r *Registry) applyEndpoint(ctx context.Context, e v1.EndpointRequest) error {
	if !e.IP.IsValid() {
		return invalid(fmt.Errorf("endpoint: ip is required"))
	}
	if e.Namespace == "" {
		return invalid(fmt.Errorf("endpoint %s: namespace is required", e.IP))
	}
	if !r.cfg.Cluster.Contains(e.IP) {
		return invalid(fmt.Errorf("endpoint IP %s is outside the cluster's pod CIDRs %v", e.IP, r.cfg.Cluster.PodCIDRs))
	}
	labels := identityLabels(e)
	id, err := r.cfg.Identities.Acquire(ctx, labels)
	if err != nil {
		return fmt.Errorf("endpoint %s: allocate identity: %w", e.IP, err)
	}
	ready := e.Ready == nil || *e.Ready
	ep := v1.Endpoint{Cluster: r.cfg.Cluster.Name, IP: e.IP, Identity: id, NodeIP: e.NodeIP, Namespace: e.Namespace, Pod: e.Pod, Ready: ready}
	if err := r.cfg.Sink.UpsertEndpoint(ep); err != nil {
		r.cfg.Identities.Release(ctx, labels)
		return invalid(err)
	}
	r.mu.Lock()
	old, had := r.endpoints[e.IP]
	r.endpoints[e.IP] = endpointState{req: e, identity: id, labels: labels}
	r.mu.Unlock()
	if had {
		r.cfg.Identities.Release(ctx, old.labels)
	}
	r.refreshServices(e.Namespace)
	if had && old.req.Namespace != e.Namespace {
		r.refreshServices(old.req.Namespace)
	}
	return nil
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

// DeleteEndpoint removes an endpoint.
func (r *Registry) DeleteEndpoint(ctx context.Context, ip netip.Addr) error {
	r.mu.Lock()
	old, ok := r.endpoints[ip]
	delete(r.endpoints, ip)
	r.mu.Unlock()
	if !ok {
		return notFound("endpoint %s is not registered", ip)
	}
	if err := r.cfg.Sink.DeleteEndpoint(ip); err != nil {
		return err
	}
	r.cfg.Identities.Release(ctx, old.labels)
	r.refreshServices(old.req.Namespace)
	return unpersist(ctx, r.endpointRecords, ip.String())
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

// PutService registers or replaces a service.
func (r *Registry) PutService(ctx context.Context, s v1.ServiceRequest) error {
	if err := r.applyService(s); err != nil {
		return err
	}
	return persist(ctx, r.serviceRecords, s.Namespace+"/"+s.Name, s)
}

func (r *Registry) applyService(s v1.ServiceRequest) error {
	if s.Selector != nil && len(s.Backends) > 0 {
		return invalid(fmt.Errorf("service %s/%s: give a selector or backends, not both", s.Namespace, s.Name))
	}
	mesh, errs := source.ParseAnnotations(s.Annotations)
	if len(errs) > 0 {
		return invalid(fmt.Errorf("service %s/%s: %w", s.Namespace, s.Name, errors.Join(errs...)))
	}
	r.mu.Lock()
	svc := r.buildServiceLocked(s, mesh)
	r.mu.Unlock()
	if err := r.cfg.Sink.UpsertService(svc); err != nil {
		return invalid(err)
	}
	r.mu.Lock()
	r.services[s.Namespace+"/"+s.Name] = s
	r.mu.Unlock()
	return nil
}

// buildServiceLocked turns a registered service into its published form,
// resolving its selector against the registered endpoints.
func (r *Registry) buildServiceLocked(s v1.ServiceRequest, mesh source.ServiceOptions) v1.Service {
	svc := v1.Service{
		Cluster: r.cfg.Cluster.Name, Namespace: s.Namespace, Name: s.Name,
		Ports: s.Ports, FrontendIPs: s.FrontendIPs, Backends: s.Backends,
		Global: mesh.Global, Shared: mesh.Shared, Affinity: mesh.Affinity,
	}
	if s.Selector == nil {
		return svc
	}
	svc.Backends = nil
	for _, e := range r.endpoints {
		if e.req.Namespace != s.Namespace || !selects(s.Selector, e.req.Labels) {
			continue
		}
		state := v1.BackendActive
		if e.req.Ready != nil && !*e.req.Ready {
			state = v1.BackendUnready
		}
		b := v1.Backend{IP: e.req.IP, State: state, Node: e.req.Node}
		for _, p := range s.Ports {
			if p.TargetPort == 0 {
				b.Ports = append(b.Ports, v1.BackendPort{Name: p.Name, Port: p.Port})
			}
		}
		svc.Backends = append(svc.Backends, b)
	}
	slices.SortFunc(svc.Backends, func(a, b v1.Backend) int { return a.IP.Compare(b.IP) })
	return svc
}

func selects(selector, labels map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// refreshServices republishes the selector services of a namespace after
// its endpoints changed.
func (r *Registry) refreshServices(namespace string) {
	r.mu.Lock()
	var updates []v1.Service
	for _, s := range r.services {
		if s.Namespace != namespace || s.Selector == nil {
			continue
		}
		mesh, _ := source.ParseAnnotations(s.Annotations)
		updates = append(updates, r.buildServiceLocked(s, mesh))
	}
	r.mu.Unlock()
	for _, svc := range updates {
		if err := r.cfg.Sink.UpsertService(svc); err != nil {
			r.log.Warn("service no longer publishable after an endpoint change", "service", svc.Namespace+"/"+svc.Name, "err", err)
		}
	}
}

// DeleteService removes a service.
func (r *Registry) DeleteService(ctx context.Context, namespace, name string) error {
	id := namespace + "/" + name
	r.mu.Lock()
	_, ok := r.services[id]
	delete(r.services, id)
	r.mu.Unlock()
	if !ok {
		return notFound("service %s is not registered", id)
	}
	if err := r.cfg.Sink.DeleteService(namespace, name); err != nil {
		return err
	}
	return unpersist(ctx, r.serviceRecords, id)
}

// Services lists the registered services.
func (r *Registry) Services() []v1.ServiceRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.SortedFunc(maps.Values(r.services), func(a, b v1.ServiceRequest) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
}
