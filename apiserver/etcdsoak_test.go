package apiserver_test

import (
	"context"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/trellis-mesh/trellis/api/client"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver"
	"github.com/trellis-mesh/trellis/apiserver/etcdauth"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/kvstore"
)

// BenchmarkEmbeddedEtcdSoak drives 200 000 endpoint updates through a
// SyncStore into the embedded etcd of a real API server (in this process,
// configured as `trellis apiserver` configures it: default quota,
// auto-compaction, maintenance loop), at 1000 updates/s over 1000 keys, as
// the server's own writer would (its certificate, default rate limits).
// It samples etcd's maintenance Status every 10 s and reports the store's
// revision and the database's size and size in use at the end, then after
// a defragmentation, and the largest size seen. One iteration takes about
// 3.5 minutes: run it with -benchtime 1x. TRELLIS_SOAK_UPDATES and
// TRELLIS_SOAK_RATE change the count and the rate.
//
// It lives here rather than in kvstore because make bench runs every
// kvstore benchmark 25 times.
func BenchmarkEmbeddedEtcdSoak(b *testing.B) {
	updates, rate := 200_000, 1000
	if s := os.Getenv("TRELLIS_SOAK_UPDATES"); s != "" {
		updates, _ = strconv.Atoi(s)
	}
	if s := os.Getenv("TRELLIS_SOAK_RATE"); s != "" {
		rate, _ = strconv.Atoi(s)
	}
	const keys = 1000
	for range b.N {
		soak(b, updates, rate, keys)
	}
}

func soak(b *testing.B, updates, rate, keys int) {
	stateDir := b.TempDir()
	srv, err := apiserver.New(apiserver.Config{
		ClusterName: "eu", ClusterID: 1, PodCIDRs: []string{"10.1.0.0/16"}, StateDir: stateDir,
		EtcdListen: fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(b)), HTTPListen: fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(b)),
	}, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			b.Errorf("Run: %v", err)
		}
	}()
	testutil.EventuallyNoError(b, 60*time.Second, "the API server ready", func() error {
		api, err := client.FromStateDir(stateDir, nil)
		if err != nil {
			return err
		}
		return api.Ready(ctx)
	})
	addr, err := os.ReadFile(filepath.Join(stateDir, v1.StateEtcdAddrFile))
	if err != nil {
		b.Fatal(err)
	}
	endpoint := strings.TrimSpace(string(addr))
	pki := filepath.Join(stateDir, "pki")
	writerTLS, err := kvstore.LoadClientTLS(filepath.Join(pki, "ca.crt"), filepath.Join(pki, "clients", etcdauth.LocalWriterUser+".crt"), filepath.Join(pki, "clients", etcdauth.LocalWriterUser+".key"))
	if err != nil {
		b.Fatal(err)
	}
	writer, err := kvstore.NewClient(kvstore.Config{Endpoints: []string{endpoint}, TLS: writerTLS})
	if err != nil {
		b.Fatal(err)
	}
	defer writer.Close()
	root := rootEtcdClient(b, stateDir)
	status := func() *clientv3.StatusResponse {
		sctx, c := context.WithTimeout(ctx, 30*time.Second)
		defer c()
		st, err := root.Status(sctx, endpoint)
		if err != nil {
			b.Fatalf("etcd status: %v", err)
		}
		return st
	}
	mb := func(n int64) float64 { return float64(n) / (1 << 20) }

	prefix := v1.KindPrefix(v1.KindEndpoints, "soak")
	store, err := kvstore.NewSyncStore(writer, kvstore.SyncStoreConfig{Prefix: prefix, Name: "soak"})
	if err != nil {
		b.Fatal(err)
	}
	storeCtx, stopStore := context.WithCancel(ctx)
	storeDone := make(chan struct{})
	go func() { defer close(storeDone); store.Run(storeCtx) }()
	defer func() { stopStore(); <-storeDone }()
	store.MarkSynced()

	start := status()
	var peak int64
	sample := func(what string) *clientv3.StatusResponse {
		st := status()
		peak = max(peak, st.DbSize)
		b.Logf("%-26s revision %7d  db %6.1f MiB  in use %6.1f MiB  etcd dir %6.1f MiB",
			what, st.Header.Revision, mb(st.DbSize), mb(st.DbSizeInUse), mb(dirSize(filepath.Join(stateDir, "etcd"))))
		return st
	}
	sample("start")
	b.ResetTimer()
	began := time.Now()
	tick := time.NewTicker(10 * time.Millisecond)
	perTick := max(rate/100, 1)
	lastSample := time.Now()
	for i := 0; i < updates; {
		<-tick.C
		for j := 0; j < perTick && i < updates; j, i = j+1, i+1 {
			ep := soakEndpoint(i%keys, i)
			data, err := v1.Encode(ep)
			if err != nil {
				b.Fatal(err)
			}
			store.Upsert(v1.EndpointKey("soak", ep.IP), data)
		}
		if time.Since(lastSample) >= 10*time.Second {
			lastSample = time.Now()
			sample(fmt.Sprintf("%d updates, %s", i, time.Since(began).Round(time.Second)))
		}
	}
	tick.Stop()
	// Wait until every update is in etcd: each key's version counts its
	// writes, so the sum proves that none collapsed into another.
	testutil.EventuallyNoError(b, 5*time.Minute, "every update written", func() error {
		gctx, c := context.WithTimeout(ctx, 30*time.Second)
		defer c()
		resp, err := root.Get(gctx, prefix, clientv3.WithPrefix())
		if err != nil {
			return err
		}
		var versions int64
		for _, kv := range resp.Kvs {
			versions += kv.Version
		}
		if versions != int64(updates) {
			return fmt.Errorf("%d of %d updates written", versions, updates)
		}
		return nil
	})
	b.StopTimer()
	took := time.Since(began)
	end := sample("end")
	dctx, c := context.WithTimeout(ctx, 5*time.Minute)
	defragStart := time.Now()
	if _, err := root.Defragment(dctx, endpoint); err != nil {
		b.Fatalf("defragment: %v", err)
	}
	c()
	defragTook := time.Since(defragStart)
	after := sample(fmt.Sprintf("after defrag (%s)", defragTook.Round(time.Millisecond)))
	b.Logf("%d updates in %s (%d revisions): end db %.1f MiB, %.1f MiB in use; after defragmentation %.1f MiB, %.1f in use; largest %.1f MiB",
		updates, took.Round(time.Second), end.Header.Revision-start.Header.Revision, mb(end.DbSize), mb(end.DbSizeInUse), mb(after.DbSize), mb(after.DbSizeInUse), mb(peak))
	b.ReportMetric(float64(end.Header.Revision), "revision")
	b.ReportMetric(mb(end.DbSize), "db-MiB")
	b.ReportMetric(mb(end.DbSizeInUse), "in-use-MiB")
	b.ReportMetric(mb(after.DbSize), "defrag-db-MiB")
	b.ReportMetric(mb(after.DbSizeInUse), "defrag-in-use-MiB")
	b.ReportMetric(mb(peak), "peak-db-MiB")
	b.ReportMetric(defragTook.Seconds()*1e3, "defrag-ms")
}

// soakEndpoint is update seq of endpoint i: about 220 bytes of JSON, the
// pod name carrying seq so that every update changes the value.
func soakEndpoint(i, seq int) v1.Endpoint {
	return v1.Endpoint{
		Cluster:   "soak",
		IP:        netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}),
		Identity:  v1.MakeIdentity(1, uint16(i%4000+1)),
		NodeIP:    netip.AddrFrom4([4]byte{192, 168, 0, byte(i%200 + 1)}),
		Namespace: "payments-production",
		Pod:       fmt.Sprintf("checkout-api-7d9f8b6c5d-%08d-%s", seq, strings.Repeat("x", 40)),
		Ready:     true,
	}
}

// dirSize is the apparent size of the files under dir.
func dirSize(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if info, err := d.Info(); err == nil {
				n += info.Size()
			}
		}
		return nil
	})
	return n
}
