package apiserver

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// bigService is a global service of cluster c1 with n backends
// 10.1.x.y, numbered from first.
func bigService(first, n int) v1.Service {
	svc := v1.Service{Cluster: "c1", Namespace: "default", Name: "big", Global: true, Shared: true,
		Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}}}
	for i := first; i < first+n; i++ {
		svc.Backends = append(svc.Backends, backendN(i))
	}
	return svc
}

func backendN(i int) v1.Backend {
	return v1.Backend{IP: netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), State: v1.BackendActive,
		Node: fmt.Sprintf("node-%04d.eu-west-1.compute.internal", i%1000), Zone: "eu-west-1a"}
}

// step runs next and writes, and checks what every layout must be: each
// backend in exactly one shard, no shard over the limits, every shard
// listed with its generation, and only the shards that changed written.
func step(t *testing.T, l *shardLayout, svc v1.Service, now uint64) (*shardLayout, shardWrite) {
	t.Helper()
	n, err := l.next(svc, now)
	if err != nil {
		t.Fatal(err)
	}
	w, err := n.writes(svc, l)
	if err != nil {
		t.Fatal(err)
	}
	head, err := v1.DecodeService(w.head)
	if err != nil {
		t.Fatal(err)
	}
	if len(head.BackendShards) != len(n.shards) || len(head.Backends) != 0 {
		t.Fatalf("service value lists %d shards and %d backends, layout has %d shards", len(head.BackendShards), len(head.Backends), len(n.shards))
	}
	seen := map[netip.Addr]bool{}
	for i, s := range n.shards {
		if head.BackendShards[i] != s.gen {
			t.Fatalf("shard %d: service lists gen %d, shard has %d", i, head.BackendShards[i], s.gen)
		}
		if len(s.ips) > v1.MaxShardBackends {
			t.Fatalf("shard %d holds %d backends", i, len(s.ips))
		}
		for _, ip := range s.ips {
			if seen[ip] {
				t.Fatalf("backend %s in two shards", ip)
			}
			seen[ip] = true
			if n.where[ip] != i {
				t.Fatalf("backend %s in shard %d, where says %d", ip, i, n.where[ip])
			}
		}
		if data, ok := w.upserts[i]; ok {
			sh, err := v1.DecodeBackendShard(data)
			if err != nil {
				t.Fatalf("shard %d: %v", i, err)
			}
			if sh.Gen != s.gen || len(sh.Backends) != len(s.ips) {
				t.Fatalf("shard %d written with gen %d and %d backends, layout has %d and %d", i, sh.Gen, len(sh.Backends), s.gen, len(s.ips))
			}
		} else if s.dirty {
			t.Fatalf("shard %d changed but is not written", i)
		}
	}
	if len(seen) != len(svc.Backends) || len(n.where) != len(svc.Backends) {
		t.Fatalf("layout holds %d backends (where: %d), the service has %d", len(seen), len(n.where), len(svc.Backends))
	}
	for _, b := range svc.Backends {
		if !seen[b.IP] {
			t.Fatalf("backend %s is in no shard", b.IP)
		}
	}
	n.published()
	return n, w
}

// checkMovesBumpGens is the readers' safety rule: a backend that is in
// the service before and after and changed shards has left a shard and
// reached one that both carry a new generation, so no reader can combine
// the old shard it left with the new one it reached, or the reverse.
func checkMovesBumpGens(t *testing.T, before, after *shardLayout) {
	t.Helper()
	for ip, from := range before.where {
		to, ok := after.where[ip]
		if !ok || to == from {
			continue
		}
		if after.shards[to].gen == genAt(before, to) {
			t.Fatalf("backend %s moved from shard %d to %d, which kept gen %d", ip, from, to, after.shards[to].gen)
		}
		if from < len(after.shards) && after.shards[from].gen == before.shards[from].gen {
			t.Fatalf("backend %s moved from shard %d, which kept gen %d", ip, from, before.shards[from].gen)
		}
	}
}

func genAt(l *shardLayout, i int) uint64 {
	if i < len(l.shards) {
		return l.shards[i].gen
	}
	return 0
}

func TestShardLayoutStable(t *testing.T) {
	svc := bigService(0, 2500)
	l, w := step(t, freshLayout(), svc, 100)
	if len(l.shards) < 5 || len(w.upserts) != len(l.shards) || len(w.deletes) != 0 {
		t.Fatalf("2500 backends: %d shards, %d written, %d deleted", len(l.shards), len(w.upserts), len(w.deletes))
	}
	gens := make([]uint64, len(l.shards))
	for i, s := range l.shards {
		gens[i] = s.gen
	}
	same := func(l *shardLayout) {
		t.Helper()
		for i, s := range l.shards {
			if s.gen != gens[i] {
				t.Fatalf("shard %d: gen %d, was %d; nothing moved", i, s.gen, gens[i])
			}
		}
	}

	// One backend added, removed, changed: one shard each.
	svc.Backends = append(svc.Backends, backendN(3000))
	l2, w := step(t, l, svc, 200)
	if len(w.upserts) != 1 {
		t.Fatalf("adding one backend wrote %d shards", len(w.upserts))
	}
	same(l2)
	svc.Backends = slices.Delete(svc.Backends, 1200, 1201)
	l3, w := step(t, l2, svc, 300)
	if len(w.upserts) != 1 || w.upserts[l2.where[backendN(1200).IP]] == nil {
		t.Fatalf("removing one backend wrote shards %v", keys(w.upserts))
	}
	same(l3)
	svc.Backends[10].State = v1.BackendTerminating
	l4, w := step(t, l3, svc, 400)
	if len(w.upserts) != 1 || w.upserts[l3.where[svc.Backends[10].IP]] == nil {
		t.Fatalf("changing one backend wrote shards %v", keys(w.upserts))
	}
	same(l4)
	// Nothing changed: nothing written but the service value.
	_, w = step(t, l4, svc, 500)
	if len(w.upserts) != 0 || len(w.deletes) != 0 {
		t.Fatalf("an unchanged service wrote shards %v, deleted %v", keys(w.upserts), w.deletes)
	}
	// The layout step started from is unchanged.
	if len(l.where) != 2500 || l.shards[0].dirty {
		t.Fatal("next modified the layout it started from")
	}
}

func keys[V any](m map[int]V) []int {
	var out []int
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// Backends that grow in place past the value limit move to another
// shard, and both shards get a new generation.
func TestShardLayoutOverflowMoves(t *testing.T) {
	svc := bigService(0, 1500)
	l, _ := step(t, freshLayout(), svc, 100)
	first := l.shards[0]
	// Every backend of shard 0 gets a long node name: far past 64 KiB.
	for i, b := range svc.Backends {
		if l.where[b.IP] == 0 {
			svc.Backends[i].Node = strings.Repeat("n", 60) + "." + strings.Repeat("m", 60) + "." + strings.Repeat("o", 60)
		}
	}
	l2, w := step(t, l, svc, 200)
	checkMovesBumpGens(t, l, l2)
	if len(l2.shards[0].ips) >= len(first.ips) || l2.shards[0].gen != 200 {
		t.Fatalf("shard 0: %d backends (was %d), gen %d", len(l2.shards[0].ips), len(first.ips), l2.shards[0].gen)
	}
	if len(w.upserts[0]) > v1.MaxValueSize {
		t.Fatalf("shard 0 is %d bytes", len(w.upserts[0]))
	}
	if l2.gen != 201 {
		t.Fatalf("next move's gen %d, want 201", l2.gen)
	}
}

// Removing most backends compacts the shards into few, bumping the
// generations of those that move.
func TestShardLayoutCompacts(t *testing.T) {
	svc := bigService(0, 5000)
	l, _ := step(t, freshLayout(), svc, 100)
	before := len(l.shards)
	var kept []v1.Backend
	for i, b := range svc.Backends {
		if i%10 == 0 {
			kept = append(kept, b)
		}
	}
	svc.Backends = kept
	l2, w := step(t, l, svc, 200)
	checkMovesBumpGens(t, l, l2)
	if len(l2.shards) > 2 || len(w.deletes) != before-len(l2.shards) {
		t.Fatalf("500 of 5000 backends left: %d shards (was %d), deleted %v", len(l2.shards), before, w.deletes)
	}
}

// Random sequences of changes keep every invariant, and every move
// bumps the generations involved.
func TestShardLayoutRandom(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	svc := bigService(0, 0)
	l := freshLayout()
	next := 0
	for round := range 60 {
		switch op := r.IntN(4); {
		case op == 0 || len(svc.Backends) < 500:
			for range r.IntN(3000) {
				svc.Backends = append(svc.Backends, backendN(next%60000))
				next++
			}
			svc.Backends = dedupeBackends(svc.Backends)
		case op == 1:
			r.Shuffle(len(svc.Backends), func(i, j int) { svc.Backends[i], svc.Backends[j] = svc.Backends[j], svc.Backends[i] })
			svc.Backends = svc.Backends[:r.IntN(len(svc.Backends))]
		case op == 2:
			for range r.IntN(500) {
				i := r.IntN(len(svc.Backends))
				svc.Backends[i].State = []v1.BackendState{v1.BackendActive, v1.BackendTerminating, v1.BackendUnready}[r.IntN(3)]
			}
		default:
			// Long node names on a stretch: shards overflow.
			for i := r.IntN(len(svc.Backends)); i < len(svc.Backends) && r.IntN(400) != 0; i++ {
				svc.Backends[i].Node = strings.Repeat("x", 50+r.IntN(150))
			}
		}
		prev := l
		l, _ = step(t, l, svc, uint64(1000+round))
		checkMovesBumpGens(t, prev, l)
	}
}

func dedupeBackends(bs []v1.Backend) []v1.Backend {
	seen := map[netip.Addr]bool{}
	return slices.DeleteFunc(bs, func(b v1.Backend) bool {
		dup := seen[b.IP]
		seen[b.IP] = true
		return dup
	})
}

// Limits that truly apply refuse the service, naming it and the limit,
// and leave the layout as it was.
func TestShardLayoutLimits(t *testing.T) {
	// A service whose every backend serves 350 named ports: a backend is
	// about 30 KB of JSON, two to a shard at most.
	svc := bigService(0, 0)
	svc.Ports = nil
	for p := range 350 {
		svc.Ports = append(svc.Ports, v1.ServicePort{Name: fmt.Sprintf("port-%03d-%s", p, strings.Repeat("p", 50)), Protocol: v1.ProtocolTCP, Port: uint16(1000 + p)})
	}
	backend := func(i int) v1.Backend {
		b := backendN(i)
		for _, p := range svc.Ports {
			b.Ports = append(b.Ports, v1.BackendPort{Name: p.Name, Port: p.Port + 1})
		}
		return b
	}
	for i := range 2*v1.MaxBackendShards + 1 {
		svc.Backends = append(svc.Backends, backend(i))
	}
	if err := svc.Validate(); err != nil {
		t.Fatal(err)
	}
	_, err := freshLayout().next(svc, 1)
	if !errors.Is(err, v1.ErrTooLarge) || !strings.Contains(err.Error(), "service default/big") || !strings.Contains(err.Error(), "more than 1024 backend shards") {
		t.Fatalf("%d backends of ~30 KB: %v, want ErrTooLarge naming the service and the shard limit", len(svc.Backends), err)
	}

	// One backend larger than a shard: 900 ports of 62-character names.
	l, _ := step(t, freshLayout(), bigService(0, 10), 1)
	svc = bigService(0, 0)
	svc.Ports = nil
	for p := range 900 {
		svc.Ports = append(svc.Ports, v1.ServicePort{Name: fmt.Sprintf("q-%03d-%s", p, strings.Repeat("q", 56)), Protocol: v1.ProtocolUDP, Port: uint16(1000 + p)})
	}
	svc.Backends = []v1.Backend{backendN(1)}
	for _, p := range svc.Ports {
		svc.Backends[0].Ports = append(svc.Backends[0].Ports, v1.BackendPort{Name: p.Name, Port: p.Port})
	}
	_, err = l.next(svc, 2)
	if !errors.Is(err, v1.ErrTooLarge) || !strings.Contains(err.Error(), "backend 10.1.0.1 is") || !strings.Contains(err.Error(), "a backend shard holds at most") {
		t.Fatalf("a backend of %d ports: %v, want ErrTooLarge naming the backend", len(svc.Backends[0].Ports), err)
	}
	if len(l.where) != 10 {
		t.Fatal("a refused next changed the layout")
	}
}
