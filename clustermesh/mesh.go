package clustermesh

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
)

// Config describes an agent's view of the mesh.
type Config struct {
	// LocalCluster is the cluster this agent's node belongs to; its file
	// in ConfigDir is watched like any other.
	LocalCluster string
	// ConfigDir holds one <cluster>.yaml per cluster.
	ConfigDir string
	// LocalNodeIPs are this agent's own node's IPs: no remote cluster's
	// node may claim them.
	LocalNodeIPs []netip.Addr
	// MaxConnectedClusters every cluster must advertise; 255 by default.
	MaxConnectedClusters int
	// PollInterval is how often ConfigDir is re-read; default 1s.
	PollInterval time.Duration
	// ResyncInterval forces a new snapshot (and so a full reconcile pass)
	// this often even without changes; default 5 minutes.
	ResyncInterval time.Duration
	// MaxRetryDelay caps the backoff between connection attempts; 30s.
	MaxRetryDelay time.Duration
	// QPS limits requests per remote etcd; see kvstore.Config.
	QPS     float64
	Logger  *slog.Logger
	Metrics *kvstore.Metrics
}

// Mesh is an agent's connection to every cluster in its config directory.
type Mesh struct {
	cfg   Config
	log   *slog.Logger
	state *state

	mu      sync.Mutex
	remotes map[string]*remote
	files   map[string]loadedFile
	dirErr  error
	scanned bool                        // the config dir was read at least once
	claims  map[string]v1.ClusterConfig // admitted clusters' configs
}

// New checks cfg; nothing runs until Run.
func New(cfg Config) (*Mesh, error) {
	if err := v1.ValidateClusterName(cfg.LocalCluster); err != nil {
		return nil, fmt.Errorf("clustermesh: local cluster: %w", err)
	}
	if cfg.ConfigDir == "" {
		return nil, fmt.Errorf("clustermesh: config dir is required")
	}
	if cfg.MaxConnectedClusters == 0 {
		cfg.MaxConnectedClusters = 255
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = time.Second
	}
	if cfg.ResyncInterval == 0 {
		cfg.ResyncInterval = 5 * time.Minute
	}
	if cfg.MaxRetryDelay == 0 {
		cfg.MaxRetryDelay = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Mesh{
		cfg:     cfg,
		log:     cfg.Logger,
		state:   newState(cfg.LocalCluster, cfg.LocalNodeIPs, cfg.Logger),
		remotes: make(map[string]*remote),
		files:   make(map[string]loadedFile),
		claims:  make(map[string]v1.ClusterConfig),
	}, nil
}

// Snapshot returns the latest merged state.
func (m *Mesh) Snapshot() *Snapshot { return m.state.snap.Load() }

// Subscribe returns a channel signalled after each new snapshot, and a
// function to stop the subscription.
func (m *Mesh) Subscribe() (<-chan struct{}, func()) { return m.state.subscribe() }

// Run watches the config directory and keeps one remote per cluster file
// until ctx ends.
func (m *Mesh) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		m.state.run(ctx, m.cfg.ResyncInterval)
	}()
	t := time.NewTicker(m.cfg.PollInterval)
	defer t.Stop()
	for {
		m.syncDir(ctx)
		select {
		case <-ctx.Done():
			m.mu.Lock()
			remotes := make([]*remote, 0, len(m.remotes))
			for _, r := range m.remotes {
				remotes = append(remotes, r)
			}
			m.mu.Unlock()
			for _, r := range remotes {
				r.cancel()
				<-r.done
			}
			wg.Wait()
			return nil
		case <-t.C:
		}
	}
}

// syncDir starts, restarts and stops remotes to match the directory.
func (m *Mesh) syncDir(ctx context.Context) {
	files, err := scanDir(m.cfg.ConfigDir)
	checkPins(files, m.cfg.LocalCluster)
	m.mu.Lock()
	m.dirErr = err
	if err != nil {
		m.mu.Unlock()
		m.log.Warn("cannot read cluster config dir; keeping current clusters", "err", err)
		return
	}
	var stop []*remote
	var drain []*remote
	for name, r := range m.remotes {
		lf, ok := files[name]
		switch {
		case !ok:
			// File removed: the cluster leaves the mesh.
			stop = append(stop, r)
			drain = append(drain, r)
			delete(m.remotes, name)
		case lf.err != nil:
			// An unreadable edit keeps the last good session rather than
			// dropping the cluster over a typo.
		case lf.hash != m.files[name].hash:
			stop = append(stop, r)
			delete(m.remotes, name)
		}
	}
	var start []*remote
	for name, lf := range files {
		if _, running := m.remotes[name]; running || lf.err != nil {
			continue
		}
		rctx, cancel := context.WithCancel(ctx)
		r := &remote{mesh: m, name: name, file: lf.file, log: m.log.With("cluster", name), cancel: cancel, done: make(chan struct{})}
		// A restarted remote keeps the validated config of the one it
		// replaces so an unchanged ID is not drained.
		if old := m.claims[name]; old.Name != "" {
			cfg := old
			r.config = &cfg
		}
		m.remotes[name] = r
		start = append(start, r)
		go r.run(rctx)
	}
	m.files = files
	m.scanned = true
	m.mu.Unlock()

	for _, r := range stop {
		r.cancel()
		<-r.done
	}
	for _, r := range drain {
		r.log.Info("cluster file removed; draining the cluster")
		r.drain()
	}
	for _, r := range start {
		r.log.Info("cluster file found; connecting")
	}
}

// admit checks a cluster's config against the rest of the mesh and claims
// its ID and pod CIDRs. The local cluster wins a conflict: a remote that
// holds the local cluster's ID or CIDRs is evicted and will report why.
func (m *Mesh) admit(cfg v1.ClusterConfig) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	local := m.cfg.LocalCluster
	want := m.cfg.MaxConnectedClusters
	if lc, ok := m.claims[local]; ok && cfg.Name != local {
		want = lc.Capabilities.MaxConnectedClusters
	}
	if cfg.Capabilities.MaxConnectedClusters != want {
		return fmt.Errorf("cluster %s allows %d connected clusters, this mesh uses %d: every cluster must use the same --max-connected-clusters",
			cfg.Name, cfg.Capabilities.MaxConnectedClusters, want)
	}
	names := make([]string, 0, len(m.claims))
	for n := range m.claims {
		names = append(names, n)
	}
	sort.Strings(names)
	var evict []string
	for _, other := range names {
		oc := m.claims[other]
		if other == cfg.Name {
			continue
		}
		var conflict error
		if oc.ID == cfg.ID {
			conflict = fmt.Errorf("cluster id %d already used by %s: give %s a unique --cluster-id", cfg.ID, other, cfg.Name)
		} else if a, b, overlap := v1.PrefixesOverlap(cfg.PodCIDRs, oc.PodCIDRs); overlap {
			conflict = fmt.Errorf("pod CIDR %s of %s overlaps %s of %s: clusters in a mesh need disjoint pod CIDRs", a, cfg.Name, b, other)
		}
		if conflict == nil {
			continue
		}
		if cfg.Name == local {
			evict = append(evict, other)
			continue
		}
		return conflict
	}
	for _, other := range evict {
		delete(m.claims, other)
		if r := m.remotes[other]; r != nil {
			r.log.Warn("conflicts with the local cluster; disconnecting it", "local", local)
			go m.evict(r)
		}
	}
	m.claims[cfg.Name] = cfg
	return nil
}

// evict drains a remote that lost a conflict to the local cluster and
// restarts it so it reports the conflict.
func (m *Mesh) evict(r *remote) {
	m.state.drain(r.name)
	m.mu.Lock()
	if cur := m.remotes[r.name]; cur == r {
		delete(m.remotes, r.name)
		delete(m.files, r.name) // the next directory pass starts it again
	}
	m.mu.Unlock()
	r.cancel()
	<-r.done
	r.mu.Lock()
	r.config, r.stores = nil, nil
	r.mu.Unlock()
}

// release forgets a cluster's claim.
func (m *Mesh) release(name string) {
	m.mu.Lock()
	delete(m.claims, name)
	m.mu.Unlock()
}

// Ready reports whether the config dir has been read and every cluster in
// it is synced (clusters whose file is unreadable are not waited for). A
// freshly started agent waits for this before it touches the datapath, so
// the first snapshots, still missing whole clusters, never remove state an
// earlier agent left (synced before delete).
func (m *Mesh) Ready() bool {
	m.mu.Lock()
	if !m.scanned {
		m.mu.Unlock()
		return false
	}
	remotes := make([]*remote, 0, len(m.remotes))
	for _, r := range m.remotes {
		remotes = append(remotes, r)
	}
	m.mu.Unlock()
	for _, r := range remotes {
		r.mu.Lock()
		ready := r.stores.ready()
		r.mu.Unlock()
		if !ready {
			return false
		}
	}
	return true
}

// ClusterStatus is one cluster as `trellis status` shows it.
type ClusterStatus struct {
	Name        string         `json:"name"`
	Local       bool           `json:"local,omitempty"`
	ClusterID   uint32         `json:"clusterID,omitempty"`
	Region      string         `json:"region,omitempty"`
	Connected   bool           `json:"connected"`
	Ready       bool           `json:"ready"`
	SyncedKinds []string       `json:"syncedKinds,omitempty"`
	Entries     map[string]int `json:"entries,omitempty"`
	// Rejected counts the entries the cluster published that failed
	// validation, by reason, since the agent started.
	Rejected map[string]uint64 `json:"rejected,omitempty"`
	// Encryption is the cluster's published encryption setting ("" off).
	Encryption string `json:"encryption,omitempty"`
	// Excluded counts the cluster's nodes that decoded but are kept out of
	// the merged state now, by reason (a node IP another node holds).
	Excluded    map[string]int `json:"excluded,omitempty"`
	LastError   string         `json:"lastError,omitempty"`
	LastErrorAt time.Time      `json:"lastErrorAt,omitzero"`
}

// ServiceStatus is one merged service as `trellis status` shows it.
type ServiceStatus struct {
	Service  string      `json:"service"`
	Global   bool        `json:"global"`
	Affinity v1.Affinity `json:"affinity"`
	// FailoverRegions is the region order in force (trellis.io/failover-regions).
	FailoverRegions []string            `json:"failoverRegions,omitempty"`
	Frontend        []string            `json:"frontends,omitempty"`
	Active          map[string][]string `json:"activeBackends"` // cluster → backend IPs carrying traffic
	Offered         map[string]int      `json:"offered"`        // cluster → active backends offered
}

// Status is the whole view.
type Status struct {
	LocalCluster    string          `json:"localCluster"`
	SnapshotVersion uint64          `json:"snapshotVersion"`
	ConfigDirError  string          `json:"configDirError,omitempty"`
	Clusters        []ClusterStatus `json:"clusters"`
	Services        []ServiceStatus `json:"services"`
}

// Status reports every cluster and global service.
func (m *Mesh) Status() Status {
	m.mu.Lock()
	st := Status{LocalCluster: m.cfg.LocalCluster}
	if m.dirErr != nil {
		st.ConfigDirError = m.dirErr.Error()
	}
	remotes := make([]*remote, 0, len(m.remotes))
	for _, r := range m.remotes {
		remotes = append(remotes, r)
	}
	var broken []ClusterStatus
	for name, lf := range m.files {
		if lf.err != nil {
			if _, running := m.remotes[name]; !running {
				broken = append(broken, ClusterStatus{Name: name, LastError: "cluster file: " + lf.err.Error()})
			}
		}
	}
	m.mu.Unlock()
	excluded := m.state.excludedNodes()
	for _, r := range remotes {
		cs := r.status()
		cs.Excluded = excluded[r.name]
		st.Clusters = append(st.Clusters, cs)
	}
	st.Clusters = append(st.Clusters, broken...)
	slices.SortFunc(st.Clusters, func(a, b ClusterStatus) int {
		if a.Local != b.Local {
			if a.Local {
				return -1
			}
			return 1
		}
		return strings.Compare(a.Name, b.Name)
	})

	snap := m.Snapshot()
	st.SnapshotVersion = snap.Version
	for _, svc := range snap.Services {
		ss := ServiceStatus{Service: svc.ServiceName.String(), Global: svc.Global, Affinity: svc.Affinity,
			FailoverRegions: slices.Clone(svc.FailoverRegions), Active: map[string][]string{}, Offered: svc.Offered}
		for _, ip := range svc.FrontendIPs {
			ss.Frontend = append(ss.Frontend, ip.String())
		}
		for _, b := range svc.Backends {
			ss.Active[b.Cluster] = append(ss.Active[b.Cluster], b.IP.String())
		}
		st.Services = append(st.Services, ss)
	}
	slices.SortFunc(st.Services, func(a, b ServiceStatus) int { return strings.Compare(a.Service, b.Service) })
	return st
}
