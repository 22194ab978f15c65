package clustermesh

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Underlay arbitration: which node may use which node IP.
//
// A node's pod CIDRs are settled entry by entry (each must lie inside its
// cluster's pinned CIDRs, and pins are disjoint), but its IPs, the
// tunnels' underlay, belong to no pinned range: a compromised cluster can
// publish a node with another cluster's node IP, or with this very node's.
// The tunnel refuses two nodes with one IP, and used to keep whichever
// name sorted first, so such a claim could take a legitimate node out of
// every other cluster's tunnels.
//
// The rules, applied as nodes arrive:
//   - a remote cluster's node may never claim an IP of this agent's own
//     node (ReasonLocalNodeIP);
//   - an IP held by an accepted node stays with it: a later claim by any
//     other node, of any cluster (the local one included), is excluded
//     (ReasonUnderlayConflict), whatever the names;
//   - likewise a WireGuard public key (ReasonKeyConflict): peers are
//     keyed by it, so a copied key would take the holder's encrypted
//     traffic;
//   - likewise a pod CIDR: a node whose range overlaps one an accepted
//     node of its cluster holds is excluded (ReasonPodCIDRConflict);
//     across clusters ranges cannot overlap, each being inside its
//     cluster's pin;
//   - when a holder goes (deleted, changed, its cluster drained), the
//     excluded claims are tried again in cluster and node name order.
//
// So what was accepted before stays untouched, and a conflict is never
// settled by name order. The local cluster gets no precedence on purpose:
// if it did, a compromised cluster's own agents would drop another
// cluster's node for a rogue claim of its IP. What is left to a
// compromised cluster: when its claim and the real owner's arrive
// together (an agent restart), the first one delivered wins. It gains no
// traffic by that (a node's pod CIDRs are its own cluster's), but the real
// owner's node may be unreachable from that agent until the rogue claim
// goes; status shows the conflict.

// nodeRef names a node of the mesh.
type nodeRef struct {
	cluster, name string
}

func (r nodeRef) String() string { return r.cluster + "/" + r.name }

// nodeClaim is a node as its cluster published it, and why it is kept out
// of the merged state ("" when it is in).
type nodeClaim struct {
	node     v1.Node
	excluded string
}

// underlay holds every decoded node, who holds each node IP and each
// pod CIDR, and which claims are kept out. Guarded by state.mu.
//
// The indexes keep a node's arrival O(its IPs and CIDRs) rather than
// O(nodes in the mesh): with 16 clusters of 1 000 nodes, walking every
// claim on each arrival made the first sync take 30 s instead of 2.
type underlay struct {
	local    string
	localIPs map[netip.Addr]bool
	claims   map[string]map[string]*nodeClaim // cluster → name
	owners   map[netip.Addr]nodeRef
	keys     map[string]nodeRef      // WireGuard public key → holder
	podCIDRs map[string]*prefixIndex // cluster → its accepted nodes' pod CIDRs
	out      map[nodeRef]bool        // claims kept out, to try again
}

func newUnderlay(local string, localIPs []netip.Addr) *underlay {
	u := &underlay{
		local:    local,
		localIPs: make(map[netip.Addr]bool, len(localIPs)),
		claims:   make(map[string]map[string]*nodeClaim),
		owners:   make(map[netip.Addr]nodeRef),
		keys:     make(map[string]nodeRef),
		podCIDRs: make(map[string]*prefixIndex),
		out:      make(map[nodeRef]bool),
	}
	for _, ip := range localIPs {
		u.localIPs[ip] = true
	}
	return u
}

// verdict is the outcome for one node: in the merged state (node set) or
// out of it (node nil).
type verdict struct {
	ref  nodeRef
	node *v1.Node
	// why a node is out, for the log; "" for a node that was deleted.
	why string
}

// upsert records cluster's node n and returns the nodes whose place in
// the merged state changed (n and any node a change of n freed).
func (u *underlay) upsert(cluster string, n v1.Node) []verdict {
	ref := nodeRef{cluster, n.Name}
	freed := u.release(ref)
	if u.claims[cluster] == nil {
		u.claims[cluster] = make(map[string]*nodeClaim)
	}
	u.claims[cluster][n.Name] = &nodeClaim{node: n}
	out := u.admit(ref)
	if freed {
		out = append(out, u.retry()...)
	}
	return out
}

// remove forgets cluster's node name.
func (u *underlay) remove(cluster, name string) []verdict {
	ref := nodeRef{cluster, name}
	freed := u.release(ref)
	delete(u.claims[cluster], name)
	out := []verdict{{ref: ref}}
	if freed {
		out = append(out, u.retry()...)
	}
	return out
}

// drop forgets every node of cluster (it was drained).
func (u *underlay) drop(cluster string) []verdict {
	for name := range u.claims[cluster] {
		u.release(nodeRef{cluster, name})
	}
	delete(u.claims, cluster)
	delete(u.podCIDRs, cluster)
	return u.retry()
}

// names lists cluster's nodes, accepted or not.
func (u *underlay) names(cluster string) []string {
	return slices.Collect(maps.Keys(u.claims[cluster]))
}

// release gives up what ref's claim holds: its IPs and pod CIDRs when it
// was accepted (reporting that something was freed), its place among the
// excluded otherwise.
func (u *underlay) release(ref nodeRef) (freed bool) {
	c := u.claims[ref.cluster][ref.name]
	if c == nil {
		return false
	}
	if c.excluded != "" {
		delete(u.out, ref)
		return false
	}
	for _, ip := range c.node.IPs {
		if u.owners[ip] == ref {
			delete(u.owners, ip)
			freed = true
		}
	}
	if x := u.podCIDRs[ref.cluster]; x != nil {
		for _, p := range c.node.PodCIDRs {
			x.remove(p, ref.name)
			freed = true
		}
	}
	if k := c.node.WireGuardPublicKey; k != "" && u.keys[k] == ref {
		delete(u.keys, k)
		freed = true
	}
	return freed
}

// admit decides for ref's claim, which holds nothing yet.
func (u *underlay) admit(ref nodeRef) []verdict {
	c := u.claims[ref.cluster][ref.name]
	if reason, why := u.conflict(ref); reason != "" {
		return []verdict{u.exclude(ref, reason, why)}
	}
	for _, ip := range c.node.IPs {
		u.owners[ip] = ref
	}
	if k := c.node.WireGuardPublicKey; k != "" {
		u.keys[k] = ref
	}
	if len(c.node.PodCIDRs) > 0 {
		x := u.podCIDRs[ref.cluster]
		if x == nil {
			x = &prefixIndex{}
			u.podCIDRs[ref.cluster] = x
		}
		for _, p := range c.node.PodCIDRs {
			x.insert(p, ref.name)
		}
	}
	c.excluded = ""
	delete(u.out, ref)
	n := c.node
	return []verdict{{ref: ref, node: &n}}
}

// conflict says why ref's claim cannot be admitted now, or "".
func (u *underlay) conflict(ref nodeRef) (reason, why string) {
	c := u.claims[ref.cluster][ref.name]
	for _, ip := range c.node.IPs {
		if ref.cluster != u.local && u.localIPs[ip] {
			return ReasonLocalNodeIP, fmt.Sprintf("node IP %s is this agent's own node's", ip)
		}
		if holder, held := u.owners[ip]; held && holder != ref {
			return ReasonUnderlayConflict, fmt.Sprintf("node IP %s is held by node %s", ip, holder)
		}
	}
	if k := c.node.WireGuardPublicKey; k != "" {
		if holder, held := u.keys[k]; held && holder != ref {
			return ReasonKeyConflict, fmt.Sprintf("WireGuard key %s is held by node %s", k, holder)
		}
	}
	// Pod CIDRs of different clusters cannot overlap (each lies inside its
	// cluster's pin, and pins are disjoint); within one cluster the node
	// that holds a range keeps it, as with IPs, so the tunnel never has
	// to choose. A node's own CIDRs are disjoint (v1.Node validation).
	if x := u.podCIDRs[ref.cluster]; x != nil {
		for _, p := range c.node.PodCIDRs {
			if held, ok := x.overlapping(p); ok && held.owner != ref.name {
				return ReasonPodCIDRConflict, fmt.Sprintf("pod CIDR %s overlaps %s of node %s", p, held.prefix, nodeRef{ref.cluster, held.owner})
			}
		}
	}
	return "", ""
}

func (u *underlay) exclude(ref nodeRef, reason, why string) verdict {
	u.claims[ref.cluster][ref.name].excluded = reason
	u.out[ref] = true
	return verdict{ref: ref, why: reason + ": " + why}
}

// retry admits excluded claims whose conflict is gone, in cluster and
// node name order.
func (u *underlay) retry() []verdict {
	if len(u.out) == 0 {
		return nil
	}
	refs := slices.SortedFunc(maps.Keys(u.out), func(a, b nodeRef) int {
		if c := strings.Compare(a.cluster, b.cluster); c != 0 {
			return c
		}
		return strings.Compare(a.name, b.name)
	})
	var out []verdict
	for _, ref := range refs {
		if reason, _ := u.conflict(ref); reason != "" {
			continue
		}
		out = append(out, u.admit(ref)...)
	}
	return out
}

// excluded counts, per cluster, the nodes kept out of the merged state by
// reason.
func (u *underlay) excluded() map[string]map[string]int {
	out := make(map[string]map[string]int)
	for ref := range u.out {
		if out[ref.cluster] == nil {
			out[ref.cluster] = make(map[string]int)
		}
		out[ref.cluster][u.claims[ref.cluster][ref.name].excluded]++
	}
	return out
}
