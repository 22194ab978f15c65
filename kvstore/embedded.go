package kvstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// EmbeddedConfig describes an in-process, single-member etcd.
type EmbeddedConfig struct {
	// Dir holds etcd's data. Required; reused across restarts.
	Dir string
	// Name is the member name; "trellis" when empty.
	Name string
	// ClientAddr is host:port for clients. Port 0 picks a free port, which
	// Effective() then reports so a restart can reuse it. Default
	// 127.0.0.1:0.
	ClientAddr string
	// PeerAddr is host:port for raft peers (a single member never uses it,
	// but etcd insists on one). Default 127.0.0.1:0.
	PeerAddr string
	// TLS, when set, serves clients over TLS; with ClientCertAuth, clients
	// must present a certificate signed by TrustedCAFile.
	TLS *EmbeddedTLS
	// AutoCompactionRetention, when set, compacts history older than it
	// (etcd's "periodic" mode). Zero keeps all history.
	AutoCompactionRetention time.Duration
	// QuotaBackendBytes caps the database size; zero keeps etcd's default.
	QuotaBackendBytes int64
	// Logger receives etcd's own logs at warn level and above; nil discards them.
	Logger *zap.Logger
}

// EmbeddedTLS names the server's certificate files.
type EmbeddedTLS struct {
	CertFile, KeyFile string
	TrustedCAFile     string
	ClientCertAuth    bool
}

// Embedded is a running in-process etcd.
type Embedded struct {
	etcd *embed.Etcd
	cfg  EmbeddedConfig
}

// StartEmbedded starts etcd and waits until it serves clients or ctx ends.
func StartEmbedded(ctx context.Context, cfg EmbeddedConfig) (*Embedded, error) {
	if cfg.Dir == "" {
		return nil, errors.New("embedded etcd: data dir is required")
	}
	if cfg.Name == "" {
		cfg.Name = "trellis"
	}
	if cfg.ClientAddr == "" {
		cfg.ClientAddr = "127.0.0.1:0"
	}
	if cfg.PeerAddr == "" {
		cfg.PeerAddr = "127.0.0.1:0"
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("embedded etcd: create data dir %s: %w", cfg.Dir, err)
	}
	// etcd needs concrete ports in its URLs (the peer URL is part of the
	// member's identity on disk), so resolve port 0 here, once, and keep the
	// resolved address for later restarts.
	var err error
	if cfg.PeerAddr, err = resolvePort(cfg.PeerAddr); err != nil {
		return nil, fmt.Errorf("embedded etcd: peer address: %w", err)
	}
	if cfg.ClientAddr, err = resolvePort(cfg.ClientAddr); err != nil {
		return nil, fmt.Errorf("embedded etcd: client address: %w", err)
	}

	ec := embed.NewConfig()
	ec.Name = cfg.Name
	ec.Dir = cfg.Dir
	scheme := "http"
	if cfg.TLS != nil {
		scheme = "https"
		ec.ClientTLSInfo.CertFile = cfg.TLS.CertFile
		ec.ClientTLSInfo.KeyFile = cfg.TLS.KeyFile
		ec.ClientTLSInfo.TrustedCAFile = cfg.TLS.TrustedCAFile
		ec.ClientTLSInfo.ClientCertAuth = cfg.TLS.ClientCertAuth
	}
	clientURL := url.URL{Scheme: scheme, Host: cfg.ClientAddr}
	peerURL := url.URL{Scheme: "http", Host: cfg.PeerAddr}
	ec.ListenClientUrls = []url.URL{clientURL}
	ec.AdvertiseClientUrls = []url.URL{clientURL}
	ec.ListenPeerUrls = []url.URL{peerURL}
	ec.AdvertisePeerUrls = []url.URL{peerURL}
	ec.InitialCluster = ec.InitialClusterFromName(cfg.Name)
	// No gRPC gateway (embed enables it by default): nothing here speaks
	// etcd's JSON API, and the gateway dials the server itself presenting
	// the server certificate as a client certificate, which a server whose
	// client CA differs from its server CA refuses.
	ec.EnableGRPCGateway = false
	if cfg.AutoCompactionRetention > 0 {
		ec.AutoCompactionMode = "periodic"
		ec.AutoCompactionRetention = cfg.AutoCompactionRetention.String()
	}
	if cfg.QuotaBackendBytes > 0 {
		ec.QuotaBackendBytes = cfg.QuotaBackendBytes
	}
	lg := cfg.Logger
	if lg == nil {
		lg = zap.NewNop()
	}
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(lg)

	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("embedded etcd: start in %s: %w", cfg.Dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd: serve: %w", err)
	case <-ctx.Done():
		e.Close()
		return nil, fmt.Errorf("embedded etcd: waiting for readiness: %w", ctx.Err())
	}
	return &Embedded{etcd: e, cfg: cfg}, nil
}

// Endpoints are the client URLs to dial.
func (e *Embedded) Endpoints() []string {
	scheme := "http"
	if e.cfg.TLS != nil {
		scheme = "https"
	}
	return []string{scheme + "://" + e.cfg.ClientAddr}
}

// Effective is the configuration with ports resolved: passing it to
// StartEmbedded again restarts the same member on the same addresses.
func (e *Embedded) Effective() EmbeddedConfig { return e.cfg }

// Server exposes the etcd server for callers that manage auth or inspect
// raft state.
func (e *Embedded) Server() *embed.Etcd { return e.etcd }

// Close stops etcd. It is safe on nil and safe to call twice.
func (e *Embedded) Close() error {
	if e == nil || e.etcd == nil {
		return nil
	}
	e.etcd.Close()
	e.etcd = nil
	return nil
}

// resolvePort turns host:0 into host:<free port>. The port is free when
// chosen; etcd binds it a moment later.
func resolvePort(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("%q is not host:port: %w", addr, err)
	}
	if port != "0" {
		return addr, nil
	}
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", fmt.Errorf("find a free port on %s: %w", host, err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}
