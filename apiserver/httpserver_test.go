package apiserver

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/apiserver/pki"
	"github.com/trellis-mesh/trellis/apiserver/registry"
)

// testHTTPServer serves the authenticated handler in front of a handler
// that echoes the principal, on a TLS listener as Run builds it, with an
// admin token and one node credential (node-1, token "node-1-token").
func testHTTPServer(t *testing.T) (url string, client *http.Client) {
	t.Helper()
	dir := t.TempDir()
	ca, _, err := pki.LoadOrCreateCA(dir, "eu")
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, err := ca.EnsureServerCert(dir, pki.DefaultHosts())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{cfg: Config{HTTPListen: "127.0.0.1:0"}, log: slog.New(slog.DiscardHandler)}
	s.creds = &credentials{admin: strings.Repeat("a", 64), byHash: map[string]string{}, byNode: map[string]string{}}
	s.creds.byHash[hashToken("node-1-token")], s.creds.byNode["node-1"] = "node-1", hashToken("node-1-token")
	ln, url, err := s.listenHTTP(cert)
	if err != nil {
		t.Fatal(err)
	}
	echo := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, _ := registry.PrincipalFrom(r.Context())
		fmt.Fprintf(w, "admin=%v node=%s", p.Admin, p.Node)
	})
	srv := s.newHTTPServer(s.authenticated(echo))
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	return url, &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

func get(t *testing.T, c *http.Client, method, url, auth string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url, strings.NewReader("{}"))
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// Who a request is from, and what it is refused: the scheme is enforced,
// the admin API is the admin's, health answers anyone.
func TestAuthenticated(t *testing.T) {
	url, c := testHTTPServer(t)
	admin := "Bearer " + strings.Repeat("a", 64)
	for _, tc := range []struct {
		method, path, auth string
		code               int
		body               string
	}{
		{"GET", "/healthz", "", 200, ""},
		{"GET", "/readyz", "", 200, ""},
		{"GET", "/v1/nodes", "", 401, "no credential"},
		{"GET", "/v1/nodes", strings.Repeat("a", 64), 401, "scheme"},
		{"GET", "/v1/nodes", "Basic " + strings.Repeat("a", 64), 401, "scheme"},
		{"GET", "/v1/nodes", "Bearer " + strings.Repeat("b", 64), 401, "not valid"},
		{"GET", "/v1/nodes", admin, 200, "admin=true"},
		{"GET", "/v1/nodes", "bearer " + strings.Repeat("a", 64), 200, "admin=true"},
		{"GET", "/v1/nodes", "Bearer node-1-token", 200, "node=node-1"},
		{"GET", "/admin/v1/info", "Bearer node-1-token", 403, "admin"},
		{"POST", "/admin/v1/remotes/x", admin, 200, "admin=true"},
	} {
		code, body := get(t, c, tc.method, url+tc.path, tc.auth)
		if code != tc.code || !strings.Contains(body, tc.body) {
			t.Errorf("%s %s with %q: %d %q, want %d with %q", tc.method, tc.path, tc.auth, code, body, tc.code, tc.body)
		}
	}
}

// A node credential writes at most nodeWriteRate per second after a burst
// of nodeWriteBurst; the admin is not limited; reads are not limited.
func TestNodeWriteRateLimit(t *testing.T) {
	url, c := testHTTPServer(t)
	limited := 0
	for i := 0; i < 5*nodeWriteBurst && limited == 0; i++ {
		if code, _ := get(t, c, "PUT", url+"/v1/nodes/node-1", "Bearer node-1-token"); code == http.StatusTooManyRequests {
			limited = i
		}
	}
	if limited < nodeWriteBurst {
		t.Fatalf("node writes limited after %d requests, want after the burst of %d", limited, nodeWriteBurst)
	}
	for range 2 * nodeWriteBurst {
		if code, _ := get(t, c, "PUT", url+"/v1/nodes/node-1", "Bearer "+strings.Repeat("a", 64)); code != http.StatusOK {
			t.Fatalf("admin write: %d", code)
		}
	}
	if code, _ := get(t, c, "GET", url+"/v1/nodes", "Bearer node-1-token"); code != http.StatusOK {
		t.Errorf("a read by the limited node: %d", code)
	}
}

// Clients that announce a large body and trickle it, without a credential:
// the server answers 401 and closes each connection without waiting for
// the body (they used to stay open, 3000 of them for 40 s).
func TestUnauthenticatedTricklersAreCut(t *testing.T) {
	url, c := testHTTPServer(t)
	tlsCfg := c.Transport.(*http.Transport).TLSClientConfig
	addr := strings.TrimPrefix(url, "https://")
	const n = 50
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Go(func() {
			conn, err := tls.Dial("tcp", addr, tlsCfg)
			if err != nil {
				errs <- err
				return
			}
			defer conn.Close()
			// A generous bound, so a server that keeps the connection fails
			// the test instead of hanging it; not a measure of speed.
			conn.SetDeadline(time.Now().Add(20 * time.Second))
			fmt.Fprintf(conn, "PUT /v1/nodes/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n{")
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				errs <- fmt.Errorf("read the answer: %w", err)
				return
			}
			if resp.StatusCode != http.StatusUnauthorized || !resp.Close {
				errs <- fmt.Errorf("answer %d, close %v; want 401 closing the connection", resp.StatusCode, resp.Close)
				return
			}
			// Still trickling: the server has closed its side.
			for range 10 {
				if _, err := conn.Write([]byte("aaaa")); err != nil {
					return
				}
			}
			var buf [1]byte
			if _, err := conn.Read(buf[:]); err == nil {
				errs <- fmt.Errorf("the connection is still open after the 401")
			} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
				errs <- fmt.Errorf("the connection is still open after the 401: %w", err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// The listener holds at most its limit of connections; a Close ends an
// Accept that waits for a slot.
func TestLimitListener(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := newLimitListener(raw, 2)
	accepted := make(chan net.Conn, 3)
	acceptErr := make(chan error, 1)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				acceptErr <- err
				return
			}
			accepted <- c
		}
	}()
	var clients []net.Conn
	for range 3 {
		c, err := net.Dial("tcp", raw.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, c)
	}
	first, second := <-accepted, <-accepted
	select {
	case <-accepted:
		t.Fatal("a third connection was accepted over the limit of 2")
	case <-time.After(200 * time.Millisecond):
	}
	first.Close()
	third := <-accepted // a slot freed: the waiting one comes in
	second.Close()
	third.Close()
	ln.Close()
	if err := <-acceptErr; err == nil {
		t.Error("Accept returned no error after Close")
	}
}
