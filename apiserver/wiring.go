package apiserver

import (
	"context"
	"fmt"
	"os"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/identity"
	"github.com/trellis-mesh/trellis/apiserver/source"
)

// allocator is the identity allocator as the server runs it.
type allocator interface {
	source.IdentityAllocator
	Run(ctx context.Context) error
}

// newAllocator creates the identity allocator. The replica name is the
// host name, stable across restarts, so a restarted server takes over its
// own references instead of leaving them to expire.
func (s *Server) newAllocator() (allocator, error) {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "apiserver"
	}
	a, err := identity.New(identity.Config{
		Client:    s.writer,
		Cluster:   s.cfg.ClusterName,
		ClusterID: v1.ClusterID(s.cfg.ClusterID),
		Replica:   host,
		Logger:    s.log,
	})
	if err != nil {
		return nil, fmt.Errorf("apiserver: identity allocator: %w", err)
	}
	return a, nil
}

// kubernetesSource is wired in once the Kubernetes source lands.
func (s *Server) kubernetesSource(pub *Publisher, ids allocator) (runner, error) {
	return nil, fmt.Errorf("apiserver: --source kubernetes is not built yet")
}
