package ipsec

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Ownership: every xfrm state and every policy template Trellis installs
// carries Reqid; every state or policy whose reqid has the top byte
// OwnerReqidBase is Trellis's, whichever process installed it.
const (
	// OwnerReqidBase and OwnerReqidMask: reqids 0x7e000000–0x7effffff are
	// Trellis's (0x7e = 126, the rtm_protocol of Trellis's routes).
	// Apply and Cleanup treat the whole range as theirs, so objects of a
	// later version that uses other reqids of the range are still found.
	OwnerReqidBase = 0x7e000000
	OwnerReqidMask = 0xff000000
	// Reqid ties Trellis's policies to its states: the kernel uses a
	// state for a policy's template only when their reqids are equal.
	// One value serves every pair: the template's addresses already pick
	// the pair, and the in policy must accept the states of every key
	// index alike, which a reqid per index would prevent.
	Reqid = OwnerReqidBase | 1
	// probeReqid marks CheckKernel's throwaway state, so that one a crash
	// left behind is still Trellis's to clean up.
	probeReqid = OwnerReqidBase | 0xff
)

// IsOwnerReqid reports whether reqid is in Trellis's range.
func IsOwnerReqid(reqid uint32) bool { return reqid&OwnerReqidMask == OwnerReqidBase }

// ReplayWindow is the anti-replay window of every state (the most a
// non-ESN state has: the kernel's bitmap is 32 bits).
const ReplayWindow = 32

// Node is one node as IPsec sees it.
type Node struct {
	// Name is "cluster/node", unique in the mesh. Keys are derived from
	// it, so both nodes of a pair must see the same name.
	Name string
	// IP is the underlay address ESP packets are sent from and to.
	IP netip.Addr
	// PodCIDRs are the pod networks behind the node: policies encrypt
	// traffic between the local node's and a peer's pod CIDRs.
	PodCIDRs []netip.Prefix
	// KeyIndex is the key the node sends with, 1–15; 0 when the node does
	// not run IPsec.
	KeyIndex uint8
}

// PlanOptions tune Plan. The zero value accepts inbound only the indexes
// the nodes use now.
type PlanOptions struct {
	// Accept are further key indexes accepted inbound from every peer:
	// the indexes the local node used before its current one, for the
	// grace period after a rotation (see the package doc). An index not
	// in the key file is skipped and reported.
	Accept []uint8
}

// Direction is the direction of a state or policy, seen from the local
// node.
type Direction uint8

const (
	// DirOut: packets the local node sends to a peer.
	DirOut Direction = iota + 1
	// DirIn: packets from a peer delivered to the local node.
	DirIn
	// DirFwd: packets from a peer forwarded by the local node (to its
	// pods). Policies only.
	DirFwd
)

func (d Direction) String() string {
	switch d {
	case DirOut:
		return "out"
	case DirIn:
		return "in"
	case DirFwd:
		return "fwd"
	}
	return fmt.Sprintf("dir(%d)", uint8(d))
}

// State is one ESP SA: tunnel mode, AEADAlgorithm, reqid Reqid.
type State struct {
	// Dir is DirOut (Src is the local node) or DirIn (Dst is).
	Dir Direction
	// Peer is the other node's name.
	Peer string
	// Index is the key index the SA's key comes from.
	Index uint8
	// Src and Dst are the underlay addresses of the ESP packets.
	Src, Dst netip.Addr
	SPI      uint32
	Reqid    uint32
	// Key is the AEAD key followed by its salt (AEADKeyBytes).
	Key []byte
}

// StateID is how the kernel tells states apart (with the protocol, always
// ESP here).
type StateID struct {
	Dst netip.Addr
	SPI uint32
}

// ID returns the state's kernel identity.
func (s State) ID() StateID { return StateID{s.Dst, s.SPI} }

// String describes the state without its key.
func (s State) String() string {
	return fmt.Sprintf("%s esp %s → %s spi %#08x index %d (peer %s)", s.Dir, s.Src, s.Dst, s.SPI, s.Index, s.Peer)
}

// Policy is one xfrm policy: packets from Src to Dst (pod CIDRs) must go
// through (out) or have come through (in, fwd) an ESP tunnel between
// TmplSrc and TmplDst with reqid Reqid.
type Policy struct {
	Dir  Direction
	Peer string
	// Src and Dst are the selector: the inner packet's source and
	// destination networks.
	Src, Dst netip.Prefix
	// TmplSrc and TmplDst are the tunnel's underlay ends.
	TmplSrc, TmplDst netip.Addr
	Reqid            uint32
}

// PolicyID is how the kernel tells Trellis's policies apart (type main,
// no mark, no interface id, any protocol and port).
type PolicyID struct {
	Dir      Direction
	Src, Dst netip.Prefix
}

// ID returns the policy's kernel identity.
func (p Policy) ID() PolicyID { return PolicyID{p.Dir, p.Src, p.Dst} }

func (p Policy) String() string {
	return fmt.Sprintf("%s %s → %s tmpl esp tunnel %s → %s (peer %s)", p.Dir, p.Src, p.Dst, p.TmplSrc, p.TmplDst, p.Peer)
}

// Desired is the xfrm state of one node, as Plan computes it. Apply makes
// the kernel hold exactly these, of Trellis's objects.
type Desired struct {
	// States sorted by direction, peer, index.
	States []State
	// Policies sorted by peer, direction, selector.
	Policies []Policy
	// Problems are what Plan refused or could not plan, each naming the
	// node; the rest is planned.
	Problems []error
}

// Err joins Problems, nil when there are none.
func (d Desired) Err() error { return errors.Join(d.Problems...) }

// Plan computes the xfrm states and policies of the local node.
//
// Nothing is planned when local.KeyIndex is 0 (the node does not run
// IPsec): Apply then removes every Trellis object. Otherwise, for every
// peer with a KeyIndex (peers with 0 do not run IPsec; their traffic is
// not encrypted):
//
//   - an out state local → peer with the local node's index;
//   - in states peer → local for the peer's index, the local node's index,
//     the key file's current index and opts.Accept, each present in keys
//     (so inbound works whichever of the two moves to a new index first);
//   - for every pair of a local and a peer pod CIDR of one family: an out
//     policy (local CIDR → peer CIDR, tunnel local → peer), and an in and
//     a fwd policy (peer CIDR → local CIDR, tunnel peer → local). A pod
//     CIDR may be of the other family than the underlay (the tunnel
//     carries both).
//
// Refused, and reported in Problems: nodes without a name or a valid IP,
// a second node of one name or IP, a peer whose IP is of the other family
// than the local node's, key indexes above 15, pod CIDRs that overlap the
// local node's or an earlier peer's (peers are taken in name order), an
// in state whose SPI another peer's already has (see the package doc). A
// key index missing from keys leaves out the states that need it and is
// reported; the policies stay, so that such traffic is dropped, never
// sent in the clear.
func Plan(local Node, peers []Node, keys Keys, opts PlanOptions) Desired {
	var d Desired
	if local.KeyIndex == 0 {
		return d
	}
	problem := func(format string, args ...any) {
		d.Problems = append(d.Problems, fmt.Errorf("ipsec: "+format, args...))
	}
	local.IP = local.IP.Unmap()
	switch {
	case local.Name == "" || len(local.Name) > maxNameBytes:
		problem("local node %q: name must be 1 to %d bytes", local.Name, maxNameBytes)
		return d
	case !local.IP.IsValid() || local.IP.IsUnspecified():
		problem("local node %q: no underlay IP", local.Name)
		return d
	case local.KeyIndex > MaxKeyIndex:
		problem("local node %q: key index %d out of range (want %d-%d)", local.Name, local.KeyIndex, MinKeyIndex, MaxKeyIndex)
		return d
	}
	sendOut := keys.Has(local.KeyIndex)
	if !sendOut {
		problem("local node %q: key index %d is not in %s: no out states (traffic to peers is dropped until it is)", local.Name, local.KeyIndex, keys.Source())
	}

	// Indexes accepted from every peer, besides the peer's own.
	accept := map[uint8]bool{}
	for _, i := range append([]uint8{local.KeyIndex, keys.Current()}, opts.Accept...) {
		switch {
		case i == 0:
		case !keys.Has(i):
			if i != local.KeyIndex { // reported above
				problem("accepted key index %d is not in %s: not accepted", i, keys.Source())
			}
		default:
			accept[i] = true
		}
	}

	// claims maps every pod CIDR planned so far to its node, to refuse
	// overlaps: the kernel picks among overlapping policies by priority
	// and age, not by prefix length.
	type claim struct {
		p    netip.Prefix
		node string
	}
	var claims []claim
	claimCIDRs := func(node string, cidrs []netip.Prefix) []netip.Prefix {
		var out []netip.Prefix
		for _, c := range cidrs {
			c, ok := normPrefix(c)
			if !ok {
				problem("node %q: invalid pod CIDR %s", node, c)
				continue
			}
			if i := slices.IndexFunc(claims, func(cl claim) bool { return cl.p.Overlaps(c) }); i >= 0 {
				if claims[i].node == node && claims[i].p == c {
					continue // listed twice
				}
				problem("node %q: pod CIDR %s overlaps %s of node %q: not encrypted", node, c, claims[i].p, claims[i].node)
				continue
			}
			claims = append(claims, claim{c, node})
			out = append(out, c)
		}
		return out
	}
	localCIDRs := claimCIDRs(local.Name, local.PodCIDRs)

	sorted := slices.Clone(peers)
	slices.SortStableFunc(sorted, func(a, b Node) int { return strings.Compare(a.Name, b.Name) })
	names := map[string]bool{local.Name: true}
	ips := map[netip.Addr]string{local.IP: local.Name}
	inSPIs := map[uint32]string{}
	for _, p := range sorted {
		if p.KeyIndex == 0 {
			continue
		}
		p.IP = p.IP.Unmap()
		switch {
		case p.Name == "" || len(p.Name) > maxNameBytes:
			problem("peer %q (%s): name must be 1 to %d bytes", p.Name, p.IP, maxNameBytes)
			continue
		case names[p.Name]:
			problem("peer %q: a second node of that name", p.Name)
			continue
		case !p.IP.IsValid() || p.IP.IsUnspecified():
			problem("peer %q: no underlay IP", p.Name)
			continue
		case p.IP.Is4() != local.IP.Is4():
			problem("peer %q: underlay %s and the local node's %s are of different families: no tunnel between them", p.Name, p.IP, local.IP)
			continue
		case ips[p.IP] != "":
			problem("peer %q: underlay %s is node %q's too", p.Name, p.IP, ips[p.IP])
			continue
		case p.KeyIndex > MaxKeyIndex:
			problem("peer %q: key index %d out of range (want %d-%d)", p.Name, p.KeyIndex, MinKeyIndex, MaxKeyIndex)
			continue
		}
		names[p.Name] = true
		ips[p.IP] = p.Name

		if sendOut {
			k, err := keys.Derive(local.Name, p.Name, local.KeyIndex)
			if err != nil {
				problem("peer %q: %v", p.Name, err)
			} else {
				d.States = append(d.States, State{Dir: DirOut, Peer: p.Name, Index: k.Index, Src: local.IP, Dst: p.IP, SPI: k.SPI, Reqid: Reqid, Key: k.Key})
			}
		}
		for _, i := range inIndexes(accept, p.KeyIndex) {
			if !keys.Has(i) {
				problem("peer %q sends with key index %d, which is not in %s: its traffic is dropped until it is", p.Name, i, keys.Source())
				continue
			}
			k, err := keys.Derive(p.Name, local.Name, i)
			if err != nil {
				problem("peer %q: %v", p.Name, err)
				continue
			}
			if other, dup := inSPIs[k.SPI]; dup {
				problem("peer %q: SPI %#08x of its index %d is peer %q's too, and the kernel tells inbound SAs apart by SPI: its traffic under that index is dropped (rotate to a new key index to resolve)",
					p.Name, k.SPI, i, other)
				continue
			}
			inSPIs[k.SPI] = p.Name
			d.States = append(d.States, State{Dir: DirIn, Peer: p.Name, Index: i, Src: p.IP, Dst: local.IP, SPI: k.SPI, Reqid: Reqid, Key: k.Key})
		}

		for _, pc := range claimCIDRs(p.Name, p.PodCIDRs) {
			for _, lc := range localCIDRs {
				if lc.Addr().Is4() != pc.Addr().Is4() {
					continue
				}
				d.Policies = append(d.Policies,
					Policy{Dir: DirOut, Peer: p.Name, Src: lc, Dst: pc, TmplSrc: local.IP, TmplDst: p.IP, Reqid: Reqid},
					Policy{Dir: DirIn, Peer: p.Name, Src: pc, Dst: lc, TmplSrc: p.IP, TmplDst: local.IP, Reqid: Reqid},
					Policy{Dir: DirFwd, Peer: p.Name, Src: pc, Dst: lc, TmplSrc: p.IP, TmplDst: local.IP, Reqid: Reqid},
				)
			}
		}
	}
	slices.SortFunc(d.States, func(a, b State) int {
		return cmp.Or(cmp.Compare(a.Dir, b.Dir), strings.Compare(a.Peer, b.Peer), cmp.Compare(a.Index, b.Index))
	})
	slices.SortStableFunc(d.Policies, func(a, b Policy) int {
		return cmp.Or(strings.Compare(a.Peer, b.Peer), cmp.Compare(a.Dir, b.Dir), comparePrefix(a.Src, b.Src), comparePrefix(a.Dst, b.Dst))
	})
	return d
}

// inIndexes returns the indexes of set and the peer's, ascending, each
// once.
func inIndexes(set map[uint8]bool, peer uint8) []uint8 {
	out := []uint8{peer}
	for i := range set {
		if i != peer {
			out = append(out, i)
		}
	}
	slices.Sort(out)
	return out
}

// normPrefix unmaps an IPv4-mapped prefix and masks it.
func normPrefix(c netip.Prefix) (netip.Prefix, bool) {
	if !c.IsValid() {
		return c, false
	}
	if c.Addr().Is4In6() {
		if c.Bits() < 96 {
			return c, false
		}
		c = netip.PrefixFrom(c.Addr().Unmap(), c.Bits()-96)
	}
	return c.Masked(), true
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}
