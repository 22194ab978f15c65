package agent

// Kubernetes mode (`trellis agent --kubernetes`): the agent of a node of a
// Kubernetes cluster, whose mesh API server runs the Kubernetes source.
//
// Design notes.
//   - The node: its Node object gives the node IP (the first InternalIP)
//     and pod CIDRs (spec.podCIDRs), read once at start (they do not
//     change while a node lives); --node-ip and --pod-cidrs still win.
//   - The pods: one informer on the pods scheduled on this node (field
//     selector spec.nodeName), slimmed to what is read. A pod is probed
//     while it runs, has a pod IP, is not on the host network, and its
//     containers are ready (ContainersReady; Ready when the kubelet does
//     not report it): not its Ready condition, which a readiness gate on
//     trellis.io/healthy holds false while the agent says so, and which
//     would then stop the probes that could bring it back.
//   - Which ports, and how: as in standalone mode, the TCP target ports
//     the merged snapshot gives the pod's IP (the services selecting it,
//     through their EndpointSlices, as the Kubernetes source publishes
//     them), with each service's trellis.io/health-check.
//   - No registrar: the Kubernetes source sees nodes and pods itself. A
//     pod probed down leaves the node's datapath at once (health.go), then
//     the agent marks it at the source: it patches the pod's status
//     condition trellis.io/healthy (source.ConditionHealthy) to False,
//     and to True once it has passed a probe (or has nothing to probe:
//     no mesh service has it as a backend), as a readiness gate's
//     controller does: a new pod is not marked before its first result; the Kubernetes source publishes a
//     pod marked False, and its backends, not ready. A mark that is
//     already right is not written again, so a restart costs no patches,
//     and one somebody else changed is put back on the next pass.
//   - Encryption keys: what the registrar sends the registry in standalone
//     mode (the WireGuard public key, the IPsec key index) the agent
//     writes on its own Node as the annotations trellis.io/wg-pub-key and
//     trellis.io/ipsec-key-index (source.AnnotationWireGuardKey,
//     source.AnnotationIPsecKeyIndex), which the Kubernetes source
//     validates and publishes in the node's entry. Same moments as the
//     registrar: at start (a datapath that cannot encrypt publishes no
//     key, which clears one an earlier agent left), and whenever the
//     encryption step publishes or withdraws a key (on, rotation, off:
//     withdrawn as the drain starts, which then waits to see it gone from
//     the node's entry). A JSON merge patch of metadata.annotations, with
//     null for a withdrawn key, so nothing else of the Node is touched and
//     no read is needed. The Node is not watched (get is all the agent
//     reads of it), so an annotation somebody else changes stays until
//     the next change or restart.
//
// RBAC: the agent's service account needs exactly
//
//	nodes        get, patch         (its own Node: IP and pod CIDRs; its key annotations)
//	pods         list, watch        (field selector spec.nodeName=<node>)
//	pods/status  patch              (the trellis.io/healthy condition)
//
// RBAC cannot narrow patch to the agent's own Node (resourceNames would
// need one role per node, and no admission plugin checks service-account
// writes to Nodes the way NodeRestriction checks kubelets'): an agent's
// credentials can annotate any Node, as Cilium's agent can (it holds
// nodes patch for its network.cilium.io/wg-pub-key). A compromised
// agent can thus replace or remove another node's key annotations (its
// peers' encrypted paths to that node then fail, or stay in clear); the
// Kubernetes source refuses a malformed key, so it cannot publish one.
//
// (KubernetesRBAC lists them for the Helm chart and the tests.)

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/trellis-mesh/trellis/apiserver/source"
)

// KubernetesRule is one RBAC rule the agent needs in Kubernetes mode.
type KubernetesRule struct {
	Resource string   // "nodes", "pods", "pods/status" (core API group)
	Verbs    []string // "get", "list", "watch", "patch"
}

// KubernetesRBAC is every permission the agent uses in Kubernetes mode,
// and no more: a ClusterRole with these rules (core API group) bound to
// its service account.
var KubernetesRBAC = []KubernetesRule{
	{Resource: "nodes", Verbs: []string{"get", "patch"}},
	{Resource: "pods", Verbs: []string{"list", "watch"}},
	{Resource: "pods/status", Verbs: []string{"patch"}},
}

// Client-side limits of the agent's Kubernetes client: one Get at start,
// one list and watch, and a patch per pod state change.
const (
	kubeQPS       = 20
	kubeBurst     = 40
	kubeUserAgent = "trellis-agent"
	// markEvery is how often the marks are checked against the pods even
	// without a change (a failed patch, a mark somebody else changed).
	markEvery = 5 * time.Second
	// patchTimeout bounds one patch.
	patchTimeout = 10 * time.Second
)

// NewKubernetesClient returns a client for the cluster of the kubeconfig
// at path, or, when path is empty, for the cluster the agent runs in (its
// pod's service account).
func NewKubernetesClient(path string) (kubernetes.Interface, error) {
	var (
		cfg *rest.Config
		err error
	)
	if path == "" {
		if cfg, err = rest.InClusterConfig(); err != nil {
			return nil, fmt.Errorf("agent: --kubernetes: in-cluster config: %w (outside a pod, pass --kubeconfig)", err)
		}
	} else if cfg, err = clientcmd.BuildConfigFromFlags("", path); err != nil {
		return nil, fmt.Errorf("agent: --kubeconfig %s: %w", path, err)
	}
	return NewKubernetesClientForConfig(cfg)
}

// NewKubernetesClientForConfig returns a client for cfg with the agent's
// user agent and rate limits where cfg leaves them zero.
func NewKubernetesClientForConfig(cfg *rest.Config) (kubernetes.Interface, error) {
	cfg = rest.CopyConfig(cfg)
	if cfg.UserAgent == "" {
		cfg.UserAgent = kubeUserAgent
	}
	if cfg.QPS == 0 {
		cfg.QPS, cfg.Burst = kubeQPS, kubeBurst
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("agent: Kubernetes client for %s: %w", cfg.Host, err)
	}
	return cs, nil
}

// FromKubernetes fills what c lacks of the node's IP and pod CIDRs from
// its Node object (c.Kubernetes must be set): the first InternalIP, and
// spec.podCIDRs (spec.podCIDR on old clusters). Values already set (from
// --node-ip and --pod-cidrs) win. A node without an InternalIP is an
// error unless c.NodeIP is set.
func (c *Config) FromKubernetes(ctx context.Context) error {
	if c.Kubernetes == nil {
		return errors.New("agent: no Kubernetes client (--kubernetes)")
	}
	if c.NodeName == "" {
		return errors.New("agent: --node-name is required (in a pod: the downward API's spec.nodeName)")
	}
	node, err := c.Kubernetes.CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("agent: get node %s: %w (the agent needs get on nodes; is --node-name the Kubernetes node's name?)", c.NodeName, err)
	}
	ip, cidrs, err := nodeAddressing(node)
	if !c.NodeIP.IsValid() {
		if !ip.IsValid() {
			return fmt.Errorf("agent: node %s: %w; pass --node-ip", c.NodeName, err)
		}
		c.NodeIP = ip
	}
	if len(c.PodCIDRs) == 0 {
		c.PodCIDRs = cidrs
	}
	return nil
}

// nodeAddressing reads a Node's first InternalIP and its pod CIDRs; err
// says what was missing or malformed (the rest is still returned).
func nodeAddressing(node *corev1.Node) (netip.Addr, []netip.Prefix, error) {
	var errs []error
	var ip netip.Addr
	for _, a := range node.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		p, err := netip.ParseAddr(a.Address)
		if err != nil {
			errs = append(errs, fmt.Errorf("InternalIP %q: %w", a.Address, err))
			continue
		}
		ip = p.Unmap()
		break
	}
	if !ip.IsValid() && len(errs) == 0 {
		errs = append(errs, errors.New("no InternalIP in status.addresses"))
	}
	specCIDRs := node.Spec.PodCIDRs
	if len(specCIDRs) == 0 && node.Spec.PodCIDR != "" {
		specCIDRs = []string{node.Spec.PodCIDR}
	}
	var cidrs []netip.Prefix
	for _, s := range specCIDRs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("pod CIDR %q: %w", s, err))
			continue
		}
		cidrs = append(cidrs, p.Masked())
	}
	return ip, cidrs, errors.Join(errs...)
}

// kubePods follows the pods of the agent's node and marks them at the
// source.
type kubePods struct {
	client  kubernetes.Interface
	node    string
	log     *slog.Logger
	factory informers.SharedInformerFactory
	lister  corelisters.PodLister
	synced  cache.InformerSynced
	// changed receives when a pod of the node changed.
	changed chan struct{}

	mu sync.Mutex
	// patches and patchErrors count the marks written and refused;
	// lastErr is the last refusal.
	patches, patchErrors int
	// keyPatches and keyPatchErrors count the key annotations written
	// on the node and refused.
	keyPatches, keyPatchErrors int
	lastErr                    string
}

func newKubePods(client kubernetes.Interface, node string, log *slog.Logger) *kubePods {
	factory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
		}),
		informers.WithTransform(slimPod))
	pods := factory.Core().V1().Pods()
	k := &kubePods{client: client, node: node, log: log.With("mode", "kubernetes"), factory: factory,
		lister: pods.Lister(), changed: make(chan struct{}, 1)}
	inf := pods.Informer()
	k.synced = inf.HasSynced
	inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { notify(k.changed) },
		UpdateFunc: func(any, any) { notify(k.changed) },
		DeleteFunc: func(any) { notify(k.changed) },
	})
	return k
}

// slimPod keeps what the agent reads of a pod.
func slimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	out := &corev1.Pod{
		TypeMeta:   p.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{Namespace: p.Namespace, Name: p.Name, UID: p.UID, ResourceVersion: p.ResourceVersion},
		Spec:       corev1.PodSpec{NodeName: p.Spec.NodeName, HostNetwork: p.Spec.HostNetwork},
		Status: corev1.PodStatus{Phase: p.Status.Phase, Conditions: p.Status.Conditions,
			PodIP: p.Status.PodIP, PodIPs: p.Status.PodIPs},
	}
	return out, nil
}

// start starts the informer; it stops when ctx ends (wait waits for it).
func (k *kubePods) start(ctx context.Context) { k.factory.Start(ctx.Done()) }

// wait returns once the informer's goroutines ended (after ctx ended).
func (k *kubePods) wait() { k.factory.Shutdown() }

// probedIPs is which pods of the node are probed, and at which IPs: a
// running pod with its containers ready, off the host network.
func probedIPs(p *corev1.Pod) []netip.Addr {
	if p.Spec.HostNetwork || p.Status.Phase != corev1.PodRunning || p.DeletionTimestamp != nil {
		return nil
	}
	ready, containersReady := false, corev1.ConditionStatus("")
	for _, c := range p.Status.Conditions {
		switch c.Type {
		case corev1.ContainersReady:
			containersReady = c.Status
		case corev1.PodReady:
			ready = c.Status == corev1.ConditionTrue
		}
	}
	if containersReady != corev1.ConditionTrue && (containersReady != "" || !ready) {
		return nil
	}
	addrs := make([]string, 0, len(p.Status.PodIPs)+1)
	for _, a := range p.Status.PodIPs {
		addrs = append(addrs, a.IP)
	}
	if len(addrs) == 0 && p.Status.PodIP != "" {
		addrs = append(addrs, p.Status.PodIP)
	}
	var out []netip.Addr
	for _, a := range addrs {
		if ip, err := netip.ParseAddr(a); err == nil && !slices.Contains(out, ip.Unmap()) {
			out = append(out, ip.Unmap())
		}
	}
	return out
}

// list is the node's probed pods as the health checker takes them: one
// PodFile per pod IP. Nothing until the informer has synced.
func (k *kubePods) list() ([]PodFile, error) {
	if !k.synced() {
		return nil, nil
	}
	pods, err := k.lister.List(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("list the pods of node %s: %w", k.node, err)
	}
	var out []PodFile
	for _, p := range pods {
		if p.Spec.NodeName != k.node {
			continue
		}
		for _, ip := range probedIPs(p) {
			out = append(out, PodFile{Namespace: p.Namespace, Name: p.Name, IP: ip, Ready: true})
		}
	}
	return out, nil
}

// markRun keeps each probed pod's trellis.io/healthy condition in step
// with local health: at once when health changes (kick, after the apply
// that took the change in) or a pod changes, and every markEvery.
func (k *kubePods) markRun(ctx context.Context, h *healthChecker, kick <-chan struct{}) {
	if !cache.WaitForCacheSync(ctx.Done(), k.synced) {
		return
	}
	t := time.NewTicker(markEvery)
	defer t.Stop()
	for {
		k.markAll(ctx, h)
		select {
		case <-ctx.Done():
			return
		case <-kick:
		case <-k.changed:
		case <-t.C:
		}
	}
}

// markAll patches the pods whose mark is not what local health says.
func (k *kubePods) markAll(ctx context.Context, h *healthChecker) {
	pods, err := k.lister.List(labels.Everything())
	if err != nil {
		k.log.Warn("listing the node's pods", "err", err)
		return
	}
	for _, p := range pods {
		ips := probedIPs(p)
		if p.Spec.NodeName != k.node || len(ips) == 0 {
			continue
		}
		down, known, why := h.verdict(ips)
		if !known {
			continue
		}
		want := corev1.ConditionTrue
		if down {
			want = corev1.ConditionFalse
		}
		if cur := podCondition(p, source.ConditionHealthy); cur != nil && cur.Status == want {
			continue
		}
		patched, err := k.mark(ctx, p, want, why)
		if err != nil {
			k.mu.Lock()
			k.patchErrors++
			k.lastErr = err.Error()
			k.mu.Unlock()
			k.log.Warn("marking pod health at the source failed; retrying", "pod", p.Namespace+"/"+p.Name, "healthy", want, "err", err)
			continue
		}
		if !patched {
			continue
		}
		k.mu.Lock()
		k.patches++
		k.mu.Unlock()
		k.log.Info("marked pod health at the source", "pod", p.Namespace+"/"+p.Name, "condition", source.ConditionHealthy, "status", want)
	}
}

func podCondition(p *corev1.Pod, t corev1.PodConditionType) *corev1.PodCondition {
	for i := range p.Status.Conditions {
		if p.Status.Conditions[i].Type == t {
			return &p.Status.Conditions[i]
		}
	}
	return nil
}

// mark patches pod p's trellis.io/healthy condition (a strategic merge on
// status.conditions, whose merge key is the type: the other conditions
// are left alone), with the pod's UID as a precondition so that a new pod
// of the same name is never marked for the old one's probes.
//
// It reports false, and no error, when the pod is gone or was replaced.
func (k *kubePods) mark(ctx context.Context, p *corev1.Pod, status corev1.ConditionStatus, why string) (bool, error) {
	reason, msg := "ProbesPass", "the trellis agent of node "+k.node+"'s probes pass"
	if status == corev1.ConditionFalse {
		reason, msg = "ProbesFail", "the trellis agent of node "+k.node+"'s probes fail: "+why
	}
	patch := map[string]any{
		"metadata": map[string]any{"uid": p.UID},
		"status": map[string]any{"conditions": []map[string]any{{
			"type": source.ConditionHealthy, "status": status, "reason": reason, "message": msg,
			"lastTransitionTime": metav1.Now().UTC().Format(time.RFC3339),
		}}},
	}
	body, err := json.Marshal(patch)
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(ctx, patchTimeout)
	defer cancel()
	_, err = k.client.CoreV1().Pods(p.Namespace).Patch(ctx, p.Name, types.StrategicMergePatchType, body,
		metav1.PatchOptions{FieldManager: kubeUserAgent}, "status")
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return false, nil // gone, or replaced by a pod of the same name: the informer tells
	}
	if err != nil {
		return false, fmt.Errorf("patch pods/status %s/%s: %w", p.Namespace, p.Name, err)
	}
	return true, nil
}

// keysRun keeps the node's encryption key annotations in step with what
// keys says this node publishes, as the registrar keeps its registry
// entry in standalone mode: once at start (which also clears keys an
// earlier agent left), then on every change; a refused patch is retried
// after a second, backing off to markEvery.
func (k *kubePods) keysRun(ctx context.Context, keys func() (NodeKeys, <-chan struct{})) {
	_, changed := keys()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	var (
		sent    NodeKeys
		onNode  bool // sent is what the Node holds
		backoff = time.Second
	)
	for {
		if cur, _ := keys(); !onNode || cur != sent {
			err := k.annotateKeys(ctx, cur)
			if ctx.Err() != nil {
				return
			}
			k.mu.Lock()
			if err != nil {
				k.keyPatchErrors++
				k.lastErr = err.Error()
			} else {
				k.keyPatches++
			}
			k.mu.Unlock()
			if err != nil {
				k.log.Warn("publishing the node's encryption keys on its Node failed; retrying", "err", err, "retry", backoff)
				retry.Reset(backoff)
				backoff = min(2*backoff, markEvery)
			} else {
				k.log.Info("published the node's encryption keys on its Node", "wireGuardPublicKey", cur.WireGuard, "ipsecKeyIndex", cur.IPsecIndex)
				sent, onNode, backoff = cur, true, time.Second
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-retry.C:
		}
	}
}

// annotateKeys writes keys on the node's annotations with a JSON merge
// patch of metadata.annotations alone: a key the node does not publish
// is null, which removes the annotation (and is a no-op when absent).
func (k *kubePods) annotateKeys(ctx context.Context, keys NodeKeys) error {
	ann := map[string]any{source.AnnotationWireGuardKey: nil, source.AnnotationIPsecKeyIndex: nil}
	if keys.WireGuard != "" {
		ann[source.AnnotationWireGuardKey] = keys.WireGuard
	}
	if keys.IPsecIndex != 0 {
		ann[source.AnnotationIPsecKeyIndex] = strconv.Itoa(int(keys.IPsecIndex))
	}
	body, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, patchTimeout)
	defer cancel()
	_, err = k.client.CoreV1().Nodes().Patch(ctx, k.node, types.MergePatchType, body, metav1.PatchOptions{FieldManager: kubeUserAgent})
	if err != nil {
		return fmt.Errorf("patch node %s's annotations %s and %s: %w (the agent needs patch on nodes)",
			k.node, source.AnnotationWireGuardKey, source.AnnotationIPsecKeyIndex, err)
	}
	return nil
}

// KubernetesStatus is what status shows of Kubernetes mode.
type KubernetesStatus struct {
	// Pods is how many pods of the node are probed (one per pod IP).
	Pods int `json:"pods"`
	// Patches counts the trellis.io/healthy marks written; PatchErrors
	// the refused ones, the last of which is LastPatchError.
	Patches        int    `json:"patches"`
	PatchErrors    int    `json:"patchErrors,omitempty"`
	LastPatchError string `json:"lastPatchError,omitempty"`
	// KeyPatches counts the writes of the node's encryption key
	// annotations (trellis.io/wg-pub-key, trellis.io/ipsec-key-index);
	// KeyPatchErrors the refused ones (LastPatchError names the last
	// refusal of either kind).
	KeyPatches     int `json:"keyPatches,omitempty"`
	KeyPatchErrors int `json:"keyPatchErrors,omitempty"`
}

func (k *kubePods) status() *KubernetesStatus {
	if k == nil {
		return nil
	}
	pods, _ := k.list()
	k.mu.Lock()
	defer k.mu.Unlock()
	return &KubernetesStatus{Pods: len(pods), Patches: k.patches, PatchErrors: k.patchErrors, LastPatchError: k.lastErr,
		KeyPatches: k.keyPatches, KeyPatchErrors: k.keyPatchErrors}
}
