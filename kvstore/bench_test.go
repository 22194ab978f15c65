package kvstore_test

// Benchmarks, each beside its floor in the same run:
//
//   - BenchmarkColdSync: a WatchStore syncing 100k endpoints (~220 B of JSON
//     each) against a raw clientv3 Get of the whole prefix + JSON decode into
//     a map, alternating in every iteration; wall time, client CPU, bytes
//     allocated and heap held after GC.
//   - BenchmarkPropagation: SyncStore.Upsert → WatchStore event latency at
//     1000 updates/s beside raw Put → raw Watch at the same rate, running
//     at the same time.
//
// etcd runs in a child process (this test binary re-executed) so that the
// CPU and heap figures are the client's alone.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/internal/etcdchild"
	"github.com/trellis-mesh/trellis/kvstore"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

func TestMain(m *testing.M) {
	etcdchild.ServeIfChild()
	os.Exit(m.Run())
}

// startEtcdProcess runs etcd in a child process for the benchmark.
func startEtcdProcess(b *testing.B) string { return etcdchild.Start(b, 1)[0] }

func benchClient(b *testing.B, endpoint string) *kvstore.Client {
	b.Helper()
	c, err := kvstore.NewClient(kvstore.Config{Endpoints: []string{endpoint}, QPS: -1})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// rawClient is a bare clientv3 connection: the floor the stores are
// measured against, on a connection of its own like theirs.
func rawClient(b *testing.B, endpoint string) *clientv3.Client {
	b.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, Logger: zap.NewNop()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// sampleEndpoint is realistic data: its JSON is about 220 bytes.
func sampleEndpoint(cluster string, i int) v1.Endpoint {
	return v1.Endpoint{
		Cluster:   cluster,
		IP:        netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}),
		Identity:  v1.MakeIdentity(7, uint16(i%4000+1)),
		NodeIP:    netip.AddrFrom4([4]byte{192, 168, byte(i / 110 >> 8), byte(i / 110)}),
		Namespace: "payments-production",
		Pod:       fmt.Sprintf("checkout-api-7d9f8b6c5d-%05d-%s", i, strings.Repeat("x", 40)),
		Ready:     true,
	}
}

const benchCluster = "cluster-seven"

// loadEndpoints writes n endpoints with raw transactions.
func loadEndpoints(b *testing.B, cli *clientv3.Client, n int) int {
	b.Helper()
	var size int
	ctx := context.Background()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for start := 0; start < n; start += 128 {
		ops := make([]clientv3.Op, 0, 128)
		for i := start; i < min(start+128, n); i++ {
			ep := sampleEndpoint(benchCluster, i)
			data, err := v1.Encode(ep)
			if err != nil {
				b.Fatal(err)
			}
			size += len(data)
			ops = append(ops, clientv3.OpPut(v1.EndpointKey(benchCluster, ep.IP), string(data)))
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
				b.Error(err)
			}
		}()
	}
	wg.Wait()
	return size / n
}

// cpuTime is this process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

type syncCost struct {
	wall, cpu   time.Duration
	allocBytes  uint64
	heapHeld    uint64
	entries     int
	keepForHeap any
}

// measure runs one sync and reports its cost; the returned value is kept
// alive until the heap is measured.
func measure(fn func() (any, int)) syncCost {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&before)
	cpu0, t0 := cpuTime(), time.Now()
	result, n := fn()
	wall, cpu := time.Since(t0), cpuTime()-cpu0
	runtime.ReadMemStats(&after)
	alloc := after.TotalAlloc - before.TotalAlloc
	// Two collections: the first moves sync.Pool contents (gRPC's receive
	// buffers) to the victim cache, the second frees them, so what remains
	// is what the reader really holds.
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&after)
	held := after.HeapAlloc - min(after.HeapAlloc, before.HeapAlloc)
	runtime.KeepAlive(result)
	return syncCost{wall: wall, cpu: cpu, allocBytes: alloc, heapHeld: held, entries: n}
}

// rawSync is the floor: one unpaginated Get, JSON decode into a map.
func rawSync(cli *clientv3.Client, prefix string) (any, int) {
	resp, err := cli.Get(context.Background(), prefix, clientv3.WithPrefix())
	if err != nil {
		panic(err)
	}
	m := make(map[string]v1.Endpoint, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		var ep v1.Endpoint
		if err := json.Unmarshal(kv.Value, &ep); err != nil {
			panic(err)
		}
		m[string(kv.Key)] = ep
	}
	return m, len(m)
}

// storeSync runs a WatchStore until it is synced, then stops it and
// returns it (its cache is the result).
func storeSync(c *kvstore.Client, prefix string, pageSize int) (any, int) {
	ws, err := kvstore.NewWatchStore(c, kvstore.WatchStoreConfig[v1.Endpoint]{
		Prefix: prefix, Decode: v1.DecodeEndpointEntry, Reason: v1.Reason, PageSize: pageSize,
	})
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { ws.Run(ctx); close(done) }()
	if err := ws.WaitSynced(ctx); err != nil {
		panic(err)
	}
	cancel()
	<-done
	return ws, ws.Len()
}

func median(d []float64) float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// BenchmarkColdSync alternates raw and WatchStore syncs of 100k endpoints
// in every iteration and reports the medians of both and their ratios.
// Sub-benchmarks sweep the page size.
func BenchmarkColdSync(b *testing.B) {
	n := 100_000
	if s := os.Getenv("TRELLIS_BENCH_KEYS"); s != "" {
		n, _ = strconv.Atoi(s)
	}
	endpoint := startEtcdProcess(b)
	c := benchClient(b, endpoint)
	rawc := rawClient(b, endpoint)
	avg := loadEndpoints(b, rawc, n)
	prefix := v1.KindPrefix(v1.KindEndpoints, benchCluster)
	b.Logf("%d endpoints, %d B of JSON each on average", n, avg)

	for _, page := range []int{1000, 5000, 10000, 25000, -1} {
		name := "page=" + strconv.Itoa(page)
		if page < 0 {
			name = "page=all"
		}
		b.Run(name, func(b *testing.B) {
			var raw, ours struct{ wall, cpu, alloc, heap []float64 }
			for range b.N {
				r := measure(func() (any, int) { return rawSync(rawc, prefix) })
				o := measure(func() (any, int) { return storeSync(c, prefix, page) })
				if r.entries != n || o.entries != n {
					b.Fatalf("synced %d (raw) and %d (store) entries, want %d", r.entries, o.entries, n)
				}
				raw.wall = append(raw.wall, r.wall.Seconds()*1e3)
				raw.cpu = append(raw.cpu, r.cpu.Seconds()*1e3)
				raw.alloc = append(raw.alloc, float64(r.allocBytes)/1e6)
				raw.heap = append(raw.heap, float64(r.heapHeld)/1e6)
				ours.wall = append(ours.wall, o.wall.Seconds()*1e3)
				ours.cpu = append(ours.cpu, o.cpu.Seconds()*1e3)
				ours.alloc = append(ours.alloc, float64(o.allocBytes)/1e6)
				ours.heap = append(ours.heap, float64(o.heapHeld)/1e6)
			}
			b.ReportMetric(median(raw.wall), "raw-ms")
			b.ReportMetric(median(ours.wall), "store-ms")
			b.ReportMetric(median(ours.wall)/median(raw.wall), "time-ratio")
			b.ReportMetric(median(ours.cpu)/median(raw.cpu), "cpu-ratio")
			b.ReportMetric(median(raw.heap), "raw-heap-MB")
			b.ReportMetric(median(ours.heap), "store-heap-MB")
			b.ReportMetric(median(ours.heap)/median(raw.heap), "heap-ratio")
			b.ReportMetric(median(ours.alloc)/median(raw.alloc), "alloc-ratio")
		})
	}
}

// propagation records update→event latencies keyed by a sequence number
// carried in the endpoint's pod name.
type propagation struct {
	mu   sync.Mutex
	sent map[int]time.Time
	lat  []time.Duration
}

func newPropagation() *propagation { return &propagation{sent: make(map[int]time.Time)} }

func (p *propagation) send(seq int) {
	p.mu.Lock()
	p.sent[seq] = time.Now()
	p.mu.Unlock()
}

func (p *propagation) received(pod string) {
	now := time.Now()
	seq, err := strconv.Atoi(pod[strings.LastIndexByte(pod, '-')+1:])
	if err != nil {
		return
	}
	p.mu.Lock()
	if t, ok := p.sent[seq]; ok {
		p.lat = append(p.lat, now.Sub(t))
		delete(p.sent, seq)
	}
	p.mu.Unlock()
}

func (p *propagation) percentile(q float64) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := slices.Clone(p.lat)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[min(len(s)-1, int(float64(len(s))*q))]
}

type propObserver struct{ p *propagation }

func (o propObserver) OnUpsert(_ string, ep v1.Endpoint) { o.p.received(ep.Pod) }
func (o propObserver) OnDelete(string, v1.Endpoint)      {}
func (o propObserver) OnSync()                           {}

// BenchmarkPropagation drives 1000 updates/s through SyncStore→WatchStore
// and, at the same time, 1000 updates/s through raw Put→raw Watch, for
// five seconds per iteration.
func BenchmarkPropagation(b *testing.B) {
	const (
		rate     = 1000
		keys     = 1000
		duration = 5 * time.Second
	)
	endpoint := startEtcdProcess(b)
	writerClient := benchClient(b, endpoint)
	readerClient := benchClient(b, endpoint)
	rawWriter, rawReader := rawClient(b, endpoint), rawClient(b, endpoint)
	oursPrefix := v1.KindPrefix(v1.KindEndpoints, "ours")
	rawPrefix := v1.KindPrefix(v1.KindEndpoints, "raw")

	var p50s, p99s, rawP50s, rawP99s []float64
	for iter := range b.N {
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		ours, raw := newPropagation(), newPropagation()

		ss, err := kvstore.NewSyncStore(writerClient, kvstore.SyncStoreConfig{Prefix: oursPrefix})
		if err != nil {
			b.Fatal(err)
		}
		ws, err := kvstore.NewWatchStore(readerClient, kvstore.WatchStoreConfig[v1.Endpoint]{
			Prefix: oursPrefix, Decode: v1.DecodeEndpointEntry, Reason: v1.Reason, Observer: propObserver{ours},
		})
		if err != nil {
			b.Fatal(err)
		}
		wg.Add(2)
		go func() { defer wg.Done(); ss.Run(ctx) }()
		go func() { defer wg.Done(); ws.Run(ctx) }()
		ss.MarkSynced()
		if err := ws.WaitSynced(ctx); err != nil {
			b.Fatal(err)
		}

		rawWatch := rawReader.Watch(ctx, rawPrefix, clientv3.WithPrefix())
		wg.Add(1)
		go func() {
			defer wg.Done()
			for resp := range rawWatch {
				for _, ev := range resp.Events {
					var ep v1.Endpoint
					if json.Unmarshal(ev.Kv.Value, &ep) == nil {
						raw.received(ep.Pod)
					}
				}
			}
		}()

		ticker := time.NewTicker(time.Second / rate)
		deadline := time.Now().Add(duration)
		var inflight sync.WaitGroup
		for seq := iter * 1_000_000; time.Now().Before(deadline); seq++ {
			<-ticker.C
			i := seq % keys
			ep := sampleEndpoint("ours", i)
			ep.Pod = fmt.Sprintf("pod-%d", seq)
			data, _ := v1.Encode(ep)
			ours.send(seq)
			ss.Upsert(v1.EndpointKey("ours", ep.IP), data)

			ep.Cluster = "raw"
			rawData, _ := v1.Encode(ep)
			raw.send(seq)
			inflight.Add(1)
			go func() {
				defer inflight.Done()
				rawWriter.Put(ctx, v1.EndpointKey("raw", ep.IP), string(rawData))
			}()
		}
		ticker.Stop()
		inflight.Wait()
		time.Sleep(500 * time.Millisecond) // let the last events arrive
		cancel()
		wg.Wait()

		p50s = append(p50s, float64(ours.percentile(0.50).Microseconds())/1e3)
		p99s = append(p99s, float64(ours.percentile(0.99).Microseconds())/1e3)
		rawP50s = append(rawP50s, float64(raw.percentile(0.50).Microseconds())/1e3)
		rawP99s = append(rawP99s, float64(raw.percentile(0.99).Microseconds())/1e3)
	}
	b.ReportMetric(median(rawP50s), "raw-p50-ms")
	b.ReportMetric(median(rawP99s), "raw-p99-ms")
	b.ReportMetric(median(p50s), "store-p50-ms")
	b.ReportMetric(median(p99s), "store-p99-ms")
	b.ReportMetric(median(p99s)/median(rawP99s), "p99-ratio")
}
