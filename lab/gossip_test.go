package lab

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/agent"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// TestLabGossip runs the default lab with the agents' gossip on:
//   - NodeCrash: eu/n1 crashes (kill -9 of its agent and pod, link down,
//     nobody told); us's agents drop its pod's backend when their gossip
//     declares it dead, and us/client's requests to default/echo
//     (affinity none) fail no more than a second after the crash; node up
//     brings the pod back.
//   - Partition: the gossip between eu and us is dropped (data traffic
//     flows): each side sees half the pool die at once, ignores its dead
//     set, and no request fails; heal: every member alive again.
//   - Restart: eu/n2's agent restarts under load: it leaves (Left, not
//     Dead) and no request fails.
func TestLabGossip(t *testing.T) {
	r, st, ctx := upLab(t, 8*time.Minute)
	usVIP := serviceURL(t, st, "us")
	all := []string{"eu/n1", "eu/n2", "us/n1", "us/n2"}
	r.awaitGossip(ctx, t, "every member alive after lab up", all, 4, 0)

	t.Run("NodeCrash", func(t *testing.T) {
		t.Cleanup(func() { r.run(context.Background(), "node", "up", "eu/n1") })
		loop := r.startLoop(ctx, t, "us/client", usVIP)
		loop.await(t, 1)
		crash := r.crashNode(ctx, t, loop, "eu/n1")
		loop.awaitPast(t, crash.Add(3*time.Second))
		loop.halt()
		loop.checkAfter(t, "us/client → "+usVIP+" after eu/n1 crashed", crash, []string{"eu/echo-n2", "us/echo-n1", "us/echo-n2"})
		r.awaitGossip(ctx, t, "eu/n1 dead, trusted", []string{"us/n1", "us/n2"}, 3, 1)
		r.must(ctx, t, "node", "up", "eu/n1")
		r.awaitGossip(ctx, t, "every member alive after node up", all, 4, 0)
		loop = r.startLoop(ctx, t, "us/client", usVIP)
		loop.await(t, 1)
		testutil.EventuallyNoError(t, 30*time.Second, "eu/echo-n1 answers us/client again", func() error {
			loop.await(t, 1)
			if n := loop.answeredBy("eu/echo-n1"); n == 0 {
				return fmt.Errorf("eu/echo-n1 answered none")
			}
			return nil
		})
		loop.finish(t, "us/client → "+usVIP+" after node up")
	})

	t.Run("Partition", func(t *testing.T) {
		t.Cleanup(func() { r.run(context.Background(), "heal", "gossip", "eu", "us") })
		loop := r.startLoop(ctx, t, "us/client", usVIP)
		loop.await(t, 1)
		loop.mark("partition")
		r.must(ctx, t, "partition", "gossip", "eu", "us")
		r.awaitDistrust(ctx, t, "each side sees the other dead, and ignores it", all)
		loop.await(t, 3)
		loop.mark("heal")
		r.must(ctx, t, "heal", "gossip", "eu", "us")
		r.awaitGossip(ctx, t, "every member alive after heal", all, 4, 0)
		loop.await(t, 1)
		loop.finish(t, "us/client → "+usVIP+" across a gossip partition")
	})

	t.Run("Restart", func(t *testing.T) {
		loop := r.startLoop(ctx, t, "us/client", usVIP)
		loop.await(t, 1)
		loop.mark("restart agent eu/n2")
		r.must(ctx, t, "restart", "agent", "eu/n2")
		loop.await(t, 2)
		r.awaitGossip(ctx, t, "every member alive after the restart", all, 4, 0)
		loop.finish(t, "us/client → "+usVIP+" across a restart of eu/n2's agent")
	})
}

// crashNode runs `lab node crash` and returns when it killed.
func (r *labRun) crashNode(ctx context.Context, t testing.TB, loop *requestLoop, node string) time.Time {
	t.Helper()
	return r.crashVerb(ctx, t, loop, node, "node", "crash", node)
}

// answeredBy counts the requests pod ("cluster/pod") answered.
func (l *requestLoop) answeredBy(pod string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, b := range l.batches {
		for _, p := range b.probes {
			if p.OK && p.From.Cluster+"/"+p.From.Pod == pod {
				n++
			}
		}
	}
	return n
}

// gossipOf is the gossip status of the agent of node ("cluster/node").
func (r *labRun) gossipOf(ctx context.Context, t testing.TB, node string) (*agent.GossipStatus, error) {
	t.Helper()
	st := r.state(t)
	lay, err := newLayout(r.name, BaseDir, st.Cgroup2, &st.Topology)
	if err != nil {
		t.Fatal(err)
	}
	n, err := lay.node(node)
	if err != nil {
		t.Fatal(err)
	}
	fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	as, err := agent.FetchStatus(fctx, n.socket)
	if err != nil {
		return nil, err
	}
	if as.Gossip == nil || as.Gossip.Off != "" {
		return nil, fmt.Errorf("%s: gossip not running: %+v", node, as.Gossip)
	}
	return as.Gossip, nil
}

// awaitGossip waits until every node's agent sees alive members alive
// and dead dead, and trusts its dead set.
func (r *labRun) awaitGossip(ctx context.Context, t testing.TB, what string, nodes []string, alive, dead int) {
	t.Helper()
	testutil.EventuallyNoError(t, 30*time.Second, what, func() error {
		for _, n := range nodes {
			g, err := r.gossipOf(ctx, t, n)
			if err != nil {
				return err
			}
			if g.Alive != alive || g.Dead != dead || !g.Trusted {
				return fmt.Errorf("%s sees %d alive, %d suspect, %d dead, %d left (trusted %v: %s); want %d alive, %d dead, trusted",
					n, g.Alive, g.Suspect, g.Dead, g.Left, g.Trusted, g.Distrust, alive, dead)
			}
		}
		return nil
	})
}

// awaitDistrust waits until every node sees the other half of the pool
// dead and ignores its dead set.
func (r *labRun) awaitDistrust(ctx context.Context, t testing.TB, what string, nodes []string) {
	t.Helper()
	testutil.EventuallyNoError(t, 30*time.Second, what, func() error {
		for _, n := range nodes {
			g, err := r.gossipOf(ctx, t, n)
			if err != nil {
				return err
			}
			if g.Dead != 2 || g.Trusted || len(g.Excluding) > 0 {
				return fmt.Errorf("%s sees %d alive, %d dead (trusted %v, excluding %v); want 2 dead, ignored, nothing excluded",
					n, g.Alive, g.Dead, g.Trusted, g.Excluding)
			}
		}
		return nil
	})
}
