// Package client is the Go client of the mesh API server's HTTP API: the
// registry (nodes, endpoints, services of clusters without a Kubernetes
// API), the admin API (cluster info, remote credentials) and the health
// endpoints. Agents register through it, `trellis connect` exchanges
// credentials through it, and the lab drives its clusters with it.
//
// It speaks the wire types of package api/v1 and imports nothing else of
// Trellis, so every layer may use it.
package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// maxResponse bounds what the client reads of one answer: the largest is a
// listing of every registered endpoint.
const maxResponse = 64 << 20

// ErrNotFound matches an *APIError for a 404: the object is not
// registered.
var ErrNotFound = errors.New("not found")

// APIError is an answer of the server other than success.
type APIError struct {
	Method, Path string
	Status       int
	// Message is what the server said: the "error" field of a JSON error
	// body, or the text of a plain one.
	Message string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s %s: %d %s: %s", e.Method, e.Path, e.Status, http.StatusText(e.Status), e.Message)
}

// Is makes errors.Is(err, ErrNotFound) true for a 404.
func (e *APIError) Is(target error) bool {
	return target == ErrNotFound && e.Status == http.StatusNotFound
}

// Config says where the API server is, how to verify it and how to
// authenticate.
type Config struct {
	// URL is the server's base URL, e.g. https://192.168.100.10:9870.
	URL string
	// CAPEM is the server CA's certificate (PEM), which an https server's
	// certificate must chain to. Required for https: the client always
	// verifies the server.
	CAPEM []byte
	// Token is the bearer token: the admin token, or a node's credential.
	Token string
	// Dial, when set, opens the connections (the lab dials from inside a
	// network namespace).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Timeout bounds one request; 30 s when zero.
	Timeout time.Duration
}

// Client calls one mesh API server. It is safe for concurrent use.
type Client struct {
	base  string
	token string
	http  *http.Client
}

// New checks cfg and returns a client; it does not contact the server.
func New(cfg Config) (*Client, error) {
	u, err := url.Parse(strings.TrimSpace(cfg.URL))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("client: API server URL %q: want https://host:port", cfg.URL)
	}
	tr := &http.Transport{
		Proxy:               nil, // the mesh API is never reached through a proxy
		DialContext:         cfg.Dial,
		TLSHandshakeTimeout: 10 * time.Second,
		IdleConnTimeout:     30 * time.Second,
		MaxIdleConnsPerHost: 4,
	}
	if tr.DialContext == nil {
		tr.DialContext = (&net.Dialer{Timeout: 10 * time.Second}).DialContext
	}
	if u.Scheme == "https" {
		pool := x509.NewCertPool()
		if len(cfg.CAPEM) == 0 || !pool.AppendCertsFromPEM(cfg.CAPEM) {
			return nil, fmt.Errorf("client: %s: the server CA's certificate is required to verify the server (<state-dir>/%s)", u, v1.StateServerCAFile)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	timeout := cfg.Timeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	return &Client{base: strings.TrimSuffix(u.String(), "/"), token: strings.TrimSpace(cfg.Token), http: &http.Client{Transport: tr, Timeout: timeout}}, nil
}

// FromStateDir finds the API server whose state dir is dir, on this
// machine: the URL, server CA and admin token it keeps there. dial may be
// nil.
func FromStateDir(dir string, dial func(ctx context.Context, network, addr string) (net.Conn, error)) (*Client, error) {
	addr, err := os.ReadFile(filepath.Join(dir, v1.StateHTTPAddrFile))
	if err != nil {
		return nil, fmt.Errorf("client: read the API server's address (is %s the state dir of one that has started?): %w", dir, err)
	}
	token, err := ReadToken(filepath.Join(dir, v1.StateAdminTokenFile))
	if err != nil {
		return nil, err
	}
	cfg := Config{URL: string(addr), Token: token, Dial: dial}
	if strings.HasPrefix(strings.TrimSpace(string(addr)), "https://") {
		if cfg.CAPEM, err = os.ReadFile(filepath.Join(dir, v1.StateServerCAFile)); err != nil {
			return nil, fmt.Errorf("client: read the server CA: %w", err)
		}
	}
	return New(cfg)
}

// ReadToken reads a bearer token file.
func ReadToken(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("client: read token %s: %w", path, err)
	}
	token := strings.TrimSpace(string(data))
	if token == "" {
		return "", fmt.Errorf("client: token file %s is empty", path)
	}
	return token, nil
}

// URL is the server's base URL.
func (c *Client) URL() string { return c.base }

// do sends in as JSON (when not nil) and decodes the answer into out (when
// not nil).
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("client: %s %s: encode request: %w", method, path, err)
		}
		body = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return fmt.Errorf("client: %s %s: %w", method, path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("client: %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return fmt.Errorf("client: %s %s: read answer: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		return &APIError{Method: method, Path: path, Status: resp.StatusCode, Message: errorMessage(data)}
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("client: %s %s: decode answer: %w", method, path, err)
		}
	}
	return nil
}

// errorMessage extracts the server's message from an error body: the
// registry answers {"error": "..."}, the admin API plain text.
func errorMessage(data []byte) string {
	var e struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(data, &e) == nil && e.Error != "" {
		return e.Error
	}
	msg := strings.TrimSpace(string(data))
	const limit = 4096
	if len(msg) > limit {
		msg = msg[:limit] + "..."
	}
	return msg
}

// Registry.

// PutNode registers (or replaces) a node.
func (c *Client) PutNode(ctx context.Context, n v1.NodeRequest) error {
	return c.do(ctx, http.MethodPut, "/v1/nodes/"+url.PathEscape(n.Name), n, nil)
}

// DeleteNode withdraws a node; ErrNotFound when it is not registered.
func (c *Client) DeleteNode(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/nodes/"+url.PathEscape(name), nil, nil)
}

// Nodes lists the registered nodes.
func (c *Client) Nodes(ctx context.Context) ([]v1.NodeRequest, error) {
	var out []v1.NodeRequest
	return out, c.do(ctx, http.MethodGet, "/v1/nodes", nil, &out)
}

// PutEndpoint registers (or replaces) a pod endpoint.
func (c *Client) PutEndpoint(ctx context.Context, e v1.EndpointRequest) error {
	return c.do(ctx, http.MethodPut, "/v1/endpoints/"+e.IP.String(), e, nil)
}

// DeleteEndpoint withdraws an endpoint; ErrNotFound when it is not
// registered.
func (c *Client) DeleteEndpoint(ctx context.Context, ip netip.Addr) error {
	return c.do(ctx, http.MethodDelete, "/v1/endpoints/"+ip.String(), nil, nil)
}

// Endpoints lists the registered endpoints.
func (c *Client) Endpoints(ctx context.Context) ([]v1.EndpointView, error) {
	var out []v1.EndpointView
	return out, c.do(ctx, http.MethodGet, "/v1/endpoints", nil, &out)
}

// PutService registers (or replaces) a service.
func (c *Client) PutService(ctx context.Context, s v1.ServiceRequest) error {
	return c.do(ctx, http.MethodPut, "/v1/services/"+url.PathEscape(s.Namespace)+"/"+url.PathEscape(s.Name), s, nil)
}

// DeleteService withdraws a service; ErrNotFound when it is not
// registered.
func (c *Client) DeleteService(ctx context.Context, namespace, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/services/"+url.PathEscape(namespace)+"/"+url.PathEscape(name), nil, nil)
}

// Services lists the registered services.
func (c *Client) Services(ctx context.Context) ([]v1.ServiceRequest, error) {
	var out []v1.ServiceRequest
	return out, c.do(ctx, http.MethodGet, "/v1/services", nil, &out)
}

// Status reports what the registry could not publish.
func (c *Client) Status(ctx context.Context) (v1.RegistryStatus, error) {
	var st v1.RegistryStatus
	return st, c.do(ctx, http.MethodGet, "/v1/status", nil, &st)
}

// Admin API.

// IssueNodeCredential mints node's registry credential, replacing any
// earlier one.
func (c *Client) IssueNodeCredential(ctx context.Context, node string) (v1.NodeCredential, error) {
	var cred v1.NodeCredential
	return cred, c.do(ctx, http.MethodPost, "/admin/v1/nodes/"+url.PathEscape(node)+"/credential", nil, &cred)
}

// RevokeNodeCredential invalidates node's registry credential.
func (c *Client) RevokeNodeCredential(ctx context.Context, node string) error {
	return c.do(ctx, http.MethodDelete, "/admin/v1/nodes/"+url.PathEscape(node)+"/credential", nil, nil)
}

// Encryption reports the cluster's encryption setting and what each of its
// nodes publishes.
func (c *Client) Encryption(ctx context.Context) (v1.EncryptionStatus, error) {
	var st v1.EncryptionStatus
	return st, c.do(ctx, http.MethodGet, "/admin/v1/encryption", nil, &st)
}

// SetEncryption changes the cluster's encryption live (Type "" turns it
// off) and returns the setting now published.
func (c *Client) SetEncryption(ctx context.Context, req v1.EncryptionRequest) (v1.EncryptionConfig, error) {
	var got v1.EncryptionConfig
	return got, c.do(ctx, http.MethodPut, "/admin/v1/encryption", req, &got)
}

// RotateEncryption asks every node of the cluster to take a new key.
func (c *Client) RotateEncryption(ctx context.Context) (v1.EncryptionConfig, error) {
	var got v1.EncryptionConfig
	return got, c.do(ctx, http.MethodPost, "/admin/v1/encryption/rotate", nil, &got)
}

// Info is what the cluster says about itself before joining a mesh.
func (c *Client) Info(ctx context.Context) (v1.ClusterInfo, error) {
	var info v1.ClusterInfo
	return info, c.do(ctx, http.MethodGet, "/admin/v1/info", nil, &info)
}

// IssueRemote mints read-only credentials for cluster forCluster's agents.
func (c *Client) IssueRemote(ctx context.Context, forCluster string) (v1.RemoteCredentials, error) {
	var creds v1.RemoteCredentials
	return creds, c.do(ctx, http.MethodPost, "/admin/v1/remotes/"+url.PathEscape(forCluster), nil, &creds)
}

// RevokeRemote removes forCluster's access.
func (c *Client) RevokeRemote(ctx context.Context, forCluster string) error {
	return c.do(ctx, http.MethodDelete, "/admin/v1/remotes/"+url.PathEscape(forCluster), nil, nil)
}

// Health.

// Ready returns nil when the server answers /readyz with success: its etcd
// answers and every kind is published. Otherwise the error says why.
func (c *Client) Ready(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, "/readyz", nil, nil)
}
