package agent

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/trellis-mesh/trellis/clustermesh"
)

// The apply metrics follow what each apply served: active backends by
// cluster, and a failover each time the local cluster stops or starts
// serving a service that others still serve.
func TestApplyMetrics(t *testing.T) {
	m := newApplyMetrics("eu")
	snap := func(clusters ...string) *clustermesh.Snapshot {
		svc := &clustermesh.MergedService{ServiceName: clustermesh.ServiceName{Namespace: "default", Name: "echo"}}
		for i, c := range clusters {
			svc.Backends = append(svc.Backends, clustermesh.Backend{Cluster: c, IP: netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)})})
		}
		return &clustermesh.Snapshot{Services: map[clustermesh.ServiceName]*clustermesh.MergedService{svc.ServiceName: svc}}
	}
	m.observe(snap("eu", "eu", "us"))
	m.observe(snap("us", "us")) // eu's backends died: away
	m.observe(snap("us"))       // still away: nothing
	m.observe(snap("eu"))       // back
	m.observe(snap())           // nothing serves: no failover either way
	m.observe(snap("us"))       // from nothing to remote: not a failover
	m.observe(snap("eu", "us")) // back
	want := `
# HELP trellis_agent_service_failovers_total Times a service's traffic from this node left its own cluster for others (direction away) or came back (direction back).
# TYPE trellis_agent_service_failovers_total counter
trellis_agent_service_failovers_total{direction="away",service="default/echo"} 1
trellis_agent_service_failovers_total{direction="back",service="default/echo"} 2
`
	if err := testutil.CollectAndCompare(m.failover, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	want = `
# HELP trellis_agent_service_active_backends Backends this node sends a global service's traffic to, by the cluster they are in.
# TYPE trellis_agent_service_active_backends gauge
trellis_agent_service_active_backends{cluster="eu",service="default/echo"} 1
trellis_agent_service_active_backends{cluster="us",service="default/echo"} 1
`
	if err := testutil.CollectAndCompare(m.active, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	// A service that left the snapshot leaves the gauge.
	m.observe(&clustermesh.Snapshot{})
	if n := testutil.CollectAndCount(m.active); n != 0 {
		t.Errorf("%d active-backend series after the service went", n)
	}
}
