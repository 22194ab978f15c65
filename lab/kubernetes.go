package lab

// Kubernetes mode (`trellis lab up --kubernetes`): every cluster gets a
// real kube-apiserver, and its mesh API server runs the Kubernetes source
// against it instead of taking registrations.
//
// Design notes.
//   - Where things run: in the cluster's API server namespace, beside
//     the mesh API server, a `trellis lab etcd` helper (an embedded etcd,
//     plain HTTP on that namespace's loopback, kubeEtcdPort: nothing
//     outside the namespace can reach it, and the mesh API server's own
//     etcd is elsewhere on the same loopback) and bin/kube-apiserver on
//     the namespace's underlay address :6443, so the agents in the node
//     namespaces reach it over the lab bridge. Both are daemons in the
//     API server's cgroup, recorded like every other process, so `down`
//     finds them.
//   - Credentials: one static token file per cluster. The lab itself and
//     the mesh API server use an admin token (system:masters); each
//     node's agent has a token of its own in group trellis-lab:agents,
//     bound to a ClusterRole with only what the agent's Kubernetes mode
//     says it needs (agent.KubernetesRBAC: get nodes, list/watch pods,
//     patch pods/status), so the lab fails if the agent needs more. The serving certificate is
//     the self-signed one kube-apiserver writes into its --cert-dir (its
//     SANs hold the advertise address).
//   - The lab plays kubelet, scheduler and controllers: it writes the
//     Nodes (InternalIP = the node's underlay address, spec.podCIDRs, a
//     Ready condition), the Pods (spec.nodeName, status Running with the
//     pod IP, Ready and ContainersReady), the Services (clusterIP = the
//     lab's VIP, annotations from the topology) and one EndpointSlice per
//     Service (its selector over the pods of its namespace; an endpoint is
//     ready unless its pod was stopped or its node is down).
//     syncEndpointSlices writes the whole slice from the lab's state each
//     time, so a verb that failed halfway is mended by the next one.
//   - The verbs act through the Kubernetes API: annotate updates the
//     Service; pod stop/start set the Pod's Ready and ContainersReady
//     conditions (as the kubelet would see its container stop) and its
//     endpoint's ready; node down marks the Node NotReady and its pods
//     not ready, as the node lifecycle controller would after its grace
//     period; pod crash tells no one, as in registry mode.
//   - The lab tool never opens a socket from the root namespace to a lab
//     address: its client-go config dials from inside the cluster's API
//     server namespace (rest.Config.Dial = dialerIn).

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/client-go/util/retry"

	"github.com/trellis-mesh/trellis/agent"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
)

const (
	// kubePort is kube-apiserver's secure port on the API server
	// namespace's underlay address.
	kubePort = 6443
	// kubeEtcdPort is the kube-apiserver's etcd, on the API server
	// namespace's loopback (the mesh API server's embedded etcd takes a
	// free port there, the front door apiEtcdPort on the underlay).
	kubeEtcdPort = 2381
	// kubeAgentsGroup is the group of the agents' tokens; kubeAgentRole
	// the ClusterRole bound to it.
	kubeAgentsGroup = "trellis-lab:agents"
	kubeAgentRole   = "trellis-lab-agent"
	// kubeManagedBy marks the EndpointSlices the lab writes.
	kubeManagedBy = "trellis-lab"
	// kubeRequestTimeout bounds one request of the lab to a kube-apiserver.
	kubeRequestTimeout = 15 * time.Second
)

// kubernetes says whether the lab runs in Kubernetes mode.
func (l *lab) kubernetes() bool { return l.state != nil && l.state.Kubernetes }

// Process keys of Kubernetes mode.
func kubeKey(c *clusterLayout) string     { return "kube-apiserver/" + c.Name }
func kubeEtcdKey(c *clusterLayout) string { return "kube-etcd/" + c.Name }

// kubeDir holds cluster c's kube-apiserver files: tokens, service
// account keys, certificates, etcd data and the admin kubeconfig.
func (c *clusterLayout) kubeDir() string { return filepath.Join(filepath.Dir(c.stateDir), "kube") }

// kubeURL is c's kube-apiserver, reachable from lab namespaces.
func (c *clusterLayout) kubeURL() string {
	return "https://" + netip.AddrPortFrom(c.ip, kubePort).String()
}

// kubeconfig is the admin kubeconfig (system:masters) of c: the mesh API
// server's, and what `ip netns exec <ns> kubectl --kubeconfig` can use.
func (c *clusterLayout) kubeconfig() string { return filepath.Join(c.kubeDir(), "admin.kubeconfig") }

// kubeCAFile is the chain kube-apiserver wrote into its cert dir: its
// serving certificate and the self-signed CA that signed it.
func (c *clusterLayout) kubeCAFile() string {
	return filepath.Join(c.kubeDir(), "certs", "apiserver.crt")
}

func (c *clusterLayout) kubeTokenFile() string { return filepath.Join(c.kubeDir(), "tokens.csv") }
func (c *clusterLayout) kubeAdminToken() string {
	return filepath.Join(c.kubeDir(), "admin.token")
}
func (c *clusterLayout) kubeLog() string {
	return filepath.Join(filepath.Dir(c.log), c.Name+"-kube-apiserver.log")
}
func (c *clusterLayout) kubeEtcdLog() string {
	return filepath.Join(filepath.Dir(c.log), c.Name+"-kube-etcd.log")
}

// kubeconfig is node n's agent's kubeconfig (its own token).
func (n *nodeLayout) kubeconfig() string { return filepath.Join(n.stateDir, "kubeconfig") }

// kubeAgentUser is the user of n's agent's token.
func kubeAgentUser(n *nodeLayout) string { return "trellis-lab-agent:" + n.Name }

// findKubeAPIServer is the kube-apiserver binary to run: path when given,
// else kube-apiserver beside the trellis binary (bin/ in a checkout, where
// `make kube-apiserver` puts it), else on $PATH.
func findKubeAPIServer(path, trellis string) (string, error) {
	if path != "" {
		if _, err := os.Stat(path); err != nil {
			return "", fmt.Errorf("lab: --kube-apiserver: %w", err)
		}
		return filepath.Abs(path)
	}
	beside := filepath.Join(filepath.Dir(trellis), "kube-apiserver")
	if _, err := os.Stat(beside); err == nil {
		return beside, nil
	}
	if p, err := exec.LookPath("kube-apiserver"); err == nil {
		return filepath.Abs(p)
	}
	return "", fmt.Errorf("lab: --kubernetes needs a kube-apiserver binary: none beside %s or on $PATH (build it with `make kube-apiserver`, or pass --kube-apiserver PATH)", trellis)
}

// serviceRange is the --service-cluster-ip-range of c's kube-apiserver:
// the smallest prefix of at least /16 holding every VIP of c (default
// 10.96.0.0/16). kube-apiserver refuses ranges wider than /12 and gives
// the range's first address to the default/kubernetes Service, so no VIP
// may be that one.
func serviceRange(c *Cluster) (netip.Prefix, error) {
	var vips []netip.Addr
	for _, s := range c.Services {
		vips = append(vips, netip.MustParseAddr(s.VIP))
	}
	if len(vips) == 0 {
		return netip.MustParsePrefix("10.96.0.0/16"), nil
	}
	for bits := 16; bits >= 12; bits-- {
		p := netip.PrefixFrom(vips[0], bits).Masked()
		if !slices.ContainsFunc(vips, func(a netip.Addr) bool { return !p.Contains(a) }) {
			first := p.Addr().Next()
			if slices.Contains(vips, first) {
				return netip.Prefix{}, fmt.Errorf("lab: cluster %s: VIP %s is the first address of its service range %s, which kube-apiserver gives the kubernetes Service: choose another VIP", c.Name, first, p)
			}
			return p, nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("lab: cluster %s: its VIPs %v lie in no /12: kube-apiserver's service range is at most a /12", c.Name, vips)
}

// kubeArgs is the argv of c's kube-apiserver.
func (l *lab) kubeArgs(c *clusterLayout, bin string, svcRange netip.Prefix) []string {
	dir := c.kubeDir()
	return []string{bin,
		"--etcd-servers=http://" + netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), kubeEtcdPort).String(),
		"--bind-address=" + c.ip.String(),
		"--advertise-address=" + c.ip.String(),
		"--secure-port=" + strconv.Itoa(kubePort),
		"--cert-dir=" + filepath.Join(dir, "certs"),
		"--service-cluster-ip-range=" + svcRange.String(),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(dir, "sa.key"),
		"--token-auth-file=" + c.kubeTokenFile(),
		"--authorization-mode=RBAC",
		// As kubeadm sets it: the node proxy (`trellis status
		// --context`) dials a node's InternalIP rather than resolving
		// its name, which nothing in the lab could answer.
		"--kubelet-preferred-address-types=InternalIP,ExternalIP,Hostname",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
	}
}

// kubeEtcdArgs is the argv of c's kube-apiserver's etcd.
func (l *lab) kubeEtcdArgs(c *clusterLayout) []string {
	return []string{l.opts.Binary, "lab", "etcd",
		"--data-dir", filepath.Join(c.kubeDir(), "etcd"),
		"--listen", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), kubeEtcdPort).String(),
	}
}

// kubeAPIArgs are the mesh API server's flags of Kubernetes mode.
func (l *lab) kubeAPIArgs(c *clusterLayout) []string {
	args := []string{"--source", "kubernetes", "--kubeconfig", c.kubeconfig(),
		"--kubernetes-namespace", v1.KubeDefaultNamespace}
	if r, err := serviceRange(c.Cluster); err == nil {
		args = append(args, "--service-cidrs", r.String())
	}
	return args
}

// kubeAgentArgs are an agent's flags of Kubernetes mode: it reads its
// node IP and pod CIDRs from its Node and probes the Ready pods
// scheduled on it, with its own token.
// Their metrics port serves /v1/status on the node's underlay address, as
// the chart's DaemonSet does on the host's, so `trellis status --context`
// reaches them through the kube-apiserver's node proxy.
func kubeAgentArgs(n *nodeLayout) []string {
	return []string{"--kubernetes", "--kubeconfig", n.kubeconfig(),
		"--metrics-listen", netip.AddrPortFrom(n.ip, KubeAgentMetricsPort).String()}
}

// KubeAgentMetricsPort is the agents' --metrics-listen port in Kubernetes
// mode: the chart's agent.metricsPort and `trellis status --agent-port`'s
// default.
const KubeAgentMetricsPort = 9962

// startKubernetes writes c's kube-apiserver files (service account key
// pair, static tokens, kubeconfigs) and starts its etcd and
// kube-apiserver without waiting for them.
func (l *lab) startKubernetes(c *clusterLayout, bin string) error {
	svcRange, err := serviceRange(c.Cluster)
	if err != nil {
		return err
	}
	dir := c.kubeDir()
	if err := os.MkdirAll(filepath.Join(dir, "certs"), 0o700); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	if err := writeFile0600(filepath.Join(dir, "sa.key"), pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})); err != nil {
		return err
	}
	if err := writeFile0600(filepath.Join(dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})); err != nil {
		return err
	}
	admin := newToken()
	var tokens strings.Builder
	fmt.Fprintf(&tokens, "%s,trellis-lab-admin,trellis-lab-admin,system:masters\n", admin)
	if err := writeFile0600(c.kubeAdminToken(), []byte(admin+"\n")); err != nil {
		return err
	}
	if err := l.writeKubeconfig(c, c.kubeconfig(), "trellis-lab-admin", admin); err != nil {
		return err
	}
	for _, n := range c.nodes {
		tok := newToken()
		fmt.Fprintf(&tokens, "%s,%s,%s,%s\n", tok, kubeAgentUser(n), kubeAgentUser(n), kubeAgentsGroup)
		if err := os.MkdirAll(n.stateDir, 0o700); err != nil {
			return fmt.Errorf("lab: %w", err)
		}
		if err := l.writeKubeconfig(c, n.kubeconfig(), kubeAgentUser(n), tok); err != nil {
			return err
		}
	}
	if err := writeFile0600(c.kubeTokenFile(), []byte(tokens.String())); err != nil {
		return err
	}
	if err := l.startDaemon(kubeEtcdKey(c), procSpec{ns: c.ns, cgroup: c.cgroup, argv: l.kubeEtcdArgs(c), log: c.kubeEtcdLog()}); err != nil {
		return err
	}
	return l.startDaemon(kubeKey(c), procSpec{ns: c.ns, cgroup: c.cgroup, argv: l.kubeArgs(c, bin, svcRange), log: c.kubeLog()})
}

func newToken() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func writeFile0600(path string, data []byte) error {
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	return nil
}

// writeKubeconfig writes a kubeconfig for c's kube-apiserver with a
// token. The CA is referenced by path: kube-apiserver writes it only when
// it starts.
func (l *lab) writeKubeconfig(c *clusterLayout, path, user, token string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[c.Name] = &clientcmdapi.Cluster{Server: c.kubeURL(), CertificateAuthority: c.kubeCAFile()}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts[c.Name] = &clientcmdapi.Context{Cluster: c.Name, AuthInfo: user}
	cfg.CurrentContext = c.Name
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("lab: kubeconfig %s: %w", path, err)
	}
	return os.Chmod(path, 0o600)
}

// kube is a client of c's kube-apiserver with the admin token, dialling
// from c's API server namespace.
func (l *lab) kube(c *clusterLayout) (kubernetes.Interface, error) {
	token, err := os.ReadFile(c.kubeAdminToken())
	if err != nil {
		return nil, fmt.Errorf("lab: %s's kube-apiserver token: %w", c.Name, err)
	}
	cfg := &rest.Config{
		Host:            c.kubeURL(),
		BearerToken:     strings.TrimSpace(string(token)),
		TLSClientConfig: rest.TLSClientConfig{CAFile: c.kubeCAFile()},
		Dial:            dialerIn(c.ns),
		Timeout:         kubeRequestTimeout,
		UserAgent:       "trellis-lab",
		QPS:             50,
		Burst:           100,
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("lab: %s's kube-apiserver: %w", c.Name, err)
	}
	return cs, nil
}

// withKube runs fn with a client of c's kube-apiserver and names the
// cluster in its error.
func (l *lab) withKube(c *clusterLayout, fn func(kubernetes.Interface) error) error {
	cs, err := l.kube(c)
	if err != nil {
		return err
	}
	if err := fn(cs); err != nil {
		return fmt.Errorf("lab: %s's kube-apiserver: %w", c.Name, err)
	}
	return nil
}

// waitKube waits until the kube-apiservers of clusters answer /readyz,
// failing early with the log tail of one that (or whose etcd) exited.
func (l *lab) waitKube(ctx context.Context, clusters []*clusterLayout, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	pending := slices.Clone(clusters)
	for {
		var next []*clusterLayout
		var lastErr error
		for _, c := range pending {
			if !l.state.Procs[kubeEtcdKey(c)].Alive() {
				return fmt.Errorf("lab: %s's kube-apiserver etcd exited:\n%s", c.Name, tailFile(c.kubeEtcdLog(), 20))
			}
			if !l.state.Procs[kubeKey(c)].Alive() {
				return fmt.Errorf("lab: %s's kube-apiserver exited:\n%s", c.Name, tailFile(c.kubeLog(), 20))
			}
			if err := l.kubeReady(ctx, c); err != nil {
				lastErr = fmt.Errorf("%s: %w", c.Name, err)
				next = append(next, c)
			}
		}
		pending = next
		if len(pending) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: kube-apiservers not ready after %s: %w (logs in %s)", timeout, lastErr, filepath.Join(l.dir, "logs"))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func (l *lab) kubeReady(ctx context.Context, c *clusterLayout) error {
	if _, err := os.Stat(c.kubeCAFile()); err != nil {
		return fmt.Errorf("no serving certificate yet: %w", err)
	}
	cs, err := l.kube(c)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
	if err != nil {
		return fmt.Errorf("/readyz: %w: %s", err, strings.TrimSpace(string(body)))
	}
	return nil
}

// upKubernetes waits for the kube-apiservers of clusters, writes what
// their controllers and kubelets would, then starts each cluster's mesh
// API server with the Kubernetes source.
func (l *lab) upKubernetes(ctx context.Context, clusters []*clusterLayout, timeout time.Duration) error {
	start := time.Now()
	if err := l.waitKube(ctx, clusters, timeout); err != nil {
		return err
	}
	l.step("kube-apiservers ready in %s", time.Since(start).Round(100*time.Millisecond))
	for _, c := range clusters {
		if err := l.writeKubeObjects(ctx, c); err != nil {
			return err
		}
		if err := l.startAPIServer(c); err != nil {
			return err
		}
		l.step("cluster %s: kube-apiserver at %s, %d nodes, %d pods, %d services written; mesh API server (Kubernetes source) at %s",
			c.Name, c.kubeURL(), len(c.nodes), len(l.clusterPods(c)), len(c.Services), c.registryURL())
	}
	return nil
}

func (l *lab) clusterPods(c *clusterLayout) []*podLayout {
	var out []*podLayout
	for _, n := range c.nodes {
		out = append(out, n.pods...)
	}
	return out
}

// writeKubeObjects writes c's namespaces, service accounts, the agents'
// RBAC, Nodes, Pods (with their status), Services and EndpointSlices.
func (l *lab) writeKubeObjects(ctx context.Context, c *clusterLayout) error {
	return l.withKube(c, func(cs kubernetes.Interface) error {
		namespaces := []string{v1.KubeDefaultNamespace}
		for _, p := range l.clusterPods(c) {
			namespaces = append(namespaces, p.Namespace)
		}
		for _, s := range c.Services {
			namespaces = append(namespaces, s.Namespace)
		}
		slices.Sort(namespaces)
		for _, ns := range slices.Compact(namespaces) {
			if err := ensure(cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})); err != nil {
				return fmt.Errorf("namespace %s: %w", ns, err)
			}
			// The service account controller's work: pods need theirs.
			sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "default"}}
			if err := ensure(cs.CoreV1().ServiceAccounts(ns).Create(ctx, sa, metav1.CreateOptions{})); err != nil {
				return fmt.Errorf("service account %s/default: %w", ns, err)
			}
		}
		if err := writeAgentRBAC(ctx, cs); err != nil {
			return err
		}
		for _, n := range c.nodes {
			if err := l.writeNode(ctx, cs, n); err != nil {
				return err
			}
		}
		for _, p := range l.clusterPods(c) {
			if err := l.writePod(ctx, cs, p); err != nil {
				return err
			}
		}
		for _, s := range c.Services {
			if err := writeService(ctx, cs, s); err != nil {
				return err
			}
		}
		return l.syncEndpointSlices(ctx, cs, c)
	})
}

// ensure turns AlreadyExists into success.
func ensure[T any](_ T, err error) error {
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// writeAgentRBAC binds the agents' group to a ClusterRole with what the
// agent's Kubernetes mode says it uses (agent.KubernetesRBAC), and no
// more.
func writeAgentRBAC(ctx context.Context, cs kubernetes.Interface) error {
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: kubeAgentRole}}
	for _, r := range agent.KubernetesRBAC {
		role.Rules = append(role.Rules, rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{r.Resource}, Verbs: slices.Clone(r.Verbs)})
	}
	if err := ensure(cs.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{})); err != nil {
		return fmt.Errorf("cluster role %s: %w", kubeAgentRole, err)
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: kubeAgentRole},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: kubeAgentRole},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.GroupKind, APIGroup: rbacv1.GroupName, Name: kubeAgentsGroup}},
	}
	if err := ensure(cs.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{})); err != nil {
		return fmt.Errorf("cluster role binding %s: %w", kubeAgentRole, err)
	}
	return nil
}

// writeNode creates n's Node (as its kubelet registers it) and sets its
// status: the underlay address as InternalIP, Ready unless the node is
// down.
func (l *lab) writeNode(ctx context.Context, cs kubernetes.Interface, n *nodeLayout) error {
	labels := map[string]string{corev1.LabelHostname: n.Name}
	if r := n.cluster.Region; r != "" {
		labels[corev1.LabelTopologyRegion] = r
	}
	if z := n.cluster.Zone; z != "" {
		labels[corev1.LabelTopologyZone] = z
	}
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: labels},
		Spec:       corev1.NodeSpec{PodCIDR: n.PodCIDR, PodCIDRs: []string{n.PodCIDR}},
	}
	if err := ensure(cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})); err != nil {
		return fmt.Errorf("node %s: %w", n.Name, err)
	}
	return l.setNodeReady(ctx, cs, n, !l.state.DownNodes[n.ref()])
}

// setNodeReady sets n's addresses and Ready condition.
func (l *lab) setNodeReady(ctx context.Context, cs kubernetes.Interface, n *nodeLayout, ready bool) error {
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		node, err := cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		node.Status.Addresses = []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: n.ip.String()},
			{Type: corev1.NodeHostName, Address: n.Name},
		}
		cond := corev1.NodeCondition{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", Message: "trellis lab: agent and pods running"}
		if !ready {
			cond = corev1.NodeCondition{Type: corev1.NodeReady, Status: corev1.ConditionUnknown, Reason: "NodeStatusUnknown", Message: "trellis lab: node down"}
		}
		node.Status.Conditions = setNodeCondition(node.Status.Conditions, cond)
		_, err = cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("node %s status: %w", n.Name, err)
	}
	return nil
}

func setNodeCondition(conds []corev1.NodeCondition, c corev1.NodeCondition) []corev1.NodeCondition {
	now := metav1.Now()
	c.LastHeartbeatTime, c.LastTransitionTime = now, now
	for i := range conds {
		if conds[i].Type == c.Type {
			if conds[i].Status == c.Status {
				c.LastTransitionTime = conds[i].LastTransitionTime
			}
			conds[i] = c
			return conds
		}
	}
	return append(conds, c)
}

// podReady says whether p should be ready: not stopped, its node not down.
func (l *lab) podReady(p *podLayout) bool {
	return !l.state.StoppedPods[p.ref()] && !l.state.DownNodes[p.node.ref()]
}

// writePod creates p's Pod, scheduled on its node, and sets its status as
// its kubelet would: Running with the pod IP.
func (l *lab) writePod(ctx context.Context, cs kubernetes.Interface, p *podLayout) error {
	container := corev1.Container{Name: "main", Image: "trellis-lab/client"}
	if p.Echo {
		container = corev1.Container{Name: "echo", Image: "trellis-lab/echo",
			Ports: []corev1.ContainerPort{
				{Name: "http", ContainerPort: EchoPort, Protocol: corev1.ProtocolTCP},
				{Name: "udp", ContainerPort: EchoPort, Protocol: corev1.ProtocolUDP},
			}}
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: p.Namespace, Name: p.Name, Labels: maps.Clone(p.Labels)},
		Spec:       corev1.PodSpec{NodeName: p.node.Name, Containers: []corev1.Container{container}},
	}
	if err := ensure(cs.CoreV1().Pods(p.Namespace).Create(ctx, pod, metav1.CreateOptions{})); err != nil {
		return fmt.Errorf("pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	return l.setPodReady(ctx, cs, p, l.podReady(p))
}

// setPodReady sets p's status: Running with its IP, and its Ready and
// ContainersReady conditions to ready. Other conditions (the agent's
// trellis.io/healthy) are kept.
func (l *lab) setPodReady(ctx context.Context, cs kubernetes.Interface, p *podLayout, ready bool) error {
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		pod, err := cs.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		pod.Status.Phase = corev1.PodRunning
		pod.Status.HostIP = p.node.ip.String()
		pod.Status.HostIPs = []corev1.HostIP{{IP: p.node.ip.String()}}
		pod.Status.PodIP = p.ip.String()
		pod.Status.PodIPs = []corev1.PodIP{{IP: p.ip.String()}}
		if pod.Status.StartTime == nil {
			now := metav1.Now()
			pod.Status.StartTime = &now
		}
		for _, c := range []corev1.PodConditionType{corev1.PodScheduled, corev1.PodInitialized} {
			pod.Status.Conditions = setPodCondition(pod.Status.Conditions, c, corev1.ConditionTrue)
		}
		for _, c := range []corev1.PodConditionType{corev1.ContainersReady, corev1.PodReady} {
			pod.Status.Conditions = setPodCondition(pod.Status.Conditions, c, status)
		}
		pod.Status.ContainerStatuses = l.containerStatuses(pod, p, ready)
		_, err = cs.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("pod %s/%s status: %w", p.Namespace, p.Name, err)
	}
	return nil
}

// containerStatuses are the kubelet's report of p's one container:
// running (and ready when ready) unless the pod was stopped, then
// terminated by SIGTERM.
func (l *lab) containerStatuses(pod *corev1.Pod, p *podLayout, ready bool) []corev1.ContainerStatus {
	if len(pod.Spec.Containers) == 0 {
		return nil
	}
	c := pod.Spec.Containers[0]
	started := pod.Status.StartTime
	if started == nil {
		now := metav1.Now()
		started = &now
	}
	st := corev1.ContainerStatus{Name: c.Name, Image: c.Image, ImageID: c.Image, Ready: ready}
	if l.state.StoppedPods[p.ref()] {
		st.State.Terminated = &corev1.ContainerStateTerminated{ExitCode: 143, Reason: "Error", Message: "trellis lab pod stop", StartedAt: *started, FinishedAt: metav1.Now()}
	} else {
		running := true
		st.Started = &running
		st.State.Running = &corev1.ContainerStateRunning{StartedAt: *started}
	}
	return []corev1.ContainerStatus{st}
}

func setPodCondition(conds []corev1.PodCondition, t corev1.PodConditionType, s corev1.ConditionStatus) []corev1.PodCondition {
	now := metav1.Now()
	for i := range conds {
		if conds[i].Type == t {
			if conds[i].Status != s {
				conds[i].Status, conds[i].LastTransitionTime = s, now
			}
			return conds
		}
	}
	return append(conds, corev1.PodCondition{Type: t, Status: s, LastTransitionTime: now})
}

// writeService creates s, with the lab's VIP as its cluster IP.
func writeService(ctx context.Context, cs kubernetes.Interface, s Service) error {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name, Annotations: maps.Clone(s.Annotations)},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  s.VIP,
			ClusterIPs: []string{s.VIP},
			Selector:   maps.Clone(s.Selector),
		},
	}
	for _, p := range s.Ports {
		svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{
			Name: p.Name, Protocol: corev1.Protocol(p.Protocol), Port: int32(p.Port),
			TargetPort: intstr.FromInt32(int32(targetPort(p))),
		})
	}
	if err := ensure(cs.CoreV1().Services(s.Namespace).Create(ctx, svc, metav1.CreateOptions{})); err != nil {
		return fmt.Errorf("service %s/%s: %w", s.Namespace, s.Name, err)
	}
	return nil
}

func targetPort(p v1.ServicePort) uint16 {
	if p.TargetPort == 0 {
		return p.Port
	}
	return p.TargetPort
}

// sliceName is the name of the lab's EndpointSlice of service s.
func sliceName(s Service) string { return s.Name + "-lab" }

// syncEndpointSlices writes, for every service of c, the EndpointSlice
// the EndpointSlice controller would: the pods of its namespace its
// selector matches, each ready when the lab's state says so.
func (l *lab) syncEndpointSlices(ctx context.Context, cs kubernetes.Interface, c *clusterLayout) error {
	for _, s := range c.Services {
		slice := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Namespace: s.Namespace, Name: sliceName(s), Labels: map[string]string{
				discoveryv1.LabelServiceName: s.Name,
				discoveryv1.LabelManagedBy:   kubeManagedBy,
			}},
			AddressType: discoveryv1.AddressTypeIPv4,
		}
		for _, p := range s.Ports {
			name, proto, port := p.Name, corev1.Protocol(p.Protocol), int32(targetPort(p))
			slice.Ports = append(slice.Ports, discoveryv1.EndpointPort{Name: &name, Protocol: &proto, Port: &port})
		}
		for _, p := range l.clusterPods(c) {
			if p.Namespace != s.Namespace || len(s.Selector) == 0 || !selects(s.Selector, p.Labels) {
				continue
			}
			ready, terminating := l.podReady(p), false
			node := p.node.Name
			ep := discoveryv1.Endpoint{
				Addresses:  []string{p.ip.String()},
				Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &ready, Terminating: &terminating},
				NodeName:   &node,
				TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: p.Namespace, Name: p.Name},
			}
			if z := c.Zone; z != "" {
				ep.Zone = &z
			}
			slice.Endpoints = append(slice.Endpoints, ep)
		}
		err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
			cur, err := cs.DiscoveryV1().EndpointSlices(s.Namespace).Get(ctx, slice.Name, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				_, err = cs.DiscoveryV1().EndpointSlices(s.Namespace).Create(ctx, slice, metav1.CreateOptions{})
				return err
			}
			if err != nil {
				return err
			}
			slice.ResourceVersion = cur.ResourceVersion
			_, err = cs.DiscoveryV1().EndpointSlices(s.Namespace).Update(ctx, slice, metav1.UpdateOptions{})
			return err
		})
		if err != nil {
			return fmt.Errorf("endpoint slice %s/%s: %w", s.Namespace, slice.Name, err)
		}
	}
	return nil
}

// selects says whether every key of sel has its value in labels.
func selects(sel, labels map[string]string) bool {
	for k, v := range sel {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// kubeAnnotate sets annotations on c's Service ns/name (a nil value
// removes the key) and returns its annotations after the update.
func (l *lab) kubeAnnotate(ctx context.Context, c *clusterLayout, ns, name string, set map[string]*string) (map[string]string, error) {
	var out map[string]string
	err := l.withKube(c, func(cs kubernetes.Interface) error {
		return retry.RetryOnConflict(retry.DefaultRetry, func() error {
			svc, err := cs.CoreV1().Services(ns).Get(ctx, name, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return fmt.Errorf("cluster %s has no service %s/%s", c.Name, ns, name)
			}
			if err != nil {
				return err
			}
			if svc.Annotations == nil {
				svc.Annotations = map[string]string{}
			}
			for k, v := range set {
				if v == nil {
					delete(svc.Annotations, k)
				} else {
					svc.Annotations[k] = *v
				}
			}
			up, err := cs.CoreV1().Services(ns).Update(ctx, svc, metav1.UpdateOptions{})
			if err != nil {
				return err
			}
			out = up.Annotations
			return nil
		})
	})
	return out, err
}

// kubeSync writes the Ready conditions of nodes and pods (all of cluster
// c) and c's EndpointSlices from the lab's state (StoppedPods,
// DownNodes).
func (l *lab) kubeSync(ctx context.Context, c *clusterLayout, pods []*podLayout, nodes []*nodeLayout) error {
	return l.withKube(c, func(cs kubernetes.Interface) error {
		var errs []error
		for _, n := range nodes {
			if err := l.setNodeReady(ctx, cs, n, !l.state.DownNodes[n.ref()]); err != nil {
				errs = append(errs, err)
			}
		}
		for _, p := range pods {
			if err := l.setPodReady(ctx, cs, p, l.podReady(p)); err != nil {
				errs = append(errs, err)
			}
		}
		if err := l.syncEndpointSlices(ctx, cs, c); err != nil {
			errs = append(errs, err)
		}
		return errors.Join(errs...)
	})
}

// RunEtcd is `trellis lab etcd`: an embedded etcd for a Kubernetes-mode
// cluster's kube-apiserver, serving plain HTTP on listen (a loopback
// address inside the cluster's API server namespace) until ctx ends.
func RunEtcd(ctx context.Context, dataDir, listen string, log *slog.Logger) error {
	ap, err := netip.ParseAddrPort(listen)
	if err != nil || !ap.Addr().IsLoopback() {
		return fmt.Errorf("lab etcd: --listen %q: want a loopback host:port (it serves without TLS)", listen)
	}
	if dataDir == "" {
		return errors.New("lab etcd: --data-dir is required")
	}
	e, err := kvstore.StartEmbedded(ctx, kvstore.EmbeddedConfig{Dir: dataDir, Name: "kube", ClientAddr: listen, Logger: log})
	if err != nil {
		return fmt.Errorf("lab etcd: %w", err)
	}
	log.Info("etcd for kube-apiserver serving", "endpoints", e.Endpoints(), "dir", dataDir)
	ctx, cancel := context.WithCancel(ctx)
	maintained := make(chan struct{})
	go func() {
		defer close(maintained)
		e.Run(ctx) // returns nil when ctx ends
	}()
	select {
	case <-ctx.Done():
	case err = <-e.Server().Err():
		err = fmt.Errorf("lab etcd: serve: %w", err)
	}
	cancel()
	<-maintained
	if cerr := e.Close(); cerr != nil {
		log.Warn("closing etcd", "err", cerr)
	}
	return err
}

// kubeSetStopped records p as stopped (or not) and writes its Ready
// conditions and its endpoint's through the Kubernetes API.
func (l *lab) kubeSetStopped(ctx context.Context, p *podLayout, stopped bool) error {
	if stopped {
		if l.state.StoppedPods == nil {
			l.state.StoppedPods = map[string]bool{}
		}
		l.state.StoppedPods[p.ref()] = true
	} else {
		delete(l.state.StoppedPods, p.ref())
	}
	return l.kubeSync(ctx, p.node.cluster, []*podLayout{p}, nil)
}

// annotateKube is Annotate in Kubernetes mode: it updates the Service's
// annotations (KEY=VALUE sets, KEY- removes) in c's kube-apiserver.
func (l *lab) annotateKube(ctx context.Context, c *clusterLayout, ns, name string, kvs []string) error {
	set := map[string]*string{}
	for _, kv := range kvs {
		if k, found := strings.CutSuffix(kv, "-"); found && !strings.Contains(kv, "=") {
			set[k] = nil
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return fmt.Errorf("lab annotate: %q: want KEY=VALUE or KEY-", kv)
		}
		set[k] = &v
	}
	annotations, err := l.kubeAnnotate(ctx, c, ns, name, set)
	if err != nil {
		return err
	}
	for si, s := range c.Services {
		if s.Namespace == ns && s.Name == name {
			c.Services[si].Annotations = maps.Clone(annotations)
		}
	}
	if err := l.save(); err != nil {
		return err
	}
	fmt.Fprintf(l.opts.Out, "%s: Service %s/%s annotations now %v (through its kube-apiserver)\n", c.Name, ns, name, annotations)
	return nil
}

// kubeProblems are the Kubernetes-mode processes that do not run.
func (l *lab) kubeProblems() []string {
	if !l.kubernetes() {
		return nil
	}
	var out []string
	for _, c := range l.lay.clusters {
		for _, key := range []string{kubeEtcdKey(c), kubeKey(c)} {
			if p := l.state.Procs[key]; !p.Alive() {
				out = append(out, fmt.Sprintf("%s does not run (log in %s)", key, filepath.Join(l.dir, "logs")))
			}
		}
	}
	return out
}
