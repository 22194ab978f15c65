package k8s

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/source"
	"github.com/trellis-mesh/trellis/apiserver/source/sourcetest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

const (
	testCluster   = "east"
	testClusterID = v1.ClusterID(7)
	waitTimeout   = 10 * time.Second
)

// newFakeClient returns a fake clientset holding objs, and a function that
// waits until the source's four informers watch it (the fake tracker does
// not replay events that happen between a list and its watch).
func newFakeClient(t *testing.T, objs ...runtime.Object) (*fake.Clientset, func()) {
	cs := fake.NewClientset(objs...)
	var mu sync.Mutex
	watching := map[string]bool{}
	cs.PrependWatchReactor("*", func(a k8stesting.Action) (bool, watch.Interface, error) {
		mu.Lock()
		watching[a.GetResource().Resource] = true
		mu.Unlock()
		return false, nil, nil
	})
	return cs, func() {
		t.Helper()
		testutil.EventuallyNoError(t, waitTimeout, "the informers to watch 4 resources", func() error {
			mu.Lock()
			defer mu.Unlock()
			if len(watching) < 4 {
				return fmt.Errorf("they watch %v", slices.Sorted(maps.Keys(watching)))
			}
			return nil
		})
	}
}

// runSource starts a Source and stops it (checking that Run returns) when
// the test ends.
func runSource(t *testing.T, cfg Config) *Source {
	t.Helper()
	if cfg.Cluster == "" {
		cfg.Cluster = testCluster
	}
	if cfg.ClusterID == 0 {
		cfg.ClusterID = testClusterID
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(waitTimeout):
			t.Errorf("Run did not return after cancel")
		}
	})
	return s
}

func k8sNode(name, ip, cidr string) *corev1.Node {
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{LabelTopologyRegion: "eu", LabelTopologyZone: "eu-1a"}},
		Spec:       corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}},
	}
	if ip != "" {
		n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}
	}
	return n
}

func k8sService(ns, name string, ann map[string]string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: ann},
		Spec: corev1.ServiceSpec{
			ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10"},
			Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromString("web")}},
		},
	}
}

func k8sSlice(ns, name, svc string, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)}},
		Endpoints:   eps,
	}
}

func k8sPod(ns, name string, labels map[string]string, ip, hostIP string, ready bool) *corev1.Pod {
	cond := corev1.ConditionFalse
	if ready {
		cond = corev1.ConditionTrue
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
		Spec:       corev1.PodSpec{NodeName: "node-a"},
		Status: corev1.PodStatus{
			Phase:  corev1.PodRunning,
			HostIP: hostIP, HostIPs: []corev1.HostIP{{IP: hostIP}},
			PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: cond}},
		},
	}
}

var (
	cartLabels    = map[string]string{"app": "cart", "pod-template-hash": "aaa"}
	cartLabels2   = map[string]string{"app": "cart", "pod-template-hash": "bbb"}
	cartIdentity  = map[string]string{"k8s:app": "cart", IdentityLabelNamespace: "shop"}
	checkoutIdent = map[string]string{"k8s:app": "checkout", IdentityLabelNamespace: "shop"}
)

func TestNewValidates(t *testing.T) {
	cs := fake.NewClientset()
	sink, alloc := newRecordingSink(), sourcetest.NewAllocator(testClusterID)
	good := Config{Client: cs, Cluster: testCluster, ClusterID: testClusterID, Sink: sink, Identities: alloc}
	if _, err := New(good); err != nil {
		t.Fatalf("New(good): %v", err)
	}
	for name, mod := range map[string]func(*Config){
		"no client":     func(c *Config) { c.Client = nil },
		"no sink":       func(c *Config) { c.Sink = nil },
		"no allocator":  func(c *Config) { c.Identities = nil },
		"bad cluster":   func(c *Config) { c.Cluster = "East_1" },
		"no cluster ID": func(c *Config) { c.ClusterID = 0 },
		"big ID":        func(c *Config) { c.ClusterID = 512 },
		"workers":       func(c *Config) { c.Workers = -1 },
	} {
		cfg := good
		mod(&cfg)
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: New accepted %+v", name, cfg)
		}
	}
}

func TestSourceInitialStateThenSynced(t *testing.T) {
	cs, _ := newFakeClient(t,
		k8sNode("node-a", "192.168.1.5", "10.1.0.0/24"),
		k8sNode("node-b", "", "10.1.1.0/24"), // no InternalIP: skipped
		k8sService("shop", "cart", map[string]string{source.AnnotationGlobal: "true", source.CiliumAnnotationAffinity: "local"}),
		k8sService("shop", "plain", nil),
		k8sService("shop", "odd", map[string]string{source.AnnotationGlobal: "maybe"}),
		k8sSlice("shop", "cart-1", "cart",
			endpoint("10.1.0.5", true, true, false, "node-a", "eu-1a"),
			endpoint("10.1.0.6", false, true, true, "node-a", "eu-1a"),
			endpoint("10.1.0.7", false, false, false, "node-a", "eu-1a"),
		),
		k8sSlice("shop", "plain-1", "plain", endpoint("10.1.0.8", true, true, false, "node-a", "eu-1a")),
		k8sPod("shop", "cart-1", cartLabels, "10.1.0.5", "192.168.1.5", true),
		k8sPod("shop", "cart-2", cartLabels2, "10.1.0.6", "192.168.1.5", false),
		func() *corev1.Pod {
			p := k8sPod("shop", "pending", cartLabels, "10.1.0.9", "192.168.1.5", false)
			p.Status.Phase = corev1.PodPending
			return p
		}(),
		func() *corev1.Pod {
			p := k8sPod("kube-system", "proxy", map[string]string{"app": "proxy"}, "192.168.1.5", "192.168.1.5", true)
			p.Spec.HostNetwork = true
			return p
		}(),
	)
	sink, alloc := newRecordingSink("10.1.0.0/16"), sourcetest.NewAllocator(testClusterID)
	s := runSource(t, Config{Client: cs, Sink: sink, Identities: alloc, Region: "default-region"})

	sink.waitFor(t, waitTimeout, "all kinds synced", func() error {
		if got := sink.syncedKinds(); len(got) < 4 {
			return fmt.Errorf("synced %v", got)
		}
		return nil
	})
	got := sink.syncedKinds()
	if len(got) != 4 {
		t.Errorf("Synced calls = %v; want each kind once", got)
	}
	if i, j := slices.Index(got, v1.KindIdentities), slices.Index(got, v1.KindEndpoints); i < 0 || j < 0 || i > j {
		t.Errorf("Synced order = %v; want identities before endpoints", got)
	}
	sink.mu.Lock()
	atSynced := sink.atSynced
	sink.mu.Unlock()
	if atSynced[v1.KindNodes] != 1 || atSynced[v1.KindEndpoints] != 2 || atSynced[v1.KindServices] != 1 {
		t.Errorf("objects delivered when Synced was called = %v; want 1 node, 2 endpoints, 1 service", atSynced)
	}

	n, ok := sink.node("node-a")
	if !ok || n.Region != "eu" || n.Zone != "eu-1a" || n.IPs[0].String() != "192.168.1.5" || n.PodCIDRs[0].String() != "10.1.0.0/24" {
		t.Errorf("node-a = %+v, %v", n, ok)
	}
	if _, ok := sink.node("node-b"); ok {
		t.Errorf("node-b without InternalIP was published")
	}

	svc, ok := sink.service("shop", "cart")
	if !ok {
		t.Fatalf("global service not published")
	}
	if !svc.Global || !svc.Shared || svc.Affinity != v1.AffinityLocal || svc.Ports[0].TargetPort != 8080 {
		t.Errorf("service = %+v", svc)
	}
	states := map[string]v1.BackendState{}
	for _, b := range svc.Backends {
		states[b.IP.String()] = b.State
	}
	wantStates := map[string]v1.BackendState{"10.1.0.5": v1.BackendActive, "10.1.0.6": v1.BackendTerminating, "10.1.0.7": v1.BackendUnready}
	if fmt.Sprint(states) != fmt.Sprint(wantStates) {
		t.Errorf("backend states = %v; want %v", states, wantStates)
	}
	for _, name := range []string{"plain", "odd"} {
		if _, ok := sink.service("shop", name); ok {
			t.Errorf("service %s published; it is not global", name)
		}
	}

	ep1, ok1 := sink.endpoint("10.1.0.5")
	ep2, ok2 := sink.endpoint("10.1.0.6")
	if !ok1 || !ok2 {
		t.Fatalf("endpoints missing: %v %v", ok1, ok2)
	}
	if ep1.Identity != ep2.Identity || ep1.Identity.ClusterID() != testClusterID {
		t.Errorf("identities %s and %s; want one identity of cluster %d for both pods (pod-template-hash differs)", ep1.Identity, ep2.Identity, testClusterID)
	}
	if ep1.Pod != "cart-1" || ep1.Namespace != "shop" || !ep1.Ready || ep1.NodeIP.String() != "192.168.1.5" || ep2.Ready {
		t.Errorf("endpoints = %+v, %+v", ep1, ep2)
	}
	for _, ip := range []string{"10.1.0.9", "192.168.1.5"} {
		if _, ok := sink.endpoint(ip); ok {
			t.Errorf("endpoint %s published (pending or host-network pod)", ip)
		}
	}
	if r := alloc.RefsOf(cartIdentity); r != 2 {
		t.Errorf("references on the cart identity = %d; want 2", r)
	}

	st := s.Stats()
	if st.Problems[ProblemMalformedAnnotation] != 1 || st.Problems[ProblemNodeWithoutInternalIP] != 1 {
		t.Errorf("stats = %+v; want one malformed annotation and one node without InternalIP", st)
	}
}

func TestSourceFollowsChanges(t *testing.T) {
	ctx := context.Background()
	cs, waitWatches := newFakeClient(t,
		k8sNode("node-a", "192.168.1.5", "10.1.0.0/24"),
		k8sNode("node-b", "", "10.1.1.0/24"),
		k8sService("shop", "cart", map[string]string{source.CiliumAnnotationGlobal: "true"}),
		k8sSlice("shop", "cart-1", "cart",
			endpoint("10.1.0.5", true, true, false, "node-a", "eu-1a"),
			endpoint("10.1.0.6", true, true, false, "node-a", "eu-1a")),
		k8sPod("shop", "cart-1", cartLabels, "10.1.0.5", "192.168.1.5", true),
		k8sPod("shop", "cart-2", cartLabels2, "10.1.0.6", "192.168.1.5", true),
	)
	sink, alloc := newRecordingSink("10.1.0.0/16"), sourcetest.NewAllocator(testClusterID)
	runSource(t, Config{Client: cs, Sink: sink, Identities: alloc})
	waitWatches()
	sink.waitFor(t, waitTimeout, "synced", func() error {
		if len(sink.syncedKinds()) < 4 {
			return fmt.Errorf("synced %v", sink.syncedKinds())
		}
		return nil
	})

	// An endpoint becomes unready.
	es := k8sSlice("shop", "cart-1", "cart",
		endpoint("10.1.0.5", true, true, false, "node-a", "eu-1a"),
		endpoint("10.1.0.6", false, false, false, "node-a", "eu-1a"))
	if _, err := cs.DiscoveryV1().EndpointSlices("shop").Update(ctx, es, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, waitTimeout, "backend 10.1.0.6 unready", func() error {
		svc, _ := sink.service("shop", "cart")
		for _, b := range svc.Backends {
			if b.IP.String() == "10.1.0.6" && b.State == v1.BackendUnready {
				return nil
			}
		}
		return fmt.Errorf("service %+v", svc)
	})

	// A pod's labels change: new identity first, then the old reference
	// is dropped.
	p := k8sPod("shop", "cart-1", map[string]string{"app": "checkout"}, "10.1.0.5", "192.168.1.5", true)
	if _, err := cs.CoreV1().Pods("shop").Update(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, waitTimeout, "cart-1 relabelled", func() error {
		ep, _ := sink.endpoint("10.1.0.5")
		other, _ := sink.endpoint("10.1.0.6")
		if ep.Identity == other.Identity {
			return fmt.Errorf("identity still %s", ep.Identity)
		}
		return nil
	})
	if a, b := alloc.RefsOf(cartIdentity), alloc.RefsOf(checkoutIdent); a != 1 || b != 1 {
		t.Errorf("references cart=%d checkout=%d; want 1 and 1", a, b)
	}

	// A pod is deleted: endpoint gone, reference released.
	if err := cs.CoreV1().Pods("shop").Delete(ctx, "cart-2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, waitTimeout, "cart-2 endpoint deleted", func() error {
		if _, ok := sink.endpoint("10.1.0.6"); ok {
			return fmt.Errorf("still there")
		}
		if r := alloc.RefsOf(cartIdentity); r != 0 {
			return fmt.Errorf("cart identity has %d references", r)
		}
		return nil
	})

	// A pod stops running.
	p.Status.Phase = corev1.PodSucceeded
	if _, err := cs.CoreV1().Pods("shop").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, waitTimeout, "cart-1 endpoint deleted", func() error {
		if _, ok := sink.endpoint("10.1.0.5"); ok {
			return fmt.Errorf("still there")
		}
		if r := alloc.TotalRefs(); r != 0 {
			return fmt.Errorf("%d identity references left", r)
		}
		return nil
	})

	// The Trellis annotation overrides Cilium's: global -> false.
	svc := k8sService("shop", "cart", map[string]string{source.CiliumAnnotationGlobal: "true", source.AnnotationGlobal: "false"})
	if _, err := cs.CoreV1().Services("shop").Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, waitTimeout, "service unpublished", func() error {
		if _, ok := sink.service("shop", "cart"); ok {
			return fmt.Errorf("still there")
		}
		return nil
	})

	// node-b gains an address; node-a goes away.
	if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, k8sNode("node-b", "192.168.1.6", "10.1.1.0/24"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := cs.CoreV1().Nodes().Delete(ctx, "node-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, waitTimeout, "node changes", func() error {
		_, a := sink.node("node-a")
		_, b := sink.node("node-b")
		if a || !b {
			return fmt.Errorf("node-a present %v, node-b present %v", a, b)
		}
		return nil
	})
}

func TestSourceSinkRefusalLoggedOnceNotRetried(t *testing.T) {
	ctx := context.Background()
	// 172.16.0.5 is outside the cluster's pod CIDRs: the sink refuses it.
	pod := k8sPod("shop", "stray", cartLabels, "172.16.0.5", "192.168.1.5", true)
	cs, waitWatches := newFakeClient(t, pod, k8sPod("shop", "fine", cartLabels, "10.1.0.5", "192.168.1.5", true))
	sink, alloc := newRecordingSink("10.1.0.0/16"), sourcetest.NewAllocator(testClusterID)
	// One worker processes keys one after the other, which the sentinel
	// below relies on.
	s := runSource(t, Config{Client: cs, Sink: sink, Identities: alloc, Workers: 1})
	waitWatches()
	sink.waitFor(t, waitTimeout, "endpoints synced", func() error {
		if !slices.Contains(sink.syncedKinds(), v1.KindEndpoints) {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	if _, ok := sink.endpoint("10.1.0.5"); !ok {
		t.Errorf("the valid endpoint is missing")
	}
	// The pod changes (not ready) but the reason stays the same: the sink
	// refuses the changed endpoint too.
	pod = k8sPod("shop", "stray", cartLabels, "172.16.0.5", "192.168.1.5", false)
	if _, err := cs.CoreV1().Pods("shop").UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, waitTimeout, "the changed stray endpoint refused", func() error {
		if n, ep := sink.refusals("172.16.0.5"); n == 0 || ep.Ready {
			return fmt.Errorf("refused %d times, the latest ready=%v", n, ep.Ready)
		}
		return nil
	})
	// The source reports (or retries) the refusal after the sink call
	// returns. A sentinel change queued now is processed by the one
	// worker only after it is done with the stray pod, so once the
	// sentinel is published, the stats hold whatever that refusal did.
	if _, err := cs.CoreV1().Pods("shop").UpdateStatus(ctx, k8sPod("shop", "fine", cartLabels, "10.1.0.5", "192.168.1.5", false), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, waitTimeout, "sentinel", func() error {
		if ep, _ := sink.endpoint("10.1.0.5"); ep.Ready {
			return fmt.Errorf("still ready")
		}
		return nil
	})
	st := s.Stats()
	if st.Problems[ProblemSinkRefused] != 1 || st.Retries != 0 {
		t.Errorf("stats = %+v; want the refusal counted once and no retries", st)
	}
}

func TestSourceRetriesIdentityAllocation(t *testing.T) {
	cs, _ := newFakeClient(t, k8sPod("shop", "cart-1", cartLabels, "10.1.0.5", "192.168.1.5", true))
	sink, alloc := newRecordingSink(), sourcetest.NewAllocator(testClusterID)
	alloc.FailAcquires(3)
	s := runSource(t, Config{Client: cs, Sink: sink, Identities: alloc})
	sink.waitFor(t, waitTimeout, "endpoints synced", func() error {
		if !slices.Contains(sink.syncedKinds(), v1.KindEndpoints) {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	sink.mu.Lock()
	n := sink.atSynced[v1.KindEndpoints]
	sink.mu.Unlock()
	if n != 1 {
		t.Errorf("endpoints when Synced was called = %d; want 1 (Synced waits for the retried pod)", n)
	}
	if st := s.Stats(); st.Retries != 3 {
		t.Errorf("retries = %d; want 3", st.Retries)
	}
}

func TestSourceIPReusedByNewPod(t *testing.T) {
	ctx := context.Background()
	cs, waitWatches := newFakeClient(t, k8sPod("shop", "old", cartLabels, "10.1.0.5", "192.168.1.5", true))
	sink, alloc := newRecordingSink(), sourcetest.NewAllocator(testClusterID)
	runSource(t, Config{Client: cs, Sink: sink, Identities: alloc})
	waitWatches()
	sink.waitFor(t, waitTimeout, "old published", func() error {
		if ep, _ := sink.endpoint("10.1.0.5"); ep.Pod != "old" {
			return fmt.Errorf("endpoint %+v", ep)
		}
		return nil
	})
	// The IP is handed to a new pod before the old one is gone.
	if _, err := cs.CoreV1().Pods("shop").Create(ctx, k8sPod("shop", "new", map[string]string{"app": "checkout"}, "10.1.0.5", "192.168.1.6", true), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, waitTimeout, "new owns the IP", func() error {
		if ep, _ := sink.endpoint("10.1.0.5"); ep.Pod != "new" {
			return fmt.Errorf("endpoint %+v", ep)
		}
		return nil
	})
	if err := cs.CoreV1().Pods("shop").Delete(ctx, "old", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, waitTimeout, "old released", func() error {
		if r := alloc.RefsOf(cartIdentity); r != 0 {
			return fmt.Errorf("%d references", r)
		}
		return nil
	})
	if ep, ok := sink.endpoint("10.1.0.5"); !ok || ep.Pod != "new" || ep.NodeIP.String() != "192.168.1.6" {
		t.Errorf("endpoint after the old pod left = %+v, %v; want the new pod's", ep, ok)
	}

	// And the other way round: the new pod is deleted first, the old one
	// (had it still been there) takes the IP back. Recreate old.
	if _, err := cs.CoreV1().Pods("shop").Create(ctx, k8sPod("shop", "old", cartLabels, "10.1.0.5", "192.168.1.5", true), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, waitTimeout, "old owns the IP", func() error {
		if ep, _ := sink.endpoint("10.1.0.5"); ep.Pod != "old" {
			return fmt.Errorf("endpoint %+v", ep)
		}
		return nil
	})
	if err := cs.CoreV1().Pods("shop").Delete(ctx, "old", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, waitTimeout, "handed back to new", func() error {
		if ep, _ := sink.endpoint("10.1.0.5"); ep.Pod != "new" {
			return fmt.Errorf("endpoint %+v", ep)
		}
		return nil
	})
}

// TestSourceDoesNothingWhenConverged: with resyncs (once a second, as
// often as client-go allows) every object is processed again and again;
// none of it reaches the sink, and problems are not counted twice.
func TestSourceDoesNothingWhenConverged(t *testing.T) {
	cs, _ := newFakeClient(t,
		k8sNode("node-a", "192.168.1.5", "10.1.0.0/24"),
		k8sNode("node-b", "", "10.1.1.0/24"),
		k8sService("shop", "cart", map[string]string{source.AnnotationGlobal: "true"}),
		k8sService("shop", "odd", map[string]string{source.AnnotationGlobal: "maybe"}),
		k8sSlice("shop", "cart-1", "cart", endpoint("10.1.0.5", true, true, false, "node-a", "eu-1a")),
		k8sPod("shop", "cart-1", cartLabels, "10.1.0.5", "192.168.1.5", true),
		k8sPod("shop", "stray", cartLabels, "172.16.0.5", "192.168.1.5", true),
	)
	sink, alloc := newRecordingSink("10.1.0.0/16"), sourcetest.NewAllocator(testClusterID)
	// client-go resyncs at most once a second: a shorter period is raised
	// to that ("resync period is too small").
	s := runSource(t, Config{Client: cs, Sink: sink, Identities: alloc, ResyncPeriod: time.Second})
	sink.waitFor(t, waitTimeout, "synced", func() error {
		if len(sink.syncedKinds()) < 4 {
			return fmt.Errorf("synced %v", sink.syncedKinds())
		}
		return nil
	})
	// The sink refuses the stray pod's endpoint each time the source
	// processes the pod, so its refusals count the pod's resyncs.
	awaitResyncs := func(what string, n int) {
		t.Helper()
		before, _ := sink.refusals("172.16.0.5")
		sink.waitFor(t, waitTimeout, what, func() error {
			if got, _ := sink.refusals("172.16.0.5"); got < before+n {
				return fmt.Errorf("%d of %d resyncs of the stray pod", got-before, n)
			}
			return nil
		})
	}
	// Keys the initial publication queued twice are still ahead of a
	// resync in the queue; two resyncs on, they have been processed.
	awaitResyncs("stragglers of the initial publication", 2)
	writes, stats := sink.writeCount(), s.Stats()
	acq, _ := alloc.Counts()
	awaitResyncs("3 resyncs with nothing changed", 3)
	if w := sink.writeCount(); w != writes {
		t.Errorf("sink writes went from %d to %d with nothing changed:\n%s", writes, w, sink.history())
	}
	if a, _ := alloc.Counts(); a != acq {
		t.Errorf("Acquire calls went from %d to %d with nothing changed", acq, a)
	}
	if st := s.Stats(); fmt.Sprint(st) != fmt.Sprint(stats) {
		t.Errorf("stats went from %+v to %+v with nothing changed", stats, st)
	}
	if stats.Problems[ProblemMalformedAnnotation] != 1 || stats.Problems[ProblemSinkRefused] != 1 || stats.Problems[ProblemNodeWithoutInternalIP] != 1 {
		t.Errorf("stats = %+v", stats)
	}
}

func TestRunTwice(t *testing.T) {
	cs, _ := newFakeClient(t)
	sink := newRecordingSink()
	s := runSource(t, Config{Client: cs, Sink: sink, Identities: sourcetest.NewAllocator(testClusterID)})
	sink.waitFor(t, waitTimeout, "empty cluster synced", func() error {
		if got := sink.syncedKinds(); len(got) != 4 {
			return fmt.Errorf("synced %v", got)
		}
		return nil
	})
	err := s.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("second Run = %v; want an error", err)
	}
}

var _ kubernetes.Interface = (*fake.Clientset)(nil)

// The failover regions annotation reaches the published service; a
// malformed one is reported once as a malformed annotation and the
// service stays published without the list (the rest of its settings
// kept), until the annotation is fixed.
func TestSourceFailoverRegions(t *testing.T) {
	ctx := context.Background()
	ann := func(regions string) map[string]string {
		return map[string]string{source.AnnotationGlobal: "true", source.AnnotationAffinity: "local", source.AnnotationFailoverRegions: regions}
	}
	cs, waitWatches := newFakeClient(t, k8sService("shop", "cart", ann(" ap , us")))
	sink, alloc := newRecordingSink("10.1.0.0/16"), sourcetest.NewAllocator(testClusterID)
	s := runSource(t, Config{Client: cs, Sink: sink, Identities: alloc})
	waitWatches()
	await := func(what string, want []string) {
		t.Helper()
		sink.waitFor(t, waitTimeout, what, func() error {
			svc, ok := sink.service("shop", "cart")
			if !ok || !slices.Equal(svc.FailoverRegions, want) || svc.Affinity != v1.AffinityLocal {
				return fmt.Errorf("service %+v (published %v)", svc, ok)
			}
			return nil
		})
	}
	await("failover regions ap, us", []string{"ap", "us"})

	if _, err := cs.CoreV1().Services("shop").Update(ctx, k8sService("shop", "cart", ann("ap,us,ap")), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	await("a malformed list dropped", nil)
	if n := s.Stats().Problems[ProblemMalformedAnnotation]; n != 1 {
		t.Errorf("%d malformed annotations reported; want 1", n)
	}

	if _, err := cs.CoreV1().Services("shop").Update(ctx, k8sService("shop", "cart", ann("us")), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	await("failover regions us", []string{"us"})
	if n := s.Stats().Problems[ProblemMalformedAnnotation]; n != 1 {
		t.Errorf("%d malformed annotations reported after the fix; want still 1", n)
	}
}

// The health-check annotation travels to the published service, and a
// pod its node's agent marks trellis.io/healthy=False is published not
// ready, its backends unready, although its EndpointSlice says ready;
// True again brings both back.
func TestSourceHealthCheckAndUnhealthyPods(t *testing.T) {
	ctx := context.Background()
	ann := map[string]string{source.AnnotationGlobal: "true", source.AnnotationHealthCheck: "http:/healthz"}
	cs, waitWatches := newFakeClient(t,
		k8sNode("node-a", "192.168.1.5", "10.1.0.0/24"),
		k8sService("shop", "cart", ann),
		k8sSlice("shop", "cart-1", "cart", endpoint("10.1.0.5", true, true, false, "node-a", "eu-1a"), endpoint("10.1.0.6", true, true, false, "node-a", "eu-1a")),
		k8sPod("shop", "cart-1", cartLabels, "10.1.0.5", "192.168.1.5", true),
		k8sPod("shop", "cart-2", cartLabels, "10.1.0.6", "192.168.1.5", true),
	)
	sink, alloc := newRecordingSink("10.1.0.0/16"), sourcetest.NewAllocator(testClusterID)
	runSource(t, Config{Client: cs, Sink: sink, Identities: alloc})
	waitWatches()
	states := func(want5 v1.BackendState, ready5 bool) func() error {
		return func() error {
			svc, ok := sink.service("shop", "cart")
			if !ok || svc.HealthCheck != (v1.HealthCheck{Type: v1.HealthCheckHTTP, Path: "/healthz"}) {
				return fmt.Errorf("service %+v (published %v)", svc, ok)
			}
			if len(svc.Backends) != 2 || svc.Backends[0].State != want5 || svc.Backends[1].State != v1.BackendActive {
				return fmt.Errorf("backends %+v", svc.Backends)
			}
			if ep, _ := sink.endpoint("10.1.0.5"); ep.Ready != ready5 {
				return fmt.Errorf("endpoint %+v", ep)
			}
			return nil
		}
	}
	sink.waitFor(t, waitTimeout, "both active, http check", states(v1.BackendActive, true))

	mark := func(status corev1.ConditionStatus) {
		t.Helper()
		pod, err := cs.CoreV1().Pods("shop").Get(ctx, "cart-1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pod.Status.Conditions = append(slices.DeleteFunc(pod.Status.Conditions, func(c corev1.PodCondition) bool { return c.Type == source.ConditionHealthy }),
			corev1.PodCondition{Type: source.ConditionHealthy, Status: status})
		if _, err := cs.CoreV1().Pods("shop").UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mark(corev1.ConditionFalse)
	sink.waitFor(t, waitTimeout, "cart-1 unready", states(v1.BackendUnready, false))
	mark(corev1.ConditionTrue)
	sink.waitFor(t, waitTimeout, "cart-1 active again", states(v1.BackendActive, true))
}
