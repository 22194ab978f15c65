package kvstore

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/testutil"
)

// startEtcd runs an embedded etcd for one test and stops it at cleanup.
func startEtcd(t testing.TB) *Embedded {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := StartEmbedded(ctx, EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// restartEtcd stops e and starts the same member again on the same
// addresses and data.
func restartEtcd(t testing.TB, e *Embedded) *Embedded {
	t.Helper()
	cfg := e.Effective()
	e.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e2, err := StartEmbedded(ctx, cfg)
	if err != nil {
		t.Fatalf("restart etcd: %v", err)
	}
	t.Cleanup(func() { e2.Close() })
	return e2
}

func newTestClient(t testing.TB, endpoints []string, mod func(*Config)) *Client {
	t.Helper()
	cfg := Config{Endpoints: endpoints, QPS: -1, DialTimeout: 2 * time.Second, RequestTimeout: 5 * time.Second}
	if mod != nil {
		mod(&cfg)
	}
	c, err := NewClient(cfg)
	if err != nil {
		t.Fatalf("new client: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// run starts fn in a goroutine stopped at cleanup.
func run(t testing.TB, fn func(ctx context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := fn(ctx); err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("run: %v", err)
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// decodeString accepts any value not starting with "bad".
func decodeString(key string, value []byte) (string, error) {
	if strings.HasPrefix(string(value), "bad") {
		return "", errors.New("malformed")
	}
	return string(value), nil
}

// recorder is an Observer that keeps every event in order.
type recorder struct {
	mu     sync.Mutex
	events []string // "+key=value", "-key", "sync"
	state  map[string]string
	// atSync is a copy of state when OnSync was called.
	atSync map[string]string
}

func newRecorder() *recorder { return &recorder{state: make(map[string]string)} }

func (r *recorder) OnUpsert(key, value string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, "+"+key+"="+value)
	r.state[key] = value
}

func (r *recorder) OnDelete(key, _ string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, "-"+key)
	delete(r.state, key)
}

func (r *recorder) OnSync() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, "sync")
	r.atSync = make(map[string]string, len(r.state))
	for k, v := range r.state {
		r.atSync[k] = v
	}
}

// take returns and clears the recorded events.
func (r *recorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	ev := r.events
	r.events = nil
	return ev
}

func (r *recorder) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.state)
}

// newProxy puts a cuttable TCP proxy in front of an etcd endpoint.
func newProxy(t testing.TB, target string) *proxy { return &proxy{testutil.NewProxy(t, target)} }

type proxy struct{ *testutil.Proxy }

func (p *proxy) endpoint() string { return "http://" + p.Addr() }
func (p *proxy) cut()             { p.Cut() }
func (p *proxy) restore()         { p.Restore() }
