package gossip

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/trellis-mesh/trellis/internal/testutil"
)

// Every member of these tests listens on 127.0.0.1 with a port the kernel
// picks: all traffic stays on loopback.

var loopback = netip.MustParseAddr("127.0.0.1")

func newKey(t testing.TB) []byte {
	t.Helper()
	k := make([]byte, KeySize)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

func testLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: testLogLevel()}))
}

// startMember starts cluster/node on loopback (port AnyPort when port is
// 0) and closes it at cleanup.
func startMember(t testing.TB, key []byte, cluster, node string, port int, seeds ...netip.AddrPort) *Gossip {
	t.Helper()
	if port == 0 {
		port = AnyPort
	}
	g, err := Start(context.Background(), Config{
		Cluster: cluster, Node: node, Region: "r1", BindAddr: loopback, Port: port,
		Key: key, Seeds: seeds, Logger: testLogger(), tune: benchTuning(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// startPool starts n members in two clusters, each seeded with the first,
// and waits until every member sees all n alive.
func startPool(t testing.TB, key []byte, n int) []*Gossip {
	t.Helper()
	var pool []*Gossip
	for i := range n {
		cluster := []string{"eu", "us"}[i%2]
		var seeds []netip.AddrPort
		if i > 0 {
			seeds = []netip.AddrPort{pool[0].LocalAddr()}
		}
		pool = append(pool, startMember(t, key, cluster, fmt.Sprintf("n%d", i), 0, seeds...))
	}
	waitAllSee(t, pool, pool, 10*time.Second, func(name string) (State, bool) { return Alive, true })
	return pool
}

// waitAllSee waits until every observer sees every member of pool in
// the state want says (ok false: don't care).
func waitAllSee(t testing.TB, observers, pool []*Gossip, timeout time.Duration, want func(name string) (State, bool)) {
	t.Helper()
	testutil.EventuallyNoError(t, timeout, "members' views", func() error {
		for _, g := range observers {
			view := g.Members()
			for _, o := range pool {
				st, ok := want(o.Name())
				if !ok {
					continue
				}
				i := slices.IndexFunc(view, func(m Member) bool { return m.Name == o.Name() })
				if i < 0 {
					return fmt.Errorf("%s does not know %s", g.Name(), o.Name())
				}
				if view[i].State != st {
					return fmt.Errorf("%s sees %s %s, want %s", g.Name(), o.Name(), view[i].State, st)
				}
			}
		}
		return nil
	})
}

func stateOf(g *Gossip, name string) (Member, bool) {
	for _, m := range g.Members() {
		if m.Name == name {
			return m, true
		}
	}
	return Member{}, false
}

func TestStartRefusesAMeshWithoutKey(t *testing.T) {
	for _, key := range [][]byte{nil, make([]byte, 16)} {
		g, err := Start(context.Background(), Config{Cluster: "eu", Node: "n1", BindAddr: loopback, Port: AnyPort, Key: key})
		if err == nil {
			g.Close()
			t.Fatalf("key of %d bytes accepted", len(key))
		}
		if len(key) == 0 && !errors.Is(err, ErrNoKey) {
			t.Fatalf("no key: %v, want ErrNoKey", err)
		}
	}
}

func TestMembersCarryMetadata(t *testing.T) {
	pool := startPool(t, newKey(t), 3)
	m, ok := stateOf(pool[2], "us/n1")
	if !ok || m.Cluster != "us" || m.Node != "n1" || m.Region != "r1" || m.Addr != pool[1].LocalAddr() || m.State != Alive {
		t.Fatalf("pool[2] sees us/n1 as %+v", m)
	}
}

// TestCrashIsDead halts a member without leaving, as a crash would: every
// other member declares it dead, nothing else.
func TestCrashIsDead(t *testing.T) {
	pool := startPool(t, newKey(t), 5)
	victim := pool[3]
	killed := time.Now()
	victim.halt()
	rest := slices.Delete(slices.Clone(pool), 3, 4)
	waitAllSee(t, rest, pool, 10*time.Second, func(name string) (State, bool) {
		if name == victim.Name() {
			return Dead, true
		}
		return Alive, true
	})
	for _, g := range rest {
		since, ok := g.Dead()[victim.Name()]
		if !ok || len(g.Dead()) != 1 {
			t.Fatalf("%s: Dead() = %v, members %+v", g.Name(), g.Dead(), g.Members())
		}
		t.Logf("%s saw %s dead after %s", g.Name(), victim.Name(), since.Sub(killed).Round(time.Millisecond))
	}
}

// TestGracefulLeaveIsLeft: Close leaves, which is not dead; the same
// member started again is alive again.
func TestGracefulLeaveIsLeft(t *testing.T) {
	key := newKey(t)
	pool := startPool(t, key, 4)
	leaver := pool[2]
	port := int(leaver.LocalAddr().Port())
	if err := leaver.Close(); err != nil {
		t.Fatal(err)
	}
	rest := slices.Delete(slices.Clone(pool), 2, 3)
	waitAllSee(t, rest, pool, 10*time.Second, func(name string) (State, bool) {
		if name == leaver.Name() {
			return Left, true
		}
		return Alive, true
	})
	for _, g := range rest {
		if d := g.Dead(); len(d) != 0 {
			t.Fatalf("%s: Dead() = %v after a graceful leave", g.Name(), d)
		}
	}
	back := startMember(t, key, "eu", "n2", port, pool[0].LocalAddr())
	waitAllSee(t, append(rest, back), append(rest, back), 10*time.Second, func(string) (State, bool) { return Alive, true })
}

// TestRestartWithinDetectionWindow: a member crashes and its successor
// (same name, same port) is up before the others could decide: it is
// never declared dead, and ends alive everywhere.
func TestRestartWithinDetectionWindow(t *testing.T) {
	key := newKey(t)
	pool := startPool(t, key, 4)
	old := pool[1]
	port := int(old.LocalAddr().Port())
	old.halt()
	back := startMember(t, key, "us", "n1", port, pool[0].LocalAddr())
	rest := []*Gossip{pool[0], pool[2], pool[3], back}
	waitAllSee(t, rest, rest, 10*time.Second, func(string) (State, bool) { return Alive, true })
	testutil.Consistently(t, 3*time.Second, "no member declared dead", func() bool {
		for _, g := range rest {
			if st := g.Stats(); st.Died != 0 {
				t.Logf("%s: %+v", g.Name(), st)
				return false
			}
		}
		return true
	})
}

// TestWrongKeyCannotJoin: a member with another key neither joins nor
// disturbs the pool.
func TestWrongKeyCannotJoin(t *testing.T) {
	pool := startPool(t, newKey(t), 3)
	intruder := startMember(t, newKey(t), "eu", "intruder", 0, pool[0].LocalAddr(), pool[1].LocalAddr())
	testutil.Consistently(t, 3*time.Second, "the intruder stays out", func() bool {
		if n := len(intruder.Members()); n != 1 {
			t.Logf("intruder sees %d members", n)
			return false
		}
		for _, g := range pool {
			if _, ok := stateOf(g, intruder.Name()); ok || len(g.Members()) != 3 || g.Stats().Died != 0 {
				t.Logf("%s sees %v", g.Name(), g.Members())
				return false
			}
		}
		return true
	})
}

// rawMember is a memberlist member with the mesh key that sends whatever
// metadata it is given: a hostile or broken peer.
type rawMember struct{ meta []byte }

func (r rawMember) NodeMeta(int) []byte                { return r.meta }
func (rawMember) NotifyMsg([]byte)                     {}
func (rawMember) GetBroadcasts(_, _ int) [][]byte      { return nil }
func (rawMember) LocalState(bool) []byte               { return nil }
func (rawMember) MergeRemoteState(_ []byte, join bool) {}

func startRaw(t *testing.T, key []byte, name string, meta []byte, seed netip.AddrPort) *memberlist.Memberlist {
	t.Helper()
	mc := memberlist.DefaultLANConfig()
	mc.Name, mc.Label = name, label
	mc.BindAddr, mc.BindPort = "127.0.0.1", 0
	mc.AdvertiseAddr = "127.0.0.1"
	mc.SecretKey = key
	mc.Delegate = rawMember{meta}
	mc.DNSConfigPath = ""
	mc.Logger = log.New(&bytes.Buffer{}, "", 0)
	ml, err := memberlist.Create(mc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ml.Shutdown() })
	// The join itself may fail: our side refuses the member it pushes.
	ml.Join([]string{seed.String()})
	return ml
}

// TestGarbageMetaRejected: peers with the key but metadata that does not
// decode, is invalid, or disagrees with their name are never members.
func TestGarbageMetaRejected(t *testing.T) {
	key := newKey(t)
	pool := startPool(t, key, 3)
	good, err := Meta{Cluster: "us", Node: "n1"}.encode(0)
	if err != nil {
		t.Fatal(err)
	}
	startRaw(t, key, "eu/junk", []byte{0xff, 0, 0xfe}, pool[0].LocalAddr())
	startRaw(t, key, "eu/none", nil, pool[1].LocalAddr())
	startRaw(t, key, "eu/liar", good, pool[2].LocalAddr())
	startRaw(t, key, strings.Repeat("x", 300), []byte{1, 255}, pool[0].LocalAddr())
	testutil.Eventually(t, 5*time.Second, "rejections counted", func() bool {
		return pool[0].Stats().Rejected > 0 && pool[1].Stats().Rejected > 0 && pool[2].Stats().Rejected > 0
	})
	testutil.Consistently(t, 2*time.Second, "only the three real members", func() bool {
		for _, g := range pool {
			if ms := g.Members(); len(ms) != 3 || g.Stats().Died != 0 {
				t.Logf("%s sees %v", g.Name(), ms)
				return false
			}
		}
		return true
	})
}

func TestSetSeedsJoins(t *testing.T) {
	key := newKey(t)
	a := startMember(t, key, "eu", "a", 0)
	b := startMember(t, key, "us", "b", 0)
	if len(a.Members()) != 1 || len(b.Members()) != 1 {
		t.Fatal("joined without seeds")
	}
	b.SetSeeds([]netip.AddrPort{a.LocalAddr(), b.LocalAddr()})
	waitAllSee(t, []*Gossip{a, b}, []*Gossip{a, b}, 5*time.Second, func(string) (State, bool) { return Alive, true })
	select {
	case <-a.Changes():
	default:
		t.Fatal("no change signalled")
	}
}

func TestCloseIsIdempotentAndNilSafe(t *testing.T) {
	var g *Gossip
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	g, err := Start(ctx, Config{Cluster: "eu", Node: "n1", BindAddr: loopback, Port: AnyPort, Key: newKey(t)})
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	g.Close()
	g.Close()
}

// testLogLevel is warn, or debug with GOSSIP_TEST_DEBUG=1.
func testLogLevel() slog.Level {
	if os.Getenv("GOSSIP_TEST_DEBUG") != "" {
		return slog.LevelDebug
	}
	return slog.LevelWarn
}
