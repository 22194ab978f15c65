package clustermesh

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// The agent-side checks of what a remote cluster publishes, as pure
// functions: each decoder of validator gets entries that are fine, outside
// the cluster's pod CIDRs, with another cluster's identity bits, or whose
// key and body disagree, or that claim more than the cluster owns.

// euConfig is the cluster-config the validator checks eu's entries
// against: cluster ID 1, pod CIDRs 10.1.0.0/16 and fd01::/48.
var euConfig = v1.ClusterConfig{
	Name: "eu", ID: 1,
	PodCIDRs:     []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("fd01::/48")},
	Capabilities: v1.Capabilities{MaxConnectedClusters: 255},
}

// entry is one key and the value stored under it.
type entry struct {
	key  string
	data []byte
}

// encode returns v as the API server would store it.
func encode(t *testing.T, v any) []byte {
	t.Helper()
	data, err := v1.Encode(v)
	if err != nil {
		t.Fatalf("encode %+v: %v", v, err)
	}
	return data
}

// checkVerdict fails t unless err is what want says: "" for an accepted
// entry, else the reason() label the entry is counted under. When mention
// is set, a rejection must name it.
func checkVerdict(t *testing.T, err error, want, mention string) {
	t.Helper()
	if got := reason(err); got != want {
		t.Fatalf("reason %q (%v), want %q", got, err, want)
	}
	if err != nil && mention != "" && !strings.Contains(err.Error(), mention) {
		t.Errorf("error %q does not mention %q", err, mention)
	}
}

func euNode(name string, cidrs ...string) v1.Node {
	n := v1.Node{Cluster: "eu", Name: name, IPs: []netip.Addr{netip.MustParseAddr("192.168.100.101")}}
	for _, c := range cidrs {
		n.PodCIDRs = append(n.PodCIDRs, netip.MustParsePrefix(c))
	}
	return n
}

func TestValidatorNode(t *testing.T) {
	val := validator{cfg: euConfig}
	for _, tc := range []struct {
		name    string
		e       entry
		reason  string
		mention string
	}{
		{"fine", entry{v1.NodeKey("eu", "n1"), encode(t, euNode("n1", "10.1.1.0/24", "fd01:0:0:1::/64"))}, "", ""},
		{"fine without pod CIDRs", entry{v1.NodeKey("eu", "n1"), encode(t, euNode("n1"))}, "", ""},
		{"whole cluster range", entry{v1.NodeKey("eu", "n1"), encode(t, euNode("n1", "10.1.0.0/16"))}, "", ""},
		{"outside", entry{v1.NodeKey("eu", "n1"), encode(t, euNode("n1", "10.2.1.0/24"))}, ReasonOutsidePodCIDRs, "node n1 pod CIDR 10.2.1.0"},
		{"second CIDR outside", entry{v1.NodeKey("eu", "n1"), encode(t, euNode("n1", "10.1.1.0/24", "10.2.1.0/24"))}, ReasonOutsidePodCIDRs, "10.2.1.0"},
		{"name differs from key", entry{v1.NodeKey("eu", "n2"), encode(t, euNode("n1", "10.1.1.0/24"))}, "key-mismatch", ""},
		{"another cluster's node under eu's key", entry{v1.NodeKey("eu", "n1"), encode(t, v1.Node{Cluster: "us", Name: "n1", IPs: []netip.Addr{netip.MustParseAddr("192.168.100.111")}})}, "key-mismatch", ""},
		{"not a node key", entry{v1.EndpointKey("eu", netip.MustParseAddr("10.1.1.10")), encode(t, euNode("n1"))}, "bad-key", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := val.node(tc.e.key, tc.e.data)
			checkVerdict(t, err, tc.reason, tc.mention)
			if err == nil && n.Name != "n1" {
				t.Errorf("decoded %+v", n)
			}
		})
	}
}

// A node's pod CIDR must lie wholly inside the cluster's: a node of a
// cluster whose pod CIDR is 10.0.0.0/16 claiming 10.0.0.0/8 (which starts
// inside it and covers every other cluster's 10.x range) was accepted when
// only the first address was checked, and a third cluster's tunnel then
// routed other clusters' pods to it.
func TestValidatorNodeCIDRWhollyInside(t *testing.T) {
	cfg := euConfig
	cfg.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/16"), netip.MustParsePrefix("fd01::/48")}
	val := validator{cfg: cfg}
	for _, wide := range []string{"10.0.0.0/15", "10.0.0.0/8", "fd01::/16", "8.0.0.0/5"} {
		_, err := val.node(v1.NodeKey("eu", "n1"), encode(t, euNode("n1", wide)))
		checkVerdict(t, err, ReasonOutsidePodCIDRs, wide)
	}
	for _, inside := range []string{"10.0.0.0/16", "10.0.255.0/24", "fd01:0:0:7::/64"} {
		if _, err := val.node(v1.NodeKey("eu", "n1"), encode(t, euNode("n1", inside))); err != nil {
			t.Errorf("node pod CIDR %s: %v", inside, err)
		}
	}
}

// Node IPs are the tunnels' underlay: one that is not an address other
// machines reach would point a reader's tunnel at itself or its segment.
func TestValidatorNodeUnderlay(t *testing.T) {
	val := validator{cfg: euConfig}
	// (Multicast and unspecified addresses do not even decode: api/v1's
	// own tests cover them.)
	for _, ip := range []string{"127.0.0.1", "169.254.169.254", "::1", "fe80::1"} {
		n := euNode("n1", "10.1.1.0/24")
		n.IPs = []netip.Addr{netip.MustParseAddr("192.168.100.101"), netip.MustParseAddr(ip)}
		_, err := val.node(v1.NodeKey("eu", "n1"), encode(t, n))
		checkVerdict(t, err, ReasonBadUnderlay, ip)
	}
	ep := euEndpoint("10.1.1.10", v1.MakeIdentity(1, 100))
	ep.NodeIP = netip.MustParseAddr("127.0.0.1")
	_, err := val.endpoint(v1.EndpointKey("eu", ep.IP), encode(t, ep))
	checkVerdict(t, err, ReasonBadUnderlay, "127.0.0.1")
}

func euEndpoint(ip string, id v1.NumericIdentity) v1.Endpoint {
	return v1.Endpoint{
		Cluster: "eu", IP: netip.MustParseAddr(ip), Identity: id, NodeIP: netip.MustParseAddr("192.168.100.101"),
		Namespace: "default", Pod: "web", Ready: true,
	}
}

func TestValidatorEndpoint(t *testing.T) {
	val := validator{cfg: euConfig}
	own, foreign := v1.MakeIdentity(1, 100), v1.MakeIdentity(2, 100)
	key := func(ip string) string { return v1.EndpointKey("eu", netip.MustParseAddr(ip)) }
	for _, tc := range []struct {
		name    string
		e       entry
		reason  string
		mention string
	}{
		{"fine", entry{key("10.1.1.10"), encode(t, euEndpoint("10.1.1.10", own))}, "", ""},
		{"fine IPv6", entry{key("fd01::a"), encode(t, euEndpoint("fd01::a", own))}, "", ""},
		{"outside", entry{key("10.2.1.10"), encode(t, euEndpoint("10.2.1.10", own))}, ReasonOutsidePodCIDRs, "endpoint 10.2.1.10"},
		{"foreign identity", entry{key("10.1.1.10"), encode(t, euEndpoint("10.1.1.10", foreign))}, ReasonForeignIdentity, "cluster id 2"},
		// Both wrong: the address is checked first, so the entry counts
		// as outside-pod-cidrs only.
		{"outside and foreign", entry{key("10.2.1.10"), encode(t, euEndpoint("10.2.1.10", foreign))}, ReasonOutsidePodCIDRs, ""},
		{"IP differs from key", entry{key("10.1.1.11"), encode(t, euEndpoint("10.1.1.10", own))}, "key-mismatch", ""},
		{"another cluster's endpoint under eu's key", entry{key("10.1.1.10"), encode(t, func() v1.Endpoint {
			ep := euEndpoint("10.1.1.10", own)
			ep.Cluster = "us"
			return ep
		}())}, "key-mismatch", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := val.endpoint(tc.e.key, tc.e.data)
			checkVerdict(t, err, tc.reason, tc.mention)
		})
	}
}

func TestValidatorIdentity(t *testing.T) {
	val := validator{cfg: euConfig}
	ident := func(cluster string, id v1.NumericIdentity) v1.Identity {
		return v1.Identity{Cluster: cluster, ID: id, Labels: map[string]string{"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "default"}}
	}
	own, foreign := v1.MakeIdentity(1, 300), v1.MakeIdentity(2, 300)
	for _, tc := range []struct {
		name    string
		e       entry
		reason  string
		mention string
	}{
		{"fine", entry{v1.IdentityKey("eu", own), encode(t, ident("eu", own))}, "", ""},
		{"foreign identity bits", entry{v1.IdentityKey("eu", foreign), encode(t, ident("eu", foreign))}, ReasonForeignIdentity, fmt.Sprint(foreign)},
		{"ID differs from key", entry{v1.IdentityKey("eu", own+1), encode(t, ident("eu", own))}, "key-mismatch", ""},
		{"another cluster's identity under eu's key", entry{v1.IdentityKey("eu", own), encode(t, ident("us", own))}, "key-mismatch", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := val.identity(tc.e.key, tc.e.data)
			checkVerdict(t, err, tc.reason, tc.mention)
		})
	}
}

func euService(namespace, name string, backends ...string) v1.Service {
	s := v1.Service{
		Cluster: "eu", Namespace: namespace, Name: name, Global: true, Shared: true,
		Ports:       []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}},
		FrontendIPs: []netip.Addr{netip.MustParseAddr("10.96.1.10")},
	}
	for _, b := range backends {
		s.Backends = append(s.Backends, v1.Backend{IP: netip.MustParseAddr(b), State: v1.BackendActive})
	}
	return s
}

func TestValidatorService(t *testing.T) {
	val := validator{cfg: euConfig}
	key := v1.ServiceKey("eu", "default", "echo")
	for _, tc := range []struct {
		name    string
		e       entry
		reason  string
		mention string
	}{
		{"fine", entry{key, encode(t, euService("default", "echo", "10.1.1.10", "fd01::a"))}, "", ""},
		{"fine without backends", entry{key, encode(t, euService("default", "echo"))}, "", ""},
		{"one backend outside", entry{key, encode(t, euService("default", "echo", "10.1.1.10", "10.2.1.10"))}, ReasonOutsidePodCIDRs, "service default/echo backend 10.2.1.10"},
		{"namespace differs from key", entry{key, encode(t, euService("other", "echo", "10.1.1.10"))}, "key-mismatch", ""},
		{"name differs from key", entry{key, encode(t, euService("default", "web", "10.1.1.10"))}, "key-mismatch", ""},
		{"loopback frontend", entry{key, encode(t, withFrontend(euService("default", "echo", "10.1.1.10"), "127.0.0.1"))}, ReasonBadFrontend, "127.0.0.1"},
		{"link-local frontend", entry{key, encode(t, withFrontend(euService("default", "echo"), "169.254.169.254"))}, ReasonBadFrontend, "169.254.169.254"},
		{"frontend is a pod IP", entry{key, encode(t, withFrontend(euService("default", "echo"), "10.1.1.10"))}, ReasonBadFrontend, "10.1.1.10"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := val.service(tc.e.key, tc.e.data)
			checkVerdict(t, err, tc.reason, tc.mention)
		})
	}
}

// Backend shards are checked as service backends are: every backend
// inside the cluster's pinned pod CIDRs, key and body agreeing. A
// service value that lists shards is refused from a cluster that did not
// advertise them.
func TestValidatorBackendShard(t *testing.T) {
	sharding := euConfig
	sharding.Capabilities.BackendShards = true
	val := validator{cfg: sharding}
	shard := func(i int, ips ...string) v1.BackendShard {
		sh := v1.BackendShard{Cluster: "eu", Namespace: "default", Service: "echo", Shard: i, Gen: 3}
		for _, ip := range ips {
			sh.Backends = append(sh.Backends, v1.Backend{IP: netip.MustParseAddr(ip), State: v1.BackendActive})
		}
		return sh
	}
	key := v1.BackendShardKey("eu", "default", "echo", 2)
	for _, tc := range []struct {
		name    string
		e       entry
		reason  string
		mention string
	}{
		{"fine", entry{key, encode(t, shard(2, "10.1.1.10", "fd01::a"))}, "", ""},
		{"fine empty", entry{key, encode(t, shard(2))}, "", ""},
		{"one backend outside", entry{key, encode(t, shard(2, "10.1.1.10", "10.2.1.10"))}, ReasonOutsidePodCIDRs, "service default/echo shard 2 backend 10.2.1.10"},
		{"index differs from key", entry{key, encode(t, shard(3, "10.1.1.10"))}, "key-mismatch", ""},
		{"other cluster's key", entry{v1.BackendShardKey("us", "default", "echo", 2), encode(t, shard(2, "10.1.1.10"))}, "key-mismatch", ""},
		{"duplicate backend", entry{key, []byte(`{"v":1,"cluster":"eu","namespace":"default","service":"echo","shard":2,"backends":[{"ip":"10.1.0.1","state":"active"},{"ip":"10.1.0.1","state":"active"}]}`)}, "invalid", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := val.backendShard(tc.e.key, tc.e.data)
			checkVerdict(t, err, tc.reason, tc.mention)
		})
	}

	sharded := euService("default", "echo")
	sharded.BackendShards = []uint64{3, 3}
	skey := v1.ServiceKey("eu", "default", "echo")
	_, err := val.service(skey, encode(t, sharded))
	checkVerdict(t, err, "", "")
	_, err = validator{cfg: euConfig}.service(skey, encode(t, sharded))
	checkVerdict(t, err, "invalid", "does not advertise backendShards")
}

func withFrontend(svc v1.Service, ip string) v1.Service {
	svc.FrontendIPs = []netip.Addr{netip.MustParseAddr(ip)}
	return svc
}

// TestReason checks the labels rejected entries are counted under: the
// hijack reasons of this package, also when wrapped, and api/v1's for
// everything else.
func TestReason(t *testing.T) {
	val := validator{cfg: euConfig}
	decodeErr := func(data string) error {
		_, err := val.node(v1.NodeKey("eu", "n1"), []byte(data))
		return err
	}
	outside := &errHijack{ReasonOutsidePodCIDRs, "endpoint 10.2.1.10 is outside"}
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"nil", nil, ""},
		{"outside pod CIDRs", outside, ReasonOutsidePodCIDRs},
		{"foreign identity", &errHijack{ReasonForeignIdentity, "identity of cluster 2"}, ReasonForeignIdentity},
		{"wrapped hijack", fmt.Errorf("cluster eu: %w", outside), ReasonOutsidePodCIDRs},
		{"joined hijack", errors.Join(errors.New("other"), outside), ReasonOutsidePodCIDRs},
		{"malformed JSON", decodeErr(`{"v":1,`), "decode"},
		{"too large", decodeErr(`{"v":1,"name":"` + strings.Repeat("n", v1.MaxValueSize) + `"}`), "too-large"},
		{"unsupported version", decodeErr(`{"v":99,"cluster":"eu","name":"n1","ips":["192.168.100.101"]}`), "version"},
		{"invalid value", decodeErr(`{"v":1,"cluster":"eu","name":"n1","ips":[]}`), "invalid"},
		{"key mismatch", decodeErr(`{"v":1,"cluster":"eu","name":"n2","ips":["192.168.100.101"]}`), "key-mismatch"},
		{"bad key", func() error {
			_, err := val.node("not/a/trellis/key", encode(t, euNode("n1")))
			return err
		}(), "bad-key"},
	} {
		if got := reason(tc.err); got != tc.want {
			t.Errorf("%s: reason(%v) = %q, want %q", tc.name, tc.err, got, tc.want)
		}
	}
}
