//go:build linux

package k8s

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/apiserver/source"
	"github.com/trellis-mesh/trellis/apiserver/source/sourcetest"
	"github.com/trellis-mesh/trellis/internal/kubetest"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
)

// TestRealKubeAPIServer drives the source with real objects through a real
// kube-apiserver backed by the project's embedded etcd.
func TestRealKubeAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a kube-apiserver; skipped with -short")
	}
	bin := kubetest.Binary(t)
	begin := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	etcd, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(func() { etcd.Close() })
	kas := kubetest.Start(t, bin, etcd.Endpoints()[0])
	cs, err := NewClient(kas.Config())
	if err != nil {
		t.Fatal(err)
	}

	// Objects present before the source starts.
	const ns = "shop"
	kubetest.Namespace(t, ctx, cs, ns)
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "node-a", Labels: map[string]string{LabelTopologyRegion: "eu", LabelTopologyZone: "eu-1a"}},
		Spec:       corev1.NodeSpec{PodCIDR: "10.1.0.0/24", PodCIDRs: []string{"10.1.0.0/24"}},
	}
	node, err = cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	must(t, err)
	node.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: "192.168.1.5"},
		{Type: corev1.NodeExternalIP, Address: "203.0.113.5"},
		{Type: corev1.NodeHostName, Address: "node-a"},
	}
	_, err = cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	must(t, err)

	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "cart", Annotations: map[string]string{
			source.AnnotationGlobal: "true", source.AnnotationAffinity: "local", source.CiliumAnnotationShared: "false",
			source.AnnotationFailoverRegions: "ap, us", source.AnnotationHealthCheck: "http:/healthz",
		}},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromString("web")},
		}},
	}
	svc, err = cs.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	must(t, err)
	_, err = cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "plain"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}},
	}, metav1.CreateOptions{})
	must(t, err)
	es := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "cart-1", Labels: map[string]string{
			LabelServiceName: "cart", discoveryv1.LabelManagedBy: "trellis-test",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)}},
		Endpoints: []discoveryv1.Endpoint{
			endpoint("10.1.0.5", true, true, false, "node-a", "eu-1a"),
			endpoint("10.1.0.6", false, true, true, "node-a", "eu-1a"),
		},
	}
	_, err = cs.DiscoveryV1().EndpointSlices(ns).Create(ctx, es, metav1.CreateOptions{})
	must(t, err)
	runPod(t, ctx, cs, ns, "cart-1", map[string]string{"app": "cart", "pod-template-hash": "aaa"}, "10.1.0.5", true)
	runPod(t, ctx, cs, ns, "cart-2", map[string]string{"app": "cart", "pod-template-hash": "bbb"}, "10.1.0.6", false)

	// The source.
	sink, alloc := newRecordingSink("10.1.0.0/16"), sourcetest.NewAllocator(testClusterID)
	started := time.Now()
	src := runSource(t, Config{Client: cs, Sink: sink, Identities: alloc})
	sink.waitFor(t, 30*time.Second, "all kinds synced", func() error {
		if got := sink.syncedKinds(); len(got) < 4 {
			return fmt.Errorf("synced %v", got)
		}
		return nil
	})
	t.Logf("initial publication took %s", time.Since(started).Round(time.Millisecond))
	sink.mu.Lock()
	atSynced := sink.atSynced
	sink.mu.Unlock()
	if atSynced[v1.KindNodes] != 1 || atSynced[v1.KindEndpoints] != 2 || atSynced[v1.KindServices] != 1 {
		t.Errorf("objects delivered when Synced was called = %v; want 1 node, 2 endpoints, 1 service", atSynced)
	}

	gotNode, ok := sink.node("node-a")
	wantNode := v1.Node{
		Cluster: testCluster, Name: "node-a",
		IPs:      []netip.Addr{netip.MustParseAddr("192.168.1.5")},
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")},
		Region:   "eu", Zone: "eu-1a",
	}
	if !ok || fmt.Sprint(gotNode) != fmt.Sprint(wantNode) {
		t.Errorf("node = %+v (%v); want %+v", gotNode, ok, wantNode)
	}

	gotSvc, ok := sink.service(ns, "cart")
	if !ok {
		t.Fatalf("global service not published; sink history:\n%s", sink.history())
	}
	var frontends []netip.Addr
	for _, ip := range svc.Spec.ClusterIPs {
		frontends = append(frontends, netip.MustParseAddr(ip))
	}
	wantSvc := v1.Service{
		Cluster: testCluster, Namespace: ns, Name: "cart",
		Ports:       []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}},
		FrontendIPs: frontends,
		Backends: []v1.Backend{
			{IP: netip.MustParseAddr("10.1.0.5"), Ports: []v1.BackendPort{{Name: "http", Port: 8080}}, State: v1.BackendActive, Node: "node-a", Zone: "eu-1a"},
			{IP: netip.MustParseAddr("10.1.0.6"), Ports: []v1.BackendPort{{Name: "http", Port: 8080}}, State: v1.BackendTerminating, Node: "node-a", Zone: "eu-1a"},
		},
		Global: true, Shared: false, Affinity: v1.AffinityLocal, FailoverRegions: []string{"ap", "us"},
		HealthCheck: v1.HealthCheck{Type: v1.HealthCheckHTTP, Path: "/healthz"},
	}
	if len(frontends) == 0 || fmt.Sprint(gotSvc) != fmt.Sprint(wantSvc) {
		t.Errorf("service =\n%+v\nwant\n%+v", gotSvc, wantSvc)
	}
	if _, ok := sink.service(ns, "plain"); ok {
		t.Errorf("non-global service published")
	}

	ep1, _ := sink.endpoint("10.1.0.5")
	ep2, _ := sink.endpoint("10.1.0.6")
	if ep1.Identity == 0 || ep1.Identity != ep2.Identity || ep1.Identity.ClusterID() != testClusterID {
		t.Errorf("endpoint identities %s and %s; want one identity of cluster %d", ep1.Identity, ep2.Identity, testClusterID)
	}
	wantEP1 := v1.Endpoint{Cluster: testCluster, IP: netip.MustParseAddr("10.1.0.5"), Identity: ep1.Identity,
		NodeIP: netip.MustParseAddr("192.168.1.5"), Namespace: ns, Pod: "cart-1", Ready: true}
	if ep1 != wantEP1 || ep2.Ready || ep2.Pod != "cart-2" {
		t.Errorf("endpoints = %+v, %+v; want %+v and cart-2 not ready", ep1, ep2, wantEP1)
	}
	if r := alloc.RefsOf(cartIdentity); r != 2 {
		t.Errorf("references on %v = %d; want 2", cartIdentity, r)
	}

	// Changes.
	changes := time.Now()

	// A node's agent marks cart-1 unhealthy the way it does (a strategic
	// merge on pods/status): its backend turns unready and its endpoint
	// not ready although the slice still says ready; True brings both
	// back.
	markHealthy := func(status corev1.ConditionStatus) {
		t.Helper()
		patch := fmt.Sprintf(`{"status":{"conditions":[{"type":%q,"status":%q,"reason":"Test"}]}}`, source.ConditionHealthy, status)
		_, err := cs.CoreV1().Pods(ns).Patch(ctx, "cart-1", types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}, "status")
		must(t, err)
	}
	healthState := func(want v1.BackendState, ready bool) func() error {
		return func() error {
			s, _ := sink.service(ns, "cart")
			ep, _ := sink.endpoint("10.1.0.5")
			if len(s.Backends) != 2 || s.Backends[0].State != want || ep.Ready != ready {
				return fmt.Errorf("backends %+v, endpoint %+v", s.Backends, ep)
			}
			return nil
		}
	}
	markHealthy(corev1.ConditionFalse)
	sink.waitFor(t, 10*time.Second, "10.1.0.5 marked unhealthy: unready", healthState(v1.BackendUnready, false))
	markHealthy(corev1.ConditionTrue)
	sink.waitFor(t, 10*time.Second, "10.1.0.5 marked healthy: active", healthState(v1.BackendActive, true))
	cur, err := cs.DiscoveryV1().EndpointSlices(ns).Get(ctx, "cart-1", metav1.GetOptions{})
	must(t, err)
	cur.Endpoints[0].Conditions.Ready = ptr(false)
	cur.Endpoints[0].Conditions.Serving = ptr(false)
	_, err = cs.DiscoveryV1().EndpointSlices(ns).Update(ctx, cur, metav1.UpdateOptions{})
	must(t, err)
	sink.waitFor(t, 10*time.Second, "10.1.0.5 unready", func() error {
		s, _ := sink.service(ns, "cart")
		if len(s.Backends) == 2 && s.Backends[0].State == v1.BackendUnready {
			return nil
		}
		return fmt.Errorf("backends %+v", s.Backends)
	})

	pod, err := cs.CoreV1().Pods(ns).Get(ctx, "cart-1", metav1.GetOptions{})
	must(t, err)
	pod.Labels = map[string]string{"app": "checkout"}
	_, err = cs.CoreV1().Pods(ns).Update(ctx, pod, metav1.UpdateOptions{})
	must(t, err)
	sink.waitFor(t, 10*time.Second, "cart-1 relabelled", func() error {
		ep, _ := sink.endpoint("10.1.0.5")
		if ep.Identity == ep2.Identity {
			return fmt.Errorf("identity still %s", ep.Identity)
		}
		if a, b := alloc.RefsOf(cartIdentity), alloc.RefsOf(checkoutIdent); a != 1 || b != 1 {
			return fmt.Errorf("references cart=%d checkout=%d", a, b)
		}
		return nil
	})

	must(t, cs.CoreV1().Pods(ns).Delete(ctx, "cart-2", metav1.DeleteOptions{GracePeriodSeconds: ptr(int64(0))}))
	sink.waitFor(t, 10*time.Second, "cart-2 gone", func() error {
		if _, ok := sink.endpoint("10.1.0.6"); ok {
			return errors.New("endpoint 10.1.0.6 still published")
		}
		if r := alloc.RefsOf(cartIdentity); r != 0 {
			return fmt.Errorf("cart identity has %d references", r)
		}
		return nil
	})

	cursvc, err := cs.CoreV1().Services(ns).Get(ctx, "cart", metav1.GetOptions{})
	must(t, err)
	cursvc.Annotations[source.AnnotationGlobal] = "false"
	_, err = cs.CoreV1().Services(ns).Update(ctx, cursvc, metav1.UpdateOptions{})
	must(t, err)
	sink.waitFor(t, 10*time.Second, "service unpublished", func() error {
		if _, ok := sink.service(ns, "cart"); ok {
			return errors.New("still published")
		}
		return nil
	})

	must(t, cs.CoreV1().Nodes().Delete(ctx, "node-a", metav1.DeleteOptions{}))
	sink.waitFor(t, 10*time.Second, "node gone", func() error {
		if _, ok := sink.node("node-a"); ok {
			return errors.New("still published")
		}
		return nil
	})
	t.Logf("changes observed in %s", time.Since(changes).Round(time.Millisecond))

	st := src.Stats()
	for p, n := range st.Problems {
		if n > 0 {
			t.Errorf("problem %s counted %d times; want none", p, n)
		}
	}
	if st.Retries != 0 {
		t.Errorf("%d retries; want none", st.Retries)
	}
	t.Logf("total %s", time.Since(begin).Round(time.Millisecond))
}

// runPod creates a pod bound to node-a, then reports it Running through the
// status subresource, as a kubelet would.
func runPod(t *testing.T, ctx context.Context, cs kubernetes.Interface, ns, name string, labels map[string]string, ip string, ready bool) {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:   "node-a",
			Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app:1", Ports: []corev1.ContainerPort{{Name: "web", ContainerPort: 8080}}}},
		},
	}
	pod, err := cs.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	must(t, err)
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	now := metav1.Now()
	pod.Status = corev1.PodStatus{
		Phase:  corev1.PodRunning,
		HostIP: "192.168.1.5", HostIPs: []corev1.HostIP{{IP: "192.168.1.5"}},
		PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
		StartTime:  &now,
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: status, LastTransitionTime: now}},
	}
	_, err = cs.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
	must(t, err)
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
