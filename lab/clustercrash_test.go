package lab

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// clusterCrashGrace bounds how long after a whole cluster's crash a
// request may still fail: the gossip declares its nodes dead in ~0.7 s
// and the probe of its control plane, started at the first suspicion,
// times out after 0.5 s; the rest is a generous margin for a loaded
// machine (the figure is logged).
const clusterCrashGrace = 2 * time.Second

// TestLabClusterCrash runs the default lab (eu and us, two nodes each)
// with the agents' gossip on, and crashes all of eu at once (`lab cluster
// crash eu`: API server, agents and pods kill -9, links down). us's
// agents see half the pool die within a second, which rule 3 alone
// distrusts (it is also what a gossip-only partition looks like, which
// TestLabGossip covers); eu's control plane not answering either
// corroborates it (rule 2), so us/client's requests to default/echo
// (affinity none) go to us's pods only, failing no more than
// clusterCrashGrace after the crash. `lab cluster up eu` brings eu back
// and its pods answer again.
func TestLabClusterCrash(t *testing.T) {
	privtest.RequireRoot(t)
	r := newLabRun(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	if _, err := r.run(ctx, "up"); err != nil {
		t.Fatal(err)
	}
	st := r.state(t)
	usVIP := "http://" + serviceVIP(t, st, "us") + ":80/"
	all := []string{"eu/n1", "eu/n2", "us/n1", "us/n2"}
	us := []string{"us/n1", "us/n2"}
	r.awaitGossip(ctx, t, "every member alive after lab up", all, 4, 0)

	// Short requests, so that one to a dead pod (which fails only when it
	// times out) holds up the next for little: the last failure then
	// shows when the failover happened, within a request's timeout.
	loop := r.startLoopN(ctx, t, "us/client", usVIP, nodeCrashBatch, 300*time.Millisecond)
	loop.await(t, 1)
	crash := r.crashVerb(ctx, t, loop, "eu", "cluster", "crash", "eu")
	loop.awaitPast(t, crash.Add(2*clusterCrashGrace))
	loop.halt()
	o := loop.outcome(crash, []string{"us/echo-n1", "us/echo-n2"})
	t.Logf("us/client → %s after eu crashed: %d requests in the %s after the crash, %d failed, the last %s after it",
		usVIP, o.total, o.observed.Round(time.Millisecond), o.failed, o.lastFailure.Round(time.Millisecond))
	if o.observed < 2*clusterCrashGrace {
		t.Errorf("the loop covered only %s after the crash", o.observed.Round(time.Millisecond))
	}
	if o.lastFailure > clusterCrashGrace {
		loop.mu.Lock()
		marks := strings.Join(loop.marks, "\n  ")
		loop.mu.Unlock()
		t.Errorf("a request failed %s after eu crashed, more than %s:\n  %s\nevents:\n  %s", o.lastFailure.Round(time.Millisecond),
			clusterCrashGrace, strings.Join(o.late, "\n  "), marks)
	}
	testutil.EventuallyNoError(t, 30*time.Second, "us's agents: eu's nodes dead, distrusted, corroborated, left out", func() error {
		for _, n := range us {
			g, err := r.gossipOf(ctx, t, n)
			if err != nil {
				return err
			}
			want := []string{"eu/n1", "eu/n2"}
			if g.Dead != 2 || g.Trusted || !slices.Equal(g.Corroborated, want) || !slices.Equal(g.Excluding, want) {
				return fmt.Errorf("%s sees %d alive, %d dead (trusted %v: %s), corroborated %v, excluding %v, probes %+v; want eu's 2 dead, distrusted, corroborated and left out",
					n, g.Alive, g.Dead, g.Trusted, g.Distrust, g.Corroborated, g.Excluding, g.Probes)
			}
		}
		return nil
	})
	for _, n := range us {
		if g, err := r.gossipOf(ctx, t, n); err == nil {
			var deaths []string
			for _, d := range g.DeadMembers {
				deaths = append(deaths, fmt.Sprintf("%s %s", d.Member, d.Since.Sub(crash).Round(time.Millisecond)))
			}
			t.Logf("%s: dead after the crash: %s", n, strings.Join(deaths, ", "))
		}
	}

	r.must(ctx, t, "cluster", "up", "eu")
	r.awaitGossip(ctx, t, "every member alive after cluster up", all, 4, 0)
	loop = r.startLoop(ctx, t, "us/client", usVIP)
	testutil.EventuallyNoError(t, 60*time.Second, "eu's pods answer us/client again", func() error {
		loop.await(t, 1)
		if loop.answeredBy("eu/echo-n1") == 0 || loop.answeredBy("eu/echo-n2") == 0 {
			return fmt.Errorf("eu/echo-n1 answered %d, eu/echo-n2 %d", loop.answeredBy("eu/echo-n1"), loop.answeredBy("eu/echo-n2"))
		}
		return nil
	})
	loop.finish(t, "us/client → "+usVIP+" after cluster up")
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
