// Package kubepeer reaches a cluster for `trellis connect --context`:
// through its Kubernetes API only, as one kubeconfig context. The cluster's
// mesh API server (run with the Kubernetes source) keeps its ClusterInfo
// in a ConfigMap and answers credential requests made as Secrets (package
// apiserver/kubeadmin); the agents read their cluster files from the
// clustermesh Secret, which this package writes. The names are in api/v1
// (kubernetes.go).
//
// It owns only the Kubernetes side of clustermesh.Peer; every check and
// the exchange itself are clustermesh's, the same as for state dirs.
package kubepeer

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/retry"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
)

// Peer is one cluster reached through a kubeconfig context.
type Peer struct {
	// Context names the kubeconfig context ("" for the current one), for
	// messages.
	Context string
	// Namespace is where Trellis is installed.
	Namespace string
	Client    kubernetes.Interface
	// AnswerTimeout bounds the wait for the mesh API server to answer a
	// credential request; 60 s when zero.
	AnswerTimeout time.Duration
}

// RESTConfig loads the kubeconfig (the default loading rules: $KUBECONFIG,
// ~/.kube/config, unless kubeconfig names a file) for context ("" for
// the current one).
func RESTConfig(kubeconfig, context string) (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if kubeconfig != "" {
		rules.ExplicitPath = kubeconfig
	}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules,
		&clientcmd.ConfigOverrides{CurrentContext: context}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig context %q: %w", context, err)
	}
	cfg.UserAgent = "trellis-connect"
	return cfg, nil
}

// New returns the peer of context in namespace.
func New(kubeconfig, context, namespace string) (*Peer, error) {
	cfg, err := RESTConfig(kubeconfig, context)
	if err != nil {
		return nil, err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig context %q: %w", context, err)
	}
	if namespace == "" {
		namespace = v1.KubeDefaultNamespace
	}
	return &Peer{Context: context, Namespace: namespace, Client: cs}, nil
}

// Describe names the peer in messages.
func (p *Peer) Describe() string {
	ctx := p.Context
	if ctx == "" {
		ctx = "(current)"
	}
	return fmt.Sprintf("context %s, namespace %s", ctx, p.Namespace)
}

// Info reads the ClusterInfo the mesh API server keeps in its ConfigMap.
func (p *Peer) Info(ctx context.Context) (v1.ClusterInfo, error) {
	cm, err := p.Client.CoreV1().ConfigMaps(p.Namespace).Get(ctx, v1.KubeClusterInfoConfigMap, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return v1.ClusterInfo{}, fmt.Errorf("no configmap %s in namespace %s: is Trellis installed there (helm install … --namespace %s) and its API server running?", v1.KubeClusterInfoConfigMap, p.Namespace, p.Namespace)
	}
	if err != nil {
		return v1.ClusterInfo{}, fmt.Errorf("read configmap %s/%s: %w", p.Namespace, v1.KubeClusterInfoConfigMap, err)
	}
	var info v1.ClusterInfo
	if err := json.Unmarshal([]byte(cm.Data[v1.KubeClusterInfoKey]), &info); err != nil {
		return v1.ClusterInfo{}, fmt.Errorf("configmap %s/%s: %s: %w", p.Namespace, v1.KubeClusterInfoConfigMap, v1.KubeClusterInfoKey, err)
	}
	if err := v1.ValidateClusterName(info.Name); err != nil {
		return v1.ClusterInfo{}, fmt.Errorf("configmap %s/%s: %w", p.Namespace, v1.KubeClusterInfoConfigMap, err)
	}
	return info, nil
}

func (p *Peer) answerTimeout() time.Duration {
	if p.AnswerTimeout > 0 {
		return p.AnswerTimeout
	}
	return time.Minute
}

func remoteSecretName(forCluster string) string { return v1.KubeRemoteSecretPrefix + forCluster }

// Issue asks the mesh API server for forCluster's credentials: it sets a
// fresh request ID on the cluster's request Secret and waits for the
// server to answer that ID.
func (p *Peer) Issue(ctx context.Context, forCluster string) (v1.RemoteCredentials, error) {
	if err := v1.ValidateClusterName(forCluster); err != nil {
		return v1.RemoteCredentials{}, err
	}
	id, err := newRequestID()
	if err != nil {
		return v1.RemoteCredentials{}, err
	}
	name := remoteSecretName(forCluster)
	secrets := p.Client.CoreV1().Secrets(p.Namespace)
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		s, err := secrets.Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			_, err = secrets.Create(ctx, &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{
					Name: name, Labels: map[string]string{v1.KubeRemoteClusterLabel: forCluster},
					Annotations: map[string]string{v1.KubeRequestAnnotation: id},
				},
				Type: corev1.SecretTypeOpaque,
			}, metav1.CreateOptions{})
			return err
		}
		if err != nil {
			return err
		}
		if _, revoking := s.Annotations[v1.KubeRevokeAnnotation]; revoking {
			// A revocation not yet served: let it finish (the Secret
			// goes), then ask anew.
			return apierrors.NewConflict(corev1.Resource("secrets"), name, errors.New("a revocation is pending"))
		}
		s = s.DeepCopy()
		if s.Annotations == nil {
			s.Annotations = map[string]string{}
		}
		if s.Labels == nil {
			s.Labels = map[string]string{}
		}
		s.Labels[v1.KubeRemoteClusterLabel] = forCluster
		s.Annotations[v1.KubeRequestAnnotation] = id
		_, err = secrets.Update(ctx, s, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return v1.RemoteCredentials{}, fmt.Errorf("request the credentials of %s (secret %s/%s): %w", forCluster, p.Namespace, name, err)
	}
	var creds v1.RemoteCredentials
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, p.answerTimeout(), true, func(ctx context.Context) (bool, error) {
		s, err := secrets.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil //nolint:nilerr // transient: keep waiting until the timeout says why
		}
		if msg, ok := strings.CutPrefix(s.Annotations[v1.KubeErrorAnnotation], id+": "); ok {
			return false, fmt.Errorf("the mesh API server refused: %s", msg)
		}
		if s.Annotations[v1.KubeIssuedAnnotation] != id {
			return false, nil
		}
		if err := json.Unmarshal(s.Data[v1.KubeCredentialsKey], &creds); err != nil {
			return false, fmt.Errorf("the answer's %s: %w", v1.KubeCredentialsKey, err)
		}
		return true, nil
	})
	if wait.Interrupted(err) {
		return v1.RemoteCredentials{}, fmt.Errorf("credentials of %s: the mesh API server in %s did not answer secret %s within %s: is it running, with the Kubernetes source? (kubectl -n %s get pods -l app.kubernetes.io/component=apiserver)",
			forCluster, p.Describe(), name, p.answerTimeout(), p.Namespace)
	}
	if err != nil {
		return v1.RemoteCredentials{}, fmt.Errorf("credentials of %s (secret %s/%s): %w", forCluster, p.Namespace, name, err)
	}
	if creds.For != forCluster {
		return v1.RemoteCredentials{}, fmt.Errorf("credentials of %s (secret %s/%s): the answer is for cluster %q", forCluster, p.Namespace, name, creds.For)
	}
	return creds, nil
}

// Revoke asks the mesh API server to revoke forCluster's credentials and
// waits until it has (it deletes the request Secret then).
func (p *Peer) Revoke(ctx context.Context, forCluster string) error {
	if err := v1.ValidateClusterName(forCluster); err != nil {
		return err
	}
	name := remoteSecretName(forCluster)
	secrets := p.Client.CoreV1().Secrets(p.Namespace)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		s, err := secrets.Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			_, err = secrets.Create(ctx, &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{
					Name: name, Labels: map[string]string{v1.KubeRemoteClusterLabel: forCluster},
					Annotations: map[string]string{v1.KubeRevokeAnnotation: "true"},
				},
				Type: corev1.SecretTypeOpaque,
			}, metav1.CreateOptions{})
			return err
		}
		if err != nil {
			return err
		}
		s = s.DeepCopy()
		if s.Annotations == nil {
			s.Annotations = map[string]string{}
		}
		s.Annotations[v1.KubeRevokeAnnotation] = "true"
		_, err = secrets.Update(ctx, s, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("request the revocation of %s (secret %s/%s): %w", forCluster, p.Namespace, name, err)
	}
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, p.answerTimeout(), true, func(ctx context.Context) (bool, error) {
		_, err := secrets.Get(ctx, name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
	if err != nil {
		return fmt.Errorf("revoke the credentials of %s: the mesh API server in %s did not delete secret %s within %s (it does once they are revoked): is it running? %w",
			forCluster, p.Describe(), name, p.answerTimeout(), err)
	}
	return nil
}

// ClusterFiles are the files in the clustermesh Secret that parse: an
// unreadable one pins nothing (agents refuse it too).
func (p *Peer) ClusterFiles(ctx context.Context) ([]clustermesh.ClusterFile, error) {
	s, err := p.Client.CoreV1().Secrets(p.Namespace).Get(ctx, v1.KubeClustermeshSecret, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read secret %s/%s: %w", p.Namespace, v1.KubeClustermeshSecret, err)
	}
	var out []clustermesh.ClusterFile
	for _, key := range slices.Sorted(maps.Keys(s.Data)) {
		cluster, ok := strings.CutSuffix(key, clustermesh.FileSuffix)
		if !ok {
			continue
		}
		if f, err := clustermesh.DecodeClusterFile(cluster, s.Data[key]); err == nil {
			out = append(out, f)
		}
	}
	return out, nil
}

// WriteClusterFile puts f into the clustermesh Secret (creating it), so
// the agents that mount it connect to f's cluster.
func (p *Peer) WriteClusterFile(ctx context.Context, f clustermesh.ClusterFile) error {
	data, err := clustermesh.EncodeClusterFile(f)
	if err != nil {
		return err
	}
	return p.updateClustermesh(ctx, func(d map[string][]byte) { d[f.Name+clustermesh.FileSuffix] = data })
}

// RemoveClusterFile takes cluster name's file out of the clustermesh
// Secret: the agents drain that cluster.
func (p *Peer) RemoveClusterFile(ctx context.Context, name string) error {
	return p.updateClustermesh(ctx, func(d map[string][]byte) { delete(d, name+clustermesh.FileSuffix) })
}

// updateClustermesh changes the clustermesh Secret's data, retrying on
// conflicts so that two connects at once lose neither's file.
func (p *Peer) updateClustermesh(ctx context.Context, change func(map[string][]byte)) error {
	secrets := p.Client.CoreV1().Secrets(p.Namespace)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		s, err := secrets.Get(ctx, v1.KubeClustermeshSecret, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			data := map[string][]byte{}
			change(data)
			_, err = secrets.Create(ctx, &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{
					Name:   v1.KubeClustermeshSecret,
					Labels: map[string]string{"app.kubernetes.io/name": "trellis", "app.kubernetes.io/component": "clustermesh"},
				},
				Type: corev1.SecretTypeOpaque,
				Data: data,
			}, metav1.CreateOptions{})
			return err
		}
		if err != nil {
			return err
		}
		s = s.DeepCopy()
		if s.Data == nil {
			s.Data = map[string][]byte{}
		}
		change(s.Data)
		_, err = secrets.Update(ctx, s, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("secret %s/%s: %w", p.Namespace, v1.KubeClustermeshSecret, err)
	}
	return nil
}

func newRequestID() (string, error) {
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("request ID: %w", err)
	}
	return hex.EncodeToString(b), nil
}
