package frontdoor

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// RemoteCNPrefix prefixes a remote cluster's name to form the common name
// of its certificate.
const RemoteCNPrefix = "remote-"

// CommonName is the CN of the certificate issued to remote cluster
// cluster: "remote-<cluster>".
func CommonName(cluster string) string { return RemoteCNPrefix + cluster }

// ClusterOf is the remote cluster a certificate CN names, and whether it
// names one.
func ClusterOf(commonName string) (string, bool) {
	cluster, ok := strings.CutPrefix(commonName, RemoteCNPrefix)
	if !ok || cluster == "" {
		return "", false
	}
	return cluster, true
}

// Defaults of Config.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultDialTimeout      = 5 * time.Second
	DefaultMaxHandshakes    = 256
)

// Config is what a Door needs.
type Config struct {
	// Certificate is what the door presents: the etcd server certificate.
	Certificate tls.Certificate
	// ClientCAs verifies client certificates: the client CA only.
	ClientCAs *x509.CertPool
	// Upstream is host:port of the internal etcd.
	Upstream string
	// UpstreamTLS dials Upstream: the door's own client certificate and
	// the CA of etcd's server certificate. NextProtos is set to h2.
	UpstreamTLS *tls.Config
	// HandshakeTimeout bounds a client's TLS handshake;
	// DefaultHandshakeTimeout when zero.
	HandshakeTimeout time.Duration
	// DialTimeout bounds the upstream dial and handshake;
	// DefaultDialTimeout when zero.
	DialTimeout time.Duration
	// MaxHandshakes is how many handshakes may run at once;
	// DefaultMaxHandshakes when zero.
	MaxHandshakes int
	// Logger; nil discards.
	Logger *slog.Logger
}

// Door is the front door. Create it with New, allow certificates with
// Allow, and run it with Serve.
type Door struct {
	cfg     Config
	tls     *tls.Config
	log     *slog.Logger
	refused *prometheus.CounterVec

	mu         sync.Mutex
	serials    map[string]string // cluster -> serial (hex) of its one valid certificate
	handshakes int
	all        map[*session]struct{}
	byCluster  map[string]map[*session]struct{}
}

// copyBuffer is the size of each direction's copy buffer: a TLS record's
// largest plaintext.
const copyBuffer = 16 << 10

// Reasons a connection is refused, the label of
// trellis_frontdoor_refused_total.
const (
	reasonHandshake  = "handshake" // TLS failed: no certificate, another CA, timeout, not TLS
	reasonNotRemote  = "not_remote"
	reasonUnknown    = "unknown_cluster"
	reasonSuperseded = "superseded_serial"
	reasonBusy       = "busy"
	reasonUpstream   = "upstream"
)

// New checks cfg and returns a door that accepts no one yet.
func New(cfg Config) (*Door, error) {
	if cfg.Certificate.PrivateKey == nil || len(cfg.Certificate.Certificate) == 0 {
		return nil, errors.New("frontdoor: no server certificate")
	}
	if cfg.ClientCAs == nil {
		return nil, errors.New("frontdoor: no client CA")
	}
	if cfg.Upstream == "" || cfg.UpstreamTLS == nil {
		return nil, errors.New("frontdoor: no upstream etcd address or TLS config")
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.MaxHandshakes <= 0 {
		cfg.MaxHandshakes = DefaultMaxHandshakes
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	up := cfg.UpstreamTLS.Clone()
	up.NextProtos = []string{"h2"}
	cfg.UpstreamTLS = up
	d := &Door{
		cfg: cfg,
		log: log.With("component", "frontdoor"),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "trellis", Subsystem: "frontdoor", Name: "refused_total",
			Help: "Connections the etcd front door refused or dropped before forwarding, by reason.",
		}, []string{"reason"}),
		serials:   make(map[string]string),
		all:       make(map[*session]struct{}),
		byCluster: make(map[string]map[*session]struct{}),
	}
	d.tls = &tls.Config{
		Certificates: []tls.Certificate{cfg.Certificate},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    cfg.ClientCAs,
		MinVersion:   tls.VersionTLS12,
		// etcd's clients speak gRPC, which insists on h2.
		NextProtos: []string{"h2"},
		// No resumption: every connection shows its certificate again.
		SessionTicketsDisabled: true,
		VerifyConnection:       d.verify,
	}
	return d, nil
}

// Allow makes serial the only certificate serial accepted for remote
// cluster cluster, and closes the cluster's connections that presented
// another one.
func (d *Door) Allow(cluster string, serial *big.Int) {
	s := serial.Text(16)
	d.mu.Lock()
	defer d.mu.Unlock()
	d.serials[cluster] = s
	n := 0
	for c := range d.byCluster[cluster] {
		if c.serial != s {
			c.close()
			n++
		}
	}
	if n > 0 {
		d.log.Info("closed connections of a superseded certificate", "remote", cluster, "connections", n)
	}
}

// Revoke forgets cluster's certificate and closes its connections; its
// open watches end with them.
func (d *Door) Revoke(cluster string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.serials, cluster)
	n := 0
	for c := range d.byCluster[cluster] {
		c.close()
		n++
	}
	d.log.Info("revoked remote cluster", "remote", cluster, "closedConnections", n)
}

// Connections counts the forwarded connections per remote cluster.
func (d *Door) Connections() map[string]int {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]int, len(d.byCluster))
	for cluster, set := range d.byCluster {
		out[cluster] = len(set)
	}
	return out
}

// refusal is why VerifyConnection turned a certificate down.
type refusal struct {
	reason, msg string
}

func (r *refusal) Error() string { return r.msg }

// verify runs inside the handshake, after the chain verified against the
// client CA.
func (d *Door) verify(cs tls.ConnectionState) error {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return &refusal{reasonHandshake, "frontdoor: no verified client certificate"}
	}
	leaf := cs.VerifiedChains[0][0]
	cluster, ok := ClusterOf(leaf.Subject.CommonName)
	if !ok {
		return &refusal{reasonNotRemote, fmt.Sprintf("frontdoor: certificate %q is not a remote cluster's (CN %s<cluster>)", leaf.Subject.CommonName, RemoteCNPrefix)}
	}
	d.mu.Lock()
	want, known := d.serials[cluster]
	d.mu.Unlock()
	switch {
	case !known:
		return &refusal{reasonUnknown, fmt.Sprintf("frontdoor: remote cluster %s has no credentials here (never issued or revoked)", cluster)}
	case want != leaf.SerialNumber.Text(16):
		return &refusal{reasonSuperseded, fmt.Sprintf("frontdoor: certificate %s of remote cluster %s was superseded or revoked", leaf.SerialNumber.Text(16), cluster)}
	}
	return nil
}

// Register adds the door's metrics to reg: refusals by reason and open
// connections per remote cluster.
func (d *Door) Register(reg prometheus.Registerer) error {
	if err := reg.Register(d.refused); err != nil {
		return fmt.Errorf("frontdoor: register metrics: %w", err)
	}
	if err := reg.Register(connCollector{d}); err != nil {
		return fmt.Errorf("frontdoor: register metrics: %w", err)
	}
	return nil
}

var connDesc = prometheus.NewDesc("trellis_frontdoor_connections",
	"Connections the etcd front door forwards, by remote cluster.", []string{"remote"}, nil)

type connCollector struct{ d *Door }

func (c connCollector) Describe(ch chan<- *prometheus.Desc) { ch <- connDesc }

func (c connCollector) Collect(ch chan<- prometheus.Metric) {
	for cluster, n := range c.d.Connections() {
		ch <- prometheus.MustNewConstMetric(connDesc, prometheus.GaugeValue, float64(n), cluster)
	}
}

// Serve accepts connections on ln until ctx ends, then closes ln and
// every connection and returns once every goroutine it started has
// stopped. It returns nil after ctx ends, or the listener's error.
func (d *Door) Serve(ctx context.Context, ln net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel() // closes ln and every connection
		wg.Wait()
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-ctx.Done()
		ln.Close()
		d.closeAll()
	}()
	backoff := 5 * time.Millisecond
	for {
		raw, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("frontdoor: accept on %s: %w", ln.Addr(), err)
			}
			// Out of file descriptors and the like: wait, as net/http does.
			d.log.Warn("accept failed; retrying", "addr", ln.Addr().String(), "err", err, "in", backoff)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		c, ok := d.admit(raw)
		if !ok {
			raw.Close()
			d.refused.WithLabelValues(reasonBusy).Inc()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.handle(ctx, c)
		}()
	}
}

// session is one client connection and, once dialled, its upstream.
type session struct {
	down    net.Conn
	cluster string // set once registered
	serial  string

	mu     sync.Mutex
	up     net.Conn
	closed bool
}

// close closes both sides; safe to call many times and concurrently.
func (s *session) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.closed = true
	s.down.Close()
	if s.up != nil {
		s.up.Close()
	}
}

// setUp attaches the upstream connection, or reports that the session was
// closed meanwhile.
func (s *session) setUp(up net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.up = up
	return true
}

// admit tracks a new connection for its handshake, unless too many
// handshakes run already.
func (d *Door) admit(raw net.Conn) (*session, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.handshakes >= d.cfg.MaxHandshakes {
		return nil, false
	}
	d.handshakes++
	c := &session{down: raw}
	d.all[c] = struct{}{}
	return c, true
}

// closeAll closes every connection, handshaking or forwarded.
func (d *Door) closeAll() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for c := range d.all {
		c.close()
	}
}

// register moves c from handshaking to forwarded under cluster, unless its
// serial stopped being the valid one while it shook hands.
func (d *Door) register(c *session, cluster, serial string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.handshakes--
	if d.serials[cluster] != serial {
		return false
	}
	c.cluster, c.serial = cluster, serial
	set := d.byCluster[cluster]
	if set == nil {
		set = make(map[*session]struct{})
		d.byCluster[cluster] = set
	}
	set[c] = struct{}{}
	return true
}

// forget stops tracking c; handshaking says whether it never registered.
func (d *Door) forget(c *session, handshaking bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.all, c)
	if handshaking {
		d.handshakes--
		return
	}
	if set := d.byCluster[c.cluster]; set != nil {
		delete(set, c)
		if len(set) == 0 {
			delete(d.byCluster, c.cluster)
		}
	}
}

// handle shakes hands with one client, dials etcd and copies both ways
// until either side closes or ctx ends.
func (d *Door) handle(ctx context.Context, c *session) {
	defer c.close()
	remoteAddr := c.down.RemoteAddr().String()
	tc := tls.Server(c.down, d.tls)
	c.mu.Lock()
	c.down = tc // close() now closes the TLS conn (and the socket under it)
	c.mu.Unlock()

	hctx, cancel := context.WithTimeout(ctx, d.cfg.HandshakeTimeout)
	err := tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		d.forget(c, true)
		reason := reasonHandshake
		var r *refusal
		if errors.As(err, &r) {
			reason = r.reason
		}
		d.refused.WithLabelValues(reason).Inc()
		d.log.Debug("refused connection", "from", remoteAddr, "reason", reason, "err", err)
		return
	}
	leaf := tc.ConnectionState().PeerCertificates[0]
	cluster, _ := ClusterOf(leaf.Subject.CommonName)
	if !d.register(c, cluster, leaf.SerialNumber.Text(16)) {
		d.forget(c, false)
		d.refused.WithLabelValues(reasonSuperseded).Inc()
		d.log.Debug("refused connection: certificate revoked during the handshake", "from", remoteAddr, "remote", cluster)
		return
	}
	defer d.forget(c, false)
	log := d.log.With("remote", cluster, "from", remoteAddr)

	dialer := &tls.Dialer{NetDialer: &net.Dialer{Timeout: d.cfg.DialTimeout}, Config: d.cfg.UpstreamTLS}
	dctx, cancel := context.WithTimeout(ctx, d.cfg.DialTimeout)
	up, err := dialer.DialContext(dctx, "tcp", d.cfg.Upstream)
	cancel()
	if err != nil {
		d.refused.WithLabelValues(reasonUpstream).Inc()
		log.Warn("cannot reach the internal etcd; dropping the connection", "upstream", d.cfg.Upstream, "err", err)
		return
	}
	if !c.setUp(up) {
		up.Close()
		return
	}
	log.Debug("forwarding connection")

	// One direction here, the other in a goroutine; whichever ends first
	// closes both sides, which ends the other. Buffers of one TLS record.
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.CopyBuffer(up, tc, make([]byte, copyBuffer))
		c.close()
	}()
	io.CopyBuffer(tc, up, make([]byte, copyBuffer))
	c.close()
	<-done
	log.Debug("connection closed")
}
