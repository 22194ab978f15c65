package v1

import (
	"fmt"
	"net/netip"
	"testing"
)

// Realistic sample values, shaped like what the Kubernetes source publishes
// for a mid-sized cluster. Each call returns a fresh value the caller may
// modify.

const testCluster = "eu-west-1"

func sampleClusterConfig() ClusterConfig {
	return ClusterConfig{
		Name:     testCluster,
		ID:       7,
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.7.0.0/16"), netip.MustParsePrefix("fd00:7::/48")},
		Region:   "eu-west-1",
		Zone:     "eu-west-1a",
		Capabilities: Capabilities{
			SyncedCanaries:       true,
			MaxConnectedClusters: 255,
		},
		Encryption: EncryptionConfig{Type: EncryptionWireGuard},
	}
}

func sampleNode() Node {
	return Node{
		Cluster:            testCluster,
		Name:               "ip-172-20-33-41.eu-west-1.compute.internal",
		IPs:                []netip.Addr{netip.MustParseAddr("172.20.33.41"), netip.MustParseAddr("2a05:d018:1::29")},
		PodCIDRs:           []netip.Prefix{netip.MustParsePrefix("10.7.12.0/24"), netip.MustParsePrefix("fd00:7:0:c::/64")},
		WireGuardPublicKey: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
		IPsecKeyIndex:      0,
		HealthAddr:         "172.20.33.41:4240",
		Region:             "eu-west-1",
		Zone:               "eu-west-1a",
	}
}

// sampleEndpoint is a pod of a Deployment: generated pod name, long-ish
// namespace, IPv4 pod and node IPs.
func sampleEndpoint() Endpoint {
	return Endpoint{
		Cluster:   testCluster,
		IP:        netip.MustParseAddr("10.7.12.201"),
		Identity:  MakeIdentity(7, 48213),
		NodeIP:    netip.MustParseAddr("172.20.33.41"),
		Namespace: "payments-production",
		Pod:       "checkout-api-7f9c6d5b8d-x2k4p",
		Ready:     true,
	}
}

// sampleEndpointN returns the n-th of a family of distinct endpoints.
func sampleEndpointN(n int) Endpoint {
	e := sampleEndpoint()
	e.IP = netip.AddrFrom4([4]byte{10, 7, byte(n >> 8), byte(n)})
	e.Pod = fmt.Sprintf("checkout-api-7f9c6d5b8d-%05d", n)
	return e
}

func sampleIdentity() Identity {
	return Identity{
		Cluster: testCluster,
		ID:      MakeIdentity(7, 48213),
		Labels: map[string]string{
			"k8s:app":                                                        "checkout-api",
			"k8s:app.kubernetes.io/part-of":                                  "payments",
			"k8s:io.kubernetes.pod.namespace":                                "payments-production",
			"k8s:io.cilium.k8s.policy.serviceaccount":                        "checkout-api",
			"k8s:io.cilium.k8s.policy.cluster":                               testCluster,
			"k8s:io.cilium.k8s.namespace.labels.team":                        "payments",
			"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "payments-production",
		},
	}
}

func sampleService() Service {
	return Service{
		Cluster:   testCluster,
		Namespace: "payments-production",
		Name:      "checkout-api",
		Ports: []ServicePort{
			{Name: "http", Protocol: ProtocolTCP, Port: 80, TargetPort: 8080},
			{Name: "grpc", Protocol: ProtocolTCP, Port: 9090},
			{Name: "metrics", Protocol: ProtocolUDP, Port: 9090},
		},
		FrontendIPs: []netip.Addr{netip.MustParseAddr("10.96.14.3"), netip.MustParseAddr("fd00:96::e03")},
		Backends: []Backend{
			{IP: netip.MustParseAddr("10.7.12.201"), Ports: []BackendPort{{"http", 8080}, {"grpc", 9090}, {"metrics", 9102}}, State: BackendActive, Node: "ip-172-20-33-41.eu-west-1.compute.internal", Zone: "eu-west-1a"},
			{IP: netip.MustParseAddr("10.7.13.17"), Ports: []BackendPort{{"http", 8080}, {"grpc", 9090}}, State: BackendTerminating, Node: "ip-172-20-34-7.eu-west-1.compute.internal", Zone: "eu-west-1b"},
			{IP: netip.MustParseAddr("fd00:7:0:c::11"), Ports: []BackendPort{{"http", 8080}}, State: BackendUnready},
		},
		Global:          true,
		Shared:          true,
		Affinity:        AffinityLocal,
		FailoverRegions: []string{"us-east-1", "ap-southeast-1"},
		HealthCheck:     HealthCheck{Type: HealthCheckHTTP, Path: "/healthz"},
	}
}

// sampleBackendShard is shard 3 of a large service: the sample service's
// backends, published apart from it.
func sampleBackendShard() BackendShard {
	return BackendShard{
		Cluster:   testCluster,
		Namespace: "payments-production",
		Service:   "checkout-api",
		Shard:     3,
		Gen:       12,
		Backends:  sampleService().Backends,
	}
}

// mustEncode encodes v or fails the test.
func mustEncode(tb testing.TB, v any) []byte {
	tb.Helper()
	b, err := Encode(v)
	if err != nil {
		tb.Fatalf("Encode(%T): %v", v, err)
	}
	return b
}
