package main

import (
	"errors"
	"log/slog"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/trellis-mesh/trellis/bpf"
	"github.com/trellis-mesh/trellis/internal/cgroup2"
	"github.com/trellis-mesh/trellis/tunnel"
)

const (
	hybridMounts = `tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
`
	unifiedMounts = `sysfs /sys sysfs rw,nosuid 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
`
	v1OnlyMounts = `cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
`
)

// The datapath flags become a DatapathConfig: --cgroup-root defaults to
// the cgroup2 mount of the mount table, and none turns a part off (nil).
func TestAgentDatapathFlags(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	for _, tc := range []struct {
		name       string
		mounts     string
		args       []string
		wantLB     *bpf.Config
		wantTunnel *tunnel.Config
		wantErr    string
	}{
		{
			name:   "default cgroup root on a hybrid host: the cgroup2 mount",
			mounts: hybridMounts, args: []string{"--node-name", "n1"},
			wantLB: &bpf.Config{CgroupPath: "/sys/fs/cgroup/unified", PinDir: bpf.PinDir("n1")},
		},
		{
			name:   "default cgroup root on a unified host",
			mounts: unifiedMounts, args: []string{"--node-name", "n1"},
			wantLB: &bpf.Config{CgroupPath: "/sys/fs/cgroup", PinDir: bpf.PinDir("n1")},
		},
		{
			name:   "none turns the socket LB off",
			mounts: hybridMounts, args: []string{"--node-name", "n1", "--cgroup-root", "none", "--bpf-pin-dir", "/sys/fs/bpf/x"},
		},
		{
			name:   "none needs no cgroup2 mount",
			mounts: v1OnlyMounts, args: []string{"--node-name", "n1", "--cgroup-root=none"},
		},
		{
			name:   "no cgroup2 mount and no flag: an error that says how to go on",
			mounts: v1OnlyMounts, args: []string{"--node-name", "n1"},
			wantErr: "or none to run without the socket load balancer",
		},
		{
			name:   "an empty cgroup root is refused, not taken as off",
			mounts: hybridMounts, args: []string{"--node-name", "n1", "--cgroup-root", ""},
			wantErr: "--cgroup-root is empty",
		},
		{
			name:   "explicit cgroup and pin dir",
			mounts: hybridMounts, args: []string{"--node-name", "n1", "--cgroup-root", "/sys/fs/cgroup/unified/lab/n1", "--bpf-pin-dir", "/sys/fs/bpf/lab-n1"},
			wantLB: &bpf.Config{CgroupPath: "/sys/fs/cgroup/unified/lab/n1", PinDir: "/sys/fs/bpf/lab-n1"},
		},
		{
			name:   "a tunnel gets the node's address and pod CIDRs",
			mounts: hybridMounts,
			args: []string{"--node-name", "n1", "--cgroup-root", "none", "--tunnel", "vxlan", "--node-ip", "192.168.1.1",
				"--pod-cidrs", "10.1.1.0/24,fd01:1::/64", "--underlay-device", "eth0", "--vni", "7", "--tunnel-port", "4789"},
			wantTunnel: &tunnel.Config{Mode: tunnel.ModeVXLAN, UnderlayDevice: "eth0", VNI: 7, Port: 4789, Logger: log,
				LocalIP:       netip.MustParseAddr("192.168.1.1"),
				LocalPodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24"), netip.MustParsePrefix("fd01:1::/64")},
			},
		},
		{
			name:   "native routing",
			mounts: hybridMounts, args: []string{"--node-name", "n1", "--cgroup-root", "none", "--tunnel", "native"},
			wantTunnel: &tunnel.Config{Mode: tunnel.ModeNative, Logger: log},
		},
		{
			name:   "an unknown tunnel mode",
			mounts: hybridMounts, args: []string{"--node-name", "n1", "--tunnel", "gre"},
			wantErr: `--tunnel "gre"`,
		},
		{
			name:   "an empty tunnel mode is refused, not taken as vxlan",
			mounts: hybridMounts, args: []string{"--node-name", "n1", "--tunnel", ""},
			wantErr: `--tunnel ""`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := &agentOptions{}
			f := pflag.NewFlagSet("agent", pflag.ContinueOnError)
			o.addFlags(f, func() (string, error) { return cgroup2.FindMount(strings.NewReader(tc.mounts)) })
			if err := f.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			if err := o.complete(log); err != nil {
				t.Fatal(err)
			}
			dp, err := o.datapath(log)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one that says %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(dp.LB, tc.wantLB) {
				t.Errorf("LB = %+v, want %+v", dp.LB, tc.wantLB)
			}
			if !reflect.DeepEqual(dp.Tunnel, tc.wantTunnel) {
				t.Errorf("Tunnel = %+v, want %+v", dp.Tunnel, tc.wantTunnel)
			}
		})
	}
}

// The command itself takes --cgroup-root's default from this machine's
// mount table.
func TestAgentCgroupRootDefaultIsTheMount(t *testing.T) {
	want, err := bpf.CgroupV2Root()
	if errors.Is(err, bpf.ErrNoCgroupV2) {
		t.Skip("this machine has no cgroup2 mount:", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	flag := newAgentCmd(&globalOptions{}).Flags().Lookup("cgroup-root")
	if flag == nil || flag.DefValue != want {
		t.Fatalf("--cgroup-root defaults to %+v, want the cgroup2 mount %s", flag, want)
	}
}
