package kvstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// The embedded etcd serves no gRPC gateway: its JSON API is not found,
// while etcd's own /health (not part of the gateway) still answers.
func TestEmbeddedHasNoGRPCGateway(t *testing.T) {
	e := startEtcd(t)
	base := e.Endpoints()[0]
	resp, err := http.Post(base+"/v3/kv/range", "application/json", strings.NewReader(`{"key":"Zm9v"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("POST /v3/kv/range: %s, want 404 (gateway off)", resp.Status)
	}
	resp, err = http.Get(base + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /health: %s, want 200", resp.Status)
	}
}

// startEtcdWith runs an embedded etcd with cfg (Dir defaults to a fresh
// one) and stops it at cleanup.
func startEtcdWith(t *testing.T, cfg EmbeddedConfig) *Embedded {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := StartEmbedded(ctx, cfg)
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// A single member listens for no peers, also when its data dir was made
// by an etcd that did (a peer listener on a loopback port that changed
// with every start): it restarts without one and keeps its data.
func TestEmbeddedHasNoPeerListener(t *testing.T) {
	e := startEtcdWith(t, EmbeddedConfig{})
	if n := len(e.Server().Peers); n != 0 {
		t.Errorf("new member: %d peer listeners, want none", n)
	}
	for _, m := range e.Server().Server.Cluster().Members() {
		if len(m.PeerURLs) != 1 || m.PeerURLs[0] != noPeerURL {
			t.Errorf("new member %s advertises peer URLs %v, want [%s] (nothing listens)", m.Name, m.PeerURLs, noPeerURL)
		}
	}

	// A data dir as the embedded etcd of before left it.
	dir := t.TempDir()
	peer := freeAddr(t)
	ec := embed.NewConfig()
	ec.Name, ec.Dir = "trellis", dir
	clientURL := url.URL{Scheme: "http", Host: freeAddr(t)}
	peerURL := url.URL{Scheme: "http", Host: peer}
	ec.ListenClientUrls, ec.AdvertiseClientUrls = []url.URL{clientURL}, []url.URL{clientURL}
	ec.ListenPeerUrls, ec.AdvertisePeerUrls = []url.URL{peerURL}, []url.URL{peerURL}
	ec.InitialCluster = ec.InitialClusterFromName(ec.Name)
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	old, err := embed.StartEtcd(ec)
	if err != nil {
		t.Fatal(err)
	}
	<-old.Server.ReadyNotify()
	c := newTestClient(t, []string{clientURL.String()}, nil)
	ctx := context.Background()
	if err := c.Put(ctx, "trellis/k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	c.Close()
	old.Close()

	e = startEtcdWith(t, EmbeddedConfig{Dir: dir})
	if n := len(e.Server().Peers); n != 0 {
		t.Errorf("restarted member: %d peer listeners, want none", n)
	}
	if l, err := net.Listen("tcp", peer); err != nil {
		t.Errorf("the old peer address %s is still taken: %v", peer, err)
	} else {
		l.Close()
	}
	c = newTestClient(t, e.Endpoints(), nil)
	kv, _, err := c.Get(ctx, "trellis/k")
	if err != nil || kv == nil || string(kv.Value) != "v" {
		t.Errorf("data after the restart without a peer listener: %v %v", kv, err)
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// fill overwrites key with values of size bytes until stop says so or a
// write fails; it returns the write's error.
func fill(t *testing.T, c *Client, key string, size int, stop func() bool) error {
	t.Helper()
	ctx := context.Background()
	for i := 0; !stop(); i++ {
		if i > 100_000 {
			t.Fatal("fill: never stopped")
		}
		if err := c.Put(ctx, key, bytes.Repeat([]byte{byte('a' + i%26)}, size)); err != nil {
			return err
		}
	}
	return nil
}

// etcd's periodic auto-compaction is on by default: history older than
// the retention goes without anyone asking.
func TestEmbeddedAutoCompacts(t *testing.T) {
	e := startEtcdWith(t, EmbeddedConfig{AutoCompactionRetention: time.Second})
	c := newTestClient(t, e.Endpoints(), nil)
	var first int64
	eventually(t, "an automatic compaction", func() bool {
		if err := c.Put(context.Background(), "trellis/k", []byte(time.Now().String())); err != nil {
			t.Fatal(err)
		}
		st := e.Status()
		if first == 0 {
			first = st.Revision
		}
		return st.CompactRevision >= first
	})
	if got := e.Effective().AutoCompactionRetention; got != time.Second {
		t.Errorf("retention %s, want 1s", got)
	}
	if got := startEtcdWith(t, EmbeddedConfig{}).Effective(); got.AutoCompactionRetention != DefaultCompactionRetention || got.QuotaBackendBytes != DefaultQuotaBackendBytes {
		t.Errorf("defaults: retention %s quota %d, want %s and %d", got.AutoCompactionRetention, got.QuotaBackendBytes, DefaultCompactionRetention, DefaultQuotaBackendBytes)
	}
}

// Free space goes back to the file system: at start when it is worth it
// (nobody is connected yet), and by the maintenance loop once a
// compaction freed at least 64 MiB and half the file, not again before
// DefragInterval.
func TestEmbeddedDefragments(t *testing.T) {
	e := startEtcdWith(t, EmbeddedConfig{AutoCompactionRetention: -1})
	c := newTestClient(t, e.Endpoints(), nil)
	ctx := context.Background()
	garbage := func() {
		t.Helper()
		if err := fill(t, c, "trellis/big", 512<<10, func() bool { return e.Status().DBSizeInUse > 80<<20 }); err != nil {
			t.Fatal(err)
		}
		if err := e.Compact(ctx, 0); err != nil {
			t.Fatal(err)
		}
		if st := e.Status(); st.DBSize-st.DBSizeInUse < defragMinFree {
			t.Fatalf("after the compaction %d of %d bytes are free, want at least %d", st.DBSize-st.DBSizeInUse, st.DBSize, defragMinFree)
		}
	}
	garbage()

	// Start-up.
	cfg := e.Effective()
	c.Close()
	e.Close()
	e = startEtcdWith(t, cfg)
	if st := e.Status(); st.DBSize > 16<<20 {
		t.Errorf("after a restart with %d free bytes: file %d bytes, want it defragmented at start", defragMinFree, st.DBSize)
	}

	// The loop.
	c = newTestClient(t, e.Endpoints(), nil)
	garbage()
	now := time.Now()
	m := maintenance{lastDefrag: now.Add(-cfg.DefragInterval + time.Minute)}
	e.maintain(ctx, &m, now)
	if st := e.Status(); st.DBSize < 64<<20 {
		t.Fatalf("defragmented %s after the last one, want at most one per %s", time.Minute, cfg.DefragInterval)
	}
	m = maintenance{lastDefrag: now.Add(-cfg.DefragInterval)}
	e.maintain(ctx, &m, now)
	if st := e.Status(); st.DBSize > 16<<20 {
		t.Errorf("file %d bytes after the loop's look, want it defragmented", st.DBSize)
	}
	if n := e.defrags.routine.Load(); n != 1 {
		t.Errorf("routine defragmentations: %d, want 1", n)
	}
	if !m.lastDefrag.Equal(now) {
		t.Errorf("the loop did not record its defragmentation")
	}
}

// A file at three quarters of the quota is relieved before etcd refuses
// writes: the history older than the loop's previous look is compacted
// and the file defragmented.
func TestEmbeddedRelievesPressure(t *testing.T) {
	const quota = 32 << 20
	e := startEtcdWith(t, EmbeddedConfig{QuotaBackendBytes: quota, AutoCompactionRetention: -1})
	c := newTestClient(t, e.Endpoints(), nil)
	high := int64(quota / 4 * 3)
	if err := fill(t, c, "trellis/big", 256<<10, func() bool { return e.Status().DBSize >= high }); err != nil {
		t.Fatalf("filling to three quarters of the quota: %v", err)
	}
	st := e.Status()
	m := maintenance{prevRev: st.Revision}
	e.maintain(context.Background(), &m, time.Now())
	after := e.Status()
	if after.DBSize >= high || after.CompactRevision != st.Revision || after.NoSpace {
		t.Errorf("after relieving pressure: %+v, want the file under %d, compacted to %d, no alarm", after, high, st.Revision)
	}
	if e.compactions.pressure.Load() != 1 || e.defrags.pressure.Load() != 1 {
		t.Errorf("pressure compactions %d, defragmentations %d, want 1 each", e.compactions.pressure.Load(), e.defrags.pressure.Load())
	}
}

// NOSPACE is visible (CheckWritable, the metrics) and the maintenance loop
// recovers from it when the live data fits: writes are accepted again and
// the data is intact. Run stops when its ctx ends.
func TestEmbeddedRecoversFromNoSpace(t *testing.T) {
	const quota = 32 << 20
	e := startEtcdWith(t, EmbeddedConfig{QuotaBackendBytes: quota, AutoCompactionRetention: -1, MaintenanceInterval: 50 * time.Millisecond})
	reg := prometheus.NewRegistry()
	if err := e.Register(reg); err != nil {
		t.Fatal(err)
	}
	c := newTestClient(t, e.Endpoints(), nil)
	ctx := context.Background()
	if err := c.Put(ctx, "trellis/keep", []byte("kept")); err != nil {
		t.Fatal(err)
	}
	err := fill(t, c, "trellis/big", 256<<10, func() bool { return false })
	if !errors.Is(err, rpctypes.ErrNoSpace) {
		t.Fatalf("filling past the quota: %v, want %v", err, rpctypes.ErrNoSpace)
	}
	if err := e.CheckWritable(); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("CheckWritable under NOSPACE: %v, want %v", err, ErrNoSpace)
	}
	if got := gather(t, reg)["trellis_etcd_nospace_alarm"]; got != 1 {
		t.Errorf("trellis_etcd_nospace_alarm = %v under NOSPACE, want 1", got)
	}

	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- e.Run(runCtx) }()
	eventually(t, "NOSPACE recovered", func() bool { return e.CheckWritable() == nil })
	if err := c.Put(ctx, "trellis/after", []byte("accepted")); err != nil {
		t.Errorf("write after the recovery: %v", err)
	}
	if kv, _, err := c.Get(ctx, "trellis/keep"); err != nil || kv == nil || string(kv.Value) != "kept" {
		t.Errorf("data after the recovery: %v %v", kv, err)
	}
	m := gather(t, reg)
	if m["trellis_etcd_nospace_alarm"] != 0 || m[`trellis_etcd_defragmentations_total{reason="nospace"}`] != 1 ||
		m[`trellis_etcd_maintenance_compactions_total{reason="nospace"}`] != 1 || m["trellis_etcd_db_size_bytes"] >= quota/4*3 {
		t.Errorf("metrics after the recovery: %v", m)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after its ctx ended")
	}
}

// gather flattens reg's metrics into name{labels} → value.
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]float64)
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			name := mf.GetName()
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			if len(labels) > 0 {
				name += "{" + strings.Join(labels, ",") + "}"
			}
			// A metric is a gauge or a counter; the other's getter is 0.
			out[name] = m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
	}
	return out
}

// A scrape after Close (an HTTP server still draining) reports nothing
// and does not fail; Close twice is harmless.
func TestEmbeddedMetricsAfterClose(t *testing.T) {
	e := startEtcdWith(t, EmbeddedConfig{})
	reg := prometheus.NewRegistry()
	if err := e.Register(reg); err != nil {
		t.Fatal(err)
	}
	if m := gather(t, reg); m["trellis_etcd_quota_backend_bytes"] != float64(DefaultQuotaBackendBytes) || m["trellis_etcd_db_size_bytes"] == 0 {
		t.Errorf("metrics of a running etcd: %v", m)
	}
	e.Close()
	e.Close()
	if m := gather(t, reg); len(m) != 0 {
		t.Errorf("metrics of a closed etcd: %v, want none", m)
	}
}
