package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Clients of the lab's API servers. The lab tool stays in the root
// namespace, so every connection is dialled from a thread inside a lab
// namespace (httpIn): registry and admin calls, service registration and
// the API servers' readiness probe.

// registryURL is the cluster's registry, reachable from lab namespaces.
func (c *clusterLayout) registryURL() string {
	return "http://" + netip.AddrPortFrom(c.ip, apiHTTPPort).String()
}

// httpIn is an HTTP client whose connections are opened inside namespace
// ns. It never uses a proxy.
func httpIn(ns string, timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dialIn(ctx, ns, network, addr)
		},
		DisableKeepAlives: true,
	}}
}

// regCall calls cluster c's registry (or admin API) from c's API server
// namespace. in is sent as JSON; out, when non-nil, receives the answer.
func (l *lab) regCall(ctx context.Context, c *clusterLayout, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.registryURL()+path, body)
	if err != nil {
		return err
	}
	if method != http.MethodGet {
		token, err := os.ReadFile(filepath.Join(c.stateDir, v1.StateAdminTokenFile))
		if err != nil {
			return fmt.Errorf("lab: %s's admin token: %w", c.Name, err)
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := httpIn(c.ns, 10*time.Second).Do(req)
	if err != nil {
		return fmt.Errorf("lab: %s %s on %s's API server: %w", method, path, c.Name, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if resp.StatusCode >= 300 {
		return fmt.Errorf("lab: %s %s on %s's API server: %s: %s", method, path, c.Name, resp.Status, bytes.TrimSpace(data))
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("lab: %s %s on %s's API server: %w", method, path, c.Name, err)
		}
	}
	return nil
}

// registerServices PUTs the clusters' services into their registries.
func (l *lab) registerServices(ctx context.Context, clusters []*clusterLayout) error {
	for _, c := range clusters {
		for _, s := range c.Services {
			req := v1.ServiceRequest{
				Namespace: s.Namespace, Name: s.Name, Ports: s.Ports,
				FrontendIPs: []netip.Addr{netip.MustParseAddr(s.VIP)},
				Selector:    s.Selector, Annotations: s.Annotations,
			}
			if err := l.regCall(ctx, c, http.MethodPut, "/v1/services/"+s.Namespace+"/"+s.Name, req, nil); err != nil {
				return err
			}
		}
	}
	return nil
}

// apiReady says whether c's API server answers /readyz with 200.
func (l *lab) apiReady(ctx context.Context, c *clusterLayout) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.registryURL()+"/readyz", nil)
	if err != nil {
		return err
	}
	resp, err := httpIn(c.ns, 3*time.Second).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("readyz: %s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	return nil
}
