//go:build linux

package scalebench

// BenchmarkWholePath: how long a registry write takes to reach a remote
// agent's eBPF maps, beside how long a raw etcd put takes to reach a
// watcher of the same etcd, at the same paced rate in the same run.
//
// Two real mesh API servers (`trellis apiserver`, registry source, each
// with its embedded etcd, child processes): cluster us, written to, and
// cluster eu, whose agent reads. They are joined as `trellis connect`
// joins them (clustermesh.ConnectMesh on their state dirs). us registers
// 1000 endpoints (app=web) on 4 nodes and the global selector service
// default/web; eu has default/web with the VIP. The agent is agent.Agent of
// eu in this process with the kernel datapath: the socket load balancer on
// a cgroup the benchmark makes, maps pinned in a directory of its own,
// both removed at cleanup.
//
// Whole path: endpoint updates PUT /v1/endpoints/{ip} with the admin token,
// each flipping one endpoint's ready state (endpoint i%1000 for update i,
// so one endpoint flips once a second at 1000/s), paced at the rate from
// the scheduled start of each. An update's latency runs from the start of
// its HTTP request until the first datapath Apply that returned after it
// holds the endpoint in the state written (active backends are in the
// service's BPF slots; unready ones are not). Apply returns once the maps
// are written. The same run measures the ack (the PUT answered).
//
// Raw: puts of a 200-byte value to trellis-bench/raw/<i%1000> in us's
// embedded etcd (root client, its internal listener), from the start of
// the put until a watcher of that prefix on another client connection
// receives the event.
//
// Variants alternate in each round (whole first in odd rounds, raw first
// in even ones) after a short warm-up of each; reported: the medians of
// the rounds' p50 and p99 and of the ratio whole/raw; the log has each
// round and the min–max. TRELLIS_BENCH_RATE (1000), TRELLIS_BENCH_SECONDS
// (5), TRELLIS_BENCH_ROUNDS (5) change the load. Run with -benchtime=1x.
// Needs root.
//
// TRELLIS_BENCH_BREAKDOWN=1 also times each update until us's etcd holds
// the service value with the endpoint in the state written ("published":
// a second watcher of that key, in this process, finds the backend's
// JSON in the value) and reports the Applies' durations. It adds a
// watcher of the 50 KB value, so leave it off when comparing.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/trellis-mesh/trellis/agent"
	"github.com/trellis-mesh/trellis/api/client"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/bpf"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/kvstore"
)

const (
	wpEndpoints = 1000 // endpoints of us's default/web, each flipped in turn
	wpNodes     = 4
	wpWorkers   = 32 // requests in flight at most, each worker its own connection
	rawPrefix   = "trellis-bench/raw/"
)

var wpService = clustermesh.ServiceName{Namespace: "default", Name: "web"}

func envInt(b *testing.B, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}

func BenchmarkWholePath(b *testing.B) {
	privtest.RequireRoot(b)
	rate := envInt(b, "TRELLIS_BENCH_RATE", 1000)
	secs := envInt(b, "TRELLIS_BENCH_SECONDS", 5)
	rounds := envInt(b, "TRELLIS_BENCH_ROUNDS", 5)
	w := setupWholePath(b)
	w.detail = os.Getenv("TRELLIS_BENCH_BREAKDOWN") == "1"
	var wholeP50, wholeP99, rawP50, rawP99, r50, r99, ackP50, ackP99, achieved []float64
	for range b.N {
		// Warm-up: connections, identities, caches; not counted.
		w.whole(b, rate, rate)
		w.raw(b, rate, rate)
		for r := 1; r <= rounds; r++ {
			var wh, rw phaseResult
			if r%2 == 1 {
				wh = w.whole(b, rate, rate*secs)
				rw = w.raw(b, rate, rate*secs)
			} else {
				rw = w.raw(b, rate, rate*secs)
				wh = w.whole(b, rate, rate*secs)
			}
			if w.detail {
				b.Logf("round %d: published p50 %.2f ms p99 %.2f ms (%d service writes); apply took p50 %.2f ms p99 %.2f ms",
					r, wh.pubP50, wh.pubP99, wh.pubWrites, wh.applyP50, wh.applyP99)
			}
			b.Logf("round %d: whole p50 %.2f ms p99 %.2f ms (ack p50 %.2f p99 %.2f; %.0f/s, %d applies; CPU ms/update server %.2f test %.2f) | raw p50 %.2f ms p99 %.2f ms (%.0f/s; CPU ms/update server %.2f test %.2f) | ratio p50 %.2fx p99 %.2fx",
				r, wh.p50, wh.p99, wh.ackP50, wh.ackP99, wh.rate, wh.applies, wh.serverCPU, wh.selfCPU, rw.p50, rw.p99, rw.rate, rw.serverCPU, rw.selfCPU, wh.p50/rw.p50, wh.p99/rw.p99)
			wholeP50, wholeP99 = append(wholeP50, wh.p50), append(wholeP99, wh.p99)
			rawP50, rawP99 = append(rawP50, rw.p50), append(rawP99, rw.p99)
			r50, r99 = append(r50, wh.p50/rw.p50), append(r99, wh.p99/rw.p99)
			ackP50, ackP99 = append(ackP50, wh.ackP50), append(ackP99, wh.ackP99)
			achieved = append(achieved, min(wh.rate, rw.rate))
		}
	}
	mm := func(v []float64) string {
		return fmt.Sprintf("%.2f (%.2f–%.2f)", median(v), slices.Min(v), slices.Max(v))
	}
	b.Logf("%d rounds of %d updates at %d/s (lowest achieved %.0f/s): median (min–max) over rounds", len(r50), rate*secs, rate, slices.Min(achieved))
	b.Logf("  whole path p50 %s ms, p99 %s ms; ack p50 %s ms, p99 %s ms", mm(wholeP50), mm(wholeP99), mm(ackP50), mm(ackP99))
	b.Logf("  raw etcd   p50 %s ms, p99 %s ms", mm(rawP50), mm(rawP99))
	b.Logf("  whole/raw  p50 %sx, p99 %sx", mm(r50), mm(r99))
	b.ReportMetric(median(wholeP50), "whole-p50-ms")
	b.ReportMetric(median(wholeP99), "whole-p99-ms")
	b.ReportMetric(median(rawP50), "raw-p50-ms")
	b.ReportMetric(median(rawP99), "raw-p99-ms")
	b.ReportMetric(median(r50), "ratio-p50")
	b.ReportMetric(median(r99), "ratio-p99")
}

// wholePath is the set-up mesh and what the rounds share.
type wholePath struct {
	apis    []*client.Client // one per worker: its own connection
	put     *clientv3.Client // raw puts
	watch   *clientv3.Client // raw watcher
	ips     []netip.Addr     // endpoint i
	nodeOf  []string
	index   map[netip.Addr]int
	dp      *timedDatapath
	seq     int // updates sent so far over all phases; update g writes endpoint g%wpEndpoints
	svcKey  string
	detail  bool // TRELLIS_BENCH_BREAKDOWN
	rawSeq  int
	payload string
	usPID   int // us's API server, for its CPU time
}

// timedDatapath is the kernel datapath noting, after each Apply that
// succeeded, when it returned and which of the endpoints were active in
// the service it programmed.
type timedDatapath struct {
	*agent.KernelDatapath
	index map[netip.Addr]int

	mu      sync.Mutex
	applied []appliedState
}

type appliedState struct {
	at     time.Time
	took   time.Duration
	active []bool
}

func (d *timedDatapath) Apply(ctx context.Context, snap *clustermesh.Snapshot) error {
	start := time.Now()
	err := d.KernelDatapath.Apply(ctx, snap)
	if err != nil {
		return err
	}
	now := time.Now()
	active := make([]bool, wpEndpoints)
	if s := snap.Services[wpService]; s != nil && len(s.FrontendIPs) > 0 {
		for _, be := range s.Backends {
			if i, ok := d.index[be.IP]; ok {
				active[i] = true
			}
		}
	}
	d.mu.Lock()
	d.applied = append(d.applied, appliedState{at: now, took: now.Sub(start), active: active})
	d.mu.Unlock()
	return nil
}

// since returns the applies that returned at or after t.
func (d *timedDatapath) since(t time.Time) []appliedState {
	d.mu.Lock()
	defer d.mu.Unlock()
	i, _ := slices.BinarySearchFunc(d.applied, t, func(a appliedState, t time.Time) int { return a.at.Compare(t) })
	return d.applied[i:]
}

// ready is endpoint i's state after update g (every endpoint starts ready,
// and the first pass over them makes them unready).
func ready(g int) bool { return (g/wpEndpoints)%2 == 1 }

func startAPIServer(b *testing.B, bin, name string, id int) string {
	dir := b.TempDir()
	testutil.Start(b, bin, "apiserver",
		"--cluster-name", name, "--cluster-id", strconv.Itoa(id), "--pod-cidrs", fmt.Sprintf("10.%d.0.0/16", id),
		"--state-dir", dir,
		"--etcd-listen", fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(b)),
		"--http-listen", fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(b)),
		"--log-level", "warn")
	testutil.WaitAPIServer(b, dir, 2*time.Minute)
	return dir
}

func setupWholePath(b *testing.B) *wholePath {
	bin := testutil.BuildTrellis(b)
	euDir := startAPIServer(b, bin, "eu", 1)
	usDir := startAPIServer(b, bin, "us", 2)
	ctx := context.Background()
	if err := clustermesh.ConnectMesh(ctx, []clustermesh.Peer{&clustermesh.StateDirPeer{Dir: euDir}, &clustermesh.StateDirPeer{Dir: usDir}}, clustermesh.ConnectOptions{}); err != nil {
		b.Fatal(err)
	}
	eu, err := client.FromStateDir(euDir, nil)
	if err != nil {
		b.Fatal(err)
	}
	w := &wholePath{index: map[netip.Addr]int{}, payload: strings.Repeat("x", 200), usPID: findServer(b, usDir)}
	for range wpWorkers {
		c, err := client.FromStateDir(usDir, nil)
		if err != nil {
			b.Fatal(err)
		}
		w.apis = append(w.apis, c)
	}
	us := w.apis[0]
	global := map[string]string{"trellis.io/global": "true"}
	ports := []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}}
	if err := eu.PutService(ctx, v1.ServiceRequest{Namespace: "default", Name: "web", Ports: ports,
		FrontendIPs: []netip.Addr{vip}, Selector: map[string]string{"app": "web"}, Annotations: global}); err != nil {
		b.Fatal(err)
	}
	for n := 1; n <= wpNodes; n++ {
		if err := us.PutNode(ctx, v1.NodeRequest{Name: fmt.Sprintf("node-%d", n), IPs: []netip.Addr{netip.AddrFrom4([4]byte{192, 168, 2, byte(n)})},
			PodCIDRs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 2, byte(n), 0}), 24)}}); err != nil {
			b.Fatal(err)
		}
	}
	for i := range wpEndpoints {
		n := i%wpNodes + 1
		w.ips = append(w.ips, netip.AddrFrom4([4]byte{10, 2, byte(n), byte(i/wpNodes + 1)}))
		w.nodeOf = append(w.nodeOf, fmt.Sprintf("node-%d", n))
		w.index[w.ips[i]] = i
		if err := us.PutEndpoint(ctx, w.endpoint(i, true)); err != nil {
			b.Fatal(err)
		}
	}
	if err := us.PutService(ctx, v1.ServiceRequest{Namespace: "default", Name: "web", Ports: ports,
		Selector: map[string]string{"app": "web"}, Annotations: global}); err != nil {
		b.Fatal(err)
	}

	w.put, w.watch = rootClient(b, usDir), rootClient(b, usDir)
	b.Cleanup(func() { w.put.Delete(context.Background(), rawPrefix, clientv3.WithPrefix()) })

	// The agent of eu, in this process.
	dir := b.TempDir()
	cgroup := privtest.NewCgroup(b)
	if err := bpf.EnsureBPFFS(); err != nil {
		b.Fatal(err)
	}
	pinDir := filepath.Join(bpf.DefaultPinRoot, privtest.UniqueName("wholepath"))
	b.Cleanup(func() {
		if err := bpf.Uninstall(pinDir); err != nil {
			b.Errorf("uninstall %s: %v", pinDir, err)
		}
	})
	kdp, err := agent.NewKernelDatapath(agent.DatapathConfig{LB: &bpf.Config{PinDir: pinDir, CgroupPath: cgroup}})
	if err != nil {
		privtest.SkipIfNotSupported(b, err)
		b.Fatal(err)
	}
	b.Cleanup(func() { kdp.Close() })
	w.dp = &timedDatapath{KernelDatapath: kdp, index: w.index}
	ag, err := agent.New(agent.Config{NodeName: "node-1", ClusterName: "eu", ConfigDir: clustermesh.ClustersDir(euDir),
		StateDir: filepath.Join(dir, "state"), StatusSocket: filepath.Join(dir, "agent.sock")}, w.dp)
	if err != nil {
		b.Fatal(err)
	}
	actx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); ag.Run(actx) }()
	b.Cleanup(func() { cancel(); <-done })

	// Programmed: the service map holds the VIP with all endpoints active.
	svcMap := waitPinned(b, filepath.Join(pinDir, "trellis_svc4"))
	defer svcMap.Close()
	waitFor(b, 2*time.Minute, "default/web programmed with its 1000 backends", func() bool {
		v, ok := lookup(b, svcMap)
		return ok && v.Count == wpEndpoints
	})
	return w
}

func (w *wholePath) endpoint(i int, ready bool) v1.EndpointRequest {
	return v1.EndpointRequest{IP: w.ips[i], Namespace: "default", Pod: fmt.Sprintf("web-%d", i), Node: w.nodeOf[i],
		Ready: &ready, Labels: map[string]string{"app": "web"}}
}

func rootClient(b *testing.B, stateDir string) *clientv3.Client {
	pki := filepath.Join(stateDir, "pki")
	tlsCfg, err := kvstore.LoadClientTLS(filepath.Join(pki, "ca.crt"), filepath.Join(pki, "clients", "root.crt"), filepath.Join(pki, "clients", "root.key"))
	if err != nil {
		b.Fatal(err)
	}
	addr, err := os.ReadFile(filepath.Join(stateDir, v1.StateEtcdAddrFile))
	if err != nil {
		b.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{strings.TrimSpace(string(addr))}, TLS: tlsCfg, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cli.Close() })
	return cli
}

type phaseResult struct {
	p50, p99, ackP50, ackP99 float64 // ms
	// With TRELLIS_BENCH_BREAKDOWN: until us's etcd held it, the service
	// value writes seen, the Applies' durations.
	pubP50, pubP99, applyP50, applyP99 float64
	pubWrites                          int
	rate                               float64 // updates started per second
	applies                            int
	// CPU ms per update: us's API server (with its embedded etcd), this
	// process (the agent, the clients and the watcher).
	serverCPU, selfCPU float64
}

// cpuMeter measures CPU time of a process and of this one.
type cpuMeter struct{ server, self time.Duration }

func (w *wholePath) cpuNow(b *testing.B) cpuMeter {
	return cpuMeter{server: procCPU(b, w.usPID), self: procCPU(b, os.Getpid())}
}

// perUpdate sets r's CPU figures from the time used since m.
func (m cpuMeter) perUpdate(b *testing.B, w *wholePath, r *phaseResult, n int) {
	now := w.cpuNow(b)
	r.serverCPU = (now.server - m.server).Seconds() * 1e3 / float64(n)
	r.selfCPU = (now.self - m.self).Seconds() * 1e3 / float64(n)
}

// procCPU is a process's user and system time (/proc/PID/stat, in clock
// ticks of 10 ms).
func procCPU(b *testing.B, pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// The fields after the command name, which is in parentheses.
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		b.Fatal(err)
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// findServer is the PID of the API server whose state dir is dir.
func findServer(b *testing.B, dir string) int {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		b.Fatal(err)
	}
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if strings.Contains(string(cmdline), "\x00--state-dir\x00"+dir+"\x00") {
			return pid
		}
	}
	b.Fatalf("no process has --state-dir %s", dir)
	return 0
}

// pace calls do(worker, k) for k in [0, n), update k due at start+k/rate,
// on wpWorkers workers, and returns when each began.
func pace(b *testing.B, rate, n int, do func(worker, k int) error) []time.Time {
	starts := make([]time.Time, n)
	jobs := make(chan int, n)
	errs := make(chan error, wpWorkers)
	var wg sync.WaitGroup
	for wk := range wpWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range jobs {
				starts[k] = time.Now()
				if err := do(wk, k); err != nil {
					errs <- err
					for range jobs {
					}
					return
				}
			}
		}()
	}
	begin := time.Now()
	period := time.Second / time.Duration(rate)
	for k := range n {
		if d := time.Until(begin.Add(time.Duration(k) * period)); d > 0 {
			time.Sleep(d)
		}
		jobs <- k
	}
	close(jobs)
	wg.Wait()
	close(errs)
	if err := errors.Join(func() (e []error) {
		for err := range errs {
			e = append(e, err)
		}
		return
	}()...); err != nil {
		b.Fatal(err)
	}
	return starts
}

func achievedRate(starts []time.Time) float64 {
	first, last := slices.MinFunc(starts, time.Time.Compare), slices.MaxFunc(starts, time.Time.Compare)
	return float64(len(starts)-1) / last.Sub(first).Seconds()
}

func percentiles(lat []time.Duration) (p50, p99 float64) {
	slices.Sort(lat)
	ms := func(d time.Duration) float64 { return d.Seconds() * 1e3 }
	return ms(lat[len(lat)*50/100]), ms(lat[len(lat)*99/100])
}

// whole sends n endpoint updates at rate through the registry API and
// measures each until the agent's datapath applied it.
func (w *wholePath) whole(b *testing.B, rate, n int) phaseResult {
	base := w.seq
	w.seq += n
	acks := make([]time.Time, n)
	ctx := context.Background()
	var pub *serviceWatch
	if w.detail {
		pub = w.watchService(b)
	}
	cpu := w.cpuNow(b)
	starts := pace(b, rate, n, func(wk, k int) error {
		g := base + k
		err := w.apis[wk].PutEndpoint(ctx, w.endpoint(g%wpEndpoints, ready(g)))
		acks[k] = time.Now()
		return err
	})
	// Every update is in some applied state once the last update of each
	// endpoint is.
	final := make([]bool, wpEndpoints)
	for i := range final {
		final[i] = true
	}
	for g := max(0, w.seq-wpEndpoints); g < w.seq; g++ {
		final[g%wpEndpoints] = ready(g)
	}
	first := slices.MinFunc(starts, time.Time.Compare)
	waitFor(b, 2*time.Minute, "the last updates applied", func() bool {
		a := w.dp.since(first)
		return len(a) > 0 && slices.Equal(a[len(a)-1].active, final)
	})
	applied := w.dp.since(first)
	lat, ack := make([]time.Duration, n), make([]time.Duration, n)
	for k := range n {
		g := base + k
		i, want := g%wpEndpoints, ready(g)
		found := false
		for _, a := range w.dp.since(starts[k]) {
			if a.active[i] == want {
				lat[k], found = a.at.Sub(starts[k]), true
				break
			}
		}
		if !found {
			b.Fatalf("update %d (endpoint %d ready=%v) never applied", g, i, want)
		}
		ack[k] = acks[k].Sub(starts[k])
	}
	r := phaseResult{rate: achievedRate(starts), applies: len(applied)}
	cpu.perUpdate(b, w, &r, n)
	if pub != nil {
		events := pub.stop(b, w.put)
		r.pubWrites = len(events)
		publ := make([]time.Duration, n)
		for k := range n {
			g := base + k
			needle := backendNeedle(w.ips[g%wpEndpoints], ready(g))
			i, _ := slices.BinarySearchFunc(events, starts[k], func(e svcEvent, t time.Time) int { return e.at.Compare(t) })
			publ[k] = -1
			for _, e := range events[i:] {
				if bytes.Contains(e.value, needle) {
					publ[k] = e.at.Sub(starts[k])
					break
				}
			}
			if publ[k] < 0 {
				b.Fatalf("update %d: never seen in the service value", g)
			}
		}
		r.pubP50, r.pubP99 = percentiles(publ)
		took := make([]time.Duration, 0, len(applied))
		for _, a := range applied {
			took = append(took, a.took)
		}
		r.applyP50, r.applyP99 = percentiles(took)
	}
	r.p50, r.p99 = percentiles(lat)
	r.ackP50, r.ackP99 = percentiles(ack)
	return r
}

// raw puts n values at rate into us's etcd and measures each until the
// watcher received it.
func (w *wholePath) raw(b *testing.B, rate, n int) phaseResult {
	base := w.rawSeq
	w.rawSeq += n
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	recv := make([]time.Time, n)
	got := make(chan struct{})
	wch := w.watch.Watch(ctx, rawPrefix, clientv3.WithPrefix(), clientv3.WithCreatedNotify())
	if resp := <-wch; resp.Err() != nil {
		b.Fatal(resp.Err())
	}
	go func() {
		defer close(got)
		left := n
		for resp := range wch {
			now := time.Now()
			for _, ev := range resp.Events {
				seq, _, _ := strings.Cut(string(ev.Kv.Value), " ")
				g, err := strconv.Atoi(seq)
				if k := g - base; err == nil && k >= 0 && k < n && recv[k].IsZero() {
					recv[k] = now
					left--
				}
			}
			if left == 0 {
				return
			}
		}
	}()
	cpu := w.cpuNow(b)
	starts := pace(b, rate, n, func(_, k int) error {
		g := base + k
		_, err := w.put.Put(ctx, fmt.Sprintf("%s%04d", rawPrefix, g%wpEndpoints), fmt.Sprintf("%d %s", g, w.payload))
		return err
	})
	select {
	case <-got:
	case <-time.After(2 * time.Minute):
		b.Fatal("the watcher did not receive every put within 2 minutes")
	}
	lat := make([]time.Duration, n)
	for k := range n {
		lat[k] = recv[k].Sub(starts[k])
	}
	r := phaseResult{rate: achievedRate(starts)}
	cpu.perUpdate(b, w, &r, n)
	r.p50, r.p99 = percentiles(lat)
	return r
}

// serviceWatch records every value of us's default/web service key.
type serviceWatch struct {
	key    string
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	events  []svcEvent
	lastRev int64
}

type svcEvent struct {
	at    time.Time
	value []byte
}

func (w *wholePath) watchService(b *testing.B) *serviceWatch {
	ctx, cancel := context.WithCancel(context.Background())
	sw := &serviceWatch{key: v1.ServiceKey("us", wpService.Namespace, wpService.Name), cancel: cancel, done: make(chan struct{})}
	wch := w.watch.Watch(ctx, sw.key, clientv3.WithCreatedNotify())
	if resp := <-wch; resp.Err() != nil {
		b.Fatal(resp.Err())
	}
	go func() {
		defer close(sw.done)
		for resp := range wch {
			now := time.Now()
			sw.mu.Lock()
			for _, ev := range resp.Events {
				sw.events = append(sw.events, svcEvent{at: now, value: ev.Kv.Value})
				sw.lastRev = ev.Kv.ModRevision
			}
			sw.mu.Unlock()
		}
	}()
	return sw
}

// stop ends the watch once it has seen the value etcd holds now (the
// agent's watch may have delivered it first), and returns the events.
func (sw *serviceWatch) stop(b *testing.B, cli *clientv3.Client) []svcEvent {
	resp, err := cli.Get(context.Background(), sw.key)
	if err != nil || len(resp.Kvs) == 0 {
		b.Fatalf("get %s: %v (%d keys)", sw.key, err, len(resp.Kvs))
	}
	waitFor(b, time.Minute, "the breakdown watcher at the service's last value", func() bool {
		sw.mu.Lock()
		defer sw.mu.Unlock()
		return sw.lastRev >= resp.Kvs[0].ModRevision
	})
	sw.cancel()
	<-sw.done
	return sw.events
}

// backendNeedle is the JSON the service value holds for endpoint ip in
// the state written (the Publisher encodes ip, then state).
func backendNeedle(ip netip.Addr, ready bool) []byte {
	state := v1.BackendActive
	if !ready {
		state = v1.BackendUnready
	}
	return []byte(fmt.Sprintf(`"ip":%q,"state":%q`, ip.String(), state))
}
