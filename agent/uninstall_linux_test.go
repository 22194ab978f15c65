//go:build linux

package agent_test

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/trellis-mesh/trellis/bpf"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// `trellis agent --uninstall` removes the pinned maps and links an agent
// left, detaching the programs from its cgroup.
func TestAgentUninstall(t *testing.T) {
	privtest.RequireRoot(t)
	if testing.Short() {
		t.Skip("runs the trellis binary; skipped in -short")
	}
	if err := bpf.EnsureBPFFS(); err != nil {
		t.Fatal(err)
	}
	cgroup := privtest.NewCgroup(t)
	pinDir := filepath.Join(bpf.DefaultPinRoot, privtest.UniqueName("agent-test"))
	t.Cleanup(func() { bpf.Uninstall(pinDir) })

	lb, err := bpf.Open(bpf.Config{PinDir: pinDir, CgroupPath: cgroup})
	if err != nil {
		privtest.SkipIfNotSupported(t, err)
		t.Fatal(err)
	}
	svc := bpf.Service{VIP: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: bpf.TCP,
		Backends: []bpf.Backend{{IP: netip.MustParseAddr("10.1.1.10"), Port: 8080, ClusterID: 1}}}
	if err := lb.Set(context.Background(), []bpf.Service{svc}); err != nil {
		t.Fatal(err)
	}
	lb.Close() // as an agent that exits: pins stay
	if entries, _ := os.ReadDir(pinDir); len(entries) == 0 {
		t.Fatal("nothing pinned: the test would prove nothing")
	}

	before, err := link.QueryPrograms(link.QueryOptions{Target: mustOpen(t, cgroup), Attach: ebpf.AttachCGroupInet4Connect})
	if err != nil || len(before.Programs) == 0 {
		t.Fatalf("connect4 not attached before uninstall (%v): the test would prove nothing", err)
	}

	p := testutil.Start(t, testutil.BuildTrellis(t), "agent", "--uninstall", "--node-name", "n1",
		"--cgroup-root", cgroup, "--bpf-pin-dir", pinDir)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		t.Fatalf("agent --uninstall: %v\n%s", err, p.Output())
	}
	if _, err := os.Stat(pinDir); !os.IsNotExist(err) {
		t.Errorf("pin dir %s still exists after --uninstall (%v)", pinDir, err)
	}
	progs, err := link.QueryPrograms(link.QueryOptions{Target: mustOpen(t, cgroup), Attach: ebpf.AttachCGroupInet4Connect})
	if err != nil {
		t.Fatalf("query connect4 programs on %s: %v", cgroup, err)
	}
	if len(progs.Programs) > 0 {
		t.Errorf("connect4 programs still attached to %s: %v", cgroup, progs.Programs)
	}
}

func mustOpen(t *testing.T, path string) int {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return int(f.Fd())
}
