package clustermesh

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/kvstore"
)

// rawCluster is a bare etcd that a test writes a cluster's keys into
// directly, to play publishers the API server would never be.
type rawCluster struct {
	name string
	cli  *clientv3.Client
	url  string
}

func startRawCluster(t *testing.T, name string) *rawCluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	cli, err := clientv3.New(clientv3.Config{Endpoints: e.Endpoints(), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return &rawCluster{name: name, cli: cli, url: e.Endpoints()[0]}
}

func (c *rawCluster) put(t *testing.T, key string, v any) {
	t.Helper()
	var data string
	if s, ok := v.(string); ok {
		data = s
	} else {
		b, err := v1.Encode(v)
		if err != nil {
			t.Fatal(err)
		}
		data = string(b)
	}
	if _, err := c.cli.Put(context.Background(), key, data); err != nil {
		t.Fatal(err)
	}
}

// publish writes a cluster with one endpoint under the given ID, and the
// canaries.
func (c *rawCluster) publish(t *testing.T, id v1.ClusterID, cidr string) {
	c.put(t, v1.ClusterConfigKey(c.name), v1.ClusterConfig{Name: c.name, ID: id, PodCIDRs: []netip.Prefix{netip.MustParsePrefix(cidr)},
		Capabilities: v1.Capabilities{SyncedCanaries: true, MaxConnectedClusters: 255}})
	ip := netip.MustParsePrefix(cidr).Addr().Next()
	c.put(t, v1.EndpointKey(c.name, ip), v1.Endpoint{Cluster: c.name, IP: ip, Identity: v1.MakeIdentity(id, 7), NodeIP: netip.MustParseAddr("192.168.0.1")})
	for _, k := range v1.SyncedKinds() {
		c.put(t, v1.SyncedKey(c.name, k), string(v1.EncodeTimestamp(time.Now())))
	}
}

// pinnedFile is c's cluster file pinning id and cidr.
func (c *rawCluster) pinnedFile(id v1.ClusterID, cidr string) ClusterFile {
	return ClusterFile{Name: c.name, ID: id, PodCIDRs: []netip.Prefix{netip.MustParsePrefix(cidr)}, Endpoints: []string{c.url}}
}

// A cluster whose published ID stops matching its pin is refused and keeps
// what it had: a compromised cluster cannot switch identity spaces. Once
// the operator connects it again (a new pin), it is drained and
// re-admitted under the new ID: entries carrying the old ID's identity
// bits do not survive.
func TestMeshClusterIDChangeDrains(t *testing.T) {
	local := startRawCluster(t, "eu")
	local.publish(t, 1, "10.1.0.0/16")
	remote := startRawCluster(t, "us")
	remote.publish(t, 2, "10.2.0.0/16")
	dir := t.TempDir()
	for _, f := range []ClusterFile{local.pinnedFile(1, "10.1.0.0/16"), remote.pinnedFile(2, "10.2.0.0/16")} {
		if err := WriteClusterFile(dir, f); err != nil {
			t.Fatal(err)
		}
	}
	m := startMesh(t, "eu", dir)
	ip := netip.MustParseAddr("10.2.0.1")
	testutil.Eventually(t, 30*time.Second, "us endpoint merged", func() bool {
		e, ok := m.Snapshot().LookupIP(ip)
		return ok && e.Identity.ClusterID() == 2
	})

	// us publishes ID 5: refused against its pin, its entries kept.
	remote.put(t, v1.ClusterConfigKey("us"), v1.ClusterConfig{Name: "us", ID: 5, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16")},
		Capabilities: v1.Capabilities{SyncedCanaries: true, MaxConnectedClusters: 255}})
	testutil.Eventually(t, 30*time.Second, "the ID change refused against the pin", func() bool {
		st := clusterStatus(m, "us")
		return strings.Contains(st.LastError, "publishes cluster ID 5, but 2 was pinned")
	})
	if e, ok := m.Snapshot().LookupIP(ip); !ok || e.Identity.ClusterID() != 2 {
		t.Fatalf("us's accepted endpoint changed after a refused ID change: %+v %v", e, ok)
	}

	// The operator connects us again: the new pin says ID 5. Entries
	// carrying ID 2's bits are drained and rejected under the new ID.
	if err := WriteClusterFile(dir, remote.pinnedFile(5, "10.2.0.0/16")); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "old-ID entries drained and rejected", func() bool {
		_, ok := m.Snapshot().LookupIP(ip)
		st := clusterStatus(m, "us")
		return !ok && st.ClusterID == 5 && st.Rejected[ReasonForeignIdentity] >= 1
	})
	// Republished under the new ID, it is back.
	remote.publish(t, 5, "10.2.0.0/16")
	testutil.Eventually(t, 30*time.Second, "re-admitted under the new ID", func() bool {
		e, ok := m.Snapshot().LookupIP(ip)
		return ok && e.Identity.ClusterID() == 5
	})
}

// Without any change, a new snapshot still comes every resync interval so
// reconcilers repair drift.
func TestMeshPeriodicResync(t *testing.T) {
	local := startRawCluster(t, "eu")
	local.publish(t, 1, "10.1.0.0/16")
	dir := t.TempDir()
	if err := WriteClusterFile(dir, local.pinnedFile(1, "10.1.0.0/16")); err != nil {
		t.Fatal(err)
	}
	m, err := New(Config{LocalCluster: "eu", ConfigDir: dir, PollInterval: 50 * time.Millisecond, ResyncInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	testutil.Eventually(t, 30*time.Second, "eu ready", func() bool { return clusterStatus(m, "eu").Ready })
	v := m.Snapshot().Version
	testutil.Eventually(t, 10*time.Second, fmt.Sprintf("three resyncs after v%d", v), func() bool { return m.Snapshot().Version >= v+3 })
}

// The lock-out probe: ap widens its published pod CIDRs to 10.0.0.0/8
// before eu's file appears, and publishes an endpoint with one of eu's pod
// IPs. The first cluster to connect used to win the conflict, locking eu
// out and putting ap's entry for eu's pod into the ipcache. Against its
// pin, ap is refused (status names the field and both values), eu is
// admitted, and the ipcache has eu's pod as eu's.
func TestMeshPinnedClusterCannotLockOut(t *testing.T) {
	ap := startRawCluster(t, "ap")
	ap.publish(t, 3, "10.3.0.0/16")
	eu := startRawCluster(t, "eu")
	eu.publish(t, 1, "10.1.0.0/16")
	dir := t.TempDir()
	if err := WriteClusterFile(dir, ap.pinnedFile(3, "10.3.0.0/16")); err != nil {
		t.Fatal(err)
	}
	m := startMesh(t, "us", dir)
	apPod := netip.MustParseAddr("10.3.0.1")
	testutil.Eventually(t, 30*time.Second, "ap merged", func() bool { _, ok := m.Snapshot().LookupIP(apPod); return ok })

	ap.put(t, v1.ClusterConfigKey("ap"), v1.ClusterConfig{Name: "ap", ID: 3, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")},
		Capabilities: v1.Capabilities{SyncedCanaries: true, MaxConnectedClusters: 255}})
	euPod := netip.MustParseAddr("10.1.0.1")
	ap.put(t, v1.EndpointKey("ap", euPod), v1.Endpoint{Cluster: "ap", IP: euPod, Identity: v1.MakeIdentity(3, 7), NodeIP: netip.MustParseAddr("192.168.0.3")})
	testutil.Eventually(t, 30*time.Second, "ap refused against its pin", func() bool {
		return strings.Contains(clusterStatus(m, "ap").LastError, "publishes pod CIDRs [10.0.0.0/8], but [10.3.0.0/16] were pinned")
	})
	if err := WriteClusterFile(dir, eu.pinnedFile(1, "10.1.0.0/16")); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "eu admitted despite ap's claim", func() bool {
		e, ok := m.Snapshot().LookupIP(euPod)
		return ok && e.Cluster == "eu" && clusterStatus(m, "eu").Ready
	})
	// What ap had before the refusal stays; nothing of its new claim came in.
	if e, ok := m.Snapshot().LookupIP(apPod); !ok || e.Cluster != "ap" {
		t.Errorf("ap's accepted endpoint is gone after the refusal: %+v %v", e, ok)
	}
}
