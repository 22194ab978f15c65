package strict

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func pfxs(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, pfx(s))
	}
	return out
}

func TestNormalize(t *testing.T) {
	v4, v6, err := normalize(pfxs(
		"10.1.2.5/24", "10.1.2.0/24", // masked, then merged
		"fd00:1:2::7/64",
		"::ffff:10.9.0.0/112", // IPv4-mapped: the IPv4 prefix 10.9.0.0/16
		"::ffff:0:0/95",       // too short to map: stays IPv6
		"0.0.0.0/0",
	))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(v4), "[0.0.0.0/0 10.1.2.0/24 10.9.0.0/16]"; got != want {
		t.Errorf("v4 %s, want %s", got, want)
	}
	if got, want := fmt.Sprint(v6), "[::fffe:0:0/95 fd00:1:2::/64]"; got != want {
		t.Errorf("v6 %s, want %s", got, want)
	}
	if _, _, err := normalize([]netip.Prefix{pfx("10.0.0.0/8"), {}}); err == nil || !strings.Contains(err.Error(), "invalid prefixes") {
		t.Errorf("zero prefix: err %v, want invalid prefixes", err)
	}
}

func TestOverlapsAny(t *testing.T) {
	sorted := sortPrefixes(pfxs("10.1.0.0/16", "10.3.4.0/24", "192.168.0.0/24"))
	for p, want := range map[string]bool{
		"10.0.0.0/8":       true, // holds 10.1.0.0/16
		"10.1.2.0/24":      true, // inside 10.1.0.0/16
		"10.1.0.0/16":      true, // equal
		"10.3.0.0/16":      true, // holds 10.3.4.0/24
		"10.3.5.0/24":      false,
		"10.2.0.0/16":      false,
		"0.0.0.0/0":        true,
		"192.168.1.0/24":   false,
		"192.168.0.128/25": true,
	} {
		if got := overlapsAny(pfx(p), sorted); got != want {
			t.Errorf("overlapsAny(%s) = %t, want %t", p, got, want)
		}
	}
	if overlapsAny(pfx("10.0.0.0/8"), nil) {
		t.Error("overlapsAny of an empty list")
	}
}

func TestMakePlan(t *testing.T) {
	have := func(ss ...string) map[netip.Prefix]uint32 {
		m := map[netip.Prefix]uint32{}
		for _, s := range ss {
			m[pfx(s)] = valueMember
		}
		return m
	}
	// Room enough: every stale prefix goes last.
	p, err := makePlan("m", have("10.1.0.0/24", "10.2.0.0/24"), pfxs("10.1.0.0/23"), 4)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(p.early, p.put, p.late) != "[] [10.1.0.0/23] [10.1.0.0/24 10.2.0.0/24]" {
		t.Errorf("plan %v %v %v", p.early, p.put, p.late)
	}
	// Full map: the stale prefix that overlaps nothing wanted makes room
	// first; the one the new /23 holds still goes last.
	p, err = makePlan("m", have("10.1.0.0/24", "10.2.0.0/24"), pfxs("10.1.0.0/23"), 2)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(p.early, p.put, p.late) != "[10.2.0.0/24] [10.1.0.0/23] [10.1.0.0/24]" {
		t.Errorf("full map plan %v %v %v", p.early, p.put, p.late)
	}
	// A peak that only fits by opening a gap is refused.
	_, err = makePlan("m", have("10.1.0.0/24", "10.1.1.0/24"), pfxs("10.1.0.0/23", "10.3.0.0/24"), 3)
	if !errors.Is(err, ErrMapFull) || !strings.Contains(err.Error(), "m:") {
		t.Errorf("peak too high: err %v, want ErrMapFull naming the map", err)
	}
	// More wanted than room.
	_, err = makePlan("m", nil, pfxs("10.1.0.0/24", "10.2.0.0/24"), 1)
	if !errors.Is(err, ErrMapFull) {
		t.Errorf("too many: err %v, want ErrMapFull", err)
	}
	// A wrong value is rewritten; a converged map needs nothing.
	h := have("10.1.0.0/24")
	h[pfx("10.1.0.0/24")] = 7
	if p, _ := makePlan("m", h, pfxs("10.1.0.0/24"), 4); fmt.Sprint(p.put) != "[10.1.0.0/24]" {
		t.Errorf("wrong value: put %v", p.put)
	}
	if p, _ := makePlan("m", have("10.1.0.0/24"), pfxs("10.1.0.0/24"), 4); p.writes() != 0 {
		t.Errorf("converged map: %d writes", p.writes())
	}
}

// fakeLPM is an lpmMap in memory that records its writes and can fail a
// put.
type fakeLPM struct {
	name    string
	cap     int
	m       map[netip.Prefix]uint32
	ops     []string
	failPut netip.Prefix
}

func newFake(name string, capacity int) *fakeLPM {
	return &fakeLPM{name: name, cap: capacity, m: map[netip.Prefix]uint32{}}
}

func (f *fakeLPM) mapName() string { return f.name }
func (f *fakeLPM) capacity() int   { return f.cap }
func (f *fakeLPM) entries() (map[netip.Prefix]uint32, error) {
	return maps.Clone(f.m), nil
}

func (f *fakeLPM) put(p netip.Prefix) error {
	f.ops = append(f.ops, "put "+p.String())
	if p == f.failPut {
		return fmt.Errorf("put %s: injected failure", p)
	}
	if _, ok := f.m[p]; !ok && len(f.m) >= f.cap {
		return fmt.Errorf("put %s: E2BIG", p)
	}
	f.m[p] = valueMember
	return nil
}

func (f *fakeLPM) delete(p netip.Prefix) error {
	f.ops = append(f.ops, "del "+p.String())
	delete(f.m, p)
	return nil
}

func (f *fakeLPM) sorted() []netip.Prefix { return sortPrefixes(slices.Collect(maps.Keys(f.m))) }

// covered reports whether a is inside a prefix of f.
func (f *fakeLPM) covered(a netip.Addr) bool {
	for p := range f.m {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// TestConvergeStates applies a table of desired states in random order to
// fake maps and checks, after each, that the maps hold exactly the state,
// that converging again writes nothing, and that no address both states
// drop was ever let through in between.
func TestConvergeStates(t *testing.T) {
	states := [][]netip.Prefix{
		nil,
		pfxs("10.1.1.0/24"),
		pfxs("10.1.1.0/24", "10.1.2.0/24", "fd00:1:2::/64"),
		pfxs("10.1.0.0/23", "fd00:1::/48"), // holds the earlier ones
		pfxs("10.1.2.0/24", "10.2.0.0/16", "fd00:1:2::/64", "fd00:2::/64"),
		pfxs("0.0.0.0/0"),
		pfxs("10.1.1.7/24", "10.1.1.0/24", "fd00:1:2::1/64"), // unmasked, duplicates
	}
	probes := []netip.Addr{
		netip.MustParseAddr("10.1.1.10"), netip.MustParseAddr("10.1.2.10"), netip.MustParseAddr("10.2.3.4"),
		netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("fd00:1:2::10"), netip.MustParseAddr("fd00:1:3::1"),
		netip.MustParseAddr("fd00:2::1"),
	}
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 1))
		v4, v6 := newFake("v4", 16), newFake("v6", 16)
		lpms := []lpmMap{v4, v6}
		prev := []netip.Prefix(nil)
		for _, i := range rng.Perm(len(states)) {
			want := states[i]
			w4, w6, err := normalize(want)
			if err != nil {
				t.Fatal(err)
			}
			// Addresses both the previous and this state drop.
			var both []netip.Addr
			for _, a := range probes {
				if containsAddr(prev, a) && containsAddr(want, a) {
					both = append(both, a)
				}
			}
			// Check the invariant after every write.
			checker := &checkingLPM{t: t, fakes: []*fakeLPM{v4, v6}, both: both}
			wrapped := []lpmMap{&checkedLPM{v4, checker}, &checkedLPM{v6, checker}}
			if _, err := converge(context.Background(), wrapped, [][]netip.Prefix{w4, w6}); err != nil {
				t.Fatalf("seed %d state %d: %v", seed, i, err)
			}
			if got := fmt.Sprint(v4.sorted(), v6.sorted()); got != fmt.Sprint(w4, w6) {
				t.Fatalf("seed %d state %d: maps %s, want %s", seed, i, got, fmt.Sprint(w4, w6))
			}
			if n, err := converge(context.Background(), lpms, [][]netip.Prefix{w4, w6}); n != 0 || err != nil {
				t.Fatalf("seed %d state %d: converging again: %d writes, %v", seed, i, n, err)
			}
			prev = want
		}
	}
}

func containsAddr(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// checkingLPM checks after each write that every address in both is still
// covered.
type checkingLPM struct {
	t     *testing.T
	fakes []*fakeLPM
	both  []netip.Addr
}

func (c *checkingLPM) check(op string) {
	for _, a := range c.both {
		if !c.fakes[0].covered(a) && !c.fakes[1].covered(a) {
			c.t.Fatalf("after %s, %s is no longer dropped though both states drop it", op, a)
		}
	}
}

type checkedLPM struct {
	*fakeLPM
	c *checkingLPM
}

func (m *checkedLPM) put(p netip.Prefix) error {
	err := m.fakeLPM.put(p)
	m.c.check("put " + p.String())
	return err
}

func (m *checkedLPM) delete(p netip.Prefix) error {
	err := m.fakeLPM.delete(p)
	m.c.check("delete " + p.String())
	return err
}

func TestConvergeRepairsDrift(t *testing.T) {
	v4, v6 := newFake("v4", 8), newFake("v6", 8)
	lpms := []lpmMap{v4, v6}
	want := [][]netip.Prefix{pfxs("10.1.1.0/24", "10.1.2.0/24"), pfxs("fd00:1:2::/64")}
	if n, err := converge(context.Background(), lpms, want); n != 3 || err != nil {
		t.Fatalf("first converge: %d writes, %v; want 3", n, err)
	}
	// Someone deletes one entry, adds another, and changes a value.
	delete(v4.m, pfx("10.1.2.0/24"))
	v4.m[pfx("10.7.0.0/16")] = valueMember
	v6.m[pfx("fd00:1:2::/64")] = 9
	v4.ops, v6.ops = nil, nil
	if n, err := converge(context.Background(), lpms, want); n != 3 || err != nil {
		t.Fatalf("repair: %d writes, %v; want 3", n, err)
	}
	if got := fmt.Sprint(v4.ops, v6.ops); got != "[put 10.1.2.0/24 del 10.7.0.0/16] [put fd00:1:2::/64]" {
		t.Errorf("repair ops %s", got)
	}
}

func TestConvergeFailedPutKeepsStale(t *testing.T) {
	v4, v6 := newFake("v4", 8), newFake("v6", 8)
	lpms := []lpmMap{v4, v6}
	if _, err := converge(context.Background(), lpms, [][]netip.Prefix{pfxs("10.1.1.0/24"), nil}); err != nil {
		t.Fatal(err)
	}
	v4.failPut = pfx("10.1.0.0/23")
	_, err := converge(context.Background(), lpms, [][]netip.Prefix{pfxs("10.1.0.0/23"), nil})
	if err == nil || !strings.Contains(err.Error(), "injected failure") {
		t.Fatalf("err %v, want the put's failure", err)
	}
	if _, ok := v4.m[pfx("10.1.1.0/24")]; !ok {
		t.Error("the /24 being replaced was deleted although its replacement failed")
	}
}

func TestConvergeRefusesWhole(t *testing.T) {
	v4, v6 := newFake("trellis_strict4", 8), newFake("trellis_strict6", 1)
	_, err := converge(context.Background(), []lpmMap{v4, v6}, [][]netip.Prefix{pfxs("10.1.1.0/24"), pfxs("fd00:1::/64", "fd00:2::/64")})
	if !errors.Is(err, ErrMapFull) || !strings.Contains(err.Error(), "trellis_strict6") {
		t.Fatalf("err %v, want ErrMapFull naming trellis_strict6", err)
	}
	if len(v4.ops)+len(v6.ops) != 0 {
		t.Errorf("a refused set wrote %v %v", v4.ops, v6.ops)
	}
}
