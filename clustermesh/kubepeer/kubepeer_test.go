package kubepeer_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/clustermesh/kubepeer"
	"github.com/trellis-mesh/trellis/internal/kubetest"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/kvstore"
)

// kubeCluster is one Kubernetes cluster of the test: a real kube-apiserver
// on its own embedded etcd, with Trellis's mesh API server running the
// Kubernetes source against it, as the Helm chart runs it (there is no
// kubelet here, so the server is a child process rather than a pod).
type kubeCluster struct {
	name   string
	kas    *kubetest.Server
	cs     kubernetes.Interface
	server *testutil.Process
}

const ns = v1.KubeDefaultNamespace

func startKubeCluster(t *testing.T, ctx context.Context, trellis, kasBin, name string, id int, podCIDR string) *kubeCluster {
	t.Helper()
	etcd, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatalf("start etcd of %s's kube-apiserver: %v", name, err)
	}
	t.Cleanup(func() { etcd.Close() })
	kas := kubetest.Start(t, kasBin, etcd.Endpoints()[0])
	cs, err := kubernetes.NewForConfig(kas.Config())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	server := testutil.Start(t, trellis, "apiserver",
		"--source", "kubernetes", "--kubeconfig", kas.Kubeconfig(t, name), "--kubernetes-namespace", ns,
		"--cluster-name", name, "--cluster-id", strconv.Itoa(id), "--pod-cidrs", podCIDR,
		"--state-dir", filepath.Join(t.TempDir(), "state"),
		"--etcd-listen", "127.0.0.1:"+strconv.Itoa(testutil.FreePort(t)),
		"--http-listen", "127.0.0.1:"+strconv.Itoa(testutil.FreePort(t)))
	return &kubeCluster{name: name, kas: kas, cs: cs, server: server}
}

// kubeconfig holds one context per cluster, as an operator's does.
func kubeconfig(t *testing.T, clusters ...*kubeCluster) string {
	t.Helper()
	var ctxs []kubetest.Context
	for _, c := range clusters {
		ca, err := os.ReadFile(c.kas.CAFile)
		if err != nil {
			t.Fatal(err)
		}
		ctxs = append(ctxs, kubetest.Context{Name: c.name, Server: c.kas, CAPEM: ca})
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, kubetest.KubeconfigYAML(ctxs), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func trellisCmd(t *testing.T, bin string, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command(bin, args...).CombinedOutput()
	return string(out), err
}

// clusterFiles are the cluster files in c's clustermesh Secret.
func clusterFiles(t *testing.T, ctx context.Context, c *kubeCluster) map[string]clustermesh.ClusterFile {
	t.Helper()
	s, err := c.cs.CoreV1().Secrets(ns).Get(ctx, v1.KubeClustermeshSecret, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]clustermesh.ClusterFile{}
	for key, data := range s.Data {
		name := strings.TrimSuffix(key, clustermesh.FileSuffix)
		f, err := clustermesh.DecodeClusterFile(name, data)
		if err != nil {
			t.Fatalf("%s's clustermesh secret: %v", c.name, err)
		}
		out[name] = f
	}
	return out
}

// readClusterConfig reads what target publishes of itself with the
// credentials in f, as an agent's session does first.
func readClusterConfig(ctx context.Context, f clustermesh.ClusterFile) error {
	tlsCfg, err := f.TLSConfig()
	if err != nil {
		return err
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: f.Endpoints, TLS: tlsCfg, DialTimeout: 3 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, v1.ClusterConfigKey(f.Name))
	if err != nil {
		return err
	}
	if len(resp.Kvs) != 1 {
		return os.ErrNotExist
	}
	return nil
}

// TestConnectContexts joins two Kubernetes clusters as an operator does,
// `trellis connect --context eu --context us`, through their real
// kube-apiservers only, and checks that the cluster files land in each
// cluster's clustermesh Secret and that the credentials in them read the
// other cluster's etcd; then the refusals (a third cluster reusing an ID
// changes nothing), a forged request Secret, and disconnect (files gone,
// credentials refused).
func TestConnectContexts(t *testing.T) {
	if testing.Short() {
		t.Skip("starts kube-apiservers; skipped with -short")
	}
	kasBin := kubetest.Binary(t)
	trellis := testutil.BuildTrellis(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	eu := startKubeCluster(t, ctx, trellis, kasBin, "eu", 1, "10.1.0.0/16")
	us := startKubeCluster(t, ctx, trellis, kasBin, "us", 2, "10.2.0.0/16")
	kc := kubeconfig(t, eu, us)

	// The server publishes its cluster info once it runs.
	for _, c := range []*kubeCluster{eu, us} {
		p := &kubepeer.Peer{Context: c.name, Namespace: ns, Client: c.cs}
		testutil.EventuallyNoError(t, 60*time.Second, c.name+"'s cluster info", func() error {
			info, err := p.Info(ctx)
			if err == nil && info.Name != c.name {
				t.Fatalf("cluster info of %s names %s", c.name, info.Name)
			}
			return err
		})
	}

	out, err := trellisCmd(t, trellis, "connect", "--kubeconfig", kc, "--context", "eu", "--context", "us")
	if err != nil {
		t.Fatalf("trellis connect --context eu --context us: %v\n%s", err, out)
	}
	t.Logf("trellis connect:\n%s", out)
	files := map[string]map[string]clustermesh.ClusterFile{}
	for _, c := range []*kubeCluster{eu, us} {
		files[c.name] = clusterFiles(t, ctx, c)
		if len(files[c.name]) != 2 {
			t.Fatalf("%s's clustermesh secret holds %d cluster files, want eu and us", c.name, len(files[c.name]))
		}
		for _, target := range []string{"eu", "us"} {
			f := files[c.name][target]
			if err := readClusterConfig(ctx, f); err != nil {
				t.Errorf("%s's credentials for %s do not read its cluster config: %v", c.name, target, err)
			}
		}
	}
	if len(files["eu"]["us"].GossipKey) == 0 || string(files["eu"]["us"].GossipKey) != string(files["us"]["eu"].GossipKey) {
		t.Errorf("the two clusters' files do not carry one mesh gossip key")
	}

	// A third cluster with eu's ID: refused, and nothing changes.
	ap := startKubeCluster(t, ctx, trellis, kasBin, "ap", 1, "10.3.0.0/16")
	kc3 := kubeconfig(t, eu, us, ap)
	apPeer := &kubepeer.Peer{Context: "ap", Namespace: ns, Client: ap.cs}
	testutil.EventuallyNoError(t, 60*time.Second, "ap's cluster info", func() error { _, err := apPeer.Info(ctx); return err })
	out, err = trellisCmd(t, trellis, "connect", "--kubeconfig", kc3, "--mesh", "--context", "eu", "--context", "us", "--context", "ap")
	if err == nil || !strings.Contains(out, "cluster ID 1") {
		t.Fatalf("connect with a duplicate cluster ID: err %v, want a refusal naming the ID:\n%s", err, out)
	}
	t.Logf("refused as expected: %s", strings.TrimSpace(out))
	if got := clusterFiles(t, ctx, ap); len(got) != 0 {
		t.Errorf("a refused connect wrote %d cluster files into ap", len(got))
	}
	if got := clusterFiles(t, ctx, eu); len(got) != 2 {
		t.Errorf("a refused connect changed eu's cluster files: %d", len(got))
	}

	// A forged request: the Secret for cluster x labelled as cluster y
	// gets an error, no credentials.
	forged := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{
		Name: v1.KubeRemoteSecretPrefix + "x", Labels: map[string]string{v1.KubeRemoteClusterLabel: "y"},
		Annotations: map[string]string{v1.KubeRequestAnnotation: "forged-1"},
	}}
	if _, err := eu.cs.CoreV1().Secrets(ns).Create(ctx, forged, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testutil.EventuallyNoError(t, 30*time.Second, "the forged request refused", func() error {
		s, err := eu.cs.CoreV1().Secrets(ns).Get(ctx, forged.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if len(s.Data) != 0 {
			t.Fatalf("the forged request got credentials: %v", s.Data)
		}
		if !strings.HasPrefix(s.Annotations[v1.KubeErrorAnnotation], "forged-1: ") {
			return os.ErrNotExist
		}
		return nil
	})

	// A peer whose API server does not answer: a clear error, not a hang.
	silent := &kubepeer.Peer{Context: "eu", Namespace: "nobody-home", Client: eu.cs, AnswerTimeout: 2 * time.Second}
	if _, err := eu.cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "nobody-home"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := silent.Info(ctx); err == nil || !strings.Contains(err.Error(), "is Trellis installed there") {
		t.Errorf("Info of a namespace without Trellis: %v", err)
	}
	if _, err := silent.Issue(ctx, "us"); err == nil || !strings.Contains(err.Error(), "did not answer") {
		t.Errorf("Issue with no server: %v", err)
	}

	// Disconnect: the files go and the credentials stop working.
	out, err = trellisCmd(t, trellis, "disconnect", "--kubeconfig", kc, "--context", "eu", "--context", "us")
	if err != nil {
		t.Fatalf("trellis disconnect: %v\n%s", err, out)
	}
	if got := clusterFiles(t, ctx, eu); len(got) != 1 || got["eu"].Name != "eu" {
		t.Errorf("after disconnect eu's secret holds %v, want only eu's own file", keys(got))
	}
	if err := readClusterConfig(ctx, files["eu"]["us"]); err == nil {
		t.Errorf("eu's old credentials for us still read us's etcd after disconnect")
	}
	if err := readClusterConfig(ctx, files["eu"]["eu"]); err != nil {
		t.Errorf("eu's credentials for itself stopped working: %v", err)
	}
}

func keys(m map[string]clustermesh.ClusterFile) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
