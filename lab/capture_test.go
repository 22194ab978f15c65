package lab

import (
	"encoding/binary"
	"net/netip"
	"strings"
	"testing"
)

// frame builds an Ethernet frame carrying an IPv4 packet of proto from src
// to dst, with ports for TCP and UDP, and payload.
func frame(src, dst string, proto byte, sport, dport uint16, payload []byte) []byte {
	var l4 []byte
	switch proto {
	case 6:
		l4 = make([]byte, 20)
		binary.BigEndian.PutUint16(l4[0:], sport)
		binary.BigEndian.PutUint16(l4[2:], dport)
		l4[12] = 5 << 4
	case 17:
		l4 = make([]byte, 8)
		binary.BigEndian.PutUint16(l4[0:], sport)
		binary.BigEndian.PutUint16(l4[2:], dport)
		binary.BigEndian.PutUint16(l4[4:], uint16(8+len(payload)))
	}
	ip := make([]byte, 20)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)+len(payload)))
	ip[8] = 64
	ip[9] = proto
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	eth := make([]byte, 14)
	copy(eth[0:6], []byte{0x02, 0, 0, 0, 0, 1})
	copy(eth[6:12], []byte{0x02, 0, 0, 0, 0, 2})
	binary.BigEndian.PutUint16(eth[12:], 0x0800)
	out := append(eth, ip...)
	out = append(out, l4...)
	return append(out, payload...)
}

// vxlan wraps an inner Ethernet frame in VXLAN (VNI 126) over UDP 8472.
func vxlan(src, dst string, inner []byte) []byte {
	hdr := make([]byte, 8)
	hdr[0] = 0x08
	hdr[6] = 126
	return frame(src, dst, 17, 40123, 8472, append(hdr, inner...))
}

func testClassifier(t *testing.T) classifier {
	t.Helper()
	lay := defaultLayout(t)
	cl := classifier{nodes: map[netip.Addr]bool{}, apis: map[netip.Addr]bool{}}
	for _, c := range lay.clusters {
		cl.apis[c.ip] = true
		for _, n := range c.nodes {
			cl.nodes[n.ip] = true
		}
	}
	return cl
}

func TestCaptureFrameClass(t *testing.T) {
	cl := testClassifier(t)
	const (
		euN1, euN2, usN1 = "192.168.100.101", "192.168.100.102", "192.168.100.111"
		euAPI, usAPI     = "192.168.100.10", "192.168.100.11"
	)
	clear := frame("10.1.1.11", "10.2.2.10", 6, 51000, 9101, []byte("GET /TRELLIS-MARKER HTTP/1.1"))
	arp := make([]byte, 42)
	binary.BigEndian.PutUint16(arp[12:], 0x0806)
	vlan := frame(euN1, usN1, 17, 51871, 51871, nil)
	vlan = append(vlan[:12], append([]byte{0x81, 0x00, 0x00, 0x05}, vlan[12:]...)...)
	frag := frame(euN1, euN2, 17, 0, 0, nil)
	binary.BigEndian.PutUint16(frag[14+6:], 185) // offset 185*8: a later fragment

	for _, tc := range []struct {
		name         string
		frame        []byte
		class, proto string
		ipv4         bool
	}{
		{"wireguard", frame(euN1, usN1, 17, 51871, 51871, make([]byte, 96)), ClassNodeToNode, "udp/51871", true},
		{"vxlan", vxlan(usN1, euN2, clear), ClassNodeToNode, "udp/8472", true},
		{"geneve", frame(euN1, usN1, 17, 33333, 6081, nil), ClassNodeToNode, "udp/6081", true},
		{"etcd from a node", frame(euN2, usAPI, 6, 41234, 2379, nil), ClassNodeToAPIServer, "tcp/2379", true},
		{"etcd answer", frame(usAPI, euN2, 6, 2379, 41234, nil), ClassNodeToAPIServer, "tcp/2379", true},
		{"registry", frame(euN1, euAPI, 6, 50000, 9870, nil), ClassNodeToAPIServer, "tcp/9870", true},
		{"api to api", frame(euAPI, usAPI, 6, 50000, 9870, nil), ClassOther, "tcp/9870", true},
		{"unknown ports: the lower", frame(euN1, euN2, 6, 40000, 5555, nil), ClassNodeToNode, "tcp/5555", true},
		{"icmp", frame(euN1, euN2, 1, 0, 0, make([]byte, 8)), ClassNodeToNode, "icmp", true},
		{"esp", frame(euN1, usN1, 50, 0, 0, make([]byte, 16)), ClassNodeToNode, "esp", true},
		{"gre", frame(euN1, usN1, 47, 0, 0, make([]byte, 4)), ClassNodeToNode, "ip/47", true},
		{"a pod's packet on the underlay", clear, ClassOther, "tcp/9101", true},
		{"vlan tagged", vlan, ClassNodeToNode, "udp/51871", true},
		{"later fragment", frag, ClassNodeToNode, "udp/fragment", true},
		{"arp", arp, "", "", false},
		{"runt", []byte{1, 2, 3}, "", "", false},
	} {
		class, proto, ok := cl.frameClass(tc.frame)
		if ok != tc.ipv4 || class != tc.class || proto != tc.proto {
			t.Errorf("%s: (%q, %q, %v), want (%q, %q, %v)", tc.name, class, proto, ok, tc.class, tc.proto, tc.ipv4)
		}
	}
}

// The marker is found in the clear payload a VXLAN frame carries, and
// counted by class; an encrypted frame and other frames don't count.
func TestCaptureReportCounts(t *testing.T) {
	cl := testClassifier(t)
	marker := []byte("TRELLIS-MARKER")
	clear := frame("10.1.1.11", "10.2.2.10", 6, 51000, 9101, []byte("GET /TRELLIS-MARKER HTTP/1.1"))
	r := newCaptureReport("tl-lab-br", marker)
	r.add(cl, vxlan("192.168.100.101", "192.168.100.111", clear), marker)
	r.add(cl, vxlan("192.168.100.111", "192.168.100.101", frame("10.2.2.10", "10.1.1.11", 6, 9101, 51000, nil)), marker)
	r.add(cl, frame("192.168.100.101", "192.168.100.111", 17, 51871, 51871, make([]byte, 200)), marker)
	r.add(cl, frame("192.168.100.101", "192.168.100.11", 6, 41234, 2379, nil), marker)
	arp := make([]byte, 42)
	binary.BigEndian.PutUint16(arp[12:], 0x0806)
	r.add(cl, arp, marker)

	if r.Frames != 5 || r.IPv4 != 4 {
		t.Errorf("frames %d, IPv4 %d; want 5 and 4", r.Frames, r.IPv4)
	}
	if r.NodeToNode["udp/8472"] != 2 || r.NodeToNode["udp/51871"] != 1 || Total(r.NodeToNode) != 3 {
		t.Errorf("node↔node %v; want udp/8472 2, udp/51871 1", r.NodeToNode)
	}
	if r.NodeToAPIServer["tcp/2379"] != 1 || Total(r.Other) != 0 {
		t.Errorf("node↔apiserver %v, other %v", r.NodeToAPIServer, r.Other)
	}
	if r.MarkerFrames != 1 || r.MarkerBy["node↔node udp/8472"] != 1 {
		t.Errorf("marker in %d frames (%v); want 1, node↔node udp/8472", r.MarkerFrames, r.MarkerBy)
	}
	out := r.String()
	for _, want := range []string{"5 frames, 4 IPv4", "udp/8472 2, udp/51871 1", `marker "TRELLIS-MARKER" seen in 1 frames: node↔node udp/8472 1`} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}
