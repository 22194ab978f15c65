// Package charttest checks the Helm chart in deploy/helm/trellis: it renders
// it with Helm as a Go library (what `helm template` does) with several sets
// of values, checks the properties the agent and the API server rely on,
// and applies every rendered object to a real kube-apiserver with
// server-side dry-run, so the API server's own validation, defaulting and
// admission judge the output.
//
// What this cannot prove: there is no kubelet or container runtime here, so
// no pod of the chart runs. TestRenderedAPIServerRuns comes closest: it
// runs the trellis binary with the rendered config file, the rendered
// Secret's files and the rendered RBAC as its only permissions.
package charttest

import (
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/releaseutil"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"
)

// kubeVersion is the version of the kube-apiserver `make test` builds
// (hack/kube-apiserver); the chart renders for it.
const kubeVersion = "v1.34.3"

// valueSet is one way to install the chart.
type valueSet struct {
	name      string
	namespace string
	values    string // YAML
}

// The sets every test renders: the defaults with only the required values,
// and two that change everything that has a choice.
var valueSets = []valueSet{
	{
		name: "defaults", namespace: "trellis",
		values: `
cluster:
  name: eu-west
  id: 1
  podCIDRs: [10.1.0.0/16]
`,
	},
	{
		name: "nodeport-emptydir-wireguard", namespace: "mesh-system",
		values: `
cluster:
  name: us-east-2
  id: 300
  maxConnectedClusters: 511
  region: us-east
  zone: us-east-2a
  podCIDRs: [10.20.0.0/16, "fd00:20::/56"]
  serviceCIDRs: [10.21.0.0/16]
  encryption: wireguard
image:
  repository: registry.example.com/mesh/trellis
  tag: v9.9.9
  pullPolicy: Always
logLevel: debug
apiserver:
  advertiseAddress: 192.0.2.10
  service:
    type: NodePort
    nodePort: 31379
  storage:
    type: emptyDir
agent:
  tunnel: geneve
  tunnelPort: 6082
  cgroupHostRoot: /sys/fs/cgroup/unified
  clustermeshSecret: mesh-clusters
  extraArgs: [--health-interval=200ms]
`,
	},
	{
		name: "loadbalancer-pvc-ipsec", namespace: "trellis-lb",
		values: `
cluster:
  name: ap-south
  id: 7
  podCIDRs: [10.7.0.0/16]
  encryption: ipsec
apiserver:
  advertiseAddress: mesh.ap-south.example.com
  service:
    type: LoadBalancer
    loadBalancerSourceRanges: [198.51.100.0/24]
    annotations:
      service.beta.kubernetes.io/aws-load-balancer-type: nlb
  storage:
    size: 5Gi
    storageClassName: fast-ssd
    etcdQuotaBackendBytes: 2147483648
  pki:
    existingSecret: ap-south-pki
agent:
  tunnel: native
  encryption: false
  ipsecKeySecret: ap-south-ipsec
  mountTunDevice: false
  privileged: true
`,
	},
}

// chartDir is deploy/helm/trellis, next to this module.
func chartDir(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", "trellis"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "Chart.yaml")); err != nil {
		t.Fatalf("chart not found: %v", err)
	}
	return dir
}

// render runs what `helm template` runs and returns the objects in
// install order (Helm's kind order).
func render(t *testing.T, vs valueSet) ([]*unstructured.Unstructured, error) {
	t.Helper()
	chrt, err := loader.Load(chartDir(t))
	if err != nil {
		t.Fatalf("load chart: %v", err)
	}
	vals, err := chartutil.ReadValues([]byte(vs.values))
	if err != nil {
		t.Fatalf("values %s: %v", vs.name, err)
	}
	kv, err := chartutil.ParseKubeVersion(kubeVersion)
	if err != nil {
		t.Fatal(err)
	}
	install := action.NewInstall(&action.Configuration{Log: func(string, ...any) {}})
	install.DryRun = true
	install.ClientOnly = true
	install.Replace = true
	install.ReleaseName = "trellis"
	install.Namespace = vs.namespace
	install.KubeVersion = kv
	rel, err := install.Run(chrt, vals.AsMap())
	if err != nil {
		return nil, err
	}
	var objs []*unstructured.Unstructured
	for _, m := range releaseutil.SplitManifests(rel.Manifest) {
		var o map[string]any
		if err := yaml.Unmarshal([]byte(m), &o); err != nil {
			t.Fatalf("%s: rendered YAML does not parse: %v\n%s", vs.name, err, m)
		}
		if len(o) == 0 {
			continue
		}
		objs = append(objs, &unstructured.Unstructured{Object: o})
	}
	// SplitManifests returns a map; sort as Helm installs (its kind order),
	// then by name, so failures read the same every run.
	sort.SliceStable(objs, func(i, j int) bool {
		ki, kj := kindRank(objs[i].GetKind()), kindRank(objs[j].GetKind())
		if ki != kj {
			return ki < kj
		}
		return objs[i].GetName() < objs[j].GetName()
	})
	return objs, nil
}

func kindRank(kind string) int {
	if i := slices.Index(releaseutil.InstallOrder, kind); i >= 0 {
		return i
	}
	return len(releaseutil.InstallOrder)
}

func mustRender(t *testing.T, vs valueSet) []*unstructured.Unstructured {
	t.Helper()
	objs, err := render(t, vs)
	if err != nil {
		t.Fatalf("render %s: %v", vs.name, err)
	}
	return objs
}

// find returns the one object of kind and name, decoded into out.
func find(t *testing.T, objs []*unstructured.Unstructured, kind, name string, out any) {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.Object, out, true); err != nil {
				t.Fatalf("%s %s: %v", kind, name, err)
			}
			return
		}
	}
	t.Fatalf("no %s %s rendered", kind, name)
}

func has(o []*unstructured.Unstructured, kind, name string) bool {
	return slices.ContainsFunc(o, func(u *unstructured.Unstructured) bool { return u.GetKind() == kind && u.GetName() == name })
}

// argMap turns --flag=value arguments into a map (a repeated flag keeps
// its last value) and fails on an argument of another form.
func argMap(t *testing.T, args []string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, a := range args[1:] {
		if !strings.HasPrefix(a, "--") {
			t.Fatalf("argument %q is not a --flag", a)
		}
		name, value, ok := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !ok {
			value = "true"
		}
		out[name] = value
	}
	return out
}

// mountOf returns the volume mounted at path in c and the pod's volume.
func mountOf(t *testing.T, spec corev1.PodSpec, c corev1.Container, path string) (corev1.VolumeMount, corev1.Volume) {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.MountPath == path {
			for _, v := range spec.Volumes {
				if v.Name == m.Name {
					return m, v
				}
			}
			t.Fatalf("mount %s names volume %q, which the pod does not have", path, m.Name)
		}
	}
	t.Fatalf("container %s mounts nothing at %s", c.Name, path)
	return corev1.VolumeMount{}, corev1.Volume{}
}

func TestChartRenders(t *testing.T) {
	for _, vs := range valueSets {
		t.Run(vs.name, func(t *testing.T) {
			objs := mustRender(t, vs)
			var kinds []string
			for _, o := range objs {
				kinds = append(kinds, o.GetKind()+"/"+o.GetName())
				// Every namespaced object lands in the release namespace.
				switch o.GetKind() {
				case "ClusterRole", "ClusterRoleBinding":
					if o.GetNamespace() != "" {
						t.Errorf("%s %s has namespace %q", o.GetKind(), o.GetName(), o.GetNamespace())
					}
				default:
					if o.GetNamespace() != vs.namespace {
						t.Errorf("%s %s in namespace %q, want %q", o.GetKind(), o.GetName(), o.GetNamespace(), vs.namespace)
					}
				}
			}
			t.Logf("%d objects: %s", len(objs), strings.Join(kinds, ", "))
			vals, err := chartutil.ReadValues([]byte(vs.values))
			if err != nil {
				t.Fatal(err)
			}
			checkAgent(t, vs, vals, objs)
			checkAPIServer(t, vs, vals, objs)
		})
	}
}

func checkAgent(t *testing.T, vs valueSet, vals chartutil.Values, objs []*unstructured.Unstructured) {
	var ds appsv1.DaemonSet
	find(t, objs, "DaemonSet", "trellis-agent", &ds)
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("agent: not on the host network")
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("agent: %d containers", len(spec.Containers))
	}
	c := spec.Containers[0]
	sc := c.SecurityContext
	privileged, _ := vals.PathValue("agent.privileged")
	if privileged == true {
		if sc == nil || sc.Privileged == nil || !*sc.Privileged {
			t.Error("agent.privileged=true did not make the container privileged")
		}
	} else {
		if sc == nil || sc.Capabilities == nil || sc.Privileged == nil || *sc.Privileged {
			t.Fatalf("agent: security context %+v: want unprivileged with capabilities", sc)
		}
		if got := sc.Capabilities.Drop; !slices.Equal(got, []corev1.Capability{"ALL"}) {
			t.Errorf("agent: drops %v, want ALL", got)
		}
		if got := sc.Capabilities.Add; !slices.Equal(got, []corev1.Capability{"NET_ADMIN", "BPF", "PERFMON"}) {
			t.Errorf("agent: adds %v, want NET_ADMIN, BPF, PERFMON", got)
		}
	}

	args := argMap(t, c.Args)
	if c.Args[0] != "agent" {
		t.Errorf("agent: runs %q, want the agent subcommand", c.Args[0])
	}
	clusterName, _ := vals.PathValue("cluster.name")
	for flag, want := range map[string]string{
		"kubernetes":   "true",
		"node-name":    "$(NODE_NAME)",
		"cluster-name": fmt.Sprint(clusterName),
		"cgroup-root":  "/run/trellis/cgroupv2",
		"config-dir":   "/etc/trellis/clustermesh",
		"state-dir":    "/var/lib/trellis",
	} {
		if args[flag] != want {
			t.Errorf("agent: --%s=%q, want %q", flag, args[flag], want)
		}
	}
	// NODE_NAME comes from the downward API.
	i := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "NODE_NAME" })
	if i < 0 || c.Env[i].ValueFrom == nil || c.Env[i].ValueFrom.FieldRef == nil || c.Env[i].ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("agent: NODE_NAME is not spec.nodeName from the downward API: %+v", c.Env)
	}

	// The paths behind the flags are the host's, or the clustermesh Secret.
	cgroupHost := "/sys/fs/cgroup"
	if v, err := vals.PathValue("agent.cgroupHostRoot"); err == nil {
		cgroupHost = v.(string)
	}
	for path, host := range map[string]string{
		"/sys/fs/bpf":       "/sys/fs/bpf",
		args["cgroup-root"]: cgroupHost,
		args["state-dir"]:   "/var/lib/trellis",
		"/var/run/trellis":  "/var/run/trellis",
	} {
		m, v := mountOf(t, spec, c, path)
		if v.HostPath == nil || v.HostPath.Path != host {
			t.Errorf("agent: %s is %+v, want host path %s", path, v.VolumeSource, host)
		}
		if m.ReadOnly {
			t.Errorf("agent: %s is read-only", path)
		}
	}
	if m, _ := mountOf(t, spec, c, "/sys/fs/bpf"); m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationHostToContainer {
		t.Errorf("agent: bpffs propagation %v, want HostToContainer", m.MountPropagation)
	}
	secretName := "trellis-clustermesh"
	if v, err := vals.PathValue("agent.clustermeshSecret"); err == nil {
		secretName = v.(string)
	}
	_, v := mountOf(t, spec, c, args["config-dir"])
	if v.Secret == nil || v.Secret.SecretName != secretName || v.Secret.Optional == nil || !*v.Secret.Optional {
		t.Errorf("agent: --config-dir is %+v, want the optional Secret %s", v.VolumeSource, secretName)
	}

	// RBAC: exactly what the agent with --kubernetes uses.
	var role rbacv1.ClusterRole
	find(t, objs, "ClusterRole", "trellis-agent", &role)
	checkRules(t, "agent", role.Rules, map[string][]string{
		"/nodes":       {"get", "patch"},
		"/pods":        {"list", "watch"},
		"/pods/status": {"patch"},
	})
	// Metrics and /v1/status on the node's address only.
	if got := args["metrics-listen"]; got != "[$(HOST_IP)]:9962" {
		t.Errorf("agent: --metrics-listen=%q, want the node's address", got)
	}
	i = slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "HOST_IP" })
	if i < 0 || c.Env[i].ValueFrom == nil || c.Env[i].ValueFrom.FieldRef == nil || c.Env[i].ValueFrom.FieldRef.FieldPath != "status.hostIP" {
		t.Errorf("agent: HOST_IP is not status.hostIP from the downward API: %+v", c.Env)
	}
}

func checkAPIServer(t *testing.T, vs valueSet, vals chartutil.Values, objs []*unstructured.Unstructured) {
	var dep appsv1.Deployment
	find(t, objs, "Deployment", "trellis-apiserver", &dep)
	if dep.Spec.Replicas == nil || *dep.Spec.Replicas != 1 || dep.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
		t.Errorf("apiserver: replicas %v, strategy %q; want one, Recreate (one etcd member on one volume)", dep.Spec.Replicas, dep.Spec.Strategy.Type)
	}
	spec := dep.Spec.Template.Spec
	c := spec.Containers[0]
	if sc := c.SecurityContext; sc == nil || sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0 {
		t.Errorf("apiserver: security context %+v, want every capability dropped", sc)
	}

	var cm corev1.ConfigMap
	find(t, objs, "ConfigMap", "trellis-apiserver", &cm)
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(cm.Data["config.yaml"]), &cfg); err != nil {
		t.Fatalf("apiserver config: %v", err)
	}
	args := argMap(t, c.Args)
	if c.Args[0] != "apiserver" || args["config"] != "/etc/trellis/apiserver/config.yaml" {
		t.Errorf("apiserver: args %v", c.Args)
	}
	if _, v := mountOf(t, spec, c, filepath.Dir(args["config"])); v.ConfigMap == nil || v.ConfigMap.Name != cm.Name {
		t.Errorf("apiserver: config dir is %+v", v.VolumeSource)
	}
	for key, path := range map[string]string{"clusterName": "cluster.name", "clusterID": "cluster.id", "podCIDRs": "cluster.podCIDRs"} {
		want, _ := vals.PathValue(path)
		if fmt.Sprint(cfg[key]) != fmt.Sprint(want) {
			t.Errorf("apiserver config %s = %v, want %v", key, cfg[key], want)
		}
	}
	if cfg["source"] != "kubernetes" {
		t.Errorf("apiserver config source = %v", cfg["source"])
	}

	// The state dir is on the volume the values chose; the secrets come
	// from the PKI Secret.
	storage := "persistentVolumeClaim"
	if v, err := vals.PathValue("apiserver.storage.type"); err == nil {
		storage = v.(string)
	}
	_, state := mountOf(t, spec, c, cfg["stateDir"].(string))
	switch {
	case storage == "emptyDir" && state.EmptyDir == nil,
		storage == "persistentVolumeClaim" && (state.PersistentVolumeClaim == nil || !has(objs, "PersistentVolumeClaim", state.PersistentVolumeClaim.ClaimName)):
		t.Errorf("apiserver: state dir on %+v, want %s", state.VolumeSource, storage)
	}
	if storage == "emptyDir" && has(objs, "PersistentVolumeClaim", "trellis-apiserver") {
		t.Error("apiserver: a PVC rendered for emptyDir storage")
	}
	pkiSecret := "trellis-apiserver-pki"
	if v, err := vals.PathValue("apiserver.pki.existingSecret"); err == nil && v != "" {
		pkiSecret = v.(string)
		if has(objs, "Secret", "trellis-apiserver-pki") {
			t.Error("apiserver: the chart made a PKI Secret although existingSecret is set")
		}
	} else {
		var sec corev1.Secret
		find(t, objs, "Secret", pkiSecret, &sec)
		checkPKISecret(t, sec)
	}
	if m, v := mountOf(t, spec, c, cfg["secretsDir"].(string)); v.Secret == nil || v.Secret.SecretName != pkiSecret || !m.ReadOnly {
		t.Errorf("apiserver: secretsDir is %+v, want Secret %s read-only", v.VolumeSource, pkiSecret)
	}

	// The front door: the Service's port is the port the server listens on
	// and advertises, the node port too with NodePort.
	var svc corev1.Service
	find(t, objs, "Service", "trellis-apiserver", &svc)
	svcType := "ClusterIP"
	if v, err := vals.PathValue("apiserver.service.type"); err == nil {
		svcType = v.(string)
	}
	if string(svc.Spec.Type) != svcType {
		t.Errorf("apiserver Service type %s, want %s", svc.Spec.Type, svcType)
	}
	listen := cfg["etcdListen"].(string)
	port := svc.Spec.Ports[0]
	if !strings.HasSuffix(listen, fmt.Sprintf(":%d", port.Port)) {
		t.Errorf("apiserver: etcdListen %s, Service port %d: remote clusters are given the listen port", listen, port.Port)
	}
	if svcType == "NodePort" && port.NodePort != port.Port {
		t.Errorf("apiserver: node port %d, listen port %d: must be the same", port.NodePort, port.Port)
	}
	advertise, _ := vals.PathValue("apiserver.advertiseAddress")
	if advertise == nil {
		advertise = "trellis-apiserver." + vs.namespace + ".svc"
	}
	if cfg["advertiseAddress"] != advertise {
		t.Errorf("apiserver: advertiseAddress %v, want %v", cfg["advertiseAddress"], advertise)
	}

	var role rbacv1.ClusterRole
	find(t, objs, "ClusterRole", "trellis-apiserver", &role)
	checkRules(t, "apiserver", role.Rules, map[string][]string{
		"/nodes":                          {"list", "watch"},
		"/pods":                           {"list", "watch"},
		"/services":                       {"list", "watch"},
		"discovery.k8s.io/endpointslices": {"list", "watch"},
	})
	var nsRole rbacv1.Role
	find(t, objs, "Role", "trellis-apiserver", &nsRole)
	checkRules(t, "apiserver (namespace)", nsRole.Rules, map[string][]string{
		"/configmaps":                       {"create"},
		"/configmaps[trellis-cluster-info]": {"get", "update"},
		"/secrets":                          {"delete", "list", "update", "watch"},
	})
	if cfg["kubernetesNamespace"] != vs.namespace {
		t.Errorf("apiserver config kubernetesNamespace = %v, want the release namespace %s", cfg["kubernetesNamespace"], vs.namespace)
	}
}

// checkRules compares RBAC rules with group/resource[names] → verbs.
func checkRules(t *testing.T, who string, rules []rbacv1.PolicyRule, want map[string][]string) {
	t.Helper()
	got := map[string][]string{}
	for _, r := range rules {
		if len(r.NonResourceURLs) > 0 {
			t.Errorf("%s: unexpected rule %+v", who, r)
		}
		names := ""
		if len(r.ResourceNames) > 0 {
			names = "[" + strings.Join(r.ResourceNames, ",") + "]"
		}
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				got[g+"/"+res+names] = append(got[g+"/"+res+names], r.Verbs...)
			}
		}
	}
	for k := range got {
		slices.Sort(got[k])
	}
	for k := range want {
		slices.Sort(want[k])
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("%s RBAC:\n got %v\nwant %v", who, got, want)
	}
}

// checkPKISecret: the chart's Secret holds two ECDSA CAs the server
// accepts (CA:TRUE, certSign) and a token it accepts (>= 43 characters).
func checkPKISecret(t *testing.T, sec corev1.Secret) {
	t.Helper()
	for _, name := range []string{"ca", "client-ca"} {
		block, _ := pem.Decode(sec.Data[name+".crt"])
		if block == nil {
			t.Fatalf("PKI Secret: %s.crt is not PEM", name)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatalf("PKI Secret: %s.crt: %v", name, err)
		}
		if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
			t.Errorf("PKI Secret: %s.crt is not a CA", name)
		}
		kb, _ := pem.Decode(sec.Data[name+".key"])
		if kb == nil {
			t.Fatalf("PKI Secret: %s.key is not PEM", name)
		}
		key, err := x509.ParseECPrivateKey(kb.Bytes)
		if err != nil {
			t.Fatalf("PKI Secret: %s.key: %v", name, err)
		}
		if !key.PublicKey.Equal(cert.PublicKey.(*ecdsa.PublicKey)) {
			t.Errorf("PKI Secret: %s.key does not match %s.crt", name, name)
		}
	}
	if tok := string(sec.Data["admin.token"]); len(tok) < 43 {
		t.Errorf("PKI Secret: admin token of %d characters", len(tok))
	}
}

// Values the binaries would refuse fail the render, naming the value.
func TestChartRefusesBadValues(t *testing.T) {
	base := valueSets[0].values
	for _, tc := range []struct{ values, want string }{
		{"cluster: {id: 1, podCIDRs: [10.1.0.0/16]}", "cluster.name"},
		{"cluster: {name: Bad_Name, id: 1, podCIDRs: [10.1.0.0/16]}", "cluster.name"},
		{"cluster: {name: eu, podCIDRs: [10.1.0.0/16]}", "cluster.id 0"},
		{"cluster: {name: eu, id: 300, podCIDRs: [10.1.0.0/16]}", "cluster.id 300"},
		{"cluster: {name: eu, id: 1}", "cluster.podCIDRs is required"},
		{base + "  encryption: tls\n", "cluster.encryption"},
		{base + "  encryption: ipsec\n", "agent.ipsecKeySecret"},
		{base + "agent: {tunnel: gre}\n", "agent.tunnel"},
		{base + "apiserver: {service: {type: ExternalName}}\n", "apiserver.service.type"},
		{base + "apiserver: {storage: {type: hostPath}}\n", "apiserver.storage.type"},
	} {
		_, err := render(t, valueSet{name: "bad", namespace: "trellis", values: tc.values})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("values %q: render error %v, want one naming %q", tc.values, err, tc.want)
		}
	}
}

// decodeSecretData is for Secrets read back as unstructured objects
// (base64 strings).
func decodeSecretData(t *testing.T, o *unstructured.Unstructured) map[string][]byte {
	t.Helper()
	data, _, _ := unstructured.NestedStringMap(o.Object, "data")
	out := map[string][]byte{}
	for k, v := range data {
		b, err := base64.StdEncoding.DecodeString(v)
		if err != nil {
			t.Fatalf("Secret %s: %s: %v", o.GetName(), k, err)
		}
		out[k] = b
	}
	return out
}
