package apiserver_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// apiServerProcess is `trellis apiserver` run as a real process.
type apiServerProcess struct {
	bin, name, stateDir    string
	id, etcdPort, httpPort int
	proc                   *testutil.Process
	api                    *testutil.APIServer
}

// newAPIServerProcess describes API server name (cluster ID id, pod CIDR
// 10.<id>.0.0/16) with a fresh state dir and free ports; start runs it.
func newAPIServerProcess(t *testing.T, bin, name string, id int) *apiServerProcess {
	return &apiServerProcess{bin: bin, name: name, id: id, stateDir: t.TempDir(), etcdPort: testutil.FreePort(t), httpPort: testutil.FreePort(t)}
}

// start runs the server and waits until it is ready, reached over HTTPS
// and verified with its own server CA.
func (a *apiServerProcess) start(t *testing.T, extra ...string) {
	t.Helper()
	a.proc = testutil.Start(t, a.bin, append([]string{"apiserver",
		"--cluster-name", a.name, "--cluster-id", fmt.Sprint(a.id), "--pod-cidrs", fmt.Sprintf("10.%d.0.0/16", a.id), "--region", a.name,
		"--state-dir", a.stateDir,
		"--etcd-listen", fmt.Sprintf("127.0.0.1:%d", a.etcdPort),
		"--http-listen", fmt.Sprintf("127.0.0.1:%d", a.httpPort),
		"--log-level", "debug"}, extra...)...)
	a.api = testutil.WaitAPIServer(t, a.stateDir, 60*time.Second)
}

// call sends a registry or admin request with the admin token and returns
// status and body.
func (a *apiServerProcess) call(t *testing.T, method, path, body string) (int, string) {
	t.Helper()
	return a.api.Do(t, method, path, body)
}

func (a *apiServerProcess) mustCall(t *testing.T, method, path, body string) string {
	t.Helper()
	return a.api.Must(t, method, path, body)
}

// remoteClient connects to the API server's etcd as remote cluster "us".
func remoteClient(t *testing.T, creds v1.RemoteCredentials) *clientv3.Client {
	t.Helper()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(creds.CAPEM)) {
		t.Fatal("no CA in credentials")
	}
	cert, err := tls.X509KeyPair([]byte(creds.CertPEM), []byte(creds.KeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: creds.Endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop(),
		TLS: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func keysUnder(t *testing.T, cli *clientv3.Client, prefix string) map[string]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatalf("get %s: %v", prefix, err)
	}
	out := make(map[string]string)
	for _, kv := range resp.Kvs {
		out[string(kv.Key)] = string(kv.Value)
	}
	return out
}

// The mesh API server as a user runs it: a process, fed through the
// registry API, read by a remote cluster's etcd client holding its own
// certificate, restarted without losing anything.
func TestAPIServerProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the trellis binary; skipped in -short")
	}
	a := newAPIServerProcess(t, testutil.BuildTrellis(t), "eu", 1)
	a.start(t)

	a.mustCall(t, "PUT", "/v1/nodes/node-1", `{"ips":["192.168.0.1"],"podCIDRs":["10.1.1.0/24"]}`)
	a.mustCall(t, "PUT", "/v1/endpoints/10.1.1.10", `{"namespace":"default","pod":"echo-a","node":"node-1","nodeIP":"192.168.0.1","labels":{"app":"echo"}}`)
	a.mustCall(t, "PUT", "/v1/endpoints/10.1.1.11", `{"namespace":"default","pod":"echo-b","node":"node-1","nodeIP":"192.168.0.1","ready":false,"labels":{"app":"echo"}}`)
	a.mustCall(t, "PUT", "/v1/services/default/echo", `{"ports":[{"name":"http","protocol":"TCP","port":80,"targetPort":8080}],
		"frontendIPs":["10.96.0.10"],"selector":{"app":"echo"},"annotations":{"trellis.io/global":"true"}}`)

	// Unauthenticated writes are refused.
	if code, _ := a.api.DoAs(t, "", "PUT", "/v1/nodes/node-9", `{"ips":["192.168.0.9"]}`); code != http.StatusUnauthorized {
		t.Fatalf("write without token: %d, want 401", code)
	}

	var creds v1.RemoteCredentials
	if err := json.Unmarshal([]byte(a.mustCall(t, "POST", "/admin/v1/remotes/us", "")), &creds); err != nil {
		t.Fatal(err)
	}
	if creds.User != "remote-us" || creds.Cluster != "eu" || creds.ClusterID != 1 {
		t.Fatalf("credentials = %+v", creds)
	}
	remote := remoteClient(t, creds)

	var keys map[string]string
	testutil.Eventually(t, 30*time.Second, "every key published", func() bool {
		keys = keysUnder(t, remote, v1.Prefix)
		return len(keys) == 12
	})
	var idKey string
	for k := range keys {
		if strings.HasPrefix(k, v1.KindPrefix(v1.KindIdentities, "eu")) {
			idKey = k
		}
	}
	want := []string{
		v1.ClusterConfigKey("eu"), v1.HeartbeatKey("eu"),
		"trellis/v1/nodes/eu/node-1", "trellis/v1/endpoints/eu/10.1.1.10", "trellis/v1/endpoints/eu/10.1.1.11",
		idKey, "trellis/v1/services/eu/default/echo",
		v1.SyncedKey("eu", v1.KindNodes), v1.SyncedKey("eu", v1.KindEndpoints),
		v1.SyncedKey("eu", v1.KindServices), v1.SyncedKey("eu", v1.KindIdentities), v1.SyncedKey("eu", v1.KindBackends),
	}
	got := slices.Sorted(func(yield func(string) bool) {
		for k := range keys {
			if !yield(k) {
				return
			}
		}
	})
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("keys a remote sees:\n got %v\nwant %v", got, want)
	}
	svc, err := v1.DecodeServiceEntry("trellis/v1/services/eu/default/echo", []byte(keys["trellis/v1/services/eu/default/echo"]))
	if err != nil {
		t.Fatal(err)
	}
	if !svc.Global || !svc.Shared || len(svc.Backends) != 2 || svc.Backends[0].State != v1.BackendActive || svc.Backends[1].State != v1.BackendUnready {
		t.Errorf("published service = %+v", svc)
	}
	ep, err := v1.DecodeEndpointEntry("trellis/v1/endpoints/eu/10.1.1.10", []byte(keys["trellis/v1/endpoints/eu/10.1.1.10"]))
	if err != nil {
		t.Fatal(err)
	}
	if ep.Identity.ClusterID() != 1 || idKey != v1.IdentityKey("eu", ep.Identity) {
		t.Errorf("endpoint identity %d, identity key %s", ep.Identity, idKey)
	}
	if _, err := remote.Get(context.Background(), "trellis/registry/", clientv3.WithPrefix()); !errors.Is(err, rpctypes.ErrPermissionDenied) {
		t.Errorf("remote read of the registry's private records: err = %v, want permission denied", err)
	}

	// Metrics count the publication.
	metrics := a.mustCall(t, "GET", "/metrics", "")
	if !strings.Contains(metrics, `trellis_kvstore_operations_total{op="txn",scope="endpoints"}`) {
		t.Errorf("/metrics lacks the endpoints store's transactions")
	}

	// A remote cluster cannot write.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := remote.Put(ctx, "trellis/v1/nodes/eu/evil", "{}"); !errors.Is(err, rpctypes.ErrPermissionDenied) {
		t.Fatalf("remote write: err = %v, want permission denied", err)
	}

	// Bad input: 4xx with a message, nothing stored.
	before := keysUnder(t, remote, v1.Prefix)
	for _, bad := range []struct{ path, body, wantMsg string }{
		{"/v1/nodes/node-2", `{"ips":["192.168.0.2"],"colour":"blue"}`, "unknown field"},
		{"/v1/endpoints/10.2.0.1", `{"namespace":"default","pod":"x","node":"node-1","nodeIP":"192.168.0.1"}`, "outside the cluster's pod CIDRs"},
		{"/v1/services/default/dup", `{"ports":[{"name":"a","protocol":"TCP","port":80},{"name":"b","protocol":"TCP","port":80}]}`, "80"},
		{"/v1/nodes/node-3", `{"ips":["192.168.0.3"],"podCIDRs":["10.9.0.0/24"]}`, "not inside the cluster's pod CIDRs"},
	} {
		code, msg := a.call(t, "PUT", bad.path, bad.body)
		if code < 400 || code >= 500 || !strings.Contains(msg, bad.wantMsg) {
			t.Errorf("PUT %s: %d %q, want 4xx mentioning %q", bad.path, code, msg, bad.wantMsg)
		}
	}

	// Restart: every object survives and a watcher sees no delete.
	watchCtx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	rev := mustRev(t, remote)
	events := remote.Watch(watchCtx, v1.Prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	a.proc.Stop(t)
	a.start(t)
	after := keysUnder(t, remote, v1.Prefix)
	for k, v := range before {
		if k == v1.HeartbeatKey("eu") || strings.HasPrefix(k, v1.Prefix+"synced/") {
			continue // timestamps
		}
		if after[k] != v {
			t.Errorf("after restart %s = %q, was %q", k, after[k], v)
		}
	}
	if len(after) != len(before) {
		t.Errorf("after restart %d keys, before %d", len(after), len(before))
	}
	// The canary rewritten after restart marks the end of the restart's
	// publication; every event up to it must be a put.
	a.mustCall(t, "PUT", "/v1/nodes/marker", `{"ips":["192.168.0.99"]}`)
	for resp := range events {
		for _, ev := range resp.Events {
			if ev.Type == clientv3.EventTypeDelete {
				t.Errorf("watcher saw a delete of %s across the restart", ev.Kv.Key)
			}
			if string(ev.Kv.Key) == "trellis/v1/nodes/eu/marker" {
				stopWatch()
			}
		}
	}
	var stored bytes.Buffer
	json.Indent(&stored, []byte(a.mustCall(t, "GET", "/v1/endpoints", "")), "", " ")
	if !strings.Contains(stored.String(), "echo-b") {
		t.Errorf("registry lost endpoints across restart: %s", stored.String())
	}
}

func mustRev(t *testing.T, cli *clientv3.Client) int64 {
	t.Helper()
	resp, err := cli.Get(context.Background(), v1.Prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

// Missing or contradictory settings stop the server at start with a
// message naming the setting.
func TestAPIServerRefusesBadFlags(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the trellis binary; skipped in -short")
	}
	bin := testutil.BuildTrellis(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--cluster-id", "1", "--pod-cidrs", "10.1.0.0/16", "--state-dir", t.TempDir()}, "--cluster-name is required"},
		{[]string{"--cluster-name", "eu", "--cluster-id", "600", "--pod-cidrs", "10.1.0.0/16", "--state-dir", t.TempDir()}, "--cluster-id"},
		{[]string{"--cluster-name", "EU", "--cluster-id", "1", "--pod-cidrs", "10.1.0.0/16", "--state-dir", t.TempDir()}, "--cluster-name"},
		{[]string{"--cluster-name", "eu", "--cluster-id", "1", "--pod-cidrs", "10.1.0.1/16", "--state-dir", t.TempDir()}, "host bits"},
		{[]string{"--cluster-name", "eu", "--cluster-id", "1", "--pod-cidrs", "10.1.0.0/16"}, "--state-dir is required"},
		{[]string{"--cluster-name", "eu", "--cluster-id", "1", "--pod-cidrs", "10.1.0.0/16", "--state-dir", t.TempDir(), "--kubeconfig", "/x"}, "--kubeconfig is only used with --source kubernetes"},
	} {
		p := testutil.Start(t, bin, append([]string{"apiserver"}, tc.args...)...)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := p.Wait(ctx)
		cancel()
		if err == nil || !strings.Contains(p.Output(), tc.want) {
			t.Errorf("apiserver %v: exit %v, output %q; want failure mentioning %q", tc.args, err, p.Output(), tc.want)
		}
	}
}

// The credential model, as a client meets it: TLS verified with the
// cluster's server CA, every read authenticated, the Bearer scheme
// enforced, a node credential that may write only its node and the
// endpoints on it, and the admin API for the admin alone.
func TestAPIServerCredentials(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the trellis binary; skipped in -short")
	}
	a := newAPIServerProcess(t, testutil.BuildTrellis(t), "eu", 1)
	a.start(t)
	if !strings.HasPrefix(a.api.URL, "https://") {
		t.Fatalf("http.addr %s: want the HTTPS URL", a.api.URL)
	}
	a.mustCall(t, "PUT", "/v1/nodes/node-2", `{"ips":["192.168.0.2"],"podCIDRs":["10.1.2.0/24"]}`)
	a.mustCall(t, "PUT", "/v1/endpoints/10.1.2.10", `{"namespace":"default","pod":"other","node":"node-2","labels":{"app":"echo"}}`)

	// Nothing without a proper credential, the reads and /metrics included.
	for _, h := range []string{"", "Basic " + a.api.Token, a.api.Token, "Bearer", "Bearer  " + a.api.Token, "Bearer wrong-token"} {
		for _, path := range []string{"/v1/nodes", "/v1/endpoints", "/v1/services", "/v1/status", "/metrics", "/admin/v1/info"} {
			req, _ := http.NewRequest("GET", a.api.URL+path, nil)
			if h != "" {
				req.Header.Set("Authorization", h)
			}
			resp, err := a.api.Client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("GET %s with Authorization %q: %d, want 401", path, h, resp.StatusCode)
			}
		}
	}
	// The health endpoints answer anyone (probes have no credential).
	if code, _ := a.api.DoAs(t, "", "GET", "/readyz", ""); code != http.StatusOK {
		t.Errorf("GET /readyz without a credential: %d", code)
	}

	var cred v1.NodeCredential
	if err := json.Unmarshal([]byte(a.mustCall(t, "POST", "/admin/v1/nodes/node-1/credential", "")), &cred); err != nil || len(cred.Token) != 64 {
		t.Fatalf("node credential %+v, %v", cred, err)
	}
	as := func(method, path, body string) int {
		code, _ := a.api.DoAs(t, cred.Token, method, path, body)
		return code
	}
	for _, c := range []struct {
		method, path, body string
		want               int
	}{
		{"PUT", "/v1/nodes/node-1", `{"ips":["192.168.0.1"],"podCIDRs":["10.1.1.0/24"]}`, http.StatusNoContent},
		{"PUT", "/v1/endpoints/10.1.1.10", `{"namespace":"default","pod":"mine","node":"node-1","labels":{"app":"echo"}}`, http.StatusNoContent},
		{"GET", "/v1/endpoints", "", http.StatusOK},
		{"GET", "/metrics", "", http.StatusOK},
		{"PUT", "/v1/nodes/node-2", `{"ips":["192.168.0.2"],"podCIDRs":["10.1.2.0/24"]}`, http.StatusForbidden},
		{"DELETE", "/v1/nodes/node-2", "", http.StatusForbidden},
		{"PUT", "/v1/endpoints/10.1.2.11", `{"namespace":"default","pod":"x","node":"node-2"}`, http.StatusForbidden},
		{"PUT", "/v1/endpoints/10.1.2.10", `{"namespace":"default","pod":"taken","node":"node-1"}`, http.StatusForbidden},
		{"DELETE", "/v1/endpoints/10.1.2.10", "", http.StatusForbidden},
		{"PUT", "/v1/services/default/echo", `{"ports":[{"name":"http","protocol":"TCP","port":80,"targetPort":8080}],"frontendIPs":["10.96.0.10"],"selector":{"app":"echo"}}`, http.StatusForbidden},
		{"POST", "/admin/v1/remotes/us", "", http.StatusForbidden},
		{"POST", "/admin/v1/nodes/node-2/credential", "", http.StatusForbidden},
		{"DELETE", "/v1/endpoints/10.1.1.10", "", http.StatusNoContent},
	} {
		if got := as(c.method, c.path, c.body); got != c.want {
			t.Errorf("node-1's credential: %s %s: %d, want %d", c.method, c.path, got, c.want)
		}
	}

	// Issuing again replaces the credential; it survives a restart.
	var again v1.NodeCredential
	if err := json.Unmarshal([]byte(a.mustCall(t, "POST", "/admin/v1/nodes/node-1/credential", "")), &again); err != nil {
		t.Fatal(err)
	}
	if got := as("GET", "/v1/nodes", ""); got != http.StatusUnauthorized {
		t.Errorf("the replaced node credential: %d, want 401", got)
	}
	a.proc.Stop(t)
	a.start(t)
	if code, _ := a.api.DoAs(t, again.Token, "GET", "/v1/nodes", ""); code != http.StatusOK {
		t.Errorf("the node credential after a restart: %d", code)
	}

	// A client that does not trust the server CA gets no answer.
	resp, err := http.Get(a.api.URL + "/readyz")
	if err == nil {
		resp.Body.Close()
		t.Error("a client without the server CA reached the API")
	}
}

// The state dir's secrets: a token another user may read is made private,
// a weak one is refused with how to fix it.
func TestAPIServerStateDirHygiene(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the trellis binary; skipped in -short")
	}
	bin := testutil.BuildTrellis(t)
	a := newAPIServerProcess(t, bin, "eu", 1)
	token := filepath.Join(a.stateDir, v1.StateAdminTokenFile)
	if err := os.WriteFile(token, []byte("weak-token\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	p := testutil.Start(t, bin, "apiserver", "--cluster-name", "eu", "--cluster-id", "1", "--pod-cidrs", "10.1.0.0/16",
		"--state-dir", a.stateDir, "--etcd-listen", fmt.Sprintf("127.0.0.1:%d", a.etcdPort), "--http-listen", fmt.Sprintf("127.0.0.1:%d", a.httpPort))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err == nil || !strings.Contains(p.Output(), "remove the file and restart") {
		t.Fatalf("weak admin token: exit %v, output %q; want a refusal saying how to fix it", err, p.Output())
	}
	if info, err := os.Stat(token); err != nil || info.Mode().Perm() != 0o600 {
		t.Errorf("the readable token's mode after start: %v, %v; want 0600", info.Mode().Perm(), err)
	}
	if err := os.Remove(token); err != nil {
		t.Fatal(err)
	}
	a.start(t)
	if len(a.api.Token) != 64 {
		t.Errorf("generated admin token has %d characters, want 64 (32 random bytes)", len(a.api.Token))
	}
	key := filepath.Join(a.stateDir, "pki", "ca.key")
	a.proc.Stop(t)
	if err := os.Chmod(key, 0o640); err != nil {
		t.Fatal(err)
	}
	a.start(t)
	if info, err := os.Stat(key); err != nil || info.Mode().Perm() != 0o600 {
		t.Errorf("ca.key's mode after a start: %v, %v; want 0600", info.Mode().Perm(), err)
	}
	if !strings.Contains(a.proc.Output(), "made it private") {
		t.Error("no warning about the readable key")
	}
}

// kill -9 under load: every registration the server acknowledged (204)
// before it died is there after the restart, served and published, and
// nothing the server did not acknowledge is half there.
func TestAPIServerKillUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the trellis binary; skipped in -short")
	}
	a := newAPIServerProcess(t, testutil.BuildTrellis(t), "eu", 1)
	a.start(t)
	a.mustCall(t, "PUT", "/v1/nodes/node-1", `{"ips":["192.168.0.1"],"podCIDRs":["10.1.0.0/20"]}`)
	var creds v1.RemoteCredentials
	if err := json.Unmarshal([]byte(a.mustCall(t, "POST", "/admin/v1/remotes/us", "")), &creds); err != nil {
		t.Fatal(err)
	}

	const writers = 4
	var (
		mu    sync.Mutex
		acked = map[string]string{} // ip → the pod name acknowledged last
		stop  = make(chan struct{})
		wg    sync.WaitGroup
	)
	for w := range writers {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				// Each writer rewrites its own few endpoints over and over.
				ip := fmt.Sprintf("10.1.%d.%d", w, 10+i%8)
				pod := fmt.Sprintf("w%d-%d", w, i)
				body := fmt.Sprintf(`{"namespace":"default","pod":%q,"node":"node-1","labels":{"app":"echo"}}`, pod)
				req, _ := http.NewRequest("PUT", a.api.URL+"/v1/endpoints/"+ip, strings.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+a.api.Token)
				resp, err := a.api.Client.Do(req)
				if err != nil {
					continue // the server is down
				}
				resp.Body.Close()
				if resp.StatusCode == http.StatusNoContent {
					mu.Lock()
					acked[ip] = pod
					mu.Unlock()
				}
			}
		})
	}
	testutil.Eventually(t, 30*time.Second, "writes acknowledged", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(acked) >= writers*4
	})
	a.proc.Kill()
	close(stop)
	wg.Wait()
	a.start(t)

	var served []v1.EndpointView
	if err := json.Unmarshal([]byte(a.mustCall(t, "GET", "/v1/endpoints", "")), &served); err != nil {
		t.Fatal(err)
	}
	byIP := map[string]string{}
	for _, e := range served {
		byIP[e.IP.String()] = e.Pod
	}
	remote := remoteClient(t, creds)
	published := keysUnder(t, remote, v1.KindPrefix(v1.KindEndpoints, "eu"))
	for ip, pod := range acked {
		// A write may have landed after its acknowledgement was lost in
		// the crash; what counts is that an acknowledged one is never
		// older than the one the server holds: same writer, same or later
		// sequence number.
		got, ok := byIP[ip]
		if !ok {
			t.Errorf("endpoint %s acknowledged (pod %s) but not served after the restart", ip, pod)
			continue
		}
		if seq(got) < seq(pod) {
			t.Errorf("endpoint %s serves pod %s, older than the acknowledged %s", ip, got, pod)
		}
		if !strings.Contains(published[v1.EndpointKey("eu", netip.MustParseAddr(ip))], `"pod":"`+got+`"`) {
			t.Errorf("endpoint %s published as %s, served as pod %s", ip, published[v1.EndpointKey("eu", netip.MustParseAddr(ip))], got)
		}
	}
	t.Logf("%d endpoints acknowledged before the kill, %d served after", len(acked), len(served))
}

// seq is the sequence number of a pod name w<writer>-<seq>.
func seq(pod string) int {
	_, s, _ := strings.Cut(pod, "-")
	n, _ := strconv.Atoi(s)
	return n
}

// A selector service matching 1000 endpoints used to publish 727 of them
// (one value's 64 KiB) while every PUT said 204, and after a restart it was
// skipped. Now its backends travel in shards: the remote cluster reads all
// 1000, before and after a kill -9.
func TestAPIServerSelectorServiceOf1000Endpoints(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the trellis binary; skipped in -short")
	}
	a := newAPIServerProcess(t, testutil.BuildTrellis(t), "eu", 1)
	a.start(t)
	a.mustCall(t, "PUT", "/v1/nodes/node-1", `{"ips":["192.168.0.1"],"podCIDRs":["10.1.0.0/20"]}`)
	a.mustCall(t, "PUT", "/v1/services/default/echo", `{"ports":[{"name":"http","protocol":"TCP","port":80,"targetPort":8080}],
		"frontendIPs":["10.96.0.10"],"selector":{"app":"echo"},"annotations":{"trellis.io/global":"true"}}`)
	const endpoints = 1000
	want := map[netip.Addr]bool{}
	for i := range endpoints {
		ip := netip.AddrFrom4([4]byte{10, 1, byte(i / 250), byte(1 + i%250)})
		want[ip] = true
		a.mustCall(t, "PUT", "/v1/endpoints/"+ip.String(),
			fmt.Sprintf(`{"namespace":"default","pod":"echo-%d","node":"node-1","nodeIP":"192.168.0.1","labels":{"app":"echo"}}`, i))
	}
	var creds v1.RemoteCredentials
	if err := json.Unmarshal([]byte(a.mustCall(t, "POST", "/admin/v1/remotes/us", "")), &creds); err != nil {
		t.Fatal(err)
	}
	remote := remoteClient(t, creds)
	checkPublished := func(when string) {
		t.Helper()
		testutil.EventuallyNoError(t, 30*time.Second, "service published whole "+when, func() error {
			return publishedBackends(t, remote, "eu", "default", "echo", want)
		})
	}
	checkPublished("after the registrations")
	a.proc.Kill()
	a.start(t)
	checkPublished("after kill -9 and a restart")
}

// publishedBackends reads service ns/name of cluster as a remote agent
// would (its value, then every backend shard it lists at the listed
// generation) and compares its backends with want.
func publishedBackends(t *testing.T, cli *clientv3.Client, cluster, ns, name string, want map[netip.Addr]bool) error {
	key := v1.ServiceKey(cluster, ns, name)
	svc, err := v1.DecodeServiceEntry(key, []byte(keysUnder(t, cli, key)[key]))
	if err != nil {
		return err
	}
	backends := svc.Backends
	if len(svc.BackendShards) > 0 {
		shards := keysUnder(t, cli, v1.BackendShardPrefix(cluster, ns, name))
		for i, gen := range svc.BackendShards {
			k := v1.BackendShardKey(cluster, ns, name, i)
			sh, err := v1.DecodeBackendShardEntry(k, []byte(shards[k]))
			if err != nil {
				return err
			}
			if sh.Gen != gen {
				return fmt.Errorf("shard %d at generation %d, the service lists %d", i, sh.Gen, gen)
			}
			backends = append(backends, sh.Backends...)
		}
	}
	got := map[netip.Addr]bool{}
	for _, b := range backends {
		got[b.IP] = true
	}
	if len(got) != len(want) || len(backends) != len(want) {
		return fmt.Errorf("%d backends (%d distinct) in %d shards, want %d", len(backends), len(got), len(svc.BackendShards), len(want))
	}
	for ip := range want {
		if !got[ip] {
			return fmt.Errorf("backend %s missing", ip)
		}
	}
	return nil
}

// The encryption setting through the admin API: stored, published in the
// cluster-config, refused when invalid (nothing changes), kept across a
// restart (where it wins over --encryption), and listed with each node's
// published key.
func TestAPIServerEncryptionSetting(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the trellis binary; skipped in -short")
	}
	a := newAPIServerProcess(t, testutil.BuildTrellis(t), "eu", 1)
	a.start(t)
	const key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
	a.mustCall(t, "PUT", "/v1/nodes/node-1", `{"ips":["192.168.0.1"],"podCIDRs":["10.1.1.0/24"],"wireGuardPublicKey":"`+key+`"}`)
	a.mustCall(t, "PUT", "/v1/nodes/node-2", `{"ips":["192.168.0.2"],"podCIDRs":["10.1.2.0/24"]}`)
	if code, body := a.call(t, "PUT", "/v1/nodes/node-3", `{"ips":["192.168.0.3"],"podCIDRs":["10.1.3.0/24"],"wireGuardPublicKey":"`+key+`"}`); code != http.StatusBadRequest || !strings.Contains(body, "node node-1's already") {
		t.Fatalf("a node with node-1's key: %d %s, want 400 naming node-1", code, body)
	}
	var creds v1.RemoteCredentials
	if err := json.Unmarshal([]byte(a.mustCall(t, "POST", "/admin/v1/remotes/us", "")), &creds); err != nil {
		t.Fatal(err)
	}
	remote := remoteClient(t, creds)
	published := func() v1.EncryptionConfig {
		t.Helper()
		k := v1.ClusterConfigKey("eu")
		cc, err := v1.DecodeClusterConfigEntry(k, []byte(keysUnder(t, remote, k)[k]))
		if err != nil {
			t.Fatal(err)
		}
		return cc.Encryption
	}
	if got := published(); got != (v1.EncryptionConfig{}) {
		t.Fatalf("published at start: %+v, want off", got)
	}

	want := v1.EncryptionConfig{Type: v1.EncryptionWireGuard, Strict: true}
	a.mustCall(t, "PUT", "/admin/v1/encryption", `{"type":"wireguard","strict":true}`)
	if got := published(); got != want {
		t.Fatalf("published after enable: %+v, want %+v", got, want)
	}
	for _, bad := range []struct{ body, says string }{
		{`{"type":"tls"}`, "encryption.type"},
		{`{"type":"wireguard","strict":"yes"}`, "encryption request"},
		{`{"type":"wireguard","rotation":9}`, "unknown field"},
	} {
		if code, body := a.call(t, "PUT", "/admin/v1/encryption", bad.body); code != http.StatusBadRequest || !strings.Contains(body, bad.says) {
			t.Errorf("PUT %s: %d %s, want 400 naming %s", bad.body, code, body, bad.says)
		}
	}
	a.mustCall(t, "POST", "/admin/v1/encryption/rotate", "")
	want.Rotation = 1
	if got := published(); got != want {
		t.Fatalf("published after rotate: %+v, want %+v", got, want)
	}
	var st v1.EncryptionStatus
	if err := json.Unmarshal([]byte(a.mustCall(t, "GET", "/admin/v1/encryption", "")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Setting != want || len(st.Nodes) != 2 || st.Nodes[0].WireGuardPublicKey != key || st.Nodes[1].WireGuardPublicKey != "" {
		t.Fatalf("status %+v", st)
	}
	// A node's credential cannot change the setting.
	nodeCred := a.mustCall(t, "POST", "/admin/v1/nodes/node-2/credential", "")
	var cred v1.NodeCredential
	if err := json.Unmarshal([]byte(nodeCred), &cred); err != nil {
		t.Fatal(err)
	}
	if code, _ := a.api.DoAs(t, cred.Token, "PUT", "/admin/v1/encryption", `{"type":""}`); code != http.StatusForbidden {
		t.Fatalf("a node credential turning encryption off: %d, want 403", code)
	}

	// The stored setting survives a restart and wins over the flag.
	a.proc.Stop(t)
	a.start(t, "--encryption", "ipsec")
	if got := published(); got != want {
		t.Fatalf("published after a restart with --encryption ipsec: %+v, want the stored %+v", got, want)
	}
	a.mustCall(t, "PUT", "/admin/v1/encryption", `{"type":""}`)
	if got := published(); got != (v1.EncryptionConfig{Rotation: 1}) {
		t.Fatalf("published after disable: %+v", got)
	}
	if code, body := a.call(t, "POST", "/admin/v1/encryption/rotate", ""); code != http.StatusBadRequest || !strings.Contains(body, "encryption is off") {
		t.Fatalf("rotate while off: %d %s", code, body)
	}
}
