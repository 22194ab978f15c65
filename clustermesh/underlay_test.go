package clustermesh

import (
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

func ulNode(cluster, name, ip string) v1.Node {
	return v1.Node{Cluster: cluster, Name: name, IPs: []netip.Addr{netip.MustParseAddr(ip)}}
}

// accepted lists the nodes the state's next snapshot holds, as
// "cluster/name".
func accepted(t *testing.T, s *state) []string {
	t.Helper()
	s.publish()
	var out []string
	for cluster, nodes := range s.snap.Load().Nodes {
		for name := range nodes {
			out = append(out, cluster+"/"+name)
		}
	}
	slices.Sort(out)
	return out
}

func wantAccepted(t *testing.T, s *state, want ...string) {
	t.Helper()
	if got := accepted(t, s); !slices.Equal(got, want) {
		t.Fatalf("accepted nodes %v, want %v", got, want)
	}
}

func wantExcluded(t *testing.T, s *state, want map[string]map[string]int) {
	t.Helper()
	got := s.excludedNodes()
	if len(got) != len(want) {
		t.Fatalf("excluded %v, want %v", got, want)
	}
	for c, reasons := range want {
		if !maps.Equal(got[c], reasons) {
			t.Fatalf("excluded %v, want %v", got, want)
		}
	}
}

func newTestState(localIPs ...string) *state {
	var ips []netip.Addr
	for _, ip := range localIPs {
		ips = append(ips, netip.MustParseAddr(ip))
	}
	return newState("eu", ips, slog.New(slog.DiscardHandler))
}

// A remote node may not claim this agent's own node IP; the agent's own
// cluster's entry for it is fine. Before, the tunnel dropped such a claim
// without a word.
func TestUnderlayLocalNodeIP(t *testing.T) {
	s := newTestState("192.168.100.101")
	s.upsertNode("eu", ulNode("eu", "n1", "192.168.100.101"))
	s.upsertNode("ap", ulNode("ap", "evil", "192.168.100.101"))
	wantAccepted(t, s, "eu/n1")
	wantExcluded(t, s, map[string]map[string]int{"ap": {ReasonLocalNodeIP: 1}})
	// Even with the local cluster's entry gone, the IP stays this node's.
	s.deleteNode("eu", "n1")
	wantAccepted(t, s)
	wantExcluded(t, s, map[string]map[string]int{"ap": {ReasonLocalNodeIP: 1}})
}

// Between two clusters, the node that held an IP first keeps it, whatever
// the names (before, the name sorting first won); when it goes, the
// excluded claim comes in.
func TestUnderlayFirstHolderKeeps(t *testing.T) {
	s := newTestState("192.168.100.101")
	s.upsertNode("us", ulNode("us", "z-real", "192.168.100.111"))
	s.upsertNode("ap", ulNode("ap", "a-evil", "192.168.100.111"))
	wantAccepted(t, s, "us/z-real")
	wantExcluded(t, s, map[string]map[string]int{"ap": {ReasonUnderlayConflict: 1}})

	// An update of the holder keeps the IP with it.
	n := ulNode("us", "z-real", "192.168.100.111")
	n.Region = "us-east"
	s.upsertNode("us", n)
	wantAccepted(t, s, "us/z-real")

	// The holder moves to another IP: the excluded claim is admitted.
	s.upsertNode("us", ulNode("us", "z-real", "192.168.100.112"))
	wantAccepted(t, s, "ap/a-evil", "us/z-real")
	wantExcluded(t, s, map[string]map[string]int{})

	// The other way round, and freed by a delete and by a drain.
	s.upsertNode("us", ulNode("us", "n2", "192.168.100.111"))
	wantExcluded(t, s, map[string]map[string]int{"us": {ReasonUnderlayConflict: 1}})
	s.deleteNode("ap", "a-evil")
	wantAccepted(t, s, "us/n2", "us/z-real")
	s.upsertNode("ap", ulNode("ap", "b", "192.168.100.112"))
	wantExcluded(t, s, map[string]map[string]int{"ap": {ReasonUnderlayConflict: 1}})
	s.drain("us")
	wantAccepted(t, s, "ap/b")
	wantExcluded(t, s, map[string]map[string]int{})
}

// The local cluster gets no precedence: a compromised cluster's own agents
// must not drop another cluster's node for a rogue claim of its IP.
func TestUnderlayLocalClusterNoPrecedence(t *testing.T) {
	s := newTestState("192.168.100.101")
	s.upsertNode("us", ulNode("us", "n1", "192.168.100.111"))
	s.upsertNode("eu", ulNode("eu", "rogue", "192.168.100.111"))
	wantAccepted(t, s, "us/n1")
	wantExcluded(t, s, map[string]map[string]int{"eu": {ReasonUnderlayConflict: 1}})
	s.pruneNodes("us", func(string) bool { return false })
	wantAccepted(t, s, "eu/rogue")
}

// Two nodes of one cluster with one IP: the second is excluded, as a
// remote's would be.
func TestUnderlayWithinCluster(t *testing.T) {
	s := newTestState()
	s.upsertNode("us", ulNode("us", "n1", "192.168.100.111"))
	s.upsertNode("us", ulNode("us", "n0", "192.168.100.111"))
	wantAccepted(t, s, "us/n1")
	wantExcluded(t, s, map[string]map[string]int{"us": {ReasonUnderlayConflict: 1}})
}

// Within a cluster the node holding a pod CIDR keeps it; the overlapping
// newcomer comes in once the range is free.
func TestUnderlayPodCIDRConflict(t *testing.T) {
	s := newTestState()
	n1 := ulNode("us", "n1", "192.168.100.111")
	n1.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.2.1.0/24")}
	greedy := ulNode("us", "a-greedy", "192.168.100.119")
	greedy.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.2.0.0/20")}
	s.upsertNode("us", n1)
	s.upsertNode("us", greedy)
	wantAccepted(t, s, "us/n1")
	wantExcluded(t, s, map[string]map[string]int{"us": {ReasonPodCIDRConflict: 1}})
	s.deleteNode("us", "n1")
	wantAccepted(t, s, "us/a-greedy")
}

// A node publishing another node's WireGuard key is kept out: peers are
// keyed by public key, so it would take the holder's encrypted traffic.
// The holder changing its key (a rotation) frees the old one.
func TestUnderlayWireGuardKeyConflict(t *testing.T) {
	const k1, k2 = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=", "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
	withKey := func(n v1.Node, key string) v1.Node { n.WireGuardPublicKey = key; return n }
	s := newTestState("192.168.100.101")
	s.upsertNode("us", withKey(ulNode("us", "real", "192.168.100.111"), k1))
	s.upsertNode("ap", withKey(ulNode("ap", "evil", "192.168.100.120"), k1))
	wantAccepted(t, s, "us/real")
	wantExcluded(t, s, map[string]map[string]int{"ap": {ReasonKeyConflict: 1}})

	// The holder rotates: the copied (old) key is free again, and a node
	// may hold it; the new key stays with the holder.
	s.upsertNode("us", withKey(ulNode("us", "real", "192.168.100.111"), k2))
	wantAccepted(t, s, "ap/evil", "us/real")
	s.upsertNode("ap", withKey(ulNode("ap", "evil2", "192.168.100.121"), k2))
	wantExcluded(t, s, map[string]map[string]int{"ap": {ReasonKeyConflict: 1}})
}
