package agent

import (
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/clustermesh"
)

// trellis status shows a service's failover regions and its active
// backends by cluster.
func TestPrintServices(t *testing.T) {
	var b strings.Builder
	PrintStatus(&b, Status{Node: "n1", Cluster: "eu", Status: clustermesh.Status{LocalCluster: "eu", Services: []clustermesh.ServiceStatus{{
		Service: "default/echo", Global: true, Affinity: "local", FailoverRegions: []string{"ap", "us"},
		Frontend: []string{"10.96.1.10"}, Active: map[string][]string{"ap": {"10.3.1.10"}},
	}}}})
	out := b.String()
	for _, want := range []string{"FAILOVER REGIONS", "default/echo  yes     local     ap,us", "ap: 10.3.1.10"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
}
