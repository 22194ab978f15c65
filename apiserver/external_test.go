package apiserver_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/kvstore"
)

// With an external etcd there is no front door, so the server manages no
// remote credentials: issuing and revoking say so instead of minting
// certificates nothing would enforce, and no internal etcd address is
// written.
func TestExternalEtcdHasNoRemoteCredentials(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	stateDir := t.TempDir()
	// A stale address from an earlier embedded run must not mislead tools.
	if err := os.WriteFile(filepath.Join(stateDir, v1.StateEtcdAddrFile), []byte("https://127.0.0.1:1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	httpPort := testutil.FreePort(t)
	srv, err := apiserver.New(apiserver.Config{
		ClusterName: "eu", ClusterID: 1, PodCIDRs: []string{"10.1.0.0/16"}, StateDir: stateDir,
		EtcdEndpoints: e.Endpoints(), HTTPListen: fmt.Sprintf("127.0.0.1:%d", httpPort),
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	api := testutil.WaitAPIServer(t, stateDir, 60*time.Second)
	for _, tc := range []struct {
		method string
		code   int
	}{{"POST", http.StatusServiceUnavailable}, {"DELETE", http.StatusConflict}} {
		code, body := api.Do(t, tc.method, "/admin/v1/remotes/us", "")
		if code != tc.code || !strings.Contains(body, "embedded etcd") {
			t.Errorf("%s /admin/v1/remotes/us: %d %q, want %d saying it needs the embedded etcd", tc.method, code, body, tc.code)
		}
	}
	if _, err := os.Stat(filepath.Join(stateDir, v1.StateEtcdAddrFile)); !os.IsNotExist(err) {
		t.Errorf("%s with an external etcd: stat err = %v, want it removed", v1.StateEtcdAddrFile, err)
	}
	if _, err := os.Stat(filepath.Join(stateDir, "pki", "client-ca.key")); !os.IsNotExist(err) {
		t.Errorf("client CA created for an external etcd it cannot serve: stat err = %v", err)
	}
}
