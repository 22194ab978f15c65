package clustermesh

import (
	"slices"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// portResolver turns a published backend's named ports into
// Backend.TargetPorts for one merged service.
//
// Memory is the point: a merged snapshot holds a Backend for every
// backend of every cluster, and most backends publish no ports of their
// own (the service's TargetPort is the same everywhere) or the same ports
// as their neighbours (one EndpointSlice). Such backends share one slice
// instead of allocating one each: the service's target ports, or the
// slice handed out last.
type portResolver struct {
	ports []v1.ServicePort
	// targets are the ports' TargetPorts: what a backend that names no
	// ports of its own serves on.
	targets []uint16
	// last is the most recent slice that differed from targets.
	last    []uint16
	scratch []uint16
}

func newPortResolver(ports []v1.ServicePort) *portResolver {
	r := &portResolver{ports: ports}
	if len(ports) == 0 {
		return r
	}
	r.targets = make([]uint16, len(ports))
	for i, p := range ports {
		r.targets[i] = p.TargetPort
	}
	return r
}

// resolve returns the target ports of a backend that publishes ports
// (name → port). The result is shared: never modify it.
func (r *portResolver) resolve(ports []v1.BackendPort) []uint16 {
	if len(ports) == 0 {
		return r.targets
	}
	r.scratch = r.scratch[:0]
	for _, p := range r.ports {
		r.scratch = append(r.scratch, targetPort(p, ports))
	}
	switch {
	case slices.Equal(r.scratch, r.targets):
		return r.targets
	case r.last != nil && slices.Equal(r.scratch, r.last):
		return r.last
	}
	r.last = slices.Clone(r.scratch)
	return r.last
}

// targetPort is the port a backend serves service port p on: its own
// port of that name when it publishes one, otherwise the service's target
// port (0 when the service has none: the backend does not serve p).
func targetPort(p v1.ServicePort, ports []v1.BackendPort) uint16 {
	for _, bp := range ports {
		if bp.Name == p.Name {
			return bp.Port
		}
	}
	return p.TargetPort
}
