package lab

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/testutil"
)

// clusterCrashGrace bounds how long after a whole cluster's crash a
// request may still fail: the gossip declares its nodes dead in ~0.7 s
// and the probes of its control plane and its pods, started at the first
// suspicion, time out after 0.5 s; the rest is a generous margin for a
// loaded machine (the figure is logged).
const clusterCrashGrace = 2 * time.Second

// TestLabClusterCrash runs the default lab (eu and us, two nodes each)
// with the agents' gossip on, and crashes every node of eu at once, twice:
//   - Nodes: `lab node crash eu/n1 eu/n2` (agents and pods kill -9 at
//     once, links down), eu's API server spared;
//   - Cluster: `lab cluster crash eu`, its API server too.
//
// Each time us's agents see half the pool die within a second, which
// rule 3 alone distrusts (it is also what a gossip-only partition looks
// like, which TestLabGossip covers); eu's pods not answering (Nodes), or
// eu's control plane not answering either (Cluster), corroborates it
// (rule 2), so us/client's requests to default/echo (affinity none) go to
// us's pods only, failing no more than clusterCrashGrace after the crash.
// `node up` / `cluster up` bring eu back and its pods answer again.
func TestLabClusterCrash(t *testing.T) {
	r, st, ctx := upLab(t, 8*time.Minute)
	usVIP := serviceURL(t, st, "us")
	all := []string{"eu/n1", "eu/n2", "us/n1", "us/n2"}
	r.awaitGossip(ctx, t, "every member alive after lab up", all, 4, 0)

	t.Run("Nodes", func(t *testing.T) {
		t.Cleanup(func() {
			r.run(context.Background(), "node", "up", "eu/n1")
			r.run(context.Background(), "node", "up", "eu/n2")
		})
		r.checkClusterFailover(ctx, t, usVIP, "eu/n1 and eu/n2", func(loop *requestLoop) time.Time {
			return r.crashVerb(ctx, t, loop, "eu/n1 and eu/n2", "node", "crash", "eu/n1", "eu/n2")
		})
		r.must(ctx, t, "node", "up", "eu/n1")
		r.must(ctx, t, "node", "up", "eu/n2")
		r.awaitEUBack(ctx, t, usVIP, all, "node up")
	})

	t.Run("Cluster", func(t *testing.T) {
		t.Cleanup(func() { r.run(context.Background(), "cluster", "up", "eu") })
		r.checkClusterFailover(ctx, t, usVIP, "eu", func(loop *requestLoop) time.Time {
			return r.crashVerb(ctx, t, loop, "eu", "cluster", "crash", "eu")
		})
		r.must(ctx, t, "cluster", "up", "eu")
		r.awaitEUBack(ctx, t, usVIP, all, "cluster up")
	})
}

// checkClusterFailover runs us/client's requests to usVIP across crash
// (which kills every node of eu and returns when) and checks that none
// failed more than clusterCrashGrace after it, and that us's agents hold
// eu's nodes dead, distrusted, corroborated and left out.
func (r *labRun) checkClusterFailover(ctx context.Context, t *testing.T, usVIP, what string, crash func(*requestLoop) time.Time) {
	t.Helper()
	// Short requests, so that one to a dead pod (which fails only when it
	// times out) holds up the next for little: the last failure then
	// shows when the failover happened, within a request's timeout.
	loop := r.startLoopN(ctx, t, "us/client", usVIP, nodeCrashBatch, 300*time.Millisecond)
	loop.await(t, 1)
	at := crash(loop)
	loop.awaitPast(t, at.Add(2*clusterCrashGrace))
	loop.halt()
	o := loop.outcome(at, []string{"us/echo-n1", "us/echo-n2"})
	t.Logf("us/client → %s after %s crashed: %d requests in the %s after the crash, %d failed, the last %s after it",
		usVIP, what, o.total, o.observed.Round(time.Millisecond), o.failed, o.lastFailure.Round(time.Millisecond))
	if o.lastFailure > clusterCrashGrace {
		loop.mu.Lock()
		marks := strings.Join(loop.marks, "\n  ")
		loop.mu.Unlock()
		t.Errorf("a request failed %s after %s crashed, more than %s:\n  %s\nevents:\n  %s", o.lastFailure.Round(time.Millisecond),
			what, clusterCrashGrace, strings.Join(o.late, "\n  "), marks)
	}
	us := []string{"us/n1", "us/n2"}
	want := []string{"eu/n1", "eu/n2"}
	testutil.EventuallyNoError(t, 30*time.Second, "us's agents: eu's nodes dead, distrusted, corroborated, left out", func() error {
		for _, n := range us {
			g, err := r.gossipOf(ctx, t, n)
			if err != nil {
				return err
			}
			if g.Dead != 2 || g.Trusted || !slices.Equal(g.Corroborated, want) || !slices.Equal(g.Excluding, want) {
				return fmt.Errorf("%s sees %d alive, %d dead (trusted %v: %s), corroborated %v, excluding %v, probes %+v; want eu's 2 dead, distrusted, corroborated and left out",
					n, g.Alive, g.Dead, g.Trusted, g.Distrust, g.Corroborated, g.Excluding, g.Probes)
			}
		}
		return nil
	})
	for _, n := range us {
		if g, err := r.gossipOf(ctx, t, n); err == nil {
			var deaths, probes []string
			for _, d := range g.DeadMembers {
				deaths = append(deaths, fmt.Sprintf("%s %s", d.Member, d.Since.Sub(at).Round(time.Millisecond)))
			}
			for _, p := range g.Probes {
				probes = append(probes, fmt.Sprintf("%s down=%v", p.Target, p.Down))
			}
			t.Logf("%s: dead after the crash: %s; last probes: %s", n, strings.Join(deaths, ", "), strings.Join(probes, ", "))
		}
	}
}

// awaitEUBack waits until every gossip member is alive and eu's pods
// answer us/client again, with no failed request.
func (r *labRun) awaitEUBack(ctx context.Context, t *testing.T, usVIP string, all []string, after string) {
	t.Helper()
	r.awaitGossip(ctx, t, "every member alive after "+after, all, 4, 0)
	loop := r.startLoop(ctx, t, "us/client", usVIP)
	testutil.EventuallyNoError(t, 60*time.Second, "eu's pods answer us/client again", func() error {
		loop.await(t, 1)
		if loop.answeredBy("eu/echo-n1") == 0 || loop.answeredBy("eu/echo-n2") == 0 {
			return fmt.Errorf("eu/echo-n1 answered %d, eu/echo-n2 %d", loop.answeredBy("eu/echo-n1"), loop.answeredBy("eu/echo-n2"))
		}
		return nil
	})
	loop.finish(t, "us/client → "+usVIP+" after "+after)
}

// crashVerb runs a crash verb (`lab … crash …`) and returns when it
// killed, as the verb says on this machine's clock.
func (r *labRun) crashVerb(ctx context.Context, t testing.TB, loop *requestLoop, what string, args ...string) time.Time {
	t.Helper()
	begin := time.Now()
	loop.mark("crash of " + what + " begins")
	out, err := r.run(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	_, rest, _ := strings.Cut(out, " crashed at ")
	at, err := time.ParseInLocation(crashTimeLayout, strings.TrimSuffix(strings.Fields(rest + " ")[0], ":"), time.Local)
	if err != nil {
		t.Fatalf("lab %s said %q: no kill time: %v", strings.Join(args, " "), out, err)
	}
	y, m, d := begin.Date()
	at = time.Date(y, m, d, at.Hour(), at.Minute(), at.Second(), at.Nanosecond(), time.Local)
	if at.Before(begin.Add(-time.Second)) { // past midnight
		at = at.AddDate(0, 0, 1)
	}
	loop.mark(fmt.Sprintf("%s killed (%s after the verb began)", what, at.Sub(begin).Round(time.Millisecond)))
	return at
}
