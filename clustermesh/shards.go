package clustermesh

// Design notes: backend shards, the reader's side
//
// A service too large for one value arrives as a value that lists one
// generation per shard (v1.Service.BackendShards) and the shards
// themselves, through another WatchStore. Nothing orders the two stores'
// events, nor the shards among themselves: the writer's transactions may
// commit in any order, a relist delivers keys in key order, and a new
// session lists everything again while the old session's entries are still
// in the state. The writer gives every shard that gains or loses a backend
// by a move a new generation (apiserver/shards.go), so the rule here is:
//
//   - a service's backends come from its shards only when every shard the
//     value lists is here with the generation the value lists for it;
//   - until then the service keeps the backends it had when that was last
//     true (or, switching from backends in the value to shards, the
//     value's backends);
//   - a service seen for the first time, which has no such backends yet,
//     takes the listed shards that are here, whatever their generation:
//     backends that have not arrived yet were never here to lose.
//
// So a backend that moves is never in neither shard in what the merge
// sees; one that changes without moving (added, removed, new state) is
// applied as soon as its shard arrives, because no generation changes and
// the set keeps matching. The old backends are kept by reference (the
// shards' slices), not copied, and only while the set does not match.
// Synced before delete holds across shards as it does for every key: a new
// session's shards replace the old session's one by one, and the ones it
// no longer has go only after its stores are synced (pruneShards).

import (
	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// published is what one cluster publishes of one service: its value and,
// for a service whose backends are in shards, the shards received.
type published struct {
	head    v1.Service
	hasHead bool
	// shards are the backend shards received, by index. They may arrive
	// before the service value and outlive it until their deletes come.
	shards map[int]v1.BackendShard
	// parts are a sharded service's backends as the merge uses them, one
	// slice per shard (see the design notes); nil when the value carries
	// its backends.
	parts [][]v1.Backend
	// complete: parts are a whole set, from shards that matched the
	// value's generations or from the value's own backends.
	complete bool
}

// refresh recomputes parts after the value (prev being the one before,
// when hadHead) or a shard changed.
func (p *published) refresh(prev v1.Service, hadHead bool) {
	gens := p.head.BackendShards
	if !p.hasHead || len(gens) == 0 {
		p.parts, p.complete = nil, false
		return
	}
	if p.matches() {
		parts := make([][]v1.Backend, len(gens))
		for i := range gens {
			parts[i] = p.shards[i].Backends
		}
		p.parts, p.complete = parts, true
		return
	}
	switch {
	case p.complete:
		// Keep the last whole set.
	case hadHead && len(prev.BackendShards) == 0:
		// The service moved its backends from its value to shards.
		p.parts, p.complete = [][]v1.Backend{prev.Backends}, true
	default:
		parts := make([][]v1.Backend, 0, len(p.shards))
		for i := range gens {
			if sh, ok := p.shards[i]; ok {
				parts = append(parts, sh.Backends)
			}
		}
		p.parts = parts
	}
}

// matches reports whether every shard the value lists is here with the
// generation the value lists for it.
func (p *published) matches() bool {
	for i, gen := range p.head.BackendShards {
		if sh, ok := p.shards[i]; !ok || sh.Gen != gen {
			return false
		}
	}
	return true
}

// backendLists are the lists of backends the merge takes this service's
// from: the value's own, or the shards'.
func (p *published) backendLists() (own []v1.Backend, parts [][]v1.Backend) {
	if len(p.head.BackendShards) == 0 {
		return p.head.Backends, nil
	}
	return nil, p.parts
}
