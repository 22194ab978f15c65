package tunnel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// The lab of the privileged tests: node1 and node2 in cluster c1, node3 in
// cluster c2.
var labCIDRs = []string{"10.1.1.0/24", "10.1.2.0/24", "10.2.1.0/24"}

// newTunnel builds a Tunnel in n's namespace, closed by t.Cleanup.
func newTunnel(t *testing.T, n *labNode, cfg Config) *Tunnel {
	t.Helper()
	cfg.NetNS = n.ns
	if cfg.UnderlayDevice == "" {
		cfg.UnderlayDevice = "eth0"
	}
	if cfg.LocalPodCIDRs == nil {
		cfg.LocalPodCIDRs = []netip.Prefix{n.podCIDR}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	tn, err := New(cfg)
	if err != nil {
		t.Fatalf("New in %s: %v", n.name, err)
	}
	t.Cleanup(func() { tn.Close() })
	return tn
}

// syncWriter collects log output for assertions.
type syncWriter struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func (w *syncWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

const (
	// replyTimeout bounds the wait for a path to carry traffic (routes
	// and neighbours in place, the first datagrams maybe lost).
	replyTimeout = 10 * time.Second
	// quietWindow is how long a path must stay silent to count as cut:
	// three datagrams' worth of waiting 200 ms for a reply.
	quietWindow = 600 * time.Millisecond
)

// reach waits until a datagram from pod src reaches pod dst and comes back
// with src's address as its source.
func reach(t *testing.T, src, dst *labNode, echo netip.AddrPort) {
	t.Helper()
	reachSize(t, src, dst, echo, 32, false)
}

// reachSize is reach for a datagram of size bytes, with Don't Fragment
// when df is set.
func reachSize(t *testing.T, src, dst *labNode, echo netip.AddrPort, size int, df bool) {
	t.Helper()
	var got string
	testutil.EventuallyNoError(t, replyTimeout, fmt.Sprintf("%s pod → %s pod, %d bytes", src.name, dst.name, size), func() (err error) {
		got, err = exchangeOnce(src.podNS, echo, size, df, 300*time.Millisecond)
		return err
	})
	if want := fmt.Sprintf("from=%s len=%d", src.podIP, size); got != want {
		t.Fatalf("%s pod → %s pod: reply %q, want %q", src.name, dst.name, got, want)
	}
}

// unreachable checks that, for quietWindow, no datagram from pod src to
// pod dst is answered.
func unreachable(t *testing.T, src, dst *labNode, echo netip.AddrPort) {
	t.Helper()
	unreachableSize(t, src, dst, echo, 32, false)
}

// unreachableSize is unreachable for datagrams of size bytes, with Don't
// Fragment when df is set.
func unreachableSize(t *testing.T, src, dst *labNode, echo netip.AddrPort, size int, df bool) {
	t.Helper()
	what := fmt.Sprintf("no answer to %s pod → %s pod, %d bytes", src.name, dst.name, size)
	testutil.Consistently(t, quietWindow, what, func() bool {
		got, err := exchangeOnce(src.podNS, echo, size, df, 200*time.Millisecond)
		if err == nil {
			t.Logf("%s pod → %s pod, %d bytes: answered %q", src.name, dst.name, size, got)
		}
		return err != nil
	})
}

func setAll(t *testing.T, l *lab, tunnels []*Tunnel) {
	t.Helper()
	for i, n := range l.nodes {
		if err := tunnels[i].Set(t.Context(), l.others(n)); err != nil {
			t.Fatalf("Set in %s: %v", n.name, err)
		}
	}
}

func TestVXLANLab(t *testing.T) {
	privtest.RequireRoot(t)
	checkRootUntouched(t)
	l := newLab(t, labCIDRs...)
	n1, n2, n3 := l.nodes[0], l.nodes[1], l.nodes[2]
	var tunnels []*Tunnel
	for _, n := range l.nodes {
		tunnels = append(tunnels, newTunnel(t, n, Config{}))
	}
	setAll(t, l, tunnels)
	t1 := tunnels[0]

	// The device: VNI, port, learning off, MTU from the underlay, derived
	// MAC, the local VTEP address.
	link, err := n1.h.LinkByName(DefaultVXLANDevice)
	must(t, "find device", err)
	vx := link.(*netlink.Vxlan)
	if vx.VxlanId != int(DefaultVNI) || vx.Port != int(DefaultVXLANPort) || vx.Learning || vx.FlowBased {
		t.Errorf("device: vni %d port %d learning %t external %t", vx.VxlanId, vx.Port, vx.Learning, vx.FlowBased)
	}
	if vx.MTU != underlayMTU-50 {
		t.Errorf("device MTU %d, want %d (underlay %d − 50)", vx.MTU, underlayMTU-50, underlayMTU)
	}
	if vx.HardwareAddr.String() != NodeMAC(n1.ip).String() {
		t.Errorf("device MAC %s, want %s", vx.HardwareAddr, NodeMAC(n1.ip))
	}
	if vx.Flags&net.FlagUp == 0 {
		t.Error("device is down")
	}
	addrs, err := n1.h.AddrList(link, netlink.FAMILY_V4)
	must(t, "list device addresses", err)
	if len(addrs) != 1 || addrs[0].IPNet.String() != "10.1.1.0/32" {
		t.Errorf("device addresses %v, want 10.1.1.0/32", addrs)
	}

	// The kernel holds exactly what Owned reports: per remote node one
	// neighbour, one FDB entry, one route.
	want := kernelView{
		neigh:  []string{"10.1.2.0 02:74:c0:a8:4d:02", "10.2.1.0 02:74:c0:a8:4d:03"},
		fdb:    []string{"02:74:c0:a8:4d:02 192.168.77.2", "02:74:c0:a8:4d:03 192.168.77.3"},
		routes: []string{"10.1.2.0/24 via 10.1.2.0 dev trellis_vxlan onlink", "10.2.1.0/24 via 10.2.1.0 dev trellis_vxlan onlink"},
	}
	full := readView(t, n1.h, DefaultVXLANDevice)
	if !full.equal(want) {
		t.Fatalf("node1 kernel state:\n%s\nwant:\n%s", full, want)
	}
	if o := viewOf(t1.Owned()); !o.equal(want) {
		t.Errorf("Owned() %s, want %s", o, want)
	}

	// Real packets, pod to pod, across the tunnel, in both clusters.
	echo2 := startEcho(t, n2.podNS, n2.podIP)
	echo3 := startEcho(t, n3.podNS, n3.podIP)
	echo1 := startEcho(t, n1.podNS, n1.podIP)
	reach(t, n1, n2, echo2)
	reach(t, n1, n3, echo3)
	reach(t, n3, n1, echo1)
	reach(t, n3, n2, echo2)

	// MTU: a Don't-Fragment datagram that fills the tunnel MTU crosses; one
	// byte more does not. 28 = IPv4 20 + UDP 8.
	payload := underlayMTU - 50 - 28
	reachSize(t, n1, n2, echo2, payload, true)
	unreachableSize(t, n1, n2, echo2, payload+1, true)

	// Idempotence: the same state again writes nothing.
	for i, n := range l.nodes {
		must(t, "second Set", tunnels[i].Set(t.Context(), l.others(n)))
		if c := tunnels[i].Stats().LastChanges; c != 0 {
			t.Errorf("second Set in %s made %d netlink changes, want 0", n.name, c)
		}
	}

	// Removing node3 removes exactly its entries.
	must(t, "Set without node3", t1.Set(t.Context(), []Node{n2.node()}))
	after := readView(t, n1.h, DefaultVXLANDevice)
	gone := full.minus(after)
	wantGone := kernelView{
		neigh:  []string{"10.2.1.0 02:74:c0:a8:4d:03"},
		fdb:    []string{"02:74:c0:a8:4d:03 192.168.77.3"},
		routes: []string{"10.2.1.0/24 via 10.2.1.0 dev trellis_vxlan onlink"},
	}
	if !gone.equal(wantGone) || len(after.minus(full).neigh)+len(after.minus(full).fdb)+len(after.minus(full).routes) != 0 {
		t.Errorf("removing node3 removed %s (and added %s), want exactly %s", gone, after.minus(full), wantGone)
	}
	if s := t1.Stats(); s.LastChanges != 3 {
		t.Errorf("removing node3 took %d changes, want 3", s.LastChanges)
	}
	unreachable(t, n1, n3, echo3)
	reach(t, n1, n2, echo2)

	// Drift repair: a route, a neighbour and an FDB entry deleted behind the
	// tunnel's back come back with the next Set, and only they.
	must(t, "restore node3", t1.Set(t.Context(), l.others(n1)))
	dev, err := n1.h.LinkByName(DefaultVXLANDevice)
	must(t, "find device", err)
	must(t, "delete route behind its back", n1.h.RouteDel(&netlink.Route{Dst: ipNet(n2.podCIDR), Table: unix.RT_TABLE_MAIN, Protocol: RouteProtocol}))
	unreachable(t, n1, n2, echo2)
	before := t1.Stats()
	must(t, "Set repairs route", t1.Set(t.Context(), l.others(n1)))
	if s := t1.Stats(); s.LastChanges != 1 || s.Repairs != before.Repairs+1 {
		t.Errorf("route repair: %d changes, %d repairs; want 1 and 1", s.LastChanges, s.Repairs-before.Repairs)
	}
	reach(t, n1, n2, echo2)

	must(t, "delete fdb behind its back", n1.h.NeighDel(fdbEntry(dev.Attrs().Index, NodeMAC(n3.ip), n3.ip)))
	must(t, "delete neighbour behind its back", n1.h.NeighDel(t1.neighbour(dev.Attrs().Index, VTEPAddr(n3.podCIDR), NodeMAC(n3.ip))))
	must(t, "Set repairs fdb and neighbour", t1.Set(t.Context(), l.others(n1)))
	if s := t1.Stats(); s.LastChanges != 2 {
		t.Errorf("fdb+neighbour repair: %d changes, want 2", s.LastChanges)
	}
	if v := readView(t, n1.h, DefaultVXLANDevice); !v.equal(full) {
		t.Errorf("after repair:\n%s\nwant:\n%s", v, full)
	}
	reach(t, n1, n3, echo3)

	// The device itself deleted: recreated with everything on it.
	must(t, "delete device behind its back", n1.h.LinkDel(dev))
	must(t, "Set recreates device", t1.Set(t.Context(), l.others(n1)))
	if v := readView(t, n1.h, DefaultVXLANDevice); !v.equal(full) {
		t.Errorf("after device repair:\n%s\nwant:\n%s", v, full)
	}
	reach(t, n1, n3, echo3)
	must(t, "Set after repair", t1.Set(t.Context(), l.others(n1)))
	if c := t1.Stats().LastChanges; c != 0 {
		t.Errorf("Set after repair made %d changes", c)
	}

	// A new Tunnel on the same namespace (an agent restart) adopts
	// everything and writes nothing.
	t1b := newTunnel(t, n1, Config{})
	must(t, "Set by a restarted agent", t1b.Set(t.Context(), l.others(n1)))
	if s := t1b.Stats(); s.Changes != 0 {
		t.Errorf("restarted agent made %d changes, want 0", s.Changes)
	}

	// Cleanup removes the device and every Trellis route, nothing else.
	must(t, "Cleanup", t1.Cleanup(t.Context()))
	if _, err := n1.h.LinkByName(DefaultVXLANDevice); err == nil {
		t.Error("device survived Cleanup")
	}
	if v := readView(t, n1.h, DefaultVXLANDevice); len(v.routes) != 0 {
		t.Errorf("routes survived Cleanup: %v", v.routes)
	}
	if _, err := n1.h.LinkByName("pod0"); err != nil {
		t.Errorf("Cleanup removed a link it does not own: %v", err)
	}
	unreachable(t, n1, n2, echo2)
}

// TestSetStates applies a table of desired states in random order, in one
// namespace, and checks after each Set that the kernel holds exactly the
// state's entries and that applying it again writes nothing.
func TestSetStates(t *testing.T) {
	privtest.RequireRoot(t)
	checkRootUntouched(t)
	l := newLab(t, "10.1.1.0/24")
	n := l.nodes[0]
	tn := newTunnel(t, n, Config{Logger: slog.New(slog.DiscardHandler)})

	node := func(i int, cidrs ...string) Node {
		nd := Node{Name: fmt.Sprintf("r%d", i), IP: netip.AddrFrom4([4]byte{192, 168, 77, byte(10 + i)})}
		for _, c := range cidrs {
			nd.PodCIDRs = append(nd.PodCIDRs, netip.MustParsePrefix(c))
		}
		return nd
	}
	states := [][]Node{
		nil,
		{node(1, "10.1.2.0/24")},
		{node(1, "10.1.2.0/24"), node(2, "10.1.3.0/24")},
		{node(1, "10.1.2.0/24", "10.5.0.0/16"), node(2, "10.1.3.0/24"), node(3, "10.2.1.0/24")},
		{node(2, "10.1.3.0/24"), node(3, "10.2.1.0/24", "10.2.2.0/24")},
		{node(3, "10.1.2.0/24")}, // node1's CIDR moves to node3
		{node(4, "10.4.0.0/24", "fd04::/64")},
	}
	expect := func(nodes []Node) kernelView {
		var v kernelView
		for _, nd := range nodes {
			mac := NodeMAC(nd.IP)
			v.fdb = append(v.fdb, fmt.Sprintf("%s %s", mac, nd.IP))
			var vtep4, vtep6 netip.Addr
			for _, c := range nd.PodCIDRs {
				vtep := &vtep4
				if c.Addr().Is6() {
					vtep = &vtep6
				}
				if !vtep.IsValid() {
					*vtep = c.Addr()
					v.neigh = append(v.neigh, fmt.Sprintf("%s %s", c.Addr(), mac))
				}
				v.routes = append(v.routes, fmt.Sprintf("%s via %s dev %s onlink", c, *vtep, DefaultVXLANDevice))
			}
		}
		sortStrings(v.neigh, v.fdb, v.routes)
		return v
	}
	order := rand.Perm(len(states) * 3)
	for _, i := range order {
		st := states[i%len(states)]
		// The order of nodes in the slice does not matter either.
		st = append([]Node(nil), st...)
		rand.Shuffle(len(st), func(a, b int) { st[a], st[b] = st[b], st[a] })
		if err := tn.Set(t.Context(), st); err != nil {
			t.Fatalf("state %d: %v", i%len(states), err)
		}
		got := readView(t, n.h, DefaultVXLANDevice)
		if want := expect(st); !got.equal(want) {
			t.Fatalf("state %d: kernel\n%s\nwant\n%s", i%len(states), got, want)
		}
		if o := viewOf(tn.Owned()); !o.equal(got) {
			t.Fatalf("state %d: Owned %s, kernel %s", i%len(states), o, got)
		}
		must(t, "Set again", tn.Set(t.Context(), st))
		if c := tn.Stats().LastChanges; c != 0 {
			t.Fatalf("state %d applied twice: %d changes the second time", i%len(states), c)
		}
	}

	// A cancelled context writes nothing and says so.
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := tn.Set(ctx, states[3]); !errors.Is(err, context.Canceled) || tn.Stats().LastChanges != 0 {
		t.Errorf("Set with a cancelled context: %v, %d changes", err, tn.Stats().LastChanges)
	}
}

func TestAdoptAndReplaceDevice(t *testing.T) {
	privtest.RequireRoot(t)
	checkRootUntouched(t)
	l := newLab(t, "10.1.1.0/24")
	n := l.nodes[0]
	eth0, err := n.h.LinkByName("eth0")
	must(t, "find eth0", err)
	spec := func(vni, mtu int) *netlink.Vxlan {
		return &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: DefaultVXLANDevice, MTU: mtu},
			VxlanId:   vni, VtepDevIndex: eth0.Attrs().Index, SrcAddr: net.IP(n.ip.AsSlice()), Port: int(DefaultVXLANPort),
		}
	}

	// Compatible (right VNI, port, source, learning off) but wrong MTU and
	// MAC: adopted in place, same ifindex.
	must(t, "pre-create compatible device", n.h.LinkAdd(spec(int(DefaultVNI), 1000)))
	old, err := n.h.LinkByName(DefaultVXLANDevice)
	must(t, "find device", err)
	tn := newTunnel(t, n, Config{})
	cur, err := n.h.LinkByName(DefaultVXLANDevice)
	must(t, "find device", err)
	if cur.Attrs().Index != old.Attrs().Index || cur.Attrs().MTU != underlayMTU-50 || cur.Attrs().HardwareAddr.String() != NodeMAC(n.ip).String() {
		t.Errorf("adopt: index %d→%d mtu %d mac %s", old.Attrs().Index, cur.Attrs().Index, cur.Attrs().MTU, cur.Attrs().HardwareAddr)
	}
	if tn.Stats().DeviceRecreates != 0 {
		t.Error("a compatible device was recreated")
	}
	must(t, "Cleanup", tn.Cleanup(t.Context()))

	// Incompatible VNI: replaced, and the log says why.
	must(t, "pre-create device with VNI 1", n.h.LinkAdd(spec(1, 1000)))
	var logs syncWriter
	tn2 := newTunnel(t, n, Config{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if tn2.Stats().DeviceRecreates != 1 || !strings.Contains(logs.String(), "vni: 1 vs 126") {
		t.Errorf("recreates %d, log %q; want 1 and \"vni: 1 vs 126\"", tn2.Stats().DeviceRecreates, logs.String())
	}
	cur, err = n.h.LinkByName(DefaultVXLANDevice)
	must(t, "find device", err)
	if cur.(*netlink.Vxlan).VxlanId != int(DefaultVNI) {
		t.Errorf("VNI after replace: %d", cur.(*netlink.Vxlan).VxlanId)
	}
	must(t, "Cleanup", tn2.Cleanup(t.Context()))

	// A device of the name that is not a tunnel (a veth here) is replaced
	// too ("type: veth vs vxlan"), and Cleanup leaves a non-tunnel alone.
	addVeth(t, n.h, DefaultVXLANDevice, "peer0", n.ns, 1500)
	logs = syncWriter{}
	tn3 := newTunnel(t, n, Config{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if !strings.Contains(logs.String(), "type: veth vs vxlan") {
		t.Errorf("log %q lacks the type mismatch", logs.String())
	}
	must(t, "Cleanup", tn3.Cleanup(t.Context()))
}

// TestForeignRoute: a route to a remote pod CIDR that Trellis did not
// install (another protocol) is neither replaced nor deleted, and Set says
// why it cannot install its own.
func TestForeignRoute(t *testing.T) {
	privtest.RequireRoot(t)
	checkRootUntouched(t)
	l := newLab(t, labCIDRs...)
	n1, n2, n3 := l.nodes[0], l.nodes[1], l.nodes[2]
	eth0, err := n1.h.LinkByName("eth0")
	must(t, "find eth0", err)
	foreign := &netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: ipNet(n2.podCIDR), Gw: net.IP(n2.ip.AsSlice()), Protocol: unix.RTPROT_STATIC}
	must(t, "add foreign route", n1.h.RouteAdd(foreign))

	tn := newTunnel(t, n1, Config{})
	err = tn.Set(t.Context(), l.others(n1))
	if err == nil || !strings.Contains(err.Error(), "does not own") {
		t.Fatalf("Set over a foreign route: %v", err)
	}
	rs, err := n1.h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: ipNet(n2.podCIDR)}, netlink.RT_FILTER_DST)
	must(t, "list", err)
	if len(rs) != 1 || rs[0].Protocol != unix.RTPROT_STATIC || !rs[0].Gw.Equal(net.IP(n2.ip.AsSlice())) {
		t.Errorf("foreign route changed: %v", rs)
	}
	// node2's neighbour and FDB entry were rolled back (its only route
	// failed); node3 is fully installed.
	v := readView(t, n1.h, DefaultVXLANDevice)
	want := kernelView{
		neigh:  []string{"10.2.1.0 02:74:c0:a8:4d:03"},
		fdb:    []string{"02:74:c0:a8:4d:03 192.168.77.3"},
		routes: []string{"10.2.1.0/24 via 10.2.1.0 dev trellis_vxlan onlink"},
	}
	if !v.equal(want) {
		t.Errorf("kernel\n%s\nwant\n%s", v, want)
	}
	if o := viewOf(tn.Owned()); !o.equal(want) {
		t.Errorf("Owned %s, want %s", o, want)
	}
	_ = n3
	must(t, "Cleanup", tn.Cleanup(t.Context()))
	rs, err = n1.h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: ipNet(n2.podCIDR)}, netlink.RT_FILTER_DST)
	must(t, "list", err)
	if len(rs) != 1 {
		t.Errorf("Cleanup removed the foreign route: %v", rs)
	}
}

func TestNativeLab(t *testing.T) {
	privtest.RequireRoot(t)
	checkRootUntouched(t)
	l := newLab(t, labCIDRs...)
	n1, n2, n3 := l.nodes[0], l.nodes[1], l.nodes[2]
	var tunnels []*Tunnel
	for _, n := range l.nodes {
		tunnels = append(tunnels, newTunnel(t, n, Config{Mode: ModeNative}))
	}
	setAll(t, l, tunnels)
	if _, err := n1.h.LinkByName(DefaultVXLANDevice); err == nil {
		t.Error("native mode made a tunnel device")
	}
	want := kernelView{routes: []string{"10.1.2.0/24 via 192.168.77.2 dev eth0", "10.2.1.0/24 via 192.168.77.3 dev eth0"}}
	if v := readView(t, n1.h, DefaultVXLANDevice); !v.equal(want) {
		t.Fatalf("kernel\n%s\nwant\n%s", v, want)
	}
	echo2 := startEcho(t, n2.podNS, n2.podIP)
	echo3 := startEcho(t, n3.podNS, n3.podIP)
	reach(t, n1, n2, echo2)
	reach(t, n1, n3, echo3)
	// Native routes carry full-size packets: no encapsulation overhead.
	reachSize(t, n1, n2, echo2, underlayMTU-28, true)

	for i, n := range l.nodes {
		must(t, "second Set", tunnels[i].Set(t.Context(), l.others(n)))
		if c := tunnels[i].Stats().LastChanges; c != 0 {
			t.Errorf("second Set in %s: %d changes", n.name, c)
		}
	}

	// A node off the underlay subnet cannot be reached natively: refused
	// with ErrNotOnLink, the others stay.
	far := Node{Name: "far", IP: ip("192.168.99.9"), PodCIDRs: []netip.Prefix{pfx("10.9.0.0/24")}}
	err := tunnels[0].Set(t.Context(), append(l.others(n1), far))
	if !errors.Is(err, ErrNotOnLink) || !strings.Contains(err.Error(), "use mode vxlan") {
		t.Errorf("Set with an off-link node: %v, want ErrNotOnLink with a hint", err)
	}
	if v := readView(t, n1.h, DefaultVXLANDevice); !v.equal(want) {
		t.Errorf("after off-link node: kernel\n%s\nwant\n%s", v, want)
	}

	// Removing node3 removes its route; traffic to it stops.
	must(t, "Set without node3", tunnels[0].Set(t.Context(), []Node{n2.node()}))
	if v := readView(t, n1.h, DefaultVXLANDevice); len(v.routes) != 1 || !strings.HasPrefix(v.routes[0], "10.1.2.0/24") {
		t.Errorf("routes after removing node3: %v", v.routes)
	}
	unreachable(t, n1, n3, echo3)
	reach(t, n1, n2, echo2)

	must(t, "Cleanup", tunnels[0].Cleanup(t.Context()))
	if v := readView(t, n1.h, DefaultVXLANDevice); len(v.routes) != 0 {
		t.Errorf("routes after Cleanup: %v", v.routes)
	}
	if _, err := n1.h.LinkByName("eth0"); err != nil {
		t.Error("Cleanup removed the underlay device")
	}
}

// TestGeneve: on a kernel without Geneve, New says so with a typed error.
// On one with it, Geneve mode carries real traffic.
func TestGeneve(t *testing.T) {
	privtest.RequireRoot(t)
	checkRootUntouched(t)
	l := newLab(t, labCIDRs...)
	n1 := l.nodes[0]
	_, err := New(Config{Mode: ModeGeneve, NetNS: n1.ns, UnderlayDevice: "eth0"})
	if err != nil {
		var ufe *UnsupportedFeatureError
		if !errors.Is(err, ErrNotSupported) || !errors.As(err, &ufe) {
			t.Fatalf("New(geneve): %v, want an error matching ErrNotSupported", err)
		}
		for _, s := range []string{"CONFIG_GENEVE", "module geneve", "vxlan"} {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("error %q does not mention %q", err, s)
			}
		}
		if _, err := n1.h.LinkByName(DefaultGeneveDevice); err == nil {
			t.Error("a failed New left a device behind")
		}
		t.Logf("this kernel has no Geneve, as expected here: %v", err)
		return
	}
	runEncapLab(t, l, ModeGeneve, nil)
}

// TestEncapPathOverVXLAN runs Geneve mode's datapath (collect-metadata
// device, neighbour entries, routes with "encap ip id <VNI> dst <node>")
// over a VXLAN collect-metadata device, so that kernels without Geneve
// still test it end to end.
func TestEncapPathOverVXLAN(t *testing.T) {
	privtest.RequireRoot(t)
	checkRootUntouched(t)
	l := newLab(t, labCIDRs...)
	runEncapLab(t, l, ModeGeneve, func(tn *Tunnel, under netlink.Link) netlink.Link {
		return &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: tn.cfg.Device, MTU: under.Attrs().MTU - tn.overhead(), HardwareAddr: NodeMAC(tn.cfg.LocalIP)},
			FlowBased: true,
			Port:      int(tn.cfg.Port),
		}
	})
}

func runEncapLab(t *testing.T, l *lab, mode Mode, device func(*Tunnel, netlink.Link) netlink.Link) {
	t.Helper()
	n1, n2, n3 := l.nodes[0], l.nodes[1], l.nodes[2]
	var tunnels []*Tunnel
	for _, n := range l.nodes {
		tunnels = append(tunnels, newTunnel(t, n, Config{Mode: mode, deviceSpecOverride: device}))
	}
	setAll(t, l, tunnels)
	dev := DefaultGeneveDevice
	want := kernelView{
		neigh:  []string{"10.1.2.0 02:74:c0:a8:4d:02", "10.2.1.0 02:74:c0:a8:4d:03"},
		routes: []string{"10.1.2.0/24 via 10.1.2.0 dev " + dev + " onlink", "10.2.1.0/24 via 10.2.1.0 dev " + dev + " onlink"},
	}
	if v := readView(t, n1.h, dev); !v.equal(want) {
		t.Fatalf("kernel\n%s\nwant\n%s", v, want)
	}
	echo2 := startEcho(t, n2.podNS, n2.podIP)
	echo3 := startEcho(t, n3.podNS, n3.podIP)
	reach(t, n1, n2, echo2)
	reach(t, n1, n3, echo3)
	for i, n := range l.nodes {
		must(t, "second Set", tunnels[i].Set(t.Context(), l.others(n)))
		if c := tunnels[i].Stats().LastChanges; c != 0 {
			t.Errorf("second Set in %s: %d changes", n.name, c)
		}
	}
	// node3 moves to another underlay IP: its route's encap must follow.
	moved := n3.node()
	moved.IP = ip("192.168.77.33")
	must(t, "Set with node3 moved", tunnels[0].Set(t.Context(), []Node{n2.node(), moved}))
	o := tunnels[0].Owned()
	for _, r := range o.Routes {
		if r.Dst == n3.podCIDR && r.TunnelDst != moved.IP {
			t.Errorf("route %s tunnel dst %s, want %s", r.Dst, r.TunnelDst, moved.IP)
		}
	}
	unreachable(t, n1, n3, echo3)
	must(t, "Set with node3 back", tunnels[0].Set(t.Context(), l.others(n1)))
	reach(t, n1, n3, echo3)
	must(t, "Set without node3", tunnels[0].Set(t.Context(), []Node{n2.node()}))
	unreachable(t, n1, n3, echo3)
	reach(t, n1, n2, echo2)
	must(t, "Cleanup", tunnels[0].Cleanup(t.Context()))
	if _, err := n1.h.LinkByName(dev); err == nil {
		t.Error("device survived Cleanup")
	}
}

// A node's path moves between the tunnel, the encrypted device and an
// unreachable route by one route replace each, leaving its neighbour and
// FDB entries alone; each path converges (a second Set writes nothing);
// a missing encrypted device leaves the route as it was and says so.
func TestPaths(t *testing.T) {
	privtest.RequireRoot(t)
	l := newLab(t, labCIDRs[:2]...)
	n1, n2 := l.nodes[0], l.nodes[1]
	// The encrypted device is one end of a veth pair here (this kernel has
	// no dummy driver): the route's shape is what is tested;
	// encryption/wireguard's tests carry traffic through the real one.
	const encDev = "tl_enc0"
	must(t, "add encrypted device", n1.h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: encDev}, PeerName: "tl_enc1"}))
	linkUp(t, n1.h, encDev)
	t1 := newTunnel(t, n1, Config{EncryptedDevice: encDev})
	t2 := newTunnel(t, n2, Config{})
	must(t, "Set on node2", t2.Set(t.Context(), []Node{n1.node()}))
	echo2 := startEcho(t, n2.podNS, n2.podIP)

	// A second node with an IPv6 pod CIDR, for the IPv6 unreachable route
	// (the kernel lists it on lo).
	v6 := Node{Name: "n9", Cluster: "c9", IP: netip.MustParseAddr("192.168.77.9"), PodCIDRs: []netip.Prefix{netip.MustParsePrefix("fd00:9::/64")}}
	set := func(path Path) {
		t.Helper()
		a, b := n2.node(), v6
		a.Path, b.Path = path, path
		must(t, "Set "+path.String(), t1.Set(t.Context(), []Node{a, b}))
		if err := t1.Set(t.Context(), []Node{a, b}); err != nil || t1.Stats().LastChanges != 0 {
			t.Fatalf("second Set on the %s path: %v, %d changes; want converged", path, err, t1.Stats().LastChanges)
		}
	}
	set(PathTunnel)
	tunnelView := readView(t, n1.h, DefaultVXLANDevice)
	reach(t, n1, n2, echo2)

	for _, step := range []struct {
		path   Path
		routes []string
	}{
		{PathEncrypted, []string{"10.1.2.0/24 dev " + encDev, "fd00:9::/64 dev " + encDev}},
		{PathBlocked, []string{"10.1.2.0/24 unreachable", "fd00:9::/64 unreachable"}},
		{PathTunnel, tunnelView.routes},
	} {
		before := t1.Stats()
		set(step.path)
		v := readView(t, n1.h, DefaultVXLANDevice)
		want := kernelView{neigh: tunnelView.neigh, fdb: tunnelView.fdb, routes: step.routes}
		if !v.equal(want) {
			t.Fatalf("on the %s path the kernel holds\n%s\nwant\n%s", step.path, v, want)
		}
		if o := viewOf(t1.Owned()); !o.equal(want) {
			t.Errorf("Owned() on the %s path: %s, want %s", step.path, o, want)
		}
		// One replace per route, no repair counted.
		if s := t1.Stats(); s.Changes-before.Changes != 2 || s.Repairs != before.Repairs {
			t.Errorf("moving to the %s path: %d changes, %d repairs; want 2 and 0", step.path, s.Changes-before.Changes, s.Repairs-before.Repairs)
		}
		if step.path == PathBlocked {
			unreachable(t, n1, n2, echo2)
		}
	}
	reach(t, n1, n2, echo2)

	// The encrypted device goes: a node that wants it keeps its route
	// (here: through the tunnel) and Set names the device.
	enc, err := n1.h.LinkByName(encDev)
	must(t, "find encrypted device", err)
	must(t, "delete encrypted device", n1.h.LinkDel(enc))
	a := n2.node()
	a.Path = PathEncrypted
	err = t1.Set(t.Context(), []Node{a})
	if err == nil || !strings.Contains(err.Error(), encDev) {
		t.Fatalf("Set with the encrypted device missing: %v, want an error naming %s", err, encDev)
	}
	if v := readView(t, n1.h, DefaultVXLANDevice); !slices.Contains(v.routes, "10.1.2.0/24 via 10.1.2.0 dev trellis_vxlan onlink") {
		t.Fatalf("route after the failed move: %v, want it left on the tunnel", v.routes)
	}
	reach(t, n1, n2, echo2)
}
