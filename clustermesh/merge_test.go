package clustermesh

import (
	"net/netip"
	"slices"
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

func backends(states ...v1.BackendState) []v1.Backend {
	var out []v1.Backend
	for i, s := range states {
		out = append(out, v1.Backend{IP: netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)}), State: s})
	}
	return out
}

func svc(cluster string, global, shared bool, affinity v1.Affinity, b []v1.Backend) v1.Service {
	return v1.Service{Cluster: cluster, Namespace: "default", Name: "echo", Global: global, Shared: shared, Affinity: affinity,
		Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}}, Backends: b}
}

// clustersOf returns the clusters of the chosen backends, deduplicated in
// order.
func clustersOf(m *MergedService) []string {
	var out []string
	for _, b := range m.Backends {
		if !slices.Contains(out, b.Cluster) {
			out = append(out, b.Cluster)
		}
	}
	return out
}

func TestMergeService(t *testing.T) {
	const (
		A = v1.BackendActive
		T = v1.BackendTerminating
		U = v1.BackendUnready
	)
	regions := map[string]clusterInfo{"eu": {region: "eu"}, "eu2": {region: "eu"}, "us": {region: "us"}, "ap": {region: "ap"}}
	name := ServiceName{"default", "echo"}
	for _, tc := range []struct {
		name     string
		services map[string]v1.Service
		want     []string // clusters carrying traffic, in order
		wantN    int      // backends carrying traffic
	}{
		{"none: union of all clusters", map[string]v1.Service{
			"eu": svc("eu", true, true, v1.AffinityNone, backends(A, A)),
			"us": svc("us", true, true, "", backends(A)),
			"ap": svc("ap", true, true, "", backends(A, A, A)),
		}, []string{"eu", "ap", "us"}, 6},
		{"terminating and unready left out", map[string]v1.Service{
			"eu": svc("eu", true, true, v1.AffinityNone, backends(A, T, U)),
			"us": svc("us", true, true, "", backends(U)),
		}, []string{"eu"}, 1},
		{"shared=false keeps a cluster's backends to itself", map[string]v1.Service{
			"eu": svc("eu", true, true, v1.AffinityNone, backends(A)),
			"us": svc("us", true, false, "", backends(A, A)),
		}, []string{"eu"}, 1},
		{"a remote that is not global is not merged", map[string]v1.Service{
			"eu": svc("eu", true, true, v1.AffinityNone, backends(A)),
			"us": svc("us", false, false, "", backends(A)),
		}, []string{"eu"}, 1},
		{"a local service that is not global stays local", map[string]v1.Service{
			"eu": svc("eu", false, false, v1.AffinityNone, backends(A)),
			"us": svc("us", true, true, "", backends(A)),
		}, []string{"eu"}, 1},
		{"local affinity keeps traffic home", map[string]v1.Service{
			"eu": svc("eu", true, true, v1.AffinityLocal, backends(A)),
			"us": svc("us", true, true, "", backends(A, A)),
		}, []string{"eu"}, 1},
		{"local affinity fails over, same region first", map[string]v1.Service{
			"eu":  svc("eu", true, true, v1.AffinityLocal, backends(U, T)),
			"eu2": svc("eu2", true, true, "", backends(A)),
			"us":  svc("us", true, true, "", backends(A, A)),
		}, []string{"eu2"}, 1},
		{"local affinity fails over to other regions when the region is empty", map[string]v1.Service{
			"eu":  svc("eu", true, true, v1.AffinityLocal, backends(U)),
			"eu2": svc("eu2", true, true, "", backends(U)),
			"us":  svc("us", true, true, "", backends(A, A)),
			"ap":  svc("ap", true, true, "", backends(A)),
		}, []string{"ap", "us"}, 3},
		{"remote affinity prefers remotes", map[string]v1.Service{
			"eu": svc("eu", true, true, v1.AffinityRemote, backends(A)),
			"us": svc("us", true, true, "", backends(A, A)),
		}, []string{"us"}, 2},
		{"remote affinity falls back to local", map[string]v1.Service{
			"eu": svc("eu", true, true, v1.AffinityRemote, backends(A)),
			"us": svc("us", true, true, "", backends(U)),
		}, []string{"eu"}, 1},
		{"none with no local backends prefers the region", map[string]v1.Service{
			"eu":  svc("eu", true, true, v1.AffinityNone, nil),
			"eu2": svc("eu2", true, true, "", backends(A)),
			"us":  svc("us", true, true, "", backends(A)),
		}, []string{"eu2"}, 1},
		{"absent locally: remote backends, no frontend", map[string]v1.Service{
			"us": svc("us", true, true, "", backends(A)),
		}, []string{"us"}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			services := make(map[string]map[ServiceName]v1.Service)
			for c, s := range tc.services {
				services[c] = map[ServiceName]v1.Service{name: s}
			}
			m := mergeService(name, "eu", services, regions)
			if m == nil {
				t.Fatal("no merged service")
			}
			if got := clustersOf(m); !slices.Equal(got, tc.want) || len(m.Backends) != tc.wantN {
				t.Errorf("traffic to %v (%d backends), want %v (%d)", got, len(m.Backends), tc.want, tc.wantN)
			}
		})
	}
	if m := mergeService(name, "eu", map[string]map[ServiceName]v1.Service{"us": {name: svc("us", true, false, "", backends(A))}}, regions); m != nil {
		t.Errorf("a service only an unshared remote has should not exist here: %+v", m)
	}
}
