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
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/source"
)

// NamespaceLabel is the identity label every endpoint gets from its
// namespace, as the Kubernetes source does.
const NamespaceLabel = "k8s:io.kubernetes.pod.namespace"

// Config wires a Registry.
type Config struct {
	Cluster    v1.ClusterConfig
	Etcd       *clientv3.Client
	Sink       source.Sink
	Identities source.IdentityAllocator
	Logger     *slog.Logger
}

// Registry holds the registered objects and publishes what they imply.
type Registry struct {
	cfg    Config
	prefix string
	log    *slog.Logger

	mu        sync.Mutex
	nodes     map[string]NodeRequest
	endpoints map[netip.Addr]endpointState
	services  map[string]ServiceRequest // "ns/name"
}

// NodeRequest registers a node.
type NodeRequest struct {
	Name               string         `json:"name"`
	IPs                []netip.Addr   `json:"ips"`
	PodCIDRs           []netip.Prefix `json:"podCIDRs,omitempty"`
	WireGuardPublicKey string         `json:"wireGuardPublicKey,omitempty"`
	HealthAddr         string         `json:"healthAddr,omitempty"`
	Region             string         `json:"region,omitempty"`
	Zone               string         `json:"zone,omitempty"`
}

// EndpointRequest registers a pod endpoint. Ready defaults to true.
type EndpointRequest struct {
	IP        netip.Addr        `json:"ip"`
	Namespace string            `json:"namespace"`
	Pod       string            `json:"pod"`
	Node      string            `json:"node,omitempty"`
	NodeIP    netip.Addr        `json:"nodeIP"`
	Ready     *bool             `json:"ready,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
}

// ServiceRequest registers a service. Backends come either from Selector
// (every endpoint in the namespace whose labels include it) or from an
// explicit Backends list, not both.
type ServiceRequest struct {
	Namespace   string            `json:"namespace"`
	Name        string            `json:"name"`
	Ports       []v1.ServicePort  `json:"ports"`
	FrontendIPs []netip.Addr      `json:"frontendIPs,omitempty"`
	Selector    map[string]string `json:"selector,omitempty"`
	Backends    []v1.Backend      `json:"backends,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

type endpointState struct {
	req      EndpointRequest
	identity v1.NumericIdentity
	labels   map[string]string // identity labels
}

// New creates an empty registry; Load fills it from etcd.
func New(cfg Config) (*Registry, error) {
	if cfg.Etcd == nil || cfg.Sink == nil || cfg.Identities == nil {
		return nil, fmt.Errorf("registry: Etcd, Sink and Identities are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Registry{
		cfg:       cfg,
		prefix:    "trellis/registry/" + cfg.Cluster.Name + "/",
		log:       cfg.Logger.With("source", "registry"),
		nodes:     make(map[string]NodeRequest),
		endpoints: make(map[netip.Addr]endpointState),
		services:  make(map[string]ServiceRequest),
	}, nil
}

func (r *Registry) key(kind, id string) string { return r.prefix + kind + "/" + id }

// Load reads the registered objects from etcd, publishes them, and marks
// every kind synced. A stored record that no longer validates is logged
// and skipped, not fatal: one bad record must not keep a cluster offline.
func (r *Registry) Load(ctx context.Context) error {
	resp, err := r.cfg.Etcd.Get(ctx, r.prefix, clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("registry: load %s: %w", r.prefix, err)
	}
	var nodes []NodeRequest
	var endpoints []EndpointRequest
	var services []ServiceRequest
	for _, kv := range resp.Kvs {
		key := string(kv.Key)
		var err error
		switch kind := key[len(r.prefix):]; {
		case hasPrefix(kind, "nodes/"):
			var n NodeRequest
			if err = json.Unmarshal(kv.Value, &n); err == nil {
				nodes = append(nodes, n)
			}
		case hasPrefix(kind, "endpoints/"):
			var e EndpointRequest
			if err = json.Unmarshal(kv.Value, &e); err == nil {
				endpoints = append(endpoints, e)
			}
		case hasPrefix(kind, "services/"):
			var s ServiceRequest
			if err = json.Unmarshal(kv.Value, &s); err == nil {
				services = append(services, s)
			}
		}
		if err != nil {
			r.log.Warn("skipping unreadable registry record", "key", key, "err", err)
		}
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

func hasPrefix(s, p string) bool { return len(s) >= len(p) && s[:len(p)] == p }

// persist writes a record; it is the commit point of a request.
func (r *Registry) persist(ctx context.Context, key string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := r.cfg.Etcd.Put(ctx, key, string(data)); err != nil {
		return fmt.Errorf("store %s: %w", key, err)
	}
	return nil
}

func (r *Registry) unpersist(ctx context.Context, key string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := r.cfg.Etcd.Delete(ctx, key); err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	return nil
}

// PutNode registers or replaces a node.
func (r *Registry) PutNode(ctx context.Context, n NodeRequest) error {
	if err := r.applyNode(n); err != nil {
		return invalid(err)
	}
	return r.persist(ctx, r.key("nodes", n.Name), n)
}

func (r *Registry) applyNode(n NodeRequest) error {
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
	return r.unpersist(ctx, r.key("nodes", name))
}

// Nodes lists the registered nodes.
func (r *Registry) Nodes() []NodeRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.SortedFunc(maps.Values(r.nodes), func(a, b NodeRequest) int { return cmpString(a.Name, b.Name) })
}

// PutEndpoint registers or replaces a pod endpoint and updates the
// services that select it.
func (r *Registry) PutEndpoint(ctx context.Context, e EndpointRequest) error {
	if err := r.applyEndpoint(ctx, e); err != nil {
		return err
	}
	return r.persist(ctx, r.key("endpoints", e.IP.String()), e)
}

func (r *Registry) applyEndpoint(ctx context.Context, e EndpointRequest) error {
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
func identityLabels(e EndpointRequest) map[string]string {
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
	return r.unpersist(ctx, r.key("endpoints", ip.String()))
}

// EndpointView is an endpoint as the registry lists it.
type EndpointView struct {
	EndpointRequest
	Identity v1.NumericIdentity `json:"identity"`
}

// Endpoints lists the registered endpoints.
func (r *Registry) Endpoints() []EndpointView {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]EndpointView, 0, len(r.endpoints))
	for _, e := range r.endpoints {
		out = append(out, EndpointView{EndpointRequest: e.req, Identity: e.identity})
	}
	slices.SortFunc(out, func(a, b EndpointView) int { return a.IP.Compare(b.IP) })
	return out
}

// PutService registers or replaces a service.
func (r *Registry) PutService(ctx context.Context, s ServiceRequest) error {
	if err := r.applyService(s); err != nil {
		return err
	}
	return r.persist(ctx, r.key("services", s.Namespace+"/"+s.Name), s)
}

func (r *Registry) applyService(s ServiceRequest) error {
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
func (r *Registry) buildServiceLocked(s ServiceRequest, mesh source.ServiceOptions) v1.Service {
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
	return r.unpersist(ctx, r.key("services", id))
}

// Services lists the registered services.
func (r *Registry) Services() []ServiceRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.SortedFunc(maps.Values(r.services), func(a, b ServiceRequest) int {
		return cmpString(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
