package lab

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// defaultLayout lays out the default topology as lab "lab" on a hybrid
// cgroup host, touching nothing.
func defaultLayout(t *testing.T) *layout {
	t.Helper()
	topo := DefaultTopology()
	if err := topo.Validate(); err != nil {
		t.Fatal(err)
	}
	lay, err := newLayout("lab", BaseDir, "/sys/fs/cgroup/unified", &topo)
	if err != nil {
		t.Fatal(err)
	}
	return lay
}

func TestDefaultTopologyLayout(t *testing.T) {
	lay := defaultLayout(t)
	want := map[string]string{
		"eu api":        "tl-lab-eu-api 192.168.100.10 eu-api",
		"us/n2":         "tl-lab-us-n2 192.168.100.112 us-n2",
		"eu/client ns":  "tl-lab-eu-n1-client 10.1.1.11 lxc-client",
		"us/echo-n2 ns": "tl-lab-us-n2-echo-n2 10.2.2.10 lxc-echo-n2",
	}
	eu, _ := lay.cluster("eu")
	n2, _ := lay.node("us/n2")
	client, _ := lay.pod("eu/client")
	echo, _ := lay.pod("us/echo-n2")
	got := map[string]string{
		"eu api":        strings.Join([]string{eu.ns, eu.ip.String(), eu.bridgePort}, " "),
		"us/n2":         strings.Join([]string{n2.ns, n2.ip.String(), n2.bridgePort}, " "),
		"eu/client ns":  strings.Join([]string{client.ns, client.ip.String(), client.hostVeth}, " "),
		"us/echo-n2 ns": strings.Join([]string{echo.ns, echo.ip.String(), echo.hostVeth}, " "),
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: got %q, want %q", k, got[k], w)
		}
	}
	if n2.cgroup != "/sys/fs/cgroup/unified/trellis-lab-lab/us-n2" || echo.cgroup != n2.cgroup+"/echo-n2" {
		t.Errorf("cgroups: node %s, pod %s", n2.cgroup, echo.cgroup)
	}
	if n2.pinDir != "/sys/fs/bpf/trellis/lab-us-n2" {
		t.Errorf("pin dir %s", n2.pinDir)
	}
	if len(lay.podRoutes) != 4 {
		t.Errorf("pod routes %v, want both pod CIDRs and both VIPs", lay.podRoutes)
	}
}

func TestTopologyFileRoundTrip(t *testing.T) {
	topo := DefaultTopology()
	data, err := yaml.Marshal(topo)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "topo.yaml")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	back, err := LoadTopology(path)
	if err != nil {
		t.Fatalf("%v\n%s", err, data)
	}
	if len(back.Clusters) != 2 || back.Clusters[1].Nodes[1].Pods[0].IP != "10.2.2.10" {
		t.Errorf("round trip lost something: %+v", back)
	}
	if err := os.WriteFile(path, append(data, []byte("bogus: 1\n")...), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadTopology(path); err == nil || !strings.Contains(err.Error(), "bogus") {
		t.Errorf("unknown key: got %v, want an error naming it", err)
	}
}

func TestTopologyValidateRejects(t *testing.T) {
	cases := map[string]func(*Topology){
		"duplicate id": func(t *Topology) { t.Clusters[1].ID = 1 },
		"overlapping cidrs": func(t *Topology) {
			t.Clusters[1].PodCIDR = "10.1.0.0/16"
			t.Clusters[1].Nodes[0].PodCIDR = "10.1.9.0/24"
		},
		"node cidr outside":   func(t *Topology) { t.Clusters[0].Nodes[0].PodCIDR = "10.9.1.0/24" },
		"pod ip outside node": func(t *Topology) { t.Clusters[0].Nodes[0].Pods[0].IP = "10.1.2.50" },
		"duplicate pod":       func(t *Topology) { t.Clusters[0].Nodes[1].Pods[0].Name = "client" },
		"vip in pod cidr":     func(t *Topology) { t.Clusters[0].Services[0].VIP = "10.2.9.9" },
		"node named api":      func(t *Topology) { t.Clusters[0].Nodes[0].Name = "api" },
		"small underlay":      func(t *Topology) { t.Underlay = "192.168.100.0/25" },
	}
	for name, mutate := range cases {
		topo := DefaultTopology()
		mutate(&topo)
		if err := topo.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"lab", "t1", "abc123def456"} {
		if err := ValidateName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "a-b", "Lab", "abc123def4567", "a/b"} {
		if err := ValidateName(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestExtendLayout: a cluster added to a running lab (`lab add-cluster`)
// takes the next free addresses and changes no name or address of the
// running ones; one that would rename the bridge ports is refused.
func TestExtendLayout(t *testing.T) {
	old := DefaultTopology()
	if err := old.Validate(); err != nil {
		t.Fatal(err)
	}
	oldLay, err := newLayout("lab", BaseDir, "/sys/fs/cgroup", &old)
	if err != nil {
		t.Fatal(err)
	}
	topo, lay, err := extendLayout("lab", BaseDir, "/sys/fs/cgroup", old, oldLay, StandardCluster("ap", 3, "ap", 1))
	if err != nil {
		t.Fatal(err)
	}
	if len(old.Clusters) != 2 || len(topo.Clusters) != 3 {
		t.Fatalf("clusters: old %d, new %d; want 2 and 3", len(old.Clusters), len(topo.Clusters))
	}
	ap, _ := lay.cluster("ap")
	n1, _ := lay.node("ap/n1")
	client, _ := lay.pod("ap/client")
	got := strings.Join([]string{ap.ns, ap.ip.String(), ap.bridgePort, n1.ns, n1.ip.String(), n1.bridgePort, n1.PodCIDR, client.ip.String(), ap.Services[0].VIP}, " ")
	want := "tl-lab-ap-api 192.168.100.12 ap-api tl-lab-ap-n1 192.168.100.121 ap-n1 10.3.1.0/24 10.3.1.11 10.96.3.10"
	if got != want {
		t.Errorf("ap: got %q, want %q", got, want)
	}
	if eu, _ := lay.node("eu/n2"); eu.ip.String() != "192.168.100.102" || eu.bridgePort != "eu-n2" {
		t.Errorf("eu/n2 moved: %s %s", eu.ip, eu.bridgePort)
	}
	if len(lay.podRoutes) != 6 || len(clusterRoutes(ap)) != 2 {
		t.Errorf("pod routes %v, routes to ap %v", lay.podRoutes, clusterRoutes(ap))
	}

	for name, c := range map[string]Cluster{
		"taken id":         StandardCluster("ap", 2, "ap", 1),
		"taken name":       StandardCluster("us", 3, "us", 1),
		"renames ports":    StandardCluster("asiapacific1", 3, "ap", 1),
		"vip in pod cidrs": StandardCluster("ap", 96, "ap", 1),
	} {
		if _, _, err := extendLayout("lab", BaseDir, "/sys/fs/cgroup", old, oldLay, c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
