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
//     member Alive again leaves the set at once (rule 5). Rule 2's
//     corroboration (by the node's own cluster) is not built.
//   - Use: every change of the trusted set triggers an apply at once; the
//     apply hands the datapath clustermesh's SnapshotExcluding of the
//     trusted dead nodes: their backends left out before the merge's
//     choice of group, and never a service emptied (rule 4).

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

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
}

type aliveSample struct {
	at time.Time
	n  int
}

func newGossipMember(cfg Config, mesh *clustermesh.Mesh, onChange func(), log *slog.Logger) *gossipMember {
	return &gossipMember{
		cfg: cfg.Gossip, cluster: cfg.ClusterName, node: cfg.NodeName, nodeIP: cfg.NodeIP,
		configDir: cfg.ConfigDir, mesh: mesh, onChange: onChange, log: log.With("component", "gossip"),
		off: "starting",
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
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
			g.SetSeeds(m.seeds(m.mesh.Snapshot()))
		case <-g.Changes():
		case <-tick.C:
		}
		m.judge(g, time.Now())
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

// judge applies the rule to the member's view and signals a change of
// the trusted dead set.
func (m *gossipMember) judge(g *gossip.Gossip, now time.Time) {
	members := g.Members()
	st := GossipStatus{Member: g.Name(), Address: g.LocalAddr().String(), HealthScore: g.HealthScore()}
	var deaths []time.Time
	dead := make(map[string]map[string]bool)
	for _, mb := range members {
		switch mb.State {
		case gossip.Alive:
			st.Alive++
		case gossip.Suspect:
			st.Suspect++
		case gossip.Dead:
			st.Dead++
			st.DeadMembers = append(st.DeadMembers, GossipDead{Member: mb.Name, Since: mb.Since})
			deaths = append(deaths, mb.Since)
			if cluster, node, ok := strings.Cut(mb.Name, "/"); ok {
				if dead[cluster] == nil {
					dead[cluster] = make(map[string]bool)
				}
				dead[cluster][node] = true
			}
		case gossip.Left:
			st.Left++
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	// Suspect members are still there: they count as seen alive.
	m.alive = append(m.alive, aliveSample{at: now, n: st.Alive + st.Suspect})
	m.alive = slices.DeleteFunc(m.alive, func(s aliveSample) bool { return now.Sub(s.at) > gossipAliveWindow })
	st.Distrust = distrust(st.Alive+st.Suspect, st.Alive+st.Suspect+st.Dead, deaths, m.alive, st.HealthScore)
	st.Trusted = st.Distrust == ""
	var trusted map[string]map[string]bool
	if st.Trusted && len(dead) > 0 {
		trusted = dead
	}
	if !sameNodes(trusted, m.trusted) {
		if st.Distrust != m.status.Distrust && st.Distrust != "" {
			m.log.Warn("gossip: ignoring the dead set", "why", st.Distrust, "dead", st.Dead)
		}
		m.log.Info("gossip: trusted dead set changed", "dead", nodeNames(trusted))
		m.trusted = trusted
		m.gen++
		defer m.onChange()
	}
	m.status = st
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
