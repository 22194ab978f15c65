package identity

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

const (
	testCluster   = "cluster-a"
	testClusterID = v1.ClusterID(7)
)

// TestMain fails the run when an Allocator goroutine outlives the tests:
// every one must stop at Close.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if leaked := waitNoLeaks(10 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "leaked allocator goroutines:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

func waitNoLeaks(timeout time.Duration) string {
	deadline := time.Now().Add(timeout)
	for {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		for g := range strings.SplitSeq(string(buf), "\n\n") {
			if strings.Contains(g, "apiserver/identity.(*Allocator)") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 {
			return ""
		}
		if time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startEtcd runs an embedded etcd for one test and stops it at cleanup.
func startEtcd(t testing.TB) *kvstore.Embedded {
	t.Helper()
	return startEtcdWith(t, kvstore.EmbeddedConfig{Dir: t.TempDir()})
}

func startEtcdWith(t testing.TB, cfg kvstore.EmbeddedConfig) *kvstore.Embedded {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := kvstore.StartEmbedded(ctx, cfg)
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

func newClient(t testing.TB, e *kvstore.Embedded) *kvstore.Client {
	t.Helper()
	c, err := kvstore.NewClient(kvstore.Config{Endpoints: e.Endpoints(), QPS: -1, DialTimeout: 2 * time.Second, RequestTimeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("new client: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

// newAllocator builds an allocator with its own client on e, closed at
// cleanup. mod adjusts the config.
func newAllocator(t testing.TB, e *kvstore.Embedded, replica string, mod func(*Config)) *Allocator {
	t.Helper()
	cfg := Config{
		Client:         newClient(t, e),
		Cluster:        testCluster,
		ClusterID:      testClusterID,
		Replica:        replica,
		RequestTimeout: 10 * time.Second,
		Logger:         testLogger(t),
	}
	if mod != nil {
		mod(&cfg)
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatalf("new allocator: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

// runGC runs a.Run until cleanup.
func runGC(t testing.TB, a *Allocator) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := a.Run(ctx); err != nil {
			t.Errorf("run: %v", err)
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func podLabels(ns, app string) map[string]string {
	return map[string]string{
		"k8s:app":                         app,
		"k8s:io.kubernetes.pod.namespace": ns,
	}
}

// etcdState is what etcd holds for one label set.
type etcdState struct {
	indexID  v1.NumericIdentity // 0: no index key
	identity *v1.Identity       // nil: no identity key (for indexID)
	refs     []string           // replicas with a ref key on indexID
}

// stateOf reads the index, identity and ref keys of labels at one
// revision.
func stateOf(t testing.TB, c *kvstore.Client, a *Allocator, labels map[string]string) etcdState {
	t.Helper()
	ctx := testCtx(t)
	ls, err := a.newLabelSet(labels)
	if err != nil {
		t.Fatal(err)
	}
	idx, rev, err := c.Get(ctx, a.indexKey(ls))
	if err != nil {
		t.Fatal(err)
	}
	var st etcdState
	if idx == nil {
		return st
	}
	id, err := a.parseID(string(idx.Value))
	if err != nil {
		t.Fatalf("index %s: %v", a.indexKey(ls), err)
	}
	st.indexID = id
	at := kvstore.ListOptions{Revision: rev}
	if _, err := c.List(ctx, a.idPrefix, at, func(kv kvstore.KeyValue) {
		if kv.Key != a.idKey(id) {
			return
		}
		got, err := v1.DecodeIdentityEntry(kv.Key, kv.Value)
		if err != nil {
			t.Fatalf("identity key: %v", err)
		}
		st.identity = &got
	}); err != nil {
		t.Fatal(err)
	}
	refs := a.refsPrefix + id.String() + "/"
	if _, err := c.List(ctx, refs, at, func(kv kvstore.KeyValue) {
		st.refs = append(st.refs, strings.TrimPrefix(kv.Key, refs))
	}); err != nil {
		t.Fatal(err)
	}
	return st
}

// countPrefix counts keys under prefix.
func countPrefix(t testing.TB, c *kvstore.Client, prefix string) int64 {
	t.Helper()
	var n int64
	if _, err := c.List(testCtx(t), prefix, kvstore.ListOptions{KeysOnly: true}, func(kvstore.KeyValue) { n++ }); err != nil {
		t.Fatal(err)
	}
	return n
}

// rawEtcd is a bare etcd client, for what the allocator must never do
// itself: look at a key's lease, revoke a lease behind its back.
func rawEtcd(t testing.TB, e *kvstore.Embedded) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: e.Endpoints(), DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatalf("raw etcd client: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func sameLabels(a, b map[string]string) bool {
	return canonicalLabels(a) == canonicalLabels(b)
}
