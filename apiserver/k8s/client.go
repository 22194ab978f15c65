package k8s

import (
	"fmt"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Client-side limits for the source's API calls. Informers list once and
// then watch, so these only matter at start and after a lost watch.
const (
	clientQPS   = 50
	clientBurst = 100
	userAgent   = "trellis-apiserver"
)

// BuildClient returns a clientset for the cluster described by the
// kubeconfig file at kubeconfigPath, or for the cluster the process runs in
// (service account token and KUBERNETES_SERVICE_HOST) when the path is
// empty.
func BuildClient(kubeconfigPath string) (kubernetes.Interface, error) {
	var (
		cfg *rest.Config
		err error
	)
	if kubeconfigPath == "" {
		cfg, err = rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("k8s source: in-cluster config: %w (outside a pod, pass a kubeconfig path)", err)
		}
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfigPath)
		if err != nil {
			return nil, fmt.Errorf("k8s source: load kubeconfig %s: %w", kubeconfigPath, err)
		}
	}
	return NewClient(cfg)
}

// NewClient returns a clientset for cfg, with the source's user agent and
// rate limits filled in where cfg leaves them zero.
func NewClient(cfg *rest.Config) (kubernetes.Interface, error) {
	cfg = rest.CopyConfig(cfg)
	if cfg.UserAgent == "" {
		cfg.UserAgent = userAgent
	}
	if cfg.QPS == 0 {
		cfg.QPS = clientQPS
	}
	if cfg.Burst == 0 {
		cfg.Burst = clientBurst
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("k8s source: client for %s: %w", cfg.Host, err)
	}
	return cs, nil
}
