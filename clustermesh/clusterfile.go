package clustermesh

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"sigs.k8s.io/yaml"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// FileSuffix is the extension of cluster files in the config directory.
const FileSuffix = ".yaml"

// ClusterFile is one cluster's entry in the config directory: how to reach
// its mesh API server's etcd, and what it said of itself when it was
// connected. PEM material is inline so one file is the whole credential;
// `trellis connect` writes these.
type ClusterFile struct {
	// Name is the cluster's name; it must equal the file name without
	// FileSuffix and the name the cluster publishes.
	Name string `json:"name"`
	// ID and PodCIDRs pin the cluster's identity as `trellis connect` saw
	// it. An agent refuses the cluster while its published cluster-config
	// says otherwise, so a compromised cluster can neither widen its pod
	// CIDRs nor take another's ID, and the pins, checked against each
	// other here and at connect, settle who owns an address.
	ID        v1.ClusterID   `json:"id"`
	PodCIDRs  []netip.Prefix `json:"podCIDRs"`
	Endpoints []string       `json:"endpoints"`
	// CA is the PEM of the CA(s) that signed the cluster's etcd server
	// certificate (a bundle when CAs are mixed).
	CA string `json:"ca"`
	// Cert and Key are this cluster's client certificate for the remote,
	// whose CN is the remote's read-only etcd user.
	Cert string `json:"cert"`
	Key  string `json:"key"`
	// GossipKey is the mesh-wide gossip key (AES-256, 32 bytes; base64
	// in the file): one per mesh, the same in every cluster file of every
	// cluster, handed out by `trellis connect`. Empty in files written
	// before gossip, or by hand: such a mesh has no gossip.
	GossipKey []byte `json:"gossipKey,omitempty"`
}

// GossipKeySize is the size of the mesh's gossip key.
const GossipKeySize = 32

// MeshGossipKey returns the gossip key the files agree on: nil when none
// carries one, an error naming the files when they carry different keys
// (the mesh was connected in pieces; run trellis connect --mesh over all
// of its clusters). Files without a key are not a disagreement.
func MeshGossipKey(files []ClusterFile) ([]byte, error) {
	var key []byte
	var holders, others []string
	for _, f := range files {
		switch {
		case len(f.GossipKey) == 0:
		case key == nil:
			key, holders = f.GossipKey, append(holders, f.Name)
		case string(f.GossipKey) == string(key):
			holders = append(holders, f.Name)
		default:
			others = append(others, fmt.Sprintf("%s (key %s)", f.Name, KeyFingerprint(f.GossipKey)))
		}
	}
	if len(others) > 0 {
		slices.Sort(holders)
		slices.Sort(others)
		return nil, fmt.Errorf("cluster files disagree on the gossip key: %s carry key %s, %s another: connect every cluster of the mesh at once (trellis connect --mesh ...)",
			strings.Join(holders, ", "), KeyFingerprint(key), strings.Join(others, ", "))
	}
	return key, nil
}

// KeyFingerprint names a key in messages without revealing it: the first
// 8 hex digits of its SHA-256.
func KeyFingerprint(key []byte) string {
	sum := sha256.Sum256(key)
	return fmt.Sprintf("%x", sum[:4])
}

// Validate checks the file without contacting anyone.
func (f *ClusterFile) Validate() error {
	var errs []error
	if err := v1.ValidateClusterName(f.Name); err != nil {
		errs = append(errs, fmt.Errorf("name: %w", err))
	}
	if err := f.validatePin(); err != nil {
		errs = append(errs, err)
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
	if n := len(f.GossipKey); n != 0 && n != GossipKeySize {
		errs = append(errs, fmt.Errorf("gossipKey: %d bytes, want %d (AES-256)", n, GossipKeySize))
	}
	return errors.Join(errs...)
}

// validatePin checks the pinned identity: a file without one predates
// pinning and must be written again.
func (f *ClusterFile) validatePin() error {
	if f.ID == 0 && len(f.PodCIDRs) == 0 {
		return fmt.Errorf("no pinned id and podCIDRs (the file predates pinning): run trellis connect again to write it")
	}
	// The pin must be a cluster-config a cluster could publish.
	cc := v1.ClusterConfig{Name: f.Name, ID: f.ID, PodCIDRs: f.PodCIDRs, Capabilities: v1.Capabilities{MaxConnectedClusters: v1.MaxClusterID}}
	if err := cc.Validate(); err != nil {
		return fmt.Errorf("pin: %w", err)
	}
	return nil
}

// checkPin compares what a cluster publishes with what its file pinned,
// naming the field and both values.
func (f *ClusterFile) checkPin(cfg v1.ClusterConfig) error {
	switch {
	case cfg.ID != f.ID:
		return fmt.Errorf("cluster %s publishes cluster ID %d, but %d was pinned when it was connected: refusing it (if its ID really changed, run trellis connect again)", f.Name, cfg.ID, f.ID)
	case !samePrefixes(cfg.PodCIDRs, f.PodCIDRs):
		return fmt.Errorf("cluster %s publishes pod CIDRs %v, but %v were pinned when it was connected: refusing it (if its pod CIDRs really changed, run trellis connect again)", f.Name, cfg.PodCIDRs, f.PodCIDRs)
	}
	return nil
}

// samePrefixes compares two prefix lists as sets.
func samePrefixes(a, b []netip.Prefix) bool {
	if len(a) != len(b) {
		return false
	}
	for _, p := range a {
		if !slices.Contains(b, p) {
			return false
		}
	}
	return true
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
	data, err := EncodeClusterFile(f)
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

// EncodeClusterFile checks f and returns the bytes of its file.
func EncodeClusterFile(f ClusterFile) ([]byte, error) {
	if err := f.Validate(); err != nil {
		return nil, fmt.Errorf("cluster file %s: %w", f.Name, err)
	}
	data, err := yaml.Marshal(f)
	if err != nil {
		return nil, fmt.Errorf("cluster file %s: %w", f.Name, err)
	}
	return data, nil
}

// DecodeClusterFile parses the file of cluster name (the file name less
// FileSuffix) and checks it: an unknown field, a name other than the
// file's, or an invalid pin is an error.
func DecodeClusterFile(name string, data []byte) (ClusterFile, error) {
	var f ClusterFile
	if err := yaml.UnmarshalStrict(data, &f); err != nil {
		return ClusterFile{}, fmt.Errorf("parse %s%s: %w", name, FileSuffix, err)
	}
	if f.Name != name {
		return ClusterFile{}, fmt.Errorf("%s%s names cluster %q; the file of cluster %q must be %s%s", name, FileSuffix, f.Name, f.Name, f.Name, FileSuffix)
	}
	if err := f.Validate(); err != nil {
		return ClusterFile{}, fmt.Errorf("%s%s: %w", name, FileSuffix, err)
	}
	return f, nil
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
		lf.file, lf.err = DecodeClusterFile(cluster, data)
		out[cluster] = lf
	}
	return out, nil
}

// checkPins refuses cluster files whose pins conflict: two clusters with
// one ID, or overlapping pod CIDRs. The local cluster's file is never the
// one refused; between two other files both are, so the outcome depends on
// neither the order files were written nor which cluster connected first.
// `trellis connect` refuses such a mesh before it writes anything; this is
// the check for hand-made or stale files.
func checkPins(files map[string]loadedFile, local string) {
	names := slices.Sorted(maps.Keys(files))
	refuse := make(map[string][]string)
	for i, a := range names {
		fa := files[a]
		if fa.err != nil {
			continue
		}
		for _, b := range names[i+1:] {
			fb := files[b]
			if fb.err != nil {
				continue
			}
			var why string
			if fa.file.ID == fb.file.ID {
				why = fmt.Sprintf("pinned cluster ID %d", fa.file.ID)
			} else if pa, pb, ok := v1.PrefixesOverlap(fa.file.PodCIDRs, fb.file.PodCIDRs); ok {
				why = fmt.Sprintf("pinned pod CIDRs (%s and %s)", pa, pb)
			} else {
				continue
			}
			if b != local {
				refuse[b] = append(refuse[b], fmt.Sprintf("%s shares %s with %s", b+FileSuffix, why, a))
			}
			if a != local {
				refuse[a] = append(refuse[a], fmt.Sprintf("%s shares %s with %s", a+FileSuffix, why, b))
			}
		}
	}
	for name, whys := range refuse {
		lf := files[name]
		lf.err = fmt.Errorf("%s: clusters in a mesh need unique IDs and disjoint pod CIDRs; disconnect one of them", strings.Join(whys, "; "))
		files[name] = lf
	}
}
