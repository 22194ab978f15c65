package v1

import (
	"net/netip"
	"strconv"
)

// ClusterID is a cluster's number in the mesh, 1 to [MaxClusterID]. It is
// unique within a mesh and forms the top bits of every identity the cluster
// allocates.
type ClusterID uint32

// MaxClusterID is the largest cluster ID. It needs
// [Capabilities.MaxConnectedClusters] = 511; with 255, IDs stop at 255.
const MaxClusterID = 511

// NumericIdentity is a security identity as the datapath sees it:
// cluster ID << 16 | cluster-local identity.
type NumericIdentity uint32

// MakeIdentity returns cluster<<16 | local.
func MakeIdentity(cluster ClusterID, local uint16) NumericIdentity {
	return NumericIdentity(uint32(cluster)<<16 | uint32(local))
}

// ClusterID returns the cluster bits of id (id >> 16).
func (id NumericIdentity) ClusterID() ClusterID { return ClusterID(id >> 16) }

// Local returns the cluster-local part of id (its low 16 bits).
func (id NumericIdentity) Local() uint16 { return uint16(id) }

// String returns id in decimal, the form used in identity keys.
func (id NumericIdentity) String() string { return strconv.FormatUint(uint64(id), 10) }

// ClusterConfig describes a cluster to the clusters that connect to it. The
// mesh API server writes it once at start, under [ClusterConfigKey].
type ClusterConfig struct {
	// V is the wire version; [Encode] sets it.
	V int `json:"v"`
	// Name is the cluster name: a lowercase DNS label of at most 32
	// characters, the <cluster> segment of every key.
	Name string `json:"name"`
	// ID is the cluster ID, 1 to 511, unique in the mesh.
	ID ClusterID `json:"id"`
	// PodCIDRs are the ranges this cluster's pod IPs come from. Readers
	// accept an endpoint from this cluster only if its IP is inside one of
	// them (see [ClusterConfig.Contains]). At least one is required.
	PodCIDRs []netip.Prefix `json:"podCIDRs,omitempty"`
	// Region and Zone are Kubernetes topology label values; optional.
	Region string `json:"region,omitempty"`
	Zone   string `json:"zone,omitempty"`
	// Capabilities tells readers how to treat the rest of this store.
	Capabilities Capabilities `json:"capabilities"`
	// Encryption is the node-to-node encryption this cluster's agents run.
	// It is a setting, changed live through the API server's admin API
	// (`trellis encryption enable`), and a reader applies a change without
	// re-validating the cluster. Other clusters do not act on it: a pair of
	// nodes is encrypted when both nodes publish a key (see
	// [Node.WireGuardPublicKey]).
	Encryption EncryptionConfig `json:"encryption,omitzero"`
}

// EncryptionConfig is a cluster's encryption setting.
type EncryptionConfig struct {
	// Type is [EncryptionNone], [EncryptionWireGuard] or [EncryptionIPsec].
	Type string `json:"type,omitempty"`
	// Strict drops unencrypted pod traffic between two nodes that both
	// have encryption on, instead of letting it through in clear while the
	// encrypted path is not up. Needs a Type.
	Strict bool `json:"strict,omitempty"`
	// Rotation counts key rotations asked for (`trellis encryption
	// rotate`): each node of the cluster takes a new key when it sees the
	// count go up.
	Rotation uint64 `json:"rotation,omitempty"`
}

// Capabilities are the features a cluster's mesh API server promises.
type Capabilities struct {
	// SyncedCanaries means the server writes a [SyncedKey] for each kind in
	// [SyncedKinds] after its first full publication. A reader must not
	// delete state for this cluster before it has seen the canary. Without
	// it, a reader has to fall back to "listed once".
	SyncedCanaries bool `json:"syncedCanaries,omitempty"`
	// MaxConnectedClusters is 255 or 511, the mesh-wide cluster ID space
	// the cluster was configured for. Every cluster in a mesh must agree.
	MaxConnectedClusters int `json:"maxConnectedClusters"`
	// BackendShards means the server publishes the backends of a service
	// too large for one value as [BackendShard] values under
	// [KindBackends], and writes a [SyncedKey] for that kind too. A reader
	// watches them only when this is set: a server from before shards
	// writes neither the shards nor their canary.
	BackendShards bool `json:"backendShards,omitempty"`
}

// MaxIPsecKeyIndex is the largest [Node.IPsecKeyIndex]: the index lives in
// four bits of the SPI.
const MaxIPsecKeyIndex = 15

// Encryption types for [EncryptionConfig.Type].
const (
	EncryptionNone      = ""
	EncryptionWireGuard = "wireguard"
	EncryptionIPsec     = "ipsec"
)

// Node is one machine of a cluster, stored under [NodeKey].
type Node struct {
	// V is the wire version; [Encode] sets it.
	V int `json:"v"`
	// Cluster is the name of the cluster the node belongs to.
	Cluster string `json:"cluster"`
	// Name is the node name, a DNS subdomain (as in Kubernetes).
	Name string `json:"name"`
	// IPs are the node's underlay (internal) addresses that tunnels and
	// routes point at. At least one.
	IPs []netip.Addr `json:"ips"`
	// PodCIDRs are the pod ranges assigned to this node; optional (nodes
	// without pods, or IPAM that does not hand out per-node ranges).
	PodCIDRs []netip.Prefix `json:"podCIDRs,omitempty"`
	// WireGuardPublicKey is the node's WireGuard key, standard base64 of
	// 32 bytes; empty when the node does not run WireGuard.
	WireGuardPublicKey string `json:"wireGuardPublicKey,omitempty"`
	// IPsecKeyIndex selects the pre-shared key generation in use, 1 to
	// [MaxIPsecKeyIndex]; 0 when the node does not run IPsec.
	IPsecKeyIndex uint8 `json:"ipsecKeyIndex,omitempty"`
	// HealthAddr is host:port of the node's health endpoint; optional.
	HealthAddr string `json:"healthAddr,omitempty"`
	// Region and Zone are Kubernetes topology label values; optional.
	Region string `json:"region,omitempty"`
	Zone   string `json:"zone,omitempty"`
}

// Endpoint maps one pod IP to its identity and node, stored under
// [EndpointKey].
//
// It is the most numerous value in the mesh (a cold sync reads one per
// pod), so it is kept flat: no pointers, no maps, a few short strings.
type Endpoint struct {
	// V is the wire version; [Encode] sets it.
	V int `json:"v"`
	// Cluster is the name of the cluster the endpoint belongs to.
	Cluster string `json:"cluster"`
	// IP is the endpoint's address, also the last segment of its key.
	IP netip.Addr `json:"ip"`
	// Identity is the endpoint's security identity; its cluster bits are
	// the owning cluster's ID.
	Identity NumericIdentity `json:"identity"`
	// NodeIP is the underlay address of the node hosting the endpoint,
	// where traffic to IP is tunnelled or routed.
	NodeIP netip.Addr `json:"nodeIP"`
	// Namespace and Pod name the workload; both empty for endpoints that
	// are not pods. Pod requires Namespace.
	Namespace string `json:"namespace,omitempty"`
	Pod       string `json:"pod,omitempty"`
	// Ready reports whether the endpoint passes its readiness checks.
	Ready bool `json:"ready,omitempty"`
}

// Identity is a numeric identity and the labels that define it, stored
// under [IdentityKey].
type Identity struct {
	// V is the wire version; [Encode] sets it.
	V int `json:"v"`
	// Cluster is the name of the cluster that allocated the identity.
	Cluster string `json:"cluster"`
	// ID is the full numeric identity, cluster bits included.
	ID NumericIdentity `json:"id"`
	// Labels define the identity, e.g. "k8s:app": "web" and
	// "k8s:io.kubernetes.pod.namespace": "default". Keys are an optional
	// "source:" prefix followed by a Kubernetes label key; values follow
	// Kubernetes label-value rules. 1 to [MaxIdentityLabels] entries.
	Labels map[string]string `json:"labels"`
}

// MaxIdentityLabels bounds Identity.Labels.
const MaxIdentityLabels = 64

// Service is a Kubernetes service as the mesh sees it, stored under
// [ServiceKey].
//
// Its backends travel in the value itself (Backends) while they fit in
// one value of at most [MaxShardBackends] backends; a larger service
// publishes its backends as [BackendShard] values and lists them in
// BackendShards instead (see there for how a reader puts them together).
//
// Global means "merge this service with the services of the same
// namespace/name in other clusters". Shared means "and offer my backends to
// them". A cluster can take part in a global service without sharing its
// own backends (Global=true, Shared=false), but it cannot share backends of
// a service that is not global: Validate rejects Shared without Global.
// Publishers set both explicitly (the usual Kubernetes annotation default is
// shared=true for a global service); an absent JSON field is false.
type Service struct {
	// V is the wire version; [Encode] sets it.
	V int `json:"v"`
	// Cluster is the name of the cluster the service belongs to.
	Cluster string `json:"cluster"`
	// Namespace and Name identify the service; both DNS labels.
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Ports are the service ports. Protocol+Port and Name are unique.
	Ports []ServicePort `json:"ports,omitempty"`
	// FrontendIPs are the service's virtual IPs in its own cluster.
	FrontendIPs []netip.Addr `json:"frontendIPs,omitempty"`
	// Backends are the endpoints serving the service, ready or not. Empty
	// when BackendShards is not.
	Backends []Backend `json:"backends,omitempty"`
	// BackendShards, when not empty, says the backends are published in
	// len(BackendShards) shards: shard i is the [BackendShard] at
	// BackendShardKey(Cluster, Namespace, Name, i), and BackendShards[i] is
	// the generation (BackendShard.Gen) it must carry. A reader uses the
	// shards only as a set whose generations all match; see
	// [BackendShard.Gen]. At most [MaxBackendShards] entries.
	BackendShards []uint64 `json:"backendShards,omitempty"`
	// Global marks the service as part of the mesh-wide service.
	Global bool `json:"global,omitempty"`
	// Shared offers this cluster's backends to other clusters; requires
	// Global.
	Shared bool `json:"shared,omitempty"`
	// Affinity picks which clusters' backends to prefer; requires Global
	// unless it is none.
	Affinity Affinity `json:"affinity,omitempty"`
	// FailoverRegions orders the regions whose clusters' backends a
	// reader turns to when it does not use its own cluster's (affinity
	// remote, or no active local backend): clusters of the reader's own
	// region first, then these regions in turn (the first with an active
	// backend wins), then all the rest. Region names as in
	// [ClusterConfig.Region], not empty, each once, at most
	// [MaxFailoverRegions]; requires Global.
	FailoverRegions []string `json:"failoverRegions,omitempty"`
	// HealthCheck says how the agent of a backend's node probes it (the
	// trellis.io/health-check annotation); the zero value is a TCP
	// connect to each target port. Global or not.
	HealthCheck HealthCheck `json:"healthCheck,omitzero"`
}

// MaxFailoverRegions bounds Service.FailoverRegions.
const MaxFailoverRegions = 16

// HealthCheck is how a node's agent probes the service's backends on
// that node, on each TCP target port.
type HealthCheck struct {
	// Type is [HealthCheckTCP] (also the empty string) or
	// [HealthCheckHTTP].
	Type HealthCheckType `json:"type,omitempty"`
	// Path is the path an HTTP check GETs, with its query if any: it
	// starts with "/", holds printable ASCII without spaces, at most
	// [MaxHealthCheckPath] bytes. Empty for a TCP check.
	Path string `json:"path,omitempty"`
}

// HealthCheckType is the kind of a [HealthCheck].
type HealthCheckType string

// Health check types. The empty string means HealthCheckTCP.
const (
	// HealthCheckTCP passes when a TCP connect to the port succeeds.
	HealthCheckTCP HealthCheckType = "tcp"
	// HealthCheckHTTP passes when GET Path on the port answers 2xx or
	// 3xx (redirects are not followed).
	HealthCheckHTTP HealthCheckType = "http"
)

// MaxHealthCheckPath bounds HealthCheck.Path.
const MaxHealthCheckPath = 256

// IsHTTP reports whether c is an HTTP check.
func (c HealthCheck) IsHTTP() bool { return c.Type == HealthCheckHTTP }

// String is the check as the trellis.io/health-check annotation spells
// it: "tcp" or "http:<path>".
func (c HealthCheck) String() string {
	if c.IsHTTP() {
		return "http:" + c.Path
	}
	return "tcp"
}

// Shard limits. A writer fills a shard up to MaxShardBackends backends and
// [ShardFillBytes] of JSON; readers enforce neither (a later writer may
// pack differently), only [MaxValueSize] and MaxBackendShards.
const (
	// MaxShardBackends is how many backends a writer puts in one value:
	// in a shard, and in a Service that carries its backends itself. Like
	// an EndpointSlice's limit, it bounds what one backend's change costs
	// to rewrite and to decode again.
	MaxShardBackends = 1000
	// MaxBackendShards bounds a service's shards, so that the service value
	// can list a generation of any size for each (1024 × 20 digits is 21
	// KiB). 1024 shards of up to 1000 backends, or 56 KiB of them, hold
	// 170 000 to a million backends: beyond what the datapath holds (see
	// bpf.MapSizes).
	MaxBackendShards = 1024
	// ShardFillBytes is the JSON size up to which a writer adds backends
	// to a shard: the 8 KiB left below MaxValueSize let the backends it
	// holds change state or grow a little without the shard overflowing.
	ShardFillBytes = MaxValueSize - 8<<10
)

// BackendShard is one part of the backends of a [Service] that lists
// BackendShards, stored under [BackendShardKey].
type BackendShard struct {
	// V is the wire version; [Encode] sets it.
	V int `json:"v"`
	// Cluster, Namespace and Service name the service the shard belongs
	// to.
	Cluster   string `json:"cluster"`
	Namespace string `json:"namespace"`
	Service   string `json:"service"`
	// Shard is the shard's index, 0 to MaxBackendShards-1, also the last
	// segment of its key.
	Shard int `json:"shard"`
	// Gen is the generation of the shard's assignment: a writer that
	// moves a backend from one shard to another writes both shards with a
	// new generation, and the service with their new generations in
	// BackendShards. A reader puts a service together only from shards
	// whose generations are all the ones the service lists, and keeps the
	// backends it had until then, so it never sees the moment when a moved
	// backend has left its old shard but not yet reached its new one,
	// whatever order the keys arrive in. Changes that move nothing (a
	// backend added, removed or changing state) keep the generation and
	// apply shard by shard.
	Gen uint64 `json:"gen,omitempty"`
	// Backends are checked as a Service's are, except that a backend's
	// port names are checked against the service's ports only by the
	// writer (a shard does not carry the ports).
	Backends []Backend `json:"backends,omitempty"`
}

// ServicePort is one port of a [Service].
type ServicePort struct {
	// Name is the port name; may be empty when the service has one port.
	Name string `json:"name,omitempty"`
	// Protocol is TCP, UDP or SCTP.
	Protocol Protocol `json:"protocol"`
	// Port is the port clients connect to on a frontend IP, 1–65535.
	Port uint16 `json:"port"`
	// TargetPort is the port on the backends when it is the same for all
	// of them; 0 means "see each Backend's ports".
	TargetPort uint16 `json:"targetPort,omitempty"`
}

// Protocol is a service port's transport protocol.
type Protocol string

// Protocols a service port may use.
const (
	ProtocolTCP  Protocol = "TCP"
	ProtocolUDP  Protocol = "UDP"
	ProtocolSCTP Protocol = "SCTP"
)

// Backend is one endpoint behind a [Service].
type Backend struct {
	// IP is the backend's address.
	IP netip.Addr `json:"ip"`
	// Ports maps service port names to the port on this backend.
	//
	// A slice rather than map[string]uint16: it decodes without building
	// a map per backend (a service can have hundreds), it keeps the
	// publisher's order so two encodings of the same service are
	// byte-identical, and it has no nil-versus-empty ambiguity.
	Ports []BackendPort `json:"ports,omitempty"`
	// State is active, terminating or unready.
	State BackendState `json:"state"`
	// Node is the name of the node hosting the backend; optional.
	Node string `json:"node,omitempty"`
	// Zone is the backend's topology zone, for topology-aware routing;
	// optional.
	Zone string `json:"zone,omitempty"`
}

// BackendPort is the port a backend serves one named service port on.
type BackendPort struct {
	// Name is the [ServicePort] name this port serves (may be empty, for a
	// service with one unnamed port).
	Name string `json:"name,omitempty"`
	// Port is the port on the backend, 1–65535.
	Port uint16 `json:"port"`
}

// BackendState says whether a backend takes new connections.
type BackendState string

// Backend states.
const (
	// BackendActive takes new connections.
	BackendActive BackendState = "active"
	// BackendTerminating keeps existing connections but takes no new ones
	// unless no active backend is left.
	BackendTerminating BackendState = "terminating"
	// BackendUnready takes no connections.
	BackendUnready BackendState = "unready"
)

// Affinity is a global service's preference between local and remote
// backends.
type Affinity string

// Affinities. The empty string means AffinityNone.
const (
	// AffinityNone balances over all clusters' backends.
	AffinityNone Affinity = "none"
	// AffinityLocal prefers the local cluster's backends and fails over to
	// remote ones when none is active.
	AffinityLocal Affinity = "local"
	// AffinityRemote prefers remote clusters' backends.
	AffinityRemote Affinity = "remote"
)

// IsNone reports whether a is AffinityNone or empty.
func (a Affinity) IsNone() bool { return a == "" || a == AffinityNone }

// Contains reports whether ip is inside one of c's pod CIDRs. A zoned or
// IPv4-mapped IPv6 address is never contained, as in [netip.Prefix.Contains];
// Validate rejects those for every IP field anyway.
func (c *ClusterConfig) Contains(ip netip.Addr) bool {
	for _, p := range c.PodCIDRs {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// ContainsPrefix reports whether p lies wholly inside one of c's pod
// CIDRs: the test for a node's pod CIDR, which must not claim a single
// address beyond its cluster's ranges.
func (c *ClusterConfig) ContainsPrefix(p netip.Prefix) bool {
	for _, q := range c.PodCIDRs {
		if q.Bits() <= p.Bits() && q.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// PrefixesOverlap returns the first pair (x from a, y from b) that overlap,
// and whether there is one. Use it to refuse connecting clusters whose pod
// CIDRs collide. It is quadratic; the lists are short.
func PrefixesOverlap(a, b []netip.Prefix) (netip.Prefix, netip.Prefix, bool) {
	for _, x := range a {
		for _, y := range b {
			if x.Overlaps(y) {
				return x, y, true
			}
		}
	}
	return netip.Prefix{}, netip.Prefix{}, false
}
