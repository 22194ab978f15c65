package kvstore

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
)

// Config describes how to reach one etcd cluster.
type Config struct {
	// Endpoints are etcd client URLs (http:// or https://).
	Endpoints []string
	// TLS is used for https endpoints; build it with LoadClientTLS.
	TLS *tls.Config
	// Username and Password authenticate with etcd's password auth; leave
	// empty when the client certificate's common name is the user.
	Username, Password string

	// DialTimeout bounds the first connection; default 5s.
	DialTimeout time.Duration
	// RequestTimeout bounds one request (a page, a txn); default 30s.
	RequestTimeout time.Duration

	// QPS and Burst limit requests after bootstrap; defaults 100 and 200.
	// BootstrapBurst is the larger burst allowed until BootstrapDone is
	// called (or BootstrapWindow passes), so a cold start publishes or
	// lists quickly without letting a steady-state storm through later;
	// default 2000. A negative QPS disables limiting (benchmarks).
	QPS             float64
	Burst           int
	BootstrapBurst  int
	BootstrapWindow time.Duration

	// LeaseTTL is the TTL of the leases that back lease-bound keys;
	// default 15 minutes (long, so a restarting writer's keys outlive the
	// restart). MaxKeysPerLease caps keys per lease (etcd's put cost grows
	// with the keys on a lease); default 1000.
	LeaseTTL        time.Duration
	MaxKeysPerLease int

	Logger  *slog.Logger
	Metrics *Metrics
}

func (c *Config) setDefaults() {
	if c.DialTimeout == 0 {
		c.DialTimeout = 5 * time.Second
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = 30 * time.Second
	}
	if c.QPS == 0 {
		c.QPS = 100
	}
	if c.Burst == 0 {
		c.Burst = 200
	}
	if c.BootstrapBurst == 0 {
		c.BootstrapBurst = 2000
	}
	if c.BootstrapWindow == 0 {
		c.BootstrapWindow = 2 * time.Minute
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = 15 * time.Minute
	}
	if c.MaxKeysPerLease == 0 {
		c.MaxKeysPerLease = 1000
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Client is a connection to one etcd cluster shared by the stores of a
// process.
type Client struct {
	etcd    *clientv3.Client
	cfg     Config
	limiter *rate.Limiter
	leases  *leaseManager
	log     *slog.Logger

	stopBootstrap *time.Timer
}

// NewClient dials etcd. It does not wait for the cluster to answer; use
// Health for that.
func NewClient(cfg Config) (*Client, error) {
	cfg.setDefaults()
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("kvstore: no etcd endpoints given")
	}
	etcd, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		TLS:         cfg.TLS,
		Username:    cfg.Username,
		Password:    cfg.Password,
		DialTimeout: cfg.DialTimeout,
		// Detect a dead TCP connection within seconds rather than minutes,
		// so a watch moves on (and relists) instead of hanging.
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		PermitWithoutStream:  true,
		// gRPC's default reconnect backoff grows to two minutes; a mesh
		// reader should be back within seconds of etcd returning.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
			MinConnectTimeout: cfg.DialTimeout,
		})},
		Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("kvstore: connect to %v: %w", cfg.Endpoints, err)
	}
	c := &Client{etcd: etcd, cfg: cfg, log: cfg.Logger}
	if cfg.QPS > 0 {
		c.limiter = rate.NewLimiter(rate.Limit(cfg.QPS), cfg.BootstrapBurst)
		c.stopBootstrap = time.AfterFunc(cfg.BootstrapWindow, c.BootstrapDone)
	}
	c.leases = newLeaseManager(c, cfg.LeaseTTL, cfg.MaxKeysPerLease, cfg.Logger)
	return c, nil
}

// Auth is etcd's user and role API on this connection, for the code that
// manages etcd users and roles (the mesh API server's). It is the only raw
// etcd surface the package hands out: every key read and write goes
// through the methods and stores of this package.
func (c *Client) Auth() clientv3.Auth { return c.etcd }

// Endpoints are the URLs this client dials.
func (c *Client) Endpoints() []string { return c.cfg.Endpoints }

// BootstrapDone drops the burst from the bootstrap value to the
// steady-state value. Idempotent.
func (c *Client) BootstrapDone() {
	if c.limiter != nil && c.limiter.Burst() != c.cfg.Burst {
		c.limiter.SetBurst(c.cfg.Burst)
	}
}

// wait takes one token from the rate limiter.
func (c *Client) wait(ctx context.Context) error {
	if c.limiter == nil {
		return nil
	}
	if err := c.limiter.Wait(ctx); err != nil {
		return fmt.Errorf("kvstore: rate limiter: %w", err)
	}
	return nil
}

// requestContext bounds one request by the configured timeout.
func (c *Client) requestContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, c.cfg.RequestTimeout)
}

// Health asks etcd for a linearizable read, which succeeds only when the
// cluster has a leader and a quorum.
func (c *Client) Health(ctx context.Context) error {
	ctx, cancel := c.requestContext(ctx)
	defer cancel()
	// Any key works: a linearizable Get goes through raft's read index.
	// etcd checks the quorum before it checks permission, so a read-only
	// remote user's "permission denied" still proves the cluster healthy.
	_, err := c.etcd.Get(ctx, "trellis/health", clientv3.WithCountOnly())
	if err != nil && !errors.Is(err, rpctypes.ErrPermissionDenied) {
		return fmt.Errorf("kvstore: etcd %v not healthy: %w", c.cfg.Endpoints, err)
	}
	return nil
}

// Close stops lease renewal (without revoking: the keys must outlive a
// restart) and closes the connection. Safe on nil and safe to call twice.
func (c *Client) Close() error {
	if c == nil || c.etcd == nil {
		return nil
	}
	if c.stopBootstrap != nil {
		c.stopBootstrap.Stop()
	}
	c.leases.close()
	err := c.etcd.Close()
	c.etcd = nil
	if err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("kvstore: close client: %w", err)
	}
	return nil
}

// LoadClientTLS builds a client TLS config from PEM files: the CA that
// signed the server's certificate and, for mTLS, the client's certificate
// and key (both empty for server-only TLS).
func LoadClientTLS(caFile, certFile, keyFile string) (*tls.Config, error) {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("kvstore: read CA %s: %w", caFile, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("kvstore: CA %s holds no PEM certificate", caFile)
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if certFile != "" || keyFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("kvstore: load client certificate %s: %w", certFile, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}
