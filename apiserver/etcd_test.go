package apiserver_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/trellis-mesh/trellis/api/client"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/kvstore"
)

// The embedded etcd as the API server runs it: bounded by the quota given
// in its config, its NOSPACE alarm visible on /readyz and in the log, and
// recovered from by the server's maintenance loop, after which the
// registry accepts writes again. The heartbeat lives on a lease instead of
// being rewritten.
func TestEmbeddedEtcdNoSpace(t *testing.T) {
	if testing.Short() {
		t.Skip("fills a 64 MiB etcd; skipped in -short")
	}
	const quota = 64 << 20
	stateDir := t.TempDir()
	logs := &testutil.SyncBuffer{}
	srv, err := apiserver.New(apiserver.Config{
		ClusterName: "eu", ClusterID: 1, PodCIDRs: []string{"10.1.0.0/16"}, StateDir: stateDir,
		EtcdListen: fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)), HTTPListen: fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)),
		EtcdQuotaBackendBytes: quota,
	}, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
	})
	var api *client.Client
	testutil.EventuallyNoError(t, 60*time.Second, "the API server ready", func() error {
		if api == nil {
			if api, err = client.FromStateDir(stateDir, nil); err != nil {
				return err
			}
		}
		return api.Ready(ctx)
	})
	root := rootEtcdClient(t, stateDir)

	// The heartbeat is on a lease of HeartbeatTTL, not rewritten.
	resp, err := root.Get(ctx, v1.HeartbeatKey("eu"))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("heartbeat key: %v %v", resp, err)
	}
	if hb := resp.Kvs[0]; hb.Lease == 0 {
		t.Errorf("heartbeat key %s has no lease", hb.Key)
	} else if ttl, err := root.TimeToLive(ctx, clientv3.LeaseID(hb.Lease)); err != nil || ttl.GrantedTTL != int64(apiserver.HeartbeatTTL.Seconds()) {
		t.Errorf("heartbeat lease: %+v %v, want a TTL of %s", ttl, err, apiserver.HeartbeatTTL)
	}

	// Fill etcd past its quota. The maintenance loop looks every few
	// seconds and may recover before /readyz is asked; then fill again.
	seen := false
	for attempt := 0; attempt < 3 && !seen; attempt++ {
		for i := 0; ; i++ {
			_, err := root.Put(ctx, "trellis/filler", strings.Repeat(string(rune('a'+i%26)), 1<<20))
			if errors.Is(err, rpctypes.ErrNoSpace) {
				break
			}
			if err != nil {
				t.Fatalf("fill: %v", err)
			}
			if i > 1000 {
				t.Fatal("1 GB written and etcd has not refused: no quota")
			}
		}
		err := api.Ready(ctx)
		seen = err != nil && strings.Contains(err.Error(), "NOSPACE")
		if !seen {
			t.Logf("fill %d: /readyz said %v after NOSPACE (the loop was quicker)", attempt+1, err)
		}
	}
	if !seen {
		t.Fatal("/readyz never reported the NOSPACE alarm")
	}
	ready := true
	ep := v1.EndpointRequest{IP: netip.MustParseAddr("10.1.1.10"), Namespace: "default", Pod: "a", Node: "n1",
		NodeIP: netip.MustParseAddr("192.168.1.1"), Ready: &ready, Labels: map[string]string{"app": "a"}}
	node := v1.NodeRequest{Name: "n1", IPs: []netip.Addr{netip.MustParseAddr("192.168.1.1")}}

	testutil.EventuallyNoError(t, 60*time.Second, "recovery from NOSPACE", func() error { return api.Ready(ctx) })
	if err := api.PutNode(ctx, node); err != nil {
		t.Errorf("register a node after the recovery: %v", err)
	}
	if err := api.PutEndpoint(ctx, ep); err != nil {
		t.Errorf("register an endpoint after the recovery: %v", err)
	}
	for _, want := range []string{"etcd NOSPACE alarm: writes are refused", "etcd recovered from NOSPACE"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log does not say %q", want)
		}
	}
}

// The quota is a flag of `trellis apiserver` and a key of its config file,
// both checked at start.
func TestAPIServerEtcdQuotaFlag(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the trellis binary; skipped in -short")
	}
	bin := testutil.BuildTrellis(t)
	file := filepath.Join(t.TempDir(), "apiserver.yaml")
	if err := os.WriteFile(file, []byte("clusterName: eu\nclusterID: 1\npodCIDRs: [10.1.0.0/16]\netcdQuotaBackendBytes: 1048576\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"--cluster-name", "eu", "--cluster-id", "1", "--pod-cidrs", "10.1.0.0/16", "--state-dir", t.TempDir(), "--etcd-quota-backend-bytes", "1048576"},
		{"--config", file, "--state-dir", t.TempDir()},
	} {
		p := testutil.Start(t, bin, append([]string{"apiserver"}, args...)...)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := p.Wait(ctx)
		cancel()
		if want := "--etcd-quota-backend-bytes 1048576: must be between"; err == nil || !strings.Contains(p.Output(), want) {
			t.Errorf("apiserver %v: exit %v, output %q; want a failure saying %q", args, err, p.Output(), want)
		}
	}
}

// rootEtcdClient dials the embedded etcd of the API server in stateDir as
// root, on its internal listener.
func rootEtcdClient(t testing.TB, stateDir string) *clientv3.Client {
	t.Helper()
	pki := filepath.Join(stateDir, "pki")
	tlsCfg, err := kvstore.LoadClientTLS(filepath.Join(pki, "ca.crt"), filepath.Join(pki, "clients", "root.crt"), filepath.Join(pki, "clients", "root.key"))
	if err != nil {
		t.Fatal(err)
	}
	addr, err := os.ReadFile(filepath.Join(stateDir, v1.StateEtcdAddrFile))
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{strings.TrimSpace(string(addr))}, TLS: tlsCfg, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}
