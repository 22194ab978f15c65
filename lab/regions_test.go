package lab

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/privtest"
)

// TestLabFailoverRegions proves the failover order of issue 13 item 4 on
// three clusters in three regions (eu, us, ap, a node each): eu's
// default/echo with affinity local fails over, once its own echo pod is
// stopped, to every remote region while it lists none, then to the
// regions trellis.io/failover-regions lists, in turn: ap while ap has a
// backend, us when ap has none, and back to ap, then home to eu, as the
// pods come back.
func TestLabFailoverRegions(t *testing.T) {
	privtest.RequireRoot(t)
	r := newLabRun(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	topo := Topology{Underlay: DefaultUnderlay}
	for i, name := range []string{"eu", "us", "ap"} {
		topo.Clusters = append(topo.Clusters, StandardCluster(name, uint32(i+1), name, 1))
	}
	data, err := yaml.Marshal(topo)
	if err != nil {
		t.Fatal(err)
	}
	topoFile := filepath.Join(t.TempDir(), "topology.yaml")
	if err := os.WriteFile(topoFile, data, 0o600); err != nil {
		t.Fatal(err)
	}
	r.must(ctx, t, "up", "-f", topoFile)

	stopped := map[string]bool{}
	t.Cleanup(func() {
		for p := range stopped {
			r.run(context.Background(), "pod", "start", p) // before lab down, for its logs
		}
	})
	stop := func(pod string) {
		t.Helper()
		r.must(ctx, t, "pod", "stop", pod)
		stopped[pod] = true
	}
	start := func(pod string) {
		t.Helper()
		r.must(ctx, t, "pod", "start", pod)
		delete(stopped, pod)
	}

	r.awaitClusters(ctx, t, "affinity none: every cluster", []string{"ap", "eu", "us"})
	r.annotate(ctx, t, "trellis.io/affinity=local")
	r.awaitClusters(ctx, t, "affinity local: eu", []string{"eu"})

	// No list: eu's region has no other cluster, so all the rest.
	stop("eu/echo-n1")
	r.awaitClusters(ctx, t, "eu's echo stopped, no failover list: every remote", []string{"ap", "us"})

	r.annotate(ctx, t, "trellis.io/failover-regions=ap,us")
	r.awaitClusters(ctx, t, "failover-regions ap,us: ap", []string{"ap"})
	r.annotate(ctx, t, "trellis.io/failover-regions=us, ap")
	r.awaitClusters(ctx, t, "failover-regions us,ap: us", []string{"us"})
	r.annotate(ctx, t, "trellis.io/failover-regions=ap,us")
	r.awaitClusters(ctx, t, "failover-regions ap,us again: ap", []string{"ap"})

	stop("ap/echo-n1")
	r.awaitClusters(ctx, t, "ap's echo stopped too: us", []string{"us"})
	start("ap/echo-n1")
	r.awaitClusters(ctx, t, "ap's echo back: ap", []string{"ap"})
	start("eu/echo-n1")
	r.awaitClusters(ctx, t, "eu's echo back: eu", []string{"eu"})

	// A malformed list is refused at the door and changes nothing.
	if _, err := r.run(ctx, "annotate", "eu", "default/echo", "trellis.io/failover-regions=ap,,us"); err == nil || !strings.Contains(err.Error(), "trellis.io/failover-regions") {
		t.Errorf("lab annotate trellis.io/failover-regions=ap,,us: %v; want the registry to refuse it, naming the annotation", err)
	}
	stop("eu/echo-n1")
	r.awaitClusters(ctx, t, "after the refused list, eu's echo stopped again: ap", []string{"ap"})
}
