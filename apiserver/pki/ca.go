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

// CA is a cluster's certificate authority.
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
func LoadOrCreateCA(dir string, clusterName string) (ca *CA, created bool, err error) {
	certFile := filepath.Join(dir, CACertFile)
	keyFile := filepath.Join(dir, CAKeyFile)
	certOK, err := fileExists(certFile)
	if err != nil {
		return nil, false, fmt.Errorf("pki: stat CA certificate %s: %w", certFile, err)
	}
	keyOK, err := fileExists(keyFile)
	if err != nil {
		return nil, false, fmt.Errorf("pki: stat CA key %s: %w", keyFile, err)
	}
	switch {
	case certOK && keyOK:
		ca, err := loadCA(certFile, keyFile)
		if err != nil {
			return nil, false, err
		}
		return ca, false, nil
	case certOK:
		return nil, false, fmt.Errorf("pki: load CA: %s exists but %s does not; restore the key, or remove both to create a new CA (every issued certificate then stops working)", certFile, keyFile)
	case keyOK:
		return nil, false, fmt.Errorf("pki: load CA: %s exists but %s does not; restore the certificate, or remove both to create a new CA (every issued certificate then stops working)", keyFile, certFile)
	}
	ca, err = createCA(certFile, keyFile, clusterName)
	if err != nil {
		return nil, false, err
	}
	return ca, true, nil
}

func loadCA(certFile, keyFile string) (*CA, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("pki: read CA certificate: %w", err)
	}
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: load CA certificate %s: %w", certFile, err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("pki: read CA key: %w", err)
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: load CA key %s: %w", keyFile, err)
	}
	if !keyMatches(cert, key) {
		return nil, fmt.Errorf("pki: load CA: key %s does not match certificate %s (%q); put the matching pair back", keyFile, certFile, cert.Subject.CommonName)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("pki: load CA: certificate %s (%q) is not a CA (needs basic constraints CA:TRUE and the certSign key usage)", certFile, cert.Subject.CommonName)
	}
	if now := time.Now(); now.After(cert.NotAfter) {
		return nil, fmt.Errorf("pki: load CA: certificate %s (%q) expired at %s", certFile, cert.Subject.CommonName, cert.NotAfter.Format(time.RFC3339))
	}
	return &CA{Cert: cert, Key: key, CertPEM: encodeCert(cert.Raw)}, nil
}

func createCA(certFile, keyFile, clusterName string) (*CA, error) {
	if clusterName == "" {
		return nil, errors.New("pki: create CA: cluster name is empty")
	}
	key, keyPEM, err := newKey()
	if err != nil {
		return nil, fmt.Errorf("pki: create CA for cluster %s: %w", clusterName, err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, fmt.Errorf("pki: create CA for cluster %s: %w", clusterName, err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "trellis-ca-" + clusterName, Organization: []string{"trellis"}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(CAValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("pki: create CA for cluster %s: sign: %w", clusterName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("pki: create CA for cluster %s: parse: %w", clusterName, err)
	}
	certPEM := encodeCert(der)
	// Key first: a crash between the two writes leaves a lone key, which
	// LoadOrCreateCA reports rather than silently replacing.
	if err := writeFileAtomic(keyFile, keyPEM, keyMode); err != nil {
		return nil, fmt.Errorf("pki: write CA key %s: %w", keyFile, err)
	}
	if err := writeFileAtomic(certFile, certPEM, certMode); err != nil {
		return nil, fmt.Errorf("pki: write CA certificate %s: %w", certFile, err)
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
