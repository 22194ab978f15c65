package apiserver_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/pki"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// clientCreds is what a client presents to an etcd: the CA it trusts for
// the server, its certificate and key.
type clientCreds struct {
	what                string
	serverCA, cert, key []byte
}

func credsOf(what string, c v1.RemoteCredentials) clientCreds {
	return clientCreds{what: what, serverCA: []byte(c.CAPEM), cert: []byte(c.CertPEM), key: []byte(c.KeyPEM)}
}

// localCreds are the API server's own client certificate for user, from
// its state dir.
func (a *apiServerProcess) localCreds(t *testing.T, user string) clientCreds {
	t.Helper()
	read := func(parts ...string) []byte {
		b, err := os.ReadFile(filepath.Join(append([]string{a.stateDir, "pki"}, parts...)...))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	return clientCreds{what: a.name + "'s " + user, serverCA: read(pki.CACertFile), cert: read("clients", user+".crt"), key: read("clients", user+".key")}
}

// frontDoor is where remote clusters dial; internal is the embedded etcd
// itself, from <state-dir>/etcd.addr.
func (a *apiServerProcess) frontDoor() string { return fmt.Sprintf("127.0.0.1:%d", a.etcdPort) }

func (a *apiServerProcess) internal(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(a.stateDir, v1.StateEtcdAddrFile))
	if err != nil {
		t.Fatal(err)
	}
	u := strings.TrimSpace(string(b))
	if !strings.HasPrefix(u, "https://127.0.0.1:") {
		t.Fatalf("%s = %q, want an https URL on 127.0.0.1", v1.StateEtcdAddrFile, u)
	}
	return strings.TrimPrefix(u, "https://")
}

func (c clientCreds) tlsConfig(t *testing.T) *tls.Config {
	t.Helper()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(c.serverCA) {
		t.Fatalf("%s: no server CA", c.what)
	}
	cert, err := tls.X509KeyPair(c.cert, c.key)
	if err != nil {
		t.Fatalf("%s: %v", c.what, err)
	}
	return &tls.Config{
		RootCAs: pool, NextProtos: []string{"h2"},
		// Send the certificate even when the server's list of acceptable
		// CAs does not name its issuer, so the server has to judge it.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
	}
}

// etcdClient is a bare etcd client with c at addr (host:port).
func (c clientCreds) etcdClient(t *testing.T, addr string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: []string{"https://" + addr}, DialTimeout: 5 * time.Second, Logger: zap.NewNop(), TLS: c.tlsConfig(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// wantRefused checks that the server at addr turns c away in the TLS
// handshake: an alert, at the latest on the first read (TLS 1.3). A
// server that lets c in sends nothing, and the read times out.
func wantRefused(t *testing.T, c clientCreds, addr, where string) {
	t.Helper()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, c.tlsConfig(t))
	if err == nil {
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	var ne net.Error
	if err == nil || (errors.As(err, &ne) && ne.Timeout()) || !strings.Contains(err.Error(), "tls: ") {
		t.Errorf("%s at %s: err = %v, want refused with a TLS alert", c.what, where, err)
	}
}

// wantReads checks that c reads key through addr.
func wantReads(t *testing.T, c clientCreds, addr, key string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := c.etcdClient(t, addr).Get(ctx, key)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("%s reading %s at %s: resp %v, err %v", c.what, key, addr, resp, err)
	}
}

// watchStream opens a raw etcd watch on trellis/v1/ with c through addr.
// Unlike clientv3's Watch, which reconnects behind the caller's back, a
// raw stream ends when its connection does. It returns the channel the
// stream's events go to, closed with the stream's error when it ends.
func watchStream(t *testing.T, c clientCreds, addr string) (events <-chan string, ended <-chan error) {
	t.Helper()
	cli := c.etcdClient(t, addr)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := etcdserverpb.NewWatchClient(cli.ActiveConnection()).Watch(ctx)
	if err != nil {
		t.Fatalf("%s: open watch: %v", c.what, err)
	}
	err = stream.Send(&etcdserverpb.WatchRequest{RequestUnion: &etcdserverpb.WatchRequest_CreateRequest{
		CreateRequest: &etcdserverpb.WatchCreateRequest{Key: []byte(v1.Prefix), RangeEnd: []byte(clientv3.GetPrefixRangeEnd(v1.Prefix))},
	}})
	if err != nil {
		t.Fatalf("%s: create watch: %v", c.what, err)
	}
	resp, err := stream.Recv()
	if err != nil || !resp.Created || resp.Canceled {
		t.Fatalf("%s: watch on %s not created: %+v, %v", c.what, v1.Prefix, resp, err)
	}
	ev, end := make(chan string, 1000), make(chan error, 1)
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				end <- err
				close(ev)
				return
			}
			for _, e := range resp.Events {
				select {
				case ev <- string(e.Kv.Key):
				default:
				}
			}
		}
	}()
	return ev, end
}

// waitEvent waits until the stream delivers key.
func waitEvent(t *testing.T, events <-chan string, key string) {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case k, ok := <-events:
			if !ok {
				t.Fatalf("watch ended before it delivered %s", key)
			}
			if k == key {
				return
			}
		case <-timeout:
			t.Fatalf("watch did not deliver %s", key)
		}
	}
}

// waitEnded waits until the watch stream ends.
func waitEnded(t *testing.T, ended <-chan error, what string) {
	t.Helper()
	select {
	case err := <-ended:
		t.Logf("%s: watch ended: %v", what, err)
	case <-time.After(60 * time.Second):
		t.Fatalf("%s: the watch is still open", what)
	}
}

func (a *apiServerProcess) issue(t *testing.T, remote string) v1.RemoteCredentials {
	t.Helper()
	var creds v1.RemoteCredentials
	if err := json.Unmarshal([]byte(a.mustCall(t, "POST", "/admin/v1/remotes/"+remote, "")), &creds); err != nil {
		t.Fatal(err)
	}
	return creds
}

// seedOldState gives stateDir what an API server of before the client CA
// had, the way the lab set clusters up: the lab's one CA shared by every
// cluster, and root and writer certificates it signed.
func seedOldState(t *testing.T, shared *pki.CA, sharedDir, stateDir string) (oldRoot clientCreds) {
	t.Helper()
	dst := filepath.Join(stateDir, "pki")
	for _, f := range []string{pki.CACertFile, pki.CAKeyFile} {
		b, err := os.ReadFile(filepath.Join(sharedDir, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(dst, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, user := range []string{"root", "trellis-writer"} {
		certPEM, keyPEM, err := shared.IssueClient(user, pki.CAValidity)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := pki.WriteClientCert(filepath.Join(dst, "clients"), user, certPEM, keyPEM); err != nil {
			t.Fatal(err)
		}
		if user == "root" {
			oldRoot = clientCreds{what: "old shared-CA root", serverCA: shared.CertPEM, cert: certPEM, key: keyPEM}
		}
	}
	return oldRoot
}

// Issue 10's probes, against real API server processes. Two clusters
// start from state dirs set up as the lab used to: one CA shared by both
// and root and writer certificates it signed. Then: no certificate of one
// cluster's state dir works on the other's etcd, remote readers read
// trellis/v1/ through the front door and nothing else, and revocation
// sticks and cuts open watches.
func TestMeshTrust(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the trellis binary; skipped in -short")
	}
	bin := testutil.BuildTrellis(t)
	sharedDir := t.TempDir()
	shared, _, err := pki.LoadOrCreateCA(sharedDir, "lab")
	if err != nil {
		t.Fatal(err)
	}
	eu := newAPIServerProcess(t, bin, "eu", 1)
	ap := newAPIServerProcess(t, bin, "ap", 3)
	oldRoot := seedOldState(t, shared, sharedDir, eu.stateDir)
	seedOldState(t, shared, sharedDir, ap.stateDir)
	eu.start(t)
	ap.start(t)

	t.Run("upgrade", func(t *testing.T) {
		if !strings.Contains(eu.proc.Output(), "run `trellis connect` again") {
			t.Error("no log line telling to re-issue remote credentials after the client CA was created")
		}
		for _, user := range []string{"root", "trellis-writer", "trellis-remote"} {
			c := eu.localCreds(t, user)
			cert, err := pki.ParseCertPEM(c.cert)
			if err != nil {
				t.Fatal(err)
			}
			if cert.Issuer.CommonName != "trellis-client-ca-eu" {
				t.Errorf("%s's certificate issued by %q, want trellis-client-ca-eu", user, cert.Issuer.CommonName)
			}
		}
		wantRefused(t, oldRoot, eu.internal(t), "eu's own internal etcd")
	})

	t.Run("no state dir credential works on another cluster", func(t *testing.T) {
		// Sanity: ap's own root works on ap's internal etcd.
		wantReads(t, ap.localCreds(t, "root"), ap.internal(t), v1.ClusterConfigKey("ap"))
		for _, c := range []clientCreds{eu.localCreds(t, "root"), eu.localCreds(t, "trellis-writer"), eu.localCreds(t, "trellis-remote"), oldRoot} {
			wantRefused(t, c, ap.frontDoor(), "ap's front door")
			wantRefused(t, c, ap.internal(t), "ap's internal etcd")
		}
		// Local identities are not remote readers, even at their own door.
		for _, user := range []string{"root", "trellis-writer", "trellis-remote"} {
			wantRefused(t, ap.localCreds(t, user), ap.frontDoor(), "ap's own front door")
		}
		// A remote certificate ap issued does not work on eu.
		wantRefused(t, credsOf("ap's certificate for eu", ap.issue(t, "eu")), eu.frontDoor(), "eu's front door")
	})

	t.Run("a remote reads trellis/v1 and nothing else", func(t *testing.T) {
		us := credsOf("us on eu", eu.issue(t, "us"))
		wantReads(t, us, eu.frontDoor(), v1.ClusterConfigKey("eu"))
		cli := us.etcdClient(t, eu.frontDoor())
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		for _, prefix := range []string{"trellis/registry/", "trellis/alloc/", "trellis/remotes/", "trellis/"} {
			if _, err := cli.Get(ctx, prefix, clientv3.WithPrefix()); !errors.Is(err, rpctypes.ErrPermissionDenied) {
				t.Errorf("remote read of %s: err = %v, want permission denied", prefix, err)
			}
		}
		for _, key := range []string{"trellis/v1/nodes/eu/evil", "trellis/registry/eu/nodes/evil", "trellis/remotes/eu/us"} {
			if _, err := cli.Put(ctx, key, "{}"); !errors.Is(err, rpctypes.ErrPermissionDenied) {
				t.Errorf("remote write of %s: err = %v, want permission denied", key, err)
			}
		}
		if _, err := cli.Delete(ctx, v1.ClusterConfigKey("eu")); !errors.Is(err, rpctypes.ErrPermissionDenied) {
			t.Errorf("remote delete: err = %v, want permission denied", err)
		}
	})

	t.Run("DELETE ends open watches and refuses new connections", func(t *testing.T) {
		x := credsOf("x's certificate", eu.issue(t, "x"))
		events, ended := watchStream(t, x, eu.frontDoor())
		eu.mustCall(t, "PUT", "/v1/nodes/n1", `{"ips":["192.168.0.1"]}`)
		waitEvent(t, events, "trellis/v1/nodes/eu/n1")
		if code, body := eu.call(t, "DELETE", "/admin/v1/remotes/x", ""); code != http.StatusNoContent {
			t.Fatalf("DELETE x: %d %s", code, body)
		}
		waitEnded(t, ended, "x after DELETE")
		wantRefused(t, x, eu.frontDoor(), "eu's front door after DELETE")
	})

	var y1, y2 clientCreds
	t.Run("issuing again never revives an old certificate", func(t *testing.T) {
		y1 = credsOf("y's first certificate", eu.issue(t, "y"))
		eu.mustCall(t, "DELETE", "/admin/v1/remotes/y", "")
		y2 = credsOf("y's second certificate", eu.issue(t, "y"))
		wantReads(t, y2, eu.frontDoor(), v1.ClusterConfigKey("eu"))
		wantRefused(t, y1, eu.frontDoor(), "eu's front door after y was deleted and issued again")
	})

	var z1, z2 clientCreds
	t.Run("issuing again supersedes without a DELETE", func(t *testing.T) {
		z1 = credsOf("z's first certificate", eu.issue(t, "z"))
		_, ended := watchStream(t, z1, eu.frontDoor())
		z2 = credsOf("z's second certificate", eu.issue(t, "z"))
		waitEnded(t, ended, "z's first certificate after z was issued again")
		wantRefused(t, z1, eu.frontDoor(), "eu's front door after z was issued again")
		wantReads(t, z2, eu.frontDoor(), v1.ClusterConfigKey("eu"))
	})

	t.Run("revocation survives a restart", func(t *testing.T) {
		if y1.cert == nil || z1.cert == nil {
			t.Skip("needs the two subtests before")
		}
		eu.mustCall(t, "DELETE", "/admin/v1/remotes/z", "")
		eu.proc.Stop(t)
		eu.start(t)
		wantReads(t, y2, eu.frontDoor(), v1.ClusterConfigKey("eu"))
		for _, c := range []clientCreds{y1, z1, z2} {
			wantRefused(t, c, eu.frontDoor(), "eu's front door after a restart")
		}

		metrics := eu.mustCall(t, "GET", "/metrics", "")
		if !strings.Contains(metrics, `trellis_frontdoor_refused_total{reason="unknown_cluster"}`) {
			t.Error("/metrics does not count the front door's refusals")
		}
	})
}
