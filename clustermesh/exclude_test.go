package clustermesh

import (
	"log/slog"
	"net/netip"
	"slices"
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// SnapshotExcluding leaves the excluded nodes' backends out, chooses the
// group again (affinity local fails over to remote backends) and never
// empties a service.
func TestSnapshotExcluding(t *testing.T) {
	st := newState("eu", nil, slog.New(slog.DiscardHandler))
	st.setCluster(v1.ClusterConfig{Name: "eu", ID: 1, Region: "europe"})
	st.setCluster(v1.ClusterConfig{Name: "us", ID: 2, Region: "america"})
	local := svc("eu", true, true, v1.AffinityLocal, backends(v1.BackendActive, v1.BackendActive))
	local.Backends[0].Node = "n1" // named by the backend
	st.upsertService("eu", local)
	remote := svc("us", true, true, "", backends(v1.BackendActive))
	remote.Backends[0].IP = netip.MustParseAddr("10.2.0.1")
	st.upsertService("us", remote)
	// eu's second backend is on n2 by the IP cache.
	st.upsertNode("eu", v1.Node{Cluster: "eu", Name: "n2", IPs: []netip.Addr{netip.MustParseAddr("192.168.50.2")}})
	st.upsertEndpoint("eu", v1.Endpoint{Cluster: "eu", IP: local.Backends[1].IP, NodeIP: netip.MustParseAddr("192.168.50.2")})
	st.publish()
	name := ServiceName{"default", "echo"}
	ips := func(s *Snapshot) []string {
		var out []string
		for _, b := range s.Services[name].Backends {
			out = append(out, b.Cluster+"/"+b.IP.String())
		}
		slices.Sort(out)
		return out
	}
	orig := st.snap.Load()
	if got, ex := st.snapshotExcluding(nil); got != orig || len(ex.Changed) > 0 {
		t.Fatal("nothing excluded, yet the snapshot changed")
	}

	got, ex := st.snapshotExcluding(map[string]map[string]bool{"eu": {"n1": true}})
	if want := []string{"eu/10.0.0.2"}; !slices.Equal(ips(got), want) || !slices.Equal(ex.Changed, []ServiceName{name}) {
		t.Fatalf("n1 excluded: backends %v (changed %v), want %v", ips(got), ex.Changed, want)
	}
	if !slices.Equal(ips(orig), []string{"eu/10.0.0.1", "eu/10.0.0.2"}) {
		t.Fatalf("the original snapshot changed: %v", ips(orig))
	}

	// Every local backend excluded: affinity local fails over to us.
	got, _ = st.snapshotExcluding(map[string]map[string]bool{"eu": {"n1": true, "n2": true}})
	if want := []string{"us/10.2.0.1"}; !slices.Equal(ips(got), want) {
		t.Fatalf("n1 and n2 excluded: backends %v, want %v", ips(got), want)
	}

	// Every backend excluded: the service keeps them (never emptied).
	remote.Backends[0].Node = "u1"
	st.upsertService("us", remote)
	st.publish()
	got, ex = st.snapshotExcluding(map[string]map[string]bool{"eu": {"n1": true, "n2": true}, "us": {"u1": true}})
	if want := []string{"eu/10.0.0.1", "eu/10.0.0.2"}; !slices.Equal(ips(got), want) || !slices.Equal(ex.Kept, []ServiceName{name}) {
		t.Fatalf("all excluded: backends %v (kept %v), want %v kept", ips(got), ex.Kept, want)
	}
}
