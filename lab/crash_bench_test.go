package lab

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/trellis-mesh/trellis/internal/privtest"
)

var (
	crashRounds = flag.Int("lab.crash-rounds", 5, "BenchmarkLabPodCrashFailover: rounds; each crashes a pod with local probing on and off, in a shuffled order")
	crashWindow = flag.Duration("lab.crash-window", 5*time.Second, "BenchmarkLabPodCrashFailover: how long requests are watched after each crash")
)

// BenchmarkLabPodCrashFailover measures how long requests keep failing
// after an unannounced pod crash: eu/client sends requests (a new
// connection each) to eu's VIP of default/echo, affinity none (four
// backends, two per cluster), and `lab pod crash eu/echo-n2` kills one
// echo server on eu/n2 with SIGKILL, telling no one. eu/client is on
// eu/n1, so the failover goes the whole way: eu/n2's agent probes, marks
// the pod not ready in eu's registry, eu/n1's agent sees it through the
// mesh and drops it. The variants: eu/n2's agent with local health
// probing on (the defaults), and off (--health-interval 0; restarting
// the agent to switch is outside the measurement). Each round runs both
// in a shuffled order; after each crash `lab pod start` brings the pod
// back and every backend must answer again before the next.
//
//	sudo go test ./lab -run '^$' -bench LabPodCrashFailover -benchtime 1x -v
func BenchmarkLabPodCrashFailover(b *testing.B) {
	r, ctx, st := crashBenchLab(b)
	euVIP := serviceURL(b, st, "eu")
	all := []string{"eu/echo-n1", "eu/echo-n2", "us/echo-n1", "us/echo-n2"}
	r.awaitPods(ctx, b, "affinity none: every backend", all)

	type variant struct {
		name    string
		probing bool
	}
	variants := []variant{{"probing on", true}, {"probing off", false}}
	results := map[string][]crashOutcome{}
	probing := true // the lab's agents start with the defaults
	for round := 1; round <= *crashRounds; round++ {
		order := slices.Clone(variants)
		rand.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
		for _, v := range order {
			if v.probing != probing {
				r.setHealthInterval(ctx, b, "eu/n2", v.probing)
				probing = v.probing
				r.awaitPods(ctx, b, "every backend after the agent restart", all)
			}
			loop := r.startLoop(ctx, b, "eu/client", euVIP)
			loop.await(b, 1)
			crash := r.crash(ctx, b, loop, "eu/echo-n2")
			loop.awaitPast(b, crash.Add(*crashWindow))
			loop.halt()
			o := loop.outcome(crash, nil)
			results[v.name] = append(results[v.name], o)
			b.Logf("round %d, %s: %d of %d requests failed in the %s after the crash, the last %s after it",
				round, v.name, o.failed, o.total, o.observed.Round(time.Millisecond), o.lastFailure.Round(time.Millisecond))
			if _, err := r.run(ctx, "pod", "start", "eu/echo-n2"); err != nil {
				b.Fatal(err)
			}
			r.awaitPods(ctx, b, "every backend after pod start", all)
		}
	}

	var out strings.Builder
	fmt.Fprintf(&out, "\nPod crash (kill -9 of eu/echo-n2, nobody told), eu/client → eu's VIP, affinity none; %d rounds, %s watched after each crash; medians (min–max)\n",
		*crashRounds, *crashWindow)
	names := make([]string, len(variants))
	for i, v := range variants {
		names[i] = v.name
	}
	writeCrashTable(&out, names, results)
	fmt.Fprint(os.Stdout, out.String())
	b.Log(out.String())
}

// crashBenchLab builds the default lab for a crash benchmark, with
// default/echo at affinity none (both clusters serve), and tears it down
// when b ends.
func crashBenchLab(b *testing.B) (*labRun, context.Context, *State) {
	privtest.RequireRoot(b)
	r := newLabRun(b)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	b.Cleanup(cancel)
	if _, err := r.run(ctx, "up"); err != nil {
		b.Fatal(err)
	}
	r.annotate(ctx, b, "trellis.io/affinity=none")
	return r, ctx, r.state(b)
}

// writeCrashTable writes one line per variant: time from the crash to
// the last failed request, failed requests, requests, and the rounds
// still failing when the watch ended; medians (min–max).
func writeCrashTable(w io.Writer, variants []string, results map[string][]crashOutcome) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "VARIANT\tCRASH → LAST FAILED REQUEST\tFAILED REQUESTS\tOF\tSTILL FAILING AT THE END")
	for _, name := range variants {
		runs := results[name]
		var last, failed, total []float64
		still := 0
		for _, o := range runs {
			last = append(last, o.lastFailure.Seconds())
			failed = append(failed, float64(o.failed))
			total = append(total, float64(o.total))
			if o.lastFailure > o.observed-time.Second {
				still++
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d of %d\n", name, medianRange(last, "%.2f s"), medianRange(failed, "%.0f"),
			medianRange(total, "%.0f"), still, len(runs))
	}
	tw.Flush()
}

// medianRange formats the median of xs and their range.
func medianRange(xs []float64, format string) string {
	if len(xs) == 0 {
		return "-"
	}
	s := slices.Sorted(slices.Values(xs))
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return fmt.Sprintf(format+" ("+format+"–"+format+")", med, s[0], s[len(s)-1])
}

// setHealthInterval restarts node's agent with local health probing on
// (the default interval) or off (--health-interval 0): the recorded argv,
// which a restart replays, gets the flag.
func (r *labRun) setHealthInterval(ctx context.Context, tb testing.TB, node string, on bool) {
	tb.Helper()
	err := withNode(Options{Name: r.name, Binary: r.bin}, node, func(l *lab, n *nodeLayout) error {
		p := l.state.Procs[agentKey(n)]
		if p == nil {
			return fmt.Errorf("no agent recorded for %s", node)
		}
		argv := slices.Clone(p.Argv)
		for i := 0; i < len(argv); i++ {
			if argv[i] == "--health-interval" && i+1 < len(argv) {
				argv = slices.Delete(argv, i, i+2)
				i--
			} else if strings.HasPrefix(argv[i], "--health-interval=") {
				argv = slices.Delete(argv, i, i+1)
				i--
			}
		}
		if !on {
			argv = append(argv, "--health-interval", "0")
		}
		p.Argv = argv
		return l.save()
	})
	if err != nil {
		tb.Fatal(err)
	}
	r.must(ctx, tb, "restart", "agent", node)
}
