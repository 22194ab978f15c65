package agent

import (
	"net/netip"
	"reflect"
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/bpf"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/tunnel"
)

var (
	addr   = netip.MustParseAddr
	prefix = netip.MustParsePrefix
)

// backend is a merged backend as clustermesh resolves it.
func backend(cluster string, id v1.ClusterID, ip string, ports ...uint16) clustermesh.Backend {
	return clustermesh.Backend{Cluster: cluster, ClusterID: id, IP: addr(ip), TargetPorts: ports}
}

func snapshotOf(services ...*clustermesh.MergedService) *clustermesh.Snapshot {
	snap := &clustermesh.Snapshot{Services: map[clustermesh.ServiceName]*clustermesh.MergedService{}}
	for _, s := range services {
		snap.Services[s.ServiceName] = s
	}
	return snap
}

func TestLBServices(t *testing.T) {
	http := v1.ServicePort{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}
	dns := v1.ServicePort{Name: "dns", Protocol: v1.ProtocolUDP, Port: 53} // named target port
	sctp := v1.ServicePort{Name: "sctp", Protocol: v1.ProtocolSCTP, Port: 9999, TargetPort: 9999}
	be := func(ip string, port uint16, id uint32) bpf.Backend {
		return bpf.Backend{IP: addr(ip), Port: port, ClusterID: id}
	}
	for _, tc := range []struct {
		name     string
		services []*clustermesh.MergedService
		want     []bpf.Service
	}{
		{
			name: "target ports and cluster IDs per backend, one entry per VIP and port",
			services: []*clustermesh.MergedService{{
				ServiceName: clustermesh.ServiceName{Namespace: "default", Name: "web"},
				Ports:       []v1.ServicePort{http, dns},
				FrontendIPs: []netip.Addr{addr("10.96.0.11"), addr("10.96.0.10")},
				Backends: []clustermesh.Backend{
					backend("eu", 1, "10.1.0.1", 8080, 5353),
					// us serves the named port dns elsewhere.
					backend("us", 2, "10.2.0.1", 8080, 1053),
					// A backend that does not serve dns.
					backend("ap", 3, "10.3.0.1", 8080, 0),
				},
			}},
			want: []bpf.Service{
				{VIP: addr("10.96.0.10"), Port: 53, Proto: bpf.UDP, Backends: []bpf.Backend{be("10.1.0.1", 5353, 1), be("10.2.0.1", 1053, 2)}},
				{VIP: addr("10.96.0.10"), Port: 80, Proto: bpf.TCP, Backends: []bpf.Backend{be("10.1.0.1", 8080, 1), be("10.2.0.1", 8080, 2), be("10.3.0.1", 8080, 3)}},
				{VIP: addr("10.96.0.11"), Port: 53, Proto: bpf.UDP, Backends: []bpf.Backend{be("10.1.0.1", 5353, 1), be("10.2.0.1", 1053, 2)}},
				{VIP: addr("10.96.0.11"), Port: 80, Proto: bpf.TCP, Backends: []bpf.Backend{be("10.1.0.1", 8080, 1), be("10.2.0.1", 8080, 2), be("10.3.0.1", 8080, 3)}},
			},
		},
		{
			name: "IPv6 frontends and backends are left out",
			services: []*clustermesh.MergedService{{
				ServiceName: clustermesh.ServiceName{Namespace: "default", Name: "dual"},
				Ports:       []v1.ServicePort{http},
				FrontendIPs: []netip.Addr{addr("fd00::10"), addr("10.96.0.20")},
				Backends:    []clustermesh.Backend{backend("eu", 1, "fd01::1", 8080), backend("eu", 1, "10.1.0.7", 8080)},
			}, {
				ServiceName: clustermesh.ServiceName{Namespace: "default", Name: "v6"},
				Ports:       []v1.ServicePort{http},
				FrontendIPs: []netip.Addr{addr("fd00::11")},
				Backends:    []clustermesh.Backend{backend("eu", 1, "10.1.0.8", 8080)},
			}},
			want: []bpf.Service{
				{VIP: addr("10.96.0.20"), Port: 80, Proto: bpf.TCP, Backends: []bpf.Backend{be("10.1.0.7", 8080, 1)}},
			},
		},
		{
			name: "an unsupported protocol is left out, the other ports stay",
			services: []*clustermesh.MergedService{{
				ServiceName: clustermesh.ServiceName{Namespace: "default", Name: "mixed"},
				Ports:       []v1.ServicePort{sctp, http},
				FrontendIPs: []netip.Addr{addr("10.96.0.30")},
				Backends:    []clustermesh.Backend{backend("us", 2, "10.2.0.9", 9999, 8080)},
			}},
			want: []bpf.Service{
				{VIP: addr("10.96.0.30"), Port: 80, Proto: bpf.TCP, Backends: []bpf.Backend{be("10.2.0.9", 8080, 2)}},
			},
		},
		{
			name: "no backend serving the port: the service stays, empty",
			services: []*clustermesh.MergedService{{
				ServiceName: clustermesh.ServiceName{Namespace: "default", Name: "drained"},
				Ports:       []v1.ServicePort{dns},
				FrontendIPs: []netip.Addr{addr("10.96.0.40")},
				// Ports shorter than the service's: not served either.
				Backends: []clustermesh.Backend{backend("eu", 1, "10.1.0.9", 0), backend("eu", 1, "10.1.0.10")},
			}},
			want: []bpf.Service{{VIP: addr("10.96.0.40"), Port: 53, Proto: bpf.UDP}},
		},
		{
			name: "a service absent locally has no frontend here",
			services: []*clustermesh.MergedService{{
				ServiceName: clustermesh.ServiceName{Namespace: "default", Name: "elsewhere"},
				Ports:       []v1.ServicePort{http},
				Backends:    []clustermesh.Backend{backend("us", 2, "10.2.0.1", 8080)},
			}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			snap := snapshotOf(tc.services...)
			got := lbServices(snap)
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("lbServices:\n got %v\nwant %v", got, tc.want)
			}
			// Services come from a map: the order must not depend on
			// its iteration.
			for range 20 {
				if again := lbServices(snap); !reflect.DeepEqual(again, got) {
					t.Fatalf("lbServices is not deterministic:\n %v\n %v", got, again)
				}
			}
		})
	}
}

// Every service of a snapshot, in a deterministic order, across services.
func TestLBServicesOrderAcrossServices(t *testing.T) {
	var services []*clustermesh.MergedService
	var want []bpf.Service
	for i := range 8 {
		vip := netip.AddrFrom4([4]byte{10, 96, 0, byte(i + 1)})
		services = append(services, &clustermesh.MergedService{
			ServiceName: clustermesh.ServiceName{Namespace: "default", Name: string(rune('h' - i))},
			Ports:       []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}},
			FrontendIPs: []netip.Addr{vip},
		})
		want = append(want, bpf.Service{VIP: vip, Port: 80, Proto: bpf.TCP})
	}
	snap := snapshotOf(services...)
	for range 20 {
		if got := lbServices(snap); !reflect.DeepEqual(got, want) {
			t.Fatalf("lbServices:\n got %v\nwant %v", got, want)
		}
	}
}

func TestTunnelNodes(t *testing.T) {
	node := func(cluster, name string, ips []string, cidrs ...string) *v1.Node {
		n := &v1.Node{Cluster: cluster, Name: name}
		for _, ip := range ips {
			n.IPs = append(n.IPs, addr(ip))
		}
		for _, c := range cidrs {
			n.PodCIDRs = append(n.PodCIDRs, prefix(c))
		}
		return n
	}
	snap := &clustermesh.Snapshot{Nodes: map[string]map[string]*v1.Node{
		"us": {
			"n2": node("us", "n2", []string{"192.168.2.2"}, "10.2.2.0/24"),
			"n1": node("us", "n1", []string{"192.168.2.1", "fd00:2::1"}, "10.2.1.0/24", "fd02:1::/64"),
			// Not yet registered with an address or CIDR: nothing to route.
			"no-ip":   node("us", "no-ip", nil, "10.2.3.0/24"),
			"no-cidr": node("us", "no-cidr", []string{"192.168.2.4"}),
		},
		"eu": {
			"n1": node("eu", "n1", []string{"192.168.1.1"}, "10.1.1.0/24"),
		},
		"ap": {},
	}}
	want := []tunnel.Node{
		{Name: "eu/n1", Cluster: "eu", IP: addr("192.168.1.1"), PodCIDRs: []netip.Prefix{prefix("10.1.1.0/24")}},
		{Name: "us/n1", Cluster: "us", IP: addr("192.168.2.1"), PodCIDRs: []netip.Prefix{prefix("10.2.1.0/24"), prefix("fd02:1::/64")}},
		{Name: "us/n2", Cluster: "us", IP: addr("192.168.2.2"), PodCIDRs: []netip.Prefix{prefix("10.2.2.0/24")}},
	}
	for range 20 {
		if got := tunnelNodes(snap); !reflect.DeepEqual(got, want) {
			t.Fatalf("tunnelNodes:\n got %v\nwant %v", got, want)
		}
	}
	if got := tunnelNodes(&clustermesh.Snapshot{}); len(got) != 0 {
		t.Errorf("tunnelNodes of an empty snapshot = %v", got)
	}
}
