package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/client-go/kubernetes"

	"github.com/trellis-mesh/trellis/api/client"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/kvstore"
)

// Config describes one node's agent.
type Config struct {
	NodeName    string
	ClusterName string
	// ConfigDir holds one file per cluster (the local one included).
	ConfigDir string
	// StateDir holds the agent's own state; pods/ under it is where the
	// node's CNI step (the lab's) drops pod files in standalone mode.
	StateDir string
	// StatusSocket is the unix socket `trellis status` talks to.
	StatusSocket string
	// MetricsListen, when set, serves /metrics over TCP for Prometheus,
	// and the status as JSON at /v1/status (read-only, unauthenticated:
	// bind it to the node's or pod's network only). The status socket
	// serves both too, to root only.
	MetricsListen string

	// Kubernetes, when set, is Kubernetes mode: the agent follows the
	// pods scheduled on NodeName and marks their trellis.io/healthy
	// condition (kubernetes.go); Config.FromKubernetes fills NodeIP and
	// PodCIDRs from the Node. Nil is standalone mode.
	Kubernetes kubernetes.Interface

	// RegistryURL is the local mesh API server's HTTP address; empty
	// skips registration (a Kubernetes cluster, where the API server's
	// informers see the node and pods).
	RegistryURL string
	// RegistryCAFile is the local API server's server CA (its
	// <state-dir>/pki/ca.crt), which the agent verifies it with.
	RegistryCAFile string
	// RegistryTokenFile holds this node's credential for the registry
	// (trellis apiserver issue-node-credential): it may register this
	// node and its pods, nothing else.
	RegistryTokenFile string
	NodeIP            netip.Addr
	PodCIDRs          []netip.Prefix

	MaxConnectedClusters int
	// InitialSyncTimeout bounds how long a starting agent waits for every
	// cluster to sync before it first programs the datapath; default 60s.
	InitialSyncTimeout time.Duration
	// Health probes the node's pods (those under <StateDir>/pods/); the
	// zero value probes nothing.
	Health HealthConfig
	// Gossip is the mesh-wide gossip (on by default, when the cluster
	// files carry a mesh key).
	Gossip GossipConfig
	Logger *slog.Logger
}

// Validate names each missing or inconsistent setting.
func (c *Config) Validate() error {
	var errs []error
	if c.NodeName == "" {
		errs = append(errs, errors.New("--node-name is required"))
	}
	if err := v1.ValidateClusterName(c.ClusterName); err != nil {
		errs = append(errs, fmt.Errorf("--cluster-name: %w", err))
	}
	if c.ConfigDir == "" {
		errs = append(errs, errors.New("--config-dir is required (one file per cluster; `trellis connect` writes them)"))
	}
	if c.StateDir == "" {
		errs = append(errs, errors.New("--state-dir is required"))
	}
	if err := c.Health.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Gossip.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.Kubernetes != nil && c.RegistryURL != "" {
		errs = append(errs, errors.New("--registry-url is for standalone mode; with --kubernetes the mesh API server's Kubernetes source sees the node and its pods"))
	}
	if c.RegistryURL != "" {
		if c.RegistryTokenFile == "" {
			errs = append(errs, errors.New("--registry-token-file is required with --registry-url (the node's credential: trellis apiserver issue-node-credential)"))
		}
		if strings.HasPrefix(c.RegistryURL, "https://") && c.RegistryCAFile == "" {
			errs = append(errs, errors.New("--registry-ca-file is required with an https --registry-url (the API server's <state-dir>/pki/ca.crt): the agent verifies the server"))
		}
		if !c.NodeIP.IsValid() {
			errs = append(errs, errors.New("--node-ip is required with --registry-url (the address other nodes tunnel to)"))
		}
	}
	return errors.Join(errs...)
}

// DefaultStatusSocket is where the agent serves its status and where
// `trellis status` looks, unless told otherwise.
const DefaultStatusSocket = "/var/run/trellis/agent.sock"

// Datapath programs the node from a merged snapshot. Apply gets the full
// desired state every time and must converge idempotently.
type Datapath interface {
	Apply(ctx context.Context, snap *clustermesh.Snapshot) error
}

// keyPublisher is a datapath with a key for the node to publish.
type keyPublisher interface {
	Published() (NodeKeys, <-chan struct{})
}

// encryptingDatapath is a datapath with an encryption step.
type encryptingDatapath interface {
	EncryptionStatus() *EncryptionStatus
	RotateKey() error
}

// retryingDatapath is a datapath that may want another apply although
// nothing changed.
type retryingDatapath interface {
	RetryIn() time.Duration
}

// Agent is one node's daemon.
type Agent struct {
	cfg      Config
	log      *slog.Logger
	mesh     *clustermesh.Mesh
	datapath Datapath
	// metrics are served on the status socket at /metrics (and on
	// MetricsListen): the mesh's store operations and rejections, what
	// the applies served, local health, gossip, and the process.
	metrics *prometheus.Registry
	applies *applyMetrics

	// kick asks the reconcile loop for an apply now (a key rotation, a
	// change of local health).
	kick chan struct{}
	// health probes the node's endpoints; nil when off.
	health *healthChecker
	// registered receives after an apply that took in a change of local
	// health: the registrar then tells the registry.
	registered chan struct{}
	// gossip is this node's member of the mesh-wide gossip; nil when off.
	gossip *gossipMember
	// kube follows the node's pods in Kubernetes mode; nil otherwise.
	kube *kubePods

	mu sync.Mutex
	// exclusion is what the last apply left out for the gossip's dead set.
	excluding   []string
	exclusion   clustermesh.Exclusion
	applied     uint64
	applyErr    error
	applyErrAt  time.Time
	lastApplied time.Time
}

// New checks cfg and builds the agent. datapath may be nil (no kernel
// programming: status only).
func New(cfg Config, datapath Datapath) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	if cfg.StatusSocket == "" {
		cfg.StatusSocket = DefaultStatusSocket
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.InitialSyncTimeout == 0 {
		cfg.InitialSyncTimeout = time.Minute
	}
	log := cfg.Logger.With("node", cfg.NodeName)
	metrics := prometheus.NewRegistry()
	metrics.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	var localIPs []netip.Addr
	if cfg.NodeIP.IsValid() {
		localIPs = append(localIPs, cfg.NodeIP)
	}
	mesh, err := clustermesh.New(clustermesh.Config{
		LocalCluster: cfg.ClusterName, ConfigDir: cfg.ConfigDir, LocalNodeIPs: localIPs,
		MaxConnectedClusters: cfg.MaxConnectedClusters, Logger: log, Metrics: kvstore.NewMetrics(metrics),
	})
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	metrics.MustRegister(mesh.Collector())
	a := &Agent{cfg: cfg, log: log, mesh: mesh, datapath: datapath, metrics: metrics,
		applies: newApplyMetrics(cfg.ClusterName),
		kick:    make(chan struct{}, 1), registered: make(chan struct{}, 1)}
	metrics.MustRegister(a.applies.collectors()...)
	metrics.MustRegister(newStateCollector(a))
	pods := podsDirLister(filepath.Join(cfg.StateDir, "pods"))
	if cfg.Kubernetes != nil {
		a.kube = newKubePods(cfg.Kubernetes, cfg.NodeName, log)
		pods = a.kube.list
	}
	if cfg.Health.Interval > 0 {
		a.health = newHealthChecker(cfg.Health, pods, mesh.Snapshot, func() { notify(a.kick) }, log)
	}
	if !cfg.Gossip.Disabled {
		a.gossip = newGossipMember(cfg, mesh, func() { notify(a.kick) }, log)
	}
	return a, nil
}

// notify sends on a channel of capacity one without blocking.
func notify(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Mesh exposes the agent's view of the mesh.
func (a *Agent) Mesh() *clustermesh.Mesh { return a.mesh }

// Run runs the agent until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	if err := os.MkdirAll(a.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("agent: --state-dir %s: %w", a.cfg.StateDir, err)
	}
	ln, err := listenUnix(a.cfg.StatusSocket)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: a.statusHandler(), ReadHeaderTimeout: 5 * time.Second}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	goRun := func(fn func()) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn()
		}()
	}
	goRun(func() { a.mesh.Run(ctx) })
	goRun(func() { srv.Serve(ln) })
	servers := []*http.Server{srv}
	if a.cfg.MetricsListen != "" {
		mln, err := net.Listen("tcp", a.cfg.MetricsListen)
		if err != nil {
			cancel()
			srv.Close()
			wg.Wait()
			return fmt.Errorf("agent: --metrics-listen %s: %w", a.cfg.MetricsListen, err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(a.metrics, promhttp.HandlerOpts{}))
		// Read-only: the status of a Helm-deployed agent, which has no
		// shell to run `trellis status` in. Nothing that changes state
		// (key rotation) is served here: that stays on the socket.
		mux.HandleFunc("GET /v1/status", a.serveStatus)
		msrv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
			WriteTimeout: 30 * time.Second, IdleTimeout: time.Minute, MaxHeaderBytes: 16 << 10}
		servers = append(servers, msrv)
		goRun(func() { msrv.Serve(mln) })
		a.log.Info("serving metrics", "address", mln.Addr().String())
	}
	goRun(func() {
		<-ctx.Done()
		shutdown, c := context.WithTimeout(context.Background(), 2*time.Second)
		defer c()
		for _, s := range servers {
			s.Shutdown(shutdown)
		}
	})
	if a.cfg.RegistryURL != "" {
		reg, err := a.newRegistrar()
		if err != nil {
			cancel()
			wg.Wait()
			return err
		}
		goRun(func() { reg.run(ctx, 500*time.Millisecond) })
	}
	if a.kube != nil {
		a.kube.start(ctx)
		goRun(func() {
			<-ctx.Done()
			a.kube.wait()
		})
		if a.health != nil {
			goRun(func() { a.kube.markRun(ctx, a.health, a.registered) })
		}
		// The node's encryption keys go on its Node, where the
		// Kubernetes source reads them (the registrar's job standalone);
		// a datapath that cannot encrypt publishes none, which clears
		// keys an earlier agent left.
		keys := func() (NodeKeys, <-chan struct{}) { return NodeKeys{}, nil }
		if p, ok := a.datapath.(keyPublisher); ok {
			keys = p.Published
		}
		goRun(func() { a.kube.keysRun(ctx, keys) })
	}
	if a.health != nil {
		goRun(func() { a.health.run(ctx) })
	}
	if a.gossip != nil {
		goRun(func() { a.gossip.run(ctx) })
	}
	goRun(func() { a.reconcile(ctx) })
	a.log.Info("agent running", "cluster", a.cfg.ClusterName, "status", a.cfg.StatusSocket)
	<-ctx.Done()
	wg.Wait()
	os.Remove(a.cfg.StatusSocket)
	return nil
}

// newRegistrar connects to the local registry (standalone mode).
func (a *Agent) newRegistrar() (*registrar, error) {
	token, err := client.ReadToken(a.cfg.RegistryTokenFile)
	if err != nil {
		return nil, fmt.Errorf("agent: --registry-token-file: %w", err)
	}
	var ca []byte
	if a.cfg.RegistryCAFile != "" {
		if ca, err = os.ReadFile(a.cfg.RegistryCAFile); err != nil {
			return nil, fmt.Errorf("agent: --registry-ca-file: %w", err)
		}
	}
	api, err := client.New(client.Config{URL: a.cfg.RegistryURL, CAPEM: ca, Token: token, Timeout: 10 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("agent: --registry-url: %w", err)
	}
	var keys func() (NodeKeys, <-chan struct{})
	if p, ok := a.datapath.(keyPublisher); ok {
		keys = p.Published
	}
	return &registrar{
		api: api, keys: keys,
		node: a.cfg.NodeName, nodeIP: a.cfg.NodeIP, podCIDRs: a.cfg.PodCIDRs,
		podsDir: filepath.Join(a.cfg.StateDir, "pods"), log: a.log,
		registered: make(map[string]PodFile), kick: a.registered,
		down: a.health.isDown,
	}, nil
}

// reconcile hands every new snapshot to the datapath; a failed apply is
// retried with the latest snapshot.
func (a *Agent) reconcile(ctx context.Context) {
	changed, unsubscribe := a.mesh.Subscribe()
	defer unsubscribe()
	if !a.waitMeshReady(ctx) {
		return
	}
	retry := time.NewTimer(time.Hour)
	defer retry.Stop()
	var healthGen uint64
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-retry.C:
		case <-a.kick:
		}
		// The nodes the gossip says are dead (and that it trusts) leave
		// every service before the merge's choice of group; no service is
		// emptied (see gossip.go).
		dead, _ := a.gossip.deadNodes()
		snap, exclusion := a.mesh.SnapshotExcluding(dead)
		// Endpoints local health probes down leave the datapath at once,
		// before the registry hears of them (see health.go).
		down, gen := a.health.down()
		var err error
		applied := withoutDown(snap, down)
		if a.datapath != nil {
			err = a.datapath.Apply(ctx, applied)
		}
		if err == nil {
			a.applies.observe(applied)
		}
		if gen != healthGen {
			healthGen = gen
			notify(a.registered)
		}
		a.mu.Lock()
		if err != nil {
			if a.applyErr == nil || a.applyErr.Error() != err.Error() {
				a.log.Warn("datapath apply failed; retrying", "version", snap.Version, "err", err)
			}
			a.applyErr, a.applyErrAt = err, time.Now()
			retry.Reset(time.Second)
		} else {
			a.applied, a.lastApplied, a.applyErr = snap.Version, time.Now(), nil
			a.excluding, a.exclusion = nodeNames(dead), exclusion
		}
		if r, ok := a.datapath.(retryingDatapath); ok {
			if d := r.RetryIn(); d > 0 && (err == nil || d < time.Second) {
				retry.Reset(d)
			}
		}
		a.mu.Unlock()
	}
}

// waitMeshReady holds the first datapath apply until every cluster is
// synced, or InitialSyncTimeout passes (a cluster that cannot be reached
// must not keep the others off the node forever). The datapath an earlier
// agent pinned keeps serving meanwhile: applying an early, partial
// snapshot would remove services and routes for a moment on every restart.
func (a *Agent) waitMeshReady(ctx context.Context) bool {
	deadline := time.Now().Add(a.cfg.InitialSyncTimeout)
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for !a.mesh.Ready() {
		if time.Now().After(deadline) {
			a.log.Warn("not every cluster synced in time; programming the datapath with what is known", "timeout", a.cfg.InitialSyncTimeout)
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
		}
	}
	a.log.Info("every cluster synced; programming the datapath")
	return true
}

// listenUnix removes a stale socket left by a crashed agent, then listens.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("agent: status socket dir: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("agent: status socket %s is in use: is another agent running for this node?", path)
	}
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("agent: status socket %s: %w", path, err)
	}
	return ln, nil
}

// Status is what `trellis status` shows.
type Status struct {
	Node    string `json:"node"`
	Cluster string `json:"cluster"`
	clustermesh.Status
	AppliedVersion   uint64    `json:"appliedVersion"`
	LastApplied      time.Time `json:"lastApplied,omitzero"`
	DatapathError    string    `json:"datapathError,omitempty"`
	DatapathErrorAt  time.Time `json:"datapathErrorAt,omitzero"`
	DatapathDisabled bool      `json:"datapathDisabled,omitempty"`
	// Encryption is the node's encryption and each peer's path; nil when
	// the agent runs without an encryption step.
	Encryption *EncryptionStatus `json:"encryption,omitempty"`
	// Health is local health: the node's endpoints the agent probes; nil
	// when probing is off.
	Health *HealthStatus `json:"health,omitempty"`
	// Gossip is the mesh-wide gossip as this node sees it; nil when
	// disabled (--gossip=false).
	Gossip *GossipStatus `json:"gossip,omitempty"`
	// NodeIP and PodCIDRs are the node's addressing as the agent uses it
	// (flags, or in Kubernetes mode the Node object).
	NodeIP   netip.Addr     `json:"nodeIP,omitzero"`
	PodCIDRs []netip.Prefix `json:"podCIDRs,omitempty"`
	// Kubernetes is Kubernetes mode; nil in standalone mode.
	Kubernetes *KubernetesStatus `json:"kubernetes,omitempty"`
}

// Status reports the agent's view.
func (a *Agent) Status() Status {
	st := Status{Node: a.cfg.NodeName, Cluster: a.cfg.ClusterName, Status: a.mesh.Status(), DatapathDisabled: a.datapath == nil,
		NodeIP: a.cfg.NodeIP, PodCIDRs: a.cfg.PodCIDRs, Kubernetes: a.kube.status()}
	a.mu.Lock()
	defer a.mu.Unlock()
	st.AppliedVersion, st.LastApplied = a.applied, a.lastApplied
	if a.applyErr != nil {
		st.DatapathError, st.DatapathErrorAt = a.applyErr.Error(), a.applyErrAt
	}
	if e, ok := a.datapath.(encryptingDatapath); ok {
		st.Encryption = e.EncryptionStatus()
	}
	st.Health = a.health.status()
	if st.Gossip = a.gossip.statusOf(); st.Gossip != nil {
		st.Gossip.Excluding = a.excluding
		for _, n := range a.exclusion.Kept {
			st.Gossip.Kept = append(st.Gossip.Kept, n.String())
		}
	}
	return st
}

// RotateKey gives this node a new WireGuard key at once (the next apply
// replaces it on the device and publishes it).
func (a *Agent) RotateKey() error {
	e, ok := a.datapath.(encryptingDatapath)
	if !ok {
		return errors.New("this agent runs without an encryption step")
	}
	if err := e.RotateKey(); err != nil {
		return err
	}
	notify(a.kick)
	return nil
}

func (a *Agent) statusHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", a.serveStatus)
	mux.HandleFunc("POST /v1/encryption/rotate", func(w http.ResponseWriter, _ *http.Request) {
		if err := a.RotateKey(); err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		w.WriteHeader(http.StatusAccepted)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.metrics, promhttp.HandlerOpts{}))
	return mux
}

func (a *Agent) serveStatus(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(a.Status())
}

// socketClient talks HTTP to the agent behind its status socket.
func socketClient(socket string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}, Timeout: 10 * time.Second}
}

// RequestKeyRotation asks the agent behind socket to give its node a new
// WireGuard key.
func RequestKeyRotation(ctx context.Context, socket string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://agent/v1/encryption/rotate", nil)
	if err != nil {
		return err
	}
	resp, err := socketClient(socket).Do(req)
	if err != nil {
		return fmt.Errorf("agent status socket %s: %w (is the agent running?)", socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("agent refused the rotation: %s", strings.TrimSpace(string(msg)))
	}
	return nil
}

// FetchStatus asks the agent behind socket for its status.
func FetchStatus(ctx context.Context, socket string) (Status, error) {
	client := socketClient(socket)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/v1/status", nil)
	if err != nil {
		return Status{}, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return Status{}, fmt.Errorf("agent status socket %s: %w (is the agent running?)", socket, err)
	}
	defer resp.Body.Close()
	var st Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return Status{}, fmt.Errorf("agent status: %w", err)
	}
	return st, nil
}
