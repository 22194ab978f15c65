package pki

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func newCA(t *testing.T, dir string) *CA {
	t.Helper()
	ca, created, err := LoadOrCreateCA(dir, "test")
	if err != nil {
		t.Fatalf("LoadOrCreateCA: %v", err)
	}
	if !created {
		t.Fatalf("LoadOrCreateCA in an empty dir: created = false")
	}
	return ca
}

func mode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := parseCertPEM(data)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return cert
}

func TestCACreateThenLoad(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	ca := newCA(t, dir)

	if got, want := ca.Cert.Subject.CommonName, "trellis-ca-test"; got != want {
		t.Errorf("CN = %q, want %q", got, want)
	}
	if !ca.Cert.IsCA {
		t.Error("CA certificate has IsCA = false")
	}
	if life := ca.Cert.NotAfter.Sub(time.Now()); life < CAValidity-time.Hour {
		t.Errorf("CA valid for %s, want about %s", life, CAValidity)
	}
	if got := mode(t, filepath.Join(dir, CAKeyFile)); got != 0o600 {
		t.Errorf("ca.key mode = %v, want 0600", got)
	}
	if got := mode(t, dir); got != 0o700 {
		t.Errorf("state dir mode = %v, want 0700", got)
	}

	again, created, err := LoadOrCreateCA(dir, "other-name-ignored-on-load")
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	if created {
		t.Error("second LoadOrCreateCA created a new CA")
	}
	if !again.Cert.Equal(ca.Cert) || !keyMatches(again.Cert, ca.Key) || string(again.CertPEM) != string(ca.CertPEM) {
		t.Error("loaded CA differs from the created one")
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temporary file left behind: %s", e.Name())
		}
	}
}

func TestCALoadErrors(t *testing.T) {
	t.Run("cert without key", func(t *testing.T) {
		dir := t.TempDir()
		newCA(t, dir)
		os.Remove(filepath.Join(dir, CAKeyFile))
		_, _, err := LoadOrCreateCA(dir, "test")
		if err == nil || !strings.Contains(err.Error(), "ca.key does not") {
			t.Fatalf("err = %v, want one naming the missing ca.key", err)
		}
	})
	t.Run("key without cert", func(t *testing.T) {
		dir := t.TempDir()
		newCA(t, dir)
		os.Remove(filepath.Join(dir, CACertFile))
		_, _, err := LoadOrCreateCA(dir, "test")
		if err == nil || !strings.Contains(err.Error(), "ca.crt does not") {
			t.Fatalf("err = %v, want one naming the missing ca.crt", err)
		}
	})
	t.Run("mismatched pair", func(t *testing.T) {
		dir, other := t.TempDir(), t.TempDir()
		newCA(t, dir)
		newCA(t, other)
		key, err := os.ReadFile(filepath.Join(other, CAKeyFile))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, CAKeyFile), key, 0o600); err != nil {
			t.Fatal(err)
		}
		_, _, err = LoadOrCreateCA(dir, "test")
		if err == nil || !strings.Contains(err.Error(), "does not match") {
			t.Fatalf("err = %v, want a mismatch error", err)
		}
	})
	t.Run("not a CA", func(t *testing.T) {
		dir := t.TempDir()
		ca := newCA(t, dir)
		// A server certificate and its key are a matching pair, but not a CA.
		crt, key, err := ca.EnsureServerCert(t.TempDir(), nil)
		if err != nil {
			t.Fatal(err)
		}
		os.Rename(crt, filepath.Join(dir, CACertFile))
		os.Rename(key, filepath.Join(dir, CAKeyFile))
		_, _, err = LoadOrCreateCA(dir, "test")
		if err == nil || !strings.Contains(err.Error(), "not a CA") {
			t.Fatalf("err = %v, want a not-a-CA error", err)
		}
	})
	t.Run("empty cluster name", func(t *testing.T) {
		if _, _, err := LoadOrCreateCA(t.TempDir(), ""); err == nil {
			t.Fatal("created a CA with an empty cluster name")
		}
	})
}

func TestServerCert(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, dir)

	crt, key, err := ca.EnsureServerCert(dir, []string{"10.0.0.1", "API.example.com", "", "10.0.0.1"})
	if err != nil {
		t.Fatalf("EnsureServerCert: %v", err)
	}
	if got := mode(t, key); got != 0o600 {
		t.Errorf("server.key mode = %v, want 0600", got)
	}
	cert := readCert(t, crt)
	if !slices.Equal(cert.DNSNames, []string{"localhost", "api.example.com"}) {
		t.Errorf("DNS SANs = %v", cert.DNSNames)
	}
	for _, want := range []string{"127.0.0.1", "::1", "10.0.0.1"} {
		if !slices.ContainsFunc(cert.IPAddresses, func(ip net.IP) bool { return ip.Equal(net.ParseIP(want)) }) {
			t.Errorf("IP SANs %v lack %s", cert.IPAddresses, want)
		}
	}
	if !slices.Equal(cert.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) {
		t.Errorf("ExtKeyUsage = %v", cert.ExtKeyUsage)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: "api.example.com"}); err != nil {
		t.Errorf("server certificate does not verify for api.example.com: %v", err)
	}

	// Same or fewer hosts: kept.
	if _, _, err := ca.EnsureServerCert(dir, []string{"api.example.com"}); err != nil {
		t.Fatal(err)
	}
	if !readCert(t, crt).Equal(cert) {
		t.Error("server certificate reissued although it had every requested SAN")
	}

	// A new SAN: reissued with it.
	if _, _, err := ca.EnsureServerCert(dir, []string{"10.0.0.2"}); err != nil {
		t.Fatal(err)
	}
	re := readCert(t, crt)
	if re.Equal(cert) {
		t.Fatal("server certificate not reissued for a missing SAN")
	}
	if !slices.ContainsFunc(re.IPAddresses, func(ip net.IP) bool { return ip.Equal(net.ParseIP("10.0.0.2")) }) {
		t.Errorf("reissued certificate lacks 10.0.0.2: %v", re.IPAddresses)
	}

	// Missing key: reissued.
	os.Remove(key)
	if _, _, err := ca.EnsureServerCert(dir, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(key); err != nil {
		t.Errorf("server key not recreated: %v", err)
	}
	if readCert(t, crt).Equal(re) {
		t.Error("server certificate not reissued when its key was missing")
	}
}

func TestServerCertReissuedForOtherCA(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, dir)
	crt, _, err := ca.EnsureServerCert(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	other := newCA(t, t.TempDir())
	if _, _, err := other.EnsureServerCert(dir, nil); err != nil {
		t.Fatal(err)
	}
	if err := readCert(t, crt).CheckSignatureFrom(other.Cert); err != nil {
		t.Fatalf("server certificate not reissued by the other CA: %v", err)
	}
}

func TestServerCertRenewedBeforeExpiry(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, dir)
	crt, _, err := ca.EnsureServerCert(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Replace it with one that expires in 10 days, same key and SANs.
	old := readCert(t, crt)
	keyPEM, _ := os.ReadFile(filepath.Join(dir, ServerKeyFile))
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: ServerCommonName},
		ExtKeyUsage: old.ExtKeyUsage,
		DNSNames:    old.DNSNames,
		IPAddresses: old.IPAddresses,
	}
	der, err := ca.sign(tmpl, key.Public(), 10*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(crt, encodeCert(der), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ca.EnsureServerCert(dir, nil); err != nil {
		t.Fatal(err)
	}
	if got := readCert(t, crt).NotAfter; time.Until(got) < ServerValidity-time.Hour {
		t.Errorf("certificate expiring in 10 days not renewed: NotAfter %s", got)
	}
}

func TestIssueClient(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, dir)
	certPEM, keyPEM, err := ca.IssueClient("remote-eu", 48*time.Hour)
	if err != nil {
		t.Fatalf("IssueClient: %v", err)
	}
	out := filepath.Join(t.TempDir(), "clients")
	crt, key, err := WriteClientCert(out, "remote-eu", certPEM, keyPEM)
	if err != nil {
		t.Fatalf("WriteClientCert: %v", err)
	}
	if got := mode(t, key); got != 0o600 {
		t.Errorf("client key mode = %v, want 0600", got)
	}
	if got := mode(t, out); got != 0o700 {
		t.Errorf("client dir mode = %v, want 0700", got)
	}
	cert := readCert(t, crt)
	if cert.Subject.CommonName != "remote-eu" {
		t.Errorf("CN = %q, want remote-eu", cert.Subject.CommonName)
	}
	if life := time.Until(cert.NotAfter); life > 48*time.Hour || life < 47*time.Hour {
		t.Errorf("client certificate valid for %s, want 48h", life)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca.CertPEM) {
		t.Fatal("CA PEM not accepted")
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("client certificate does not verify for client auth: %v", err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Error("client certificate verifies for server auth")
	}
	other := newCA(t, t.TempDir())
	otherPool := x509.NewCertPool()
	otherPool.AddCert(other.Cert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: otherPool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Error("client certificate verifies against another CA")
	}

	// Validity is capped at the CA's end.
	long, _, err := ca.IssueClient("forever", 100*365*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := parseCertPEM(long); c.NotAfter.After(ca.Cert.NotAfter) {
		t.Errorf("client certificate outlives the CA: %s > %s", c.NotAfter, ca.Cert.NotAfter)
	}
}

func TestWriteClientCertRejectsBadNames(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, dir)
	certPEM, keyPEM, err := ca.IssueClient("x", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"", "..", "a/b", "ca", "client-ca", "server", ".hidden"} {
		if _, _, err := WriteClientCert(dir, name, certPEM, keyPEM); err == nil {
			t.Errorf("WriteClientCert(%q) succeeded", name)
		}
	}
	if _, _, err := WriteClientCert(dir, "x", keyPEM, certPEM); err == nil {
		t.Error("WriteClientCert accepted swapped certificate and key")
	}
	// The CA is untouched.
	if _, created, err := LoadOrCreateCA(dir, "test"); err != nil || created {
		t.Errorf("CA damaged: created=%v err=%v", created, err)
	}
}

// The client CA lives beside the server CA in the same dir and is a CA of
// its own: a certificate one signs does not verify against the other.
func TestClientCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	server := newCA(t, dir)
	client, created, err := LoadOrCreateClientCA(dir, "test")
	if err != nil || !created {
		t.Fatalf("LoadOrCreateClientCA beside a server CA: created=%v err=%v", created, err)
	}
	if got, want := client.Cert.Subject.CommonName, "trellis-client-ca-test"; got != want {
		t.Errorf("client CA CN = %q, want %q", got, want)
	}
	if client.Cert.Equal(server.Cert) || keyMatches(client.Cert, server.Key) {
		t.Fatal("client CA is the server CA")
	}
	if got := mode(t, filepath.Join(dir, ClientCAKeyFile)); got != 0o600 {
		t.Errorf("client-ca.key mode = %v, want 0600", got)
	}
	again, created, err := LoadOrCreateClientCA(dir, "test")
	if err != nil || created || !again.Cert.Equal(client.Cert) {
		t.Fatalf("second LoadOrCreateClientCA: created=%v err=%v same=%v", created, err, err == nil && again.Cert.Equal(client.Cert))
	}
	if s, created, err := LoadOrCreateCA(dir, "test"); err != nil || created || !s.Cert.Equal(server.Cert) {
		t.Fatalf("server CA changed by the client CA: created=%v err=%v", created, err)
	}

	certPEM, _, err := client.IssueClient("root", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ParseCertPEM(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	serverPool := x509.NewCertPool()
	serverPool.AddCert(server.Cert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: serverPool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Error("a client CA certificate verifies against the server CA")
	}

	os.Remove(filepath.Join(dir, ClientCAKeyFile))
	if _, _, err := LoadOrCreateClientCA(dir, "test"); err == nil || !strings.Contains(err.Error(), "client-ca.key does not") {
		t.Errorf("client CA without its key: err = %v, want one naming client-ca.key", err)
	}
}

func TestEnsureClientCert(t *testing.T) {
	dir := t.TempDir()
	server := newCA(t, dir)
	client, _, err := LoadOrCreateClientCA(dir, "test")
	if err != nil {
		t.Fatal(err)
	}
	clients := filepath.Join(dir, "clients")

	// A state dir from before the client CA: root was signed by the
	// (then only) CA, which is now the server CA.
	oldPEM, oldKey, err := server.IssueClient("root", CAValidity)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := WriteClientCert(clients, "root", oldPEM, oldKey); err != nil {
		t.Fatal(err)
	}
	crt, key, why, err := client.EnsureClientCert(clients, "root", CAValidity)
	if err != nil {
		t.Fatalf("EnsureClientCert: %v", err)
	}
	if !strings.Contains(why, "not signed by trellis-client-ca-test") {
		t.Errorf("reissue reason = %q, want one naming the client CA", why)
	}
	cert := readCert(t, crt)
	if err := cert.CheckSignatureFrom(client.Cert); err != nil {
		t.Fatalf("root not reissued under the client CA: %v", err)
	}
	if cert.Subject.CommonName != "root" || !slices.Contains(cert.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		t.Errorf("reissued certificate: CN %q, EKU %v", cert.Subject.CommonName, cert.ExtKeyUsage)
	}
	if got := mode(t, key); got != 0o600 {
		t.Errorf("client key mode = %v, want 0600", got)
	}

	// Kept when fine.
	if _, _, why, err := client.EnsureClientCert(clients, "root", CAValidity); err != nil || why != "" {
		t.Fatalf("second EnsureClientCert: reissued (%q), err %v", why, err)
	}
	if !readCert(t, crt).Equal(cert) {
		t.Error("a good client certificate was reissued")
	}

	// A file whose certificate names another user is replaced.
	wrongPEM, wrongKey, err := client.IssueClient("trellis-writer", CAValidity)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := WriteClientCert(clients, "root", wrongPEM, wrongKey); err != nil {
		t.Fatal(err)
	}
	if _, _, why, err := client.EnsureClientCert(clients, "root", CAValidity); err != nil || !strings.Contains(why, "common name") {
		t.Errorf("root.crt with CN trellis-writer: reason %q err %v, want a common-name reissue", why, err)
	}

	// Renewed before it expires.
	shortPEM, shortKey, err := client.IssueClient("root", 10*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := WriteClientCert(clients, "root", shortPEM, shortKey); err != nil {
		t.Fatal(err)
	}
	if _, _, why, err := client.EnsureClientCert(clients, "root", CAValidity); err != nil || !strings.Contains(why, "expires") {
		t.Errorf("root expiring in 10 days: reason %q err %v, want a renewal", why, err)
	}
	if _, _, _, err := client.EnsureClientCert(clients, "../x", CAValidity); err == nil {
		t.Error("EnsureClientCert accepted a path as a name")
	}
}

// A server certificate from before the client CA was a client certificate
// too; it is replaced by one that is not.
func TestServerCertLosesClientAuth(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, dir)
	key, keyPEM, err := newKey()
	if err != nil {
		t.Fatal(err)
	}
	ips := []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")}
	der, err := ca.sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: ServerCommonName},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:    []string{"localhost"}, IPAddresses: ips,
	}, key.Public(), ServerValidity)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, ServerKeyFile), keyPEM, 0o600)
	os.WriteFile(filepath.Join(dir, ServerCertFile), encodeCert(der), 0o644)
	crt, _, err := ca.EnsureServerCert(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := readCert(t, crt).ExtKeyUsage; !slices.Equal(got, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) {
		t.Errorf("server certificate extended key usage after EnsureServerCert = %v, want serverAuth only", got)
	}
}
