package agent_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/trellis-mesh/trellis/agent"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/source"
	"github.com/trellis-mesh/trellis/internal/kubetest"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// Encryption on the Kubernetes path, against a real kube-apiserver and a
// real mesh API server on the Kubernetes source: the agent in Kubernetes
// mode, as a service account bound to exactly agent.KubernetesRBAC, puts
// its WireGuard public key on its Node (trellis.io/wg-pub-key) when
// `trellis encryption enable` turns the cluster's setting on (PUT
// /admin/v1/encryption, as the CLI does), and the mesh API server
// publishes it in the node's entry in etcd, which the agent's own view of
// the mesh (clustermesh) and GET /admin/v1/encryption read back; a
// rotation publishes the new key; disabling withdraws the key from the
// Node, then from the node's entry. Then, as a compromised agent could,
// the test writes malformed key annotations on the Node with the agent's
// credentials: the source refuses them and publishes the node without a
// key.
//
// The WireGuard device is a stand-in (agent.EncryptionOnlyDatapath: the
// agent's real encryption step, which decides when a key is published and
// withdrawn, over a fake device): a real device and tunnel need network
// namespaces and a second node to say more, which is the lab's end-to-end
// test's job; here what is proven is the publication path.
func TestKubernetesModeEncryption(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a kube-apiserver and a mesh API server; skipped with -short")
	}
	privtest.RequireRoot(t)
	kbin := kubetest.Binary(t)
	bin := testutil.BuildTrellis(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	kas, cs := startKube(t, ctx, kbin)

	const nodeName = "node-a"
	node, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: nodeName, Annotations: map[string]string{"kept": "yes"}},
		Spec:       corev1.NodeSpec{PodCIDRs: []string{"10.1.0.0/24"}},
	}, metav1.CreateOptions{})
	mustK(t, err)
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.1.5"}}
	_, err = cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	mustK(t, err)

	eu, configDir := startKubeMeshServer(t, bin, kas)
	stateDir := t.TempDir()

	agentCS := agentClient(t, ctx, cs, kas)
	var agentLog testutil.SyncBuffer
	log := slog.New(slog.NewTextHandler(&agentLog, nil))
	cfg := agent.Config{
		NodeName: nodeName, ClusterName: "eu", ConfigDir: configDir, StateDir: stateDir,
		StatusSocket: filepath.Join(stateDir, "agent.sock"), Kubernetes: agentCS, Logger: log,
	}
	mustK(t, cfg.FromKubernetes(ctx))
	dp := agent.NewEncryptionOnlyDatapath("eu", nodeName, stateDir, log)
	a, err := agent.New(cfg, dp)
	mustK(t, err)
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

	// published is the node as the mesh API server published it: in the
	// agent's view of the mesh (through etcd) and in GET
	// /admin/v1/encryption (etcd, read by the server); both must agree.
	published := func() (*v1.Node, error) {
		snap := a.Mesh().Snapshot()
		if snap == nil || snap.Nodes["eu"][nodeName] == nil {
			return nil, errors.New("the mesh has no node eu/" + nodeName)
		}
		n := snap.Nodes["eu"][nodeName]
		var st v1.EncryptionStatus
		if err := json.Unmarshal([]byte(eu.api.Must(t, "GET", "/admin/v1/encryption", "")), &st); err != nil {
			return nil, err
		}
		for _, e := range st.Nodes {
			if e.Name == nodeName {
				if e.WireGuardPublicKey != n.WireGuardPublicKey || e.IPsecKeyIndex != n.IPsecKeyIndex {
					return nil, fmt.Errorf("GET /admin/v1/encryption has %+v, the mesh %q/%d", e, n.WireGuardPublicKey, n.IPsecKeyIndex)
				}
				return n, nil
			}
		}
		return nil, fmt.Errorf("GET /admin/v1/encryption has no node %s: %+v", nodeName, st.Nodes)
	}
	annotations := func() map[string]string {
		n, err := cs.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
		mustK(t, err)
		return n.Annotations
	}
	// keyed waits until the agent publishes key (empty: none) and the
	// Node's annotation and the published entry both say it.
	keyed := func(what string, key func() string) {
		t.Helper()
		testutil.EventuallyNoError(t, 60*time.Second, what, func() error {
			want := key()
			ann := annotations()
			if got, ok := ann[source.AnnotationWireGuardKey]; got != want || ok != (want != "") {
				return fmt.Errorf("node annotation %s=%q (present %v); want %q", source.AnnotationWireGuardKey, got, ok, want)
			}
			if _, ok := ann[source.AnnotationIPsecKeyIndex]; ok || ann["kept"] != "yes" {
				return fmt.Errorf("node annotations %v; want kept=yes and no IPsec index", ann)
			}
			n, err := published()
			if err != nil {
				return err
			}
			if n.WireGuardPublicKey != want {
				return fmt.Errorf("published key %q; want %q", n.WireGuardPublicKey, want)
			}
			return nil
		})
	}
	publishedKey := func() string { k, _ := dp.Published(); return k.WireGuard }

	keyed("encryption off: no key on the Node or in the node's entry", func() string { return "" })
	eu.api.Must(t, "PUT", "/admin/v1/encryption", `{"type":"wireguard"}`)
	testutil.Eventually(t, 60*time.Second, "the agent's encryption step up with a key", func() bool { return publishedKey() != "" })
	first := publishedKey()
	keyed("encryption on: the key on the Node and published", publishedKey)
	t.Logf("key %s on the Node and published", first)

	eu.api.Must(t, "POST", "/admin/v1/encryption/rotate", "")
	testutil.Eventually(t, 60*time.Second, "the key rotated", func() bool { return publishedKey() != first })
	keyed("the rotated key on the Node and published", publishedKey)

	eu.api.Must(t, "PUT", "/admin/v1/encryption", `{"type":""}`)
	keyed("encryption off: the key withdrawn from the Node and the node's entry", func() string { return "" })

	// A compromised agent's malformed keys (its credentials may patch
	// Nodes), with a zone label that tells when the source has read them.
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:"z-bad"},"annotations":{%q:"not-a-key",%q:"16"}}}`,
		corev1.LabelTopologyZone, source.AnnotationWireGuardKey, source.AnnotationIPsecKeyIndex)
	_, err = agentCS.CoreV1().Nodes().Patch(ctx, nodeName, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	mustK(t, err)
	testutil.EventuallyNoError(t, 60*time.Second, "malformed key annotations refused, the node published without a key", func() error {
		n, err := published()
		if err != nil {
			return err
		}
		if n.Zone != "z-bad" {
			return fmt.Errorf("published zone %q: the source has not read the patch yet", n.Zone)
		}
		if n.WireGuardPublicKey != "" || n.IPsecKeyIndex != 0 {
			return fmt.Errorf("published key %q, IPsec index %d from malformed annotations", n.WireGuardPublicKey, n.IPsecKeyIndex)
		}
		return nil
	})
	if st := a.Status(); st.Kubernetes == nil || st.Kubernetes.KeyPatches < 4 || st.Kubernetes.KeyPatchErrors != 0 {
		t.Errorf("kubernetes status %+v; want 4 or more key patches (start, on, rotation, off), none refused", st.Kubernetes)
	}
}
