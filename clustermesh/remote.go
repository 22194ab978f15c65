package clustermesh

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"sort"
	"sync"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
)

// remote is one cluster of the config directory: a loop that connects,
// validates, and runs the cluster's WatchStores until its file changes or
// goes away.
type remote struct {
	mesh *Mesh
	name string
	file ClusterFile
	log  *slog.Logger

	cancel context.CancelFunc
	done   chan struct{}

	mu        sync.Mutex
	config    *v1.ClusterConfig // last validated config
	connected bool
	lastErr   error
	lastErrAt time.Time
	stores    *storeSet
}

// storeSet is one session's WatchStores.
type storeSet struct {
	nodes      *kvstore.WatchStore[v1.Node]
	endpoints  *kvstore.WatchStore[v1.Endpoint]
	identities *kvstore.WatchStore[v1.Identity]
	services   *kvstore.WatchStore[v1.Service]
	// backends is nil for a cluster that does not advertise backend
	// shards.
	backends *kvstore.WatchStore[v1.BackendShard]
}

func (s *storeSet) ready() bool {
	return s != nil && s.nodes.Synced() && s.endpoints.Synced() && s.identities.Synced() && s.servicesSynced()
}

// servicesSynced: the services and, when the cluster has them, their
// backend shards.
func (s *storeSet) servicesSynced() bool {
	return s.services.Synced() && (s.backends == nil || s.backends.Synced())
}

// errConfigChanged ends a session so the next one re-validates.
var errConfigChanged = errors.New("cluster-config changed")

func (r *remote) setErr(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lastErr, r.lastErrAt = err, time.Now()
	if err != nil {
		r.connected = false
	}
}

// run keeps a session going until ctx ends.
func (r *remote) run(ctx context.Context) {
	defer close(r.done)
	delay := time.Second
	for {
		err := r.session(ctx)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errConfigChanged) {
			r.log.Info("cluster-config changed; validating again")
			delay = time.Second
			continue
		}
		r.setErr(err)
		r.log.Warn("cluster not connected", "err", err, "retry", delay)
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, r.mesh.cfg.MaxRetryDelay)
	}
}

// session connects, validates the cluster-config, and runs the stores
// until the config changes or ctx ends.
func (r *remote) session(ctx context.Context) error {
	tlsCfg, err := r.file.TLSConfig()
	if err != nil {
		return fmt.Errorf("cluster file: %w", err)
	}
	client, err := kvstore.NewClient(kvstore.Config{
		Endpoints: r.file.Endpoints, TLS: tlsCfg,
		DialTimeout: 5 * time.Second, RequestTimeout: 15 * time.Second,
		QPS: r.mesh.cfg.QPS, Logger: r.log, Metrics: r.mesh.cfg.Metrics,
	})
	if err != nil {
		return err
	}
	defer client.Close()

	cfg, err := r.fetchConfig(ctx, client, tlsCfg)
	if err != nil {
		return err
	}
	// Before anything is drained or admitted: a cluster that publishes
	// other than its pin keeps what it had (last known state), gains
	// nothing, and says why in status.
	if err := r.file.checkPin(cfg); err != nil {
		return err
	}
	r.mu.Lock()
	prev := r.config
	r.mu.Unlock()
	if prev != nil && prev.ID != cfg.ID {
		// A new ID is a new identity space: everything learned under the
		// old one goes.
		r.log.Warn("cluster ID changed; draining its entries", "old", prev.ID, "new", cfg.ID)
		r.drain()
	}
	if err := r.mesh.admit(cfg); err != nil {
		return err
	}
	r.mesh.state.setCluster(cfg)
	r.mesh.state.setEncryption(r.name, cfg.Encryption)
	r.mu.Lock()
	r.config = &cfg
	r.connected = true
	r.lastErr = nil
	r.mu.Unlock()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stores, run, err := r.newStores(client, cfg)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.stores = stores
	r.mu.Unlock()
	var wg sync.WaitGroup
	for _, fn := range run {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(ctx)
		}()
	}
	defer wg.Wait()
	defer cancel()
	return r.watchConfig(ctx, client, cfg)
}

// fetchConfig reads and validates the cluster's published config. When
// etcd cannot be reached it probes TLS directly, because etcd's client
// hides a handshake failure behind a timeout.
func (r *remote) fetchConfig(ctx context.Context, client *kvstore.Client, tlsCfg *tls.Config) (v1.ClusterConfig, error) {
	key := v1.ClusterConfigKey(r.name)
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	kv, _, err := client.Get(rctx, key)
	cancel()
	if err != nil {
		if probe := probeTLS(ctx, r.file.Endpoints, tlsCfg); probe != nil {
			return v1.ClusterConfig{}, probe
		}
		return v1.ClusterConfig{}, fmt.Errorf("read %s from %v: %w", key, r.file.Endpoints, err)
	}
	if kv == nil {
		return v1.ClusterConfig{}, fmt.Errorf("cluster %s has not published %s: is its mesh API server running against this etcd?", r.name, key)
	}
	cfg, err := v1.DecodeClusterConfigEntry(key, kv.Value)
	if err != nil {
		return cfg, fmt.Errorf("cluster-config of %s: %w", r.name, err)
	}
	return cfg, nil
}

// probeTLS dials the first endpoint and returns a TLS handshake error, or
// nil when the handshake works (or TLS is not in use).
func probeTLS(ctx context.Context, endpoints []string, cfg *tls.Config) error {
	if cfg == nil || len(endpoints) == 0 {
		return nil
	}
	u, err := url.Parse(endpoints[0])
	if err != nil || u.Scheme != "https" {
		return nil
	}
	cfg = cfg.Clone()
	cfg.ServerName = u.Hostname()
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", u.Host)
	if err != nil {
		var netErr *net.OpError
		if errors.As(err, &netErr) && netErr.Op == "dial" {
			return fmt.Errorf("cannot reach %s: %w", u.Host, err)
		}
		return fmt.Errorf("TLS: %w", err)
	}
	// The server checks our certificate after the handshake completes on
	// our side; a read surfaces its rejection.
	conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	var b [1]byte
	_, rerr := conn.Read(b[:])
	conn.Close()
	if rerr != nil && !isTimeout(rerr) && !errors.Is(rerr, net.ErrClosed) {
		return fmt.Errorf("TLS: the server refused our client certificate: %w", rerr)
	}
	return nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// newStores creates the session's WatchStores with decoders bound to the
// validated config.
func (r *remote) newStores(client *kvstore.Client, cfg v1.ClusterConfig) (*storeSet, []func(context.Context), error) {
	val := validator{cfg: cfg}
	canary := func(kind v1.Kind) string {
		if cfg.Capabilities.SyncedCanaries {
			return v1.SyncedKey(cfg.Name, kind)
		}
		return ""
	}
	st := r.mesh.state
	set := &storeSet{}
	var err error
	if set.nodes, err = kvstore.NewWatchStore(client, kvstore.WatchStoreConfig[v1.Node]{
		Prefix: v1.KindPrefix(v1.KindNodes, cfg.Name), SyncedKey: canary(v1.KindNodes), Name: cfg.Name + "/nodes",
		Decode: val.node, Reason: reason,
		Observer: nodeObserver{cluster: cfg.Name, state: st, store: func() *kvstore.WatchStore[v1.Node] { return set.nodes }},
	}); err != nil {
		return nil, nil, err
	}
	if set.endpoints, err = kvstore.NewWatchStore(client, kvstore.WatchStoreConfig[v1.Endpoint]{
		Prefix: v1.KindPrefix(v1.KindEndpoints, cfg.Name), SyncedKey: canary(v1.KindEndpoints), Name: cfg.Name + "/endpoints",
		Decode: val.endpoint, Reason: reason,
		Observer: endpointObserver{cluster: cfg.Name, state: st, store: func() *kvstore.WatchStore[v1.Endpoint] { return set.endpoints }},
	}); err != nil {
		return nil, nil, err
	}
	if set.identities, err = kvstore.NewWatchStore(client, kvstore.WatchStoreConfig[v1.Identity]{
		Prefix: v1.KindPrefix(v1.KindIdentities, cfg.Name), SyncedKey: canary(v1.KindIdentities), Name: cfg.Name + "/identities",
		Decode: val.identity, Reason: reason, Observer: identityObserver{},
	}); err != nil {
		return nil, nil, err
	}
	shards := cfg.Capabilities.BackendShards
	if set.services, err = kvstore.NewWatchStore(client, kvstore.WatchStoreConfig[v1.Service]{
		Prefix: v1.KindPrefix(v1.KindServices, cfg.Name), SyncedKey: canary(v1.KindServices), Name: cfg.Name + "/services",
		Decode: val.service, Reason: reason,
		Observer: serviceObserver{cluster: cfg.Name, state: st, store: func() *kvstore.WatchStore[v1.Service] { return set.services }, noShards: !shards},
	}); err != nil {
		return nil, nil, err
	}
	run := []func(context.Context){
		func(ctx context.Context) { set.nodes.Run(ctx) },
		func(ctx context.Context) { set.endpoints.Run(ctx) },
		func(ctx context.Context) { set.identities.Run(ctx) },
		func(ctx context.Context) { set.services.Run(ctx) },
	}
	if shards {
		if set.backends, err = kvstore.NewWatchStore(client, kvstore.WatchStoreConfig[v1.BackendShard]{
			Prefix: v1.KindPrefix(v1.KindBackends, cfg.Name), SyncedKey: canary(v1.KindBackends), Name: cfg.Name + "/backends",
			Decode: val.backendShard, Reason: reason,
			Observer: backendShardObserver{cluster: cfg.Name, state: st, store: func() *kvstore.WatchStore[v1.BackendShard] { return set.backends }},
		}); err != nil {
			return nil, nil, err
		}
		run = append(run, func(ctx context.Context) { set.backends.Run(ctx) })
	}
	return set, run, nil
}

// watchConfig returns errConfigChanged when the published cluster-config
// changes in a way that needs re-validation, and nil when ctx ends. The
// config vanishing, or turning malformed, is not a reason to drop state:
// the session goes on with the config it validated.
func (r *remote) watchConfig(ctx context.Context, client *kvstore.Client, cfg v1.ClusterConfig) error {
	key := v1.ClusterConfigKey(r.name)
	return client.WatchKey(ctx, key, kvstore.WatchKeyConfig{MaxBackoff: time.Second}, func(kv *kvstore.KeyValue) error {
		if kv == nil {
			return nil
		}
		next, err := v1.DecodeClusterConfigEntry(key, kv.Value)
		if err != nil {
			r.log.Warn("ignoring malformed cluster-config update", "err", err)
			return nil
		}
		if configDiffers(cfg, next) {
			return errConfigChanged
		}
		// The encryption setting changes live: the session goes on.
		r.mu.Lock()
		if r.config != nil {
			r.config.Encryption = next.Encryption
		}
		r.mu.Unlock()
		r.mesh.state.setEncryption(r.name, next.Encryption)
		return nil
	})
}

// configDiffers reports changes that need the cluster re-validated or its
// decoders rebuilt. The encryption setting is not one of them: agents
// apply it live.
func configDiffers(a, b v1.ClusterConfig) bool {
	if a.ID != b.ID || a.Region != b.Region || a.Capabilities != b.Capabilities || len(a.PodCIDRs) != len(b.PodCIDRs) {
		return true
	}
	for i := range a.PodCIDRs {
		if a.PodCIDRs[i] != b.PodCIDRs[i] {
			return true
		}
	}
	return false
}

// drain removes the cluster's entries from the merged state and its claim
// on an ID and pod CIDRs.
func (r *remote) drain() {
	r.mesh.state.drain(r.name)
	r.mesh.release(r.name)
	r.mu.Lock()
	r.config = nil
	r.stores = nil
	r.mu.Unlock()
}

// status reports the cluster for `trellis status`.
func (r *remote) status() ClusterStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := ClusterStatus{Name: r.name, Local: r.name == r.mesh.cfg.LocalCluster, Connected: r.connected, Rejected: map[string]uint64{}, Entries: map[string]int{}}
	if r.config != nil {
		st.ClusterID = uint32(r.config.ID)
		st.Region = r.config.Region
		st.Encryption = r.config.Encryption.Type
		if r.config.Encryption.Strict {
			st.Encryption += " (strict)"
		}
	}
	if r.lastErr != nil {
		st.LastError = r.lastErr.Error()
		st.LastErrorAt = r.lastErrAt
	}
	if r.stores == nil {
		return st
	}
	add := func(kind v1.Kind, s kvstore.WatchStoreStats) {
		st.Entries[string(kind)] = s.Entries
		// Backend shards are part of services: "services" is synced
		// once both are.
		if s.Synced && (kind != v1.KindServices || r.stores.servicesSynced()) && kind != v1.KindBackends {
			st.SyncedKinds = append(st.SyncedKinds, string(kind))
		}
		for reason, n := range s.Rejected {
			st.Rejected[reason] += n
		}
		if s.LastError != "" && (st.LastError == "" || s.LastErrAt.After(st.LastErrorAt)) && !s.Connected {
			st.LastError, st.LastErrorAt = s.LastError, s.LastErrAt
		}
		if !s.Connected {
			st.Connected = false
		}
	}
	add(v1.KindNodes, r.stores.nodes.Stats())
	add(v1.KindEndpoints, r.stores.endpoints.Stats())
	add(v1.KindIdentities, r.stores.identities.Stats())
	add(v1.KindServices, r.stores.services.Stats())
	if r.stores.backends != nil {
		add(v1.KindBackends, r.stores.backends.Stats())
	}
	sort.Strings(st.SyncedKinds)
	st.Ready = r.stores.ready()
	return st
}
