package clustermesh

import (
	"cmp"
	"slices"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// clusterInfo is what merging needs to know of a cluster.
type clusterInfo struct {
	region string
	id     v1.ClusterID
}

// mergeService computes the service name as the local cluster's nodes
// should serve it, from every cluster's published version of it. It
// returns nil when no cluster contributes anything.
//
// Rules (as Cilium ClusterMesh users expect):
//   - a remote cluster's backends count only if it marks the service
//     global and shared; the local cluster's own backends always count;
//   - only active backends carry traffic (terminating and unready are
//     left out);
//   - affinity (from the local service): local → local backends while any
//     exist, else remote; remote → remote while any exist, else local;
//     none → all;
//   - whenever the chosen set is remote only, it is the backends of one
//     group of clusters, the first of these that has any: the clusters of
//     the local cluster's region; then those of each region the
//     service's FailoverRegions lists, in turn; then all the remote
//     clusters. With no list this is "same region, else all".
//
// Whose FailoverRegions: the local cluster's copy of the service, as for
// affinity: the order is the choice of the cluster whose traffic fails
// over, and the remotes' lists are ignored. A service that does not exist
// locally takes the list of the first remote cluster by name, the one its
// ports come from, so that the choice does not flap.
func mergeService(name ServiceName, local string, services map[string]map[ServiceName]published, clusters map[string]clusterInfo) *MergedService {
	localPub := services[local][name]
	localSvc, haveLocal := localPub.head, localPub.hasHead
	m := &MergedService{ServiceName: name, Affinity: v1.AffinityNone, Offered: make(map[string]int)}
	if haveLocal {
		m.Ports, m.FrontendIPs, m.Global = localSvc.Ports, localSvc.FrontendIPs, localSvc.Global
		if localSvc.Affinity != "" {
			m.Affinity = localSvc.Affinity
		}
	}

	// A local service that is not global stays local: remote backends of
	// a same-named service must not leak into it.
	mergeRemotes := !haveLocal || localSvc.Global
	var remoteNames []string
	for cluster, svcs := range services {
		if cluster == local || !mergeRemotes {
			continue
		}
		if p, ok := svcs[name]; ok && p.hasHead && p.head.Global && p.head.Shared {
			remoteNames = append(remoteNames, cluster)
		}
	}
	if !haveLocal && len(remoteNames) == 0 {
		return nil
	}
	slices.Sort(remoteNames)
	if haveLocal {
		m.FailoverRegions, m.HealthCheck = localSvc.FailoverRegions, localSvc.HealthCheck
	} else {
		m.Global = true
		// Ports and the failover order come from a remote: the first
		// cluster by name, so the choice does not flap.
		first := services[remoteNames[0]][name].head
		m.Ports, m.FailoverRegions, m.HealthCheck = first.Ports, first.FailoverRegions, first.HealthCheck
	}

	// Backends are resolved against the ports chosen above, whichever
	// cluster they come from.
	ports := newPortResolver(m.Ports)
	localActive := active(local, clusters[local].id, localPub, ports)
	if len(localActive) > 0 {
		m.Offered[local] = len(localActive)
	}
	remoteActive := make(map[string][]Backend)
	for _, cluster := range remoteNames {
		if b := active(cluster, clusters[cluster].id, services[cluster][name], ports); len(b) > 0 {
			remoteActive[cluster] = b
			m.Offered[cluster] = len(b)
		}
	}

	remotes := func() []Backend {
		return preferRegions(remoteActive, clusters[local].region, m.FailoverRegions, clusters)
	}
	switch m.Affinity {
	case v1.AffinityLocal:
		if len(localActive) > 0 {
			m.Backends = localActive
		} else {
			m.Backends = remotes()
		}
	case v1.AffinityRemote:
		if r := remotes(); len(r) > 0 {
			m.Backends = r
		} else {
			m.Backends = localActive
		}
	default:
		if len(localActive) > 0 {
			n := len(localActive)
			for _, b := range remoteActive {
				n += len(b)
			}
			m.Backends = append(make([]Backend, 0, n), localActive...)
			for _, c := range remoteNames {
				m.Backends = append(m.Backends, remoteActive[c]...)
			}
		} else {
			m.Backends = remotes()
		}
	}
	return m
}

// active returns the active backends one cluster publishes for a
// service, with their ports resolved: from the service value, or from
// its shards (see shards.go), where a backend two shards list (only a
// writer that breaks the rules does that) counts once.
func active(cluster string, id v1.ClusterID, p published, ports *portResolver) []Backend {
	if !p.hasHead {
		return nil
	}
	own, parts := p.backendLists()
	if own != nil || len(parts) == 1 {
		if own == nil {
			own = parts[0]
		}
		parts = nil
	}
	n := countActive(own)
	for _, part := range parts {
		n += countActive(part)
	}
	if n == 0 {
		return nil
	}
	out := make([]Backend, 0, n)
	add := func(b *v1.Backend) {
		out = append(out, Backend{Cluster: cluster, ClusterID: id, IP: b.IP, TargetPorts: ports.resolve(b.Ports)})
	}
	for i := range own {
		if own[i].State == v1.BackendActive {
			add(&own[i])
		}
	}
	if len(parts) > 0 {
		// Keyed by the 16 bytes (validation admits no IPv4-mapped
		// address, so they are unique): they hash faster than a
		// netip.Addr.
		seen := make(map[[16]byte]struct{}, n)
		for _, part := range parts {
			for i := range part {
				if b := &part[i]; b.State == v1.BackendActive {
					if _, dup := seen[b.IP.As16()]; !dup {
						seen[b.IP.As16()] = struct{}{}
						add(b)
					}
				}
			}
		}
	}
	return out
}

func countActive(backends []v1.Backend) int {
	n := 0
	for i := range backends {
		if backends[i].State == v1.BackendActive {
			n++
		}
	}
	return n
}

// preferRegions returns the backends of the clusters of the first region
// that has any: local (the local cluster's region, when it has one), then
// failover in turn; otherwise those of all clusters. They are ordered by
// cluster name.
func preferRegions(byCluster map[string][]Backend, local string, failover []string, clusters map[string]clusterInfo) []Backend {
	names := make([]string, 0, len(byCluster))
	for c := range byCluster {
		names = append(names, c)
	}
	slices.SortFunc(names, cmp.Compare[string])
	// Sized exactly: merged snapshots hold these for every service.
	count := func(region string) int {
		n := 0
		for _, c := range names {
			if clusters[c].region == region {
				n += len(byCluster[c])
			}
		}
		return n
	}
	region, n := "", 0
	if local != "" {
		region, n = local, count(local)
	}
	for _, r := range failover {
		if n > 0 {
			break
		}
		region, n = r, count(r)
	}
	want := func(c string) bool { return clusters[c].region == region }
	if n == 0 {
		want = func(string) bool { return true }
		for _, c := range names {
			n += len(byCluster[c])
		}
	}
	if n == 0 {
		return nil
	}
	out := make([]Backend, 0, n)
	for _, c := range names {
		if want(c) {
			out = append(out, byCluster[c]...)
		}
	}
	return out
}
