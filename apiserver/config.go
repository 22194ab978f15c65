package apiserver

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"sigs.k8s.io/yaml"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Source names.
const (
	SourceRegistry   = "registry"
	SourceKubernetes = "kubernetes"
)

// Config is everything the API server needs; the same keys work as flags
// (--cluster-name) and in a YAML config file (clusterName).
type Config struct {
	ClusterName string   `json:"clusterName"`
	ClusterID   uint32   `json:"clusterID"`
	PodCIDRs    []string `json:"podCIDRs"`
	Region      string   `json:"region,omitempty"`
	Zone        string   `json:"zone,omitempty"`
	// MaxConnectedClusters is 255 or 511 and must match across the mesh.
	MaxConnectedClusters int `json:"maxConnectedClusters,omitempty"`
	// Encryption is the encryption type ("", "wireguard" or "ipsec") the
	// cluster starts with when none was ever set through the admin API
	// (`trellis encryption enable`); once one was, the stored setting wins.
	Encryption string `json:"encryption,omitempty"`

	// StateDir holds the CA, certificates, the admin token and (embedded)
	// etcd data.
	StateDir string `json:"stateDir"`
	// SecretsDir holds the long-lived secrets to adopt into the state dir
	// (a mounted Kubernetes Secret, say): ca.crt/ca.key,
	// client-ca.crt/client-ca.key and admin.token, each optional. A file
	// the state dir lacks is copied in at start; one it has must be the
	// same (see adoptSecrets).
	SecretsDir string `json:"secretsDir,omitempty"`

	// EtcdEndpoints selects an external etcd; empty runs an embedded one.
	EtcdEndpoints []string `json:"etcdEndpoints,omitempty"`
	EtcdCAFile    string   `json:"etcdCAFile,omitempty"`
	EtcdCertFile  string   `json:"etcdCertFile,omitempty"`
	EtcdKeyFile   string   `json:"etcdKeyFile,omitempty"`
	// EtcdListen is host:port of the etcd front door, which remote
	// clusters dial (embedded etcd only; etcd itself listens on loopback).
	EtcdListen string `json:"etcdListen,omitempty"`
	// AdvertiseAddress is the address remote clusters dial for etcd; the
	// EtcdListen host when empty (and that host must then not be a
	// wildcard).
	AdvertiseAddress string `json:"advertiseAddress,omitempty"`
	// EtcdQuotaBackendBytes caps the embedded etcd's database file (past
	// it etcd refuses writes: NOSPACE); 0 is kvstore's default, 1 GiB.
	// An external etcd has its own --quota-backend-bytes.
	EtcdQuotaBackendBytes int64 `json:"etcdQuotaBackendBytes,omitempty"`

	// HTTPListen serves /healthz, /readyz, /metrics, the registry API and
	// the admin API, over TLS with the server certificate.
	HTTPListen string `json:"httpListen,omitempty"`
	// HTTPPlaintext serves the HTTP API without TLS; allowed only on a
	// loopback HTTPListen.
	HTTPPlaintext bool `json:"httpPlaintext,omitempty"`
	// ServiceCIDRs are where service VIPs lie; the registry refuses any
	// other VIP. Default 10.96.0.0/12, Kubernetes' default.
	ServiceCIDRs []string `json:"serviceCIDRs,omitempty"`

	Source     string `json:"source,omitempty"`
	Kubeconfig string `json:"kubeconfig,omitempty"`
	// KubernetesNamespace is the namespace the server runs in, with the
	// Kubernetes source: where it keeps its cluster info ConfigMap and
	// answers credential requests (`trellis connect --context`). Default:
	// the pod's own namespace, else "trellis".
	KubernetesNamespace string `json:"kubernetesNamespace,omitempty"`
}

// Defaults for settings that have one.
const (
	DefaultEtcdListen = "127.0.0.1:2379"
	DefaultHTTPListen = "127.0.0.1:9870"
	// DefaultServiceCIDR is Kubernetes' default service range.
	DefaultServiceCIDR = "10.96.0.0/12"
)

// The embedded etcd's quota bounds: below 64 MiB a cold start's burst of
// history may not fit before the first compaction; above 8 GiB etcd warns
// that it is untested.
const (
	minEtcdQuota = 64 << 20
	maxEtcdQuota = 8 << 30
)

// LoadConfigFile reads a YAML (or JSON) config file. Unknown keys are an
// error: a misspelt setting must not be silently ignored.
func LoadConfigFile(path string) (Config, error) {
	var c Config
	data, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("config file: %w", err)
	}
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return c, fmt.Errorf("config file %s: %w", path, err)
	}
	return c, nil
}

// setDefaults fills what has a default.
func (c *Config) setDefaults() {
	if c.MaxConnectedClusters == 0 {
		c.MaxConnectedClusters = 255
	}
	if c.EtcdListen == "" {
		c.EtcdListen = DefaultEtcdListen
	}
	if c.HTTPListen == "" {
		c.HTTPListen = DefaultHTTPListen
	}
	if c.Source == "" {
		c.Source = SourceRegistry
	}
	if len(c.ServiceCIDRs) == 0 {
		c.ServiceCIDRs = []string{DefaultServiceCIDR}
	}
}

// Validate reports every missing or contradictory setting, each named as
// its flag.
func (c *Config) Validate() error {
	c.setDefaults()
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if c.ClusterName == "" {
		bad("--cluster-name is required (a lowercase DNS label of at most 32 characters, e.g. eu-west)")
	} else if err := v1.ValidateClusterName(c.ClusterName); err != nil {
		bad("--cluster-name: %w", err)
	}
	if c.ClusterID == 0 {
		bad("--cluster-id is required (1-%d, unique in the mesh)", v1.MaxClusterID)
	} else if err := v1.ValidateClusterID(v1.ClusterID(c.ClusterID)); err != nil {
		bad("--cluster-id: %w", err)
	}
	if c.MaxConnectedClusters == 255 && c.ClusterID > 255 {
		bad("--cluster-id %d needs --max-connected-clusters 511", c.ClusterID)
	}
	if c.MaxConnectedClusters != 255 && c.MaxConnectedClusters != 511 {
		bad("--max-connected-clusters %d: must be 255 or 511", c.MaxConnectedClusters)
	}
	if len(c.PodCIDRs) == 0 {
		bad("--pod-cidrs is required (the cluster's pod ranges, e.g. 10.1.0.0/16)")
	}
	if _, err := c.podPrefixes(); err != nil {
		bad("--pod-cidrs: %w", err)
	}
	if c.StateDir == "" {
		bad("--state-dir is required (holds the CA, certificates and etcd data)")
	}
	switch c.Encryption {
	case "", v1.EncryptionWireGuard, v1.EncryptionIPsec:
	default:
		bad("--encryption %q: must be empty, %q or %q", c.Encryption, v1.EncryptionWireGuard, v1.EncryptionIPsec)
	}
	switch c.Source {
	case SourceRegistry:
		if c.Kubeconfig != "" {
			bad("--kubeconfig is only used with --source %s (the source is %s)", SourceKubernetes, c.Source)
		}
		if c.KubernetesNamespace != "" {
			bad("--kubernetes-namespace is only used with --source %s (the source is %s)", SourceKubernetes, c.Source)
		}
	case SourceKubernetes:
	default:
		bad("--source %q: must be %s or %s", c.Source, SourceRegistry, SourceKubernetes)
	}
	if q := c.EtcdQuotaBackendBytes; q != 0 && len(c.EtcdEndpoints) > 0 {
		bad("--etcd-quota-backend-bytes is for the embedded etcd; an external etcd has its own --quota-backend-bytes")
	} else if q != 0 && (q < minEtcdQuota || q > maxEtcdQuota) {
		bad("--etcd-quota-backend-bytes %d: must be between %d (64 MiB) and %d (8 GiB)", q, minEtcdQuota, maxEtcdQuota)
	}
	if len(c.EtcdEndpoints) == 0 {
		if c.EtcdCAFile != "" || c.EtcdCertFile != "" || c.EtcdKeyFile != "" {
			bad("--etcd-ca-file/--etcd-cert-file/--etcd-key-file are for an external etcd: give --etcd-endpoints too")
		}
		host, _, err := net.SplitHostPort(c.EtcdListen)
		if err != nil {
			bad("--etcd-listen %q: %w", c.EtcdListen, err)
		} else if c.AdvertiseAddress == "" && isWildcard(host) {
			bad("--etcd-listen %s listens on every address: set --advertise-address to the one remote clusters dial", c.EtcdListen)
		}
	} else if (c.EtcdCertFile == "") != (c.EtcdKeyFile == "") {
		bad("--etcd-cert-file and --etcd-key-file go together")
	}
	if host, _, err := net.SplitHostPort(c.HTTPListen); err != nil {
		bad("--http-listen %q: %w", c.HTTPListen, err)
	} else if ip, err := netip.ParseAddr(host); c.HTTPPlaintext && (err != nil || !ip.IsLoopback()) {
		bad("--http-plaintext serves the admin token and minted keys in clear: only on a loopback --http-listen, not %s", c.HTTPListen)
	}
	if svc, err := c.servicePrefixes(); err != nil {
		bad("--service-cidrs: %w", err)
	} else if pods, err := c.podPrefixes(); err == nil {
		if a, b, ok := v1.PrefixesOverlap(svc, pods); ok {
			bad("--service-cidrs %s overlaps --pod-cidrs %s: service VIPs and pod IPs need separate ranges", a, b)
		}
	}
	return errors.Join(errs...)
}

func isWildcard(host string) bool {
	return host == "" || host == "0.0.0.0" || host == "::"
}

func (c *Config) podPrefixes() ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range c.PodCIDRs {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("%q is not a CIDR: %w", s, err)
		}
		if p != p.Masked() {
			return nil, fmt.Errorf("%s has host bits set; did you mean %s?", p, p.Masked())
		}
		out = append(out, p)
	}
	return out, nil
}

func (c *Config) servicePrefixes() ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range c.ServiceCIDRs {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("%q is not a CIDR: %w", s, err)
		}
		if p != p.Masked() {
			return nil, fmt.Errorf("%s has host bits set; did you mean %s?", p, p.Masked())
		}
		out = append(out, p)
	}
	return out, nil
}

// ClusterConfig is what the server publishes about its cluster.
func (c *Config) ClusterConfig() v1.ClusterConfig {
	prefixes, _ := c.podPrefixes()
	return v1.ClusterConfig{
		Name:     c.ClusterName,
		ID:       v1.ClusterID(c.ClusterID),
		PodCIDRs: prefixes,
		Region:   c.Region,
		Zone:     c.Zone,
		Capabilities: v1.Capabilities{
			SyncedCanaries:       true,
			MaxConnectedClusters: c.MaxConnectedClusters,
			BackendShards:        true,
		},
		Encryption: v1.EncryptionConfig{Type: c.Encryption},
	}
}

// advertisedEtcdEndpoint is the etcd URL remote clusters dial.
func (c *Config) advertisedEtcdEndpoint() string {
	host, port, _ := net.SplitHostPort(c.EtcdListen)
	if c.AdvertiseAddress != "" {
		host = c.AdvertiseAddress
	}
	return "https://" + net.JoinHostPort(host, port)
}

func (c *Config) path(parts ...string) string {
	return filepath.Join(append([]string{c.StateDir}, parts...)...)
}
