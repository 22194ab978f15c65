package clustermesh

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"sigs.k8s.io/yaml"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// FileSuffix is the extension of cluster files in the config directory.
const FileSuffix = ".yaml"

// ClusterFile is one cluster's entry in the config directory: how to reach
// its mesh API server's etcd. PEM material is inline so one file is the
// whole credential; `trellis connect` writes these.
type ClusterFile struct {
	// Name is the cluster's name; it must equal the file name without
	// FileSuffix and the name the cluster publishes.
	Name      string   `json:"name"`
	Endpoints []string `json:"endpoints"`
	// CA is the PEM of the CA(s) that signed the cluster's etcd server
	// certificate (a bundle when CAs are mixed).
	CA string `json:"ca"`
	// Cert and Key are this cluster's client certificate for the remote,
	// whose CN is the remote's read-only etcd user.
	Cert string `json:"cert"`
	Key  string `json:"key"`
}

// Validate checks the file without contacting anyone.
func (f *ClusterFile) Validate() error {
	var errs []error
	if err := v1.ValidateClusterName(f.Name); err != nil {
		errs = append(errs, fmt.Errorf("name: %w", err))
	}
	if len(f.Endpoints) == 0 {
		errs = append(errs, errors.New("endpoints: at least one etcd URL is required"))
	}
	for _, e := range f.Endpoints {
		if !strings.HasPrefix(e, "https://") && !strings.HasPrefix(e, "http://") {
			errs = append(errs, fmt.Errorf("endpoints: %q is not an http(s) URL", e))
		}
	}
	if _, err := f.TLSConfig(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// TLSConfig builds the client TLS configuration; nil when the file has no
// CA (plain http, tests only).
func (f *ClusterFile) TLSConfig() (*tls.Config, error) {
	if f.CA == "" && f.Cert == "" && f.Key == "" {
		return nil, nil
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(f.CA)) {
		return nil, errors.New("ca: no PEM certificate found")
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if f.Cert != "" || f.Key != "" {
		cert, err := tls.X509KeyPair([]byte(f.Cert), []byte(f.Key))
		if err != nil {
			return nil, fmt.Errorf("cert/key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// WriteClusterFile writes f into dir as <name>.yaml atomically (0600: it
// holds a private key), so a watching agent never reads half a file.
func WriteClusterFile(dir string, f ClusterFile) error {
	if err := f.Validate(); err != nil {
		return fmt.Errorf("cluster file %s: %w", f.Name, err)
	}
	data, err := yaml.Marshal(f)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("cluster file %s: %w", f.Name, err)
	}
	tmp, err := os.CreateTemp(dir, "."+f.Name+"-*")
	if err != nil {
		return fmt.Errorf("cluster file %s: %w", f.Name, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("cluster file %s: %w", f.Name, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("cluster file %s: %w", f.Name, err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, f.Name+FileSuffix)); err != nil {
		return fmt.Errorf("cluster file %s: %w", f.Name, err)
	}
	return nil
}

// RemoveClusterFile removes the cluster's file; agents drain the cluster.
func RemoveClusterFile(dir, name string) error {
	err := os.Remove(filepath.Join(dir, name+FileSuffix))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove cluster file %s: %w", name, err)
	}
	return nil
}

// loadedFile is a file as read from the directory.
type loadedFile struct {
	file ClusterFile
	hash [32]byte
	err  error // unreadable or invalid: reported in status, cluster not connected
}

// scanDir reads every cluster file. Files that cannot be parsed are
// returned with their error so status can show it; hidden files (atomic
// write temporaries) are skipped.
func scanDir(dir string) (map[string]loadedFile, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return map[string]loadedFile{}, nil
		}
		return nil, fmt.Errorf("config dir %s: %w", dir, err)
	}
	out := make(map[string]loadedFile)
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || strings.HasPrefix(name, ".") || !strings.HasSuffix(name, FileSuffix) {
			continue
		}
		cluster := strings.TrimSuffix(name, FileSuffix)
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			out[cluster] = loadedFile{err: fmt.Errorf("read %s: %w", name, err)}
			continue
		}
		lf := loadedFile{hash: sha256.Sum256(data)}
		if err := yaml.UnmarshalStrict(data, &lf.file); err != nil {
			lf.err = fmt.Errorf("parse %s: %w", name, err)
		} else if lf.file.Name != cluster {
			lf.err = fmt.Errorf("%s names cluster %q; the file of cluster %q must be %s%s", name, lf.file.Name, lf.file.Name, lf.file.Name, FileSuffix)
		} else if err := lf.file.Validate(); err != nil {
			lf.err = fmt.Errorf("%s: %w", name, err)
		}
		out[cluster] = lf
	}
	return out, nil
}
