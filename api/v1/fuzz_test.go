package v1

import (
	"bytes"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// The fuzzers check three properties of everything that reads hostile
// input: it never panics; a failure is classified (Reason) and returns the
// zero value; and a success is a fixed point: encoding the result and
// decoding it again gives an equal value and the same bytes.
//
// Seed corpora live in testdata/fuzz/<FuzzName>/ next to the f.Add seeds
// below; add any crasher the fuzzer finds there once it is fixed.

// fuzzDecode is the property shared by the six value fuzzers.
func fuzzDecode[T any](t *testing.T, data []byte, decode func([]byte) (T, error)) {
	v, err := decode(data)
	if err != nil {
		if Reason(err) == "" {
			t.Fatalf("error %v has no reason", err)
		}
		if !reflect.ValueOf(v).IsZero() {
			t.Fatalf("error %v returned with non-zero value %+v", err, v)
		}
		return
	}
	b, err := Encode(v)
	if err != nil {
		t.Fatalf("decoded %+v but cannot encode it: %v", v, err)
	}
	v2, err := decode(b)
	if err != nil {
		t.Fatalf("cannot decode re-encoded %s: %v", b, err)
	}
	if !reflect.DeepEqual(v, v2) {
		t.Fatalf("not a fixed point:\n first %+v\nsecond %+v", v, v2)
	}
	b2, err := Encode(v2)
	if err != nil || !bytes.Equal(b, b2) {
		t.Fatalf("encoding not stable: %s vs %s (%v)", b, b2, err)
	}
}

// addSeeds adds valid encodings of the samples, each sample mutated a few
// ways at the JSON level, and values that are wrong in tricky ways.
func addSeeds(f *testing.F, samples ...any) {
	for _, s := range samples {
		b, err := Encode(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		f.Add(bytes.Replace(b, []byte(`"v":1`), []byte(`"v":2`), 1))
		f.Add(bytes.Replace(b, []byte(`{`), []byte(`{"unknown":[{}],`), 1))
		f.Add(b[:len(b)/2])
	}
	for _, s := range []string{
		``, `null`, `{}`, `[]`, `"x"`, `0`, `{"v":1}`, `{"v":-1}`, `{"v":1e400}`,
		`{"v":1,"V":2}`, `{"v":1,"v":1}`, "{\"v\":1,\"cluster\":\"\xff\"}",
		`{"v":1,"ip":"::ffff:1.2.3.4"}`, `{"v":1,"ip":"fe80::1%eth0"}`,
		`{"v":1,"ips":["1.2.3.4","1.2.3.4"]}`, `{"v":1,"podCIDRs":["10.0.0.1/8"]}`,
		`{"v":1,"labels":{"":""}}`, `{"v":1,"ports":[{"port":0}]}`,
	} {
		f.Add([]byte(s))
	}
}

func FuzzDecodeClusterConfig(f *testing.F) {
	c := sampleClusterConfig()
	c.ID, c.Capabilities.MaxConnectedClusters, c.Encryption.Type = 511, 511, EncryptionIPsec
	c.Region, c.Zone = "", ""
	addSeeds(f, sampleClusterConfig(), c)
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode(t, data, DecodeClusterConfig) })
}

func FuzzDecodeNode(f *testing.F) {
	n := sampleNode()
	n.IPs, n.PodCIDRs, n.WireGuardPublicKey, n.HealthAddr = n.IPs[1:], nil, "", "[2a05:d018:1::29]:4240"
	n.IPsecKeyIndex = 7
	addSeeds(f, sampleNode(), n)
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode(t, data, DecodeNode) })
}

func FuzzDecodeEndpoint(f *testing.F) {
	e := sampleEndpoint()
	e.IP, e.Namespace, e.Pod, e.Ready = netip.MustParseAddr("fd00:7::c9"), "", "", false
	addSeeds(f, sampleEndpoint(), e)
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode(t, data, DecodeEndpoint) })
}

func FuzzDecodeIdentity(f *testing.F) {
	id := sampleIdentity()
	id.Labels = map[string]string{"reserved:host": ""}
	addSeeds(f, sampleIdentity(), id)
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode(t, data, DecodeIdentity) })
}

func FuzzDecodeService(f *testing.F) {
	s := sampleService()
	s.Ports = []ServicePort{{Protocol: ProtocolUDP, Port: 53}}
	s.Backends = []Backend{{IP: netip.MustParseAddr("10.7.0.10"), Ports: []BackendPort{{Port: 53}}, State: BackendActive}}
	s.Global, s.Shared, s.Affinity, s.FailoverRegions = false, false, "", nil
	addSeeds(f, sampleService(), s)
	for _, s := range []string{
		`{"v":1,"cluster":"c","namespace":"n","name":"s","global":true,"failoverRegions":["ap","us"]}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","global":true,"failoverRegions":[]}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","global":true,"failoverRegions":null}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","global":true,"failoverRegions":[""]}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","global":true,"failoverRegions":["us","us"]}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","global":true,"failoverRegions":"us"}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","global":true,"failoverRegions":[1]}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","failoverRegions":["us"]}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","healthCheck":{"type":"http","path":"/healthz"}}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","healthCheck":{"type":"tcp"}}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","healthCheck":{}}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","healthCheck":{"type":"http"}}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","healthCheck":{"type":"http","path":"/a\r\nb"}}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","healthCheck":{"type":"tcp","path":"/x"}}`,
		`{"v":1,"cluster":"c","namespace":"n","name":"s","healthCheck":"http:/healthz"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode(t, data, DecodeService) })
}

func FuzzDecodeBackendShard(f *testing.F) {
	sh := sampleBackendShard()
	sh.Shard, sh.Gen = 0, 0
	sh.Backends = []Backend{{IP: netip.MustParseAddr("fd00:7::a"), Ports: []BackendPort{{Port: 53}}, State: BackendUnready}}
	empty := sampleBackendShard()
	empty.Backends = nil
	addSeeds(f, sampleBackendShard(), sh, empty)
	for _, s := range []string{
		`{"v":1,"cluster":"c","namespace":"n","service":"s","shard":1024}`,
		`{"v":1,"cluster":"c","namespace":"n","service":"s","shard":-1}`,
		`{"v":1,"cluster":"c","namespace":"n","service":"s","shard":1.5}`,
		`{"v":1,"cluster":"c","namespace":"n","service":"s","shard":0,"gen":-1}`,
		`{"v":1,"cluster":"c","namespace":"n","service":"s","shard":0,"gen":18446744073709551616}`,
		`{"v":1,"cluster":"c","namespace":"n","service":"s","shard":0,"backends":null}`,
		`{"v":1,"cluster":"c","namespace":"n","service":"s","shard":0,"backends":[{"ip":"10.0.0.1","state":"active"},{"ip":"10.0.0.1","state":"active"}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode(t, data, DecodeBackendShard) })
}

func FuzzParseKey(f *testing.F) {
	for _, k := range []string{
		ClusterConfigKey("c1"), HeartbeatKey("c1"),
		NodeKey("c1", "node-1.example.com"),
		EndpointKey("c1", netip.MustParseAddr("10.0.0.1")), EndpointKey("c1", netip.MustParseAddr("2001:db8::1")),
		IdentityKey("c1", MakeIdentity(511, 65535)),
		ServiceKey("c1", "default", "kubernetes"),
		BackendShardKey("c1", "default", "kubernetes", 0), BackendShardKey("c1", "default", "kubernetes", MaxBackendShards-1),
		SyncedKey("c1", KindIdentities), SyncedKey("c1", KindBackends),
		"trellis/v1/backends/c/n/s/", "trellis/v1/backends/c/n/s/01", "trellis/v1/backends/c/n/s/1024", "trellis/v1/backends/c/n/s/-0",
		"", "trellis/v1/", "trellis/v1/nodes/c1/", "trellis/v1/nodes//", "trellis/v1/services/c/n/s/",
		"trellis/v1/endpoints/c/::ffff:1.2.3.4", "trellis/v1/endpoints/c/010.0.0.1",
		"trellis/v1/endpoints/c/fe80::1%eth0", "trellis/v1/identities/c/007",
	} {
		f.Add(k)
	}
	f.Fuzz(func(t *testing.T, key string) {
		k, err := ParseKey(key)
		if err != nil {
			if !errors.Is(err, ErrBadKey) {
				t.Fatalf("error %v does not match ErrBadKey", err)
			}
			return
		}
		if s := k.String(); s != key {
			t.Fatalf("ParseKey(%q) = %+v, rebuilt as %q", key, k, s)
		}
		// The typed builders agree with Key.String.
		var built string
		switch k.Kind {
		case KindClusterConfig:
			built = ClusterConfigKey(k.Cluster)
		case KindHeartbeat:
			built = HeartbeatKey(k.Cluster)
		case KindNodes:
			built = NodeKey(k.Cluster, k.Name)
		case KindEndpoints:
			built = EndpointKey(k.Cluster, netip.MustParseAddr(k.Name))
		case KindIdentities:
			id, ok := parseIdentityName(k.Name)
			if !ok {
				t.Fatalf("ParseKey accepted identity %q", k.Name)
			}
			built = IdentityKey(k.Cluster, id)
		case KindServices:
			built = ServiceKey(k.Cluster, k.Namespace, k.Name)
		case KindBackends:
			if k.Shard < 0 || k.Shard >= MaxBackendShards {
				t.Fatalf("ParseKey accepted shard %d", k.Shard)
			}
			built = BackendShardKey(k.Cluster, k.Namespace, k.Name, k.Shard)
		case KindSynced:
			built = SyncedKey(k.Cluster, Kind(k.Name))
		default:
			t.Fatalf("ParseKey returned unknown kind %q", k.Kind)
		}
		if built != key {
			t.Fatalf("ParseKey(%q) = %+v, typed builder gives %q", key, k, built)
		}
	})
}

// FuzzDecodeEntry drives every key-aware decoder: on success the body must
// rebuild the very key it was read from.
func FuzzDecodeEntry(f *testing.F) {
	for _, s := range []struct {
		key string
		v   any
	}{
		{ClusterConfigKey(testCluster), sampleClusterConfig()},
		{NodeKey(testCluster, sampleNode().Name), sampleNode()},
		{EndpointKey(testCluster, sampleEndpoint().IP), sampleEndpoint()},
		{IdentityKey(testCluster, sampleIdentity().ID), sampleIdentity()},
		{ServiceKey(testCluster, "payments-production", "checkout-api"), sampleService()},
		{NodeKey("other", sampleNode().Name), sampleNode()},
		{EndpointKey(testCluster, netip.MustParseAddr("10.7.12.202")), sampleEndpoint()},
		{BackendShardKey(testCluster, "payments-production", "checkout-api", 3), sampleBackendShard()},
		{BackendShardKey(testCluster, "payments-production", "checkout-api", 4), sampleBackendShard()},
	} {
		f.Add(s.key, mustEncode(f, s.v))
	}
	f.Fuzz(func(t *testing.T, key string, data []byte) {
		k, err := ParseKey(key)
		if err != nil {
			return
		}
		var rebuilt string
		switch k.Kind {
		case KindClusterConfig:
			v, err := DecodeClusterConfigEntry(key, data)
			if checkEntryErr(t, err) {
				rebuilt = ClusterConfigKey(v.Name)
			}
		case KindNodes:
			v, err := DecodeNodeEntry(key, data)
			if checkEntryErr(t, err) {
				rebuilt = NodeKey(v.Cluster, v.Name)
			}
		case KindEndpoints:
			v, err := DecodeEndpointEntry(key, data)
			if checkEntryErr(t, err) {
				rebuilt = EndpointKey(v.Cluster, v.IP)
			}
		case KindIdentities:
			v, err := DecodeIdentityEntry(key, data)
			if checkEntryErr(t, err) {
				rebuilt = IdentityKey(v.Cluster, v.ID)
			}
		case KindServices:
			v, err := DecodeServiceEntry(key, data)
			if checkEntryErr(t, err) {
				rebuilt = ServiceKey(v.Cluster, v.Namespace, v.Name)
			}
		case KindBackends:
			v, err := DecodeBackendShardEntry(key, data)
			if checkEntryErr(t, err) {
				rebuilt = BackendShardKey(v.Cluster, v.Namespace, v.Service, v.Shard)
			}
		default:
			return
		}
		if rebuilt != "" && rebuilt != key {
			t.Fatalf("entry at %q decoded to a value whose key is %q", key, rebuilt)
		}
	})
}

func checkEntryErr(t *testing.T, err error) bool {
	if err != nil && (Reason(err) == "" || Reason(err) == "bad-key") {
		t.Fatalf("entry error %v: reason %q", err, Reason(err))
	}
	return err == nil
}

func FuzzDecodeTimestamp(f *testing.F) {
	for _, s := range []string{"2026-03-14T14:09:26Z", "2026-03-14T14:09:26.123456789+05:30", "0000-01-01T00:00:00-23:59", "9999-12-31T23:59:59Z", "", "x"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ts, err := DecodeTimestamp(data)
		if err != nil {
			if Reason(err) == "" {
				t.Fatal("error without reason")
			}
			return
		}
		b := EncodeTimestamp(ts)
		ts2, err := DecodeTimestamp(b)
		if err != nil || !ts2.Equal(ts) {
			t.Fatalf("%q decoded to %v, re-encoded as %q, decoded again to %v, %v", data, ts, b, ts2, err)
		}
	})
}

// parseIdentityName is the fuzzer's independent reading of an identity key
// segment.
func parseIdentityName(s string) (NumericIdentity, bool) {
	if s == "" || len(s) > 10 || (len(s) > 1 && s[0] == '0') || strings.Trim(s, "0123456789") != "" {
		return 0, false
	}
	var n uint64
	for _, c := range s {
		n = n*10 + uint64(c-'0')
	}
	if n > 1<<32-1 {
		return 0, false
	}
	return NumericIdentity(n), true
}

// TestSeedCorpusNames keeps the committed corpus honest: files named
// valid-* must be accepted and every other file rejected, so a rule change
// that flips one of them is noticed rather than silently fuzzed past.
func TestSeedCorpusNames(t *testing.T) {
	accept := map[string]func(args []any) error{
		"FuzzParseKey":            func(a []any) error { _, err := ParseKey(a[0].(string)); return err },
		"FuzzDecodeClusterConfig": func(a []any) error { _, err := DecodeClusterConfig(a[0].([]byte)); return err },
		"FuzzDecodeNode":          func(a []any) error { _, err := DecodeNode(a[0].([]byte)); return err },
		"FuzzDecodeEndpoint":      func(a []any) error { _, err := DecodeEndpoint(a[0].([]byte)); return err },
		"FuzzDecodeIdentity":      func(a []any) error { _, err := DecodeIdentity(a[0].([]byte)); return err },
		"FuzzDecodeService":       func(a []any) error { _, err := DecodeService(a[0].([]byte)); return err },
		"FuzzDecodeBackendShard":  func(a []any) error { _, err := DecodeBackendShard(a[0].([]byte)); return err },
		"FuzzDecodeTimestamp":     func(a []any) error { _, err := DecodeTimestamp(a[0].([]byte)); return err },
		"FuzzDecodeEntry": func(a []any) error {
			key, data := a[0].(string), a[1].([]byte)
			k, err := ParseKey(key)
			if err != nil {
				return err
			}
			switch k.Kind {
			case KindClusterConfig:
				_, err = DecodeClusterConfigEntry(key, data)
			case KindNodes:
				_, err = DecodeNodeEntry(key, data)
			case KindEndpoints:
				_, err = DecodeEndpointEntry(key, data)
			case KindIdentities:
				_, err = DecodeIdentityEntry(key, data)
			case KindServices:
				_, err = DecodeServiceEntry(key, data)
			case KindBackends:
				_, err = DecodeBackendShardEntry(key, data)
			}
			return err
		},
	}
	for fuzzer, check := range accept {
		files, err := filepath.Glob(filepath.Join("testdata", "fuzz", fuzzer, "*"))
		if err != nil || len(files) < 5 {
			t.Errorf("%s: %d seed files (%v), want several", fuzzer, len(files), err)
			continue
		}
		for _, file := range files {
			args, err := readCorpusFile(file)
			if err != nil {
				t.Errorf("%s: %v", file, err)
				continue
			}
			err = check(args)
			if valid := strings.HasPrefix(filepath.Base(file), "valid"); valid != (err == nil) {
				t.Errorf("%s: named valid=%v, but error = %v", file, valid, err)
			}
		}
	}
}

// readCorpusFile reads the "go test fuzz v1" format, limited to the string
// and []byte arguments our fuzzers take.
func readCorpusFile(path string) ([]any, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	if len(lines) < 2 || lines[0] != "go test fuzz v1" {
		return nil, errors.New("not a go test fuzz v1 file")
	}
	var args []any
	for _, line := range lines[1:] {
		typ, lit, ok := strings.Cut(line, "(")
		if !ok || !strings.HasSuffix(lit, ")") {
			return nil, errors.New("cannot read line " + line)
		}
		s, err := strconv.Unquote(strings.TrimSuffix(lit, ")"))
		if err != nil {
			return nil, err
		}
		switch typ {
		case "string":
			args = append(args, s)
		case "[]byte":
			args = append(args, []byte(s))
		default:
			return nil, errors.New("unsupported type " + typ)
		}
	}
	return args, nil
}
