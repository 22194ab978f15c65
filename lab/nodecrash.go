package lab

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"

	"github.com/trellis-mesh/trellis/gossip"
)

// NodeCrash plays a node that dies: its agent and its pods' echo servers
// are killed with SIGKILL and its underlay link goes down, and nobody is
// told (the registry still has its pods ready, the agent leaves no word
// in the gossip). Only the other agents' gossip can notice. NodeUp brings
// it back.
func NodeCrash(ctx context.Context, opts Options, node string) error {
	return NodesCrash(ctx, opts, node)
}

// NodesCrash is NodeCrash of several nodes at once: every process of
// every node is killed before any link goes down, so none dies noticeably
// later than another.
func NodesCrash(ctx context.Context, opts Options, nodes ...string) error {
	return withLab(opts, func(l *lab) error {
		var ns []*nodeLayout
		var keys, refs []string
		for _, name := range nodes {
			n, err := l.lay.node(name)
			if err != nil {
				return err
			}
			ns = append(ns, n)
			refs = append(refs, n.ref())
			keys = append(keys, agentKey(n))
			for _, p := range n.pods {
				keys = append(keys, echoKey(p))
			}
		}
		if len(ns) == 0 {
			return errors.New("lab: node crash: name at least one node (cluster/node)")
		}
		killed, errs := l.killNow(keys)
		for _, n := range ns {
			if err := l.setLinkState(n, false); err != nil {
				errs = append(errs, err)
			}
			if l.state.DownNodes == nil {
				l.state.DownNodes = map[string]bool{}
			}
			l.state.DownNodes[n.ref()] = true
		}
		if err := l.save(); err != nil {
			errs = append(errs, err)
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
		what := "node " + refs[0]
		if len(refs) > 1 {
			what = "nodes " + strings.Join(refs, ", ")
		}
		fmt.Fprintf(l.opts.Out, "%s crashed at %s: agent and pods killed with SIGKILL, underlay link down, nobody told\n",
			what, killed.Format(crashTimeLayout))
		return nil
	})
}

// PartitionGossip drops the gossip (UDP and TCP port 51872) between the
// node IPs of clusters a and b, in both directions, with iptables rules
// in the nodes' namespaces; everything else (data traffic, etcd) still
// flows. HealGossip removes the rules. Both are idempotent.
func PartitionGossip(ctx context.Context, opts Options, a, b string) error {
	return gossipRules(ctx, opts, a, b, true)
}

// HealGossip undoes PartitionGossip.
func HealGossip(ctx context.Context, opts Options, a, b string) error {
	return gossipRules(ctx, opts, a, b, false)
}

func gossipRules(ctx context.Context, opts Options, a, b string, add bool) error {
	return withLab(opts, func(l *lab) error {
		ca, err := l.lay.cluster(a)
		if err != nil {
			return err
		}
		cb, err := l.lay.cluster(b)
		if err != nil {
			return err
		}
		if ca == cb {
			return fmt.Errorf("lab: partition %s from itself: name two clusters", a)
		}
		var errs []error
		for _, pair := range [][2]*clusterLayout{{ca, cb}, {cb, ca}} {
			for _, n := range pair[0].nodes {
				if err := gossipChain(ctx, n.ns, pair[1], add); err != nil {
					errs = append(errs, err)
				}
			}
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
		if add {
			fmt.Fprintf(l.opts.Out, "gossip between %s and %s dropped (UDP and TCP %d); data traffic untouched\n", a, b, gossip.DefaultPort)
		} else {
			fmt.Fprintf(l.opts.Out, "gossip between %s and %s flows again\n", a, b)
		}
		return nil
	})
}

// gossipChain installs (add) or removes, in the node namespace ns, the
// chain that drops the gossip to and from peer's nodes: one chain per
// peer cluster, jumped to from INPUT and OUTPUT, written in one
// iptables-restore (installing it again replaces it).
func gossipChain(ctx context.Context, ns string, peer *clusterLayout, add bool) error {
	chain := fmt.Sprintf("TLAB-GOSSIP-%d", peer.index)
	var script string
	if add {
		port := strconv.Itoa(gossip.DefaultPort)
		var rules strings.Builder
		fmt.Fprintf(&rules, "*filter\n:%s - [0:0]\n", chain)
		for _, pn := range peer.nodes {
			for _, proto := range []string{"udp", "tcp"} {
				for _, dir := range []string{"--dport", "--sport"} {
					fmt.Fprintf(&rules, "-A %s -s %s -p %s %s %s -j DROP\n", chain, pn.ip, proto, dir, port)
					fmt.Fprintf(&rules, "-A %s -d %s -p %s %s %s -j DROP\n", chain, pn.ip, proto, dir, port)
				}
			}
		}
		rules.WriteString("COMMIT\n")
		script = fmt.Sprintf("printf '%%s' '%s' | iptables-restore -w 5 --noflush || exit 1\n"+
			"for c in INPUT OUTPUT; do iptables -w -C $c -j %[2]s 2>/dev/null || iptables -w -I $c -j %[2]s || exit 1; done\n",
			rules.String(), chain)
	} else {
		script = fmt.Sprintf("iptables -w -S %[1]s >/dev/null 2>&1 || exit 0\n"+
			"for c in INPUT OUTPUT; do while iptables -w -D $c -j %[1]s 2>/dev/null; do :; done; done\n"+
			"iptables -w -F %[1]s && iptables -w -X %[1]s\n", chain)
	}
	out, err := exec.CommandContext(ctx, "nsenter", "--net="+nsPath(ns), "sh", "-c", script).CombinedOutput()
	if err != nil {
		verb := "remove"
		if add {
			verb = "install"
		}
		return fmt.Errorf("lab: %s the gossip partition chain %s in %s: %w: %s", verb, chain, ns, err, strings.TrimSpace(string(out)))
	}
	return nil
}
