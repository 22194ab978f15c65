package kvstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// A session's keys live until etcd loses the lease; Close stops renewing
// without deleting them, Revoke deletes them, and a revoked lease ends the
// session with ErrSessionLost and fails the next write that uses it.
func TestSession(t *testing.T) {
	e := startEtcd(t)
	c := newTestClient(t, e.Endpoints(), nil)
	ctx := testContext(t)
	key := testPrefix + "leased"

	t.Run("close keeps the keys", func(t *testing.T) {
		s, err := c.NewSession(ctx, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Txn(ctx, Txn{Then: []Op{OpPut(key, []byte("v")).WithSession(s)}}); err != nil {
			t.Fatal(err)
		}
		s.Close()
		s.Close() // twice is fine
		if !errors.Is(s.Err(), ErrSessionClosed) {
			t.Fatalf("Err after Close = %v, want ErrSessionClosed", s.Err())
		}
		if kv, _, err := c.Get(ctx, key); err != nil || kv == nil {
			t.Fatalf("key after Close: %v, %v; want it kept until the lease expires", kv, err)
		}
	})

	t.Run("revoked behind its back", func(t *testing.T) {
		s, err := c.NewSession(ctx, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if _, err := c.Txn(ctx, Txn{Then: []Op{OpPut(key, []byte("v")).WithSession(s)}}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.etcd.Revoke(ctx, s.id); err != nil {
			t.Fatal(err)
		}
		if kv, _, _ := c.Get(ctx, key); kv != nil {
			t.Fatal("key survived the revoke")
		}
		// A write with the dead lease says so...
		_, err = c.Txn(ctx, Txn{Then: []Op{OpPut(key, []byte("v")).WithSession(s)}})
		if !errors.Is(err, ErrSessionLost) {
			t.Fatalf("write on a revoked lease: %v, want ErrSessionLost", err)
		}
		// ...and the keepalive notices within a renewal interval.
		select {
		case <-s.Done():
		case <-ctx.Done():
			t.Fatal("session not ended after its lease was revoked")
		}
		if !errors.Is(s.Err(), ErrSessionLost) {
			t.Fatalf("Err = %v, want ErrSessionLost", s.Err())
		}
	})

	t.Run("revoke deletes the keys", func(t *testing.T) {
		s, err := c.NewSession(ctx, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Txn(ctx, Txn{Then: []Op{OpPut(key, []byte("v")).WithSession(s)}}); err != nil {
			t.Fatal(err)
		}
		if err := s.Revoke(ctx); err != nil {
			t.Fatal(err)
		}
		if kv, _, _ := c.Get(ctx, key); kv != nil {
			t.Fatal("key survived Revoke")
		}
	})
}

// Transactions compare what the identity allocator compares: absence,
// revisions, values; the branch taken says which ops ran, and counts come
// back from the branch that ran.
func TestTxn(t *testing.T) {
	e := startEtcd(t)
	c := newTestClient(t, e.Endpoints(), nil)
	ctx := testContext(t)
	a, b := testPrefix+"a", testPrefix+"b"

	create := Txn{
		If:   []Cmp{CmpAbsent(a)},
		Then: []Op{OpPut(a, []byte("1")), OpPut(b, []byte("x"))},
		Else: []Op{OpCount(a), OpCount(b)},
	}
	res, err := c.Txn(ctx, create)
	if err != nil || !res.Succeeded || len(res.Counts) != 0 {
		t.Fatalf("first create: %+v, %v; want success without counts", res, err)
	}
	res, err = c.Txn(ctx, create)
	if err != nil || res.Succeeded || !slices.Equal(res.Counts, []int64{1, 1}) {
		t.Fatalf("second create: %+v, %v; want failure with counts [1 1]", res, err)
	}

	kv, rev, err := c.Get(ctx, a)
	if err != nil || kv == nil || string(kv.Value) != "1" || kv.ModRevision != kv.CreateRevision || rev < kv.ModRevision {
		t.Fatalf("get %s: %+v rev %d, %v", a, kv, rev, err)
	}
	stale := kv.ModRevision
	if res, err := c.Txn(ctx, Txn{If: []Cmp{CmpModRevision(a, stale)}, Then: []Op{OpPut(a, []byte("2"))}}); err != nil || !res.Succeeded {
		t.Fatalf("update at the current revision: %+v, %v", res, err)
	}
	if res, err := c.Txn(ctx, Txn{If: []Cmp{CmpModRevision(a, stale)}, Then: []Op{OpDelete(a)}}); err != nil || res.Succeeded {
		t.Fatalf("delete at a stale revision: %+v, %v; want the compare to fail", res, err)
	}
	if res, err := c.Txn(ctx, Txn{If: []Cmp{CmpValue(a, []byte("1"))}, Then: []Op{OpDelete(a)}}); err != nil || res.Succeeded {
		t.Fatalf("delete if value is the old one: %+v, %v; want the compare to fail", res, err)
	}
	if res, err := c.Txn(ctx, Txn{If: []Cmp{CmpValue(a, []byte("2"))}, Then: []Op{OpDelete(a)}}); err != nil || !res.Succeeded {
		t.Fatalf("delete if value is the current one: %+v, %v", res, err)
	}
	if kv, _, _ := c.Get(ctx, a); kv != nil {
		t.Fatalf("%s still there: %+v", a, kv)
	}
}

// List reads at one revision, in pages, keys only when asked.
func TestList(t *testing.T) {
	e := startEtcd(t)
	c := newTestClient(t, e.Endpoints(), nil)
	ctx := testContext(t)
	for i := range 25 {
		if err := c.Put(ctx, fmt.Sprintf("%sk%02d", testPrefix, i), []byte("v1")); err != nil {
			t.Fatal(err)
		}
	}
	_, rev, err := c.Get(ctx, testPrefix)
	if err != nil {
		t.Fatal(err)
	}
	// Changes after rev must not show in a listing at rev.
	if err := c.Delete(ctx, testPrefix+"k00"); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(ctx, testPrefix+"k01", []byte("v2")); err != nil {
		t.Fatal(err)
	}

	var keys []string
	got, err := c.List(ctx, testPrefix, ListOptions{Revision: rev, PageSize: 7}, func(kv KeyValue) {
		keys = append(keys, kv.Key)
		if kv.Key == testPrefix+"k01" && string(kv.Value) != "v1" {
			t.Errorf("k01 at rev %d = %q, want v1", rev, kv.Value)
		}
	})
	if err != nil || got != rev {
		t.Fatalf("list at %d: rev %d, %v", rev, got, err)
	}
	if len(keys) != 25 || !slices.IsSorted(keys) || keys[0] != testPrefix+"k00" {
		t.Fatalf("listed %d keys (%v...), want 25 in order from k00", len(keys), keys[:min(3, len(keys))])
	}

	n := 0
	if _, err := c.List(ctx, testPrefix, ListOptions{KeysOnly: true}, func(kv KeyValue) {
		n++
		if kv.Value != nil {
			t.Errorf("keys-only listing returned a value for %s", kv.Key)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if n != 24 {
		t.Errorf("current listing has %d keys, want 24", n)
	}
}

// keyStates records what WatchKey reports.
type keyStates struct {
	mu     sync.Mutex
	states []string // value, or "<absent>"
}

func (k *keyStates) add(kv *KeyValue) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if kv == nil {
		k.states = append(k.states, "<absent>")
		return
	}
	k.states = append(k.states, string(kv.Value))
}

func (k *keyStates) get() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.states)
}

// WatchKey reports the key's state now and every change; a watch broken by
// a lost connection and a compaction resumes with the latest state,
// reported once, and nothing the reader already saw again.
func TestWatchKey(t *testing.T) {
	e := startEtcd(t)
	writer := newTestClient(t, e.Endpoints(), nil)
	p := newProxy(t, e.Endpoints()[0])
	reader := newTestClient(t, []string{p.endpoint()}, nil)
	ctx := testContext(t)
	key := testPrefix + "config"
	if err := writer.Put(ctx, key, []byte("v1")); err != nil {
		t.Fatal(err)
	}

	var seen keyStates
	stop := errors.New("stop")
	done := make(chan error, 1)
	go func() {
		done <- reader.WatchKey(ctx, key, WatchKeyConfig{MaxBackoff: 200 * time.Millisecond}, func(kv *KeyValue) error {
			seen.add(kv)
			if kv != nil && string(kv.Value) == "stop" {
				return stop
			}
			return nil
		})
	}()
	waitStates := func(want ...string) {
		t.Helper()
		eventually(t, fmt.Sprintf("states %v", want), func() bool { return slices.Equal(seen.get(), want) })
	}
	waitStates("v1")
	if err := writer.Put(ctx, key, []byte("v2")); err != nil {
		t.Fatal(err)
	}
	if err := writer.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	waitStates("v1", "v2", "<absent>")

	// Cut off, the reader misses two writes and a compaction past them.
	p.cut()
	for _, v := range []string{"v3", "v4"} {
		if err := writer.Put(ctx, key, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	resp := must(writer.etcd.Put(ctx, testPrefix+"unrelated", "x"))
	if _, err := writer.etcd.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	p.restore()
	waitStates("v1", "v2", "<absent>", "v4")

	// An unrelated reconnect with nothing changed reports nothing.
	p.cut()
	p.restore()
	if err := writer.Put(ctx, key, []byte("stop")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, stop) {
			t.Fatalf("WatchKey returned %v, want fn's error", err)
		}
	case <-ctx.Done():
		t.Fatal("WatchKey did not return fn's error")
	}
	if got, want := seen.get(), []string{"v1", "v2", "<absent>", "v4", "stop"}; !slices.Equal(got, want) {
		t.Fatalf("states %v, want %v", got, want)
	}
}

// WatchKey ends with nil when its context ends, also while it cannot reach
// etcd and is backing off.
func TestWatchKeyStopsOnCancel(t *testing.T) {
	e := startEtcd(t)
	p := newProxy(t, e.Endpoints()[0])
	reader := newTestClient(t, []string{p.endpoint()}, nil)
	p.cut()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- reader.WatchKey(ctx, testPrefix+"k", WatchKeyConfig{}, func(*KeyValue) error { return nil })
	}()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("WatchKey = %v, want nil on cancellation", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("WatchKey ignored its context")
	}
}

type record struct {
	Name string `json:"name"`
	N    int    `json:"n"`
}

// A RecordStore finds its records again, IDs with slashes included, and
// reports an undecodable one without losing the others.
func TestRecordStore(t *testing.T) {
	e := startEtcd(t)
	c := newTestClient(t, e.Endpoints(), nil)
	ctx := testContext(t)
	if _, err := NewRecordStore[record](c, "trellis/registry/x"); err == nil {
		t.Fatal("a prefix without a trailing / was accepted")
	}
	s, err := NewRecordStore[record](c, testPrefix+"records/")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []record{{"a", 1}, {"ns/b", 2}, {"c", 3}} {
		if err := s.Put(ctx, r.Name, r); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Put(ctx, "c", record{"c", 4}); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "never-there"); err != nil {
		t.Fatalf("delete of a missing record: %v", err)
	}
	if err := c.Put(ctx, s.Key("garbled"), []byte("{not json")); err != nil {
		t.Fatal(err)
	}

	recs, err := s.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range recs {
		if r.Err != nil {
			got = append(got, r.ID+":error")
			continue
		}
		got = append(got, fmt.Sprintf("%s:%s/%d", r.ID, r.Value.Name, r.Value.N))
	}
	want := []string{"c:c/4", "garbled:error", "ns/b:ns/b/2"}
	if !slices.Equal(got, want) {
		t.Fatalf("records %v, want %v", got, want)
	}
}

// Conditional writes go through only at the revision the caller saw.
func TestRecordStoreConditional(t *testing.T) {
	e := startEtcd(t)
	c := newTestClient(t, e.Endpoints(), nil)
	ctx := testContext(t)
	s, err := NewRecordStore[record](c, testPrefix+"records/")
	if err != nil {
		t.Fatal(err)
	}
	rev, err := s.PutIf(ctx, "a", record{"a", 1}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutIf(ctx, "a", record{"a", 2}, 0); !errors.Is(err, ErrConflict) {
		t.Fatalf("create over an existing record: %v, want ErrConflict", err)
	}
	rev2, err := s.PutIf(ctx, "a", record{"a", 3}, rev)
	if err != nil || rev2 <= rev {
		t.Fatalf("update at the current revision: %d, %v", rev2, err)
	}
	if err := s.DeleteIf(ctx, "a", rev); !errors.Is(err, ErrConflict) {
		t.Fatalf("delete at a stale revision: %v, want ErrConflict", err)
	}
	got, ok, err := s.Get(ctx, "a")
	if err != nil || !ok || got.Value.N != 3 || got.Revision != rev2 {
		t.Fatalf("get: %+v %v %v", got, ok, err)
	}
	if err := s.DeleteIf(ctx, "a", rev2); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := s.Get(ctx, "a"); ok {
		t.Fatal("record still there after DeleteIf")
	}
}
