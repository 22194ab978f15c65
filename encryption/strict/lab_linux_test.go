//go:build linux

package strict

// The privileged tests' lab: two node namespaces joined by a veth (the
// underlay), a VXLAN tunnel between them built by the tunnel package, and
// on each node "pod" addresses on a veth pair of its own, as local
// addresses, so that a socket bound to one sends pod traffic over the
// tunnel. Namespaces come from privtest (trellis-strict-…) and go at
// cleanup, also when a test fails; nothing touches the caller's
// namespace, and pins go to a bpffs directory of the test's own.

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/tunnel"
)

const nsPrefix = "trellis-strict"

type labNode struct {
	name  string
	ns    netns.NsHandle
	h     *netlink.Handle
	ip    netip.Addr     // underlay, on eth0
	cidrs []netip.Prefix // pod CIDRs: 10.1.N.0/24, 10.9.N.0/24, fd00:1:N::/64
	pod4  netip.Addr     // 10.1.N.10, in cidrs[0]
	other netip.Addr     // 10.9.N.10, in cidrs[1]
	pod6  netip.Addr     // fd00:1:N::10, in cidrs[2]
	tun   *tunnel.Tunnel
	// echo servers on pod4, other and pod6
	echo4, echoOther, echo6 netip.AddrPort
}

func (n *labNode) node() tunnel.Node {
	return tunnel.Node{Name: n.name, Cluster: "c1", IP: n.ip, PodCIDRs: n.cidrs}
}

func must(t testing.TB, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func addAddr(t testing.TB, h *netlink.Handle, dev string, p netip.Prefix) {
	t.Helper()
	l, err := h.LinkByName(dev)
	must(t, "find "+dev, err)
	// No duplicate address detection: the address is usable at once.
	a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}, Flags: unix.IFA_F_NODAD}
	must(t, fmt.Sprintf("add %s to %s", p, dev), h.AddrAdd(l, a))
}

func linkUp(t testing.TB, h *netlink.Handle, name string) {
	t.Helper()
	l, err := h.LinkByName(name)
	must(t, "find "+name, err)
	must(t, "set "+name+" up", h.LinkSetUp(l))
}

// newLab builds node1 and node2 with the tunnel up between them and echo
// servers on every pod address.
func newLab(t *testing.T) (*labNode, *labNode) {
	t.Helper()
	var nodes [2]*labNode
	for i := range nodes {
		ns, _ := privtest.NewNetNSWithPrefix(t, nsPrefix)
		n := byte(i + 1)
		nodes[i] = &labNode{
			name:  fmt.Sprintf("node%d", n),
			ns:    ns,
			h:     privtest.NetlinkHandle(t, ns),
			ip:    netip.AddrFrom4([4]byte{192, 168, 79, n}),
			cidrs: []netip.Prefix{pfx(fmt.Sprintf("10.1.%d.0/24", n)), pfx(fmt.Sprintf("10.9.%d.0/24", n)), pfx(fmt.Sprintf("fd00:1:%d::/64", n))},
			pod4:  netip.AddrFrom4([4]byte{10, 1, n, 10}),
			other: netip.AddrFrom4([4]byte{10, 9, n, 10}),
			pod6:  netip.MustParseAddr(fmt.Sprintf("fd00:1:%d::10", n)),
		}
	}
	n1, n2 := nodes[0], nodes[1]
	must(t, "add underlay veth", n1.h.LinkAdd(&netlink.Veth{
		LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(n2.ns)),
	}))
	for _, n := range nodes {
		addAddr(t, n.h, "eth0", netip.PrefixFrom(n.ip, 24))
		linkUp(t, n.h, "eth0")
		must(t, "add pod veth", n.h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "pod0"}, PeerName: "pod0p"}))
		for _, a := range []netip.Addr{n.pod4, n.other, n.pod6} {
			addAddr(t, n.h, "pod0", netip.PrefixFrom(a, a.BitLen()))
		}
		linkUp(t, n.h, "pod0")
		linkUp(t, n.h, "pod0p")
		tn, err := tunnel.New(tunnel.Config{NetNS: n.ns, UnderlayDevice: "eth0", LocalPodCIDRs: n.cidrs, Logger: testLogger(t).With("node", n.name)})
		must(t, "tunnel in "+n.name, err)
		t.Cleanup(func() { tn.Close() })
		n.tun = tn
		n.echo4 = startEcho(t, n.ns, n.pod4)
		n.echoOther = startEcho(t, n.ns, n.other)
		n.echo6 = startEcho(t, n.ns, n.pod6)
	}
	must(t, "tunnel Set in node1", n1.tun.Set(t.Context(), []tunnel.Node{n2.node()}))
	must(t, "tunnel Set in node2", n2.tun.Set(t.Context(), []tunnel.Node{n1.node()}))
	return n1, n2
}

// startEcho runs a UDP echo server in ns on addr: it answers every
// datagram with "from=<source address>".
func startEcho(t *testing.T, ns netns.NsHandle, addr netip.Addr) netip.AddrPort {
	t.Helper()
	var pc net.PacketConn
	must(t, "listen on "+addr.String(), privtest.InNetNS(ns, func() (err error) {
		pc, err = net.ListenPacket("udp", netip.AddrPortFrom(addr, 0).String())
		return err
	}))
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo([]byte("from="+from.(*net.UDPAddr).AddrPort().Addr().Unmap().String()), from)
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

// dial opens a UDP socket in ns bound to src and connected to dst.
func dial(ns netns.NsHandle, src netip.Addr, dst netip.AddrPort) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := privtest.InNetNS(ns, func() (err error) {
		c, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), net.UDPAddrFromAddrPort(dst))
		return err
	})
	return c, err
}

// exchange sends one datagram from src in ns to dst and waits up to wait
// for the echo.
func exchange(ns netns.NsHandle, src netip.Addr, dst netip.AddrPort, wait time.Duration) error {
	c, err := dial(ns, src, dst)
	if err != nil {
		return fmt.Errorf("dial %s from %s: %w", dst, src, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		return fmt.Errorf("send to %s: %w", dst, err)
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 256)
	n, err := c.Read(buf)
	if err != nil {
		return fmt.Errorf("no reply from %s to %s: %w", dst, src, err)
	}
	if got, want := string(buf[:n]), "from="+src.String(); got != want {
		return fmt.Errorf("reply %q from %s, want %q", got, dst, want)
	}
	return nil
}

// send sends k datagrams from src in ns to dst and waits for no reply.
func send(t *testing.T, ns netns.NsHandle, src netip.Addr, dst netip.AddrPort, k int) {
	t.Helper()
	c, err := dial(ns, src, dst)
	must(t, "dial", err)
	defer c.Close()
	for range k {
		_, err := c.Write([]byte("ping"))
		must(t, fmt.Sprintf("send %s → %s", src, dst), err)
	}
}

const (
	// replyTimeout bounds the wait for a path to carry traffic.
	replyTimeout = 10 * time.Second
	// quietWindow is how long a path must stay silent to count as cut.
	quietWindow = 600 * time.Millisecond
)

// reach waits until a datagram from src in ns reaches dst and comes back.
func reach(t *testing.T, ns netns.NsHandle, src netip.Addr, dst netip.AddrPort) {
	t.Helper()
	testutil.EventuallyNoError(t, replyTimeout, fmt.Sprintf("%s → %s", src, dst), func() error {
		return exchange(ns, src, dst, 300*time.Millisecond)
	})
}

// unreachable checks that for quietWindow no datagram from src in ns to
// dst is answered.
func unreachable(t *testing.T, ns netns.NsHandle, src netip.Addr, dst netip.AddrPort) {
	t.Helper()
	testutil.Consistently(t, quietWindow, fmt.Sprintf("no answer to %s → %s", src, dst), func() bool {
		err := exchange(ns, src, dst, 200*time.Millisecond)
		if err == nil {
			t.Logf("%s → %s answered", src, dst)
		}
		return err != nil
	})
}

// pinDir returns a bpffs directory for the test's pins and, at cleanup,
// uninstalls whatever is left there and checks that nothing is.
func pinDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join("/sys/fs/bpf", privtest.UniqueName("trellis-test-strict"))
	t.Cleanup(func() {
		if err := Uninstall(dir); err != nil {
			t.Errorf("uninstall %s: %v", dir, err)
		}
		if _, err := os.Stat(dir); err == nil {
			t.Errorf("%s left behind", dir)
		}
	})
	return dir
}

// openFilter opens a Filter on node's tunnel device, closed at cleanup.
func openFilter(t *testing.T, n *labNode, dir string) *Filter {
	t.Helper()
	f, err := Open(Config{Device: tunnel.DefaultVXLANDevice, NetNS: n.ns, PinDir: dir, Logger: testLogger(t).With("filter", n.name)})
	privtest.SkipIfNotSupported(t, err) // TCX needs Linux 6.6
	t.Cleanup(func() { f.Close() })
	return f
}

// tcxLinks returns the IDs of the links attached to dev in node n at the
// hook of attach, as the kernel lists them.
func tcxLinks(t *testing.T, n *labNode, dev string, attach ebpf.AttachType) []link.ID {
	t.Helper()
	l, err := n.h.LinkByName(dev)
	must(t, "find "+dev, err)
	var res *link.QueryResult
	must(t, "query tcx", privtest.InNetNS(n.ns, func() (err error) {
		res, err = link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: attach})
		return err
	}))
	var ids []link.ID
	for _, p := range res.Programs {
		id, _ := p.LinkID()
		ids = append(ids, id)
	}
	return ids
}

// stats reads f's counters.
func stats(t *testing.T, f *Filter) Stats {
	t.Helper()
	s, err := f.Stats()
	must(t, "Stats", err)
	return s
}

// pinnedDrops reads the drop counters from the pinned map, with no Filter.
func pinnedDrops(t *testing.T, dir string) (in, out uint64) {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, strictMapTrellisSdrops), nil)
	must(t, "load pinned counters", err)
	defer m.Close()
	for dir, p := range []*uint64{&in, &out} {
		var perCPU []uint64
		must(t, "read counter", m.Lookup(uint32(dir), &perCPU))
		for _, n := range perCPU {
			*p += n
		}
	}
	return in, out
}

func hexdump(b []byte) string {
	var s strings.Builder
	for i, c := range b {
		if i > 0 && i%16 == 0 {
			s.WriteString("\n")
		} else if i > 0 {
			s.WriteString(" ")
		}
		fmt.Fprintf(&s, "%02x", c)
	}
	return s.String()
}
