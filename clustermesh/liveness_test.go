package clustermesh

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/testutil"
)

// ProbeCluster says whether a cluster's control plane answers now: a real
// mesh API server answers with its heartbeat, the same server stopped does
// not (within the timeout), started again answers again; a bare etcd
// answers without a heartbeat; a cluster without a file cannot be probed.
func TestProbeCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a mesh API server; skipped in -short")
	}
	eu := startCluster(t, "eu", 1, "10.1.0.0/16", "eu")
	raw := startRawCluster(t, "us")
	dir := t.TempDir()
	for _, f := range []ClusterFile{eu.clusterFile(t, "us"), raw.pinnedFile(2, "10.2.0.0/16")} {
		if err := WriteClusterFile(dir, f); err != nil {
			t.Fatal(err)
		}
	}
	m := startMesh(t, "us", dir)
	ctx := context.Background()
	const timeout = 500 * time.Millisecond
	probe := func(cluster string) Liveness {
		t.Helper()
		lv, err := m.ProbeCluster(ctx, cluster, timeout)
		if err != nil {
			t.Fatalf("probe %s: %v", cluster, err)
		}
		if lv.Took > timeout+time.Second {
			t.Errorf("probe %s took %s, bounded by %s", cluster, lv.Took, timeout)
		}
		return lv
	}
	testutil.Eventually(t, 30*time.Second, "eu answers with its heartbeat", func() bool {
		lv, err := m.ProbeCluster(ctx, "eu", timeout)
		return err == nil && lv.Reachable && lv.Heartbeat
	})
	if lv := probe("us"); !lv.Reachable || lv.Heartbeat {
		t.Errorf("bare etcd: %+v, want reachable without a heartbeat", lv)
	}
	if _, err := m.ProbeCluster(ctx, "ap", timeout); !errors.Is(err, ErrUnknownCluster) {
		t.Errorf("probe of a cluster without a file: %v, want ErrUnknownCluster", err)
	}

	eu.stop()
	if lv := probe("eu"); lv.Reachable || lv.Err == "" {
		t.Errorf("stopped eu: %+v, want not reachable, and why", lv)
	}
	eu.start(t)
	testutil.Eventually(t, 30*time.Second, "eu answers again after its restart", func() bool {
		lv, err := m.ProbeCluster(ctx, "eu", timeout)
		return err == nil && lv.Reachable && lv.Heartbeat
	})
}
