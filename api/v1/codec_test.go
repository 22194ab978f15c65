package v1

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

// decoders lists each plain decoder with a valid sample, so the error-class
// tests run against all six.
var decoders = []struct {
	name   string
	sample func() any
	decode func([]byte) (any, error)
}{
	{"ClusterConfig", func() any { return sampleClusterConfig() }, func(b []byte) (any, error) { return DecodeClusterConfig(b) }},
	{"Node", func() any { return sampleNode() }, func(b []byte) (any, error) { return DecodeNode(b) }},
	{"Endpoint", func() any { return sampleEndpoint() }, func(b []byte) (any, error) { return DecodeEndpoint(b) }},
	{"Identity", func() any { return sampleIdentity() }, func(b []byte) (any, error) { return DecodeIdentity(b) }},
	{"Service", func() any { return sampleService() }, func(b []byte) (any, error) { return DecodeService(b) }},
	{"BackendShard", func() any { return sampleBackendShard() }, func(b []byte) (any, error) { return DecodeBackendShard(b) }},
}

// withVersion returns v (a sample value) with V = Version, which is what a
// decoder returns.
func withVersion(v any) any {
	w, err := wireCopy(v)
	if err != nil {
		panic(err)
	}
	w.setVersion()
	return reflect.ValueOf(w).Elem().Interface()
}

func TestRoundTrip(t *testing.T) {
	for _, d := range decoders {
		t.Run(d.name, func(t *testing.T) {
			in := d.sample()
			b := mustEncode(t, in)
			got, err := d.decode(b)
			if err != nil {
				t.Fatalf("decode(%s): %v", b, err)
			}
			if want := withVersion(in); !reflect.DeepEqual(got, want) {
				t.Errorf("round trip:\n got %+v\nwant %+v", got, want)
			}
			// Pointers encode the same, and Encode leaves the caller's
			// value alone.
			p := reflect.New(reflect.TypeOf(in))
			p.Elem().Set(reflect.ValueOf(in))
			if b2 := mustEncode(t, p.Interface()); string(b2) != string(b) {
				t.Errorf("Encode(&v) = %s, Encode(v) = %s", b2, b)
			}
			if v := p.Elem().FieldByName("V").Int(); v != 0 {
				t.Errorf("Encode(&v) set the caller's V to %d", v)
			}
		})
	}
}

// The wire format is a contract between versions of Trellis running in
// different clusters: changing these strings breaks mixed-version meshes.
func TestWireFormat(t *testing.T) {
	tests := []struct {
		v    any
		want string
	}{
		{sampleEndpoint(), `{"v":1,"cluster":"eu-west-1","ip":"10.7.12.201","identity":506965,"nodeIP":"172.20.33.41","namespace":"payments-production","pod":"checkout-api-7f9c6d5b8d-x2k4p","ready":true}`},
		{Endpoint{Cluster: "c", IP: netip.MustParseAddr("fd00::1"), Identity: MakeIdentity(1, 1), NodeIP: netip.MustParseAddr("10.0.0.1")}, `{"v":1,"cluster":"c","ip":"fd00::1","identity":65537,"nodeIP":"10.0.0.1"}`},
		{ClusterConfig{Name: "c", ID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, Capabilities: Capabilities{MaxConnectedClusters: 255}},
			`{"v":1,"name":"c","id":1,"podCIDRs":["10.0.0.0/8"],"capabilities":{"maxConnectedClusters":255}}`},
		{sampleClusterConfig(), `{"v":1,"name":"eu-west-1","id":7,"podCIDRs":["10.7.0.0/16","fd00:7::/48"],"region":"eu-west-1","zone":"eu-west-1a","capabilities":{"syncedCanaries":true,"maxConnectedClusters":255},"encryption":{"type":"wireguard"}}`},
		{Node{Cluster: "c", Name: "n", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, IPsecKeyIndex: 3, HealthAddr: "10.0.0.1:4240"},
			`{"v":1,"cluster":"c","name":"n","ips":["10.0.0.1"],"ipsecKeyIndex":3,"healthAddr":"10.0.0.1:4240"}`},
		{Identity{Cluster: "c", ID: 65537, Labels: map[string]string{"k8s:io.kubernetes.pod.namespace": "default", "k8s:app": "web"}},
			`{"v":1,"cluster":"c","id":65537,"labels":{"k8s:app":"web","k8s:io.kubernetes.pod.namespace":"default"}}`},
		{Service{Cluster: "c", Namespace: "default", Name: "web", Ports: []ServicePort{{Protocol: ProtocolTCP, Port: 80, TargetPort: 8080}},
			FrontendIPs: []netip.Addr{netip.MustParseAddr("10.96.0.10")},
			Backends:    []Backend{{IP: netip.MustParseAddr("10.0.1.5"), Ports: []BackendPort{{Port: 8080}}, State: BackendActive, Node: "n1", Zone: "a"}},
			Global:      true, Shared: true, Affinity: AffinityLocal},
			`{"v":1,"cluster":"c","namespace":"default","name":"web","ports":[{"protocol":"TCP","port":80,"targetPort":8080}],"frontendIPs":["10.96.0.10"],"backends":[{"ip":"10.0.1.5","ports":[{"port":8080}],"state":"active","node":"n1","zone":"a"}],"global":true,"shared":true,"affinity":"local"}`},
		{Service{Cluster: "c", Namespace: "default", Name: "web", Global: true, Affinity: AffinityLocal, FailoverRegions: []string{"ap", "us"}},
			`{"v":1,"cluster":"c","namespace":"default","name":"web","global":true,"affinity":"local","failoverRegions":["ap","us"]}`},
		{Service{Cluster: "c", Namespace: "default", Name: "web", Ports: []ServicePort{{Protocol: ProtocolTCP, Port: 80, TargetPort: 8080}},
			BackendShards: []uint64{0, 3, 3}, Global: true, Shared: true},
			`{"v":1,"cluster":"c","namespace":"default","name":"web","ports":[{"protocol":"TCP","port":80,"targetPort":8080}],"backendShards":[0,3,3],"global":true,"shared":true}`},
		{BackendShard{Cluster: "c", Namespace: "default", Service: "web", Shard: 2, Gen: 3,
			Backends: []Backend{{IP: netip.MustParseAddr("10.0.1.5"), State: BackendActive}}},
			`{"v":1,"cluster":"c","namespace":"default","service":"web","shard":2,"gen":3,"backends":[{"ip":"10.0.1.5","state":"active"}]}`},
		{BackendShard{Cluster: "c", Namespace: "default", Service: "web"}, `{"v":1,"cluster":"c","namespace":"default","service":"web","shard":0}`},
		{ClusterConfig{Name: "c", ID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, Capabilities: Capabilities{SyncedCanaries: true, MaxConnectedClusters: 255, BackendShards: true}},
			`{"v":1,"name":"c","id":1,"podCIDRs":["10.0.0.0/8"],"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"backendShards":true}}`},
	}
	for _, tt := range tests {
		if got := string(mustEncode(t, tt.v)); got != tt.want {
			t.Errorf("Encode(%T):\n got %s\nwant %s", tt.v, got, tt.want)
		}
	}
}

func TestEncodeErrors(t *testing.T) {
	bad := sampleEndpoint()
	bad.NodeIP = netip.Addr{}
	huge := sampleService()
	hugeShard := sampleBackendShard()
	for i := range 1000 {
		b := Backend{IP: netip.AddrFrom4([4]byte{10, 8, byte(i >> 8), byte(i)}), Ports: []BackendPort{{"http", 8080}}, State: BackendActive, Node: "node-with-a-long-name.example.com", Zone: "eu-west-1a"}
		huge.Backends = append(huge.Backends, b)
		hugeShard.Backends = append(hugeShard.Backends, b)
	}
	tests := []struct {
		v      any
		reason string
	}{
		{bad, "invalid"},
		{&bad, "invalid"},
		{huge, "too-large"},
		{hugeShard, "too-large"},
		{(*BackendShard)(nil), "decode"},
		{nil, "decode"},
		{(*Node)(nil), "decode"},
		{"a string", "decode"},
		{Key{}, "decode"},
	}
	for _, tt := range tests {
		b, err := Encode(tt.v)
		if err == nil {
			t.Errorf("Encode(%T) = %s, want error", tt.v, b)
			continue
		}
		if r := Reason(err); r != tt.reason {
			t.Errorf("Encode(%T) error %q has reason %q, want %q", tt.v, err, r, tt.reason)
		}
	}
}

func TestDecodeErrors(t *testing.T) {
	for _, d := range decoders {
		valid := mustEncode(t, d.sample())
		// replace rewrites one JSON field of the valid value.
		replace := func(field string, value any) []byte {
			var m map[string]any
			if err := json.Unmarshal(valid, &m); err != nil {
				t.Fatal(err)
			}
			if value == nil {
				delete(m, field)
			} else {
				m[field] = value
			}
			b, err := json.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
		nameField := "cluster"
		if d.name == "ClusterConfig" {
			nameField = "name"
		}
		tooLarge := append(append([]byte{}, valid[:len(valid)-1]...), []byte(`,"pad":"`+strings.Repeat("x", MaxValueSize)+`"}`)...)
		tests := []struct {
			name   string
			data   []byte
			reason string
			substr string
		}{
			{"too large", tooLarge, "too-large", "limit 65536"},
			{"too large garbage", make([]byte, MaxValueSize+1), "too-large", ""},
			{"version 2", replace("v", 2), "version", "unsupported version 2, this reader understands 1; upgrade trellis"},
			{"version 0", replace("v", 0), "version", "unsupported version 0"},
			{"version missing", replace("v", nil), "version", "unsupported version 0"},
			{"version 2 with changed types", []byte(`{"v":2,"cluster":{"name":"c"},"name":7,"id":"x","ip":[1]}`), "version", "upgrade trellis"},
			{"version string", replace("v", "1"), "decode", ""},
			{"version float", []byte(strings.Replace(string(valid), `"v":1`, `"v":1.5`, 1)), "decode", ""},
			{"empty", nil, "decode", ""},
			{"garbage", []byte("\x00\xff{"), "decode", ""},
			{"truncated", valid[:len(valid)/2], "decode", ""},
			{"trailing data", append(append([]byte{}, valid...), '{'), "decode", ""},
			{"array", []byte(`[1,2]`), "decode", ""},
			{"string", []byte(`"v"`), "decode", ""},
			{"null", []byte(`null`), "version", ""},
			{"empty object", []byte(`{}`), "version", ""},
			{"invalid", replace(nameField, "Not-A-Cluster"), "invalid", "Not-A-Cluster"},
			{"only version", []byte(`{"v":1}`), "invalid", ""},
		}
		for _, tt := range tests {
			t.Run(d.name+"/"+tt.name, func(t *testing.T) {
				got, err := d.decode(tt.data)
				if err == nil {
					t.Fatalf("decoded %+v, want error", got)
				}
				if r := Reason(err); r != tt.reason {
					t.Errorf("error %q has reason %q, want %q", err, r, tt.reason)
				}
				if !strings.Contains(err.Error(), tt.substr) || !strings.HasPrefix(err.Error(), "api/v1: decode ") {
					t.Errorf("error %q, want it to start with \"api/v1: decode \" and contain %q", err, tt.substr)
				}
				if !reflect.ValueOf(got).IsZero() {
					t.Errorf("returned %+v with the error, want the zero value", got)
				}
			})
		}
	}
}

// Readers must accept values from newer writers that added optional fields.
func TestDecodeIgnoresUnknownFields(t *testing.T) {
	for _, d := range decoders {
		valid := mustEncode(t, d.sample())
		newer := append(append([]byte{}, valid[:len(valid)-1]...), []byte(`,"futureField":{"x":[1,2,3]},"another":true}`)...)
		got, err := d.decode(newer)
		if err != nil {
			t.Errorf("%s: decode with unknown fields: %v", d.name, err)
			continue
		}
		if want := withVersion(d.sample()); !reflect.DeepEqual(got, want) {
			t.Errorf("%s: got %+v, want %+v", d.name, got, want)
		}
	}
}

func TestDecodeNormalizesEmptyLists(t *testing.T) {
	s, err := DecodeService([]byte(`{"v":1,"cluster":"c","namespace":"n","name":"s","ports":[],"frontendIPs":[],"backends":[]}`))
	if err != nil {
		t.Fatal(err)
	}
	if s.Ports != nil || s.FrontendIPs != nil || s.Backends != nil {
		t.Errorf("empty lists decoded as %#v %#v %#v, want nil", s.Ports, s.FrontendIPs, s.Backends)
	}
	s, err = DecodeService([]byte(`{"v":1,"cluster":"c","namespace":"n","name":"s","backendShards":[]}`))
	if err != nil || s.BackendShards != nil {
		t.Errorf("empty backendShards decoded as %#v (%v), want nil", s.BackendShards, err)
	}
	sh, err := DecodeBackendShard([]byte(`{"v":1,"cluster":"c","namespace":"n","service":"s","shard":1,"backends":[{"ip":"10.0.0.1","ports":[],"state":"active"}]}`))
	if err != nil || sh.Backends[0].Ports != nil {
		t.Errorf("empty backend ports in a shard decoded as %#v (%v), want nil", sh.Backends, err)
	}
	n, err := DecodeNode([]byte(`{"v":1,"cluster":"c","name":"n","ips":["10.0.0.1"],"podCIDRs":[]}`))
	if err != nil {
		t.Fatal(err)
	}
	if n.PodCIDRs != nil {
		t.Errorf("empty podCIDRs decoded as %#v, want nil", n.PodCIDRs)
	}
}

func TestDecodeEntry(t *testing.T) {
	ep := sampleEndpoint()
	ep6 := sampleEndpoint()
	ep6.IP = netip.MustParseAddr("fd00:7::c9")
	cfg, node, id, svc := sampleClusterConfig(), sampleNode(), sampleIdentity(), sampleService()

	type entry struct {
		name   string
		decode func(key string, data []byte) (any, error)
		key    string
		data   []byte
		reason string // "" for success
	}
	decCfg := func(k string, b []byte) (any, error) { return DecodeClusterConfigEntry(k, b) }
	decNode := func(k string, b []byte) (any, error) { return DecodeNodeEntry(k, b) }
	decEp := func(k string, b []byte) (any, error) { return DecodeEndpointEntry(k, b) }
	decID := func(k string, b []byte) (any, error) { return DecodeIdentityEntry(k, b) }
	decSvc := func(k string, b []byte) (any, error) { return DecodeServiceEntry(k, b) }
	decShard := func(k string, b []byte) (any, error) { return DecodeBackendShardEntry(k, b) }
	cfgB, nodeB, epB, ep6B, idB, svcB := mustEncode(t, cfg), mustEncode(t, node), mustEncode(t, ep), mustEncode(t, ep6), mustEncode(t, id), mustEncode(t, svc)
	sh := sampleBackendShard()
	shB := mustEncode(t, sh)
	shKey := func(cluster, ns, name string, i int) string { return BackendShardKey(cluster, ns, name, i) }

	tests := []entry{
		{"config ok", decCfg, ClusterConfigKey(cfg.Name), cfgB, ""},
		{"config other cluster", decCfg, ClusterConfigKey("other"), cfgB, "key-mismatch"},
		{"config wrong kind", decCfg, HeartbeatKey(cfg.Name), cfgB, "bad-key"},
		{"node ok", decNode, NodeKey(node.Cluster, node.Name), nodeB, ""},
		{"node other cluster", decNode, NodeKey("other", node.Name), nodeB, "key-mismatch"},
		{"node other name", decNode, NodeKey(node.Cluster, "other"), nodeB, "key-mismatch"},
		{"node bad key", decNode, "trellis/v1/nodes/" + node.Cluster, nodeB, "bad-key"},
		{"node wrong kind", decNode, EndpointKey(ep.Cluster, ep.IP), nodeB, "bad-key"},
		{"node bad body", decNode, NodeKey(node.Cluster, node.Name), []byte(`{`), "decode"},
		{"endpoint ok", decEp, EndpointKey(ep.Cluster, ep.IP), epB, ""},
		{"endpoint v6 ok", decEp, EndpointKey(ep6.Cluster, ep6.IP), ep6B, ""},
		{"endpoint other cluster", decEp, EndpointKey("other", ep.IP), epB, "key-mismatch"},
		{"endpoint other IP", decEp, EndpointKey(ep.Cluster, netip.MustParseAddr("10.7.12.202")), epB, "key-mismatch"},
		{"endpoint other family", decEp, EndpointKey(ep.Cluster, ep6.IP), epB, "key-mismatch"},
		{"endpoint non-canonical key", decEp, "trellis/v1/endpoints/" + ep6.Cluster + "/FD00:7::C9", ep6B, "bad-key"},
		{"endpoint too large", decEp, EndpointKey(ep.Cluster, ep.IP), make([]byte, MaxValueSize+1), "too-large"},
		{"identity ok", decID, IdentityKey(id.Cluster, id.ID), idB, ""},
		{"identity other cluster", decID, IdentityKey("other", id.ID), idB, "key-mismatch"},
		{"identity other id", decID, IdentityKey(id.Cluster, id.ID+1), idB, "key-mismatch"},
		{"identity version", decID, IdentityKey(id.Cluster, id.ID), []byte(`{"v":3}`), "version"},
		{"service ok", decSvc, ServiceKey(svc.Cluster, svc.Namespace, svc.Name), svcB, ""},
		{"service other cluster", decSvc, ServiceKey("other", svc.Namespace, svc.Name), svcB, "key-mismatch"},
		{"service other namespace", decSvc, ServiceKey(svc.Cluster, "other", svc.Name), svcB, "key-mismatch"},
		{"service other name", decSvc, ServiceKey(svc.Cluster, svc.Namespace, "other"), svcB, "key-mismatch"},
		{"service invalid", decSvc, ServiceKey(svc.Cluster, svc.Namespace, svc.Name), []byte(`{"v":1,"cluster":"eu-west-1","namespace":"payments-production","name":"checkout-api","shared":true}`), "invalid"},
		{"shard ok", decShard, shKey(sh.Cluster, sh.Namespace, sh.Service, sh.Shard), shB, ""},
		{"shard other cluster", decShard, shKey("other", sh.Namespace, sh.Service, sh.Shard), shB, "key-mismatch"},
		{"shard other namespace", decShard, shKey(sh.Cluster, "other", sh.Service, sh.Shard), shB, "key-mismatch"},
		{"shard other service", decShard, shKey(sh.Cluster, sh.Namespace, "other", sh.Shard), shB, "key-mismatch"},
		{"shard other index", decShard, shKey(sh.Cluster, sh.Namespace, sh.Service, sh.Shard+1), shB, "key-mismatch"},
		{"shard at a service key", decShard, ServiceKey(sh.Cluster, sh.Namespace, sh.Service), shB, "bad-key"},
		{"service at a shard key", decSvc, shKey(svc.Cluster, svc.Namespace, svc.Name, 0), svcB, "bad-key"},
		{"shard index too large", decShard, "trellis/v1/backends/eu-west-1/payments-production/checkout-api/1024", shB, "bad-key"},
		{"shard duplicate backend", decShard, shKey(sh.Cluster, sh.Namespace, sh.Service, sh.Shard),
			[]byte(`{"v":1,"cluster":"eu-west-1","namespace":"payments-production","service":"checkout-api","shard":3,"backends":[{"ip":"10.7.0.1","state":"active"},{"ip":"10.7.0.1","state":"active"}]}`), "invalid"},
		{"shard too large", decShard, shKey(sh.Cluster, sh.Namespace, sh.Service, sh.Shard), make([]byte, MaxValueSize+1), "too-large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.decode(tt.key, tt.data)
			if r := Reason(err); r != tt.reason {
				t.Fatalf("error %v has reason %q, want %q", err, r, tt.reason)
			}
			if err != nil {
				if !reflect.ValueOf(got).IsZero() {
					t.Errorf("returned %+v with the error", got)
				}
				if tt.reason != "bad-key" && !strings.Contains(err.Error(), tt.key) {
					t.Errorf("error %q does not name the key", err)
				}
			}
		})
	}
}

func TestDecodeEndpointEntryDoesNotAllocateForMatch(t *testing.T) {
	// The cold-sync path: make sure the key check adds little to decoding.
	ep := sampleEndpoint()
	b := mustEncode(t, ep)
	key := EndpointKey(ep.Cluster, ep.IP)
	plain := testing.AllocsPerRun(100, func() { _, _ = DecodeEndpoint(b) })
	entry := testing.AllocsPerRun(100, func() { _, _ = DecodeEndpointEntry(key, b) })
	if entry > plain {
		t.Errorf("DecodeEndpointEntry allocates %v times, DecodeEndpoint %v", entry, plain)
	}
}

func TestReason(t *testing.T) {
	tests := []struct {
		err  error
		want string
	}{
		{nil, ""},
		{errors.New("x"), "decode"},
		{ErrTooLarge, "too-large"},
		{fmt.Errorf("a: %w", ErrUnsupportedVersion), "version"},
		{fmt.Errorf("a: %w", ErrKeyMismatch), "key-mismatch"},
		{fmt.Errorf("a: %w", ErrBadKey), "bad-key"},
		{fmt.Errorf("a: %w", ErrInvalid), "invalid"},
		{fmt.Errorf("a: %w", &ValidationError{}), "invalid"},
		{&json.SyntaxError{}, "decode"},
	}
	for _, tt := range tests {
		if got := Reason(tt.err); got != tt.want {
			t.Errorf("Reason(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}

func TestTimestamp(t *testing.T) {
	now := time.Date(2026, 3, 14, 15, 9, 26, 535897932, time.FixedZone("CET", 3600))
	b := EncodeTimestamp(now)
	if string(b) != "2026-03-14T14:09:26.535897932Z" {
		t.Errorf("EncodeTimestamp = %s", b)
	}
	got, err := DecodeTimestamp(b)
	if err != nil || !got.Equal(now) || got.Location() != time.UTC {
		t.Errorf("DecodeTimestamp(%s) = %v, %v", b, got, err)
	}
	for _, ok := range []string{"2026-03-14T14:09:26Z", "2026-03-14T15:09:26+01:00", "0000-01-01T00:00:00Z"} {
		if _, err := DecodeTimestamp([]byte(ok)); err != nil {
			t.Errorf("DecodeTimestamp(%q): %v", ok, err)
		}
	}
	for s, reason := range map[string]string{
		"":                          "decode",
		"yesterday":                 "decode",
		"2026-03-14 14:09:26Z":      "decode",
		`"2026-03-14T14:09:26Z"`:    "decode",
		"0000-01-01T00:00:00+01:00": "invalid",
		strings.Repeat("9", 100):    "too-large",
	} {
		if _, err := DecodeTimestamp([]byte(s)); Reason(err) != reason {
			t.Errorf("DecodeTimestamp(%q) = %v, want reason %q", s, err, reason)
		}
	}
}

func TestEndpointJSONSize(t *testing.T) {
	b := mustEncode(t, sampleEndpoint())
	t.Logf("realistic Endpoint: %d bytes: %s", len(b), b)
	if len(b) > 256 {
		t.Errorf("realistic Endpoint is %d bytes, want it compact (<= 256)", len(b))
	}
}

func BenchmarkDecodeEndpoint(b *testing.B) {
	const n = 1024
	values := make([][]byte, n)
	size := 0
	for i := range values {
		values[i] = mustEncode(b, sampleEndpointN(i))
		size += len(values[i])
	}
	b.SetBytes(int64(size / n))
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, err := DecodeEndpoint(values[i%n]); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

func BenchmarkDecodeEndpointEntry(b *testing.B) {
	const n = 1024
	keys := make([]string, n)
	values := make([][]byte, n)
	for i := range values {
		e := sampleEndpointN(i)
		keys[i] = EndpointKey(e.Cluster, e.IP)
		values[i] = mustEncode(b, e)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, err := DecodeEndpointEntry(keys[i%n], values[i%n]); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

func BenchmarkDecodeService(b *testing.B) {
	s := sampleService()
	for i := range 200 {
		s.Backends = append(s.Backends, Backend{IP: netip.AddrFrom4([4]byte{10, 8, byte(i >> 8), byte(i)}), Ports: []BackendPort{{"http", 8080}, {"grpc", 9090}}, State: BackendActive, Node: "ip-172-20-33-41.eu-west-1.compute.internal", Zone: "eu-west-1a"})
	}
	data := mustEncode(b, s)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeService(data); err != nil {
			b.Fatal(err)
		}
	}
}

// A service value lists a generation per shard: with the most shards and
// the largest generations it must still leave room for ports and
// frontends.
func TestMostBackendShardsFitOneValue(t *testing.T) {
	s := sampleService()
	s.Backends = nil
	s.BackendShards = make([]uint64, MaxBackendShards)
	for i := range s.BackendShards {
		s.BackendShards[i] = 1<<64 - 1
	}
	b := mustEncode(t, s)
	if len(b) > MaxValueSize/2 {
		t.Fatalf("a service listing %d shards is %d bytes, want at most half of %d", MaxBackendShards, len(b), MaxValueSize)
	}
}
