package identity

import (
	"context"
	"errors"
	"fmt"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
)

// publish makes sure etcd holds an identity for ls and this replica's
// reference on it, under the current session, and returns both. prefer,
// when nonzero, is the id to choose if a new identity has to be allocated
// (a re-publication after the identity was collected).
func (a *Allocator) publish(ctx context.Context, ls *labelSet, prefer v1.NumericIdentity) (v1.NumericIdentity, *kvstore.Session, error) {
	for range maxAttempts {
		session, err := a.currentSession(ctx)
		if err != nil {
			return 0, nil, err
		}
		id, done, err := a.publishOnce(ctx, ls, session, prefer)
		if errors.Is(err, kvstore.ErrSessionLost) {
			// Revoked or expired under us; the session's watcher will
			// notice too and re-publish what was on it.
			a.forgetSession(session)
			continue
		}
		if err != nil {
			return 0, nil, err
		}
		if done {
			return id, session, nil
		}
		if err := ctx.Err(); err != nil {
			return 0, nil, err
		}
	}
	return 0, nil, fmt.Errorf("%w: gave up after %d compare-and-swap attempts", ErrContention, maxAttempts)
}

// get reads key within the allocator's request timeout.
func (a *Allocator) get(ctx context.Context, key string) (*kvstore.KeyValue, error) {
	rctx, cancel := a.requestContext(ctx)
	defer cancel()
	kv, _, err := a.client.Get(rctx, key)
	return kv, err
}

// txn commits t within the allocator's request timeout.
func (a *Allocator) txn(ctx context.Context, t kvstore.Txn) (kvstore.TxnResult, error) {
	rctx, cancel := a.requestContext(ctx)
	defer cancel()
	return a.client.Txn(rctx, t)
}

// publishOnce is one round: read the index, then join the identity it
// names or allocate one. done is false when a compare failed and the caller
// should read again.
func (a *Allocator) publishOnce(ctx context.Context, ls *labelSet, session *kvstore.Session, prefer v1.NumericIdentity) (v1.NumericIdentity, bool, error) {
	indexKey := a.indexKey(ls)
	idx, err := a.get(ctx, indexKey)
	if err != nil {
		return 0, false, fmt.Errorf("read label index %s: %w", indexKey, err)
	}
	if idx == nil {
		return a.allocate(ctx, ls, session, prefer)
	}
	id, err := a.parseID(string(idx.Value))
	if err != nil {
		a.log.Error("label index holds no usable identity; deleting it", "key", indexKey, "labels", ls.String(), "err", err)
		return 0, false, a.dropIndex(ctx, indexKey, idx.ModRevision)
	}
	return a.join(ctx, ls, id, idx.ModRevision, session)
}

// join takes a reference on id, which the index (at ModRevision
// indexRev) gives for ls: it checks that the identity key holds ls, then
// puts the ref and re-puts the index in one transaction that compares
// both keys' ModRevisions. The index re-put is what GC compares against
// (see the design notes).
func (a *Allocator) join(ctx context.Context, ls *labelSet, id v1.NumericIdentity, indexRev int64, session *kvstore.Session) (v1.NumericIdentity, bool, error) {
	indexKey, idKey := a.indexKey(ls), a.idKey(id)
	kv, err := a.get(ctx, idKey)
	if err != nil {
		return 0, false, fmt.Errorf("read identity %s: %w", idKey, err)
	}
	if kv == nil {
		return a.repair(ctx, ls, id, indexRev, session)
	}
	got, err := v1.DecodeIdentityEntry(idKey, kv.Value)
	if err != nil {
		// Perhaps written by a newer Trellis: neither use nor delete it.
		return 0, false, fmt.Errorf("identity %s, which label index %s names: %w", idKey, indexKey, err)
	}
	if c := canonicalLabels(got.Labels); c != ls.canonical {
		a.log.Error("label index names an identity with other labels; deleting the index", "index", indexKey, "identity", idKey, "labels", ls.String(), "identityLabels", "{"+cut(c)+"}")
		return 0, false, a.dropIndex(ctx, indexKey, indexRev)
	}

	if h := a.hooks.beforeJoin; h != nil {
		h(id)
	}
	txn, err := a.txn(ctx, kvstore.Txn{
		If: []kvstore.Cmp{kvstore.CmpModRevision(indexKey, indexRev), kvstore.CmpModRevision(idKey, kv.ModRevision)},
		Then: []kvstore.Op{
			kvstore.OpPut(indexKey, []byte(id.String())),
			kvstore.OpPut(a.refKey(id), []byte(ls.hash)).WithSession(session),
		},
	})
	if err != nil {
		return 0, false, fmt.Errorf("reference identity %s: %w", idKey, err)
	}
	return id, txn.Succeeded, nil
}

// repair re-creates a missing identity key from the index that still names
// it (someone deleted the published key), with the reference.
func (a *Allocator) repair(ctx context.Context, ls *labelSet, id v1.NumericIdentity, indexRev int64, session *kvstore.Session) (v1.NumericIdentity, bool, error) {
	indexKey, idKey := a.indexKey(ls), a.idKey(id)
	value, err := v1.Encode(v1.Identity{Cluster: a.cfg.Cluster, ID: id, Labels: ls.labels})
	if err != nil {
		return 0, false, err
	}
	txn, err := a.txn(ctx, kvstore.Txn{
		If: []kvstore.Cmp{kvstore.CmpModRevision(indexKey, indexRev), kvstore.CmpAbsent(idKey)},
		Then: []kvstore.Op{
			kvstore.OpPut(idKey, value),
			kvstore.OpPut(indexKey, []byte(id.String())),
			kvstore.OpPut(a.refKey(id), []byte(ls.hash)).WithSession(session),
		},
	})
	if err != nil {
		return 0, false, fmt.Errorf("re-create identity %s: %w", idKey, err)
	}
	if txn.Succeeded {
		a.view.mark(id.Local())
		a.log.Warn("identity key was missing; re-created it from the label index", "id", id, "labels", ls.String())
	}
	return id, txn.Succeeded, nil
}

// allocate creates a new identity for ls with this replica's reference,
// provided nobody has indexed ls or taken the id meanwhile. done is false
// when another replica indexed ls first: the caller reads the index again
// and joins it.
func (a *Allocator) allocate(ctx context.Context, ls *labelSet, session *kvstore.Session, prefer v1.NumericIdentity) (v1.NumericIdentity, bool, error) {
	if !a.view.isLoaded() {
		if err := a.loadView(ctx); err != nil {
			return 0, false, err
		}
	}
	indexKey := a.indexKey(ls)
	var preferLocal uint16
	if prefer.ClusterID() == a.cfg.ClusterID {
		preferLocal = prefer.Local()
	}
	reloaded := false
	for range maxProbes {
		local, ok := a.view.pick(ls.seed, preferLocal)
		if !ok {
			if reloaded {
				return 0, false, fmt.Errorf("%w: all %d local ids (%d-%d) of cluster %s are in use", ErrNoFreeID, int(a.cfg.MaxLocalID)-int(a.cfg.MinLocalID)+1, a.cfg.MinLocalID, a.cfg.MaxLocalID, a.cfg.Cluster)
			}
			// The view only learns of deletions from GC passes; look
			// at etcd before giving up.
			if err := a.loadView(ctx); err != nil {
				return 0, false, err
			}
			reloaded = true
			continue
		}
		preferLocal = 0
		id := v1.MakeIdentity(a.cfg.ClusterID, local)
		idKey := a.idKey(id)
		value, err := v1.Encode(v1.Identity{Cluster: a.cfg.Cluster, ID: id, Labels: ls.labels})
		if err != nil {
			a.view.unmark(local)
			return 0, false, err
		}
		txn, err := a.txn(ctx, kvstore.Txn{
			If: []kvstore.Cmp{kvstore.CmpAbsent(indexKey), kvstore.CmpAbsent(idKey)},
			Then: []kvstore.Op{
				kvstore.OpPut(idKey, value),
				kvstore.OpPut(indexKey, []byte(id.String())),
				kvstore.OpPut(a.refKey(id), []byte(ls.hash)).WithSession(session),
			},
			Else: []kvstore.Op{kvstore.OpCount(indexKey)},
		})
		if err != nil {
			a.view.unmark(local)
			return 0, false, fmt.Errorf("allocate identity %s: %w", idKey, err)
		}
		if txn.Succeeded {
			a.allocated.Add(1)
			a.log.Info("allocated identity", "id", id, "labels", ls.String())
			return id, true, nil
		}
		if txn.Counts[0] > 0 {
			// Another replica indexed ls first; the id stays free.
			a.view.unmark(local)
			return 0, false, nil
		}
		// The id is taken (it stays marked); try the next one.
	}
	return 0, false, fmt.Errorf("%w: %d ids in a row were taken by other replicas", ErrContention, maxProbes)
}

// dropIndex deletes an unusable index key if it is still at rev.
func (a *Allocator) dropIndex(ctx context.Context, key string, rev int64) error {
	_, err := a.txn(ctx, kvstore.Txn{If: []kvstore.Cmp{kvstore.CmpModRevision(key, rev)}, Then: []kvstore.Op{kvstore.OpDelete(key)}})
	if err != nil {
		return fmt.Errorf("delete label index %s: %w", key, err)
	}
	return nil
}

// deleteRef deletes this replica's ref key for e if it still belongs to
// e's label set. The caller holds e.mu.
func (a *Allocator) deleteRef(ctx context.Context, e *entry) error {
	key := a.refKey(e.id)
	_, err := a.txn(ctx, kvstore.Txn{If: []kvstore.Cmp{kvstore.CmpValue(key, []byte(e.ls.hash))}, Then: []kvstore.Op{kvstore.OpDelete(key)}})
	if err != nil {
		return fmt.Errorf("delete reference %s: %w", key, err)
	}
	return nil
}

// loadView replaces the used-id view with what etcd holds.
func (a *Allocator) loadView(ctx context.Context) error {
	var used []uint16
	_, err := a.list(ctx, a.idPrefix, 0, true, func(kv kvstore.KeyValue) {
		if id, err := a.parseID(kv.Key[len(a.idPrefix):]); err == nil {
			used = append(used, id.Local())
		}
	})
	if err != nil {
		return fmt.Errorf("load used identities: %w", err)
	}
	a.view.replace(used)
	return nil
}

// listPageSize bounds one page of a listing: identities are at most
// v1.MaxValueSize each, usually a few hundred bytes.
const listPageSize = 1000

// list reads every key under prefix at revision rev (0: the current one),
// page by page, and returns the revision read.
func (a *Allocator) list(ctx context.Context, prefix string, rev int64, keysOnly bool, fn func(kvstore.KeyValue)) (int64, error) {
	rev, err := a.client.List(ctx, prefix, kvstore.ListOptions{Revision: rev, KeysOnly: keysOnly, PageSize: listPageSize}, fn)
	if err != nil {
		return 0, fmt.Errorf("list %s: %w", prefix, err)
	}
	return rev, nil
}
