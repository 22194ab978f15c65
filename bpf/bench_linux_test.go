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
// a test network namespace, in four variants that one `-bench Connect`
// selects and that `make bench` runs interleaved (rounds of -count 1):
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
//
// ns/op is the time inside connect() alone, as the client measures it
// (process start-up is not counted). The socket LB variants also report
// connect4-ns/run: the connect4 program's own run time per invocation,
// from the kernel's BPF run-time statistics (BPF_ENABLE_STATS), which are
// on while those variants run unless -bpfstats=false is given after -args.

// bpfStats turns the kernel's BPF run-time statistics on during the socket
// LB benchmarks. They cost each program run two clock reads.
var bpfStats = flag.Bool("bpfstats", true, "collect BPF run-time statistics in the connect benchmarks")

// connectSetup programs a way of reaching services (all backed by
// backend1, where a server listens) inside env. It returns the program
// that runs on connect() (nil when none does), for its statistics.
type connectSetup func(b *testing.B, env *lbEnv, services []Service) (connect4 *ebpf.Program)

func setupSockLB(b *testing.B, env *lbEnv, services []Service) *ebpf.Program {
	lb := open(b, Config{CgroupPath: env.cgroup})
	if err := lb.Set(context.Background(), services); err != nil {
		b.Fatal(err)
	}
	return lb.Objects().Connect4
}

// BenchmarkConnectDirectNoLB is plain connect(): the backend's address,
// from a test cgroup with no program attached.
func BenchmarkConnectDirectNoLB(b *testing.B) {
	env := newLBEnv(b)
	runConnectBench(b, env, backendTarget, nil)
}

// BenchmarkConnectDirectSockLB is the socket LB's floor: the backend's
// address (no service matches), from inside the cgroup the programs are
// attached to, with 10 and with 10,000 services programmed.
func BenchmarkConnectDirectSockLB(b *testing.B) {
	benchConnectServices(b, setupSockLB, false)
}

// BenchmarkConnectVIPSockLB times connect() to a service VIP through the
// eBPF socket LB, with 10 and with 10,000 services programmed (the client
// cycles through all VIPs).
func BenchmarkConnectVIPSockLB(b *testing.B) {
	benchConnectServices(b, setupSockLB, true)
}

// backendTarget is the helper's target for backend1's own address.
var backendTarget = backend1.IP.String()

func benchConnectServices(b *testing.B, setup connectSetup, toVIPs bool) {
	for _, n := range []int{10, 10000} {
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			env := newLBEnv(b)
			services := make([]Service, n)
			for i := range services {
				services[i] = Service{VIP: nthAddr(198, 19, i), Port: 80, Proto: TCP, Backends: []Backend{backend1}}
			}
			prog := setup(b, env, services)
			target := backendTarget
			if toVIPs {
				target = fmt.Sprintf("vips=%d", n)
			}
			runConnectBench(b, env, target, prog)
		})
	}
}

// runConnectBench runs b.N connects in a client process in env's namespace
// and cgroup, and reports the mean connect() time as ns/op. With connect4
// (the program attached to that cgroup) it also reports the program's mean
// run time, and fails unless it ran once per connect().
func runConnectBench(b *testing.B, env *lbEnv, target string, connect4 *ebpf.Program) {
	b.Helper()
	port := "80"
	if target == backendTarget {
		port = strconv.Itoa(int(backend1.Port))
	}
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
	r := env.clientIn(b, env.cgroup, "bench", strconv.Itoa(b.N), port, target)
	if r.OK != b.N {
		b.Fatalf("%d of %d connects succeeded: %v", r.OK, b.N, r.Errors)
	}
	b.ReportMetric(float64(r.NS)/float64(b.N), "ns/op")
	if before == nil {
		return
	}
	after, err := connect4.Stats()
	if err != nil {
		b.Fatalf("connect4 stats: %v", err)
	}
	runs := after.RunCount - before.RunCount
	if runs != uint64(b.N) {
		b.Fatalf("connect4 ran %d times for %d connects", runs, b.N)
	}
	b.ReportMetric(float64(after.Runtime-before.Runtime)/float64(runs), "connect4-ns/run")
}
