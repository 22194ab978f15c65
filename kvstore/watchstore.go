package kvstore

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Observer receives a WatchStore's events, in order, from one goroutine.
// It must not block for long and must not call back into the store that
// invokes it.
type Observer[T any] interface {
	// OnUpsert reports a new or changed entry.
	OnUpsert(key string, value T)
	// OnDelete reports an entry that vanished, with its last value.
	OnDelete(key string, last T)
	// OnSync reports, once, that the store is synced: the initial listing
	// is delivered and, when the writer advertises canaries, the canary is
	// seen. Deletes before it are safe to act on; absences are not.
	OnSync()
}

// WatchStoreConfig describes one reader.
type WatchStoreConfig[T any] struct {
	// Prefix is the key prefix to mirror. Required; must end with "/".
	Prefix string
	// SyncedKey, when set, is the canary the writer writes after its
	// initial publication; the store is not Synced until it exists. Leave
	// empty for writers that do not advertise canaries.
	SyncedKey string
	// Name labels logs and metrics; Prefix when empty.
	Name string
	// Decode turns a value into an entry, validating it against its key.
	// Entries it rejects are counted and skipped.
	Decode func(key string, value []byte) (T, error)
	// Reason labels a Decode error for counting; "decode" when nil.
	Reason func(error) string
	// Observer gets the events; nil for a plain cache.
	Observer Observer[T]
	// PageSize is keys per list request; defaultPageSize when zero,
	// unpaginated when negative.
	PageSize int
	// MinBackoff and MaxBackoff bound the delay between relists after an
	// error; defaults 100ms and 10s.
	MinBackoff, MaxBackoff time.Duration
}

// WatchStore mirrors one prefix into a typed cache.
//
// Design notes. The cache holds, per key, the decoded value and a hash of
// the raw bytes; it never holds the raw bytes (the heap a reader keeps per
// entry is what matters at 100k entries). The hash lets a relist skip
// decoding entries that did not change, and lets a rewrite of an identical
// value (a restarted writer re-putting its keys on a new lease, a watch
// resumed over events already seen) pass without an event.
//
// A value that fails Decode is counted, logged once, and never applied: if
// the key held a valid value before, that value stays in the cache as the
// last known good one.
type WatchStore[T any] struct {
	client *Client
	cfg    WatchStoreConfig[T]
	log    *slog.Logger
	seed   maphash.Seed

	mu         sync.RWMutex
	cache      map[string]entry[T]
	listed     bool
	canarySeen bool
	synced     bool
	connected  bool
	relists    int
	rejected   map[string]uint64
	loggedBad  map[string]struct{}
	lastErr    error
	lastErrAt  time.Time

	syncedCh chan struct{}
}

type entry[T any] struct {
	value T
	hash  uint64
}

// maxLoggedBadKeys bounds the set that keeps rejected keys logged once, so
// a remote spraying garbage cannot grow it without limit.
const maxLoggedBadKeys = 10000

// NewWatchStore creates a reader; nothing happens until Run.
func NewWatchStore[T any](client *Client, cfg WatchStoreConfig[T]) (*WatchStore[T], error) {
	if cfg.Prefix == "" || !strings.HasSuffix(cfg.Prefix, "/") {
		return nil, fmt.Errorf("kvstore: watch store prefix %q must be non-empty and end with /", cfg.Prefix)
	}
	if cfg.Decode == nil {
		return nil, fmt.Errorf("kvstore: watch store %s needs a Decode function", cfg.Prefix)
	}
	if cfg.Name == "" {
		cfg.Name = cfg.Prefix
	}
	if cfg.Reason == nil {
		cfg.Reason = func(error) string { return "decode" }
	}
	if cfg.PageSize == 0 {
		cfg.PageSize = defaultPageSize
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 10 * time.Second
	}
	return &WatchStore[T]{
		client:    client,
		cfg:       cfg,
		log:       client.log.With("store", cfg.Name),
		seed:      maphash.MakeSeed(),
		cache:     make(map[string]entry[T]),
		rejected:  make(map[string]uint64),
		loggedBad: make(map[string]struct{}),
		syncedCh:  make(chan struct{}),
	}, nil
}

// Get returns the cached entry for key.
func (s *WatchStore[T]) Get(key string) (T, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	e, ok := s.cache[key]
	return e.value, ok
}

// Len is the number of cached entries.
func (s *WatchStore[T]) Len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.cache)
}

// Range calls fn for every cached entry until fn returns false. It holds a
// read lock: fn must not call into the store.
func (s *WatchStore[T]) Range(fn func(key string, value T) bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for k, e := range s.cache {
		if !fn(k, e.value) {
			return
		}
	}
}

// Synced reports whether the initial listing (and the canary, when
// configured) has been seen. Once true it stays true, also while
// disconnected: the cache keeps serving the last known state.
func (s *WatchStore[T]) Synced() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.synced
}

// WaitSynced blocks until Synced or ctx ends.
func (s *WatchStore[T]) WaitSynced(ctx context.Context) error {
	select {
	case <-s.syncedCh:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("kvstore: waiting for %s to sync: %w", s.cfg.Name, ctx.Err())
	}
}

// WatchStoreStats is a point-in-time view for status pages.
type WatchStoreStats struct {
	Entries    int
	Synced     bool
	Connected  bool
	CanarySeen bool
	Relists    int
	Rejected   map[string]uint64 // by reason
	LastError  string
	LastErrAt  time.Time
}

// Stats reports the store's state.
func (s *WatchStore[T]) Stats() WatchStoreStats {
	s.mu.RLock()
	defer s.mu.RUnlock()
	st := WatchStoreStats{
		Entries: len(s.cache), Synced: s.synced, Connected: s.connected, CanarySeen: s.canarySeen,
		Relists: s.relists, Rejected: maps.Clone(s.rejected), LastErrAt: s.lastErrAt,
	}
	if s.lastErr != nil {
		st.LastError = s.lastErr.Error()
	}
	return st
}

// Run lists and watches until ctx ends. After any watch failure it relists
// with backoff.
func (s *WatchStore[T]) Run(ctx context.Context) error {
	canary := make(chan struct{})
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if s.cfg.SyncedKey != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.waitCanary(ctx, canary)
		}()
	} else {
		close(canary)
	}

	bo := backoff{min: s.cfg.MinBackoff, max: s.cfg.MaxBackoff}
	for {
		rev, err := s.list(ctx)
		if err == nil {
			s.markListed()
			bo.reset()
			err = s.watch(ctx, rev+1, canary)
		}
		if ctx.Err() != nil {
			return nil
		}
		s.recordError(err)
		if !sleep(ctx, bo.next()) {
			return nil
		}
	}
}

func (s *WatchStore[T]) recordError(err error) {
	s.mu.Lock()
	s.connected = false
	s.lastErr, s.lastErrAt = err, time.Now()
	s.mu.Unlock()
	s.log.Warn("etcd watch interrupted; will relist", "err", err)
}

// markListed records a completed listing.
func (s *WatchStore[T]) markListed() {
	s.mu.Lock()
	s.listed = true
	s.connected = true
	s.mu.Unlock()
}

// list reads the prefix at one revision, reconciling the cache with it:
// new and changed entries are upserted, entries that vanished are deleted.
func (s *WatchStore[T]) list(ctx context.Context) (int64, error) {
	s.mu.Lock()
	relist := s.listed
	if relist {
		s.relists++
	}
	s.mu.Unlock()

	var seen map[string]struct{}
	if relist {
		seen = make(map[string]struct{}, s.Len())
	}
	var events []event[T]
	rev, err := listPages(ctx, s.client, listRequest{scope: s.cfg.Name, prefix: s.cfg.Prefix, pageSize: s.cfg.PageSize}, func(kvs []*clientv3KV, remaining int64) {
		events = events[:0]
		s.mu.Lock()
		if !relist && len(s.cache) == 0 && remaining > 0 {
			// Size the map once for the whole listing.
			s.cache = make(map[string]entry[T], remaining)
		}
		for _, kv := range kvs {
			key := string(kv.Key)
			if seen != nil {
				seen[key] = struct{}{}
			}
			events = s.applyPutLocked(key, kv, events)
		}
		s.mu.Unlock()
		s.deliver(events)
	})
	if err != nil {
		return 0, err
	}
	if relist {
		events = events[:0]
		s.mu.Lock()
		for key, e := range s.cache {
			if _, ok := seen[key]; !ok {
				delete(s.cache, key)
				events = append(events, event[T]{key: key, value: e.value, deleted: true})
			}
		}
		s.mu.Unlock()
		s.deliver(events)
		if len(events) > 0 {
			s.log.Info("relist removed vanished entries", "deleted", len(events))
		}
	}
	s.client.cfg.Metrics.setEntries(s.cfg.Name, s.Len())
	return rev, nil
}

type event[T any] struct {
	key     string
	value   T
	deleted bool
}

// applyPutLocked folds one key-value into the cache and appends the event
// it causes, if any.
func (s *WatchStore[T]) applyPutLocked(key string, kv *mvccpb.KeyValue, events []event[T]) []event[T] {
	old, had := s.cache[key]
	h := maphash.Bytes(s.seed, kv.Value)
	if had && old.hash == h {
		return events
	}
	value, err := s.cfg.Decode(key, kv.Value)
	if err != nil {
		s.rejectLocked(key, err)
		if had {
			// Keep the last good value, but remember the bad value's hash
			// so a relist does not count it again.
			old.hash = h
			s.cache[key] = old
		}
		return events
	}
	s.cache[key] = entry[T]{value: value, hash: h}
	return append(events, event[T]{key: key, value: value})
}

func (s *WatchStore[T]) rejectLocked(key string, err error) {
	reason := s.cfg.Reason(err)
	s.rejected[reason]++
	s.client.cfg.Metrics.reject(s.cfg.Name, reason)
	if _, logged := s.loggedBad[key]; logged {
		return
	}
	if len(s.loggedBad) < maxLoggedBadKeys {
		s.loggedBad[key] = struct{}{}
		s.log.Warn("rejected entry", "key", key, "reason", reason, "err", err)
	}
}

// applyDeleteLocked removes key and appends its delete event.
func (s *WatchStore[T]) applyDeleteLocked(key string, events []event[T]) []event[T] {
	old, had := s.cache[key]
	if !had {
		return events
	}
	delete(s.cache, key)
	return append(events, event[T]{key: key, value: old.value, deleted: true})
}

func (s *WatchStore[T]) deliver(events []event[T]) {
	if len(events) == 0 {
		return
	}
	var ups, dels int
	for _, ev := range events {
		if ev.deleted {
			dels++
		} else {
			ups++
		}
		if s.cfg.Observer == nil {
			continue
		}
		if ev.deleted {
			s.cfg.Observer.OnDelete(ev.key, ev.value)
		} else {
			s.cfg.Observer.OnUpsert(ev.key, ev.value)
		}
	}
	s.client.cfg.Metrics.event(s.cfg.Name, "upsert", ups)
	s.client.cfg.Metrics.event(s.cfg.Name, "delete", dels)
}

// maybeSynced flips the store to Synced once listed and canary seen, and
// tells the observer. Called only from Run's goroutine so OnSync is ordered
// after the listing's upserts.
func (s *WatchStore[T]) maybeSynced(canary <-chan struct{}) {
	select {
	case <-canary:
	default:
		return
	}
	s.mu.Lock()
	if s.synced || !s.listed {
		s.mu.Unlock()
		return
	}
	s.synced = true
	s.canarySeen = true
	close(s.syncedCh)
	s.mu.Unlock()
	if s.cfg.Observer != nil {
		s.cfg.Observer.OnSync()
	}
}

// watch follows the prefix from rev until the watch fails.
func (s *WatchStore[T]) watch(ctx context.Context, rev int64, canary <-chan struct{}) error {
	s.maybeSynced(canary)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // releases the watch stream
	// WithRequireLeader makes a member that lost its quorum close the
	// watch instead of leaving us on a silent, stale stream.
	wch := s.client.etcd.Watch(clientv3.WithRequireLeader(ctx), s.cfg.Prefix, clientv3.WithPrefix(), clientv3.WithRev(rev))
	var events []event[T]
	for {
		var (
			resp clientv3.WatchResponse
			ok   bool
		)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-canaryOrNil(canary, s.Synced()):
			s.maybeSynced(canary)
			continue
		case resp, ok = <-wch:
		}
		if !ok {
			return fmt.Errorf("kvstore: %s: watch channel closed", s.cfg.Name)
		}
		if resp.CompactRevision != 0 {
			return fmt.Errorf("kvstore: %s: watch from revision %d: %w", s.cfg.Name, rev, rpctypes.ErrCompacted)
		}
		if err := resp.Err(); err != nil {
			return fmt.Errorf("kvstore: %s: watch: %w", s.cfg.Name, err)
		}
		if resp.Canceled {
			return fmt.Errorf("kvstore: %s: watch cancelled by server", s.cfg.Name)
		}
		events = events[:0]
		s.mu.Lock()
		s.connected = true
		for _, ev := range resp.Events {
			key := string(ev.Kv.Key)
			switch ev.Type {
			case clientv3.EventTypePut:
				events = s.applyPutLocked(key, ev.Kv, events)
			case clientv3.EventTypeDelete:
				events = s.applyDeleteLocked(key, events)
			}
		}
		if len(resp.Events) > 0 {
			rev = resp.Events[len(resp.Events)-1].Kv.ModRevision + 1
		}
		s.mu.Unlock()
		s.deliver(events)
	}
}

// canaryOrNil returns the canary channel while it still matters, so the
// select in watch stops waking on it after the store is synced.
func canaryOrNil(canary <-chan struct{}, synced bool) <-chan struct{} {
	if synced {
		return nil
	}
	return canary
}

// waitCanary closes seen once the writer's canary key exists.
func (s *WatchStore[T]) waitCanary(ctx context.Context, seen chan<- struct{}) {
	bo := backoff{min: s.cfg.MinBackoff, max: s.cfg.MaxBackoff}
	for ctx.Err() == nil {
		err := s.pollCanary(ctx)
		if err == nil {
			close(seen)
			return
		}
		if ctx.Err() != nil {
			return
		}
		s.log.Debug("waiting for synced canary", "key", s.cfg.SyncedKey, "err", err)
		sleep(ctx, bo.next())
	}
}

var errCanaryAbsent = errors.New("canary not written yet")

// pollCanary returns nil once the canary exists, waiting on a watch for it.
func (s *WatchStore[T]) pollCanary(ctx context.Context) error {
	if err := s.client.wait(ctx); err != nil {
		return err
	}
	rctx, cancel := s.client.requestContext(ctx)
	resp, err := s.client.etcd.Get(rctx, s.cfg.SyncedKey, clientv3.WithCountOnly())
	cancel()
	if err != nil {
		return fmt.Errorf("kvstore: get canary %s: %w", s.cfg.SyncedKey, err)
	}
	if resp.Count > 0 {
		return nil
	}
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	wch := s.client.etcd.Watch(clientv3.WithRequireLeader(wctx), s.cfg.SyncedKey,
		clientv3.WithRev(resp.Header.Revision+1), clientv3.WithFilterDelete())
	for resp := range wch {
		if err := resp.Err(); err != nil {
			return fmt.Errorf("kvstore: watch canary %s: %w", s.cfg.SyncedKey, err)
		}
		if len(resp.Events) > 0 {
			return nil
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return errCanaryAbsent
}
