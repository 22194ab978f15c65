package v1

import "net/netip"

// The mesh API server's HTTP API: what its registry (for clusters without a
// Kubernetes API) and its admin API (for `trellis connect` and the lab)
// take and return as JSON. docs/registry-api.md documents the routes; the
// Go client is package api/client. These are request and response bodies,
// not etcd values: they carry no "v" field and do not go through Encode.

// NodeRequest registers a node with the registry (PUT /v1/nodes/{name}),
// and is how GET /v1/nodes lists one.
type NodeRequest struct {
	Name               string         `json:"name"`
	IPs                []netip.Addr   `json:"ips"`
	PodCIDRs           []netip.Prefix `json:"podCIDRs,omitempty"`
	WireGuardPublicKey string         `json:"wireGuardPublicKey,omitempty"`
	IPsecKeyIndex      uint8          `json:"ipsecKeyIndex,omitempty"`
	HealthAddr         string         `json:"healthAddr,omitempty"`
	Region             string         `json:"region,omitempty"`
	Zone               string         `json:"zone,omitempty"`
}

// EndpointRequest registers a pod endpoint (PUT /v1/endpoints/{ip}). Ready
// defaults to true.
type EndpointRequest struct {
	IP        netip.Addr        `json:"ip"`
	Namespace string            `json:"namespace"`
	Pod       string            `json:"pod"`
	Node      string            `json:"node,omitempty"`
	NodeIP    netip.Addr        `json:"nodeIP"`
	Ready     *bool             `json:"ready,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
}

// EndpointView is an endpoint as GET /v1/endpoints lists it: the request
// plus the identity allocated for its labels.
type EndpointView struct {
	EndpointRequest
	Identity NumericIdentity `json:"identity"`
}

// ServiceRequest registers a service (PUT /v1/services/{namespace}/{name}).
// Backends come either from Selector (every endpoint in the namespace whose
// labels include it) or from an explicit Backends list, not both.
type ServiceRequest struct {
	Namespace   string            `json:"namespace"`
	Name        string            `json:"name"`
	Ports       []ServicePort     `json:"ports"`
	FrontendIPs []netip.Addr      `json:"frontendIPs,omitempty"`
	Selector    map[string]string `json:"selector,omitempty"`
	Backends    []Backend         `json:"backends,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// EncryptionRequest sets a cluster's encryption (PUT
// /admin/v1/encryption): Type "" turns it off. Rotation is not set here
// (POST /admin/v1/encryption/rotate).
type EncryptionRequest struct {
	Type   string `json:"type"`
	Strict bool   `json:"strict,omitempty"`
}

// EncryptionStatus is GET /admin/v1/encryption: the cluster's setting as
// published in its cluster-config, and what each of its nodes publishes.
type EncryptionStatus struct {
	Setting EncryptionConfig `json:"setting"`
	Nodes   []NodeEncryption `json:"nodes"`
}

// NodeEncryption is what one node publishes about its encryption.
type NodeEncryption struct {
	Name               string `json:"name"`
	WireGuardPublicKey string `json:"wireGuardPublicKey,omitempty"`
	IPsecKeyIndex      uint8  `json:"ipsecKeyIndex,omitempty"`
}

// ClusterInfo is what a cluster says about itself before it joins a mesh
// (GET /admin/v1/info): what `trellis connect` checks against the other
// clusters before it writes anything.
type ClusterInfo struct {
	Name     string         `json:"cluster"`
	ID       ClusterID      `json:"clusterID"`
	PodCIDRs []netip.Prefix `json:"podCIDRs"`
	Region   string         `json:"region,omitempty"`
	// Endpoints are the etcd client URLs remote clusters dial.
	Endpoints []string `json:"endpoints"`
	// CAPEM is the CA that signed the etcd server's certificate.
	CAPEM string `json:"caPEM"`
	// MaxConnectedClusters must match across the mesh.
	MaxConnectedClusters int `json:"maxConnectedClusters"`
}

// RemoteCredentials let one cluster's agents read another cluster's store
// (POST /admin/v1/remotes/{for}): where its etcd front door is, the
// server CA that signed the etcd server's certificate, and a client
// certificate (CN remote-<for>) signed by the issuing cluster's client CA.
// Each issue supersedes the certificate issued to the same reader before.
type RemoteCredentials struct {
	// Cluster and ClusterID name the cluster that issued the credentials.
	Cluster   string    `json:"cluster"`
	ClusterID ClusterID `json:"clusterID"`
	Endpoints []string  `json:"endpoints"`
	// For is the cluster the credentials were minted for.
	For string `json:"for"`
	// User is the certificate's common name, remote-<for>. It names no
	// etcd user: the front door checks it and reads as one shared
	// read-only user.
	User    string `json:"user"`
	CAPEM   string `json:"caPEM"`
	CertPEM string `json:"certPEM"`
	KeyPEM  string `json:"keyPEM"`
}

// NodeCredential is a node's credential for the registry
// (POST /admin/v1/nodes/{name}/credential): a bearer token that may
// register that node and the endpoints on it, and read. Issuing again
// replaces it; the server keeps only a hash.
type NodeCredential struct {
	Node  string `json:"node"`
	Token string `json:"token"`
}

// RegistryStatus is what GET /v1/status reports: objects whose stored
// record is not what is published, and why ("service default/big" → the
// reason).
type RegistryStatus struct {
	Unpublished map[string]string `json:"unpublished,omitempty"`
}

// The files a mesh API server keeps in its state dir that tools on the
// same machine read to find and authenticate to it.
const (
	// StateHTTPAddrFile holds the URL the HTTP API listens on.
	StateHTTPAddrFile = "http.addr"
	// StateAdminTokenFile holds the bearer token of the registry and admin
	// APIs.
	StateAdminTokenFile = "admin.token"
	// StateEtcdAddrFile holds the https URL of the embedded etcd itself
	// (loopback only, a new port every start), where the local root and
	// writer certificates work; remote clusters dial the etcd front door
	// at --etcd-listen instead. Absent with an external etcd.
	StateEtcdAddrFile = "etcd.addr"
	// StateClustersDir is the config dir, one <cluster>.yaml per connected
	// cluster, that `trellis connect` writes for the cluster's agents.
	StateClustersDir = "clusters"
	// StateServerCAFile is the server CA's certificate: what clients of
	// the HTTP API and remote readers of etcd verify the server with.
	StateServerCAFile = "pki/ca.crt"
)
