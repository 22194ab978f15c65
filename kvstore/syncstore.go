package kvstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// SyncStoreConfig describes one writer.
type SyncStoreConfig struct {
	// Prefix is the key prefix the store owns: every key it writes lies
	// under it, and at start every key under it that is not desired once the
	// initial set is published is deleted. Required; must end with "/".
	Prefix string
	// SyncedKey is the canary written after the initial set is published
	// and stale keys are gone; empty writes none.
	SyncedKey string
	// WithLease binds every key (and the canary) to a lease kept alive by
	// the client, so the keys vanish if this writer dies for good.
	WithLease bool
	// Name labels logs and metrics; Prefix when empty.
	Name string

	// MaxBatchOps and MaxBatchBytes bound one transaction; defaults 128
	// (etcd's default --max-txn-ops) and 1 MiB (under etcd's 1.5 MiB
	// request limit).
	MaxBatchOps   int
	MaxBatchBytes int
	// MaxInFlight is how many transactions may be outstanding at once;
	// default 4.
	MaxInFlight int
	// MinBackoff and MaxBackoff bound the retry delay after a failed write;
	// defaults 100ms and 10s.
	MinBackoff, MaxBackoff time.Duration
}

// SyncStore converges the keys under one prefix to a desired set.
//
// Callers Upsert and Delete entries at any time (before Run too), then call
// MarkSynced once the source's initial state has been given in full. The
// store writes in batches from one goroutine: repeated updates of one key
// collapse into the last, a value equal to what etcd holds is not written
// again, and failed writes are retried with backoff. Keys found under the
// prefix at start that are not desired are deleted only after MarkSynced
// and after every desired key is written, so a restart never removes state
// that is still wanted, even briefly. Then the canary is written.
type SyncStore struct {
	client *Client
	cfg    SyncStoreConfig
	log    *slog.Logger

	mu      sync.Mutex
	desired map[string][]byte
	// written is what etcd holds under the prefix as far as this store
	// knows: filled by the start-up listing, then by successful writes.
	written  map[string]writtenEntry
	queue    []string
	queued   map[string]struct{}
	inFlight map[string]struct{} // keys in a transaction now

	markSynced bool
	phase      syncPhase
	lastErr    error
	lastErrAt  time.Time

	wake   chan struct{}
	synced chan struct{}
}

type writtenEntry struct {
	value []byte
	lease *Session // nil: not lease-bound, or found by the listing
	// stale marks keys found at start-up and not (yet) desired again.
	fromListing bool
}

type syncPhase int

const (
	phaseListing syncPhase = iota
	phaseInitial
	phaseDeletingStale
	phaseWritingCanary
	phaseSynced
)

// NewSyncStore creates a writer; nothing happens until Run.
func NewSyncStore(client *Client, cfg SyncStoreConfig) (*SyncStore, error) {
	if cfg.Prefix == "" || !strings.HasSuffix(cfg.Prefix, "/") {
		return nil, fmt.Errorf("kvstore: sync store prefix %q must be non-empty and end with /", cfg.Prefix)
	}
	if cfg.Name == "" {
		cfg.Name = cfg.Prefix
	}
	if cfg.MaxBatchOps <= 0 {
		cfg.MaxBatchOps = 128
	}
	if cfg.MaxBatchBytes <= 0 {
		cfg.MaxBatchBytes = 1 << 20
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 10 * time.Second
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 4
	}
	return &SyncStore{
		client:   client,
		cfg:      cfg,
		log:      client.log.With("store", cfg.Name),
		desired:  make(map[string][]byte),
		written:  make(map[string]writtenEntry),
		queued:   make(map[string]struct{}),
		inFlight: make(map[string]struct{}),
		wake:     make(chan struct{}, 1),
		synced:   make(chan struct{}),
	}, nil
}

// Upsert makes key hold value. The store keeps value: do not modify it
// afterwards.
func (s *SyncStore) Upsert(key string, value []byte) error {
	if !strings.HasPrefix(key, s.cfg.Prefix) {
		return fmt.Errorf("kvstore: key %q is outside sync store prefix %q", key, s.cfg.Prefix)
	}
	s.mu.Lock()
	s.desired[key] = value
	s.enqueueLocked(key)
	s.mu.Unlock()
	s.signal()
	return nil
}

// Delete removes key.
func (s *SyncStore) Delete(key string) error {
	if !strings.HasPrefix(key, s.cfg.Prefix) {
		return fmt.Errorf("kvstore: key %q is outside sync store prefix %q", key, s.cfg.Prefix)
	}
	s.mu.Lock()
	delete(s.desired, key)
	s.enqueueLocked(key)
	s.mu.Unlock()
	s.signal()
	return nil
}

// MarkSynced tells the store that every entry of the initial state has been
// given. Stale keys are deleted and the canary written after that.
func (s *SyncStore) MarkSynced() {
	s.mu.Lock()
	s.markSynced = true
	s.mu.Unlock()
	s.signal()
}

// WaitSynced blocks until the canary is written (or, without a canary, the
// initial set is published) or ctx ends.
func (s *SyncStore) WaitSynced(ctx context.Context) error {
	select {
	case <-s.synced:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("kvstore: waiting for %s to sync: %w", s.cfg.Name, ctx.Err())
	}
}

// SyncStoreStats is a point-in-time view for status pages.
type SyncStoreStats struct {
	Desired   int
	Pending   int
	Synced    bool
	LastError string
	LastErrAt time.Time
}

// Stats reports the store's state.
func (s *SyncStore) Stats() SyncStoreStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := SyncStoreStats{Desired: len(s.desired), Pending: len(s.queue), Synced: s.phase == phaseSynced, LastErrAt: s.lastErrAt}
	if s.lastErr != nil {
		st.LastError = s.lastErr.Error()
	}
	return st
}

func (s *SyncStore) enqueueLocked(key string) {
	if _, ok := s.queued[key]; ok {
		return
	}
	s.queued[key] = struct{}{}
	s.queue = append(s.queue, key)
}

func (s *SyncStore) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Run lists what the prefix holds, then writes until ctx ends.
func (s *SyncStore) Run(ctx context.Context) error {
	if s.cfg.WithLease {
		remove := s.client.leases.observe(s.cfg.Prefix, s.republish)
		defer remove()
		if s.cfg.SyncedKey != "" {
			removeCanary := s.client.leases.observe(s.cfg.SyncedKey, s.republish)
			defer removeCanary()
		}
	}
	bo := backoff{min: s.cfg.MinBackoff, max: s.cfg.MaxBackoff}
	for {
		if err := s.listExisting(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			s.recordError(err)
			if !sleep(ctx, bo.next()) {
				return nil
			}
			continue
		}
		break
	}
	bo.reset()
	return s.writeLoop(ctx, &bo)
}

// writeLoop dispatches batches, up to MaxInFlight transactions at once so
// that a steady stream of updates is not serialised behind one fsync at a
// time. A key is never in two transactions at once, so writes of one key
// stay in order.
func (s *SyncStore) writeLoop(ctx context.Context, bo *backoff) error {
	results := make(chan error, s.cfg.MaxInFlight)
	var wg sync.WaitGroup
	defer wg.Wait()
	inFlight := 0
	for {
		for inFlight < s.cfg.MaxInFlight {
			batch := s.takeBatch()
			if len(batch) == 0 {
				break
			}
			inFlight++
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := s.write(ctx, batch)
				s.finish(batch)
				results <- err
			}()
		}
		if inFlight == 0 && s.advancePhase() {
			continue
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-results:
			inFlight--
			if err != nil && ctx.Err() == nil {
				s.recordError(err)
				if !sleep(ctx, bo.next()) {
					return nil
				}
			} else if err == nil {
				bo.reset()
			}
		case <-s.wake:
		}
	}
}

// finish releases a batch's keys for the next transaction.
func (s *SyncStore) finish(batch []pendingOp) {
	s.mu.Lock()
	for _, op := range batch {
		delete(s.inFlight, op.key)
	}
	s.mu.Unlock()
	s.signal()
}

func (s *SyncStore) recordError(err error) {
	s.mu.Lock()
	s.lastErr, s.lastErrAt = err, time.Now()
	s.mu.Unlock()
	s.log.Warn("etcd write failed; retrying", "err", err)
}

// republish is the lease manager's callback: keys whose lease was lost
// must be written again.
func (s *SyncStore) republish(keys []string) {
	s.mu.Lock()
	for _, k := range keys {
		delete(s.written, k)
		s.enqueueLocked(k)
	}
	s.mu.Unlock()
	s.signal()
}

// listExisting records what etcd holds under the prefix so that unchanged
// values are not rewritten and leftovers of an earlier run can be deleted.
func (s *SyncStore) listExisting(ctx context.Context) error {
	existing := make(map[string]writtenEntry)
	_, err := listPages(ctx, s.client, listRequest{scope: s.cfg.Name, prefix: s.cfg.Prefix, pageSize: defaultPageSize}, func(kvs []*clientv3KV, _ int64) {
		for _, kv := range kvs {
			// A listed key's lease is not one of this process's sessions,
			// so a lease-bound store re-puts it under its own.
			existing[string(kv.Key)] = writtenEntry{value: kv.Value, fromListing: true}
		}
	})
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.written = existing
	s.phase = phaseInitial
	s.mu.Unlock()
	s.log.Debug("listed existing keys", "keys", len(existing))
	return nil
}

// advancePhase moves the initial publication along once the queue is empty.
func (s *SyncStore) advancePhase() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.queue) > 0 || len(s.inFlight) > 0 || !s.markSynced {
		return false
	}
	switch s.phase {
	case phaseInitial:
		// Everything desired is written; only now may leftovers go.
		for key, w := range s.written {
			if _, want := s.desired[key]; !want && w.fromListing {
				s.enqueueLocked(key)
			}
		}
		s.phase = phaseDeletingStale
		return true
	case phaseDeletingStale:
		if s.cfg.SyncedKey == "" {
			s.phase = phaseSynced
			close(s.synced)
			return true
		}
		s.phase = phaseWritingCanary
		s.desired[s.cfg.SyncedKey] = []byte(time.Now().UTC().Format(time.RFC3339))
		s.enqueueLocked(s.cfg.SyncedKey)
		return true
	case phaseWritingCanary:
		s.phase = phaseSynced
		close(s.synced)
		s.log.Info("initial publication complete", "keys", len(s.desired)-1)
		return true
	}
	return false
}

// pendingOp is one key's write in a batch.
type pendingOp struct {
	key   string
	value []byte // nil: delete
}

// takeBatch pops keys off the queue until a batch is full, dropping those
// whose desired value etcd already holds.
func (s *SyncStore) takeBatch() []pendingOp {
	s.mu.Lock()
	defer s.mu.Unlock()
	var (
		batch []pendingOp
		size  int
		n     int
		busy  []string // queued keys still in a transaction: they wait
	)
	for n < len(s.queue) && len(batch) < s.cfg.MaxBatchOps && size < s.cfg.MaxBatchBytes {
		key := s.queue[n]
		n++
		if _, ok := s.inFlight[key]; ok {
			busy = append(busy, key)
			continue
		}
		delete(s.queued, key)
		value, want := s.desired[key]
		w, have := s.written[key]
		switch {
		case want && have && bytes.Equal(w.value, value) && (!s.cfg.WithLease || s.client.leases.live(w.lease)):
			// Already there (and, if lease-bound, on a lease we renew).
			if w.fromListing {
				w.fromListing = false
				s.written[key] = w
			}
			continue
		case !want && !have:
			continue
		}
		batch = append(batch, pendingOp{key: key, value: value})
		s.inFlight[key] = struct{}{}
		size += len(key) + len(value)
		if !want {
			batch[len(batch)-1].value = nil
		}
	}
	s.queue = append(busy, s.queue[n:]...)
	if len(s.queue) == 0 {
		s.queue = nil // let the backing array go after a large initial set
	}
	return batch
}

// write commits one batch in a single transaction.
func (s *SyncStore) write(ctx context.Context, batch []pendingOp) error {
	ops := make([]clientv3.Op, 0, len(batch))
	leases := make([]*Session, len(batch))
	for i, op := range batch {
		if op.value == nil {
			ops = append(ops, clientv3.OpDelete(op.key))
			continue
		}
		if !s.cfg.WithLease {
			ops = append(ops, clientv3.OpPut(op.key, string(op.value)))
			continue
		}
		sess, err := s.client.leases.acquire(ctx, op.key)
		if err != nil {
			s.requeue(batch)
			return fmt.Errorf("kvstore: %s: %w", s.cfg.Name, err)
		}
		leases[i] = sess
		ops = append(ops, clientv3.OpPut(op.key, string(op.value), clientv3.WithLease(sess.id)))
	}
	if err := s.client.wait(ctx); err != nil {
		s.requeue(batch)
		return err
	}
	start := time.Now()
	rctx, cancel := s.client.requestContext(ctx)
	_, err := s.client.etcd.Txn(rctx).Then(ops...).Commit()
	cancel()
	s.client.cfg.Metrics.observe(s.cfg.Name, "txn", start, err)
	if err != nil {
		s.requeue(batch)
		if errors.Is(err, rpctypes.ErrLeaseNotFound) {
			// Which of the batch's leases is gone etcd does not say; drop
			// them all so every affected key is re-put on a fresh one.
			for _, l := range leases {
				if l != nil {
					s.client.leases.lost(l)
				}
			}
		}
		return fmt.Errorf("kvstore: %s: write %d keys: %w", s.cfg.Name, len(batch), err)
	}

	s.mu.Lock()
	for i, op := range batch {
		if op.value == nil {
			delete(s.written, op.key)
			if s.cfg.WithLease {
				s.client.leases.release(op.key)
			}
			continue
		}
		s.written[op.key] = writtenEntry{value: op.value, lease: leases[i]}
	}
	n := len(s.desired)
	s.mu.Unlock()
	s.client.cfg.Metrics.setEntries(s.cfg.Name, n)
	return nil
}

// requeue puts a failed batch back so the next attempt writes it again
// (with whatever value is desired by then).
func (s *SyncStore) requeue(batch []pendingOp) {
	s.mu.Lock()
	for _, op := range batch {
		s.enqueueLocked(op.key)
	}
	s.mu.Unlock()
}
