package client

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// request is what the fake server saw.
type request struct {
	method, path, auth, contentType, body string
}

// fakeServer answers like the mesh API server's routes do: registry errors
// as {"error": ...}, admin errors as plain text.
type fakeServer struct {
	mu   sync.Mutex
	seen []request
}

func (f *fakeServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	f.seen = append(f.seen, request{r.Method, r.URL.EscapedPath(), r.Header.Get("Authorization"), r.Header.Get("Content-Type"), string(body)})
	f.mu.Unlock()
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/v1/nodes":
		json.NewEncoder(w).Encode([]v1.NodeRequest{{Name: "n1", IPs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}}})
	case r.Method == http.MethodGet && r.URL.Path == "/admin/v1/info":
		json.NewEncoder(w).Encode(v1.ClusterInfo{Name: "eu", ID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}})
	case r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/admin/v1/remotes/"):
		json.NewEncoder(w).Encode(v1.RemoteCredentials{Cluster: "eu", For: strings.TrimPrefix(r.URL.Path, "/admin/v1/remotes/"), User: "remote-us"})
	case r.Method == http.MethodDelete && r.URL.Path == "/v1/endpoints/10.1.0.9":
		w.WriteHeader(http.StatusNotFound)
		json.NewEncoder(w).Encode(map[string]string{"error": "not found: endpoint 10.1.0.9 is not registered"})
	case r.URL.Path == "/readyz":
		http.Error(w, "not yet synced: nodes", http.StatusServiceUnavailable)
	case r.Method == http.MethodPut:
		w.WriteHeader(http.StatusNoContent)
	default:
		http.Error(w, "no such route", http.StatusTeapot)
	}
}

func (f *fakeServer) last() request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.seen[len(f.seen)-1]
}

func newTestClient(t *testing.T) (*Client, *fakeServer) {
	t.Helper()
	f := &fakeServer{}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	c, err := New(Config{URL: srv.URL + "/", Token: " secret\n"})
	if err != nil {
		t.Fatal(err)
	}
	return c, f
}

// Requests carry the token, JSON bodies and the routes the server serves;
// answers decode into the api/v1 types.
func TestRequests(t *testing.T) {
	c, f := newTestClient(t)
	ctx := context.Background()
	ready := false

	if err := c.PutNode(ctx, v1.NodeRequest{Name: "n1", IPs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}}); err != nil {
		t.Fatal(err)
	}
	if got := f.last(); got.method != http.MethodPut || got.path != "/v1/nodes/n1" || got.auth != "Bearer secret" ||
		got.contentType != "application/json" || got.body != `{"name":"n1","ips":["192.0.2.1"]}` {
		t.Errorf("PutNode sent %+v", got)
	}
	if err := c.PutEndpoint(ctx, v1.EndpointRequest{IP: netip.MustParseAddr("10.1.0.5"), Namespace: "default", Ready: &ready}); err != nil {
		t.Fatal(err)
	}
	if got := f.last(); got.path != "/v1/endpoints/10.1.0.5" || !strings.Contains(got.body, `"ready":false`) {
		t.Errorf("PutEndpoint sent %+v", got)
	}
	if err := c.PutService(ctx, v1.ServiceRequest{Namespace: "default", Name: "echo"}); err != nil {
		t.Fatal(err)
	}
	if got := f.last(); got.path != "/v1/services/default/echo" {
		t.Errorf("PutService sent %+v", got)
	}
	nodes, err := c.Nodes(ctx)
	if err != nil || len(nodes) != 1 || nodes[0].Name != "n1" {
		t.Errorf("Nodes = %+v, %v", nodes, err)
	}
	info, err := c.Info(ctx)
	if err != nil || info.Name != "eu" || info.ID != 1 || len(info.PodCIDRs) != 1 {
		t.Errorf("Info = %+v, %v", info, err)
	}
	creds, err := c.IssueRemote(ctx, "us")
	if err != nil || creds.For != "us" || f.last().method != http.MethodPost || f.last().path != "/admin/v1/remotes/us" {
		t.Errorf("IssueRemote = %+v, %v (sent %+v)", creds, err, f.last())
	}
}

// Refusals come back as *APIError with the server's message, JSON or
// plain; a 404 matches ErrNotFound and nothing else does.
func TestErrors(t *testing.T) {
	c, _ := newTestClient(t)
	ctx := context.Background()

	err := c.DeleteEndpoint(ctx, netip.MustParseAddr("10.1.0.9"))
	var apiErr *APIError
	if !errors.As(err, &apiErr) || !errors.Is(err, ErrNotFound) || apiErr.Message != "not found: endpoint 10.1.0.9 is not registered" {
		t.Errorf("delete of a missing endpoint: %v", err)
	}
	err = c.Ready(ctx)
	if !errors.As(err, &apiErr) || apiErr.Status != http.StatusServiceUnavailable || apiErr.Message != "not yet synced: nodes" || errors.Is(err, ErrNotFound) {
		t.Errorf("Ready on an unready server: %v", err)
	}
	if err := c.RevokeRemote(ctx, "us"); err == nil || !strings.Contains(err.Error(), "no such route") {
		t.Errorf("unexpected status: %v", err)
	}
}

// A bad URL or an empty token file is refused before any request.
func TestConfigRefusals(t *testing.T) {
	for _, u := range []string{"", "192.0.2.1:9870", "ftp://x", "http://"} {
		if _, err := New(Config{URL: u}); err == nil {
			t.Errorf("URL %q accepted", u)
		}
	}
	dir := t.TempDir()
	if _, err := FromStateDir(dir, nil); err == nil || !strings.Contains(err.Error(), "state dir") {
		t.Errorf("FromStateDir on an empty dir: %v", err)
	}
	os.WriteFile(filepath.Join(dir, v1.StateHTTPAddrFile), []byte("http://127.0.0.1:1\n"), 0o600)
	os.WriteFile(filepath.Join(dir, v1.StateAdminTokenFile), []byte("  \n"), 0o600)
	if _, err := FromStateDir(dir, nil); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Errorf("FromStateDir with an empty token: %v", err)
	}
	os.WriteFile(filepath.Join(dir, v1.StateAdminTokenFile), []byte("tok\n"), 0o600)
	c, err := FromStateDir(dir, nil)
	if err != nil || c.URL() != "http://127.0.0.1:1" || c.token != "tok" {
		t.Errorf("FromStateDir = %+v, %v", c, err)
	}
}

// Over https the client always verifies the server: without the server
// CA it refuses to be built, with another CA it cannot connect.
func TestVerifiesTheServer(t *testing.T) {
	srv := httptest.NewTLSServer(&fakeServer{})
	t.Cleanup(srv.Close)
	if _, err := New(Config{URL: srv.URL}); err == nil || !strings.Contains(err.Error(), "CA") {
		t.Errorf("https without a CA: %v, want a refusal naming the CA", err)
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	c, err := New(Config{URL: srv.URL, CAPEM: caPEM, Token: "t"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Nodes(context.Background()); err != nil {
		t.Errorf("with the server's CA: %v", err)
	}
	c, err = New(Config{URL: srv.URL, CAPEM: selfSigned(t), Token: "t"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Nodes(context.Background()); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("with another CA: %v, want a certificate error", err)
	}
}

// selfSigned is the PEM of a CA certificate nothing is signed by.
func selfSigned(t *testing.T) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "other"}, IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}
