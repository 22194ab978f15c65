package k8s

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	apierrors "k8s.io/apimachinery/pkg/api/errors"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Pods: each eligible pod holds a reference on the identity of its label
// set and publishes one endpoint per pod IP.

// podState is what the source holds for one pod.
type podState struct {
	// labels and id: the identity the pod holds a reference on; labels is
	// nil when it holds none.
	labels map[string]string
	id     v1.NumericIdentity
	// endpoints are the pod's desired endpoints (its claims on IPs); the
	// sink holds the ones recorded in Source.endpoints with this pod as
	// owner. Written with Source.mu held.
	endpoints map[netip.Addr]v1.Endpoint
	// release are label sets whose reference is still to be dropped
	// (after a label change or deletion, or a failed Release).
	release []map[string]string
}

// empty says whether the pod holds nothing any more (no identity, no
// endpoints, no reference left to release), so its state can go.
func (p *podState) empty() bool {
	return p.labels == nil && len(p.endpoints) == 0 && len(p.release) == 0
}

// endpointRecord is an endpoint the sink holds and the pod that put it there.
type endpointRecord struct {
	owner objectKey
	ep    v1.Endpoint
}

// syncPod converges pod key on the cache: an eligible pod (see podFromK8s)
// holds the identity of its labels and publishes its endpoints; any other
// pod, or a deleted one, has its endpoints deleted and its reference
// released. Allocator errors are returned, so the key is retried; problems
// with the pod itself are reported.
func (s *Source) syncPod(ctx context.Context, key objectKey) error {
	obj := key.String()
	pod, err := s.podList.Pods(key.namespace).Get(key.name)
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("get %s: %w", obj, err)
	}
	var info podInfo
	var idLabels map[string]string
	if err == nil {
		info = podFromK8s(pod)
		if info.noHostIP {
			s.report(obj, ProblemPodWithoutHostIP, info.why)
		} else {
			s.clear(obj, ProblemPodWithoutHostIP)
		}
		if info.eligible {
			idLabels = IdentityLabels(key.namespace, pod.Labels)
			if len(idLabels) > v1.MaxIdentityLabels {
				s.report(obj, ProblemTooManyLabels, fmt.Sprintf("%d identity labels; at most %d allowed", len(idLabels), v1.MaxIdentityLabels))
				info.eligible = false
			} else {
				s.clear(obj, ProblemTooManyLabels)
			}
		}
	}

	s.setUnhealthy(key, info)

	s.mu.Lock()
	st := s.pods[key]
	if st == nil {
		if !info.eligible {
			s.mu.Unlock()
			if pod == nil {
				s.forget(obj)
			}
			return nil
		}
		st = &podState{}
		s.pods[key] = st
	}
	s.mu.Unlock()

	if info.eligible && (st.labels == nil || !maps.Equal(idLabels, st.labels)) {
		id, err := s.cfg.Identities.Acquire(ctx, idLabels)
		switch {
		case err != nil && errors.Is(err, v1.ErrInvalid):
			s.report(obj, ProblemIdentityRefused, err.Error())
			info.eligible = false
		case err != nil:
			return fmt.Errorf("acquire identity for %s: %w", obj, err)
		case id.ClusterID() != s.cfg.ClusterID:
			s.report(obj, ProblemIdentityRefused, fmt.Sprintf("allocator returned identity %s of cluster ID %d; want cluster ID %d", id, id.ClusterID(), s.cfg.ClusterID))
			st.release = append(st.release, idLabels)
			info.eligible = false
		default:
			s.clear(obj, ProblemIdentityRefused)
			if st.labels != nil {
				st.release = append(st.release, st.labels)
			}
			st.labels, st.id = idLabels, id
			s.log.Debug("pod identity", "pod", key.namespace+"/"+key.name, "identity", id)
		}
	}

	var desired map[netip.Addr]v1.Endpoint
	if info.eligible {
		desired = make(map[netip.Addr]v1.Endpoint, len(info.ips))
		for _, ip := range info.ips {
			desired[ip] = v1.Endpoint{
				Cluster:   s.cfg.Cluster,
				IP:        ip,
				Identity:  st.id,
				NodeIP:    info.hostIP,
				Namespace: key.namespace,
				Pod:       key.name,
				Ready:     info.ready,
			}
		}
	} else if st.labels != nil {
		st.release = append(st.release, st.labels)
		st.labels, st.id = nil, 0
	}
	// New endpoints (with a new identity) first, then drop old references:
	// make before break.
	s.setEndpoints(key, st, desired)
	if err := s.releaseAll(ctx, key, st); err != nil {
		return err
	}
	if st.empty() {
		s.mu.Lock()
		delete(s.pods, key)
		s.mu.Unlock()
		if pod == nil {
			s.forget(obj)
		}
	}
	return nil
}

// setUnhealthy records which of pod key's IPs its node's agent probes
// down, and queues the published services that have a backend whose mark
// changed, so that they are published again (see markUnhealthy).
func (s *Source) setUnhealthy(key objectKey, info podInfo) {
	s.mu.Lock()
	var changed []netip.Addr
	for ip, owner := range s.unhealthy {
		if owner == key && (!info.eligible || !info.unhealthy || !slices.Contains(info.ips, ip)) {
			delete(s.unhealthy, ip)
			changed = append(changed, ip)
		}
	}
	if info.eligible && info.unhealthy {
		for _, ip := range info.ips {
			if owner, ok := s.unhealthy[ip]; !ok || owner != key {
				s.unhealthy[ip] = key
				changed = append(changed, ip)
			}
		}
	}
	var queue []objectKey
	for svc, pub := range s.services {
		if slices.ContainsFunc(pub.Backends, func(b v1.Backend) bool { return slices.Contains(changed, b.IP) }) {
			queue = append(queue, svc)
		}
	}
	s.mu.Unlock()
	if len(changed) > 0 {
		s.log.Info("pod health mark changed", "pod", key.String(), "unhealthy", info.unhealthy, "ips", changed)
	}
	for _, k := range queue {
		s.queue.Add(k)
	}
}

// markUnhealthy turns the backends of pods probed down unready; mu is
// not held.
func (s *Source) markUnhealthy(svc *v1.Service) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.unhealthy) == 0 {
		return
	}
	for i := range svc.Backends {
		if _, ok := s.unhealthy[svc.Backends[i].IP]; ok {
			svc.Backends[i].State = v1.BackendUnready
		}
	}
}

// releaseAll drops the identity references st still owes.
func (s *Source) releaseAll(ctx context.Context, key objectKey, st *podState) error {
	for len(st.release) > 0 {
		if err := s.cfg.Identities.Release(ctx, st.release[0]); err != nil {
			return fmt.Errorf("release identity of %s: %w", key, err)
		}
		st.release = st.release[1:]
	}
	st.release = nil
	return nil
}

// setEndpoints makes desired the endpoints of pod key and converges the sink.
// An IP claimed by two pods (a new pod reusing the IP of one not yet gone)
// belongs to the pod that published it last; when its owner lets it go, it
// passes to the newest remaining claimant instead of being deleted.
func (s *Source) setEndpoints(key objectKey, st *podState, desired map[netip.Addr]v1.Endpoint) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := st.endpoints
	st.endpoints = desired

	for _, ip := range slices.SortedFunc(maps.Keys(desired), netip.Addr.Compare) {
		ep := desired[ip]
		if !slices.Contains(s.claims[ip], key) {
			s.claims[ip] = append(s.claims[ip], key)
		}
		if rec, ok := s.endpoints[ip]; ok && rec.owner == key && rec.ep == ep {
			continue
		}
		s.upsertEndpointLocked(key, ep)
	}
	for _, ip := range slices.SortedFunc(maps.Keys(old), netip.Addr.Compare) {
		if _, ok := desired[ip]; ok {
			continue
		}
		s.claims[ip] = slices.DeleteFunc(s.claims[ip], func(k objectKey) bool { return k == key })
		if len(s.claims[ip]) == 0 {
			delete(s.claims, ip)
		}
		s.clear("endpoint "+ip.String(), ProblemSinkRefused)
		rec, ok := s.endpoints[ip]
		if !ok || rec.owner != key {
			continue
		}
		if handedOver := s.handOverLocked(ip); handedOver {
			continue
		}
		if err := s.cfg.Sink.DeleteEndpoint(ip); err != nil {
			s.report("endpoint "+ip.String(), ProblemSinkRefused, "delete: "+err.Error())
		}
		delete(s.endpoints, ip)
	}
}

// handOverLocked publishes the newest remaining claimant of ip, if any.
func (s *Source) handOverLocked(ip netip.Addr) bool {
	claims := s.claims[ip]
	for i := len(claims) - 1; i >= 0; i-- {
		other := s.pods[claims[i]]
		if other == nil {
			continue
		}
		if ep, ok := other.endpoints[ip]; ok && s.upsertEndpointLocked(claims[i], ep) {
			return true
		}
	}
	return false
}

// upsertEndpointLocked publishes ep for pod key; mu is held.
func (s *Source) upsertEndpointLocked(key objectKey, ep v1.Endpoint) bool {
	obj := "endpoint " + ep.IP.String()
	if err := s.cfg.Sink.UpsertEndpoint(ep); err != nil {
		s.report(obj, ProblemSinkRefused, key.String()+": "+err.Error())
		return false
	}
	s.clear(obj, ProblemSinkRefused)
	if rec, ok := s.endpoints[ep.IP]; ok && rec.owner != key {
		s.log.Info("pod IP changed hands", "ip", ep.IP, "from", rec.owner.String(), "to", key.String())
	}
	s.endpoints[ep.IP] = endpointRecord{owner: key, ep: ep}
	return true
}
