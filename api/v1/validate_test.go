package v1

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"
)

// validateCase mutates a valid sample value. field is the ValidationError
// field we expect, or "" when the mutated value must still be valid.
type validateCase[T any] struct {
	name   string
	mutate func(*T)
	field  string
}

// runValidate applies each case to a fresh sample and checks Validate: the
// error (if any) must be a *ValidationError matching ErrInvalid, naming
// the expected field, and its message must name the object, field and
// value and say what is allowed.
func runValidate[T any, PT interface {
	*T
	Validate() error
}](t *testing.T, sample func() T, cases []validateCase[T]) {
	t.Helper()
	s := sample()
	if err := PT(&s).Validate(); err != nil {
		t.Fatalf("sample does not validate: %v", err)
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := sample()
			tc.mutate(&v)
			err := PT(&v).Validate()
			if tc.field == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate() = nil, want an error on %s", tc.field)
			}
			if !errors.Is(err, ErrInvalid) || Reason(err) != "invalid" {
				t.Errorf("error %v does not match ErrInvalid", err)
			}
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("error %v is not a *ValidationError", err)
			}
			if ve.Field != tc.field {
				t.Errorf("error on field %q, want %q (%v)", ve.Field, tc.field, err)
			}
			msg := err.Error()
			if !strings.Contains(msg, ve.Field) || !strings.Contains(msg, fmt.Sprintf("%q", ve.Value)) || ve.Allowed == "" || ve.Object == "" {
				t.Errorf("message %q does not name field, value and what is allowed", msg)
			}
		})
	}
}

func TestValidateClusterName(t *testing.T) {
	for _, ok := range []string{"a", "c1", "1c", "eu-west-1", strings.Repeat("x", 32)} {
		if err := ValidateClusterName(ok); err != nil {
			t.Errorf("ValidateClusterName(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-a", "a-", "A", "a_b", "a.b", "a b", strings.Repeat("x", 33), "é"} {
		if err := ValidateClusterName(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("ValidateClusterName(%q) = %v, want ErrInvalid", bad, err)
		}
	}
}

func TestValidateClusterID(t *testing.T) {
	for _, tc := range []struct {
		id ClusterID
		ok bool
	}{{0, false}, {1, true}, {255, true}, {256, true}, {511, true}, {512, false}, {1 << 31, false}} {
		if err := ValidateClusterID(tc.id); (err == nil) != tc.ok {
			t.Errorf("ValidateClusterID(%d) = %v, want ok=%v", tc.id, err, tc.ok)
		}
	}
}

func TestClusterConfigValidate(t *testing.T) {
	pfx := netip.MustParsePrefix
	runValidate(t, sampleClusterConfig, []validateCase[ClusterConfig]{
		{"empty name", func(c *ClusterConfig) { c.Name = "" }, "name"},
		{"uppercase name", func(c *ClusterConfig) { c.Name = "Prod" }, "name"},
		{"long name", func(c *ClusterConfig) { c.Name = strings.Repeat("a", 33) }, "name"},
		{"id 0", func(c *ClusterConfig) { c.ID = 0 }, "id"},
		{"id 512", func(c *ClusterConfig) { c.ID = 512 }, "id"},
		{"id 256 needs 511", func(c *ClusterConfig) { c.ID = 256 }, "id"},
		{"id 511 with 511", func(c *ClusterConfig) { c.ID = 511; c.Capabilities.MaxConnectedClusters = 511 }, ""},
		{"no pod CIDRs", func(c *ClusterConfig) { c.PodCIDRs = nil }, "podCIDRs"},
		{"zero prefix", func(c *ClusterConfig) { c.PodCIDRs = []netip.Prefix{{}} }, "podCIDRs[0]"},
		{"host bits", func(c *ClusterConfig) { c.PodCIDRs[1] = pfx("fd00:7::1/48") }, "podCIDRs[1]"},
		{"slash zero", func(c *ClusterConfig) { c.PodCIDRs = []netip.Prefix{pfx("0.0.0.0/0")} }, "podCIDRs[0]"},
		{"4in6 prefix", func(c *ClusterConfig) { c.PodCIDRs = []netip.Prefix{pfx("::ffff:10.0.0.0/104")} }, "podCIDRs[0]"},
		{"overlap", func(c *ClusterConfig) { c.PodCIDRs = append(c.PodCIDRs, pfx("10.7.3.0/24")) }, "podCIDRs[2]"},
		{"duplicate", func(c *ClusterConfig) { c.PodCIDRs = append(c.PodCIDRs, c.PodCIDRs[0]) }, "podCIDRs[2]"},
		{"host route ok", func(c *ClusterConfig) { c.PodCIDRs = []netip.Prefix{pfx("10.0.0.1/32")} }, ""},
		{"bad region", func(c *ClusterConfig) { c.Region = "eu west" }, "region"},
		{"bad zone", func(c *ClusterConfig) { c.Zone = "-a" }, "zone"},
		{"no topology ok", func(c *ClusterConfig) { c.Region, c.Zone = "", "" }, ""},
		{"max clusters 0", func(c *ClusterConfig) { c.Capabilities.MaxConnectedClusters = 0 }, "capabilities.maxConnectedClusters"},
		{"max clusters 256", func(c *ClusterConfig) { c.Capabilities.MaxConnectedClusters = 256 }, "capabilities.maxConnectedClusters"},
		{"encryption unknown", func(c *ClusterConfig) { c.Encryption.Type = "WireGuard" }, "encryption.type"},
		{"encryption ipsec", func(c *ClusterConfig) { c.Encryption.Type = EncryptionIPsec }, ""},
		{"encryption none", func(c *ClusterConfig) { c.Encryption = EncryptionConfig{} }, ""},
		{"strict without a type", func(c *ClusterConfig) { c.Encryption = EncryptionConfig{Strict: true} }, "encryption.strict"},
		{"strict wireguard", func(c *ClusterConfig) {
			c.Encryption = EncryptionConfig{Type: EncryptionWireGuard, Strict: true, Rotation: 3}
		}, ""},
	})
}

func TestNodeValidate(t *testing.T) {
	addr, pfx := netip.MustParseAddr, netip.MustParsePrefix
	runValidate(t, sampleNode, []validateCase[Node]{
		{"bad cluster", func(n *Node) { n.Cluster = "a/b" }, "cluster"},
		{"empty name", func(n *Node) { n.Name = "" }, "name"},
		{"uppercase name", func(n *Node) { n.Name = "Node-1" }, "name"},
		{"long name", func(n *Node) { n.Name = strings.Repeat("a", 254) }, "name"},
		{"253 name", func(n *Node) { n.Name = strings.Repeat("a", 253) }, ""},
		{"no IPs", func(n *Node) { n.IPs = nil }, "ips"},
		{"zero IP", func(n *Node) { n.IPs = []netip.Addr{{}} }, "ips[0]"},
		{"zoned IP", func(n *Node) { n.IPs[1] = addr("fe80::1%eth0") }, "ips[1]"},
		{"mapped IP", func(n *Node) { n.IPs[0] = addr("::ffff:172.20.33.41") }, "ips[0]"},
		{"unspecified IP", func(n *Node) { n.IPs[0] = addr("0.0.0.0") }, "ips[0]"},
		{"multicast IP", func(n *Node) { n.IPs[1] = addr("ff02::1") }, "ips[1]"},
		{"duplicate IP", func(n *Node) { n.IPs[1] = n.IPs[0] }, "ips[1]"},
		{"IPv6 only", func(n *Node) { n.IPs = n.IPs[1:] }, ""},
		{"no pod CIDRs ok", func(n *Node) { n.PodCIDRs = nil }, ""},
		{"pod CIDR host bits", func(n *Node) { n.PodCIDRs[0] = pfx("10.7.12.1/24") }, "podCIDRs[0]"},
		{"pod CIDRs overlap", func(n *Node) { n.PodCIDRs[1] = pfx("10.7.12.128/25") }, "podCIDRs[1]"},
		{"no WireGuard ok", func(n *Node) { n.WireGuardPublicKey = "" }, ""},
		{"WireGuard short", func(n *Node) { n.WireGuardPublicKey = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8A==" }, "wireGuardPublicKey"},
		{"WireGuard not base64", func(n *Node) { n.WireGuardPublicKey = strings.Repeat("!", 43) + "=" }, "wireGuardPublicKey"},
		{"WireGuard url alphabet", func(n *Node) { n.WireGuardPublicKey = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg_" }, "wireGuardPublicKey"},
		{"WireGuard padding bits", func(n *Node) { n.WireGuardPublicKey = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dh=" }, "wireGuardPublicKey"},
		{"IPsec index", func(n *Node) { n.IPsecKeyIndex = 15 }, ""},
		{"health addr v6", func(n *Node) { n.HealthAddr = "[2a05:d018:1::29]:4240" }, ""},
		{"health addr name", func(n *Node) { n.HealthAddr = "node-1.internal:4240" }, ""},
		{"health addr no port", func(n *Node) { n.HealthAddr = "172.20.33.41" }, "healthAddr"},
		{"health addr port 0", func(n *Node) { n.HealthAddr = "172.20.33.41:0" }, "healthAddr"},
		{"health addr port big", func(n *Node) { n.HealthAddr = "172.20.33.41:65536" }, "healthAddr"},
		{"health addr port padded", func(n *Node) { n.HealthAddr = "172.20.33.41:04240" }, "healthAddr"},
		{"health addr bad host", func(n *Node) { n.HealthAddr = "no_way:80" }, "healthAddr"},
		{"health addr bracketed v4", func(n *Node) { n.HealthAddr = "[172.20.33.41]:4240" }, "healthAddr"},
		{"health addr bracketed name", func(n *Node) { n.HealthAddr = "[node-1]:4240" }, "healthAddr"},
		{"health addr unspecified", func(n *Node) { n.HealthAddr = "0.0.0.0:80" }, "healthAddr"},
		{"bad zone", func(n *Node) { n.Zone = strings.Repeat("z", 64) }, "zone"},
	})
}

func TestEndpointValidate(t *testing.T) {
	addr := netip.MustParseAddr
	runValidate(t, sampleEndpoint, []validateCase[Endpoint]{
		{"no cluster", func(e *Endpoint) { e.Cluster = "" }, "cluster"},
		{"zero IP", func(e *Endpoint) { e.IP = netip.Addr{} }, "ip"},
		{"mapped IP", func(e *Endpoint) { e.IP = addr("::ffff:10.7.12.201") }, "ip"},
		{"zoned IP", func(e *Endpoint) { e.IP = addr("fe80::1%eth0") }, "ip"},
		{"broadcast IP", func(e *Endpoint) { e.IP = addr("255.255.255.255") }, "ip"},
		{"IPv6 pod on IPv4 node", func(e *Endpoint) { e.IP = addr("fd00:7::c9") }, ""},
		{"identity 0", func(e *Endpoint) { e.Identity = 0 }, "identity"},
		{"identity no cluster bits", func(e *Endpoint) { e.Identity = 1000 }, "identity"},
		{"identity local 0", func(e *Endpoint) { e.Identity = MakeIdentity(7, 0) }, "identity"},
		{"identity cluster 512", func(e *Endpoint) { e.Identity = MakeIdentity(512, 1) }, "identity"},
		{"zero node IP", func(e *Endpoint) { e.NodeIP = netip.Addr{} }, "nodeIP"},
		{"multicast node IP", func(e *Endpoint) { e.NodeIP = addr("239.1.1.1") }, "nodeIP"},
		{"not a pod", func(e *Endpoint) { e.Namespace, e.Pod = "", "" }, ""},
		{"pod without namespace", func(e *Endpoint) { e.Namespace = "" }, "namespace"},
		{"namespace only", func(e *Endpoint) { e.Pod = "" }, ""},
		{"bad namespace", func(e *Endpoint) { e.Namespace = "kube.system" }, "namespace"},
		{"bad pod", func(e *Endpoint) { e.Pod = "Web_1" }, "pod"},
		{"not ready", func(e *Endpoint) { e.Ready = false }, ""},
	})
}

func TestIdentityValidate(t *testing.T) {
	runValidate(t, sampleIdentity, []validateCase[Identity]{
		{"bad cluster", func(id *Identity) { id.Cluster = "UPPER" }, "cluster"},
		{"id without cluster", func(id *Identity) { id.ID = 300 }, "id"},
		{"id local 0", func(id *Identity) { id.ID = MakeIdentity(7, 0) }, "id"},
		{"no labels", func(id *Identity) { id.Labels = nil }, "labels"},
		{"empty labels", func(id *Identity) { id.Labels = map[string]string{} }, "labels"},
		{"too many labels", func(id *Identity) {
			for i := range MaxIdentityLabels {
				id.Labels[fmt.Sprintf("k8s:l%d", i)] = "v"
			}
		}, "labels"},
		{"64 labels", func(id *Identity) {
			id.Labels = map[string]string{}
			for i := range MaxIdentityLabels {
				id.Labels[fmt.Sprintf("k8s:l%d", i)] = "v"
			}
		}, ""},
		{"empty key", func(id *Identity) { id.Labels[""] = "x" }, "labels"},
		{"empty name after source", func(id *Identity) { id.Labels["k8s:"] = "x" }, "labels"},
		{"bad source", func(id *Identity) { id.Labels["K8S:app"] = "x" }, "labels"},
		{"bad key chars", func(id *Identity) { id.Labels["k8s:app name"] = "x" }, "labels"},
		{"two slashes", func(id *Identity) { id.Labels["k8s:a/b/c"] = "x" }, "labels"},
		{"bad prefix", func(id *Identity) { id.Labels["k8s:Example.com/app"] = "x" }, "labels"},
		{"long name", func(id *Identity) { id.Labels["k8s:"+strings.Repeat("a", 64)] = "x" }, "labels"},
		{"no source ok", func(id *Identity) { id.Labels["app"] = "x" }, ""},
		{"empty value ok", func(id *Identity) { id.Labels["reserved:host"] = "" }, ""},
		{"bad value", func(id *Identity) { id.Labels["k8s:app"] = "a b" }, `labels["k8s:app"]`},
		{"long value", func(id *Identity) { id.Labels["k8s:app"] = strings.Repeat("v", 64) }, `labels["k8s:app"]`},
		{"63 value", func(id *Identity) { id.Labels["k8s:app"] = strings.Repeat("v", 63) }, ""},
	})
}

func TestServiceValidate(t *testing.T) {
	addr := netip.MustParseAddr
	runValidate(t, sampleService, []validateCase[Service]{
		{"bad cluster", func(s *Service) { s.Cluster = "" }, "cluster"},
		{"no namespace", func(s *Service) { s.Namespace = "" }, "namespace"},
		{"bad name", func(s *Service) { s.Name = "web.v2" }, "name"},
		{"long name", func(s *Service) { s.Name = strings.Repeat("s", 64) }, "name"},
		{"no ports ok", func(s *Service) { s.Ports = nil; s.Backends = nil }, ""},
		{"bad port name", func(s *Service) { s.Ports[0].Name = "HTTP" }, "ports[0].name"},
		{"bad protocol", func(s *Service) { s.Ports[1].Protocol = "tcp" }, "ports[1].protocol"},
		{"empty protocol", func(s *Service) { s.Ports[1].Protocol = "" }, "ports[1].protocol"},
		{"sctp ok", func(s *Service) { s.Ports[1].Protocol = ProtocolSCTP }, ""},
		{"port 0", func(s *Service) { s.Ports[2].Port = 0 }, "ports[2].port"},
		{"duplicate proto+port", func(s *Service) { s.Ports[2].Protocol = ProtocolTCP }, "ports[2].port"},
		{"same port other proto ok", func(s *Service) { s.Ports[2].Port = 9090; s.Ports[2].Protocol = ProtocolUDP }, ""},
		{"duplicate name", func(s *Service) { s.Ports[2].Name = "http" }, "ports[2].name"},
		{"two unnamed ports", func(s *Service) {
			s.Ports = []ServicePort{{Protocol: ProtocolTCP, Port: 80}, {Protocol: ProtocolTCP, Port: 81}}
			s.Backends = nil
		}, "ports[1].name"},
		{"one unnamed port ok", func(s *Service) {
			s.Ports = []ServicePort{{Protocol: ProtocolTCP, Port: 80}}
			s.Backends = []Backend{{IP: addr("10.7.1.1"), Ports: []BackendPort{{Port: 8080}}, State: BackendActive}}
		}, ""},
		{"target port 65535 ok", func(s *Service) { s.Ports[0].TargetPort = 65535 }, ""},
		{"no frontends ok", func(s *Service) { s.FrontendIPs = nil }, ""},
		{"bad frontend", func(s *Service) { s.FrontendIPs[1] = netip.Addr{} }, "frontendIPs[1]"},
		{"duplicate frontend", func(s *Service) { s.FrontendIPs[1] = s.FrontendIPs[0] }, "frontendIPs[1]"},
		{"bad backend IP", func(s *Service) { s.Backends[1].IP = addr("::ffff:10.0.0.1") }, "backends[1].ip"},
		{"duplicate backend IP", func(s *Service) { s.Backends[2].IP = s.Backends[0].IP }, "backends[2].ip"},
		{"duplicate backend IP, many backends", func(s *Service) {
			for i := range 40 {
				s.Backends = append(s.Backends, Backend{IP: netip.AddrFrom4([4]byte{10, 7, 200, byte(i)}), State: BackendActive})
			}
			s.Backends[39].IP = s.Backends[20].IP
		}, "backends[39].ip"},
		{"many backends ok", func(s *Service) {
			for i := range 40 {
				s.Backends = append(s.Backends, Backend{IP: netip.AddrFrom4([4]byte{10, 7, 200, byte(i)}), State: BackendActive})
			}
		}, ""},
		{"backend port unknown name", func(s *Service) { s.Backends[0].Ports[1].Name = "admin" }, "backends[0].ports[1].name"},
		{"backend port 0", func(s *Service) { s.Backends[1].Ports[0].Port = 0 }, "backends[1].ports[0].port"},
		{"backend port twice", func(s *Service) { s.Backends[0].Ports[2].Name = "http" }, "backends[0].ports[2].name"},
		{"backend without ports ok", func(s *Service) { s.Backends[0].Ports = nil }, ""},
		{"backend state empty", func(s *Service) { s.Backends[0].State = "" }, "backends[0].state"},
		{"backend state unknown", func(s *Service) { s.Backends[0].State = "Active" }, "backends[0].state"},
		{"backend node bad", func(s *Service) { s.Backends[1].Node = "Node_1" }, "backends[1].node"},
		{"backend zone bad", func(s *Service) { s.Backends[1].Zone = "zone a" }, "backends[1].zone"},
		{"shared not global", func(s *Service) { s.Global = false; s.Affinity = "" }, "shared"},
		{"global not shared ok", func(s *Service) { s.Shared = false }, ""},
		{"local service ok", func(s *Service) { s.Global, s.Shared, s.Affinity, s.FailoverRegions = false, false, "", nil }, ""},
		{"affinity not global", func(s *Service) { s.Global, s.Shared = false, false }, "affinity"},
		{"affinity none not global ok", func(s *Service) { s.Global, s.Shared, s.Affinity, s.FailoverRegions = false, false, AffinityNone, nil }, ""},
		{"affinity remote", func(s *Service) { s.Affinity = AffinityRemote }, ""},
		{"affinity unknown", func(s *Service) { s.Affinity = "nearest" }, "affinity"},
		{"no failover regions ok", func(s *Service) { s.FailoverRegions = nil }, ""},
		{"failover regions not global", func(s *Service) { s.Global, s.Shared, s.Affinity = false, false, "" }, "failoverRegions"},
		{"failover region empty", func(s *Service) { s.FailoverRegions[1] = "" }, "failoverRegions[1]"},
		{"failover region bad", func(s *Service) { s.FailoverRegions[0] = "us east" }, "failoverRegions[0]"},
		{"failover region too long", func(s *Service) { s.FailoverRegions[0] = strings.Repeat("a", 64) }, "failoverRegions[0]"},
		{"failover region longest ok", func(s *Service) { s.FailoverRegions[0] = strings.Repeat("a", 63) }, ""},
		{"failover region mixed case ok", func(s *Service) { s.FailoverRegions[0] = "US_East.1" }, ""},
		{"failover region twice", func(s *Service) { s.FailoverRegions = append(s.FailoverRegions, "us-east-1") }, "failoverRegions[2]"},
		{"most failover regions ok", func(s *Service) { s.FailoverRegions = manyRegions(MaxFailoverRegions) }, ""},
		{"too many failover regions", func(s *Service) { s.FailoverRegions = manyRegions(MaxFailoverRegions + 1) }, "failoverRegions"},
		{"backend shards ok", func(s *Service) { s.Backends, s.BackendShards = nil, []uint64{0, 0, 7} }, ""},
		{"backend shards and backends", func(s *Service) { s.BackendShards = []uint64{0} }, "backends"},
		{"too many backend shards", func(s *Service) { s.Backends, s.BackendShards = nil, make([]uint64, MaxBackendShards+1) }, "backendShards"},
		{"most backend shards ok", func(s *Service) { s.Backends, s.BackendShards = nil, make([]uint64, MaxBackendShards) }, ""},
		{"http check ok", func(s *Service) { s.HealthCheck = HealthCheck{Type: HealthCheckHTTP, Path: "/healthz?full=1"} }, ""},
		{"tcp check ok", func(s *Service) { s.HealthCheck = HealthCheck{Type: HealthCheckTCP} }, ""},
		{"http check on a local service ok", func(s *Service) {
			s.Global, s.Shared, s.Affinity, s.FailoverRegions = false, false, "", nil
			s.HealthCheck = HealthCheck{Type: HealthCheckHTTP, Path: "/"}
		}, ""},
		{"check type unknown", func(s *Service) { s.HealthCheck = HealthCheck{Type: "grpc"} }, "healthCheck.type"},
		{"tcp check with a path", func(s *Service) { s.HealthCheck = HealthCheck{Path: "/healthz"} }, "healthCheck.path"},
		{"http check without a path", func(s *Service) { s.HealthCheck = HealthCheck{Type: HealthCheckHTTP} }, "healthCheck.path"},
		{"http check relative path", func(s *Service) { s.HealthCheck = HealthCheck{Type: HealthCheckHTTP, Path: "healthz"} }, "healthCheck.path"},
		{"http check path with a space", func(s *Service) { s.HealthCheck = HealthCheck{Type: HealthCheckHTTP, Path: "/a b"} }, "healthCheck.path"},
		{"http check path with a newline", func(s *Service) {
			s.HealthCheck = HealthCheck{Type: HealthCheckHTTP, Path: "/healthz\r\nHost: evil"}
		}, "healthCheck.path"},
		{"http check path not ASCII", func(s *Service) { s.HealthCheck = HealthCheck{Type: HealthCheckHTTP, Path: "/santé"} }, "healthCheck.path"},
		{"http check longest path ok", func(s *Service) {
			s.HealthCheck = HealthCheck{Type: HealthCheckHTTP, Path: "/" + strings.Repeat("a", MaxHealthCheckPath-1)}
		}, ""},
		{"http check path too long", func(s *Service) {
			s.HealthCheck = HealthCheck{Type: HealthCheckHTTP, Path: "/" + strings.Repeat("a", MaxHealthCheckPath)}
		}, "healthCheck.path"},
	})
}

func TestBackendShardValidate(t *testing.T) {
	addr := netip.MustParseAddr
	runValidate(t, sampleBackendShard, []validateCase[BackendShard]{
		{"bad cluster", func(s *BackendShard) { s.Cluster = "EU" }, "cluster"},
		{"no namespace", func(s *BackendShard) { s.Namespace = "" }, "namespace"},
		{"bad service", func(s *BackendShard) { s.Service = "web.v2" }, "service"},
		{"negative shard", func(s *BackendShard) { s.Shard = -1 }, "shard"},
		{"shard too large", func(s *BackendShard) { s.Shard = MaxBackendShards }, "shard"},
		{"last shard ok", func(s *BackendShard) { s.Shard = MaxBackendShards - 1 }, ""},
		{"empty ok", func(s *BackendShard) { s.Backends = nil }, ""},
		{"gen 0 ok", func(s *BackendShard) { s.Gen = 0 }, ""},
		// The backends are checked as a service's are, but for the port
		// names, which only the service knows.
		{"bad backend IP", func(s *BackendShard) { s.Backends[1].IP = addr("::ffff:10.0.0.1") }, "backends[1].ip"},
		{"zoned backend IP", func(s *BackendShard) { s.Backends[1].IP = addr("fe80::1%eth0") }, "backends[1].ip"},
		{"duplicate backend IP", func(s *BackendShard) { s.Backends[2].IP = s.Backends[0].IP }, "backends[2].ip"},
		{"any port name ok", func(s *BackendShard) { s.Backends[0].Ports[1].Name = "admin" }, ""},
		{"bad port name", func(s *BackendShard) { s.Backends[0].Ports[1].Name = "Admin" }, "backends[0].ports[1].name"},
		{"backend port 0", func(s *BackendShard) { s.Backends[1].Ports[0].Port = 0 }, "backends[1].ports[0].port"},
		{"backend port twice", func(s *BackendShard) { s.Backends[0].Ports[2].Name = "http" }, "backends[0].ports[2].name"},
		{"backend state unknown", func(s *BackendShard) { s.Backends[0].State = "Active" }, "backends[0].state"},
		{"backend node bad", func(s *BackendShard) { s.Backends[1].Node = "Node_1" }, "backends[1].node"},
		{"backend zone bad", func(s *BackendShard) { s.Backends[1].Zone = "zone a" }, "backends[1].zone"},
	})
}

func TestAffinityIsNone(t *testing.T) {
	for a, want := range map[Affinity]bool{"": true, AffinityNone: true, AffinityLocal: false, AffinityRemote: false} {
		if a.IsNone() != want {
			t.Errorf("%q.IsNone() = %v", a, !want)
		}
	}
}

func TestValidationErrorTruncatesValues(t *testing.T) {
	n := sampleNode()
	n.Name = strings.Repeat("A", 1<<20)
	err := n.Validate()
	if err == nil || len(err.Error()) > 4*maxQuoted+500 {
		t.Fatalf("error is %d bytes, want it bounded", len(err.Error()))
	}
}

func TestEndpointValidateDoesNotAllocate(t *testing.T) {
	e := sampleEndpoint()
	if n := testing.AllocsPerRun(100, func() { _ = e.Validate() }); n != 0 {
		t.Errorf("Endpoint.Validate allocates %v times per call, want 0", n)
	}
}

func TestContains(t *testing.T) {
	c := sampleClusterConfig()
	for ip, want := range map[string]bool{
		"10.7.0.1":         true,
		"10.7.255.255":     true,
		"10.8.0.1":         false,
		"fd00:7::1":        true,
		"fd00:8::1":        false,
		"::ffff:10.7.0.1":  false, // mapped: never contained
		"fd00:7::1%eth0":   false, // zoned: never contained
		"192.168.0.1":      false,
		"fd00:7:0:ffff::1": true,
		"fd00:7:1::1":      false,
	} {
		if got := c.Contains(netip.MustParseAddr(ip)); got != want {
			t.Errorf("Contains(%s) = %v, want %v", ip, got, want)
		}
	}
	if c.Contains(netip.Addr{}) {
		t.Error("Contains(zero Addr) = true")
	}
}

func TestPrefixesOverlap(t *testing.T) {
	p := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	tests := []struct {
		a, b   []netip.Prefix
		x, y   string
		overlp bool
	}{
		{p("10.0.0.0/16"), p("10.1.0.0/16"), "", "", false},
		{p("10.0.0.0/16", "fd00::/48"), p("10.1.0.0/16", "fd00:0:0:1::/64"), "fd00::/48", "fd00:0:0:1::/64", true},
		{p("10.0.0.0/8"), p("192.168.0.0/16", "10.200.0.0/24"), "10.0.0.0/8", "10.200.0.0/24", true},
		{p("10.0.0.0/8"), p("::/0"), "", "", false}, // families never overlap
		{nil, p("10.0.0.0/8"), "", "", false},
	}
	for _, tt := range tests {
		x, y, ok := PrefixesOverlap(tt.a, tt.b)
		if ok != tt.overlp {
			t.Errorf("PrefixesOverlap(%v, %v) = %v, want %v", tt.a, tt.b, ok, tt.overlp)
			continue
		}
		if ok && (x.String() != tt.x || y.String() != tt.y) {
			t.Errorf("PrefixesOverlap(%v, %v) = %v %v, want %s %s", tt.a, tt.b, x, y, tt.x, tt.y)
		}
	}
}

func TestIdentityValidateIsDeterministic(t *testing.T) {
	id := sampleIdentity()
	for _, k := range []string{"k8s:z z", "k8s:b b", "k8s:a a", "k8s:m m"} {
		id.Labels[k] = "x"
	}
	want := id.Validate().Error()
	for range 50 {
		if got := id.Validate().Error(); got != want {
			t.Fatalf("Validate() = %q, then %q", want, got)
		}
	}
	if !strings.Contains(want, `"k8s:a a"`) {
		t.Errorf("Validate() = %q, want it to report the smallest bad key", want)
	}
}

func TestContainsPrefix(t *testing.T) {
	c := ClusterConfig{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("fd01::/48")}}
	for p, want := range map[string]bool{
		"10.1.0.0/16": true, "10.1.7.0/24": true, "10.1.7.9/32": true, "fd01:0:0:1::/64": true,
		"10.0.0.0/15": false, "10.0.0.0/8": false, "10.2.0.0/24": false, "fd01::/16": false, "fd02::/64": false,
	} {
		if got := c.ContainsPrefix(netip.MustParsePrefix(p)); got != want {
			t.Errorf("ContainsPrefix(%s) = %v, want %v", p, got, want)
		}
	}
}

func TestCheckReachable(t *testing.T) {
	for a, ok := range map[string]bool{
		"192.168.100.101": true, "10.0.0.1": true, "203.0.113.9": true, "2001:db8::1": true, "fd00::1": true,
		"127.0.0.1": false, "127.1.2.3": false, "::1": false, "169.254.169.254": false, "fe80::1": false,
		"224.0.0.1": false, "ff02::1": false, "0.0.0.0": false, "::": false, "255.255.255.255": false, "::ffff:10.0.0.1": false,
	} {
		err := CheckReachable(netip.MustParseAddr(a))
		if (err == nil) != ok {
			t.Errorf("CheckReachable(%s) = %v, want ok=%v", a, err, ok)
		}
		if err != nil && (!errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), a)) {
			t.Errorf("CheckReachable(%s) = %v: want an ErrInvalid naming the address", a, err)
		}
	}
}

// manyRegions returns n distinct region names.
func manyRegions(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = "region-" + strconv.Itoa(i)
	}
	return out
}
