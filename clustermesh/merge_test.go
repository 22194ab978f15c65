package clustermesh

import (
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"unsafe"

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

// publishedOf is services as the state holds them: values that carry
// their backends.
func publishedOf(services map[string]map[ServiceName]v1.Service) map[string]map[ServiceName]published {
	out := make(map[string]map[ServiceName]published, len(services))
	for c, svcs := range services {
		out[c] = make(map[ServiceName]published, len(svcs))
		for n, s := range svcs {
			out[c][n] = published{head: s, hasHead: true}
		}
	}
	return out
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
			services := make(map[string]map[ServiceName]published)
			for c, s := range tc.services {
				services[c] = map[ServiceName]published{name: {head: s, hasHead: true}}
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
	if m := mergeService(name, "eu", publishedOf(map[string]map[ServiceName]v1.Service{"us": {name: svc("us", true, false, "", backends(A))}}), regions); m != nil {
		t.Errorf("a service only an unshared remote has should not exist here: %+v", m)
	}
}

// Merged backends carry their cluster's ID and the port they serve each
// of the merged service's ports on, so the datapath needs no lookups.
func TestMergeServiceResolvesBackends(t *testing.T) {
	name := ServiceName{"default", "echo"}
	clusters := map[string]clusterInfo{"eu": {region: "eu", id: 1}, "us": {region: "us", id: 2}, "ap": {region: "ap", id: 3}}
	ports := []v1.ServicePort{
		{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080},
		{Name: "metrics", Protocol: v1.ProtocolTCP, Port: 9000}, // named target port: per backend
	}
	ip := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	named := func(http, metrics uint16) []v1.BackendPort {
		var out []v1.BackendPort
		if http != 0 {
			out = append(out, v1.BackendPort{Name: "http", Port: http})
		}
		if metrics != 0 {
			out = append(out, v1.BackendPort{Name: "metrics", Port: metrics})
		}
		return out
	}
	services := map[string]map[ServiceName]v1.Service{
		"eu": {name: {Cluster: "eu", Namespace: "default", Name: "echo", Global: true, Shared: true, Ports: ports, Backends: []v1.Backend{
			{IP: ip("10.1.0.1"), State: v1.BackendActive},
			{IP: ip("10.1.0.2"), State: v1.BackendActive, Ports: named(0, 9100)},
			{IP: ip("10.1.0.3"), State: v1.BackendActive, Ports: named(0, 9100)},
		}}},
		// us names its ports differently from eu's target ports.
		"us": {name: {Cluster: "us", Namespace: "default", Name: "echo", Global: true, Shared: true, Ports: ports, Backends: []v1.Backend{
			{IP: ip("10.2.0.1"), State: v1.BackendActive, Ports: named(9090, 9200)},
			{IP: ip("10.2.0.2"), State: v1.BackendActive, Ports: named(9090, 9200)},
			// Explicitly the same as the service's target ports.
			{IP: ip("10.2.0.3"), State: v1.BackendActive, Ports: named(8080, 0)},
		}}},
	}
	m := mergeService(name, "eu", publishedOf(services), clusters)
	if m == nil {
		t.Fatal("no merged service")
	}
	type resolved struct {
		cluster string
		id      v1.ClusterID
		ip      string
		ports   []uint16
	}
	var got []resolved
	for _, b := range m.Backends {
		got = append(got, resolved{b.Cluster, b.ClusterID, b.IP.String(), b.TargetPorts})
	}
	want := []resolved{
		{"eu", 1, "10.1.0.1", []uint16{8080, 0}},
		{"eu", 1, "10.1.0.2", []uint16{8080, 9100}},
		{"eu", 1, "10.1.0.3", []uint16{8080, 9100}},
		{"us", 2, "10.2.0.1", []uint16{9090, 9200}},
		{"us", 2, "10.2.0.2", []uint16{9090, 9200}},
		{"us", 2, "10.2.0.3", []uint16{8080, 0}},
	}
	if !slices.EqualFunc(got, want, func(a, b resolved) bool {
		return a.cluster == b.cluster && a.id == b.id && a.ip == b.ip && slices.Equal(a.ports, b.ports)
	}) {
		t.Fatalf("backends:\n got %+v\nwant %+v", got, want)
	}

	// Equal port lists share one array: the service's target ports, or
	// the neighbour's.
	same := func(i, j int) bool {
		return unsafe.SliceData(m.Backends[i].TargetPorts) == unsafe.SliceData(m.Backends[j].TargetPorts)
	}
	for _, pair := range [][2]int{{0, 5}, {1, 2}, {3, 4}} {
		if !same(pair[0], pair[1]) {
			t.Errorf("backends %d and %d have equal ports in separate arrays", pair[0], pair[1])
		}
	}
	if same(0, 1) || same(1, 3) {
		t.Error("backends with different ports share an array")
	}
	if p := m.Backends[1].TargetPort(1); p != 9100 {
		t.Errorf("TargetPort(1) = %d, want 9100", p)
	}
	if p := m.Backends[1].TargetPort(2); p != 0 {
		t.Errorf("TargetPort past the service's ports = %d, want 0", p)
	}

	// Absent locally: the ports are the first remote's by name, and the
	// backends are resolved against them.
	services["ap"] = map[ServiceName]v1.Service{name: {Cluster: "ap", Namespace: "default", Name: "echo", Global: true, Shared: true,
		Ports:    []v1.ServicePort{{Name: "web", Protocol: v1.ProtocolUDP, Port: 53, TargetPort: 5353}},
		Backends: []v1.Backend{{IP: ip("10.3.0.1"), State: v1.BackendActive}}}}
	delete(services, "eu")
	m = mergeService(name, "eu", publishedOf(services), clusters)
	if m == nil || len(m.Ports) != 1 || m.Ports[0].Name != "web" {
		t.Fatalf("ports of a service absent locally: %+v", m)
	}
	if got := clustersOf(m); !slices.Equal(got, []string{"ap", "us"}) {
		t.Fatalf("traffic to %v, want ap and us", got)
	}
	for _, b := range m.Backends {
		// No backend names a port "web": all serve ap's target port.
		if !slices.Equal(b.TargetPorts, []uint16{5353}) || b.ClusterID != clusters[b.Cluster].id {
			t.Errorf("%s %s: ID %d, target ports %v; want ID %d, [5353]", b.Cluster, b.IP, b.ClusterID, b.TargetPorts, clusters[b.Cluster].id)
		}
	}
}

// A cluster whose ID changes has its backends merged again under the new
// ID.
func TestStateClusterIDReachesBackends(t *testing.T) {
	st := newState("eu", nil, slog.New(slog.DiscardHandler))
	st.setCluster(v1.ClusterConfig{Name: "eu", ID: 1})
	st.setCluster(v1.ClusterConfig{Name: "us", ID: 2})
	st.upsertService("eu", svc("eu", true, true, v1.AffinityNone, backends(v1.BackendActive)))
	remote := svc("us", true, true, "", backends(v1.BackendActive))
	remote.Backends[0].IP = netip.MustParseAddr("10.2.0.1")
	st.upsertService("us", remote)
	ids := func() map[string]v1.ClusterID {
		st.publish()
		out := map[string]v1.ClusterID{}
		for _, b := range st.snap.Load().Services[ServiceName{"default", "echo"}].Backends {
			out[b.Cluster] = b.ClusterID
		}
		return out
	}
	if got := ids(); got["eu"] != 1 || got["us"] != 2 {
		t.Fatalf("cluster IDs %v, want eu 1, us 2", got)
	}
	st.setCluster(v1.ClusterConfig{Name: "us", ID: 5})
	if got := ids(); got["eu"] != 1 || got["us"] != 5 {
		t.Fatalf("after us's ID change: cluster IDs %v, want eu 1, us 5", got)
	}
}

// failover returns s with the failover regions given.
func failover(s v1.Service, regions ...string) v1.Service {
	s.FailoverRegions = regions
	return s
}

// When the local cluster's backends are not used, the remote backends are
// those of the first group that has any: the local region's clusters, the
// listed regions in turn, all the rest.
func TestMergeServiceFailoverRegions(t *testing.T) {
	const (
		A = v1.BackendActive
		U = v1.BackendUnready
	)
	clusters := map[string]clusterInfo{
		"eu": {region: "eu"}, "eu2": {region: "eu"},
		"us": {region: "us"}, "us2": {region: "us"},
		"ap": {region: "ap"}, "sa": {region: "sa"},
		"nowhere": {}, // a cluster without a region
	}
	local, remote, none := v1.AffinityLocal, v1.AffinityRemote, v1.AffinityNone
	name := ServiceName{"default", "echo"}
	for _, tc := range []struct {
		name     string
		services map[string]v1.Service
		want     []string // clusters carrying traffic, in order
		wantList []string // the failover regions in force
	}{
		{"no list: all remotes, as before", map[string]v1.Service{
			"eu":  svc("eu", true, true, local, backends(U)),
			"eu2": svc("eu2", true, true, "", backends(U)),
			"us":  svc("us", true, true, "", backends(A)),
			"ap":  svc("ap", true, true, "", backends(A)),
		}, []string{"ap", "us"}, nil},
		{"the first listed region", map[string]v1.Service{
			"eu": failover(svc("eu", true, true, local, backends(U)), "ap", "us"),
			"us": svc("us", true, true, "", backends(A)),
			"ap": svc("ap", true, true, "", backends(A)),
		}, []string{"ap"}, []string{"ap", "us"}},
		{"the list's order, not the names'", map[string]v1.Service{
			"eu": failover(svc("eu", true, true, local, backends(U)), "us", "ap"),
			"us": svc("us", true, true, "", backends(A)),
			"ap": svc("ap", true, true, "", backends(A)),
		}, []string{"us"}, []string{"us", "ap"}},
		{"the local region before the list", map[string]v1.Service{
			"eu":  failover(svc("eu", true, true, local, backends(U)), "ap"),
			"eu2": svc("eu2", true, true, "", backends(A)),
			"ap":  svc("ap", true, true, "", backends(A)),
		}, []string{"eu2"}, []string{"ap"}},
		{"a listed region without active backends is skipped", map[string]v1.Service{
			"eu": failover(svc("eu", true, true, local, nil), "sa", "us"),
			"sa": svc("sa", true, true, "", backends(U, U)),
			"us": svc("us", true, true, "", backends(A)),
			"ap": svc("ap", true, true, "", backends(A)),
		}, []string{"us"}, []string{"sa", "us"}},
		{"a listed region without clusters is skipped", map[string]v1.Service{
			"eu": failover(svc("eu", true, true, local, nil), "mars", "ap"),
			"us": svc("us", true, true, "", backends(A)),
			"ap": svc("ap", true, true, "", backends(A)),
		}, []string{"ap"}, []string{"mars", "ap"}},
		{"a listed region of several clusters takes them all", map[string]v1.Service{
			"eu":  failover(svc("eu", true, true, local, nil), "us"),
			"us":  svc("us", true, true, "", backends(A)),
			"us2": svc("us2", true, true, "", backends(A, A)),
			"ap":  svc("ap", true, true, "", backends(A)),
		}, []string{"us", "us2"}, []string{"us"}},
		{"no listed region has backends: all the rest", map[string]v1.Service{
			"eu":      failover(svc("eu", true, true, local, nil), "sa"),
			"eu2":     svc("eu2", true, true, "", backends(U)),
			"sa":      svc("sa", true, true, "", backends(U)),
			"us":      svc("us", true, true, "", backends(A)),
			"ap":      svc("ap", true, true, "", backends(A)),
			"nowhere": svc("nowhere", true, true, "", backends(A)),
		}, []string{"ap", "nowhere", "us"}, []string{"sa"}},
		{"a listed region's unshared backends do not count", map[string]v1.Service{
			"eu": failover(svc("eu", true, true, local, nil), "ap", "us"),
			"ap": svc("ap", true, false, "", backends(A)),
			"us": svc("us", true, true, "", backends(A)),
		}, []string{"us"}, []string{"ap", "us"}},
		{"affinity local with local backends ignores the list", map[string]v1.Service{
			"eu": failover(svc("eu", true, true, local, backends(A)), "ap"),
			"ap": svc("ap", true, true, "", backends(A)),
		}, []string{"eu"}, []string{"ap"}},
		{"affinity remote follows the list", map[string]v1.Service{
			"eu": failover(svc("eu", true, true, remote, backends(A)), "ap", "us"),
			"us": svc("us", true, true, "", backends(A)),
			"ap": svc("ap", true, true, "", backends(A)),
		}, []string{"ap"}, []string{"ap", "us"}},
		{"affinity remote: the local region first", map[string]v1.Service{
			"eu":  failover(svc("eu", true, true, remote, backends(A)), "ap"),
			"eu2": svc("eu2", true, true, "", backends(A)),
			"ap":  svc("ap", true, true, "", backends(A)),
		}, []string{"eu2"}, []string{"ap"}},
		{"affinity remote falls back to local", map[string]v1.Service{
			"eu": failover(svc("eu", true, true, remote, backends(A)), "ap"),
			"ap": svc("ap", true, true, "", backends(U)),
		}, []string{"eu"}, []string{"ap"}},
		{"affinity none with local backends: the union", map[string]v1.Service{
			"eu": failover(svc("eu", true, true, none, backends(A)), "ap"),
			"us": svc("us", true, true, "", backends(A)),
			"ap": svc("ap", true, true, "", backends(A)),
		}, []string{"eu", "ap", "us"}, []string{"ap"}},
		{"affinity none without local backends follows the list", map[string]v1.Service{
			"eu": failover(svc("eu", true, true, none, backends(U)), "us"),
			"us": svc("us", true, true, "", backends(A)),
			"ap": svc("ap", true, true, "", backends(A)),
		}, []string{"us"}, []string{"us"}},
		{"the remotes' lists do not count", map[string]v1.Service{
			"eu": svc("eu", true, true, local, nil),
			"ap": failover(svc("ap", true, true, "", backends(A)), "us"),
			"us": failover(svc("us", true, true, "", backends(A)), "us"),
		}, []string{"ap", "us"}, nil},
		{"absent locally: the first remote's list", map[string]v1.Service{
			"ap": failover(svc("ap", true, true, "", backends(A)), "sa"),
			"sa": failover(svc("sa", true, true, "", backends(A)), "us"),
			"us": svc("us", true, true, "", backends(A)),
		}, []string{"sa"}, []string{"sa"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			services := make(map[string]map[ServiceName]v1.Service)
			for c, s := range tc.services {
				services[c] = map[ServiceName]v1.Service{name: s}
			}
			m := mergeService(name, "eu", publishedOf(services), clusters)
			if m == nil {
				t.Fatal("no merged service")
			}
			if got := clustersOf(m); !slices.Equal(got, tc.want) {
				t.Errorf("traffic to %v, want %v", got, tc.want)
			}
			if !slices.Equal(m.FailoverRegions, tc.wantList) {
				t.Errorf("failover regions in force %v, want %v", m.FailoverRegions, tc.wantList)
			}
			n := 0
			for _, c := range tc.want {
				for _, b := range tc.services[c].Backends {
					if b.State == A {
						n++
					}
				}
			}
			if len(m.Backends) != n || cap(m.Backends) != n {
				t.Errorf("%d backends (capacity %d), want the %d active ones of %v", len(m.Backends), cap(m.Backends), n, tc.want)
			}
		})
	}
}
