//go:build linux

package bpf

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/privtest"
)

// A service with more than 65535 backends: every slot up to its count is
// reachable. The first 65536 slots hold backends that refuse connections
// (backend-1's address on a closed port, one per cluster ID so that each
// is a backend of its own); the rest are backend-2. A count cut to 16 bits
// (100000 & 0xffff = 34464, as the service value's former layout read it)
// would only ever pick refusing backends.
func TestLBServiceBeyond16BitCount(t *testing.T) {
	env := newLBEnv(t)
	lb := open(t, Config{CgroupPath: env.cgroup})
	const n, refusing = 100000, 1 << 16
	svc := tcpService()
	for i := range n {
		b := backend2
		if i < refusing {
			b = backend1
			b.Port = 9 // nothing listens there
		}
		b.ClusterID = uint32(i + 1)
		svc.Backends = append(svc.Backends, b)
	}
	mustSet(t, lb, svc)
	v, err := lb.Objects().Services.Lookup(svc.Key())
	if err != nil {
		t.Fatal(err)
	}
	if v.Count != n {
		t.Fatalf("service count %d, want %d", v.Count, n)
	}
	if s := lb.Stats(); s.Slots != n || s.Backends != n {
		t.Fatalf("stats %+v, want %d slots and backends", s, n)
	}
	// A fresh service's slots follow the order of its backends.
	last, err := lb.Objects().Slots.Lookup(SlotKey{ServiceID: v.ID, Slot: n - 1})
	if err != nil {
		t.Fatal(err)
	}
	if be, err := lb.Objects().Backends.Lookup(last); err != nil || be.IP != backend2.IP || be.Port != backend2.Port {
		t.Fatalf("last slot's backend %v (%v), want %v", be, err, backend2)
	}

	// 34.5% of picks reach backend-2: 200 connects give 69 on average
	// and fewer than 20 with a probability below 1e-12.
	r := env.client(t, true, "tcp", testVIPPort.String(), "200")
	if r.Names["backend-2"] < 20 || r.Errors["connect: connection refused"] < 20 || r.OK+r.Errors["connect: connection refused"] != 200 {
		t.Fatalf("200 connects: answered by %v, errors %v; want both backend-2 and refusals", r.Names, r.Errors)
	}
}

// A state that does not fit a map is refused whole, naming the map, and
// nothing is written; a state that fits goes through.
func TestLBRefusesStateBeyondMapSize(t *testing.T) {
	privtest.RequireRoot(t)
	lb := open(t, Config{Sizes: MapSizes{Backends: 100, Slots: 1000}})
	err := lb.Set(context.Background(), manyServices(3, 50))
	if !errors.Is(err, ErrMapFull) || !strings.Contains(err.Error(), "backends map holds 100 entries; this state needs 150") {
		t.Fatalf("Set of 150 backends into a map of 100 = %v, want ErrMapFull naming the backends map", err)
	}
	if got := dumpAll(t, lb); len(got.services)+len(got.slots)+len(got.backends) != 0 {
		t.Fatalf("a refused Set wrote %d services, %d slots, %d backends", len(got.services), len(got.slots), len(got.backends))
	}
	mustSet(t, lb, manyServices(2, 50)...)
}

// The reconciler's own check, on tables with a size: a state that fits
// alone can still not fit while the one it replaces is in place (adds
// come before deletes), and is refused then too.
func TestReconcilerRefusesPeakBeyondSize(t *testing.T) {
	w := newFakeWorld()
	rec := newReconciler(w.services, sizedTable[SlotKey, uint32]{w.slots, 100}, sizedTable[uint32, Backend]{w.backends, 10})
	ctx := context.Background()
	a := manyServices(1, 6)
	if err := rec.Set(ctx, a); err != nil {
		t.Fatal(err)
	}
	b := slices.Clone(a)
	b[0].Backends = nil
	for i := range 6 {
		b[0].Backends = append(b[0].Backends, Backend{IP: nthAddr(198, 18, 100+i), Port: 8080, ClusterID: 1})
	}
	before := w.writes
	err := rec.Set(ctx, b)
	if !errors.Is(err, ErrMapFull) || !strings.Contains(err.Error(), "backends map holds 10 entries; this state needs 6, and 12 while the 6 entries it replaces are still in place") {
		t.Fatalf("Set = %v, want ErrMapFull for the peak", err)
	}
	if w.writes != before {
		t.Fatalf("refused Set wrote %d entries", w.writes-before)
	}
	// Half the replacement fits (6 + 3).
	b[0].Backends = append(slices.Clone(a[0].Backends[:3]), b[0].Backends[:3]...)
	if err := rec.Set(ctx, b); err != nil {
		t.Fatal(err)
	}
	if err := w.checkExact(b); err != nil {
		t.Fatal(err)
	}
}

type sizedTable[K comparable, V comparable] struct {
	*fakeTable[K, V]
	size uint32
}

func (s sizedTable[K, V]) MaxEntries() uint32 { return s.size }
