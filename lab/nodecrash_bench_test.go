package lab

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/testutil"
)

var (
	nodeCrashRounds  = flag.Int("lab.nodecrash-rounds", 5, "BenchmarkLabNodeCrashFailover: rounds; each crashes eu/n1 with the agents' gossip on and off, in a shuffled order")
	nodeCrashWindow  = flag.Duration("lab.nodecrash-window", 6*time.Second, "BenchmarkLabNodeCrashFailover: how long requests are watched after each crash")
	nodeCrashTimeout = flag.Duration("lab.nodecrash-timeout", 300*time.Millisecond, "BenchmarkLabNodeCrashFailover: each request's timeout (a request to the dead node fails only when it ends)")
)

// nodeCrashBatch is the request loop's batch: requests to the dead node
// time out, and a batch of loopBatch would run long past the window.
const nodeCrashBatch = 20

// BenchmarkLabNodeCrashFailover measures how long requests keep failing
// after an unannounced node crash: us/client sends requests (a new
// connection each, one after the other, each with a timeout of
// -lab.nodecrash-timeout: a request to the dead node fails only when it
// times out, and the next waits for it) to us's VIP of default/echo, affinity
// none (four backends, two per cluster), and `lab node crash eu/n1` kills
// eu/n1's agent and its pod eu/echo-n1 with SIGKILL and takes its link
// down, telling no one (the registry keeps the pod ready). The variants:
// every agent with gossip on (the default: the cluster files carry a mesh
// key) and every agent with --gossip=false (switched by restarting the
// agents with the flag added to their recorded argv, outside the
// measurement). Each round runs both in a shuffled order; after each
// crash `lab node up eu/n1` brings the node back, and every backend must
// answer us/client (and, with gossip, every member be alive everywhere)
// before the next.
//
//	sudo go test ./lab -run '^$' -bench LabNodeCrashFailover -benchtime 1x -v
func BenchmarkLabNodeCrashFailover(b *testing.B) {
	r, ctx, st := crashBenchLab(b)
	usVIP := serviceURL(b, st, "us")
	nodes := []string{"eu/n1", "eu/n2", "us/n1", "us/n2"}
	pods := []string{"eu/echo-n1", "eu/echo-n2", "us/echo-n1", "us/echo-n2"}
	r.awaitPodsFrom(ctx, b, "us/client", "affinity none: every backend", pods)
	r.awaitGossip(ctx, b, "every member alive after lab up", nodes, 4, 0)

	type variant struct {
		name   string
		gossip bool
	}
	variants := []variant{{"gossip on", true}, {"gossip off", false}}
	results := map[string][]crashOutcome{}
	for round := 1; round <= *nodeCrashRounds; round++ {
		order := slices.Clone(variants)
		rand.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
		for _, v := range order {
			// node up starts eu/n1's agent with the lab's own flags
			// (gossip on): set every agent as the variant wants.
			if r.setGossip(ctx, b, nodes, v.gossip) {
				r.awaitPodsFrom(ctx, b, "us/client", "every backend after the agent restarts", pods)
			}
			if v.gossip {
				r.awaitGossip(ctx, b, "every member alive before the crash", nodes, 4, 0)
			}
			loop := r.startLoopN(ctx, b, "us/client", usVIP, nodeCrashBatch, *nodeCrashTimeout)
			loop.await(b, 1)
			crash := r.crashNode(ctx, b, loop, "eu/n1")
			loop.awaitPast(b, crash.Add(*nodeCrashWindow))
			loop.halt()
			o := loop.outcomeWithin(crash, *nodeCrashWindow)
			results[v.name] = append(results[v.name], o)
			b.Logf("round %d, %s: %d of %d requests failed in the %s after the crash, the last %s after it",
				round, v.name, o.failed, o.total, o.observed.Round(time.Millisecond), o.lastFailure.Round(time.Millisecond))
			r.must(ctx, b, "node", "up", "eu/n1")
			r.awaitPodsFrom(ctx, b, "us/client", "every backend after node up", pods)
		}
	}

	var out strings.Builder
	fmt.Fprintf(&out, "\nNode crash (eu/n1: kill -9 of its agent and eu/echo-n1, link down, nobody told), us/client → us's VIP, affinity none; %d rounds, %s watched after each crash; medians (min–max)\n",
		*nodeCrashRounds, *nodeCrashWindow)
	names := make([]string, len(variants))
	for i, v := range variants {
		names[i] = v.name
	}
	writeCrashTable(&out, names, results)
	fmt.Fprint(os.Stdout, out.String())
	b.Log(out.String())
}

// setGossip makes every node's agent run with gossip on (the lab's
// flags) or off (--gossip=false added to the recorded argv, which a
// restart replays), restarting those that run otherwise; it reports
// whether it restarted any.
func (r *labRun) setGossip(ctx context.Context, tb testing.TB, nodes []string, on bool) bool {
	tb.Helper()
	restarted := false
	for _, node := range nodes {
		changed := false
		err := withNode(Options{Name: r.name, Binary: r.bin}, node, func(l *lab, n *nodeLayout) error {
			p := l.state.Procs[agentKey(n)]
			if p == nil {
				return fmt.Errorf("no agent recorded for %s", node)
			}
			argv := slices.DeleteFunc(slices.Clone(p.Argv), func(a string) bool {
				return a == "--gossip=false" || a == "--gossip=true" || a == "--gossip"
			})
			if !on {
				argv = append(argv, "--gossip=false")
			}
			if slices.Equal(argv, p.Argv) {
				return nil
			}
			changed = true
			p.Argv = argv
			return l.save()
		})
		if err != nil {
			tb.Fatal(err)
		}
		if changed {
			r.must(ctx, tb, "restart", "agent", node)
			restarted = true
		}
	}
	return restarted
}

// awaitPodsFrom polls `lab curl client default/echo -n 20` until a round
// has no failed request and is answered by exactly want, for at most
// 30 s.
func (r *labRun) awaitPodsFrom(ctx context.Context, tb testing.TB, client, what string, want []string) {
	tb.Helper()
	want = slices.Sorted(slices.Values(want))
	testutil.EventuallyNoError(tb, 30*time.Second, what, func() error {
		out, err := r.run(ctx, "curl", client, "default/echo", "-n", "20", "-o", "json")
		var cr CurlResult
		if jerr := json.Unmarshal([]byte(out), &cr); jerr != nil {
			return fmt.Errorf("lab curl -o json: %v (%v)\n%s", jerr, err, out)
		}
		if got := slices.Sorted(maps.Keys(cr.PerPod)); cr.Failed != 0 || !slices.Equal(got, want) {
			return fmt.Errorf("last round answered by %v, %d failed", cr.PerPod, cr.Failed)
		}
		return nil
	})
}

// outcomeWithin is what the loop saw in window after a crash: the
// requests that started then (the last batch runs on past it).
func (l *requestLoop) outcomeWithin(crash time.Time, window time.Duration) crashOutcome {
	l.mu.Lock()
	defer l.mu.Unlock()
	var o crashOutcome
	for _, b := range l.batches {
		for _, p := range b.probes {
			d := p.At.Sub(crash)
			if d < 0 || d > window {
				continue
			}
			o.total++
			o.observed = max(o.observed, d)
			if !p.OK {
				o.failed++
				o.lastFailure = max(o.lastFailure, d)
			}
		}
	}
	return o
}
