package wireguard

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// These tests speak the UAPI to a real wireguard-go device, in process: a
// channel TUN (no kernel device, no root) and the default UDP bind on a
// free port, served on a unix socket exactly as the device process serves
// it. They run in the machine's own network namespace, so every endpoint
// is a loopback address (the device sends handshakes to them) on the
// discard port.

// inProcessDevice starts a wireguard-go device serving the UAPI on a
// socket and returns a Device handle on it.
func inProcessDevice(t *testing.T) (*Device, *device.Device) {
	t.Helper()
	dir, err := os.MkdirTemp("", "twgu")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "wg.sock")
	dev := device.NewDevice(tuntest.NewChannelTUN().TUN(), conn.NewDefaultBind(), wgLogger(testLogger(t)))
	t.Cleanup(dev.Close)
	ln, err := listenUAPI(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go dev.IpcHandle(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	cfg := Config{SocketPath: path, Port: freeUDPPort(t), Logger: testLogger(t)}.withDefaults()
	u := &userspace{cfg: cfg, uapi: uapiConn{path}}
	return &Device{cfg: cfg, log: cfg.Logger, mode: ModeUserspace, b: u, user: u}, dev
}

// freeUDPPort returns a UDP port nobody used a moment ago.
func freeUDPPort(t *testing.T) int {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

func newKey(t *testing.T) wgtypes.Key {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestUAPIGet: a get of a device with several peers (IPv4, IPv6 and no
// endpoint, several allowed IPs of both families, a keepalive) parses
// into exactly what was set, and the peer credentials name this process.
func TestUAPIGet(t *testing.T) {
	d, dev := inProcessDevice(t)
	ctx := context.Background()
	priv := newKey(t)
	p1, p2, p3 := newKey(t).PublicKey(), newKey(t).PublicKey(), newKey(t).PublicKey()
	port := d.cfg.Port
	raw := fmt.Sprintf(`private_key=%x
listen_port=%d
public_key=%x
endpoint=127.0.0.2:9
allowed_ip=10.1.2.0/24
allowed_ip=10.1.3.0/24
allowed_ip=fd00:1::/64
persistent_keepalive_interval=25
public_key=%x
endpoint=[::1]:9
allowed_ip=10.1.4.0/24
public_key=%x
allowed_ip=10.1.5.7/32
`, priv[:], port, p1[:], p2[:], p3[:])
	if err := dev.IpcSet(raw); err != nil {
		t.Fatal(err)
	}
	s, pid, err := d.user.uapi.get(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if pid != os.Getpid() {
		t.Errorf("peer credentials name PID %d, want this process %d", pid, os.Getpid())
	}
	if s.PrivateKey != priv || s.ListenPort != port {
		t.Errorf("device: key match %v, port %d; want %d", s.PrivateKey == priv, s.ListenPort, port)
	}
	want := map[wgtypes.Key]peerState{
		p1: {PublicKey: p1, Endpoint: netip.MustParseAddrPort("127.0.0.2:9"), PersistentKeepalive: 25 * time.Second,
			AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.1.2.0/24"), netip.MustParsePrefix("10.1.3.0/24"), netip.MustParsePrefix("fd00:1::/64")}},
		p2: {PublicKey: p2, Endpoint: netip.MustParseAddrPort("[::1]:9"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.1.4.0/24")}},
		p3: {PublicKey: p3, AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.1.5.7/32")}},
	}
	if len(s.Peers) != 3 {
		t.Fatalf("%d peers, want 3: %+v", len(s.Peers), s.Peers)
	}
	for _, p := range s.Peers {
		w := want[p.PublicKey]
		p.AllowedIPs = sortPrefixes(p.AllowedIPs)
		if p.Endpoint != w.Endpoint || p.PersistentKeepalive != w.PersistentKeepalive || !slices.Equal(p.AllowedIPs, w.AllowedIPs) ||
			!p.LastHandshake.IsZero() || p.RxBytes != 0 {
			t.Errorf("peer %s: got %+v, want %+v", p.PublicKey, p, w)
		}
	}

	st, err := d.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.PublicKey != priv.PublicKey() || st.ListenPort != port || st.Mode != ModeUserspace || st.PID != os.Getpid() || len(st.Peers) != 3 {
		t.Errorf("status: %+v", st)
	}
	if !slices.IsSortedFunc(st.Peers, func(a, b PeerStatus) int { return compareKeys(a.PublicKey, b.PublicKey) }) {
		t.Errorf("status peers not ordered by key")
	}
}

// TestUAPIErrno: a set the device refuses comes back as a UAPIError with
// its errno, and the next operation works.
func TestUAPIErrno(t *testing.T) {
	d, _ := inProcessDevice(t)
	ctx := context.Background()
	for _, tc := range []struct {
		req   string
		errno int64
	}{
		{"set=1\npublic_key=zz\n\n", -22},   // EINVAL: not a key
		{"set=1\nlisten_port=abc\n\n", -22}, // EINVAL
		{"set=1\nno_equals_sign\n\n", -71},  // EPROTO: not key=value
		{"set=1\nprivate_key=" + strings.Repeat("0", 63) + "\n\n", -22},
	} {
		_, _, err := d.user.uapi.do(ctx, "set", []byte(tc.req))
		var ue *UAPIError
		if !errors.As(err, &ue) || ue.Errno != tc.errno {
			t.Errorf("%q: %v, want errno=%d", tc.req, err, tc.errno)
			continue
		}
		t.Logf("%q: %v", tc.req, err)
		if _, err := d.Status(ctx); err != nil {
			t.Fatalf("status after a refused set: %v", err)
		}
	}
	// Configure reports the device's refusal: a port another socket holds.
	busy, err := net.ListenPacket("udp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	_, err = d.Configure(ctx, DeviceConfig{PrivateKey: newKey(t), ListenPort: busy.LocalAddr().(*net.UDPAddr).Port})
	var ue *UAPIError
	if !errors.As(err, &ue) || ue.Errno != -98 || !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("Configure on a busy port: %v, want errno=-98 (EADDRINUSE)", err)
	}
}

// TestReadResponse checks the client's reading of answers it must refuse.
func TestReadResponse(t *testing.T) {
	for _, tc := range []struct {
		in, want string
	}{
		{"private_key=00\nerrno=0\n\n", ""},
		{"errno=0\n", "no blank line"},
		{"listen_port=1\n", "unexpected EOF"},
		{"listen_port=1\n\n", "without errno"},
		{"errno=x\n\n", "bad errno"},
		{"errno=-22\n\n", "errno=-22 (invalid argument)"},
	} {
		_, err := readResponse(strings.NewReader(tc.in), "get")
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%q: %v, want %q", tc.in, err, tc.want)
		}
	}
	// Unknown keys are skipped, device-level and peer-level.
	k := newKey(t).PublicKey()
	s, err := parseGet([]byte(fmt.Sprintf("listen_port=5\nfuture_key=1\npublic_key=%x\nfuture_peer_key=2\nallowed_ip=10.0.0.0/8\n", k[:])))
	if err != nil || s.ListenPort != 5 || len(s.Peers) != 1 || s.Peers[0].PublicKey != k || len(s.Peers[0].AllowedIPs) != 1 {
		t.Errorf("parse with unknown keys: %+v, %v", s, err)
	}
	if _, err := parseGet([]byte("public_key=1234\n")); err == nil {
		t.Error("a short public key parsed")
	}
}

// TestConfigureRandomStates applies random desired states, in random
// order, to a real device: after each, the device holds exactly the
// state, the result names exactly the peers added, changed and removed,
// and a second Configure writes nothing.
func TestConfigureRandomStates(t *testing.T) {
	d, _ := inProcessDevice(t)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(1, 2))
	keys := make([]wgtypes.Key, 6)
	for i := range keys {
		keys[i] = newKey(t).PublicKey()
	}
	privs := []wgtypes.Key{newKey(t), newKey(t)}
	ports := []int{d.cfg.Port, freeUDPPort(t)}
	var prev DeviceConfig
	endpoints := map[wgtypes.Key]netip.AddrPort{} // what the device should hold
	for step := range 40 {
		want := DeviceConfig{PrivateKey: privs[rng.IntN(2)], ListenPort: ports[rng.IntN(2)]}
		for i, k := range keys {
			if rng.IntN(3) == 0 {
				continue
			}
			p := Peer{PublicKey: k}
			if rng.IntN(4) != 0 {
				p.Endpoint = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, byte(rng.IntN(2)), byte(i + 1)}), uint16(9+rng.IntN(2)))
			}
			for j := range rng.IntN(3) + 1 {
				p.AllowedIPs = append(p.AllowedIPs, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i + 1), byte(j + rng.IntN(2)*10), 0}), 24))
			}
			if rng.IntN(2) == 0 {
				p.AllowedIPs = append(p.AllowedIPs, netip.MustParsePrefix(fmt.Sprintf("fd00:%x::/64", i+1)))
			}
			p.PersistentKeepalive = time.Duration(rng.IntN(2)*25) * time.Second
			want.Peers = append(want.Peers, p)
		}
		rng.Shuffle(len(want.Peers), func(i, j int) { want.Peers[i], want.Peers[j] = want.Peers[j], want.Peers[i] })

		res, err := d.Configure(ctx, want)
		if err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		checkResult(t, step, prev, want, res)
		st, err := d.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		inPrev := map[wgtypes.Key]bool{}
		for _, p := range prev.Peers {
			inPrev[p.PublicKey] = true
		}
		next := map[wgtypes.Key]netip.AddrPort{}
		for _, p := range want.Peers {
			switch {
			case p.Endpoint.IsValid():
				next[p.PublicKey] = p.Endpoint
			case inPrev[p.PublicKey]:
				next[p.PublicKey] = endpoints[p.PublicKey] // kept
			}
		}
		endpoints = next
		checkStatus(t, step, want, endpoints, st)
		if res, err := d.Configure(ctx, want); err != nil || res.Changed() {
			t.Fatalf("step %d: second Configure wrote %s (%v)", step, describe(res), err)
		}
		prev = want
	}
}

// checkResult compares a ConfigureResult with what going from prev to
// want must write.
func checkResult(t *testing.T, step int, prev, want DeviceConfig, res ConfigureResult) {
	t.Helper()
	if res.PrivateKey != (prev.PrivateKey != want.PrivateKey) {
		t.Errorf("step %d: private key written %v", step, res.PrivateKey)
	}
	if res.ListenPort != (prev.ListenPort != want.ListenPort) {
		t.Errorf("step %d: listen port written %v", step, res.ListenPort)
	}
	before := map[wgtypes.Key]Peer{}
	for _, p := range prev.Peers {
		before[p.PublicKey] = p
	}
	var added, updated, removed []wgtypes.Key
	wanted := map[wgtypes.Key]bool{}
	for _, p := range want.Peers {
		wanted[p.PublicKey] = true
		old, ok := before[p.PublicKey]
		switch {
		case !ok:
			added = append(added, p.PublicKey)
		case (p.Endpoint.IsValid() && p.Endpoint != old.Endpoint) || p.PersistentKeepalive != old.PersistentKeepalive ||
			!slices.Equal(sortPrefixes(slices.Clone(p.AllowedIPs)), sortPrefixes(slices.Clone(old.AllowedIPs))):
			updated = append(updated, p.PublicKey)
		}
	}
	for _, p := range prev.Peers {
		if !wanted[p.PublicKey] {
			removed = append(removed, p.PublicKey)
		}
	}
	for _, s := range [][]wgtypes.Key{added, updated, removed} {
		slices.SortFunc(s, compareKeys)
	}
	if !slices.Equal(res.Added, added) || !slices.Equal(res.Updated, updated) || !slices.Equal(res.Removed, removed) {
		t.Errorf("step %d: wrote %s; want added %d, updated %d, removed %d", step, describe(res), len(added), len(updated), len(removed))
	}
}

// checkStatus compares the device with want and the endpoints it should
// hold (a peer whose endpoint is unset keeps the one it had).
func checkStatus(t *testing.T, step int, want DeviceConfig, endpoints map[wgtypes.Key]netip.AddrPort, st Status) {
	t.Helper()
	if st.PublicKey != want.PrivateKey.PublicKey() || st.ListenPort != want.ListenPort {
		t.Errorf("step %d: device key/port differ", step)
	}
	if len(st.Peers) != len(want.Peers) {
		t.Fatalf("step %d: %d peers, want %d", step, len(st.Peers), len(want.Peers))
	}
	for _, w := range want.Peers {
		p, ok := st.Peer(w.PublicKey)
		if !ok {
			t.Fatalf("step %d: peer %s missing", step, w.PublicKey)
		}
		if p.Endpoint != endpoints[w.PublicKey] || p.PersistentKeepalive != w.PersistentKeepalive ||
			!slices.Equal(p.AllowedIPs, sortPrefixes(slices.Clone(w.AllowedIPs))) {
			t.Errorf("step %d: peer %s: %+v, want %+v", step, w.PublicKey, p, w)
		}
	}
}

// TestConfigureRefuses: input Configure cannot write is refused before
// anything is written.
func TestConfigureRefuses(t *testing.T) {
	d, _ := inProcessDevice(t)
	ctx := context.Background()
	priv := newKey(t)
	peer := newKey(t).PublicKey()
	for _, tc := range []struct {
		name string
		cfg  DeviceConfig
		want string
	}{
		{"no key", DeviceConfig{}, "no private key"},
		{"own key", DeviceConfig{PrivateKey: priv, Peers: []Peer{{PublicKey: priv.PublicKey()}}}, "own public key"},
		{"twice", DeviceConfig{PrivateKey: priv, Peers: []Peer{{PublicKey: peer}, {PublicKey: peer}}}, "listed twice"},
		{"no port", DeviceConfig{PrivateKey: priv, Peers: []Peer{{PublicKey: peer, Endpoint: netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), 0)}}}, "without port"},
		{"bad prefix", DeviceConfig{PrivateKey: priv, Peers: []Peer{{PublicKey: peer, AllowedIPs: []netip.Prefix{{}}}}}, "invalid allowed IP"},
		{"keepalive", DeviceConfig{PrivateKey: priv, Peers: []Peer{{PublicKey: peer, PersistentKeepalive: 100000 * time.Second}}}, "keepalive"},
		{"port", DeviceConfig{PrivateKey: priv, ListenPort: 70000}, "out of range"},
	} {
		_, err := d.Configure(ctx, tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	st, err := d.Status(ctx)
	if err != nil || st.PublicKey != (wgtypes.Key{}) || len(st.Peers) != 0 {
		t.Errorf("refused configurations wrote something: %+v, %v", st, err)
	}
	d.Close()
	if _, err := d.Status(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("Status after Close: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	var nilDev *Device
	if err := nilDev.Close(); err != nil {
		t.Errorf("Close on nil: %v", err)
	}
}

// TestFormatSet pins the request Configure sends for each kind of change.
func TestFormatSet(t *testing.T) {
	priv := newKey(t)
	a, b, c := newKey(t).PublicKey(), newKey(t).PublicKey(), newKey(t).PublicKey()
	cur := state{PrivateKey: priv, ListenPort: 51871, Peers: []peerState{
		{PublicKey: a, Endpoint: netip.MustParseAddrPort("10.0.0.1:51871"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")}},
		{PublicKey: b, Endpoint: netip.MustParseAddrPort("10.0.0.2:51871"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/24")}},
	}}
	want, err := DeviceConfig{PrivateKey: priv, Peers: []Peer{
		{PublicKey: a, Endpoint: netip.MustParseAddrPort("10.0.0.1:51871"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24"), netip.MustParsePrefix("10.1.1.0/24")}},
		{PublicKey: c, Endpoint: netip.MustParseAddrPort("[fd00::3]:51871"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.3.0.0/24")}, PersistentKeepalive: 25 * time.Second},
	}}.normalize(51871)
	if err != nil {
		t.Fatal(err)
	}
	set, res := plan(cur, want)
	got := string(formatSet(set))
	hex := func(k wgtypes.Key) string { return fmt.Sprintf("%x", k[:]) }
	// a is updated (its allowed IPs alone), c added, in key order; b
	// removed last; the private key and port are not written.
	aText := "public_key=" + hex(a) + "\nupdate_only=true\nreplace_allowed_ips=true\nallowed_ip=10.1.0.0/24\nallowed_ip=10.1.1.0/24\n"
	cText := "public_key=" + hex(c) + "\nendpoint=[fd00::3]:51871\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.3.0.0/24\n"
	if compareKeys(a, c) > 0 {
		aText, cText = cText, aText
	}
	wantText := "set=1\n" + aText + cText + "public_key=" + hex(b) + "\nremove=true\n\n"
	if got != wantText {
		t.Errorf("set request:\n%s\nwant:\n%s", got, wantText)
	}
	if res.PrivateKey || res.ListenPort || len(res.Added) != 1 || len(res.Updated) != 1 || len(res.Removed) != 1 {
		t.Errorf("result: %s", describe(res))
	}
	if set, res := plan(cur, DeviceConfig{PrivateKey: priv, ListenPort: 51871, Peers: []Peer{
		{PublicKey: a, AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")}},
		{PublicKey: b, Endpoint: netip.MustParseAddrPort("10.0.0.2:51871"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/24")}},
	}}); res.Changed() || len(set.Peers) != 0 {
		t.Errorf("a converged state (a's endpoint left to learning) plans %s", describe(res))
	}
}
