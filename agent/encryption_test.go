package agent

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/tunnel"
)

// fakeWireGuard records what the encryption step asks of the device. The
// decisions (paths, order, drain, rotation) are tested against it; the
// real device carries traffic in encryption/wireguard's tests and the
// lab's end-to-end ones.
type fakeWireGuard struct {
	running   bool
	key       int // the private key's generation
	peers     []wgPeer
	handshake map[string]time.Time // by public key
	rx        map[string]uint64
	calls     []string
}

func (f *fakeWireGuard) pub() string { return fmt.Sprintf("key-%d", f.key) }

func (f *fakeWireGuard) Up(context.Context) (string, error) {
	if !f.running {
		f.calls = append(f.calls, "up")
		f.running = true
	}
	return f.pub(), nil
}
func (f *fakeWireGuard) Running(context.Context) bool { return f.running }
func (f *fakeWireGuard) Rotate(context.Context) (string, error) {
	f.key++
	f.calls = append(f.calls, "rotate")
	return f.pub(), nil
}
func (f *fakeWireGuard) SetPeers(_ context.Context, peers []wgPeer) error {
	var keys []string
	for _, p := range peers {
		keys = append(keys, p.PublicKey)
	}
	f.calls = append(f.calls, fmt.Sprintf("peers %v", keys))
	f.peers = peers
	return nil
}
func (f *fakeWireGuard) Peers(context.Context) (map[string]wgPeerStatus, error) {
	out := map[string]wgPeerStatus{}
	for _, p := range f.peers {
		out[p.PublicKey] = wgPeerStatus{LastHandshake: f.handshake[p.PublicKey], RxBytes: f.rx[p.PublicKey]}
	}
	return out, nil
}
func (f *fakeWireGuard) Down(context.Context) error {
	f.calls = append(f.calls, "down")
	f.running, f.peers = false, nil
	return nil
}
func (f *fakeWireGuard) Close() error { return nil }

type fakeFilter struct {
	prefixes []netip.Prefix
	removed  bool
	egress   atomic.Uint64 // drops, counted by the "kernel" between steps
}

func (f *fakeFilter) Set(_ context.Context, p []netip.Prefix) error {
	f.prefixes = slices.Clone(p)
	slices.SortFunc(f.prefixes, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return nil
}
func (f *fakeFilter) Drops() (uint64, uint64, error) { return 0, f.egress.Load(), nil }
func (f *fakeFilter) Remove() error                  { f.removed = true; return nil }
func (f *fakeFilter) Close() error                   { return nil }

// encTest is one node (eu/n1) with its encryptor and a mesh of remote
// nodes in a snapshot it edits.
type encTest struct {
	t      *testing.T
	wg     *fakeWireGuard
	filter *fakeFilter
	e      *encryptor
	now    time.Time
	snap   *clustermesh.Snapshot
}

func newEncTest(t *testing.T, dir string) *encTest {
	et := &encTest{t: t, wg: &fakeWireGuard{handshake: map[string]time.Time{}, rx: map[string]uint64{}}, now: time.Unix(1_800_000_000, 0)}
	et.e = newEncryptor(nodeRef{"eu", "n1"}, 51871, et.wg, func() (strictFilter, error) {
		et.filter = &fakeFilter{}
		return et.filter, nil
	}, filepath.Join(dir, "rotation"), "", slog.New(slog.DiscardHandler))
	et.e.now = func() time.Time { return et.now }
	et.snap = &clustermesh.Snapshot{Nodes: map[string]map[string]*v1.Node{
		"eu": {"n1": node("eu", "n1", 1, "")},
		"us": {"n2": node("us", "n2", 2, "us-key"), "n3": node("us", "n3", 3, "")},
	}}
	return et
}

func node(cluster, name string, i int, key string) *v1.Node {
	return &v1.Node{Cluster: cluster, Name: name, IPs: []netip.Addr{netip.AddrFrom4([4]byte{192, 168, 0, byte(i)})},
		PodCIDRs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), 0, 0}), 24)}, WireGuardPublicKey: key}
}

// step runs the encryption step, the tunnel (not here) and finish, and
// returns the paths.
func (et *encTest) step() map[string]tunnel.Path {
	et.t.Helper()
	paths, _, err := et.e.step(context.Background(), et.snap)
	if err != nil {
		et.t.Fatalf("step: %v", err)
	}
	if err := et.e.finish(context.Background()); err != nil {
		et.t.Fatalf("finish: %v", err)
	}
	return paths
}

func (et *encTest) wantPaths(got map[string]tunnel.Path, want map[string]tunnel.Path) {
	et.t.Helper()
	// Absent means the tunnel.
	for k, v := range got {
		if v == tunnel.PathTunnel {
			delete(got, k)
		}
	}
	if !maps.Equal(got, want) {
		et.t.Fatalf("paths %v, want %v", got, want)
	}
}

// Encryption on: the peer is configured at once, but its route moves only
// after a handshake; from then on it stays encrypted even when handshakes
// stop (no downgrade to clear); a node without a key stays in clear.
func TestEncryptionPathWaitsForHandshake(t *testing.T) {
	et := newEncTest(t, t.TempDir())
	et.snap.Encryption = v1.EncryptionConfig{Type: v1.EncryptionWireGuard}
	paths, again, err := et.e.step(context.Background(), et.snap)
	if err != nil {
		t.Fatal(err)
	}
	et.wantPaths(paths, map[string]tunnel.Path{})
	if again == 0 {
		t.Fatal("a peer waits for its handshake, but the step asks for no retry")
	}
	if len(et.wg.peers) != 1 || et.wg.peers[0].PublicKey != "us-key" || et.wg.peers[0].Endpoint.String() != "192.168.0.2:51871" ||
		et.wg.peers[0].Keepalive == 0 || et.wg.peers[0].AllowedIPs[0].String() != "10.2.0.0/24" {
		t.Fatalf("peers %+v", et.wg.peers)
	}
	if key, _ := et.e.Published(); key.WireGuard != "key-0" {
		t.Fatalf("published %q", key)
	}

	et.wg.handshake["us-key"] = et.now.Add(-time.Second)
	et.wantPaths(et.step(), map[string]tunnel.Path{"us/n2": tunnel.PathEncrypted})

	// Handshakes stop (UDP 51871 blocked, say): the route stays.
	et.now = et.now.Add(time.Hour)
	et.wantPaths(et.step(), map[string]tunnel.Path{"us/n2": tunnel.PathEncrypted})

	st := et.e.Status()
	if len(st.Peers) != 2 || st.Peers[0].Node != "us/n2" || st.Peers[0].Path != "encrypted" || st.Peers[1].Node != "us/n3" || st.Peers[1].Path != "tunnel" {
		t.Fatalf("status peers %+v", st.Peers)
	}
	// Status reads handshakes and counters from the device, not from the
	// last step: no step runs while the mesh is quiet.
	et.wg.handshake["us-key"], et.wg.rx["us-key"] = et.now, 4096
	if st := et.e.Status(); !st.Peers[0].LastHandshake.Equal(et.now) || st.Peers[0].RxBytes != 4096 {
		t.Fatalf("status of us/n2 after a handshake since the last step: %+v", st.Peers[0])
	}
}

// Strict: before the handshake the peer is blocked, never in clear; the
// filter holds the pod CIDRs of every keyed node; strict off removes it.
func TestEncryptionStrict(t *testing.T) {
	et := newEncTest(t, t.TempDir())
	et.snap.Encryption = v1.EncryptionConfig{Type: v1.EncryptionWireGuard, Strict: true}
	et.wantPaths(et.step(), map[string]tunnel.Path{"us/n2": tunnel.PathBlocked})
	if et.filter == nil || len(et.filter.prefixes) != 1 || et.filter.prefixes[0].String() != "10.2.0.0/24" {
		t.Fatalf("filter %+v", et.filter)
	}
	et.wg.handshake["us-key"] = et.now
	et.wantPaths(et.step(), map[string]tunnel.Path{"us/n2": tunnel.PathEncrypted})
	// Drops between applies show in status at once.
	et.filter.egress.Add(20)
	if got := et.e.Status().Strictly; got == nil || got.Egress != 20 {
		t.Fatalf("strict drops in status after 20 drops since the last step: %+v", got)
	}

	et.snap.Encryption.Strict = false
	et.step()
	if !et.filter.removed {
		t.Fatal("strict off left the filter")
	}
}

// A peer that withdraws its key moves back to the tunnel at once, and
// stays on the device for peerLinger, while it drains (it sends
// encrypted until it sees its own withdrawal): then it goes.
func TestEncryptionPeerLeavesAfterRoute(t *testing.T) {
	et := newEncTest(t, t.TempDir())
	et.snap.Encryption = v1.EncryptionConfig{Type: v1.EncryptionWireGuard}
	et.wg.handshake["us-key"] = et.now
	et.wantPaths(et.step(), map[string]tunnel.Path{"us/n2": tunnel.PathEncrypted})

	et.snap.Nodes["us"]["n2"] = node("us", "n2", 2, "")
	paths, again, err := et.e.step(context.Background(), et.snap)
	if err != nil {
		t.Fatal(err)
	}
	et.wantPaths(paths, map[string]tunnel.Path{})
	if again != peerLinger {
		t.Errorf("step asks to run again in %s; want %s, when the lingering peer goes", again, peerLinger)
	}
	if err := et.e.finish(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(et.wg.peers) != 1 {
		t.Fatalf("the peer left the device while it may still be draining: %+v", et.wg.peers)
	}
	et.now = et.now.Add(peerLinger / 2)
	et.wantPaths(et.step(), map[string]tunnel.Path{})
	if len(et.wg.peers) != 1 {
		t.Fatalf("the peer left the device halfway through its linger: %+v", et.wg.peers)
	}
	et.now = et.now.Add(peerLinger / 2)
	et.wantPaths(et.step(), map[string]tunnel.Path{})
	if len(et.wg.peers) != 0 {
		t.Fatalf("the peer is still on the device after its linger: %+v", et.wg.peers)
	}

	// It comes back with a new key: a handshake again before the route.
	et.snap.Nodes["us"]["n2"] = node("us", "n2", 2, "us-key-2")
	et.wantPaths(et.step(), map[string]tunnel.Path{})
	et.wg.handshake["us-key-2"] = et.now
	et.wantPaths(et.step(), map[string]tunnel.Path{"us/n2": tunnel.PathEncrypted})

	// A rotation of its key keeps the route on the device.
	et.snap.Nodes["us"]["n2"] = node("us", "n2", 2, "us-key-3")
	et.wantPaths(et.step(), map[string]tunnel.Path{"us/n2": tunnel.PathEncrypted})
	if len(et.wg.peers) != 1 || et.wg.peers[0].PublicKey != "us-key-3" {
		t.Fatalf("peers after the peer's rotation: %+v", et.wg.peers)
	}
}

// The setting's rotation count going up rotates the key once; a restarted
// agent (same state dir) does not rotate again; the first enable takes the
// count without rotating.
func TestEncryptionRotation(t *testing.T) {
	dir := t.TempDir()
	et := newEncTest(t, dir)
	et.snap.Encryption = v1.EncryptionConfig{Type: v1.EncryptionWireGuard, Rotation: 4}
	et.step()
	if slices.Contains(et.wg.calls, "rotate") {
		t.Fatal("the first enable rotated")
	}
	et.snap.Encryption.Rotation = 5
	et.step()
	et.step()
	if n := count(et.wg.calls, "rotate"); n != 1 {
		t.Fatalf("%d rotations for one count, want 1 (%v)", n, et.wg.calls)
	}
	if key, _ := et.e.Published(); key.WireGuard != "key-1" {
		t.Fatalf("published %q after the rotation, want key-1", key)
	}

	restarted := newEncTest(t, dir)
	restarted.wg.key = 1
	restarted.snap.Encryption = et.snap.Encryption
	restarted.step()
	if slices.Contains(restarted.wg.calls, "rotate") {
		t.Fatal("a restarted agent rotated again for the same count")
	}
	restarted.e.AskRotate()
	restarted.step()
	if key, _ := restarted.e.Published(); key.WireGuard != "key-2" {
		t.Fatalf("published %q after rotate-key, want key-2", key)
	}
}

func count(calls []string, what string) int {
	n := 0
	for _, c := range calls {
		if c == what {
			n++
		}
	}
	return n
}

// Turning off: the key is withdrawn first and the routes stay on the
// device until this node's own entry shows the withdrawal and the grace
// passed; then the routes move back; the device goes once its peers went
// quiet. A device left over by an earlier process is drained too.
func TestEncryptionOffDrains(t *testing.T) {
	et := newEncTest(t, t.TempDir())
	et.snap.Encryption = v1.EncryptionConfig{Type: v1.EncryptionWireGuard}
	et.wg.handshake["us-key"] = et.now
	et.step()
	et.snap.Nodes["eu"]["n1"] = node("eu", "n1", 1, "key-0") // published

	et.snap.Encryption = v1.EncryptionConfig{}
	et.wantPaths(et.step(), map[string]tunnel.Path{"us/n2": tunnel.PathEncrypted})
	if key, _ := et.e.Published(); key.WireGuard != "" {
		t.Fatalf("published %q after off, want none", key)
	}
	// The grace passes, but the withdrawal is not visible yet.
	et.now = et.now.Add(10 * time.Second)
	et.wantPaths(et.step(), map[string]tunnel.Path{"us/n2": tunnel.PathEncrypted})
	et.snap.Nodes["eu"]["n1"] = node("eu", "n1", 1, "")
	et.wantPaths(et.step(), map[string]tunnel.Path{})
	if !et.wg.running {
		t.Fatal("the device went together with the routes")
	}
	// The peer keeps sending for a while.
	et.wg.rx["us-key"] = 1000
	et.now = et.now.Add(4 * time.Second)
	et.step()
	if !et.wg.running {
		t.Fatal("the device went while its peer was still sending")
	}
	et.now = et.now.Add(drainQuiet)
	et.step()
	if et.wg.running || et.e.Status().Draining {
		t.Fatalf("device running %v after the peers went quiet", et.wg.running)
	}

	// A restarted agent finds a device while the setting is off.
	left := newEncTest(t, t.TempDir())
	left.wg.running = true
	left.step()
	left.now = left.now.Add(drainGrace)
	left.step()
	left.now = left.now.Add(drainQuiet)
	left.step()
	if left.wg.running {
		t.Fatal("a leftover device was not drained")
	}
}
