package charttest

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"

	"github.com/trellis-mesh/trellis/internal/kubetest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// warnings records the warnings kube-apiserver sends (Pod Security
// admission warns about workloads whose pods a namespace would refuse).
type warnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warnings) HandleWarningHeader(_ int, _ string, text string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.msgs = append(w.msgs, text)
}

// take returns the warnings since the last take.
func (w *warnings) take() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := w.msgs
	w.msgs = nil
	return out
}

// applier applies unstructured objects with server-side apply.
type applier struct {
	dyn    dynamic.Interface
	mapper *restmapper.DeferredDiscoveryRESTMapper
}

func newApplier(t *testing.T, cfg *rest.Config) *applier {
	t.Helper()
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	disco, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &applier{dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(disco))}
}

// apply server-side applies o into namespace ns (its own namespace is
// replaced; cluster-scoped objects ignore it), as a dry run when dryRun.
func (a *applier) apply(t *testing.T, o *unstructured.Unstructured, ns string, dryRun bool) error {
	t.Helper()
	gvk := o.GroupVersionKind()
	m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return fmt.Errorf("%s: no such resource on the server: %w", gvk, err)
	}
	o = o.DeepCopy()
	var ri dynamic.ResourceInterface = a.dyn.Resource(m.Resource)
	if m.Scope.Name() == "namespace" {
		o.SetNamespace(ns)
		ri = a.dyn.Resource(m.Resource).Namespace(ns)
	}
	opts := metav1.ApplyOptions{FieldManager: "trellis-charttest", Force: true}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	_, err = ri.Apply(ctx(t, 30*time.Second), o.GetName(), o, opts)
	return err
}

func createNamespace(t *testing.T, cs kubernetes.Interface, name string, labels map[string]string) {
	t.Helper()
	_, err := cs.CoreV1().Namespaces().Create(ctx(t, 30*time.Second), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace %s: %v", name, err)
	}
}

// privileged is the Pod Security level the chart's namespace needs (the
// agent uses the host network, host paths and capabilities); the README
// tells users to label the namespace so.
var privileged = map[string]string{"pod-security.kubernetes.io/enforce": "privileged"}

// Every object of every value set, applied to a real kube-apiserver with
// server-side dry-run: its schema validation, defaulting, RBAC escalation
// checks and admission (Pod Security included) accept all of them. Then
// the pods the workloads would make, created with dry-run too: the agent's
// is admitted only in a privileged namespace, the API server's also in a
// "restricted" one.
func TestChartDryRunOnKubeAPIServer(t *testing.T) {
	k := startKubeAPIServer(t, nil)
	cfg := k.Config()
	warn := &warnings{}
	cfg.WarningHandler = warn
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ap := newApplier(t, cfg)

	for _, vs := range valueSets {
		t.Run(vs.name, func(t *testing.T) {
			objs := mustRender(t, vs)
			createNamespace(t, cs, vs.namespace, privileged)
			counts := map[string]int{}
			for _, o := range objs {
				if err := ap.apply(t, o, vs.namespace, true); err != nil {
					t.Errorf("dry-run apply %s %s: %v", o.GetKind(), o.GetName(), err)
					continue
				}
				if w := warn.take(); len(w) > 0 {
					t.Errorf("dry-run apply %s %s: warnings %q", o.GetKind(), o.GetName(), w)
				}
				counts[o.GetKind()]++
			}
			var summary []string
			for _, kind := range slices.Sorted(maps.Keys(counts)) {
				summary = append(summary, fmt.Sprintf("%d %s", counts[kind], kind))
			}
			t.Logf("%s: %d of %d objects accepted by kube-apiserver (server-side apply, dry run): %s",
				vs.name, sum(counts), len(objs), strings.Join(summary, ", "))

			// The pods: a Pod of each workload's template, in this
			// (privileged) namespace, with its service account (the
			// ServiceAccount admission refuses a pod whose account does
			// not exist, and dry-run objects do not).
			for _, w := range []struct{ kind, name string }{{"DaemonSet", "trellis-agent"}, {"Deployment", "trellis-apiserver"}} {
				pod := podOf(t, objs, w.kind, w.name)
				createServiceAccount(t, cs, vs.namespace, pod.Spec.ServiceAccountName)
				if err := dryRunPod(t, cs, vs.namespace, pod); err != nil {
					t.Errorf("dry-run create the pod of %s %s: %v", w.kind, w.name, err)
				}
			}
		})
	}

	// Pod Security: the API server needs no privilege (restricted admits
	// its pod), the agent does (restricted refuses it: the check works).
	const restricted = "restricted-check"
	createNamespace(t, cs, restricted, map[string]string{
		"pod-security.kubernetes.io/enforce": "restricted",
		"pod-security.kubernetes.io/warn":    "restricted",
	})
	objs := mustRender(t, valueSets[0])
	for _, o := range objs {
		if o.GetKind() != "Deployment" && o.GetKind() != "DaemonSet" {
			continue
		}
		if err := ap.apply(t, o, restricted, true); err != nil {
			t.Fatalf("dry-run apply %s %s in %s: %v", o.GetKind(), o.GetName(), restricted, err)
		}
		w := warn.take()
		pod := podOf(t, objs, o.GetKind(), o.GetName())
		createServiceAccount(t, cs, restricted, pod.Spec.ServiceAccountName)
		err := dryRunPod(t, cs, restricted, pod)
		switch o.GetKind() {
		case "Deployment":
			if len(w) > 0 || err != nil {
				t.Errorf("the API server is not admitted at Pod Security level restricted: warnings %q, pod: %v", w, err)
			}
		case "DaemonSet":
			if len(w) == 0 || err == nil || !strings.Contains(err.Error(), "violates PodSecurity") {
				t.Errorf("the agent passed Pod Security level restricted (warnings %q, pod: %v): the check cannot fail", w, err)
			} else {
				t.Logf("restricted refuses the agent's pod, as it must: %v", err)
			}
		}
	}
}

func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// podOf builds the Pod a workload's controller would create from its
// template.
func podOf(t *testing.T, objs []*unstructured.Unstructured, kind, name string) *corev1.Pod {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() != kind || o.GetName() != name {
			continue
		}
		tmpl, ok, err := unstructured.NestedMap(o.Object, "spec", "template")
		if !ok || err != nil {
			t.Fatalf("%s %s has no pod template: %v", kind, name, err)
		}
		var pt corev1.PodTemplateSpec
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(tmpl, &pt); err != nil {
			t.Fatalf("%s %s template: %v", kind, name, err)
		}
		pod := &corev1.Pod{ObjectMeta: pt.ObjectMeta, Spec: pt.Spec}
		pod.Name = name + "-pod"
		if kind == "DaemonSet" {
			pod.Spec.NodeName = "node-1" // the DaemonSet controller binds each pod to its node
		}
		return pod
	}
	t.Fatalf("no %s %s rendered", kind, name)
	return nil
}

func createServiceAccount(t *testing.T, cs kubernetes.Interface, ns, name string) {
	t.Helper()
	_, err := cs.CoreV1().ServiceAccounts(ns).Create(ctx(t, 30*time.Second), &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("create service account %s/%s: %v", ns, name, err)
	}
}

func dryRunPod(t *testing.T, cs kubernetes.Interface, ns string, pod *corev1.Pod) error {
	t.Helper()
	pod = pod.DeepCopy()
	pod.Namespace = ns
	_, err := cs.CoreV1().Pods(ns).Create(ctx(t, 30*time.Second), pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	return err
}

// applyRBAC applies, for real, the rendered ServiceAccount and RBAC
// objects of one component (app.kubernetes.io/component): the only
// permissions the process acting as that service account gets.
func applyRBAC(t *testing.T, ap *applier, objs []*unstructured.Unstructured, component, ns string) {
	t.Helper()
	n := 0
	for _, o := range objs {
		if o.GetLabels()["app.kubernetes.io/component"] != component {
			continue
		}
		switch o.GetKind() {
		case "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding":
			if err := ap.apply(t, o, ns, false); err != nil {
				t.Fatalf("apply %s %s: %v", o.GetKind(), o.GetName(), err)
			}
			n++
		}
	}
	if n == 0 {
		t.Fatalf("no RBAC rendered for %s", component)
	}
}

// rendered returns the one object of kind with the component label.
func rendered(t *testing.T, objs []*unstructured.Unstructured, kind, component string) *unstructured.Unstructured {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind && o.GetLabels()["app.kubernetes.io/component"] == component {
			return o
		}
	}
	t.Fatalf("no %s of %s rendered", kind, component)
	return nil
}

// containerArgs returns the first container's args of a workload.
func containerArgs(t *testing.T, o *unstructured.Unstructured) []string {
	t.Helper()
	cs, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
	if len(cs) == 0 {
		t.Fatalf("%s %s has no container", o.GetKind(), o.GetName())
	}
	args, _, _ := unstructured.NestedStringSlice(cs[0].(map[string]any), "args")
	return args
}

// runAsRendered prepares a real kube-apiserver for one component of the
// chart rendered with vs: the namespace, the component's rendered
// ServiceAccount and RBAC applied for real, and a static token that
// authenticates as that ServiceAccount (sa), which it returns with the
// server, an admin client and the rendered objects.
func runAsRendered(t *testing.T, vs valueSet, component, sa string) (*kubetest.Server, kubernetes.Interface, []*unstructured.Unstructured, string) {
	t.Helper()
	saToken := randomToken(t)
	k := startKubeAPIServer(t, map[string]string{"system:serviceaccount:" + vs.namespace + ":" + sa: saToken})
	cs, err := kubernetes.NewForConfig(k.Config())
	if err != nil {
		t.Fatal(err)
	}
	createNamespace(t, cs, vs.namespace, privileged)
	objs := mustRender(t, vs)
	applyRBAC(t, newApplier(t, k.Config()), objs, component, vs.namespace)
	return k, cs, objs, saToken
}

// eventually polls cond every 250 ms until it returns nil, failing the
// test with its last error after timeout or when p exits.
func eventually(t *testing.T, p *testutil.Process, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		select {
		case <-p.Exited():
			t.Fatalf("%s: the process exited (%v) first; last: %v", what, p.ExitState(), err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %s: %v", what, timeout, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// The API server as the chart configures it, for real: the trellis binary
// with the rendered config file (unknown keys would fail its strict
// parse), the rendered PKI Secret's files as --secrets-dir, and, as its
// only permissions on a real kube-apiserver, the rendered ServiceAccount
// and RBAC (applied for real; the server authenticates as that service
// account). It becomes ready only when its Kubernetes source has listed
// every kind it reads; then it publishes the cluster info ConfigMap and
// answers and revokes a credential request made as a Secret, as `trellis
// connect --context` makes it. Missing RBAC fails one of these. Only the
// pod's paths and listen addresses are replaced, as no container runs
// here.
func TestRenderedAPIServerRuns(t *testing.T) {
	trellis := repoBinary(t, "trellis", "build")
	vs := valueSets[0]
	k, cs, objs, saToken := runAsRendered(t, vs, "apiserver", "trellis-apiserver")
	config := rendered(t, objs, "ConfigMap", "apiserver")
	secret := rendered(t, objs, "Secret", "apiserver")

	dir := t.TempDir()
	configData, _, _ := unstructured.NestedString(config.Object, "data", "config.yaml")
	configFile := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(configFile, []byte(configData), 0o600); err != nil {
		t.Fatal(err)
	}
	secrets := filepath.Join(dir, "secrets")
	if err := os.Mkdir(secrets, 0o700); err != nil {
		t.Fatal(err)
	}
	files := decodeSecretData(t, secret)
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(secrets, name), data, 0o400); err != nil {
			t.Fatal(err)
		}
	}
	stateDir := filepath.Join(dir, "state")
	httpAddr := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	p := testutil.Start(t, trellis, "apiserver",
		"--config", configFile,
		"--state-dir", stateDir,
		"--secrets-dir", secrets,
		"--etcd-listen", fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)),
		"--http-listen", httpAddr,
		"--kubeconfig", k.KubeconfigFor(t, saToken),
	)

	// Ready, verified with the Secret's CA and asked with its admin token.
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(files["ca.crt"]) {
		t.Fatal("no CA in the rendered Secret")
	}
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	defer client.CloseIdleConnections()
	eventually(t, p, 90*time.Second, "the rendered API server ready on the chart's RBAC", func() error {
		req, _ := http.NewRequest(http.MethodGet, "https://"+httpAddr+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+string(files["admin.token"]))
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", resp.Status, body)
		}
		return nil
	})
	for _, name := range []string{"ca.crt", "ca.key", "client-ca.crt", "client-ca.key"} {
		got, err := os.ReadFile(filepath.Join(stateDir, "pki", name))
		if err != nil || !bytes.Equal(got, files[name]) {
			t.Errorf("state dir pki/%s is not the Secret's (%v)", name, err)
		}
	}

	// The admin exchange through Kubernetes objects, in its namespace.
	secretsAPI := cs.CoreV1().Secrets(vs.namespace)
	eventually(t, p, 30*time.Second, "the cluster info ConfigMap", func() error {
		_, err := cs.CoreV1().ConfigMaps(vs.namespace).Get(ctx(t, 10*time.Second), "trellis-cluster-info", metav1.GetOptions{})
		return err
	})
	req := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{
		Name:        "trellis-remote-us",
		Labels:      map[string]string{"trellis.io/remote-cluster": "us"},
		Annotations: map[string]string{"trellis.io/request": "req-1"},
	}}
	if _, err := secretsAPI.Create(ctx(t, 10*time.Second), req, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, p, 30*time.Second, "the credential request answered", func() error {
		s, err := secretsAPI.Get(ctx(t, 10*time.Second), req.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if e := s.Annotations["trellis.io/error"]; e != "" {
			t.Fatalf("the request was refused: %s", e)
		}
		if s.Annotations["trellis.io/issued"] != "req-1" {
			return fmt.Errorf("not answered yet: %v", s.Annotations)
		}
		if !bytes.Contains(s.Data["credentials.json"], []byte(`"caPEM"`)) {
			return fmt.Errorf("answered without credentials: %s", s.Data["credentials.json"])
		}
		return nil
	})
	s, err := secretsAPI.Get(ctx(t, 10*time.Second), req.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Annotations["trellis.io/revoke"] = ""
	if _, err := secretsAPI.Update(ctx(t, 10*time.Second), s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, p, 30*time.Second, "the revoked request's Secret deleted by the server", func() error {
		_, err := secretsAPI.Get(ctx(t, 10*time.Second), req.Name, metav1.GetOptions{})
		if err == nil {
			return fmt.Errorf("still there")
		}
		if !strings.Contains(err.Error(), "not found") {
			return err
		}
		return nil
	})
}

// The agent as the chart configures it, on a real kube-apiserver with the
// rendered ServiceAccount and RBAC as its only permissions: the rendered
// DaemonSet's arguments, with the downward API's values substituted as
// the kubelet would and the host paths replaced by the test's; the
// datapath is off (--cgroup-root none, --tunnel none), which
// TestAgentCapabilities in deploy/systemd covers. It reads its Node
// (get) and writes its encryption keys (none here) on it (patch nodes),
// lists and watches its node's pods, and marks a running pod with
// nothing to probe trellis.io/healthy=True (patch pods/status); its
// metrics listener, on the node address the chart gives it, serves
// /v1/status.
func TestRenderedAgentRuns(t *testing.T) {
	trellis := repoBinary(t, "trellis", "build")
	vs := valueSets[0]
	k, cs, objs, saToken := runAsRendered(t, vs, "agent", "trellis-agent")

	// What the kubelet and the scheduler would have written.
	c := ctx(t, time.Minute)
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "node-1"},
		Spec:       corev1.NodeSpec{PodCIDR: "10.1.1.0/24", PodCIDRs: []string{"10.1.1.0/24"}},
	}
	node, err := cs.CoreV1().Nodes().Create(c, node, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"}}
	if _, err := cs.CoreV1().Nodes().UpdateStatus(c, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	createServiceAccount(t, cs, vs.namespace, "default") // what the service account controller would have made
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: vs.namespace},
		Spec:       corev1.PodSpec{NodeName: "node-1", Containers: []corev1.Container{{Name: "echo", Image: "echo"}}},
	}
	pod, err = cs.CoreV1().Pods(vs.namespace).Create(c, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Status.Phase = corev1.PodRunning
	pod.Status.PodIP = "10.1.1.5"
	pod.Status.PodIPs = []corev1.PodIP{{IP: "10.1.1.5"}}
	pod.Status.Conditions = []corev1.PodCondition{
		{Type: corev1.PodReady, Status: corev1.ConditionTrue},
		{Type: corev1.ContainersReady, Status: corev1.ConditionTrue},
	}
	if _, err := cs.CoreV1().Pods(vs.namespace).UpdateStatus(c, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	metricsPort := testutil.FreePort(t)
	replace := map[string]string{
		"config-dir":    filepath.Join(dir, "config"),
		"state-dir":     filepath.Join(dir, "state"),
		"status-socket": filepath.Join(dir, "agent.sock"),
		"cgroup-root":   "none",
		"tunnel":        "none",
	}
	if err := os.Mkdir(replace["config-dir"], 0o700); err != nil {
		t.Fatal(err)
	}
	var args []string
	for _, a := range containerArgs(t, rendered(t, objs, "DaemonSet", "agent")) {
		a = strings.NewReplacer("$(NODE_NAME)", "node-1", "$(HOST_IP)", "127.0.0.1").Replace(a)
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if v, ok := replace[name]; ok {
			a = "--" + name + "=" + v
		}
		if name == "metrics-listen" {
			if !strings.HasSuffix(a, ":9962") {
				t.Fatalf("rendered %s, want port 9962", a)
			}
			a = strings.TrimSuffix(a, "9962") + strconv.Itoa(metricsPort)
		}
		args = append(args, a)
	}
	args = append(args, "--kubeconfig", k.KubeconfigFor(t, saToken))
	p := testutil.Start(t, trellis, args...)

	eventually(t, p, 60*time.Second, "the pod marked trellis.io/healthy=True by the agent", func() error {
		got, err := cs.CoreV1().Pods(vs.namespace).Get(ctx(t, 10*time.Second), "echo", metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range got.Status.Conditions {
			if cond.Type == "trellis.io/healthy" {
				if cond.Status != corev1.ConditionTrue {
					return fmt.Errorf("condition %s", cond.Status)
				}
				return nil
			}
		}
		return fmt.Errorf("no trellis.io/healthy condition")
	})
	eventually(t, p, 30*time.Second, "/v1/status on the rendered metrics address", func() error {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/v1/status", metricsPort))
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "node-1") {
			return fmt.Errorf("%s: %.200s", resp.Status, body)
		}
		// Its (empty) encryption keys written on its Node: patch nodes.
		if !strings.Contains(string(body), `"keyPatches":`) {
			return fmt.Errorf("no key annotations patched on the Node yet: %.300s", body)
		}
		return nil
	})
	if out := p.Output(); strings.Contains(out, "forbidden") {
		t.Errorf("the agent was refused something on the chart's RBAC:\n%s", lastLines(out, 20))
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
