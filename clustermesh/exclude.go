package clustermesh

// Excluding nodes: an agent that believes some nodes dead (gossip) serves
// every service as if those nodes' backends did not exist, with the
// merge's choice of group (affinity, region, failover regions) made
// again on what remains, so that affinity local fails over to remote
// backends instead of going empty. It never empties a service: when no
// group has a backend left, the service keeps the backends it had.

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// ReadMeshGossipKey reads the cluster files of dir and returns the gossip
// key they agree on (see MeshGossipKey): nil when none carries one. Files
// that do not parse are ignored here (the mesh reports them).
func ReadMeshGossipKey(dir string) ([]byte, error) {
	files, err := scanDir(dir)
	if err != nil {
		return nil, err
	}
	var good []ClusterFile
	for _, name := range slices.Sorted(maps.Keys(files)) {
		if f := files[name]; f.err == nil {
			good = append(good, f.file)
		}
	}
	key, err := MeshGossipKey(good)
	if err != nil {
		return nil, fmt.Errorf("config dir %s: %w", dir, err)
	}
	return key, nil
}

// Exclusion is what SnapshotExcluding did.
type Exclusion struct {
	// Changed are the services whose backends changed.
	Changed []ServiceName
	// Kept are the services whose backends all sit on excluded nodes and
	// that therefore keep them (an exclusion never empties a service).
	Kept []ServiceName
}

// SnapshotExcluding returns the current snapshot with the backends of the
// nodes named in nodes (cluster → node names) left out of every service,
// each affected service merged again on the remaining backends. A
// backend is on a node when its cluster's IP cache says so (its endpoint's
// node IP is one of the node's IPs) or when it names the node. A service
// that would have no backend left keeps the ones it has. With nothing to
// exclude it returns the snapshot itself; otherwise a shallow copy that
// shares everything it did not change.
func (m *Mesh) SnapshotExcluding(nodes map[string]map[string]bool) (*Snapshot, Exclusion) {
	return m.state.snapshotExcluding(nodes)
}

func (s *state) snapshotExcluding(nodes map[string]map[string]bool) (*Snapshot, Exclusion) {
	s.mu.Lock()
	defer s.mu.Unlock()
	snap := s.snap.Load()
	var ex Exclusion
	if len(nodes) == 0 {
		return snap, ex
	}
	// The pod IPs on the excluded nodes, by cluster.
	pods := make(map[string]map[netip.Addr]bool)
	for cluster, names := range nodes {
		nodeIPs := make(map[netip.Addr]bool)
		for name := range names {
			if n := snap.Nodes[cluster][name]; n != nil {
				for _, ip := range n.IPs {
					nodeIPs[ip] = true
				}
			}
		}
		set := make(map[netip.Addr]bool)
		for ip, e := range snap.IPCache[cluster] {
			if nodeIPs[e.NodeIP] {
				set[ip] = true
			}
		}
		pods[cluster] = set
	}
	excluded := func(cluster string, b *v1.Backend) bool {
		return pods[cluster][b.IP] || (b.Node != "" && nodes[cluster][b.Node])
	}
	var out *Snapshot
	for _, name := range slices.SortedFunc(maps.Keys(snap.Services), func(a, b ServiceName) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	}) {
		one := make(map[string]map[ServiceName]published)
		touched := false
		for cluster, svcs := range s.services {
			p, ok := svcs[name]
			if !ok {
				continue
			}
			if nodes[cluster] != nil {
				if q, changed := p.without(func(b *v1.Backend) bool { return excluded(cluster, b) }); changed {
					p, touched = q, true
				}
			}
			one[cluster] = map[ServiceName]published{name: p}
		}
		if !touched {
			continue
		}
		m := mergeService(name, s.local, one, s.clusters)
		if m == nil || len(m.Backends) == 0 {
			if len(snap.Services[name].Backends) > 0 {
				ex.Kept = append(ex.Kept, name)
			}
			continue
		}
		if out == nil {
			c := *snap
			c.Services = maps.Clone(snap.Services)
			out = &c
		}
		out.Services[name] = m
		ex.Changed = append(ex.Changed, name)
	}
	if out == nil {
		return snap, ex
	}
	return out, ex
}

// without is p with the backends drop says to leave out, and whether any
// was; the original is not modified.
func (p published) without(drop func(*v1.Backend) bool) (published, bool) {
	own, parts := p.backendLists()
	filter := func(bs []v1.Backend) ([]v1.Backend, bool) {
		hit := false
		for i := range bs {
			if bs[i].State == v1.BackendActive && drop(&bs[i]) {
				hit = true
				break
			}
		}
		if !hit {
			return bs, false
		}
		return slices.DeleteFunc(slices.Clone(bs), func(b v1.Backend) bool { return drop(&b) }), true
	}
	changed := false
	if own != nil {
		if f, ok := filter(own); ok {
			p.head.Backends, changed = f, true
		}
	}
	if len(parts) > 0 {
		var np [][]v1.Backend
		for i, part := range parts {
			if f, ok := filter(part); ok {
				if np == nil {
					np = slices.Clone(parts)
				}
				np[i], changed = f, true
			}
		}
		if np != nil {
			p.parts = np
		}
	}
	return p, changed
}
