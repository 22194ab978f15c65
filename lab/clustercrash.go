package lab

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// ClusterCrash plays a whole cluster that dies at once (a data centre
// losing power): every node's agent and pods and the cluster's mesh API
// server are killed with SIGKILL, then every node's and the API server's
// underlay links go down, and nobody is told. The other clusters' agents
// see all its nodes die in the gossip at the same moment, which looks
// like a partition of the gossip, and they act on it only because the
// cluster's control plane does not answer them either (the partition
// rule's corroboration, docs/design.md). ClusterUp brings it back.
func ClusterCrash(ctx context.Context, opts Options, cluster string) error {
	return withLab(opts, func(l *lab) error {
		c, err := l.lay.cluster(cluster)
		if err != nil {
			return err
		}
		keys := []string{apiKey(c)}
		for _, n := range c.nodes {
			keys = append(keys, agentKey(n))
			for _, p := range n.pods {
				keys = append(keys, echoKey(p))
			}
		}
		killed, errs := l.killNow(keys)
		for _, n := range c.nodes {
			if err := l.setLinkState(n, false); err != nil {
				errs = append(errs, err)
			}
			if l.state.DownNodes == nil {
				l.state.DownNodes = map[string]bool{}
			}
			l.state.DownNodes[n.ref()] = true
		}
		if err := l.setAPILinkState(c, false); err != nil {
			errs = append(errs, err)
		}
		if err := l.save(); err != nil {
			errs = append(errs, err)
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
		fmt.Fprintf(l.opts.Out, "cluster %s crashed at %s: API server, agents and pods killed with SIGKILL, underlay links down, nobody told\n",
			c.Name, killed.Format(crashTimeLayout))
		return nil
	})
}

// ClusterUp brings a crashed cluster back: the API server's link up and
// the server started (same state dir), then every node as `node up` does;
// it returns once the API server and every agent of the lab are ready.
func ClusterUp(ctx context.Context, opts Options, cluster string) error {
	return withLab(opts, func(l *lab) error {
		c, err := l.lay.cluster(cluster)
		if err != nil {
			return err
		}
		if err := l.setAPILinkState(c, true); err != nil {
			return err
		}
		if !l.state.Procs[apiKey(c)].Alive() {
			if err := l.startAPIServer(c); err != nil {
				return err
			}
		}
		if err := l.waitAPIServers(ctx, []*clusterLayout{c}, restartTimeout); err != nil {
			return err
		}
		for _, n := range c.nodes {
			if err := l.startNode(n); err != nil {
				return err
			}
		}
		if err := l.waitAgents(ctx, l.liveNodes(), restartTimeout); err != nil {
			return err
		}
		fmt.Fprintf(l.opts.Out, "cluster %s up: API server and agents ready, pods running\n", c.Name)
		return nil
	})
}

// setAPILinkState sets a cluster's API server underlay veth (both ends)
// up or down.
func (l *lab) setAPILinkState(c *clusterLayout, up bool) error {
	var errs []error
	for _, dev := range []struct{ ns, name string }{{c.ns, nodeDevice}, {l.lay.bridgeNS, c.bridgePort}} {
		h, err := openHandle(dev.ns)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		link, err := h.LinkByName(dev.name)
		if err == nil {
			if up {
				err = h.LinkSetUp(link)
			} else {
				err = h.LinkSetDown(link)
			}
		}
		h.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("lab: set %s in %s up=%v: %w", dev.name, dev.ns, up, err))
		}
	}
	return errors.Join(errs...)
}

// killNow sends SIGKILL to every recorded process of keys at once (none
// gets to notice another's death first), then waits until each is gone
// and forgets it; it returns when the first signal went.
func (l *lab) killNow(keys []string) (time.Time, []error) {
	var errs []error
	killed := time.Now()
	var sent []string
	for _, key := range keys {
		proc := l.state.Procs[key]
		if !proc.Alive() {
			delete(l.state.Procs, key)
			continue
		}
		if err := unix.Kill(proc.PID, unix.SIGKILL); err != nil {
			errs = append(errs, fmt.Errorf("lab: kill -9 %s (pid %d): %w", key, proc.PID, err))
			continue
		}
		sent = append(sent, key)
	}
	for _, key := range sent {
		proc := l.state.Procs[key]
		for deadline := time.Now().Add(5 * time.Second); proc.Alive(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("lab: %s (pid %d) survives SIGKILL", key, proc.PID))
				break
			}
		}
		delete(l.state.Procs, key)
	}
	return killed, errs
}
