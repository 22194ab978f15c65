package registry

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/source"
)

// The door: every field of a request is checked before anything is
// stored, and an error names the field and what is allowed. What the
// Sink would refuse is refused here already; what the door adds are the
// checks that need the other records (a node's IPs unique, an endpoint's
// node registered) or this cluster's ranges.

// checkNode builds the node a request describes and checks it alone.
func (r *Registry) checkNode(n v1.NodeRequest) (v1.Node, error) {
	node := v1.Node{
		Cluster: r.cfg.Cluster.Name, Name: n.Name, IPs: n.IPs, PodCIDRs: n.PodCIDRs,
		WireGuardPublicKey: n.WireGuardPublicKey, IPsecKeyIndex: n.IPsecKeyIndex, HealthAddr: n.HealthAddr, Region: n.Region, Zone: n.Zone,
	}
	if err := node.Validate(); err != nil {
		return node, err
	}
	for i, ip := range n.IPs {
		if err := v1.CheckReachable(ip); err != nil {
			return node, fmt.Errorf("node %s: ips[%d]: %w", n.Name, i, err)
		}
		if r.cfg.Cluster.Contains(ip) {
			return node, fmt.Errorf("node %s: ips[%d] %s is inside the cluster's pod CIDRs %v; want the node's own (underlay) address", n.Name, i, ip, r.cfg.Cluster.PodCIDRs)
		}
	}
	for i, p := range n.PodCIDRs {
		if !r.cfg.Cluster.ContainsPrefix(p) {
			return node, fmt.Errorf("node %s: podCIDRs[%d] %s is not inside the cluster's pod CIDRs %v", n.Name, i, p, r.cfg.Cluster.PodCIDRs)
		}
		if slices.Contains(r.cfg.Cluster.PodCIDRs, p) {
			return node, fmt.Errorf("node %s: podCIDRs[%d] %s is a whole cluster pod CIDR; want a part of it, so other nodes have room", n.Name, i, p)
		}
	}
	return node, nil
}

// nodeConflictLocked checks n against the other registered nodes: no two
// nodes share an IP, overlapping pod CIDRs or a WireGuard key.
func (r *Registry) nodeConflictLocked(n v1.NodeRequest) error {
	for name, other := range r.nodes {
		if name == n.Name {
			continue
		}
		for _, ip := range n.IPs {
			if slices.Contains(other.req.IPs, ip) {
				return fmt.Errorf("node %s: IP %s is node %s's already; node IPs must be unique", n.Name, ip, name)
			}
		}
		if a, b, ok := v1.PrefixesOverlap(n.PodCIDRs, other.req.PodCIDRs); ok {
			return fmt.Errorf("node %s: pod CIDR %s overlaps %s of node %s; node pod CIDRs must be disjoint", n.Name, a, b, name)
		}
		// Peers key their tunnels by public key: two nodes with one key
		// would take each other's traffic.
		if n.WireGuardPublicKey != "" && n.WireGuardPublicKey == other.req.WireGuardPublicKey {
			return fmt.Errorf("node %s: wireGuardPublicKey is node %s's already; each node has a key of its own", n.Name, name)
		}
	}
	return nil
}

// checkEndpoint checks what an endpoint request says alone and returns the
// identity labels it implies.
func (r *Registry) checkEndpoint(e v1.EndpointRequest) (map[string]string, error) {
	if !e.IP.IsValid() {
		return nil, errors.New("endpoint: ip is required")
	}
	if !r.cfg.Cluster.Contains(e.IP) {
		return nil, fmt.Errorf("endpoint %s: ip is outside the cluster's pod CIDRs %v", e.IP, r.cfg.Cluster.PodCIDRs)
	}
	if e.Node == "" {
		return nil, fmt.Errorf("endpoint %s: node is required: the registered node the pod runs on", e.IP)
	}
	labels := identityLabels(e)
	// The identity the labels would get, with a stand-in number: the
	// allocator would refuse the same labels, but as a failure to retry.
	id := v1.Identity{Cluster: r.cfg.Cluster.Name, ID: v1.MakeIdentity(r.cfg.Cluster.ID, 1), Labels: labels}
	if err := id.Validate(); err != nil {
		return nil, fmt.Errorf("endpoint %s: labels (with the namespace label k8s:io.kubernetes.pod.namespace, each key prefixed k8s:): %w", e.IP, err)
	}
	return labels, nil
}

// endpointOnNodeLocked checks e against its node, which must be registered:
// its nodeIP must be one of the node's IPs (the node's first when e gives
// none). It returns e with the nodeIP filled in.
func (r *Registry) endpointOnNodeLocked(e v1.EndpointRequest) (v1.EndpointRequest, error) {
	node, ok := r.nodes[e.Node]
	if !ok {
		return e, fmt.Errorf("endpoint %s: node %q is not registered: register the node first (PUT /v1/nodes/{name})", e.IP, cut(e.Node))
	}
	switch {
	case !e.NodeIP.IsValid():
		e.NodeIP = node.req.IPs[0]
	case !slices.Contains(node.req.IPs, e.NodeIP):
		return e, fmt.Errorf("endpoint %s: nodeIP %s is not an IP of node %s %v", e.IP, e.NodeIP, e.Node, node.req.IPs)
	}
	ep := r.endpointObject(e, v1.MakeIdentity(r.cfg.Cluster.ID, 1))
	if err := ep.Validate(); err != nil {
		return e, err
	}
	return e, nil
}

// checkService checks a service request: a selector or backends, valid
// annotations, ports and VIPs.
func (r *Registry) checkService(s v1.ServiceRequest) error {
	name := serviceID(s.Namespace, s.Name)
	if s.Selector != nil && len(s.Backends) > 0 {
		return fmt.Errorf("service %s: give a selector or backends, not both", name)
	}
	mesh, errs := source.ParseAnnotations(s.Annotations)
	if len(errs) > 0 {
		return fmt.Errorf("service %s: %w", name, errors.Join(errs...))
	}
	svc := v1.Service{
		Cluster: r.cfg.Cluster.Name, Namespace: s.Namespace, Name: s.Name,
		Ports: s.Ports, FrontendIPs: s.FrontendIPs, Backends: s.Backends,
		Global: mesh.Global, Shared: mesh.Shared, Affinity: mesh.Affinity, FailoverRegions: mesh.FailoverRegions, HealthCheck: mesh.HealthCheck,
	}
	if err := svc.Validate(); err != nil {
		return err
	}
	for i, b := range s.Backends {
		if !r.cfg.Cluster.Contains(b.IP) {
			return fmt.Errorf("service %s: backends[%d] %s is outside the cluster's pod CIDRs %v", name, i, b.IP, r.cfg.Cluster.PodCIDRs)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, vip := range s.FrontendIPs {
		if err := r.checkVIPLocked(vip); err != nil {
			return fmt.Errorf("service %s: frontendIPs[%d]: %w", name, i, err)
		}
	}
	return nil
}

// checkVIPLocked says why vip cannot be a service frontend.
func (r *Registry) checkVIPLocked(vip netip.Addr) error {
	if err := v1.CheckReachable(vip); err != nil {
		return err
	}
	if len(r.cfg.ServiceCIDRs) > 0 && !slices.ContainsFunc(r.cfg.ServiceCIDRs, func(p netip.Prefix) bool { return p.Contains(vip) }) {
		return fmt.Errorf("%s is outside the service CIDRs %v (--service-cidrs)", vip, r.cfg.ServiceCIDRs)
	}
	if r.cfg.Cluster.Contains(vip) {
		return fmt.Errorf("%s is inside the cluster's pod CIDRs %v; want a service address", vip, r.cfg.Cluster.PodCIDRs)
	}
	for name, n := range r.nodes {
		if slices.Contains(n.req.IPs, vip) {
			return fmt.Errorf("%s is node %s's IP; want a service address", vip, name)
		}
	}
	return nil
}

// cut bounds a client-given string before it goes into an error message.
func cut(s string) string {
	const n = 128
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}
