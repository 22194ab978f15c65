package clustermesh

import (
	"net/netip"
	"slices"
)

// prefixIndex holds disjoint prefixes, each with an owner, sorted by their
// first address, so finding the one a new prefix overlaps is a binary
// search rather than a walk over every node of a cluster.
type prefixIndex struct {
	spans []prefixSpan
}

type prefixSpan struct {
	first, last netip.Addr
	prefix      netip.Prefix
	owner       string
}

func spanOf(p netip.Prefix, owner string) prefixSpan {
	p = p.Masked()
	return prefixSpan{first: p.Addr(), last: lastAddr(p), prefix: p, owner: owner}
}

// lastAddr is the highest address inside p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// overlapping returns the held prefix p overlaps and its owner. Held spans
// are disjoint, so among those starting at or before p's last address the
// one starting last also ends last: it is the only candidate.
func (x *prefixIndex) overlapping(p netip.Prefix) (prefixSpan, bool) {
	s := spanOf(p, "")
	i, _ := slices.BinarySearchFunc(x.spans, s.last, func(e prefixSpan, last netip.Addr) int {
		if e.first.Compare(last) <= 0 {
			return -1
		}
		return 1
	})
	if i == 0 {
		return prefixSpan{}, false
	}
	if prev := x.spans[i-1]; prev.last.Compare(s.first) >= 0 {
		return prev, true
	}
	return prefixSpan{}, false
}

// insert adds p for owner; the caller has checked it overlaps nothing held.
func (x *prefixIndex) insert(p netip.Prefix, owner string) {
	s := spanOf(p, owner)
	i, _ := slices.BinarySearchFunc(x.spans, s.first, func(e prefixSpan, first netip.Addr) int { return e.first.Compare(first) })
	x.spans = slices.Insert(x.spans, i, s)
}

// remove drops p if owner holds it.
func (x *prefixIndex) remove(p netip.Prefix, owner string) {
	s := spanOf(p, owner)
	i, found := slices.BinarySearchFunc(x.spans, s.first, func(e prefixSpan, first netip.Addr) int { return e.first.Compare(first) })
	if found && x.spans[i].prefix == s.prefix && x.spans[i].owner == owner {
		x.spans = slices.Delete(x.spans, i, i+1)
	}
}
