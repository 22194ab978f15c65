package apiserver_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/trellis-mesh/trellis/api/client"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver"
	"github.com/trellis-mesh/trellis/apiserver/etcdauth"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/internal/etcdchild"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/kvstore"
)

// When one etcd is not enough: the API server on an external three-member
// etcd cluster (TLS, client certificates) loses the cluster's leader to a
// kill -9 in the middle of a registration load. Every acknowledged
// registration survives, in etcd and in what the API server serves; a
// remote agent reading the cluster with a certificate of its own keeps its
// state and sees no delete; the API server is ready again once a new
// leader is elected.
//
// There is no front door with an external etcd and the API server manages
// no etcd users: the operator does, here with the users and roles the
// embedded etcd would have (etcdauth), and certificates of the etcd
// cluster's own CA.
func TestExternalEtcdClusterLosesItsLeader(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a three-member etcd cluster and the trellis binary; skipped in -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cluster := etcdchild.StartCluster(t, 3)
	endpoints := cluster.Endpoints()

	// The operator's part: users, roles, auth on; one certificate each.
	rootCert, rootKey := cluster.ClientCert(t, etcdauth.RootUser)
	rootTLS, err := kvstore.LoadClientTLS(cluster.CAFile, rootCert, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	admin, err := kvstore.NewClient(kvstore.Config{Endpoints: endpoints, TLS: rootTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if err := etcdauth.Ensure(ctx, admin.Auth()); err != nil {
		t.Fatalf("set up etcd users and roles: %v", err)
	}
	raw, err := clientv3.New(clientv3.Config{Endpoints: endpoints, TLS: rootTLS, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	writerCert, writerKey := cluster.ClientCert(t, etcdauth.LocalWriterUser)
	readerCert, readerKey := cluster.ClientCert(t, etcdauth.RemoteReaderUser)

	stateDir := t.TempDir()
	proc := testutil.Start(t, testutil.BuildTrellis(t), "apiserver",
		"--cluster-name", "eu", "--cluster-id", "1", "--pod-cidrs", "10.1.0.0/16", "--state-dir", stateDir,
		"--etcd-endpoints", strings.Join(endpoints, ","), "--etcd-ca-file", cluster.CAFile,
		"--etcd-cert-file", writerCert, "--etcd-key-file", writerKey,
		"--http-listen", fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)), "--log-level", "debug")
	var api *client.Client
	testutil.EventuallyNoError(t, 60*time.Second, "the API server ready", func() error {
		if api == nil {
			if api, err = client.FromStateDir(stateDir, nil); err != nil {
				return err
			}
		}
		return api.Ready(ctx)
	})

	// The remote agent, with its own certificate, read-only on trellis/v1/.
	caPEM, _ := os.ReadFile(cluster.CAFile)
	certPEM, _ := os.ReadFile(readerCert)
	keyPEM, _ := os.ReadFile(readerKey)
	configDir := t.TempDir()
	if err := clustermesh.WriteClusterFile(configDir, clustermesh.ClusterFile{
		Name: "eu", ID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")},
		Endpoints: endpoints, CA: string(caPEM), Cert: string(certPEM), Key: string(keyPEM),
	}); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	mesh, err := clustermesh.New(clustermesh.Config{LocalCluster: "us", ConfigDir: configDir,
		PollInterval: 100 * time.Millisecond, MaxRetryDelay: time.Second, Metrics: kvstore.NewMetrics(reg)})
	if err != nil {
		t.Fatal(err)
	}
	meshCtx, stopMesh := context.WithCancel(ctx)
	meshDone := make(chan struct{})
	go func() { defer close(meshDone); mesh.Run(meshCtx) }()
	defer func() { stopMesh(); <-meshDone }()
	watch := watchEndpoints(mesh)
	defer watch.stop()

	node := v1.NodeRequest{Name: "n1", IPs: []netip.Addr{netip.MustParseAddr("192.168.1.1")}, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/20")}}
	if err := api.PutNode(ctx, node); err != nil {
		t.Fatal(err)
	}

	// The load: a few clients registering endpoints in a loop. A
	// registration is acknowledged when PUT answers 204 (err == nil).
	load := newRegistrations()
	loadCtx, stopLoad := context.WithCancel(ctx)
	var loadWG sync.WaitGroup
	for g := range 4 {
		loadWG.Add(1)
		go func() {
			defer loadWG.Done()
			for n := 0; loadCtx.Err() == nil && n < 250; n++ {
				ip := netip.AddrFrom4([4]byte{10, 1, byte(g), byte(n + 1)})
				ready := true
				rctx, cancel := context.WithTimeout(loadCtx, 20*time.Second)
				err := api.PutEndpoint(rctx, v1.EndpointRequest{IP: ip, Namespace: "load", Pod: fmt.Sprintf("pod-%d-%d", g, n),
					Node: "n1", NodeIP: node.IPs[0], Ready: &ready, Labels: map[string]string{"app": "load"}})
				cancel()
				load.done(ip, err)
			}
		}()
	}
	defer func() { stopLoad(); loadWG.Wait() }()
	testutil.Eventually(t, 60*time.Second, "40 registrations acknowledged before the kill", func() bool { return load.count() >= 40 })

	// kill -9 the leader, found through the maintenance Status API.
	leader, leaderID := findLeader(t, ctx, raw, cluster)
	ackedBefore := load.count()
	readiness := pollReadiness(ctx, api)
	killed := time.Now()
	cluster.Kill(t, leader)
	t.Logf("killed etcd leader %s (pid %d) with %d registrations acknowledged", leader.Name, leader.PID(), ackedBefore)

	var elected, firstAck time.Duration
	testutil.EventuallyNoError(t, 60*time.Second, "a new leader", func() error {
		for _, m := range cluster.Members() {
			if m == leader {
				continue
			}
			sctx, cancel := context.WithTimeout(ctx, time.Second)
			st, err := raw.Status(sctx, m.ClientURL)
			cancel()
			if err != nil {
				return err
			}
			if st.Leader != 0 && st.Leader != leaderID {
				elected = time.Since(killed)
				return nil
			}
		}
		return errors.New("no leader among the survivors")
	})
	electedAt := killed.Add(elected)
	testutil.Eventually(t, 60*time.Second, "/readyz 200 after the new leader's election", func() bool {
		_, ok := readiness.firstOKAfter(electedAt)
		return ok
	})
	testutil.Eventually(t, 60*time.Second, "40 more registrations acknowledged after the kill", func() bool {
		if firstAck == 0 && load.count() > ackedBefore {
			firstAck = time.Since(killed)
		}
		return load.count() >= ackedBefore+40
	})
	readiness.stop()
	readyAt, _ := readiness.firstOKAfter(electedAt)
	notReady, span := readiness.failuresAfter(killed)
	notReadyText := "always 200"
	if notReady > 0 {
		notReadyText = fmt.Sprintf("%d answers other than 200, %s to %s after the kill", notReady, span[0].Round(time.Millisecond), span[1].Round(time.Millisecond))
	}
	t.Logf("after the kill: new leader after %s; /readyz %s, and 200 again %s after the kill; first acknowledgement after %s",
		elected.Round(time.Millisecond), notReadyText, readyAt.Sub(killed).Round(time.Millisecond), firstAck.Round(time.Millisecond))
	stopLoad()
	loadWG.Wait()
	acked, failed := load.result()
	t.Logf("%d registrations acknowledged, %d not", len(acked), len(failed))
	for _, err := range failed {
		t.Logf("not acknowledged (may or may not have landed): %v", err)
	}

	// Every acknowledged registration is in etcd: its record at once
	// (the registry writes synchronously), its published entry once the
	// publisher caught up.
	records := keysOf(t, ctx, raw, "trellis/registry/eu/endpoints/")
	for ip := range acked {
		if !records["trellis/registry/eu/endpoints/"+ip.String()] {
			t.Errorf("acknowledged endpoint %s has no registry record in etcd", ip)
		}
	}
	testutil.EventuallyNoError(t, 60*time.Second, "every acknowledged endpoint published in etcd", func() error {
		published := keysOf(t, ctx, raw, v1.KindPrefix(v1.KindEndpoints, "eu"))
		return missing(acked, func(ip netip.Addr) bool { return published[v1.EndpointKey("eu", ip)] })
	})
	// ... served by the API server ...
	served, err := api.Endpoints(ctx)
	if err != nil {
		t.Fatal(err)
	}
	servedIPs := make(map[netip.Addr]bool)
	for _, e := range served {
		servedIPs[e.IP] = true
	}
	if err := missing(acked, func(ip netip.Addr) bool { return servedIPs[ip] }); err != nil {
		t.Errorf("GET /v1/endpoints: %v", err)
	}
	// ... and seen by the remote agent, which deleted nothing.
	testutil.EventuallyNoError(t, 60*time.Second, "every acknowledged endpoint in the remote agent's snapshot", func() error {
		ipc := mesh.Snapshot().IPCache["eu"]
		return missing(acked, func(ip netip.Addr) bool { _, ok := ipc[ip]; return ok })
	})
	if gone := watch.vanished(); len(gone) > 0 {
		t.Errorf("the remote agent's snapshots lost %d endpoints it had seen: %v", len(gone), gone)
	}
	deletes := deleteEvents(t, reg)
	if deletes != 0 {
		t.Errorf("the remote agent's stores delivered %v delete events; nothing was deleted", deletes)
	}
	t.Logf("the remote agent holds all %d acknowledged endpoints; delete events seen: %v; endpoints lost from a snapshot: %d",
		len(acked), deletes, len(watch.vanished()))
	if err := api.Ready(ctx); err != nil {
		t.Errorf("/readyz at the end: %v", err)
	}

	// The heartbeat lives on a lease (renewals are no writes), which the
	// server leaves to expire when it stops: a restart within the TTL
	// shows readers no delete.
	hb, err := raw.Get(ctx, v1.HeartbeatKey("eu"))
	if err != nil || len(hb.Kvs) != 1 || hb.Kvs[0].Lease == 0 {
		t.Fatalf("heartbeat key: %v %v, want it on a lease", hb, err)
	}
	if ttl, err := raw.TimeToLive(ctx, clientv3.LeaseID(hb.Kvs[0].Lease)); err != nil || ttl.GrantedTTL != int64(apiserver.HeartbeatTTL.Seconds()) {
		t.Errorf("heartbeat lease: %+v %v, want a TTL of %s", ttl, err, apiserver.HeartbeatTTL)
	}
	proc.Stop(t)
	if after, err := raw.Get(ctx, v1.HeartbeatKey("eu")); err != nil || len(after.Kvs) != 1 || after.Kvs[0].Lease != hb.Kvs[0].Lease {
		t.Errorf("heartbeat key after the API server stopped: %v %v, want it still there on its lease until the lease expires", after, err)
	}
}

// readinessLog is /readyz polled every 100 ms: when each answer came
// and whether it was 200.
type readinessLog struct {
	stop func()

	mu      sync.Mutex
	answers []readyAnswer
}

type readyAnswer struct {
	at time.Time
	ok bool
}

func pollReadiness(ctx context.Context, api *client.Client) *readinessLog {
	l := &readinessLog{}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			rctx, c := context.WithTimeout(ctx, 5*time.Second)
			err := api.Ready(rctx)
			c()
			if ctx.Err() != nil {
				return
			}
			l.mu.Lock()
			l.answers = append(l.answers, readyAnswer{at: time.Now(), ok: err == nil})
			l.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	l.stop = func() { cancel(); <-done }
	return l
}

// firstOKAfter is the time of the first 200 answered after t.
func (l *readinessLog) firstOKAfter(t time.Time) (time.Time, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, a := range l.answers {
		if a.ok && a.at.After(t) {
			return a.at, true
		}
	}
	return time.Time{}, false
}

// failuresAfter counts the answers other than 200 after t and the span
// from the first to the last, relative to t.
func (l *readinessLog) failuresAfter(t time.Time) (n int, span [2]time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, a := range l.answers {
		if a.ok || !a.at.After(t) {
			continue
		}
		if n == 0 {
			span[0] = a.at.Sub(t)
		}
		span[1] = a.at.Sub(t)
		n++
	}
	return n, span
}

// registrations records the load's outcome.
type registrations struct {
	mu     sync.Mutex
	acked  map[netip.Addr]bool
	failed []error
}

func newRegistrations() *registrations { return &registrations{acked: make(map[netip.Addr]bool)} }

func (r *registrations) done(ip netip.Addr, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err == nil {
		r.acked[ip] = true
	} else if !errors.Is(err, context.Canceled) {
		r.failed = append(r.failed, fmt.Errorf("%s: %w", ip, err))
	}
}

func (r *registrations) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.acked)
}

func (r *registrations) result() (map[netip.Addr]bool, []error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.acked, r.failed
}

// missing names the IPs of want that has does not hold.
func missing(want map[netip.Addr]bool, has func(netip.Addr) bool) error {
	var out []string
	for ip := range want {
		if !has(ip) {
			out = append(out, ip.String())
		}
	}
	if len(out) > 0 {
		return fmt.Errorf("%d of %d missing: %v", len(out), len(want), out)
	}
	return nil
}

// findLeader asks every member for its status and returns the one that
// leads, and its member ID.
func findLeader(t *testing.T, ctx context.Context, raw *clientv3.Client, cluster *etcdchild.Cluster) (*etcdchild.Member, uint64) {
	t.Helper()
	var leader *etcdchild.Member
	var id uint64
	testutil.EventuallyNoError(t, 30*time.Second, "the etcd leader", func() error {
		for _, m := range cluster.Members() {
			sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			st, err := raw.Status(sctx, m.ClientURL)
			cancel()
			if err != nil {
				return fmt.Errorf("status of %s: %w", m.Name, err)
			}
			if st.Leader != 0 && st.Leader == st.Header.MemberId {
				leader, id = m, st.Leader
				return nil
			}
		}
		return errors.New("no member says it leads")
	})
	return leader, id
}

func keysOf(t *testing.T, ctx context.Context, raw *clientv3.Client, prefix string) map[string]bool {
	t.Helper()
	gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := raw.Get(gctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatalf("get %s: %v", prefix, err)
	}
	out := make(map[string]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out[string(kv.Key)] = true
	}
	return out
}

// deleteEvents sums the delete events every WatchStore delivered.
func deleteEvents(t *testing.T, reg *prometheus.Registry) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != "trellis_kvstore_events_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "type" && l.GetValue() == "delete" {
					n += m.GetCounter().GetValue()
				}
			}
		}
	}
	return n
}

// endpointWatch follows the remote agent's snapshots and remembers every
// endpoint of cluster eu that one showed and a later one no longer did.
type endpointWatch struct {
	stop func()

	mu   sync.Mutex
	seen map[netip.Addr]bool
	gone map[netip.Addr]bool
}

func watchEndpoints(m *clustermesh.Mesh) *endpointWatch {
	w := &endpointWatch{seen: make(map[netip.Addr]bool), gone: make(map[netip.Addr]bool)}
	ch, unsubscribe := m.Subscribe()
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			select {
			case <-done:
				return
			case <-ch:
			}
			ipc := m.Snapshot().IPCache["eu"]
			w.mu.Lock()
			for ip := range w.seen {
				if _, ok := ipc[ip]; !ok {
					w.gone[ip] = true
				}
			}
			for ip := range ipc {
				w.seen[ip] = true
			}
			w.mu.Unlock()
		}
	}()
	w.stop = func() { close(done); <-finished; unsubscribe() }
	return w
}

func (w *endpointWatch) vanished() []netip.Addr {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []netip.Addr
	for ip := range w.gone {
		out = append(out, ip)
	}
	return out
}
