package agent

// Gossip: the agent is one member of the mesh-wide gossip, and the set of
// members it believes dead (and trusts) is an input to what it programs.
//
// Design notes (docs/design.md, "Gossip", has the rule in full).
//
//   - When: the config dir's cluster files agree on a mesh key
//     (clustermesh.ReadMeshGossipKey); without one there is no gossip,
//     said once in the log and in status, and the dir is read again every
//     few seconds (`trellis connect` may write a key later). The member is
//     <cluster>/<node>, bound to --node-ip, with the local cluster's region
//     when its config arrived within a few seconds.
//   - Seeds: every other node's first IP in the merged snapshot, set again
//     on every snapshot.
//   - Stop: a graceful agent stop closes the member, so the others see it
//     Left (not Dead): a restart is not a death.
//   - The trusted dead set. Only Dead counts (rule 1). The whole set is
//     ignored while the local gossip looks unhealthy (rule 3): more than a
//     third of the known members went Dead within one 5 s window, this
//     member sees fewer than half of the members it saw alive at most in
//     the last minute, or its Lifeguard health score is 4 or more. A
//     member Alive again leaves the set at once (rule 5).
//   - Corroboration (rule 2): a dead member counts even while rule 3
//     distrusts the set when this agent's own probes find it silent too:
//     its cluster's control plane (clustermesh.ProbeCluster: a read of
//     the heartbeat over a new connection, 500 ms) or its pods
//     (probePods: TCP connections to a few of its pods that back
//     services in use, 500 ms). A whole cluster that crashed, API server
//     included or not, is dropped that way; a partition of the gossip
//     alone leaves both answering and so stays ignored. A suspect
//     member (this member's own probe of it failed) found silent so
//     counts too: a whole cluster's last nodes need not wait for their
//     suspicions to time out. Not for the slow member (health score):
//     a starved agent's probes time out for the same reason its gossip
//     declares others dead, so the two are not independent then.
//   - Probes run while a member is suspect or distrusted dead, at once on
//     new evidence, then every second while the target does not answer
//     and every 10 s while it does (the cost of a long gossip
//     partition). A death trusted before the distrust began stays
//     trusted while its probes run, so a whole cluster's first death
//     does not come back for the moment between the second death and
//     the answer.
//   - Use: every change of the trusted set triggers an apply at once; the
//     apply hands the datapath clustermesh's SnapshotExcluding of the
//     trusted dead nodes: their backends left out before the merge's
//     choice of group, and never a service emptied (rule 4).

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/gossip"
)

// GossipConfig says whether and where the agent gossips.
type GossipConfig struct {
	// Disabled turns gossip off (--gossip=false).
	Disabled bool
	// Port is the UDP and TCP port; 0 means gossip.DefaultPort.
	Port int
}

// Rule 3's thresholds.
const (
	gossipDeathWindow    = 5 * time.Second
	gossipAliveWindow    = time.Minute
	gossipMaxHealthScore = 4
	// gossipKeyPoll is how often a dir without a key is read again.
	gossipKeyPoll = 3 * time.Second
	// gossipRegionWait bounds the wait for the local cluster's region.
	gossipRegionWait = 5 * time.Second
)

// Rule 2's probes of a cluster's control plane and of a node's pods.
const (
	// livenessTimeout bounds one probe: a cluster that does not answer
	// within it is down for rule 2. Gossip needs ~0.7 s to declare a
	// crashed node dead; a probe started at its suspicion ends by then.
	livenessTimeout = 500 * time.Millisecond
	// livenessFresh is how long a probe's "does not answer" counts.
	livenessFresh = 3 * time.Second
	// livenessRetryDown and livenessRetryUp are how often a cluster is
	// probed again while needed: soon when it did not answer (its return
	// restores its nodes), rarely when it did (a long gossip partition
	// must not become a read per agent per second on its etcd).
	livenessRetryDown = time.Second
	livenessRetryUp   = 10 * time.Second
	// livenessMinGap spaces probes of one cluster triggered by new
	// suspicions or deaths.
	livenessMinGap = 500 * time.Millisecond
)

// GossipStatus is what `trellis status` shows of the gossip.
type GossipStatus struct {
	// Off says why there is no gossip; empty when it runs.
	Off     string `json:"off,omitempty"`
	Member  string `json:"member,omitempty"`
	Address string `json:"address,omitempty"`
	Alive   int    `json:"alive"`
	Suspect int    `json:"suspect"`
	Dead    int    `json:"dead"`
	Left    int    `json:"left"`
	// DeadMembers are the members believed dead, with since when.
	DeadMembers []GossipDead `json:"deadMembers,omitempty"`
	// Trusted says whether the dead set is used (rule 3); Distrust why not.
	Trusted     bool   `json:"trusted"`
	Distrust    string `json:"distrust,omitempty"`
	HealthScore int    `json:"healthScore"`
	// Corroborated are the dead members used although the set is
	// distrusted: their cluster's control plane does not answer either
	// (rule 2).
	Corroborated []string `json:"corroborated,omitempty"`
	// Probes are the last probe of each cluster's control plane and
	// each node's pods this member made (rule 2: for suspect or dead
	// members).
	Probes []GossipProbe `json:"probes,omitempty"`
	// Excluding are the nodes whose backends the last apply left out;
	// Kept the services that kept them because nothing else was left.
	Excluding []string `json:"excluding,omitempty"`
	Kept      []string `json:"kept,omitempty"`
}

// GossipDead is one member believed dead.
type GossipDead struct {
	Member string    `json:"member"`
	Since  time.Time `json:"since"`
}

// GossipProbe is the last probe of a cluster's control plane (Target
// "cluster") or of a node's pods (Target "cluster/node").
type GossipProbe struct {
	Target    string        `json:"target"`
	At        time.Time     `json:"at"`
	Took      time.Duration `json:"took"`
	Reachable bool          `json:"reachable"`
	Heartbeat bool          `json:"heartbeat"`
	// Down: this probe corroborates the deaths of the cluster's nodes.
	Down bool   `json:"down"`
	Err  string `json:"error,omitempty"`
}

// gossipMember runs this node's member and judges its dead set.
type gossipMember struct {
	cfg       GossipConfig
	cluster   string
	node      string
	nodeIP    netip.Addr
	configDir string
	mesh      *clustermesh.Mesh
	onChange  func()
	log       *slog.Logger

	mu      sync.Mutex
	g       *gossip.Gossip
	off     string
	status  GossipStatus
	trusted map[string]map[string]bool // cluster → node → dead and trusted
	gen     uint64
	// alive samples the count of alive members, for rule 3.
	alive []aliveSample
	// probes are rule 2's probes, by cluster.
	probes map[string]*clusterProbe
}

// clusterProbe is what this agent knows of a cluster's control plane
// (keyed by the cluster's name) or of a node's pods (by cluster/node).
type clusterProbe struct {
	// last is the last completed probe, done when it completed (zero:
	// none yet).
	last clustermesh.Liveness
	done time.Time
	// failed says why the last probe could not be made (no cluster file):
	// no evidence either way.
	failed   string
	inflight bool
	// sawHeartbeat: a probe found the cluster's heartbeat, so its absence
	// now means its mesh API server is gone (an external etcd may answer
	// without it; a cluster never seen with one proves nothing by that).
	sawHeartbeat bool
}

// down says whether the last probe, still fresh, found the cluster's
// control plane gone: no answer, or its heartbeat gone.
func (p *clusterProbe) down(now time.Time) bool {
	if p == nil || p.done.IsZero() || p.failed != "" || now.Sub(p.done) > livenessFresh {
		return false
	}
	return !p.last.Reachable || (!p.last.Heartbeat && p.sawHeartbeat)
}

// running says whether a probe is under way.
func (p *clusterProbe) running() bool { return p != nil && p.inflight }

// due says whether the cluster should be probed now, newest being the
// latest time one of its members turned suspect or dead.
func (p *clusterProbe) due(now, newest time.Time) bool {
	switch {
	case p == nil || (p.done.IsZero() && !p.inflight):
		return true
	case p.inflight:
		return false
	}
	gap := now.Sub(p.done)
	if newest.After(p.last.Start) && gap >= livenessMinGap {
		return true // new evidence since the last probe began
	}
	if p.failed == "" && (!p.last.Reachable || (!p.last.Heartbeat && p.sawHeartbeat)) {
		return gap >= livenessRetryDown
	}
	return gap >= livenessRetryUp
}

// record stores a completed probe.
func (p *clusterProbe) record(lv clustermesh.Liveness, err error, now time.Time) {
	p.inflight, p.done = false, now
	if err != nil {
		p.failed = err.Error()
		p.last = clustermesh.Liveness{Start: now}
		return
	}
	p.failed, p.last = "", lv
	if lv.Heartbeat {
		p.sawHeartbeat = true
	}
}

type aliveSample struct {
	at time.Time
	n  int
}

func newGossipMember(cfg Config, mesh *clustermesh.Mesh, onChange func(), log *slog.Logger) *gossipMember {
	return &gossipMember{
		cfg: cfg.Gossip, cluster: cfg.ClusterName, node: cfg.NodeName, nodeIP: cfg.NodeIP,
		configDir: cfg.ConfigDir, mesh: mesh, onChange: onChange, log: log.With("component", "gossip"),
		off: "starting", probes: make(map[string]*clusterProbe),
	}
}

// deadNodes is the trusted dead set (cluster → node) and its generation.
func (m *gossipMember) deadNodes() (map[string]map[string]bool, uint64) {
	if m == nil {
		return nil, 0
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.trusted, m.gen
}

func (m *gossipMember) setOff(why string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.off = why
}

// run starts the member once there is a key, and keeps it until ctx ends.
func (m *gossipMember) run(ctx context.Context) {
	if !m.nodeIP.IsValid() {
		m.setOff("no --node-ip to bind to")
		m.log.Info("no gossip: the agent has no --node-ip")
		return
	}
	key := m.waitKey(ctx)
	if key == nil {
		return
	}
	region := m.waitRegion(ctx)
	// The member leaves the pool when this function returns (Close),
	// not when ctx ends on its own: the leave must finish before the
	// agent's Run returns.
	gctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	g, err := gossip.Start(gctx, gossip.Config{
		Cluster: m.cluster, Node: m.node, Region: region, BindAddr: m.nodeIP, Port: m.cfg.Port,
		Key: key, Seeds: m.seeds(m.mesh.Snapshot()), Logger: m.log,
	})
	if err != nil {
		m.setOff(err.Error())
		m.log.Warn("no gossip: start failed", "err", err)
		return
	}
	defer func() {
		if err := g.Close(); err != nil {
			m.log.Warn("gossip: leave", "err", err)
		}
	}()
	m.mu.Lock()
	m.g, m.off = g, ""
	m.mu.Unlock()
	m.log.Info("gossip running", "member", g.Name(), "addr", g.LocalAddr(), "region", region)

	changed, unsubscribe := m.mesh.Subscribe()
	defer unsubscribe()
	// Rule 2's probes run on their own and hand their results back here;
	// they end with ctx, and run waits for them.
	type probed struct {
		lv  clustermesh.Liveness
		err error
	}
	results := make(chan probed)
	var probes sync.WaitGroup
	defer probes.Wait()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
			g.SetSeeds(m.seeds(m.mesh.Snapshot()))
		case <-g.Changes():
		case r := <-results:
			m.recordProbe(r.lv, r.err, time.Now())
		case <-tick.C:
		}
		for _, key := range m.judge(g, time.Now()) {
			probes.Add(1)
			go func() {
				defer probes.Done()
				var lv clustermesh.Liveness
				var err error
				if cluster, node, ok := strings.Cut(key, "/"); ok {
					lv, err = probePods(ctx, m.mesh.Snapshot(), cluster, node, livenessTimeout)
				} else {
					lv, err = m.mesh.ProbeCluster(ctx, key, livenessTimeout)
				}
				lv.Cluster = key
				select {
				case results <- probed{lv, err}:
				case <-ctx.Done():
				}
			}()
		}
	}
}

// maxPodProbes bounds the pods (address and port) probed per node.
const maxPodProbes = 4

// errNoPods: a node none of whose pods backs a service this agent uses
// cannot be probed that way.
var errNoPods = errors.New("none of its pods backs a service this agent uses")

// probePods is rule 2's probe of a node over the data path: a TCP
// connection, within timeout, to up to maxPodProbes of its pods that
// back services in snap (their target ports), all at once. The node
// answers when one connection is accepted or refused (a refusal comes
// from the node: it lives); it is down (Reachable false) when none gets
// any answer. Its gossip port plays no part, so a partition of the gossip
// alone leaves the node answering. A node has no heartbeat: Heartbeat is
// set so that only the answer counts.
func probePods(ctx context.Context, snap *clustermesh.Snapshot, cluster, node string, timeout time.Duration) (clustermesh.Liveness, error) {
	lv := clustermesh.Liveness{Start: time.Now(), Heartbeat: true}
	n := snap.Nodes[cluster][node]
	if n == nil {
		return lv, fmt.Errorf("probe the pods of %s/%s: no such node in the mesh", cluster, node)
	}
	onNode := make(map[netip.Addr]bool)
	for ip, e := range snap.IPCache[cluster] {
		if slices.Contains(n.IPs, e.NodeIP) {
			onNode[ip] = true
		}
	}
	var targets []netip.AddrPort
	for _, name := range slices.SortedFunc(maps.Keys(snap.Services), func(a, b clustermesh.ServiceName) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	}) {
		svc := snap.Services[name]
		for _, b := range svc.Backends {
			if b.Cluster != cluster || !onNode[b.IP] {
				continue
			}
			for i, port := range svc.Ports {
				if t := netip.AddrPortFrom(b.IP, b.TargetPort(i)); port.Protocol == v1.ProtocolTCP && t.Port() != 0 && !slices.Contains(targets, t) {
					targets = append(targets, t)
				}
			}
		}
		if len(targets) >= maxPodProbes {
			targets = targets[:maxPodProbes]
			break
		}
	}
	if len(targets) == 0 {
		return lv, fmt.Errorf("probe the pods of %s/%s: %w", cluster, node, errNoPods)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	answers := make(chan error, len(targets))
	for _, t := range targets {
		go func() {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", t.String())
			if err == nil {
				c.Close()
			}
			answers <- err
		}()
	}
	var errs []error
	for range targets {
		err := <-answers
		if err == nil || errors.Is(err, syscall.ECONNREFUSED) {
			lv.Reachable = true
			cancel() // the others need not finish
			continue
		}
		errs = append(errs, err)
	}
	lv.Took = time.Since(lv.Start)
	if ctx := context.Cause(ctx); !lv.Reachable && ctx != nil && ctx != context.DeadlineExceeded {
		return lv, fmt.Errorf("probe the pods of %s/%s: %w", cluster, node, ctx)
	}
	if !lv.Reachable {
		lv.Err = fmt.Sprintf("none of %d pods answered within %s: %v", len(targets), timeout, errors.Join(errs...))
	}
	return lv, nil
}

// recordProbe stores a probe's result.
func (m *gossipMember) recordProbe(lv clustermesh.Liveness, err error, now time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.probes[lv.Cluster]
	if p == nil {
		return
	}
	was := p.down(now)
	p.record(lv, err, now)
	if is := p.down(now); is != was {
		m.log.Info("gossip: control plane probe", "cluster", lv.Cluster, "down", is, "reachable", lv.Reachable,
			"heartbeat", lv.Heartbeat, "took", lv.Took, "err", lv.Err)
	}
	if err != nil {
		m.log.Debug("gossip: control plane probe not made", "cluster", lv.Cluster, "err", err)
	}
}

// waitKey reads the config dir until its files carry a mesh key; nil when
// ctx ended first.
func (m *gossipMember) waitKey(ctx context.Context) []byte {
	said := ""
	t := time.NewTicker(gossipKeyPoll)
	defer t.Stop()
	for {
		key, err := clustermesh.ReadMeshGossipKey(m.configDir)
		if err == nil && key != nil {
			return key
		}
		why := "no mesh key in the cluster files (trellis connect writes one)"
		if err != nil {
			why = err.Error()
		}
		if why != said {
			said = why
			m.setOff(why)
			m.log.Info("no gossip", "why", why)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// waitRegion returns the local cluster's region once its config arrived
// (a cluster may have none), or "" after a few seconds without it.
func (m *gossipMember) waitRegion(ctx context.Context) string {
	deadline := time.Now().Add(gossipRegionWait)
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for time.Now().Before(deadline) {
		for _, c := range m.mesh.Status().Clusters {
			// A cluster ID: its config arrived, region or none.
			if c.Name == m.cluster && (c.Region != "" || c.ClusterID != 0) {
				return c.Region
			}
		}
		select {
		case <-ctx.Done():
			return ""
		case <-t.C:
		}
	}
	return ""
}

// seeds are every other node's first IP on the gossip port.
func (m *gossipMember) seeds(snap *clustermesh.Snapshot) []netip.AddrPort {
	port := m.cfg.Port
	if port == 0 {
		port = gossip.DefaultPort
	}
	var out []netip.AddrPort
	for _, n := range snap.AllNodes() {
		if len(n.IPs) == 0 || (n.Cluster == m.cluster && n.Name == m.node) || n.IPs[0] == m.nodeIP {
			continue
		}
		out = append(out, netip.AddrPortFrom(n.IPs[0], uint16(port)))
	}
	slices.SortFunc(out, netip.AddrPort.Compare)
	return out
}

// judge applies the rule to the member's view, signals a change of the
// trusted dead set, and returns the clusters to probe now (marked
// running).
func (m *gossipMember) judge(g *gossip.Gossip, now time.Time) []string {
	members := g.Members()
	st := GossipStatus{Member: g.Name(), Address: g.LocalAddr().String(), HealthScore: g.HealthScore()}
	m.mu.Lock()
	defer m.mu.Unlock()
	v := decide(members, g.Name(), st.HealthScore, &m.alive, m.probes, m.trusted, now)
	st.Alive, st.Suspect, st.Dead, st.Left = v.alive, v.suspect, v.dead, v.left
	st.DeadMembers, st.Distrust, st.Corroborated = v.deadMembers, v.distrust, v.corroborated
	st.Trusted = st.Distrust == ""
	for _, c := range slices.Sorted(maps.Keys(m.probes)) {
		p := m.probes[c]
		if p.done.IsZero() {
			continue
		}
		st.Probes = append(st.Probes, GossipProbe{Target: c, At: p.done, Took: p.last.Took, Reachable: p.last.Reachable,
			Heartbeat: p.last.Heartbeat, Down: p.down(now), Err: cmp.Or(p.failed, p.last.Err)})
	}
	if !sameNodes(v.trusted, m.trusted) {
		if st.Distrust != m.status.Distrust && st.Distrust != "" {
			m.log.Warn("gossip: ignoring the dead set", "why", st.Distrust, "dead", st.Dead, "corroborated", st.Corroborated)
		}
		m.log.Info("gossip: trusted dead set changed", "dead", nodeNames(v.trusted), "corroborated", st.Corroborated)
		m.trusted = v.trusted
		m.gen++
		defer m.onChange()
	}
	m.status = st
	for _, c := range v.probe {
		if m.probes[c] == nil {
			m.probes[c] = &clusterProbe{}
		}
		m.probes[c].inflight = true
	}
	return v.probe
}

// verdict is rules 1-3 applied to one view of the members.
type verdict struct {
	alive, suspect, dead, left int
	deadMembers                []GossipDead
	// distrust is rule 3's reason to ignore the dead set, "" when trusted.
	distrust string
	// trusted are the dead nodes whose backends leave (cluster → node);
	// corroborated the members among them trusted by rule 2 only (dead
	// and distrusted, or suspect).
	trusted      map[string]map[string]bool
	corroborated []string
	// probe are the clusters whose control plane to probe now.
	probe []string
}

// decide applies the partition rule to members (self is this member's
// name) with this member's health score, the alive samples of rule 3
// (this view's count appended, old ones dropped), the probes of rule 2
// (read only) and the last trusted set.
func decide(members []gossip.Member, self string, healthScore int, samples *[]aliveSample, probes map[string]*clusterProbe,
	last map[string]map[string]bool, now time.Time) verdict {
	var v verdict
	var deaths []time.Time
	dead := make(map[string]map[string]bool)
	// newest is, by cluster, when its latest member turned suspect or dead.
	suspect := make(map[string]time.Time)
	// suspects are the suspect members (this member's own probe of them
	// failed), by cluster.
	suspects := make(map[string]map[string]bool)
	deadAt := make(map[string]time.Time)
	// since is when each suspect or dead member turned so.
	since := make(map[string]time.Time)
	for _, mb := range members {
		cluster, node, ok := strings.Cut(mb.Name, "/")
		switch mb.State {
		case gossip.Alive:
			v.alive++
		case gossip.Suspect:
			v.suspect++
			if ok && mb.Name != self {
				suspect[cluster] = maxTime(suspect[cluster], mb.Since)
				if suspects[cluster] == nil {
					suspects[cluster] = make(map[string]bool)
				}
				suspects[cluster][node] = true
				since[mb.Name] = mb.Since
			}
		case gossip.Dead:
			v.dead++
			v.deadMembers = append(v.deadMembers, GossipDead{Member: mb.Name, Since: mb.Since})
			deaths = append(deaths, mb.Since)
			if ok {
				if dead[cluster] == nil {
					dead[cluster] = make(map[string]bool)
				}
				dead[cluster][node] = true
				deadAt[cluster] = maxTime(deadAt[cluster], mb.Since)
				since[mb.Name] = mb.Since
			}
		case gossip.Left:
			v.left++
		}
	}
	// Suspect members are still there: they count as seen alive.
	*samples = append(*samples, aliveSample{at: now, n: v.alive + v.suspect})
	*samples = slices.DeleteFunc(*samples, func(s aliveSample) bool { return now.Sub(s.at) > gossipAliveWindow })
	v.distrust = distrust(v.alive+v.suspect, v.alive+v.suspect+v.dead, deaths, *samples, healthScore)
	trust := func(cluster, node string) {
		if v.trusted == nil {
			v.trusted = make(map[string]map[string]bool)
		}
		if v.trusted[cluster] == nil {
			v.trusted[cluster] = make(map[string]bool)
		}
		v.trusted[cluster][node] = true
	}
	if v.distrust == "" {
		for cluster, nodes := range dead {
			for n := range nodes {
				trust(cluster, n)
			}
		}
	}
	// Rule 2: a member is dead when the gossip says so, distrusted or
	// not, and when this member's own probe of it failed (Suspect), if
	// its cluster's control plane does not answer either, or its pods do
	// not (a suspect need not wait for its suspicion to time out). Not
	// when this member is the slow one: its probes would time out for
	// the same reason.
	if healthScore < gossipMaxHealthScore {
		for _, member := range slices.Sorted(maps.Keys(since)) {
			c, n, _ := strings.Cut(member, "/")
			cp, np := probes[c], probes[member]
			switch {
			case v.trusted[c][n]:
			case cp.down(now) || np.down(now):
				trust(c, n)
				v.corroborated = append(v.corroborated, member)
			case v.distrust != "" && dead[c][n] && last[c][n] && (cp.running() || np.running()):
				// A node trusted dead before this distrust stays so
				// while its probes run (at most their timeout): the
				// first death of a whole cluster's crash is not put
				// back for the moment between the second death and the
				// probes' answer.
				trust(c, n)
			}
		}
	}
	// Probe a cluster and a member while the member is suspect (ahead of
	// the death the probe may have to corroborate) or dead and
	// distrusted.
	// Not for the slow member (it would ignore the answers); a member's
	// pods not while rule 3 trusts its death, but while a probe's silence
	// corroborates it (else the corroboration would lapse with the last
	// answer, or with the cluster's API server coming back first).
	want := make(map[string]time.Time)
	for member, at := range since {
		c, n, _ := strings.Cut(member, "/")
		if healthScore >= gossipMaxHealthScore || (!suspects[c][n] && v.distrust == "") {
			continue
		}
		want[c] = maxTime(want[c], at)
		if !(v.distrust == "" && dead[c][n]) {
			want[member] = at
		}
	}
	for _, key := range slices.Sorted(maps.Keys(want)) {
		if probes[key].due(now, want[key]) {
			v.probe = append(v.probe, key)
		}
	}
	return v
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// distrust says why the dead set must be ignored (rule 3), "" when it
// may be used. seen is the members alive or suspect now, known those and
// the dead, deaths when each dead one died, samples the seen counts of
// the last minute.
func distrust(seen, known int, deaths []time.Time, samples []aliveSample, healthScore int) string {
	if healthScore >= gossipMaxHealthScore {
		return fmt.Sprintf("this member's health score is %d (>= %d): it is the slow one", healthScore, gossipMaxHealthScore)
	}
	slices.SortFunc(deaths, time.Time.Compare)
	for i := range deaths {
		n := 0
		for j := i; j < len(deaths) && deaths[j].Sub(deaths[i]) <= gossipDeathWindow; j++ {
			n++
		}
		if 3*n > known {
			return fmt.Sprintf("%d of %d members went dead within %s: more likely this member is cut off", n, known, gossipDeathWindow)
		}
	}
	most := 0
	for _, s := range samples {
		most = max(most, s.n)
	}
	if 2*seen < most {
		return fmt.Sprintf("this member sees %d members, fewer than half of the %d it saw in the last minute", seen, most)
	}
	return ""
}

func sameNodes(a, b map[string]map[string]bool) bool {
	return maps.EqualFunc(a, b, func(x, y map[string]bool) bool { return maps.Equal(x, y) })
}

func nodeNames(nodes map[string]map[string]bool) []string {
	var out []string
	for c, ns := range nodes {
		for n := range ns {
			out = append(out, c+"/"+n)
		}
	}
	slices.Sort(out)
	return out
}

// statusOf is the gossip's status; nil when gossip is disabled.
func (m *gossipMember) statusOf() *GossipStatus {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.off != "" {
		return &GossipStatus{Off: m.off}
	}
	st := m.status
	st.DeadMembers = slices.Clone(st.DeadMembers)
	return &st
}

// Validate names a setting that cannot work.
func (c GossipConfig) Validate() error {
	if c.Port < 0 || c.Port > 65535 {
		return errors.New("--gossip-port must be 1-65535 (0: the default)")
	}
	return nil
}
