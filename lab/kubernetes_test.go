package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/source"
	"github.com/trellis-mesh/trellis/internal/kubetest"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// TestLabKubernetes runs the default lab in Kubernetes mode through the
// real binary: a real kube-apiserver per cluster (bin/kube-apiserver,
// skipped when it is not built), the mesh API servers on the Kubernetes
// source, the agents with --kubernetes on their own RBAC-limited tokens.
// The same traffic checks as in registry mode must pass through this
// path: verify, affinity by annotation, failover when both eu echo pods
// are stopped and back when started, a node down and up; and down must
// leave nothing behind. No kubelet or controller manager runs: the lab
// writes the objects they would (what this test checks besides traffic).
func TestLabKubernetes(t *testing.T) {
	privtest.RequireRoot(t)
	kubeBin := kubetest.Binary(t)
	r := newLabRun(t)
	linksBefore := rootLinks(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	start := time.Now()
	out, err := r.run(ctx, "up", "--kubernetes", "--kube-apiserver", kubeBin, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("lab up --kubernetes: %s", time.Since(start).Round(time.Millisecond))
	var rep Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("lab up -o json: %v\n%s", err, out)
	}
	st := r.state(t)
	if !st.Kubernetes || !rep.Kubernetes {
		t.Fatalf("Kubernetes mode: state.json says %v, the report %v; want both true", st.Kubernetes, rep.Kubernetes)
	}
	if !rep.Healthy {
		t.Errorf("lab up report: not healthy: %v", rep.Problems)
	}
	procs := map[string]*Proc{}
	remember := func() {
		st, err := loadState(filepath.Join(BaseDir, r.name))
		if err != nil {
			return
		}
		for k, p := range st.Procs {
			procs[fmt.Sprintf("%s[%d]", k, p.PID)] = p
		}
	}
	remember()
	for _, c := range []string{"eu", "us"} {
		for _, key := range []string{"kube-apiserver/" + c, "kube-etcd/" + c, "apiserver/" + c} {
			if !st.Procs[key].Alive() {
				t.Errorf("process %s does not run: %+v", key, st.Procs[key])
			}
		}
		if argv := st.Procs["apiserver/"+c].Argv; !slices.Contains(argv, "kubernetes") {
			t.Errorf("mesh API server of %s runs %v, want --source kubernetes", c, argv)
		}
	}
	for _, n := range rep.Nodes {
		argv := st.Procs["agent/"+n.Cluster+"/"+n.Name].Argv
		if !slices.Contains(argv, "--kubernetes") || slices.Contains(argv, "--registry-url") {
			t.Errorf("agent of %s/%s runs %v, want --kubernetes and no --registry-url", n.Cluster, n.Name, argv)
		}
		if !n.Ready || len(n.ReadyClusters) != 2 {
			t.Errorf("agent of %s/%s: ready=%v, clusters ready %v, %s", n.Cluster, n.Name, n.Ready, n.ReadyClusters, n.Error)
		}
	}

	step := func(name string, fn func(t *testing.T)) {
		start := time.Now()
		t.Run(name, fn)
		t.Logf("%s: %s", name, time.Since(start).Round(time.Millisecond))
		remember()
	}

	step("Objects", func(t *testing.T) {
		// What the agents and the source read: Nodes with their
		// underlay address and pod CIDR; the echo pods marked healthy by
		// their node's agent, which can only have patched them with its
		// own token, through the RBAC the lab binds.
		withKubeOf(t, r, "eu", func(cs kubernetes.Interface) {
			for _, name := range []string{"n1", "n2"} {
				n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				want := map[string]string{"n1": "192.168.100.101", "n2": "192.168.100.102"}[name]
				if len(n.Status.Addresses) == 0 || n.Status.Addresses[0].Address != want || len(n.Spec.PodCIDRs) != 1 {
					t.Errorf("node %s: addresses %v, pod CIDRs %v; want InternalIP %s and one pod CIDR", name, n.Status.Addresses, n.Spec.PodCIDRs, want)
				}
			}
			testutil.EventuallyNoError(t, 20*time.Second, "echo pods marked healthy by their agents", func() error {
				for _, name := range []string{"echo-n1", "echo-n2"} {
					p, err := cs.CoreV1().Pods(DefaultNamespace).Get(ctx, name, metav1.GetOptions{})
					if err != nil {
						return err
					}
					if got := podCondition(p, source.ConditionHealthy); got != corev1.ConditionTrue {
						return fmt.Errorf("pod %s: condition %s = %q", name, source.ConditionHealthy, got)
					}
				}
				return nil
			})
		})
	})

	step("Verify", func(t *testing.T) {
		vr := r.verify(ctx, t)
		if vr.Failed != 0 || vr.Passed == 0 {
			for _, c := range vr.Checks {
				if !c.OK && c.Skipped == "" {
					t.Logf("failed: %s %s → %s (%s): %s", c.Kind, c.From, c.To, c.Target, c.Detail)
				}
			}
			t.Fatalf("lab verify: %d passed, %d failed", vr.Passed, vr.Failed)
		}
		t.Logf("lab verify: %d passed, %d failed, %d skipped", vr.Passed, vr.Failed, vr.Skipped)
	})

	step("Affinity", func(t *testing.T) {
		for _, c := range []struct {
			affinity string
			want     []string
		}{
			{"local", []string{"eu"}},
			{"remote", []string{"us"}},
			{"none", []string{"eu", "us"}},
		} {
			r.annotate(ctx, t, "trellis.io/affinity="+c.affinity)
			r.awaitClusters(ctx, t, "affinity "+c.affinity, c.want)
		}
		withKubeOf(t, r, "eu", func(cs kubernetes.Interface) {
			svc, err := cs.CoreV1().Services(DefaultNamespace).Get(ctx, "echo", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := svc.Annotations["trellis.io/affinity"]; got != "none" {
				t.Errorf("Service default/echo in eu's kube-apiserver: affinity %q, want none", got)
			}
		})
	})

	step("Failover", func(t *testing.T) {
		r.annotate(ctx, t, "trellis.io/affinity=local")
		r.awaitClusters(ctx, t, "affinity local", []string{"eu"})
		pods := []string{"eu/echo-n1", "eu/echo-n2"}
		t.Cleanup(func() {
			for _, p := range pods {
				r.run(context.Background(), "pod", "start", p)
			}
		})
		for _, p := range pods {
			r.must(ctx, t, "pod", "stop", p)
		}
		r.awaitClusters(ctx, t, "failover to us with eu's echo pods stopped", []string{"us"})
		withKubeOf(t, r, "eu", func(cs kubernetes.Interface) {
			if ready := readyEndpoints(ctx, t, cs); len(ready) != 0 {
				t.Errorf("eu's EndpointSlice with both echo pods stopped: ready %v, want none", ready)
			}
			for _, name := range []string{"echo-n1", "echo-n2"} {
				p, err := cs.CoreV1().Pods(DefaultNamespace).Get(ctx, name, metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if got := podCondition(p, corev1.PodReady); got != corev1.ConditionFalse {
					t.Errorf("stopped pod %s: Ready %q, want False", name, got)
				}
			}
		})
		for _, p := range pods {
			r.must(ctx, t, "pod", "start", p)
		}
		r.awaitClusters(ctx, t, "back to eu with its echo pods started", []string{"eu"})
	})

	step("NodeDownUp", func(t *testing.T) {
		r.annotate(ctx, t, "trellis.io/affinity=local")
		t.Cleanup(func() { r.run(context.Background(), "node", "up", "eu/n2") })
		r.must(ctx, t, "node", "down", "eu/n2")
		r.awaitPods(ctx, t, "eu/n2 down: only eu/echo-n1 answers", []string{"eu/echo-n1"})
		withKubeOf(t, r, "eu", func(cs kubernetes.Interface) {
			n, err := cs.CoreV1().Nodes().Get(ctx, "n2", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range n.Status.Conditions {
				if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
					t.Errorf("node n2 down: its Ready condition is still True")
				}
			}
			if ready := readyEndpoints(ctx, t, cs); !slices.Equal(ready, []string{"10.1.1.10"}) {
				t.Errorf("eu's EndpointSlice with n2 down: ready %v, want [10.1.1.10]", ready)
			}
		})
		r.must(ctx, t, "node", "up", "eu/n2")
		r.awaitPods(ctx, t, "eu/n2 up: both eu echo pods answer", []string{"eu/echo-n1", "eu/echo-n2"})
	})

	step("StatusContext", func(t *testing.T) {
		// `trellis status --context`, as an operator runs it with the
		// cluster's kubeconfig: the kube-apiserver's node proxy reaches
		// each agent's metrics port. Run inside eu's API server
		// namespace, where the kube-apiserver's address is reachable.
		l, err := open(Options{Name: r.name}, false)
		if err != nil {
			t.Fatal(err)
		}
		c, err := l.lay.cluster("eu")
		l.close()
		if err != nil {
			t.Fatal(err)
		}
		var statuses []struct {
			Node   string `json:"node"`
			Error  string `json:"error"`
			Status *struct {
				Clusters []struct {
					Name  string `json:"name"`
					Ready bool   `json:"ready"`
				} `json:"clusters"`
			} `json:"status"`
		}
		testutil.EventuallyNoError(t, 30*time.Second, "every eu agent ready through status --context", func() error {
			out, err := exec.CommandContext(ctx, "ip", "netns", "exec", c.ns, r.bin,
				"status", "--context", "eu", "--kubeconfig", c.kubeconfig(), "-o", "json").Output()
			if err := json.Unmarshal(out, &statuses); err != nil {
				return fmt.Errorf("status --context eu -o json: %w (exit %v): %s", err, err, out)
			}
			if len(statuses) != 2 {
				return fmt.Errorf("status --context eu: %d nodes, want n1 and n2: %s", len(statuses), out)
			}
			for _, ns := range statuses {
				if ns.Status == nil {
					return fmt.Errorf("node %s: %s", ns.Node, ns.Error)
				}
				ready := 0
				for _, cl := range ns.Status.Clusters {
					if cl.Ready {
						ready++
					}
				}
				if ready != 2 {
					return fmt.Errorf("node %s: %d of %d clusters ready", ns.Node, ready, len(ns.Status.Clusters))
				}
			}
			return err // the exit status: 0 once every agent answers with every cluster ready
		})
		// The table names each node; a node without an agent is an error
		// naming it, and exit 1.
		out, err := exec.CommandContext(ctx, "ip", "netns", "exec", c.ns, r.bin,
			"status", "--context", "eu", "--kubeconfig", c.kubeconfig(), "--node", "n1").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "NODE n1") {
			t.Errorf("status --context eu --node n1: %v\n%s", err, out)
		}
		out, err = exec.CommandContext(ctx, "ip", "netns", "exec", c.ns, r.bin,
			"status", "--context", "eu", "--kubeconfig", c.kubeconfig(), "--node", "nosuch").CombinedOutput()
		if err == nil || !strings.Contains(string(out), "agent on nosuch") {
			t.Errorf("status --context eu --node nosuch: want exit 1 naming the node, got %v\n%s", err, out)
		}
	})

	step("Encryption", func(t *testing.T) {
		// On the Kubernetes path a node's WireGuard key reaches the
		// other clusters only as its Node's annotation, written by its
		// own agent through its RBAC, and read by the Kubernetes source.
		// `lab encryption enable` returns once every agent shows every
		// peer encrypted; then only WireGuard crosses the underlay.
		const marker = "trellis-kube-marker"
		opts := Options{Name: r.name, Binary: r.bin}
		start := time.Now()
		if err := SetEncryption(ctx, opts, nil, v1.EncryptionRequest{Type: v1.EncryptionWireGuard}); err != nil {
			t.Fatal(err)
		}
		t.Logf("encryption on in every cluster: %s", time.Since(start).Round(time.Millisecond))
		withKubeOf(t, r, "us", func(cs kubernetes.Interface) {
			n, err := cs.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if n.Annotations[source.AnnotationWireGuardKey] == "" {
				t.Errorf("us/n1's Node has no %s annotation with encryption on: %v", source.AnnotationWireGuardKey, n.Annotations)
			}
		})
		c, err := Capture(ctx, opts, []byte(marker))
		if err != nil {
			t.Fatal(err)
		}
		out, err := r.run(ctx, "curl", "eu/client", "default/echo", "-n", "20", "-o", "json")
		rep, stopErr := c.Stop()
		if err != nil || stopErr != nil {
			t.Fatalf("curl while capturing: %v; capture: %v\n%s", err, stopErr, out)
		}
		t.Logf("capture:\n%s", rep)
		for kind, n := range rep.PodTraffic() {
			if kind != "udp/51871" && n > 0 {
				t.Errorf("encrypted mesh: %d node↔node frames of %s; want only udp/51871 besides gossip (all: %v)", n, kind, rep.NodeToNode)
			}
		}
		if rep.NodeToNode["udp/51871"] == 0 {
			t.Errorf("encrypted mesh: no WireGuard frames between nodes while requests ran: %v", rep.NodeToNode)
		}
		if vr := r.verify(ctx, t); vr.Failed != 0 || vr.Passed == 0 {
			t.Errorf("verify with encryption on: %d passed, %d failed", vr.Passed, vr.Failed)
		}
		start = time.Now()
		if err := SetEncryption(ctx, opts, nil, v1.EncryptionRequest{}); err != nil {
			t.Fatal(err)
		}
		t.Logf("encryption off again: %s", time.Since(start).Round(time.Millisecond))
		withKubeOf(t, r, "us", func(cs kubernetes.Interface) {
			testutil.EventuallyNoError(t, 20*time.Second, "us/n1's key annotation withdrawn", func() error {
				n, err := cs.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
				if err != nil {
					return err
				}
				if k := n.Annotations[source.AnnotationWireGuardKey]; k != "" {
					return fmt.Errorf("still %s=%s", source.AnnotationWireGuardKey, k)
				}
				return nil
			})
		})
	})

	step("Down", func(t *testing.T) {
		start := time.Now()
		if out, err := r.run(ctx, "down"); err != nil {
			t.Fatal(err)
		} else {
			t.Logf("lab down: %s: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(out))
		}
		if left := leftovers(t, r.name, procs); len(left) > 0 {
			t.Errorf("lab down left behind: %s", strings.Join(left, "; "))
		}
		// Only the lab's own names count: other packages' tests, running
		// at the same time, may add links of theirs to the root namespace.
		if added := labLinksAdded(t, st, linksBefore, rootLinks(t)); len(added) > 0 {
			t.Errorf("lab links in the root namespace after down: %v", added)
		}
	})
}

// withKubeOf runs fn with an admin client of cluster's kube-apiserver in
// lab r, dialling from inside the cluster's API server namespace as the
// lab does.
func withKubeOf(t *testing.T, r *labRun, cluster string, fn func(kubernetes.Interface)) {
	t.Helper()
	l, err := open(Options{Name: r.name}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer l.close()
	c, err := l.lay.cluster(cluster)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := l.kube(c)
	if err != nil {
		t.Fatal(err)
	}
	fn(cs)
}

func podCondition(p *corev1.Pod, t corev1.PodConditionType) corev1.ConditionStatus {
	for _, c := range p.Status.Conditions {
		if c.Type == t {
			return c.Status
		}
	}
	return ""
}

// readyEndpoints are the ready addresses of the lab's EndpointSlice of
// default/echo, sorted.
func readyEndpoints(ctx context.Context, t *testing.T, cs kubernetes.Interface) []string {
	t.Helper()
	s, err := cs.DiscoveryV1().EndpointSlices(DefaultNamespace).Get(ctx, "echo-lab", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, ep := range s.Endpoints {
		if ep.Conditions.Ready != nil && *ep.Conditions.Ready {
			out = append(out, ep.Addresses...)
		}
	}
	slices.Sort(out)
	return out
}

// labLinksAdded are the links in after, not in before, that bear a name
// of lab st (a bridge port, a pod's host veth, the bridge, a tunnel).
func labLinksAdded(t *testing.T, st *State, before, after []string) []string {
	t.Helper()
	lay, err := newLayout(st.Name, BaseDir, st.Cgroup2, &st.Topology)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{bridgeName: true}
	for _, c := range lay.clusters {
		names[c.bridgePort] = true
		for _, n := range c.nodes {
			names[n.bridgePort] = true
			for _, p := range n.pods {
				names[p.hostVeth] = true
			}
		}
	}
	var out []string
	for _, l := range after {
		if !slices.Contains(before, l) && (names[l] || strings.HasPrefix(l, "trellis")) {
			out = append(out, l)
		}
	}
	return out
}

// The kube-apiserver's service range holds every VIP of the cluster and
// gives none of them to the default/kubernetes Service.
func TestServiceRange(t *testing.T) {
	svc := func(vips ...string) *Cluster {
		c := &Cluster{Name: "eu"}
		for _, v := range vips {
			c.Services = append(c.Services, Service{Name: "s", VIP: v})
		}
		return c
	}
	for _, tc := range []struct {
		vips []string
		want string // "" when refused
	}{
		{nil, "10.96.0.0/16"},
		{[]string{"10.96.1.10"}, "10.96.0.0/16"},
		{[]string{"10.96.1.10", "10.96.2.10"}, "10.96.0.0/16"},
		{[]string{"10.96.1.10", "10.100.0.5"}, "10.96.0.0/13"},
		{[]string{"10.96.1.10", "10.110.0.5"}, "10.96.0.0/12"},
		{[]string{"172.20.5.5"}, "172.20.0.0/16"},
		{[]string{"10.96.0.1"}, ""},
		{[]string{"10.0.0.10", "10.200.0.10"}, ""},
	} {
		got, err := serviceRange(svc(tc.vips...))
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("VIPs %v: range %s, want an error", tc.vips, got)
		case tc.want != "" && (err != nil || got.String() != tc.want):
			t.Errorf("VIPs %v: range %s, %v; want %s", tc.vips, got, err, tc.want)
		}
	}
	if got, err := serviceRange(&DefaultTopology().Clusters[1]); err != nil || got.String() != "10.96.0.0/16" {
		t.Errorf("default topology's us: %s, %v; want 10.96.0.0/16", got, err)
	}
}
