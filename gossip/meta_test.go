package gossip

import (
	"bytes"
	"math/rand/v2"
	"strings"
	"testing"
)

func TestMetaRoundTrip(t *testing.T) {
	for _, m := range []Meta{
		{Cluster: "eu", Node: "n1"},
		{Cluster: "us", Node: "ip-10-0-1-5.ec2.internal", Region: "us-east-1"},
		{Cluster: strings.Repeat("a", 32), Node: strings.Repeat("b", 63) + "." + strings.Repeat("c", 63), Region: strings.Repeat("R", 63)},
	} {
		b, err := m.encode(0)
		if err != nil {
			t.Fatalf("encode %+v: %v", m, err)
		}
		got, flags, err := decodeMeta(MemberName(m.Cluster, m.Node), b)
		if err != nil || got != m || flags != 0 {
			t.Fatalf("decode %+v: got %+v, %v", m, got, err)
		}
	}
}

func TestMetaEncodeRefusesInvalid(t *testing.T) {
	for _, m := range []Meta{
		{Cluster: "", Node: "n1"},
		{Cluster: "EU", Node: "n1"},
		{Cluster: "eu", Node: ""},
		{Cluster: "eu", Node: "n1", Region: "-x"},
		{Cluster: "eu", Node: "n1", Region: strings.Repeat("r", 64)},
		{Cluster: "eu", Node: strings.Repeat("n", 254)},
	} {
		if _, err := m.encode(0); err == nil {
			t.Errorf("encode %+v: no error", m)
		}
	}
}

func TestDecodeMetaRejectsGarbage(t *testing.T) {
	good, err := Meta{Cluster: "eu", Node: "n1", Region: "west"}.encode(0)
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]struct {
		name string
		b    []byte
	}{
		"empty":           {"eu/n1", nil},
		"version":         {"eu/n1", append([]byte{2}, good[1:]...)},
		"truncated":       {"eu/n1", good[:len(good)-1]},
		"trailing":        {"eu/n1", append(append([]byte{}, good...), 0)},
		"length too long": {"eu/n1", []byte{1, 0, 200, 'e', 'u'}},
		"oversize":        {"eu/n1", append(append([]byte{}, good...), make([]byte, 600)...)},
		"name mismatch":   {"us/n1", good},
		"bad cluster":     {"E U/n1", []byte{1, 0, 3, 'E', ' ', 'U', 2, 'n', '1', 0}},
		"nul in node":     {"eu/n\x00", []byte{1, 0, 2, 'e', 'u', 2, 'n', 0, 0}},
	}
	for what, c := range cases {
		if m, _, err := decodeMeta(c.name, c.b); err == nil {
			t.Errorf("%s: accepted as %+v", what, m)
		}
	}
	// Random bytes, and random corruptions of a good encoding: never a
	// panic, and anything accepted must be valid and agree with the name.
	r := rand.New(rand.NewPCG(1, 2))
	for range 100000 {
		var b []byte
		if r.IntN(2) == 0 {
			b = make([]byte, r.IntN(40))
			for i := range b {
				b[i] = byte(r.UintN(256))
			}
		} else {
			b = bytes.Clone(good)
			b[r.IntN(len(b))] = byte(r.UintN(256))
		}
		if m, _, err := decodeMeta("eu/n1", b); err == nil && (m.validate() != nil || MemberName(m.Cluster, m.Node) != "eu/n1") {
			t.Fatalf("accepted %x as %+v", b, m)
		}
	}
}

func FuzzDecodeMeta(f *testing.F) {
	good, _ := Meta{Cluster: "eu", Node: "n1", Region: "west"}.encode(0)
	f.Add("eu/n1", good)
	f.Add("eu/n1", []byte{1, 0, 200})
	f.Fuzz(func(t *testing.T, name string, b []byte) {
		m, flags, err := decodeMeta(name, b)
		if err != nil {
			return
		}
		if m.validate() != nil || MemberName(m.Cluster, m.Node) != name {
			t.Fatalf("accepted %x for %q as %+v", b, name, m)
		}
		again, err := m.encode(flags)
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("%+v re-encodes to %x, %v; was %x", m, again, err, b)
		}
	})
}
