package clustermesh

import (
	"errors"
	"fmt"
	"net/netip"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Rejection reasons beyond v1.Reason's.
const (
	ReasonForeignIdentity = "foreign-identity"
	ReasonOutsidePodCIDRs = "outside-pod-cidrs"
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

// validator holds what a cluster's entries are checked against: the
// cluster-config it published when the session started.
type validator struct {
	cfg v1.ClusterConfig
}

func (v validator) inPodCIDRs(what string, ip netip.Addr) error {
	if v.cfg.Contains(ip) {
		return nil
	}
	return &errHijack{ReasonOutsidePodCIDRs, fmt.Sprintf("%s %s is outside cluster %s's pod CIDRs %v", what, ip, v.cfg.Name, v.cfg.PodCIDRs)}
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
		if err := v.inPodCIDRs("node "+n.Name+" pod CIDR", p.Addr()); err != nil {
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
	for _, b := range svc.Backends {
		if err := v.inPodCIDRs("service "+svc.Namespace+"/"+svc.Name+" backend", b.IP); err != nil {
			return svc, err
		}
	}
	return svc, nil
}
