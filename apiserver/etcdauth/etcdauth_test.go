package etcdauth_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/trellis-mesh/trellis/apiserver/etcdauth"
	"github.com/trellis-mesh/trellis/apiserver/pki"
	"github.com/trellis-mesh/trellis/kvstore"
)

// etcdAuthEnv is an embedded etcd serving mTLS with client-cert auth, as
// the API server runs it: the server CA signs its serving certificate,
// the client CA every client certificate it accepts.
type etcdAuthEnv struct {
	serverCA  *pki.CA
	ca        *pki.CA // the client CA
	dir       string
	endpoints []string
}

func newEtcdAuthEnv(t *testing.T) *etcdAuthEnv {
	t.Helper()
	dir := t.TempDir()
	serverCA, _, err := pki.LoadOrCreateCA(filepath.Join(dir, "pki"), "test")
	if err != nil {
		t.Fatal(err)
	}
	ca, _, err := pki.LoadOrCreateClientCA(filepath.Join(dir, "pki"), "test")
	if err != nil {
		t.Fatal(err)
	}
	crt, key, err := serverCA.EnsureServerCert(filepath.Join(dir, "pki"), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{
		Dir: filepath.Join(dir, "etcd"),
		TLS: &kvstore.EmbeddedTLS{
			CertFile:       crt,
			KeyFile:        key,
			TrustedCAFile:  filepath.Join(dir, "pki", pki.ClientCACertFile),
			ClientCertAuth: true,
		},
	})
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(func() { e.Close() })
	return &etcdAuthEnv{serverCA: serverCA, ca: ca, dir: dir, endpoints: e.Endpoints()}
}

// client connects with a certificate for commonName issued by ca (the
// env's client CA when nil).
func (env *etcdAuthEnv) client(t *testing.T, commonName string, ca *pki.CA) *clientv3.Client {
	t.Helper()
	if ca == nil {
		ca = env.ca
	}
	certPEM, keyPEM, err := ca.IssueClient(commonName, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	clientDir := filepath.Join(env.dir, "clients", ca.Cert.Subject.CommonName)
	crt, key, err := pki.WriteClientCert(clientDir, commonName, certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg, err := kvstore.LoadClientTLS(filepath.Join(env.dir, "pki", pki.CACertFile), crt, key)
	if err != nil {
		t.Fatal(err)
	}
	// A bare etcd client: these tests check what etcd itself lets each
	// user do, whatever Trellis's own client would or would not send.
	c, err := clientv3.New(clientv3.Config{Endpoints: env.endpoints, TLS: tlsCfg, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func wantDenied(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, rpctypes.ErrPermissionDenied) {
		t.Errorf("%s: err = %v, want etcd permission denied", what, err)
	}
}

func TestEtcdAuth(t *testing.T) {
	env := newEtcdAuthEnv(t)
	ctx := testCtx(t)
	root := env.client(t, etcdauth.RootUser, nil)

	if err := etcdauth.Ensure(ctx, root); err != nil {
		t.Fatalf("EnsureEtcdAuth (first start): %v", err)
	}
	if st, err := root.AuthStatus(ctx); err != nil || !st.Enabled {
		t.Fatalf("auth status after EnsureEtcdAuth: enabled=%v err=%v", st != nil && st.Enabled, err)
	}

	writer := env.client(t, etcdauth.LocalWriterUser, nil)
	const nodeKey = "trellis/v1/nodes/eu/n1"
	if _, err := writer.Put(ctx, nodeKey, "node"); err != nil {
		t.Fatalf("writer put %s: %v", nodeKey, err)
	}
	if _, err := writer.Put(ctx, "trellis/health", "x"); err != nil {
		t.Errorf("writer put trellis/health: %v", err)
	}
	_, err := writer.Put(ctx, "other/x", "x")
	wantDenied(t, "writer put outside trellis/", err)
	err = etcdauth.Ensure(ctx, writer)
	if !errors.Is(err, rpctypes.ErrPermissionDenied) || !strings.Contains(err.Error(), `"root"`) {
		t.Errorf("EnsureEtcdAuth as the writer: err = %v, want permission denied with a hint to use root", err)
	}

	// The user the etcd front door forwards every remote cluster as.
	remote := env.client(t, etcdauth.RemoteReaderUser, nil)

	t.Run("remote reads trellis/v1", func(t *testing.T) {
		resp, err := remote.Get(ctx, nodeKey)
		if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "node" {
			t.Fatalf("remote get %s: resp=%v err=%v", nodeKey, resp, err)
		}
		if resp, err := remote.Get(ctx, "trellis/v1/", clientv3.WithPrefix()); err != nil || resp.Count != 1 {
			t.Fatalf("remote list trellis/v1/: resp=%v err=%v", resp, err)
		}
	})
	t.Run("remote watches trellis/v1", func(t *testing.T) {
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		wch := remote.Watch(wctx, "trellis/v1/", clientv3.WithPrefix(), clientv3.WithCreatedNotify())
		if wr := <-wch; wr.Err() != nil || !wr.Created {
			t.Fatalf("remote watch trellis/v1/: %v", wr.Err())
		}
		if _, err := writer.Put(ctx, "trellis/v1/nodes/eu/n2", "node2"); err != nil {
			t.Fatal(err)
		}
		wr := <-wch
		if wr.Err() != nil || len(wr.Events) != 1 || string(wr.Events[0].Kv.Key) != "trellis/v1/nodes/eu/n2" {
			t.Fatalf("remote watch event: %+v err=%v", wr.Events, wr.Err())
		}
	})
	t.Run("remote cannot write", func(t *testing.T) {
		_, err := remote.Put(ctx, "trellis/v1/nodes/eu/evil", "x")
		wantDenied(t, "remote put", err)
		_, err = remote.Delete(ctx, nodeKey)
		wantDenied(t, "remote delete", err)
		_, err = remote.Txn(ctx).Then(clientv3.OpPut(nodeKey, "x")).Commit()
		wantDenied(t, "remote txn put", err)
		_, err = remote.UserAddWithOptions(ctx, "evil", "", &clientv3.UserAddOptions{NoPassword: true})
		wantDenied(t, "remote creating a user", err)
	})
	t.Run("remote cannot read outside trellis/v1", func(t *testing.T) {
		_, err := remote.Get(ctx, "trellis/health")
		wantDenied(t, "remote get trellis/health", err)
		_, err = remote.Get(ctx, "other/x")
		wantDenied(t, "remote get other/x", err)
		_, err = remote.Get(ctx, "trellis/", clientv3.WithPrefix())
		wantDenied(t, "remote list trellis/", err)
		wr := <-remote.Watch(ctx, "trellis/", clientv3.WithPrefix())
		if !wr.Canceled || wr.Err() == nil {
			t.Errorf("remote watch trellis/: canceled=%v err=%v, want refused", wr.Canceled, wr.Err())
		}
	})
	t.Run("remote cluster certificate straight to etcd", func(t *testing.T) {
		// A remote's own certificate names no etcd user: only the front
		// door, which checks its serial, gets a remote in.
		_, err := env.client(t, "remote-us", nil).Get(ctx, nodeKey)
		wantDenied(t, "get as a user that does not exist", err)
	})
	t.Run("certificate from the server CA", func(t *testing.T) {
		c := env.client(t, etcdauth.RootUser, env.serverCA)
		gctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		if _, err := c.Get(gctx, nodeKey); err == nil {
			t.Fatal("get with a root certificate from the server CA succeeded")
		}
	})
	t.Run("certificate from another CA", func(t *testing.T) {
		other, _, err := pki.LoadOrCreateCA(t.TempDir(), "other")
		if err != nil {
			t.Fatal(err)
		}
		// Even CN root gets nowhere: the TLS handshake refuses the chain.
		c := env.client(t, etcdauth.RootUser, other)
		gctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		if _, err := c.Get(gctx, nodeKey); err == nil {
			t.Fatal("get with a certificate from another CA succeeded")
		}
		// The client only sees a timeout (it retries an unavailable
		// endpoint), so show the refusal on a bare TLS connection. With
		// TLS 1.3 the server's alert arrives on the first read.
		certPEM, keyPEM, err := other.IssueClient(etcdauth.RootUser, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(env.serverCA.CertPEM)
		host := strings.TrimPrefix(env.endpoints[0], "https://")
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 3 * time.Second}, "tcp", host,
			&tls.Config{
				RootCAs:    pool,
				NextProtos: []string{"h2"},
				// Send the certificate even though the server's list of
				// acceptable CAs does not name its issuer (Go's client would
				// otherwise send none), so the server has to reject it.
				GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
			})
		if err == nil {
			conn.SetReadDeadline(time.Now().Add(3 * time.Second))
			_, err = conn.Read(make([]byte, 1))
			conn.Close()
		}
		if err == nil || !strings.Contains(err.Error(), "tls: ") {
			t.Fatalf("TLS with a certificate from another CA: err = %v, want a TLS alert", err)
		}
		t.Logf("refused at TLS: %v", err)
	})

	// Later starts: the root certificate client converges everything again.
	if err := etcdauth.Ensure(ctx, root); err != nil {
		t.Fatalf("EnsureEtcdAuth (second start): %v", err)
	}

	t.Run("drift is repaired", func(t *testing.T) {
		// An operator widens the reader role and gives the remote user the
		// writer role.
		if _, err := root.RoleGrantPermission(ctx, etcdauth.RemoteReaderRole, "\x00", "\x00", clientv3.PermissionType(clientv3.PermReadWrite)); err != nil {
			t.Fatal(err)
		}
		if _, err := root.UserGrantRole(ctx, etcdauth.RemoteReaderUser, etcdauth.LocalWriterRole); err != nil {
			t.Fatal(err)
		}
		if _, err := remote.Put(ctx, "other/y", "x"); err != nil {
			t.Fatalf("setup: widened role cannot write: %v", err)
		}
		if err := etcdauth.Ensure(ctx, root); err != nil {
			t.Fatal(err)
		}
		role, err := root.RoleGet(ctx, etcdauth.RemoteReaderRole)
		if err != nil || len(role.Perm) != 1 || string(role.Perm[0].Key) != "trellis/v1/" ||
			string(role.Perm[0].RangeEnd) != "trellis/v10" || role.Perm[0].PermType != clientv3.PermRead {
			t.Fatalf("reader role after repair: %+v err=%v", role, err)
		}
		u, err := root.UserGet(ctx, etcdauth.RemoteReaderUser)
		if err != nil || len(u.Roles) != 1 || u.Roles[0] != etcdauth.RemoteReaderRole {
			t.Fatalf("%s roles after repair: %+v err=%v", etcdauth.RemoteReaderUser, u, err)
		}
		_, err = remote.Put(ctx, "other/z", "x")
		wantDenied(t, "remote put after repair", err)
		_, err = remote.Put(ctx, "trellis/v1/nodes/eu/evil", "x")
		wantDenied(t, "remote put under trellis/v1 after repair", err)
	})

	t.Run("per-remote users of before the front door are deleted", func(t *testing.T) {
		// A state dir from before the front door: remote-eu is an etcd
		// user of its own, so eu's certificate reads straight from etcd.
		if _, err := root.UserAddWithOptions(ctx, "remote-eu", "", &clientv3.UserAddOptions{NoPassword: true}); err != nil {
			t.Fatal(err)
		}
		if _, err := root.UserGrantRole(ctx, "remote-eu", etcdauth.RemoteReaderRole); err != nil {
			t.Fatal(err)
		}
		legacy := env.client(t, "remote-eu", nil)
		if _, err := legacy.Get(ctx, nodeKey); err != nil {
			t.Fatalf("setup: remote-eu cannot read: %v", err)
		}
		if err := etcdauth.Ensure(ctx, root); err != nil {
			t.Fatal(err)
		}
		users, err := root.UserList(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{etcdauth.RootUser, etcdauth.RemoteReaderUser, etcdauth.LocalWriterUser}; !slices.Equal(users.Users, want) {
			t.Errorf("users after Ensure = %v, want %v", users.Users, want)
		}
		_, err = legacy.Get(ctx, nodeKey)
		wantDenied(t, "get as remote-eu after Ensure", err)
	})
}

// TestEnsureEtcdAuthWithoutRoot: on plain etcd an unauthenticated client
// sets auth up once; after that it is told to come back as root.
func TestEnsureEtcdAuthWithoutRoot(t *testing.T) {
	ctx := testCtx(t)
	e, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	c, err := kvstore.NewClient(kvstore.Config{Endpoints: e.Endpoints(), QPS: -1, DialTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	if err := etcdauth.Ensure(ctx, c.Auth()); err != nil {
		t.Fatalf("EnsureEtcdAuth with auth off: %v", err)
	}
	err = etcdauth.Ensure(ctx, c.Auth())
	if !errors.Is(err, rpctypes.ErrUserEmpty) || !strings.Contains(err.Error(), `"root"`) {
		t.Fatalf("EnsureEtcdAuth unauthenticated with auth on: err = %v, want user-empty with a hint to use root", err)
	}
}
