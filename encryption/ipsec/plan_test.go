package ipsec

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func node(name, ip string, index uint8, cidrs ...string) Node {
	n := Node{Name: name, IP: netip.MustParseAddr(ip), KeyIndex: index}
	for _, c := range cidrs {
		n.PodCIDRs = append(n.PodCIDRs, netip.MustParsePrefix(c))
	}
	return n
}

// summary renders a Desired as lines without keys, in Plan's order.
func summary(d Desired) []string {
	var out []string
	for _, s := range d.States {
		out = append(out, fmt.Sprintf("state %s %s>%s idx %d peer %s", s.Dir, s.Src, s.Dst, s.Index, s.Peer))
	}
	for _, p := range d.Policies {
		out = append(out, fmt.Sprintf("policy %s %s>%s tmpl %s>%s peer %s", p.Dir, p.Src, p.Dst, p.TmplSrc, p.TmplDst, p.Peer))
	}
	return out
}

func checkSummary(t *testing.T, d Desired, want []string) {
	t.Helper()
	got := summary(d)
	if !slices.Equal(got, want) {
		t.Errorf("plan:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

func checkInvariants(t *testing.T, keys Keys, local Node, d Desired) {
	t.Helper()
	if err := checkDesired(d); err != nil {
		t.Errorf("Plan made a Desired Apply refuses: %v", err)
	}
	for _, s := range d.States {
		src, dst := local.Name, s.Peer
		if s.Dir == DirIn {
			src, dst = s.Peer, local.Name
		}
		k, err := keys.Derive(src, dst, s.Index)
		if err != nil {
			t.Fatal(err)
		}
		if k.SPI != s.SPI || string(k.Key) != string(s.Key) || s.Reqid != Reqid {
			t.Errorf("state %s: not Derive(%q, %q, %d)", s, src, dst, s.Index)
		}
	}
}

func TestPlanIPv4(t *testing.T) {
	keys := testKeys(t) // current: 15
	local := node("c1/a", "192.168.0.1", 2, "10.1.0.0/24")
	peers := []Node{
		node("c2/c", "192.168.0.3", 2, "10.3.0.0/24"),
		node("c1/b", "192.168.0.2", 2, "10.2.0.0/24", "10.22.0.0/24"),
		node("c3/plain", "192.168.0.4", 0, "10.4.0.0/24"), // no IPsec: skipped
	}
	d := Plan(local, peers, keys, PlanOptions{})
	if err := d.Err(); err != nil {
		t.Fatal(err)
	}
	// In: the peer's index (2) and the key file's current one (15), which
	// the peers will move to.
	checkSummary(t, d, []string{
		"state out 192.168.0.1>192.168.0.2 idx 2 peer c1/b",
		"state out 192.168.0.1>192.168.0.3 idx 2 peer c2/c",
		"state in 192.168.0.2>192.168.0.1 idx 2 peer c1/b",
		"state in 192.168.0.2>192.168.0.1 idx 15 peer c1/b",
		"state in 192.168.0.3>192.168.0.1 idx 2 peer c2/c",
		"state in 192.168.0.3>192.168.0.1 idx 15 peer c2/c",
		"policy out 10.1.0.0/24>10.2.0.0/24 tmpl 192.168.0.1>192.168.0.2 peer c1/b",
		"policy out 10.1.0.0/24>10.22.0.0/24 tmpl 192.168.0.1>192.168.0.2 peer c1/b",
		"policy in 10.2.0.0/24>10.1.0.0/24 tmpl 192.168.0.2>192.168.0.1 peer c1/b",
		"policy in 10.22.0.0/24>10.1.0.0/24 tmpl 192.168.0.2>192.168.0.1 peer c1/b",
		"policy fwd 10.2.0.0/24>10.1.0.0/24 tmpl 192.168.0.2>192.168.0.1 peer c1/b",
		"policy fwd 10.22.0.0/24>10.1.0.0/24 tmpl 192.168.0.2>192.168.0.1 peer c1/b",
		"policy out 10.1.0.0/24>10.3.0.0/24 tmpl 192.168.0.1>192.168.0.3 peer c2/c",
		"policy in 10.3.0.0/24>10.1.0.0/24 tmpl 192.168.0.3>192.168.0.1 peer c2/c",
		"policy fwd 10.3.0.0/24>10.1.0.0/24 tmpl 192.168.0.3>192.168.0.1 peer c2/c",
	})
	checkInvariants(t, keys, local, d)
	// The order of the peers does not matter.
	slices.Reverse(peers)
	if got := summary(Plan(local, peers, keys, PlanOptions{})); !slices.Equal(got, summary(d)) {
		t.Error("the plan depends on the order of the peers")
	}
}

func TestPlanIPv6(t *testing.T) {
	keys := testKeys(t)
	local := node("c1/a", "fd00::1", 15, "fd01::/64")
	d := Plan(local, []Node{node("c1/b", "fd00::2", 15, "fd02::/64")}, keys, PlanOptions{})
	if err := d.Err(); err != nil {
		t.Fatal(err)
	}
	checkSummary(t, d, []string{
		"state out fd00::1>fd00::2 idx 15 peer c1/b",
		"state in fd00::2>fd00::1 idx 15 peer c1/b",
		"policy out fd01::/64>fd02::/64 tmpl fd00::1>fd00::2 peer c1/b",
		"policy in fd02::/64>fd01::/64 tmpl fd00::2>fd00::1 peer c1/b",
		"policy fwd fd02::/64>fd01::/64 tmpl fd00::2>fd00::1 peer c1/b",
	})
	checkInvariants(t, keys, local, d)
}

// TestPlanDualStack: pod CIDRs of both families over an IPv4 underlay;
// policies pair CIDRs of one family only.
func TestPlanDualStack(t *testing.T) {
	keys := testKeys(t)
	local := node("c1/a", "192.168.0.1", 15, "10.1.0.0/24", "fd01::/64")
	d := Plan(local, []Node{node("c1/b", "192.168.0.2", 15, "fd02::/64", "10.2.0.0/24")}, keys, PlanOptions{})
	if err := d.Err(); err != nil {
		t.Fatal(err)
	}
	checkSummary(t, d, []string{
		"state out 192.168.0.1>192.168.0.2 idx 15 peer c1/b",
		"state in 192.168.0.2>192.168.0.1 idx 15 peer c1/b",
		"policy out 10.1.0.0/24>10.2.0.0/24 tmpl 192.168.0.1>192.168.0.2 peer c1/b",
		"policy out fd01::/64>fd02::/64 tmpl 192.168.0.1>192.168.0.2 peer c1/b",
		"policy in 10.2.0.0/24>10.1.0.0/24 tmpl 192.168.0.2>192.168.0.1 peer c1/b",
		"policy in fd02::/64>fd01::/64 tmpl 192.168.0.2>192.168.0.1 peer c1/b",
		"policy fwd 10.2.0.0/24>10.1.0.0/24 tmpl 192.168.0.2>192.168.0.1 peer c1/b",
		"policy fwd fd02::/64>fd01::/64 tmpl 192.168.0.2>192.168.0.1 peer c1/b",
	})
	checkInvariants(t, keys, local, d)
}

// TestPlanRotation walks the documented sequence for two nodes and checks
// that at every step what one sends, the other accepts.
func TestPlanRotation(t *testing.T) {
	k1 := testKeys(t)
	old, err := NewKeys(map[uint8][]byte{1: k1.psk[1]})
	if err != nil {
		t.Fatal(err)
	}
	both, err := NewKeys(map[uint8][]byte{1: k1.psk[1], 2: k1.psk[2]})
	if err != nil {
		t.Fatal(err)
	}
	newOnly, err := NewKeys(map[uint8][]byte{2: k1.psk[2]})
	if err != nil {
		t.Fatal(err)
	}
	type side struct {
		keys   Keys
		index  uint8
		accept []uint8
	}
	steps := []struct {
		name   string
		a, b   side
		aIn    []uint8 // indexes a accepts from b
		aOut   uint8
		aPlans int // problems a's plan reports
	}{
		{"before", side{old, 1, nil}, side{old, 1, nil}, []uint8{1}, 1, 0},
		// a's file gained index 2 first: a accepts 2 already and moves its
		// out state to 2; b, whose file lacks 2, cannot accept it yet (its
		// plan reports that), which is why the file goes to every node
		// before the switch (see the package doc).
		{"a has the new file", side{both, 2, []uint8{1}}, side{old, 1, nil}, []uint8{1, 2}, 2, 0},
		// b got it too: both send with 2 and accept 1 (the grace period)
		// and 2.
		{"both have it", side{both, 2, []uint8{1}}, side{both, 2, []uint8{1}}, []uint8{1, 2}, 2, 0},
		// Grace over: 1 is no longer accepted.
		{"grace over", side{both, 2, nil}, side{both, 2, nil}, []uint8{2}, 2, 0},
		// Old key removed from the file.
		{"old key gone", side{newOnly, 2, nil}, side{newOnly, 2, nil}, []uint8{2}, 2, 0},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			a := node("c1/a", "10.0.0.1", st.a.index, "10.1.0.0/24")
			b := node("c1/b", "10.0.0.2", st.b.index, "10.2.0.0/24")
			da := Plan(a, []Node{b}, st.a.keys, PlanOptions{Accept: st.a.accept})
			db := Plan(b, []Node{a}, st.b.keys, PlanOptions{Accept: st.b.accept})
			if len(da.Problems) != st.aPlans {
				t.Errorf("a's problems: %v", da.Problems)
			}
			var aIn []uint8
			var aOut []uint8
			for _, s := range da.States {
				if s.Dir == DirIn {
					aIn = append(aIn, s.Index)
				} else {
					aOut = append(aOut, s.Index)
				}
			}
			if !slices.Equal(aIn, st.aIn) || !slices.Equal(aOut, []uint8{st.aOut}) {
				t.Errorf("a: in %v out %v, want in %v out [%d]", aIn, aOut, st.aIn, st.aOut)
			}
			// What b sends, a accepts, with the same SPI and key.
			for _, s := range db.States {
				if s.Dir != DirOut {
					continue
				}
				if !slices.ContainsFunc(da.States, func(x State) bool {
					return x.Dir == DirIn && x.SPI == s.SPI && string(x.Key) == string(s.Key)
				}) {
					t.Errorf("a does not accept b's %s", s)
				}
			}
		})
	}
}

func TestPlanLocalWithoutIPsec(t *testing.T) {
	keys := testKeys(t)
	d := Plan(node("c1/a", "10.0.0.1", 0, "10.1.0.0/24"), []Node{node("c1/b", "10.0.0.2", 1, "10.2.0.0/24")}, keys, PlanOptions{})
	if len(d.States)+len(d.Policies)+len(d.Problems) != 0 {
		t.Errorf("a node without IPsec plans %v", summary(d))
	}
}

// TestPlanProblems: what Plan refuses is reported naming the node, and the
// rest is still planned.
func TestPlanProblems(t *testing.T) {
	keys := testKeys(t) // indexes 1, 2, 15
	local := node("c1/a", "10.0.0.1", 1, "10.1.0.0/24")
	peers := []Node{
		node("c1/good", "10.0.0.2", 1, "10.2.0.0/24"),
		node("c1/dupname", "10.0.0.3", 1, "10.3.0.0/24"),
		node("c1/dupname", "10.0.0.4", 1, "10.4.0.0/24"),
		node("c1/zdupip", "10.0.0.2", 1, "10.5.0.0/24"),
		node("c1/v6", "fd00::5", 1, "10.6.0.0/24"),
		node("", "10.0.0.7", 1, "10.7.0.0/24"),
		node("c1/noip", "0.0.0.0", 1, "10.8.0.0/24"),
		node("c1/idx16", "10.0.0.9", 16, "10.9.0.0/24"),
		node("c1/zoverlap", "10.0.0.10", 1, "10.2.0.128/25", "10.10.0.0/24"),
		node("c1/missingkey", "10.0.0.11", 7, "10.11.0.0/24"),
	}
	d := Plan(local, peers, keys, PlanOptions{Accept: []uint8{9}})
	msgs := fmt.Sprint(d.Problems)
	for _, want := range []string{
		`"c1/dupname": a second node`,
		`"c1/zdupip": underlay 10.0.0.2 is node "c1/good"'s`,
		`"c1/v6": underlay fd00::5`,
		`peer "" (10.0.0.7)`,
		`"c1/noip": no underlay IP`,
		`"c1/idx16": key index 16 out of range`,
		`"c1/zoverlap": pod CIDR 10.2.0.128/25 overlaps 10.2.0.0/24 of node "c1/good"`,
		`"c1/missingkey" sends with key index 7, which is not in keys`,
		`accepted key index 9 is not in keys`,
	} {
		if !strings.Contains(msgs, want) {
			t.Errorf("problems lack %q:\n%s", want, msgs)
		}
	}
	if len(d.Problems) != 9 {
		t.Errorf("%d problems, want 9: %v", len(d.Problems), d.Problems)
	}
	// Planned: good, the first dupname, overlap's other CIDR, and the
	// policies and out state of missingkey (its traffic is dropped, never
	// sent in the clear).
	peersPlanned := map[string]bool{}
	for _, p := range d.Policies {
		peersPlanned[p.Peer] = true
		if p.Dst == netip.MustParsePrefix("10.2.0.128/25") || p.Src == netip.MustParsePrefix("10.2.0.128/25") {
			t.Errorf("overlapping CIDR planned: %s", p)
		}
	}
	for _, want := range []string{"c1/good", "c1/dupname", "c1/zoverlap", "c1/missingkey"} {
		if !peersPlanned[want] {
			t.Errorf("no policies for %s", want)
		}
	}
	if len(peersPlanned) != 4 {
		t.Errorf("policies for %v", peersPlanned)
	}
	for _, s := range d.States {
		if s.Peer == "c1/missingkey" && s.Dir == DirIn && s.Index == 7 {
			t.Errorf("in state for a key not in the file: %s", s)
		}
	}
	checkInvariants(t, keys, local, d)
}

// TestPlanLocalKeyMissing: the local node's index is not in the key file:
// no out states, but in states and policies.
func TestPlanLocalKeyMissing(t *testing.T) {
	keys := testKeys(t)
	local := node("c1/a", "10.0.0.1", 5, "10.1.0.0/24")
	d := Plan(local, []Node{node("c1/b", "10.0.0.2", 1, "10.2.0.0/24")}, keys, PlanOptions{})
	if len(d.Problems) != 1 || !strings.Contains(d.Problems[0].Error(), "key index 5 is not in") {
		t.Errorf("problems %v", d.Problems)
	}
	checkSummary(t, d, []string{
		"state in 10.0.0.2>10.0.0.1 idx 1 peer c1/b",
		"state in 10.0.0.2>10.0.0.1 idx 15 peer c1/b",
		"policy out 10.1.0.0/24>10.2.0.0/24 tmpl 10.0.0.1>10.0.0.2 peer c1/b",
		"policy in 10.2.0.0/24>10.1.0.0/24 tmpl 10.0.0.2>10.0.0.1 peer c1/b",
		"policy fwd 10.2.0.0/24>10.1.0.0/24 tmpl 10.0.0.2>10.0.0.1 peer c1/b",
	})
}

// TestPlanSPICollision: two peers whose in SPIs collide at the local node
// cannot both be accepted; the later one (by name) is refused and
// reported. The collision is forced by searching names.
func TestPlanSPICollision(t *testing.T) {
	keys, err := NewKeys(map[uint8][]byte{1: testKeys(t).psk[1]})
	if err != nil {
		t.Fatal(err)
	}
	// Find two peer names whose SPIs towards "l" collide in 16 of the 28
	// bits... a full collision needs ~2^14 names: search.
	seen := map[uint32]string{}
	var p1, p2 string
	for i := 0; p2 == ""; i++ {
		name := fmt.Sprintf("p%d", i)
		k, err := keys.Derive(name, "l", 1)
		if err != nil {
			t.Fatal(err)
		}
		if other, ok := seen[k.SPI]; ok {
			p1, p2 = other, name
		}
		seen[k.SPI] = name
		if i > 1<<20 {
			t.Fatal("no collision found")
		}
	}
	local := node("l", "10.0.0.1", 1, "10.1.0.0/24")
	a, b := node(p1, "10.0.0.2", 1, "10.2.0.0/24"), node(p2, "10.0.0.3", 1, "10.3.0.0/24")
	first, second := p1, p2
	if second < first {
		first, second = second, first
	}
	d := Plan(local, []Node{a, b}, keys, PlanOptions{})
	if len(d.Problems) != 1 || !strings.Contains(d.Problems[0].Error(), fmt.Sprintf("peer %q: SPI", second)) {
		t.Fatalf("problems %v, want the SPI collision of %s", d.Problems, second)
	}
	for _, s := range d.States {
		if s.Dir == DirIn && s.Peer == second {
			t.Errorf("in state of the colliding peer planned: %s", s)
		}
	}
	if err := checkDesired(d); err != nil {
		t.Error(err)
	}
}
