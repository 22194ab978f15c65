package clustermesh

import (
	"net/netip"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// ServiceName identifies a service across clusters.
type ServiceName struct {
	Namespace, Name string
}

func (n ServiceName) String() string { return n.Namespace + "/" + n.Name }

// Backend is a service backend chosen to carry traffic: what the datapath
// needs, resolved so that it needs no lookups, and no more (a merged
// snapshot holds one per backend of every cluster, so each byte here
// counts per remote endpoint).
type Backend struct {
	// Cluster names the backend's cluster, for status.
	Cluster string
	// ClusterID is that cluster's ID as it was when the service was
	// merged (a change of ID merges every service again).
	ClusterID v1.ClusterID
	IP        netip.Addr
	// TargetPorts runs parallel to MergedService.Ports: TargetPorts[i] is
	// the port this backend serves Ports[i] on, 0 if it does not serve it.
	// Backends whose ports are the service's target ports share one slice
	// (the common case: see portResolver), so it must never be modified.
	TargetPorts []uint16
}

// TargetPort is the port b serves the merged service's i-th port on, 0
// when it does not serve it.
func (b Backend) TargetPort(i int) uint16 {
	if i < 0 || i >= len(b.TargetPorts) {
		return 0
	}
	return b.TargetPorts[i]
}

// MergedService is one service as this agent's node should serve it: the
// local cluster's frontends and ports, and the backends chosen across the
// mesh by the shared/affinity/region rules.
type MergedService struct {
	ServiceName
	Ports []v1.ServicePort
	// FrontendIPs are the local cluster's VIPs; empty when the service
	// does not exist in the local cluster (it cannot be reached here then).
	FrontendIPs []netip.Addr
	Global      bool
	Affinity    v1.Affinity
	// FailoverRegions is the region order in force (see mergeService):
	// the local service's, or, when the service does not exist locally,
	// the first remote's by cluster name.
	FailoverRegions []string
	// HealthCheck is how the agent probes this service's backends on its
	// own node: the local service's check (a node probes only its own
	// cluster's pods), else the first remote's by cluster name.
	HealthCheck v1.HealthCheck
	// Backends are the active backends traffic goes to.
	Backends []Backend
	// Offered counts, per cluster, the active backends it offers to this
	// cluster (before affinity chooses), for status.
	Offered map[string]int
}

// IPCacheEntry maps a pod IP to where and who it is.
type IPCacheEntry struct {
	Identity v1.NumericIdentity
	NodeIP   netip.Addr
	Cluster  string
}

// Snapshot is the merged desired state at one version. It is immutable:
// readers may keep and read it without locks; a change produces a new one.
type Snapshot struct {
	Version uint64
	Time    time.Time
	// Services by name.
	Services map[ServiceName]*MergedService
	// Nodes by cluster, then node name.
	Nodes map[string]map[string]*v1.Node
	// IPCache by cluster, then pod IP.
	IPCache map[string]map[netip.Addr]IPCacheEntry
	// ClusterIDs of the admitted clusters, by name.
	ClusterIDs map[string]v1.ClusterID
	// Encryption is the local cluster's encryption setting: the last one
	// its cluster-config published (kept while its session is down).
	Encryption v1.EncryptionConfig
}

// LookupIP finds a pod IP in any cluster.
func (s *Snapshot) LookupIP(ip netip.Addr) (IPCacheEntry, bool) {
	for _, m := range s.IPCache {
		if e, ok := m[ip]; ok {
			return e, true
		}
	}
	return IPCacheEntry{}, false
}

// RemoteNodes lists the nodes of every cluster, the local node excluded,
// for tunnels and encryption peers.
func (s *Snapshot) AllNodes() []*v1.Node {
	var out []*v1.Node
	for _, nodes := range s.Nodes {
		for _, n := range nodes {
			out = append(out, n)
		}
	}
	return out
}
