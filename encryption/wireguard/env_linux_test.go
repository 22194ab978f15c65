package wireguard

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/trellis-mesh/trellis/internal/privtest"
)

// The test kit: two (or more) network namespaces joined by veth pairs,
// a device process per namespace started by Open from the test binary
// itself (privtest's re-exec helpers), and TCP helpers.

func TestMain(m *testing.M) {
	privtest.Main(m, map[string]privtest.Helper{
		"wireguard-device": deviceHelper,
		"tcp-sink":         tcpSinkHelper,
		"tcp-source":       tcpSourceHelper,
	})
}

// deviceHelper is the device process as the tests run it: RunDevice with
// the flags Open appends. Unlike the real one it exits when the test
// binary that started it dies (its parent changes), so that a test binary
// killed by a timeout leaves no device process behind.
func deviceHelper(args []string, _ io.Reader, _ io.Writer) int {
	fs := flag.NewFlagSet("wireguard-device", flag.ContinueOnError)
	var cfg DeviceProcessConfig
	fs.StringVar(&cfg.Name, "name", "", "")
	fs.IntVar(&cfg.MTU, "mtu", 0, "")
	fs.StringVar(&cfg.SocketPath, "socket", "", "")
	cfg.MaxProcs = DefaultDeviceMaxProcs()
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx, cancel := context.WithCancelCause(ctx)
	parent := os.Getppid()
	go func() {
		for ctx.Err() == nil {
			if os.Getppid() != parent {
				cancel(errors.New("the test binary that started this device process is gone"))
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
	}()
	if err := RunDevice(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "wireguard-device:", err)
		return 1
	}
	return 0
}

// transferResult is what the TCP helpers print.
type transferResult struct {
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
}

// tcpSinkHelper listens on args[0], prints "ready\n", accepts one
// connection, reads it to EOF and prints a transferResult.
func tcpSinkHelper(args []string, _ io.Reader, stdout io.Writer) int {
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Fprintln(stdout, "ready")
	c, err := ln.Accept()
	ln.Close()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	buf := make([]byte, 256<<10)
	var n int64
	var start time.Time
	for {
		k, err := c.Read(buf)
		if k > 0 && n == 0 {
			start = time.Now()
		}
		n += int64(k)
		if err != nil {
			if err != io.EOF {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			break
		}
	}
	json.NewEncoder(stdout).Encode(transferResult{Bytes: n, Seconds: time.Since(start).Seconds()})
	return 0
}

// tcpSourceHelper connects to args[0] and writes for args[1] (a
// duration), then closes.
func tcpSourceHelper(args []string, _ io.Reader, stdout io.Writer) int {
	d, err := time.ParseDuration(args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	c, err := net.Dial("tcp", args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	buf := make([]byte, 256<<10)
	var n int64
	start := time.Now()
	for time.Since(start) < d {
		k, err := c.Write(buf)
		n += int64(k)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	c.(*net.TCPConn).CloseWrite()
	io.Copy(io.Discard, c)
	c.Close()
	json.NewEncoder(stdout).Encode(transferResult{Bytes: n, Seconds: time.Since(start).Seconds()})
	return 0
}

// node is one namespace of a test: eth0 on the underlay, a pod address
// on lo, and its device.
type node struct {
	t        testing.TB
	name     string
	ns       netns.NsHandle
	h        *netlink.Handle
	underlay netip.Addr   // 10.99.0.N/24 on eth0
	pod      netip.Prefix // 10.98.N.0/24
	podIP    netip.Addr   // 10.98.N.1/32 on lo
	dir      string       // socket, log and key
	cfg      Config
	key      wgtypes.Key

	mu      sync.Mutex
	started []int // PIDs of device processes this test started
}

// newPair makes two nodes whose eth0s are the two ends of one veth pair.
func newPair(t testing.TB) (*node, *node) {
	t.Helper()
	a, b := newNode(t, 1), newNode(t, 2)
	v := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "eth0", MTU: 1500},
		PeerName:      "eth0",
		PeerMTU:       1500,
		PeerNamespace: netlink.NsFd(int(b.ns)),
	}
	// The veth is made from a's handle, so eth0 lands in a's namespace
	// and its peer in b's.
	must(t, "add veth", a.h.LinkAdd(v))
	for _, n := range []*node{a, b} {
		n.addAddr("eth0", netip.PrefixFrom(n.underlay, 24))
		n.linkUp("eth0")
	}
	return a, b
}

// newMesh makes n nodes whose eth0s are ports of one bridge, in a
// namespace of its own.
func newMesh(t testing.TB, n int) []*node {
	t.Helper()
	br, _ := privtest.NewNetNSWithPrefix(t, "trellis-wgbr")
	bh := privtest.NetlinkHandle(t, br)
	must(t, "add br0", bh.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}))
	brl, err := bh.LinkByName("br0")
	must(t, "find br0", err)
	must(t, "set br0 up", bh.LinkSetUp(brl))
	var nodes []*node
	for i := 1; i <= n; i++ {
		nd := newNode(t, i)
		port := fmt.Sprintf("p%d", i)
		must(t, "add veth "+port, bh.LinkAdd(&netlink.Veth{
			LinkAttrs: netlink.LinkAttrs{Name: port, MTU: 1500}, PeerName: "eth0", PeerMTU: 1500,
			PeerNamespace: netlink.NsFd(int(nd.ns)),
		}))
		pl, err := bh.LinkByName(port)
		must(t, "find "+port, err)
		must(t, "enslave "+port, bh.LinkSetMaster(pl, brl))
		must(t, "set "+port+" up", bh.LinkSetUp(pl))
		nd.addAddr("eth0", netip.PrefixFrom(nd.underlay, 24))
		nd.linkUp("eth0")
		nodes = append(nodes, nd)
	}
	return nodes
}

// newNode makes a namespace with lo up, the pod address on lo, a
// directory for the socket, log and key, and a Config whose StartCommand
// re-executes the test binary as the device process.
func newNode(t testing.TB, i int) *node {
	t.Helper()
	ns, _ := privtest.NewNetNSWithPrefix(t, "trellis-wg")
	n := &node{
		t:        t,
		name:     fmt.Sprintf("node%d", i),
		ns:       ns,
		h:        privtest.NetlinkHandle(t, ns),
		underlay: netip.AddrFrom4([4]byte{10, 99, 0, byte(i)}),
		pod:      netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 98, byte(i), 0}), 24),
		podIP:    netip.AddrFrom4([4]byte{10, 98, byte(i), 1}),
	}
	// Short: a unix socket path holds 107 bytes, and t.TempDir's are long.
	dir, err := os.MkdirTemp("", "twg")
	must(t, "temp dir", err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	n.dir = dir
	n.addAddr("lo", netip.PrefixFrom(n.podIP, 32))
	helper := privtest.HelperCommand("wireguard-device")
	n.cfg = Config{
		Mode:         ModeUserspace,
		SocketPath:   filepath.Join(dir, "wg.sock"),
		StartCommand: helper.Args,
		StartEnv:     helper.Env,
		Logger:       testLogger(t).With("node", n.name),
	}
	n.key, err = LoadOrCreateKey(filepath.Join(dir, "wg.key"), n.cfg.Logger)
	must(t, "key", err)
	t.Cleanup(n.cleanup)
	return n
}

// open opens the node's device from inside its namespace, and records a
// device process it did not know of as started by this test.
func (n *node) open(ctx context.Context) (*Device, error) {
	var d *Device
	err := privtest.InNetNS(n.ns, func() error {
		var err error
		d, err = Open(ctx, n.cfg)
		return err
	})
	if err != nil {
		return nil, err
	}
	n.t.Cleanup(func() { d.Close() })
	if pid := d.PID(); pid != 0 {
		n.mu.Lock()
		if !containsInt(n.started, pid) {
			n.started = append(n.started, pid)
		}
		n.mu.Unlock()
	}
	return d, nil
}

func (n *node) mustOpen(ctx context.Context) *Device {
	n.t.Helper()
	d, err := n.open(ctx)
	must(n.t, n.name+": open", err)
	return d
}

// remove runs Remove in the node's namespace.
func (n *node) remove(ctx context.Context) error {
	return privtest.InNetNS(n.ns, func() error { return Remove(ctx, n.cfg) })
}

// cleanup removes the device and kills whatever device process this test
// started that is still running (by pidfd, so only those), and reaps it.
func (n *node) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := n.remove(ctx); err != nil {
		n.t.Errorf("%s: cleanup: %v", n.name, err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, pid := range n.started {
		killStarted(n.t, pid)
	}
	n.dumpLog()
}

// killStarted kills and reaps pid, a child of this test binary, if it is
// still there. Reaping first makes sure the PID is not another process's.
func killStarted(t testing.TB, pid int) {
	var ws unix.WaitStatus
	if wpid, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); wpid == pid || errors.Is(err, unix.ECHILD) {
		return // exited and now reaped, or not our child (reaped before)
	}
	t.Logf("device process %d still running at cleanup: killing it", pid)
	unix.Kill(pid, unix.SIGKILL)
	unix.Wait4(pid, &ws, 0, nil)
}

// dumpLog logs the device processes' log when the test failed.
func (n *node) dumpLog() {
	if !n.t.Failed() {
		return
	}
	data, err := os.ReadFile(filepath.Join(n.dir, "wg.log"))
	if err == nil && len(data) > 0 {
		if len(data) > 16<<10 {
			data = data[len(data)-16<<10:]
		}
		n.t.Logf("%s: device log:\n%s", n.name, data)
	}
}

func (n *node) addAddr(dev string, p netip.Prefix) {
	n.t.Helper()
	l, err := n.h.LinkByName(dev)
	must(n.t, n.name+": find "+dev, err)
	must(n.t, fmt.Sprintf("%s: add %s to %s", n.name, p, dev), n.h.AddrAdd(l, &netlink.Addr{IPNet: ipNetOf(p)}))
}

func (n *node) linkUp(dev string) {
	n.t.Helper()
	l, err := n.h.LinkByName(dev)
	must(n.t, n.name+": find "+dev, err)
	must(n.t, n.name+": set "+dev+" up", n.h.LinkSetUp(l))
}

// routePods routes the other nodes' pod CIDRs through the WireGuard
// device, from this node's pod address.
func (n *node) routePods(others ...*node) {
	n.t.Helper()
	l, err := n.h.LinkByName(DefaultDevice)
	must(n.t, n.name+": find "+DefaultDevice, err)
	for _, o := range others {
		r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNetOf(o.pod), Src: n.podIP.AsSlice(), Scope: netlink.SCOPE_LINK}
		must(n.t, fmt.Sprintf("%s: route %s", n.name, o.pod), n.h.RouteReplace(r))
	}
}

// peer is how the other nodes see n.
func (n *node) peer() Peer {
	return Peer{
		PublicKey:  n.key.PublicKey(),
		Endpoint:   netip.AddrPortFrom(n.underlay, DefaultPort),
		AllowedIPs: []netip.Prefix{n.pod},
	}
}

// deviceConfig is n's DeviceConfig with the others as peers.
func (n *node) deviceConfig(others ...*node) DeviceConfig {
	cfg := DeviceConfig{PrivateKey: n.key}
	for _, o := range others {
		cfg.Peers = append(cfg.Peers, o.peer())
	}
	return cfg
}

// listen opens a TCP listener in n's namespace.
func (n *node) listen(addr string) net.Listener {
	n.t.Helper()
	var ln net.Listener
	must(n.t, n.name+": listen "+addr, privtest.InNetNS(n.ns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	}))
	n.t.Cleanup(func() { ln.Close() })
	return ln
}

// dial opens a TCP connection from n's namespace.
func (n *node) dial(ctx context.Context, addr string) (net.Conn, error) {
	var c net.Conn
	err := privtest.InNetNS(n.ns, func() error {
		var err error
		d := net.Dialer{Timeout: 5 * time.Second}
		c, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	if err == nil {
		n.t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// ping sends one ICMP echo from n to dst (from n's pod address) and waits
// for the reply.
func (n *node) ping(dst netip.Addr, timeout time.Duration) error {
	var pc *icmp.PacketConn
	if err := privtest.InNetNS(n.ns, func() error {
		var err error
		pc, err = icmp.ListenPacket("ip4:icmp", n.podIP.String())
		return err
	}); err != nil {
		return err
	}
	defer pc.Close()
	id := os.Getpid() & 0xffff
	msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: 1, Data: []byte("trellis")}}
	wb, err := msg.Marshal(nil)
	if err != nil {
		return err
	}
	if _, err := pc.WriteTo(wb, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		return fmt.Errorf("ping %s: %w", dst, err)
	}
	pc.SetReadDeadline(time.Now().Add(timeout))
	rb := make([]byte, 1500)
	for {
		k, peer, err := pc.ReadFrom(rb)
		if err != nil {
			return fmt.Errorf("ping %s: %w", dst, err)
		}
		rm, err := icmp.ParseMessage(1, rb[:k])
		if err != nil {
			continue
		}
		if echo, ok := rm.Body.(*icmp.Echo); ok && rm.Type == ipv4.ICMPTypeEchoReply && echo.ID == id && peer.String() == dst.String() {
			return nil
		}
	}
}

// stream is a long-lived TCP connection from one node to another over
// which the sender writes a sequence number every interval; the receiver
// checks the sequence and records the largest gap between deliveries.
type stream struct {
	mu       sync.Mutex
	received uint64
	maxGap   time.Duration
	last     time.Time
	err      error
	done     chan struct{}
	cancel   context.CancelFunc
}

// startStream opens the stream from src to dst's pod address.
func startStream(t testing.TB, ctx context.Context, src, dst *node, port int) *stream {
	t.Helper()
	ln := dst.listen(netip.AddrPortFrom(dst.podIP, uint16(port)).String())
	c, err := src.dial(ctx, netip.AddrPortFrom(dst.podIP, uint16(port)).String())
	must(t, "dial stream", err)
	sc, err := ln.Accept()
	must(t, "accept stream", err)
	t.Cleanup(func() { sc.Close() })
	ctx, cancel := context.WithCancel(ctx)
	s := &stream{done: make(chan struct{}), cancel: cancel, last: time.Now()}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // sender
		defer wg.Done()
		var buf [8]byte
		for seq := uint64(1); ctx.Err() == nil; seq++ {
			binary.BigEndian.PutUint64(buf[:], seq)
			c.SetWriteDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.Write(buf[:]); err != nil {
				s.fail(fmt.Errorf("stream write %d: %w", seq, err))
				return
			}
			select {
			case <-ctx.Done():
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	go func() { // receiver
		defer wg.Done()
		var buf [8]byte
		for want := uint64(1); ; want++ {
			sc.SetReadDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.ReadFull(sc, buf[:]); err != nil {
				if ctx.Err() == nil {
					s.fail(fmt.Errorf("stream read %d: %w", want, err))
				}
				return
			}
			if got := binary.BigEndian.Uint64(buf[:]); got != want {
				s.fail(fmt.Errorf("stream: got sequence %d, want %d", got, want))
				return
			}
			now := time.Now()
			s.mu.Lock()
			s.received = want
			if gap := now.Sub(s.last); gap > s.maxGap {
				s.maxGap = gap
			}
			s.last = now
			s.mu.Unlock()
		}
	}()
	go func() {
		wg.Wait()
		close(s.done)
	}()
	t.Cleanup(func() {
		cancel()
		c.Close()
		sc.Close()
		<-s.done
	})
	return s
}

func (s *stream) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		s.err = err
	}
}

// snapshot returns the count received, the largest gap so far and the
// first error.
func (s *stream) snapshot() (uint64, time.Duration, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.received, s.maxGap, s.err
}

// resetGap starts a new measurement of the largest gap.
func (s *stream) resetGap() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.maxGap = 0
}

// waitFlowing waits until the stream delivered n more messages, failing
// t on a stream error.
func (s *stream) waitFlowing(t testing.TB, n uint64, timeout time.Duration) {
	t.Helper()
	start, _, _ := s.snapshot()
	deadline := time.Now().Add(timeout)
	for {
		got, _, err := s.snapshot()
		if err != nil {
			t.Fatal(err)
		}
		if got >= start+n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream delivered %d messages in %s, want %d", got-start, timeout, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func must(t testing.TB, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func ipNetOf(p netip.Prefix) *net.IPNet {
	n := prefixToIPNet(p)
	return &n
}

func containsInt(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// testLogger logs through t.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// procCPU returns a process's user+system CPU time from /proc/<pid>/stat.
func procCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name may hold spaces; fields start after its ')'.
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no ')'", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: bad utime/stime", pid)
	}
	const clkTck = 100 // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / clkTck, nil
}

// capture counts what crosses a device of a node, from a packet socket
// bound to it: IPv4 frames by protocol and, for UDP and TCP, by port.
type capture struct {
	fd     int
	mu     sync.Mutex
	frames int
	udp    map[uint16]int // by the lower of the two ports
	tcp    int
	other  []string
	done   chan struct{}
	// stop ends the capture; its counts are final afterwards.
	stop func()
}

// startCapture opens a packet socket on dev in n's namespace.
func startCapture(t testing.TB, n *node, dev string) *capture {
	t.Helper()
	l, err := n.h.LinkByName(dev)
	must(t, "find "+dev, err)
	var fd int
	must(t, "packet socket", privtest.InNetNS(n.ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: l.Attrs().Index})
	}))
	// Wake the reader every 100 ms so that stop is noticed.
	tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
	must(t, "SO_RCVTIMEO", unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv))
	c := &capture{fd: fd, udp: map[uint16]int{}, done: make(chan struct{})}
	stop := make(chan struct{})
	go func() {
		defer close(c.done)
		buf := make([]byte, 128) // headers are enough
		for {
			select {
			case <-stop:
				return
			default:
			}
			k, _, err := unix.Recvfrom(fd, buf, unix.MSG_TRUNC)
			if err != nil {
				continue
			}
			c.record(buf[:min(k, len(buf))])
		}
	}()
	t.Cleanup(func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-c.done
		unix.Close(fd)
	})
	c.stop = func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-c.done
	}
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// record classifies one Ethernet frame.
func (c *capture) record(f []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.frames++
	if len(f) < 14 {
		return
	}
	switch binary.BigEndian.Uint16(f[12:14]) {
	case unix.ETH_P_ARP:
		return
	case unix.ETH_P_IP:
	case unix.ETH_P_IPV6:
		// The kernel's own link-local chatter (router and neighbour
		// solicitations, MLD: ICMPv6, or hop-by-hop options first).
		if len(f) >= 14+40 && (f[14+6] == unix.IPPROTO_ICMPV6 || f[14+6] == unix.IPPROTO_HOPOPTS) {
			return
		}
		c.other = append(c.other, "ipv6")
		return
	default:
		c.other = append(c.other, fmt.Sprintf("ethertype %#04x", binary.BigEndian.Uint16(f[12:14])))
		return
	}
	ip := f[14:]
	if len(ip) < 20 {
		return
	}
	ihl := int(ip[0]&0x0f) * 4
	if len(ip) < ihl+4 {
		return
	}
	sport, dport := binary.BigEndian.Uint16(ip[ihl:]), binary.BigEndian.Uint16(ip[ihl+2:])
	switch ip[9] {
	case unix.IPPROTO_IGMP:
		// The kernel's multicast membership reports.
	case unix.IPPROTO_UDP:
		c.udp[min(sport, dport)]++
	case unix.IPPROTO_TCP:
		c.tcp++
	default:
		c.other = append(c.other, fmt.Sprintf("ip proto %d", ip[9]))
	}
}
