package frontdoor

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/trellis-mesh/trellis/apiserver/pki"
	"github.com/trellis-mesh/trellis/kvstore"
)

// BenchmarkFrontDoor compares reading etcd straight and through the
// door: one small Get on an open connection, and a new connection with
// its first Get (the door adds a second TLS handshake and dial).
//
//	go test -run XXX -bench FrontDoor ./apiserver/frontdoor
func BenchmarkFrontDoor(b *testing.B) {
	dir := b.TempDir()
	serverCA, _, err := pki.LoadOrCreateCA(dir, "eu")
	if err != nil {
		b.Fatal(err)
	}
	serverCA.Log = slog.New(slog.DiscardHandler)
	clientCA, _, err := pki.LoadOrCreateClientCA(dir, "eu")
	if err != nil {
		b.Fatal(err)
	}
	crt, key, err := serverCA.EnsureServerCert(dir, nil)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{
		Dir: filepath.Join(dir, "etcd"),
		TLS: &kvstore.EmbeddedTLS{CertFile: crt, KeyFile: key, TrustedCAFile: filepath.Join(dir, pki.ClientCACertFile), ClientCertAuth: true},
	})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	internal := strings.TrimPrefix(e.Endpoints()[0], "https://")

	serverPool := x509.NewCertPool()
	serverPool.AddCert(serverCA.Cert)
	clientPool := x509.NewCertPool()
	clientPool.AddCert(clientCA.Cert)
	certOf := func(cn string) (tls.Certificate, *x509.Certificate) {
		certPEM, keyPEM, err := clientCA.IssueClient(cn, time.Hour)
		if err != nil {
			b.Fatal(err)
		}
		c, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			b.Fatal(err)
		}
		leaf, _ := pki.ParseCertPEM(certPEM)
		return c, leaf
	}
	serverCert, err := tls.LoadX509KeyPair(crt, key)
	if err != nil {
		b.Fatal(err)
	}
	upCert, _ := certOf("trellis-remote")
	door, err := New(Config{
		Certificate: serverCert, ClientCAs: clientPool, Upstream: internal,
		UpstreamTLS: &tls.Config{RootCAs: serverPool, ServerName: "127.0.0.1", Certificates: []tls.Certificate{upCert}},
	})
	if err != nil {
		b.Fatal(err)
	}
	remoteCert, leaf := certOf("remote-us")
	door.Allow("us", leaf.SerialNumber)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- door.Serve(sctx, ln) }()
	defer func() { stop(); <-served }()

	newClient := func(addr string) *clientv3.Client {
		c, err := clientv3.New(clientv3.Config{
			Endpoints: []string{"https://" + addr}, DialTimeout: 5 * time.Second, Logger: zap.NewNop(),
			TLS: &tls.Config{RootCAs: serverPool, Certificates: []tls.Certificate{remoteCert}},
		})
		if err != nil {
			b.Fatal(err)
		}
		return c
	}
	seed := newClient(internal)
	if _, err := seed.Put(ctx, "trellis/v1/cluster-config/eu", strings.Repeat("x", 300)); err != nil {
		b.Fatal(err)
	}
	seed.Close()

	for _, target := range []struct{ name, addr string }{{"direct", internal}, {"frontdoor", ln.Addr().String()}} {
		b.Run("get/"+target.name, func(b *testing.B) {
			c := newClient(target.addr)
			defer c.Close()
			if _, err := c.Get(ctx, "trellis/v1/cluster-config/eu"); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for b.Loop() {
				if _, err := c.Get(ctx, "trellis/v1/cluster-config/eu", clientv3.WithSerializable()); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("connect/"+target.name, func(b *testing.B) {
			for b.Loop() {
				c := newClient(target.addr)
				if _, err := c.Get(ctx, "trellis/v1/cluster-config/eu", clientv3.WithSerializable()); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
		})
	}
}
