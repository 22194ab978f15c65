package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/agent"
	"github.com/trellis-mesh/trellis/apiserver"
	"github.com/trellis-mesh/trellis/apiserver/pki"
	"github.com/trellis-mesh/trellis/apiserver/registry"
	"github.com/trellis-mesh/trellis/clustermesh"
)

// The lab's processes: one mesh API server per cluster, one agent per
// node, one echo server per echo pod. Each is started inside its
// namespace and cgroup, in a session of its own, logging to
// <dir>/logs/, and recorded (PID and start time) in the state.

func (l *lab) apiArgs(c *clusterLayout) []string {
	return []string{l.opts.Binary, "apiserver",
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
}

// registryURL is the cluster's registry, reachable from lab namespaces.
func (c *clusterLayout) registryURL() string {
	return "http://" + netip.AddrPortFrom(c.ip, apiHTTPPort).String()
}

// agentArgs are the agent's flags; the datapath ones come from
// agentDatapathArgs when datapath is set, and say none otherwise.
func (l *lab) agentArgs(n *nodeLayout, datapath bool) []string {
	c := n.cluster
	args := []string{l.opts.Binary, "agent",
		"--node-name", n.Name,
		"--cluster-name", c.Name,
		"--config-dir", clustermesh.ClustersDir(c.stateDir),
		"--state-dir", n.stateDir,
		"--status-socket", n.socket,
		"--registry-url", c.registryURL(),
		"--registry-token-file", filepath.Join(c.stateDir, apiserver.AdminTokenFile),
		"--node-ip", n.ip.String(),
		"--pod-cidrs", n.PodCIDR,
	}
	if datapath {
		return append(args, agentDatapathArgs(n)...)
	}
	return append(args, agentNoDatapathArgs()...)
}

// agentNoDatapathArgs turn the agent's datapath off. They must be
// explicit: the agent's socket LB attaches to the machine's root cgroup
// unless told otherwise.
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
// it) and pinned per node, and VXLAN over the node's underlay veth.
func agentDatapathArgs(n *nodeLayout) []string {
	return []string{
		"--cgroup-root", n.cgroup,
		"--bpf-pin-dir", n.pinDir,
		"--tunnel", "vxlan",
		"--underlay-device", nodeDevice,
	}
}

// probeDatapathFlags asks the agent binary whether it knows every flag of
// agentDatapathArgs; the note names the missing ones.
func (l *lab) probeDatapathFlags(ctx context.Context) (ok bool, note string) {
	out, err := exec.CommandContext(ctx, l.opts.Binary, "agent", "--help").CombinedOutput()
	if err != nil {
		return false, fmt.Sprintf("trellis agent --help failed: %v", err)
	}
	var missing []string
	for _, a := range agentDatapathArgs(&nodeLayout{cluster: &clusterLayout{}}) {
		if strings.HasPrefix(a, "--") && !bytes.Contains(out, []byte(a+" ")) {
			missing = append(missing, a)
		}
	}
	if len(missing) > 0 {
		return false, "the agent has no " + strings.Join(missing, ", ") + " flag yet: running agents without datapath (no socket LB, no tunnel)"
	}
	return true, ""
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

func (l *lab) startAPIServer(c *clusterLayout) error {
	return l.startDaemon(apiKey(c), procSpec{ns: c.ns, cgroup: c.cgroup, argv: l.apiArgs(c), log: c.log})
}

func (l *lab) startAgent(n *nodeLayout) error {
	return l.startDaemon(agentKey(n), procSpec{ns: n.ns, cgroup: n.cgroup, argv: l.agentArgs(n, l.state.Datapath), log: n.log})
}

func (l *lab) echoArgs(p *podLayout) []string {
	return []string{l.opts.Binary, "lab", "echo-server",
		"--cluster", p.node.cluster.Name, "--node", p.node.Name, "--pod", p.Name,
		"--port", strconv.Itoa(EchoPort)}
}

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

// writePodFile tells the node's agent about the pod.
func writePodFile(p *podLayout, ready bool) error {
	pf := agent.PodFile{Namespace: p.Namespace, Name: p.Name, IP: p.ip, Ready: ready, Labels: p.Labels}
	data, err := json.MarshalIndent(pf, "", "  ")
	if err != nil {
		return err
	}
	path := p.podFile()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("lab: pods dir: %w", err)
	}
	// Write and rename, so the agent never reads half a file.
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("lab: pod file: %w", err)
	}
	return os.Rename(tmp, path)
}

// setupCA creates the lab's one CA and gives it to every API server before
// its first start, so `trellis connect` finds matching CAs.
func (l *lab) setupCA() error {
	if _, _, err := pki.LoadOrCreateCA(filepath.Join(l.dir, "ca"), "lab"); err != nil {
		return fmt.Errorf("lab: CA: %w", err)
	}
	for _, c := range l.lay.clusters {
		if err := l.giveCA(c); err != nil {
			return err
		}
	}
	return nil
}

// giveCA copies the lab's CA into c's API server state dir.
func (l *lab) giveCA(c *clusterLayout) error {
	caDir := filepath.Join(l.dir, "ca")
	dst := filepath.Join(c.stateDir, "pki")
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return err
	}
	for _, f := range []string{pki.CACertFile, pki.CAKeyFile} {
		data, err := os.ReadFile(filepath.Join(caDir, f))
		if err != nil {
			return fmt.Errorf("lab: CA: %w", err)
		}
		if err := os.WriteFile(filepath.Join(dst, f), data, 0o600); err != nil {
			return fmt.Errorf("lab: CA: %w", err)
		}
	}
	return nil
}

// httpIn is an HTTP client whose connections are opened inside namespace
// ns. It never uses a proxy.
func httpIn(ns string, timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dialIn(ctx, ns, network, addr)
		},
		DisableKeepAlives: true,
	}}
}

// regCall calls cluster c's registry (or admin API) from c's API server
// namespace. in is sent as JSON; out, when non-nil, receives the answer.
func (l *lab) regCall(ctx context.Context, c *clusterLayout, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.registryURL()+path, body)
	if err != nil {
		return err
	}
	if method != http.MethodGet {
		token, err := os.ReadFile(filepath.Join(c.stateDir, apiserver.AdminTokenFile))
		if err != nil {
			return fmt.Errorf("lab: %s's admin token: %w", c.Name, err)
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := httpIn(c.ns, 10*time.Second).Do(req)
	if err != nil {
		return fmt.Errorf("lab: %s %s on %s's API server: %w", method, path, c.Name, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if resp.StatusCode >= 300 {
		return fmt.Errorf("lab: %s %s on %s's API server: %s: %s", method, path, c.Name, resp.Status, bytes.TrimSpace(data))
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("lab: %s %s on %s's API server: %w", method, path, c.Name, err)
		}
	}
	return nil
}

// apiReady says whether c's API server answers /readyz with 200.
func (l *lab) apiReady(ctx context.Context, c *clusterLayout) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.registryURL()+"/readyz", nil)
	if err != nil {
		return err
	}
	resp, err := httpIn(c.ns, 3*time.Second).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("readyz: %s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	return nil
}

// waitAPIServers waits until the API servers of clusters are ready,
// failing early when one exits.
func (l *lab) waitAPIServers(ctx context.Context, clusters []*clusterLayout, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	pending := slices.Clone(clusters)
	for len(pending) > 0 {
		var next []*clusterLayout
		var lastErr error
		for _, c := range pending {
			if !l.state.Procs[apiKey(c)].Alive() {
				return fmt.Errorf("lab: %s's API server exited:\n%s", c.Name, tailFile(c.log, 20))
			}
			if _, err := os.Stat(filepath.Join(c.stateDir, apiserver.HTTPAddrFile)); err != nil {
				lastErr = fmt.Errorf("%s: no %s yet", c.Name, apiserver.HTTPAddrFile)
				next = append(next, c)
				continue
			}
			if err := l.apiReady(ctx, c); err != nil {
				lastErr = fmt.Errorf("%s: %w", c.Name, err)
				next = append(next, c)
			}
		}
		pending = next
		if len(pending) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: API servers not ready after %s: %w", timeout, lastErr)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return nil
}

// registerServices PUTs the clusters' services into their registries.
func (l *lab) registerServices(ctx context.Context, clusters []*clusterLayout) error {
	for _, c := range clusters {
		for _, s := range c.Services {
			req := registry.ServiceRequest{
				Namespace: s.Namespace, Name: s.Name, Ports: s.Ports,
				FrontendIPs: []netip.Addr{netip.MustParseAddr(s.VIP)},
				Selector:    s.Selector, Annotations: s.Annotations,
			}
			if err := l.regCall(ctx, c, http.MethodPut, "/v1/services/"+s.Namespace+"/"+s.Name, req, nil); err != nil {
				return err
			}
		}
	}
	return nil
}

// connect joins every cluster with every other (and with itself) by
// running `trellis connect --mesh` inside the first API server's
// namespace, from where every API server is reachable. A lone cluster
// gets only its own cluster file.
func (l *lab) connect(ctx context.Context) error {
	first := l.lay.clusters[0]
	if len(l.lay.clusters) == 1 {
		peer := &clustermesh.StateDirPeer{Dir: first.stateDir, Client: httpIn(first.ns, 30*time.Second)}
		creds, err := peer.Issue(ctx, first.Name)
		if err != nil {
			return fmt.Errorf("lab: issue %s's own credentials: %w", first.Name, err)
		}
		return peer.WriteClusterFile(ctx, clustermesh.ClusterFile{
			Name: first.Name, Endpoints: creds.Endpoints, CA: creds.CAPEM, Cert: creds.CertPEM, Key: creds.KeyPEM,
		})
	}
	argv := []string{l.opts.Binary, "connect", "--mesh"}
	for _, c := range l.lay.clusters {
		argv = append(argv, c.stateDir)
	}
	out, err := l.runTrellisIn(ctx, first, argv)
	if err != nil {
		return err
	}
	l.log.Debug("clusters connected", "output", out)
	return nil
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

// agentReady says whether n's agent reports ready and connected every lab
// cluster joined with its own, and none of the clusters disconnected
// from it (those it must have drained).
func (l *lab) agentReady(ctx context.Context, n *nodeLayout) (agent.Status, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	st, err := agent.FetchStatus(ctx, n.socket)
	if err != nil {
		return st, err
	}
	seen := map[string]clustermesh.ClusterStatus{}
	for _, c := range st.Clusters {
		seen[c.Name] = c
	}
	var notReady, notConnected, notDrained []string
	for _, c := range l.lay.clusters {
		cs, ok := seen[c.Name]
		switch {
		case !l.state.joined(n.cluster.Name, c.Name):
			if ok {
				notDrained = append(notDrained, c.Name)
			}
		case !cs.Ready:
			notReady = append(notReady, c.Name)
		case !cs.Connected:
			notConnected = append(notConnected, c.Name)
		}
	}
	var problems []string
	if len(notReady) > 0 {
		problems = append(problems, "clusters not ready: "+strings.Join(notReady, ", "))
	}
	if len(notConnected) > 0 {
		problems = append(problems, "clusters not connected: "+strings.Join(notConnected, ", "))
	}
	if len(notDrained) > 0 {
		problems = append(problems, "disconnected clusters still watched: "+strings.Join(notDrained, ", "))
	}
	if len(problems) > 0 {
		return st, errors.New(strings.Join(problems, "; "))
	}
	return st, nil
}

// liveNodes are the nodes that are not down (their agents should run).
func (l *lab) liveNodes() []*nodeLayout {
	var out []*nodeLayout
	for _, n := range l.lay.allNodes() {
		if !l.state.DownNodes[n.ref()] {
			out = append(out, n)
		}
	}
	return out
}

// waitAgents waits until the agents of nodes report ready (agentReady).
// An agent that exits because it does not know a datapath flag makes the
// lab fall back to agents without datapath.
func (l *lab) waitAgents(ctx context.Context, nodes []*nodeLayout, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	pending := slices.Clone(nodes)
	for {
		var next []*nodeLayout
		var lastErr error
		for _, n := range pending {
			if !l.state.Procs[agentKey(n)].Alive() {
				logTail := tailFile(n.log, 20)
				if l.state.Datapath && strings.Contains(logTail, "unknown flag") {
					l.state.Datapath = false
					l.state.DatapathNote = "the agent refused a datapath flag: running agents without datapath"
					l.log.Warn(l.state.DatapathNote, "node", n.ref(), "log", n.log)
					if err := l.startAgent(n); err != nil {
						return err
					}
					next = append(next, n)
					continue
				}
				return fmt.Errorf("lab: agent of %s exited:\n%s", n.ref(), logTail)
			}
			if _, err := l.agentReady(ctx, n); err != nil {
				lastErr = fmt.Errorf("%s: %w", n.ref(), err)
				next = append(next, n)
			}
		}
		pending = next
		if len(pending) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: agents not ready after %s: %w (logs in %s)", timeout, lastErr, filepath.Join(l.dir, "logs"))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// tailFile is the last lines of a log file, for error messages.
func tailFile(path string, lines int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	parts := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return "    " + strings.Join(parts, "\n    ")
}
