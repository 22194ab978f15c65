package tunnel

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink/nl"
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func ip(s string) netip.Addr    { return netip.MustParseAddr(s) }

func TestNodeMAC(t *testing.T) {
	if got := NodeMAC(ip("192.168.0.2")).String(); got != "02:74:c0:a8:00:02" {
		t.Errorf("NodeMAC(192.168.0.2) = %s", got)
	}
	if got := NodeMAC(ip("::ffff:192.168.0.2")).String(); got != "02:74:c0:a8:00:02" {
		t.Errorf("NodeMAC of a v4-mapped address = %s, want the IPv4 one", got)
	}
	a, b := NodeMAC(ip("fd00::1")), NodeMAC(ip("fd00::2"))
	if a.String() == b.String() || a[0] != 0x02 || a[1] != 0x74 {
		t.Errorf("IPv6 MACs %s %s: want distinct, 02:74 prefix", a, b)
	}
	if NodeMAC(ip("fd00::1")).String() != a.String() {
		t.Error("NodeMAC is not deterministic")
	}
}

func TestVTEPAddr(t *testing.T) {
	if got := VTEPAddr(pfx("10.1.2.7/24")); got != ip("10.1.2.0") {
		t.Errorf("VTEPAddr = %s", got)
	}
}

// planString renders a plan for comparison.
func planString(p plan) string {
	var b strings.Builder
	for _, n := range p.nodes {
		fmt.Fprintf(&b, "%s %s mac=%s vteps=%v:", n.name, n.underlay, n.mac, n.vteps)
		for _, r := range n.routes {
			fmt.Fprintf(&b, " %s>%s", r.dst, r.via)
		}
		b.WriteString("\n")
	}
	return b.String()
}

func TestMakePlanVXLAN(t *testing.T) {
	local := ip("192.168.77.1")
	nodes := []Node{
		{Name: "node3", IP: ip("192.168.77.3"), PodCIDRs: []netip.Prefix{pfx("10.2.1.0/24"), pfx("10.2.9.0/24"), pfx("fd02::/64")}},
		{Name: "node1", IP: local, PodCIDRs: []netip.Prefix{pfx("10.1.1.0/24")}},
		{Name: "node2", IP: ip("192.168.77.2"), PodCIDRs: []netip.Prefix{pfx("10.1.2.5/24")}},
	}
	p := makePlan(ModeVXLAN, local, []netip.Prefix{pfx("10.1.1.0/24")}, nodes)
	if len(p.errs) != 0 {
		t.Fatalf("errs: %v", p.errs)
	}
	want := "node2 192.168.77.2 mac=02:74:c0:a8:4d:02 vteps=[10.1.2.0]: 10.1.2.0/24>10.1.2.0\n" +
		"node3 192.168.77.3 mac=02:74:c0:a8:4d:03 vteps=[10.2.1.0 fd02::]: 10.2.1.0/24>10.2.1.0 10.2.9.0/24>10.2.1.0 fd02::/64>fd02::\n"
	if got := planString(p); got != want {
		t.Errorf("plan:\n%s\nwant:\n%s", got, want)
	}
	// Order of the input does not matter.
	for range 20 {
		rand.Shuffle(len(nodes), func(i, j int) { nodes[i], nodes[j] = nodes[j], nodes[i] })
		if got := planString(makePlan(ModeVXLAN, local, []netip.Prefix{pfx("10.1.1.0/24")}, nodes)); got != want {
			t.Fatalf("shuffled input gave another plan:\n%s", got)
		}
	}
}

func TestMakePlanNative(t *testing.T) {
	p := makePlan(ModeNative, ip("192.168.77.1"), nil, []Node{
		{Name: "b", IP: ip("192.168.77.2"), PodCIDRs: []netip.Prefix{pfx("10.1.2.0/24"), pfx("fd00::/64")}},
	})
	if got, want := planString(p), "b 192.168.77.2 mac= vteps=[]: 10.1.2.0/24>192.168.77.2\n"; got != want {
		t.Errorf("plan %q, want %q", got, want)
	}
	if len(p.errs) != 1 || !strings.Contains(p.errs[0].Error(), "same family") {
		t.Errorf("want one family error, got %v", p.errs)
	}
}

func TestMakePlanRefuses(t *testing.T) {
	local := ip("192.168.77.1")
	cases := []struct {
		name string
		node Node
		want string
	}{
		{"no name", Node{IP: ip("192.168.77.9")}, "empty name"},
		{"no ip", Node{Name: "x"}, "invalid underlay IP"},
		{"overlaps local", Node{Name: "x", IP: ip("192.168.77.9"), PodCIDRs: []netip.Prefix{pfx("10.1.0.0/16")}}, "overlaps the local node"},
		{"overlaps node", Node{Name: "x", IP: ip("192.168.77.9"), PodCIDRs: []netip.Prefix{pfx("10.1.2.128/25")}}, `overlaps node "a"`},
		{"default route", Node{Name: "x", IP: ip("192.168.77.9"), PodCIDRs: []netip.Prefix{pfx("0.0.0.0/0")}}, "default route"},
		{"duplicate ip", Node{Name: "x", IP: ip("192.168.77.2")}, `already used by node "a"`},
		{"family", Node{Name: "x", IP: ip("fd00::9")}, "family differs"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := Node{Name: "a", IP: ip("192.168.77.2"), PodCIDRs: []netip.Prefix{pfx("10.1.2.0/24")}}
			p := makePlan(ModeVXLAN, local, []netip.Prefix{pfx("10.1.1.0/24")}, []Node{a, tc.node})
			if len(p.errs) != 1 || !strings.Contains(p.errs[0].Error(), tc.want) {
				t.Fatalf("errs %v, want one containing %q", p.errs, tc.want)
			}
			if len(p.nodes) == 0 || p.nodes[0].name != "a" {
				t.Errorf("the valid node was dropped: %s", planString(p))
			}
		})
	}
}

func TestIPEncapRoundTrip(t *testing.T) {
	for _, dst := range []string{"192.168.77.2", "fd00::2"} {
		e := &ipEncap{id: 126, dst: ip(dst)}
		b, err := e.Encode()
		if err != nil {
			t.Fatal(err)
		}
		var d ipEncap
		if err := d.Decode(b); err != nil {
			t.Fatal(err)
		}
		if !e.Equal(&d) {
			t.Errorf("round trip: %s → %s", e, &d)
		}
	}
	if (&ipEncap{dst: ip("1.2.3.4")}).Type() != nl.LWTUNNEL_ENCAP_IP || (&ipEncap{dst: ip("fd00::1")}).Type() != nl.LWTUNNEL_ENCAP_IP6 {
		t.Error("encap type by family")
	}
}

func TestUnsupportedFeatureError(t *testing.T) {
	err := fmt.Errorf("tunnel: create geneve device x: %w", &UnsupportedFeatureError{
		Feature: "Geneve tunnel device", Kernel: "CONFIG_GENEVE (module geneve)", Hint: "use mode vxlan", Err: errors.New("operation not supported"),
	})
	if !errors.Is(err, ErrNotSupported) {
		t.Error("not ErrNotSupported")
	}
	var ufe *UnsupportedFeatureError
	if !errors.As(err, &ufe) || ufe.Kernel != "CONFIG_GENEVE (module geneve)" {
		t.Error("errors.As")
	}
	t.Log(err)
}

func TestConfigDefaults(t *testing.T) {
	c := Config{LocalIP: ip("192.168.77.1")}
	if err := c.complete(); err != nil {
		t.Fatal(err)
	}
	if c.Mode != ModeVXLAN || c.Device != "trellis_vxlan" || c.VNI != 126 || c.Port != 8472 {
		t.Errorf("vxlan defaults: %+v", c)
	}
	g := Config{Mode: ModeGeneve, LocalIP: ip("192.168.77.1")}
	if err := g.complete(); err != nil || g.Device != "trellis_geneve" || g.Port != 6081 {
		t.Errorf("geneve defaults: %+v %v", g, err)
	}
	for _, bad := range []Config{{}, {Mode: "gre", LocalIP: local4()}, {VNI: 1 << 24, LocalIP: local4()}, {Device: "a-very-long-device-name", LocalIP: local4()}} {
		if err := bad.complete(); err == nil {
			t.Errorf("config %+v accepted", bad)
		}
	}
}

func local4() netip.Addr { return ip("192.168.77.1") }

func TestCloseNil(t *testing.T) {
	var tn *Tunnel
	if err := tn.Close(); err != nil {
		t.Error(err)
	}
	if err := tn.Set(t.Context(), nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Set on nil: %v", err)
	}
}
