//go:build linux

package scalebench

// BenchmarkLargeServiceToBPF: one global service of N backends (100 000 by
// default, TRELLIS_BENCH_BACKENDS to change) registered in cluster us, and
// an agent of cluster eu that serves the service's VIP. Reported: the time
// from the last registration returning to the agent's eBPF service map
// holding all N (ms-to-bpf), the part of it until the agent's merged
// snapshot held them (ms-to-snapshot), and the agent's heap with the
// service programmed (heap-MB, everything the process holds, less what it
// held before the agent started).
//
// The writer side runs in a child process (this test binary re-executed):
// two embedded etcds, one per cluster, each written by the mesh API
// server's real Publisher with its SyncStores, which is what a source
// (the registry, the Kubernetes informers) hands every change to. "Registered"
// is the Publisher's UpsertService returning, the point at which the
// registry answers a client. The registrations come either as 100 whole
// services growing by N/100 backends each (as EndpointSlices arrive), or as
// one service of all N (a cold start). The agent is agent.Agent with the
// kernel datapath: clustermesh reading both etcds, the socket load
// balancer attached to a cgroup the benchmark creates, its maps pinned in
// a directory of its own; both are removed at cleanup, also on failure.
// Needs root.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/trellis-mesh/trellis/agent"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver"
	"github.com/trellis-mesh/trellis/bpf"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/kvstore"
)

func TestMain(m *testing.M) {
	privtest.Main(m, map[string]privtest.Helper{"writer": writer})
}

const (
	localName, remoteName = "eu", "us"
	localID, remoteID     = 1, 2
)

var (
	localCIDR  = netip.MustParsePrefix("10.1.0.0/16")
	remoteCIDR = netip.MustParsePrefix("10.2.0.0/15") // room for 131 072 backends
	vip        = netip.MustParseAddr("10.96.0.10")
	svcName    = clustermesh.ServiceName{Namespace: "default", Name: "big"}
)

func clusterConfig(name string, id v1.ClusterID, cidr netip.Prefix) v1.ClusterConfig {
	return v1.ClusterConfig{Name: name, ID: id, PodCIDRs: []netip.Prefix{cidr},
		Capabilities: v1.Capabilities{SyncedCanaries: true, MaxConnectedClusters: 255, BackendShards: true}}
}

// service is cluster's default/big with the first n backends: pods on
// 2000 nodes with cloud-style names over three zones (~110 bytes of JSON
// each).
func service(cluster string, n int) v1.Service {
	svc := v1.Service{Cluster: cluster, Namespace: "default", Name: "big", Global: true, Shared: true,
		Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}}}
	if cluster == localName {
		svc.FrontendIPs = []netip.Addr{vip}
	}
	base := binary.BigEndian.Uint32(remoteCIDR.Addr().AsSlice())
	svc.Backends = make([]v1.Backend, n)
	for i := range svc.Backends {
		var ip [4]byte
		binary.BigEndian.PutUint32(ip[:], base+uint32(i)+1)
		node := i % 2000
		svc.Backends[i] = v1.Backend{IP: netip.AddrFrom4(ip), State: v1.BackendActive,
			Node: fmt.Sprintf("ip-172-20-%d-%d.eu-west-1.compute.internal", node/256, node%256),
			Zone: "eu-west-1" + string(rune('a'+node%3))}
	}
	return svc
}

// writer is the child process: arguments N, registrations, a directory.
// It prints "ready <local etcd> <remote etcd>" once both clusters are
// published with the service's backends empty, registers the backends
// when it reads "go", prints "done <unix ns> <seconds registering>" when
// the last registration returns, and stops when its stdin closes.
func writer(args []string, stdin io.Reader, stdout io.Writer) int {
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "writer:", err); return 1 }
	n, err1 := strconv.Atoi(args[0])
	steps, err2 := strconv.Atoi(args[1])
	if err := errors.Join(err1, err2); err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var urls []string
	pubs := map[string]*apiserver.Publisher{}
	for _, c := range []v1.ClusterConfig{clusterConfig(localName, localID, localCIDR), clusterConfig(remoteName, remoteID, remoteCIDR)} {
		e, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{Dir: filepath.Join(args[2], c.Name)})
		if err != nil {
			return fail(err)
		}
		defer e.Close()
		client, err := kvstore.NewClient(kvstore.Config{Endpoints: e.Endpoints(), Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			return fail(err)
		}
		defer client.Close()
		data, err := v1.Encode(c)
		if err != nil {
			return fail(err)
		}
		if err := client.Put(ctx, v1.ClusterConfigKey(c.Name), data); err != nil {
			return fail(err)
		}
		p, err := apiserver.NewPublisher(client, c, false)
		if err != nil {
			return fail(err)
		}
		done := make(chan struct{})
		go func() { defer close(done); p.Run(ctx) }()
		defer func() { cancel(); <-done }()
		if err := p.UpsertService(service(c.Name, 0)); err != nil {
			return fail(err)
		}
		for _, k := range []v1.Kind{v1.KindNodes, v1.KindEndpoints, v1.KindServices, v1.KindIdentities} {
			p.Synced(k)
		}
		for !p.AllSynced() {
			time.Sleep(10 * time.Millisecond)
		}
		urls = append(urls, e.Endpoints()[0])
		pubs[c.Name] = p
	}
	fmt.Fprintf(stdout, "ready %s %s\n", urls[0], urls[1])
	in := bufio.NewReader(stdin)
	if line, err := in.ReadString('\n'); err != nil || line != "go\n" {
		return fail(fmt.Errorf("want go, read %q (%v)", line, err))
	}
	// The services to register are built first: building them is the
	// source's work, not the publication's.
	svcs := make([]v1.Service, steps)
	for k := range steps {
		svcs[k] = service(remoteName, n*(k+1)/steps)
	}
	start := time.Now()
	for _, svc := range svcs {
		if err := pubs[remoteName].UpsertService(svc); err != nil {
			return fail(err)
		}
	}
	fmt.Fprintf(stdout, "done %d %.3f\n", time.Now().UnixNano(), time.Since(start).Seconds())
	io.Copy(io.Discard, in)
	return 0
}

func BenchmarkLargeServiceToBPF(b *testing.B) {
	n := 100000
	if s := os.Getenv("TRELLIS_BENCH_BACKENDS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil {
			b.Fatal(err)
		}
	}
	for _, steps := range []int{100, 1} {
		b.Run(fmt.Sprintf("backends=%d/registrations=%d", n, steps), func(b *testing.B) {
			privtest.RequireRoot(b)
			var toBPF, toSnap, heap, register []float64
			for range b.N {
				r := runOnce(b, n, steps)
				toBPF, toSnap = append(toBPF, r.toBPF.Seconds()*1e3), append(toSnap, r.toSnapshot.Seconds()*1e3)
				heap, register = append(heap, float64(r.heap)/(1<<20)), append(register, r.register)
			}
			b.ReportMetric(median(toBPF), "ms-to-bpf")
			b.ReportMetric(median(toSnap), "ms-to-snapshot")
			b.ReportMetric(median(heap), "heap-MB")
			b.ReportMetric(median(register), "register-s")
		})
	}
}

type result struct {
	toBPF, toSnapshot time.Duration
	heap              uint64
	register          float64
}

func runOnce(b *testing.B, n, steps int) result {
	child := startWriter(b, n, steps)
	dir := b.TempDir()
	cfgDir := filepath.Join(dir, "clusters")
	for _, f := range []clustermesh.ClusterFile{
		{Name: localName, ID: localID, PodCIDRs: []netip.Prefix{localCIDR}, Endpoints: []string{child.urls[0]}},
		{Name: remoteName, ID: remoteID, PodCIDRs: []netip.Prefix{remoteCIDR}, Endpoints: []string{child.urls[1]}},
	} {
		if err := clustermesh.WriteClusterFile(cfgDir, f); err != nil {
			b.Fatal(err)
		}
	}
	cgroup := privtest.NewCgroup(b)
	if err := bpf.EnsureBPFFS(); err != nil {
		b.Fatal(err)
	}
	pinDir := filepath.Join(bpf.DefaultPinRoot, privtest.UniqueName("scalebench"))
	b.Cleanup(func() {
		if err := bpf.Uninstall(pinDir); err != nil {
			b.Errorf("uninstall %s: %v", pinDir, err)
		}
	})

	base := heapInUse()
	dp, err := agent.NewKernelDatapath(agent.DatapathConfig{LB: &bpf.Config{PinDir: pinDir, CgroupPath: cgroup}})
	if err != nil {
		privtest.SkipIfNotSupported(b, err)
		b.Fatal(err)
	}
	b.Cleanup(func() { dp.Close() })
	ag, err := agent.New(agent.Config{NodeName: "node-1", ClusterName: localName, ConfigDir: cfgDir,
		StateDir: filepath.Join(dir, "state"), StatusSocket: filepath.Join(dir, "agent.sock")}, dp)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); ag.Run(ctx) }()
	b.Cleanup(func() { cancel(); <-done })

	// The service is programmed, without backends, once the agent has
	// synced both clusters and applied.
	svcMap := waitPinned(b, filepath.Join(pinDir, "trellis_svc4"))
	defer svcMap.Close()
	waitFor(b, 2*time.Minute, "the service programmed", func() bool { _, ok := lookup(b, svcMap); return ok })

	child.send(b, "go\n")
	doneAt, registered := child.done(b)
	var snapAt, bpfAt time.Time
	deadline := time.Now().Add(10 * time.Minute)
	for bpfAt.IsZero() || snapAt.IsZero() {
		if time.Now().After(deadline) {
			v, _ := lookup(b, svcMap)
			b.Fatalf("after 10 minutes the service map holds %d backends of %d", v.Count, n)
		}
		now := time.Now()
		if v, ok := lookup(b, svcMap); bpfAt.IsZero() && ok && int(v.Count) == n {
			bpfAt = now
		}
		if s := ag.Mesh().Snapshot().Services[svcName]; snapAt.IsZero() && s != nil && s.Offered[remoteName] == n {
			snapAt = now
		}
		time.Sleep(time.Millisecond)
	}
	r := result{toBPF: bpfAt.Sub(doneAt), toSnapshot: snapAt.Sub(doneAt), register: registered}
	r.heap = heapInUse() - base
	checkSlots(b, pinDir, svcMap, n)
	b.Logf("%d backends in %d registrations (%.1f s): snapshot after %v, eBPF maps after %v; agent heap %.1f MB",
		n, steps, registered, r.toSnapshot.Round(time.Millisecond), r.toBPF.Round(time.Millisecond), float64(r.heap)/(1<<20))
	return r
}

// lbKey and lbService are the C structs of the service map (bpf/c/socklb.c).
type lbKey struct {
	VIP   [4]byte
	Port  [2]byte
	Proto uint8
	Pad   uint8
}

type lbService struct {
	ID     uint32
	Count  uint32
	Inline [4]struct {
		IP   [4]byte
		Port [2]byte
		Pad  uint16
	}
}

func lookup(b *testing.B, m *ebpf.Map) (lbService, bool) {
	key := lbKey{VIP: vip.As4(), Port: [2]byte{0, 80}, Proto: 6}
	var v lbService
	err := m.Lookup(&key, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return v, false
	}
	if err != nil {
		b.Fatal(err)
	}
	return v, true
}

// checkSlots counts the service's slots in the slots map: the count the
// service value says must all be there.
func checkSlots(b *testing.B, pinDir string, svcMap *ebpf.Map, n int) {
	v, _ := lookup(b, svcMap)
	slots, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, "trellis_slot4"), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer slots.Close()
	var key struct{ ServiceID, Slot uint32 }
	var backend uint32
	got := 0
	it := slots.Iterate()
	for it.Next(&key, &backend) {
		if key.ServiceID == v.ID {
			got++
		}
	}
	if err := it.Err(); err != nil {
		b.Fatal(err)
	}
	if got != n {
		b.Fatalf("service %d has %d slots, want %d", v.ID, got, n)
	}
}

func waitPinned(b *testing.B, path string) *ebpf.Map {
	var m *ebpf.Map
	waitFor(b, time.Minute, path+" pinned", func() bool {
		var err error
		m, err = ebpf.LoadPinnedMap(path, nil)
		return err == nil
	})
	return m
}

// waitFor polls cond; a benchmark's setup waits, nothing is timed here.
func waitFor(b *testing.B, timeout time.Duration, what string, cond func() bool) {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			b.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type writerProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
	urls  []string
}

func startWriter(b *testing.B, n, steps int) *writerProc {
	cmd := privtest.HelperCommand("writer", strconv.Itoa(n), strconv.Itoa(steps), b.TempDir())
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	w := &writerProc{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}
	b.Cleanup(func() {
		stdin.Close()
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	fields := w.line(b, "ready")
	w.urls = fields[1:]
	return w
}

func (w *writerProc) line(b *testing.B, want string) []string {
	line, err := w.out.ReadString('\n')
	fields := strings.Fields(line)
	if err != nil || len(fields) == 0 || fields[0] != want {
		b.Fatalf("writer: want %q, read %q (%v)", want, line, err)
	}
	return fields
}

func (w *writerProc) send(b *testing.B, s string) {
	if _, err := io.WriteString(w.stdin, s); err != nil {
		b.Fatal(err)
	}
}

// done waits for the writer's last registration and returns when it
// returned (the writer's clock, which is this machine's) and how long
// registering took.
func (w *writerProc) done(b *testing.B) (time.Time, float64) {
	f := w.line(b, "done")
	ns, err1 := strconv.ParseInt(f[1], 10, 64)
	secs, err2 := strconv.ParseFloat(f[2], 64)
	if err := errors.Join(err1, err2); err != nil {
		b.Fatal(err)
	}
	return time.Unix(0, ns), secs
}

func heapInUse() uint64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}
