package agent_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/trellis-mesh/trellis/agent"
	"github.com/trellis-mesh/trellis/apiserver/source"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/internal/kubetest"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
	"github.com/trellis-mesh/trellis/kvstore"
)

// The agent in Kubernetes mode against a real kube-apiserver and a real
// mesh API server running the Kubernetes source (`trellis apiserver
// --source kubernetes`): it takes its node IP and pod CIDRs from its Node,
// probes the pod scheduled on its node with the HTTP check its Service's
// annotation asks for, and when the pod's server answers 500 (a TCP
// connect still succeeds) or stops listening, it takes the pod out and
// patches the pod's trellis.io/healthy condition to False; the Kubernetes
// source then publishes the backend not ready, which the agent's own view
// of the mesh shows. When the server answers 200 again, the condition
// goes back to True and the backend is active again.
//
// The pod's address lives in a network namespace this test makes, where
// its server listens and the agent's probes are dialled from
// (agent.SetHealthDial): the kube-apiserver refuses loopback addresses in
// EndpointSlices, and the test's traffic must not leave namespaces it made.
func TestKubernetesMode(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a kube-apiserver and a mesh API server; skipped with -short")
	}
	privtest.RequireRoot(t)
	kbin := kubetest.Binary(t)
	bin := testutil.BuildTrellis(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	kas, cs := startKube(t, ctx, kbin)

	// The pod's network: 10.1.0.5 in a namespace of the test's, with an
	// HTTP server on 8080 whose /healthz answers as told.
	ns, _ := privtest.NewNetNS(t)
	privtest.AddVeth(t, ns, "pod0", netip.MustParsePrefix("10.1.0.5/32"))
	var ln net.Listener
	if err := privtest.InNetNS(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", "10.1.0.5:8080")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var answer atomic.Int32
	answer.Store(http.StatusOK)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(int(answer.Load()))
	}), ReadHeaderTimeout: 5 * time.Second}
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(ln)
	}()
	var closeOnce sync.Once
	closeServer := func() {
		closeOnce.Do(func() {
			srv.Close()
			<-served
		})
	}
	t.Cleanup(closeServer)
	nsDial := func(ctx context.Context, network, address string) (net.Conn, error) {
		var c net.Conn
		err := privtest.InNetNS(ns, func() error {
			var err error
			c, err = new(net.Dialer).DialContext(ctx, network, address)
			return err
		})
		return c, err
	}

	// What a kubelet, the scheduler and the EndpointSlice controller
	// would have written.
	const kns, nodeName = "shop", "node-a"
	kubetest.Namespace(t, ctx, cs, kns)
	node, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: nodeName},
		Spec:       corev1.NodeSpec{PodCIDR: "10.1.0.0/24", PodCIDRs: []string{"10.1.0.0/24"}},
	}, metav1.CreateOptions{})
	mustK(t, err)
	node.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeHostName, Address: nodeName},
		{Type: corev1.NodeExternalIP, Address: "203.0.113.5"},
		{Type: corev1.NodeInternalIP, Address: "192.168.1.5"},
	}
	_, err = cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	mustK(t, err)
	_, err = cs.CoreV1().Services(kns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: kns, Name: "cart", Annotations: map[string]string{
			source.AnnotationGlobal: "true", source.AnnotationHealthCheck: "http:/healthz",
		}},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{})
	mustK(t, err)
	ready, nodeRef := true, nodeName
	_, err = cs.DiscoveryV1().EndpointSlices(kns).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: kns, Name: "cart-1", Labels: map[string]string{
			discoveryv1.LabelServiceName: "cart", discoveryv1.LabelManagedBy: "trellis-test",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptrTo("http"), Port: ptrTo(int32(8080)), Protocol: ptrTo(corev1.ProtocolTCP)}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.1.0.5"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}, NodeName: &nodeRef}},
	}, metav1.CreateOptions{})
	mustK(t, err)
	pod, err := cs.CoreV1().Pods(kns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: kns, Name: "cart-1", Labels: map[string]string{"app": "cart"}},
		Spec: corev1.PodSpec{NodeName: nodeName,
			Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app:1", Ports: []corev1.ContainerPort{{Name: "web", ContainerPort: 8080}}}}},
	}, metav1.CreateOptions{})
	mustK(t, err)
	now := metav1.Now()
	pod.Status = corev1.PodStatus{
		Phase:  corev1.PodRunning,
		HostIP: "192.168.1.5", HostIPs: []corev1.HostIP{{IP: "192.168.1.5"}},
		PodIP: "10.1.0.5", PodIPs: []corev1.PodIP{{IP: "10.1.0.5"}},
		StartTime: &now,
		Conditions: []corev1.PodCondition{
			{Type: corev1.ContainersReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
		},
	}
	_, err = cs.CoreV1().Pods(kns).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
	mustK(t, err)

	// The cluster's mesh API server, with the Kubernetes source.
	_, configDir := startKubeMeshServer(t, bin, kas)
	stateDir := t.TempDir()

	// The agent's identity: a service account with exactly
	// agent.KubernetesRBAC, as the Helm chart grants it, and a token of
	// it from the TokenRequest API; anything else is forbidden to it.
	agentCS := agentClient(t, ctx, cs, kas)
	if _, err := agentCS.CoreV1().Secrets(kns).List(ctx, metav1.ListOptions{}); err == nil {
		t.Fatal("the agent's service account may list secrets: the RBAC test would prove nothing")
	}

	// The agent, in Kubernetes mode: no --node-ip, no --pod-cidrs.
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	var agentLog testutil.SyncBuffer
	cfg := agent.Config{
		NodeName: nodeName, ClusterName: "eu", ConfigDir: configDir, StateDir: stateDir,
		StatusSocket: filepath.Join(stateDir, "agent.sock"), MetricsListen: metricsAddr,
		Kubernetes: agentCS, Health: agent.HealthConfig{Interval: 100 * time.Millisecond},
		Logger: slog.New(slog.NewTextHandler(&agentLog, nil)),
	}
	mustK(t, cfg.FromKubernetes(ctx))
	if cfg.NodeIP != netip.MustParseAddr("192.168.1.5") || !slices.Equal(cfg.PodCIDRs, []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")}) {
		t.Fatalf("from the Node: node IP %s, pod CIDRs %v; want 192.168.1.5 and [10.1.0.0/24]", cfg.NodeIP, cfg.PodCIDRs)
	}
	a, err := agent.New(cfg, nil)
	mustK(t, err)
	agent.SetHealthDial(a, nsDial)
	runCtx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- a.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		if err := <-ran; err != nil {
			t.Errorf("agent Run: %v", err)
		}
		if t.Failed() {
			t.Logf("agent log:\n%s", agentLog.String())
		}
	})

	cart := clustermesh.ServiceName{Namespace: kns, Name: "cart"}
	condition := func() corev1.ConditionStatus {
		p, err := cs.CoreV1().Pods(kns).Get(ctx, "cart-1", metav1.GetOptions{})
		if err != nil {
			return "error: " + corev1.ConditionStatus(err.Error())
		}
		for _, c := range p.Status.Conditions {
			if c.Type == source.ConditionHealthy {
				return c.Status
			}
		}
		return ""
	}
	// state is the pod as the agent's probes, the pod's condition and the
	// mesh (what the Kubernetes source published, through etcd) see it.
	state := func(wantDown bool, wantCond corev1.ConditionStatus, wantBackends int) func() error {
		return func() error {
			st := a.Status()
			if st.Health == nil || len(st.Health.Endpoints) != 1 {
				return fmt.Errorf("local health %+v", st.Health)
			}
			e := st.Health.Endpoints[0]
			if e.IP != netip.MustParseAddr("10.1.0.5") || e.Pod != "shop/cart-1" || !slices.Equal(e.Checks, []string{"http 8080 /healthz"}) || e.Down != wantDown {
				return fmt.Errorf("probed endpoint %+v; want down=%v", e, wantDown)
			}
			if c := condition(); c != wantCond {
				return fmt.Errorf("pod condition %s=%q; want %q", source.ConditionHealthy, c, wantCond)
			}
			snap := a.Mesh().Snapshot()
			if snap == nil || snap.Services[cart] == nil {
				return errors.New("the mesh has no service shop/cart")
			}
			if n := len(snap.Services[cart].Backends); n != wantBackends {
				return fmt.Errorf("the mesh's shop/cart has %d active backends; want %d", n, wantBackends)
			}
			return nil
		}
	}
	testutil.EventuallyNoError(t, 60*time.Second, "the pod probed up, marked True, its backend active", state(false, corev1.ConditionTrue, 1))

	// The status over HTTP next to /metrics.
	resp, err := http.Get("http://" + metricsAddr + "/v1/status")
	mustK(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var st agent.Status
	if err := json.Unmarshal(body, &st); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/status on --metrics-listen: %s, %v:\n%s", resp.Status, err, body)
	}
	if st.NodeIP != cfg.NodeIP || st.Kubernetes == nil || st.Kubernetes.Pods != 1 || st.Health == nil {
		t.Errorf("status over HTTP: node IP %s, kubernetes %+v, health %v", st.NodeIP, st.Kubernetes, st.Health != nil)
	}
	if resp, err := http.Post("http://"+metricsAddr+"/v1/encryption/rotate", "", nil); err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusMethodNotAllowed && resp.StatusCode != http.StatusNotFound {
			t.Errorf("POST /v1/encryption/rotate on --metrics-listen: %s; want it not served there", resp.Status)
		}
	}

	// 500 on /healthz: a TCP connect still succeeds, the HTTP check fails.
	begin := time.Now()
	answer.Store(http.StatusInternalServerError)
	testutil.EventuallyNoError(t, 30*time.Second, "the pod answering 500 probed down, marked False, its backend unready", state(true, corev1.ConditionFalse, 0))
	t.Logf("500: down, marked and published not ready %s after the change", time.Since(begin).Round(time.Millisecond))
	if c, err := nsDial(ctx, "tcp", "10.1.0.5:8080"); err != nil {
		t.Errorf("a TCP connect to the pod fails too (%v): the test does not tell the checks apart", err)
	} else {
		c.Close()
	}

	answer.Store(http.StatusOK)
	testutil.EventuallyNoError(t, 30*time.Second, "the pod answering 200 again", state(false, corev1.ConditionTrue, 1))

	// The listener closes.
	begin = time.Now()
	closeServer()
	testutil.EventuallyNoError(t, 30*time.Second, "the pod with no listener probed down, marked False, its backend unready", state(true, corev1.ConditionFalse, 0))
	t.Logf("listener closed: down, marked and published not ready %s after the close", time.Since(begin).Round(time.Millisecond))
	// No encrypting datapath: the agent wrote no key on its Node, which
	// it did once (clearing any), with the RBAC's nodes patch.
	if st := a.Status(); st.Kubernetes == nil || st.Kubernetes.PatchErrors != 0 || st.Kubernetes.KeyPatches != 1 || st.Kubernetes.KeyPatchErrors != 0 {
		t.Errorf("kubernetes status %+v; want no patch errors, one key patch", st.Kubernetes)
	}
}

// agentClient is a client authenticated as a service account bound to a
// ClusterRole of agent.KubernetesRBAC's rules.
func agentClient(t *testing.T, ctx context.Context, cs kubernetes.Interface, kas *kubetest.Server) kubernetes.Interface {
	t.Helper()
	const ns, name = "kube-system", "trellis-agent"
	_, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	_, err = cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}, metav1.CreateOptions{})
	mustK(t, err)
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name}}
	for _, r := range agent.KubernetesRBAC {
		role.Rules = append(role.Rules, rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{r.Resource}, Verbs: r.Verbs})
	}
	_, err = cs.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{})
	mustK(t, err)
	_, err = cs.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: ns, Name: name}},
	}, metav1.CreateOptions{})
	mustK(t, err)
	tok, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptrTo(int64(3600))},
	}, metav1.CreateOptions{})
	mustK(t, err)
	cfg := kas.Config()
	cfg.BearerToken = tok.Status.Token
	out, err := agent.NewKubernetesClientForConfig(cfg)
	mustK(t, err)
	return out
}

func mustK(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func ptrTo[T any](v T) *T { return &v }

// startKube runs a real kube-apiserver on an embedded etcd of its own and
// returns it with a system:masters client.
func startKube(t *testing.T, ctx context.Context, kbin string) (*kubetest.Server, kubernetes.Interface) {
	t.Helper()
	etcd, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(func() { etcd.Close() })
	kas := kubetest.Start(t, kbin, etcd.Endpoints()[0])
	cs, err := agent.NewKubernetesClientForConfig(kas.Config())
	if err != nil {
		t.Fatal(err)
	}
	return kas, cs
}

// startKubeMeshServer runs cluster eu's mesh API server on kas with the
// Kubernetes source, waits until it is ready, and returns it with a
// config dir holding eu's own cluster file, as an agent of eu reads it.
func startKubeMeshServer(t *testing.T, bin string, kas *kubetest.Server) (*cluster, string) {
	t.Helper()
	eu := &cluster{name: "eu", stateDir: t.TempDir()}
	testutil.Start(t, bin, "apiserver", "--cluster-name", "eu", "--cluster-id", "1", "--pod-cidrs", "10.1.0.0/16",
		"--state-dir", eu.stateDir, "--source", "kubernetes", "--kubeconfig", kas.Kubeconfig(t, "eu"),
		"--etcd-listen", fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)), "--http-listen", fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)))
	eu.api = testutil.WaitAPIServer(t, eu.stateDir, 90*time.Second)
	configDir := t.TempDir()
	if err := clustermesh.WriteClusterFile(configDir, eu.fileFor(t, "eu")); err != nil {
		t.Fatal(err)
	}
	return eu, configDir
}
