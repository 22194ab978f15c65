package kvstore

import (
	"context"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

type clientv3KV = mvccpb.KeyValue

// defaultPageSize is chosen by BenchmarkColdSync: etcd counts the rest of
// the range on every page (about 9 ms per page at 100k keys here), so small
// pages cost far more than the bytes they save; 10k keys of ~300 B is a
// ~3 MB response, well under the gRPC limit.
const defaultPageSize = 10000

// listRequest is one listing of a prefix.
type listRequest struct {
	scope, prefix string
	// pageSize <= 0 reads everything in one request.
	pageSize int
	// rev is the revision to read at; 0 reads the current one.
	rev      int64
	keysOnly bool
}

// listPages reads every key under the prefix at one revision, page by page,
// and hands each page to fn in key order. It fetches the next page while fn
// decodes the current one, which on a multi-core machine hides most of the
// decode cost behind etcd's range time. fn also gets the number of keys
// from this page on (etcd's count), so a caller can size its map once. It
// returns the revision the listing represents.
func listPages(ctx context.Context, c *Client, req listRequest, fn func(kvs []*clientv3KV, remaining int64)) (int64, error) {
	scope, prefix, pageSize := req.scope, req.prefix, req.pageSize
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	type page struct {
		kvs   []*clientv3KV
		rev   int64
		count int64
		err   error
	}
	pages := make(chan page, 1)
	go func() {
		defer close(pages)
		end := clientv3.GetPrefixRangeEnd(prefix)
		key := prefix
		rev := req.rev
		for {
			opts := []clientv3.OpOption{clientv3.WithRange(end)}
			if pageSize > 0 {
				opts = append(opts, clientv3.WithLimit(int64(pageSize)))
			}
			if req.keysOnly {
				opts = append(opts, clientv3.WithKeysOnly())
			}
			if rev != 0 {
				// Every page after the first reads the first page's
				// revision, so the listing is one consistent snapshot.
				opts = append(opts, clientv3.WithRev(rev))
			}
			if err := c.wait(ctx); err != nil {
				pages <- page{err: err}
				return
			}
			start := time.Now()
			rctx, rcancel := c.requestContext(ctx)
			resp, err := c.etcd.Get(rctx, key, opts...)
			rcancel()
			c.cfg.Metrics.observe(scope, "list", start, err)
			if err != nil {
				pages <- page{err: fmt.Errorf("kvstore: %s: list %s from %q: %w", scope, prefix, key, err)}
				return
			}
			if rev == 0 {
				rev = resp.Header.Revision
			}
			select {
			case pages <- page{kvs: resp.Kvs, rev: rev, count: resp.Count}:
			case <-ctx.Done():
				return
			}
			if !resp.More || len(resp.Kvs) == 0 {
				return
			}
			key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
		}
	}()

	var rev int64
	for p := range pages {
		if p.err != nil {
			return 0, p.err
		}
		rev = p.rev
		fn(p.kvs, p.count)
	}
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("kvstore: %s: list %s: %w", scope, prefix, err)
	}
	return rev, nil
}
