package wireguard

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/trellis-mesh/trellis/internal/privtest"
)

var (
	benchRounds   = flag.Int("wg.rounds", 5, "BenchmarkThroughput: rounds; each runs every variant once, in a shuffled order")
	benchDuration = flag.Duration("wg.duration", 5*time.Second, "BenchmarkThroughput: how long each transfer sends")
)

// debianWireGuardGo is where Debian's wireguard-go package installs it.
const debianWireGuardGo = "/usr/bin/wireguard-go"

// throughputVariant is one path between the two namespaces.
type throughputVariant struct {
	name string
	// dst is the address the sink listens on in the second namespace.
	dst netip.Addr
	// pids are the processes doing the encryption, whose CPU time counts.
	pids []int
}

type throughputSample struct {
	gbps     float64
	cpuPerGB float64 // CPU seconds per GB moved: device processes, sender and receiver
	devCPU   time.Duration
	endCPU   time.Duration
}

// BenchmarkThroughput moves TCP between two namespaces over (a) their
// veth pair, (b) VXLAN on it, (c) this package's device process (the
// wireguard-go module, TUN offloads, UDP GSO/GRO), and (d) Debian's
// wireguard-go when it is installed. Every round runs each variant once,
// in a shuffled order; the figures are medians with min-max.
//
//	go test -c -o /tmp/wg.test ./encryption/wireguard
//	(cd encryption/wireguard && /tmp/wg.test -test.run '^$' -test.bench Throughput -test.benchtime 1x -wg.rounds 7)
func BenchmarkThroughput(b *testing.B) {
	privtest.RequireRoot(b)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	a, c := newPair(b)

	variants := []*throughputVariant{{name: "veth", dst: c.underlay}}

	// VXLAN, as the tunnel package makes it: VNI 126, port 8472, MTU 1450.
	for _, n := range []*node{a, c} {
		other := a
		if n == a {
			other = c
		}
		eth0, err := n.h.LinkByName("eth0")
		must(b, "eth0", err)
		vx := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: "vx0", MTU: 1450},
			VxlanId:   126, Port: 8472, VtepDevIndex: eth0.Attrs().Index,
			SrcAddr: n.underlay.AsSlice(), Group: other.underlay.AsSlice(), Learning: false,
		}
		must(b, "add vxlan", n.h.LinkAdd(vx))
		n.addAddr("vx0", netip.PrefixFrom(vxlanAddr(n), 24))
		n.linkUp("vx0")
	}
	variants = append(variants, &throughputVariant{name: "vxlan", dst: vxlanAddr(c)})

	devs := meshUp(b, ctx, a, c)
	variants = append(variants, &throughputVariant{name: "wireguard-go", dst: c.podIP, pids: []int{devs[0].PID(), devs[1].PID()}})

	if _, err := os.Stat(debianWireGuardGo); err == nil {
		variants = append(variants, debianVariant(b, ctx, a, c))
	} else {
		b.Logf("skipping the %s variant: not installed", debianWireGuardGo)
	}

	load, _ := os.ReadFile("/proc/loadavg")
	b.Logf("load average before: %s", strings.TrimSpace(string(load)))
	samples := map[string][]throughputSample{}
	port := 9000
	for round := 1; round <= *benchRounds; round++ {
		order := slices.Clone(variants)
		rand.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
		for _, v := range order {
			port++
			s := measureThroughput(b, a, c, v, port)
			samples[v.name] = append(samples[v.name], s)
			b.Logf("round %d %-22s %6.2f Gbit/s  %6.2f CPU s/GB (devices %.2fs, sender+receiver %.2fs)",
				round, v.name, s.gbps, s.cpuPerGB, s.devCPU.Seconds(), s.endCPU.Seconds())
		}
	}
	load, _ = os.ReadFile("/proc/loadavg")
	b.Logf("load average after: %s", strings.TrimSpace(string(load)))

	for _, v := range variants {
		ss := samples[v.name]
		g := stats(ss, func(s throughputSample) float64 { return s.gbps })
		cpu := stats(ss, func(s throughputSample) float64 { return s.cpuPerGB })
		b.Logf("%-22s %5.2f Gbit/s (%.2f-%.2f)  %5.2f CPU s/GB (%.2f-%.2f)  %d rounds",
			v.name, g[1], g[0], g[2], cpu[1], cpu[0], cpu[2], len(ss))
		b.ReportMetric(g[1], v.name+"-Gbit/s")
		b.ReportMetric(cpu[1], v.name+"-CPUs/GB")
	}
	wg := stats(samples["wireguard-go"], func(s throughputSample) float64 { return s.gbps })
	vx := stats(samples["vxlan"], func(s throughputSample) float64 { return s.gbps })
	b.Logf("wireguard-go ÷ vxlan, medians: %.2f", wg[1]/vx[1])
	b.ReportMetric(0, "ns/op")
}

// vxlanAddr is n's address on the benchmark's VXLAN device.
func vxlanAddr(n *node) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 97, 0, n.underlay.As4()[3]})
}

// measureThroughput runs one transfer from a to c over v.
func measureThroughput(b *testing.B, a, c *node, v *throughputVariant, port int) throughputSample {
	b.Helper()
	addr := netip.AddrPortFrom(v.dst, uint16(port)).String()
	sink := privtest.HelperCommand("tcp-sink", addr)
	out, err := sink.StdoutPipe()
	must(b, "sink stdout", err)
	sink.Stderr = os.Stderr
	must(b, "start sink", privtest.StartInNetNSAndCgroup(b, sink, c.ns, ""))
	rd := bufio.NewReader(out)
	if line, err := rd.ReadString('\n'); err != nil || line != "ready\n" {
		b.Fatalf("sink: %q %v", line, err)
	}
	dev0 := cpuOf(b, v.pids)
	src := privtest.HelperCommand("tcp-source", addr, benchDuration.String())
	var srcOut strings.Builder
	src.Stdout, src.Stderr = &srcOut, os.Stderr
	must(b, "source", privtest.RunInNetNSAndCgroup(b, src, a.ns, ""))
	var res transferResult
	must(b, "sink result", json.NewDecoder(rd).Decode(&res))
	must(b, "sink", sink.Wait())
	dev := cpuOf(b, v.pids) - dev0
	end := rusageCPU(src.ProcessState) + rusageCPU(sink.ProcessState)
	gb := float64(res.Bytes) / 1e9
	return throughputSample{
		gbps:     gb * 8 / res.Seconds,
		cpuPerGB: (dev + end).Seconds() / gb,
		devCPU:   dev,
		endCPU:   end,
	}
}

func cpuOf(b *testing.B, pids []int) time.Duration {
	var sum time.Duration
	for _, pid := range pids {
		d, err := procCPU(pid)
		must(b, "cpu time", err)
		sum += d
	}
	return sum
}

func rusageCPU(ps *os.ProcessState) time.Duration {
	ru, ok := ps.SysUsage().(*syscall.Rusage)
	if !ok {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// stats returns min, median and max.
func stats(ss []throughputSample, f func(throughputSample) float64) [3]float64 {
	if len(ss) == 0 {
		return [3]float64{}
	}
	v := make([]float64, len(ss))
	for i, s := range ss {
		v[i] = f(s)
	}
	slices.Sort(v)
	med := v[len(v)/2]
	if len(v)%2 == 0 {
		med = (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	return [3]float64{v[0], med, v[len(v)-1]}
}

// debianVariant runs Debian's wireguard-go (foreground, its own
// /var/run/wireguard/<name>.sock) in both namespaces on a device of a
// unique name, configured through the same UAPI code, with pod addresses
// 10.96.N.1.
func debianVariant(b *testing.B, ctx context.Context, a, c *node) *throughputVariant {
	b.Helper()
	base := privtest.UniqueShortName("twgd")
	v := &throughputVariant{name: "debian-wireguard-go", dst: netip.AddrFrom4([4]byte{10, 96, 2, 1})}
	nodes := []*node{a, c}
	for i, n := range nodes {
		// One name per node: the UAPI socket /var/run/wireguard/<name>.sock
		// is in the mount namespace both processes share.
		name := base + strconv.Itoa(i)
		cmd := exec.Command(debianWireGuardGo, "-f", name)
		cmd.Env = append(os.Environ(), "LOG_LEVEL=error")
		must(b, "start "+debianWireGuardGo, privtest.StartInNetNSAndCgroup(b, cmd, n.ns, ""))
		v.pids = append(v.pids, cmd.Process.Pid)
		sock := filepath.Join("/var/run/wireguard", name+".sock")
		b.Cleanup(func() { os.Remove(sock) })
		deadline := time.Now().Add(10 * time.Second)
		for {
			if _, err := os.Stat(sock); err == nil {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("%s: no socket %s", debianWireGuardGo, sock)
			}
			time.Sleep(20 * time.Millisecond)
		}
		podIP := netip.AddrFrom4([4]byte{10, 96, byte(i + 1), 1})
		n.addAddr("lo", netip.PrefixFrom(podIP, 32))
		other := nodes[1-i]
		want, err := DeviceConfig{PrivateKey: n.key, ListenPort: DefaultPort + 1, Peers: []Peer{{
			PublicKey:  other.key.PublicKey(),
			Endpoint:   netip.AddrPortFrom(other.underlay, DefaultPort+1),
			AllowedIPs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 96, byte(2 - i), 0}), 24)},
		}}}.normalize(DefaultPort + 1)
		must(b, "config", err)
		set, _ := plan(state{}, want)
		u := uapiConn{sock}
		_, err = u.set(ctx, set)
		must(b, "configure "+debianWireGuardGo, err)
		l, err := n.h.LinkByName(name)
		must(b, "find "+name, err)
		must(b, "mtu", n.h.LinkSetMTU(l, DefaultMTU))
		must(b, "up", n.h.LinkSetUp(l))
		r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNetOf(netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 96, byte(2 - i), 0}), 24)),
			Src: podIP.AsSlice(), Scope: netlink.SCOPE_LINK}
		must(b, "route", n.h.RouteReplace(r))
	}
	return v
}
