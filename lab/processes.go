package lab

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/clustermesh"
)

// The lab's processes: one mesh API server per cluster, one agent per
// node, one echo server per echo pod. Each is started inside its
// namespace and cgroup, in a session of its own, logging to
// <dir>/logs/, and recorded (PID and start time) in the state.
//
// This file holds what each runs (its argv) and how it is started and
// stopped; clients.go talks to them, waits.go waits for them.

// apiArgs is the argv of c's mesh API server.
func (l *lab) apiArgs(c *clusterLayout) []string {
	args := []string{l.opts.Binary, "apiserver",
		"--cluster-name", c.Name,
		"--cluster-id", strconv.FormatUint(uint64(c.ID), 10),
		"--pod-cidrs", c.PodCIDR,
		"--region", c.Region,
		"--zone", c.Zone,
		"--etcd-listen", netip.AddrPortFrom(c.ip, apiEtcdPort).String(),
		"--http-listen", netip.AddrPortFrom(c.ip, apiHTTPPort).String(),
		"--advertise-address", c.ip.String(),
		"--state-dir", c.stateDir,
	}
	if l.kubernetes() {
		args = append(args, l.kubeAPIArgs(c)...)
	}
	return args
}

// agentArgs are the agent's flags; the datapath ones come from
// agentDatapathArgs when datapath is set (State.Datapath: always, for a
// lab this version built).
func (l *lab) agentArgs(n *nodeLayout, datapath bool) []string {
	c := n.cluster
	args := []string{l.opts.Binary, "agent",
		"--node-name", n.Name,
		"--cluster-name", c.Name,
		"--config-dir", clustermesh.ClustersDir(c.stateDir),
		"--state-dir", n.stateDir,
		"--status-socket", n.socket,
	}
	if l.kubernetes() {
		args = append(args, kubeAgentArgs(n)...)
	} else {
		args = append(args,
			"--registry-url", c.registryURL(),
			"--registry-ca-file", c.caFile(),
			"--registry-token-file", n.tokenFile(),
			"--node-ip", n.ip.String(),
			"--pod-cidrs", n.PodCIDR,
		)
	}
	if datapath {
		return append(args, agentDatapathArgs(n, l.ipsecKeyFile())...)
	}
	return append(args, agentNoDatapathArgs()...)
}

// agentNoDatapathArgs turn the agent's datapath off (a lab an older
// trellis built without it). They must be explicit: the agent's socket LB
// attaches to the machine's root cgroup unless told otherwise.
func agentNoDatapathArgs() []string { return []string{"--cgroup-root", "none", "--tunnel", "none"} }

// withCgroupRoot returns an agent's argv with --cgroup-root none added
// when it names no cgroup root, and any other argv as it is. Restarts
// replay the argv a lab recorded, and a lab started by an older trellis
// recorded agents without the flag: the new binary would take the
// machine's root cgroup for them.
func withCgroupRoot(argv []string) []string {
	if len(argv) < 2 || argv[1] != "agent" {
		return argv
	}
	for _, a := range argv[2:] {
		if a == "--cgroup-root" || strings.HasPrefix(a, "--cgroup-root=") {
			return argv
		}
	}
	return append(slices.Clip(argv), "--cgroup-root", "none")
}

// agentDatapathArgs are the flags that turn on the agent's datapath: the
// eBPF socket LB attached to the node's cgroup (pods are child cgroups of
// it) and pinned per node, and VXLAN over the node's underlay veth. The
// agent's encryption step is on by default (it follows the cluster's
// setting); ipsecKey is the lab's IPsec key file, which it reads only when
// its cluster turns IPsec on.
func agentDatapathArgs(n *nodeLayout, ipsecKey string) []string {
	return []string{
		"--cgroup-root", n.cgroup,
		"--bpf-pin-dir", n.pinDir,
		"--tunnel", "vxlan",
		"--underlay-device", nodeDevice,
		"--ipsec-key-file", ipsecKey,
	}
}

// startDaemon starts spec as a daemon and records it under key.
func (l *lab) startDaemon(key string, spec procSpec) error {
	spec.daemon = true
	spec.argv = withCgroupRoot(spec.argv)
	cmd, err := spec.start()
	if err != nil {
		return err
	}
	go cmd.Wait() // reap it if it exits while this process lives
	return l.recordProc(key, cmd.Process.Pid, spec.argv, spec.log)
}

// startAPIServer starts c's mesh API server in its namespace and cgroup.
func (l *lab) startAPIServer(c *clusterLayout) error {
	return l.startDaemon(apiKey(c), procSpec{ns: c.ns, cgroup: c.cgroup, argv: l.apiArgs(c), log: c.log})
}

// startAgent starts n's agent in the node's namespace and cgroup.
func (l *lab) startAgent(n *nodeLayout) error {
	if l.state.Datapath {
		if err := l.ensureIPsecKey(); err != nil {
			return err
		}
	}
	return l.startDaemon(agentKey(n), procSpec{ns: n.ns, cgroup: n.cgroup, argv: l.agentArgs(n, l.state.Datapath), log: n.log})
}

// echoArgs is the argv of p's echo server.
func (l *lab) echoArgs(p *podLayout) []string {
	return []string{l.opts.Binary, "lab", "echo-server",
		"--cluster", p.node.cluster.Name, "--node", p.node.Name, "--pod", p.Name,
		"--port", strconv.Itoa(EchoPort)}
}

// startEcho starts p's echo server in the pod's namespace and cgroup; a
// pod that is not an echo pod runs none.
func (l *lab) startEcho(p *podLayout) error {
	if !p.Echo {
		return nil
	}
	return l.startDaemon(echoKey(p), procSpec{ns: p.ns, cgroup: p.cgroup, argv: l.echoArgs(p), log: p.log})
}

// apiStopGrace is how long an API server gets to exit after SIGTERM
// before SIGKILL: its embedded etcd waits up to its request timeout (7 s
// by default) for the agents' open watch streams while it closes.
const apiStopGrace = 20 * time.Second

// stopProc stops the recorded process key (SIGTERM; SIGKILL after a
// grace period), if it runs.
func (l *lab) stopProc(key string) error {
	p := l.state.Procs[key]
	if p == nil {
		return nil
	}
	grace := 5 * time.Second
	if strings.HasPrefix(key, "apiserver/") {
		grace = apiStopGrace
	}
	if left := stopProcs(map[int]uint64{p.PID: p.Start}, grace); len(left) > 0 {
		return fmt.Errorf("lab: %s (pid %d) does not die", key, p.PID)
	}
	delete(l.state.Procs, key)
	return l.save()
}

// runTrellisIn runs argv (a trellis command that dials the API servers,
// such as connect) inside c's API server namespace and cgroup, from where
// every API server is reachable over the bridge, and returns its output.
func (l *lab) runTrellisIn(ctx context.Context, c *clusterLayout, argv []string) (string, error) {
	var out bytes.Buffer
	cmd, err := procSpec{ns: c.ns, cgroup: c.cgroup, argv: argv, stdout: &out, stderr: &out}.start()
	if err != nil {
		return "", err
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			cmd.Process.Kill()
		case <-done:
		}
	}()
	if err := cmd.Wait(); err != nil {
		return "", fmt.Errorf("lab: trellis %s: %w\n%s", strings.Join(argv[1:], " "), err, strings.TrimSpace(out.String()))
	}
	return strings.TrimSpace(out.String()), nil
}
