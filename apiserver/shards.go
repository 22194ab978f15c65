package apiserver

// Design notes: backend shards, the writer's side
//
// A source hands the Publisher whole services. One whose value, backends
// included, fits in v1.MaxValueSize is published as it always was: one
// value, which servers and agents from before shards read unchanged. A
// larger one is published as a value without backends that lists one
// generation per shard, and its backends as v1.BackendShard values of at
// most v1.MaxShardBackends backends and v1.ShardFillBytes of JSON each.
// Going back to one value needs the backends to fit in half of it, so a
// service near the limit does not flip between the two forms.
//
// Stable assignment. The Publisher remembers, per sharded service, which
// shard holds which backend. A backend keeps its shard while it exists; a
// changed backend is rewritten in place; a new one goes to the lowest shard
// with room, or a new shard at the end; an emptied shard in the middle
// stays (an empty value) and trailing empty shards go. So adding, removing
// or changing a backend rewrites the one shard that holds it.
//
// Moves and generations. A backend moves only when its shard would pass
// the value limit (backends grew in place), or when removals left more
// than twice the shards the service needs and the last shards are emptied
// into the first ones. Every shard that gains or loses a backend by a move
// gets a new generation, and the service value lists the new generations.
// An agent uses a sharded service's backends only from shards whose
// generations are all the ones the service value lists, keeping what it
// had until then (clustermesh/state.go), so whatever order the writes
// land in, and however a reader's watch or relist interleaves them, no
// reader sees a moved backend in neither shard. Changes that move nothing
// keep the generations, so under a steady stream of them (a rolling
// update) readers apply each shard as it comes.
//
// Restarts. The first time this run publishes a sharded service it reads
// the service's shards from etcd and keeps their assignment and
// generations, so a restarted server writes nothing for a service that did
// not change, and every shard it still wants is handed to the SyncStore,
// which therefore does not delete it (SyncStore deletes only what the new
// run does not want, and only after the source's initial state is in).
// When that read fails, the new assignment starts from a generation taken
// from the clock, above any a reader can hold from the earlier run.

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
)

// shardLayout is one sharded service's assignment of backends to shards.
// A layout is never modified once built: next returns a new one that
// shares the shards it did not touch.
type shardLayout struct {
	// gen is the generation the next move writes.
	gen    uint64
	shards []*shard
	// where is the index of the shard that holds each backend.
	where map[netip.Addr]int
}

type shard struct {
	gen uint64
	// ips is the order of the backends in the value.
	ips      []netip.Addr
	backends map[netip.Addr]sizedBackend
	// size is the JSON bytes of the backends, a comma each.
	size int
	// dirty: the shard must be written.
	dirty bool
}

type sizedBackend struct {
	b    v1.Backend
	size int
}

func (s *shard) clone() *shard {
	return &shard{gen: s.gen, ips: slices.Clone(s.ips), backends: maps.Clone(s.backends), size: s.size, dirty: true}
}

func (s *shard) add(b sizedBackend) {
	s.ips = append(s.ips, b.b.IP)
	s.backends[b.b.IP] = b
	s.size += b.size
}

func (s *shard) remove(ip netip.Addr) sizedBackend {
	b := s.backends[ip]
	delete(s.backends, ip)
	s.ips = slices.DeleteFunc(s.ips, func(a netip.Addr) bool { return a == ip })
	s.size -= b.size
	return b
}

// shardOverhead bounds the JSON of a shard besides its backends: the
// field names, the service's names, a 4-digit index and a 20-digit
// generation.
func shardOverhead(cluster, namespace, name string) int {
	return len(`{"v":1,"cluster":"","namespace":"","service":"","shard":0000,"gen":00000000000000000000,"backends":[]}`) +
		len(cluster) + len(namespace) + len(name)
}

// room reports whether s can take a backend of size bytes: an empty shard
// takes any backend that fits in a value, others fill to ShardFillBytes.
func (s *shard) room(size, overhead int) bool {
	if len(s.ips) == 0 {
		return overhead+size <= v1.MaxValueSize
	}
	return len(s.ips) < v1.MaxShardBackends && overhead+s.size+size <= v1.ShardFillBytes
}

func backendSize(b v1.Backend) int {
	data, err := json.Marshal(b)
	if err != nil {
		// A Backend always marshals; a failure would be a bug here.
		panic(fmt.Sprintf("apiserver: marshal backend %v: %v", b.IP, err))
	}
	return len(data) + 1
}

func sameBackend(a, b v1.Backend) bool {
	return a.IP == b.IP && a.State == b.State && a.Node == b.Node && a.Zone == b.Zone && slices.Equal(a.Ports, b.Ports)
}

// shardWrite is what publishing a layout writes for one service.
type shardWrite struct {
	head    []byte
	upserts map[int][]byte // by shard index
	deletes []int
}

// next returns the layout for svc's backends (validated, each IP once)
// that follows l, and marks the shards it changes for writing. It does
// not modify l, and fails when a backend cannot fit in a shard of its own
// or the service would need more than MaxBackendShards. now is the clock,
// in nanoseconds: a move, or a new shard, takes the generation max(l.gen,
// now), so generations only grow, also across restarts.
func (l *shardLayout) next(svc v1.Service, now uint64) (*shardLayout, error) {
	name := svc.Namespace + "/" + svc.Name
	overhead := shardOverhead(svc.Cluster, svc.Namespace, svc.Name)
	gen := max(l.gen, now)
	genUsed := false
	// where starts as a copy (a block copy, much cheaper than inserting
	// every backend again) and follows the changes below.
	n := &shardLayout{gen: l.gen, shards: slices.Clone(l.shards), where: maps.Clone(l.where)}
	touched := make(map[int]bool)
	cow := func(i int) *shard {
		if !touched[i] {
			n.shards[i] = n.shards[i].clone()
			touched[i] = true
		}
		return n.shards[i]
	}
	// moved gives shard i the new generation: it gained or lost a backend
	// by a move, or is new.
	moved := func(i int) {
		cow(i).gen = gen
		genUsed = true
	}

	// Backends to place: new ones (from -1), and those a full shard gives
	// up (from its index).
	type pending struct {
		b    sizedBackend
		from int
	}
	var place []pending
	totalBytes, kept := 0, 0
	for _, b := range svc.Backends {
		i, had := l.where[b.IP]
		var sb sizedBackend
		switch {
		case !had:
			sb = sizedBackend{b: b, size: backendSize(b)}
			place = append(place, pending{b: sb, from: -1})
		default:
			kept++
			cur := l.shards[i].backends[b.IP]
			if sameBackend(cur.b, b) {
				sb = cur
				break
			}
			sb = sizedBackend{b: b, size: backendSize(b)}
			s := cow(i)
			s.size += sb.size - cur.size
			s.backends[b.IP] = sb
		}
		if overhead+sb.size > v1.MaxValueSize {
			return nil, fmt.Errorf("service %s: backend %s is %d bytes of JSON, a backend shard holds at most %d: %w", name, b.IP, sb.size-1, v1.MaxValueSize-overhead, v1.ErrTooLarge)
		}
		totalBytes += sb.size
	}
	// Removed backends; a source that only adds and changes (backends come
	// in each IP once) skips the search.
	if kept < len(l.where) {
		desired := make(map[netip.Addr]struct{}, len(svc.Backends))
		for _, b := range svc.Backends {
			desired[b.IP] = struct{}{}
		}
		for ip, i := range l.where {
			if _, ok := desired[ip]; !ok {
				cow(i).remove(ip)
				delete(n.where, ip)
			}
		}
	}

	// A shard whose backends grew past the value limit gives up backends
	// from its end until it is back under the fill size.
	for i := range n.shards {
		if overhead+n.shards[i].size <= v1.MaxValueSize {
			continue
		}
		s := cow(i)
		for overhead+s.size > v1.ShardFillBytes && len(s.ips) > 1 {
			b := s.remove(s.ips[len(s.ips)-1])
			delete(n.where, b.b.IP)
			place = append(place, pending{b: b, from: i})
		}
		moved(i)
	}

	// Place each in the lowest shard with room, other than the one it
	// just left. The cursor keeps this linear: a shard too full for one
	// backend is not asked again in this call.
	cursor := 0
	for _, p := range place {
		for cursor < len(n.shards) && !n.shards[cursor].room(p.b.size, overhead) {
			cursor++
		}
		i := cursor
		for i < len(n.shards) && (i == p.from || !n.shards[i].room(p.b.size, overhead)) {
			i++
		}
		if i == len(n.shards) {
			if i == v1.MaxBackendShards {
				return nil, fmt.Errorf("service %s: %d backends (%d bytes of JSON) need more than %d backend shards of at most %d backends or %d bytes each: %w",
					name, len(svc.Backends), totalBytes, v1.MaxBackendShards, v1.MaxShardBackends, v1.ShardFillBytes, v1.ErrTooLarge)
			}
			n.shards = append(n.shards, &shard{backends: make(map[netip.Addr]sizedBackend), dirty: true})
			touched[i] = true
			moved(i)
		}
		cow(i).add(p.b)
		n.where[p.b.b.IP] = i
		if p.from >= 0 {
			moved(i)
		}
	}

	n.dropTrailingEmpty()
	// Compaction: when removals left more than twice the shards needed,
	// empty the last shards into the first ones, down to one spare.
	need := max(1, (len(svc.Backends)+v1.MaxShardBackends-1)/v1.MaxShardBackends,
		(totalBytes+v1.ShardFillBytes-overhead-1)/(v1.ShardFillBytes-overhead))
	if len(n.shards) > 2*need+1 {
	compact:
		for last := len(n.shards) - 1; last > need; last-- {
			for len(n.shards[last].ips) > 0 {
				sb := n.shards[last].backends[n.shards[last].ips[0]]
				dst := 0
				for dst < last && !n.shards[dst].room(sb.size, overhead) {
					dst++
				}
				if dst == last {
					break compact
				}
				cow(last).remove(sb.b.IP)
				cow(dst).add(sb)
				n.where[sb.b.IP] = dst
				moved(last)
				moved(dst)
			}
		}
		n.dropTrailingEmpty()
	}
	if genUsed {
		n.gen = gen + 1
	}
	return n, nil
}

// dropTrailingEmpty removes empty shards at the end: the service value
// stops listing them and their keys are deleted.
func (l *shardLayout) dropTrailingEmpty() {
	for len(l.shards) > 0 && len(l.shards[len(l.shards)-1].ips) == 0 {
		l.shards = l.shards[:len(l.shards)-1]
	}
}

// writes encodes the service value and every dirty shard of l, and lists
// the shards of prev (nil: none) that l no longer has.
func (l *shardLayout) writes(svc v1.Service, prev *shardLayout) (shardWrite, error) {
	name := svc.Namespace + "/" + svc.Name
	w := shardWrite{upserts: make(map[int][]byte)}
	head := svc
	head.Backends = nil
	head.BackendShards = make([]uint64, len(l.shards))
	for i, s := range l.shards {
		head.BackendShards[i] = s.gen
		if !s.dirty {
			continue
		}
		sh := v1.BackendShard{Cluster: svc.Cluster, Namespace: svc.Namespace, Service: svc.Name, Shard: i, Gen: s.gen,
			Backends: make([]v1.Backend, 0, len(s.ips))}
		for _, ip := range s.ips {
			sh.Backends = append(sh.Backends, s.backends[ip].b)
		}
		data, err := v1.Encode(sh)
		if err != nil {
			return shardWrite{}, fmt.Errorf("service %s: shard %d: %w", name, i, err)
		}
		w.upserts[i] = data
	}
	data, err := v1.Encode(head)
	if err != nil {
		return shardWrite{}, fmt.Errorf("service %s: %w", name, err)
	}
	w.head = data
	if prev != nil {
		for i := len(l.shards); i < len(prev.shards); i++ {
			w.deletes = append(w.deletes, i)
		}
	}
	return w, nil
}

// published marks every shard of l as written.
func (l *shardLayout) published() {
	for _, s := range l.shards {
		s.dirty = false
	}
}

// freshLayout is an empty layout: its first shards take the clock's
// generation.
func freshLayout() *shardLayout {
	return &shardLayout{where: map[netip.Addr]int{}}
}

// clock is the generation clock: nanoseconds since 1970.
func clock() uint64 { return uint64(time.Now().UnixNano()) }

// adoptLayout reads a service's shards from etcd and returns their
// assignment with every shard marked for writing (the SyncStore skips the
// values etcd already holds). A backend in two shards stays in the first;
// shards that do not decode, and gaps, become empty shards that the first
// next gives a new generation.
func adoptLayout(ctx context.Context, client *kvstore.Client, cluster, namespace, name string) (*shardLayout, error) {
	prefix := v1.BackendShardPrefix(cluster, namespace, name)
	found := map[int]*v1.BackendShard{}
	top := -1
	_, err := client.List(ctx, prefix, kvstore.ListOptions{}, func(kv kvstore.KeyValue) {
		i, err := strconv.Atoi(strings.TrimPrefix(kv.Key, prefix))
		if err != nil || i < 0 || i >= v1.MaxBackendShards {
			return
		}
		top = max(top, i)
		if sh, err := v1.DecodeBackendShardEntry(kv.Key, kv.Value); err == nil {
			found[i] = &sh
		}
	})
	if err != nil {
		return nil, fmt.Errorf("read the shards of service %s/%s: %w", namespace, name, err)
	}
	l := &shardLayout{where: map[netip.Addr]int{}}
	for _, sh := range found {
		l.gen = max(l.gen, sh.Gen+1)
	}
	for i := 0; i <= top; i++ {
		s := &shard{backends: map[netip.Addr]sizedBackend{}, dirty: true}
		if sh := found[i]; sh != nil {
			s.gen = sh.Gen
			for _, b := range sh.Backends {
				if _, dup := l.where[b.IP]; dup {
					continue
				}
				s.add(sizedBackend{b: b, size: backendSize(b)})
				l.where[b.IP] = i
			}
		} else {
			// Unknown to readers: any generation above what etcd holds
			// and the clock will do; give it the next one.
			s.gen = max(l.gen, clock())
		}
		l.shards = append(l.shards, s)
	}
	return l, nil
}
