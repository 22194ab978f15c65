package v1

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Prefix is the root of every Trellis key. etcd roles for remote clusters
// grant read access to exactly this prefix.
const Prefix = "trellis/v1/"

// Kind is the first segment after [Prefix]: what a key holds.
type Kind string

// Kinds of keys.
const (
	KindClusterConfig Kind = "cluster-config"
	KindHeartbeat     Kind = "heartbeat"
	KindNodes         Kind = "nodes"
	KindEndpoints     Kind = "endpoints"
	KindIdentities    Kind = "identities"
	KindServices      Kind = "services"
	KindBackends      Kind = "backends"
	KindSynced        Kind = "synced"
)

// SyncedKinds returns the kinds that get a synced canary: nodes, endpoints,
// identities, services and backends (the last only from a server that
// advertises [Capabilities.BackendShards]). It returns a new slice on
// every call.
func SyncedKinds() []Kind {
	return []Kind{KindNodes, KindEndpoints, KindIdentities, KindServices, KindBackends}
}

func isSyncedKind(k Kind) bool {
	switch k {
	case KindNodes, KindEndpoints, KindIdentities, KindServices, KindBackends:
		return true
	}
	return false
}

// The builders below do not validate their arguments: they are called by
// writers that validated the value first. ParseKey accepts exactly the keys
// the builders produce from valid values.

// ClusterConfigKey returns trellis/v1/cluster-config/<cluster>.
func ClusterConfigKey(cluster string) string {
	return Prefix + string(KindClusterConfig) + "/" + cluster
}

// HeartbeatKey returns trellis/v1/heartbeat/<cluster>.
func HeartbeatKey(cluster string) string {
	return Prefix + string(KindHeartbeat) + "/" + cluster
}

// NodeKey returns trellis/v1/nodes/<cluster>/<node>.
func NodeKey(cluster, node string) string {
	return KindPrefix(KindNodes, cluster) + node
}

// EndpointKey returns trellis/v1/endpoints/<cluster>/<ip>, with ip in its
// canonical text form (netip.Addr.String).
func EndpointKey(cluster string, ip netip.Addr) string {
	return KindPrefix(KindEndpoints, cluster) + ip.String()
}

// IdentityKey returns trellis/v1/identities/<cluster>/<id>, id in decimal.
func IdentityKey(cluster string, id NumericIdentity) string {
	return KindPrefix(KindIdentities, cluster) + id.String()
}

// ServiceKey returns trellis/v1/services/<cluster>/<namespace>/<name>.
func ServiceKey(cluster, namespace, name string) string {
	return KindPrefix(KindServices, cluster) + namespace + "/" + name
}

// BackendShardKey returns
// trellis/v1/backends/<cluster>/<namespace>/<name>/<shard>, shard in
// decimal.
func BackendShardKey(cluster, namespace, name string, shard int) string {
	return BackendShardPrefix(cluster, namespace, name) + strconv.Itoa(shard)
}

// BackendShardPrefix returns trellis/v1/backends/<cluster>/<namespace>/<name>/,
// the prefix of one service's shards.
func BackendShardPrefix(cluster, namespace, name string) string {
	return KindPrefix(KindBackends, cluster) + namespace + "/" + name + "/"
}

// SyncedKey returns trellis/v1/synced/<cluster>/<kind>, the canary a
// cluster writes once it has published all of kind.
func SyncedKey(cluster string, kind Kind) string {
	return KindPrefix(KindSynced, cluster) + string(kind)
}

// KindPrefix returns trellis/v1/<kind>/<cluster>/, the prefix to list or
// watch one cluster's entries of a kind. The trailing slash keeps cluster
// "c1" from matching "c10". It is meant for the per-entry kinds (nodes,
// endpoints, identities, services, backends, synced); cluster-config and heartbeat are
// single keys, use [ClusterConfigKey] and [HeartbeatKey].
func KindPrefix(kind Kind, cluster string) string {
	return Prefix + string(kind) + "/" + cluster + "/"
}

// Key is a parsed Trellis key.
type Key struct {
	// Kind is what the key holds.
	Kind Kind
	// Cluster is the <cluster> segment.
	Cluster string
	// Name is the node name, endpoint IP, decimal identity, service name
	// (of a service or of a backend shard) or synced kind. Empty for
	// cluster-config and heartbeat keys.
	Name string
	// Namespace is the service namespace; empty for other kinds.
	Namespace string
	// Shard is a backend shard's index; 0 for other kinds.
	Shard int
}

// String rebuilds the key. For a Key returned by ParseKey it is the string
// that was parsed.
func (k Key) String() string {
	switch k.Kind {
	case KindClusterConfig, KindHeartbeat:
		return Prefix + string(k.Kind) + "/" + k.Cluster
	case KindServices:
		return ServiceKey(k.Cluster, k.Namespace, k.Name)
	case KindBackends:
		return BackendShardKey(k.Cluster, k.Namespace, k.Name, k.Shard)
	}
	return KindPrefix(k.Kind, k.Cluster) + k.Name
}

// ParseKey splits a Trellis key into its parts and checks each one: the
// prefix, a known kind, the number of segments for that kind, a valid
// cluster name, and a name valid for the kind (a DNS subdomain for nodes, a
// canonical IP for endpoints, a canonical decimal identity with cluster bits
// for identities, DNS labels for service namespace and name, and for a
// backend shard also a canonical decimal index below [MaxBackendShards], a
// synced kind for canaries). Errors match [ErrBadKey].
func ParseKey(key string) (Key, error) {
	rest, ok := strings.CutPrefix(key, Prefix)
	if !ok {
		return Key{}, badKey(key, "does not start with "+strconv.Quote(Prefix))
	}
	kindStr, _, _ := strings.Cut(rest, "/")
	kind := Kind(kindStr)
	want := 0
	switch kind {
	case KindClusterConfig, KindHeartbeat:
		want = 2
	case KindNodes, KindEndpoints, KindIdentities, KindSynced:
		want = 3
	case KindServices:
		want = 4
	case KindBackends:
		want = 5
	default:
		return Key{}, badKey(key, fmt.Sprintf("unknown kind %s; want one of cluster-config, heartbeat, nodes, endpoints, identities, services, backends, synced", quote(string(kind))))
	}
	if n := strings.Count(rest, "/") + 1; n != want {
		return Key{}, badKey(key, fmt.Sprintf("%s key has %d segments after %q, want %d", kind, n, Prefix, want))
	}
	// Split into a fixed array rather than with strings.Split: agents
	// parse one key per pod on every cold sync.
	var parts [5]string
	for i, r := 0, rest; i < want; i++ {
		parts[i], r, _ = strings.Cut(r, "/")
	}
	k := Key{Kind: kind, Cluster: parts[1]}
	if msg := checkClusterName(k.Cluster); msg != "" {
		return Key{}, badKey(key, "cluster "+quote(k.Cluster)+": "+msg)
	}
	switch kind {
	case KindNodes:
		k.Name = parts[2]
		if !isDNS1123Subdomain(k.Name) {
			return Key{}, badKey(key, "node name "+quote(k.Name)+": "+allowedSubdomain)
		}
	case KindEndpoints:
		k.Name = parts[2]
		ip, err := netip.ParseAddr(k.Name)
		if err != nil {
			return Key{}, badKey(key, "endpoint IP "+quote(k.Name)+": not an IP address")
		}
		if msg := checkUnicast(ip); msg != "" {
			return Key{}, badKey(key, "endpoint IP "+quote(k.Name)+": "+msg)
		}
		// "010.0.0.1" does not parse; "::0:1" parses but is spelled
		// "::1" by EndpointKey. One IP, one key. (The stack buffer keeps
		// the comparison allocation-free.)
		var buf [64]byte
		if string(ip.AppendTo(buf[:0])) != k.Name {
			return Key{}, badKey(key, "endpoint IP "+quote(k.Name)+": not in canonical form, want "+strconv.Quote(ip.String()))
		}
	case KindIdentities:
		k.Name = parts[2]
		n, err := strconv.ParseUint(k.Name, 10, 32)
		if err != nil || strconv.FormatUint(n, 10) != k.Name {
			return Key{}, badKey(key, "identity "+quote(k.Name)+": want a decimal number without sign or leading zeros, at most 4294967295")
		}
		if msg := checkIdentity(NumericIdentity(n)); msg != "" {
			return Key{}, badKey(key, "identity "+k.Name+": "+msg)
		}
	case KindServices, KindBackends:
		k.Namespace, k.Name = parts[2], parts[3]
		if !isDNS1123Label(k.Namespace, 63) {
			return Key{}, badKey(key, "namespace "+quote(k.Namespace)+": "+allowedLabel63)
		}
		if !isDNS1123Label(k.Name, 63) {
			return Key{}, badKey(key, "service name "+quote(k.Name)+": "+allowedLabel63)
		}
		if kind == KindBackends {
			n, err := strconv.Atoi(parts[4])
			if err != nil || n < 0 || n >= MaxBackendShards || strconv.Itoa(n) != parts[4] {
				return Key{}, badKey(key, "shard "+quote(parts[4])+": want a decimal number from 0 to "+strconv.Itoa(MaxBackendShards-1)+" without sign or leading zeros")
			}
			k.Shard = n
		}
	case KindSynced:
		k.Name = parts[2]
		if !isSyncedKind(Kind(k.Name)) {
			return Key{}, badKey(key, "synced kind "+quote(k.Name)+": want nodes, endpoints, identities, services or backends")
		}
	}
	return k, nil
}

func badKey(key, msg string) error {
	return fmt.Errorf("api/v1: parse key %s: %w: %s", quote(key), ErrBadKey, msg)
}
