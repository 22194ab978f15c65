package k8s

import (
	"errors"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/apiserver/source"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

func TestParseAnnotations(t *testing.T) {
	none := v1.AffinityNone
	for _, tc := range []struct {
		name string
		ann  map[string]string
		want source.ServiceOptions
		errs []string // annotation keys reported as malformed
	}{
		{"no annotations", nil, source.ServiceOptions{Affinity: none}, nil},
		{"trellis global defaults shared", map[string]string{source.AnnotationGlobal: "true"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: none}, nil},
		{"case and space", map[string]string{source.AnnotationGlobal: " True ", source.AnnotationAffinity: "LOCAL"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: v1.AffinityLocal}, nil},
		{"global not shared", map[string]string{source.AnnotationGlobal: "true", source.AnnotationShared: "false"},
			source.ServiceOptions{Global: true, Affinity: none}, nil},
		{"explicit false", map[string]string{source.AnnotationGlobal: "false"}, source.ServiceOptions{Affinity: none}, nil},
		{"shared without global is ignored", map[string]string{source.AnnotationShared: "true", source.AnnotationAffinity: "local"},
			source.ServiceOptions{Affinity: none}, nil},
		{"cilium", map[string]string{source.CiliumAnnotationGlobal: "true", source.CiliumAnnotationShared: "false", source.CiliumAnnotationAffinity: "remote"},
			source.ServiceOptions{Global: true, Affinity: v1.AffinityRemote}, nil},
		{"legacy cilium", map[string]string{source.LegacyCiliumAnnotationGlobal: "true", source.LegacyCiliumAnnotationAffinity: "local"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: v1.AffinityLocal}, nil},
		{"trellis wins over cilium", map[string]string{
			source.AnnotationGlobal: "true", source.CiliumAnnotationGlobal: "false",
			source.AnnotationShared: "true", source.CiliumAnnotationShared: "false",
			source.AnnotationAffinity: "remote", source.CiliumAnnotationAffinity: "local"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: v1.AffinityRemote}, nil},
		{"trellis false wins over cilium true", map[string]string{source.AnnotationGlobal: "false", source.CiliumAnnotationGlobal: "true"},
			source.ServiceOptions{Affinity: none}, nil},
		{"cilium wins over legacy", map[string]string{source.CiliumAnnotationGlobal: "true", source.LegacyCiliumAnnotationGlobal: "false"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: none}, nil},
		{"malformed global", map[string]string{source.AnnotationGlobal: "maybe"},
			source.ServiceOptions{Affinity: none}, []string{source.AnnotationGlobal}},
		{"malformed trellis global is not rescued by cilium", map[string]string{source.AnnotationGlobal: "yes", source.CiliumAnnotationGlobal: "true"},
			source.ServiceOptions{Affinity: none}, []string{source.AnnotationGlobal}},
		{"malformed shared is not shared", map[string]string{source.AnnotationGlobal: "true", source.AnnotationShared: "1"},
			source.ServiceOptions{Global: true, Affinity: none}, []string{source.AnnotationShared}},
		{"malformed affinity is none", map[string]string{source.AnnotationGlobal: "true", source.CiliumAnnotationAffinity: "nearest"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: none}, []string{source.CiliumAnnotationAffinity}},
		{"empty global", map[string]string{source.AnnotationGlobal: ""},
			source.ServiceOptions{Affinity: none}, []string{source.AnnotationGlobal}},
		{"failover regions in order, spaces trimmed", map[string]string{source.AnnotationGlobal: "true", source.AnnotationFailoverRegions: " ap , us-east-1,eu"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: none, FailoverRegions: []string{"ap", "us-east-1", "eu"}}, nil},
		{"failover regions keep their case", map[string]string{source.AnnotationGlobal: "true", source.AnnotationFailoverRegions: "US_East.1"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: none, FailoverRegions: []string{"US_East.1"}}, nil},
		{"empty failover regions", map[string]string{source.AnnotationGlobal: "true", source.AnnotationFailoverRegions: " "},
			source.ServiceOptions{Global: true, Shared: true, Affinity: none}, nil},
		{"failover regions without global are ignored", map[string]string{source.AnnotationFailoverRegions: "ap"},
			source.ServiceOptions{Affinity: none}, nil},
		{"failover regions with an empty entry", map[string]string{source.AnnotationGlobal: "true", source.AnnotationFailoverRegions: "ap,,us"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: none}, []string{source.AnnotationFailoverRegions}},
		{"failover regions with a trailing comma", map[string]string{source.AnnotationGlobal: "true", source.AnnotationFailoverRegions: "ap,"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: none}, []string{source.AnnotationFailoverRegions}},
		{"failover region twice", map[string]string{source.AnnotationGlobal: "true", source.AnnotationFailoverRegions: "ap,us,ap"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: none}, []string{source.AnnotationFailoverRegions}},
		{"failover region not a label value", map[string]string{source.AnnotationGlobal: "true", source.AnnotationFailoverRegions: "ap;us"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: none}, []string{source.AnnotationFailoverRegions}},
		{"too many failover regions", map[string]string{source.AnnotationGlobal: "true", source.AnnotationFailoverRegions: "r0,r1,r2,r3,r4,r5,r6,r7,r8,r9,r10,r11,r12,r13,r14,r15,r16"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: none}, []string{source.AnnotationFailoverRegions}},
		{"malformed failover regions leave the rest", map[string]string{source.AnnotationGlobal: "true", source.AnnotationAffinity: "local", source.AnnotationFailoverRegions: "ap us"},
			source.ServiceOptions{Global: true, Shared: true, Affinity: v1.AffinityLocal}, []string{source.AnnotationFailoverRegions}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, errs := source.ParseAnnotations(tc.ann)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("options = %+v; want %+v", got, tc.want)
			}
			var keys []string
			for _, err := range errs {
				var ae *source.AnnotationError
				if !errors.As(err, &ae) {
					t.Fatalf("error %v is not an *source.AnnotationError", err)
				}
				keys = append(keys, ae.Key)
			}
			if !reflect.DeepEqual(keys, tc.errs) {
				t.Errorf("malformed = %v (%v); want %v", keys, errs, tc.errs)
			}
		})
	}
}

func TestBackendState(t *testing.T) {
	tr, fa := new(bool), new(bool)
	*tr = true
	for _, tc := range []struct {
		name                        string
		ready, serving, terminating *bool
		want                        v1.BackendState
	}{
		{"all nil is ready", nil, nil, nil, v1.BackendActive},
		{"ready", tr, tr, fa, v1.BackendActive},
		{"not ready", fa, fa, fa, v1.BackendUnready},
		{"not ready, serving nil", fa, nil, nil, v1.BackendUnready},
		{"terminating serving", fa, tr, tr, v1.BackendTerminating},
		{"terminating not serving", fa, fa, tr, v1.BackendUnready},
		{"terminating, serving nil, not ready", fa, nil, tr, v1.BackendUnready},
		{"publishNotReadyAddresses: ready and terminating", tr, tr, tr, v1.BackendTerminating},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := backendState(discoveryv1.EndpointConditions{Ready: tc.ready, Serving: tc.serving, Terminating: tc.terminating})
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("state = %s; want %s", got, tc.want)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

func endpoint(addr string, ready, serving, terminating bool, node, zone string) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{addr},
		Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &terminating},
		NodeName:   ptr(node),
		Zone:       ptr(zone),
	}
}

func slice(name, svc string, ports map[string]int32, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "shop", Name: name, Labels: map[string]string{LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   eps,
	}
	for n, p := range ports {
		es.Ports = append(es.Ports, discoveryv1.EndpointPort{Name: ptr(n), Port: ptr(p), Protocol: ptr(corev1.ProtocolTCP)})
	}
	return es
}

func TestServiceFromK8s(t *testing.T) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "cart"},
		Spec: corev1.ServiceSpec{
			ClusterIP:  "10.96.0.10",
			ClusterIPs: []string{"10.96.0.10", "fd00::10"},
			Ports: []corev1.ServicePort{
				{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromString("web")},
				{Name: "grpc", Port: 9000, TargetPort: intstr.FromInt32(9090)},
				{Name: "metrics", Protocol: corev1.ProtocolTCP, Port: 9100}, // targetPort 0: same as port
				{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53, TargetPort: intstr.FromString("dns")},
			},
		},
	}
	slices := []*discoveryv1.EndpointSlice{
		// Listed out of name order: the mapping sorts.
		slice("cart-b", "cart", map[string]int32{"http": 8080, "grpc": 9090, "dns": 5353},
			endpoint("10.1.0.7", false, true, true, "node-b", "zone-b"),
			endpoint("10.1.0.5", true, true, false, "node-a", "zone-a"), // duplicate of cart-a, unready there
		),
		slice("cart-a", "cart", map[string]int32{"http": 8080, "grpc": 9090, "dns": 53, "unknown": 1},
			endpoint("10.1.0.5", false, false, false, "node-a", "zone-a"),
			endpoint("10.1.0.6", false, false, false, "node-a", "zone-a"),
		),
		{
			ObjectMeta:  metav1.ObjectMeta{Namespace: "shop", Name: "cart-fqdn"},
			AddressType: discoveryv1.AddressTypeFQDN,
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"example.com"}}},
		},
	}
	got, skipped := serviceFromK8s("east", source.ServiceOptions{Global: true, Shared: true, Affinity: v1.AffinityLocal}, svc, slices)
	if len(skipped) != 0 {
		t.Errorf("skipped = %v; want nothing", skipped)
	}
	abPorts := []v1.BackendPort{{Name: "dns", Port: 53}, {Name: "grpc", Port: 9090}, {Name: "http", Port: 8080}}
	want := v1.Service{
		Cluster: "east", Namespace: "shop", Name: "cart",
		Ports: []v1.ServicePort{
			{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}, // named, all slices agree
			{Name: "grpc", Protocol: v1.ProtocolTCP, Port: 9000, TargetPort: 9090},
			{Name: "metrics", Protocol: v1.ProtocolTCP, Port: 9100, TargetPort: 9100},
			{Name: "dns", Protocol: v1.ProtocolUDP, Port: 53}, // named, slices disagree: per backend
		},
		FrontendIPs: []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00::10")},
		Backends: []v1.Backend{
			{IP: netip.MustParseAddr("10.1.0.5"), Ports: abPorts, State: v1.BackendActive, Node: "node-a", Zone: "zone-a"},
			{IP: netip.MustParseAddr("10.1.0.6"), Ports: abPorts, State: v1.BackendUnready, Node: "node-a", Zone: "zone-a"},
			{IP: netip.MustParseAddr("10.1.0.7"), Ports: []v1.BackendPort{{Name: "dns", Port: 5353}, {Name: "grpc", Port: 9090}, {Name: "http", Port: 8080}},
				State: v1.BackendTerminating, Node: "node-b", Zone: "zone-b"},
		},
		Global: true, Shared: true, Affinity: v1.AffinityLocal,
	}
	// Port order inside a slice follows map iteration in the helper; compare
	// backend ports as sets.
	for i := range got.Backends {
		sortPorts(got.Backends[i].Ports)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("service =\n%+v\nwant\n%+v", got, want)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("mapped service does not validate: %v", err)
	}
}

// A malformed failover list is reported naming the annotation, the value
// and the entry at fault.
func TestParseAnnotationsFailoverRegionsError(t *testing.T) {
	_, errs := source.ParseAnnotations(map[string]string{source.AnnotationGlobal: "true", source.AnnotationFailoverRegions: "ap, us ,ap"})
	if len(errs) != 1 {
		t.Fatalf("errors %v; want one", errs)
	}
	msg := errs[0].Error()
	for _, want := range []string{source.AnnotationFailoverRegions, `"ap, us ,ap"`, `failoverRegions[2] "ap"`, "duplicate", "using no failover regions"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not mention %s", msg, want)
		}
	}
}

// The health-check annotation: tcp by default, http with a path; a
// malformed one is reported, says how to write it, and falls back to tcp.
// It is read for a service that is not global too.
func TestParseAnnotationsHealthCheck(t *testing.T) {
	http := func(p string) v1.HealthCheck { return v1.HealthCheck{Type: v1.HealthCheckHTTP, Path: p} }
	for val, want := range map[string]v1.HealthCheck{
		"tcp": {}, "": {}, " TCP ": {}, "http:/healthz": http("/healthz"), "http": http("/"),
		"HTTP:/ready?full=1": http("/ready?full=1"),
	} {
		opts, errs := source.ParseAnnotations(map[string]string{source.AnnotationHealthCheck: val})
		if len(errs) != 0 || opts.HealthCheck != want {
			t.Errorf("%q: %+v, %v; want %+v", val, opts.HealthCheck, errs, want)
		}
	}
	for val, wantMsg := range map[string]string{
		"http:healthz":                      `starting with "/"`,
		"http:/a b":                         "printable ASCII",
		"http:/" + strings.Repeat("a", 300): "at most 256",
		"grpc:/x":                           `unknown check "grpc"`,
		"tcp:/x":                            "takes no path",
		"http:/x\r\nHost: y":                "printable ASCII",
	} {
		opts, errs := source.ParseAnnotations(map[string]string{source.AnnotationGlobal: "true", source.AnnotationHealthCheck: val})
		if len(errs) != 1 || opts.HealthCheck != (v1.HealthCheck{}) || !opts.Global {
			t.Errorf("%q: %+v, %v; want one error and a tcp check", val, opts, errs)
			continue
		}
		msg := errs[0].Error()
		for _, want := range []string{source.AnnotationHealthCheck, wantMsg, `"http:<path>"`, "using tcp"} {
			if !strings.Contains(msg, want) {
				t.Errorf("%q: error %q does not mention %s", val, msg, want)
			}
		}
	}
}

// The failover regions travel to the published service, and only for a
// global one.
func TestServiceFromK8sFailoverRegions(t *testing.T) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "cart"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}},
	}
	got, _ := serviceFromK8s("east", source.ServiceOptions{Global: true, Shared: true, Affinity: v1.AffinityLocal, FailoverRegions: []string{"ap", "us"}}, svc, nil)
	if !slices.Equal(got.FailoverRegions, []string{"ap", "us"}) {
		t.Errorf("failover regions %v; want [ap us]", got.FailoverRegions)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("mapped service does not validate: %v", err)
	}
	got, _ = serviceFromK8s("east", source.ServiceOptions{FailoverRegions: []string{"ap"}}, svc, nil)
	if got.FailoverRegions != nil || got.Validate() != nil {
		t.Errorf("a service that is not global carries failover regions %v (%v)", got.FailoverRegions, got.Validate())
	}
}

func sortPorts(ps []v1.BackendPort) {
	for i := 1; i < len(ps); i++ {
		for j := i; j > 0 && ps[j].Name < ps[j-1].Name; j-- {
			ps[j], ps[j-1] = ps[j-1], ps[j]
		}
	}
}

func TestServiceFromK8sHeadlessAndOdd(t *testing.T) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "db"},
		Spec: corev1.ServiceSpec{
			ClusterIP:  corev1.ClusterIPNone,
			ClusterIPs: []string{corev1.ClusterIPNone},
			Ports:      []corev1.ServicePort{{Port: 5432, Protocol: "QUIC"}, {Port: 5432}},
		},
	}
	es := slice("db-1", "db", map[string]int32{"": 5432}, discoveryv1.Endpoint{Addresses: []string{"10.1.0.9", "bogus"}})
	got, skipped := serviceFromK8s("east", source.ServiceOptions{Global: true, Affinity: v1.AffinityNone}, svc, []*discoveryv1.EndpointSlice{es})
	if len(got.FrontendIPs) != 0 {
		t.Errorf("frontends = %v; want none for a headless service", got.FrontendIPs)
	}
	if len(got.Ports) != 1 || got.Ports[0] != (v1.ServicePort{Protocol: v1.ProtocolTCP, Port: 5432, TargetPort: 5432}) {
		t.Errorf("ports = %+v; want the one TCP port", got.Ports)
	}
	wantBackends := []v1.Backend{{IP: netip.MustParseAddr("10.1.0.9"), Ports: []v1.BackendPort{{Port: 5432}}, State: v1.BackendActive}}
	if !reflect.DeepEqual(got.Backends, wantBackends) {
		t.Errorf("backends = %+v; want %+v", got.Backends, wantBackends)
	}
	if len(skipped) != 2 {
		t.Errorf("skipped = %q; want the QUIC port and the bogus address", skipped)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("mapped service does not validate: %v", err)
	}
}

func TestNodeFromK8s(t *testing.T) {
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "node-a", Labels: map[string]string{LabelTopologyZone: "eu-1a"}},
		Spec:       corev1.NodeSpec{PodCIDR: "10.1.0.0/24", PodCIDRs: []string{"10.1.0.0/24", "fd00:1::/64"}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeHostName, Address: "node-a"},
			{Type: corev1.NodeExternalIP, Address: "203.0.113.5"},
			{Type: corev1.NodeInternalIP, Address: "192.168.1.5"},
			{Type: corev1.NodeInternalIP, Address: "::ffff:192.168.1.5"}, // same address, mapped spelling
			{Type: corev1.NodeInternalIP, Address: "fd00::5"},
		}},
	}
	got, skipped, err := nodeFromK8s("east", "eu", "eu-default", n)
	if err != nil || len(skipped) != 0 {
		t.Fatalf("nodeFromK8s: %v (skipped %v)", err, skipped)
	}
	want := v1.Node{
		Cluster: "east", Name: "node-a",
		IPs:      []netip.Addr{netip.MustParseAddr("192.168.1.5"), netip.MustParseAddr("fd00::5")},
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24"), netip.MustParsePrefix("fd00:1::/64")},
		Region:   "eu", // default: no region label
		Zone:     "eu-1a",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("node = %+v; want %+v", got, want)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("mapped node does not validate: %v", err)
	}

	// Only a legacy podCIDR; ExternalIP alone is not enough.
	n.Spec.PodCIDRs = nil
	got, _, err = nodeFromK8s("east", "", "", n)
	if err != nil || !reflect.DeepEqual(got.PodCIDRs, []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")}) {
		t.Errorf("legacy podCIDR: %+v, %v", got.PodCIDRs, err)
	}

	// The agent's key annotations are published; malformed ones are
	// skipped (and reported), never published.
	const key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
	n.Annotations = map[string]string{source.AnnotationWireGuardKey: key, source.AnnotationIPsecKeyIndex: "3"}
	got, skipped, err = nodeFromK8s("east", "", "", n)
	if err != nil || len(skipped) != 0 || got.WireGuardPublicKey != key || got.IPsecKeyIndex != 3 {
		t.Errorf("key annotations: %+v, skipped %v, %v", got, skipped, err)
	}
	n.Annotations = map[string]string{source.AnnotationWireGuardKey: "not-a-key", source.AnnotationIPsecKeyIndex: "16"}
	got, skipped, err = nodeFromK8s("east", "", "", n)
	if err != nil || len(skipped) != 2 || got.WireGuardPublicKey != "" || got.IPsecKeyIndex != 0 {
		t.Errorf("malformed key annotations: %+v, skipped %v, %v", got, skipped, err)
	}

	n.Status.Addresses = n.Status.Addresses[:2]
	if _, _, err := nodeFromK8s("east", "", "", n); err == nil {
		t.Errorf("node with only an ExternalIP mapped without error")
	}
}

func TestIdentityLabels(t *testing.T) {
	got := IdentityLabels("shop", map[string]string{
		"app":                                 "cart",
		"app.kubernetes.io/name":              "cart",
		"team":                                "",
		"pod-template-hash":                   "5d8c9f7b6",
		"controller-revision-hash":            "cart-7d9",
		"pod-template-generation":             "3",
		"statefulset.kubernetes.io/pod-name":  "cart-0",
		"apps.kubernetes.io/pod-index":        "0",
		"batch.kubernetes.io/controller-uid":  "1234",
		"batch.kubernetes.io/job-name":        "nightly-123",
		"controller-uid":                      "1234",
		"job-name":                            "nightly-123",
		"kubernetes.io/hostname":              "node-a",
		"k8s.io/foo":                          "x",
		"io.kubernetes.pod.namespace":         "kube-system", // spoofing attempt
		"io.cilium.k8s.policy.serviceaccount": "admin",
		"example.com/tier":                    "web",
	})
	want := map[string]string{
		"k8s:io.kubernetes.pod.namespace": "shop",
		"k8s:app":                         "cart",
		"k8s:app.kubernetes.io/name":      "cart",
		"k8s:team":                        "",
		"k8s:example.com/tier":            "web",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("identity labels = %v; want %v", got, want)
	}
	id := v1.Identity{Cluster: "east", ID: v1.MakeIdentity(1, 1), Labels: got}
	if err := id.Validate(); err != nil {
		t.Errorf("identity labels do not validate: %v", err)
	}
}

func TestPodFromK8s(t *testing.T) {
	running := func(mod func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "cart-1"},
			Status: corev1.PodStatus{
				Phase:  corev1.PodRunning,
				HostIP: "192.168.1.5", PodIP: "10.1.0.5",
				PodIPs:     []corev1.PodIP{{IP: "10.1.0.5"}, {IP: "fd00:1::5"}},
				Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
			},
		}
		if mod != nil {
			mod(p)
		}
		return p
	}
	info := podFromK8s(running(nil))
	if !info.eligible || !info.ready || len(info.ips) != 2 || info.hostIP != netip.MustParseAddr("192.168.1.5") {
		t.Errorf("running pod: %+v", info)
	}
	for name, mod := range map[string]func(*corev1.Pod){
		"host network": func(p *corev1.Pod) { p.Spec.HostNetwork = true },
		"pending":      func(p *corev1.Pod) { p.Status.Phase = corev1.PodPending },
		"succeeded":    func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded },
		"no IP":        func(p *corev1.Pod) { p.Status.PodIP, p.Status.PodIPs = "", nil },
		"no host IP":   func(p *corev1.Pod) { p.Status.HostIP = "" },
	} {
		if info := podFromK8s(running(mod)); info.eligible {
			t.Errorf("%s: eligible: %+v", name, info)
		}
	}
	if info := podFromK8s(running(func(p *corev1.Pod) { p.Status.HostIP = "" })); !info.noHostIP {
		t.Errorf("no host IP not flagged: %+v", info)
	}
	info = podFromK8s(running(func(p *corev1.Pod) {
		p.Status.PodIPs = nil
		p.Status.Conditions[0].Status = corev1.ConditionFalse
	}))
	if !info.eligible || info.ready || len(info.ips) != 1 {
		t.Errorf("legacy podIP, unready: %+v", info)
	}
	for status, unhealthy := range map[corev1.ConditionStatus]bool{corev1.ConditionFalse: true, corev1.ConditionTrue: false, corev1.ConditionUnknown: false} {
		info = podFromK8s(running(func(p *corev1.Pod) {
			p.Status.Conditions = append(p.Status.Conditions, corev1.PodCondition{Type: source.ConditionHealthy, Status: status})
		}))
		if !info.eligible || info.unhealthy != unhealthy || info.ready == unhealthy {
			t.Errorf("%s %s: %+v", source.ConditionHealthy, status, info)
		}
	}
}

// TestSlimKeepsWhatMappingReads: the informer transform must not drop a
// field the mapping uses.
func TestSlimKeepsWhatMappingReads(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "cart-1", Labels: map[string]string{"app": "cart"},
			Annotations:   map[string]string{"big": "annotation"},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}},
		Spec: corev1.PodSpec{NodeName: "node-a", Containers: []corev1.Container{{Name: "app", Image: "x"}}},
		Status: corev1.PodStatus{
			Phase: corev1.PodRunning, HostIP: "192.168.1.5", PodIP: "10.1.0.5",
			PodIPs:            []corev1.PodIP{{IP: "10.1.0.5"}},
			Conditions:        []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
			ContainerStatuses: []corev1.ContainerStatus{{Name: "app"}},
		},
	}
	out, err := slim(pod.DeepCopy())
	if err != nil {
		t.Fatal(err)
	}
	sp := out.(*corev1.Pod)
	if !reflect.DeepEqual(podFromK8s(sp), podFromK8s(pod)) || !reflect.DeepEqual(sp.Labels, pod.Labels) || sp.Name != pod.Name || sp.Namespace != pod.Namespace {
		t.Errorf("slim pod maps differently: %+v", sp)
	}
	if sp.ManagedFields != nil || sp.Annotations != nil || sp.Spec.Containers != nil || sp.Status.ContainerStatuses != nil {
		t.Errorf("slim pod kept what it should drop: %+v", sp)
	}

	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "node-a", Labels: map[string]string{LabelTopologyZone: "z"},
			Annotations: map[string]string{"big": "annotation",
				source.AnnotationWireGuardKey: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=", source.AnnotationIPsecKeyIndex: "3"}},
		Spec: corev1.NodeSpec{PodCIDRs: []string{"10.1.0.0/24"}},
		Status: corev1.NodeStatus{
			Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.1.5"}},
			Images:    []corev1.ContainerImage{{Names: []string{"big"}}},
		},
	}
	out, err = slim(node.DeepCopy())
	if err != nil {
		t.Fatal(err)
	}
	sn := out.(*corev1.Node)
	a, _, errA := nodeFromK8s("east", "", "", node)
	b, _, errB := nodeFromK8s("east", "", "", sn)
	if !reflect.DeepEqual(a, b) || errA != nil || errB != nil || sn.Status.Images != nil {
		t.Errorf("slim node: %+v (%v) vs %+v (%v); images %v", b, errB, a, errA, sn.Status.Images)
	}
	if b.WireGuardPublicKey == "" || b.IPsecKeyIndex != 3 || len(sn.Annotations) != 2 {
		t.Errorf("slim node: keys %q/%d, annotations %v; want the two key annotations kept, the rest dropped", b.WireGuardPublicKey, b.IPsecKeyIndex, sn.Annotations)
	}

	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "cart", Annotations: map[string]string{source.AnnotationGlobal: "true"},
		ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}}}
	out, _ = slim(svc)
	if s := out.(*corev1.Service); s.ManagedFields != nil || s.Annotations[source.AnnotationGlobal] != "true" {
		t.Errorf("slim service: %+v", s)
	}
}
