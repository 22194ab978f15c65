package lab

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// Verbs that restart the lab's daemons and join or separate its clusters.
// Each holds the lab's lock and returns once the agents agree.

// restartTimeout bounds the wait for a restarted daemon and for the
// agents to settle after a verb.
const restartTimeout = time.Minute

// RestartAgent stops a node's agent ("cluster/node") with SIGTERM, waits
// for it to exit, and starts it again with the same arguments in the same
// namespace and cgroup; it returns once the new agent reports every
// joined cluster ready. The node's pods keep running throughout, and the
// datapath the agent pinned keeps translating while it is away.
func RestartAgent(ctx context.Context, opts Options, node string) error {
	return withNode(opts, node, func(l *lab, n *nodeLayout) error {
		if l.state.DownNodes[n.ref()] {
			return fmt.Errorf("lab: node %s is down: `trellis lab node up %s` starts its agent", n.ref(), n.ref())
		}
		key := agentKey(n)
		spec := procSpec{ns: n.ns, cgroup: n.cgroup, argv: l.agentArgs(n, l.state.Datapath), log: n.log}
		return l.restart(ctx, key, spec, func() error {
			return l.waitAgents(ctx, []*nodeLayout{n}, restartTimeout)
		})
	})
}

// RestartAPIServer stops a cluster's mesh API server with SIGTERM, waits
// for it to exit, and starts it again with the same arguments (the same
// state dir, so it keeps its etcd data, CA, credentials and registry). It
// returns once the API server is ready and every agent reports every
// joined cluster ready and connected again.
func RestartAPIServer(ctx context.Context, opts Options, cluster string) error {
	return withLab(opts, func(l *lab) error {
		c, err := l.lay.cluster(cluster)
		if err != nil {
			return err
		}
		spec := procSpec{ns: c.ns, cgroup: c.cgroup, argv: l.apiArgs(c), log: c.log}
		return l.restart(ctx, apiKey(c), spec, func() error {
			if err := l.waitAPIServers(ctx, []*clusterLayout{c}, restartTimeout); err != nil {
				return err
			}
			return l.waitAgents(ctx, l.liveNodes(), restartTimeout)
		})
	})
}

// restart stops the process recorded under key and starts spec in its
// place, with the recorded arguments when there are some, then waits.
func (l *lab) restart(ctx context.Context, key string, spec procSpec, wait func() error) error {
	old := l.state.Procs[key]
	oldPID := 0
	if old != nil {
		if len(old.Argv) > 0 {
			spec.argv = slices.Clone(old.Argv)
		}
		if old.Alive() {
			oldPID = old.PID
		}
	}
	start := time.Now()
	if err := l.stopProc(key); err != nil {
		return err
	}
	stopped := time.Since(start)
	if err := l.startDaemon(key, spec); err != nil {
		return err
	}
	if err := wait(); err != nil {
		return fmt.Errorf("%w\n(restarted %s; its log: %s)", err, key, spec.log)
	}
	was := "not running"
	if oldPID != 0 {
		was = fmt.Sprintf("pid %d stopped in %s", oldPID, stopped.Round(time.Millisecond))
	}
	fmt.Fprintf(l.opts.Out, "%s restarted (%s), now pid %d, ready after %s\n",
		key, was, l.state.Procs[key].PID, time.Since(start).Round(time.Millisecond))
	return nil
}

// clusterPair finds two distinct clusters.
func (l *lab) clusterPair(a, b string) (*clusterLayout, *clusterLayout, error) {
	ca, err := l.lay.cluster(a)
	if err != nil {
		return nil, nil, err
	}
	cb, err := l.lay.cluster(b)
	if err != nil {
		return nil, nil, err
	}
	if ca == cb {
		return nil, nil, fmt.Errorf("lab: %s twice: name two different clusters", a)
	}
	return ca, cb, nil
}

func withLab(opts Options, fn func(*lab) error) error {
	l, err := openForChange(opts)
	if err != nil {
		return err
	}
	defer l.close()
	return fn(l)
}

// DisconnectClusters separates clusters a and b with `trellis disconnect`
// (their API servers' state dirs), run inside a's API server namespace:
// each side's agents drop the other's cluster file and drain its nodes,
// endpoints and services (so the tunnels to its nodes go too), and each
// side revokes the other's credentials. It returns once every agent of
// both clusters has drained the other.
func DisconnectClusters(ctx context.Context, opts Options, a, b string) error {
	return withLab(opts, func(l *lab) error {
		ca, cb, err := l.clusterPair(a, b)
		if err != nil {
			return err
		}
		out, err := l.runTrellisIn(ctx, ca, []string{l.opts.Binary, "disconnect", ca.stateDir, cb.stateDir})
		if err != nil {
			return err
		}
		l.log.Debug("clusters disconnected", "output", out)
		if l.state.Disconnected == nil {
			l.state.Disconnected = map[string]bool{}
		}
		l.state.Disconnected[pairKey(ca.Name, cb.Name)] = true
		if err := l.save(); err != nil {
			return err
		}
		start := time.Now()
		if err := l.waitAgents(ctx, l.pairNodes(ca, cb), restartTimeout); err != nil {
			return err
		}
		fmt.Fprintf(l.opts.Out, "clusters %s and %s disconnected: their agents drained each other (%s)\n",
			ca.Name, cb.Name, time.Since(start).Round(time.Millisecond))
		return nil
	})
}

// ConnectClusters joins clusters a and b with `trellis connect` (their API
// servers' state dirs), run inside a's API server namespace, and returns
// once every agent of both clusters reports both ready.
func ConnectClusters(ctx context.Context, opts Options, a, b string) error {
	return withLab(opts, func(l *lab) error {
		ca, cb, err := l.clusterPair(a, b)
		if err != nil {
			return err
		}
		out, err := l.runTrellisIn(ctx, ca, []string{l.opts.Binary, "connect", ca.stateDir, cb.stateDir})
		if err != nil {
			return err
		}
		l.log.Debug("clusters connected", "output", out)
		delete(l.state.Disconnected, pairKey(ca.Name, cb.Name))
		if err := l.save(); err != nil {
			return err
		}
		start := time.Now()
		if err := l.waitAgents(ctx, l.pairNodes(ca, cb), restartTimeout); err != nil {
			return err
		}
		fmt.Fprintf(l.opts.Out, "clusters %s and %s connected: their agents see both ready (%s)\n",
			ca.Name, cb.Name, time.Since(start).Round(time.Millisecond))
		return nil
	})
}

// pairNodes are the live nodes of clusters a and b.
func (l *lab) pairNodes(a, b *clusterLayout) []*nodeLayout {
	var out []*nodeLayout
	for _, n := range l.liveNodes() {
		if n.cluster == a || n.cluster == b {
			out = append(out, n)
		}
	}
	return out
}
