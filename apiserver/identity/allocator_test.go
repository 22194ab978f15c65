package identity

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func TestConfigValidation(t *testing.T) {
	e := startEtcd(t)
	client := newClient(t, e)
	good := Config{Client: client, Cluster: testCluster, ClusterID: testClusterID, Replica: "apiserver-0"}
	if _, err := New(good); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	for _, tc := range []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"no client", func(c *Config) { c.Client = nil }, "Client is required"},
		{"bad cluster", func(c *Config) { c.Cluster = "Cluster_A" }, "Cluster"},
		{"no cluster", func(c *Config) { c.Cluster = "" }, "Cluster"},
		{"cluster id 0", func(c *Config) { c.ClusterID = 0 }, "ClusterID"},
		{"cluster id 512", func(c *Config) { c.ClusterID = 512 }, "ClusterID"},
		{"no replica", func(c *Config) { c.Replica = "" }, "Replica \"\": required"},
		{"replica with slash", func(c *Config) { c.Replica = "a/b" }, "key segment"},
		{"short lease", func(c *Config) { c.LeaseTTL = 500 * time.Millisecond }, "LeaseTTL"},
		{"negative interval", func(c *Config) { c.GCInterval = -time.Second }, "negative duration"},
		{"inverted range", func(c *Config) { c.MinLocalID, c.MaxLocalID = 10, 5 }, "MinLocalID 10 > MaxLocalID 5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.mod(&cfg)
			_, err := New(cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New: got %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
}

// Requirement 1: one identity per distinct label set, with the cluster ID
// in the high bits, published as valid v1.Identity JSON.
func TestAcquireOneIdentityPerLabelSet(t *testing.T) {
	e := startEtcd(t)
	a := newAllocator(t, e, "apiserver-0", nil)
	ctx := testCtx(t)

	web := podLabels("default", "web")
	id1, err := a.Acquire(ctx, web)
	if err != nil {
		t.Fatal(err)
	}
	// A different map with the same labels.
	id2, err := a.Acquire(ctx, map[string]string{"k8s:io.kubernetes.pod.namespace": "default", "k8s:app": "web"})
	if err != nil {
		t.Fatal(err)
	}
	if id1 != id2 {
		t.Fatalf("same labels got %d and %d", id1, id2)
	}
	db := podLabels("default", "db")
	id3, err := a.Acquire(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	if id3 == id1 {
		t.Fatalf("different labels share identity %d", id1)
	}
	for _, id := range []v1.NumericIdentity{id1, id3} {
		if id.ClusterID() != testClusterID || id.Local() == 0 {
			t.Errorf("identity %d: cluster bits %d, local %d; want cluster %d and a nonzero local id", id, id.ClusterID(), id.Local(), testClusterID)
		}
	}

	for labels, id := range map[*map[string]string]v1.NumericIdentity{&web: id1, &db: id3} {
		st := stateOf(t, a.client, a, *labels)
		if st.indexID != id {
			t.Errorf("index of %v names %d, want %d", *labels, st.indexID, id)
		}
		if st.identity == nil {
			t.Fatalf("no identity key for %d", id)
		}
		if st.identity.ID != id || st.identity.Cluster != testCluster || !sameLabels(st.identity.Labels, *labels) {
			t.Errorf("identity key holds %+v, want id %d, cluster %s, labels %v", *st.identity, id, testCluster, *labels)
		}
		if !slices.Equal(st.refs, []string{"apiserver-0"}) {
			t.Errorf("refs on %d: %v, want [apiserver-0]", id, st.refs)
		}
	}
	// The ref is lease-bound, the identity is not.
	raw := rawEtcd(t, e)
	resp, err := raw.Get(ctx, a.refKey(id1))
	if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 {
		t.Fatalf("ref key %s: %v %v; want one lease-bound key", a.refKey(id1), resp, err)
	}
	resp, err = raw.Get(ctx, a.idKey(id1))
	if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease != 0 {
		t.Fatalf("identity key %s: %v %v; want one key without lease", a.idKey(id1), resp, err)
	}

	if s := a.Stats(); s.LabelSets != 2 || s.References != 3 || s.Allocated != 2 {
		t.Errorf("stats %+v, want 2 label sets, 3 references, 2 allocated", s)
	}
	list, err := a.Identities(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].ID > list[1].ID {
		t.Fatalf("Identities = %+v, want 2 sorted by id", list)
	}

	// Invalid labels never reach etcd.
	for _, bad := range []map[string]string{nil, {"k8s:app": "bad value"}, {"": "x"}} {
		if _, err := a.Acquire(ctx, bad); !errors.Is(err, v1.ErrInvalid) {
			t.Errorf("Acquire(%v) = %v, want ErrInvalid", bad, err)
		}
	}
	// Release balances Acquire.
	if err := a.Release(ctx, podLabels("default", "never")); !errors.Is(err, ErrNotAcquired) {
		t.Errorf("release of unacquired labels: %v, want ErrNotAcquired", err)
	}
	for range 2 {
		if err := a.Release(ctx, web); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Release(ctx, web); !errors.Is(err, ErrNotAcquired) {
		t.Errorf("third release of two acquisitions: %v, want ErrNotAcquired", err)
	}
	if st := stateOf(t, a.client, a, web); len(st.refs) != 0 || st.identity == nil {
		t.Errorf("after the last release: refs %v, identity %v; want no ref and the identity kept until GC", st.refs, st.identity)
	}
	if s := a.Stats(); s.LabelSets != 1 || s.References != 1 {
		t.Errorf("stats after releases %+v, want 1 label set, 1 reference", s)
	}
}

// Requirement 2: stable across restarts of the API server (same or another
// replica name) and of etcd.
func TestStableAcrossRestart(t *testing.T) {
	for _, tc := range []struct {
		name        string
		replica     string
		restartEtcd bool
	}{
		{"same replica", "apiserver-0", false},
		{"new replica", "apiserver-1", false},
		{"etcd restart", "apiserver-0", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startEtcd(t)
			ctx := testCtx(t)
			web := podLabels("default", "web")

			a := newAllocator(t, e, "apiserver-0", nil)
			want, err := a.Acquire(ctx, web)
			if err != nil {
				t.Fatal(err)
			}
			// Another label set allocated after, so "lowest free" would
			// not hide a lost allocation.
			if _, err := a.Acquire(ctx, podLabels("default", "db")); err != nil {
				t.Fatal(err)
			}
			a.Close()
			if _, err := a.Acquire(ctx, web); !errors.Is(err, ErrClosed) {
				t.Fatalf("Acquire after Close: %v, want ErrClosed", err)
			}
			if tc.restartEtcd {
				// Close the old client first: etcd's graceful stop
				// waits for its open lease stream.
				a.cfg.Client.Close()
				cfg := e.Effective()
				e.Close()
				e = startEtcdWith(t, cfg)
			}

			b := newAllocator(t, e, tc.replica, nil)
			runGC(t, b) // a GC pass at start must not take identities the old process still references
			got, err := b.Acquire(ctx, web)
			if err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Fatalf("after restart %s has identity %d, was %d", "web", got, want)
			}
			if s := b.Stats(); s.Allocated != 0 {
				t.Errorf("restarted allocator allocated %d identities, want 0", s.Allocated)
			}
		})
	}
}

// Requirement 3: two replicas racing on the same label sets agree, and
// etcd ends up with exactly one identity per label set.
func TestTwoReplicasRace(t *testing.T) {
	e := startEtcd(t)
	ctx := testCtx(t)
	a := newAllocator(t, e, "apiserver-0", nil)
	b := newAllocator(t, e, "apiserver-1", nil)

	const n = 50
	sets := make([]map[string]string, n)
	for i := range sets {
		sets[i] = podLabels("ns-"+strconv.Itoa(i%5), "app-"+strconv.Itoa(i))
	}
	ids := [2][n]v1.NumericIdentity{}
	var wg sync.WaitGroup
	start := make(chan struct{})
	for r, alloc := range []*Allocator{a, b} {
		for i := range n {
			wg.Go(func() {
				<-start
				id, err := alloc.Acquire(ctx, sets[i])
				if err != nil {
					t.Errorf("replica %d, set %d: %v", r, i, err)
				}
				ids[r][i] = id
			})
		}
	}
	close(start)
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	seen := make(map[v1.NumericIdentity]int)
	for i := range n {
		if ids[0][i] != ids[1][i] {
			t.Errorf("set %d: replica 0 has %d, replica 1 has %d", i, ids[0][i], ids[1][i])
		}
		if j, dup := seen[ids[0][i]]; dup {
			t.Errorf("sets %d and %d share identity %d", j, i, ids[0][i])
		}
		seen[ids[0][i]] = i
		st := stateOf(t, a.client, a, sets[i])
		if st.indexID != ids[0][i] || st.identity == nil || !sameLabels(st.identity.Labels, sets[i]) {
			t.Errorf("set %d: etcd has index %d, identity %+v; want %d with its labels", i, st.indexID, st.identity, ids[0][i])
		}
		if !slices.Equal(st.refs, []string{"apiserver-0", "apiserver-1"}) {
			t.Errorf("set %d: refs %v, want both replicas", i, st.refs)
		}
	}
	if c := countPrefix(t, a.client, a.idPrefix); c != n {
		t.Errorf("%d identity keys, want %d", c, n)
	}
	if c := countPrefix(t, a.client, a.indexPrefix); c != n {
		t.Errorf("%d index keys, want %d", c, n)
	}
	if got := a.Stats().Allocated + b.Stats().Allocated; got != n {
		t.Errorf("replicas allocated %d identities together, want %d", got, n)
	}
}

// Requirement 4: released when unused, but not while another replica uses
// it, and only after the grace period.
func TestReleasedWhenUnused(t *testing.T) {
	e := startEtcd(t)
	ctx := testCtx(t)
	fast := func(c *Config) { c.GCInterval, c.GCGrace = 10*time.Millisecond, 50*time.Millisecond }
	a := newAllocator(t, e, "apiserver-0", fast)
	b := newAllocator(t, e, "apiserver-1", fast)
	runGC(t, a)
	runGC(t, b)

	web := podLabels("default", "web")
	id, err := a.Acquire(ctx, web)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx, web); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the unused identity is collected", func() bool {
		st := stateOf(t, a.client, a, web)
		return st.indexID == 0 && countPrefix(t, a.client, a.idKey(id)) == 0
	})
	if got := a.Stats().Collected + b.Stats().Collected; got != 1 {
		t.Errorf("collected %d identities, want 1", got)
	}

	// Shared: A's release leaves B's reference, and the identity.
	db := podLabels("default", "db")
	idA, err := a.Acquire(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	idB, err := b.Acquire(ctx, db)
	if err != nil || idB != idA {
		t.Fatalf("replica B: %d, %v; want %d", idB, err, idA)
	}
	if err := a.Release(ctx, db); err != nil {
		t.Fatal(err)
	}
	passes := a.Stats().GCPasses + b.Stats().GCPasses
	eventually(t, "20 GC passes", func() bool { return a.Stats().GCPasses+b.Stats().GCPasses >= passes+20 })
	if st := stateOf(t, a.client, a, db); st.indexID != idA || st.identity == nil || !slices.Equal(st.refs, []string{"apiserver-1"}) {
		t.Fatalf("identity held by B: index %d, identity %v, refs %v; want it kept with B's ref", st.indexID, st.identity, st.refs)
	}
	if err := b.Release(ctx, db); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the identity is collected after B's release", func() bool {
		return countPrefix(t, a.client, a.idKey(idA)) == 0 && stateOf(t, a.client, a, db).indexID == 0
	})
}

func TestGracePeriod(t *testing.T) {
	e := startEtcd(t)
	ctx := testCtx(t)
	a := newAllocator(t, e, "apiserver-0", func(c *Config) { c.GCInterval, c.GCGrace = 5*time.Millisecond, time.Hour })
	runGC(t, a)
	web := podLabels("default", "web")
	id, err := a.Acquire(ctx, web)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx, web); err != nil {
		t.Fatal(err)
	}
	passes := a.Stats().GCPasses
	eventually(t, "20 GC passes", func() bool { return a.Stats().GCPasses >= passes+20 })
	if countPrefix(t, a.client, a.idKey(id)) != 1 {
		t.Fatal("identity collected before its grace period")
	}
	// Coming back within the grace period gives the same number.
	if again, err := a.Acquire(ctx, web); err != nil || again != id {
		t.Fatalf("re-acquire: %d, %v; want %d", again, err, id)
	}
}

// The races the GC compare exists for, forced deterministically.
func TestGCRacesWithAcquire(t *testing.T) {
	ctx := testCtx(t)
	noGrace := func(c *Config) { c.GCGrace = time.Nanosecond }

	t.Run("acquire between GC listing and delete", func(t *testing.T) {
		e := startEtcd(t)
		a := newAllocator(t, e, "apiserver-0", noGrace)
		b := newAllocator(t, e, "apiserver-1", noGrace)
		web := podLabels("default", "web")
		id, err := a.Acquire(ctx, web)
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Release(ctx, web); err != nil {
			t.Fatal(err)
		}
		var gc gcState
		if n, err := a.collect(ctx, &gc); err != nil || n != 0 {
			t.Fatalf("first pass: %d deleted, %v; want a candidate only", n, err)
		}
		var got v1.NumericIdentity
		a.hooks.beforeGCDelete = func(v1.NumericIdentity) {
			a.hooks.beforeGCDelete = nil
			var err error
			if got, err = b.Acquire(ctx, web); err != nil {
				t.Errorf("acquire in B: %v", err)
			}
		}
		if n, err := a.collect(ctx, &gc); err != nil || n != 0 {
			t.Fatalf("second pass: %d deleted, %v; want the delete to lose to B's acquire", n, err)
		}
		if got != id {
			t.Fatalf("B got %d, want %d", got, id)
		}
		if st := stateOf(t, a.client, a, web); st.indexID != id || st.identity == nil || !slices.Equal(st.refs, []string{"apiserver-1"}) {
			t.Fatalf("after the race: index %d, identity %v, refs %v; want identity %d kept with B's ref", st.indexID, st.identity, st.refs, id)
		}
		// And it is never collected while B holds it.
		for range 3 {
			if n, err := a.collect(ctx, &gc); err != nil || n != 0 {
				t.Fatalf("later pass: %d deleted, %v", n, err)
			}
		}
	})

	t.Run("GC delete between acquire's read and its transaction", func(t *testing.T) {
		e := startEtcd(t)
		a := newAllocator(t, e, "apiserver-0", noGrace)
		b := newAllocator(t, e, "apiserver-1", noGrace)
		web := podLabels("default", "web")
		if _, err := a.Acquire(ctx, web); err != nil {
			t.Fatal(err)
		}
		if err := a.Release(ctx, web); err != nil {
			t.Fatal(err)
		}
		var gc gcState
		if _, err := a.collect(ctx, &gc); err != nil {
			t.Fatal(err)
		}
		b.hooks.beforeJoin = func(v1.NumericIdentity) {
			b.hooks.beforeJoin = nil
			n, err := a.collect(ctx, &gc)
			if err != nil || n != 1 {
				t.Errorf("GC inside B's acquire: %d deleted, %v; want 1", n, err)
			}
		}
		got, err := b.Acquire(ctx, web)
		if err != nil {
			t.Fatal(err)
		}
		st := stateOf(t, a.client, a, web)
		if st.indexID != got || st.identity == nil || st.identity.ID != got || !slices.Equal(st.refs, []string{"apiserver-1"}) {
			t.Fatalf("B holds %d but etcd has index %d, identity %v, refs %v", got, st.indexID, st.identity, st.refs)
		}
		if b.Stats().Allocated != 1 {
			t.Errorf("B allocated %d identities, want 1 (the old one was collected under it)", b.Stats().Allocated)
		}
	})
}

// A GC racing with Acquire never deletes an identity that has a live
// reference: both replicas collect continuously with no grace while both
// acquire and release a few label sets over and over, and every holder
// checks etcd while it holds.
func TestGCNeverDeletesReferencedIdentity(t *testing.T) {
	e := startEtcd(t)
	ctx := testCtx(t)
	aggressive := func(c *Config) { c.GCInterval, c.GCGrace = time.Millisecond, time.Nanosecond }
	a := newAllocator(t, e, "apiserver-0", aggressive)
	b := newAllocator(t, e, "apiserver-1", aggressive)
	runGC(t, a)
	runGC(t, b)
	obs := newClient(t, e)

	iterations := 150
	if testing.Short() {
		iterations = 30
	}
	const sets = 3
	var wg sync.WaitGroup
	for w, alloc := range []*Allocator{a, a, b, b} {
		wg.Go(func() {
			for i := range iterations {
				labels := podLabels("race", "app-"+strconv.Itoa((i+w)%sets))
				id, err := alloc.Acquire(ctx, labels)
				if err != nil {
					t.Errorf("worker %d iteration %d: acquire: %v", w, i, err)
					return
				}
				for check := range 2 {
					st := stateOf(t, obs, a, labels)
					if st.indexID != id || st.identity == nil || st.identity.ID != id || !sameLabels(st.identity.Labels, labels) {
						t.Errorf("worker %d iteration %d check %d: holding %d but etcd has index %d, identity %v", w, i, check, id, st.indexID, st.identity)
						return
					}
					if !slices.Contains(st.refs, alloc.cfg.Replica) {
						t.Errorf("worker %d iteration %d: holding %d but %s has no ref (refs %v)", w, i, id, alloc.cfg.Replica, st.refs)
						return
					}
					time.Sleep(time.Duration(i%3) * time.Millisecond)
				}
				if err := alloc.Release(ctx, labels); err != nil {
					t.Errorf("worker %d iteration %d: release: %v", w, i, err)
					return
				}
				time.Sleep(time.Duration(i%4) * time.Millisecond)
			}
		})
	}
	wg.Wait()
	collected := a.Stats().Collected + b.Stats().Collected
	t.Logf("%d identities collected during the race, %d GC passes", collected, a.Stats().GCPasses+b.Stats().GCPasses)
	if collected == 0 {
		t.Error("GC never collected anything: the test did not race")
	}
}

// Requirement 5: a lost lease is replaced and the references re-published
// before GC could take the identity.
func TestLeaseLost(t *testing.T) {
	e := startEtcd(t)
	ctx := testCtx(t)
	// Default grace: max(GCInterval, LeaseTTL) = 3s.
	cfg := func(c *Config) { c.GCInterval, c.LeaseTTL = 10*time.Millisecond, 3*time.Second }
	a := newAllocator(t, e, "apiserver-0", cfg)
	b := newAllocator(t, e, "apiserver-1", cfg)
	runGC(t, a)
	runGC(t, b)
	raw, obs := rawEtcd(t, e), newClient(t, e)

	web := podLabels("default", "web")
	id, err := a.Acquire(ctx, web)
	if err != nil {
		t.Fatal(err)
	}
	leaseOf := func() clientv3.LeaseID {
		resp, err := raw.Get(ctx, a.refKey(id))
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) == 0 {
			return 0
		}
		return clientv3.LeaseID(resp.Kvs[0].Lease)
	}
	old := leaseOf()
	if old == 0 {
		t.Fatal("no ref key")
	}
	if _, err := raw.Revoke(ctx, old); err != nil {
		t.Fatal(err)
	}
	if leaseOf() != 0 {
		t.Fatal("ref key survived the revoke")
	}
	// Acquiring right away works, whether or not A noticed yet.
	if _, err := a.Acquire(ctx, podLabels("default", "db")); err != nil {
		t.Fatalf("acquire after revoke: %v", err)
	}
	eventually(t, "the ref is re-published on a new lease", func() bool {
		l := leaseOf()
		return l != 0 && l != old
	})
	// The counter moves just after the write.
	eventually(t, "Stats.Republished counts it", func() bool { return a.Stats().Republished > 0 })
	// Both GCs ran all along; the identity is still there, and stays.
	deadline := time.Now().Add(4 * time.Second)
	for time.Now().Before(deadline) {
		if st := stateOf(t, obs, a, web); st.indexID != id || st.identity == nil || len(st.refs) != 1 {
			t.Fatalf("after the lease loss: index %d, identity %v, refs %v; want %d kept with A's ref", st.indexID, st.identity, st.refs, id)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if c := a.Stats().Collected + b.Stats().Collected; c != 0 {
		t.Errorf("%d identities collected, want 0", c)
	}
}

// A replica cut off for longer than the grace period finds its identity
// collected; it allocates it again under the same number.
func TestLeaseLostAndCollected(t *testing.T) {
	e := startEtcd(t)
	ctx := testCtx(t)
	a := newAllocator(t, e, "apiserver-0", func(c *Config) { c.LeaseTTL = 3 * time.Second })
	raw, obs := rawEtcd(t, e), newClient(t, e)

	web := podLabels("default", "web")
	id, err := a.Acquire(ctx, web)
	if err != nil {
		t.Fatal(err)
	}
	ls, _ := a.newLabelSet(web)
	resp, err := raw.Get(ctx, a.refKey(id))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("ref key: %v, %v", resp, err)
	}
	// What another replica's GC would have done after the refs expired.
	if _, err := raw.Delete(ctx, a.idKey(id)); err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Delete(ctx, a.indexKey(ls)); err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the identity is allocated again", func() bool {
		st := stateOf(t, obs, a, web)
		return st.indexID != 0 && st.identity != nil && len(st.refs) == 1
	})
	if st := stateOf(t, obs, a, web); st.indexID != id {
		t.Fatalf("re-allocated as %d, want the old number %d", st.indexID, id)
	}
	if again, err := a.Acquire(ctx, web); err != nil || again != id {
		t.Fatalf("acquire: %d, %v; want %d", again, err, id)
	}
}

func TestExhaustion(t *testing.T) {
	e := startEtcd(t)
	ctx := testCtx(t)
	a := newAllocator(t, e, "apiserver-0", func(c *Config) {
		c.MinLocalID, c.MaxLocalID = 100, 102
		c.GCInterval, c.GCGrace = 5*time.Millisecond, time.Nanosecond
	})
	var got []uint16
	for i := range 3 {
		id, err := a.Acquire(ctx, podLabels("default", "app-"+strconv.Itoa(i)))
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, id.Local())
	}
	slices.Sort(got)
	if !slices.Equal(got, []uint16{100, 101, 102}) {
		t.Fatalf("local ids %v, want 100-102", got)
	}
	extra := podLabels("default", "extra")
	if _, err := a.Acquire(ctx, extra); !errors.Is(err, ErrNoFreeID) {
		t.Fatalf("fourth label set: %v, want ErrNoFreeID", err)
	}
	// Release one; once collected, the extra set gets its number.
	freed, _ := a.Acquire(ctx, podLabels("default", "app-1"))
	for range 2 {
		if err := a.Release(ctx, podLabels("default", "app-1")); err != nil {
			t.Fatal(err)
		}
	}
	runGC(t, a)
	eventually(t, "the released identity is collected", func() bool { return countPrefix(t, a.client, a.idKey(freed)) == 0 })
	id, err := a.Acquire(ctx, extra)
	if err != nil {
		t.Fatal(err)
	}
	if id != freed {
		t.Errorf("extra set got %d, want the freed %d", id, freed)
	}
}

// Release that cannot reach etcd still drops the reference; Run deletes
// the ref key later.
func TestReleaseRetried(t *testing.T) {
	e := startEtcd(t)
	ctx := testCtx(t)
	a := newAllocator(t, e, "apiserver-0", func(c *Config) { c.GCInterval = 10 * time.Millisecond })
	web := podLabels("default", "web")
	id, err := a.Acquire(ctx, web)
	if err != nil {
		t.Fatal(err)
	}
	dead, cancel := context.WithCancel(ctx)
	cancel()
	if err := a.Release(dead, web); err != nil {
		t.Fatalf("release: %v", err)
	}
	if countPrefix(t, a.client, a.refKey(id)) != 1 {
		t.Fatal("ref key deleted with a cancelled context?")
	}
	runGC(t, a)
	eventually(t, "the ref key is deleted by Run", func() bool { return countPrefix(t, a.client, a.refKey(id)) == 0 })
	eventually(t, "the entry is forgotten", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return len(a.entries) == 0
	})
}

// Acquire heals what someone broke by hand.
func TestRepair(t *testing.T) {
	e := startEtcd(t)
	ctx := testCtx(t)
	c := newClient(t, e)

	t.Run("identity key deleted", func(t *testing.T) {
		a := newAllocator(t, e, "apiserver-0", func(c *Config) { c.Cluster = "repair-1" })
		web := podLabels("default", "web")
		id, err := a.Acquire(ctx, web)
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Release(ctx, web); err != nil {
			t.Fatal(err)
		}
		if err := c.Delete(ctx, a.idKey(id)); err != nil {
			t.Fatal(err)
		}
		again, err := a.Acquire(ctx, web)
		if err != nil || again != id {
			t.Fatalf("acquire: %d, %v; want %d", again, err, id)
		}
		if st := stateOf(t, c, a, web); st.identity == nil || !sameLabels(st.identity.Labels, web) {
			t.Fatalf("identity key not re-created: %+v", st)
		}
	})

	t.Run("index names another label set's identity", func(t *testing.T) {
		a := newAllocator(t, e, "apiserver-0", func(c *Config) { c.Cluster = "repair-2" })
		web, db := podLabels("default", "web"), podLabels("default", "db")
		idWeb, err := a.Acquire(ctx, web)
		if err != nil {
			t.Fatal(err)
		}
		ls, _ := a.newLabelSet(db)
		if err := c.Put(ctx, a.indexKey(ls), []byte(idWeb.String())); err != nil {
			t.Fatal(err)
		}
		idDB, err := a.Acquire(ctx, db)
		if err != nil {
			t.Fatal(err)
		}
		if idDB == idWeb {
			t.Fatalf("db got web's identity %d", idWeb)
		}
		if st := stateOf(t, c, a, web); st.identity == nil || !sameLabels(st.identity.Labels, web) || !slices.Equal(st.refs, []string{"apiserver-0"}) {
			t.Fatalf("web's identity disturbed: %+v", st)
		}
	})

	t.Run("index holds garbage", func(t *testing.T) {
		a := newAllocator(t, e, "apiserver-0", func(c *Config) { c.Cluster = "repair-3" })
		web := podLabels("default", "web")
		ls, _ := a.newLabelSet(web)
		foreign := v1.MakeIdentity(testClusterID+1, 5)
		for _, bad := range []string{"not a number", foreign.String()} {
			if err := c.Put(ctx, a.indexKey(ls), []byte(bad)); err != nil {
				t.Fatal(err)
			}
			id, err := a.Acquire(ctx, web)
			if err != nil {
				t.Fatalf("index %q: %v", bad, err)
			}
			if id.ClusterID() != testClusterID {
				t.Fatalf("index %q: got %d", bad, id)
			}
			if err := a.Release(ctx, web); err != nil {
				t.Fatal(err)
			}
		}
	})
}

func TestCloseAndNil(t *testing.T) {
	var nilAlloc *Allocator
	if err := nilAlloc.Close(); err != nil {
		t.Fatal(err)
	}
	e := startEtcd(t)
	a := newAllocator(t, e, "apiserver-0", nil)
	ctx := testCtx(t)
	if _, err := a.Acquire(ctx, podLabels("default", "web")); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Run(context.Background()) }()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after Close: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after Close")
	}
	if err := a.Release(ctx, podLabels("default", "web")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Release after Close: %v, want ErrClosed", err)
	}
	// Close does not revoke: the ref outlives the allocator.
	if c := countPrefix(t, newClient(t, e), a.refsPrefix); c != 1 {
		t.Fatalf("%d ref keys after Close, want 1", c)
	}
}

// A server runs the allocator under its context and never calls Close:
// ending Run must close it, keepalive included (TestMain checks for
// leaked goroutines).
func TestRunClosesOnCancel(t *testing.T) {
	e := startEtcd(t)
	a := newAllocator(t, e, "apiserver-0", nil)
	ctx := testCtx(t)
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Run(runCtx) }()
	if _, err := a.Acquire(ctx, podLabels("default", "web")); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if _, err := a.Acquire(ctx, podLabels("default", "db")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Acquire after Run ended: %v, want ErrClosed", err)
	}
	if leaked := waitNoLeaks(10 * time.Second); leaked != "" {
		t.Fatalf("allocator goroutines still running:\n%s", leaked)
	}
}

func TestCanonicalLabels(t *testing.T) {
	got := canonicalLabels(map[string]string{"k8s:b": "2", "k8s:a": "1", "reserved:host": ""})
	if want := "k8s:a=1;k8s:b=2;reserved:host="; got != want {
		t.Fatalf("canonicalLabels = %q, want %q", got, want)
	}
}

func TestIDViewPick(t *testing.T) {
	v := &idView{min: 1, max: 65535}
	v.replace(nil)
	// Fill 1..200 except 150; a probe from 10 wraps over full words.
	var used []uint16
	for l := uint16(1); l <= 200; l++ {
		if l != 150 {
			used = append(used, l)
		}
	}
	v.replace(used)
	if l, ok := v.pick(9, 0); !ok || l != 150 {
		t.Fatalf("pick from 10 = %d, %v; want 150", l, ok)
	}
	if l, ok := v.pick(9, 0); !ok || l != 201 {
		t.Fatalf("next pick = %d, %v; want 201", l, ok)
	}
	// prefer wins, even when the view thinks it taken; out of range it
	// is ignored.
	for range 2 {
		if l, _ := v.pick(0, 150); l != 150 {
			t.Fatalf("prefer 150: got %d", l)
		}
	}
	w0 := &idView{min: 10, max: 20}
	if l, _ := w0.pick(0, 5); l != 10 {
		t.Fatalf("prefer 5 outside 10-20: got %d, want 10", l)
	}
	// A range ending inside a word wraps at its end.
	w := &idView{min: 60, max: 70}
	w.replace([]uint16{60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70})
	if l, ok := w.pick(5, 0); ok {
		t.Fatalf("full range picked %d", l)
	}
	w.replace([]uint16{60, 62, 63, 64, 65, 66, 67, 68, 69, 70})
	if l, ok := w.pick(3, 0); !ok || l != 61 {
		t.Fatalf("pick = %d, %v; want 61", l, ok)
	}
	// Full words across the whole space still terminate.
	full := &idView{min: 1, max: 65535}
	all := make([]uint16, 0, 65535)
	for l := 1; l <= 65535; l++ {
		all = append(all, uint16(l))
	}
	full.replace(all)
	if l, ok := full.pick(12345, 0); ok {
		t.Fatalf("full space picked %d", l)
	}
}

// Sanity: identities from another cluster in the same etcd are left alone.
func TestClustersIsolated(t *testing.T) {
	e := startEtcd(t)
	ctx := testCtx(t)
	a := newAllocator(t, e, "apiserver-0", func(c *Config) { c.GCInterval, c.GCGrace = 5*time.Millisecond, time.Nanosecond })
	other := newAllocator(t, e, "apiserver-0", func(c *Config) { c.Cluster, c.ClusterID = "cluster-b", 8 })
	idOther, err := other.Acquire(ctx, podLabels("default", "web"))
	if err != nil {
		t.Fatal(err)
	}
	if err := other.Release(ctx, podLabels("default", "web")); err != nil {
		t.Fatal(err)
	}
	runGC(t, a)
	passes := a.Stats().GCPasses
	eventually(t, "10 GC passes", func() bool { return a.Stats().GCPasses >= passes+10 })
	if countPrefix(t, a.client, other.idKey(idOther)) != 1 {
		t.Fatal("cluster-a's GC deleted cluster-b's identity")
	}
	id, err := a.Acquire(ctx, podLabels("default", "web"))
	if err != nil {
		t.Fatal(err)
	}
	if id.ClusterID() != testClusterID || id == idOther {
		t.Fatalf("cluster-a got %d", id)
	}
}
