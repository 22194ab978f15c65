package v1

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestKeyBuilders(t *testing.T) {
	tests := []struct {
		got  string
		want string
		key  Key
	}{
		{ClusterConfigKey("c1"), "trellis/v1/cluster-config/c1", Key{Kind: KindClusterConfig, Cluster: "c1"}},
		{HeartbeatKey("c1"), "trellis/v1/heartbeat/c1", Key{Kind: KindHeartbeat, Cluster: "c1"}},
		{NodeKey("c1", "node-1.example.com"), "trellis/v1/nodes/c1/node-1.example.com", Key{Kind: KindNodes, Cluster: "c1", Name: "node-1.example.com"}},
		{EndpointKey("c1", netip.MustParseAddr("10.0.0.1")), "trellis/v1/endpoints/c1/10.0.0.1", Key{Kind: KindEndpoints, Cluster: "c1", Name: "10.0.0.1"}},
		{EndpointKey("c1", netip.MustParseAddr("FD00:0:0::1")), "trellis/v1/endpoints/c1/fd00::1", Key{Kind: KindEndpoints, Cluster: "c1", Name: "fd00::1"}},
		{IdentityKey("c1", MakeIdentity(3, 256)), "trellis/v1/identities/c1/196864", Key{Kind: KindIdentities, Cluster: "c1", Name: "196864"}},
		{ServiceKey("c1", "default", "web"), "trellis/v1/services/c1/default/web", Key{Kind: KindServices, Cluster: "c1", Namespace: "default", Name: "web"}},
		{BackendShardKey("c1", "default", "web", 0), "trellis/v1/backends/c1/default/web/0", Key{Kind: KindBackends, Cluster: "c1", Namespace: "default", Name: "web"}},
		{BackendShardKey("c1", "default", "web", 1023), "trellis/v1/backends/c1/default/web/1023", Key{Kind: KindBackends, Cluster: "c1", Namespace: "default", Name: "web", Shard: 1023}},
		{BackendShardPrefix("c1", "default", "web"), "trellis/v1/backends/c1/default/web/", Key{}},
		{SyncedKey("c1", KindEndpoints), "trellis/v1/synced/c1/endpoints", Key{Kind: KindSynced, Cluster: "c1", Name: "endpoints"}},
		{SyncedKey("c1", KindBackends), "trellis/v1/synced/c1/backends", Key{Kind: KindSynced, Cluster: "c1", Name: "backends"}},
		{KindPrefix(KindNodes, "c1"), "trellis/v1/nodes/c1/", Key{}},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("built %q, want %q", tt.got, tt.want)
		}
		if tt.key == (Key{}) {
			continue
		}
		k, err := ParseKey(tt.want)
		if err != nil {
			t.Errorf("ParseKey(%q): %v", tt.want, err)
			continue
		}
		if k != tt.key {
			t.Errorf("ParseKey(%q) = %+v, want %+v", tt.want, k, tt.key)
		}
		if s := k.String(); s != tt.want {
			t.Errorf("ParseKey(%q).String() = %q", tt.want, s)
		}
	}
}

func TestKindPrefixDoesNotMatchLongerCluster(t *testing.T) {
	if strings.HasPrefix(NodeKey("c10", "n"), KindPrefix(KindNodes, "c1")) {
		t.Error("KindPrefix(nodes, c1) matches a key of cluster c10")
	}
}

func TestSyncedKinds(t *testing.T) {
	want := []Kind{KindNodes, KindEndpoints, KindIdentities, KindServices, KindBackends}
	got := SyncedKinds()
	if !slices.Equal(got, want) {
		t.Fatalf("SyncedKinds() = %v, want %v", got, want)
	}
	got[0] = "mutated"
	if SyncedKinds()[0] != KindNodes {
		t.Error("SyncedKinds returns a shared slice")
	}
	for _, k := range want {
		if _, err := ParseKey(SyncedKey("c1", k)); err != nil {
			t.Errorf("ParseKey(SyncedKey(c1, %s)): %v", k, err)
		}
	}
}

func TestParseKeyValid(t *testing.T) {
	keys := []string{
		"trellis/v1/cluster-config/a",
		"trellis/v1/cluster-config/" + strings.Repeat("a", 32),
		"trellis/v1/heartbeat/0cluster",
		"trellis/v1/nodes/c-1/n",
		"trellis/v1/nodes/c-1/" + strings.Repeat("a.", 126) + "a",
		"trellis/v1/endpoints/c/10.0.0.1",
		"trellis/v1/endpoints/c/127.0.0.1",
		"trellis/v1/endpoints/c/2001:db8::1",
		"trellis/v1/endpoints/c/::102:304",
		"trellis/v1/identities/c/65537",
		"trellis/v1/identities/c/" + MakeIdentity(511, 65535).String(),
		"trellis/v1/services/c/kube-system/kube-dns",
		"trellis/v1/services/c/" + strings.Repeat("n", 63) + "/" + strings.Repeat("s", 63),
		"trellis/v1/backends/c/kube-system/kube-dns/0",
		"trellis/v1/backends/c/kube-system/kube-dns/17",
		"trellis/v1/backends/c/" + strings.Repeat("n", 63) + "/" + strings.Repeat("s", 63) + "/1023",
		"trellis/v1/synced/c/nodes",
		"trellis/v1/synced/c/backends",
		"trellis/v1/synced/c/services",
	}
	for _, key := range keys {
		k, err := ParseKey(key)
		if err != nil {
			t.Errorf("ParseKey(%q): %v", key, err)
			continue
		}
		if k.String() != key {
			t.Errorf("ParseKey(%q).String() = %q", key, k.String())
		}
	}
}

func TestParseKeyInvalid(t *testing.T) {
	tests := []struct {
		key, want string // want: a substring of the error
	}{
		{"", "does not start with"},
		{"trellis/v2/nodes/c/n", "does not start with"},
		{"/trellis/v1/nodes/c/n", "does not start with"},
		{"Trellis/v1/nodes/c/n", "does not start with"},
		{"trellis/v1/", "unknown kind"},
		{"trellis/v1/pods/c/n", "unknown kind"},
		{"trellis/v1/Nodes/c/n", "unknown kind"},
		{"trellis/v1/cache/c/nodes/c/n", "unknown kind"},
		{"trellis/v1/nodes", "segments"},
		{"trellis/v1/nodes/c", "segments"},
		{"trellis/v1/nodes/c/", "node name"},
		{"trellis/v1/nodes/c/n/", "segments"},
		{"trellis/v1/nodes/c/n/x", "segments"},
		{"trellis/v1/nodes//n", "cluster"},
		{"trellis/v1/cluster-config/", "cluster"},
		{"trellis/v1/cluster-config/c/", "segments"},
		{"trellis/v1/heartbeat/c/x", "segments"},
		{"trellis/v1/services/c/ns", "segments"},
		{"trellis/v1/services/c/ns/name/x", "segments"},
		{"trellis/v1/services/c//name", "namespace"},
		{"trellis/v1/services/c/ns/", "service name"},
		{"trellis/v1/nodes/C1/n", "cluster"},
		{"trellis/v1/nodes/-c/n", "cluster"},
		{"trellis/v1/nodes/c-/n", "cluster"},
		{"trellis/v1/nodes/c_1/n", "cluster"},
		{"trellis/v1/nodes/" + strings.Repeat("a", 33) + "/n", "cluster"},
		{"trellis/v1/nodes/c/Node1", "node name"},
		{"trellis/v1/nodes/c/n..n", "node name"},
		{"trellis/v1/nodes/c/.n", "node name"},
		{"trellis/v1/nodes/c/" + strings.Repeat("a", 254), "node name"},
		{"trellis/v1/endpoints/c/010.0.0.1", "not an IP"},
		{"trellis/v1/endpoints/c/10.0.0", "not an IP"},
		{"trellis/v1/endpoints/c/10.0.0.1:80", "not an IP"},
		{"trellis/v1/endpoints/c/::ffff:1.2.3.4", "IPv4-mapped"},
		{"trellis/v1/endpoints/c/FD00::1", "canonical"},
		{"trellis/v1/endpoints/c/fd00:0::1", "canonical"},
		{"trellis/v1/endpoints/c/fe80::1%eth0", "zone"},
		{"trellis/v1/endpoints/c/::1.2.3.4", "canonical"},
		{"trellis/v1/endpoints/c/0.0.0.0", "unspecified"},
		{"trellis/v1/endpoints/c/::", "unspecified"},
		{"trellis/v1/endpoints/c/224.0.0.1", "multicast"},
		{"trellis/v1/endpoints/c/255.255.255.255", "broadcast"},
		{"trellis/v1/identities/c/x", "decimal"},
		{"trellis/v1/identities/c/065537", "decimal"},
		{"trellis/v1/identities/c/+65537", "decimal"},
		{"trellis/v1/identities/c/-1", "decimal"},
		{"trellis/v1/identities/c/4294967296", "decimal"},
		{"trellis/v1/identities/c/0x10001", "decimal"},
		{"trellis/v1/identities/c/100", "cluster bits"},
		{"trellis/v1/identities/c/65536", "local part"},
		{"trellis/v1/identities/c/" + MakeIdentity(512, 1).String(), "cluster bits"},
		{"trellis/v1/services/c/Default/web", "namespace"},
		{"trellis/v1/services/c/a.b/web", "namespace"},
		{"trellis/v1/services/c/ns/web.v2", "service name"},
		{"trellis/v1/services/c/" + strings.Repeat("n", 64) + "/web", "namespace"},
		{"trellis/v1/backends/c/ns/web", "segments"},
		{"trellis/v1/backends/c/ns/web/0/x", "segments"},
		{"trellis/v1/backends/c/ns/web/", "shard"},
		{"trellis/v1/backends/c/ns/web/00", "shard"},
		{"trellis/v1/backends/c/ns/web/07", "shard"},
		{"trellis/v1/backends/c/ns/web/+7", "shard"},
		{"trellis/v1/backends/c/ns/web/-1", "shard"},
		{"trellis/v1/backends/c/ns/web/1024", "shard"},
		{"trellis/v1/backends/c/ns/web/99999999999999999999", "shard"},
		{"trellis/v1/backends/c/ns/web/0x1", "shard"},
		{"trellis/v1/backends/c/Ns/web/0", "namespace"},
		{"trellis/v1/backends/c/ns/web.v2/0", "service name"},
		{"trellis/v1/backends//ns/web/0", "cluster"},
		{"trellis/v1/synced/c/heartbeat", "synced kind"},
		{"trellis/v1/synced/c/synced", "synced kind"},
		{"trellis/v1/synced/c/", "synced kind"},
		{"trellis/v1/nodes/c/n\x00", "node name"},
		{"trellis/v1/nodes/c/ñ", "node name"},
	}
	for _, tt := range tests {
		k, err := ParseKey(tt.key)
		if err == nil {
			t.Errorf("ParseKey(%q) = %+v, want error", tt.key, k)
			continue
		}
		if !errors.Is(err, ErrBadKey) || Reason(err) != "bad-key" {
			t.Errorf("ParseKey(%q) error %v does not match ErrBadKey", tt.key, err)
		}
		if !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParseKey(%q) error %q, want it to mention %q", tt.key, err, tt.want)
		}
		if k != (Key{}) {
			t.Errorf("ParseKey(%q) returned %+v with its error", tt.key, k)
		}
	}
}

func TestParseKeyErrorTruncatesHugeKeys(t *testing.T) {
	_, err := ParseKey("trellis/v1/nodes/c/" + strings.Repeat("X", 1<<20))
	if err == nil || len(err.Error()) > 2*maxQuoted+300 {
		t.Fatalf("error is %d bytes, want it bounded", len(err.Error()))
	}
}

func TestNumericIdentity(t *testing.T) {
	id := MakeIdentity(511, 0xfffe)
	if id.ClusterID() != 511 || id.Local() != 0xfffe {
		t.Errorf("MakeIdentity(511, 0xfffe) = %d: cluster %d local %d", id, id.ClusterID(), id.Local())
	}
	if uint32(id) != 511<<16|0xfffe {
		t.Errorf("MakeIdentity(511, 0xfffe) = %d", id)
	}
	if s := MakeIdentity(1, 1).String(); s != "65537" {
		t.Errorf("String() = %q", s)
	}
}
