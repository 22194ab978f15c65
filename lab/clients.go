package lab

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/trellis-mesh/trellis/api/client"
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

// api is a client of cluster c's API server that dials from c's API
// server namespace, authenticated with its admin token.
func (l *lab) api(c *clusterLayout, timeout time.Duration) (*client.Client, error) {
	token, err := client.ReadToken(filepath.Join(c.stateDir, v1.StateAdminTokenFile))
	if err != nil {
		return nil, fmt.Errorf("lab: %s's admin token: %w", c.Name, err)
	}
	api, err := client.New(client.Config{URL: c.registryURL(), Token: token, HTTPClient: httpIn(c.ns, timeout)})
	if err != nil {
		return nil, fmt.Errorf("lab: %s's API server: %w", c.Name, err)
	}
	return api, nil
}

// withAPI runs fn with a client of c's API server and names the cluster in
// its error.
func (l *lab) withAPI(c *clusterLayout, fn func(*client.Client) error) error {
	api, err := l.api(c, 10*time.Second)
	if err != nil {
		return err
	}
	if err := fn(api); err != nil {
		return fmt.Errorf("lab: %s's API server: %w", c.Name, err)
	}
	return nil
}

// registerServices PUTs the clusters' services into their registries.
func (l *lab) registerServices(ctx context.Context, clusters []*clusterLayout) error {
	for _, c := range clusters {
		err := l.withAPI(c, func(api *client.Client) error {
			for _, s := range c.Services {
				err := api.PutService(ctx, v1.ServiceRequest{
					Namespace: s.Namespace, Name: s.Name, Ports: s.Ports,
					FrontendIPs: []netip.Addr{netip.MustParseAddr(s.VIP)},
					Selector:    s.Selector, Annotations: s.Annotations,
				})
				if err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// apiReady says whether c's API server answers /readyz with 200.
func (l *lab) apiReady(ctx context.Context, c *clusterLayout) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	api, err := client.New(client.Config{URL: c.registryURL(), HTTPClient: httpIn(c.ns, 3*time.Second)})
	if err != nil {
		return err
	}
	return api.Ready(ctx)
}
