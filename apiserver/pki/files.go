package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// File names inside a state dir.
const (
	// CACertFile and CAKeyFile are the server CA.
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
	// ClientCACertFile and ClientCAKeyFile are the client CA.
	ClientCACertFile = "client-ca.crt"
	ClientCAKeyFile  = "client-ca.key"
	ServerCertFile   = "server.crt"
	ServerKeyFile    = "server.key"
)

// File modes: keys are private to the owner, certificates are public.
const (
	keyMode  fs.FileMode = 0o600
	certMode fs.FileMode = 0o644
	dirMode  fs.FileMode = 0o700
)

// WriteClientCert writes a client certificate and key issued by IssueClient
// as <name>.crt and <name>.key in dir (key 0600, dir created 0700) and
// returns their paths. name must be a plain file name and must not collide
// with the CA's or server's files.
func WriteClientCert(dir, name string, certPEM, keyPEM []byte) (certFile, keyFile string, err error) {
	if err := checkFileName(name); err != nil {
		return "", "", fmt.Errorf("pki: write client certificate %q: %w", name, err)
	}
	if _, err := parseCertPEM(certPEM); err != nil {
		return "", "", fmt.Errorf("pki: write client certificate %q: %w", name, err)
	}
	if _, err := parseKeyPEM(keyPEM); err != nil {
		return "", "", fmt.Errorf("pki: write client certificate %q: %w", name, err)
	}
	certFile = filepath.Join(dir, name+".crt")
	keyFile = filepath.Join(dir, name+".key")
	// Key first: a crash in between leaves an orphan key, which is harmless,
	// rather than a certificate with no key.
	if err := writeFileAtomic(keyFile, keyPEM, keyMode); err != nil {
		return "", "", fmt.Errorf("pki: write client key %s: %w", keyFile, err)
	}
	if err := writeFileAtomic(certFile, certPEM, certMode); err != nil {
		return "", "", fmt.Errorf("pki: write client certificate %s: %w", certFile, err)
	}
	return certFile, keyFile, nil
}

func checkFileName(name string) error {
	switch {
	case name == "" || name == "." || name == "..":
		return fmt.Errorf("file name %q is not allowed", name)
	case strings.ContainsAny(name, `/\`) || strings.ContainsRune(name, 0):
		return fmt.Errorf("file name %q must not contain a path separator", name)
	case strings.HasPrefix(name, "."):
		return fmt.Errorf("file name %q must not start with a dot", name)
	case name == "ca" || name == "client-ca" || name == "server":
		// WriteClientCert into the state dir must never clobber a CA or
		// the server pair.
		return fmt.Errorf("file name %q is reserved for the %s certificate", name, name)
	}
	return nil
}

// writeFileAtomic writes data to path through a temporary file in the same
// directory and a rename, creating the directory (0700) when needed.
func writeFileAtomic(path string, data []byte, perm fs.FileMode) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return fmt.Errorf("create directory: %w", err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("create temporary file: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	// CreateTemp makes the file 0600 already; Chmod also sets the mode for
	// certificates and ignores the umask.
	if err := f.Chmod(perm); err != nil {
		return fmt.Errorf("chmod temporary file: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write temporary file: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync temporary file: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close temporary file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename into place: %w", err)
	}
	// Persist the rename itself. Best effort: some filesystems refuse to
	// sync a directory, and the file is already in place.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// fileExists reports whether path exists; errors other than "not exist"
// are returned.
func fileExists(path string) (bool, error) {
	_, err := os.Stat(path)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	default:
		return false, err
	}
}

func newKey() (crypto.Signer, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate ECDSA P-256 key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("marshal private key: %w", err)
	}
	return key, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func encodeCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// parseCertPEM returns the first certificate in data.
func parseCertPEM(data []byte) (*x509.Certificate, error) {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return nil, errors.New("no PEM CERTIFICATE block")
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate: %w", err)
		}
		return cert, nil
	}
}

// parseKeyPEM returns the first private key in data: PKCS#8, SEC 1 EC or
// PKCS#1 RSA.
func parseKeyPEM(data []byte) (crypto.Signer, error) {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return nil, errors.New("no PEM private key block")
		}
		var (
			key any
			err error
		)
		switch block.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		default:
			continue // e.g. "EC PARAMETERS" before the key
		}
		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", strings.ToLower(block.Type), err)
		}
		signer, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("private key of type %T cannot sign", key)
		}
		return signer, nil
	}
}

// keyMatches reports whether key is the private half of cert's public key.
func keyMatches(cert *x509.Certificate, key crypto.Signer) bool {
	pub, ok := cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	return ok && pub.Equal(key.Public())
}
