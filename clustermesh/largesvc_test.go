package clustermesh

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/kvstore"
)

// pubCluster is a cluster whose keys the real Publisher writes into an
// embedded etcd (no TLS, no API server around it), read by a Mesh through
// a pinned cluster file.
type pubCluster struct {
	cfg    v1.ClusterConfig
	url    string
	client *kvstore.Client
	raw    *clientv3.Client
	pub    *apiserver.Publisher
	stop   func()
}

func startPubCluster(t *testing.T, name string, id v1.ClusterID, cidr string) *pubCluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	c := &pubCluster{url: e.Endpoints()[0], cfg: v1.ClusterConfig{Name: name, ID: id, PodCIDRs: []netip.Prefix{netip.MustParsePrefix(cidr)},
		Capabilities: v1.Capabilities{SyncedCanaries: true, MaxConnectedClusters: 255, BackendShards: true}}}
	if c.client, err = kvstore.NewClient(kvstore.Config{Endpoints: e.Endpoints()}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.client.Close() })
	if c.raw, err = clientv3.New(clientv3.Config{Endpoints: e.Endpoints(), Logger: zap.NewNop()}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.raw.Close() })
	data, err := v1.Encode(c.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.raw.Put(ctx, v1.ClusterConfigKey(name), string(data)); err != nil {
		t.Fatal(err)
	}
	c.startPublisher(t)
	return c
}

// startPublisher starts a new Publisher (a new run of the writer) whose
// nodes, endpoints and identities are complete; services are complete
// once syncServices is called.
func (c *pubCluster) startPublisher(t *testing.T) {
	t.Helper()
	p, err := apiserver.NewPublisher(c.client, c.cfg, false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); p.Run(ctx) }()
	c.pub, c.stop = p, func() { cancel(); <-done }
	t.Cleanup(c.stop)
	for _, k := range []v1.Kind{v1.KindNodes, v1.KindEndpoints, v1.KindIdentities} {
		p.Synced(k)
	}
}

func (c *pubCluster) syncServices(t *testing.T) {
	t.Helper()
	c.pub.Synced(v1.KindServices)
	testutil.Eventually(t, 30*time.Second, c.cfg.Name+" publisher synced", c.pub.AllSynced)
}

func (c *pubCluster) file() ClusterFile {
	return ClusterFile{Name: c.cfg.Name, ID: c.cfg.ID, PodCIDRs: c.cfg.PodCIDRs, Endpoints: []string{c.url}}
}

// bigService is cluster's global service default/big with backends
// 10.<id>.x.y for each of ids, each on a node with a name of nodeLen
// characters.
func bigService(c *pubCluster, ids []int, nodeLen int) v1.Service {
	svc := v1.Service{Cluster: c.cfg.Name, Namespace: "default", Name: "big", Global: true, Shared: true,
		Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}}}
	for _, i := range ids {
		svc.Backends = append(svc.Backends, v1.Backend{IP: bigIP(c, i), State: v1.BackendActive, Node: nodeName(i, nodeLen)})
	}
	return svc
}

func bigIP(c *pubCluster, i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(c.cfg.ID), byte(i >> 8), byte(i)})
}

func nodeName(i, n int) string {
	s := fmt.Sprintf("node-%05d-", i%1000)
	return s + strings.Repeat("x", max(1, n-len(s)))
}

// lossWatch follows every snapshot the mesh publishes for default/big
// and records the first one that lacks a backend of the stable set.
type lossWatch struct {
	mu      sync.Mutex
	stable  map[netip.Addr]bool
	phase   string
	err     error
	checked int
}

func watchLoss(t *testing.T, m *Mesh, cluster string) *lossWatch {
	w := &lossWatch{}
	ch, unsub := m.Subscribe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case <-ch:
			}
			got := map[netip.Addr]bool{}
			if s := m.Snapshot().Services[ServiceName{"default", "big"}]; s != nil {
				for _, b := range s.Backends {
					if b.Cluster == cluster {
						got[b.IP] = true
					}
				}
			}
			w.mu.Lock()
			w.checked++
			for ip := range w.stable {
				if !got[ip] && w.err == nil {
					w.err = fmt.Errorf("%s: a snapshot lacks backend %s (it holds %d of %s's backends)", w.phase, ip, len(got), cluster)
				}
			}
			w.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); <-done; unsub() })
	return w
}

// expect sets the backends every snapshot must hold from now on.
func (w *lossWatch) expect(phase string, ips []netip.Addr) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.phase = phase
	w.stable = map[netip.Addr]bool{}
	for _, ip := range ips {
		w.stable[ip] = true
	}
}

func (w *lossWatch) check(t *testing.T) {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		t.Fatal(w.err)
	}
}

func ipsOf(svc v1.Service) []netip.Addr {
	out := make([]netip.Addr, len(svc.Backends))
	for i, b := range svc.Backends {
		out[i] = b.IP
	}
	return out
}

// waitMerged waits until the merged default/big holds exactly svc's
// backends from svc's cluster.
func waitMerged(t *testing.T, m *Mesh, svc v1.Service) {
	t.Helper()
	testutil.EventuallyNoError(t, 60*time.Second, fmt.Sprintf("%d backends of %s merged", len(svc.Backends), svc.Cluster), func() error {
		s := m.Snapshot().Services[ServiceName{"default", "big"}]
		if s == nil {
			return fmt.Errorf("no merged service")
		}
		got := map[netip.Addr]bool{}
		for _, b := range s.Backends {
			if b.Cluster == svc.Cluster {
				got[b.IP] = true
			}
		}
		if len(got) != len(svc.Backends) {
			return fmt.Errorf("%d backends merged", len(got))
		}
		for _, b := range svc.Backends {
			if !got[b.IP] {
				return fmt.Errorf("backend %s not merged", b.IP)
			}
		}
		return nil
	})
}

// A service of far more backends than one value holds, published by the
// real Publisher, arrives whole at a remote reader; shrinking it (shards
// compacted into fewer), growing its backends in place (shards overflow
// and split), adding backends (new shards), going back to one value and
// out to shards again: no snapshot in between lacks a backend that stays.
// A restarted writer deletes none of the shards, and nothing it writes
// takes a backend away.
func TestMeshLargeServiceThroughPublisher(t *testing.T) {
	eu := startPubCluster(t, "eu", 1, "10.1.0.0/16")
	us := startPubCluster(t, "us", 2, "10.2.0.0/16")
	eu.syncServices(t)
	svc := bigService(us, ints(0, 6000), 40)
	if err := us.pub.UpsertService(svc); err != nil {
		t.Fatal(err)
	}
	us.syncServices(t)
	if n := shardCount(t, us); n < 5 {
		t.Fatalf("6000 backends in %d shards", n)
	}

	dir := t.TempDir()
	for _, f := range []ClusterFile{eu.file(), us.file()} {
		if err := WriteClusterFile(dir, f); err != nil {
			t.Fatal(err)
		}
	}
	m := startMesh(t, "eu", dir)
	waitMerged(t, m, svc)
	w := watchLoss(t, m, "us")

	steps := []struct {
		name string
		next v1.Service
	}{
		{"compaction: 9 in 10 backends removed", bigService(us, every(10, ints(0, 6000)), 40)},
		{"overflow: node names grow to 200 characters", bigService(us, every(10, ints(0, 6000)), 200)},
		{"growth: 4000 backends added", bigService(us, append(every(10, ints(0, 6000)), ints(20000, 24000)...), 200)},
		{"back to one value: 50 backends", bigService(us, ints(20000, 20050), 40)},
		{"out to shards again: 5000 backends", bigService(us, ints(20000, 25000), 40)},
	}
	for _, s := range steps {
		w.expect(s.name, intersect(ipsOf(svc), ipsOf(s.next)))
		if err := us.pub.UpsertService(s.next); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		waitMerged(t, m, s.next)
		w.check(t)
		svc = s.next
	}

	// A restart of the writer: a watch on the shards sees no delete, and
	// every snapshot keeps every backend.
	w.expect("writer restart", ipsOf(svc))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := us.raw.Get(ctx, v1.Prefix, clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	events := us.raw.Watch(ctx, v1.KindPrefix(v1.KindBackends, "us"), clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	us.stop()
	us.startPublisher(t)
	if err := us.pub.UpsertService(svc); err != nil {
		t.Fatal(err)
	}
	us.syncServices(t)
	marker := bigService(us, ints(20000, 25001), 40)
	if err := us.pub.UpsertService(marker); err != nil {
		t.Fatal(err)
	}
	// The shard that takes the new backend is written after everything
	// the restart wrote (the SyncStore was synced before).
	markerIP, sawMarker := bigIP(us, 25000), false
	for resp := range events {
		for _, ev := range resp.Events {
			if ev.Type == clientv3.EventTypeDelete {
				t.Errorf("the restarted writer deleted %s", ev.Kv.Key)
			}
			if strings.Contains(string(ev.Kv.Value), `"`+markerIP.String()+`"`) {
				sawMarker = true
				cancel()
			}
		}
	}
	if !sawMarker {
		t.Fatal("the shard with the new backend was not written within a minute")
	}
	waitMerged(t, m, marker)
	w.check(t)
	w.mu.Lock()
	t.Logf("%d snapshots checked", w.checked)
	w.mu.Unlock()
}

// storesOf is the current session's stores of cluster.
func storesOf(m *Mesh, cluster string) *storeSet {
	m.mu.Lock()
	r := m.remotes[cluster]
	m.mu.Unlock()
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stores
}

func shardCount(t *testing.T, c *pubCluster) int {
	t.Helper()
	resp, err := c.raw.Get(context.Background(), v1.KindPrefix(v1.KindBackends, c.cfg.Name), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return int(resp.Count)
}

func every(n int, s []int) []int {
	var out []int
	for i, v := range s {
		if i%n == 0 {
			out = append(out, v)
		}
	}
	return out
}

func intersect(a, b []netip.Addr) []netip.Addr {
	in := map[netip.Addr]bool{}
	for _, x := range a {
		in[x] = true
	}
	var out []netip.Addr
	for _, x := range b {
		if in[x] {
			out = append(out, x)
		}
	}
	return out
}

// Written straight into etcd, a move's keys arrive in the worst order for
// a reader, each observed by the reader before the next is written: the
// shard the backend left, then the service value, then the shard it
// reached. The backend is merged at every step. A shard with a backend
// outside the cluster's pinned pod CIDRs is rejected and counted, and its
// last good value stays.
func TestMeshShardMoveWorstOrder(t *testing.T) {
	eu := startRawCluster(t, "eu")
	eu.publish(t, 1, "10.1.0.0/16")
	us := startRawCluster(t, "us")
	cfg := v1.ClusterConfig{Name: "us", ID: 2, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16")},
		Capabilities: v1.Capabilities{SyncedCanaries: true, MaxConnectedClusters: 255, BackendShards: true}}
	us.put(t, v1.ClusterConfigKey("us"), cfg)
	svcKey := v1.ServiceKey("us", "default", "big")
	shardKey := func(i int) string { return v1.BackendShardKey("us", "default", "big", i) }
	us.put(t, svcKey, shardedSvc(1, 1))
	us.put(t, shardKey(0), shardOf(0, 1, ints(0, 10)...))
	us.put(t, shardKey(1), shardOf(1, 1, ints(10, 20)...))
	for _, k := range v1.SyncedKinds() {
		us.put(t, v1.SyncedKey("us", k), string(v1.EncodeTimestamp(time.Now())))
	}
	dir := t.TempDir()
	for _, f := range []ClusterFile{eu.pinnedFile(1, "10.1.0.0/16"), us.pinnedFile(2, "10.2.0.0/16")} {
		if err := WriteClusterFile(dir, f); err != nil {
			t.Fatal(err)
		}
	}
	m := startMesh(t, "eu", dir)
	all := v1.Service{Cluster: "us"}
	for _, i := range ints(0, 20) {
		all.Backends = append(all.Backends, usBackend(i))
	}
	waitMerged(t, m, all)

	// step writes key, waits until the mesh has folded it into a new
	// snapshot, and checks every backend is still merged.
	step := func(what, key string, v any) {
		t.Helper()
		v0 := m.Snapshot().Version
		us.put(t, key, v)
		testutil.Eventually(t, 30*time.Second, what+" seen", func() bool {
			// Nothing else changes: a new snapshot after the store holds
			// the key is the one that folded it in.
			stores := storesOf(m, "us")
			if stores == nil || m.Snapshot().Version == v0 {
				return false
			}
			if strings.HasPrefix(key, v1.KindPrefix(v1.KindBackends, "us")) {
				sh, ok := stores.backends.Get(key)
				return ok && sh.Gen == v.(v1.BackendShard).Gen
			}
			s, ok := stores.services.Get(key)
			return ok && slices.Equal(s.BackendShards, v.(v1.Service).BackendShards)
		})
		if got := usBackends(m.state); len(got) != 20 {
			t.Fatalf("after %s: %d backends merged, want 20", what, len(got))
		}
	}
	// Backend 15 moves from shard 1 to shard 0.
	step("shard 1 without 15", shardKey(1), shardOf(1, 2, 10, 11, 12, 13, 14, 16, 17, 18, 19))
	step("service value of the new generations", svcKey, shardedSvc(2, 2))
	step("shard 0 with 15", shardKey(0), shardOf(0, 2, append(ints(0, 10), 15)...))
	waitMerged(t, m, all)

	// A shard naming a backend of another cluster's range: rejected,
	// counted, and the shard keeps its last good value.
	before := clusterStatus(m, "us").Rejected[ReasonOutsidePodCIDRs]
	hijack := shardOf(0, 2, append(ints(0, 10), 15)...)
	hijack.Backends = append(hijack.Backends, v1.Backend{IP: netip.MustParseAddr("10.1.0.99"), State: v1.BackendActive})
	us.put(t, shardKey(0), hijack)
	testutil.Eventually(t, 30*time.Second, "hijacking shard rejected", func() bool {
		return clusterStatus(m, "us").Rejected[ReasonOutsidePodCIDRs] == before+1
	})
	waitMerged(t, m, all)
	for ip := range usBackends(m.state) {
		if !cfg.Contains(ip) {
			t.Fatalf("merged backend %s outside us's pod CIDRs", ip)
		}
	}
}
