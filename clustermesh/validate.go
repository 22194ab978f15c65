package clustermesh

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Rejection reasons beyond v1.Reason's. The first four are decided entry
// by entry as values arrive (validator); the last three by comparing a
// node with the mesh's other nodes (state), since no single entry shows
// them.
const (
	// ReasonForeignIdentity: an identity without the cluster's ID bits.
	ReasonForeignIdentity = "foreign-identity"
	// ReasonOutsidePodCIDRs: an address or a node pod CIDR not wholly
	// inside the cluster's pinned pod CIDRs.
	ReasonOutsidePodCIDRs = "outside-pod-cidrs"
	// ReasonBadUnderlay: a node IP (or an endpoint's node IP) that is not
	// an address other machines reach: loopback, link-local, multicast,
	// unspecified.
	ReasonBadUnderlay = "bad-underlay"
	// ReasonBadFrontend: a service frontend that is not a reachable
	// unicast address, or lies inside the cluster's pod CIDRs.
	ReasonBadFrontend = "bad-frontend"
	// ReasonLocalNodeIP: a remote node claiming this agent's own node IP.
	ReasonLocalNodeIP = "local-node-ip"
	// ReasonUnderlayConflict: a node claiming an IP another node of the
	// mesh already holds.
	ReasonUnderlayConflict = "underlay-conflict"
	// ReasonPodCIDRConflict: a node whose pod CIDR overlaps one another
	// node of its cluster already holds.
	ReasonPodCIDRConflict = "pod-cidr-conflict"
	// ReasonKeyConflict: a node publishing the WireGuard key another
	// node of the mesh already holds. Peers are keyed by public key, so
	// it would take that node's encrypted traffic.
	ReasonKeyConflict = "wireguard-key-conflict"
)

// errHijack marks an entry that is well formed but claims something that
// is not its cluster's: another cluster's identity bits or addresses.
type errHijack struct {
	reason string
	msg    string
}

func (e *errHijack) Error() string { return e.msg }

// reason labels a rejected entry for counting.
func reason(err error) string {
	var h *errHijack
	if errors.As(err, &h) {
		return h.reason
	}
	return v1.Reason(err)
}

// validator holds what a cluster's entries are checked against: its
// cluster-config, which equals what its cluster file pinned at connect
// time (a session starts only when it does), so a cluster can never widen
// what it may claim.
type validator struct {
	cfg v1.ClusterConfig
}

func (v validator) inPodCIDRs(what string, ip netip.Addr) error {
	if v.cfg.Contains(ip) {
		return nil
	}
	return &errHijack{ReasonOutsidePodCIDRs, fmt.Sprintf("%s %s is outside cluster %s's pod CIDRs %v", what, ip, v.cfg.Name, v.cfg.PodCIDRs)}
}

func (v validator) ownPrefix(what string, p netip.Prefix) error {
	if v.cfg.ContainsPrefix(p) {
		return nil
	}
	return &errHijack{ReasonOutsidePodCIDRs, fmt.Sprintf("%s %s is not inside cluster %s's pod CIDRs %v", what, p, v.cfg.Name, v.cfg.PodCIDRs)}
}

func (v validator) reachable(reason, what string, ip netip.Addr) error {
	if err := v1.CheckReachable(ip); err != nil {
		return &errHijack{reason, fmt.Sprintf("%s: %v", what, err)}
	}
	return nil
}

func (v validator) ownIdentity(what string, id v1.NumericIdentity) error {
	if id.ClusterID() == v.cfg.ID {
		return nil
	}
	return &errHijack{ReasonForeignIdentity, fmt.Sprintf("%s identity %d carries cluster id %d, cluster %s's id is %d", what, id, id.ClusterID(), v.cfg.Name, v.cfg.ID)}
}

func (v validator) node(key string, data []byte) (v1.Node, error) {
	n, err := v1.DecodeNodeEntry(key, data)
	if err != nil {
		return n, err
	}
	for _, p := range n.PodCIDRs {
		if err := v.ownPrefix("node "+n.Name+" pod CIDR", p); err != nil {
			return n, err
		}
	}
	for _, ip := range n.IPs {
		if err := v.reachable(ReasonBadUnderlay, "node "+n.Name+" IP", ip); err != nil {
			return n, err
		}
	}
	return n, nil
}

func (v validator) endpoint(key string, data []byte) (v1.Endpoint, error) {
	ep, err := v1.DecodeEndpointEntry(key, data)
	if err != nil {
		return ep, err
	}
	if err := v.inPodCIDRs("endpoint", ep.IP); err != nil {
		return ep, err
	}
	if err := v.reachable(ReasonBadUnderlay, "endpoint "+ep.IP.String()+" node IP", ep.NodeIP); err != nil {
		return ep, err
	}
	return ep, v.ownIdentity("endpoint "+ep.IP.String(), ep.Identity)
}

func (v validator) identity(key string, data []byte) (v1.Identity, error) {
	id, err := v1.DecodeIdentityEntry(key, data)
	if err != nil {
		return id, err
	}
	return id, v.ownIdentity("identity", id.ID)
}

func (v validator) service(key string, data []byte) (v1.Service, error) {
	svc, err := v1.DecodeServiceEntry(key, data)
	if err != nil {
		return svc, err
	}
	name := svc.Namespace + "/" + svc.Name
	if len(svc.BackendShards) > 0 && !v.cfg.Capabilities.BackendShards {
		// Its shards would never be read: the cluster did not say it
		// writes them (and their canary).
		return svc, fmt.Errorf("service %s lists %d backend shards, but cluster %s does not advertise backendShards: %w", name, len(svc.BackendShards), v.cfg.Name, v1.ErrInvalid)
	}
	for _, b := range svc.Backends {
		if err := v.inPodCIDRs("service "+name+" backend", b.IP); err != nil {
			return svc, err
		}
	}
	// The merge serves a service at the local cluster's frontends only,
	// but a remote's are still checked: a frontend that is a pod IP or
	// not reachable says the entry is not what it claims to be.
	for _, ip := range svc.FrontendIPs {
		if err := v.reachable(ReasonBadFrontend, "service "+name+" frontend", ip); err != nil {
			return svc, err
		}
		if v.cfg.Contains(ip) {
			return svc, &errHijack{ReasonBadFrontend, fmt.Sprintf("service %s frontend %s is inside cluster %s's pod CIDRs %v", name, ip, v.cfg.Name, v.cfg.PodCIDRs)}
		}
	}
	return svc, nil
}

// backendShard checks a shard's backends as service backends are checked:
// every one inside the cluster's pinned pod CIDRs, or the whole shard is
// rejected (and its key keeps its last good value).
func (v validator) backendShard(key string, data []byte) (v1.BackendShard, error) {
	sh, err := v1.DecodeBackendShardEntry(key, data)
	if err != nil {
		return sh, err
	}
	what := "service " + sh.Namespace + "/" + sh.Service + " shard " + strconv.Itoa(sh.Shard) + " backend"
	for _, b := range sh.Backends {
		if err := v.inPodCIDRs(what, b.IP); err != nil {
			return sh, err
		}
	}
	return sh, nil
}
