//go:build linux

package bpf

import (
	"context"
	"flag"
	"fmt"
	"strconv"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"golang.org/x/sys/unix"
)

// BenchmarkMapUpdate measures backend updates per second through the
// reconciler: each Set moves every backend of the state to a new port (a
// new backend: write it, repoint its slot, delete the old one), on top of
// the full read-back of the maps that every Set does.
func BenchmarkMapUpdate(b *testing.B) {
	for _, c := range []struct {
		name             string
		services, perSvc int
		changedServices  int
	}{
		{"backends=10000/changed=10000", 100, 100, 100},
		{"backends=10000/changed=100", 100, 100, 1},
		{"backends=1000/changed=1000", 10, 100, 10},
	} {
		for _, mode := range []string{"set", "update"} {
			b.Run(c.name+"/"+mode, func(b *testing.B) {
				privtest.RequireRoot(b)
				lb := open(b, Config{})
				ctx := context.Background()
				a := manyServices(c.services, c.perSvc)
				alt := manyServices(c.services, c.perSvc)
				for i := range c.changedServices {
					for j := range alt[i].Backends {
						alt[i].Backends[j].Port++
					}
				}
				if err := lb.Set(ctx, a); err != nil {
					b.Fatal(err)
				}
				// Set reads the maps back every time (drift repair); Update
				// plans against what it last wrote, as the agent does between
				// full syncs.
				set := lb.Set
				if mode == "update" {
					set = lb.Update
				}
				start := lb.Stats()
				i := 0
				for b.Loop() {
					state := alt
					if i%2 == 1 {
						state = a
					}
					i++
					if err := set(ctx, state); err != nil {
						b.Fatal(err)
					}
				}
				changed := c.changedServices * c.perSvc
				b.ReportMetric(float64(changed*b.N)/b.Elapsed().Seconds(), "backends/s")
				end := lb.Stats()
				b.ReportMetric(float64(end.MapWrites-start.MapWrites)/float64(b.N), "writes/op")
				if lb.objs.Backends.noBatch.Load() {
					b.Log("kernel without batch map operations: one syscall per entry")
				}
			})
		}
	}
}

// The connect benchmarks time one TCP connect() from a client process in
// a test network namespace, in these variants, which one `-bench Connect`
// selects and `make bench` runs interleaved (rounds of -count 1):
//
//	ConnectDirectNoLB               to the backend's address, from a cgroup with
//	                                nothing attached: a plain connect()
//	ConnectDirectSockLB/services=N  to the backend's address, from the cgroup the
//	                                socket LB is attached to, N services
//	                                programmed: the LB's floor (connect4 runs and
//	                                finds no service)
//	ConnectVIPSockLB/services=N     to a service VIP, translated by the socket LB
//	ConnectVIPIPTables/services=N   to a service VIP, translated by kube-proxy-style
//	                                iptables DNAT rules
//	ConnectVIPvsDirectSockLB/services=N
//	                                the floor and the VIP in one client,
//	                                alternating connect by connect
//
// ns/op is the mean time inside connect() alone, as the client measures it
// (process start-up is not counted), and p50-ns/connect the median: on a
// busy machine a few connects that another process preempted move the
// mean, hardly the median. The socket LB variants also report
// connect4-ns/run: the connect4 program's own run time per invocation,
// from the kernel's BPF run-time statistics (BPF_ENABLE_STATS), which are
// on while those variants run unless -bpfstats=false is given after -args.

// bpfStats turns the kernel's BPF run-time statistics on during the socket
// LB benchmarks. They cost each program run two clock reads.
var bpfStats = flag.Bool("bpfstats", true, "collect BPF run-time statistics in the connect benchmarks")

// benchServiceCounts are the numbers of services the benchmarks program.
var benchServiceCounts = []int{10, 10000}

// benchServices returns n services on port 80 of the test VIPs, all backed
// by backend1, where a server listens.
func benchServices(n int) []Service {
	services := make([]Service, n)
	for i := range services {
		services[i] = Service{VIP: nthAddr(198, 19, i), Port: 80, Proto: TCP, Backends: []Backend{backend1}}
	}
	return services
}

// connectSetup programs a way of reaching services inside env. It returns
// the program that runs on connect() (nil when none does), for its
// statistics.
type connectSetup func(b *testing.B, env *lbEnv, services []Service) (connect4 *ebpf.Program)

func setupSockLB(b *testing.B, env *lbEnv, services []Service) *ebpf.Program {
	lb := open(b, Config{CgroupPath: env.cgroup})
	if err := lb.Set(context.Background(), services); err != nil {
		b.Fatal(err)
	}
	return lb.Objects().Connect4
}

// connectTarget is what the bench helper connects to: "vips=N" or an
// address, and a port.
type connectTarget struct{ addr, port string }

var (
	backendTarget = connectTarget{backend1.IP.String(), strconv.Itoa(int(backend1.Port))}
	vipsTarget    = func(n int) connectTarget { return connectTarget{fmt.Sprintf("vips=%d", n), "80"} }
)

// BenchmarkConnectDirectNoLB is plain connect(): the backend's address,
// from a test cgroup with no program attached.
func BenchmarkConnectDirectNoLB(b *testing.B) {
	env := newLBEnv(b)
	reportConnect(b, runConnectBench(b, env, nil, backendTarget))
}

// BenchmarkConnectDirectSockLB is the socket LB's floor: the backend's
// address (no service matches), from inside the cgroup the programs are
// attached to, with 10 and with 10,000 services programmed.
func BenchmarkConnectDirectSockLB(b *testing.B) {
	benchConnectServices(b, setupSockLB, func(int) connectTarget { return backendTarget })
}

// BenchmarkConnectVIPSockLB times connect() to a service VIP through the
// eBPF socket LB, with 10 and with 10,000 services programmed (the client
// cycles through all VIPs).
func BenchmarkConnectVIPSockLB(b *testing.B) {
	benchConnectServices(b, setupSockLB, vipsTarget)
}

// BenchmarkConnectVIPvsDirectSockLB measures the VIP and the floor in one
// client, alternating connect by connect (which of the two goes first
// alternates too), so both see the machine at the same moments: on a busy
// machine their ratio holds better than one of separate runs, which load
// changes between. It reports the median connect() time of each,
// vip-p50-ns/connect and direct-p50-ns/connect, and their ratio
// vip/direct-p50; ns/op is the mean time of the pair.
func BenchmarkConnectVIPvsDirectSockLB(b *testing.B) {
	for _, n := range benchServiceCounts {
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			env := newLBEnv(b)
			prog := setupSockLB(b, env, benchServices(n))
			r := runConnectBench(b, env, prog, vipsTarget(n), backendTarget)
			vip, direct := r.Bench[0], r.Bench[1]
			b.ReportMetric(float64(vip.TotalNS+direct.TotalNS)/float64(b.N), "ns/op")
			b.ReportMetric(float64(vip.P50NS), "vip-p50-ns/connect")
			b.ReportMetric(float64(direct.P50NS), "direct-p50-ns/connect")
			b.ReportMetric(float64(vip.P50NS)/float64(direct.P50NS), "vip/direct-p50")
		})
	}
}

func benchConnectServices(b *testing.B, setup connectSetup, target func(services int) connectTarget) {
	for _, n := range benchServiceCounts {
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			env := newLBEnv(b)
			prog := setup(b, env, benchServices(n))
			reportConnect(b, runConnectBench(b, env, prog, target(n)))
		})
	}
}

// connectRun is what runConnectBench measured.
type connectRun struct {
	*clientResult
	progNS float64 // connect4's mean run time, 0 without statistics
}

// reportConnect reports the mean and the median connect() time, and
// connect4's run time when there is one.
func reportConnect(b *testing.B, r connectRun) {
	b.ReportMetric(float64(r.Bench[0].TotalNS)/float64(b.N), "ns/op")
	b.ReportMetric(float64(r.Bench[0].P50NS), "p50-ns/connect")
	if r.progNS != 0 {
		b.ReportMetric(r.progNS, "connect4-ns/run")
	}
}

// runConnectBench runs b.N connects to each target in a client process in
// env's namespace and cgroup. With connect4 (the program attached to that
// cgroup) it also measures the program's mean run time, and fails unless
// it ran once per connect().
func runConnectBench(b *testing.B, env *lbEnv, connect4 *ebpf.Program, targets ...connectTarget) connectRun {
	b.Helper()
	var before *ebpf.ProgramStats
	if connect4 != nil && *bpfStats {
		stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
		if err != nil {
			b.Fatalf("enable BPF run-time stats: %v", err)
		}
		defer stats.Close()
		if before, err = connect4.Stats(); err != nil {
			b.Fatalf("connect4 stats: %v", err)
		}
	}
	args := []string{strconv.Itoa(b.N)}
	for _, t := range targets {
		args = append(args, t.port, t.addr)
	}
	r := env.clientIn(b, env.cgroup, "bench", args...)
	if r.OK != b.N || len(r.Bench) != len(targets) {
		b.Fatalf("%d of %d connects succeeded (%d of %d targets measured): %v", r.OK, b.N, len(r.Bench), len(targets), r.Errors)
	}
	run := connectRun{clientResult: r}
	if before == nil {
		return run
	}
	after, err := connect4.Stats()
	if err != nil {
		b.Fatalf("connect4 stats: %v", err)
	}
	runs := after.RunCount - before.RunCount
	if want := uint64(b.N * len(targets)); runs != want {
		b.Fatalf("connect4 ran %d times for %d connects", runs, want)
	}
	run.progNS = float64(after.Runtime-before.Runtime) / float64(runs)
	return run
}
