package kvstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Single-key operations, listings and transactions, for the code whose keys
// are not a mirror of a desired set: the cluster-config and heartbeat keys,
// the identity allocator's compare-and-swap bookkeeping. They are bounded
// by the request timeout; unlike the stores' listings they do not wait for
// the rate limiter, which paces the bulk traffic of many readers, not a
// writer's own few keys.

// KeyValue is one key as etcd holds it.
type KeyValue struct {
	Key   string
	Value []byte
	// CreateRevision and ModRevision are the store revisions of the key's
	// creation and last change, the values compare-and-swap conditions
	// check.
	CreateRevision, ModRevision int64
}

func fromEtcd(kv *clientv3KV) KeyValue {
	return KeyValue{Key: string(kv.Key), Value: kv.Value, CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision}
}

// Get reads key. kv is nil when the key does not exist; rev is the store
// revision the read saw either way (a watch from rev+1 misses nothing).
func (c *Client) Get(ctx context.Context, key string) (kv *KeyValue, rev int64, err error) {
	start := time.Now()
	rctx, cancel := c.requestContext(ctx)
	resp, err := c.etcd.Get(rctx, key)
	cancel()
	c.cfg.Metrics.observe("kv", "get", start, err)
	if err != nil {
		return nil, 0, fmt.Errorf("kvstore: get %s: %w", key, err)
	}
	if len(resp.Kvs) > 0 {
		v := fromEtcd(resp.Kvs[0])
		kv = &v
	}
	return kv, resp.Header.Revision, nil
}

// Put writes key.
func (c *Client) Put(ctx context.Context, key string, value []byte) error {
	start := time.Now()
	rctx, cancel := c.requestContext(ctx)
	_, err := c.etcd.Put(rctx, key, string(value))
	cancel()
	c.cfg.Metrics.observe("kv", "put", start, err)
	if err != nil {
		return fmt.Errorf("kvstore: put %s: %w", key, err)
	}
	return nil
}

// Delete removes key; a missing key is not an error.
func (c *Client) Delete(ctx context.Context, key string) error {
	start := time.Now()
	rctx, cancel := c.requestContext(ctx)
	_, err := c.etcd.Delete(rctx, key)
	cancel()
	c.cfg.Metrics.observe("kv", "delete", start, err)
	if err != nil {
		return fmt.Errorf("kvstore: delete %s: %w", key, err)
	}
	return nil
}

// ListOptions tune List.
type ListOptions struct {
	// Revision reads the prefix as it was at that revision; 0 reads the
	// current one.
	Revision int64
	// KeysOnly leaves Value empty.
	KeysOnly bool
	// PageSize is keys per request; the package default when zero.
	PageSize int
}

// List calls fn for every key under prefix, in key order, read page by page
// at one revision, and returns that revision.
func (c *Client) List(ctx context.Context, prefix string, opts ListOptions, fn func(KeyValue)) (int64, error) {
	if opts.PageSize == 0 {
		opts.PageSize = defaultPageSize
	}
	return listPages(ctx, c, listRequest{scope: "kv", prefix: prefix, pageSize: opts.PageSize, rev: opts.Revision, keysOnly: opts.KeysOnly},
		func(kvs []*clientv3KV, _ int64) {
			for _, kv := range kvs {
				fn(fromEtcd(kv))
			}
		})
}

// Cmp is one condition of a transaction.
type Cmp struct{ cmp clientv3.Cmp }

// CmpModRevision holds when key was last changed at rev (0: key absent).
func CmpModRevision(key string, rev int64) Cmp {
	return Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", rev)}
}

// CmpAbsent holds when key does not exist.
func CmpAbsent(key string) Cmp {
	return Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)}
}

// CmpValue holds when key exists and holds value.
func CmpValue(key string, value []byte) Cmp {
	return Cmp{clientv3.Compare(clientv3.Value(key), "=", string(value))}
}

// Op is one operation of a transaction.
type Op struct {
	kind    opKind
	key     string
	value   []byte
	session *Session
}

type opKind int

const (
	opPut opKind = iota
	opDelete
	opCount
)

// OpPut writes key.
func OpPut(key string, value []byte) Op { return Op{kind: opPut, key: key, value: value} }

// OpDelete removes key.
func OpDelete(key string) Op { return Op{kind: opDelete, key: key} }

// OpCount counts the keys equal to key (0 or 1); its result is in
// TxnResult.Counts.
func OpCount(key string) Op { return Op{kind: opCount, key: key} }

// WithSession binds a put to s's lease: the key vanishes with the session.
func (o Op) WithSession(s *Session) Op {
	o.session = s
	return o
}

func (o Op) etcd() clientv3.Op {
	switch o.kind {
	case opDelete:
		return clientv3.OpDelete(o.key)
	case opCount:
		return clientv3.OpGet(o.key, clientv3.WithCountOnly())
	}
	if o.session != nil {
		return clientv3.OpPut(o.key, string(o.value), clientv3.WithLease(o.session.id))
	}
	return clientv3.OpPut(o.key, string(o.value))
}

// Txn is one etcd transaction: Then runs when every If condition holds,
// Else otherwise, atomically.
type Txn struct {
	If         []Cmp
	Then, Else []Op
}

// TxnResult is what a transaction did.
type TxnResult struct {
	// Succeeded reports whether the conditions held (Then ran).
	Succeeded bool
	// Revision is the store revision after the transaction: the
	// ModRevision of every key it wrote.
	Revision int64
	// Counts has one entry per OpCount of the branch that ran, in order.
	Counts []int64
}

// Txn commits t. A put whose session's lease no longer exists fails the
// whole transaction with an error matching ErrSessionLost.
func (c *Client) Txn(ctx context.Context, t Txn) (TxnResult, error) {
	cmps := make([]clientv3.Cmp, len(t.If))
	for i, cmp := range t.If {
		cmps[i] = cmp.cmp
	}
	then, els := etcdOps(t.Then), etcdOps(t.Else)
	start := time.Now()
	rctx, cancel := c.requestContext(ctx)
	resp, err := c.etcd.Txn(rctx).If(cmps...).Then(then...).Else(els...).Commit()
	cancel()
	c.cfg.Metrics.observe("kv", "txn", start, err)
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		err = fmt.Errorf("%w: %w", ErrSessionLost, err)
	}
	if err != nil {
		return TxnResult{}, fmt.Errorf("kvstore: transaction: %w", err)
	}
	res := TxnResult{Succeeded: resp.Succeeded, Revision: resp.Header.Revision}
	ops := t.Then
	if !resp.Succeeded {
		ops = t.Else
	}
	for i, op := range ops {
		if op.kind == opCount {
			res.Counts = append(res.Counts, resp.Responses[i].GetResponseRange().Count)
		}
	}
	return res, nil
}

func etcdOps(ops []Op) []clientv3.Op {
	out := make([]clientv3.Op, len(ops))
	for i, op := range ops {
		out[i] = op.etcd()
	}
	return out
}
