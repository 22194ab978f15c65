package v1

import (
	"encoding/base64"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Validation rules shared by the types and by ParseKey.
//
// Every check returns "" when the input is fine and otherwise a message
// saying what is allowed, so the success path allocates nothing: Endpoint
// validation runs once per pod on every cold sync.
//
// Validate does not look at V: freshly built values have V = 0, Encode sets
// it, and decoders check it before validating.

const (
	allowedClusterName = "want a lowercase DNS label of 1-32 characters: a-z, 0-9 and '-', starting and ending with a letter or digit"
	allowedLabel63     = "want a DNS label: 1-63 characters a-z, 0-9 and '-', starting and ending with a letter or digit"
	allowedSubdomain   = "want a DNS subdomain: 1-253 characters a-z, 0-9, '-' and '.', each dot-separated part starting and ending with a letter or digit"
	allowedLabelValue  = "want a Kubernetes label value: at most 63 characters A-Z, a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit"
	allowedLabelKey    = "want an optional \"source:\" (a DNS label) followed by a Kubernetes label key: an optional DNS-subdomain prefix and '/', then 1-63 characters A-Z, a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit"
	allowedPort        = "want a port from 1 to 65535"
)

// ValidateClusterName checks a cluster name: a lowercase RFC 1123 DNS label
// of at most 32 characters. Errors match [ErrInvalid].
func ValidateClusterName(name string) error {
	if msg := checkClusterName(name); msg != "" {
		return &ValidationError{Object: "cluster name", Name: cut(name), Field: "name", Value: cut(name), Allowed: msg}
	}
	return nil
}

// ValidateNodeName checks a node name: an RFC 1123 DNS subdomain, as
// Kubernetes node names are. Errors match [ErrInvalid].
func ValidateNodeName(name string) error {
	if !isDNS1123Subdomain(name) {
		return &ValidationError{Object: "node name", Name: cut(name), Field: "name", Value: cut(name), Allowed: allowedSubdomain}
	}
	return nil
}

// ValidateClusterID checks a cluster ID: 1 to [MaxClusterID]. Errors match
// [ErrInvalid].
func ValidateClusterID(id ClusterID) error {
	if msg := checkClusterID(id); msg != "" {
		s := strconv.FormatUint(uint64(id), 10)
		return &ValidationError{Object: "cluster ID", Name: s, Field: "id", Value: s, Allowed: msg}
	}
	return nil
}

// Validate checks every field of c; see the field comments for the rules.
func (c *ClusterConfig) Validate() error {
	if e := c.check(); e != nil {
		return e.in("cluster config", c.Name)
	}
	return nil
}

func (c *ClusterConfig) check() *ValidationError {
	if msg := checkClusterName(c.Name); msg != "" {
		return bad("name", c.Name, msg)
	}
	if msg := checkClusterID(c.ID); msg != "" {
		return bad("id", u64(uint64(c.ID)), msg)
	}
	if len(c.PodCIDRs) == 0 {
		return bad("podCIDRs", "[]", "want at least one pod CIDR; readers accept only endpoint IPs inside them")
	}
	if e := checkPrefixes("podCIDRs", c.PodCIDRs); e != nil {
		return e
	}
	if e := checkTopology(c.Region, c.Zone); e != nil {
		return e
	}
	caps := c.Capabilities
	switch caps.MaxConnectedClusters {
	case 255, 511:
	default:
		return bad("capabilities.maxConnectedClusters", strconv.Itoa(caps.MaxConnectedClusters), "want 255 or 511")
	}
	if int(c.ID) > caps.MaxConnectedClusters {
		return bad("id", u64(uint64(c.ID)), "above capabilities.maxConnectedClusters "+strconv.Itoa(caps.MaxConnectedClusters)+"; lower the ID or set maxConnectedClusters to 511")
	}
	return c.Encryption.check()
}

// Validate checks the type and that strict has one.
func (e EncryptionConfig) Validate() error {
	if ve := e.check(); ve != nil {
		return ve
	}
	return nil
}

func (e EncryptionConfig) check() *ValidationError {
	switch e.Type {
	case EncryptionNone, EncryptionWireGuard, EncryptionIPsec:
	default:
		return bad("encryption.type", e.Type, `want "" (none), "wireguard" or "ipsec"`)
	}
	if e.Strict && e.Type == EncryptionNone {
		return bad("encryption.strict", "true", "strict needs an encryption type (wireguard or ipsec)")
	}
	return nil
}

// Validate checks every field of n; see the field comments for the rules.
func (n *Node) Validate() error {
	if e := n.check(); e != nil {
		return e.in("node", n.Cluster+"/"+n.Name)
	}
	return nil
}

func (n *Node) check() *ValidationError {
	if msg := checkClusterName(n.Cluster); msg != "" {
		return bad("cluster", n.Cluster, msg)
	}
	if !isDNS1123Subdomain(n.Name) {
		return bad("name", n.Name, allowedSubdomain)
	}
	if len(n.IPs) == 0 {
		return bad("ips", "[]", "want at least one node IP")
	}
	if e := checkAddrs("ips", n.IPs); e != nil {
		return e
	}
	if e := checkPrefixes("podCIDRs", n.PodCIDRs); e != nil {
		return e
	}
	if n.WireGuardPublicKey != "" {
		if msg := checkWireGuardKey(n.WireGuardPublicKey); msg != "" {
			return bad("wireGuardPublicKey", n.WireGuardPublicKey, msg)
		}
	}
	if n.IPsecKeyIndex > MaxIPsecKeyIndex {
		return bad("ipsecKeyIndex", strconv.Itoa(int(n.IPsecKeyIndex)), "want 0 (no IPsec) or a key index 1-15")
	}
	if n.HealthAddr != "" {
		if msg := checkHostPort(n.HealthAddr); msg != "" {
			return bad("healthAddr", n.HealthAddr, msg)
		}
	}
	return checkTopology(n.Region, n.Zone)
}

// Validate checks every field of e; see the field comments for the rules.
// It cannot check that the identity's cluster bits and the IP belong to
// e.Cluster: that needs the cluster's config, see [ClusterConfig.Contains].
func (e *Endpoint) Validate() error {
	if ve := e.check(); ve != nil {
		return ve.in("endpoint", e.Cluster+"/"+e.IP.String())
	}
	return nil
}

func (e *Endpoint) check() *ValidationError {
	if msg := checkClusterName(e.Cluster); msg != "" {
		return bad("cluster", e.Cluster, msg)
	}
	if msg := checkUnicast(e.IP); msg != "" {
		return bad("ip", e.IP.String(), msg)
	}
	if msg := checkIdentity(e.Identity); msg != "" {
		return bad("identity", e.Identity.String(), msg)
	}
	if msg := checkUnicast(e.NodeIP); msg != "" {
		return bad("nodeIP", e.NodeIP.String(), msg)
	}
	if e.Namespace != "" && !isDNS1123Label(e.Namespace, 63) {
		return bad("namespace", e.Namespace, allowedLabel63)
	}
	if e.Pod != "" {
		if e.Namespace == "" {
			return bad("namespace", "", "want the pod's namespace when pod is set")
		}
		if !isDNS1123Subdomain(e.Pod) {
			return bad("pod", e.Pod, allowedSubdomain)
		}
	}
	return nil
}

// Validate checks every field of id; see the field comments for the rules.
func (id *Identity) Validate() error {
	if e := id.check(); e != nil {
		return e.in("identity", id.Cluster+"/"+id.ID.String())
	}
	return nil
}

func (id *Identity) check() *ValidationError {
	if msg := checkClusterName(id.Cluster); msg != "" {
		return bad("cluster", id.Cluster, msg)
	}
	if msg := checkIdentity(id.ID); msg != "" {
		return bad("id", id.ID.String(), msg)
	}
	if len(id.Labels) == 0 {
		return bad("labels", "{}", "want at least one label; an identity is defined by its labels (at least its namespace)")
	}
	if len(id.Labels) > MaxIdentityLabels {
		return bad("labels", strconv.Itoa(len(id.Labels))+" labels", "want at most "+strconv.Itoa(MaxIdentityLabels))
	}
	// Report the smallest bad key, so the same value always gives the
	// same error whatever the map's iteration order.
	var first *ValidationError
	var firstKey string
	for k, v := range id.Labels {
		if first != nil && k >= firstKey {
			continue
		}
		if !isLabelKey(k) {
			first, firstKey = bad("labels", k, allowedLabelKey), k
		} else if !isLabelValue(v) {
			first, firstKey = bad("labels["+quote(k)+"]", v, allowedLabelValue), k
		}
	}
	return first
}

// Validate checks every field of s; see the field comments for the rules.
func (s *Service) Validate() error {
	if e := s.check(); e != nil {
		return e.in("service", s.Cluster+"/"+s.Namespace+"/"+s.Name)
	}
	return nil
}

func (s *Service) check() *ValidationError {
	if msg := checkClusterName(s.Cluster); msg != "" {
		return bad("cluster", s.Cluster, msg)
	}
	if !isDNS1123Label(s.Namespace, 63) {
		return bad("namespace", s.Namespace, allowedLabel63)
	}
	if !isDNS1123Label(s.Name, 63) {
		return bad("name", s.Name, allowedLabel63)
	}
	for i, p := range s.Ports {
		field := func(f string) string { return "ports[" + strconv.Itoa(i) + "]." + f }
		if p.Name != "" && !isDNS1123Label(p.Name, 63) {
			return bad(field("name"), p.Name, allowedLabel63+", or empty for a single unnamed port")
		}
		switch p.Protocol {
		case ProtocolTCP, ProtocolUDP, ProtocolSCTP:
		default:
			return bad(field("protocol"), string(p.Protocol), `want "TCP", "UDP" or "SCTP"`)
		}
		if p.Port == 0 {
			return bad(field("port"), "0", allowedPort)
		}
		for j, q := range s.Ports[:i] {
			if q.Protocol == p.Protocol && q.Port == p.Port {
				return bad(field("port"), u64(uint64(p.Port)), "duplicate of ports["+strconv.Itoa(j)+"] ("+string(p.Protocol)+"); want each protocol and port once")
			}
			if q.Name == p.Name {
				return bad(field("name"), p.Name, "duplicate of ports["+strconv.Itoa(j)+"]; want unique port names (a service with several ports names each one)")
			}
		}
	}
	if e := checkAddrs("frontendIPs", s.FrontendIPs); e != nil {
		return e
	}
	if e := checkBackends(s.Backends, s.hasPortName); e != nil {
		return e
	}
	if len(s.BackendShards) > 0 && len(s.Backends) > 0 {
		return bad("backends", strconv.Itoa(len(s.Backends))+" backends", "want none when backendShards is set; a service's backends are either in its value or in its shards")
	}
	if len(s.BackendShards) > MaxBackendShards {
		return bad("backendShards", strconv.Itoa(len(s.BackendShards))+" shards", "want at most "+strconv.Itoa(MaxBackendShards))
	}
	if s.Shared && !s.Global {
		return bad("shared", "true", "want false unless global is true; only a global service can share its backends")
	}
	switch s.Affinity {
	case "", AffinityNone:
	case AffinityLocal, AffinityRemote:
		if !s.Global {
			return bad("affinity", string(s.Affinity), `want "" or "none" unless global is true`)
		}
	default:
		return bad("affinity", string(s.Affinity), `want "", "none", "local" or "remote"`)
	}
	if len(s.FailoverRegions) > 0 && !s.Global {
		return bad("failoverRegions", strings.Join(s.FailoverRegions, ","), "want none unless global is true")
	}
	if e := checkFailoverRegions(s.FailoverRegions); e != nil {
		return e
	}
	return checkHealthCheck(s.HealthCheck)
}

// ValidateHealthCheck checks a health check as [Service.HealthCheck]
// holds it. Errors match [ErrInvalid].
func ValidateHealthCheck(c HealthCheck) error {
	if e := checkHealthCheck(c); e != nil {
		return e.in("health check", c.String())
	}
	return nil
}

func checkHealthCheck(c HealthCheck) *ValidationError {
	switch c.Type {
	case "", HealthCheckTCP:
		if c.Path != "" {
			return bad("healthCheck.path", c.Path, "want no path for a tcp check; an http check (type http) has one")
		}
		return nil
	case HealthCheckHTTP:
	default:
		return bad("healthCheck.type", string(c.Type), `want "tcp" or "http"`)
	}
	switch {
	case c.Path == "" || c.Path[0] != '/':
		return bad("healthCheck.path", c.Path, `want a path starting with "/", such as /healthz`)
	case len(c.Path) > MaxHealthCheckPath:
		return bad("healthCheck.path", strconv.Itoa(len(c.Path))+" bytes", "want at most "+strconv.Itoa(MaxHealthCheckPath))
	}
	for i := range len(c.Path) {
		if b := c.Path[i]; b <= ' ' || b >= 0x7f {
			return bad("healthCheck.path", c.Path, "byte "+strconv.Itoa(i)+" is a space, a control character or not ASCII; want printable ASCII (percent-encode the rest)")
		}
	}
	return nil
}

// ValidateFailoverRegions checks a list of failover regions as
// [Service.FailoverRegions] holds them: region names, not empty, each
// once, at most [MaxFailoverRegions]. Errors match [ErrInvalid].
func ValidateFailoverRegions(regions []string) error {
	if e := checkFailoverRegions(regions); e != nil {
		return e.in("failover regions", strings.Join(regions, ","))
	}
	return nil
}

func checkFailoverRegions(regions []string) *ValidationError {
	if len(regions) > MaxFailoverRegions {
		return bad("failoverRegions", strconv.Itoa(len(regions))+" regions", "want at most "+strconv.Itoa(MaxFailoverRegions))
	}
	for i, r := range regions {
		field := "failoverRegions[" + strconv.Itoa(i) + "]"
		if !isLabelName(r) {
			return bad(field, r, "want a region name: 1-63 characters A-Z, a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit")
		}
		if j := slices.Index(regions[:i], r); j >= 0 {
			return bad(field, r, "duplicate of failoverRegions["+strconv.Itoa(j)+"]; want each region once")
		}
	}
	return nil
}

// checkBackends checks a list of backends: each IP once, each backend
// valid. hasPort, when not nil, says whether a port name is one of the
// service's.
func checkBackends(backends []Backend, hasPort func(string) bool) *ValidationError {
	if i, j, ok := firstDuplicate(len(backends), func(i int) netip.Addr { return backends[i].IP }); ok {
		return bad("backends["+strconv.Itoa(j)+"].ip", backends[j].IP.String(), "duplicate of backends["+strconv.Itoa(i)+"]; want each backend IP once")
	}
	for i := range backends {
		if e := checkBackend(i, &backends[i], hasPort); e != nil {
			return e
		}
	}
	return nil
}

func checkBackend(i int, b *Backend, hasPort func(string) bool) *ValidationError {
	field := func(f string) string { return "backends[" + strconv.Itoa(i) + "]." + f }
	if msg := checkUnicast(b.IP); msg != "" {
		return bad(field("ip"), b.IP.String(), msg)
	}
	for j, p := range b.Ports {
		pfield := func(f string) string { return field("ports[" + strconv.Itoa(j) + "]." + f) }
		if hasPort != nil && !hasPort(p.Name) {
			return bad(pfield("name"), p.Name, "want the name of one of the service's ports")
		}
		if hasPort == nil && p.Name != "" && !isDNS1123Label(p.Name, 63) {
			return bad(pfield("name"), p.Name, allowedLabel63+", or empty for a service's single unnamed port")
		}
		if p.Port == 0 {
			return bad(pfield("port"), "0", allowedPort)
		}
		for k, q := range b.Ports[:j] {
			if q.Name == p.Name {
				return bad(pfield("name"), p.Name, "duplicate of "+field("ports["+strconv.Itoa(k)+"]")+"; want each service port once per backend")
			}
		}
	}
	switch b.State {
	case BackendActive, BackendTerminating, BackendUnready:
	default:
		return bad(field("state"), string(b.State), `want "active", "terminating" or "unready"`)
	}
	if b.Node != "" && !isDNS1123Subdomain(b.Node) {
		return bad(field("node"), b.Node, allowedSubdomain)
	}
	if !isLabelValue(b.Zone) {
		return bad(field("zone"), b.Zone, allowedLabelValue)
	}
	return nil
}

// Validate checks every field of sh; see the field comments for the rules.
func (sh *BackendShard) Validate() error {
	if e := sh.check(); e != nil {
		return e.in("backend shard", sh.Cluster+"/"+sh.Namespace+"/"+sh.Service+"/"+strconv.Itoa(sh.Shard))
	}
	return nil
}

func (sh *BackendShard) check() *ValidationError {
	if msg := checkClusterName(sh.Cluster); msg != "" {
		return bad("cluster", sh.Cluster, msg)
	}
	if !isDNS1123Label(sh.Namespace, 63) {
		return bad("namespace", sh.Namespace, allowedLabel63)
	}
	if !isDNS1123Label(sh.Service, 63) {
		return bad("service", sh.Service, allowedLabel63)
	}
	if sh.Shard < 0 || sh.Shard >= MaxBackendShards {
		return bad("shard", strconv.Itoa(sh.Shard), "want 0 to "+strconv.Itoa(MaxBackendShards-1))
	}
	return checkBackends(sh.Backends, nil)
}

func (s *Service) hasPortName(name string) bool {
	for _, p := range s.Ports {
		if p.Name == name {
			return true
		}
	}
	return false
}

// bad starts a ValidationError; the caller's Validate fills in the object.
func bad(field, value, allowed string) *ValidationError {
	return &ValidationError{Field: field, Value: cut(value), Allowed: allowed}
}

func (e *ValidationError) in(object, name string) error {
	e.Object, e.Name = object, cut(name)
	return e
}

// cut bounds a hostile string before it is kept in an error.
func cut(s string) string {
	if len(s) > maxQuoted {
		return s[:maxQuoted] + "..."
	}
	return s
}

func u64(n uint64) string { return strconv.FormatUint(n, 10) }

func checkTopology(region, zone string) *ValidationError {
	if !isLabelValue(region) {
		return bad("region", region, allowedLabelValue)
	}
	if !isLabelValue(zone) {
		return bad("zone", zone, allowedLabelValue)
	}
	return nil
}

func checkAddrs(field string, addrs []netip.Addr) *ValidationError {
	for i, a := range addrs {
		if msg := checkUnicast(a); msg != "" {
			return bad(field+"["+strconv.Itoa(i)+"]", a.String(), msg)
		}
	}
	if i, j, ok := firstDuplicate(len(addrs), func(i int) netip.Addr { return addrs[i] }); ok {
		return bad(field+"["+strconv.Itoa(j)+"]", addrs[j].String(), "duplicate of "+field+"["+strconv.Itoa(i)+"]")
	}
	return nil
}

// checkPrefixes checks each prefix and that no two overlap: overlapping pod
// CIDRs within one cluster or node are a configuration error, and would
// make Contains answers depend on list order for anything built on them.
func checkPrefixes(field string, ps []netip.Prefix) *ValidationError {
	for i, p := range ps {
		if msg := checkPrefix(p); msg != "" {
			return bad(field+"["+strconv.Itoa(i)+"]", p.String(), msg)
		}
		for j, q := range ps[:i] {
			if p.Overlaps(q) {
				return bad(field+"["+strconv.Itoa(i)+"]", p.String(), "overlaps "+field+"["+strconv.Itoa(j)+"] "+q.String()+"; want disjoint CIDRs")
			}
		}
	}
	return nil
}

// firstDuplicate returns indexes i < j of the first element j that repeats
// an earlier one. Short lists are compared pairwise; long ones (service
// backends) go through a map so validation stays linear.
func firstDuplicate[T comparable](n int, at func(int) T) (int, int, bool) {
	if n <= 16 {
		for j := 1; j < n; j++ {
			for i := 0; i < j; i++ {
				if at(i) == at(j) {
					return i, j, true
				}
			}
		}
		return 0, 0, false
	}
	seen := make(map[T]int, n)
	for j := 0; j < n; j++ {
		v := at(j)
		if i, ok := seen[v]; ok {
			return i, j, true
		}
		seen[v] = j
	}
	return 0, 0, false
}

func checkClusterName(s string) string {
	if !isDNS1123Label(s, 32) {
		return allowedClusterName
	}
	return ""
}

func checkClusterID(id ClusterID) string {
	if id < 1 || id > MaxClusterID {
		return "want a cluster ID from 1 to 511"
	}
	return ""
}

// checkIdentity requires the cluster bits (so a reader can tell which
// cluster allocated the identity) and a nonzero local part (0 is "unknown"
// in every datapath that uses numeric identities).
func checkIdentity(id NumericIdentity) string {
	if c := id.ClusterID(); c == 0 || c > MaxClusterID {
		return "cluster bits (id >> 16) are " + u64(uint64(c)) + "; want the owning cluster's ID, 1-511"
	}
	if id.Local() == 0 {
		return "local part (id & 0xffff) is 0; want 1-65535"
	}
	return ""
}

// checkUnicast accepts one spelling per address: no zone (these addresses
// cross machines) and IPv4 as IPv4, never IPv4-mapped IPv6, so that keys,
// map lookups and CIDR checks all see the same value.
func checkUnicast(a netip.Addr) string {
	switch {
	case !a.IsValid():
		return "want an IP address"
	case a.Zone() != "":
		return "want an IP address without a zone"
	case a.Is4In6():
		return "IPv4-mapped IPv6 address; write it as IPv4 (" + a.Unmap().String() + ")"
	case a.IsUnspecified():
		return "want a unicast address, not the unspecified address"
	case a.IsMulticast():
		return "want a unicast address, not multicast"
	case a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "want a unicast address, not broadcast"
	}
	return ""
}

func checkPrefix(p netip.Prefix) string {
	switch {
	case !p.IsValid():
		return "want a CIDR such as 10.1.0.0/16"
	case p.Addr().Is4In6():
		return "IPv4-mapped IPv6 prefix; write it as IPv4"
	case p.Masked() != p:
		return "host bits set; want " + p.Masked().String()
	case p.Bits() == 0:
		return "want a prefix length of at least 1; /0 would claim every address"
	}
	return ""
}

// wireGuardKeyLen is the length of 32 bytes in padded standard base64.
const wireGuardKeyLen = 44

func checkWireGuardKey(s string) string {
	const msg = "want a WireGuard public key: standard base64 of 32 bytes (44 characters)"
	if len(s) != wireGuardKeyLen {
		return msg
	}
	// Strict rejects non-zero padding bits, so each key has one spelling.
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil || len(b) != 32 {
		return msg
	}
	return ""
}

func checkHostPort(s string) string {
	const msg = "want host:port with host an IP address ([v6]:port) or DNS name and port 1-65535"
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return msg
	}
	if a, err := netip.ParseAddr(host); err == nil {
		if m := checkUnicast(a); m != "" {
			return msg + "; host: " + m
		}
		if a.Is4() && strings.HasPrefix(s, "[") {
			return msg + "; brackets are for IPv6 only"
		}
	} else if strings.HasPrefix(s, "[") || !isDNS1123Subdomain(host) {
		return msg
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 || strconv.FormatUint(n, 10) != port {
		return msg
	}
	return ""
}

func isLower(c byte) bool    { return 'a' <= c && c <= 'z' }
func isDigit(c byte) bool    { return '0' <= c && c <= '9' }
func isAlnum(c byte) bool    { return isLower(c) || isDigit(c) || ('A' <= c && c <= 'Z') }
func isLowerAN(c byte) bool  { return isLower(c) || isDigit(c) }
func isLabelMid(c byte) bool { return isAlnum(c) || c == '-' || c == '_' || c == '.' }

// isDNS1123Label: RFC 1123 label, lowercase, 1..max characters.
func isDNS1123Label(s string, max int) bool {
	if len(s) == 0 || len(s) > max {
		return false
	}
	if !isLowerAN(s[0]) || !isLowerAN(s[len(s)-1]) {
		return false
	}
	for i := 1; i < len(s)-1; i++ {
		if c := s[i]; !isLowerAN(c) && c != '-' {
			return false
		}
	}
	return true
}

// isDNS1123Subdomain: Kubernetes' DNS subdomain, dot-separated labels, at
// most 253 characters in total.
func isDNS1123Subdomain(s string) bool {
	if len(s) == 0 || len(s) > 253 {
		return false
	}
	for part := range strings.SplitSeq(s, ".") {
		if !isDNS1123Label(part, 253) {
			return false
		}
	}
	return true
}

// isLabelValue: Kubernetes label value; empty is allowed, as in Kubernetes.
func isLabelValue(s string) bool {
	return s == "" || isLabelName(s)
}

// isLabelName: the name part of a Kubernetes label key, 1-63 characters.
func isLabelName(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	if !isAlnum(s[0]) || !isAlnum(s[len(s)-1]) {
		return false
	}
	for i := 1; i < len(s)-1; i++ {
		if !isLabelMid(s[i]) {
			return false
		}
	}
	return true
}

// isLabelKey accepts identity label keys such as "k8s:app",
// "k8s:io.kubernetes.pod.namespace" and "reserved:host": an optional
// source and ':' then a Kubernetes label key ([prefix/]name).
func isLabelKey(s string) bool {
	if source, rest, ok := strings.Cut(s, ":"); ok {
		if !isDNS1123Label(source, 63) {
			return false
		}
		s = rest
	}
	if prefix, name, ok := strings.Cut(s, "/"); ok {
		return isDNS1123Subdomain(prefix) && isLabelName(name)
	}
	return isLabelName(s)
}

// CheckReachable says why a is not an address machines of other clusters
// can reach a node or a service at, or returns nil; the error matches
// ErrInvalid. It is stricter than what a value must be to decode: a node IP
// (the tunnels' underlay) or a service frontend that is loopback,
// link-local, multicast, unspecified or broadcast would point a reader's
// traffic at itself or at its own segment, so agents refuse such entries
// from remote clusters and writers refuse to publish them.
func CheckReachable(a netip.Addr) error {
	msg := checkUnicast(a)
	switch {
	case msg != "":
	case a.IsLoopback():
		msg = "loopback; want an address other machines reach"
	case a.IsLinkLocalUnicast():
		msg = "link-local; want an address other machines reach"
	default:
		return nil
	}
	return fmt.Errorf("address %s: %s: %w", a, msg, ErrInvalid)
}
