//go:build linux

package bpf

import (
	"context"
	"fmt"
	"strconv"
	"testing"

	"github.com/trellis-mesh/trellis/internal/privtest"
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

// connectSetup programs a way of reaching services (all backed by
// backend1, where a server listens) inside env and returns the cgroup a
// client must run in for it to apply ("" for a namespace-wide mechanism).
//
// setupEBPF is the socket LB. An iptables DNAT variant goes beside it:
// rules in env.ns's nat OUTPUT chain from each VIP:80 to backend1, cgroup
// "", run through benchConnectServices as BenchmarkConnectIPTables, so
// both report the same sub-benchmark names.
type connectSetup func(b *testing.B, env *lbEnv, services []Service) (cgroup string)

func setupEBPF(b *testing.B, env *lbEnv, services []Service) string {
	lb := open(b, Config{CgroupPath: env.cgroup})
	if err := lb.Set(context.Background(), services); err != nil {
		b.Fatal(err)
	}
	return env.cgroup
}

// BenchmarkConnectVIP times connect() to a service VIP through the eBPF
// socket LB, with 10 and with 10,000 services programmed (the client
// cycles through all VIPs). ns/op is the time inside connect() alone, as
// the client process measures it; process start-up is not counted.
func BenchmarkConnectVIP(b *testing.B) {
	benchConnectServices(b, setupEBPF)
}

// BenchmarkConnectDirect is the baseline: connect() straight to the
// backend address, no translation.
func BenchmarkConnectDirect(b *testing.B) {
	env := newLBEnv(b)
	runConnectBench(b, env, "", backend1.IP.String())
}

func benchConnectServices(b *testing.B, setup connectSetup) {
	for _, n := range []int{10, 10000} {
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			env := newLBEnv(b)
			services := make([]Service, n)
			for i := range services {
				services[i] = Service{VIP: nthAddr(198, 19, i), Port: 80, Proto: TCP, Backends: []Backend{backend1}}
			}
			cgroup := setup(b, env, services)
			runConnectBench(b, env, cgroup, fmt.Sprintf("vips=%d", n))
		})
	}
}

// runConnectBench runs b.N connects in a client process (in env's
// namespace and in cgroup) and reports the mean connect() time as ns/op.
func runConnectBench(b *testing.B, env *lbEnv, cgroup, target string) {
	b.Helper()
	port := "80"
	if target == backend1.IP.String() {
		port = strconv.Itoa(int(backend1.Port))
	}
	r := env.clientIn(b, cgroup, "bench", strconv.Itoa(b.N), port, target)
	if r.OK != b.N {
		b.Fatalf("%d of %d connects succeeded: %v", r.OK, b.N, r.Errors)
	}
	b.ReportMetric(float64(r.NS)/float64(b.N), "ns/op")
}
