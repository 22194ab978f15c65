package clustermesh

import (
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// shardedSvc is us's service "big" with its backends in shards of the
// given generations.
func shardedSvc(gens ...uint64) v1.Service {
	return v1.Service{Cluster: "us", Namespace: "default", Name: "big", Global: true, Shared: true,
		Ports:         []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}},
		BackendShards: gens}
}

func usBackend(i int) v1.Backend {
	return v1.Backend{IP: netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)}), State: v1.BackendActive}
}

func shardOf(i int, gen uint64, backends ...int) v1.BackendShard {
	sh := v1.BackendShard{Cluster: "us", Namespace: "default", Service: "big", Shard: i, Gen: gen}
	for _, b := range backends {
		sh.Backends = append(sh.Backends, usBackend(b))
	}
	return sh
}

func ints(from, to int) []int {
	var out []int
	for i := from; i < to; i++ {
		out = append(out, i)
	}
	return out
}

// event is one thing a reader's stores deliver.
type event struct {
	name  string
	apply func(st *state)
}

func upsertHead(svc v1.Service) event {
	return event{fmt.Sprintf("service %v", svc.BackendShards), func(st *state) { st.upsertService("us", svc) }}
}

func upsertShard(sh v1.BackendShard) event {
	return event{fmt.Sprintf("shard %d gen %d (%d backends)", sh.Shard, sh.Gen, len(sh.Backends)), func(st *state) { st.upsertShard("us", sh) }}
}

func deleteShard(i int) event {
	return event{fmt.Sprintf("delete shard %d", i), func(st *state) { st.deleteShard("us", ServiceName{"default", "big"}, i) }}
}

// usBackends is the set of us's backends the merged service "big" holds.
func usBackends(st *state) map[netip.Addr]int {
	out := map[netip.Addr]int{}
	if m := st.snap.Load().Services[ServiceName{"default", "big"}]; m != nil {
		for _, b := range m.Backends {
			if b.Cluster == "us" {
				out[b.IP]++
			}
		}
	}
	return out
}

func permutations(n int) [][]int {
	if n == 0 {
		return [][]int{nil}
	}
	var out [][]int
	for _, p := range permutations(n - 1) {
		for i := 0; i <= len(p); i++ {
			q := slices.Insert(slices.Clone(p), i, n-1)
			out = append(out, q)
		}
	}
	return out
}

// Every change a writer makes, its events delivered in every order, with a
// snapshot published after each one: no snapshot lacks a backend that is
// in the service before and after the change, none holds one twice, and
// the last one is the new state.
func TestStateShardEventsInAnyOrder(t *testing.T) {
	// Before: shards 0 (backends 0-9) and 1 (10-19), generation 1.
	before := []event{upsertHead(shardedSvc(1, 1)), upsertShard(shardOf(0, 1, ints(0, 10)...)), upsertShard(shardOf(1, 1, ints(10, 20)...))}
	for _, tc := range []struct {
		name   string
		events []event
		after  []int // the backends after the change
	}{
		{"backend 15 moves from shard 1 to shard 0", []event{
			upsertHead(shardedSvc(2, 2)), upsertShard(shardOf(0, 2, append(ints(0, 10), 15)...)),
			upsertShard(shardOf(1, 2, slices.Delete(ints(10, 20), 5, 6)...)),
		}, ints(0, 20)},
		{"compaction: shard 1 emptied into shard 0 and deleted", []event{
			upsertHead(shardedSvc(2)), upsertShard(shardOf(0, 2, ints(0, 20)...)), deleteShard(1),
		}, ints(0, 20)},
		{"split: shard 1 gives half to a new shard 2", []event{
			upsertHead(shardedSvc(1, 2, 2)), upsertShard(shardOf(1, 2, ints(10, 15)...)), upsertShard(shardOf(2, 2, ints(15, 20)...)),
		}, ints(0, 20)},
		{"a move beside removals and an addition", []event{
			upsertHead(shardedSvc(2, 2)), upsertShard(shardOf(0, 2, append(ints(2, 10), 15, 30)...)),
			upsertShard(shardOf(1, 2, 10, 11, 12, 13, 14, 16, 17, 18, 19)),
		}, append(append(ints(2, 20), 30), 15)},
		{"shards back into the service value", []event{
			upsertHead(func() v1.Service {
				s := shardedSvc()
				for _, i := range ints(0, 20) {
					s.Backends = append(s.Backends, usBackend(i))
				}
				return s
			}()), deleteShard(0), deleteShard(1),
		}, ints(0, 20)},
		{"a new shard at the end, no move", []event{
			upsertHead(shardedSvc(1, 1, 3)), upsertShard(shardOf(2, 3, ints(20, 25)...)),
		}, ints(0, 25)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := map[netip.Addr]bool{}
			for _, i := range tc.after {
				want[usBackend(i).IP] = true
			}
			for _, order := range permutations(len(tc.events)) {
				st := newState("eu", nil, slog.New(slog.DiscardHandler))
				st.setCluster(v1.ClusterConfig{Name: "us", ID: 2})
				for _, ev := range before {
					ev.apply(st)
				}
				st.publish()
				old := usBackends(st)
				if len(old) != 20 {
					t.Fatalf("before: %d backends", len(old))
				}
				var seq []string
				for _, i := range order {
					ev := tc.events[i]
					seq = append(seq, ev.name)
					ev.apply(st)
					st.publish()
					got := usBackends(st)
					for ip := range old {
						if want[ip] && got[ip] == 0 {
							t.Fatalf("after %v: backend %s, in the service before and after, is missing", seq, ip)
						}
					}
					for ip, n := range got {
						if n > 1 {
							t.Fatalf("after %v: backend %s %d times", seq, ip, n)
						}
					}
				}
				got := usBackends(st)
				if len(got) != len(want) {
					t.Fatalf("after %v: %d backends, want %d", seq, len(got), len(want))
				}
				for ip := range want {
					if got[ip] == 0 {
						t.Fatalf("after %v: backend %s missing", seq, ip)
					}
				}
			}
		})
	}
}

// A service seen for the first time takes its shards as they come: there
// is nothing earlier to keep.
func TestStateShardsFirstSight(t *testing.T) {
	st := newState("eu", nil, slog.New(slog.DiscardHandler))
	st.setCluster(v1.ClusterConfig{Name: "us", ID: 2})
	st.upsertShard("us", shardOf(1, 5, ints(10, 20)...))
	st.publish()
	if n := len(usBackends(st)); n != 0 {
		t.Fatalf("shards without a service value: %d backends merged", n)
	}
	st.upsertService("us", shardedSvc(5, 5))
	st.publish()
	if n := len(usBackends(st)); n != 10 {
		t.Fatalf("one of two shards here: %d backends, want its 10", n)
	}
	st.upsertShard("us", shardOf(0, 4, ints(0, 10)...))
	st.publish()
	if n := len(usBackends(st)); n != 20 {
		t.Fatalf("both shards here, one of an older generation: %d backends, want 20", n)
	}
	st.upsertShard("us", shardOf(0, 5, ints(0, 10)...))
	st.deleteService("us", ServiceName{"default", "big"})
	st.publish()
	if m := st.snap.Load().Services[ServiceName{"default", "big"}]; m != nil {
		t.Fatalf("service deleted, its shards still here: merged %+v", m)
	}
}

// A shard that lists a backend twice, or two shards listing one backend,
// give it once; the merged target ports are resolved as for any backend.
func TestStateShardsDuplicateBackendOnce(t *testing.T) {
	st := newState("eu", nil, slog.New(slog.DiscardHandler))
	st.setCluster(v1.ClusterConfig{Name: "us", ID: 2})
	st.upsertService("us", shardedSvc(1, 1))
	st.upsertShard("us", shardOf(0, 1, 0, 1, 2))
	st.upsertShard("us", shardOf(1, 1, 2, 3))
	st.publish()
	m := st.snap.Load().Services[ServiceName{"default", "big"}]
	if got := usBackends(st); len(got) != 4 || got[usBackend(2).IP] != 1 || m.Offered["us"] != 4 {
		t.Fatalf("backends %v, offered %v; want 4, each once", got, m.Offered)
	}
	for _, b := range m.Backends {
		if b.TargetPort(0) != 8080 || b.ClusterID != 2 {
			t.Fatalf("backend %+v, want target port 8080 and cluster 2", b)
		}
	}
}
