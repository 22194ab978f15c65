package charttest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/trellis-mesh/trellis/internal/kubetest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// The kube-apiserver harness is the main module's internal/kubetest
// (bin/kube-apiserver, built by `make kube-apiserver`), on an embedded etcd
// of this test's own. This module requires the main module (replaced by
// the checkout) only for it; MVS gives it Helm's newer k8s.io modules,
// against which kubetest, which uses only client-go's rest.Config, builds.

// repoBinary returns <repo>/bin/<name>, or skips the test saying how to
// build it (`make test` builds both before it runs this module).
func repoBinary(t *testing.T, name, target string) string {
	t.Helper()
	bin := filepath.Join(kubetest.RepoRoot(t), "bin", name)
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("%s not found (%v): run `make %s` to build it", bin, err, target)
	}
	return bin
}

// startEtcd runs an embedded etcd for the kube-apiserver on loopback and
// returns its client URL; it stops when the test ends.
func startEtcd(t *testing.T) string {
	t.Helper()
	cfg := embed.NewConfig()
	cfg.Dir = t.TempDir()
	cfg.Name = "charttest"
	client, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t)))
	peer, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t)))
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*client}, []url.URL{*client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*peer}, []url.URL{*peer}
	cfg.InitialCluster = cfg.Name + "=" + peer.String()
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop()) // its shutdown logs errors of closed listeners
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		t.Fatalf("embedded etcd: %v", err)
	}
	t.Cleanup(e.Close)
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		t.Fatal("embedded etcd not ready after 60 s")
	}
	return client.String()
}

// startKubeAPIServer runs bin/kube-apiserver on a new etcd with extra
// static-token users (name → token, see kubetest.Options).
func startKubeAPIServer(t *testing.T, users map[string]string) *kubetest.Server {
	t.Helper()
	return kubetest.StartWith(t, kubetest.Binary(t), startEtcd(t), kubetest.Options{Users: users})
}

func randomToken(t *testing.T) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// ctx is a test's context with a deadline.
func ctx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	c, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return c
}
