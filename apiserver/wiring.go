package apiserver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/identity"
	"github.com/trellis-mesh/trellis/apiserver/k8s"
	"github.com/trellis-mesh/trellis/apiserver/kubeadmin"
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

// kubernetesSource builds the informer source from --kubeconfig (or the
// in-cluster config), and beside it the admin exchange through Kubernetes
// objects (package kubeadmin) in --kubernetes-namespace.
func (s *Server) kubernetesSource(pub *Publisher, ids allocator) (runner, error) {
	cs, err := k8s.BuildClient(s.cfg.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("apiserver: --kubeconfig %q: %w", s.cfg.Kubeconfig, err)
	}
	src, err := k8s.New(k8s.Config{
		Client: cs, Cluster: s.cfg.ClusterName, ClusterID: v1.ClusterID(s.cfg.ClusterID),
		Region: s.cfg.Region, Zone: s.cfg.Zone,
		Sink: pub, Identities: ids, Logger: s.log, Metrics: k8s.NewMetrics(s.metrics),
	})
	if err != nil {
		return nil, fmt.Errorf("apiserver: kubernetes source: %w", err)
	}
	admin, err := kubeadmin.New(kubeadmin.Config{Client: cs, Namespace: s.kubernetesNamespace(), Admin: s, Logger: s.log})
	if err != nil {
		return nil, fmt.Errorf("apiserver: %w", err)
	}
	return runFunc(func(ctx context.Context) error {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		adminDone := make(chan error, 1)
		go func() { adminDone <- admin.Run(ctx) }()
		err := src.Run(ctx)
		cancel()
		if adminErr := <-adminDone; err == nil && adminErr != nil && !errors.Is(adminErr, context.Canceled) {
			err = adminErr
		}
		return err
	}), nil
}

// serviceAccountNamespaceFile is where a pod finds its own namespace.
const serviceAccountNamespaceFile = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// kubernetesNamespace is --kubernetes-namespace, else the pod's own
// namespace, else the chart's default.
func (s *Server) kubernetesNamespace() string {
	if s.cfg.KubernetesNamespace != "" {
		return s.cfg.KubernetesNamespace
	}
	if data, err := os.ReadFile(serviceAccountNamespaceFile); err == nil {
		if ns := strings.TrimSpace(string(data)); ns != "" {
			return ns
		}
	}
	return v1.KubeDefaultNamespace
}
