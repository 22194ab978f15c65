package wireguard

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/trellis-mesh/trellis/internal/privtest"
)

// meshUp opens the nodes' devices, configures each with all the others as
// peers and routes the others' pod CIDRs through the device.
func meshUp(t testing.TB, ctx context.Context, nodes ...*node) []*Device {
	t.Helper()
	devs := make([]*Device, len(nodes))
	for i, n := range nodes {
		devs[i] = n.mustOpen(ctx)
	}
	for i, n := range nodes {
		others := othersOf(nodes, n)
		if _, err := devs[i].Configure(ctx, n.deviceConfig(others...)); err != nil {
			t.Fatal(err)
		}
		n.routePods(others...)
	}
	return devs
}

func othersOf(nodes []*node, n *node) []*node {
	var out []*node
	for _, o := range nodes {
		if o != n {
			out = append(out, o)
		}
	}
	return out
}

// transfer sends size bytes over TCP from a's pod address to b's and
// checks they all arrived.
func transfer(t testing.TB, ctx context.Context, a, b *node, port uint16, size int) {
	t.Helper()
	addr := netip.AddrPortFrom(b.podIP, port).String()
	ln := b.listen(addr)
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- -1
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}()
	c, err := a.dial(ctx, addr)
	must(t, "dial "+addr, err)
	if _, err := c.Write(make([]byte, size)); err != nil {
		t.Fatalf("write to %s: %v", addr, err)
	}
	c.Close()
	select {
	case n := <-got:
		if n != int64(size) {
			t.Fatalf("%s received %d bytes, want %d", addr, n, size)
		}
	case <-ctx.Done():
		t.Fatalf("transfer to %s: %v", addr, ctx.Err())
	}
}

// TestTwoNodes: ping and TCP between the pod addresses of two namespaces
// go through WireGuard: a packet socket on the receiver's underlay sees
// only UDP to and from the WireGuard port, both peers' byte counters grow
// by at least what was sent, and a handshake happened.
func TestTwoNodes(t *testing.T) {
	privtest.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nodes := newMesh(t, 2)
	a, b := nodes[0], nodes[1]
	devs := meshUp(t, ctx, a, b)
	da, db := devs[0], devs[1]

	capt := startCapture(t, b, "eth0")
	if err := a.ping(b.podIP, 5*time.Second); err != nil {
		t.Fatalf("ping %s from %s: %v", b.podIP, a.podIP, err)
	}
	before, err := da.Status(ctx)
	must(t, "status", err)
	const size = 8 << 20
	transfer(t, ctx, a, b, 8080, size)
	capt.stop()

	after, err := da.Status(ctx)
	must(t, "status", err)
	pa, ok := after.Peer(b.key.PublicKey())
	if !ok {
		t.Fatalf("a's status has no peer b: %+v", after)
	}
	pb, _ := before.Peer(b.key.PublicKey())
	if pa.LastHandshake.IsZero() {
		t.Errorf("no handshake with b: %+v", pa)
	}
	if sent := pa.TxBytes - pb.TxBytes; sent < size {
		t.Errorf("a sent %d bytes through WireGuard to b, want at least %d", sent, size)
	}
	sb, err := db.Status(ctx)
	must(t, "status", err)
	if p, _ := sb.Peer(a.key.PublicKey()); p.RxBytes < size {
		t.Errorf("b received %d bytes through WireGuard from a, want at least %d", p.RxBytes, size)
	}

	capt.mu.Lock()
	defer capt.mu.Unlock()
	t.Logf("on b's eth0: %d frames, UDP by port %v, TCP %d, other %v", capt.frames, capt.udp, capt.tcp, capt.other)
	if capt.tcp != 0 || len(capt.other) != 0 {
		t.Errorf("plaintext on the underlay: %d TCP frames, other %v", capt.tcp, capt.other)
	}
	for port := range capt.udp {
		if port != DefaultPort {
			t.Errorf("UDP on port %d on the underlay, want only %d", port, DefaultPort)
		}
	}
	if capt.udp[DefaultPort] == 0 {
		t.Errorf("no WireGuard packets seen on the underlay")
	}
}

// TestAdoption: an agent that goes (Close) and comes back (Open with the
// same Config) adopts the running device process: same PID, no second
// process, peers in place, and a TCP stream opened before keeps flowing
// with no reset. Open and Close leak no file descriptor.
func TestAdoption(t *testing.T) {
	privtest.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nodes := newMesh(t, 2)
	a, b := nodes[0], nodes[1]
	devs := meshUp(t, ctx, a, b)
	pid := devs[0].PID()
	if pid == 0 {
		t.Fatal("no device process PID")
	}
	s := startStream(t, ctx, a, b, 7000)
	s.waitFlowing(t, 20, 10*time.Second)
	before, err := devs[0].Status(ctx)
	must(t, "status", err)

	fds := openFDs(t)
	for range 3 {
		must(t, "close", devs[0].Close())
		s.waitFlowing(t, 10, 10*time.Second)
		d := a.mustOpen(ctx)
		if d.PID() != pid {
			t.Fatalf("Open adopted PID %d, want the running %d", d.PID(), pid)
		}
		devs[0] = d
	}
	must(t, "close", devs[0].Close())
	if leaked := openFDs(t) - fds; leaked > 0 {
		t.Errorf("Open and Close leaked %d file descriptors", leaked)
	}
	d := a.mustOpen(ctx)
	if n := countChildren(t, "wireguard-device"); n != 2 {
		t.Errorf("%d device processes, want 2 (one per node)", n)
	}
	st, err := d.Status(ctx)
	must(t, "status", err)
	if st.PID != pid || st.PublicKey != a.key.PublicKey() || len(st.Peers) != 1 || st.Peers[0].PublicKey != b.key.PublicKey() {
		t.Fatalf("adopted device: %+v", st)
	}
	if !st.Peers[0].LastHandshake.Equal(before.Peers[0].LastHandshake) {
		t.Errorf("the session was reset: last handshake %v, before %v", st.Peers[0].LastHandshake, before.Peers[0].LastHandshake)
	}
	// Configure with the same input writes nothing on the adopted device.
	res, err := d.Configure(ctx, a.deviceConfig(b))
	must(t, "configure", err)
	if res.Changed() {
		t.Errorf("Configure after adoption wrote %s", describe(res))
	}
	s.waitFlowing(t, 20, 10*time.Second)
	_, gap, err := s.snapshot()
	must(t, "stream", err)
	t.Logf("largest gap in the stream: %s", gap)
	if gap > 2*time.Second {
		t.Errorf("the stream stalled for %s across adoption", gap)
	}
}

// openFDs counts this process's open file descriptors.
func openFDs(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	must(t, "read /proc/self/fd", err)
	return len(ents)
}

// countChildren counts this process's children whose environment names
// the helper.
func countChildren(t testing.TB, helper string) int {
	ents, err := os.ReadDir("/proc")
	must(t, "read /proc", err)
	n := 0
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		ppid, state, err := procParent(pid)
		if err != nil || ppid != self || state == 'Z' {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err == nil && strings.Contains(string(env), "TRELLIS_PRIVTEST_HELPER="+helper+"\x00") {
			n++
		}
	}
	return n
}

// procParent returns a process's parent PID and state from /proc/<pid>/stat.
func procParent(pid int) (int, byte, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, 0, err
	}
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return 0, 0, errors.New("short stat")
	}
	ppid, err := strconv.Atoi(f[1])
	return ppid, f[0][0], err
}

// TestConfigureConverges: Configure twice with the same input writes
// nothing the second time and the sessions survive; changing one peer's
// allowed IPs updates that peer alone, in place: the other peer keeps its
// session and its stream flows on.
func TestConfigureConverges(t *testing.T) {
	privtest.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nodes := newMesh(t, 3)
	a, b, c := nodes[0], nodes[1], nodes[2]
	devs := meshUp(t, ctx, a, b, c)
	da := devs[0]
	sb := startStream(t, ctx, a, b, 7001)
	sc := startStream(t, ctx, a, c, 7002)
	sb.waitFlowing(t, 20, 10*time.Second)
	sc.waitFlowing(t, 20, 10*time.Second)

	before, err := da.Status(ctx)
	must(t, "status", err)
	res, err := da.Configure(ctx, a.deviceConfig(b, c))
	must(t, "configure", err)
	if res.Changed() {
		t.Fatalf("a converged device got writes: %s", describe(res))
	}
	// Peers in another order, allowed IPs unmasked and repeated: the same
	// state.
	same := a.deviceConfig(c, b)
	same.Peers[0].AllowedIPs = append(same.Peers[0].AllowedIPs, netip.PrefixFrom(c.podIP, 24), c.pod)
	if res, err := da.Configure(ctx, same); err != nil || res.Changed() {
		t.Fatalf("the same state written differently: %s, %v", describe(res), err)
	}

	// b also gets 10.98.202.0/24.
	extra := netip.MustParsePrefix("10.98.202.0/24")
	cfg := a.deviceConfig(b, c)
	for i := range cfg.Peers {
		if cfg.Peers[i].PublicKey == b.key.PublicKey() {
			cfg.Peers[i].AllowedIPs = append(cfg.Peers[i].AllowedIPs, extra)
		}
	}
	sb.resetGap()
	sc.resetGap()
	res, err = da.Configure(ctx, cfg)
	must(t, "configure", err)
	if res.PrivateKey || res.ListenPort || len(res.Added) != 0 || len(res.Removed) != 0 ||
		len(res.Updated) != 1 || res.Updated[0] != b.key.PublicKey() {
		t.Fatalf("changing b's allowed IPs wrote %s", describe(res))
	}
	sb.waitFlowing(t, 20, 10*time.Second)
	sc.waitFlowing(t, 20, 10*time.Second)
	after, err := da.Status(ctx)
	must(t, "status", err)
	for _, n := range []*node{b, c} {
		p0, _ := before.Peer(n.key.PublicKey())
		p1, _ := after.Peer(n.key.PublicKey())
		if !p1.LastHandshake.Equal(p0.LastHandshake) {
			t.Errorf("%s's session was reset: handshake %v, before %v", n.name, p1.LastHandshake, p0.LastHandshake)
		}
		if p1.RxBytes <= p0.RxBytes {
			t.Errorf("%s: no traffic after the change", n.name)
		}
	}
	pb, _ := after.Peer(b.key.PublicKey())
	if want := []netip.Prefix{b.pod, extra}; !equalPrefixes(pb.AllowedIPs, want) {
		t.Errorf("b's allowed IPs %v, want %v", pb.AllowedIPs, want)
	}
	for _, s := range []*stream{sb, sc} {
		_, gap, err := s.snapshot()
		must(t, "stream", err)
		if gap > time.Second {
			t.Errorf("a stream stalled for %s", gap)
		}
	}
	if res, err := da.Configure(ctx, cfg); err != nil || res.Changed() {
		t.Fatalf("second Configure of the new state: %s, %v", describe(res), err)
	}

	// Removing c leaves b alone.
	res, err = da.Configure(ctx, a.deviceConfig(b))
	must(t, "configure", err)
	if len(res.Removed) != 1 || res.Removed[0] != c.key.PublicKey() || len(res.Updated) != 1 {
		t.Fatalf("removing c (and b's extra prefix) wrote %s", describe(res))
	}
	sb.waitFlowing(t, 20, 10*time.Second)
	st, err := da.Status(ctx)
	must(t, "status", err)
	if len(st.Peers) != 1 || st.Peers[0].PublicKey != b.key.PublicKey() {
		t.Fatalf("peers after removing c: %+v", st.Peers)
	}
}

func equalPrefixes(a, b []netip.Prefix) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestKeyRotation: a gets a new private key (WriteKey, Configure) and b
// learns a's new public key; a TCP stream between them survives, with no
// reset. The gap in delivery is logged.
func TestKeyRotation(t *testing.T) {
	privtest.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	nodes := newMesh(t, 2)
	a, b := nodes[0], nodes[1]
	devs := meshUp(t, ctx, a, b)
	s := startStream(t, ctx, a, b, 7003)
	back := startStream(t, ctx, b, a, 7004)
	s.waitFlowing(t, 20, 10*time.Second)
	back.waitFlowing(t, 20, 10*time.Second)
	old := a.key.PublicKey()

	// The delay between a's change and b's: in a mesh b learns a's new
	// key from etcd some time later. With none, the two handshakes often
	// cross (each side answers the other's initiation and drops the
	// other's response) and both wait WireGuard's REKEY_TIMEOUT (5 s).
	for round, delay := range []time.Duration{0, 300 * time.Millisecond, time.Second} {
		s.resetGap()
		back.resetGap()
		newKey, err := wgtypes.GeneratePrivateKey()
		must(t, "generate key", err)
		keyPath := filepath.Join(a.dir, "wg.key")
		must(t, "write key", WriteKey(keyPath, newKey))
		loaded, err := LoadOrCreateKey(keyPath, a.cfg.Logger)
		must(t, "reload key", err)
		if loaded != newKey {
			t.Fatal("the key file does not hold the new key")
		}
		start := time.Now()
		a.key = loaded
		res, err := devs[0].Configure(ctx, a.deviceConfig(b))
		must(t, "configure a", err)
		if !res.PrivateKey || len(res.Added)+len(res.Updated)+len(res.Removed) != 0 {
			t.Fatalf("rotating a's key wrote %s", describe(res))
		}
		time.Sleep(delay)
		res, err = devs[1].Configure(ctx, b.deviceConfig(a))
		must(t, "configure b", err)
		if len(res.Added) != 1 || res.Added[0] != a.key.PublicKey() || len(res.Removed) != 1 || res.Removed[0] != old {
			t.Fatalf("b learning a's new key wrote %s", describe(res))
		}
		configured := time.Since(start)
		old = a.key.PublicKey()
		s.waitFlowing(t, 50, 30*time.Second)
		back.waitFlowing(t, 50, 30*time.Second)
		_, gap, err := s.snapshot()
		must(t, "stream a→b", err)
		_, backGap, err := back.snapshot()
		must(t, "stream b→a", err)
		t.Logf("rotation %d: b configured %s after a; largest gap in delivery a→b %s, b→a %s",
			round+1, configured.Round(time.Millisecond), gap.Round(time.Millisecond), backGap.Round(time.Millisecond))
		if gap > time.Second && os.Getenv("WGDEBUG_LOGS") != "" {
			for _, n := range nodes {
				data, _ := os.ReadFile(filepath.Join(n.dir, "wg.log"))
				t.Logf("%s log:\n%s", n.name, data)
			}
		}
		st, err := devs[1].Status(ctx)
		must(t, "status", err)
		if p, ok := st.Peer(a.key.PublicKey()); !ok || p.LastHandshake.Before(start) {
			t.Fatalf("b has no new session with a's new key: %+v", st.Peers)
		}
	}
}

// TestRemoveAndKill: Remove stops the device process (its PID is gone)
// and its link; a device process killed with SIGKILL makes Status and
// Configure fail with ErrDeviceGone, naming the socket, and Open starts
// a new one.
func TestRemoveAndKill(t *testing.T) {
	privtest.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n := newMesh(t, 1)[0]
	d := n.mustOpen(ctx)
	pid := d.PID()
	if _, err := d.Configure(ctx, n.deviceConfig()); err != nil {
		t.Fatal(err)
	}
	pidOf, err := DevicePID(ctx, n.cfg.SocketPath)
	must(t, "DevicePID", err)
	if pidOf != pid {
		t.Fatalf("DevicePID %d, Device.PID %d", pidOf, pid)
	}

	must(t, "remove", n.remove(ctx))
	if err := unix.Kill(pid, 0); !errors.Is(err, unix.ESRCH) {
		t.Errorf("device process %d still there after Remove: kill 0: %v", pid, err)
	}
	if _, err := n.h.LinkByName(DefaultDevice); err == nil {
		t.Errorf("link %s still there after Remove", DefaultDevice)
	}
	if _, err := os.Lstat(n.cfg.SocketPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket still there after Remove: %v", err)
	}
	if _, err := d.Status(ctx); !errors.Is(err, ErrDeviceGone) {
		t.Errorf("Status after Remove: %v, want ErrDeviceGone", err)
	}
	must(t, "remove again", n.remove(ctx))

	// A new one, then kill -9.
	d = n.mustOpen(ctx)
	pid2 := d.PID()
	if pid2 == pid || pid2 == 0 {
		t.Fatalf("Open after Remove: PID %d (before %d)", pid2, pid)
	}
	if _, err := d.Configure(ctx, n.deviceConfig()); err != nil {
		t.Fatal(err)
	}
	must(t, "kill -9", unix.Kill(pid2, unix.SIGKILL))
	waitExited(t, pid2)
	_, err = d.Status(ctx)
	if !errors.Is(err, ErrDeviceGone) || !strings.Contains(err.Error(), n.cfg.SocketPath) {
		t.Errorf("Status after kill -9: %v; want ErrDeviceGone naming %s", err, n.cfg.SocketPath)
	}
	t.Logf("Status after kill -9: %v", err)
	if _, err := d.Configure(ctx, n.deviceConfig()); !errors.Is(err, ErrDeviceGone) {
		t.Errorf("Configure after kill -9: %v, want ErrDeviceGone", err)
	}
	if _, err := os.Lstat(n.cfg.SocketPath); err != nil {
		t.Fatalf("the killed process's socket file: %v (the test wants a stale one)", err)
	}
	d3 := n.mustOpen(ctx)
	if pid3 := d3.PID(); pid3 == 0 || pid3 == pid2 {
		t.Fatalf("Open after kill -9: PID %d (killed %d)", pid3, pid2)
	}
	st, err := d3.Status(ctx)
	must(t, "status", err)
	if len(st.Peers) != 0 || st.PublicKey != (wgtypes.Key{}) {
		t.Errorf("a new device process has state: %+v", st)
	}
}

// waitExited waits until pid, a child of this process, has exited, and
// reaps it.
func waitExited(t testing.TB, pid int) {
	t.Helper()
	var ws unix.WaitStatus
	if _, err := unix.Wait4(pid, &ws, 0, nil); err != nil && !errors.Is(err, unix.ECHILD) {
		t.Fatalf("wait for %d: %v", pid, err)
	}
}

// TestDeviceProcessLifecycle: the socket is 0600 in a 0700 directory; a
// second device process refuses a socket someone serves; deleting the
// link ends the process, which removes its socket; SIGTERM does too.
func TestDeviceProcessLifecycle(t *testing.T) {
	privtest.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n := newMesh(t, 1)[0]
	n.cfg.SocketPath = filepath.Join(n.dir, "run", "wg.sock")
	n.cfg.LogPath = filepath.Join(n.dir, "wg.log")
	d := n.mustOpen(ctx)
	pid := d.PID()
	st, err := os.Stat(n.cfg.SocketPath)
	must(t, "stat socket", err)
	if st.Mode().Perm() != 0o600 || st.Mode().Type() != os.ModeSocket {
		t.Errorf("socket mode %v, want socket 0600", st.Mode())
	}
	dst, err := os.Stat(filepath.Dir(n.cfg.SocketPath))
	must(t, "stat dir", err)
	if dst.Mode().Perm() != 0o700 {
		t.Errorf("socket directory mode %v, want 0700", dst.Mode().Perm())
	}
	l, err := n.h.LinkByName(DefaultDevice)
	must(t, "link", err)
	if l.Attrs().MTU != DefaultMTU || l.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("link: MTU %d, flags %v; want %d and up", l.Attrs().MTU, l.Attrs().Flags, DefaultMTU)
	}

	// A second device process on the same socket refuses to run.
	err = privtest.InNetNS(n.ns, func() error {
		return RunDevice(ctx, DeviceProcessConfig{Name: "twg2", SocketPath: n.cfg.SocketPath})
	})
	if err == nil || !strings.Contains(err.Error(), "served by process") {
		t.Errorf("a second device process on a served socket: %v", err)
	}
	if _, err := n.h.LinkByName("twg2"); err == nil {
		t.Errorf("the refused device process left link twg2")
	}

	// Deleting the link ends the process.
	must(t, "delete link", n.h.LinkDel(l))
	waitExited(t, pid)
	if _, err := os.Lstat(n.cfg.SocketPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket after the link was deleted: %v", err)
	}

	// SIGTERM ends it too, cleanly.
	d = n.mustOpen(ctx)
	must(t, "SIGTERM", unix.Kill(d.PID(), unix.SIGTERM))
	waitExited(t, d.PID())
	if _, err := os.Lstat(n.cfg.SocketPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket after SIGTERM: %v", err)
	}
	logData, _ := os.ReadFile(n.cfg.LogPath)
	for _, want := range []string{"closed (its link was deleted?)", "stopping WireGuard device"} {
		if !strings.Contains(string(logData), want) {
			t.Errorf("device log lacks %q:\n%s", want, logData)
		}
	}
}

// TestOpenRefuses: a link of the device's name that is not a WireGuard
// device, a socket path too long for a unix socket, and a StartCommand
// that fails are errors that name what is wrong.
func TestOpenRefuses(t *testing.T) {
	privtest.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n := newMesh(t, 1)[0]

	must(t, "add veth", n.h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: DefaultDevice}, PeerName: "wgpeer"}))
	_, err := n.open(ctx)
	if err == nil || !strings.Contains(err.Error(), DefaultDevice) || !strings.Contains(err.Error(), "veth") {
		t.Errorf("Open over a veth named %s: %v", DefaultDevice, err)
	}
	l, _ := n.h.LinkByName(DefaultDevice)
	must(t, "delete veth", n.h.LinkDel(l))

	long := n.cfg
	long.SocketPath = "/tmp/" + strings.Repeat("x", 120) + ".sock"
	err = privtest.InNetNS(n.ns, func() error { _, err := Open(ctx, long); return err })
	if err == nil || !strings.Contains(err.Error(), "at most 107") {
		t.Errorf("Open with a %d-byte socket path: %v", len(long.SocketPath), err)
	}
	err = RunDevice(ctx, DeviceProcessConfig{Name: "twg3", SocketPath: long.SocketPath})
	if err == nil || !strings.Contains(err.Error(), "at most 107") {
		t.Errorf("RunDevice with a %d-byte socket path: %v", len(long.SocketPath), err)
	}

	bad := n.cfg
	bad.StartCommand = []string{"/bin/sh", "-c", "echo no such device >&2; exit 3", "sh"}
	err = privtest.InNetNS(n.ns, func() error { _, err := Open(ctx, bad); return err })
	if err == nil || !strings.Contains(err.Error(), "exited with status 3") || !strings.Contains(err.Error(), bad.SocketPath[:len(bad.SocketPath)-5]+".log") ||
		!strings.Contains(err.Error(), "no such device") {
		t.Errorf("Open with a failing StartCommand: %v", err)
	}

}

// TestKernelDevice: ModeKernel makes a kernel WireGuard link, configures
// and removes it. It skips where the kernel has no WireGuard (this
// development machine: the kernel path is untested here).
func TestKernelDevice(t *testing.T) {
	privtest.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n := newMesh(t, 1)[0]
	kcfg := Config{Name: "twgk", Mode: ModeKernel, Logger: n.cfg.Logger}
	err := privtest.InNetNS(n.ns, func() error {
		d, err := Open(ctx, kcfg)
		if err != nil {
			return err
		}
		defer d.Close()
		if _, err := d.Configure(ctx, n.deviceConfig()); err != nil {
			return err
		}
		return Remove(ctx, kcfg)
	})
	privtest.SkipIfNotSupported(t, err)
	if _, err := n.h.LinkByName("twgk"); err == nil {
		t.Errorf("kernel link twgk still there after Remove")
	}
}

// TestStaleSocket: a socket file nobody listens on (a device process
// killed before it could remove it) is removed, and a device process
// started.
func TestStaleSocket(t *testing.T) {
	privtest.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n := newMesh(t, 1)[0]
	ln, err := net.Listen("unix", n.cfg.SocketPath)
	must(t, "listen", err)
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := net.Dial("unix", n.cfg.SocketPath); !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("the stale socket: dial: %v", err)
	}
	d := n.mustOpen(ctx)
	if _, err := d.Status(ctx); err != nil {
		t.Fatal(err)
	}
}
