package tunnel

// Private helpers for the privileged tests: a bridge with no uplink, nodes
// and pods joined by veths, and a UDP echo exchange run inside a
// namespace. Namespaces, netlink handles and threads inside a namespace
// come from internal/privtest; the namespaces are named trellis-tunnel-…
// (see nsPrefix) and deleted at cleanup, also when a test fails. Nothing
// here touches the caller's (root) namespace: every link is created
// through a netlink handle bound to a namespace the test made.

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/trellis-mesh/trellis/internal/privtest"
)

// nsPrefix names the tests' namespaces, so that any a crashed run left
// behind says where it came from.
const nsPrefix = "trellis-tunnel"

// newNS makes a network namespace for the test, with loopback up, deleted
// at cleanup.
func newNS(t *testing.T) netns.NsHandle {
	t.Helper()
	ns, _ := privtest.NewNetNSWithPrefix(t, nsPrefix)
	return ns
}

func must(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func linkUp(t *testing.T, h *netlink.Handle, name string) netlink.Link {
	t.Helper()
	l, err := h.LinkByName(name)
	must(t, "find "+name, err)
	must(t, "set "+name+" up", h.LinkSetUp(l))
	return l
}

func addAddr(t *testing.T, h *netlink.Handle, dev string, p netip.Prefix) {
	t.Helper()
	l, err := h.LinkByName(dev)
	must(t, "find "+dev, err)
	must(t, fmt.Sprintf("add %s to %s", p, dev), h.AddrAdd(l, &netlink.Addr{IPNet: ipNet(p)}))
}

// addVeth creates a veth pair from handle h: local in h's namespace, peer
// in peerNS.
func addVeth(t *testing.T, h *netlink.Handle, local, peer string, peerNS netns.NsHandle, mtu int) {
	t.Helper()
	v := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: local, MTU: mtu},
		PeerName:      peer,
		PeerMTU:       uint32(mtu),
		PeerNamespace: netlink.NsFd(int(peerNS)),
	}
	must(t, fmt.Sprintf("add veth %s/%s", local, peer), h.LinkAdd(v))
}

func setSysctl(ns netns.NsHandle, path, value string) error {
	return privtest.InNetNS(ns, func() error { return os.WriteFile(path, []byte(value), 0o644) })
}

type labNode struct {
	name    string
	cluster string
	ns      netns.NsHandle
	h       *netlink.Handle
	ip      netip.Addr // underlay, on eth0
	podCIDR netip.Prefix
	podNS   netns.NsHandle
	podIP   netip.Addr
}

func (n *labNode) node() Node {
	return Node{Name: n.name, Cluster: n.cluster, IP: n.ip, PodCIDRs: []netip.Prefix{n.podCIDR}}
}

type lab struct {
	bridge netns.NsHandle
	nodes  []*labNode
	mtu    int
}

// underlayMTU is deliberately not 1500, so the tests see the tunnel MTU
// derived from the underlay and not from a constant.
const underlayMTU = 1400

// newLab builds: one bridge namespace (br0, no uplink); per node a
// namespace with eth0 (underlay 192.168.77.N/24) into the bridge, forwarding
// on; per node a pod namespace with eth0 = the first host+9 of the pod CIDR
// (x.x.x.10), a /24 to its node's pod0 (x.x.x.1) and a route to 10.0.0.0/8
// via the node. Pod veths keep MTU 1500, as pods' do.
func newLab(t *testing.T, podCIDRs ...string) *lab {
	t.Helper()
	l := &lab{bridge: newNS(t), mtu: underlayMTU}
	bh := privtest.NetlinkHandle(t, l.bridge)
	must(t, "add br0", bh.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0", MTU: underlayMTU}}))
	br := linkUp(t, bh, "br0")

	for i, c := range podCIDRs {
		n := &labNode{
			name:    fmt.Sprintf("node%d", i+1),
			cluster: "c1",
			ns:      newNS(t),
			ip:      netip.AddrFrom4([4]byte{192, 168, 77, byte(i + 1)}),
			podCIDR: netip.MustParsePrefix(c),
			podNS:   newNS(t),
		}
		if n.podCIDR.Addr().As4()[1] != 1 {
			n.cluster = "c2"
		}
		n.h = privtest.NetlinkHandle(t, n.ns)

		port := fmt.Sprintf("n%d", i+1)
		addVeth(t, bh, port, "eth0", n.ns, underlayMTU)
		pl, err := bh.LinkByName(port)
		must(t, "find "+port, err)
		must(t, "enslave "+port, bh.LinkSetMaster(pl, br))
		linkUp(t, bh, port)
		addAddr(t, n.h, "eth0", netip.PrefixFrom(n.ip, 24))
		linkUp(t, n.h, "eth0")
		must(t, "ip_forward in "+n.name, setSysctl(n.ns, "/proc/sys/net/ipv4/ip_forward", "1"))

		ph := privtest.NetlinkHandle(t, n.podNS)
		addVeth(t, n.h, "pod0", "eth0", n.podNS, 1500)
		gw := n.podCIDR.Addr().Next()
		n.podIP = netip.AddrFrom4([4]byte{n.podCIDR.Addr().As4()[0], n.podCIDR.Addr().As4()[1], n.podCIDR.Addr().As4()[2], 10})
		addAddr(t, n.h, "pod0", netip.PrefixFrom(gw, n.podCIDR.Bits()))
		linkUp(t, n.h, "pod0")
		addAddr(t, ph, "eth0", netip.PrefixFrom(n.podIP, n.podCIDR.Bits()))
		pe := linkUp(t, ph, "eth0")
		must(t, "pod route", ph.RouteAdd(&netlink.Route{
			LinkIndex: pe.Attrs().Index,
			Dst:       ipNet(netip.MustParsePrefix("10.0.0.0/8")),
			Gw:        net.IP(gw.AsSlice()),
		}))
		l.nodes = append(l.nodes, n)
	}
	return l
}

// others returns the Nodes of the lab except n.
func (l *lab) others(n *labNode) []Node {
	var out []Node
	for _, o := range l.nodes {
		if o != n {
			out = append(out, o.node())
		}
	}
	return out
}

// startEcho runs a UDP echo server in ns on addr. It answers every
// datagram with "from=<source address> len=<payload length>".
func startEcho(t *testing.T, ns netns.NsHandle, addr netip.Addr) netip.AddrPort {
	t.Helper()
	var pc net.PacketConn
	must(t, "listen in pod", privtest.InNetNS(ns, func() (err error) {
		pc, err = net.ListenPacket("udp", netip.AddrPortFrom(addr, 0).String())
		return err
	}))
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			src := from.(*net.UDPAddr).AddrPort().Addr().Unmap()
			_, _ = pc.WriteTo([]byte(fmt.Sprintf("from=%s len=%d", src, n)), from)
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

// exchangeOnce sends one payload of size bytes from a new UDP socket in ns
// to dst and returns the reply, waiting at most wait for it. With df the
// socket sets Don't Fragment (IP_PMTUDISC_DO), so a datagram too big for
// the path is dropped, not fragmented. One datagram may be lost while
// neighbours resolve: reachSize retries, unreachableSize keeps trying for
// a while.
func exchangeOnce(ns netns.NsHandle, dst netip.AddrPort, size int, df bool, wait time.Duration) (string, error) {
	var c *net.UDPConn
	err := privtest.InNetNS(ns, func() (err error) {
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		if err != nil || !df {
			return err
		}
		rc, err := c.SyscallConn()
		if err != nil {
			return err
		}
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
		}); err != nil {
			return err
		}
		return serr
	})
	if err != nil {
		if c != nil {
			c.Close()
		}
		return "", fmt.Errorf("dial %s: %w", dst, err)
	}
	defer c.Close()
	// EMSGSIZE once the path MTU is known, ECONNREFUSED, ...
	if _, err := c.Write([]byte(strings.Repeat("x", size))); err != nil {
		return "", fmt.Errorf("send %d bytes to %s: %w", size, dst, err)
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 1024)
	n, err := c.Read(buf)
	if err != nil {
		return "", fmt.Errorf("no reply from %s: %w", dst, err)
	}
	return string(buf[:n]), nil
}

// kernelView is the Trellis-relevant state of one namespace, as sorted
// strings, read straight from the kernel.
type kernelView struct {
	neigh  []string // "ip mac"
	fdb    []string // "mac dst"
	routes []string // "dst via gw dev name [onlink]"
}

func readView(t *testing.T, h *netlink.Handle, dev string) kernelView {
	t.Helper()
	var v kernelView
	if l, err := h.LinkByName(dev); err == nil {
		for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			ns, err := h.NeighList(l.Attrs().Index, fam)
			must(t, "list neighbours", err)
			for _, n := range ns {
				if n.State&netlink.NUD_PERMANENT != 0 {
					v.neigh = append(v.neigh, fmt.Sprintf("%s %s", n.IP, n.HardwareAddr))
				}
			}
		}
		fdb, err := h.NeighList(l.Attrs().Index, unix.AF_BRIDGE)
		must(t, "list fdb", err)
		for _, n := range fdb {
			if n.IP != nil {
				v.fdb = append(v.fdb, fmt.Sprintf("%s %s", n.HardwareAddr, n.IP))
			}
		}
	}
	rs, err := h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	must(t, "list routes", err)
	for _, r := range rs {
		if r.Type == unix.RTN_UNREACHABLE {
			v.routes = append(v.routes, fmt.Sprintf("%s unreachable", r.Dst))
			continue
		}
		l, err := h.LinkByIndex(r.LinkIndex)
		must(t, "route link", err)
		s := fmt.Sprintf("%s via %s dev %s", r.Dst, r.Gw, l.Attrs().Name)
		if r.Gw == nil {
			s = fmt.Sprintf("%s dev %s", r.Dst, l.Attrs().Name)
		}
		if r.Flags&int(netlink.FLAG_ONLINK) != 0 {
			s += " onlink"
		}
		v.routes = append(v.routes, s)
	}
	sortStrings(v.neigh, v.fdb, v.routes)
	return v
}

// viewOf is the kernelView that Owned o should produce.
func viewOf(o Owned) kernelView {
	var v kernelView
	for _, n := range o.Neighbours {
		v.neigh = append(v.neigh, fmt.Sprintf("%s %s", n.IP, n.MAC))
	}
	for _, f := range o.FDB {
		v.fdb = append(v.fdb, fmt.Sprintf("%s %s", f.MAC, f.Dst))
	}
	for _, r := range o.Routes {
		s := fmt.Sprintf("%s via %s dev %s", r.Dst, r.Via, r.Device)
		switch r.Path {
		case PathBlocked:
			s = fmt.Sprintf("%s unreachable", r.Dst)
		case PathEncrypted:
			s = fmt.Sprintf("%s dev %s", r.Dst, r.Device)
		}
		if r.OnLink {
			s += " onlink"
		}
		v.routes = append(v.routes, s)
	}
	sortStrings(v.neigh, v.fdb, v.routes)
	return v
}

func sortStrings(ss ...[]string) {
	for _, s := range ss {
		slices.Sort(s)
	}
}

func (v kernelView) String() string {
	return fmt.Sprintf("neigh=%q fdb=%q routes=%q", v.neigh, v.fdb, v.routes)
}

func (v kernelView) equal(o kernelView) bool { return v.String() == o.String() }

// minus returns the entries of v that are not in o.
func (v kernelView) minus(o kernelView) kernelView {
	diff := func(a, b []string) []string {
		var out []string
		for _, x := range a {
			found := false
			for _, y := range b {
				if x == y {
					found = true
				}
			}
			if !found {
				out = append(out, x)
			}
		}
		return out
	}
	return kernelView{diff(v.neigh, o.neigh), diff(v.fdb, o.fdb), diff(v.routes, o.routes)}
}

// checkRootUntouched fails the test if the caller's namespace gained a
// Trellis device or route, or its forwarding setting changed.
func checkRootUntouched(t *testing.T) {
	t.Helper()
	before, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	must(t, "read root ip_forward", err)
	t.Cleanup(func() {
		after, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		if err != nil || string(after) != string(before) {
			t.Errorf("root namespace ip_forward changed: %q → %q (%v)", before, after, err)
		}
		for _, name := range []string{DefaultVXLANDevice, DefaultGeneveDevice} {
			if _, err := netlink.LinkByName(name); err == nil {
				t.Errorf("root namespace has a %s device", name)
			}
		}
		rs, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
		if err == nil && len(rs) > 0 {
			t.Errorf("root namespace has %d routes with proto %d", len(rs), RouteProtocol)
		}
	})
}
