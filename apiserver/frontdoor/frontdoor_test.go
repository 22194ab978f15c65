package frontdoor

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/trellis-mesh/trellis/apiserver/pki"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// upstreamCN is the identity the door presents to etcd in these tests.
const upstreamCN = "trellis-remote"

// echoServer stands in for the internal etcd: TLS with the server
// certificate, client certificates of the client CA only; it echoes what
// it reads and records the CN it saw.
type echoServer struct {
	ln net.Listener

	mu    sync.Mutex
	cns   []string
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func (e *echoServer) open() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.conns)
}

func (e *echoServer) seen() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.cns...)
}

// closeConns closes every connection the echo server holds: etcd going
// away under the door.
func (e *echoServer) closeConns() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for c := range e.conns {
		c.Close()
	}
}

type env struct {
	serverCA, clientCA *pki.CA
	serverCert         tls.Certificate
	door               *Door
	addr               string
	up                 *echoServer
	cancel             context.CancelFunc
	served             chan error
}

// newEnv runs a door in front of an echo server; mod adjusts the config.
func newEnv(t *testing.T, mod func(*Config)) *env {
	t.Helper()
	dir := t.TempDir()
	serverCA, _, err := pki.LoadOrCreateCA(dir, "eu")
	if err != nil {
		t.Fatal(err)
	}
	clientCA, _, err := pki.LoadOrCreateClientCA(dir, "eu")
	if err != nil {
		t.Fatal(err)
	}
	serverCA.Log = slog.New(slog.DiscardHandler)
	crt, key, err := serverCA.EnsureServerCert(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	serverCert, err := tls.LoadX509KeyPair(crt, key)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{serverCA: serverCA, clientCA: clientCA, serverCert: serverCert}

	clientPool := x509.NewCertPool()
	clientPool.AddCert(clientCA.Cert)
	serverPool := x509.NewCertPool()
	serverPool.AddCert(serverCA.Cert)

	up := &echoServer{conns: make(map[net.Conn]struct{})}
	up.ln, err = tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{serverCert}, ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs: clientPool, NextProtos: []string{"h2"},
	})
	if err != nil {
		t.Fatal(err)
	}
	up.wg.Add(1)
	go func() {
		defer up.wg.Done()
		for {
			c, err := up.ln.Accept()
			if err != nil {
				return
			}
			up.mu.Lock()
			up.conns[c] = struct{}{}
			up.mu.Unlock()
			up.wg.Add(1)
			go func() {
				defer up.wg.Done()
				defer func() {
					c.Close()
					up.mu.Lock()
					delete(up.conns, c)
					up.mu.Unlock()
				}()
				tc := c.(*tls.Conn)
				if err := tc.Handshake(); err != nil {
					return
				}
				up.mu.Lock()
				up.cns = append(up.cns, tc.ConnectionState().PeerCertificates[0].Subject.CommonName)
				up.mu.Unlock()
				io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() {
		up.ln.Close()
		up.closeConns()
		up.wg.Wait()
	})
	e.up = up

	upCert := e.issue(t, clientCA, upstreamCN)
	cfg := Config{
		Certificate: serverCert, ClientCAs: clientPool, Upstream: up.ln.Addr().String(),
		UpstreamTLS: &tls.Config{RootCAs: serverPool, ServerName: "127.0.0.1", Certificates: []tls.Certificate{upCert.cert}},
	}
	if mod != nil {
		mod(&cfg)
	}
	e.door, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel, e.served = cancel, make(chan error, 1)
	go func() { e.served <- e.door.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-e.served:
		case <-time.After(30 * time.Second):
			t.Error("Serve did not return after its context ended")
		}
	})
	return e
}

type issued struct {
	cert   tls.Certificate
	serial *big.Int
}

func (i issued) tlsCert() *tls.Certificate { return &i.cert }

func (e *env) issue(t *testing.T, ca *pki.CA, cn string) issued {
	t.Helper()
	certPEM, keyPEM, err := ca.IssueClient(cn, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := pki.ParseCertPEM(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	return issued{cert: cert, serial: leaf.SerialNumber}
}

// dial connects with cert (none when nil) and returns the connection
// after the door's verdict: nil error when a round trip through it
// worked.
func (e *env) dial(t *testing.T, cert *tls.Certificate) (*tls.Conn, error) {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(e.serverCA.Cert)
	cfg := &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", NextProtos: []string{"h2"}}
	if cert != nil {
		// Send the certificate even when the server's list of acceptable
		// CAs does not name its issuer, so the door has to judge it.
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	}
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", e.addr, cfg)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	if err := roundTrip(c, "ping"); err != nil {
		return c, err
	}
	return c, nil
}

// roundTrip writes msg and reads it back through the echo server.
func roundTrip(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return errors.New("echo mismatch: " + string(buf))
	}
	return nil
}

// waitClosed waits until the door closes c: a read returns EOF or a
// connection error, not a timeout.
func waitClosed(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
		t.Fatalf("%s: still open (read: %v)", what, err)
	}
}

func (e *env) refused(reason string) float64 {
	var m dto.Metric
	if err := e.door.refused.WithLabelValues(reason).Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

func TestHandshake(t *testing.T) {
	e := newEnv(t, nil)
	eu := e.issue(t, e.clientCA, "remote-eu")
	e.door.Allow("eu", eu.serial)

	if _, err := e.dial(t, &eu.cert); err != nil {
		t.Fatalf("current certificate of eu: %v", err)
	}
	if got := e.up.seen(); len(got) != 1 || got[0] != upstreamCN {
		t.Errorf("etcd saw client CNs %v, want only the door's %s", got, upstreamCN)
	}
	if got := e.door.Connections(); got["eu"] != 1 {
		t.Errorf("Connections() = %v, want eu: 1", got)
	}

	otherCA, _, err := pki.LoadOrCreateClientCA(t.TempDir(), "ap")
	if err != nil {
		t.Fatal(err)
	}
	superseded := e.issue(t, e.clientCA, "remote-us")
	e.door.Allow("us", superseded.serial)
	e.door.Allow("us", e.issue(t, e.clientCA, "remote-us").serial)

	for _, tc := range []struct {
		name   string
		cert   *tls.Certificate
		reason string
	}{
		{"no certificate", nil, reasonHandshake},
		{"another cluster's client CA", e.issue(t, otherCA, "remote-eu").tlsCert(), reasonHandshake},
		{"another cluster's root", e.issue(t, otherCA, "root").tlsCert(), reasonHandshake},
		{"signed by the server CA", e.issue(t, e.serverCA, "remote-eu").tlsCert(), reasonHandshake},
		{"local root", e.issue(t, e.clientCA, "root").tlsCert(), reasonNotRemote},
		{"local writer", e.issue(t, e.clientCA, "trellis-writer").tlsCert(), reasonNotRemote},
		{"the door's own identity", e.issue(t, e.clientCA, upstreamCN).tlsCert(), reasonNotRemote},
		{"bare prefix", e.issue(t, e.clientCA, "remote-").tlsCert(), reasonNotRemote},
		{"never issued", e.issue(t, e.clientCA, "remote-ap").tlsCert(), reasonUnknown},
		{"another certificate of eu", e.issue(t, e.clientCA, "remote-eu").tlsCert(), reasonSuperseded},
		{"superseded", &superseded.cert, reasonSuperseded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := e.refused(tc.reason)
			_, err := e.dial(t, tc.cert)
			if err == nil {
				t.Fatal("the door forwarded the connection")
			}
			if !strings.Contains(err.Error(), "tls: ") {
				t.Errorf("err = %v, want a TLS alert", err)
			}
			testutil.Eventually(t, 10*time.Second, "refusal counted as "+tc.reason, func() bool { return e.refused(tc.reason) == before+1 })
		})
	}
	if got := e.up.seen(); len(got) != 1 {
		t.Errorf("etcd saw %d connections, want only the accepted one", len(got))
	}
}

// Allow closes the connections of a superseded certificate, Revoke every
// connection of the cluster; other clusters' connections stay.
func TestRevokeClosesConnections(t *testing.T) {
	e := newEnv(t, nil)
	eu1 := e.issue(t, e.clientCA, "remote-eu")
	us := e.issue(t, e.clientCA, "remote-us")
	e.door.Allow("eu", eu1.serial)
	e.door.Allow("us", us.serial)
	euConn, err := e.dial(t, &eu1.cert)
	if err != nil {
		t.Fatal(err)
	}
	usConn, err := e.dial(t, &us.cert)
	if err != nil {
		t.Fatal(err)
	}

	eu2 := e.issue(t, e.clientCA, "remote-eu")
	e.door.Allow("eu", eu2.serial)
	waitClosed(t, euConn, "eu's connection after eu was re-issued")
	if err := roundTrip(usConn, "still here"); err != nil {
		t.Fatalf("us's connection after eu was re-issued: %v", err)
	}
	eu2Conn, err := e.dial(t, &eu2.cert)
	if err != nil {
		t.Fatalf("eu's new certificate: %v", err)
	}
	// Allowing the same serial again closes nothing.
	e.door.Allow("eu", eu2.serial)
	if err := roundTrip(eu2Conn, "same serial"); err != nil {
		t.Fatalf("eu's connection after the same serial was allowed again: %v", err)
	}

	e.door.Revoke("us")
	waitClosed(t, usConn, "us's connection after revocation")
	testutil.Eventually(t, 10*time.Second, "us forgotten, eu still connected", func() bool {
		got := e.door.Connections()
		return got["us"] == 0 && got["eu"] == 1 && len(got) == 1
	})
	if _, err := e.dial(t, &us.cert); err == nil {
		t.Error("a revoked certificate connected again")
	}
	// Revoked stays revoked whatever the order: allowing a new serial
	// never revives the old one.
	e.door.Allow("us", e.issue(t, e.clientCA, "remote-us").serial)
	if _, err := e.dial(t, &us.cert); err == nil {
		t.Error("the revoked certificate connected after a new one was issued")
	}
	testutil.Eventually(t, 10*time.Second, "etcd holds only eu's connection", func() bool { return e.up.open() == 1 })
}

// Every connection's goroutines stop when the client closes, when etcd
// closes, and when Serve's context ends; a client that never finishes its
// handshake is dropped.
func TestConnectionLifetimes(t *testing.T) {
	t.Run("client closes", func(t *testing.T) {
		e := newEnv(t, nil)
		eu := e.issue(t, e.clientCA, "remote-eu")
		e.door.Allow("eu", eu.serial)
		c, err := e.dial(t, &eu.cert)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		testutil.Eventually(t, 10*time.Second, "connection forgotten and etcd's side closed", func() bool {
			return len(e.door.Connections()) == 0 && e.up.open() == 0
		})
	})
	t.Run("etcd closes", func(t *testing.T) {
		e := newEnv(t, nil)
		eu := e.issue(t, e.clientCA, "remote-eu")
		e.door.Allow("eu", eu.serial)
		c, err := e.dial(t, &eu.cert)
		if err != nil {
			t.Fatal(err)
		}
		e.up.closeConns()
		waitClosed(t, c, "client connection after etcd closed its side")
		testutil.Eventually(t, 10*time.Second, "connection forgotten", func() bool { return len(e.door.Connections()) == 0 })
	})
	t.Run("context ends", func(t *testing.T) {
		e := newEnv(t, func(c *Config) { c.HandshakeTimeout = time.Hour })
		eu := e.issue(t, e.clientCA, "remote-eu")
		e.door.Allow("eu", eu.serial)
		c, err := e.dial(t, &eu.cert)
		if err != nil {
			t.Fatal(err)
		}
		idle, err := net.Dial("tcp", e.addr) // mid-handshake forever
		if err != nil {
			t.Fatal(err)
		}
		defer idle.Close()
		e.cancel()
		select {
		case err := <-e.served:
			if err != nil {
				t.Errorf("Serve after its context ended: %v", err)
			}
			e.served <- err // for the cleanup
		case <-time.After(30 * time.Second):
			t.Fatal("Serve did not return after its context ended")
		}
		waitClosed(t, c, "forwarded connection after the context ended")
		waitClosed(t, idle, "handshaking connection after the context ended")
		testutil.Eventually(t, 10*time.Second, "etcd's side closed", func() bool { return e.up.open() == 0 })
	})
	t.Run("handshake timeout", func(t *testing.T) {
		e := newEnv(t, func(c *Config) { c.HandshakeTimeout = 100 * time.Millisecond })
		idle, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer idle.Close()
		waitClosed(t, idle, "a client that never shakes hands")
		testutil.Eventually(t, 10*time.Second, "counted", func() bool { return e.refused(reasonHandshake) == 1 })
	})
	t.Run("too many handshakes", func(t *testing.T) {
		e := newEnv(t, func(c *Config) { c.HandshakeTimeout, c.MaxHandshakes = time.Hour, 1 })
		first, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer first.Close()
		testutil.Eventually(t, 10*time.Second, "first handshake admitted", func() bool {
			e.door.mu.Lock()
			defer e.door.mu.Unlock()
			return e.door.handshakes == 1
		})
		second, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer second.Close()
		waitClosed(t, second, "a connection beyond MaxHandshakes")
		// The refusal is counted around the close, not before it.
		testutil.Eventually(t, 10*time.Second, "the busy refusal counted", func() bool { return e.refused(reasonBusy) == 1 })
		// The slot frees when the first goes away.
		first.Close()
		eu := e.issue(t, e.clientCA, "remote-eu")
		e.door.Allow("eu", eu.serial)
		testutil.EventuallyNoError(t, 10*time.Second, "a handshake after the slot freed", func() error {
			_, err := e.dial(t, &eu.cert)
			return err
		})
	})
	t.Run("etcd unreachable", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead := ln.Addr().String()
		ln.Close()
		e := newEnv(t, func(c *Config) { c.Upstream = dead })
		eu := e.issue(t, e.clientCA, "remote-eu")
		e.door.Allow("eu", eu.serial)
		c, err := e.dial(t, &eu.cert)
		if err == nil {
			t.Fatal("round trip through a door whose etcd is down")
		}
		if c != nil {
			waitClosed(t, c, "client connection when etcd is unreachable")
		}
		testutil.Eventually(t, 10*time.Second, "counted", func() bool {
			return e.refused(reasonUpstream) == 1 && len(e.door.Connections()) == 0
		})
	})
}

func TestClusterOf(t *testing.T) {
	for cn, want := range map[string]string{"remote-eu": "eu", "remote-": "", "root": "", "trellis-writer": "", "remoteeu": ""} {
		got, ok := ClusterOf(cn)
		if got != want || ok != (want != "") {
			t.Errorf("ClusterOf(%q) = %q, %v; want %q", cn, got, ok, want)
		}
	}
	if CommonName("eu") != "remote-eu" {
		t.Errorf("CommonName(eu) = %q", CommonName("eu"))
	}
}

func TestNewRefusesIncompleteConfig(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Error("New accepted an empty config")
	}
}
