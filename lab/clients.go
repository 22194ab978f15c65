package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/trellis-mesh/trellis/api/client"
	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Clients of the lab's API servers. The lab tool stays in the root
// namespace, so every connection is dialled from a thread inside a lab
// namespace (dialerIn): registry and admin calls, service registration,
// node credentials and the API servers' readiness probe. Every call is
// over TLS, verified with the cluster's server CA.

// registryURL is the cluster's registry, reachable from lab namespaces.
func (c *clusterLayout) registryURL() string {
	return "https://" + netip.AddrPortFrom(c.ip, apiHTTPPort).String()
}

// caFile is the cluster's server CA, which its HTTP API and etcd front
// door present certificates of.
func (c *clusterLayout) caFile() string { return filepath.Join(c.stateDir, v1.StateServerCAFile) }

// dialerIn dials from inside namespace ns.
func dialerIn(ns string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		return dialIn(ctx, ns, network, addr)
	}
}

// api is a client of cluster c's API server that dials from c's API
// server namespace, authenticated with its admin token.
func (l *lab) api(c *clusterLayout, timeout time.Duration) (*client.Client, error) {
	token, err := client.ReadToken(filepath.Join(c.stateDir, v1.StateAdminTokenFile))
	if err != nil {
		return nil, fmt.Errorf("lab: %s's admin token: %w", c.Name, err)
	}
	ca, err := os.ReadFile(c.caFile())
	if err != nil {
		return nil, fmt.Errorf("lab: %s's server CA: %w", c.Name, err)
	}
	api, err := client.New(client.Config{URL: c.registryURL(), CAPEM: ca, Token: token, Dial: dialerIn(c.ns), Timeout: timeout})
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
	api, err := l.api(c, 3*time.Second)
	if err != nil {
		return err
	}
	return api.Ready(ctx)
}

// issueNodeCredentials gives every node of clusters its registry
// credential, in the node's state dir: its agent registers the node and
// its pods with it, and holds nothing more powerful.
func (l *lab) issueNodeCredentials(ctx context.Context, clusters []*clusterLayout) error {
	for _, c := range clusters {
		err := l.withAPI(c, func(api *client.Client) error {
			for _, n := range c.nodes {
				cred, err := api.IssueNodeCredential(ctx, n.Name)
				if err != nil {
					return err
				}
				if err := os.MkdirAll(n.stateDir, 0o700); err != nil {
					return err
				}
				if err := os.WriteFile(n.tokenFile(), []byte(cred.Token+"\n"), 0o600); err != nil {
					return fmt.Errorf("node %s's credential: %w", n.ref(), err)
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

// tokenFile is where a node's registry credential is kept.
func (n *nodeLayout) tokenFile() string { return filepath.Join(n.stateDir, "registry.token") }
