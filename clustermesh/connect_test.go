package clustermesh

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/testutil"
)

func TestConnectRefusesWhatCannotWork(t *testing.T) {
	if testing.Short() {
		t.Skip("runs mesh API servers; skipped in -short")
	}
	eu := startCluster(t, "eu", 1, "10.1.0.0/16", "eu")
	us := startCluster(t, "us", 2, "10.2.0.0/16", "us")
	dupID := startCluster(t, "dupid", 1, "10.5.0.0/16", "eu")
	overlap := startCluster(t, "overlap", 6, "10.1.128.0/17", "eu")
	ctx := context.Background()
	peer := func(c *testCluster) Peer { return &StateDirPeer{Dir: c.stateDir} }

	for _, tc := range []struct {
		peers []Peer
		want  string
	}{
		{[]Peer{peer(eu), peer(dupID)}, "both use cluster ID 1"},
		{[]Peer{peer(eu), peer(overlap)}, "overlaps"},
		{[]Peer{peer(eu), &StateDirPeer{Dir: t.TempDir()}}, "unreachable"},
	} {
		err := ConnectMesh(ctx, tc.peers, ConnectOptions{})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("connect %v: err %v, want %q", tc.peers, err, tc.want)
		}
	}
	// Nothing was written by the refused attempts.
	for _, c := range []*testCluster{eu, us, dupID, overlap} {
		if entries, _ := os.ReadDir(ClustersDir(c.stateDir)); len(entries) != 0 {
			t.Errorf("%s's config dir has %d files after refused connects", c.name, len(entries))
		}
	}

	// Clusters with different CAs connect (each keeps its own), and the
	// files pin what each said of itself. A cluster that conflicts with
	// one eu is already connected to is refused even when connected to eu
	// alone: eu's agents would read both.
	if err := Connect(ctx, peer(eu), peer(us), ConnectOptions{}); err != nil {
		t.Fatalf("connect eu us: %v", err)
	}
	files, err := peer(eu).ClusterFiles(ctx)
	if err != nil || len(files) != 2 {
		t.Fatalf("eu's cluster files: %+v, %v", files, err)
	}
	usFiles, err := peer(us).ClusterFiles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if key, err := MeshGossipKey(append(files, usFiles...)); err != nil || len(key) != GossipKeySize || len(files[0].GossipKey) == 0 || len(usFiles[0].GossipKey) == 0 {
		t.Errorf("the mesh's gossip key in every file: %x, %v", key, err)
	}
	for _, f := range files {
		want := map[string]string{"eu": "1 [10.1.0.0/16]", "us": "2 [10.2.0.0/16]"}[f.Name]
		if got := fmt.Sprintf("%d %v", f.ID, f.PodCIDRs); got != want {
			t.Errorf("%s's pin in eu's file: %s, want %s", f.Name, got, want)
		}
	}
	usLike := startCluster(t, "uslike", 7, "10.2.128.0/17", "us")
	err = Connect(ctx, peer(usLike), peer(eu), ConnectOptions{})
	if err == nil || !strings.Contains(err.Error(), "overlaps") || !strings.Contains(err.Error(), "us is already connected") {
		t.Errorf("connect a cluster overlapping one eu already reads: %v", err)
	}
	if entries, _ := os.ReadDir(ClustersDir(usLike.stateDir)); len(entries) != 0 {
		t.Errorf("the refused cluster got %d cluster files", len(entries))
	}

	// A stopped API server is unreachable.
	us.stop()
	if err := Connect(ctx, peer(eu), peer(us), ConnectOptions{}); err == nil || !strings.Contains(err.Error(), "unreachable") {
		t.Errorf("connect to a stopped cluster: %v", err)
	}
}

// Connect writes what each side's agents need; their meshes become ready;
// Disconnect drains the other side on both.
func TestConnectAndDisconnect(t *testing.T) {
	if testing.Short() {
		t.Skip("runs mesh API servers; skipped in -short")
	}
	eu := startCluster(t, "eu", 1, "10.1.0.0/16", "eu")
	us := startCluster(t, "us", 2, "10.2.0.0/16", "us")
	eu.populate(t, "none")
	us.populate(t, "none")
	a, b := &StateDirPeer{Dir: eu.stateDir}, &StateDirPeer{Dir: us.stateDir}
	ctx := context.Background()
	if err := Connect(ctx, a, b, ConnectOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*testCluster{eu, us} {
		for _, f := range []string{"eu.yaml", "us.yaml"} {
			info, err := os.Stat(filepath.Join(ClustersDir(c.stateDir), f))
			if err != nil {
				t.Fatalf("%s lacks %s: %v", c.name, f, err)
			}
			if info.Mode().Perm() != 0o600 {
				t.Errorf("%s/%s mode %v, want 0600 (it holds a key)", c.name, f, info.Mode().Perm())
			}
		}
	}
	mEU := startMesh(t, "eu", ClustersDir(eu.stateDir))
	mUS := startMesh(t, "us", ClustersDir(us.stateDir))
	waitBackends(t, mEU, map[string]int{"eu": 2, "us": 2})
	waitBackends(t, mUS, map[string]int{"eu": 2, "us": 2})

	if err := Disconnect(ctx, a, b); err != nil {
		t.Fatal(err)
	}
	waitBackends(t, mEU, map[string]int{"eu": 2})
	waitBackends(t, mUS, map[string]int{"us": 2})
	testutil.Eventually(t, 10*time.Second, "status forgets the other side", func() bool {
		return clusterStatus(mEU, "us").Name == "" && clusterStatus(mUS, "eu").Name == ""
	})

	// And reconnect.
	if err := Connect(ctx, a, b, ConnectOptions{}); err != nil {
		t.Fatal(err)
	}
	waitBackends(t, mEU, map[string]int{"eu": 2, "us": 2})
}
