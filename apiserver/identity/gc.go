package identity

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
)

// Run collects unused identities every GCInterval, and retries deleting
// references whose Release could not reach etcd, until ctx ends or the
// allocator is closed. Every replica may run it: their deletes are
// compare-and-swap and at most one succeeds.
//
// Run owns the allocator's lifetime: when it returns, the allocator is
// closed (see Close), so a server that runs it under its own context needs
// no separate Close. It returns nil.
func (a *Allocator) Run(ctx context.Context) error {
	defer a.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(a.ctx, cancel)
	defer stop()

	var gc gcState
	t := time.NewTicker(a.cfg.GCInterval)
	defer t.Stop()
	for {
		a.retryStale(ctx)
		if _, err := a.collect(ctx, &gc); err != nil && ctx.Err() == nil {
			a.log.Warn("identity garbage collection failed; retrying next pass", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// retryStale deletes the ref keys that Release failed to delete.
func (a *Allocator) retryStale(ctx context.Context) {
	for _, e := range a.snapshot() {
		e.mu.Lock()
		if e.stale && e.refs == 0 {
			if err := a.deleteRef(ctx, e); err != nil {
				if ctx.Err() == nil {
					a.log.Warn("delete identity reference failed; will retry", "id", e.id, "labels", e.ls.String(), "err", err)
				}
			} else {
				e.stale = false
				a.mu.Lock()
				a.maybeForgetLocked(e)
				a.mu.Unlock()
			}
		}
		e.mu.Unlock()
	}
}

// gcState carries candidates from one pass to the next.
type gcState struct {
	prev map[v1.NumericIdentity]gcCandidate
}

// gcCandidate is an identity without references, with the ModRevisions
// the delete will compare.
type gcCandidate struct {
	idModRev int64    // of the identity key; 0 when it is missing (orphan index)
	index    []revKey // the index keys naming the identity, by key
	since    time.Time
}

type revKey struct {
	key    string
	modRev int64
}

func (c gcCandidate) sameKeys(o gcCandidate) bool {
	return c.idModRev == o.idModRev && slices.Equal(c.index, o.index)
}

// collect is one GC pass; it returns how many identities it deleted.
//
// It lists identity keys, index keys and ref keys at one revision. An
// identity with no ref key is a candidate; it is deleted once it has been
// one, with unchanged ModRevisions, for GCGrace and since an earlier pass.
// The delete compares those ModRevisions; see the design notes in
// allocator.go for why that cannot remove an identity in use.
func (a *Allocator) collect(ctx context.Context, st *gcState) (int, error) {
	ids := make(map[v1.NumericIdentity]int64)
	rev, err := a.list(ctx, a.idPrefix, 0, true, func(kv kvstore.KeyValue) {
		id, err := a.parseID(kv.Key[len(a.idPrefix):])
		if err != nil {
			a.log.Warn("identity key that this cluster cannot have allocated; leaving it", "key", cut(kv.Key), "err", err)
			return
		}
		ids[id] = kv.ModRevision
	})
	if err != nil {
		return 0, fmt.Errorf("identity gc: %w", err)
	}
	index := make(map[v1.NumericIdentity][]revKey)
	if _, err := a.list(ctx, a.indexPrefix, rev, false, func(kv kvstore.KeyValue) {
		id, err := a.parseID(string(kv.Value))
		if err != nil {
			// Acquire of those labels deletes it; nothing to collect.
			a.log.Warn("label index holds no usable identity", "key", kv.Key, "err", err)
			return
		}
		index[id] = append(index[id], revKey{kv.Key, kv.ModRevision})
	}); err != nil {
		return 0, fmt.Errorf("identity gc: %w", err)
	}
	referenced := make(map[v1.NumericIdentity]bool)
	if _, err := a.list(ctx, a.refsPrefix, rev, true, func(kv kvstore.KeyValue) {
		s, ok := refSuffixID(kv.Key[len(a.refsPrefix):])
		if !ok {
			return
		}
		if id, err := a.parseID(s); err == nil {
			referenced[id] = true
		}
	}); err != nil {
		return 0, fmt.Errorf("identity gc: %w", err)
	}

	now := time.Now()
	next := make(map[v1.NumericIdentity]gcCandidate)
	deleted := 0
	candidates := make(map[v1.NumericIdentity]bool)
	for id := range ids {
		candidates[id] = !referenced[id]
	}
	for id := range index {
		candidates[id] = !referenced[id]
	}
	for id, unreferenced := range candidates {
		if !unreferenced {
			continue
		}
		c := gcCandidate{idModRev: ids[id], index: index[id], since: now}
		slices.SortFunc(c.index, func(x, y revKey) int { return strings.Compare(x.key, y.key) })
		p, seen := st.prev[id]
		if seen && p.sameKeys(c) {
			c.since = p.since
		}
		if !seen || !p.sameKeys(c) || now.Sub(c.since) < a.cfg.GCGrace {
			next[id] = c
			continue
		}
		ok, err := a.deleteIdentity(ctx, id, c)
		switch {
		case err != nil:
			a.log.Warn("delete unused identity failed", "id", id, "err", err)
			next[id] = c
		case ok:
			deleted++
			delete(ids, id)
			a.collected.Add(1)
			a.log.Info("deleted unused identity", "id", id)
		}
		// A failed compare means someone acquired (or repaired) it: it
		// starts over as a non-candidate.
	}
	st.prev = next

	used := make([]uint16, 0, len(ids))
	for id := range ids {
		used = append(used, id.Local())
	}
	a.view.replace(used)
	a.gcPasses.Add(1)
	return deleted, ctx.Err()
}

// deleteIdentity deletes identity id and its index keys if none of them
// changed since the candidate was recorded.
func (a *Allocator) deleteIdentity(ctx context.Context, id v1.NumericIdentity, c gcCandidate) (bool, error) {
	if h := a.hooks.beforeGCDelete; h != nil {
		h(id)
	}
	idKey := a.idKey(id)
	t := kvstore.Txn{If: []kvstore.Cmp{kvstore.CmpModRevision(idKey, c.idModRev)}}
	if c.idModRev != 0 {
		t.Then = append(t.Then, kvstore.OpDelete(idKey))
	}
	for _, ix := range c.index {
		t.If = append(t.If, kvstore.CmpModRevision(ix.key, ix.modRev))
		t.Then = append(t.Then, kvstore.OpDelete(ix.key))
	}
	txn, err := a.txn(ctx, t)
	if err != nil {
		return false, fmt.Errorf("delete identity %s: %w", idKey, err)
	}
	return txn.Succeeded, nil
}
