package clustermesh

import (
	"math/rand/v2"
	"net/netip"
	"testing"
)

// TestPrefixIndexMatchesBruteForce checks the binary search against
// netip.Prefix.Overlaps over random disjoint sets, IPv4 and IPv6 mixed.
func TestPrefixIndexMatchesBruteForce(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	random := func() netip.Prefix {
		if rng.IntN(4) == 0 {
			a := netip.AddrFrom16([16]byte{0xfd, 0, byte(rng.IntN(4)), byte(rng.IntN(256))})
			return netip.PrefixFrom(a, 24+rng.IntN(16)).Masked()
		}
		a := netip.AddrFrom4([4]byte{10, byte(rng.IntN(4)), byte(rng.IntN(256)), byte(rng.IntN(256))})
		return netip.PrefixFrom(a, 12+rng.IntN(21)).Masked()
	}
	for round := range 200 {
		var x prefixIndex
		held := map[netip.Prefix]string{}
		for i := range 40 {
			p := random()
			overlaps := false
			for h := range held {
				overlaps = overlaps || h.Overlaps(p)
			}
			got, ok := x.overlapping(p)
			if ok != overlaps || (ok && (held[got.prefix] != got.owner || !got.prefix.Overlaps(p))) {
				t.Fatalf("round %d: overlapping(%s) = %v %v, want overlap %v (held %v)", round, p, got.prefix, ok, overlaps, held)
			}
			if !ok {
				owner := string(rune('a' + i))
				x.insert(p, owner)
				held[p] = owner
			} else if rng.IntN(3) == 0 {
				x.remove(got.prefix, "someone else")
				if _, still := x.overlapping(p); !still {
					t.Fatalf("round %d: remove by a non-owner dropped %s", round, got.prefix)
				}
				x.remove(got.prefix, got.owner)
				delete(held, got.prefix)
			}
		}
	}
}

func TestPrefixIndexEdges(t *testing.T) {
	pfx := netip.MustParsePrefix
	var x prefixIndex
	x.insert(pfx("10.0.0.1/32"), "host")
	x.insert(pfx("10.0.1.0/24"), "node")
	x.insert(pfx("fd00::/64"), "six")
	for _, tc := range []struct {
		query string
		owner string // "" for no overlap
	}{
		{"10.0.0.1/32", "host"},
		{"10.0.0.0/31", "host"},
		{"10.0.0.2/31", ""},
		{"10.0.0.0/32", ""},
		{"10.0.1.255/32", "node"},
		{"10.0.2.0/24", ""},
		{"10.0.0.0/16", "node"},
		{"::a00:1/128", ""}, // the IPv4 addresses' bytes, as IPv6
		{"fd00::ffff/128", "six"},
		{"fd00:0:0:1::/64", ""},
	} {
		got, ok := x.overlapping(pfx(tc.query))
		if ok != (tc.owner != "") || got.owner != tc.owner {
			t.Errorf("overlapping(%s) = %q %v, want %q", tc.query, got.owner, ok, tc.owner)
		}
	}
}
