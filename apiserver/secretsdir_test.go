package apiserver_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// sprigCA makes a CA the way the Helm chart does (sprig's genPrivateKey
// "ecdsa" and genCAWithKey): ECDSA P-256, the key as a SEC 1 "EC PRIVATE
// KEY" block, key usages certSign, digitalSignature, keyEncipherment and
// extended usages serverAuth and clientAuth.
func sprigCA(t *testing.T, cn string) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now(),
		NotAfter:              time.Now().Add(3650 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageKeyEncipherment | x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// secretVolume lays files out as the kubelet lays out a Secret volume: the
// data in a hidden timestamped directory, ..data a link to it, and each
// file a link through ..data; read-only for the owner and group (what
// defaultMode 0400 becomes with an fsGroup).
func secretVolume(t *testing.T, files map[string][]byte) string {
	t.Helper()
	dir := t.TempDir()
	ts := filepath.Join(dir, "..2026_11_30_12_00_00.000000001")
	if err := os.Mkdir(ts, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(ts, name), data, 0o440); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(filepath.Base(ts), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	return dir
}

// A server in a pod: its CAs and admin token come from a Secret mounted
// read-only, its state dir is an empty volume. It adopts the Secret's
// files, serves with a certificate its CA signed, and a restart on a new
// empty volume (an emptyDir after a pod restart) keeps the same CA and
// token; the credentials it issues carry that CA.
func TestAPIServerAdoptsSecretsDir(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the trellis binary; skipped in -short")
	}
	caCrt, caKey := sprigCA(t, "trellis-ca-eu")
	clientCrt, clientKey := sprigCA(t, "trellis-client-ca-eu")
	token := "Zr8q1Xh0vYc3LmN5bT7wK2pA9sD4fG6jH1kQ3eR5uV7yB0nM2cX4zL6oP8iU0tE2" // 64 alphanumerics, as the chart's randAlphaNum 64
	secrets := secretVolume(t, map[string][]byte{
		"ca.crt": caCrt, "ca.key": caKey,
		"client-ca.crt": clientCrt, "client-ca.key": clientKey,
		"admin.token": []byte(token),
	})
	bin := testutil.BuildTrellis(t)

	for round := range 2 {
		a := newAPIServerProcess(t, bin, "eu", 1) // a fresh, empty state dir each round
		// WaitAPIServer in start verifies the server with the state dir's
		// ca.crt and calls it with the state dir's admin token.
		a.start(t, "--secrets-dir", secrets)
		for name, want := range map[string][]byte{"pki/ca.crt": caCrt, "pki/ca.key": caKey, "pki/client-ca.crt": clientCrt, "pki/client-ca.key": clientKey, "admin.token": []byte(token)} {
			path := filepath.Join(a.stateDir, name)
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			if string(got) != string(want) {
				t.Fatalf("round %d: %s is not the Secret's %s", round, path, filepath.Base(name))
			}
			info, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if strings.HasSuffix(name, ".key") || name == "admin.token" {
				if mode := info.Mode().Perm(); mode != 0o600 {
					t.Fatalf("round %d: %s has mode %04o, want 0600", round, path, mode)
				}
			}
		}
		// The server CA signs etcd's serving certificate; remote clusters
		// get it in their credentials.
		var creds v1.RemoteCredentials
		if err := json.Unmarshal([]byte(a.mustCall(t, "POST", "/admin/v1/remotes/us", "")), &creds); err != nil {
			t.Fatal(err)
		}
		if creds.CAPEM != string(caCrt) {
			t.Fatalf("round %d: remote credentials carry another CA:\n%s", round, creds.CAPEM)
		}
		keysUnder(t, remoteClient(t, creds), v1.Prefix) // the front door serves a chain of the Secret's CA
		a.proc.Stop(t)
	}
}
