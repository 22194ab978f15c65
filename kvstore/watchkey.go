package kvstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// WatchKeyConfig tunes WatchKey; the zero value is useful.
type WatchKeyConfig struct {
	// MinBackoff and MaxBackoff bound the delay between reads after the
	// watch breaks or a read fails; defaults 100ms and 10s.
	MinBackoff, MaxBackoff time.Duration
}

// WatchKey reports the state of one key to fn: first as it is now, then
// every change, in order, until fn returns an error (WatchKey returns it)
// or ctx ends (WatchKey returns nil). fn gets nil when the key does not
// exist.
//
// It is the single-key twin of WatchStore's list-then-watch: it reads the
// key, watches from the revision of that read, and when the watch breaks
// (compaction, a lost connection, a member without a leader) or a read
// fails, it reads the key again with backoff and reports it if it changed
// since the last state fn saw (by ModRevision). So fn never misses the
// latest state and never sees one twice; intermediate states overwritten
// while the watch was down are skipped, as a relist skips them.
func (c *Client) WatchKey(ctx context.Context, key string, cfg WatchKeyConfig, fn func(kv *KeyValue) error) error {
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 10 * time.Second
	}
	w := keyWatch{client: c, key: key, fn: fn}
	bo := backoff{min: cfg.MinBackoff, max: cfg.MaxBackoff}
	for {
		kv, rev, err := c.Get(ctx, key)
		if err == nil {
			err = w.report(kv)
			if err == nil {
				err = w.watch(ctx, rev+1, &bo)
			}
			var stop *stopWatch
			if errors.As(err, &stop) {
				return stop.err
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		c.log.Debug("key watch interrupted; reading the key again", "key", key, "err", err)
		if !sleep(ctx, bo.next()) {
			return nil
		}
	}
}

// keyWatch is the state of one WatchKey call.
type keyWatch struct {
	client *Client
	key    string
	fn     func(*KeyValue) error

	reported bool
	last     *KeyValue // last state fn saw; nil: absent
}

// stopWatch carries fn's error out of watch, apart from watch failures.
type stopWatch struct{ err error }

func (s *stopWatch) Error() string { return s.err.Error() }

// report hands kv to fn unless fn already saw this state.
func (w *keyWatch) report(kv *KeyValue) error {
	if w.reported && sameState(w.last, kv) {
		return nil
	}
	w.reported, w.last = true, kv
	if err := w.fn(kv); err != nil {
		return &stopWatch{err}
	}
	return nil
}

func sameState(a, b *KeyValue) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.ModRevision == b.ModRevision
}

// watch follows the key from rev until the watch breaks or fn stops it.
func (w *keyWatch) watch(ctx context.Context, rev int64, bo *backoff) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // releases the watch stream
	wch := w.client.etcd.Watch(clientv3.WithRequireLeader(ctx), w.key, clientv3.WithRev(rev))
	for resp := range wch {
		if err := resp.Err(); err != nil {
			return fmt.Errorf("kvstore: watch %s: %w", w.key, err)
		}
		bo.reset()
		for _, ev := range resp.Events {
			var kv *KeyValue
			if ev.Type == clientv3.EventTypePut {
				v := fromEtcd(ev.Kv)
				kv = &v
			}
			if err := w.report(kv); err != nil {
				return err
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return fmt.Errorf("kvstore: watch %s: channel closed", w.key)
}
