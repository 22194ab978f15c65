package lab

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/agent"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/tunnel"
)

// TestLabCompromisedCluster is the adversarial end-to-end test of the
// mesh's trust model. A third cluster, ap, joins the default lab; then,
// acting as ap compromised, the test writes rogue entries straight into
// ap's etcd with ap's own credentials, widens ap's cluster-config, and
// tries ap's credentials on eu's etcd. The other clusters must keep their
// traffic (lab verify stays green), their nodes' routes and socket LB maps
// must not change, every rogue entry must be counted by reason in `trellis
// status -o json` on their nodes, and ap's credentials must get nothing on
// eu's etcd beyond the read access eu issued to ap.
func TestLabCompromisedCluster(t *testing.T) {
	privtest.RequireRoot(t)
	r := newLabRun(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// ap's pod CIDR is 10.0.0.0/16, so that 10.0.0.0/15, the wider
	// prefix of the probe, starts inside it and covers eu's
	// 10.1.0.0/16: the case a check of the first address missed.
	topo := DefaultTopology()
	apCluster := StandardCluster("ap", 3, "ap", 1)
	apCluster.PodCIDR = "10.0.0.0/16"
	apCluster.Nodes[0].PodCIDR = "10.0.1.0/24"
	topo.Clusters = append(topo.Clusters, apCluster)
	topoFile := filepath.Join(t.TempDir(), "topology.yaml")
	data, err := yaml.Marshal(topo)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(topoFile, data, 0o600); err != nil {
		t.Fatal(err)
	}
	r.must(ctx, t, "up", "-f", topoFile)
	l, err := open(Options{Name: r.name, BaseDir: BaseDir}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer l.close()
	ap, err := l.lay.cluster("ap")
	if err != nil {
		t.Fatal(err)
	}
	eu, err := l.lay.cluster("eu")
	if err != nil {
		t.Fatal(err)
	}
	var observers []*nodeLayout // the nodes of the clusters ap attacks
	for _, c := range l.lay.clusters {
		if c.Name != "ap" {
			observers = append(observers, c.nodes...)
		}
	}
	requireGreen(ctx, t, r, "before the attack")
	before := make(map[string]string)
	for _, n := range observers {
		before[n.ref()] = datapathOf(t, n)
	}

	// ap's own etcd, as ap's root: everything a compromised API server can
	// write. Node IPs: eu/n1 and us/n1 are 192.168.100.101 and .111.
	apEtcd := etcdIn(ctx, t, ap.ns, readFile(t, filepath.Join(ap.stateDir, "etcd.addr")),
		filepath.Join(ap.stateDir, "pki", "ca.crt"), filepath.Join(ap.stateDir, "pki", "clients", "root.crt"), filepath.Join(ap.stateDir, "pki", "clients", "root.key"))
	rogueNode := func(name, ip, cidr string) v1.Node {
		return v1.Node{Cluster: "ap", Name: name, IPs: []netip.Addr{netip.MustParseAddr(ip)}, PodCIDRs: []netip.Prefix{netip.MustParsePrefix(cidr)}}
	}
	rogue := map[string]any{
		// A prefix wider than ap's 10.0.0.0/16, covering eu's pods.
		v1.NodeKey("ap", "wide"): rogueNode("wide", "192.168.100.129", "10.0.0.0/15"),
		// eu/n1's and us/n1's IPs as underlay.
		v1.NodeKey("ap", "stealer-eu"): rogueNode("stealer-eu", "192.168.100.101", "10.0.201.0/24"),
		v1.NodeKey("ap", "stealer-us"): rogueNode("stealer-us", "192.168.100.111", "10.0.202.0/24"),
		// A loopback underlay.
		v1.NodeKey("ap", "loop"): rogueNode("loop", "127.0.0.1", "10.0.203.0/24"),
		// eu's echo pod on eu/n1, as ap's.
		v1.EndpointKey("ap", netip.MustParseAddr("10.1.1.10")): v1.Endpoint{Cluster: "ap", IP: netip.MustParseAddr("10.1.1.10"),
			Identity: v1.MakeIdentity(3, 4242), NodeIP: netip.MustParseAddr("192.168.100.121"), Namespace: "default", Pod: "evil", Ready: true},
		// An identity with eu's cluster bits.
		v1.IdentityKey("ap", v1.MakeIdentity(1, 4242)): v1.Identity{Cluster: "ap", ID: v1.MakeIdentity(1, 4242),
			Labels: map[string]string{"k8s:app": "evil", "k8s:io.kubernetes.pod.namespace": "default"}},
	}
	for key, value := range rogue {
		putJSON(ctx, t, apEtcd, key, value)
	}

	// Every rogue entry counted by reason on every node of eu and us: n1
	// nodes see their own IP claimed, n2 nodes two IPs of other nodes.
	for _, n := range observers {
		want := map[string]int{
			clustermesh.ReasonOutsidePodCIDRs:  2, // the wide node, the endpoint
			clustermesh.ReasonForeignIdentity:  1,
			clustermesh.ReasonBadUnderlay:      1,
			clustermesh.ReasonUnderlayConflict: 2,
		}
		if n.Name == "n1" {
			want[clustermesh.ReasonUnderlayConflict], want[clustermesh.ReasonLocalNodeIP] = 1, 1
		}
		testutil.EventuallyNoError(t, time.Minute, "rogue entries counted on "+n.ref(), func() error {
			return wantCounted(ctx, r, n, "ap", want)
		})
	}

	// ap widens its cluster-config to 10.0.0.0/8: refused against its pin
	// everywhere, naming the field and both values.
	putJSON(ctx, t, apEtcd, v1.ClusterConfigKey("ap"), v1.ClusterConfig{Name: "ap", ID: 3, Region: "ap",
		PodCIDRs:     []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")},
		Capabilities: v1.Capabilities{SyncedCanaries: true, MaxConnectedClusters: 255}})
	for _, n := range observers {
		testutil.EventuallyNoError(t, time.Minute, "ap refused against its pin on "+n.ref(), func() error {
			st, err := statusOf(ctx, r, n)
			if err != nil {
				return err
			}
			cs := clusterOf(st, "ap")
			if want := "publishes pod CIDRs [10.0.0.0/8], but [10.0.0.0/16] were pinned"; !strings.Contains(cs.LastError, want) {
				return fmt.Errorf("ap's last error %q lacks %q", cs.LastError, want)
			}
			return nil
		})
	}

	requireGreen(ctx, t, r, "after the attack")
	for _, n := range observers {
		if after := datapathOf(t, n); after != before[n.ref()] {
			t.Errorf("%s's routes or socket LB maps changed under the attack:\nbefore:\n%s\nafter:\n%s", n.ref(), before[n.ref()], after)
		}
	}

	// ap's own etcd credentials are worth nothing on eu's etcd.
	euEtcd := eu.etcdEndpoint()
	for _, user := range []string{"root", "trellis-writer"} {
		err := tlsProbe(ctx, ap.ns, euEtcd, filepath.Join(ap.stateDir, "pki", "ca.crt"),
			filepath.Join(ap.stateDir, "pki", "clients", user+".crt"), filepath.Join(ap.stateDir, "pki", "clients", user+".key"))
		if err == nil {
			t.Errorf("ap's %s certificate was accepted by eu's etcd", user)
		}
	}
	// What eu issued to ap reads trellis/v1/ and nothing else, and writes
	// nothing.
	f := readClusterFile(t, filepath.Join(clustermesh.ClustersDir(ap.stateDir), "eu.yaml"))
	asAP := etcdFromFile(ctx, t, ap.ns, f)
	if resp, err := asAP.Get(ctx, v1.Prefix, clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil || resp.Count == 0 {
		t.Errorf("ap's remote certificate cannot read eu's published keys: %v", err)
	}
	for _, prefix := range []string{"trellis/registry/", "trellis/alloc/", "trellis/"} {
		if _, err := asAP.Get(ctx, prefix, clientv3.WithPrefix()); !errors.Is(err, rpctypes.ErrPermissionDenied) {
			t.Errorf("ap's remote certificate reading %s on eu: %v, want permission denied", prefix, err)
		}
	}
	if _, err := asAP.Put(ctx, v1.NodeKey("eu", "evil"), "{}"); !errors.Is(err, rpctypes.ErrPermissionDenied) {
		t.Errorf("ap's remote certificate writing on eu: %v, want permission denied", err)
	}
}

// requireGreen runs lab verify and fails the test on any failed check.
func requireGreen(ctx context.Context, t *testing.T, r *labRun, when string) {
	t.Helper()
	vr := r.verify(ctx, t)
	for _, c := range vr.Checks {
		if !c.OK {
			t.Errorf("lab verify %s: %s %s → %s (%s): %s", when, c.Kind, c.From, c.To, c.Target, c.Detail)
		}
	}
	if vr.Failed > 0 || vr.Passed == 0 {
		t.Fatalf("lab verify %s: %d passed, %d failed", when, vr.Passed, vr.Failed)
	}
}

// statusOf runs `trellis status -o json` against n's agent.
func statusOf(ctx context.Context, r *labRun, n *nodeLayout) (agent.Status, error) {
	// Exit 1 only says a cluster is not ready (ap may not be); the JSON is
	// what counts.
	out, _ := exec.CommandContext(ctx, r.bin, "status", "--socket", n.socket, "-o", "json").Output()
	var st agent.Status
	if err := json.Unmarshal(out, &st); err != nil {
		return st, fmt.Errorf("trellis status on %s: %w: %q", n.ref(), err, out)
	}
	return st, nil
}

func clusterOf(st agent.Status, name string) clustermesh.ClusterStatus {
	for _, c := range st.Clusters {
		if c.Name == name {
			return c
		}
	}
	return clustermesh.ClusterStatus{}
}

// wantCounted checks that n's agent counts at least want of cluster's
// entries, rejected or excluded, by reason.
func wantCounted(ctx context.Context, r *labRun, n *nodeLayout, cluster string, want map[string]int) error {
	st, err := statusOf(ctx, r, n)
	if err != nil {
		return err
	}
	cs := clusterOf(st, cluster)
	got := make(map[string]int)
	for reason, c := range cs.Rejected {
		got[reason] += int(c)
	}
	for reason, c := range cs.Excluded {
		got[reason] += c
	}
	for reason, w := range want {
		if got[reason] < w {
			return fmt.Errorf("%s counts %v of %s's entries, want at least %v", n.ref(), got, cluster, want)
		}
	}
	return nil
}

// datapathOf renders what a node's kernel holds for the mesh: the
// tunnel's routes (protocol 126) and the socket LB's service, slot and
// backend maps (not the per-connection maps, which traffic writes).
func datapathOf(t *testing.T, n *nodeLayout) string {
	t.Helper()
	var b strings.Builder
	ns, err := netns.GetFromName(n.ns)
	if err != nil {
		t.Fatalf("open netns %s: %v", n.ns, err)
	}
	defer ns.Close()
	h := privtest.NetlinkHandle(t, ns)
	routes, err := h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: tunnel.RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		t.Fatalf("routes of %s: %v", n.ref(), err)
	}
	var lines []string
	for _, rt := range routes {
		lines = append(lines, fmt.Sprintf("route %s via %s dev %d", rt.Dst, rt.Gw, rt.LinkIndex))
	}
	for _, name := range []string{"trellis_svc4", "trellis_slot4", "trellis_be4"} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(n.pinDir, name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			t.Fatalf("pinned map %s of %s: %v", name, n.ref(), err)
		}
		var k, v []byte
		it := m.Iterate()
		for it.Next(&k, &v) {
			lines = append(lines, name+" "+hex.EncodeToString(k)+" "+hex.EncodeToString(v))
		}
		err = it.Err()
		m.Close()
		if err != nil {
			t.Fatalf("dump %s of %s: %v", name, n.ref(), err)
		}
	}
	slices.Sort(lines)
	for _, l := range lines {
		b.WriteString(l + "\n")
	}
	return b.String()
}

// etcdEndpoint is where remote readers dial c's etcd.
func (c *clusterLayout) etcdEndpoint() string {
	return "https://" + netip.AddrPortFrom(c.ip, apiEtcdPort).String()
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(data))
}

func readClusterFile(t *testing.T, path string) clustermesh.ClusterFile {
	t.Helper()
	var f clustermesh.ClusterFile
	if err := yaml.Unmarshal([]byte(readFile(t, path)), &f); err != nil {
		t.Fatalf("cluster file %s: %v", path, err)
	}
	return f
}

// etcdIn is a bare etcd client whose connections are dialled inside
// namespace ns: the test acting as a cluster's own processes.
func etcdIn(ctx context.Context, t *testing.T, ns, endpoint, caFile, certFile, keyFile string) *clientv3.Client {
	t.Helper()
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	return etcdWith(ctx, t, ns, endpoint, caPEM, cert)
}

func etcdFromFile(ctx context.Context, t *testing.T, ns string, f clustermesh.ClusterFile) *clientv3.Client {
	t.Helper()
	cert, err := tls.X509KeyPair([]byte(f.Cert), []byte(f.Key))
	if err != nil {
		t.Fatal(err)
	}
	return etcdWith(ctx, t, ns, f.Endpoints[0], []byte(f.CA), cert)
}

func etcdWith(ctx context.Context, t *testing.T, ns, endpoint string, caPEM []byte, cert tls.Certificate) *clientv3.Client {
	t.Helper()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("no CA certificate")
	}
	c, err := clientv3.New(clientv3.Config{
		Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop(), Context: ctx,
		TLS: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return dialIn(ctx, ns, "tcp", addr)
		})},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// putJSON stores v as the API server would (api/v1's Encode): the rogue
// values are well formed, so what refuses them is the agents' checks.
func putJSON(ctx context.Context, t *testing.T, c *clientv3.Client, key string, v any) {
	t.Helper()
	data, err := v1.Encode(v)
	if err != nil {
		t.Fatalf("encode %s: %v", key, err)
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := c.Put(rctx, key, string(data)); err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
}

// tlsProbe opens a TLS connection to endpoint from namespace ns with the
// given client certificate and returns the server's refusal, or nil when
// the server accepted the certificate.
func tlsProbe(ctx context.Context, ns, endpoint, caFile, certFile, keyFile string) error {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	addr := strings.TrimPrefix(endpoint, "https://")
	raw, err := dialIn(ctx, ns, "tcp", addr)
	if err != nil {
		return err
	}
	host, _, _ := net.SplitHostPort(addr)
	// The server's certificate is eu's, signed by a CA ap does not hold:
	// skip verifying it, this probe is about what the server accepts.
	conn := tls.Client(raw, &tls.Config{ServerName: host, InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}, RootCAs: pool, NextProtos: []string{"h2"}})
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if err := conn.Handshake(); err != nil {
		return err
	}
	// With TLS 1.3 the server's verdict on the client certificate comes
	// after the client's side of the handshake: read it.
	var buf [1]byte
	if _, err := conn.Read(buf[:]); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil
		}
		return err
	}
	return nil
}
