package pki

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// Validity periods.
const (
	// CAValidity is the lifetime of a generated CA.
	CAValidity = 10 * 365 * 24 * time.Hour
	// ServerValidity is the lifetime of a server certificate;
	// EnsureServerCert renews it RenewBefore its end.
	ServerValidity = 365 * 24 * time.Hour
	// RenewBefore is how close to expiry a server certificate is renewed.
	RenewBefore = 30 * 24 * time.Hour
	// DefaultClientValidity is used by IssueClient when given zero.
	DefaultClientValidity = 365 * 24 * time.Hour

	// clockSkew backdates NotBefore so that a peer whose clock is a little
	// behind accepts a certificate minted a moment ago.
	clockSkew = time.Hour
)

// CA is one of a cluster's two certificate authorities (the server CA or
// the client CA).
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
	// CertPEM is Cert, PEM-encoded: what a remote cluster needs to trust
	// this cluster's server.
	CertPEM []byte

	// Log, when set, receives notes on certificates being (re)issued;
	// nil uses slog.Default().
	Log *slog.Logger
}

// LoadOrCreateCA loads ca.crt and ca.key from dir or, when neither exists,
// creates a new CA (ECDSA P-256, 10 years, CN "trellis-ca-<clusterName>")
// and writes it there; created reports which happened. It fails when only
// one of the two files exists, when they do not match, when the
// certificate is not a CA, or when it has expired.
//
// This is the server CA: it signs etcd's serving certificate, and remote
// clusters trust its certificate. Client certificates come from the
// client CA (LoadOrCreateClientCA).
func LoadOrCreateCA(dir string, clusterName string) (ca *CA, created bool, err error) {
	return loadOrCreate(dir, CACertFile, CAKeyFile, "CA", "trellis-ca-", clusterName)
}

// LoadOrCreateClientCA is LoadOrCreateCA for the client CA, client-ca.crt
// and client-ca.key (CN "trellis-client-ca-<clusterName>"): the only CA
// whose client certificates the cluster's etcd accepts. Its key never
// leaves the state dir, and no other cluster trusts it.
func LoadOrCreateClientCA(dir string, clusterName string) (ca *CA, created bool, err error) {
	return loadOrCreate(dir, ClientCACertFile, ClientCAKeyFile, "client CA", "trellis-client-ca-", clusterName)
}

func loadOrCreate(dir, certName, keyName, what, cnPrefix, clusterName string) (ca *CA, created bool, err error) {
	certFile := filepath.Join(dir, certName)
	keyFile := filepath.Join(dir, keyName)
	certOK, err := fileExists(certFile)
	if err != nil {
		return nil, false, fmt.Errorf("pki: stat %s certificate %s: %w", what, certFile, err)
	}
	keyOK, err := fileExists(keyFile)
	if err != nil {
		return nil, false, fmt.Errorf("pki: stat %s key %s: %w", what, keyFile, err)
	}
	switch {
	case certOK && keyOK:
		ca, err := loadCA(certFile, keyFile, what)
		if err != nil {
			return nil, false, err
		}
		return ca, false, nil
	case certOK:
		return nil, false, fmt.Errorf("pki: load %s: %s exists but %s does not; restore the key, or remove both to create a new %s (every certificate it issued then stops working)", what, certFile, keyFile, what)
	case keyOK:
		return nil, false, fmt.Errorf("pki: load %s: %s exists but %s does not; restore the certificate, or remove both to create a new %s (every certificate it issued then stops working)", what, keyFile, certFile, what)
	}
	if clusterName == "" {
		return nil, false, fmt.Errorf("pki: create %s: cluster name is empty", what)
	}
	ca, err = createCA(certFile, keyFile, what, cnPrefix+clusterName)
	if err != nil {
		return nil, false, err
	}
	return ca, true, nil
}

func loadCA(certFile, keyFile, what string) (*CA, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("pki: read %s certificate: %w", what, err)
	}
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: load %s certificate %s: %w", what, certFile, err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("pki: read %s key: %w", what, err)
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: load %s key %s: %w", what, keyFile, err)
	}
	if !keyMatches(cert, key) {
		return nil, fmt.Errorf("pki: load %s: key %s does not match certificate %s (%q); put the matching pair back", what, keyFile, certFile, cert.Subject.CommonName)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("pki: load %s: certificate %s (%q) is not a CA (needs basic constraints CA:TRUE and the certSign key usage)", what, certFile, cert.Subject.CommonName)
	}
	if now := time.Now(); now.After(cert.NotAfter) {
		return nil, fmt.Errorf("pki: load %s: certificate %s (%q) expired at %s", what, certFile, cert.Subject.CommonName, cert.NotAfter.Format(time.RFC3339))
	}
	return &CA{Cert: cert, Key: key, CertPEM: encodeCert(cert.Raw)}, nil
}

func createCA(certFile, keyFile, what, commonName string) (*CA, error) {
	key, keyPEM, err := newKey()
	if err != nil {
		return nil, fmt.Errorf("pki: create %s %s: %w", what, commonName, err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, fmt.Errorf("pki: create %s %s: %w", what, commonName, err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName, Organization: []string{"trellis"}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(CAValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("pki: create %s %s: sign: %w", what, commonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("pki: create %s %s: parse: %w", what, commonName, err)
	}
	certPEM := encodeCert(der)
	// Key first: a crash between the two writes leaves a lone key, which
	// LoadOrCreateCA reports rather than silently replacing.
	if err := writeFileAtomic(keyFile, keyPEM, keyMode); err != nil {
		return nil, fmt.Errorf("pki: write %s key %s: %w", what, keyFile, err)
	}
	if err := writeFileAtomic(certFile, certPEM, certMode); err != nil {
		return nil, fmt.Errorf("pki: write %s certificate %s: %w", what, certFile, err)
	}
	return &CA{Cert: cert, Key: key, CertPEM: certPEM}, nil
}

// IssueClient mints a client certificate (extended key usage clientAuth
// only) whose common name is commonName: the etcd user it authenticates
// as. validity zero means DefaultClientValidity; the certificate never
// outlives the CA.
func (ca *CA) IssueClient(commonName string, validity time.Duration) (certPEM, keyPEM []byte, err error) {
	if commonName == "" {
		return nil, nil, errors.New("pki: issue client certificate: common name is empty")
	}
	if validity < 0 {
		return nil, nil, fmt.Errorf("pki: issue client certificate %q: negative validity %s", commonName, validity)
	}
	if validity == 0 {
		validity = DefaultClientValidity
	}
	key, keyPEM, err := newKey()
	if err != nil {
		return nil, nil, fmt.Errorf("pki: issue client certificate %q: %w", commonName, err)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: commonName, Organization: []string{"trellis"}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := ca.sign(tmpl, key.Public(), validity)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: issue client certificate %q: %w", commonName, err)
	}
	return encodeCert(der), keyPEM, nil
}

// sign fills in serial and validity (capped at the CA's end) and signs
// tmpl for pub.
func (ca *CA) sign(tmpl *x509.Certificate, pub crypto.PublicKey, validity time.Duration) ([]byte, error) {
	if ca == nil || ca.Cert == nil || ca.Key == nil {
		return nil, errors.New("CA is not loaded")
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl.SerialNumber = serial
	tmpl.NotBefore = now.Add(-clockSkew)
	tmpl.NotAfter = now.Add(validity)
	if tmpl.NotAfter.After(ca.Cert.NotAfter) {
		tmpl.NotAfter = ca.Cert.NotAfter
	}
	tmpl.BasicConstraintsValid = true
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("sign with %q: %w", ca.Cert.Subject.CommonName, err)
	}
	return der, nil
}

func (ca *CA) log() *slog.Logger {
	if ca.Log != nil {
		return ca.Log
	}
	return slog.Default()
}

// newSerial is a random 128-bit serial number, as RFC 5280 recommends.
func newSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("generate serial number: %w", err)
	}
	return n, nil
}
