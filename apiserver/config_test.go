package apiserver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadConfigFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte("clusterName: eu\nclusterID: 3\npodCIDRs: [10.1.0.0/16]\nstateDir: /var/lib/trellis\nregion: eu-west\n"), 0o600)
	cfg, err := LoadConfigFile(good)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("valid file rejected: %v", err)
	}
	if cfg.ClusterName != "eu" || cfg.ClusterID != 3 || cfg.Region != "eu-west" || cfg.HTTPListen != DefaultHTTPListen {
		t.Errorf("loaded %+v", cfg)
	}

	typo := filepath.Join(dir, "typo.yaml")
	os.WriteFile(typo, []byte("clusterName: eu\nclustreID: 3\n"), 0o600)
	if _, err := LoadConfigFile(typo); err == nil || !strings.Contains(err.Error(), "clustreID") {
		t.Errorf("a misspelt key must be named: %v", err)
	}

	for _, tc := range []struct {
		cfg  Config
		want []string
	}{
		{Config{}, []string{"--cluster-name is required", "--cluster-id is required", "--pod-cidrs is required", "--state-dir is required"}},
		{Config{ClusterName: "eu", ClusterID: 300, PodCIDRs: []string{"10.0.0.0/8"}, StateDir: "x"}, []string{"--cluster-id 300 needs --max-connected-clusters 511"}},
		{Config{ClusterName: "eu", ClusterID: 1, PodCIDRs: []string{"10.0.0.0/8"}, StateDir: "x", EtcdListen: "0.0.0.0:2379"}, []string{"--advertise-address"}},
		{Config{ClusterName: "eu", ClusterID: 1, PodCIDRs: []string{"10.0.0.0/8"}, StateDir: "x", Source: "consul"}, []string{`--source "consul"`}},
		{Config{ClusterName: "eu", ClusterID: 1, PodCIDRs: []string{"10.0.0.0/8"}, StateDir: "x", EtcdCAFile: "ca.crt"}, []string{"give --etcd-endpoints too"}},
	} {
		err := tc.cfg.Validate()
		for _, w := range tc.want {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("Validate(%+v) = %v, want it to mention %q", tc.cfg, err, w)
			}
		}
	}
}
