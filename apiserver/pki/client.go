package pki

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// EnsureClientCert makes sure dir holds <commonName>.crt and
// <commonName>.key, a client certificate for commonName signed by ca and
// valid for more than RenewBefore; otherwise it issues a new pair with
// IssueClient and writes it with WriteClientCert. A certificate signed by
// another CA (a state dir from before the client CA existed) is replaced,
// not kept. It returns the two paths and why it reissued ("" when it kept
// the pair).
func (ca *CA) EnsureClientCert(dir, commonName string, validity time.Duration) (certFile, keyFile, reissued string, err error) {
	if err := checkFileName(commonName); err != nil {
		return "", "", "", fmt.Errorf("pki: client certificate %q: %w", commonName, err)
	}
	certFile = filepath.Join(dir, commonName+".crt")
	keyFile = filepath.Join(dir, commonName+".key")
	reason, err := ca.clientCertProblem(certFile, keyFile, commonName, time.Now())
	if err != nil {
		return "", "", "", fmt.Errorf("pki: check client certificate %s: %w", certFile, err)
	}
	if reason == "" {
		return certFile, keyFile, "", nil
	}
	certPEM, keyPEM, err := ca.IssueClient(commonName, validity)
	if err != nil {
		return "", "", "", err
	}
	if _, _, err := WriteClientCert(dir, commonName, certPEM, keyPEM); err != nil {
		return "", "", "", err
	}
	ca.log().Info("issued client certificate", "file", certFile, "cn", commonName, "reason", reason, "issuer", ca.Cert.Subject.CommonName)
	return certFile, keyFile, reason, nil
}

// clientCertProblem says why the pair on disk must be reissued, or "" when
// it is fine. err is for failures to read what exists, not for bad
// content.
func (ca *CA) clientCertProblem(certFile, keyFile, commonName string, now time.Time) (string, error) {
	cert, reason, err := ca.pairProblem(certFile, keyFile, now)
	if reason != "" || err != nil {
		return reason, err
	}
	if cert.Subject.CommonName != commonName {
		return fmt.Sprintf("common name %q, want %q", cert.Subject.CommonName, commonName), nil
	}
	if !slices.Contains(cert.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		return "extended key usage lacks clientAuth", nil
	}
	return "", nil
}

// pairProblem checks what server and client certificates have in common:
// both files readable, the key matching the certificate, signed by ca,
// valid now and for more than RenewBefore. It returns the parsed
// certificate when there is no problem.
func (ca *CA) pairProblem(certFile, keyFile string, now time.Time) (*x509.Certificate, string, error) {
	certPEM, err := os.ReadFile(certFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, "certificate missing", nil
	} else if err != nil {
		return nil, "", err
	}
	keyPEM, err := os.ReadFile(keyFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, "key missing", nil
	} else if err != nil {
		return nil, "", err
	}
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return nil, "unreadable certificate: " + err.Error(), nil
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return nil, "unreadable key: " + err.Error(), nil
	}
	if !keyMatches(cert, key) {
		return nil, "key does not match certificate", nil
	}
	if err := cert.CheckSignatureFrom(ca.Cert); err != nil || !bytes.Equal(cert.RawIssuer, ca.Cert.RawSubject) {
		return nil, "not signed by " + ca.Cert.Subject.CommonName, nil
	}
	if now.Before(cert.NotBefore) {
		return nil, "not valid before " + cert.NotBefore.Format(time.RFC3339), nil
	}
	if now.Add(RenewBefore).After(cert.NotAfter) {
		return nil, "expires at " + cert.NotAfter.Format(time.RFC3339), nil
	}
	return cert, "", nil
}

// ParseCertPEM returns the first certificate in data, e.g. to read the
// serial number of one IssueClient minted.
func ParseCertPEM(data []byte) (*x509.Certificate, error) {
	cert, err := parseCertPEM(data)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	return cert, nil
}
