//go:build linux

package bpf

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

func tcpService(backends ...Backend) Service {
	return Service{VIP: testVIP, Port: testVIPPort.Port(), Proto: TCP, Backends: backends}
}

func udpService(backends ...Backend) Service {
	return Service{VIP: testVIP, Port: testVIPPort.Port(), Proto: UDP, Backends: backends}
}

func mustSet(t testing.TB, lb *LB, services ...Service) {
	t.Helper()
	if err := lb.Set(context.Background(), services); err != nil {
		t.Fatal(err)
	}
}

func wantCounts(t testing.TB, what string, got, want map[string]int) {
	t.Helper()
	if !maps.Equal(got, want) {
		t.Fatalf("%s = %v, want %v", what, got, want)
	}
}

func TestTCPConnectTranslates(t *testing.T) {
	env := newLBEnv(t)
	lb := open(t, Config{CgroupPath: env.cgroup})
	mustSet(t, lb, tcpService(backend1))

	r := env.client(t, true, "tcp", testVIPPort.String(), "20")
	wantCounts(t, "answered by", r.Names, map[string]int{"backend-1": 20})
	wantCounts(t, "getpeername", r.Peers, map[string]int{testVIPPort.String(): 20})

	// connect4 remembered which VIP each socket asked for in the socket's
	// slot of the conn array, not in the LRU, which is sendmsg4's.
	conns := connEntries(t, lb.Objects())
	if len(conns) != 20 {
		t.Fatalf("%d conn entries, want 20", len(conns))
	}
	for _, c := range conns {
		if c.vip != testVIPPort || c.backend != netip.AddrPortFrom(backend1.IP, backend1.Port) {
			t.Fatalf("conn entry %+v", c)
		}
	}
	rev, err := lb.Objects().RevNAT.Dump()
	if err != nil {
		t.Fatal(err)
	}
	if len(rev) != 0 {
		t.Fatalf("TCP connects wrote %d entries into the reverse LRU: %v", len(rev), rev)
	}

	// A connection straight to the backend is left alone, getpeername too.
	be := netip.AddrPortFrom(backend1.IP, backend1.Port).String()
	r = env.client(t, true, "tcp", be, "3")
	wantCounts(t, "direct getpeername", r.Peers, map[string]int{be: 3})
}

// connEntry is a used slot of the conn array.
type connEntry struct {
	cookie       uint64
	backend, vip netip.AddrPort
}

// connEntries returns the used slots of the conn array.
func connEntries(t testing.TB, o *Objects) []connEntry {
	t.Helper()
	var (
		out []connEntry
		idx uint32
		raw socklbLb4Conn
	)
	it := o.objs.TrellisConn4.Iterate()
	for it.Next(&idx, &raw) {
		if raw.Cookie == 0 {
			continue
		}
		if raw.Seq%2 != 0 || uint32(raw.Cookie%uint64(o.objs.TrellisConn4.MaxEntries())) != idx {
			t.Fatalf("conn slot %d: %+v", idx, raw)
		}
		out = append(out, connEntry{
			cookie:  raw.Cookie,
			backend: netip.AddrPortFrom(ip4FromRaw(raw.BeIp), portFromRaw(raw.BePort)),
			vip:     netip.AddrPortFrom(ip4FromRaw(raw.Vip), portFromRaw(raw.VipPort)),
		})
	}
	if err := it.Err(); err != nil {
		t.Fatalf("read conn array: %v", err)
	}
	return out
}

func TestNotInCgroupNotTranslated(t *testing.T) {
	env := newLBEnv(t)
	lb := open(t, Config{CgroupPath: env.cgroup})
	mustSet(t, lb, tcpService(backend1), udpService(backend1))

	r := env.client(t, false, "tcp", testVIPPort.String(), "5")
	wantCounts(t, "tcp answered by", r.Names, map[string]int{"untranslated": 5})
	r = env.client(t, false, "udp", testVIPPort.String(), "5", "sendto")
	wantCounts(t, "udp answered by", r.Names, map[string]int{"untranslated": 5})
}

func TestUDPRepliesComeFromVIP(t *testing.T) {
	env := newLBEnv(t)
	lb := open(t, Config{CgroupPath: env.cgroup})
	mustSet(t, lb, udpService(backend1))

	t.Run("sendto", func(t *testing.T) {
		r := env.client(t, true, "udp", testVIPPort.String(), "10", "sendto")
		wantCounts(t, "answered by", r.Names, map[string]int{"backend-1": 10})
		wantCounts(t, "recvfrom source", r.Peers, map[string]int{testVIPPort.String(): 10})
	})
	t.Run("connected", func(t *testing.T) {
		r := env.client(t, true, "udp", testVIPPort.String(), "10", "connect")
		wantCounts(t, "answered by", r.Names, map[string]int{"backend-1": 10})
		wantCounts(t, "peers", r.Peers, map[string]int{
			testVIPPort.String():                  10,
			"getpeername=" + testVIPPort.String(): 1,
		})
	})
}

func TestProtocolIsPartOfTheKey(t *testing.T) {
	env := newLBEnv(t)
	lb := open(t, Config{CgroupPath: env.cgroup})
	mustSet(t, lb, tcpService(backend1), udpService(backend2))

	r := env.client(t, true, "tcp", testVIPPort.String(), "5")
	wantCounts(t, "tcp answered by", r.Names, map[string]int{"backend-1": 5})
	r = env.client(t, true, "udp", testVIPPort.String(), "5", "sendto")
	wantCounts(t, "udp answered by", r.Names, map[string]int{"backend-2": 5})
}

func TestBackendsSpreadAndRemoval(t *testing.T) {
	env := newLBEnv(t)
	lb := open(t, Config{CgroupPath: env.cgroup})
	mustSet(t, lb, tcpService(backend1, backend2), udpService(backend1, backend2))

	r := env.client(t, true, "tcp", testVIPPort.String(), "200")
	if r.OK != 200 || r.Names["backend-1"] < 40 || r.Names["backend-2"] < 40 {
		t.Fatalf("200 TCP connections spread as %v, errors %v", r.Names, r.Errors)
	}
	r = env.client(t, true, "udp", testVIPPort.String(), "200", "sendto")
	if r.OK != 200 || r.Names["backend-1"] < 40 || r.Names["backend-2"] < 40 {
		t.Fatalf("200 UDP datagrams spread as %v, errors %v", r.Names, r.Errors)
	}
	wantCounts(t, "udp sources", r.Peers, map[string]int{testVIPPort.String(): 200})

	mustSet(t, lb, tcpService(backend2), udpService(backend2))
	r = env.client(t, true, "tcp", testVIPPort.String(), "50")
	wantCounts(t, "after removal, answered by", r.Names, map[string]int{"backend-2": 50})
	r = env.client(t, true, "udp", testVIPPort.String(), "50", "sendto")
	wantCounts(t, "after removal, udp answered by", r.Names, map[string]int{"backend-2": 50})

	// Removing the service stops translation.
	mustSet(t, lb)
	r = env.client(t, true, "tcp", testVIPPort.String(), "5")
	wantCounts(t, "after delete, answered by", r.Names, map[string]int{"untranslated": 5})
}

func TestServiceWithoutBackendsRejects(t *testing.T) {
	env := newLBEnv(t)
	lb := open(t, Config{CgroupPath: env.cgroup})
	mustSet(t, lb, tcpService())
	r := env.client(t, true, "tcp", testVIPPort.String(), "3")
	if r.OK != 0 || r.Errors["connect: operation not permitted"] != 3 {
		t.Fatalf("connect to a service without backends: ok %d, errors %v", r.OK, r.Errors)
	}
}

// TestSetConvergedWritesNothing and TestResyncRepairsDrift use the kernel
// maps without attaching anything.
func TestSetConvergedWritesNothing(t *testing.T) {
	privtest.RequireRoot(t)
	lb := open(t, Config{})
	services := manyServices(50, 4)
	mustSet(t, lb, services...)
	s := lb.Stats()
	if s.Services != 50 || s.Slots != 200 || s.MapWrites == 0 {
		t.Fatalf("stats after first Set: %+v", s)
	}
	slices.Reverse(services) // order does not matter
	mustSet(t, lb, services...)
	if s2 := lb.Stats(); s2.MapWrites != s.MapWrites || s2.Syncs != 2 {
		t.Fatalf("identical Set wrote %d entries (%+v)", s2.MapWrites-s.MapWrites, s2)
	}
}

func TestResyncRepairsDrift(t *testing.T) {
	privtest.RequireRoot(t)
	lb := open(t, Config{})
	services := manyServices(10, 3)
	mustSet(t, lb, services...)
	want := dumpAll(t, lb)
	o := lb.Objects()

	k0, k1, k2 := services[0].Key(), services[1].Key(), services[2].Key()
	v0 := want.services[k0]
	// Damage: a slot pointing nowhere, a backend with a new address, a
	// count that covers missing slots, a deleted service, a stray service.
	must(t, o.Slots.Update(SlotKey{v0.ID, 1}, 9999))
	beID := want.slots[SlotKey{v0.ID, 0}]
	must(t, o.Backends.Update(beID, Backend{IP: netip.MustParseAddr("192.0.2.66"), Port: 1}))
	v1 := want.services[k1]
	v1.Count = 9
	must(t, o.Services.Update(k1, v1))
	must(t, o.Services.Delete(k2))
	must(t, o.Services.Update(ServiceKey{VIP: netip.MustParseAddr("192.0.2.1"), Port: 1, Proto: UDP}, ServiceValue{ID: 77, Count: 1}))

	before := lb.Stats().MapWrites
	mustSet(t, lb, services...)
	if got := dumpAll(t, lb); !got.equal(want) {
		t.Fatalf("not repaired:\n got %+v\nwant %+v", got, want)
	}
	if lb.Stats().MapWrites == before {
		t.Fatal("repair wrote nothing")
	}
	before = lb.Stats().MapWrites
	mustSet(t, lb, services...)
	if lb.Stats().MapWrites != before {
		t.Fatal("Set after repair still wrote")
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

type mapState struct {
	services map[ServiceKey]ServiceValue
	slots    map[SlotKey]uint32
	backends map[uint32]Backend
}

func dumpAll(t testing.TB, lb *LB) mapState {
	t.Helper()
	o := lb.Objects()
	var s mapState
	var err error
	if s.services, err = o.Services.Dump(); err != nil {
		t.Fatal(err)
	}
	if s.slots, err = o.Slots.Dump(); err != nil {
		t.Fatal(err)
	}
	if s.backends, err = o.Backends.Dump(); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s mapState) equal(o mapState) bool {
	return maps.Equal(s.services, o.services) && maps.Equal(s.slots, o.slots) && maps.Equal(s.backends, o.backends)
}

// manyServices returns n TCP services on 198.19.x.y:80, each with
// perService backends on 198.18.x.y:8080.
func manyServices(n, perService int) []Service {
	out := make([]Service, n)
	for i := range n {
		out[i] = Service{VIP: nthAddr(198, 19, i), Port: 80, Proto: TCP}
		for j := range perService {
			out[i].Backends = append(out[i].Backends, Backend{IP: nthAddr(198, 18, i*perService+j), Port: 8080, ClusterID: 1})
		}
	}
	return out
}

// nthAddr returns a.b.0.1 + n.
func nthAddr(a, b byte, n int) netip.Addr {
	n++
	return netip.AddrFrom4([4]byte{a, b, byte(n >> 8), byte(n)})
}

// TestAdoptPinned restarts the "agent" (Close, then Open on the same pin
// dir) while a client connects in a loop: the client must see no failure,
// the links and maps must be the very same kernel objects, and a Set with
// the same state must write nothing. Uninstall then removes everything.
func TestAdoptPinned(t *testing.T) {
	env := newLBEnv(t)
	pinDir := newPinDir(t)
	cfg := Config{PinDir: pinDir, CgroupPath: env.cgroup}
	lb1, err := Open(cfg)
	privtest.SkipIfNotSupported(t, err)
	t.Cleanup(func() { lb1.Close() })
	if len(lb1.AdoptedLinks()) != 0 || len(lb1.Objects().Adopted) != 0 {
		t.Fatalf("fresh pin dir, yet adopted links %v maps %v", lb1.AdoptedLinks(), lb1.Objects().Adopted)
	}
	mustSet(t, lb1, tcpService(backend1, backend2))
	state1 := dumpAll(t, lb1)
	ids1 := linkIDs(t, lb1.Links())

	loop := helperCommand("loop", testVIPPort.String())
	stdin, err := loop.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out, stderr bytes.Buffer
	loop.Stdout, loop.Stderr = &out, &stderr
	if err := privtest.StartInNetNSAndCgroup(t, loop, env.ns, env.cgroup); err != nil {
		t.Fatal(err)
	}
	// Each phase lasts until the loop has made loopPhase more connections
	// that reached a backend, so each is measured in connections the loop
	// made, not in time. A phase in which the VIP stops being translated
	// never ends, and the wait fails.
	const loopPhase = 50
	awaitTranslated := func(what string) {
		t.Helper()
		start := env.translated()
		testutil.EventuallyNoError(t, 30*time.Second, what, func() error {
			if n := env.translated() - start; n < loopPhase {
				return fmt.Errorf("%d of %d connections translated", n, loopPhase)
			}
			return nil
		})
	}

	awaitTranslated("the loop's connections through the first LB")
	if err := lb1.Close(); err != nil {
		t.Fatal(err)
	}
	// No agent at all for a while: the pinned links go on translating.
	awaitTranslated("the loop's connections with no LB open")

	lb2 := open(t, cfg)
	if got := lb2.AdoptedLinks(); len(got) != 4 {
		t.Fatalf("adopted links %v, want all four", got)
	}
	if got := lb2.Objects().Adopted; !slices.Equal(got, mapNames) {
		t.Fatalf("adopted maps %v, want all of %v", got, mapNames)
	}
	if ids2 := linkIDs(t, lb2.Links()); !slices.Equal(ids1, ids2) {
		t.Fatalf("link IDs %v after reopen, %v before: links were re-created", ids2, ids1)
	}
	if got := dumpAll(t, lb2); !got.equal(state1) {
		t.Fatalf("adopted maps differ: %+v vs %+v", got, state1)
	}
	mustSet(t, lb2, tcpService(backend1, backend2))
	if w := lb2.Stats().MapWrites; w != 0 {
		t.Fatalf("first Set after adoption wrote %d entries", w)
	}
	// IDs recovered from the maps: a new service gets a fresh ID and the
	// old one keeps its own.
	extra := Service{VIP: netip.MustParseAddr("198.19.0.11"), Port: 80, Proto: TCP, Backends: []Backend{backend2}}
	mustSet(t, lb2, tcpService(backend1, backend2), extra)
	state2 := dumpAll(t, lb2)
	if state2.services[tcpService().Key()] != state1.services[tcpService().Key()] {
		t.Fatal("existing service changed when another was added")
	}
	if id := state2.services[extra.Key()].ID; id == state1.services[tcpService().Key()].ID || id == 0 {
		t.Fatalf("new service got id %d", id)
	}
	awaitTranslated("the loop's connections through the adopting LB")

	stdin.Close()
	if err := loop.Wait(); err != nil {
		t.Fatalf("loop client: %v\n%s", err, stderr.String())
	}
	r, err := parseResult(out.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	if r.Fail != 0 || r.OK < 100 || r.Names["untranslated"] != 0 {
		t.Fatalf("connect loop across the restart: ok %d, fail %d (%v), answered by %v", r.OK, r.Fail, r.Errors, r.Names)
	}
	t.Logf("connect loop across the restart: %d connections, none failed, answered by %v", r.OK, r.Names)

	// Uninstall while lb2 still holds its descriptors: the links detach
	// anyway and the pins go.
	if err := Uninstall(pinDir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pin dir still there: %v", err)
	}
	for _, h := range hooks {
		if n := attachedPrograms(t, env.cgroup, h.attach); n != 0 {
			t.Fatalf("%d programs still attached for %s", n, h.name)
		}
	}
	r = env.client(t, true, "tcp", testVIPPort.String(), "3")
	wantCounts(t, "after uninstall, answered by", r.Names, map[string]int{"untranslated": 3})
	if err := Uninstall(pinDir); err != nil {
		t.Fatalf("second Uninstall: %v", err)
	}
}

func linkIDs(t testing.TB, l *Links) []link.ID {
	t.Helper()
	var ids []link.ID
	for _, h := range hooks {
		info, err := (*h.link(l)).Info()
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, info.ID)
	}
	return ids
}

// TestAdoptOnOtherCgroup reopens a pin dir with another cgroup: the links
// move (new attached first, then the old detached) and the maps stay.
func TestAdoptOnOtherCgroup(t *testing.T) {
	env := newLBEnv(t)
	pinDir := newPinDir(t)
	lb1 := open(t, Config{PinDir: pinDir, CgroupPath: env.cgroup})
	mustSet(t, lb1, tcpService(backend1))
	lb1.Close()

	other := privtest.NewCgroup(t)
	lb2 := open(t, Config{PinDir: pinDir, CgroupPath: other})
	if len(lb2.AdoptedLinks()) != 0 {
		t.Fatalf("adopted %v from another cgroup", lb2.AdoptedLinks())
	}
	if n := attachedPrograms(t, env.cgroup, ebpf.AttachCGroupInet4Connect); n != 0 {
		t.Fatalf("old cgroup still has %d programs", n)
	}
	r := env.clientIn(t, other, "tcp", testVIPPort.String(), "3")
	wantCounts(t, "new cgroup, answered by", r.Names, map[string]int{"backend-1": 3})
	r = env.client(t, true, "tcp", testVIPPort.String(), "3")
	wantCounts(t, "old cgroup, answered by", r.Names, map[string]int{"untranslated": 3})
}

func TestCloseWithoutPinDetaches(t *testing.T) {
	env := newLBEnv(t)
	lb := open(t, Config{CgroupPath: env.cgroup})
	mustSet(t, lb, tcpService(backend1))
	if n := attachedPrograms(t, env.cgroup, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Fatalf("%d programs attached", n)
	}
	lb.Close()
	lb.Close() // twice is fine
	if n := attachedPrograms(t, env.cgroup, ebpf.AttachCGroupInet4Connect); n != 0 {
		t.Fatalf("%d programs attached after Close", n)
	}
}

func TestUninstallMissingDir(t *testing.T) {
	if err := Uninstall("/nonexistent/trellis-test"); err != nil {
		t.Fatal(err)
	}
}

func TestEnsureBPFFS(t *testing.T) {
	privtest.RequireRoot(t)
	if err := EnsureBPFFS(); err != nil {
		t.Fatal(err)
	}
	if ok, err := isBPFFS(BPFFSPath); !ok || err != nil {
		t.Fatalf("isBPFFS after EnsureBPFFS: %v %v", ok, err)
	}
	if err := EnsureBPFFS(); err != nil { // idempotent
		t.Fatal(err)
	}
	data, _ := os.ReadFile("/proc/self/mounts")
	if n := strings.Count(string(data), " "+BPFFSPath+" bpf "); n != 1 {
		t.Fatalf("bpffs mounted %d times at %s", n, BPFFSPath)
	}
}

// TestSetWithoutBatchOps runs the per-element fallback that kernels
// without BPF_MAP_*_BATCH get, and compares with the batch path.
func TestSetWithoutBatchOps(t *testing.T) {
	privtest.RequireRoot(t)
	batch := open(t, Config{})
	single := open(t, Config{})
	o := single.Objects()
	o.Services.noBatch.Store(true)
	o.Slots.noBatch.Store(true)
	o.Backends.noBatch.Store(true)

	states := [][]Service{manyServices(20, 3), manyServices(10, 5), manyServices(30, 1), nil}
	for i, state := range states {
		mustSet(t, batch, state...)
		mustSet(t, single, state...)
		if a, b := dumpAll(t, batch), dumpAll(t, single); !a.equal(b) {
			t.Fatalf("state %d: batch and per-element paths differ:\n%+v\n%+v", i, a, b)
		}
	}
	if batch.Objects().Services.noBatch.Load() {
		t.Fatal("this kernel has no batch map operations (Linux 5.6+ should)")
	}
	if a, b := batch.Stats(), single.Stats(); a != b {
		t.Fatalf("stats differ: %+v vs %+v", a, b)
	}
}
