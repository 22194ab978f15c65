package clustermesh

import (
	"net/netip"
	"testing"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// The encryption setting changes live: the local cluster's new setting
// reaches the snapshot without ending the session (the same WatchStores
// go on, nothing is relisted), while any other change of the
// cluster-config still restarts it. Before, every change ended every
// agent's session and relisted all kinds.
func TestMeshEncryptionChangeKeepsSession(t *testing.T) {
	local := startRawCluster(t, "eu")
	local.publish(t, 1, "10.1.0.0/16")
	dir := t.TempDir()
	if err := WriteClusterFile(dir, local.pinnedFile(1, "10.1.0.0/16")); err != nil {
		t.Fatal(err)
	}
	m := startMesh(t, "eu", dir)
	testutil.Eventually(t, 30*time.Second, "eu ready", func() bool { return clusterStatus(m, "eu").Ready })
	stores := func() *storeSet {
		m.mu.Lock()
		r := m.remotes["eu"]
		m.mu.Unlock()
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.stores
	}
	before := stores()
	config := func(enc v1.EncryptionConfig, region string) v1.ClusterConfig {
		return v1.ClusterConfig{Name: "eu", ID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}, Region: region,
			Capabilities: v1.Capabilities{SyncedCanaries: true, MaxConnectedClusters: 255}, Encryption: enc}
	}

	for _, enc := range []v1.EncryptionConfig{
		{Type: v1.EncryptionWireGuard},
		{Type: v1.EncryptionWireGuard, Strict: true},
		{Type: v1.EncryptionWireGuard, Strict: true, Rotation: 1},
		{},
	} {
		local.put(t, v1.ClusterConfigKey("eu"), config(enc, ""))
		testutil.Eventually(t, 30*time.Second, "snapshot carries "+describe(enc), func() bool { return m.Snapshot().Encryption == enc })
		if stores() != before {
			t.Fatalf("the session was restarted for an encryption change to %+v", enc)
		}
		if st := before.nodes.Stats(); st.Relists != 0 {
			t.Fatalf("nodes relisted %d times", st.Relists)
		}
	}
	wantStatus := "wireguard (strict)"
	local.put(t, v1.ClusterConfigKey("eu"), config(v1.EncryptionConfig{Type: v1.EncryptionWireGuard, Strict: true}, ""))
	testutil.Eventually(t, 30*time.Second, "status shows "+wantStatus, func() bool { return clusterStatus(m, "eu").Encryption == wantStatus })

	// A change that needs re-validation still restarts the session, and
	// the setting survives it.
	local.put(t, v1.ClusterConfigKey("eu"), config(v1.EncryptionConfig{Type: v1.EncryptionWireGuard, Strict: true}, "eu-west"))
	testutil.Eventually(t, 30*time.Second, "session restarted for a region change", func() bool {
		s := stores()
		return s != nil && s != before && clusterStatus(m, "eu").Ready
	})
	if got := m.Snapshot().Encryption; got != (v1.EncryptionConfig{Type: v1.EncryptionWireGuard, Strict: true}) {
		t.Fatalf("encryption after the restart: %+v", got)
	}
}

func describe(e v1.EncryptionConfig) string {
	if e.Type == "" {
		return "encryption off"
	}
	s := e.Type
	if e.Strict {
		s += " strict"
	}
	return s
}
