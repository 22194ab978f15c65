package ipsec

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// TestStateMessage checks the bytes of the XFRM_MSG_NEWSA request for a
// planned state against struct xfrm_usersa_info and struct xfrm_algo_aead
// (<linux/xfrm.h>), field by field, then reads them back.
func TestStateMessage(t *testing.T) {
	keys := testKeys(t)
	local := node("c1/a", "192.168.0.1", 1, "10.1.0.0/24", "fd01::/64")
	d := Plan(local, []Node{node("c1/b", "192.168.0.2", 1, "10.2.0.0/24")}, keys, PlanOptions{})
	var out State
	for _, s := range d.States {
		if s.Dir == DirOut {
			out = s
		}
	}
	msg := serialize(encodeSA(saFromState(out)))
	if len(msg) < nl.SizeofXfrmUsersaInfo {
		t.Fatalf("%d bytes", len(msg))
	}
	info := msg[:nl.SizeofXfrmUsersaInfo]
	ne := nl.NativeEndian()
	// struct xfrm_usersa_info: sel (56), id {daddr 16, spi 4 (BE), proto
	// 1, pad 3} at 56, saddr at 80, lft (64) at 96, curlft (32) at 160,
	// stats (12) at 192, seq at 204, reqid at 208, family at 212, mode at
	// 214, replay_window at 215, flags at 216.
	if !bytes.Equal(info[:56], make([]byte, 56)) {
		t.Errorf("selector not empty: %x", info[:56])
	}
	if got := netip.AddrFrom4([4]byte(info[56:60])); got != out.Dst || !bytes.Equal(info[60:72], make([]byte, 12)) {
		t.Errorf("daddr %x", info[56:72])
	}
	if got := binary.BigEndian.Uint32(info[72:76]); got != out.SPI {
		t.Errorf("spi %#x, want %#x", got, out.SPI)
	}
	if info[76] != unix.IPPROTO_ESP {
		t.Errorf("proto %d", info[76])
	}
	if got := netip.AddrFrom4([4]byte(info[80:84])); got != out.Src {
		t.Errorf("saddr %s", got)
	}
	for i := range 4 { // soft/hard byte/packet limits: infinite
		if v := ne.Uint64(info[96+8*i:]); v != nl.XFRM_INF {
			t.Errorf("lifetime limit %d = %d, want infinite", i, v)
		}
	}
	if v := ne.Uint32(info[208:]); v != Reqid {
		t.Errorf("reqid %#x", v)
	}
	if v := ne.Uint16(info[212:]); v != unix.AF_INET {
		t.Errorf("family %d", v)
	}
	if info[214] != modeTunnel || info[215] != ReplayWindow || info[216] != nl.XFRM_STATE_AF_UNSPEC {
		t.Errorf("mode %d replay %d flags %d", info[214], info[215], info[216])
	}
	attrs, err := nl.ParseRouteAttr(msg[nl.SizeofXfrmUsersaInfo:])
	if err != nil || len(attrs) != 1 || attrs[0].Attr.Type != nl.XFRMA_ALG_AEAD {
		t.Fatalf("attributes %v %v", attrs, err)
	}
	a := attrs[0].Value
	if name := string(bytes.TrimRight(a[:64], "\x00")); name != "rfc4106(gcm(aes))" {
		t.Errorf("aead %q", name)
	}
	if kl, icv := ne.Uint32(a[64:]), ne.Uint32(a[68:]); kl != 288 || icv != 128 {
		t.Errorf("key %d bits, icv %d bits; want 288 and 128", kl, icv)
	}
	if !bytes.Equal(a[72:], out.Key) {
		t.Error("key bytes")
	}

	// Read back, as from a dump: it matches what was asked.
	back, err := decodeSA(msg)
	if err != nil {
		t.Fatal(err)
	}
	if !back.matches(saFromState(out)) || back.flags != nl.XFRM_STATE_AF_UNSPEC || back.replay != ReplayWindow {
		t.Errorf("read back %+v", back)
	}
	// Any difference that matters is seen.
	for name, change := range map[string]func(*sa){
		"key": func(s *sa) {
			s.aead = &algo{name: s.aead.name, key: bytes.Repeat([]byte{1}, AEADKeyBytes), bits: s.aead.bits}
		},
		"src":   func(s *sa) { s.src = netip.MustParseAddr("192.168.0.9") },
		"reqid": func(s *sa) { s.reqid++ },
		"icv":   func(s *sa) { s.aead = &algo{name: s.aead.name, key: s.aead.key, bits: 64} },
		"auth":  func(s *sa) { s.auth = &algo{name: "hmac(sha256)"} },
		"mark":  func(s *sa) { s.mark = &[2]uint32{1, 1} },
	} {
		k := back
		change(&k)
		if k.matches(saFromState(out)) {
			t.Errorf("a state with another %s matches", name)
		}
	}
}

// TestStateMessageIPv6 reads back IPv6 addresses whose last 12 bytes are
// zero as IPv6 (vishvananda/netlink v1.3.1 reads them as IPv4).
func TestStateMessageIPv6(t *testing.T) {
	s := State{Dir: DirIn, Src: netip.MustParseAddr("2001:db8::"), Dst: netip.MustParseAddr("fd00::1"), SPI: 0x1234abcd, Reqid: Reqid, Key: make([]byte, AEADKeyBytes)}
	back, err := decodeSA(serialize(encodeSA(saFromState(s))))
	if err != nil {
		t.Fatal(err)
	}
	if back.src != s.Src || back.dst != s.Dst || !back.matches(saFromState(s)) {
		t.Errorf("read back %s → %s", back.src, back.dst)
	}
}

// TestPolicyMessage checks struct xfrm_userpolicy_info and struct
// xfrm_user_tmpl for an inter-family policy (IPv6 pods over an IPv4
// underlay), and reads it back.
func TestPolicyMessage(t *testing.T) {
	p := Policy{Dir: DirFwd, Src: netip.MustParsePrefix("fd02::/64"), Dst: netip.MustParsePrefix("fd01::/64"),
		TmplSrc: netip.MustParseAddr("192.168.0.2"), TmplDst: netip.MustParseAddr("192.168.0.1"), Reqid: Reqid}
	msg := serialize(encodePolicy(policyFromPlan(p)))
	ne := nl.NativeEndian()
	info := msg[:nl.SizeofXfrmUserpolicyInfo]
	// Selector: daddr at 0, saddr at 16, family at 40, prefixlen_d at 42,
	// prefixlen_s at 43, proto at 44. Then lft (64) at 56, curlft (32) at
	// 120, priority at 152, index at 156, dir at 160, action at 161.
	if netip.AddrFrom16([16]byte(info[0:16])) != p.Dst.Addr() || netip.AddrFrom16([16]byte(info[16:32])) != p.Src.Addr() {
		t.Errorf("selector addresses %x", info[:32])
	}
	if ne.Uint16(info[40:]) != unix.AF_INET6 || info[42] != 64 || info[43] != 64 || info[44] != 0 {
		t.Errorf("selector family %d prefixes %d %d proto %d", ne.Uint16(info[40:]), info[42], info[43], info[44])
	}
	if info[160] != policyFwd || info[161] != policyAllow || ne.Uint32(info[152:]) != 0 {
		t.Errorf("dir %d action %d priority %d", info[160], info[161], ne.Uint32(info[152:]))
	}
	attrs, err := nl.ParseRouteAttr(msg[nl.SizeofXfrmUserpolicyInfo:])
	if err != nil || len(attrs) != 1 || attrs[0].Attr.Type != nl.XFRMA_TMPL || len(attrs[0].Value) != nl.SizeofXfrmUserTmpl {
		t.Fatalf("attributes %v %v", attrs, err)
	}
	// struct xfrm_user_tmpl: id {daddr 16, spi 4, proto 1} at 0, family
	// at 24, saddr at 28, reqid at 44, mode at 48, share 49, optional 50,
	// aalgos 52, ealgos 56, calgos 60.
	tm := attrs[0].Value
	if netip.AddrFrom4([4]byte(tm[0:4])) != p.TmplDst || netip.AddrFrom4([4]byte(tm[28:32])) != p.TmplSrc {
		t.Errorf("template addresses %x", tm[:48])
	}
	if tm[20] != unix.IPPROTO_ESP || ne.Uint16(tm[24:]) != unix.AF_INET || ne.Uint32(tm[44:]) != Reqid || tm[48] != modeTunnel || tm[50] != 0 {
		t.Errorf("template proto %d family %d reqid %#x mode %d optional %d", tm[20], ne.Uint16(tm[24:]), ne.Uint32(tm[44:]), tm[48], tm[50])
	}
	if ne.Uint32(tm[52:]) != ^uint32(0) || ne.Uint32(tm[56:]) != ^uint32(0) {
		t.Error("template does not accept every algorithm")
	}

	back, err := decodePolicy(msg)
	if err != nil {
		t.Fatal(err)
	}
	if !back.plain() || !back.owned() || back.id() != p.ID() || !back.matches(policyFromPlan(p)) {
		t.Errorf("read back %+v", back)
	}
	other := p
	other.TmplSrc = netip.MustParseAddr("192.168.0.3")
	if back.matches(policyFromPlan(other)) {
		t.Error("a policy with another template matches")
	}
	foreign := policyFromPlan(p)
	foreign.tmpls[0].reqid = 1
	if back, _ := decodePolicy(serialize(encodePolicy(foreign))); back.owned() {
		t.Error("a policy of reqid 1 is Trellis's")
	}
}

func TestDecodeRejectsShortMessages(t *testing.T) {
	if _, err := decodeSA(make([]byte, 10)); err == nil {
		t.Error("decodeSA of 10 bytes")
	}
	if _, err := decodePolicy(make([]byte, 10)); err == nil {
		t.Error("decodePolicy of 10 bytes")
	}
	// An AEAD attribute that claims a longer key than it carries.
	msg := serialize(encodeSA(saFromState(State{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"), SPI: 1, Reqid: Reqid, Key: make([]byte, AEADKeyBytes)})))
	off := nl.SizeofXfrmUsersaInfo + 4 + 64
	nl.NativeEndian().PutUint32(msg[off:], 4096)
	if _, err := decodeSA(msg); err == nil {
		t.Error("decodeSA of a truncated key")
	}
}
