package gossip

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// DefaultPort is the UDP and TCP port of the gossip: 51872, next to the
// WireGuard device's 51871, so one firewall rule of two adjacent ports
// covers Trellis between nodes; memberlist's own 7946 is Serf's, Consul's
// and Docker Swarm's, which may well run on the same nodes.
const DefaultPort = 51872

// AnyPort asks the kernel for a free port (tests, several members on one
// address).
const AnyPort = -1

// KeySize is the size of the mesh key: AES-256.
const KeySize = 32

// label is sent in the clear in every packet, so a Trellis member and some
// other memberlist pool on the same port refuse each other's traffic
// before trying to decrypt it.
const label = "trellis-mesh-v1"

// Tuned settings for a LAN, with Lifeguard on (memberlist enables its
// three parts by default and we keep them: awareness scales this node's
// probe interval and timeout by up to awarenessMax when it misses nacks,
// i.e. when it is itself slow; suspicion starts long and shortens with
// independent confirmations; and a suspected member hears of it first, so
// it can refute).
//
// Expected detection time of a crashed member, n members (n < 10, so
// memberlist's log10(n) node scale is 1):
//
//   - every member probes one other per probeInterval, in a shuffled
//     round-robin, so with n-1 prober the crashed one is first probed
//     within about probeInterval/2 on average;
//   - that probe fails after probeTimeout, indirect probes through
//     indirectChecks others run to the end of the round: suspicion at
//     one probeInterval after the probe began;
//   - the suspicion timeout is suspicionMult × probeInterval = 450 ms
//     once k = suspicionMult-2 = 1 other member independently confirmed
//     it (which takes about one more probe round among n-2 others), and
//     suspicionMaxMult × that = 1.35 s without a confirmation;
//   - the dead message then reaches everyone within a few gossipInterval
//     (fan-out gossipNodes per interval).
//
// So about 75 + 150 + 450 + 50 ≈ 725 ms with a confirmation, up to ~1.6 s
// without, and the suspicion timeout grows with log10(n) for n ≥ 10 (900
// ms at 100 members). A member this node suspects falsely is told at once
// (the suspect message goes to it with the probe) and has the whole
// suspicion timeout to refute.
//
// Measured (README, Benchmarks, gossip): 0.75 s to every observer on the
// development VM, 0.87 s with its CPUs saturated (medians); no false death among
// member processes under that load. The benchmarks' "steady" tuning
// (200/100 ms, suspicion ×4: ≈1.2 s) is the fallback for nodes whose
// agents stall for hundreds of milliseconds together: with five members
// in one starved process, these settings declared live members dead,
// steady did not.
const (
	probeInterval    = 150 * time.Millisecond
	probeTimeout     = 75 * time.Millisecond
	suspicionMult    = 3
	suspicionMaxMult = 3
	indirectChecks   = 3
	awarenessMax     = 8
	gossipInterval   = 50 * time.Millisecond
	gossipNodes      = 3
	retransmitMult   = 4
	pushPullInterval = 15 * time.Second
	tcpTimeout       = 2 * time.Second
	gossipToTheDead  = 30 * time.Second
)

// tuning is the part of the settings benchmarks compare.
type tuning struct {
	probeInterval, probeTimeout     time.Duration
	suspicionMult, suspicionMaxMult int
}

// lanTuning is the default: sub-second detection on a LAN.
func lanTuning() tuning {
	return tuning{probeInterval, probeTimeout, suspicionMult, suspicionMaxMult}
}

const (
	// rejoinInterval is how often seeds that are not alive members are
	// joined again.
	rejoinInterval = 5 * time.Second
	// leaveTimeout bounds how long Close waits for its leave message to
	// be sent.
	leaveTimeout = time.Second
	// forgetAfter is how long a Dead or Left member stays in the view.
	forgetAfter = time.Hour
	// maxRejectedNames bounds the set of names whose rejection was logged.
	maxRejectedNames = 1024
)

// Config says who this member is and where the pool is.
type Config struct {
	// Cluster, Node and Region are published in the member's metadata;
	// the member name is MemberName(Cluster, Node).
	Cluster string
	Node    string
	Region  string
	// BindAddr is the address to listen on and advertise: the node IP.
	BindAddr netip.Addr
	// Port is the UDP and TCP port; 0 means DefaultPort, AnyPort a free
	// one.
	Port int
	// Key is the mesh key, KeySize bytes: required, a mesh without one is
	// refused.
	Key []byte
	// Seeds are members to join (the other nodes' addresses); SetSeeds
	// replaces them.
	Seeds []netip.AddrPort
	// Logger gets this package's and memberlist's messages; nil means
	// slog.Default().
	Logger *slog.Logger

	// tune overrides lanTuning (benchmarks).
	tune *tuning
}

// State is what this member believes of another.
type State int

const (
	// Alive: answering probes, or not yet suspected.
	Alive State = iota
	// Suspect: a probe of this node failed and the pool has not decided
	// yet. Advisory: it is set from this node's own failed probes and
	// cleared by the next word that the member is alive.
	Suspect
	// Dead: the pool declared it failed.
	Dead
	// Left: it left gracefully (an agent stopping); not a failure.
	Left
)

func (s State) String() string {
	switch s {
	case Alive:
		return "alive"
	case Suspect:
		return "suspect"
	case Dead:
		return "dead"
	case Left:
		return "left"
	}
	return "state(" + strconv.Itoa(int(s)) + ")"
}

// Member is one member as this node sees it.
type Member struct {
	Name string
	Meta
	Addr  netip.AddrPort
	State State
	// Since is when this node saw State begin.
	Since time.Time
	// leaving: its last metadata announced a graceful leave.
	leaving bool
}

// Stats count what this member saw since Start.
type Stats struct {
	// Rejected counts alive messages ignored for their metadata.
	Rejected uint64
	// Suspected counts members this node suspected after its own probe
	// failed.
	Suspected uint64
	// Refuted counts suspicions and death declarations of this node that
	// it refuted: each is another member's false positive about it.
	Refuted uint64
	// Died counts transitions of other members to Dead.
	Died uint64
}

// Gossip is this node's membership in the mesh-wide gossip.
type Gossip struct {
	log  *slog.Logger
	name string
	self Meta
	ml   *memberlist.Memberlist

	mu       sync.Mutex
	meta     []byte // what NodeMeta gives memberlist
	members  map[string]*Member
	seeds    []netip.AddrPort
	stats    Stats
	rejected map[string]bool

	changes chan struct{}
	rejoin  chan struct{}
	noLeave atomic.Bool
	// stopping is set once the pool is being shut down: what memberlist
	// then says of its closed sockets is logged at debug level.
	stopping atomic.Bool
	cancel   context.CancelFunc
	done     chan struct{}
}

// Start joins the pool: it binds the port, starts the probes and joins
// the seeds in the background. It returns once the port is bound; the
// pool stops when ctx is cancelled or Close is called.
func Start(ctx context.Context, cfg Config) (*Gossip, error) {
	name := MemberName(cfg.Cluster, cfg.Node)
	self := Meta{Cluster: cfg.Cluster, Node: cfg.Node, Region: cfg.Region}
	meta, err := self.encode(0)
	if err != nil {
		return nil, fmt.Errorf("gossip: member %s: %w", name, err)
	}
	if err := CheckKey(cfg.Key); err != nil {
		return nil, fmt.Errorf("gossip: member %s: %w", name, err)
	}
	if !cfg.BindAddr.IsValid() || cfg.BindAddr.IsUnspecified() {
		return nil, fmt.Errorf("gossip: member %s: bind address %v: want the node's IP", name, cfg.BindAddr)
	}
	port := cfg.Port
	switch {
	case port == 0:
		port = DefaultPort
	case port == AnyPort:
		port = 0
	case port < 0 || port > 65535:
		return nil, fmt.Errorf("gossip: member %s: port %d out of range", name, cfg.Port)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	g := &Gossip{
		log:      logger.With("component", "gossip"),
		name:     name,
		self:     self,
		meta:     meta,
		members:  make(map[string]*Member),
		seeds:    slices.Clone(cfg.Seeds),
		rejected: make(map[string]bool),
		changes:  make(chan struct{}, 1),
		rejoin:   make(chan struct{}, 1),
		done:     make(chan struct{}),
	}
	mc := memberlist.DefaultLANConfig()
	mc.Name = name
	mc.Label = label
	mc.BindAddr = cfg.BindAddr.String()
	mc.BindPort = port
	mc.AdvertiseAddr = cfg.BindAddr.String()
	mc.AdvertisePort = port
	mc.SecretKey = slices.Clone(cfg.Key)
	mc.GossipVerifyIncoming = true
	mc.GossipVerifyOutgoing = true
	tune := lanTuning()
	if cfg.tune != nil {
		tune = *cfg.tune
	}
	mc.ProbeInterval = tune.probeInterval
	mc.ProbeTimeout = tune.probeTimeout
	mc.SuspicionMult = tune.suspicionMult
	mc.SuspicionMaxTimeoutMult = tune.suspicionMaxMult
	mc.IndirectChecks = indirectChecks
	mc.AwarenessMaxMultiplier = awarenessMax
	mc.GossipInterval = gossipInterval
	mc.GossipNodes = gossipNodes
	mc.RetransmitMult = retransmitMult
	mc.PushPullInterval = pushPullInterval
	mc.TCPTimeout = tcpTimeout
	mc.GossipToTheDeadTime = gossipToTheDead
	mc.DNSConfigPath = ""
	h := hooks{g}
	mc.Delegate = h
	mc.Events = h
	mc.Alive = h
	mc.Logger = log.New(logWriter{g}, "", 0)
	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("gossip: member %s: listen on %s: %w", name, net.JoinHostPort(mc.BindAddr, strconv.Itoa(port)), err)
	}
	g.ml = ml
	ctx, g.cancel = context.WithCancel(ctx)
	go g.run(ctx)
	g.log.Info("gossip started", "member", name, "addr", g.LocalAddr(), "seeds", len(cfg.Seeds))
	return g, nil
}

// LocalAddr is the address and port this member listens on.
func (g *Gossip) LocalAddr() netip.AddrPort {
	n := g.ml.LocalNode()
	a, _ := netip.AddrFromSlice(n.Addr)
	return netip.AddrPortFrom(a.Unmap(), n.Port)
}

// Name is this member's name.
func (g *Gossip) Name() string { return g.name }

// SetSeeds replaces the seeds, the nodes' addresses as Node objects come
// and go; new ones are joined at once, and every seed that is not an
// alive member is joined again every few seconds.
func (g *Gossip) SetSeeds(seeds []netip.AddrPort) {
	g.mu.Lock()
	g.seeds = slices.Clone(seeds)
	g.mu.Unlock()
	select {
	case g.rejoin <- struct{}{}:
	default:
	}
}

// Members returns every member this node knows, itself included, Dead
// and Left ones for an hour, sorted by name.
func (g *Gossip) Members() []Member {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]Member, 0, len(g.members))
	for _, m := range g.members {
		out = append(out, *m)
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Dead returns the members believed dead (not those that left), with
// when this node learned it.
func (g *Gossip) Dead() map[string]time.Time {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make(map[string]time.Time)
	for name, m := range g.members {
		if m.State == Dead {
			out[name] = m.Since
		}
	}
	return out
}

// Changes is signalled (coalescing: one pending signal at most) whenever
// a member's state or metadata changed; read Members or Dead then.
func (g *Gossip) Changes() <-chan struct{} { return g.changes }

// Stats returns the counters.
func (g *Gossip) Stats() Stats {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.stats
}

// HealthScore is Lifeguard's awareness of this node: 0 is healthy; each
// step multiplies its probe interval and timeout.
func (g *Gossip) HealthScore() int { return g.ml.GetHealthScore() }

// Close leaves the pool gracefully (the others see this member Left, not
// Dead) and stops it. Safe on nil and twice.
func (g *Gossip) Close() error {
	if g == nil {
		return nil
	}
	g.cancel()
	<-g.done
	return nil
}

// halt stops the member without leaving, as a crash would: the others
// will declare it dead.
func (g *Gossip) halt() {
	g.noLeave.Store(true)
	g.Close()
}

// run rejoins seeds until ctx ends, then leaves and shuts down.
func (g *Gossip) run(ctx context.Context) {
	defer close(g.done)
	defer func() {
		g.stopping.Store(true)
		if !g.noLeave.Load() {
			g.announceLeave()
			if err := g.ml.Leave(leaveTimeout); err != nil {
				g.log.Warn("gossip: leave", "member", g.name, "err", err)
			}
		}
		if err := g.ml.Shutdown(); err != nil {
			g.log.Warn("gossip: shutdown", "member", g.name, "err", err)
		}
		g.log.Info("gossip stopped", "member", g.name, "left", !g.noLeave.Load())
	}()
	t := time.NewTicker(rejoinInterval)
	defer t.Stop()
	for {
		g.joinSeeds(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-g.rejoin:
		}
	}
}

// announceLeave publishes metadata flagged leaving and waits until it has
// been gossiped: memberlist tells others of a leave and of a death through
// the same hook (NotifyLeave, with no state), so this flag, seen before the
// leave message, is how they tell a leave from a failure.
func (g *Gossip) announceLeave() {
	meta, err := g.self.encode(flagLeaving)
	if err != nil {
		return // validated at Start
	}
	g.mu.Lock()
	g.meta = meta
	g.mu.Unlock()
	if err := g.ml.UpdateNode(leaveTimeout); err != nil {
		g.log.Warn("gossip: announce leave", "member", g.name, "err", err)
	}
}

// joinSeeds joins each seed that is neither this member nor an alive
// member's address, one at a time so that ctx is checked between them.
func (g *Gossip) joinSeeds(ctx context.Context) {
	self := g.LocalAddr()
	g.mu.Lock()
	alive := make(map[netip.AddrPort]bool, len(g.members))
	for _, m := range g.members {
		if m.State == Alive || m.State == Suspect {
			alive[m.Addr] = true
		}
	}
	var todo []netip.AddrPort
	for _, s := range g.seeds {
		if s != self && !alive[s] {
			todo = append(todo, s)
		}
	}
	g.mu.Unlock()
	for _, s := range todo {
		if ctx.Err() != nil {
			return
		}
		if _, err := g.ml.Join([]string{s.String()}); err != nil {
			g.log.Debug("gossip: join seed", "seed", s, "err", err)
		}
	}
}

// set records a member's state; the caller holds g.mu.
func (g *Gossip) set(name string, meta Meta, addr netip.AddrPort, st State) {
	g.setFlags(name, meta, addr, st, 0, false)
}

// setFlags is set that also records the member's flags when haveFlags.
func (g *Gossip) setFlags(name string, meta Meta, addr netip.AddrPort, st State, flags byte, haveFlags bool) {
	now := time.Now()
	m, ok := g.members[name]
	if !ok {
		m = &Member{Name: name}
		g.members[name] = m
	}
	changed := !ok || m.Meta != meta || m.Addr != addr || m.State != st
	m.Meta, m.Addr = meta, addr
	if haveFlags {
		m.leaving = flags&flagLeaving != 0
	}
	if !ok || m.State != st {
		if st == Dead && name != g.name {
			g.stats.Died++
		}
		m.State, m.Since = st, now
		g.log.Debug("gossip: member state", "member", name, "state", st)
	}
	for n, o := range g.members {
		if (o.State == Dead || o.State == Left) && now.Sub(o.Since) > forgetAfter {
			delete(g.members, n)
			changed = true
		}
	}
	if changed {
		g.notify()
	}
}

func (g *Gossip) notify() {
	select {
	case g.changes <- struct{}{}:
	default:
	}
}

// nodeAddr converts memberlist's address.
func nodeAddr(n *memberlist.Node) netip.AddrPort {
	a, _ := netip.AddrFromSlice(n.Addr)
	return netip.AddrPortFrom(a.Unmap(), n.Port)
}

// hooks are memberlist's delegates. memberlist calls the event and alive
// hooks with its node lock held: they must not block or call memberlist.
type hooks struct{ g *Gossip }

// NodeMeta is this member's metadata.
func (h hooks) NodeMeta(limit int) []byte {
	h.g.mu.Lock()
	defer h.g.mu.Unlock()
	if len(h.g.meta) > limit {
		return nil
	}
	return h.g.meta
}

func (hooks) NotifyMsg([]byte)                     {}
func (hooks) GetBroadcasts(_, _ int) [][]byte      { return nil }
func (hooks) LocalState(bool) []byte               { return nil }
func (hooks) MergeRemoteState(_ []byte, join bool) {}

// NotifyAlive vets every alive message before memberlist acts on it: one
// whose metadata is not valid is ignored, so such a member is never
// stored. It also clears a suspicion, as the member evidently speaks.
func (h hooks) NotifyAlive(n *memberlist.Node) error {
	g := h.g
	meta, _, err := decodeMeta(n.Name, n.Meta)
	g.mu.Lock()
	defer g.mu.Unlock()
	if err != nil {
		g.stats.Rejected++
		if !g.rejected[n.Name] && len(g.rejected) < maxRejectedNames {
			g.rejected[n.Name] = true
			g.log.Warn("gossip: ignoring a member with invalid metadata", "member", fmt.Sprintf("%.100q", n.Name), "addr", nodeAddr(n), "err", err)
		}
		return err
	}
	if m, ok := g.members[n.Name]; ok && m.State == Suspect {
		g.set(n.Name, meta, m.Addr, Alive)
	}
	return nil
}

func (h hooks) NotifyJoin(n *memberlist.Node)   { h.event(n, func(*Member) State { return Alive }) }
func (h hooks) NotifyUpdate(n *memberlist.Node) { h.event(n, keepSuspect) }

// NotifyLeave is called for a death and a graceful leave alike (the
// Node's State field is not maintained by memberlist): a member whose
// metadata last said it was leaving has left.
func (h hooks) NotifyLeave(n *memberlist.Node) {
	h.event(n, func(m *Member) State {
		if m != nil && m.leaving {
			return Left
		}
		return Dead
	})
}

func keepSuspect(m *Member) State {
	if m != nil && m.State == Suspect {
		return Suspect
	}
	return Alive
}

// event records n in the state st picks from what we knew of it.
func (h hooks) event(n *memberlist.Node, st func(*Member) State) {
	meta, flags, err := decodeMeta(n.Name, n.Meta)
	if err != nil {
		// NotifyAlive refused it, so memberlist never stored it; this is
		// only a guard.
		return
	}
	g := h.g
	g.mu.Lock()
	defer g.mu.Unlock()
	old := g.members[n.Name]
	next := st(old)
	if next == Left || next == Dead {
		// Keep what we knew: the leave message carries no new metadata.
		g.set(n.Name, meta, nodeAddr(n), next)
		return
	}
	g.setFlags(n.Name, meta, nodeAddr(n), next, flags, true)
}

// logWriter turns memberlist's log lines ("[LEVEL] memberlist: text")
// into slog records, and counts the lines that carry events memberlist
// has no hook for: its own failed probes, and refutations.
type logWriter struct{ g *Gossip }

func (w logWriter) Write(p []byte) (int, error) {
	line := string(bytes.TrimRight(p, "\n"))
	level, msg := slog.LevelInfo, line
	if strings.HasPrefix(line, "[") {
		if i := strings.IndexByte(line, ']'); i > 0 {
			switch line[1:i] {
			case "DEBUG", "TRACE":
				level = slog.LevelDebug
			case "WARN":
				level = slog.LevelWarn
			case "ERR", "ERROR":
				level = slog.LevelError
			}
			msg = strings.TrimSpace(line[i+1:])
		}
	}
	msg = strings.TrimPrefix(msg, "memberlist: ")
	g := w.g
	switch {
	case strings.HasPrefix(msg, "Suspect ") && strings.HasSuffix(msg, " has failed, no acks received"):
		name := strings.TrimSuffix(strings.TrimPrefix(msg, "Suspect "), " has failed, no acks received")
		g.mu.Lock()
		g.stats.Suspected++
		if m, ok := g.members[name]; ok && m.State == Alive {
			g.set(name, m.Meta, m.Addr, Suspect)
		}
		g.mu.Unlock()
	case strings.HasPrefix(msg, "Refuting a suspect message"), strings.HasPrefix(msg, "Refuting a dead message"):
		g.mu.Lock()
		g.stats.Refuted++
		g.mu.Unlock()
	case strings.HasPrefix(msg, "discarding stream with unacceptable label \"\""):
		// A connection closed before it sent anything: a prober that gave
		// up on its TCP ping.
		level = slog.LevelDebug
	case strings.HasPrefix(msg, "ignoring alive message for"):
		// NotifyAlive logged it once per member already.
		level = slog.LevelDebug
	}
	if g.stopping.Load() && level > slog.LevelDebug {
		level = slog.LevelDebug
	}
	g.log.Log(context.Background(), level, "memberlist: "+msg, "member", g.name)
	return len(p), nil
}

// ErrNoKey is returned for a mesh without a key, which is refused.
var ErrNoKey = errors.New("no mesh key (trellis connect writes one into the cluster files)")

// CheckKey says whether key can be the mesh key.
func CheckKey(key []byte) error {
	if len(key) == 0 {
		return ErrNoKey
	}
	if len(key) != KeySize {
		return fmt.Errorf("mesh key of %d bytes, want %d (AES-256)", len(key), KeySize)
	}
	return nil
}
