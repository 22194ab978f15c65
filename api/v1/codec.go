package v1

import (
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// Version is the wire version this package writes and the only one it
// reads, the "v" field of every value.
const Version = 1

// MaxValueSize is the largest value, in bytes, a reader accepts; larger
// values are rejected before any decoding and Encode refuses to write them.
//
// Values come from other clusters, so this bounds what one hostile or buggy
// writer can make every agent in the mesh allocate per entry. Real values
// are far smaller: an Endpoint is ~180 bytes, a Node well under 1 KiB. The
// largest are a Service and a BackendShard, at 100-175 bytes per backend
// (long cloud node names cost the most), so one value holds roughly
// 370-640 backends; a service with more publishes them in shards (see
// [Service.BackendShards]). A value that is too large anyway fails loudly
// at the writer (Encode) rather than silently at every reader.
const MaxValueSize = 64 << 10

// maxTimestampSize bounds heartbeat and canary values; RFC3339 with
// nanoseconds and an offset is 35 bytes.
const maxTimestampSize = 64

// wireValue is implemented by pointers to the five value types.
type wireValue interface {
	Validate() error
	version() int
	setVersion()
	// normalize makes empty slices nil, so that decoding, re-encoding
	// (where empty fields are omitted) and decoding again yields a value
	// equal under reflect.DeepEqual, and so readers comparing old and new
	// values see no spurious change.
	normalize()
	object() string
}

func (c *ClusterConfig) version() int { return c.V }
func (n *Node) version() int          { return n.V }
func (e *Endpoint) version() int      { return e.V }
func (id *Identity) version() int     { return id.V }
func (s *Service) version() int       { return s.V }
func (sh *BackendShard) version() int { return sh.V }

func (c *ClusterConfig) setVersion() { c.V = Version }
func (n *Node) setVersion()          { n.V = Version }
func (e *Endpoint) setVersion()      { e.V = Version }
func (id *Identity) setVersion()     { id.V = Version }
func (s *Service) setVersion()       { s.V = Version }
func (sh *BackendShard) setVersion() { sh.V = Version }

func (c *ClusterConfig) object() string { return "cluster config" }
func (n *Node) object() string          { return "node" }
func (e *Endpoint) object() string      { return "endpoint" }
func (id *Identity) object() string     { return "identity" }
func (s *Service) object() string       { return "service" }
func (sh *BackendShard) object() string { return "backend shard" }

func (c *ClusterConfig) normalize() { c.PodCIDRs = nilIfEmpty(c.PodCIDRs) }
func (n *Node) normalize() {
	n.IPs = nilIfEmpty(n.IPs)
	n.PodCIDRs = nilIfEmpty(n.PodCIDRs)
}
func (e *Endpoint) normalize()  {}
func (id *Identity) normalize() {}
func (s *Service) normalize() {
	s.Ports = nilIfEmpty(s.Ports)
	s.FrontendIPs = nilIfEmpty(s.FrontendIPs)
	s.Backends = normalizeBackends(s.Backends)
	s.BackendShards = nilIfEmpty(s.BackendShards)
	s.FailoverRegions = nilIfEmpty(s.FailoverRegions)
}
func (sh *BackendShard) normalize() { sh.Backends = normalizeBackends(sh.Backends) }

func normalizeBackends(bs []Backend) []Backend {
	bs = nilIfEmpty(bs)
	for i := range bs {
		bs[i].Ports = nilIfEmpty(bs[i].Ports)
	}
	return bs
}

// nilIfEmpty also drops the spare capacity encoding/json leaves behind
// (it grows slices by doubling): a reader holds thousands of decoded
// services, and up to half of each backend list would be slack.
func nilIfEmpty[T any](s []T) []T {
	if len(s) == 0 {
		return nil
	}
	if cap(s) > len(s) {
		return append(make([]T, 0, len(s)), s...)
	}
	return s
}

// Encode validates v and returns its JSON with "v" set to Version. v is a
// ClusterConfig, Node, Endpoint, Identity, Service or BackendShard, or a
// pointer to one; a pointed-to value is not modified. Encode fails with
// ErrInvalid if v does
// not validate and ErrTooLarge if the result exceeds MaxValueSize.
func Encode(v any) ([]byte, error) {
	w, err := wireCopy(v)
	if err != nil {
		return nil, err
	}
	w.setVersion()
	if err := w.Validate(); err != nil {
		return nil, fmt.Errorf("api/v1: encode %s: %w", w.object(), err)
	}
	b, err := json.Marshal(w)
	if err != nil {
		return nil, fmt.Errorf("api/v1: encode %s: %w", w.object(), err)
	}
	if len(b) > MaxValueSize {
		return nil, fmt.Errorf("api/v1: encode %s: %w: %d bytes, limit %d; readers would reject it", w.object(), ErrTooLarge, len(b), MaxValueSize)
	}
	return b, nil
}

// wireCopy returns a pointer to a copy of v, so Encode can set the version
// without writing to the caller's value.
func wireCopy(v any) (wireValue, error) {
	switch x := v.(type) {
	case ClusterConfig:
		return &x, nil
	case Node:
		return &x, nil
	case Endpoint:
		return &x, nil
	case Identity:
		return &x, nil
	case Service:
		return &x, nil
	case BackendShard:
		return &x, nil
	case *ClusterConfig:
		if x != nil {
			c := *x
			return &c, nil
		}
	case *Node:
		if x != nil {
			c := *x
			return &c, nil
		}
	case *Endpoint:
		if x != nil {
			c := *x
			return &c, nil
		}
	case *Identity:
		if x != nil {
			c := *x
			return &c, nil
		}
	case *Service:
		if x != nil {
			c := *x
			return &c, nil
		}
	case *BackendShard:
		if x != nil {
			c := *x
			return &c, nil
		}
	}
	return nil, fmt.Errorf("api/v1: encode: cannot encode %T (nil?); want a ClusterConfig, Node, Endpoint, Identity, Service or BackendShard, or a non-nil pointer to one", v)
}

// decode is the one decoding path: size, JSON, version, validation. key is
// only used in error messages (empty for the plain decoders).
func decode(key string, data []byte, w wireValue) error {
	if len(data) > MaxValueSize {
		return decodeErr(w, key, fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(data), MaxValueSize))
	}
	if err := json.Unmarshal(data, w); err != nil {
		// A newer major version may change a field's type; say "upgrade"
		// rather than report the type error that causes. Only failures
		// pay for this second look.
		if v, ok := peekVersion(data); ok && v != Version {
			return decodeErr(w, key, versionErr(v))
		}
		return decodeErr(w, key, err)
	}
	if v := w.version(); v != Version {
		return decodeErr(w, key, versionErr(v))
	}
	w.normalize()
	if err := w.Validate(); err != nil {
		return decodeErr(w, key, err)
	}
	return nil
}

func peekVersion(data []byte) (int, bool) {
	var p struct {
		V *int `json:"v"`
	}
	if json.Unmarshal(data, &p) != nil || p.V == nil {
		return 0, false
	}
	return *p.V, true
}

func versionErr(v int) error {
	if v > Version {
		return fmt.Errorf("%w %d, this reader understands %d; upgrade trellis", ErrUnsupportedVersion, v, Version)
	}
	return fmt.Errorf("%w %d, this reader understands %d; the writer did not set \"v\"", ErrUnsupportedVersion, v, Version)
}

func decodeErr(w wireValue, key string, err error) error {
	if key == "" {
		return fmt.Errorf("api/v1: decode %s: %w", w.object(), err)
	}
	return fmt.Errorf("api/v1: decode %s at %s: %w", w.object(), quote(key), err)
}

// DecodeClusterConfig decodes and validates a ClusterConfig value.
func DecodeClusterConfig(data []byte) (ClusterConfig, error) {
	var c ClusterConfig
	if err := decode("", data, &c); err != nil {
		return ClusterConfig{}, err
	}
	return c, nil
}

// DecodeNode decodes and validates a Node value.
func DecodeNode(data []byte) (Node, error) {
	var n Node
	if err := decode("", data, &n); err != nil {
		return Node{}, err
	}
	return n, nil
}

// DecodeEndpoint decodes and validates an Endpoint value. It is on the cold
// sync path (one call per pod in the mesh): one json.Unmarshal and an
// allocation-free Validate.
func DecodeEndpoint(data []byte) (Endpoint, error) {
	var e Endpoint
	if err := decode("", data, &e); err != nil {
		return Endpoint{}, err
	}
	return e, nil
}

// DecodeIdentity decodes and validates an Identity value.
func DecodeIdentity(data []byte) (Identity, error) {
	var id Identity
	if err := decode("", data, &id); err != nil {
		return Identity{}, err
	}
	return id, nil
}

// DecodeService decodes and validates a Service value.
func DecodeService(data []byte) (Service, error) {
	var s Service
	if err := decode("", data, &s); err != nil {
		return Service{}, err
	}
	return s, nil
}

// DecodeBackendShard decodes and validates a BackendShard value.
func DecodeBackendShard(data []byte) (BackendShard, error) {
	var sh BackendShard
	if err := decode("", data, &sh); err != nil {
		return BackendShard{}, err
	}
	return sh, nil
}

// The entry decoders are what a reader of etcd uses: they parse the key
// (ErrBadKey, also for a key of another kind), decode the value like the
// plain decoders, and then require the body to name the same object as the
// key (ErrKeyMismatch). Without that last check, cluster A could publish a
// node claiming to belong to cluster B.

// DecodeClusterConfigEntry decodes the value at a cluster-config key and
// checks that its name is the key's cluster.
func DecodeClusterConfigEntry(key string, data []byte) (ClusterConfig, error) {
	k, err := entryKey(key, KindClusterConfig)
	if err != nil {
		return ClusterConfig{}, err
	}
	var c ClusterConfig
	if err := decode(key, data, &c); err != nil {
		return ClusterConfig{}, err
	}
	if c.Name != k.Cluster {
		return ClusterConfig{}, mismatch(&c, key, "name", c.Name, k.Cluster)
	}
	return c, nil
}

// DecodeNodeEntry decodes the value at a node key and checks that its
// cluster and name are the key's.
func DecodeNodeEntry(key string, data []byte) (Node, error) {
	k, err := entryKey(key, KindNodes)
	if err != nil {
		return Node{}, err
	}
	var n Node
	if err := decode(key, data, &n); err != nil {
		return Node{}, err
	}
	if n.Cluster != k.Cluster {
		return Node{}, mismatch(&n, key, "cluster", n.Cluster, k.Cluster)
	}
	if n.Name != k.Name {
		return Node{}, mismatch(&n, key, "name", n.Name, k.Name)
	}
	return n, nil
}

// DecodeEndpointEntry decodes the value at an endpoint key and checks that
// its cluster and IP are the key's.
func DecodeEndpointEntry(key string, data []byte) (Endpoint, error) {
	k, err := entryKey(key, KindEndpoints)
	if err != nil {
		return Endpoint{}, err
	}
	var e Endpoint
	if err := decode(key, data, &e); err != nil {
		return Endpoint{}, err
	}
	if e.Cluster != k.Cluster {
		return Endpoint{}, mismatch(&e, key, "cluster", e.Cluster, k.Cluster)
	}
	// ParseKey accepted only the canonical spelling, so comparing the
	// spelled-out body IP is exact; the stack buffer keeps it alloc-free.
	var buf [64]byte
	if string(e.IP.AppendTo(buf[:0])) != k.Name {
		return Endpoint{}, mismatch(&e, key, "ip", e.IP.String(), k.Name)
	}
	return e, nil
}

// DecodeIdentityEntry decodes the value at an identity key and checks that
// its cluster and ID are the key's.
func DecodeIdentityEntry(key string, data []byte) (Identity, error) {
	k, err := entryKey(key, KindIdentities)
	if err != nil {
		return Identity{}, err
	}
	var id Identity
	if err := decode(key, data, &id); err != nil {
		return Identity{}, err
	}
	if id.Cluster != k.Cluster {
		return Identity{}, mismatch(&id, key, "cluster", id.Cluster, k.Cluster)
	}
	if id.ID.String() != k.Name {
		return Identity{}, mismatch(&id, key, "id", id.ID.String(), k.Name)
	}
	return id, nil
}

// DecodeServiceEntry decodes the value at a service key and checks that its
// cluster, namespace and name are the key's.
func DecodeServiceEntry(key string, data []byte) (Service, error) {
	k, err := entryKey(key, KindServices)
	if err != nil {
		return Service{}, err
	}
	var s Service
	if err := decode(key, data, &s); err != nil {
		return Service{}, err
	}
	if s.Cluster != k.Cluster {
		return Service{}, mismatch(&s, key, "cluster", s.Cluster, k.Cluster)
	}
	if s.Namespace != k.Namespace {
		return Service{}, mismatch(&s, key, "namespace", s.Namespace, k.Namespace)
	}
	if s.Name != k.Name {
		return Service{}, mismatch(&s, key, "name", s.Name, k.Name)
	}
	return s, nil
}

// DecodeBackendShardEntry decodes the value at a backend shard key and
// checks that its cluster, namespace, service and shard index are the
// key's.
func DecodeBackendShardEntry(key string, data []byte) (BackendShard, error) {
	k, err := entryKey(key, KindBackends)
	if err != nil {
		return BackendShard{}, err
	}
	var sh BackendShard
	if err := decode(key, data, &sh); err != nil {
		return BackendShard{}, err
	}
	switch {
	case sh.Cluster != k.Cluster:
		return BackendShard{}, mismatch(&sh, key, "cluster", sh.Cluster, k.Cluster)
	case sh.Namespace != k.Namespace:
		return BackendShard{}, mismatch(&sh, key, "namespace", sh.Namespace, k.Namespace)
	case sh.Service != k.Name:
		return BackendShard{}, mismatch(&sh, key, "service", sh.Service, k.Name)
	case sh.Shard != k.Shard:
		return BackendShard{}, mismatch(&sh, key, "shard", strconv.Itoa(sh.Shard), strconv.Itoa(k.Shard))
	}
	return sh, nil
}

func entryKey(key string, want Kind) (Key, error) {
	k, err := ParseKey(key)
	if err != nil {
		return Key{}, err
	}
	if k.Kind != want {
		return Key{}, fmt.Errorf("api/v1: decode %s: %w: %s is a %s key, want a %s key", want, ErrBadKey, quote(key), k.Kind, want)
	}
	return k, nil
}

func mismatch(w wireValue, key, field, body, fromKey string) error {
	return decodeErr(w, key, fmt.Errorf("%w: body %s is %s, key says %s", ErrKeyMismatch, field, quote(body), quote(fromKey)))
}

// EncodeTimestamp returns t as an RFC3339 string in UTC with nanoseconds,
// the value of heartbeat and synced-canary keys.
func EncodeTimestamp(t time.Time) []byte {
	return t.UTC().AppendFormat(make([]byte, 0, 32), time.RFC3339Nano)
}

// DecodeTimestamp parses a heartbeat or synced-canary value: an RFC3339
// time, returned in UTC. Years outside 0000-9999 (after conversion to UTC)
// are rejected so that every accepted value can be written back.
func DecodeTimestamp(data []byte) (time.Time, error) {
	if len(data) > maxTimestampSize {
		return time.Time{}, fmt.Errorf("api/v1: decode timestamp: %w: %d bytes, limit %d", ErrTooLarge, len(data), maxTimestampSize)
	}
	t, err := time.Parse(time.RFC3339, string(data))
	if err != nil {
		return time.Time{}, fmt.Errorf("api/v1: decode timestamp: %w", err)
	}
	t = t.UTC()
	if y := t.Year(); y < 0 || y > 9999 {
		return time.Time{}, fmt.Errorf("api/v1: decode timestamp %s: %w: year %d in UTC; want 0000-9999", quote(string(data)), ErrInvalid, y)
	}
	return t, nil
}
