package apiserver

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/trellis-mesh/trellis/apiserver/registry"
)

// The HTTP API's bounds: a slow, idle or hostile client holds a
// connection, a goroutine and its buffers for at most these, and there are
// at most httpMaxConns of them; further connections wait in the kernel's
// accept queue.
const (
	httpReadHeaderTimeout = 5 * time.Second
	httpReadTimeout       = 30 * time.Second // the whole request, body included
	httpWriteTimeout      = 60 * time.Second
	httpIdleTimeout       = 60 * time.Second
	httpMaxHeaderBytes    = 16 << 10
	httpMaxConns          = 512

	// A node credential may write this often, per node: an agent
	// registers its node and pods in bursts, nothing more. The admin,
	// which registers services and drives tests and the lab, is not
	// limited.
	nodeWriteRate  = 50
	nodeWriteBurst = 200
)

// listenHTTP opens --http-listen: TLS with the server certificate unless
// --http-plaintext (loopback only, which Config.Validate enforces), at most
// httpMaxConns connections at once. It returns the listener and the URL
// local tools find in <state-dir>/http.addr.
func (s *Server) listenHTTP(cert tls.Certificate) (net.Listener, string, error) {
	ln, err := net.Listen("tcp", s.cfg.HTTPListen)
	if err != nil {
		return nil, "", fmt.Errorf("apiserver: --http-listen %s: %w", s.cfg.HTTPListen, err)
	}
	ln = newLimitListener(ln, httpMaxConns)
	host, port, _ := net.SplitHostPort(ln.Addr().String())
	if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
		host = "127.0.0.1" // in the server certificate (pki.DefaultHosts)
	}
	addr := net.JoinHostPort(host, port)
	if s.cfg.HTTPPlaintext {
		s.log.Warn("serving the HTTP API without TLS (--http-plaintext): loopback only", "listen", ln.Addr().String())
		return ln, "http://" + addr, nil
	}
	tlsCfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	return tls.NewListener(ln, tlsCfg), "https://" + addr, nil
}

// newHTTPServer is the HTTP server with its bounds.
func (s *Server) newHTTPServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: httpReadHeaderTimeout,
		ReadTimeout:       httpReadTimeout,
		WriteTimeout:      httpWriteTimeout,
		IdleTimeout:       httpIdleTimeout,
		MaxHeaderBytes:    httpMaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
}

// authenticated requires a valid credential for everything but the health
// endpoints, puts the principal into the request's context, keeps /admin/
// to the admin, and limits how fast a node credential may write.
func (s *Server) authenticated(next http.Handler) http.Handler {
	limits := &writeLimits{m: map[string]*rate.Limiter{}}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && (r.URL.Path == "/healthz" || r.URL.Path == "/readyz") {
			next.ServeHTTP(w, r)
			return
		}
		p, err := s.creds.authenticate(r)
		if err != nil {
			// Close the connection rather than read the body of a client
			// that cannot write anyway.
			w.Header().Set("Connection", "close")
			w.Header().Set("WWW-Authenticate", `Bearer realm="trellis"`)
			httpError(w, http.StatusUnauthorized, err.Error())
			return
		}
		if len(r.URL.Path) >= len("/admin/") && r.URL.Path[:len("/admin/")] == "/admin/" && !p.Admin {
			httpError(w, http.StatusForbidden, "the admin API needs the admin credential")
			return
		}
		if r.Method != http.MethodGet && !p.Admin && !limits.allow(p.Node) {
			w.Header().Set("Retry-After", strconv.Itoa(1))
			httpError(w, http.StatusTooManyRequests, fmt.Sprintf("node %s writes faster than %d requests per second; slow down", p.Node, nodeWriteRate))
			return
		}
		next.ServeHTTP(w, r.WithContext(registry.WithPrincipal(r.Context(), p)))
	})
}

// writeLimits are the per-node write rate limiters.
type writeLimits struct {
	mu sync.Mutex
	m  map[string]*rate.Limiter
}

func (l *writeLimits) allow(node string) bool {
	l.mu.Lock()
	lim, ok := l.m[node]
	if !ok {
		// One per node credential that authenticated: bounded by the
		// nodes the admin issued credentials for.
		lim = rate.NewLimiter(nodeWriteRate, nodeWriteBurst)
		l.m[node] = lim
	}
	l.mu.Unlock()
	return lim.Allow()
}

// httpError answers {"error": msg}, as the registry does.
func httpError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

// limitListener accepts at most n connections at once; Accept waits for a
// slot, leaving further connections in the kernel's queue.
type limitListener struct {
	net.Listener
	slots     chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

func newLimitListener(ln net.Listener, n int) net.Listener {
	return &limitListener{Listener: ln, slots: make(chan struct{}, n), done: make(chan struct{})}
}

func (l *limitListener) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	return &limitConn{Conn: c, release: func() { <-l.slots }}, nil
}

// Close also ends an Accept waiting for a slot.
func (l *limitListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
