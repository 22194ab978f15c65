package clustermesh

// Benchmarks for issue 4's targets: one agent watching 16 clusters, each
// with 1k nodes, 10k endpoints and 500 global services — time to Ready,
// heap per remote endpoint, and the cost of one update to a new snapshot.
//
// The 16 etcds run in a child process (this test binary re-executed) so
// the heap measured is the agent's alone. They are plain-HTTP embedded
// etcds loaded with valid entries by raw transactions: the benchmark
// measures the reading side, not the API server.

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/internal/etcdchild"
)

func TestMain(m *testing.M) {
	etcdchild.ServeIfChild()
	os.Exit(m.Run())
}

type benchSize struct{ nodes, endpoints, services int }

// loadCluster writes a cluster's config, nodes, endpoints, services and
// canaries into its etcd.
func loadCluster(b *testing.B, cli *clientv3.Client, id int, size benchSize) {
	b.Helper()
	name := fmt.Sprintf("c%02d", id)
	cidr := netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/16", id))
	var ops []clientv3.Op
	ctx := context.Background()
	flush := func(force bool) {
		if len(ops) >= 100 || (force && len(ops) > 0) {
			if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
				b.Fatal(err)
			}
			ops = ops[:0]
		}
	}
	put := func(key string, v any) {
		data, err := v1.Encode(v)
		if err != nil {
			b.Fatal(err)
		}
		ops = append(ops, clientv3.OpPut(key, string(data)))
		flush(false)
	}
	put(v1.ClusterConfigKey(name), v1.ClusterConfig{Name: name, ID: v1.ClusterID(id), PodCIDRs: []netip.Prefix{cidr}, Region: fmt.Sprintf("r%d", id%4),
		Capabilities: v1.Capabilities{SyncedCanaries: true, MaxConnectedClusters: 255, BackendShards: true}})
	podIP := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, byte(id), byte(i >> 8), byte(i)}) }
	for i := range size.nodes {
		put(v1.NodeKey(name, fmt.Sprintf("node-%04d", i)), v1.Node{Cluster: name, Name: fmt.Sprintf("node-%04d", i),
			IPs: []netip.Addr{netip.AddrFrom4([4]byte{172, byte(id), byte(i >> 8), byte(i)})}})
	}
	for i := range size.endpoints {
		put(v1.EndpointKey(name, podIP(i)), v1.Endpoint{Cluster: name, IP: podIP(i), Identity: v1.MakeIdentity(v1.ClusterID(id), uint16(i%500+1)),
			NodeIP: netip.AddrFrom4([4]byte{172, byte(id), byte((i % size.nodes) >> 8), byte(i % size.nodes)}), Namespace: "default", Pod: fmt.Sprintf("pod-%05d", i), Ready: true})
	}
	per := size.endpoints / size.services
	for s := range size.services {
		svc := v1.Service{Cluster: name, Namespace: "default", Name: fmt.Sprintf("svc-%03d", s), Global: true, Shared: true,
			Ports:       []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}},
			FrontendIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 96, byte(s >> 8), byte(s)})}}
		for i := s * per; i < (s+1)*per; i++ {
			svc.Backends = append(svc.Backends, v1.Backend{IP: podIP(i), State: v1.BackendActive})
		}
		put(v1.ServiceKey(name, "default", svc.Name), svc)
	}
	for _, kind := range v1.SyncedKinds() {
		ops = append(ops, clientv3.OpPut(v1.SyncedKey(name, kind), string(v1.EncodeTimestamp(time.Now()))))
	}
	flush(true)
}

func heapInUse() uint64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// BenchmarkMeshSync16: time to Ready with 16 clusters, heap per remote
// endpoint, and put → snapshot latency of service updates afterwards.
func BenchmarkMeshSync16(b *testing.B) {
	clusters := 16
	size := benchSize{nodes: 1000, endpoints: 10000, services: 500}
	if s := os.Getenv("TRELLIS_BENCH_CLUSTERS"); s != "" {
		clusters, _ = strconv.Atoi(s)
	}
	urls := etcdchild.Start(b, clusters)
	clients := make([]*clientv3.Client, clusters)
	var wg sync.WaitGroup
	for i, u := range urls {
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{u}, Logger: zap.NewNop()})
		if err != nil {
			b.Fatal(err)
		}
		defer cli.Close()
		clients[i] = cli
		wg.Add(1)
		go func() { defer wg.Done(); loadCluster(b, cli, i+1, size) }()
	}
	wg.Wait()

	var readyS, perEndpoint, p50, p99 []float64
	for range b.N {
		dir := b.TempDir()
		for i, u := range urls {
			f := ClusterFile{Name: fmt.Sprintf("c%02d", i+1), ID: v1.ClusterID(i + 1),
				PodCIDRs: []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/16", i+1))}, Endpoints: []string{u}}
			if err := WriteClusterFile(dir, f); err != nil {
				b.Fatal(err)
			}
		}
		base := heapInUse()
		m, err := New(Config{LocalCluster: "c01", ConfigDir: dir, PollInterval: 50 * time.Millisecond, QPS: -1})
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		start := time.Now()
		go func() { m.Run(ctx); close(done) }()
		for {
			st := m.Status()
			ready := 0
			for _, c := range st.Clusters {
				if c.Ready {
					ready++
				}
			}
			if ready == clusters {
				break
			}
			if time.Since(start) > 5*time.Minute {
				b.Fatalf("not ready after 5 minutes: %+v", st.Clusters)
			}
			time.Sleep(10 * time.Millisecond)
		}
		readyS = append(readyS, time.Since(start).Seconds())
		// Let the last snapshot fold, then measure what is held.
		time.Sleep(200 * time.Millisecond)
		held := heapInUse() - base
		if path := os.Getenv("TRELLIS_BENCH_HEAPPROFILE"); path != "" {
			if f, err := os.Create(path); err == nil {
				pprof.WriteHeapProfile(f)
				f.Close()
			}
		}
		remoteEndpoints := (clusters - 1) * size.endpoints
		perEndpoint = append(perEndpoint, float64(held)/float64(clusters*size.endpoints))
		if got := len(m.Snapshot().IPCache["c02"]); got != size.endpoints {
			b.Fatalf("ipcache for c02 has %d entries, want %d", got, size.endpoints)
		}
		_ = remoteEndpoints

		// Update latency: change one backend's state in a remote service
		// and wait for the snapshot that carries it.
		ch, unsub := m.Subscribe()
		var lat []time.Duration
		for u := range 200 {
			cluster := u%(clusters-1) + 2
			name := fmt.Sprintf("c%02d", cluster)
			svcName := fmt.Sprintf("svc-%03d", u%size.services)
			key := v1.ServiceKey(name, "default", svcName)
			resp, err := clients[cluster-1].Get(ctx, key)
			if err != nil {
				b.Fatal(err)
			}
			svc, _ := v1.DecodeServiceEntry(key, resp.Kvs[0].Value)
			flip := svc.Backends[0].State == v1.BackendActive
			if flip {
				svc.Backends[0].State = v1.BackendUnready
			} else {
				svc.Backends[0].State = v1.BackendActive
			}
			data, _ := v1.Encode(svc)
			t0 := time.Now()
			if _, err := clients[cluster-1].Put(ctx, key, string(data)); err != nil {
				b.Fatal(err)
			}
			want := len(svc.Backends)
			if flip {
				want--
			}
			for {
				ms := m.Snapshot().Services[ServiceName{"default", svcName}]
				if ms != nil && ms.Offered[name] == want {
					break
				}
				<-ch
			}
			lat = append(lat, time.Since(t0))
		}
		unsub()
		slices.Sort(lat)
		p50 = append(p50, float64(lat[len(lat)/2].Microseconds())/1e3)
		p99 = append(p99, float64(lat[len(lat)*99/100].Microseconds())/1e3)
		cancel()
		<-done
	}
	b.ReportMetric(median(readyS), "ready-s")
	b.ReportMetric(median(perEndpoint), "heap-B/endpoint")
	b.ReportMetric(median(p50), "update-p50-ms")
	b.ReportMetric(median(p99), "update-p99-ms")
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// BenchmarkMergeUpdate is the in-process cost of folding one service
// update into a new snapshot with 16 clusters of state loaded: merge the
// service across clusters and copy the services map.
func BenchmarkMergeUpdate(b *testing.B) {
	st := newState("c01", nil, slog.New(slog.DiscardHandler))
	for c := 1; c <= 16; c++ {
		name := fmt.Sprintf("c%02d", c)
		st.setCluster(v1.ClusterConfig{Name: name, Region: fmt.Sprintf("r%d", c%4)})
		for s := range 500 {
			svc := v1.Service{Cluster: name, Namespace: "default", Name: fmt.Sprintf("svc-%03d", s), Global: true, Shared: true}
			for i := range 20 {
				svc.Backends = append(svc.Backends, v1.Backend{IP: netip.AddrFrom4([4]byte{10, byte(c), byte(s), byte(i)}), State: v1.BackendActive})
			}
			st.upsertService(name, svc)
		}
		for i := range 10000 {
			st.upsertEndpoint(name, v1.Endpoint{IP: netip.AddrFrom4([4]byte{10, byte(c), byte(i >> 8), byte(i)})})
		}
	}
	st.publish()
	svc := st.services["c05"][ServiceName{"default", "svc-007"}].head
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		svc.Backends[0].State = []v1.BackendState{v1.BackendActive, v1.BackendUnready}[i%2]
		t0 := time.Now()
		st.upsertService("c05", svc)
		st.publish()
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}
