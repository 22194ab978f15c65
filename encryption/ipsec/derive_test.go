package ipsec

import (
	"bytes"
	"encoding/hex"
	"testing"
)

// testPSKs are the known-answer keys: index 1 is bytes 0..31, index 2 is
// 48 bytes (7i+3) mod 256.
func testKeys(t testing.TB) Keys {
	t.Helper()
	psk1 := make([]byte, 32)
	for i := range psk1 {
		psk1[i] = byte(i)
	}
	psk2 := make([]byte, 48)
	for i := range psk2 {
		psk2[i] = byte(i*7 + 3)
	}
	psk15 := psk2
	k, err := NewKeys(map[uint8][]byte{1: psk1, 2: psk2, 15: psk15})
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestDeriveKnownAnswers pins the derivation: both nodes of a pair must
// compute the same bytes, whichever Trellis version runs on them. The
// vectors were computed once with an independent HKDF-SHA256 (Python's
// hmac and hashlib, RFC 5869 by hand), not with this code.
func TestDeriveKnownAnswers(t *testing.T) {
	keys := testKeys(t)
	for _, tc := range []struct {
		src, dst string
		index    uint8
		key      string
		spi      uint32
	}{
		{"c1/n1", "c2/n1", 1, "3a38047bfd4e7581d395f5249956bb2518b6c859b4ccf2b4a8bc78fc632f9b67836b184b", 0x1d16c286},
		{"c2/n1", "c1/n1", 1, "96b970071b38b04317455dc9877a5beee7f4c6b5778c35e83dca5b85a8ca65ac26212f19", 0x1386ae70},
		{"c1/n1", "c2/n1", 2, "7d4b430baa6ea8e97bf103d3dad3d75d565bc1dd72a374043a37e93dc0a6b28b559107df", 0x26897de7},
		{"east/node-a", "west/node-b", 15, "4db802d7563d11698cb989f74a73f773d4bac82fa96b6342c2ea9d505bcbfccb06fa7cec", 0xfeb9a428},
	} {
		got, err := keys.Derive(tc.src, tc.dst, tc.index)
		if err != nil {
			t.Fatal(err)
		}
		if hex.EncodeToString(got.Key) != tc.key || got.SPI != tc.spi || got.Index != tc.index {
			t.Errorf("Derive(%q, %q, %d) = key %x spi %#08x index %d, want key %s spi %#08x",
				tc.src, tc.dst, tc.index, got.Key, got.SPI, got.Index, tc.key, tc.spi)
		}
		if SPIIndex(got.SPI) != tc.index {
			t.Errorf("SPIIndex(%#08x) = %d, want %d", got.SPI, SPIIndex(got.SPI), tc.index)
		}
		if len(got.Key) != AEADKeyBytes {
			t.Errorf("key of %d bytes", len(got.Key))
		}
	}
}

// TestDeriveDistinct: every direction, pair and index gets its own key
// and SPI, and the names' boundaries are part of the input.
func TestDeriveDistinct(t *testing.T) {
	keys := testKeys(t)
	type in struct {
		src, dst string
		i        uint8
	}
	inputs := []in{
		{"a/1", "b/1", 1}, {"b/1", "a/1", 1}, {"a/1", "b/1", 2}, {"b/1", "a/1", 2},
		{"a/1", "b/2", 1}, {"a/2", "b/1", 1}, {"a/1", "b/1", 15},
		// Same concatenation, other boundary.
		{"a/1b", "/1", 1}, {"a/", "1b/1", 1},
	}
	keysSeen := map[string]in{}
	spisSeen := map[uint32]in{}
	for _, x := range inputs {
		k, err := keys.Derive(x.src, x.dst, x.i)
		if err != nil {
			t.Fatal(err)
		}
		if prev, dup := keysSeen[string(k.Key)]; dup {
			t.Errorf("%v and %v derive the same key", prev, x)
		}
		if prev, dup := spisSeen[k.SPI]; dup {
			t.Errorf("%v and %v derive the same SPI %#08x", prev, x, k.SPI)
		}
		keysSeen[string(k.Key)] = x
		spisSeen[k.SPI] = x
		if k.SPI == 0 || k.SPI < 256 {
			t.Errorf("%v: SPI %#x is reserved", x, k.SPI)
		}
	}
}

// TestDerivePairAgrees: what one node installs as its out state to a
// peer is what the peer installs as its in state from it, from Plan on
// each side.
func TestDerivePairAgrees(t *testing.T) {
	keys := testKeys(t)
	a := node("c1/a", "10.0.0.1", 2, "10.1.0.0/24")
	b := node("c2/b", "10.0.0.2", 2, "10.2.0.0/24")
	da := Plan(a, []Node{b}, keys, PlanOptions{})
	db := Plan(b, []Node{a}, keys, PlanOptions{})
	if err := da.Err(); err != nil {
		t.Fatal(err)
	}
	if err := db.Err(); err != nil {
		t.Fatal(err)
	}
	find := func(d Desired, dir Direction, src string) State {
		for _, s := range d.States {
			if s.Dir == dir && s.Src.String() == src {
				return s
			}
		}
		t.Fatalf("no %s state from %s in %v", dir, src, d.States)
		return State{}
	}
	for _, pair := range [][2]State{
		{find(da, DirOut, "10.0.0.1"), find(db, DirIn, "10.0.0.1")},
		{find(db, DirOut, "10.0.0.2"), find(da, DirIn, "10.0.0.2")},
	} {
		out, in := pair[0], pair[1]
		if out.SPI != in.SPI || !bytes.Equal(out.Key, in.Key) || out.Src != in.Src || out.Dst != in.Dst || out.Index != in.Index {
			t.Errorf("out %s and in %s disagree", out, in)
		}
	}
	if find(da, DirOut, "10.0.0.1").SPI == find(db, DirOut, "10.0.0.2").SPI {
		t.Error("both directions of the pair share an SPI")
	}
}

func TestDeriveRefuses(t *testing.T) {
	keys := testKeys(t)
	if _, err := keys.Derive("a", "b", 3); err == nil {
		t.Error("Derive with a missing index succeeded")
	}
	if _, err := keys.Derive("", "b", 1); err == nil {
		t.Error("Derive with an empty name succeeded")
	}
	if _, err := keys.Derive("a", string(make([]byte, maxNameBytes+1)), 1); err == nil {
		t.Error("Derive with a huge name succeeded")
	}
	if s := (SAKey{Index: 1, SPI: 0x1abcdef0, Key: []byte{0xde, 0xad}}).String(); bytes.Contains([]byte(s), []byte("dead")) {
		t.Errorf("SAKey.String shows the key: %s", s)
	}
}
