package lab

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

func TestDefaultTopologyLayout(t *testing.T) {
	topo := DefaultTopology()
	if err := topo.Validate(); err != nil {
		t.Fatal(err)
	}
	lay, err := newLayout("lab", BaseDir, "/sys/fs/cgroup/unified", &topo)
	if err != nil {
		t.Fatal(err)
	}
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
