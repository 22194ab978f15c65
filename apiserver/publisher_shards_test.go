package apiserver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/kvstore"
)

var testCluster = v1.ClusterConfig{Name: "c1", ID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")},
	Capabilities: v1.Capabilities{SyncedCanaries: true, MaxConnectedClusters: 255, BackendShards: true}}

// testEtcd is an embedded etcd with a kvstore client for publishers and a
// raw client to look at what they wrote.
type testEtcd struct {
	client *kvstore.Client
	raw    *clientv3.Client
}

func startTestEtcd(t *testing.T) *testEtcd {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	client, err := kvstore.NewClient(kvstore.Config{Endpoints: e.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	raw, err := clientv3.New(clientv3.Config{Endpoints: e.Endpoints(), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	return &testEtcd{client: client, raw: raw}
}

// runPublisher runs a registry-style publisher (no leases) until the
// returned stop is called or the test ends.
func runPublisher(t *testing.T, e *testEtcd) (*Publisher, func()) {
	t.Helper()
	p, err := NewPublisher(e.client, testCluster, false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); p.Run(ctx) }()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	return p, stop
}

// syncServices tells p its services are complete and waits for the
// services and backends stores to write their canaries: every desired
// key is written and the leftovers of an earlier run are gone.
func syncServices(t *testing.T, p *Publisher) {
	t.Helper()
	p.Synced(v1.KindServices)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, k := range []v1.Kind{v1.KindServices, v1.KindBackends} {
		if err := p.stores[k].WaitSynced(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// waitPublished waits until etcd holds the service with exactly want's
// backends (none and no keys when want is nil), and returns what it holds.
func waitPublished(t *testing.T, e *testEtcd, namespace, name string, want []v1.Backend) published {
	t.Helper()
	var got published
	testutil.EventuallyNoError(t, 30*time.Second, "service "+namespace+"/"+name+" published", func() error {
		got = readService(t, e, namespace, name)
		if want == nil {
			if len(got.revs) != 0 {
				return fmt.Errorf("%d keys left", len(got.revs))
			}
			return nil
		}
		b, err := got.assemble()
		if err != nil {
			return err
		}
		return diffBackends(b, want)
	})
	return got
}

// published is what etcd holds for one service: the service value, its
// shards by index, and every key's mod revision.
type published struct {
	head   v1.Service
	shards map[int]v1.BackendShard
	revs   map[string]int64
}

func readService(t *testing.T, e *testEtcd, namespace, name string) published {
	t.Helper()
	ctx := context.Background()
	out := published{shards: map[int]v1.BackendShard{}, revs: map[string]int64{}}
	key := v1.ServiceKey(testCluster.Name, namespace, name)
	resp, err := e.raw.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 1 {
		if out.head, err = v1.DecodeServiceEntry(key, resp.Kvs[0].Value); err != nil {
			t.Fatal(err)
		}
		out.revs[key] = resp.Kvs[0].ModRevision
	}
	resp, err = e.raw.Get(ctx, v1.BackendShardPrefix(testCluster.Name, namespace, name), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		sh, err := v1.DecodeBackendShardEntry(string(kv.Key), kv.Value)
		if err != nil {
			t.Fatal(err)
		}
		out.shards[sh.Shard] = sh
		out.revs[string(kv.Key)] = kv.ModRevision
	}
	return out
}

// assemble puts the published service's backends together as a reader
// does; it fails while the shards do not match the generations the
// service lists, or a service with its backends in its value has shards.
func (p published) assemble() ([]v1.Backend, error) {
	if len(p.head.BackendShards) == 0 {
		if len(p.shards) != 0 {
			return nil, fmt.Errorf("service with its backends in its value, and %d shards in etcd", len(p.shards))
		}
		return p.head.Backends, nil
	}
	if len(p.shards) != len(p.head.BackendShards) {
		return nil, fmt.Errorf("service lists %d shards, etcd holds %d", len(p.head.BackendShards), len(p.shards))
	}
	var out []v1.Backend
	for i, gen := range p.head.BackendShards {
		sh, ok := p.shards[i]
		if !ok || sh.Gen != gen {
			return nil, fmt.Errorf("shard %d: present %v, gen %d, service lists %d", i, ok, sh.Gen, gen)
		}
		out = append(out, sh.Backends...)
	}
	return out, nil
}

// diffBackends says how got and want differ as sets, nil when they do
// not.
func diffBackends(got, want []v1.Backend) error {
	key := func(b v1.Backend) string { return fmt.Sprintf("%s/%s/%s", b.IP, b.State, b.Node) }
	g, w := make([]string, len(got)), make([]string, len(want))
	for i, b := range got {
		g[i] = key(b)
	}
	for i, b := range want {
		w[i] = key(b)
	}
	slices.Sort(g)
	slices.Sort(w)
	if !slices.Equal(g, w) {
		return fmt.Errorf("published %d backends, want %d (first difference near %v)", len(got), len(want), firstDiff(g, w))
	}
	return nil
}

func firstDiff(a, b []string) string {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return a[i] + " vs " + b[i]
		}
	}
	return "the end"
}

// A service larger than one value publishes in full, in shards; shrinking
// it brings it back to one value and deletes the shards; deleting it
// deletes everything.
func TestPublisherShardsLargeService(t *testing.T) {
	e := startTestEtcd(t)
	p, _ := runPublisher(t, e)
	svc := bigService(0, 3000)
	if err := p.UpsertService(svc); err != nil {
		t.Fatal(err)
	}
	syncServices(t, p)
	if got := waitPublished(t, e, "default", "big", svc.Backends); len(got.head.BackendShards) < 3 {
		t.Fatalf("3000 backends in %d shards", len(got.head.BackendShards))
	}

	svc.Backends = svc.Backends[:100]
	if err := p.UpsertService(svc); err != nil {
		t.Fatal(err)
	}
	if got := waitPublished(t, e, "default", "big", svc.Backends); len(got.head.Backends) != 100 {
		t.Fatalf("100 backends: the service value holds %d", len(got.head.Backends))
	}

	svc = bigService(0, 2000)
	if err := p.UpsertService(svc); err != nil {
		t.Fatal(err)
	}
	waitPublished(t, e, "default", "big", svc.Backends)
	if err := p.DeleteService("default", "big"); err != nil {
		t.Fatal(err)
	}
	waitPublished(t, e, "default", "big", nil)
}

// A restarted writer that publishes the same service writes nothing and
// deletes nothing: it adopts the shards the earlier run left. A change
// after that rewrites only the shard it touches, and a smaller service
// sheds its trailing shards.
func TestPublisherRestartKeepsShards(t *testing.T) {
	e := startTestEtcd(t)
	p1, stop1 := runPublisher(t, e)
	svc := bigService(0, 4000)
	// Some churn first, so the layout is not what a fresh packing of the
	// final list would give.
	if err := p1.UpsertService(bigService(2000, 4000)); err != nil {
		t.Fatal(err)
	}
	if err := p1.UpsertService(svc); err != nil {
		t.Fatal(err)
	}
	syncServices(t, p1)
	before := waitPublished(t, e, "default", "big", svc.Backends)
	stop1()

	p2, _ := runPublisher(t, e)
	if err := p2.UpsertService(svc); err != nil {
		t.Fatal(err)
	}
	// Synced: every key the new run wants is written and every other one
	// deleted.
	syncServices(t, p2)
	after := readService(t, e, "default", "big")
	if len(after.revs) != len(before.revs) {
		t.Fatalf("after the restart etcd holds %d keys of the service, before %d", len(after.revs), len(before.revs))
	}
	for k, rev := range before.revs {
		if after.revs[k] != rev {
			t.Errorf("%s rewritten by the restarted writer (revision %d, was %d)", k, after.revs[k], rev)
		}
	}

	// One backend gone: one shard is rewritten; the service value is not,
	// as no generation changed.
	gone := svc.Backends[1234]
	svc.Backends = slices.Delete(svc.Backends, 1234, 1235)
	if err := p2.UpsertService(svc); err != nil {
		t.Fatal(err)
	}
	changed := waitPublished(t, e, "default", "big", svc.Backends)
	var rewritten []string
	for k, rev := range changed.revs {
		if rev != after.revs[k] {
			rewritten = append(rewritten, k)
		}
	}
	if len(rewritten) != 1 || !strings.HasPrefix(rewritten[0], v1.BackendShardPrefix("c1", "default", "big")) {
		t.Fatalf("removing backend %s rewrote %v, want one shard", gone.IP, rewritten)
	}

	// Fewer backends: the last shards go.
	svc.Backends = svc.Backends[:1500]
	if err := p2.UpsertService(svc); err != nil {
		t.Fatal(err)
	}
	if small := waitPublished(t, e, "default", "big", svc.Backends); len(small.shards) >= len(changed.shards) {
		t.Fatalf("1500 backends in %d shards, 3999 were in %d", len(small.shards), len(changed.shards))
	}
}

// A service that cannot be published is refused with an error that names
// it and the limit, and nothing of it is written.
func TestPublisherRefusesWhatCannotBePublished(t *testing.T) {
	e := startTestEtcd(t)
	p, _ := runPublisher(t, e)
	big := bigService(0, 10)
	big.Name = "too-big"
	big.Ports = nil
	for i := range 900 {
		big.Ports = append(big.Ports, v1.ServicePort{Name: fmt.Sprintf("p-%03d-%s", i, strings.Repeat("p", 56)), Protocol: v1.ProtocolTCP, Port: uint16(2000 + i)})
	}
	err := p.UpsertService(big)
	if !errors.Is(err, v1.ErrTooLarge) || !strings.Contains(err.Error(), "service default/too-big") {
		t.Fatalf("a service whose ports alone pass the value limit: %v, want ErrTooLarge naming it", err)
	}
	shardsSet := bigService(0, 10)
	shardsSet.BackendShards = []uint64{1}
	shardsSet.Backends = nil
	if err := p.UpsertService(shardsSet); !errors.Is(err, v1.ErrInvalid) {
		t.Fatalf("a source setting backendShards: %v, want ErrInvalid", err)
	}
	outside := bigService(0, 10)
	outside.Backends[3].IP = netip.MustParseAddr("10.2.0.1")
	if err := p.UpsertService(outside); err == nil || !strings.Contains(err.Error(), "10.2.0.1 is outside the cluster's pod CIDRs") {
		t.Fatalf("a backend outside the pod CIDRs: %v", err)
	}
	if err := p.UpsertService(bigService(0, 1500)); err != nil {
		t.Fatal(err)
	}
	syncServices(t, p)
	waitPublished(t, e, "default", "big", bigService(0, 1500).Backends)
	if got := readService(t, e, "default", "too-big"); len(got.revs) != 0 {
		t.Fatalf("a refused service left %d keys", len(got.revs))
	}
}
