package clustermesh

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	nip "net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver"
	"github.com/trellis-mesh/trellis/apiserver/etcdauth"
	"github.com/trellis-mesh/trellis/apiserver/pki"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/kvstore"
)

// testCluster is a real mesh API server (registry source, embedded etcd)
// running in this process.
type testCluster struct {
	name, cidr, region string
	id                 uint32
	stateDir           string
	etcdPort, httpPort int
	cancel             context.CancelFunc
	done               chan struct{}
}

func startCluster(t *testing.T, name string, id uint32, cidr, region string) *testCluster {
	t.Helper()
	c := &testCluster{name: name, id: id, cidr: cidr, region: region, stateDir: t.TempDir(),
		etcdPort: testutil.FreePort(t), httpPort: testutil.FreePort(t)}
	c.start(t)
	t.Cleanup(c.stop)
	return c
}

func (c *testCluster) start(t *testing.T) {
	t.Helper()
	srv, err := apiserver.New(apiserver.Config{
		ClusterName: c.name, ClusterID: c.id, PodCIDRs: []string{c.cidr}, Region: c.region, StateDir: c.stateDir,
		EtcdListen: fmt.Sprintf("127.0.0.1:%d", c.etcdPort), HTTPListen: fmt.Sprintf("127.0.0.1:%d", c.httpPort),
		// Plain HTTP on loopback: these tests are about what agents read;
		// the API's TLS and credentials have their own tests.
		HTTPPlaintext: true,
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c.cancel, c.done = cancel, make(chan struct{})
	go func() {
		defer close(c.done)
		if err := srv.Run(ctx); err != nil && ctx.Err() == nil {
			t.Errorf("apiserver %s: %v", c.name, err)
		}
	}()
	testutil.Eventually(t, 60*time.Second, c.name+" ready", func() bool {
		resp, err := http.Get(c.url("/readyz"))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

func (c *testCluster) stop() {
	if c.cancel != nil {
		c.cancel()
		<-c.done
		c.cancel = nil
	}
}

func (c *testCluster) url(path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d%s", c.httpPort, path)
}

func (c *testCluster) call(t *testing.T, method, path, body string) string {
	t.Helper()
	token, err := os.ReadFile(filepath.Join(c.stateDir, v1.StateAdminTokenFile))
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(method, c.url(path), strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		t.Fatalf("%s %s on %s: %s %s", method, path, c.name, resp.Status, out)
	}
	return string(out)
}

// pod registers an echo endpoint; octet picks the address in the cluster's
// CIDR (10.X.1.<octet>).
func (c *testCluster) pod(t *testing.T, octet int, ready bool) string {
	ip := strings.Replace(c.cidr, "0.0/16", fmt.Sprintf("1.%d", octet), 1)
	c.call(t, "PUT", "/v1/endpoints/"+ip, fmt.Sprintf(`{"namespace":"default","pod":"echo-%d","node":"node-1","nodeIP":"192.168.%d.1","ready":%v,"labels":{"app":"echo"}}`, octet, c.id, ready))
	return ip
}

func (c *testCluster) populate(t *testing.T, affinity string) {
	c.call(t, "PUT", "/v1/nodes/node-1", fmt.Sprintf(`{"ips":["192.168.%d.1"],"podCIDRs":["%s"]}`, c.id, strings.Replace(c.cidr, "0.0/16", "1.0/24", 1)))
	c.pod(t, 10, true)
	c.pod(t, 11, true)
	c.service(t, affinity)
}

func (c *testCluster) service(t *testing.T, affinity string) {
	c.call(t, "PUT", "/v1/services/default/echo", fmt.Sprintf(`{"ports":[{"name":"http","protocol":"TCP","port":80,"targetPort":8080}],
		"frontendIPs":["10.96.%d.10"],"selector":{"app":"echo"},"annotations":{"trellis.io/global":"true","trellis.io/affinity":%q}}`, c.id, affinity))
}

// clusterFile mints credentials on c for cluster reader.
func (c *testCluster) clusterFile(t *testing.T, reader string) ClusterFile {
	var creds v1.RemoteCredentials
	if err := json.Unmarshal([]byte(c.call(t, "POST", "/admin/v1/remotes/"+reader, "")), &creds); err != nil {
		t.Fatal(err)
	}
	return ClusterFile{Name: c.name, ID: v1.ClusterID(c.id), PodCIDRs: []netip.Prefix{netip.MustParsePrefix(c.cidr)},
		Endpoints: creds.Endpoints, CA: creds.CAPEM, Cert: creds.CertPEM, Key: creds.KeyPEM}
}

// writer is an etcd client with the cluster's own writer certificate, to
// play a compromised or buggy remote cluster.
func (c *testCluster) writer(t *testing.T) *clientv3.Client {
	return c.etcdAs(t, etcdauth.LocalWriterUser)
}

// etcdAs is an etcd client with one of the API server's local client
// certificates (root or the writer), on the etcd's internal listener
// (<state-dir>/etcd.addr): the front door on the public port admits
// remote readers only.
func (c *testCluster) etcdAs(t *testing.T, user string) *clientv3.Client {
	dir := filepath.Join(c.stateDir, "pki")
	tlsCfg, err := kvstore.LoadClientTLS(filepath.Join(dir, pki.CACertFile), filepath.Join(dir, "clients", user+".crt"), filepath.Join(dir, "clients", user+".key"))
	if err != nil {
		t.Fatal(err)
	}
	addr, err := os.ReadFile(filepath.Join(c.stateDir, "etcd.addr"))
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{strings.TrimSpace(string(addr))}, TLS: tlsCfg, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func startMesh(t *testing.T, local, dir string) *Mesh {
	t.Helper()
	m, err := New(Config{LocalCluster: local, ConfigDir: dir, PollInterval: 100 * time.Millisecond, MaxRetryDelay: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return m
}

func clusterStatus(m *Mesh, name string) ClusterStatus {
	for _, c := range m.Status().Clusters {
		if c.Name == name {
			return c
		}
	}
	return ClusterStatus{}
}

func echo(m *Mesh) *MergedService { return m.Snapshot().Services[ServiceName{"default", "echo"}] }

// backendClusters counts the chosen backends per cluster.
func backendClusters(m *Mesh) map[string]int {
	out := map[string]int{}
	if s := echo(m); s != nil {
		for _, b := range s.Backends {
			out[b.Cluster]++
		}
	}
	return out
}

func sameCounts(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func waitBackends(t *testing.T, m *Mesh, want map[string]int) {
	t.Helper()
	testutil.Eventually(t, 30*time.Second, fmt.Sprintf("backends %v", want), func() bool { return sameCounts(backendClusters(m), want) })
}

// The mesh from one agent's seat in eu: three clusters, a global service
// under each affinity, failover and back, a remote API server restart, a
// hijack attempt, a conflicting ID, a bad CA, and a removed file.
func TestMeshThreeClusters(t *testing.T) {
	if testing.Short() {
		t.Skip("runs three mesh API servers; skipped in -short")
	}
	eu := startCluster(t, "eu", 1, "10.1.0.0/16", "eu")
	us := startCluster(t, "us", 2, "10.2.0.0/16", "us")
	ap := startCluster(t, "ap", 3, "10.3.0.0/16", "ap")
	for _, c := range []*testCluster{eu, us, ap} {
		c.populate(t, "none")
	}
	dir := t.TempDir()
	for _, c := range []*testCluster{eu, us, ap} {
		if err := WriteClusterFile(dir, c.clusterFile(t, "eu")); err != nil {
			t.Fatal(err)
		}
	}
	m := startMesh(t, "eu", dir)
	testutil.Eventually(t, 30*time.Second, "all clusters ready", func() bool {
		for _, n := range []string{"eu", "us", "ap"} {
			if !clusterStatus(m, n).Ready {
				return false
			}
		}
		return true
	})
	st := clusterStatus(m, "us")
	if !st.Connected || st.ClusterID != 2 || st.Entries["endpoints"] != 2 || len(st.SyncedKinds) != 4 {
		t.Errorf("status of us = %+v", st)
	}

	// affinity none: the union.
	waitBackends(t, m, map[string]int{"eu": 2, "us": 2, "ap": 2})
	if s := echo(m); len(s.FrontendIPs) != 1 || s.FrontendIPs[0].String() != "10.96.1.10" {
		t.Errorf("frontends = %v, want eu's own VIP", s.FrontendIPs)
	}
	if snap := m.Snapshot(); len(snap.AllNodes()) != 3 {
		t.Errorf("nodes = %d, want 3", len(snap.AllNodes()))
	}
	// affinity local: eu only; remote: the others.
	eu.service(t, "local")
	waitBackends(t, m, map[string]int{"eu": 2})
	eu.service(t, "remote")
	waitBackends(t, m, map[string]int{"us": 2, "ap": 2})

	// Failover with affinity local: eu's pods turn unready, traffic goes
	// to the remotes; back when they are ready again.
	eu.service(t, "local")
	waitBackends(t, m, map[string]int{"eu": 2})
	eu.pod(t, 10, false)
	eu.pod(t, 11, false)
	waitBackends(t, m, map[string]int{"us": 2, "ap": 2})
	eu.pod(t, 10, true)
	waitBackends(t, m, map[string]int{"eu": 1})
	eu.pod(t, 11, true)
	waitBackends(t, m, map[string]int{"eu": 2})
	eu.service(t, "none")
	waitBackends(t, m, map[string]int{"eu": 2, "us": 2, "ap": 2})

	// A remote API server restart: state kept throughout, no deletes.
	ch, unsub := m.Subscribe()
	defer unsub()
	stopWatching := make(chan struct{})
	lost := make(chan string, 100)
	go func() {
		for {
			select {
			case <-stopWatching:
				return
			case <-ch:
				snap := m.Snapshot()
				if n := backendClusters(m)["us"]; n != 2 {
					lost <- fmt.Sprintf("us backends %d at version %d", n, snap.Version)
				}
				if n := len(snap.IPCache["us"]); n != 2 {
					lost <- fmt.Sprintf("us ipcache %d at version %d", n, snap.Version)
				}
			}
		}
	}()
	us.stop()
	time.Sleep(500 * time.Millisecond)
	if n := backendClusters(m)["us"]; n != 2 {
		t.Errorf("while us is down the agent serves %d of its backends, want the last known 2", n)
	}
	us.start(t)
	us.pod(t, 12, true)
	waitBackends(t, m, map[string]int{"eu": 2, "us": 3, "ap": 2})
	close(stopWatching)
	us.call(t, "DELETE", "/v1/endpoints/10.2.1.12", "")
	waitBackends(t, m, map[string]int{"eu": 2, "us": 2, "ap": 2})
	select {
	case msg := <-lost:
		// Only the added pod may change us's counts after the restart.
		if !strings.Contains(msg, "us backends 3") && !strings.Contains(msg, "ipcache 3") {
			t.Errorf("state dropped across the remote restart: %s", msg)
		}
	default:
	}

	// Hijack attempts by us: an endpoint outside its pod CIDRs, an identity
	// with eu's cluster bits, an endpoint under eu's name.
	w := us.writer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	evil := []struct{ key, value string }{
		{"trellis/v1/endpoints/us/10.1.1.10", `{"v":1,"cluster":"us","ip":"10.1.1.10","identity":131073,"nodeIP":"192.168.2.1"}`},
		{"trellis/v1/identities/us/65537", `{"v":1,"cluster":"us","id":65537,"labels":{"k8s:app":"evil"}}`},
		{"trellis/v1/endpoints/us/10.2.9.9", `{"v":1,"cluster":"eu","ip":"10.2.9.9","identity":65537,"nodeIP":"192.168.2.1"}`},
	}
	for _, e := range evil {
		if _, err := w.Put(ctx, e.key, e.value); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, 10*time.Second, "hijacks counted", func() bool {
		r := clusterStatus(m, "us").Rejected
		return r[ReasonOutsidePodCIDRs] == 1 && r[ReasonForeignIdentity] == 1 && r["key-mismatch"] == 1
	})
	if e, ok := m.Snapshot().LookupIP(nip.MustParseAddr("10.1.1.10")); !ok || e.Cluster != "eu" {
		t.Errorf("10.1.1.10 maps to %+v, want eu's pod untouched", e)
	}
	if _, ok := m.Snapshot().LookupIP(nip.MustParseAddr("10.2.9.9")); ok {
		t.Error("an endpoint claiming another cluster was merged")
	}

	// A cluster whose pinned ID is already in use is refused and says
	// why; us, admitted before, keeps running.
	dup := startCluster(t, "dup", 2, "10.9.0.0/16", "eu")
	if err := WriteClusterFile(dir, dup.clusterFile(t, "eu")); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "conflict in status", func() bool {
		return strings.Contains(clusterStatus(m, "dup").LastError, "dup.yaml shares pinned cluster ID 2 with us")
	})
	if st := clusterStatus(m, "us"); !st.Ready {
		t.Errorf("us lost its session to a conflicting file: %+v", st)
	}
	if err := RemoveClusterFile(dir, "dup"); err != nil {
		t.Fatal(err)
	}
	// A cluster file with the wrong CA shows the TLS cause.
	bad := dup.clusterFile(t, "eu")
	bad.Name, bad.ID, bad.PodCIDRs = "badca", 9, []nip.Prefix{nip.MustParsePrefix("10.99.0.0/16")}
	bad.CA = us.clusterFile(t, "eu").CA
	if err := WriteClusterFile(dir, bad); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "TLS cause in status", func() bool {
		return strings.Contains(clusterStatus(m, "badca").LastError, "certificate signed by unknown authority")
	})

	// Removing a cluster's file drains it.
	if err := RemoveClusterFile(dir, "ap"); err != nil {
		t.Fatal(err)
	}
	waitBackends(t, m, map[string]int{"eu": 2, "us": 2})
	snap := m.Snapshot()
	if len(snap.IPCache["ap"]) != 0 || len(snap.Nodes["ap"]) != 0 {
		t.Errorf("ap not drained: %d ipcache entries, %d nodes", len(snap.IPCache["ap"]), len(snap.Nodes["ap"]))
	}
	if clusterStatus(m, "ap").Name != "" {
		t.Error("ap still listed in status")
	}
}

// A compaction while the agent is cut off from a remote: the agent keeps
// the remote's state, relists when it is back, and removes exactly what
// vanished.
func TestMeshCompactionDuringDisconnect(t *testing.T) {
	if testing.Short() {
		t.Skip("runs mesh API servers; skipped in -short")
	}
	eu := startCluster(t, "eu", 1, "10.1.0.0/16", "eu")
	us := startCluster(t, "us", 2, "10.2.0.0/16", "us")
	eu.populate(t, "none")
	us.populate(t, "none")
	dir := t.TempDir()
	if err := WriteClusterFile(dir, eu.clusterFile(t, "eu")); err != nil {
		t.Fatal(err)
	}
	p := testutil.NewProxy(t, fmt.Sprintf("127.0.0.1:%d", us.etcdPort))
	f := us.clusterFile(t, "eu")
	f.Endpoints = []string{"https://" + p.Addr()}
	if err := WriteClusterFile(dir, f); err != nil {
		t.Fatal(err)
	}
	m := startMesh(t, "eu", dir)
	waitBackends(t, m, map[string]int{"eu": 2, "us": 2})

	p.Cut()
	us.call(t, "DELETE", "/v1/endpoints/10.2.1.11", "")
	us.pod(t, 12, true)
	root := us.etcdAs(t, etcdauth.RootUser)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := root.Get(ctx, "trellis/v1/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := root.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if got := backendClusters(m)["us"]; got != 2 {
		t.Fatalf("while cut off the agent serves %d us backends, want the last known 2", got)
	}

	ch, unsub := m.Subscribe()
	defer unsub()
	p.Restore()
	deadline := time.After(30 * time.Second)
	for {
		snap := m.Snapshot()
		if _, ok := snap.IPCache["us"][nip.MustParseAddr("10.2.1.10")]; !ok {
			t.Fatal("the unchanged pod 10.2.1.10 was dropped during the relist")
		}
		_, has11 := snap.IPCache["us"][nip.MustParseAddr("10.2.1.11")]
		_, has12 := snap.IPCache["us"][nip.MustParseAddr("10.2.1.12")]
		if !has11 && has12 && sameCounts(backendClusters(m), map[string]int{"eu": 2, "us": 2}) {
			m.mu.Lock()
			r := m.remotes["us"]
			m.mu.Unlock()
			r.mu.Lock()
			relists := r.stores.endpoints.Stats().Relists
			r.mu.Unlock()
			if relists == 0 {
				t.Error("caught up without a relist: the compaction was not exercised")
			}
			break
		}
		select {
		case <-ch:
		case <-time.After(200 * time.Millisecond):
		case <-deadline:
			t.Fatalf("agent did not catch up after the compaction: ipcache %v", snap.IPCache["us"])
		}
	}
}
