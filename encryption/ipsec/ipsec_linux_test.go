package ipsec

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/trellis-mesh/trellis/internal/privtest"
)

// testNS makes a fresh namespace with a veth carrying the local node's
// underlay addresses. Everything the tests install lives in it and goes
// with it.
func testNS(t *testing.T) netns.NsHandle {
	t.Helper()
	privtest.RequireRoot(t)
	ns, _ := privtest.NewNetNSWithPrefix(t, "trellis-ipsec")
	privtest.AddVeth(t, ns, privtest.UniqueShortName("ips"),
		netip.MustParsePrefix("192.168.50.1/24"), netip.MustParsePrefix("fd50::1/64"))
	return ns
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func openManager(t *testing.T, ns netns.NsHandle) *Manager {
	t.Helper()
	m, err := Open(Config{NetNS: ns, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// libCounts counts, through vishvananda/netlink's own API (not this
// package's decoding), the namespace's states and policies whose reqid is
// Trellis's, and all of them.
func libCounts(t *testing.T, ns netns.NsHandle) (ownStates, ownPolicies, allStates, allPolicies int) {
	t.Helper()
	h := privtest.NetlinkHandle(t, ns)
	states, err := h.XfrmStateList(netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range states {
		if IsOwnerReqid(uint32(s.Reqid)) {
			ownStates++
		}
	}
	pols, err := h.XfrmPolicyList(netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pols {
		if len(p.Tmpls) > 0 && IsOwnerReqid(uint32(p.Tmpls[0].Reqid)) {
			ownPolicies++
		}
	}
	return ownStates, ownPolicies, len(states), len(pols)
}

// TestNewOnThisKernel: New either succeeds (the kernel has ESP and GCM)
// or fails with the typed reason, which must be true to the kernel's
// configuration where that is readable. Either way the check leaves no
// state behind.
func TestNewOnThisKernel(t *testing.T) {
	ns := testNS(t)
	m, err := New(Config{NetNS: ns, Logger: testLogger(t)})
	if err == nil {
		m.Close()
		t.Log("this kernel has ESP and rfc4106(gcm(aes))")
	} else {
		var u *UnsupportedError
		if !errors.Is(err, ErrNotSupported) || !errors.Is(err, errors.ErrUnsupported) || !errors.As(err, &u) {
			t.Fatalf("New: %v, want an *UnsupportedError matching ErrNotSupported", err)
		}
		t.Logf("New: %v", err)
		if len(u.Missing) == 0 {
			t.Fatal("no missing feature named")
		}
		for _, mf := range u.Missing {
			if len(mf.Options) == 0 || mf.Feature == "" {
				t.Errorf("missing feature without options: %+v", mf)
			}
			if !errors.Is(mf.Err, unix.ENOSYS) && !errors.Is(mf.Err, unix.EPROTONOSUPPORT) && !errors.Is(mf.Err, unix.ENOENT) {
				t.Errorf("%s: kernel answer %v is not one the check classifies", mf.Feature, mf.Err)
			}
		}
		msg := err.Error()
		for _, o := range u.Options() {
			if !strings.Contains(msg, o) {
				t.Errorf("error does not name %s: %s", o, msg)
			}
		}
		if !strings.Contains(msg, "--type wireguard") {
			t.Errorf("error gives no hint: %s", msg)
		}
		if cfg := readKernelConfig(); cfg != nil {
			// Truthful: nothing reported that the kernel has built in...
			for _, o := range u.Options() {
				if cfg[o] == "y" {
					t.Errorf("reported %s missing, but the kernel has %s=y", o, o)
				}
			}
			// ...and complete for what Trellis needs.
			for _, o := range []string{"CONFIG_INET_ESP", "CONFIG_INET6_ESP", "CONFIG_CRYPTO_GCM"} {
				if cfg[o] == "" && !slices.Contains(u.Options(), o) {
					t.Errorf("the kernel has no %s, but the error does not say so: %v", o, u.Options())
				}
			}
		} else {
			t.Log("no /proc/config.gz: the reported options are not checked against the configuration")
		}
		// CheckKernel alone says the same.
		var u2 *UnsupportedError
		if err := CheckKernel(ns); !errors.As(err, &u2) || !slices.Equal(u2.Options(), u.Options()) {
			t.Errorf("CheckKernel: %v, want the options %v", err, u.Options())
		}
	}
	if s, p, all, allp := libCounts(t, ns); s+p+all+allp != 0 {
		t.Errorf("the kernel check left %d states and %d policies", all, allp)
	}
}

// testTopology is the local node a with two peers, dual-stack pods over
// an IPv4 underlay, plus a peer without IPsec.
func testTopology() (Node, []Node) {
	a := node("c1/a", "192.168.50.1", 2, "10.1.0.0/24", "fd01::/64")
	return a, []Node{
		node("c1/b", "192.168.50.2", 2, "10.2.0.0/24", "fd02::/64"),
		node("c2/c", "192.168.50.3", 1, "10.3.0.0/24"),
		node("c2/plain", "192.168.50.4", 0, "10.4.0.0/24"),
	}
}

func checkPolicies(t *testing.T, m *Manager, want []Policy, foreign int) {
	t.Helper()
	in, err := m.Installed(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want = slices.Clone(want)
	for i := range want {
		want[i].Peer = ""
	}
	slices.SortFunc(want, func(a, b Policy) int {
		if c := int(a.Dir) - int(b.Dir); c != 0 {
			return c
		}
		if c := comparePrefix(a.Src, b.Src); c != 0 {
			return c
		}
		return comparePrefix(a.Dst, b.Dst)
	})
	if !slices.Equal(in.Policies, want) {
		t.Errorf("kernel policies:\n  %v\nwant:\n  %v", in.Policies, want)
	}
	if in.Other != 0 || in.Foreign != foreign {
		t.Errorf("installed: %d other, %d foreign; want 0, %d", in.Other, in.Foreign, foreign)
	}
}

// addForeignPolicy installs a policy of another owner (reqid 5), which
// Apply and Cleanup must leave alone.
func addForeignPolicy(t *testing.T, ns netns.NsHandle, reqid int, mark *netlink.XfrmMark) {
	t.Helper()
	h := privtest.NetlinkHandle(t, ns)
	_, src, _ := net.ParseCIDR("10.91.0.0/24")
	_, dst, _ := net.ParseCIDR("10.92.0.0/24")
	p := &netlink.XfrmPolicy{Src: src, Dst: dst, Dir: netlink.XFRM_DIR_OUT, Mark: mark, Tmpls: []netlink.XfrmPolicyTmpl{{
		Src: net.ParseIP("192.168.50.1"), Dst: net.ParseIP("192.168.50.9"), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: reqid,
	}}}
	if err := h.XfrmPolicyAdd(p); err != nil {
		t.Fatalf("add policy reqid %#x: %v", reqid, err)
	}
}

// TestApplyPolicies installs what this kernel accepts of a plan: its
// policies (no ESP needed), and checks the convergence rules on them.
func TestApplyPolicies(t *testing.T) {
	ctx := context.Background()
	ns := testNS(t)
	keys := testKeys(t)
	local, peers := testTopology()
	d := Plan(local, peers, keys, PlanOptions{})
	if err := d.Err(); err != nil {
		t.Fatal(err)
	}
	// 2 pairs of CIDRs with b, 1 with c; 3 policies each.
	if len(d.Policies) != 9 {
		t.Fatalf("%d policies planned: %v", len(d.Policies), d.Policies)
	}
	addForeignPolicy(t, ns, 5, nil)

	m := openManager(t, ns)
	if err := m.Apply(ctx, Desired{Policies: d.Policies}); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if w := m.Stats().LastWrites; w != 9 {
		t.Errorf("first Apply wrote %d times, want 9", w)
	}
	checkPolicies(t, m, d.Policies, 1)
	if _, p, _, allp := libCounts(t, ns); p != 9 || allp != 10 {
		t.Errorf("netlink lists %d of Trellis's policies of %d, want 9 of 10", p, allp)
	}

	// Converged: nothing written.
	if err := m.Apply(ctx, Desired{Policies: d.Policies}); err != nil {
		t.Fatal(err)
	}
	if w := m.Stats().LastWrites; w != 0 {
		t.Errorf("second Apply wrote %d times, want 0", w)
	}

	// Drift: a policy deleted behind the Manager's back is put back.
	h := privtest.NetlinkHandle(t, ns)
	_, s, _ := net.ParseCIDR("10.1.0.0/24")
	_, dd, _ := net.ParseCIDR("10.2.0.0/24")
	if err := h.XfrmPolicyDel(&netlink.XfrmPolicy{Src: s, Dst: dd, Dir: netlink.XFRM_DIR_OUT}); err != nil {
		t.Fatal(err)
	}
	if err := m.Apply(ctx, Desired{Policies: d.Policies}); err != nil {
		t.Fatal(err)
	}
	if w := m.Stats().LastWrites; w != 1 {
		t.Errorf("repair wrote %d times, want 1", w)
	}
	checkPolicies(t, m, d.Policies, 1)

	// Peer b moved to another underlay IP: its 6 policies are updated in
	// place, nothing else is touched.
	peers[0].IP = netip.MustParseAddr("192.168.50.22")
	d = Plan(local, peers, keys, PlanOptions{})
	if err := m.Apply(ctx, Desired{Policies: d.Policies}); err != nil {
		t.Fatal(err)
	}
	if w := m.Stats().LastWrites; w != 6 {
		t.Errorf("moving b wrote %d times, want 6", w)
	}
	checkPolicies(t, m, d.Policies, 1)

	// Peer c goes: its 3 policies go.
	d = Plan(local, peers[:1], keys, PlanOptions{})
	if err := m.Apply(ctx, Desired{Policies: d.Policies}); err != nil {
		t.Fatal(err)
	}
	if w := m.Stats().LastWrites; w != 3 {
		t.Errorf("removing c wrote %d times, want 3", w)
	}
	checkPolicies(t, m, d.Policies, 1)

	// A policy in Trellis's reqid range of a shape Apply never makes (a
	// mark) is Trellis's leftover: Apply removes it.
	addForeignPolicy(t, ns, OwnerReqidBase|0x42, &netlink.XfrmMark{Value: 7, Mask: 0xff})
	if in, _ := m.Installed(ctx); in.Other != 1 {
		t.Errorf("odd Trellis policy not seen: %+v", in)
	}
	if err := m.Apply(ctx, Desired{Policies: d.Policies}); err != nil {
		t.Fatal(err)
	}
	if w := m.Stats().LastWrites; w != 1 {
		t.Errorf("removing the odd policy wrote %d times, want 1", w)
	}
	checkPolicies(t, m, d.Policies, 1)

	// One of Trellis's at a desired place but of another shape (two
	// templates, as another version might make) is updated in place.
	first := d.Policies[0]
	if first.Dir != DirOut || !first.Src.Addr().Is4() {
		t.Fatalf("first policy %s", first)
	}
	_, fs, _ := net.ParseCIDR(first.Src.String())
	_, fd, _ := net.ParseCIDR(first.Dst.String())
	if err := h.XfrmPolicyDel(&netlink.XfrmPolicy{Src: fs, Dst: fd, Dir: netlink.XFRM_DIR_OUT}); err != nil {
		t.Fatal(err)
	}
	tm := netlink.XfrmPolicyTmpl{Src: first.TmplSrc.AsSlice(), Dst: first.TmplDst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: Reqid}
	if err := h.XfrmPolicyAdd(&netlink.XfrmPolicy{Src: fs, Dst: fd, Dir: netlink.XFRM_DIR_OUT, Tmpls: []netlink.XfrmPolicyTmpl{tm, tm}}); err != nil {
		t.Fatal(err)
	}
	if err := m.Apply(ctx, Desired{Policies: d.Policies}); err != nil {
		t.Fatal(err)
	}
	if w := m.Stats().LastWrites; w != 1 {
		t.Errorf("reshaping a policy wrote %d times, want 1", w)
	}
	checkPolicies(t, m, d.Policies, 1)

	// A desired policy whose place another owner's holds is reported and
	// not overwritten.
	clash := d.Policies[0]
	clash.Src, clash.Dst = netip.MustParsePrefix("10.91.0.0/24"), netip.MustParsePrefix("10.92.0.0/24")
	err := m.Apply(ctx, Desired{Policies: append(slices.Clone(d.Policies), clash)})
	if err == nil || !strings.Contains(err.Error(), "another owner's policy") {
		t.Errorf("Apply over a foreign policy: %v", err)
	}
	if _, p, _, allp := libCounts(t, ns); p != len(d.Policies) || allp != len(d.Policies)+1 {
		t.Errorf("after the clash: %d of Trellis's policies of %d", p, allp)
	}

	// A restarted process (a new Manager) adopts what is there.
	m.Close()
	if err := m.Apply(ctx, d); !errors.Is(err, ErrClosed) {
		t.Errorf("Apply after Close: %v", err)
	}
	m2 := openManager(t, ns)
	if err := m2.Apply(ctx, Desired{Policies: d.Policies}); err != nil {
		t.Fatal(err)
	}
	if w := m2.Stats().LastWrites; w != 0 {
		t.Errorf("a new Manager rewrote %d objects", w)
	}

	// Cleanup leaves nothing of Trellis's, and the foreign policy.
	if err := m2.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	checkPolicies(t, m2, nil, 1)
	if s, p, all, allp := libCounts(t, ns); s+p+all != 0 || allp != 1 {
		t.Errorf("after Cleanup: %d states, %d of Trellis's policies, %d policies in all", all, p, allp)
	}
}

// TestApplyIPv6Underlay: an IPv6 underlay, and pod CIDRs whose last 12
// bytes are zero (which vishvananda/netlink v1.3.1 reads back as IPv4).
func TestApplyIPv6Underlay(t *testing.T) {
	ctx := context.Background()
	ns := testNS(t)
	keys := testKeys(t)
	local := node("c1/a", "fd50::1", 1, "fd01::/64", "10.1.0.0/24")
	d := Plan(local, []Node{node("c1/b", "fd50::2", 1, "fd02::/64", "10.2.0.0/24"), node("c1/c", "fd50::3", 1, "2001:db8:3::/48")}, keys, PlanOptions{})
	if err := d.Err(); err != nil {
		t.Fatal(err)
	}
	m := openManager(t, ns)
	if err := m.Apply(ctx, Desired{Policies: d.Policies}); err != nil {
		t.Fatal(err)
	}
	checkPolicies(t, m, d.Policies, 0)
	if err := m.Apply(ctx, Desired{Policies: d.Policies}); err != nil {
		t.Fatal(err)
	}
	if w := m.Stats().LastWrites; w != 0 {
		t.Errorf("second Apply wrote %d times, want 0", w)
	}
	if err := m.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if s, p, all, allp := libCounts(t, ns); s+p+all+allp != 0 {
		t.Errorf("after Cleanup: %d states, %d policies", all, allp)
	}
}

// TestApplyStates applies a whole plan. Where the kernel has no ESP, the
// states fail with the typed reason, the policies are installed all the
// same (traffic is dropped, never sent in the clear), and the state part
// of the test is skipped with that reason. Where it has ESP, the states
// are checked like the policies, through a rotation.
func TestApplyStates(t *testing.T) {
	ctx := context.Background()
	ns := testNS(t)
	keys := testKeys(t)
	local, peers := testTopology()
	d := Plan(local, peers, keys, PlanOptions{})
	m := openManager(t, ns)
	t.Cleanup(func() {
		if err := m.Cleanup(ctx); err != nil && !errors.Is(err, ErrClosed) {
			t.Errorf("Cleanup: %v", err)
		}
	})

	err := m.Apply(ctx, d)
	if errors.Is(err, ErrNotSupported) {
		var u *UnsupportedError
		if !errors.As(err, &u) {
			t.Fatalf("Apply: %v matches ErrNotSupported without an *UnsupportedError", err)
		}
		// Every state was refused for a missing feature, nothing else.
		for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
			if !errors.Is(e, ErrNotSupported) {
				t.Errorf("Apply failed for another reason: %v", e)
			}
		}
		checkPolicies(t, m, d.Policies, 0)
		if s, _, all, _ := libCounts(t, ns); s+all != 0 {
			t.Errorf("%d states in the kernel that refused them", all)
		}
		if err := m.Cleanup(ctx); err != nil {
			t.Fatal(err)
		}
		if s, p, all, allp := libCounts(t, ns); s+p+all+allp != 0 {
			t.Errorf("after Cleanup: %d states, %d policies", all, allp)
		}
		t.Skipf("ESP states not installable here (policies were, and are checked above): %v; missing %v", u, u.Options())
	}
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}

	checkStates := func(want []State) {
		t.Helper()
		in, err := m.Installed(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var got, exp []string
		for _, s := range in.States {
			got = append(got, fmt.Sprintf("%s>%s %#08x %d %x", s.Src, s.Dst, s.SPI, s.Index, s.Key))
		}
		for _, s := range want {
			exp = append(exp, fmt.Sprintf("%s>%s %#08x %d %x", s.Src, s.Dst, s.SPI, s.Index, s.Key))
		}
		slices.Sort(got)
		slices.Sort(exp)
		if !slices.Equal(got, exp) {
			t.Errorf("kernel states:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(exp, "\n  "))
		}
	}
	checkStates(d.States)
	checkPolicies(t, m, d.Policies, 0)
	if err := m.Apply(ctx, d); err != nil {
		t.Fatal(err)
	}
	if w := m.Stats().LastWrites; w != 0 {
		t.Errorf("second Apply wrote %d times, want 0", w)
	}

	// Rotation: the local node moves to 15 and accepts 2 for the grace
	// period: new out states, in states for 15 added, 2 kept.
	local.KeyIndex = 15
	d = Plan(local, peers, keys, PlanOptions{Accept: []uint8{2}})
	if err := m.Apply(ctx, d); err != nil {
		t.Fatal(err)
	}
	checkStates(d.States)
	// Grace over.
	d = Plan(local, peers, keys, PlanOptions{})
	if err := m.Apply(ctx, d); err != nil {
		t.Fatal(err)
	}
	checkStates(d.States)

	if err := m.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if s, p, _, _ := libCounts(t, ns); s+p != 0 {
		t.Errorf("after Cleanup: %d states, %d policies of Trellis's", s, p)
	}
}
