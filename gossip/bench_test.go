package gossip

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

var (
	benchRuns     = flag.Int("gossip.runs", 7, "runs per benchmark")
	benchMembers  = flag.Int("gossip.members", 5, "members per pool")
	benchDuration = flag.Duration("gossip.duration", 60*time.Second, "how long BenchmarkFalsePositives watches a pool per run")
	benchTune     = flag.String("gossip.tuning", "lan", "settings: lan (the default) or steady (longer suspicion)")
)

// benchTuning is the tuning -gossip.tuning names; nil for the default.
func benchTuning() *tuning { return tuningNamed(*benchTune) }

func tuningNamed(name string) *tuning {
	switch name {
	case "steady":
		return &tuning{probeInterval: 200 * time.Millisecond, probeTimeout: 100 * time.Millisecond, suspicionMult: 4, suspicionMaxMult: 3}
	}
	return nil
}

func TestMain(m *testing.M) {
	privtest.Main(m, map[string]privtest.Helper{"burn": burn, "member": memberProcess})
}

// burn spins one CPU until killed.
func burn([]string, io.Reader, io.Writer) int {
	runtime.GOMAXPROCS(1)
	x := uint64(1)
	for {
		x = x*6364136223846793005 + 1442695040888963407
		if x == 0 {
			return 1
		}
	}
}

// loadMachine starts two CPU burners per CPU, each a process of its own,
// so the members compete for the CPUs with the OS scheduler's other work,
// as an agent on a busy node does. They are killed at cleanup.
func loadMachine(b testing.TB) {
	b.Helper()
	for range 2 * runtime.NumCPU() {
		cmd := privtest.HelperCommand("burn")
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			cmd.Process.Kill()
			cmd.Wait()
		})
	}
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func medianF(f []float64) float64 {
	s := slices.Clone(f)
	slices.Sort(s)
	return s[len(s)/2]
}

// BenchmarkDetection halts one member of a pool (no leave: its sockets
// close, as in a crash) and times how long the others take to declare it
// dead, idle and with the machine loaded. Run with -benchtime 1x.
func BenchmarkDetection(b *testing.B) {
	for _, loaded := range []bool{false, true} {
		name := "idle"
		if loaded {
			name = "loaded"
		}
		b.Run(name, func(b *testing.B) {
			if loaded {
				loadMachine(b)
			}
			for range b.N {
				var first, last []time.Duration
				for run := range *benchRuns {
					f, l := detectOnce(b)
					b.Logf("run %d: first observer %s, last %s", run, f.Round(time.Millisecond), l.Round(time.Millisecond))
					first, last = append(first, f), append(last, l)
				}
				b.ReportMetric(float64(median(first).Milliseconds()), "ms-first-median")
				b.ReportMetric(float64(median(last).Milliseconds()), "ms-all-median")
				b.ReportMetric(float64(slices.Max(last).Milliseconds()), "ms-all-max")
			}
		})
	}
}

// detectOnce runs one pool, kills one member and returns when the first
// and the last of the others saw it dead.
func detectOnce(b *testing.B) (first, last time.Duration) {
	pool := startPool(b, newKey(b), *benchMembers)
	defer func() {
		for _, g := range pool {
			g.Close()
		}
	}()
	time.Sleep(time.Second)
	i := 1 + rand.IntN(len(pool)-1)
	victim := pool[i]
	rest := slices.Delete(slices.Clone(pool), i, i+1)
	killed := time.Now()
	victim.halt()
	waitAllSee(b, rest, pool, 15*time.Second, func(name string) (State, bool) {
		if name == victim.Name() {
			return Dead, true
		}
		return Alive, false
	})
	first = time.Hour
	for _, g := range rest {
		d := g.Dead()[victim.Name()].Sub(killed)
		first, last = min(first, d), max(last, d)
	}
	return first, last
}

// BenchmarkFalsePositives watches a pool of live members for
// -gossip.duration with two CPU burners per CPU running, and counts what
// the members wrongly concluded of each other: members declared dead,
// suspicions raised by failed probes, and suspicions refuted. Run with
// -benchtime 1x.
func BenchmarkFalsePositives(b *testing.B) {
	loadMachine(b)
	for range b.N {
		var deadRate, suspectRate []float64
		var totalDead, totalSuspect, totalRefuted uint64
		for run := range *benchRuns {
			pool := startPool(b, newKey(b), *benchMembers)
			base := make([]Stats, len(pool))
			for i, g := range pool {
				base[i] = g.Stats()
			}
			time.Sleep(*benchDuration)
			var died, suspected, refuted uint64
			var maxScore int
			for i, g := range pool {
				st := g.Stats()
				died += st.Died - base[i].Died
				suspected += st.Suspected - base[i].Suspected
				refuted += st.Refuted - base[i].Refuted
				maxScore = max(maxScore, g.HealthScore())
			}
			for _, g := range pool {
				g.Close()
			}
			memberHours := float64(len(pool)) * benchDuration.Hours()
			deadRate = append(deadRate, float64(died)/memberHours)
			suspectRate = append(suspectRate, float64(suspected)/memberHours)
			totalDead, totalSuspect, totalRefuted = totalDead+died, totalSuspect+suspected, totalRefuted+refuted
			b.Logf("run %d: %d members for %s under load: %d declared dead, %d suspected, %d refuted; health score at the end ≤ %d",
				run, len(pool), *benchDuration, died, suspected, refuted, maxScore)
		}
		b.Logf("total over %d runs: %d declared dead, %d suspected, %d refuted", *benchRuns, totalDead, totalSuspect, totalRefuted)
		b.ReportMetric(medianF(deadRate), "dead/member-h")
		b.ReportMetric(medianF(suspectRate), "suspect/member-h")
	}
}

// memberProcess is one member in a process of its own: args are the key
// (hex), cluster, node, tuning name and an optional seed. It prints its
// address, runs until stdin closes, then prints its Stats as JSON and
// leaves.
func memberProcess(args []string, stdin io.Reader, stdout io.Writer) int {
	if len(args) < 4 {
		return 2
	}
	key, err := hex.DecodeString(args[0])
	if err != nil {
		return 2
	}
	var seeds []netip.AddrPort
	if len(args) > 4 {
		seeds = append(seeds, netip.MustParseAddrPort(args[4]))
	}
	g, err := Start(context.Background(), Config{
		Cluster: args[1], Node: args[2], BindAddr: loopback, Port: AnyPort, Key: key,
		Seeds: seeds, Logger: testLogger(), tune: tuningNamed(args[3]),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Fprintln(stdout, g.LocalAddr())
	io.Copy(io.Discard, stdin)
	st := g.Stats()
	g.Close()
	json.NewEncoder(stdout).Encode(st)
	return 0
}

// procMember is a member process as the benchmark drives it.
type procMember struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
	addr  netip.AddrPort
}

func startProcMember(b testing.TB, key []byte, cluster, node, tune string, seed netip.AddrPort) *procMember {
	b.Helper()
	args := []string{hex.EncodeToString(key), cluster, node, tune}
	if seed.IsValid() {
		args = append(args, seed.String())
	}
	cmd := privtest.HelperCommand("member", args...)
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
	b.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	p := &procMember{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}
	line, err := p.out.ReadString('\n')
	if err != nil {
		b.Fatalf("member %s/%s: %v", cluster, node, err)
	}
	p.addr = netip.MustParseAddrPort(strings.TrimSpace(line))
	return p
}

// stop closes the member's stdin and returns its Stats.
func (p *procMember) stop(b testing.TB) Stats {
	b.Helper()
	p.stdin.Close()
	var st Stats
	if err := json.NewDecoder(p.out).Decode(&st); err != nil {
		b.Fatalf("member stats: %v", err)
	}
	p.cmd.Wait()
	return st
}

// BenchmarkFalsePositivesProcesses is BenchmarkFalsePositives with every
// member in a process of its own, as agents are, and both tunings (lan,
// the default, and steady) in every run, in a shuffled order, so they see
// the same machine. Run with -benchtime 1x.
func BenchmarkFalsePositivesProcesses(b *testing.B) {
	loadMachine(b)
	tunings := []string{"lan", "steady"}
	for range b.N {
		deadRate := map[string][]float64{}
		suspectRate := map[string][]float64{}
		for run := range *benchRuns {
			rand.Shuffle(len(tunings), func(i, j int) { tunings[i], tunings[j] = tunings[j], tunings[i] })
			for _, tune := range tunings {
				key := newKey(b)
				var pool []*procMember
				for i := range *benchMembers {
					var seed netip.AddrPort
					if i > 0 {
						seed = pool[0].addr
					}
					pool = append(pool, startProcMember(b, key, []string{"eu", "us"}[i%2], fmt.Sprintf("n%d", i), tune, seed))
				}
				// The counts cover the processes' whole life, joining
				// included.
				time.Sleep(*benchDuration)
				var died, suspected, refuted uint64
				for _, p := range pool {
					st := p.stop(b)
					died, suspected, refuted = died+st.Died, suspected+st.Suspected, refuted+st.Refuted
				}
				memberHours := float64(len(pool)) * benchDuration.Hours()
				deadRate[tune] = append(deadRate[tune], float64(died)/memberHours)
				suspectRate[tune] = append(suspectRate[tune], float64(suspected)/memberHours)
				b.Logf("run %d, %s: %d member processes for %s under load: %d declared dead, %d suspected, %d refuted",
					run, tune, len(pool), *benchDuration, died, suspected, refuted)
			}
		}
		for _, tune := range tunings {
			b.ReportMetric(medianF(deadRate[tune]), tune+"-dead/member-h")
			b.ReportMetric(medianF(suspectRate[tune]), tune+"-suspect/member-h")
		}
	}
}

// TestKilledProcessIsDead: a member in a process of its own gets SIGKILL
// (no leave, the kernel closes its sockets); the others declare it dead.
func TestKilledProcessIsDead(t *testing.T) {
	key := newKey(t)
	pool := startPool(t, key, 3)
	child := startProcMember(t, key, "us", "child", *benchTune, pool[0].LocalAddr())
	testutil.EventuallyNoError(t, 10*time.Second, "the child joined", func() error {
		for _, g := range pool {
			if m, ok := stateOf(g, "us/child"); !ok || m.State != Alive {
				return fmt.Errorf("%s sees us/child as %+v", g.Name(), m)
			}
		}
		return nil
	})
	killed := time.Now()
	if err := child.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	child.cmd.Wait()
	testutil.EventuallyNoError(t, 10*time.Second, "us/child dead everywhere", func() error {
		for _, g := range pool {
			if _, ok := g.Dead()["us/child"]; !ok {
				return fmt.Errorf("%s: Dead() = %v", g.Name(), g.Dead())
			}
		}
		return nil
	})
	for _, g := range pool {
		t.Logf("%s saw us/child dead after %s", g.Name(), g.Dead()["us/child"].Sub(killed).Round(time.Millisecond))
	}
}

// BenchmarkDetectionKill is BenchmarkDetection with the victim a member
// process killed with SIGKILL. Run with -benchtime 1x.
func BenchmarkDetectionKill(b *testing.B) {
	for range b.N {
		var first, last []time.Duration
		for run := range *benchRuns {
			key := newKey(b)
			pool := startPool(b, key, *benchMembers-1)
			child := startProcMember(b, key, "us", "child", *benchTune, pool[0].LocalAddr())
			waitAllSee(b, pool, pool, 10*time.Second, func(string) (State, bool) { return Alive, true })
			testutil.EventuallyNoError(b, 10*time.Second, "the child joined", func() error {
				for _, g := range pool {
					if m, ok := stateOf(g, "us/child"); !ok || m.State != Alive {
						return fmt.Errorf("%s sees us/child as %+v", g.Name(), m)
					}
				}
				return nil
			})
			time.Sleep(time.Second)
			killed := time.Now()
			child.cmd.Process.Signal(syscall.SIGKILL)
			child.cmd.Wait()
			testutil.EventuallyNoError(b, 15*time.Second, "us/child dead everywhere", func() error {
				for _, g := range pool {
					if _, ok := g.Dead()["us/child"]; !ok {
						return fmt.Errorf("%s: Dead() = %v", g.Name(), g.Dead())
					}
				}
				return nil
			})
			f, l := time.Hour, time.Duration(0)
			for _, g := range pool {
				d := g.Dead()["us/child"].Sub(killed)
				f, l = min(f, d), max(l, d)
			}
			for _, g := range pool {
				g.Close()
			}
			b.Logf("run %d: first observer %s, last %s", run, f.Round(time.Millisecond), l.Round(time.Millisecond))
			first, last = append(first, f), append(last, l)
		}
		b.ReportMetric(float64(median(first).Milliseconds()), "ms-first-median")
		b.ReportMetric(float64(median(last).Milliseconds()), "ms-all-median")
		b.ReportMetric(float64(slices.Max(last).Milliseconds()), "ms-all-max")
	}
}
