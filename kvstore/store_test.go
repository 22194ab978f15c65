package kvstore

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

const (
	testPrefix = "trellis/v1/nodes/eu/"
	testCanary = "trellis/v1/synced/eu/nodes"
)

func put(t testing.TB, c *clientv3.Client, key, value string) {
	t.Helper()
	if _, err := c.Put(context.Background(), key, value); err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
}

func get(t testing.TB, c *clientv3.Client, key string) (string, bool) {
	t.Helper()
	resp, err := c.Get(context.Background(), key)
	if err != nil {
		t.Fatalf("get %s: %v", key, err)
	}
	if len(resp.Kvs) == 0 {
		return "", false
	}
	return string(resp.Kvs[0].Value), true
}

func newSyncStore(t testing.TB, c *Client, mod func(*SyncStoreConfig)) *SyncStore {
	t.Helper()
	cfg := SyncStoreConfig{Prefix: testPrefix, SyncedKey: testCanary, MinBackoff: 10 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}
	if mod != nil {
		mod(&cfg)
	}
	s, err := NewSyncStore(c, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newWatchStore(t testing.TB, c *Client, obs Observer[string], mod func(*WatchStoreConfig[string])) *WatchStore[string] {
	t.Helper()
	cfg := WatchStoreConfig[string]{Prefix: testPrefix, SyncedKey: testCanary, Decode: decodeString, Observer: obs,
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}
	if mod != nil {
		mod(&cfg)
	}
	w, err := NewWatchStore(c, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// A writer that restarts finds its earlier keys: it keeps (without
// rewriting) the ones still desired, deletes the rest only after the new
// initial set is published, and never deletes a key it still wants.
func TestSyncStoreRestartWithStaleKeys(t *testing.T) {
	e := startEtcd(t)
	c := newTestClient(t, e.Endpoints(), nil)
	raw := c.etcd
	put(t, raw, testPrefix+"stale", "old")
	put(t, raw, testPrefix+"same", "v1")
	put(t, raw, testPrefix+"changed", "v1")
	put(t, raw, "trellis/v1/nodes/us/other", "not ours")
	resp, _ := raw.Get(context.Background(), testPrefix+"same")
	sameRev := resp.Kvs[0].ModRevision
	startRev := resp.Header.Revision

	s := newSyncStore(t, c, nil)
	s.Upsert(testPrefix+"same", []byte("v1"))
	s.Upsert(testPrefix+"changed", []byte("v2"))
	s.Upsert(testPrefix+"new", []byte("v1"))
	run(t, s.Run)

	eventually(t, "initial set written", func() bool {
		v, ok := get(t, raw, testPrefix+"new")
		return ok && v == "v1"
	})
	// Not synced yet: the stale key must still be there.
	if _, ok := get(t, raw, testPrefix+"stale"); !ok {
		t.Fatal("stale key deleted before MarkSynced")
	}
	if _, ok := get(t, raw, testCanary); ok {
		t.Fatal("canary written before MarkSynced")
	}

	s.MarkSynced()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{testPrefix + "same": "v1", testPrefix + "changed": "v2", testPrefix + "new": "v1"}
	for k, v := range want {
		if got, ok := get(t, raw, k); !ok || got != v {
			t.Errorf("%s = %q (present %v), want %q", k, got, ok, v)
		}
	}
	if _, ok := get(t, raw, testPrefix+"stale"); ok {
		t.Error("stale key survived sync")
	}
	if _, ok := get(t, raw, "trellis/v1/nodes/us/other"); !ok {
		t.Error("key outside the prefix was deleted")
	}
	if _, ok := get(t, raw, testCanary); !ok {
		t.Error("canary missing after sync")
	}
	resp, _ = raw.Get(context.Background(), testPrefix+"same")
	if resp.Kvs[0].ModRevision != sameRev {
		t.Errorf("unchanged key rewritten: mod revision %d, was %d", resp.Kvs[0].ModRevision, sameRev)
	}

	// History since the restart: exactly one delete, of the stale key.
	var deletes []string
	for wr := range raw.Watch(ctx, "trellis/", clientv3.WithPrefix(), clientv3.WithRev(startRev+1)) {
		for _, ev := range wr.Events {
			if ev.Type == clientv3.EventTypeDelete {
				deletes = append(deletes, string(ev.Kv.Key))
			}
			if string(ev.Kv.Key) == testCanary {
				cancel()
			}
		}
	}
	if !slices.Equal(deletes, []string{testPrefix + "stale"}) {
		t.Errorf("deletes since restart = %v, want only the stale key", deletes)
	}
}

// Updates to one key collapse, and an update to the value etcd already
// holds writes nothing.
func TestSyncStoreCoalescesAndSkipsNoops(t *testing.T) {
	e := startEtcd(t)
	c := newTestClient(t, e.Endpoints(), nil)
	s := newSyncStore(t, c, nil)
	for i := range 100 {
		s.Upsert(testPrefix+"k", []byte(fmt.Sprint(i)))
	}
	s.MarkSynced()
	run(t, s.Run)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	resp, _ := c.etcd.Get(ctx, testPrefix+"k")
	if string(resp.Kvs[0].Value) != "99" || resp.Kvs[0].Version != 1 {
		t.Fatalf("got %q version %d, want \"99\" written once", resp.Kvs[0].Value, resp.Kvs[0].Version)
	}
	s.Upsert(testPrefix+"k", []byte("99"))
	s.Upsert(testPrefix+"k2", []byte("x")) // a marker that the queue was drained
	eventually(t, "marker written", func() bool { _, ok := get(t, c.etcd, testPrefix+"k2"); return ok })
	resp, _ = c.etcd.Get(ctx, testPrefix+"k")
	if resp.Kvs[0].Version != 1 {
		t.Errorf("no-op upsert rewrote the key (version %d)", resp.Kvs[0].Version)
	}
}

// A reader is never Synced before the writer's canary, and when it reports
// Synced its observer already has the whole initial set.
func TestWatchStoreCanaryOrdering(t *testing.T) {
	e := startEtcd(t)
	c := newTestClient(t, e.Endpoints(), nil)
	rec := newRecorder()
	w := newWatchStore(t, c, rec, nil)
	run(t, w.Run)

	s := newSyncStore(t, c, nil)
	run(t, s.Run)
	const n = 50
	for i := range n {
		s.Upsert(fmt.Sprintf("%sn%03d", testPrefix, i), []byte("v"))
	}
	eventually(t, "reader sees every key", func() bool { return w.Len() == n })
	time.Sleep(200 * time.Millisecond) // give a wrong implementation time to flip
	if w.Synced() {
		t.Fatal("reader synced before the writer wrote its canary")
	}
	s.MarkSynced()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, "OnSync delivered", func() bool { rec.mu.Lock(); defer rec.mu.Unlock(); return rec.atSync != nil })
	if len(rec.atSync) != n {
		t.Errorf("observer had %d entries at OnSync, want %d", len(rec.atSync), n)
	}
	ev := rec.take()
	if ev[len(ev)-1] != "sync" || slices.Index(ev, "sync") != len(ev)-1 {
		t.Errorf("sync is not the last, single event: %v", ev[max(0, len(ev)-3):])
	}

	// Without canaries, a reader is synced as soon as it has listed.
	w2 := newWatchStore(t, c, nil, func(cfg *WatchStoreConfig[string]) { cfg.SyncedKey = "" })
	run(t, w2.Run)
	if err := w2.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	if w2.Len() != n {
		t.Errorf("canary-less reader has %d entries at sync, want %d", w2.Len(), n)
	}
}

// After etcd restarts with keys deleted and changed while the reader was
// cut off, the reader emits exactly those deletes and changes, and serves
// its cache throughout.
func TestWatchStoreReconnectAfterEtcdRestart(t *testing.T) {
	e := startEtcd(t)
	writer := newTestClient(t, e.Endpoints(), nil)
	p := newProxy(t, e.Endpoints()[0])
	reader := newTestClient(t, []string{p.endpoint()}, nil)
	for i := range 10 {
		put(t, writer.etcd, fmt.Sprintf("%sk%d", testPrefix, i), "v1")
	}
	put(t, writer.etcd, testCanary, "now")

	rec := newRecorder()
	w := newWatchStore(t, reader, rec, nil)
	run(t, w.Run)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := w.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	rec.take()

	p.cut()
	for i := range 3 {
		if _, err := writer.etcd.Delete(ctx, fmt.Sprintf("%sk%d", testPrefix, i)); err != nil {
			t.Fatal(err)
		}
	}
	put(t, writer.etcd, testPrefix+"k4", "v2")
	put(t, writer.etcd, testPrefix+"k5", "v1") // rewritten, same value: no event
	e = restartEtcd(t, e)
	if v, ok := w.Get(testPrefix + "k0"); !ok || v != "v1" {
		t.Errorf("while disconnected the cache lost k0 (%q, %v)", v, ok)
	}
	if !w.Synced() {
		t.Error("reader stopped reporting synced while disconnected")
	}
	p.restore()

	eventually(t, "reader catches up", func() bool { return w.Len() == 7 })
	eventually(t, "k4 updated", func() bool { v, _ := w.Get(testPrefix + "k4"); return v == "v2" })
	got := rec.take()
	slices.Sort(got)
	want := []string{"+" + testPrefix + "k4=v2", "-" + testPrefix + "k0", "-" + testPrefix + "k1", "-" + testPrefix + "k2"}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("events after reconnect = %v, want %v", got, want)
	}
}

// Compaction while a reader is cut off forces a relist; the relist emits
// deletes only for keys that really vanished and nothing for unchanged ones.
func TestWatchStoreCompactionWhileDisconnected(t *testing.T) {
	e := startEtcd(t)
	writer := newTestClient(t, e.Endpoints(), nil)
	p := newProxy(t, e.Endpoints()[0])
	reader := newTestClient(t, []string{p.endpoint()}, nil)
	for i := range 20 {
		put(t, writer.etcd, fmt.Sprintf("%sk%02d", testPrefix, i), "v1")
	}
	rec := newRecorder()
	w := newWatchStore(t, reader, rec, func(cfg *WatchStoreConfig[string]) { cfg.SyncedKey = ""; cfg.PageSize = 7 })
	run(t, w.Run)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := w.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	if got := len(rec.take()); got != 21 {
		t.Fatalf("initial events = %d, want 20 upserts and sync", got)
	}

	p.cut()
	for _, k := range []string{"k03", "k07", "k15"} {
		if _, err := writer.etcd.Delete(ctx, testPrefix+k); err != nil {
			t.Fatal(err)
		}
	}
	put(t, writer.etcd, testPrefix+"k10", "v2")
	put(t, writer.etcd, testPrefix+"new", "v1")
	resp := must(writer.etcd.Put(ctx, "trellis/unrelated", "x"))
	if _, err := writer.etcd.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	p.restore()

	eventually(t, "relist after compaction", func() bool { return w.Stats().Relists >= 1 && w.Len() == 18 })
	got := rec.take()
	slices.Sort(got)
	want := []string{
		"+" + testPrefix + "k10=v2", "+" + testPrefix + "new=v1",
		"-" + testPrefix + "k03", "-" + testPrefix + "k07", "-" + testPrefix + "k15",
	}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("events after compaction = %v, want %v", got, want)
	}

	// And the watch works again after the relist.
	put(t, writer.etcd, testPrefix+"after", "v1")
	eventually(t, "event after relist", func() bool { _, ok := w.Get(testPrefix + "after"); return ok })
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// Lease-bound keys come back after their lease is lost: once when the
// lease is revoked outright, once when the writer is cut off for longer
// than the TTL and etcd expires it.
func TestSyncStoreLeaseLossRepublishes(t *testing.T) {
	e := startEtcd(t)
	admin := newTestClient(t, e.Endpoints(), nil).etcd
	p := newProxy(t, e.Endpoints()[0])
	c := newTestClient(t, []string{p.endpoint()}, func(cfg *Config) { cfg.LeaseTTL = 2 * time.Second; cfg.MaxKeysPerLease = 3 })
	s := newSyncStore(t, c, func(cfg *SyncStoreConfig) { cfg.WithLease = true })
	for i := range 5 {
		s.Upsert(fmt.Sprintf("%sk%d", testPrefix, i), []byte("v"))
	}
	s.MarkSynced()
	run(t, s.Run)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := s.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	leasesOf := func() map[int64]int {
		resp := must(admin.Get(ctx, "trellis/v1/", clientv3.WithPrefix()))
		l := make(map[int64]int)
		for _, kv := range resp.Kvs {
			l[kv.Lease]++
		}
		return l
	}
	all := func() bool {
		resp := must(admin.Get(ctx, "trellis/v1/", clientv3.WithPrefix(), clientv3.WithCountOnly()))
		return resp.Count == 6 // 5 keys + canary
	}
	before := leasesOf()
	if len(before) != 2 || before[0] != 0 {
		t.Fatalf("6 lease-bound keys at 3 per lease should use 2 leases, got %v", before)
	}

	// Revoked: etcd deletes the keys at once.
	var victim int64
	for id := range before {
		victim = id
		break
	}
	if _, err := admin.Revoke(ctx, clientv3.LeaseID(victim)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "keys re-published after revoke", all)
	if _, still := leasesOf()[victim]; still {
		t.Error("a key is still on the revoked lease")
	}

	// Expired: the writer cannot renew for longer than the TTL.
	p.cut()
	eventually(t, "etcd expires the writer's leases", func() bool {
		resp := must(admin.Get(ctx, testPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly()))
		return resp.Count == 0
	})
	p.restore()
	eventually(t, "keys re-published after expiry", all)
}

// Undecodable values are counted by reason and skipped; a bad update to a
// good entry keeps the last good value.
func TestWatchStoreCountsMalformedValues(t *testing.T) {
	e := startEtcd(t)
	c := newTestClient(t, e.Endpoints(), nil)
	raw := c.etcd
	put(t, raw, testPrefix+"good", "v1")
	put(t, raw, testPrefix+"bad1", "bad value")
	put(t, raw, testPrefix+"bad2", "bad value")
	rec := newRecorder()
	w := newWatchStore(t, c, rec, func(cfg *WatchStoreConfig[string]) {
		cfg.SyncedKey = ""
		cfg.Reason = func(error) string { return "malformed" }
	})
	run(t, w.Run)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	if w.Len() != 1 {
		t.Fatalf("cache has %d entries, want only the good one", w.Len())
	}
	put(t, raw, testPrefix+"good", "bad update")
	put(t, raw, testPrefix+"marker", "x")
	eventually(t, "marker", func() bool { _, ok := w.Get(testPrefix + "marker"); return ok })
	if v, _ := w.Get(testPrefix + "good"); v != "v1" {
		t.Errorf("bad update replaced the last good value: %q", v)
	}
	if got := w.Stats().Rejected["malformed"]; got != 3 {
		t.Errorf("rejected[malformed] = %d, want 3", got)
	}
	for _, ev := range rec.take() {
		if ev != "+"+testPrefix+"good=v1" && ev != "+"+testPrefix+"marker=x" && ev != "sync" {
			t.Errorf("unexpected event %q", ev)
		}
	}
}

// 100k keys published by a SyncStore arrive whole at a WatchStore.
func TestPublishAndSync100k(t *testing.T) {
	if testing.Short() {
		t.Skip("100k keys take a few seconds; skipped in -short")
	}
	e := startEtcd(t)
	c := newTestClient(t, e.Endpoints(), nil)
	s := newSyncStore(t, c, func(cfg *SyncStoreConfig) { cfg.WithLease = true })
	const n = 100_000
	value := make([]byte, 200)
	for i := range value {
		value[i] = 'x'
	}
	for i := range n {
		s.Upsert(fmt.Sprintf("%s10.%d.%d.%d", testPrefix, i>>16, (i>>8)&255, i&255), value)
	}
	s.MarkSynced()
	run(t, s.Run)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := s.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	var leases = map[int64]int{}
	resp := must(c.etcd.Get(ctx, testPrefix, clientv3.WithPrefix()))
	for _, kv := range resp.Kvs {
		leases[kv.Lease]++
	}
	for id, keys := range leases {
		if keys > 1000 {
			t.Errorf("lease %x holds %d keys, limit is 1000", id, keys)
		}
	}

	w := newWatchStore(t, c, nil, nil)
	run(t, w.Run)
	if err := w.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	if w.Len() != n {
		t.Fatalf("reader has %d entries, want %d", w.Len(), n)
	}
}

func TestClientBootstrapBurst(t *testing.T) {
	e := startEtcd(t)
	c := newTestClient(t, e.Endpoints(), func(cfg *Config) { cfg.QPS = 10; cfg.Burst = 5; cfg.BootstrapBurst = 500 })
	if got := c.limiter.Burst(); got != 500 {
		t.Fatalf("burst during bootstrap = %d, want 500", got)
	}
	c.BootstrapDone()
	if got := c.limiter.Burst(); got != 5 {
		t.Fatalf("burst after bootstrap = %d, want 5", got)
	}
	if err := c.Health(context.Background()); err != nil {
		t.Fatal(err)
	}
}
