package apiserver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/etcdauth"
	"github.com/trellis-mesh/trellis/apiserver/pki"
	"github.com/trellis-mesh/trellis/apiserver/registry"
	"github.com/trellis-mesh/trellis/apiserver/source"
	"github.com/trellis-mesh/trellis/kvstore"
)

// HeartbeatInterval is how often the heartbeat key is rewritten.
const HeartbeatInterval = 10 * time.Second

// Server is one cluster's mesh API server.
type Server struct {
	cfg Config
	log *slog.Logger

	// NewSource, when set, replaces the source chosen by Config.Source;
	// tests use it to drive the server without a Kubernetes API.
	NewSource func(sink source.Sink, ids source.IdentityAllocator) (runner, error)

	ready   chan struct{} // closed once HTTP serves (Addr is valid)
	mu      sync.Mutex
	httpLn  net.Listener
	etcd    *kvstore.Embedded
	ca      *pki.CA
	admin   *kvstore.Client
	writer  *kvstore.Client
	pub     *Publisher
	srcUp   bool
	pkiDir  string
	token   string
	metrics *prometheus.Registry
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
	if err := s.connectWriter(metrics); err != nil {
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

	mux := http.NewServeMux()
	src, err := s.buildSource(ctx, mux, pub, ids)
	if err != nil {
		return err
	}
	s.routes(mux)

	ln, err := net.Listen("tcp", s.cfg.HTTPListen)
	if err != nil {
		return fmt.Errorf("apiserver: --http-listen %s: %w", s.cfg.HTTPListen, err)
	}
	httpSrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	s.httpLn = ln
	// Tools that find the server from its state dir (trellis connect,
	// issue-remote) read where it listens from here.
	if err := os.WriteFile(s.cfg.path(v1.StateHTTPAddrFile), []byte("http://"+ln.Addr().String()+"\n"), 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("apiserver: write %s: %w", v1.StateHTTPAddrFile, err)
	}
	close(s.ready)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, 4)
	start := func(name string, fn func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(ctx); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("%s: %w", name, err)
			}
		}()
	}
	start("publisher", func(ctx context.Context) error { pub.Run(ctx); return nil })
	start("heartbeat", s.heartbeat)
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
	s.log.Info("mesh API server running", "etcd", s.cfg.advertisedEtcdEndpoint(), "http", ln.Addr().String(), "source", s.cfg.Source)

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
	s.writer.Close()
	s.admin.Close()
	s.etcd.Close()
}

// setupState creates the state dir, the CA, the server certificate and the
// admin token.
func (s *Server) setupState() error {
	if err := os.MkdirAll(s.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("apiserver: --state-dir %s: %w", s.cfg.StateDir, err)
	}
	s.pkiDir = s.cfg.path("pki")
	ca, created, err := pki.LoadOrCreateCA(s.pkiDir, s.cfg.ClusterName)
	if err != nil {
		return fmt.Errorf("apiserver: %w", err)
	}
	ca.Log = s.log
	s.ca = ca
	if created {
		s.log.Info("created cluster CA", "dir", s.pkiDir)
	}
	token, err := loadOrCreateToken(s.cfg.path(v1.StateAdminTokenFile))
	if err != nil {
		return err
	}
	s.token = token
	return nil
}

func loadOrCreateToken(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err == nil {
		if t := strings.TrimSpace(string(data)); t != "" {
			return t, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("apiserver: admin token %s: %w", path, err)
	}
	buf := make([]byte, 24)
	rand.Read(buf)
	token := hex.EncodeToString(buf)
	if err := os.WriteFile(path, []byte(token+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("apiserver: write admin token %s: %w", path, err)
	}
	return token, nil
}

// clientCert returns files of a local client certificate (root or
// writer), issuing it on first use.
func (s *Server) clientCert(user string) (certFile, keyFile string, err error) {
	dir := filepath.Join(s.pkiDir, "clients")
	certFile, keyFile = filepath.Join(dir, user+".crt"), filepath.Join(dir, user+".key")
	if _, err := os.Stat(certFile); err == nil {
		return certFile, keyFile, nil
	}
	certPEM, keyPEM, err := s.ca.IssueClient(user, pki.CAValidity)
	if err != nil {
		return "", "", fmt.Errorf("apiserver: issue %s client certificate: %w", user, err)
	}
	return pki.WriteClientCert(dir, user, certPEM, keyPEM)
}

// localEndpoint is the URL this process dials its own embedded etcd at.
func (s *Server) localEndpoint() string {
	host, port, _ := net.SplitHostPort(s.cfg.EtcdListen)
	if isWildcard(host) {
		host = "127.0.0.1"
	}
	return "https://" + net.JoinHostPort(host, port)
}

// setupEtcd starts the embedded etcd with client-certificate auth and
// converges users and roles; with an external etcd it only checks it.
func (s *Server) setupEtcd(ctx context.Context) error {
	if len(s.cfg.EtcdEndpoints) > 0 {
		s.log.Info("using external etcd; its users and roles are the operator's to manage", "endpoints", s.cfg.EtcdEndpoints)
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
	startCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	e, err := kvstore.StartEmbedded(startCtx, kvstore.EmbeddedConfig{
		Dir:        s.cfg.path("etcd"),
		ClientAddr: s.cfg.EtcdListen,
		TLS: &kvstore.EmbeddedTLS{
			CertFile: certFile, KeyFile: keyFile,
			TrustedCAFile: filepath.Join(s.pkiDir, pki.CACertFile), ClientCertAuth: true,
		},
	})
	if err != nil {
		return fmt.Errorf("apiserver: embedded etcd on --etcd-listen %s: %w", s.cfg.EtcdListen, err)
	}
	s.etcd = e

	rootCert, rootKey, err := s.clientCert(etcdauth.RootUser)
	if err != nil {
		return err
	}
	tlsCfg, err := kvstore.LoadClientTLS(filepath.Join(s.pkiDir, pki.CACertFile), rootCert, rootKey)
	if err != nil {
		return err
	}
	s.admin, err = kvstore.NewClient(kvstore.Config{Endpoints: []string{s.localEndpoint()}, TLS: tlsCfg, Logger: s.log})
	if err != nil {
		return err
	}
	authCtx, cancel2 := context.WithTimeout(ctx, 30*time.Second)
	defer cancel2()
	if err := etcdauth.Ensure(authCtx, s.admin.Auth()); err != nil {
		return fmt.Errorf("apiserver: etcd users and roles: %w", err)
	}
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
		certFile, keyFile, err := s.clientCert(etcdauth.LocalWriterUser)
		if err != nil {
			return err
		}
		t, err := kvstore.LoadClientTLS(filepath.Join(s.pkiDir, pki.CACertFile), certFile, keyFile)
		if err != nil {
			return err
		}
		cfg.Endpoints, cfg.TLS = []string{s.localEndpoint()}, t
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
	cc := s.cfg.ClusterConfig()
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

// heartbeat rewrites the heartbeat key until ctx ends.
func (s *Server) heartbeat(ctx context.Context) error {
	key := v1.HeartbeatKey(s.cfg.ClusterName)
	t := time.NewTicker(HeartbeatInterval)
	defer t.Stop()
	for {
		rctx, cancel := context.WithTimeout(ctx, HeartbeatInterval)
		err := s.writer.Put(rctx, key, v1.EncodeTimestamp(time.Now()))
		cancel()
		if err != nil && ctx.Err() == nil {
			s.log.Warn("heartbeat write failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// buildSource wires the configured source to the publisher.
func (s *Server) buildSource(ctx context.Context, mux *http.ServeMux, pub *Publisher, ids allocator) (runner, error) {
	if s.NewSource != nil {
		return s.NewSource(pub, ids)
	}
	switch s.cfg.Source {
	case SourceRegistry:
		reg, err := registry.New(registry.Config{
			Cluster: s.cfg.ClusterConfig(), Client: s.writer, Sink: pub, Identities: ids, Logger: s.log,
		})
		if err != nil {
			return nil, err
		}
		if err := reg.Load(ctx); err != nil {
			return nil, err
		}
		mux.Handle("/v1/", reg.Handler(s.token))
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
	return true, "ok"
}
