package systemd_test

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// chartCapabilities reads agent.capabilities from the Helm chart's values.
func chartCapabilities(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "helm", "trellis", "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		Agent struct {
			Capabilities []string `json:"capabilities"`
		} `json:"agent"`
	}
	if err := yaml.Unmarshal(data, &v); err != nil {
		t.Fatalf("values.yaml: %v", err)
	}
	return v.Agent.Capabilities
}

// The agent's unit and the chart grant the same capabilities.
func TestAgentCapabilitiesAgree(t *testing.T) {
	var fromUnit []string
	for c := range strings.FieldsSeq(parseUnit(t, "trellis-agent.service").get("Service", "CapabilityBoundingSet")) {
		fromUnit = append(fromUnit, strings.TrimPrefix(c, "CAP_"))
	}
	fromChart := chartCapabilities(t)
	slices.Sort(fromUnit)
	slices.Sort(fromChart)
	if !slices.Equal(fromUnit, fromChart) {
		t.Fatalf("trellis-agent.service grants %v, the chart's agent.capabilities %v", fromUnit, fromChart)
	}
}

// The real agent with only the chart's capabilities (root, the bounding set
// cut down to them, no_new_privs: what the DaemonSet's container and the
// unit give it) loads, pins and attaches the socket load balancer and
// creates its tunnel device, and the userspace WireGuard device process
// runs; without any one of them, it fails, with the kernel's reason. That
// is each capability's "why", measured. In a network namespace and a
// cgroup of the test's own; nothing is attached anywhere else.
func TestAgentCapabilities(t *testing.T) {
	privtest.RequireRoot(t)
	if testing.Short() {
		t.Skip("builds and runs the trellis binary; skipped in -short")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("setpriv (util-linux) not found: it runs the agent with a reduced capability bounding set")
	}
	bin := testutil.BuildTrellis(t)
	granted := chartCapabilities(t)

	for _, tc := range []struct {
		name    string
		without string // "" runs with every granted capability
		want    string // the failure it must report
	}{
		{name: "granted"},
		// The socket LB's programs are cgroup sock_addr programs: loading
		// and attaching them is a network admin operation.
		{name: "without NET_ADMIN", without: "NET_ADMIN", want: "operation not permitted"},
		// Maps and programs.
		{name: "without BPF", without: "BPF", want: "operation not permitted"},
		// Without it the verifier treats the loader as unprivileged and
		// refuses the slot lookup's pointer arithmetic (Spectre v1
		// hardening).
		{name: "without PERFMON", without: "PERFMON", want: "pointer arithmetic with it prohibited for !root"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			caps := slices.DeleteFunc(slices.Clone(granted), func(c string) bool { return c == tc.without })
			bounding := "-all"
			for _, c := range caps {
				bounding += ",+" + strings.ToLower(c)
			}
			ns, nsName := privtest.NewNetNSWithPrefix(t, "trellis-caps")
			privtest.AddVeth(t, ns, "underlay0", netip.MustParsePrefix("192.0.2.11/24"))
			cg := privtest.NewCgroup(t)
			node := privtest.UniqueShortName("caps")
			pinDir := filepath.Join("/sys/fs/bpf/trellis", node)
			// Registered after the cgroup: runs before its removal, and
			// dropping the pinned links detaches the programs.
			t.Cleanup(func() { os.RemoveAll(pinDir) })
			dir := t.TempDir()
			for _, d := range []string{"config", "state"} {
				if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
					t.Fatal(err)
				}
			}
			agent := exec.Command(setpriv, "--bounding-set="+bounding, "--inh-caps=-all", "--no-new-privs", "--",
				bin, "agent", "--node-name", node, "--cluster-name", "eu",
				"--config-dir", filepath.Join(dir, "config"), "--state-dir", filepath.Join(dir, "state"),
				"--status-socket", filepath.Join(dir, "agent.sock"),
				"--cgroup-root", cg, "--bpf-pin-dir", pinDir,
				"--tunnel", "vxlan", "--node-ip", "192.0.2.11", "--pod-cidrs", "10.9.1.0/24")
			var out testutil.SyncBuffer
			agent.Stdout, agent.Stderr = &out, &out
			if err := privtest.StartInNetNSAndCgroup(t, agent, ns, ""); err != nil {
				t.Fatal(err)
			}

			h := privtest.NetlinkHandle(t, ns)
			if tc.without == "" {
				testutil.Eventually(t, 60*time.Second, "the socket LB pinned and the VXLAN device up with "+bounding, func() bool {
					if agent.ProcessState != nil {
						return false
					}
					pins, _ := os.ReadDir(pinDir)
					links := 0
					for _, p := range pins {
						if strings.HasPrefix(p.Name(), "link_") {
							links++
						}
					}
					_, err := h.LinkByName("trellis_vxlan")
					return links == 4 && err == nil
				})
			} else {
				done := make(chan error, 1)
				timer := time.AfterFunc(60*time.Second, func() { agent.Process.Kill() })
				defer timer.Stop()
				go func() { done <- agent.Wait() }()
				if err := <-done; err == nil {
					t.Fatalf("the agent without %s exited cleanly:\n%s", tc.without, out.String())
				}
				if !strings.Contains(out.String(), tc.want) {
					t.Fatalf("the agent without %s failed, but not with %q:\n%s", tc.without, tc.want, lastLines(out.String(), 30))
				}
				if pins, _ := os.ReadDir(pinDir); slices.ContainsFunc(pins, func(p os.DirEntry) bool { return strings.HasPrefix(p.Name(), "link_") }) {
					t.Fatalf("the agent without %s attached programs", tc.without)
				}
			}

			// The userspace WireGuard device (wireguard-go on a TUN), as the
			// agent starts it where the kernel has no WireGuard: opening
			// /dev/net/tun and creating the link take NET_ADMIN.
			if tc.without != "" && tc.without != "NET_ADMIN" {
				return
			}
			wg := exec.Command(setpriv, "--bounding-set="+bounding, "--inh-caps=-all", "--no-new-privs", "--",
				bin, "agent", "wireguard-device", "--name", "wgcaps0", "--mtu", "1420", "--socket", filepath.Join(dir, "state", "wireguard.sock"))
			var wgOut testutil.SyncBuffer
			wg.Stdout, wg.Stderr = &wgOut, &wgOut
			if err := privtest.StartInNetNSAndCgroup(t, wg, ns, ""); err != nil {
				t.Fatal(err)
			}
			if tc.without == "" {
				testutil.Eventually(t, 30*time.Second, "the WireGuard device process serving wgcaps0 in "+nsName, func() bool {
					_, err := h.LinkByName("wgcaps0")
					return err == nil && strings.Contains(wgOut.String(), "WireGuard device running")
				})
				return
			}
			done := make(chan error, 1)
			timer := time.AfterFunc(30*time.Second, func() { wg.Process.Kill() })
			defer timer.Stop()
			go func() { done <- wg.Wait() }()
			if err := <-done; err == nil || !strings.Contains(wgOut.String(), "create TUN: operation not permitted") {
				t.Fatalf("the WireGuard device without NET_ADMIN: %v\n%s", err, wgOut.String())
			}
		})
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
