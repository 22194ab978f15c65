// Package kubeadmin is the mesh API server's admin API as Kubernetes
// objects, for clusters connected with `trellis connect --context`: it
// keeps the server's ClusterInfo in a ConfigMap and answers credential
// requests made as Secrets in the server's namespace (names in api/v1,
// kubernetes.go). Who may connect is then who may write Secrets there,
// and the operator's machine needs no network path to the server.
//
// It owns only that exchange; minting and revoking are the server's
// (Admin), exactly as for the HTTP admin API.
package kubeadmin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Admin is what the server does for a request: the same calls the HTTP
// admin API makes.
type Admin interface {
	Info() v1.ClusterInfo
	IssueRemote(ctx context.Context, forCluster string) (v1.RemoteCredentials, error)
	RevokeRemote(ctx context.Context, forCluster string) error
}

// Config wires a Controller.
type Config struct {
	Client    kubernetes.Interface
	Namespace string
	Admin     Admin
	Logger    *slog.Logger
}

// Controller publishes the ClusterInfo and serves credential requests.
type Controller struct {
	cfg Config
	log *slog.Logger
}

// New checks cfg.
func New(cfg Config) (*Controller, error) {
	if cfg.Client == nil || cfg.Admin == nil {
		return nil, errors.New("kubeadmin: a Kubernetes client and the server's Admin are required")
	}
	if cfg.Namespace == "" {
		return nil, errors.New("kubeadmin: the server's namespace is required (--kubernetes-namespace)")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Controller{cfg: cfg, log: log.With("component", "kubeadmin", "namespace", cfg.Namespace)}, nil
}

// Run publishes the ClusterInfo, then serves requests until ctx ends.
func (c *Controller) Run(ctx context.Context) error {
	// The ConfigMap is retried until it is written: without it nobody can
	// connect, but the server's other work goes on.
	go func() {
		for delay := time.Second; ; delay = min(2*delay, 30*time.Second) {
			err := c.publishInfo(ctx)
			if err == nil || ctx.Err() != nil {
				return
			}
			c.log.Error("cannot publish the cluster info; trellis connect --context cannot reach this cluster until it is", "configmap", v1.KubeClusterInfoConfigMap, "err", err, "retry", delay)
			select {
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
		}
	}()

	factory := informers.NewSharedInformerFactoryWithOptions(c.cfg.Client, 10*time.Minute,
		informers.WithNamespace(c.cfg.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = v1.KubeRemoteClusterLabel }))
	secrets := factory.Core().V1().Secrets()
	queue := workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.DefaultTypedControllerRateLimiter[string](),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "trellis-remote-requests"})
	defer queue.ShutDown()
	enqueue := func(obj any) {
		if s, ok := obj.(*corev1.Secret); ok {
			queue.Add(s.Name)
		}
	}
	if _, err := secrets.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj any) { enqueue(obj) },
	}); err != nil {
		return fmt.Errorf("kubeadmin: watch secrets: %w", err)
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), secrets.Informer().HasSynced) {
		return ctx.Err()
	}
	go func() {
		<-ctx.Done()
		queue.ShutDown()
	}()
	lister := secrets.Lister().Secrets(c.cfg.Namespace)
	for {
		name, quit := queue.Get()
		if quit {
			return nil
		}
		s, err := lister.Get(name)
		if err == nil {
			err = c.handle(ctx, s)
		} else if apierrors.IsNotFound(err) {
			err = nil
		}
		if err != nil && ctx.Err() == nil {
			c.log.Warn("credential request failed; retrying", "secret", name, "err", err)
			queue.AddRateLimited(name)
		} else {
			queue.Forget(name)
		}
		queue.Done(name)
	}
}

// publishInfo writes the ClusterInfo ConfigMap, replacing what is there:
// the server is its only writer, and what it is now is what counts.
func (c *Controller) publishInfo(ctx context.Context) error {
	data, err := json.Marshal(c.cfg.Admin.Info())
	if err != nil {
		return fmt.Errorf("encode the cluster info: %w", err)
	}
	cms := c.cfg.Client.CoreV1().ConfigMaps(c.cfg.Namespace)
	want := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{
			Name:   v1.KubeClusterInfoConfigMap,
			Labels: map[string]string{"app.kubernetes.io/name": "trellis", "app.kubernetes.io/component": "apiserver"},
		},
		Data: map[string]string{v1.KubeClusterInfoKey: string(data)},
	}
	have, err := cms.Get(ctx, want.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = cms.Create(ctx, want, metav1.CreateOptions{})
	case err == nil:
		if maps.Equal(have.Data, want.Data) {
			return nil
		}
		have = have.DeepCopy()
		have.Data = want.Data
		_, err = cms.Update(ctx, have, metav1.UpdateOptions{})
	}
	if err != nil {
		return fmt.Errorf("configmap %s/%s: %w", c.cfg.Namespace, want.Name, err)
	}
	c.log.Info("published the cluster info", "configmap", want.Name)
	return nil
}

// handle answers one request Secret. The cluster named by the Secret's
// name must be the one its label names: a Secret for another cluster's
// credentials cannot be relabelled to reach a third.
func (c *Controller) handle(ctx context.Context, s *corev1.Secret) error {
	id := s.Annotations[v1.KubeRequestAnnotation]
	_, revoke := s.Annotations[v1.KubeRevokeAnnotation]
	answered := id == s.Annotations[v1.KubeIssuedAnnotation] || strings.HasPrefix(s.Annotations[v1.KubeErrorAnnotation], id+":")
	if !revoke && (id == "" || answered) {
		return nil // nothing asked, or answered already
	}
	if len(id) > v1.MaxKubeRequestID {
		return c.refuse(ctx, s, id, fmt.Sprintf("request ID longer than %d characters", v1.MaxKubeRequestID))
	}
	forCluster := strings.TrimPrefix(s.Name, v1.KubeRemoteSecretPrefix)
	if !strings.HasPrefix(s.Name, v1.KubeRemoteSecretPrefix) || s.Labels[v1.KubeRemoteClusterLabel] != forCluster {
		return c.refuse(ctx, s, id, fmt.Sprintf("secret %s: its name must be %s<cluster> and its label %s=<cluster>", s.Name, v1.KubeRemoteSecretPrefix, v1.KubeRemoteClusterLabel))
	}
	if err := v1.ValidateClusterName(forCluster); err != nil {
		return c.refuse(ctx, s, id, fmt.Sprintf("secret %s: %v", s.Name, err))
	}
	if revoke {
		if err := c.cfg.Admin.RevokeRemote(ctx, forCluster); err != nil {
			return fmt.Errorf("revoke the credentials of cluster %s: %w", forCluster, err)
		}
		err := c.cfg.Client.CoreV1().Secrets(c.cfg.Namespace).Delete(ctx, s.Name, metav1.DeleteOptions{
			Preconditions: &metav1.Preconditions{UID: &s.UID},
		})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete secret %s after revoking: %w", s.Name, err)
		}
		c.log.Info("revoked a remote cluster's credentials", "for", forCluster)
		return nil
	}
	creds, err := c.cfg.Admin.IssueRemote(ctx, forCluster)
	if err != nil {
		// Refused by the server (external etcd, say): the requester
		// reads why.
		return c.refuse(ctx, s, id, err.Error())
	}
	data, err := json.Marshal(creds)
	if err != nil {
		return fmt.Errorf("encode the credentials of cluster %s: %w", forCluster, err)
	}
	answer := s.DeepCopy()
	answer.Data = map[string][]byte{v1.KubeCredentialsKey: data}
	answer.Annotations[v1.KubeIssuedAnnotation] = id
	delete(answer.Annotations, v1.KubeErrorAnnotation)
	// The update carries the resourceVersion read: if the requester asked
	// again meanwhile it conflicts, and the newer request is served next
	// (the certificate issued here is superseded by that one).
	if _, err := c.cfg.Client.CoreV1().Secrets(c.cfg.Namespace).Update(ctx, answer, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("answer secret %s: %w", s.Name, err)
	}
	c.log.Info("issued credentials to a remote cluster", "for", forCluster, "request", id)
	return nil
}

// refuse answers a request with an error the requester reads.
func (c *Controller) refuse(ctx context.Context, s *corev1.Secret, id, why string) error {
	c.log.Warn("refused a credential request", "secret", s.Name, "request", id, "why", why)
	if id == "" || len(id) > v1.MaxKubeRequestID {
		// Nothing the requester could match the answer to; the log says
		// why.
		return nil
	}
	answer := s.DeepCopy()
	answer.Annotations[v1.KubeErrorAnnotation] = id + ": " + why
	answer.Data = nil
	if _, err := c.cfg.Client.CoreV1().Secrets(c.cfg.Namespace).Update(ctx, answer, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("answer secret %s: %w", s.Name, err)
	}
	return nil
}
