// Package source defines what a mesh API server source (the Kubernetes
// informers, the standalone registry) hands to the server: the cluster's
// nodes, endpoints and global services, and when each kind's initial state
// is complete. Sources depend on this package; the server implements it.
package source

import (
	"context"
	"net/netip"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Sink receives a source's view of the local cluster. Every Upsert carries
// the whole object; the server encodes, validates against the cluster's
// config (cluster name, pod CIDRs) and publishes it. An error means the
// object was refused and nothing was stored.
type Sink interface {
	UpsertNode(n v1.Node) error
	DeleteNode(name string) error
	UpsertEndpoint(ep v1.Endpoint) error
	DeleteEndpoint(ip netip.Addr) error
	UpsertService(svc v1.Service) error
	DeleteService(namespace, name string) error
	// Synced says the source has delivered its complete initial state of
	// kind (nodes, endpoints, services or identities). Until it is called
	// for a kind, that kind's synced canary is not written and keys left
	// over from an earlier run are not deleted.
	Synced(kind v1.Kind)
}

// IdentityAllocator hands out cluster-unique numeric identities, one per
// distinct label set, and publishes them. Implementations are safe for
// concurrent use and for several API server replicas sharing one etcd.
type IdentityAllocator interface {
	// Acquire returns the identity for labels, allocating it on first use,
	// and takes one reference on it.
	Acquire(ctx context.Context, labels map[string]string) (v1.NumericIdentity, error)
	// Release drops one reference; an identity with no references left is
	// released (after a grace period).
	Release(ctx context.Context, labels map[string]string) error
}
