//go:build linux

package bpf

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// fakeWorld is an in-memory copy of the three maps. After every single
// element written or deleted it runs check, which plays the part of a
// program reading the maps at that instant.
type fakeWorld struct {
	services *fakeTable[ServiceKey, ServiceValue]
	slots    *fakeTable[SlotKey, uint32]
	backends *fakeTable[uint32, Backend]
	check    func() error
	err      error // first check failure
	writes   int
}

type fakeTable[K comparable, V comparable] struct {
	w *fakeWorld
	m map[K]V
}

func (f *fakeTable[K, V]) Dump() (map[K]V, error) { return maps.Clone(f.m), nil }

func (f *fakeTable[K, V]) BatchUpdate(keys []K, values []V) error {
	for i, k := range keys {
		f.m[k] = values[i]
		f.w.wrote()
	}
	return nil
}

func (f *fakeTable[K, V]) BatchDelete(keys []K) error {
	for _, k := range keys {
		delete(f.m, k)
		f.w.wrote()
	}
	return nil
}

func (w *fakeWorld) wrote() {
	w.writes++
	if w.check != nil && w.err == nil {
		w.err = w.check()
	}
}

func newFakeWorld() *fakeWorld {
	w := &fakeWorld{}
	w.services = &fakeTable[ServiceKey, ServiceValue]{w, map[ServiceKey]ServiceValue{}}
	w.slots = &fakeTable[SlotKey, uint32]{w, map[SlotKey]uint32{}}
	w.backends = &fakeTable[uint32, Backend]{w, map[uint32]Backend{}}
	return w
}

func (w *fakeWorld) reconciler() *reconciler {
	return newReconciler(w.services, w.slots, w.backends)
}

// resolve reads the maps the way the programs do: for each service, the
// addresses of the backends its active slots point at, from the service
// value for the inline slots, from the slots and backends maps for the
// others. Missing slots or backends are errors.
func (w *fakeWorld) resolve() (map[ServiceKey][]netip.AddrPort, error) {
	out := map[ServiceKey][]netip.AddrPort{}
	for k, v := range w.services.m {
		addrs := []netip.AddrPort{}
		for n := range uint32(v.Count) {
			if n < InlineSlots {
				if !v.Inline[n].IsValid() {
					return nil, fmt.Errorf("service %v (id %d): inline slot %d of %d empty", k, v.ID, n, v.Count)
				}
				addrs = append(addrs, v.Inline[n])
				continue
			}
			b, err := w.slotBackend(k, v, n)
			if err != nil {
				return nil, err
			}
			addrs = append(addrs, netip.AddrPortFrom(b.IP, b.Port))
		}
		out[k] = addrs
	}
	return out, nil
}

// slotBackend returns the backend of slot n of service k from the slots
// and backends maps.
func (w *fakeWorld) slotBackend(k ServiceKey, v ServiceValue, n uint32) (Backend, error) {
	id, ok := w.slots.m[SlotKey{v.ID, n}]
	if !ok {
		return Backend{}, fmt.Errorf("service %v (id %d): slot %d of %d missing", k, v.ID, n, v.Count)
	}
	b, ok := w.backends.m[id]
	if !ok {
		return Backend{}, fmt.Errorf("service %v: slot %d: backend %d missing", k, n, id)
	}
	return b, nil
}

// checkExact verifies the maps hold exactly services and nothing else:
// every slot in the slots and backends maps with its cluster ID, the same
// addresses inline in the service values, and no entry beyond.
func (w *fakeWorld) checkExact(services []Service) error {
	want := backendSets(services)
	if len(w.services.m) != len(want) {
		return fmt.Errorf("%d services in the maps, want %d", len(w.services.m), len(want))
	}
	slotCount := 0
	used := map[uint32]bool{}
	for k, v := range w.services.m {
		set := map[Backend]bool{}
		for n := range uint32(v.Count) {
			b, err := w.slotBackend(k, v, n)
			if err != nil {
				return err
			}
			set[b] = true
			used[w.slots.m[SlotKey{v.ID, n}]] = true
			var inline netip.AddrPort
			if n < InlineSlots {
				inline = v.Inline[n]
			}
			if want := netip.AddrPortFrom(b.IP, b.Port); n < InlineSlots && inline != want {
				return fmt.Errorf("service %v: inline slot %d is %v, slot map says %v", k, n, inline, want)
			}
		}
		for n := int(v.Count); n < InlineSlots; n++ {
			if v.Inline[n].IsValid() {
				return fmt.Errorf("service %v: inline slot %d of %d holds %v", k, n, v.Count, v.Inline[n])
			}
		}
		if len(set) != int(v.Count) || !maps.Equal(set, want[k]) {
			return fmt.Errorf("service %v: backends %v, want %v", k, slices.Collect(maps.Keys(set)), slices.Collect(maps.Keys(want[k])))
		}
		slotCount += int(v.Count)
	}
	if len(w.slots.m) != slotCount {
		return fmt.Errorf("%d slots, want %d", len(w.slots.m), slotCount)
	}
	if len(w.backends.m) != len(used) {
		return fmt.Errorf("%d backends, %d referenced", len(w.backends.m), len(used))
	}
	return nil
}

func backendSets(services []Service) map[ServiceKey]map[Backend]bool {
	out := map[ServiceKey]map[Backend]bool{}
	for _, s := range services {
		set := map[Backend]bool{}
		for _, b := range s.Backends {
			set[b] = true
		}
		out[s.Key()] = set
	}
	return out
}

var (
	testVIPs = []netip.Addr{
		netip.MustParseAddr("198.19.0.1"), netip.MustParseAddr("198.19.0.2"),
		netip.MustParseAddr("198.19.0.3"), netip.MustParseAddr("198.19.0.4"),
	}
	testBackends = func() []Backend {
		var out []Backend
		for i := range 12 {
			out = append(out, Backend{IP: netip.AddrFrom4([4]byte{198, 18, 0, byte(1 + i%6)}), Port: uint16(8080 + i/6), ClusterID: uint32(1 + i%3)})
		}
		return out
	}()
)

// randomState is a random desired state over a small universe, so that
// consecutive states overlap.
func randomState(r *rand.Rand) []Service {
	var out []Service
	for _, vip := range testVIPs {
		for _, proto := range []Protocol{TCP, UDP} {
			if r.IntN(3) == 0 {
				continue
			}
			s := Service{VIP: vip, Port: 80, Proto: proto}
			for _, b := range testBackends {
				if r.IntN(3) == 0 {
					s.Backends = append(s.Backends, b)
				}
			}
			if r.IntN(5) == 0 && len(s.Backends) > 0 {
				s.Backends = append(s.Backends, s.Backends[0]) // duplicate
			}
			out = append(out, s)
		}
	}
	r.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out
}

// TestReconcilerRandomStates applies random states in sequence. While each
// Set runs, every intermediate map state is checked the way a program
// would read it: every active slot and its backend exist, and a service
// only ever resolves to backends of its previous or next state. After each
// Set the maps hold exactly the desired state, and repeating the Set
// writes nothing.
func TestReconcilerRandomStates(t *testing.T) {
	for seed := range uint64(20) {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 1))
			w := newFakeWorld()
			rec := w.reconciler()
			ctx := context.Background()
			var prev []Service
			for step := range 40 {
				next := randomState(r)
				allowed := map[ServiceKey]map[netip.AddrPort]bool{}
				for _, state := range [][]Service{prev, next} {
					for k, set := range backendSets(state) {
						if allowed[k] == nil {
							allowed[k] = map[netip.AddrPort]bool{}
						}
						for b := range set {
							allowed[k][netip.AddrPortFrom(b.IP, b.Port)] = true
						}
					}
				}
				w.check = func() error {
					got, err := w.resolve()
					if err != nil {
						return err
					}
					for k, addrs := range got {
						for _, a := range addrs {
							if !allowed[k][a] {
								return fmt.Errorf("service %v resolves to %v, in neither the old nor the new state", k, a)
							}
						}
					}
					return nil
				}
				oldIDs := maps.Clone(rec.backendIDs)
				if err := rec.Set(ctx, next); err != nil {
					t.Fatalf("step %d: %v", step, err)
				}
				if w.err != nil {
					t.Fatalf("step %d: torn state during Set: %v", step, w.err)
				}
				if err := w.checkExact(next); err != nil {
					t.Fatalf("step %d: %v", step, err)
				}
				// Backends that stay keep their ID.
				for b, id := range rec.backendIDs {
					if old, ok := oldIDs[b]; ok && old != id {
						t.Fatalf("step %d: backend %v moved from id %d to %d", step, b, old, id)
					}
				}
				before := w.writes
				if err := rec.Set(ctx, next); err != nil {
					t.Fatal(err)
				}
				if w.writes != before {
					t.Fatalf("step %d: repeated Set wrote %d entries", step, w.writes-before)
				}
				prev = next
			}
		})
	}
}

// TestReconcilerRepairsDrift damages the maps at random and checks that
// the next Set restores exactly the desired state.
func TestReconcilerRepairsDrift(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	w := newFakeWorld()
	rec := w.reconciler()
	ctx := context.Background()
	for step := range 200 {
		state := randomState(r)
		if err := rec.Set(ctx, state); err != nil {
			t.Fatal(err)
		}
		for range 1 + r.IntN(4) {
			corrupt(r, w)
		}
		if err := rec.Set(ctx, state); err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		if err := w.checkExact(state); err != nil {
			t.Fatalf("step %d: not repaired: %v", step, err)
		}
	}
}

func corrupt(r *rand.Rand, w *fakeWorld) {
	pick := func(n int) int { return r.IntN(max(n, 1)) }
	switch r.IntN(8) {
	case 0: // delete a service
		for k := range w.services.m {
			delete(w.services.m, k)
			break
		}
	case 1: // change a count
		for k, v := range w.services.m {
			v.Count = uint32(pick(20))
			w.services.m[k] = v
			break
		}
	case 2: // point a slot at some other backend id
		for k := range w.slots.m {
			w.slots.m[k] = uint32(pick(30))
			break
		}
	case 3: // delete a slot
		for k := range w.slots.m {
			delete(w.slots.m, k)
			break
		}
	case 4: // change a backend's address
		for id, b := range w.backends.m {
			b.Port++
			w.backends.m[id] = b
			break
		}
	case 5: // a stray service, slot and backend
		w.services.m[ServiceKey{VIP: netip.MustParseAddr("203.0.113.1"), Port: 1, Proto: TCP}] = ServiceValue{ID: uint32(pick(10)), Count: 1}
		w.slots.m[SlotKey{uint32(pick(10)), uint32(pick(5))}] = uint32(pick(30))
		w.backends.m[uint32(100+pick(10))] = Backend{IP: netip.MustParseAddr("203.0.113.2"), Port: 9}
	case 7: // point an inline slot somewhere else
		for k, v := range w.services.m {
			v.Inline[pick(InlineSlots)] = netip.MustParseAddrPort("203.0.113.3:9")
			w.services.m[k] = v
			break
		}
	case 6: // give a service another service's id
		var ids []uint32
		for _, v := range w.services.m {
			ids = append(ids, v.ID)
		}
		for k, v := range w.services.m {
			v.ID = ids[pick(len(ids))]
			w.services.m[k] = v
			break
		}
	}
}

// TestReconcilerSlotsStay checks that removing one backend rewrites one
// slot, not all of them.
func TestReconcilerSlotsStay(t *testing.T) {
	w := newFakeWorld()
	rec := w.reconciler()
	ctx := context.Background()
	svc := Service{VIP: testVIPs[0], Port: 80, Proto: TCP, Backends: slices.Clone(testBackends)}
	if err := rec.Set(ctx, []Service{svc}); err != nil {
		t.Fatal(err)
	}
	before := rec.Stats()
	svc.Backends = slices.Delete(svc.Backends, 3, 4)
	if err := rec.Set(ctx, []Service{svc}); err != nil {
		t.Fatal(err)
	}
	after := rec.Stats()
	// One slot takes the last backend, the count drops, the last slot and
	// the removed backend go.
	if got := after.MapWrites - before.MapWrites; got != 4 {
		t.Fatalf("removing one backend wrote %d entries, want 4", got)
	}
	if err := w.checkExact([]Service{svc}); err != nil {
		t.Fatal(err)
	}
}

func TestReconcilerRejectsInvalid(t *testing.T) {
	vip := testVIPs[0]
	be := testBackends[0]
	for name, services := range map[string][]Service{
		"ipv6 vip":      {{VIP: netip.MustParseAddr("2001:db8::1"), Port: 80, Proto: TCP}},
		"port 0":        {{VIP: vip, Port: 0, Proto: TCP}},
		"sctp":          {{VIP: vip, Port: 80, Proto: 132}},
		"duplicate":     {{VIP: vip, Port: 80, Proto: TCP}, {VIP: vip, Port: 80, Proto: TCP}},
		"backend ipv6":  {{VIP: vip, Port: 80, Proto: TCP, Backends: []Backend{{IP: netip.MustParseAddr("2001:db8::2"), Port: 1}}}},
		"backend port0": {{VIP: vip, Port: 80, Proto: TCP, Backends: []Backend{{IP: be.IP}}}},
		"unset vip":     {{Port: 80, Proto: TCP}},
	} {
		t.Run(name, func(t *testing.T) {
			w := newFakeWorld()
			rec := w.reconciler()
			good := Service{VIP: testVIPs[1], Port: 80, Proto: TCP, Backends: []Backend{be}}
			err := rec.Set(context.Background(), append([]Service{good}, services...))
			if err == nil {
				t.Fatal("no error")
			}
			if w.writes != 0 {
				t.Fatalf("invalid input still wrote %d entries", w.writes)
			}
			if s := rec.Stats(); s.SyncErrors != 1 {
				t.Fatalf("stats %+v", s)
			}
		})
	}
}

func TestReconcilerCancelled(t *testing.T) {
	w := newFakeWorld()
	rec := w.reconciler()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := rec.Set(ctx, []Service{{VIP: testVIPs[0], Port: 80, Proto: TCP, Backends: testBackends[:2]}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Set = %v, want context.Canceled", err)
	}
	if w.writes != 0 {
		t.Fatal("cancelled Set wrote")
	}
}

// Update plans against what the last write left, so a sequence of random
// states through Update ends exactly where Set would, reader-safe at every
// write and without reading the maps back; drift is left alone until the
// next Set.
func TestReconcilerUpdateTrustsItsMirror(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 9))
	w := newFakeWorld()
	rec := w.reconciler()
	ctx := context.Background()
	dumps := 0
	w.check = func() error { _, err := w.resolve(); return err }
	for step := range 200 {
		state := randomState(r)
		if err := rec.Update(ctx, state); err != nil {
			t.Fatal(err)
		}
		if w.err != nil {
			t.Fatalf("step %d: a reader saw a torn state: %v", step, w.err)
		}
		if err := w.checkExact(state); err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		if rec.mirror == nil {
			dumps++
		}
	}
	if dumps != 0 {
		t.Errorf("Update lost its mirror %d times without a failure", dumps)
	}
	state := randomState(r)
	for len(state) == 0 {
		state = randomState(r)
	}
	rec.Set(ctx, state)
	for k := range w.services.m {
		delete(w.services.m, k) // drift behind the reconciler's back
		break
	}
	before := w.writes
	if err := rec.Update(ctx, state); err != nil {
		t.Fatal(err)
	}
	if w.writes != before {
		t.Errorf("Update wrote %d entries for an unchanged state", w.writes-before)
	}
	if err := rec.Set(ctx, state); err != nil {
		t.Fatal(err)
	}
	if err := w.checkExact(state); err != nil {
		t.Errorf("Set did not repair the drift Update trusted past: %v", err)
	}
}
