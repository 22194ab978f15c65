package lab

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/trellis-mesh/trellis/agent"
	"github.com/trellis-mesh/trellis/encryption/wireguard"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/tunnel"
)

var (
	tputRounds   = flag.Int("lab.rounds", 5, "BenchmarkLabCrossClusterThroughput: rounds; each runs every variant once, in a shuffled order")
	tputDuration = flag.Duration("lab.duration", 5*time.Second, "BenchmarkLabCrossClusterThroughput: how long each transfer sends")
)

// The pods of the transfer: eu/client on eu/n1 sends to us/echo-n1 on
// us/n1, so the path crosses the underlay between clusters.
const (
	tputSender   = "eu/client"
	tputReceiver = "us/echo-n1"
	tputPort     = 5201
)

// tputHelperEnv makes the test binary, started inside a pod, the sender or
// receiver of a transfer (TestLabThroughputHelper) instead of running tests.
const tputHelperEnv = "TRELLIS_LAB_TPUT_HELPER"

// tputVariant is one way the two clusters' nodes carry pod traffic.
type tputVariant struct {
	name       string
	encryption bool   // WireGuard on in both clusters
	device     string // the node device the transfer must leave through
}

type tputSample struct {
	gbps      float64
	bytes     int64
	procCPU   time.Duration // sender + receiver + both nodes' WireGuard device processes
	devCPU    time.Duration // of which the device processes
	hostCPU   time.Duration // the whole machine's busy time (/proc/stat), everyone's
	ctxt      uint64        // the whole machine's context switches (/proc/stat)
	devTxByte uint64        // what the sender's node sent on the variant's device
}

func (s tputSample) cpuPerGB() float64  { return s.procCPU.Seconds() / (float64(s.bytes) / 1e9) }
func (s tputSample) hostPerGB() float64 { return s.hostCPU.Seconds() / (float64(s.bytes) / 1e9) }
func (s tputSample) devPerGB() float64  { return s.devCPU.Seconds() / (float64(s.bytes) / 1e9) }
func (s tputSample) ctxtPerGB() float64 { return float64(s.ctxt) / 1e3 / (float64(s.bytes) / 1e9) }

// BenchmarkLabCrossClusterThroughput moves TCP from a pod in eu to a pod
// in us on a real lab (the default topology, agents with the datapath):
// (a) vxlan, encryption off, pod traffic in the agents' VXLAN tunnel; (b)
// wireguard, `trellis encryption enable` in both clusters, pod traffic
// through each node's trellis_wg (the in-agent wireguard-go device
// process). Every round runs each variant once in a shuffled order;
// switching encryption (and waiting until both nodes' agents report the
// peer's path) is outside the timing. The sender and receiver are this
// test binary, started in the pods' namespaces and cgroups. CPU counts the
// sender and receiver (their rusage) and both nodes' device processes
// (/proc/<pid>/stat), per GB moved; the machine's busy time per GB is
// printed beside it (it counts softirq work charged to no process, and
// the neighbours), and so are the machine's context switches per GB. The
// table goes to stdout; per-round lines are logged (all of them with
// -test.v). Debian's wireguard-go cannot stand in for the agent's device:
// BenchmarkThroughput in encryption/wireguard compares it node to node.
//
//	go test -c -o /tmp/lab.test ./lab
//	(cd lab && /tmp/lab.test -test.run '^$' -test.bench CrossClusterThroughput -test.benchtime 1x -test.v -lab.rounds 7)
func BenchmarkLabCrossClusterThroughput(b *testing.B) {
	privtest.RequireRoot(b)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	opts := Options{Name: privtest.UniqueShortName("tput"), Binary: testutil.BuildTrellis(b)}
	// Registered before Up, so that a failed run tears down too.
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := Down(ctx, opts); err != nil {
			b.Errorf("lab down: %v", err)
		}
	})
	start := time.Now()
	if _, err := Up(ctx, UpOptions{Options: opts}); err != nil {
		b.Fatalf("lab up: %v", err)
	}
	b.Logf("lab %s up in %s", opts.Name, time.Since(start).Round(time.Millisecond))
	l, err := open(opts, false)
	if err != nil {
		b.Fatal(err)
	}
	defer l.close()
	src, err := l.lay.pod(tputSender)
	if err != nil {
		b.Fatal(err)
	}
	dst, err := l.lay.pod(tputReceiver)
	if err != nil {
		b.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}

	variants := []*tputVariant{
		{name: "vxlan", device: tunnel.DefaultVXLANDevice},
		{name: "wireguard", encryption: true, device: wireguard.DefaultDevice},
	}
	load, _ := os.ReadFile("/proc/loadavg")
	b.Logf("load average before: %s", strings.TrimSpace(string(load)))
	samples := map[string][]tputSample{}
	var ratios []float64
	encrypted := false
	for round := 1; round <= *tputRounds; round++ {
		order := slices.Clone(variants)
		rand.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
		got := map[string]tputSample{}
		for _, v := range order {
			if v.encryption != encrypted {
				t0 := time.Now()
				if err := setLabEncryption(ctx, l, v.encryption, src.node, dst.node); err != nil {
					b.Fatal(err)
				}
				encrypted = v.encryption
				b.Logf("round %d: encryption %s in %s", round, onOff(v.encryption), time.Since(t0).Round(time.Millisecond))
			}
			s, err := measureLabThroughput(ctx, exe, src, dst, v)
			if err != nil {
				b.Fatalf("round %d, %s: %v", round, v.name, err)
			}
			got[v.name] = s
			samples[v.name] = append(samples[v.name], s)
			b.Logf("round %d %-10s %6.2f Gbit/s  %5.2f CPU s/GB (devices %.2fs, sender+receiver %.2fs)  machine %5.2f s/GB, %.0fk switches/GB",
				round, v.name, s.gbps, s.cpuPerGB(), s.devCPU.Seconds(), (s.procCPU - s.devCPU).Seconds(), s.hostPerGB(), s.ctxtPerGB())
		}
		ratios = append(ratios, got["wireguard"].gbps/got["vxlan"].gbps)
	}
	load, _ = os.ReadFile("/proc/loadavg")
	b.Logf("load average after: %s", strings.TrimSpace(string(load)))

	// The table goes to stdout: the testing package keeps only the first
	// lines of a benchmark's log unless -test.v is given.
	gbps := func(s tputSample) float64 { return s.gbps }
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "\npod-to-pod eu/client → us/echo-n1, %s per transfer, median (min–max) of %d rounds\n", *tputDuration, len(ratios))
	fmt.Fprintf(tw, "variant\tGbit/s\tCPU s/GB: sender, receiver, devices\tof which devices\tmachine busy s/GB\tmachine switches/GB (k)\n")
	for _, v := range variants {
		ss := samples[v.name]
		g := median3(ss, gbps)
		cpu := median3(ss, tputSample.cpuPerGB)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", v.name, fmtMed(g), fmtMed(cpu),
			fmtMed(median3(ss, tputSample.devPerGB)), fmtMed(median3(ss, tputSample.hostPerGB)), fmtMed0(median3(ss, tputSample.ctxtPerGB)))
		b.ReportMetric(g[1], v.name+"-Gbit/s")
		b.ReportMetric(cpu[1], v.name+"-CPUs/GB")
	}
	r := medianOf(ratios)
	fmt.Fprintf(tw, "wireguard ÷ vxlan\t%s within a round; %.3f of the medians\n", fmtRatio(r),
		median3(samples["wireguard"], gbps)[1]/median3(samples["vxlan"], gbps)[1])
	tw.Flush()
	b.ReportMetric(r[1], "wireguard/vxlan")
	b.ReportMetric(0, "ns/op")
	// Down (at cleanup) stops the device processes with the rest of the
	// lab, whichever way encryption was left.
}

func onOff(on bool) string {
	if on {
		return "on"
	}
	return "off"
}

// setLabEncryption turns WireGuard on or off in every cluster of the lab
// (`trellis encryption enable|disable` inside the cluster's API server
// namespace) and waits until each of nodes reports every other of nodes
// on the matching path: encrypted, or back in the tunnel with the device
// drained and gone.
func setLabEncryption(ctx context.Context, l *lab, on bool, nodes ...*nodeLayout) error {
	verb := "disable"
	if on {
		verb = "enable"
	}
	for _, c := range l.lay.clusters {
		if _, err := l.runTrellisIn(ctx, c, []string{l.opts.Binary, "encryption", verb, "--state-dir", c.stateDir}); err != nil {
			return err
		}
	}
	want := tunnel.PathTunnel.String()
	if on {
		want = tunnel.PathEncrypted.String()
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var notYet []string
		for _, n := range nodes {
			if why := encryptionNotSettled(ctx, n, on, want, nodes); why != "" {
				notYet = append(notYet, n.ref()+": "+why)
			}
		}
		if len(notYet) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("encryption %s: not settled after 2m: %s", verb, strings.Join(notYet, "; "))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// encryptionNotSettled says why n does not yet show encryption on (off)
// with path want to every other of nodes, or "" when it does.
func encryptionNotSettled(ctx context.Context, n *nodeLayout, on bool, want string, nodes []*nodeLayout) string {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	st, err := agent.FetchStatus(ctx, n.socket)
	if err != nil {
		return err.Error()
	}
	e := st.Encryption
	switch {
	case e == nil:
		return "no encryption status"
	case e.Error != "":
		return "error " + e.Error
	case on && e.Type != "wireguard":
		return fmt.Sprintf("type %q", e.Type)
	case !on && (e.Type != "" || e.Draining):
		return fmt.Sprintf("type %q, draining %v", e.Type, e.Draining)
	}
	for _, peer := range nodes {
		if peer == n {
			continue
		}
		i := slices.IndexFunc(e.Peers, func(p agent.PeerEncryption) bool { return p.Node == peer.ref() })
		if i < 0 {
			return "no peer " + peer.ref()
		}
		if e.Peers[i].Path != want {
			return fmt.Sprintf("peer %s on path %s", peer.ref(), e.Peers[i].Path)
		}
	}
	return ""
}

// measureLabThroughput runs one transfer from pod src to pod dst.
func measureLabThroughput(ctx context.Context, exe string, src, dst *podLayout, v *tputVariant) (tputSample, error) {
	var s tputSample
	var devPIDs []int
	if v.encryption {
		for _, n := range []*nodeLayout{src.node, dst.node} {
			pid, err := wireguard.DevicePID(ctx, filepath.Join(n.stateDir, "wireguard.sock"))
			if err != nil {
				return s, fmt.Errorf("device process of %s: %w", n.ref(), err)
			}
			devPIDs = append(devPIDs, pid)
		}
	}
	addr := net.JoinHostPort(dst.ip.String(), strconv.Itoa(tputPort))
	sink, err := startTputHelper(exe, dst, "sink", addr)
	if err != nil {
		return s, err
	}
	defer killHelper(sink.cmd)
	if line, err := sink.out.ReadString('\n'); err != nil || line != "ready\n" {
		return s, fmt.Errorf("receiver in %s: %q %v", dst.ref(), line, err)
	}
	tx0, err := linkTxBytes(src.node.ns, v.device)
	if err != nil {
		return s, err
	}
	dev0, err := pidsCPU(devPIDs)
	if err != nil {
		return s, err
	}
	host0, ctxt0, err := hostStat()
	if err != nil {
		return s, err
	}
	source, err := startTputHelper(exe, src, "source", addr, tputDuration.String())
	if err != nil {
		return s, err
	}
	defer killHelper(source.cmd)
	var res tputResult
	if err := json.NewDecoder(sink.out).Decode(&res); err != nil {
		return s, fmt.Errorf("receiver's result: %w (stderr: %s)", err, sink.stderr.String())
	}
	if err := source.cmd.Wait(); err != nil {
		return s, fmt.Errorf("sender in %s: %w: %s", src.ref(), err, source.stderr.String())
	}
	if err := sink.cmd.Wait(); err != nil {
		return s, fmt.Errorf("receiver in %s: %w: %s", dst.ref(), err, sink.stderr.String())
	}
	host1, ctxt1, err := hostStat()
	if err != nil {
		return s, err
	}
	dev1, err := pidsCPU(devPIDs)
	if err != nil {
		return s, err
	}
	tx1, err := linkTxBytes(src.node.ns, v.device)
	if err != nil {
		return s, err
	}
	if res.Bytes == 0 || res.Seconds <= 0 {
		return s, fmt.Errorf("receiver got %d bytes in %.3fs", res.Bytes, res.Seconds)
	}
	s = tputSample{
		gbps:      float64(res.Bytes) * 8 / 1e9 / res.Seconds,
		bytes:     res.Bytes,
		devCPU:    dev1 - dev0,
		hostCPU:   host1 - host0,
		ctxt:      ctxt1 - ctxt0,
		devTxByte: tx1 - tx0,
	}
	s.procCPU = s.devCPU + rusageCPU(source.cmd.ProcessState) + rusageCPU(sink.cmd.ProcessState)
	// The transfer must have left the sender's node through the variant's
	// device, or the figure is of another path.
	if s.devTxByte < uint64(res.Bytes) {
		return s, fmt.Errorf("%s of %s sent %d bytes during a transfer of %d: the traffic took another path",
			v.device, src.node.ref(), s.devTxByte, res.Bytes)
	}
	return s, nil
}

// tputHelper is a sender or receiver running in a pod.
type tputHelper struct {
	cmd    *exec.Cmd
	out    *bufio.Reader
	stderr *strings.Builder
}

// startTputHelper starts this test binary as TestLabThroughputHelper in
// pod p's namespace and cgroup, as `lab exec` would.
func startTputHelper(exe string, p *podLayout, args ...string) (*tputHelper, error) {
	argv := append([]string{exe, "-test.run=^TestLabThroughputHelper$", "--"}, args...)
	cmd, cleanup, err := procSpec{ns: p.ns, cgroup: p.cgroup, argv: argv}.command()
	if err != nil {
		return nil, err
	}
	defer cleanup()
	cmd.Env = append(cmd.Env, tputHelperEnv+"=1")
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	cmd.WaitDelay = 5 * time.Second
	h := &tputHelper{cmd: cmd, stderr: &strings.Builder{}}
	cmd.Stderr = h.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	h.out = bufio.NewReader(out)
	if err := inNetNS(p.ns, cmd.Start); err != nil {
		return nil, fmt.Errorf("start the %s in %s: %w", args[0], p.ref(), err)
	}
	return h, nil
}

// killHelper kills a helper that was not waited for (by its PID) and
// reaps it.
func killHelper(cmd *exec.Cmd) {
	if cmd.ProcessState == nil {
		cmd.Process.Kill()
		cmd.Wait()
	}
}

// tputResult is what the helpers print.
type tputResult struct {
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
}

// TestLabThroughputHelper is the sender and receiver of
// BenchmarkLabCrossClusterThroughput: with TRELLIS_LAB_TPUT_HELPER set,
// the arguments after "--" are "sink ADDR" (listen, print "ready", read
// one connection to EOF, print a tputResult) or "source ADDR DURATION"
// (connect, write for DURATION, close). Without it, it does nothing.
func TestLabThroughputHelper(t *testing.T) {
	if os.Getenv(tputHelperEnv) == "" {
		return
	}
	args := os.Args
	if i := slices.Index(args, "--"); i >= 0 {
		args = args[i+1:]
	}
	var err error
	switch {
	case len(args) == 2 && args[0] == "sink":
		err = tputSink(args[1], os.Stdout)
	case len(args) == 3 && args[0] == "source":
		var d time.Duration
		if d, err = time.ParseDuration(args[2]); err == nil {
			err = tputSource(args[1], d)
		}
	default:
		err = fmt.Errorf("want sink ADDR or source ADDR DURATION, got %q", args)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

func tputSink(addr string, stdout io.Writer) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, "ready")
	c, err := ln.Accept()
	ln.Close()
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	var n int64
	var start time.Time
	for {
		k, err := c.Read(buf)
		if k > 0 && n == 0 {
			start = time.Now()
		}
		n += int64(k)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
	}
	return json.NewEncoder(stdout).Encode(tputResult{Bytes: n, Seconds: time.Since(start).Seconds()})
}

func tputSource(addr string, d time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	start := time.Now()
	for time.Since(start) < d {
		if _, err := c.Write(buf); err != nil {
			return err
		}
	}
	c.(*net.TCPConn).CloseWrite()
	_, err = io.Copy(io.Discard, c)
	return err
}

// linkTxBytes is the bytes device dev of namespace ns has sent.
func linkTxBytes(ns, dev string) (uint64, error) {
	h, err := netns.GetFromPath(nsPath(ns))
	if err != nil {
		return 0, fmt.Errorf("open netns %s: %w", ns, err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		return 0, fmt.Errorf("netlink in %s: %w", ns, err)
	}
	defer nh.Close()
	link, err := nh.LinkByName(dev)
	if err != nil {
		return 0, fmt.Errorf("find %s in %s: %w", dev, ns, err)
	}
	if link.Attrs().Statistics == nil {
		return 0, fmt.Errorf("%s in %s: no statistics", dev, ns)
	}
	return link.Attrs().Statistics.TxBytes, nil
}

// clkTck is USER_HZ, the unit of /proc's CPU times on Linux.
const clkTck = 100

// pidsCPU sums the user and system CPU time of pids (/proc/<pid>/stat).
func pidsCPU(pids []int) (time.Duration, error) {
	var sum time.Duration
	for _, pid := range pids {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return 0, err
		}
		// The command name may hold spaces; fields start after its ')'.
		i := strings.LastIndexByte(string(data), ')')
		if i < 0 {
			return 0, fmt.Errorf("/proc/%d/stat: no ')'", pid)
		}
		f := strings.Fields(string(data[i+1:]))
		// f[0] is field 3 (state); utime and stime are fields 14 and 15.
		if len(f) < 13 {
			return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
		}
		ut, err1 := strconv.ParseInt(f[11], 10, 64)
		st, err2 := strconv.ParseInt(f[12], 10, 64)
		if err1 != nil || err2 != nil {
			return 0, fmt.Errorf("/proc/%d/stat: bad utime/stime", pid)
		}
		sum += time.Duration(ut+st) * time.Second / clkTck
	}
	return sum, nil
}

// hostStat is the machine's busy CPU time so far (user, nice, system,
// irq and softirq of /proc/stat's cpu line; not idle, iowait or steal)
// and its context switches so far (the ctxt line).
func hostStat() (busy time.Duration, ctxt uint64, err error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	lines := strings.Split(string(data), "\n")
	f := strings.Fields(lines[0])
	if len(f) < 8 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("/proc/stat: first line %q", lines[0])
	}
	var sum int64
	for _, i := range []int{1, 2, 3, 6, 7} {
		v, err := strconv.ParseInt(f[i], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/stat: %w", err)
		}
		sum += v
	}
	i := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, "ctxt ") })
	if i < 0 {
		return 0, 0, errors.New("/proc/stat: no ctxt line")
	}
	if ctxt, err = strconv.ParseUint(strings.TrimPrefix(lines[i], "ctxt "), 10, 64); err != nil {
		return 0, 0, fmt.Errorf("/proc/stat: %w", err)
	}
	return time.Duration(sum) * time.Second / clkTck, ctxt, nil
}

func rusageCPU(ps *os.ProcessState) time.Duration {
	ru, ok := ps.SysUsage().(*syscall.Rusage)
	if !ok {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// median3 returns min, median and max of f over ss.
func median3(ss []tputSample, f func(tputSample) float64) [3]float64 {
	v := make([]float64, len(ss))
	for i, s := range ss {
		v[i] = f(s)
	}
	return medianOf(v)
}

// medianOf returns min, median and max of v.
func medianOf(v []float64) [3]float64 {
	if len(v) == 0 {
		return [3]float64{}
	}
	v = slices.Clone(v)
	slices.Sort(v)
	med := v[len(v)/2]
	if len(v)%2 == 0 {
		med = (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	return [3]float64{v[0], med, v[len(v)-1]}
}

// fmtMed formats min, median, max as "median (min–max)".
func fmtMed(m [3]float64) string {
	return fmt.Sprintf("%.2f (%.2f–%.2f)", m[1], m[0], m[2])
}

// fmtMed0 is fmtMed without decimals.
func fmtMed0(m [3]float64) string {
	return fmt.Sprintf("%.0f (%.0f–%.0f)", m[1], m[0], m[2])
}

// fmtRatio is fmtMed with three decimals.
func fmtRatio(m [3]float64) string {
	return fmt.Sprintf("%.3f (%.3f–%.3f)", m[1], m[0], m[2])
}
