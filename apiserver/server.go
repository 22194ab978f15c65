package apiserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/etcdauth"
	"github.com/trellis-mesh/trellis/apiserver/frontdoor"
	"github.com/trellis-mesh/trellis/apiserver/pki"
	"github.com/trellis-mesh/trellis/apiserver/registry"
	"github.com/trellis-mesh/trellis/apiserver/source"
	"github.com/trellis-mesh/trellis/kvstore"
)

// HeartbeatTTL is the lease of the heartbeat key. The key is written once
// per lease and kept by the lease's renewals, which etcd does not store:
// it exists while the server lives (and up to HeartbeatTTL after it
// stopped or died) and adds no revisions, where a key rewritten every few
// seconds would add one each time, for ever.
const HeartbeatTTL = 30 * time.Second

// Server is one cluster's mesh API server.
type Server struct {
	cfg Config
	log *slog.Logger

	// NewSource, when set, replaces the source chosen by Config.Source;
	// tests use it to drive the server without a Kubernetes API.
	NewSource func(sink source.Sink, ids source.IdentityAllocator) (runner, error)

	ready    chan struct{} // closed once HTTP serves (Addr is valid)
	mu       sync.Mutex
	httpLn   net.Listener
	etcd     *kvstore.Embedded
	internal string  // URL of the embedded etcd, loopback only
	ca       *pki.CA // the server CA
	clientCA *pki.CA // nil with an external etcd
	door     *frontdoor.Door
	doorLn   net.Listener
	admin    *kvstore.Client
	writer   *kvstore.Client
	pub      *Publisher
	srcUp    bool
	pkiDir   string
	token    string
	creds    *credentials
	reg      *registry.Registry // nil with the Kubernetes source
	// serverCert is the server certificate the HTTP API (and the etcd
	// front door) present.
	serverCert tls.Certificate
	metrics    *prometheus.Registry

	remotesMu sync.Mutex // serializes issuing and revoking
	remotes   *kvstore.RecordStore[remoteRecord]

	enc *encryptionSetting
}

// runner is what a source does once wired.
type runner interface {
	Run(ctx context.Context) error
}

// New checks cfg and returns a server ready to Run.
func New(cfg Config, log *slog.Logger) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("apiserver: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg, log: log.With("cluster", cfg.ClusterName), ready: make(chan struct{})}, nil
}

// HTTPAddr waits until the HTTP listener is up and returns its address.
func (s *Server) HTTPAddr(ctx context.Context) (string, error) {
	select {
	case <-s.ready:
		return s.httpLn.Addr().String(), nil
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// Run starts etcd (or connects to it), sets up auth, publishes, and serves
// HTTP until ctx ends.
func (s *Server) Run(ctx context.Context) (err error) {
	defer s.close()
	if err := s.setupState(); err != nil {
		return err
	}
	if err := s.setupEtcd(ctx); err != nil {
		return err
	}
	s.metrics = prometheus.NewRegistry()
	s.metrics.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := kvstore.NewMetrics(s.metrics)
	if s.etcd != nil {
		if err := s.etcd.Register(s.metrics); err != nil {
			return fmt.Errorf("apiserver: %w", err)
		}
	}
	if err := s.connectWriter(metrics); err != nil {
		return err
	}
	if s.door != nil {
		if err := s.door.Register(s.metrics); err != nil {
			return err
		}
		if err := s.loadRemotes(ctx); err != nil {
			return err
		}
	}
	if err := s.loadEncryption(ctx); err != nil {
		return err
	}
	if err := s.publishClusterConfig(ctx); err != nil {
		return err
	}

	ids, err := s.newAllocator()
	if err != nil {
		return err
	}
	pub, err := NewPublisher(s.writer, s.cfg.ClusterConfig(), s.cfg.Source == SourceKubernetes)
	if err != nil {
		return err
	}
	s.pub = pub

	if s.creds, err = newCredentials(s.token, s.writer, s.cfg.ClusterName); err != nil {
		return fmt.Errorf("apiserver: %w", err)
	}
	if err := s.creds.load(ctx); err != nil {
		return err
	}
	mux := http.NewServeMux()
	src, err := s.buildSource(ctx, mux, pub, ids)
	if err != nil {
		return err
	}
	s.routes(mux)

	ln, httpURL, err := s.listenHTTP(s.serverCert)
	if err != nil {
		return err
	}
	httpSrv := s.newHTTPServer(s.authenticated(mux))
	s.httpLn = ln
	// Tools that find the server from its state dir (trellis connect,
	// issue-remote, the lab) read where it listens from here.
	if err := os.WriteFile(s.cfg.path(v1.StateHTTPAddrFile), []byte(httpURL+"\n"), 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("apiserver: write %s: %w", v1.StateHTTPAddrFile, err)
	}
	close(s.ready)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, 6)
	start := func(name string, fn func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(ctx); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("%s: %w", name, err)
			}
		}()
	}
	if s.door != nil {
		start("etcd front door", func(ctx context.Context) error { return s.door.Serve(ctx, s.doorLn) })
	}
	start("publisher", func(ctx context.Context) error { pub.Run(ctx); return nil })
	start("heartbeat", s.heartbeat)
	if s.etcd != nil {
		// Compaction pressure, defragmentation, NOSPACE recovery
		// (kvstore/embedded.go says when and why).
		start("etcd maintenance", s.etcd.Run)
	}
	start("identities", ids.Run)
	start("source", func(ctx context.Context) error {
		err := src.Run(ctx)
		if err == nil {
			s.mu.Lock()
			s.srcUp = true
			s.mu.Unlock()
		}
		return err
	})
	start("http", func(ctx context.Context) error {
		go func() {
			<-ctx.Done()
			shutdownCtx, c := context.WithTimeout(context.Background(), 5*time.Second)
			defer c()
			httpSrv.Shutdown(shutdownCtx)
		}()
		if err := httpSrv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	s.log.Info("mesh API server running", "etcd", s.cfg.advertisedEtcdEndpoint(), "internalEtcd", s.internal, "http", ln.Addr().String(), "source", s.cfg.Source)

	select {
	case <-ctx.Done():
	case err = <-errc:
		s.log.Error("mesh API server stopping", "err", err)
	}
	cancel()
	wg.Wait()
	return err
}

func (s *Server) close() {
	if s.doorLn != nil {
		s.doorLn.Close() // the door closes it too once it serves; twice is harmless
	}
	s.writer.Close()
	s.admin.Close()
	s.etcd.Close()
}

// setupState creates the state dir, adopts the secrets of --secrets-dir,
// and creates the server and client CAs and the admin token it still
// lacks.
func (s *Server) setupState() error {
	if err := os.MkdirAll(s.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("apiserver: --state-dir %s: %w", s.cfg.StateDir, err)
	}
	if err := adoptSecrets(s.cfg.SecretsDir, s.cfg.StateDir, s.log); err != nil {
		return err
	}
	s.pkiDir = s.cfg.path("pki")
	ca, created, err := pki.LoadOrCreateCA(s.pkiDir, s.cfg.ClusterName)
	if err != nil {
		return fmt.Errorf("apiserver: %w", err)
	}
	ca.Log = s.log
	s.ca = ca
	if created {
		s.log.Info("created the server CA", "dir", s.pkiDir)
	}
	if len(s.cfg.EtcdEndpoints) == 0 {
		clientCA, clientCreated, err := pki.LoadOrCreateClientCA(s.pkiDir, s.cfg.ClusterName)
		if err != nil {
			return fmt.Errorf("apiserver: %w", err)
		}
		clientCA.Log = s.log
		s.clientCA = clientCA
		switch {
		case clientCreated && !created:
			// A state dir from before the client CA: the one CA signed
			// client certificates too, and may be shared with other
			// clusters.
			s.log.Warn("created a client CA for an existing state dir: remote credentials issued before no longer work; run `trellis connect` again for every connected cluster",
				"dir", s.pkiDir, "clientCA", pki.ClientCACertFile)
		case clientCreated:
			s.log.Info("created the client CA", "dir", s.pkiDir)
		}
	}
	token, err := loadOrCreateToken(s.cfg.path(v1.StateAdminTokenFile), s.log)
	if err != nil {
		return err
	}
	s.token = token
	if err := s.checkKeyFiles(); err != nil {
		return err
	}
	certFile, keyFile, err := s.ca.EnsureServerCert(s.pkiDir, s.serverHosts())
	if err != nil {
		return fmt.Errorf("apiserver: server certificate: %w", err)
	}
	if s.serverCert, err = tls.LoadX509KeyPair(certFile, keyFile); err != nil {
		return fmt.Errorf("apiserver: load the server certificate %s: %w", certFile, err)
	}
	return nil
}

// serverHosts are the names the server certificate must carry: loopback,
// and the addresses of the etcd front door and of the HTTP API.
func (s *Server) serverHosts() []string {
	hosts := pki.DefaultHosts()
	ehost, _, _ := net.SplitHostPort(s.cfg.EtcdListen)
	hhost, _, _ := net.SplitHostPort(s.cfg.HTTPListen)
	for _, h := range []string{ehost, hhost, s.cfg.AdvertiseAddress} {
		if h != "" && !isWildcard(h) && !slices.Contains(hosts, h) {
			hosts = append(hosts, h)
		}
	}
	return hosts
}

// clientCert returns the files of a local client certificate (root, the
// writer, the front door's identity), issuing it under the client CA when
// it is missing, expiring, or signed by another CA (a state dir from
// before the client CA).
func (s *Server) clientCert(user string) (certFile, keyFile string, err error) {
	certFile, keyFile, reissued, err := s.clientCA.EnsureClientCert(filepath.Join(s.pkiDir, "clients"), user, pki.CAValidity)
	if err != nil {
		return "", "", fmt.Errorf("apiserver: %s client certificate: %w", user, err)
	}
	if reissued != "" {
		s.log.Info("issued local client certificate", "user", user, "reason", reissued)
	}
	return certFile, keyFile, nil
}

// localTLS is the client TLS config of a local user of the embedded etcd.
func (s *Server) localTLS(user string) (*tls.Config, error) {
	certFile, keyFile, err := s.clientCert(user)
	if err != nil {
		return nil, err
	}
	return kvstore.LoadClientTLS(filepath.Join(s.pkiDir, pki.CACertFile), certFile, keyFile)
}

// setupEtcd starts the embedded etcd with client-certificate auth on a
// loopback port, converges users and roles, and prepares the etcd front
// door on --etcd-listen; with an external etcd it does nothing.
func (s *Server) setupEtcd(ctx context.Context) error {
	etcdAddrFile := s.cfg.path(v1.StateEtcdAddrFile)
	if len(s.cfg.EtcdEndpoints) > 0 {
		s.log.Info("using external etcd; its users, roles and remote credentials are the operator's to manage (no etcd front door)", "endpoints", s.cfg.EtcdEndpoints)
		if err := os.Remove(etcdAddrFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("apiserver: remove stale %s: %w", etcdAddrFile, err)
		}
		return nil
	}
	hosts := pki.DefaultHosts()
	lhost, _, _ := net.SplitHostPort(s.cfg.EtcdListen)
	for _, h := range []string{lhost, s.cfg.AdvertiseAddress} {
		if h != "" && !isWildcard(h) {
			hosts = append(hosts, h)
		}
	}
	certFile, keyFile, err := s.ca.EnsureServerCert(s.pkiDir, hosts)
	if err != nil {
		return fmt.Errorf("apiserver: server certificate: %w", err)
	}
	// The front door's address first: a taken --etcd-listen fails the
	// start before etcd does anything.
	doorLn, err := net.Listen("tcp", s.cfg.EtcdListen)
	if err != nil {
		return fmt.Errorf("apiserver: --etcd-listen %s: %w", s.cfg.EtcdListen, err)
	}
	s.doorLn = doorLn

	startCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	e, err := kvstore.StartEmbedded(startCtx, kvstore.EmbeddedConfig{
		Dir:        s.cfg.path("etcd"),
		ClientAddr: "127.0.0.1:0",
		// The other bounds (compaction, defragmentation) are the
		// package's defaults; the quota is the operator's to raise.
		QuotaBackendBytes: s.cfg.EtcdQuotaBackendBytes,
		Logger:            s.log,
		TLS: &kvstore.EmbeddedTLS{
			CertFile: certFile, KeyFile: keyFile,
			TrustedCAFile: filepath.Join(s.pkiDir, pki.ClientCACertFile), ClientCertAuth: true,
		},
	})
	if err != nil {
		return fmt.Errorf("apiserver: embedded etcd: %w", err)
	}
	s.etcd = e
	s.internal = e.Endpoints()[0]
	// Tools and tests on this machine find the internal etcd here; the
	// local root and writer certificates work only there.
	if err := os.WriteFile(etcdAddrFile, []byte(s.internal+"\n"), 0o600); err != nil {
		return fmt.Errorf("apiserver: write %s: %w", etcdAddrFile, err)
	}

	rootTLS, err := s.localTLS(etcdauth.RootUser)
	if err != nil {
		return err
	}
	s.admin, err = kvstore.NewClient(kvstore.Config{Endpoints: []string{s.internal}, TLS: rootTLS, Logger: s.log})
	if err != nil {
		return err
	}
	authCtx, cancel2 := context.WithTimeout(ctx, 30*time.Second)
	defer cancel2()
	if err := etcdauth.Ensure(authCtx, s.admin.Auth()); err != nil {
		return fmt.Errorf("apiserver: etcd users and roles: %w", err)
	}
	return s.setupFrontDoor(certFile, keyFile)
}

// setupFrontDoor builds the etcd front door: the server certificate
// outside, client certificates of the client CA only, and the remote
// reader identity towards the internal etcd.
func (s *Server) setupFrontDoor(certFile, keyFile string) error {
	serverCert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return fmt.Errorf("apiserver: etcd front door: load %s: %w", certFile, err)
	}
	upTLS, err := s.localTLS(etcdauth.RemoteReaderUser)
	if err != nil {
		return err
	}
	u, err := url.Parse(s.internal)
	if err != nil {
		return fmt.Errorf("apiserver: etcd front door: internal etcd URL %q: %w", s.internal, err)
	}
	upTLS.ServerName = u.Hostname()
	clientCAs := x509.NewCertPool()
	clientCAs.AddCert(s.clientCA.Cert)
	door, err := frontdoor.New(frontdoor.Config{
		Certificate: serverCert, ClientCAs: clientCAs,
		Upstream: u.Host, UpstreamTLS: upTLS, Logger: s.log,
	})
	if err != nil {
		return fmt.Errorf("apiserver: %w", err)
	}
	s.door = door
	return nil
}

// connectWriter opens the client all publication goes through.
func (s *Server) connectWriter(metrics *kvstore.Metrics) error {
	cfg := kvstore.Config{Logger: s.log, Metrics: metrics}
	if len(s.cfg.EtcdEndpoints) > 0 {
		cfg.Endpoints = s.cfg.EtcdEndpoints
		if s.cfg.EtcdCAFile != "" {
			t, err := kvstore.LoadClientTLS(s.cfg.EtcdCAFile, s.cfg.EtcdCertFile, s.cfg.EtcdKeyFile)
			if err != nil {
				return fmt.Errorf("apiserver: --etcd-ca-file: %w", err)
			}
			cfg.TLS = t
		}
	} else {
		t, err := s.localTLS(etcdauth.LocalWriterUser)
		if err != nil {
			return err
		}
		cfg.Endpoints, cfg.TLS = []string{s.internal}, t
	}
	c, err := kvstore.NewClient(cfg)
	if err != nil {
		return fmt.Errorf("apiserver: %w", err)
	}
	s.writer = c
	return nil
}

// publishClusterConfig writes the cluster-config key. A different cluster
// ID already stored there is reported: peers drain a cluster whose ID
// changes.
func (s *Server) publishClusterConfig(ctx context.Context) error {
	s.enc.mu.Lock()
	defer s.enc.mu.Unlock()
	return s.publishClusterConfigLocked(ctx, s.clusterConfigWith(s.enc.cur))
}

// publishClusterConfigLocked writes cc; the caller holds s.enc.mu, so
// that writes of the setting are not reordered.
func (s *Server) publishClusterConfigLocked(ctx context.Context, cc v1.ClusterConfig) error {
	data, err := v1.Encode(cc)
	if err != nil {
		return fmt.Errorf("apiserver: cluster-config: %w", err)
	}
	key := v1.ClusterConfigKey(cc.Name)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	old, _, err := s.writer.Get(ctx, key)
	if err != nil {
		return fmt.Errorf("apiserver: read %s (is etcd reachable and are the credentials right?): %w", key, err)
	}
	if old != nil {
		if prev, err := v1.DecodeClusterConfig(old.Value); err == nil && prev.ID != cc.ID {
			s.log.Warn("cluster ID changed; connected clusters will drain this cluster's old entries", "old", prev.ID, "new", cc.ID)
		}
	}
	if err := s.writer.Put(ctx, key, data); err != nil {
		return fmt.Errorf("apiserver: write %s: %w", key, err)
	}
	return nil
}

// heartbeat keeps the heartbeat key on a lease of its own until ctx
// ends, and writes it again under a new lease when the lease is lost (etcd
// unreachable for a whole TTL). At the end it leaves the lease to expire
// rather than revoking it: a server restarted within HeartbeatTTL puts the
// key on its new lease first, so readers see no delete across a restart
// (as with every other key), and a server that stays down loses the key
// HeartbeatTTL later.
func (s *Server) heartbeat(ctx context.Context) error {
	key := v1.HeartbeatKey(s.cfg.ClusterName)
	delay := time.Second
	for {
		sess, err := s.writeHeartbeat(ctx, key)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			s.log.Warn("heartbeat write failed", "key", key, "err", err, "retryIn", delay)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(delay):
			}
			delay = min(2*delay, HeartbeatTTL/3)
			continue
		}
		delay = time.Second
		select {
		case <-ctx.Done():
			sess.Close()
			return nil
		case <-sess.Done():
			s.log.Warn("heartbeat lease lost; writing the heartbeat again", "key", key, "lease", sess.String(), "err", sess.Err())
		}
	}
}

// writeHeartbeat puts the heartbeat key, holding the time, on a new lease
// and returns the lease's session.
func (s *Server) writeHeartbeat(ctx context.Context, key string) (*kvstore.Session, error) {
	sess, err := s.writer.NewSession(ctx, HeartbeatTTL)
	if err != nil {
		return nil, err
	}
	put := kvstore.OpPut(key, v1.EncodeTimestamp(time.Now())).WithSession(sess)
	if _, err := s.writer.Txn(ctx, kvstore.Txn{Then: []kvstore.Op{put}}); err != nil {
		sess.Close()
		return nil, fmt.Errorf("write %s: %w", key, err)
	}
	return sess, nil
}

// buildSource wires the configured source to the publisher.
func (s *Server) buildSource(ctx context.Context, mux *http.ServeMux, pub *Publisher, ids allocator) (runner, error) {
	if s.NewSource != nil {
		return s.NewSource(pub, ids)
	}
	switch s.cfg.Source {
	case SourceRegistry:
		svcCIDRs, _ := s.cfg.servicePrefixes() // validated
		reg, err := registry.New(registry.Config{
			Cluster: s.cfg.ClusterConfig(), ServiceCIDRs: svcCIDRs, Client: s.writer, Sink: pub, Identities: ids, Logger: s.log,
		})
		if err != nil {
			return nil, err
		}
		if err := reg.Load(ctx); err != nil {
			return nil, err
		}
		s.reg = reg
		s.metrics.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "trellis", Subsystem: "registry", Name: "unpublished_objects",
			Help: "Registered objects whose stored record is not what is published (GET /v1/status says which and why).",
		}, func() float64 { return float64(len(reg.Problems())) }))
		mux.Handle("/v1/", reg.Handler())
		return runFunc(func(ctx context.Context) error { <-ctx.Done(); return nil }), nil
	case SourceKubernetes:
		return s.kubernetesSource(pub, ids)
	}
	return nil, fmt.Errorf("apiserver: unknown source %q", s.cfg.Source)
}

type runFunc func(ctx context.Context) error

func (f runFunc) Run(ctx context.Context) error { return f(ctx) }

// ready reports whether etcd answers and every kind is published.
func (s *Server) readiness(ctx context.Context) (bool, string) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := s.writer.Health(ctx); err != nil {
		return false, "etcd: " + err.Error()
	}
	// A raised alarm (NOSPACE) lets etcd answer reads but refuse every
	// write; only the embedded etcd's is visible here (an external etcd's
	// alarms are its operator's to watch).
	if s.etcd != nil {
		if err := s.etcd.CheckWritable(); err != nil {
			return false, err.Error()
		}
	}
	if !s.pub.AllSynced() {
		var pending []string
		for kind, st := range s.pub.Stats() {
			if !st.Synced {
				pending = append(pending, string(kind))
			}
		}
		if len(pending) == 0 {
			pending = append(pending, string(v1.KindIdentities))
		}
		return false, "not yet synced: " + strings.Join(pending, ", ")
	}
	// Ready all the same: one object that cannot be published must not
	// take the whole cluster out of the mesh. But say so.
	if s.reg != nil {
		// The count only: /readyz answers anyone; which objects and why
		// is for a credential (GET /v1/status).
		if problems := s.reg.Problems(); len(problems) > 0 {
			return true, fmt.Sprintf("ok; %d registered objects not published as stored: see GET /v1/status", len(problems))
		}
	}
	return true, "ok"
}
