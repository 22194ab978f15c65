package agent

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/trellis-mesh/trellis/apiserver/source"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// The Node gives the first InternalIP and spec.podCIDRs (spec.podCIDR on
// old clusters); what is missing or malformed is named.
func TestNodeAddressing(t *testing.T) {
	node := &corev1.Node{
		Spec: corev1.NodeSpec{PodCIDR: "10.1.0.0/24", PodCIDRs: []string{"10.1.0.0/24", "fd00:1::/64"}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeExternalIP, Address: "203.0.113.5"},
			{Type: corev1.NodeInternalIP, Address: "192.168.1.5"},
			{Type: corev1.NodeInternalIP, Address: "fd00::5"},
		}},
	}
	ip, cidrs, err := nodeAddressing(node)
	if err != nil || ip != netip.MustParseAddr("192.168.1.5") ||
		!slices.Equal(cidrs, []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24"), netip.MustParsePrefix("fd00:1::/64")}) {
		t.Errorf("got %s %v %v", ip, cidrs, err)
	}
	old := &corev1.Node{Spec: corev1.NodeSpec{PodCIDR: "10.2.0.0/24"}}
	ip, cidrs, err = nodeAddressing(old)
	if ip.IsValid() || !slices.Equal(cidrs, []netip.Prefix{netip.MustParsePrefix("10.2.0.0/24")}) || err == nil || !strings.Contains(err.Error(), "no InternalIP") {
		t.Errorf("old node without addresses: %s %v %v", ip, cidrs, err)
	}
	bad := &corev1.Node{Spec: corev1.NodeSpec{PodCIDRs: []string{"10.3.0.0/33"}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "not-an-ip"}}}}
	if _, _, err := nodeAddressing(bad); err == nil || !strings.Contains(err.Error(), `InternalIP "not-an-ip"`) || !strings.Contains(err.Error(), `pod CIDR "10.3.0.0/33"`) {
		t.Errorf("malformed node: %v", err)
	}
}

// A pod is probed while it runs off the host network with a pod IP and
// its containers ready, whatever its Ready condition (which a readiness
// gate on the agent's own condition may hold false).
func TestProbedIPs(t *testing.T) {
	pod := func(mod func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "cart-1"},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.1.0.5",
				PodIPs: []corev1.PodIP{{IP: "10.1.0.5"}, {IP: "fd00:1::5"}},
				Conditions: []corev1.PodCondition{
					{Type: corev1.ContainersReady, Status: corev1.ConditionTrue},
					{Type: corev1.PodReady, Status: corev1.ConditionFalse},
				}},
		}
		if mod != nil {
			mod(p)
		}
		return p
	}
	if got := probedIPs(pod(nil)); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("10.1.0.5"), netip.MustParseAddr("fd00:1::5")}) {
		t.Errorf("running pod, containers ready, gate holding Ready: %v", got)
	}
	if got := probedIPs(pod(func(p *corev1.Pod) {
		p.Status.PodIPs = nil
		p.Status.Conditions = p.Status.Conditions[1:]
		p.Status.Conditions[0].Status = corev1.ConditionTrue
	})); len(got) != 1 {
		t.Errorf("legacy pod IP, Ready without ContainersReady: %v", got)
	}
	now := metav1.Now()
	for name, mod := range map[string]func(*corev1.Pod){
		"host network":         func(p *corev1.Pod) { p.Spec.HostNetwork = true },
		"pending":              func(p *corev1.Pod) { p.Status.Phase = corev1.PodPending },
		"deleting":             func(p *corev1.Pod) { p.DeletionTimestamp = &now },
		"containers not ready": func(p *corev1.Pod) { p.Status.Conditions[0].Status = corev1.ConditionFalse },
		"no conditions":        func(p *corev1.Pod) { p.Status.Conditions = nil },
		"no IP":                func(p *corev1.Pod) { p.Status.PodIP, p.Status.PodIPs = "", nil },
	} {
		if got := probedIPs(pod(mod)); len(got) != 0 {
			t.Errorf("%s: probed at %v", name, got)
		}
	}
}

// RBAC is exactly what the agent calls.
func TestKubernetesRBAC(t *testing.T) {
	var got []string
	for _, r := range KubernetesRBAC {
		got = append(got, r.Resource+":"+strings.Join(r.Verbs, ","))
	}
	if want := []string{"nodes:get,patch", "pods:list,watch", "pods/status:patch"}; !slices.Equal(got, want) {
		t.Errorf("RBAC %v; want %v", got, want)
	}
}

// FromKubernetes fills the node IP and pod CIDRs from the Node unless the
// flags gave them, and names what it could not find.
func TestFromKubernetes(t *testing.T) {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "node-a"},
		Spec:       corev1.NodeSpec{PodCIDRs: []string{"10.1.0.0/24"}},
		Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.1.5"}}},
	}
	bare := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-b"}}
	cs := fake.NewClientset(node, bare)
	ctx := context.Background()

	c := Config{NodeName: "node-a", Kubernetes: cs}
	if err := c.FromKubernetes(ctx); err != nil || c.NodeIP != netip.MustParseAddr("192.168.1.5") ||
		!slices.Equal(c.PodCIDRs, []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")}) {
		t.Errorf("from the Node: %s %v %v", c.NodeIP, c.PodCIDRs, err)
	}
	c = Config{NodeName: "node-a", Kubernetes: cs, NodeIP: netip.MustParseAddr("192.168.9.9"),
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/24")}}
	if err := c.FromKubernetes(ctx); err != nil || c.NodeIP != netip.MustParseAddr("192.168.9.9") || c.PodCIDRs[0] != netip.MustParsePrefix("10.9.0.0/24") {
		t.Errorf("flags did not win: %s %v %v", c.NodeIP, c.PodCIDRs, err)
	}
	c = Config{NodeName: "node-b", Kubernetes: cs}
	if err := c.FromKubernetes(ctx); err == nil || !strings.Contains(err.Error(), "no InternalIP") || !strings.Contains(err.Error(), "--node-ip") {
		t.Errorf("a node without addresses: %v; want an error naming the InternalIP and --node-ip", err)
	}
	c = Config{NodeName: "node-b", Kubernetes: cs, NodeIP: netip.MustParseAddr("192.168.1.6")}
	if err := c.FromKubernetes(ctx); err != nil || len(c.PodCIDRs) != 0 {
		t.Errorf("a node without addresses, --node-ip given: %v %v", c.PodCIDRs, err)
	}
	c = Config{NodeName: "node-z", Kubernetes: cs}
	if err := c.FromKubernetes(ctx); err == nil || !strings.Contains(err.Error(), "get node node-z") {
		t.Errorf("a missing node: %v", err)
	}
	c = Config{NodeName: "node-a", Kubernetes: cs, RegistryURL: "http://127.0.0.1:1", ClusterName: "eu", ConfigDir: "x", StateDir: "y"}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "--registry-url is for standalone mode") {
		t.Errorf("Kubernetes mode with a registry: %v", err)
	}
}

// testKeys is an encryption step's Published as a test drives it.
type testKeys struct {
	mu  sync.Mutex
	cur NodeKeys
	ch  chan struct{}
}

func (k *testKeys) published() (NodeKeys, <-chan struct{}) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.cur, k.ch
}

func (k *testKeys) set(v NodeKeys) {
	k.mu.Lock()
	k.cur = v
	k.mu.Unlock()
	notify(k.ch)
}

// The node's keys go on its Node's annotations: at start (which clears a
// key an earlier agent left), then on every change, a refused patch
// retried; a withdrawn key removes its annotation; other annotations and
// other Nodes are left alone. (A fake clientset: the merge patch against
// a real kube-apiserver, with the agent's RBAC, is in
// TestKubernetesModeEncryption.)
func TestKeysOnNode(t *testing.T) {
	const key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
	stale := map[string]string{"keep": "me", source.AnnotationWireGuardKey: "old", source.AnnotationIPsecKeyIndex: "2"}
	cs := fake.NewClientset(
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", Annotations: maps.Clone(stale)}},
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-b", Annotations: maps.Clone(stale)}})
	var refuse atomic.Int32
	refuse.Store(1)
	var patched []string
	var patchMu sync.Mutex
	cs.PrependReactor("patch", "nodes", func(a k8stesting.Action) (bool, runtime.Object, error) {
		p := a.(k8stesting.PatchAction)
		patchMu.Lock()
		patched = append(patched, string(p.GetPatchType())+" "+p.GetName())
		patchMu.Unlock()
		if refuse.Add(-1) >= 0 {
			return true, nil, errors.New("refused by the test")
		}
		return false, nil, nil
	})
	k := newKubePods(cs, "node-a", slog.New(slog.DiscardHandler))
	keys := &testKeys{ch: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		k.keysRun(ctx, keys.published)
	}()
	defer func() {
		cancel()
		<-done
	}()
	annotations := func(name string) map[string]string {
		n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return n.Annotations
	}
	want := func(what string, ann map[string]string) {
		t.Helper()
		testutil.Eventually(t, 10*time.Second, what, func() bool { return maps.Equal(annotations("node-a"), ann) })
	}
	want("the stale keys cleared at start, after a refused patch", map[string]string{"keep": "me"})
	keys.set(NodeKeys{WireGuard: key, IPsecIndex: 3})
	want("both keys published", map[string]string{"keep": "me", source.AnnotationWireGuardKey: key, source.AnnotationIPsecKeyIndex: "3"})
	keys.set(NodeKeys{IPsecIndex: 3})
	want("the WireGuard key withdrawn", map[string]string{"keep": "me", source.AnnotationIPsecKeyIndex: "3"})
	keys.set(NodeKeys{})
	want("every key withdrawn", map[string]string{"keep": "me"})
	if got := annotations("node-b"); !maps.Equal(got, stale) {
		t.Errorf("another node's annotations changed: %v", got)
	}
	st := k.status()
	if st.KeyPatches != 4 || st.KeyPatchErrors != 1 || !strings.Contains(st.LastPatchError, "refused by the test") {
		t.Errorf("status %+v; want 4 key patches, 1 refused", st)
	}
	patchMu.Lock()
	defer patchMu.Unlock()
	for _, p := range patched {
		if p != string(types.MergePatchType)+" node-a" {
			t.Errorf("patch %q; want only JSON merge patches of node-a", p)
		}
	}
}
