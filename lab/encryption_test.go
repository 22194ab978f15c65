package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/trellis-mesh/trellis/agent"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/encryption/wireguard"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/tunnel"
)

// TestLabEncryption switches encryption on a running two-cluster lab the
// way an operator does, while long-lived TCP streams (within a cluster and
// across) keep exchanging checked bytes, and looks at the wire from the
// underlay bridge: clear, one cluster on (a mixed mesh), both on, key
// rotation per cluster and per node, agent restarts under a request loop
// and a kill -9, strict with a stale clear route, off again, and IPsec on
// a kernel without ESP. No stream may see a reset or a lost byte.
func TestLabEncryption(t *testing.T) {
	privtest.RequireRoot(t)
	r := newLabRun(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	r.must(ctx, t, "up")
	l, err := open(Options{Name: r.name, BaseDir: BaseDir}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer l.close()
	opts := Options{Name: r.name, Binary: r.bin, Out: testWriter{t}}
	pod := func(ref string) *podLayout {
		p, err := l.lay.pod(ref)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	node := func(ref string) *nodeLayout {
		n, err := l.lay.node(ref)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	marker := []byte("TRELLIS-PLAINTEXT-" + r.name)
	streams := []testStream{
		startStream(t, pod("eu/client"), pod("us/echo-n2"), 9101, marker), // across clusters
		startStream(t, pod("us/client"), pod("eu/echo-n1"), 9102, marker), // and back
		startStream(t, pod("eu/client"), pod("eu/echo-n2"), 9103, marker), // within eu, node to node
		startStream(t, pod("eu/client"), pod("us/echo-n1"), 9104, marker), // the path strict breaks below
	}
	checkStreams := func(t *testing.T, when string) {
		t.Helper()
		for _, s := range streams {
			s.check(t, when)
		}
	}
	defer func() {
		for _, s := range streams {
			t.Log(s.summary())
		}
	}()
	capture := func(t *testing.T, d time.Duration) *CaptureReport {
		t.Helper()
		c, err := Capture(ctx, opts, marker)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(d)
		rep, err := c.Stop()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("capture:\n%s", rep)
		return rep
	}
	setEncryption := func(t *testing.T, clusters []string, req v1.EncryptionRequest) {
		t.Helper()
		start := time.Now()
		if err := SetEncryption(ctx, opts, clusters, req); err != nil {
			t.Fatal(err)
		}
		t.Logf("encryption %+v on %v: %s", req, clusters, time.Since(start).Round(time.Millisecond))
	}

	step := func(name string, fn func(t *testing.T)) {
		t.Logf("%s begins at %s", name, time.Now().Format("15:04:05.000"))
		t.Run(name, fn)
	}

	step("Clear", func(t *testing.T) {
		checkStreams(t, "before encryption")
		rep := capture(t, 2*time.Second)
		if rep.NodeToNode["udp/8472"] == 0 || rep.MarkerFrames == 0 {
			t.Errorf("clear lab: %d VXLAN frames between nodes, marker in %d frames; want both > 0 (the capture sees nothing?)",
				rep.NodeToNode["udp/8472"], rep.MarkerFrames)
		}
	})

	step("MixedMesh", func(t *testing.T) {
		setEncryption(t, []string{"eu"}, v1.EncryptionRequest{Type: v1.EncryptionWireGuard})
		// eu's nodes encrypt between themselves; with us (no key) they
		// stay in clear, and say so per peer.
		wantPaths(ctx, t, node("eu/n1"), map[string]string{"eu/n2": "encrypted", "us/n1": "tunnel", "us/n2": "tunnel"})
		wantPaths(ctx, t, node("us/n1"), map[string]string{"eu/n1": "tunnel", "eu/n2": "tunnel", "us/n2": "tunnel"})
		checkStreams(t, "after eu turned encryption on")
		rep := capture(t, 2*time.Second)
		if rep.NodeToNode["udp/51871"] == 0 || rep.NodeToNode["udp/8472"] == 0 {
			t.Errorf("mixed mesh: node↔node %v; want both WireGuard (eu↔eu) and VXLAN (eu↔us)", rep.NodeToNode)
		}
	})

	step("Enable", func(t *testing.T) {
		setEncryption(t, []string{"us"}, v1.EncryptionRequest{Type: v1.EncryptionWireGuard})
		for _, n := range l.lay.allNodes() {
			want := map[string]string{}
			for _, o := range l.lay.allNodes() {
				if o != n {
					want[o.ref()] = "encrypted"
				}
			}
			wantPaths(ctx, t, n, want)
		}
		checkStreams(t, "after both clusters turned encryption on")
		rep := capture(t, 3*time.Second)
		// The agents' gossip (51872) is a channel of its own, encrypted
		// with the mesh key; everything else must be WireGuard.
		for kind, n := range rep.PodTraffic() {
			if kind != "udp/51871" && n > 0 {
				t.Errorf("encrypted mesh: %d node↔node frames of %s; want only udp/51871 besides gossip (all: %v)", n, kind, rep.NodeToNode)
			}
		}
		if rep.NodeToNode["udp/51871"] == 0 {
			t.Errorf("encrypted mesh: no WireGuard frames between nodes while streams run: %v", rep.NodeToNode)
		}
		if rep.MarkerFrames != 0 {
			t.Errorf("encrypted mesh: the plaintext marker crossed the underlay in %d frames", rep.MarkerFrames)
		}
		requireGreen(ctx, t, r, "with encryption on")
	})

	step("Rotate", func(t *testing.T) {
		before := publicKeys(ctx, t, l.lay.allNodes())
		start := time.Now()
		if err := RotateEncryption(ctx, opts, "eu"); err != nil {
			t.Fatal(err)
		}
		t.Logf("eu rotated: %s", time.Since(start).Round(time.Millisecond))
		start = time.Now()
		if err := RotateNodeKey(ctx, opts, "us/n1"); err != nil {
			t.Fatal(err)
		}
		t.Logf("us/n1 rotated: %s", time.Since(start).Round(time.Millisecond))
		after := publicKeys(ctx, t, l.lay.allNodes())
		for ref, k := range before {
			changed := after[ref] != k
			if want := ref != "us/n2"; changed != want {
				t.Errorf("key of %s: before %s, after %s; want changed=%v", ref, k, after[ref], want)
			}
		}
		checkStreams(t, "after the rotations")
		rep := capture(t, 2*time.Second)
		if rep.MarkerFrames != 0 {
			t.Errorf("after rotation: the plaintext marker crossed the underlay in %d frames", rep.MarkerFrames)
		}
	})

	step("AgentRestartUnderLoad", func(t *testing.T) {
		n := node("eu/n1")
		socket := filepath.Join(n.stateDir, "wireguard.sock")
		devPID, err := wireguard.DevicePID(ctx, socket)
		if err != nil {
			t.Fatal(err)
		}
		euVIP := serviceURL(t, r.state(t), "eu")
		r.annotate(ctx, t, "trellis.io/affinity=none")
		loop := r.startLoop(ctx, t, "eu/client", euVIP)
		loop.await(t, 1)
		for i := range 3 {
			loop.mark(fmt.Sprintf("restart %d of eu/n1's agent begins", i+1))
			r.must(ctx, t, "restart", "agent", "eu/n1")
			loop.mark(fmt.Sprintf("restart %d of eu/n1's agent done", i+1))
			loop.await(t, 1)
		}
		loop.finish(t, "eu/client → "+euVIP+" while eu/n1's agent restarted with encryption on")
		if got, err := wireguard.DevicePID(ctx, socket); err != nil || got != devPID {
			t.Errorf("eu/n1's WireGuard device process after the restarts: pid %d, %v; want the same %d (adopted, not replaced)", got, err, devPID)
		}
		checkStreams(t, "after eu/n1's agent restarts")
	})

	step("AgentKill9", func(t *testing.T) {
		p := r.state(t).Procs["agent/eu/n1"]
		if p == nil || !p.Alive() {
			t.Fatalf("agent of eu/n1 not running: %+v", p)
		}
		if err := syscall.Kill(p.PID, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		testutil.Eventually(t, 10*time.Second, "agent of eu/n1 gone after SIGKILL", func() bool { return !p.Alive() })
		// Nobody programs eu/n1 now: the device process and the routes
		// carry on by themselves.
		checkStreams(t, "with eu/n1's agent killed")
		rep := capture(t, 2*time.Second)
		if rep.MarkerFrames != 0 {
			t.Errorf("with the agent killed: the plaintext marker crossed the underlay in %d frames", rep.MarkerFrames)
		}
		r.must(ctx, t, "restart", "agent", "eu/n1")
		checkStreams(t, "after eu/n1's agent came back")
	})

	step("Strict", func(t *testing.T) {
		setEncryption(t, nil, v1.EncryptionRequest{Type: v1.EncryptionWireGuard, Strict: true})
		n := node("eu/n1")
		usN1 := node("us/n1")
		// A stale route that sends eu/n1's traffic to us/n1's pods in clear
		// through the tunnel, as after a bug or a race: strict must drop it.
		ns, err := netns.GetFromName(n.ns)
		if err != nil {
			t.Fatal(err)
		}
		defer ns.Close()
		h := privtest.NetlinkHandle(t, ns)
		vx, err := h.LinkByName(tunnel.DefaultVXLANDevice)
		if err != nil {
			t.Fatal(err)
		}
		before := strictDrops(ctx, t, n)
		stale := &netlink.Route{LinkIndex: vx.Attrs().Index, Dst: prefixNet(usN1.podCIDR), Gw: usN1.podCIDR.Addr().AsSlice(),
			Flags: int(netlink.FLAG_ONLINK), Protocol: tunnel.RouteProtocol}
		if err := h.RouteReplace(stale); err != nil {
			t.Fatalf("stale route: %v", err)
		}
		// Clear UDP with the marker, from eu/client to us/echo-n1.
		cap2, err := Capture(ctx, opts, marker)
		if err != nil {
			t.Fatal(err)
		}
		client, target := pod("eu/client"), pod("us/echo-n1")
		inNS(t, client.ns, func() error {
			conn, err := net.Dial("udp", netip.AddrPortFrom(target.ip, 9199).String())
			if err != nil {
				return err
			}
			defer conn.Close()
			for range 20 {
				conn.Write(marker)
				time.Sleep(10 * time.Millisecond)
			}
			return nil
		})
		rep, err := cap2.Stop()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("capture with the stale clear route:\n%s", rep)
		if rep.MarkerFrames != 0 {
			t.Errorf("strict: the plaintext marker crossed the underlay in %d frames", rep.MarkerFrames)
		}
		after := strictDrops(ctx, t, n)
		if after.Egress < before.Egress+20 {
			t.Errorf("strict drops at eu/n1: before %+v, after %+v; want 20 more at egress", before, after)
		}
		// The agent puts its own route back at its next apply; a full
		// restart makes that now.
		r.must(ctx, t, "restart", "agent", "eu/n1")
		wantPaths(ctx, t, n, map[string]string{"us/n1": "encrypted"})
		checkStreams(t, "after strict")
		setEncryption(t, nil, v1.EncryptionRequest{Type: v1.EncryptionWireGuard})
	})

	step("Disable", func(t *testing.T) {
		setEncryption(t, nil, v1.EncryptionRequest{})
		for _, n := range l.lay.allNodes() {
			want := map[string]string{}
			for _, o := range l.lay.allNodes() {
				if o != n {
					want[o.ref()] = "tunnel"
				}
			}
			wantPaths(ctx, t, n, want)
			inNS(t, n.ns, func() error {
				if _, err := netlink.LinkByName(wireguard.DefaultDevice); err == nil {
					return fmt.Errorf("%s still has %s after encryption was turned off", n.ref(), wireguard.DefaultDevice)
				}
				return nil
			})
		}
		checkStreams(t, "after encryption was turned off")
		rep := capture(t, 2*time.Second)
		if rep.NodeToNode["udp/51871"] != 0 || rep.NodeToNode["udp/8472"] == 0 {
			t.Errorf("encryption off: node↔node %v; want VXLAN again and no WireGuard", rep.NodeToNode)
		}
	})

	step("IPsecWithoutESP", func(t *testing.T) {
		err := SetEncryption(ctx, opts, []string{"eu"}, v1.EncryptionRequest{Type: v1.EncryptionIPsec})
		if err == nil {
			t.Skip("this kernel runs IPsec ESP and the lab has no key file: nothing to show here")
		}
		t.Logf("ipsec on eu: %v", err)
		if !strings.Contains(err.Error(), "CONFIG_INET_ESP") && !strings.Contains(err.Error(), "CONFIG_CRYPTO_GCM") {
			t.Errorf("ipsec on a kernel without ESP: %v; want the missing kernel options named", err)
		}
		setEncryption(t, []string{"eu"}, v1.EncryptionRequest{})
		checkStreams(t, "after the IPsec attempt")
	})

	for _, s := range streams {
		if err := s.err(); err != nil {
			t.Errorf("TCP stream %s: %v", s.name, err)
		}
	}
}

// wantPaths waits until n's agent shows each named peer on the wanted path.
func wantPaths(ctx context.Context, t *testing.T, n *nodeLayout, want map[string]string) {
	t.Helper()
	testutil.EventuallyNoError(t, time.Minute, "paths of "+n.ref(), func() error {
		st, err := agent.FetchStatus(ctx, n.socket)
		if err != nil || st.Encryption == nil {
			return fmt.Errorf("no encryption status (%v)", err)
		}
		got := map[string]string{}
		for _, p := range st.Encryption.Peers {
			got[p.Node] = p.Path
		}
		for peer, path := range want {
			if got[peer] != path {
				return fmt.Errorf("want %v, have %v", want, got)
			}
		}
		return nil
	})
}

// publicKeys reads each node's published WireGuard key from its agent.
func publicKeys(ctx context.Context, t *testing.T, nodes []*nodeLayout) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, n := range nodes {
		st, err := agent.FetchStatus(ctx, n.socket)
		if err != nil || st.Encryption == nil || st.Encryption.PublicKey == "" {
			t.Fatalf("key of %s: %v, %+v", n.ref(), err, st.Encryption)
		}
		out[n.ref()] = st.Encryption.PublicKey
	}
	return out
}

func strictDrops(ctx context.Context, t *testing.T, n *nodeLayout) agent.StrictFilterCounter {
	t.Helper()
	var got agent.StrictFilterCounter
	testutil.Eventually(t, 30*time.Second, "strict drop counters of "+n.ref(), func() bool {
		st, err := agent.FetchStatus(ctx, n.socket)
		if err != nil || st.Encryption == nil || st.Encryption.Strictly == nil {
			return false
		}
		got = *st.Encryption.Strictly
		return true
	})
	return got
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// testWriter sends a lab's progress lines to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
