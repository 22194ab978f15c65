package apiserver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The embedded etcd's quota is a setting of the config file as of the
// flags, bounded, and refused with an external etcd, which has its own.
func TestEtcdQuotaConfig(t *testing.T) {
	file := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(file, []byte("clusterName: eu\nclusterID: 3\npodCIDRs: [10.1.0.0/16]\nstateDir: /var/lib/trellis\netcdQuotaBackendBytes: 4294967296\n"), 0o600)
	cfg, err := LoadConfigFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil || cfg.EtcdQuotaBackendBytes != 4<<30 {
		t.Errorf("quota from the file: %d, %v; want 4 GiB, valid", cfg.EtcdQuotaBackendBytes, err)
	}
	base := func(quota int64, endpoints ...string) Config {
		return Config{ClusterName: "eu", ClusterID: 1, PodCIDRs: []string{"10.1.0.0/16"}, StateDir: "x", EtcdQuotaBackendBytes: quota, EtcdEndpoints: endpoints}
	}
	for _, tc := range []struct {
		cfg  Config
		want string // "" valid
	}{
		{base(0), ""},
		{base(64 << 20), ""},
		{base(8 << 30), ""},
		{base(1 << 20), "--etcd-quota-backend-bytes 1048576: must be between"},
		{base(9 << 30), "must be between"},
		{base(-1), "must be between"},
		{base(1<<30, "https://etcd:2379"), "is for the embedded etcd"},
		{base(0, "https://etcd:2379"), ""},
	} {
		err := tc.cfg.Validate()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("quota %d, endpoints %v: %v, want valid", tc.cfg.EtcdQuotaBackendBytes, tc.cfg.EtcdEndpoints, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("quota %d, endpoints %v: %v, want an error saying %q", tc.cfg.EtcdQuotaBackendBytes, tc.cfg.EtcdEndpoints, err, tc.want)
		}
	}
}
