package ipsec

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// fakeKernel keeps states and policies under the kernel's identities, so
// that the Manager's diff can be tested with states where the kernel has
// no ESP. refuse, when set, answers a state add as a kernel without some
// feature would.
type fakeKernel struct {
	sas       map[fakeSAID]sa
	pols      map[fakePolicyID]policy
	nextIndex uint32
	refuse    func(sa) error
	ops       []string // "add sa …", "del policy …" in order
}

type fakeSAID struct {
	dst   netip.Addr
	spi   uint32
	proto uint8
}

type fakePolicyID struct {
	dir      uint8
	src, dst netip.Prefix
	mark     [2]uint32
	ifID     uint32
	ptype    uint8
}

func newFakeKernel() *fakeKernel {
	return &fakeKernel{sas: map[fakeSAID]sa{}, pols: map[fakePolicyID]policy{}}
}

func saID(s sa) fakeSAID { return fakeSAID{s.dst, s.spi, s.proto} }

func polID(p policy) fakePolicyID {
	id := fakePolicyID{dir: p.dir, src: p.src, dst: p.dst, ifID: p.ifID, ptype: p.ptype}
	if p.mark != nil {
		id.mark = *p.mark
	}
	return id
}

func (f *fakeKernel) listSAs() ([]sa, error) {
	var out []sa
	for _, s := range f.sas {
		out = append(out, s)
	}
	return out, nil
}

func (f *fakeKernel) listPolicies() ([]policy, error) {
	var out []policy
	for _, p := range f.pols {
		out = append(out, p)
	}
	return out, nil
}

func (f *fakeKernel) addSA(s sa) error {
	if f.refuse != nil {
		if err := f.refuse(s); err != nil {
			return err
		}
	}
	if _, ok := f.sas[saID(s)]; ok {
		return unix.EEXIST
	}
	f.sas[saID(s)] = s
	f.ops = append(f.ops, fmt.Sprintf("add sa %s %#x", s.dst, s.spi))
	return nil
}

func (f *fakeKernel) delSA(s sa) error {
	if _, ok := f.sas[saID(s)]; !ok {
		return unix.ESRCH
	}
	delete(f.sas, saID(s))
	f.ops = append(f.ops, fmt.Sprintf("del sa %s %#x", s.dst, s.spi))
	return nil
}

func (f *fakeKernel) addPolicy(p policy) error {
	if _, ok := f.pols[polID(p)]; ok {
		return unix.EEXIST
	}
	return f.updatePolicy(p)
}

func (f *fakeKernel) updatePolicy(p policy) error {
	f.nextIndex += 8
	p.index = f.nextIndex | uint32(p.dir)
	f.pols[polID(p)] = p
	f.ops = append(f.ops, fmt.Sprintf("set policy %d %s %s", p.dir, p.src, p.dst))
	return nil
}

func (f *fakeKernel) delPolicy(p policy) error {
	for id, have := range f.pols {
		if p.index != 0 && have.index == p.index || p.index == 0 && id == polID(p) {
			delete(f.pols, id)
			f.ops = append(f.ops, fmt.Sprintf("del policy %d %s %s", p.dir, p.src, p.dst))
			return nil
		}
	}
	return unix.ENOENT
}

func (f *fakeKernel) close() {}

func fakeManager(t *testing.T, f *fakeKernel) *Manager {
	return &Manager{log: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})), x: f}
}

// checkFake compares the fake's states and policies with d's.
func checkFake(t *testing.T, f *fakeKernel, d Desired) {
	t.Helper()
	var got, want []string
	for _, s := range f.sas {
		if IsOwnerReqid(s.reqid) {
			got = append(got, fmt.Sprintf("sa %s>%s %#x %x", s.src, s.dst, s.spi, s.aead.key))
		}
	}
	for _, s := range d.States {
		want = append(want, fmt.Sprintf("sa %s>%s %#x %x", s.Src, s.Dst, s.SPI, s.Key))
	}
	for _, p := range f.pols {
		if p.owned() {
			got = append(got, fmt.Sprintf("policy %d %s>%s %s>%s", p.dir, p.src, p.dst, p.tmpls[0].src, p.tmpls[0].dst))
		}
	}
	for _, p := range d.Policies {
		want = append(want, fmt.Sprintf("policy %d %s>%s %s>%s", kernelDir(p.Dir), p.Src, p.Dst, p.TmplSrc, p.TmplDst))
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("kernel:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

func applyOK(t *testing.T, m *Manager, d Desired, writes uint64) {
	t.Helper()
	if err := m.Apply(context.Background(), d); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if w := m.Stats().LastWrites; w != writes {
		t.Errorf("Apply wrote %d times, want %d", w, writes)
	}
}

// addsBeforeDeletes checks that in ops, no delete comes before an add.
func addsBeforeDeletes(t *testing.T, ops []string) {
	t.Helper()
	seenDel := false
	for _, op := range ops {
		switch {
		case strings.HasPrefix(op, "del"):
			seenDel = true
		case seenDel:
			t.Errorf("%q after a delete: %v", op, ops)
			return
		}
	}
}

func TestManagerStatesConverge(t *testing.T) {
	f := newFakeKernel()
	m := fakeManager(t, f)
	keys := testKeys(t)
	local, peers := testTopology() // a (index 2), b (2), c (1), plain
	d := Plan(local, peers, keys, PlanOptions{})
	if len(d.States) != 7 || len(d.Policies) != 9 {
		t.Fatalf("plan: %d states, %d policies", len(d.States), len(d.Policies))
	}
	applyOK(t, m, d, 16)
	checkFake(t, f, d)
	applyOK(t, m, d, 0)

	// The order of the Desired does not matter.
	r := rand.New(rand.NewPCG(1, 2))
	for range 5 {
		shuffled := Desired{States: slices.Clone(d.States), Policies: slices.Clone(d.Policies)}
		r.Shuffle(len(shuffled.States), func(i, j int) { shuffled.States[i], shuffled.States[j] = shuffled.States[j], shuffled.States[i] })
		r.Shuffle(len(shuffled.Policies), func(i, j int) {
			shuffled.Policies[i], shuffled.Policies[j] = shuffled.Policies[j], shuffled.Policies[i]
		})
		applyOK(t, m, shuffled, 0)
	}

	// Rotation: a moves to 15, accepting 2 for the grace period. New out
	// states to b and c, then the old ones go; in states unchanged (15 was
	// accepted already, as the key file's current index).
	local.KeyIndex = 15
	f.ops = nil
	d = Plan(local, peers, keys, PlanOptions{Accept: []uint8{2}})
	applyOK(t, m, d, 4)
	checkFake(t, f, d)
	addsBeforeDeletes(t, f.ops)
	// Grace over: c's state of index 2 goes; b still publishes 2, so its
	// index 2 stays accepted.
	d = Plan(local, peers, keys, PlanOptions{})
	applyOK(t, m, d, 1)
	checkFake(t, f, d)
	// b moves to 15 too.
	peers[0].KeyIndex = 15
	d = Plan(local, peers, keys, PlanOptions{})
	applyOK(t, m, d, 1)
	checkFake(t, f, d)

	// A state whose key changed behind the Manager's back is replaced.
	for id, s := range f.sas {
		s.aead = &algo{name: s.aead.name, key: make([]byte, AEADKeyBytes), bits: s.aead.bits}
		f.sas[id] = s
		break
	}
	applyOK(t, m, d, 2)
	checkFake(t, f, d)

	// A peer goes: its states and policies go, policies first.
	f.ops = nil
	d = Plan(local, peers[:1], keys, PlanOptions{})
	applyOK(t, m, d, 6) // c's out state, in states of 1 and 15, 3 policies
	checkFake(t, f, d)
	if len(f.ops) != 6 || !strings.HasPrefix(f.ops[2], "del policy") || !strings.HasPrefix(f.ops[3], "del sa") {
		t.Errorf("removing a peer: %v, want its policies deleted before its states", f.ops)
	}
}

// TestManagerOwnership: other owners' objects are left alone and reported
// when they hold a desired place; Trellis's objects of shapes Apply never
// makes are deleted; Cleanup removes every Trellis object and only those.
func TestManagerOwnership(t *testing.T) {
	f := newFakeKernel()
	m := fakeManager(t, f)
	keys := testKeys(t)
	local, peers := testTopology()
	d := Plan(local, peers, keys, PlanOptions{})

	// Another owner's ESP state at the place of a desired in state.
	var in State
	for _, s := range d.States {
		if s.Dir == DirIn {
			in = s
			break
		}
	}
	foreign := sa{src: in.Src, dst: in.Dst, spi: in.SPI, reqid: 1, proto: protoESP, mode: modeTunnel, aead: &algo{name: AEADAlgorithm, key: make([]byte, AEADKeyBytes), bits: 128}}
	f.sas[saID(foreign)] = foreign
	// Another owner's state and policy elsewhere.
	other := foreign
	other.spi, other.reqid = 0x99, 7
	f.sas[saID(other)] = other
	f.pols[polID(policy{dir: policyOut, src: netip.MustParsePrefix("10.91.0.0/24"), dst: netip.MustParsePrefix("10.92.0.0/24")})] =
		policy{dir: policyOut, src: netip.MustParsePrefix("10.91.0.0/24"), dst: netip.MustParsePrefix("10.92.0.0/24"), index: 1000,
			tmpls: []tmpl{{src: in.Dst, dst: netip.MustParseAddr("192.168.50.9"), reqid: 7, proto: protoESP, mode: modeTunnel}}}
	// Trellis's leftovers of shapes Apply never makes: an AH state, and a
	// policy with a mark.
	ah := sa{src: in.Dst, dst: in.Src, spi: 0x77, reqid: OwnerReqidBase | 9, proto: unix.IPPROTO_AH, mode: modeTunnel}
	f.sas[saID(ah)] = ah
	marked := policy{dir: policyIn, src: netip.MustParsePrefix("10.93.0.0/24"), dst: netip.MustParsePrefix("10.94.0.0/24"), index: 2000, mark: &[2]uint32{1, 1},
		tmpls: []tmpl{{src: in.Src, dst: in.Dst, reqid: Reqid, proto: protoESP, mode: modeTunnel}}}
	f.pols[polID(marked)] = marked

	installed, err := m.Installed(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if installed.Other != 2 || installed.Foreign != 3 {
		t.Errorf("installed: %d other, %d foreign; want 2, 3", installed.Other, installed.Foreign)
	}

	err = m.Apply(context.Background(), d)
	if err == nil || !strings.Contains(err.Error(), "another owner's state") || strings.Count(err.Error(), "ipsec:") != 1 {
		t.Errorf("Apply over a foreign state: %v", err)
	}
	if s := f.sas[saID(foreign)]; s.reqid != 1 {
		t.Error("the foreign state was changed")
	}
	if _, ok := f.sas[saID(ah)]; ok {
		t.Error("Trellis's AH leftover is still there")
	}
	if _, ok := f.pols[polID(marked)]; ok {
		t.Error("Trellis's marked leftover policy is still there")
	}
	if m.Stats().Errors != 1 {
		t.Errorf("stats %+v", m.Stats())
	}

	if err := m.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(f.sas) != 2 || len(f.pols) != 1 {
		t.Errorf("after Cleanup: %d states, %d policies; want the 2 and 1 foreign", len(f.sas), len(f.pols))
	}
	for _, s := range f.sas {
		if IsOwnerReqid(s.reqid) {
			t.Errorf("Trellis state left: %+v", s)
		}
	}
}

// TestManagerRefusesBadDesired: Apply writes nothing for a Desired it
// could not find again (reqid outside the range) or that is inconsistent.
func TestManagerRefusesBadDesired(t *testing.T) {
	f := newFakeKernel()
	m := fakeManager(t, f)
	keys := testKeys(t)
	local, peers := testTopology()
	good := Plan(local, peers, keys, PlanOptions{})
	for name, mutate := range map[string]func(*Desired){
		"state reqid":  func(d *Desired) { d.States[0].Reqid = 1 },
		"policy reqid": func(d *Desired) { d.Policies[0].Reqid = 1 },
		"short key":    func(d *Desired) { d.States[0].Key = d.States[0].Key[:16] },
		"dup state":    func(d *Desired) { d.States = append(d.States, d.States[0]) },
		"dup policy":   func(d *Desired) { d.Policies = append(d.Policies, d.Policies[0]) },
		"unmasked":     func(d *Desired) { d.Policies[0].Src = netip.MustParsePrefix("10.1.0.1/24") },
		"mixed family": func(d *Desired) { d.Policies[0].TmplDst = netip.MustParseAddr("fd00::1") },
		"no direction": func(d *Desired) { d.Policies[0].Dir = 0 },
	} {
		d := Desired{States: slices.Clone(good.States), Policies: slices.Clone(good.Policies)}
		mutate(&d)
		if err := m.Apply(context.Background(), d); err == nil {
			t.Errorf("%s: Apply accepted it", name)
		}
		if len(f.ops) != 0 {
			t.Errorf("%s: Apply wrote %v", name, f.ops)
		}
	}
}

// thisKernel answers state adds as the development VM's kernel does: no
// GCM (ENOSYS), and no ESP for the algorithms it has (EPROTONOSUPPORT).
func thisKernel(s sa) error {
	if s.aead != nil {
		return unix.ENOSYS
	}
	return unix.EPROTONOSUPPORT
}

func features(err error) []string {
	var u *UnsupportedError
	if !errors.As(err, &u) {
		return nil
	}
	var out []string
	for _, m := range u.Missing {
		out = append(out, m.Feature)
	}
	return out
}

func TestCheckKernelClassifies(t *testing.T) {
	for _, tc := range []struct {
		name   string
		refuse func(sa) error
		want   []string // missing features; nil: supported
		other  bool     // a plain error
	}{
		{"full support", nil, nil, false},
		{"this VM", thisKernel, []string{featureGCM, featureESP4, featureESP6}, false},
		{"ESP without GCM", func(s sa) error {
			if s.aead != nil {
				return unix.ENOSYS
			}
			return nil
		}, []string{featureGCM}, false},
		{"GCM without ESP", func(sa) error { return unix.EPROTONOSUPPORT }, []string{featureESP4, featureESP6}, false},
		{"no IPv6 ESP", func(s sa) error {
			if s.dst.Is6() {
				return unix.EPROTONOSUPPORT
			}
			return nil
		}, []string{featureESP6}, false},
		{"no IPv6 at all", func(s sa) error {
			if s.dst.Is6() {
				return unix.EAFNOSUPPORT
			}
			return nil
		}, nil, false},
		{"no seqiv", func(s sa) error {
			if s.aead != nil {
				return unix.ENOENT
			}
			return nil
		}, []string{featureGCM}, false},
		{"nothing to ask with", func(s sa) error { return unix.ENOSYS }, []string{featureGCM}, false},
		{"no permission", func(sa) error { return unix.EPERM }, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeKernel()
			f.refuse = tc.refuse
			err := checkKernel(f)
			switch {
			case tc.other:
				if err == nil || errors.Is(err, ErrNotSupported) {
					t.Errorf("checkKernel: %v, want a plain error", err)
				}
			case tc.want == nil:
				if err != nil {
					t.Errorf("checkKernel: %v", err)
				}
			default:
				if !errors.Is(err, ErrNotSupported) || !slices.Equal(features(err), tc.want) {
					t.Errorf("checkKernel: %v, want the features %v", err, tc.want)
				}
			}
			if len(f.sas) != 0 {
				t.Errorf("the check left %d states", len(f.sas))
			}
		})
	}
}

// TestManagerWithoutESP: on a kernel like this VM's, Apply installs the
// policies, reports the states with one error naming everything missing,
// and tries them again on the next Apply.
func TestManagerWithoutESP(t *testing.T) {
	f := newFakeKernel()
	f.refuse = thisKernel
	m := fakeManager(t, f)
	local, peers := testTopology()
	d := Plan(local, peers, testKeys(t), PlanOptions{})
	err := m.Apply(context.Background(), d)
	if !errors.Is(err, ErrNotSupported) || !slices.Equal(features(err), []string{featureGCM, featureESP4, featureESP6}) {
		t.Fatalf("Apply: %v", err)
	}
	if !strings.Contains(err.Error(), "7 of 7 states not installed") {
		t.Errorf("Apply: %v", err)
	}
	checkFake(t, f, Desired{Policies: d.Policies})
	if w := m.Stats().LastWrites; w != 16 {
		t.Errorf("wrote %d times, want 16 (7 refused states, 9 policies)", w)
	}
	if err := m.Apply(context.Background(), d); !errors.Is(err, ErrNotSupported) || m.Stats().LastWrites != 7 {
		t.Errorf("second Apply: %v, %d writes; want the 7 states tried again", err, m.Stats().LastWrites)
	}
}
