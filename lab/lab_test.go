package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/trellis-mesh/trellis/agent"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// The privileged end-to-end tests: they run the real binary (`trellis lab
// up/verify/curl/down`) as root and check that `down` leaves nothing
// behind. Every test registers `lab down` before it builds anything, so a
// failed test tears down too.

type labRun struct {
	t    testing.TB
	bin  string
	name string
}

// run runs `trellis lab <args> --name <name>` and returns stdout; stderr is
// logged when it fails.
func (r *labRun) run(ctx context.Context, args ...string) (string, error) {
	args = append([]string{"lab"}, append(args, "--name", r.name)...)
	cmd := exec.CommandContext(ctx, r.bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("trellis %s: %w\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), err
}

func newLabRun(t testing.TB) *labRun {
	// Lab names are at most 12 lowercase letters and digits.
	r := &labRun{t: t, bin: testutil.BuildTrellis(t), name: privtest.UniqueShortName("t")}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if out, err := r.run(ctx, "down"); err != nil {
			t.Errorf("cleanup: %v", err)
		} else if t.Failed() {
			t.Log(out)
		}
	})
	return r
}

// rootLinks names the links of the test's (root) network namespace.
func rootLinks(t *testing.T) []string {
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatalf("list links: %v", err)
	}
	var names []string
	for _, l := range links {
		names = append(names, l.Attrs().Name)
	}
	slices.Sort(names)
	return names
}

// leftovers lists whatever of lab name still exists.
func leftovers(t *testing.T, name string, procs map[string]*Proc) []string {
	var out []string
	nsList, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Errorf("ip netns list: %v", err)
	}
	for _, line := range strings.Split(string(nsList), "\n") {
		if strings.HasPrefix(line, nsPrefix(name)) {
			out = append(out, "netns "+strings.Fields(line)[0])
		}
	}
	if cg2, err := cgroup2Root(); err == nil {
		if _, err := os.Stat(filepath.Join(cg2, cgroupDirName(name))); err == nil {
			out = append(out, "cgroup "+filepath.Join(cg2, cgroupDirName(name)))
		}
	}
	pins, _ := filepath.Glob(filepath.Join(BPFRoot, name+"*"))
	for _, p := range pins {
		out = append(out, "pin dir "+p)
	}
	for key, p := range procs {
		if p.Alive() {
			out = append(out, fmt.Sprintf("process %s (pid %d)", key, p.PID))
		}
	}
	if _, err := os.Stat(filepath.Join(BaseDir, name)); err == nil {
		out = append(out, "dir "+filepath.Join(BaseDir, name))
	}
	return out
}

func TestLabUpDown(t *testing.T) {
	privtest.RequireRoot(t)
	r := newLabRun(t)
	linksBefore := rootLinks(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	start := time.Now()
	out, err := r.run(ctx, "up", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("lab up: %s", time.Since(start).Round(time.Millisecond))
	var rep Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("lab up -o json: %v\n%s", err, out)
	}
	st, err := loadState(filepath.Join(BaseDir, r.name))
	if err != nil {
		t.Fatal(err)
	}

	t.Run("AgentsReady", func(t *testing.T) {
		if len(rep.Nodes) != 4 {
			t.Fatalf("%d nodes, want 4", len(rep.Nodes))
		}
		for _, n := range rep.Nodes {
			if !n.Ready || len(n.ReadyClusters) != 2 {
				t.Errorf("node %s/%s: ready=%v, clusters ready %v, error %q", n.Cluster, n.Name, n.Ready, n.ReadyClusters, n.Error)
			}
		}
		for _, c := range rep.Clusters {
			if !c.Ready {
				t.Errorf("API server of %s not ready: %s", c.Name, c.Error)
			}
		}
		if _, err := r.run(ctx, "status"); err != nil {
			t.Errorf("lab status: %v", err)
		}
	})

	t.Run("OwnCAs", func(t *testing.T) {
		// Every API server made its own server and client CA; the lab
		// shares none between clusters.
		seen := map[string]string{}
		for _, cluster := range []string{"eu", "us"} {
			for _, f := range []string{"ca.crt", "client-ca.crt"} {
				path := filepath.Join(BaseDir, r.name, cluster, "apiserver", "pki", f)
				b, err := os.ReadFile(path)
				if err != nil {
					t.Fatal(err)
				}
				if other, dup := seen[string(b)]; dup {
					t.Errorf("%s is the same CA as %s", path, other)
				}
				seen[string(b)] = path
			}
		}
	})

	t.Run("Traffic", func(t *testing.T) {
		if !rep.Datapath {
			t.Error("lab up reports the datapath off; agents always run with it")
		}
		start := time.Now()
		out, err := r.run(ctx, "verify", "-o", "json")
		var vr VerifyReport
		if jerr := json.Unmarshal([]byte(out), &vr); jerr != nil {
			t.Fatalf("lab verify -o json: %v (%v)\n%s", jerr, err, out)
		}
		t.Logf("lab verify: %d checks in %s", len(vr.Checks), time.Since(start).Round(time.Millisecond))
		crossCluster := 0
		for _, c := range vr.Checks {
			if !c.OK {
				t.Errorf("%s %s → %s (%s): %s %s", c.Kind, c.From, c.To, c.Target, c.Skipped, c.Detail)
			}
			if c.Kind == "pod-to-pod" && strings.Split(c.From, "/")[0] != strings.Split(c.To, "/")[0] {
				crossCluster++
			}
		}
		if len(vr.Checks) != 6*4+4 || crossCluster != 12 {
			t.Errorf("%d checks (%d pod→pod across clusters), want 28 (12)", len(vr.Checks), crossCluster)
		}
		if err != nil {
			t.Errorf("lab verify: %v", err)
		}

		// The global service answers from both clusters: 20 requests on 4
		// backends (2 per cluster) all landing in one cluster has a
		// probability of 2^-19.
		out, err = r.run(ctx, "curl", "eu/client", "default/echo", "-n", "20", "-o", "json")
		if err != nil {
			t.Fatal(err)
		}
		var cr CurlResult
		if err := json.Unmarshal([]byte(out), &cr); err != nil {
			t.Fatalf("lab curl -o json: %v\n%s", err, out)
		}
		if cr.Failed != 0 || cr.PerCluster["eu"] == 0 || cr.PerCluster["us"] == 0 {
			t.Errorf("global service from eu/client: %d failed, per cluster %v; want answers from eu and us", cr.Failed, cr.PerCluster)
		}
	})

	start = time.Now()
	if out, err := r.run(ctx, "down"); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("lab down: %s: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(out))
	}
	if left := leftovers(t, r.name, st.Procs); len(left) > 0 {
		t.Errorf("lab down left behind: %s", strings.Join(left, "; "))
	}
	if after := rootLinks(t); !slices.Equal(after, linksBefore) {
		t.Errorf("links of the root namespace changed: before %v, after %v", linksBefore, after)
	}
	if out, err := r.run(ctx, "down"); err != nil || !strings.Contains(out, "nothing to remove") {
		t.Errorf("second lab down: %q, %v; want nothing to remove", out, err)
	}
}

// TestLabDownAfterCrash kills `lab up` halfway and loses its state file:
// `lab down` must still find and remove everything by name.
func TestLabDownAfterCrash(t *testing.T) {
	privtest.RequireRoot(t)
	r := newLabRun(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	up := exec.Command(r.bin, "lab", "up", "--name", r.name)
	if err := up.Start(); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(BaseDir, r.name)
	testutil.Eventually(t, time.Minute, "lab up to start an agent", func() bool {
		s, err := loadState(dir)
		if err != nil {
			return false
		}
		for key := range s.Procs {
			if strings.HasPrefix(key, "agent/") {
				return true
			}
		}
		return false
	})
	up.Process.Signal(syscall.SIGKILL)
	up.Wait()
	// The state as the crashed lab up last wrote it: every process it
	// started is in it.
	st, err := loadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(statePath(dir)); err != nil {
		t.Fatal(err)
	}
	// Wait until the surviving agents have made their datapath state
	// (pins, cgroup attachments, tunnel devices), so that down has it to
	// remove: an agent opens its datapath before it serves its status
	// socket, so one that answers there has made it.
	testutil.EventuallyNoError(t, time.Minute, "the crashed lab's agents to answer on their status sockets", func() error {
		return agentsServing(ctx, t, st.Procs)
	})
	before := leftovers(t, r.name, st.Procs)
	t.Logf("left by the crashed lab up: %d namespaces, cgroups, pin dirs and processes", len(before))
	if len(before) == 0 {
		t.Fatal("the crashed lab up left nothing: this test proves nothing")
	}

	if _, err := r.run(ctx, "down"); err != nil {
		t.Fatal(err)
	}
	if left := leftovers(t, r.name, st.Procs); len(left) > 0 {
		t.Errorf("lab down after a crash left behind: %s", strings.Join(left, "; "))
	}
}

// agentsServing says whether every agent among procs answers on its
// status socket and has made its bpffs pin dir (both from its argv). An
// agent that exited fails the test: nothing would bring it back.
func agentsServing(ctx context.Context, t *testing.T, procs map[string]*Proc) error {
	t.Helper()
	var errs []error
	for key, p := range procs {
		if !strings.HasPrefix(key, "agent/") {
			continue
		}
		if !p.Alive() {
			t.Fatalf("%s (pid %d) exited:\n%s", key, p.PID, tailFile(p.Log, 20))
		}
		socket, pinDir := flagValue(p.Argv, "--status-socket"), flagValue(p.Argv, "--bpf-pin-dir")
		if socket == "" || pinDir == "" {
			t.Fatalf("%s runs without --status-socket or --bpf-pin-dir: %q", key, p.Argv)
		}
		sctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		_, err := agent.FetchStatus(sctx, socket)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: status: %w", key, err))
			continue
		}
		if _, err := os.Stat(pinDir); err != nil {
			errs = append(errs, fmt.Errorf("%s: pin dir: %w", key, err))
		}
	}
	return errors.Join(errs...)
}

// flagValue is the value that follows flag in argv, or "".
func flagValue(argv []string, flag string) string {
	if i := slices.Index(argv, flag); i >= 0 && i+1 < len(argv) {
		return argv[i+1]
	}
	return ""
}
