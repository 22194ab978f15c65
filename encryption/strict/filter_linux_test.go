//go:build linux

package strict

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/tunnel"
)

// TCX verdicts as the programs return them (uint32 of the C int).
const (
	verdictNext = 0xffffffff // TCX_NEXT, -1
	verdictDrop = 2          // TCX_DROP
)

func TestOpenMissingDevice(t *testing.T) {
	privtest.RequireRoot(t)
	ns, _ := privtest.NewNetNSWithPrefix(t, nsPrefix)
	f, err := Open(Config{Device: "nodev0", NetNS: ns})
	if !errors.Is(err, ErrNoDevice) || !strings.Contains(err.Error(), "nodev0") {
		f.Close()
		t.Fatalf("Open on a missing device: err %v, want ErrNoDevice naming nodev0", err)
	}
	if _, err := Open(Config{}); err == nil {
		t.Fatal("Open without a Device succeeded")
	}
}

func TestNilFilter(t *testing.T) {
	var f *Filter
	if err := f.Set(t.Context(), nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Set on nil: %v", err)
	}
	if _, err := f.Stats(); !errors.Is(err, ErrClosed) {
		t.Errorf("Stats on nil: %v", err)
	}
	if _, err := f.Prefixes(); !errors.Is(err, ErrClosed) {
		t.Errorf("Prefixes on nil: %v", err)
	}
	if f.Close() != nil || f.Remove() != nil {
		t.Error("Close or Remove on nil failed")
	}
}

// frame builds an Ethernet frame carrying an IP packet from src to dst
// (UDP, 4 bytes of payload), or an ARP frame when src is not valid.
func frame(src, dst netip.Addr) []byte {
	eth := []byte{0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0, 0}
	udp := []byte{0x30, 0x39, 0x30, 0x39, 0, 12, 0, 0, 'p', 'i', 'n', 'g'}
	switch {
	case !src.IsValid():
		binary.BigEndian.PutUint16(eth[12:], 0x0806)
		return append(eth, make([]byte, 28)...)
	case src.Is4():
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
		ip := []byte{0x45, 0, 0, byte(20 + len(udp)), 0, 0, 0x40, 0, 64, 17, 0, 0}
		ip = append(append(ip, src.AsSlice()...), dst.AsSlice()...)
		return append(append(eth, ip...), udp...)
	default:
		binary.BigEndian.PutUint16(eth[12:], 0x86dd)
		ip := []byte{0x60, 0, 0, 0, 0, byte(len(udp)), 17, 64}
		ip = append(append(ip, src.AsSlice()...), dst.AsSlice()...)
		return append(append(eth, ip...), udp...)
	}
}

// TestProgramsTestRun runs both programs on crafted frames
// (BPF_PROG_TEST_RUN, which hands a tc program the frame as a device would:
// data at the Ethernet header, the network header after it) against maps
// written by Set: both families, longest prefix, nested prefixes, frames
// that are not IP, and the counters.
func TestProgramsTestRun(t *testing.T) {
	privtest.RequireRoot(t)
	ns, _ := privtest.NewNetNSWithPrefix(t, nsPrefix)
	privtest.AddVeth(t, ns, "dev0")
	f, err := Open(Config{Device: "dev0", NetNS: ns, Logger: testLogger(t)})
	privtest.SkipIfNotSupported(t, err)
	t.Cleanup(func() { f.Close() })

	ip := netip.MustParseAddr
	run := func(prog *ebpf.Program, src, dst netip.Addr) uint32 {
		t.Helper()
		ret, err := prog.Run(&ebpf.RunOptions{Data: frame(src, dst)})
		must(t, "test run", err)
		return ret
	}
	in, out := f.objs.StrictIngress, f.objs.StrictEgress
	// pairs of (remote, local): ingress sees remote as the source, egress
	// as the destination.
	type probe struct {
		remote, local netip.Addr
		drop          bool
	}
	check := func(state string, probes []probe) {
		t.Helper()
		before := stats(t, f)
		drops := uint64(0)
		for _, p := range probes {
			want := uint32(verdictNext)
			if p.drop {
				want = verdictDrop
				drops++
			}
			if got := run(in, p.remote, p.local); got != want {
				t.Errorf("%s: ingress from %s: verdict %#x, want %#x", state, p.remote, got, want)
			}
			if got := run(out, p.local, p.remote); got != want {
				t.Errorf("%s: egress to %s: verdict %#x, want %#x", state, p.remote, got, want)
			}
			// The other address never matters: a local address in the set
			// would not make the packet drop.
		}
		after := stats(t, f)
		if after.IngressDrops-before.IngressDrops != drops || after.EgressDrops-before.EgressDrops != drops {
			t.Errorf("%s: counters rose by %d in, %d out; want %d each", state,
				after.IngressDrops-before.IngressDrops, after.EgressDrops-before.EgressDrops, drops)
		}
	}
	local4, local6 := ip("10.1.1.10"), ip("fd00:1:1::10")
	all := []probe{
		{ip("10.1.2.10"), local4, false},
		{ip("10.1.3.1"), local4, false},
		{ip("10.2.0.1"), local4, false},
		{ip("fd00:1:2::10"), local6, false},
		{ip("fd00:1:3::1"), local6, false},
		{ip("fd00:2::1"), local6, false},
	}
	check("empty set", all)
	// ARP passes whatever the set.
	for _, prog := range []*ebpf.Program{in, out} {
		if got := run(prog, netip.Addr{}, netip.Addr{}); got != verdictNext {
			t.Errorf("ARP: verdict %#x", got)
		}
	}

	must(t, "Set", f.Set(t.Context(), pfxs("10.1.2.0/24", "10.2.0.0/16", "fd00:1:2::/64", "fd00:2::/32", "fd00:1:1::10/128")))
	check("set", []probe{
		{ip("10.1.2.10"), local4, true},
		{ip("10.1.2.255"), local4, true},
		{ip("10.1.3.1"), local4, false},
		{ip("10.2.200.1"), local4, true},
		{ip("10.3.0.1"), local4, false},
		{ip("fd00:1:2::10"), local6, true},
		{ip("fd00:1:2:0:ffff::1"), local6, true},
		{ip("fd00:1:3::1"), local6, false},
		{ip("fd00:2:ffff::1"), local6, true},
		{ip("fd00:3::1"), local6, false},
	})
	// The local end is not looked at: fd00:1:1::10/128 is in the set, yet
	// a packet from it (egress) or to it (ingress) passes.
	if got := run(in, ip("fd00:9::1"), ip("fd00:1:1::10")); got != verdictNext {
		t.Errorf("ingress to an address in the set: verdict %#x, want next", got)
	}
	if got := run(out, ip("fd00:1:1::10"), ip("fd00:9::1")); got != verdictNext {
		t.Errorf("egress from an address in the set: verdict %#x, want next", got)
	}
	// (A frame too short for its IP header would pass too, but
	// BPF_PROG_TEST_RUN refuses to build one.)

	// Nested prefixes: the /16 goes, the /24 inside it stays.
	must(t, "Set nested", f.Set(t.Context(), pfxs("10.2.0.0/16", "10.2.3.0/24")))
	must(t, "Set without the /16", f.Set(t.Context(), pfxs("10.2.3.0/24")))
	check("nested", []probe{
		{ip("10.2.3.4"), local4, true},
		{ip("10.2.4.4"), local4, false},
		{ip("fd00:1:2::10"), local6, false},
	})
	got, err := f.Prefixes()
	must(t, "Prefixes", err)
	if fmt.Sprint(got) != "[10.2.3.0/24]" {
		t.Errorf("Prefixes %v, want [10.2.3.0/24]", got)
	}
	must(t, "Set empty", f.Set(t.Context(), nil))
	check("emptied", all)
}

// TestSkbLayoutOnVXLAN records what a TCX program sees at skb->data on a
// VXLAN device, ingress and egress: the first 42 bytes of an IPv4 packet,
// by a program written here in assembly so that it needs no clang. It is
// the evidence for the offsets in c/strict.c's design notes.
func TestSkbLayoutOnVXLAN(t *testing.T) {
	privtest.RequireRoot(t)
	n1, n2 := newLab(t)
	reach(t, n1.ns, n1.pod4, n2.echo4)

	// Ethernet 14 + IPv4 20 + UDP 8: the whole of the shortest packet here
	// (bpf_skb_load_bytes fails past the end of the packet).
	const snap = 42
	seen, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: snap, MaxEntries: 2})
	must(t, "observer map", err)
	t.Cleanup(func() { seen.Close() })
	dev, err := n1.h.LinkByName(tunnel.DefaultVXLANDevice)
	must(t, "find device", err)
	for dir, attach := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type: ebpf.SchedCLS, AttachType: attach, License: "GPL",
			Instructions: asm.Instructions{
				asm.Mov.Reg(asm.R6, asm.R1),
				// IPv4 only: skb->protocol (offset 16), network byte order.
				asm.LoadMem(asm.R2, asm.R1, 16, asm.Word),
				asm.JNE.Imm(asm.R2, 0x0008, "out"),
				// bpf_skb_load_bytes(skb, 0, fp-64, snap)
				asm.Mov.Imm(asm.R2, 0),
				asm.Mov.Reg(asm.R3, asm.RFP),
				asm.Add.Imm(asm.R3, -64),
				asm.Mov.Imm(asm.R4, snap),
				asm.FnSkbLoadBytes.Call(),
				asm.JNE.Imm(asm.R0, 0, "out"),
				// seen[dir] = the bytes
				asm.StoreImm(asm.RFP, -4, int64(dir), asm.Word),
				asm.LoadMapPtr(asm.R1, seen.FD()),
				asm.Mov.Reg(asm.R2, asm.RFP),
				asm.Add.Imm(asm.R2, -4),
				asm.Mov.Reg(asm.R3, asm.RFP),
				asm.Add.Imm(asm.R3, -64),
				asm.Mov.Imm(asm.R4, 0),
				asm.FnMapUpdateElem.Call(),
				asm.Mov.Imm(asm.R0, -1).WithSymbol("out"), // TCX_NEXT
				asm.Return(),
			},
		})
		privtest.SkipIfNotSupported(t, err)
		t.Cleanup(func() { prog.Close() })
		var l link.Link
		must(t, "attach observer", privtest.InNetNS(n1.ns, func() (err error) {
			l, err = link.AttachTCX(link.TCXOptions{Interface: dev.Attrs().Index, Program: prog, Attach: attach})
			return err
		}))
		t.Cleanup(func() { l.Close() })
	}
	reach(t, n1.ns, n1.pod4, n2.echo4)

	for dir, name := range []string{"ingress", "egress"} {
		var b []byte
		must(t, "read observer", seen.Lookup(uint32(dir), &b))
		t.Logf("skb->data at TCX %s of %s (%d bytes):\n%s", name, tunnel.DefaultVXLANDevice, snap, hexdump(b))
		src, dst := n2.pod4, n1.pod4 // ingress: the echo's reply
		dstMAC, srcMAC := tunnel.NodeMAC(n1.ip), tunnel.NodeMAC(n2.ip)
		if name == "egress" {
			src, dst = dst, src
			dstMAC, srcMAC = srcMAC, dstMAC
		}
		// The inner Ethernet header comes first, then the IPv4 header.
		want := slices.Concat([]byte(dstMAC), []byte(srcMAC), []byte{0x08, 0x00})
		if !slices.Equal(b[:14], want) {
			t.Errorf("%s: Ethernet header % x, want % x", name, b[:14], want)
		}
		if b[14]>>4 != 4 || b[14]&0xf != 5 {
			t.Errorf("%s: byte 14 is %#x, want an IPv4 header (0x45)", name, b[14])
		}
		if got := netip.AddrFrom4([4]byte(b[14+12 : 14+16])); got != src {
			t.Errorf("%s: source %s at 14+12, want %s", name, got, src)
		}
		if got := netip.AddrFrom4([4]byte(b[14+16 : 14+20])); got != dst {
			t.Errorf("%s: destination %s at 14+16, want %s", name, got, dst)
		}
	}
}

// TestVXLANLab filters node1's end of a real VXLAN tunnel: with the set
// empty everything passes; with node2's first two pod CIDRs in it, pod
// traffic to node2 is dropped at egress and from node2 at ingress, both
// families, and counted, while node2's third pod CIDR still passes; taking
// the prefixes out restores traffic.
func TestVXLANLab(t *testing.T) {
	privtest.RequireRoot(t)
	n1, n2 := newLab(t)
	reachAll := func(what string) {
		t.Helper()
		t.Log(what)
		reach(t, n1.ns, n1.pod4, n2.echo4)
		reach(t, n1.ns, n1.pod6, n2.echo6)
		reach(t, n2.ns, n2.pod4, n1.echo4)
		reach(t, n2.ns, n2.pod6, n1.echo6)
		reach(t, n1.ns, n1.other, n2.echoOther)
	}
	reachAll("no filter")

	f := openFilter(t, n1, "")
	reachAll("empty set")
	if s := stats(t, f); s.IngressDrops+s.EgressDrops != 0 || s.Attaches != 2 {
		t.Errorf("empty set: stats %+v, want no drops and 2 attaches", s)
	}

	// node2's 10.1.2.0/24 and fd00:1:2::/64 must be encrypted; its
	// 10.9.2.0/24 not.
	must(t, "Set", f.Set(t.Context(), []netip.Prefix{n2.cidrs[0], n2.cidrs[2]}))
	if s := stats(t, f); s.LastWrites != 2 {
		t.Errorf("Set wrote %d entries, want 2", s.LastWrites)
	}
	must(t, "Set again", f.Set(t.Context(), []netip.Prefix{n2.cidrs[2], n2.cidrs[0], n2.cidrs[0]}))
	if s := stats(t, f); s.LastWrites != 0 {
		t.Errorf("the same set again wrote %d entries, want 0", s.LastWrites)
	}
	unreachable(t, n1.ns, n1.pod4, n2.echo4)
	unreachable(t, n1.ns, n1.pod6, n2.echo6)
	unreachable(t, n2.ns, n2.pod4, n1.echo4)
	unreachable(t, n2.ns, n2.pod6, n1.echo6)
	reach(t, n1.ns, n1.other, n2.echoOther)
	// From node2's filtered range to node1's unfiltered one: node1's
	// ingress looks at the source, which is in the set.
	unreachable(t, n2.ns, n2.pod4, n1.echoOther)

	// Exact counts: k datagrams out of node1 are k egress drops and no
	// ingress drop; k datagrams from node2 are k ingress drops at node1
	// (node2 has no filter) and no egress drop.
	const k = 5
	for _, c := range []struct {
		name      string
		from, to  *labNode
		src       netip.Addr
		dst       netip.AddrPort
		dIn, dOut uint64
	}{
		{"IPv4 node1 → node2", n1, n2, n1.pod4, n2.echo4, 0, k},
		{"IPv6 node1 → node2", n1, n2, n1.pod6, n2.echo6, 0, k},
		{"IPv4 node2 → node1", n2, n1, n2.pod4, n1.echo4, k, 0},
		{"IPv6 node2 → node1", n2, n1, n2.pod6, n1.echo6, k, 0},
	} {
		before := stats(t, f)
		send(t, c.from.ns, c.src, c.dst, k)
		var s Stats
		testutil.Eventually(t, replyTimeout, c.name+": drops counted", func() bool {
			s = stats(t, f)
			return s.IngressDrops-before.IngressDrops >= c.dIn && s.EgressDrops-before.EgressDrops >= c.dOut
		})
		if in, out := s.IngressDrops-before.IngressDrops, s.EgressDrops-before.EgressDrops; in != c.dIn || out != c.dOut {
			t.Errorf("%s: %d ingress and %d egress drops, want %d and %d", c.name, in, out, c.dIn, c.dOut)
		}
	}

	// Taking the prefixes out restores traffic.
	must(t, "Set empty", f.Set(t.Context(), nil))
	if s := stats(t, f); s.LastWrites != 2 {
		t.Errorf("emptying wrote %d entries, want 2", s.LastWrites)
	}
	reachAll("emptied set")
}

// TestPinnedAdoption: a Filter with a PinDir keeps dropping after Close,
// while no process holds it, and the next Open adopts the same links (no
// second attachment) and the same map contents and counters.
func TestPinnedAdoption(t *testing.T) {
	privtest.RequireRoot(t)
	n1, n2 := newLab(t)
	dir := pinDir(t)
	f := openFilter(t, n1, dir)
	set := []netip.Prefix{n2.cidrs[0], n2.cidrs[2]}
	must(t, "Set", f.Set(t.Context(), set))
	unreachable(t, n1.ns, n1.pod4, n2.echo4)
	inLinks := tcxLinks(t, n1, tunnel.DefaultVXLANDevice, ebpf.AttachTCXIngress)
	outLinks := tcxLinks(t, n1, tunnel.DefaultVXLANDevice, ebpf.AttachTCXEgress)
	if len(inLinks) != 1 || len(outLinks) != 1 {
		t.Fatalf("links on the device: ingress %v, egress %v; want one each", inLinks, outLinks)
	}
	must(t, "Close", f.Close())

	// No agent: the pinned filter still drops, and counts.
	in0, out0 := pinnedDrops(t, dir)
	send(t, n1.ns, n1.pod4, n2.echo4, 3)
	send(t, n2.ns, n2.pod6, n1.echo6, 2)
	testutil.Eventually(t, replyTimeout, "drops counted with no agent", func() bool {
		in, out := pinnedDrops(t, dir)
		return in-in0 == 2 && out-out0 == 3
	})
	unreachable(t, n2.ns, n2.pod4, n1.echo4)
	reach(t, n1.ns, n1.other, n2.echoOther)

	// A restarted agent adopts everything.
	f2 := openFilter(t, n1, dir)
	if got := tcxLinks(t, n1, tunnel.DefaultVXLANDevice, ebpf.AttachTCXIngress); !slices.Equal(got, inLinks) {
		t.Errorf("ingress links after adoption %v, want %v", got, inLinks)
	}
	if got := tcxLinks(t, n1, tunnel.DefaultVXLANDevice, ebpf.AttachTCXEgress); !slices.Equal(got, outLinks) {
		t.Errorf("egress links after adoption %v, want %v", got, outLinks)
	}
	s := stats(t, f2)
	if s.Attaches != 0 {
		t.Errorf("adopting Open attached %d links, want 0", s.Attaches)
	}
	if in, out := pinnedDrops(t, dir); s.IngressDrops != in || s.EgressDrops != out || in == 0 {
		t.Errorf("adopted counters %d/%d, pinned %d/%d", s.IngressDrops, s.EgressDrops, in, out)
	}
	got, err := f2.Prefixes()
	must(t, "Prefixes", err)
	if !slices.Equal(got, set) { // IPv4 first, as Prefixes lists them
		t.Errorf("adopted prefixes %v, want %v", got, set)
	}
	must(t, "Set after adoption", f2.Set(t.Context(), set))
	if s := stats(t, f2); s.LastWrites != 0 || s.Attaches != 0 {
		t.Errorf("Set after adoption: %d writes, %d attaches; want none", s.LastWrites, s.Attaches)
	}
	unreachable(t, n1.ns, n1.pod6, n2.echo6)
	// The adopted link runs the new program: the adopted one is updated
	// in place, so the program ID on the link is f2's.
	info, err := f2.links[0].Info()
	must(t, "link info", err)
	progInfo, err := f2.objs.StrictIngress.Info()
	must(t, "program info", err)
	if id, _ := progInfo.ID(); info.Program != id {
		t.Errorf("adopted ingress link runs program %d, want the new %d", info.Program, id)
	}
}

// TestDeviceRecreated: the tunnel device is deleted and recreated (the
// tunnel's drift repair does that) under a running Filter, and under a
// pinned one with no agent: the old links die with the device, Set and
// Open attach anew, and drops resume.
func TestDeviceRecreated(t *testing.T) {
	privtest.RequireRoot(t)
	n1, n2 := newLab(t)
	dir := pinDir(t)
	f := openFilter(t, n1, dir)
	must(t, "Set", f.Set(t.Context(), n2.cidrs[:1]))
	unreachable(t, n1.ns, n1.pod4, n2.echo4)

	recreate := func() {
		t.Helper()
		dev, err := n1.h.LinkByName(tunnel.DefaultVXLANDevice)
		must(t, "find device", err)
		must(t, "delete device", n1.h.LinkDel(dev))
		must(t, "tunnel Set recreates the device", n1.tun.Set(t.Context(), []tunnel.Node{n2.node()}))
		// A new device has no filter: this is the gap Set or Open closes.
		reach(t, n1.ns, n1.pod4, n2.echo4)
	}

	// Under a running Filter: Set re-attaches.
	recreate()
	must(t, "Set after recreation", f.Set(t.Context(), n2.cidrs[:1]))
	if s := stats(t, f); s.Attaches != 4 || s.LastWrites != 0 {
		t.Errorf("after recreation: %d attaches (want 4: 2 at Open, 2 now), %d writes (want 0)", s.Attaches, s.LastWrites)
	}
	unreachable(t, n1.ns, n1.pod4, n2.echo4)
	must(t, "Set again", f.Set(t.Context(), n2.cidrs[:1]))
	if s := stats(t, f); s.Attaches != 4 {
		t.Errorf("Set with the links in place attached again: %d attaches", s.Attaches)
	}
	must(t, "Close", f.Close())

	// With no agent: the next Open re-attaches to the new device.
	recreate()
	f2 := openFilter(t, n1, dir)
	if s := stats(t, f2); s.Attaches != 2 {
		t.Errorf("Open after recreation attached %d links, want 2", s.Attaches)
	}
	for _, attach := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
		if got := tcxLinks(t, n1, tunnel.DefaultVXLANDevice, attach); len(got) != 1 {
			t.Errorf("%s links on the new device: %v, want one", attach, got)
		}
	}
	unreachable(t, n1.ns, n1.pod4, n2.echo4)
	reach(t, n1.ns, n1.other, n2.echoOther)
	if entries, _ := os.ReadDir(dir); len(entries) != 5 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("pin dir holds %v, want 3 maps and 2 links", names)
	}
}

// TestRemove: Remove detaches both programs and leaves no pin; Uninstall
// does the same for a filter no process holds.
func TestRemove(t *testing.T) {
	privtest.RequireRoot(t)
	n1, n2 := newLab(t)
	noLinks := func(what string) {
		t.Helper()
		for _, attach := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			if got := tcxLinks(t, n1, tunnel.DefaultVXLANDevice, attach); len(got) != 0 {
				t.Errorf("%s: %s links still attached: %v", what, attach, got)
			}
		}
	}
	for _, how := range []string{"Remove", "Uninstall"} {
		dir := pinDir(t)
		f := openFilter(t, n1, dir)
		must(t, "Set", f.Set(t.Context(), n2.cidrs))
		unreachable(t, n1.ns, n1.pod4, n2.echo4)
		if how == "Remove" {
			must(t, "Remove", f.Remove())
		} else {
			must(t, "Close", f.Close())
			must(t, "Uninstall", Uninstall(dir))
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			entries, _ := os.ReadDir(dir)
			t.Errorf("%s left %s: %v", how, dir, entries)
		}
		noLinks(how)
		reach(t, n1.ns, n1.pod4, n2.echo4)
		reach(t, n1.ns, n1.pod6, n2.echo6)
		if _, err := f.Stats(); !errors.Is(err, ErrClosed) {
			t.Errorf("Stats after %s: %v, want ErrClosed", how, err)
		}
		must(t, "Close after "+how, f.Close())
	}
	// Uninstall of a directory that is not there is fine.
	must(t, "Uninstall of nothing", Uninstall("/sys/fs/bpf/"+privtest.UniqueName("trellis-test-none")))
}
