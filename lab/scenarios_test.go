package lab

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

// TestLabScenarios runs the scenarios of the lab's issue on one lab, in
// order, each through the real binary: global service affinity,
// failover, exec and status, an agent restart and an API server restart
// under a request loop, disconnect and reconnect, a node down and up, a
// third cluster joining the running mesh, and finally a teardown that
// leaves nothing behind. Each scenario puts back what it changed, so a
// failed one does not sink the next.
func TestLabScenarios(t *testing.T) {
	privtest.RequireRoot(t)
	r := newLabRun(t)
	linksBefore := rootLinks(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	start := time.Now()
	if _, err := r.run(ctx, "up"); err != nil {
		t.Fatal(err)
	}
	t.Logf("lab up: %s", time.Since(start).Round(time.Millisecond))
	st := r.state(t)
	if !st.Datapath {
		t.Fatal("the lab runs its agents without datapath; the scenarios need its socket LB and tunnel")
	}
	// Every process the lab ever ran, to check after down.
	procs := map[string]*Proc{}
	remember := func() {
		st, err := loadState(filepath.Join(BaseDir, r.name))
		if err != nil {
			return // gone after down
		}
		for k, p := range st.Procs {
			procs[fmt.Sprintf("%s[%d]", k, p.PID)] = p
		}
	}
	remember()
	euVIP := serviceURL(t, st, "eu")

	step := func(name string, fn func(t *testing.T)) {
		start := time.Now()
		t.Run(name, fn)
		t.Logf("%s: %s", name, time.Since(start).Round(time.Millisecond))
		remember()
	}

	step("Affinity", func(t *testing.T) {
		for _, c := range []struct {
			affinity string
			want     []string
		}{
			{"none", []string{"eu", "us"}},
			{"local", []string{"eu"}},
			{"remote", []string{"us"}},
		} {
			r.annotate(ctx, t, "trellis.io/affinity="+c.affinity)
			r.awaitClusters(ctx, t, "affinity "+c.affinity, c.want)
		}
	})

	step("Failover", func(t *testing.T) {
		r.annotate(ctx, t, "trellis.io/affinity=local")
		r.awaitClusters(ctx, t, "affinity local", []string{"eu"})
		pods := []string{"eu/echo-n1", "eu/echo-n2"}
		for _, p := range pods {
			r.must(ctx, t, "pod", "stop", p)
		}
		t.Cleanup(func() {
			for _, p := range pods {
				r.run(context.Background(), "pod", "start", p) // no-op once started
			}
		})
		r.awaitClusters(ctx, t, "failover to us with eu's backends stopped", []string{"us"})
		for _, p := range pods {
			r.must(ctx, t, "pod", "start", p)
		}
		r.awaitClusters(ctx, t, "recovery to eu", []string{"eu"})
	})

	step("ExecStatus", func(t *testing.T) {
		client := podIP(t, st, "eu/client")
		out, code, err := r.exec(ctx, "eu/client", "ip", "-o", "-4", "addr", "show", "dev", "eth0")
		if err != nil || code != 0 || !strings.Contains(out, " "+client+"/32 ") {
			t.Errorf("lab exec eu/client -- ip addr: exit %d, %v: %q; want the pod's address %s", code, err, out, client)
		}
		out, code, err = r.exec(ctx, "eu/client", "cat", "/proc/self/cgroup")
		if want := "/" + cgroupDirName(r.name) + "/eu-n1/client"; err != nil || code != 0 || !strings.Contains(out, want) {
			t.Errorf("lab exec eu/client -- cat /proc/self/cgroup: exit %d, %v: %q; want cgroup %s", code, err, out, want)
		}
		// Inside the pod the VIP is translated by the node's socket LB.
		out, code, err = r.exec(ctx, "eu/client", r.bin, "lab", "http-get", euVIP)
		var p Probe
		if jerr := json.Unmarshal([]byte(out), &p); err != nil || code != 0 || jerr != nil || !p.OK {
			t.Errorf("lab exec eu/client -- trellis lab http-get %s: exit %d, %v: %q", euVIP, code, err, out)
		}
		if _, code, err = r.exec(ctx, "eu/client", "sh", "-c", "exit 7"); err != nil || code != 7 {
			t.Errorf("lab exec eu/client -- sh -c 'exit 7': exit %d, %v; want 7", code, err)
		}
		rep := r.status(ctx, t)
		if !rep.Healthy || len(rep.Clusters) != 2 || len(rep.Nodes) != 4 {
			t.Errorf("lab status -o json: healthy=%v, %d clusters, %d nodes, problems %v", rep.Healthy, len(rep.Clusters), len(rep.Nodes), rep.Problems)
		}
	})

	step("AgentRestartUnderLoad", func(t *testing.T) {
		r.annotate(ctx, t, "trellis.io/affinity=none")
		r.awaitClusters(ctx, t, "affinity none", []string{"eu", "us"})
		before := r.state(t).Procs["agent/eu/n1"]
		loop := r.startLoop(ctx, t, "eu/client", euVIP)
		loop.await(t, 1)
		// The window in which a restarted agent might drop translations
		// is short: restart it several times.
		const restarts = 5
		for i := range restarts {
			loop.mark(fmt.Sprintf("restart %d of eu/n1's agent begins", i+1))
			r.must(ctx, t, "restart", "agent", "eu/n1")
			loop.mark(fmt.Sprintf("restart %d of eu/n1's agent done", i+1))
			loop.await(t, 1)
		}
		loop.await(t, 1)
		loop.finish(t, "eu/client → "+euVIP+" while eu/n1's agent restarted")
		after := r.state(t).Procs["agent/eu/n1"]
		if after == nil || !after.Alive() || after.PID == before.PID {
			t.Errorf("agent of eu/n1 after the restarts: %+v (before: pid %d)", after, before.PID)
		}
		for _, n := range r.status(ctx, t).Nodes {
			if n.Cluster == "eu" && n.Name == "n1" && (!n.Ready || len(n.ReadyClusters) != 2) {
				t.Errorf("agent of eu/n1 after the restarts: ready=%v, clusters ready %v, %s", n.Ready, n.ReadyClusters, n.Error)
			}
		}
	})

	step("APIServerRestartUnderLoad", func(t *testing.T) {
		r.annotate(ctx, t, "trellis.io/affinity=none")
		before := r.state(t).Procs["apiserver/us"]
		loop := r.startLoop(ctx, t, "eu/client", euVIP)
		loop.await(t, 1)
		loop.mark("restart of us's API server begins")
		r.must(ctx, t, "restart", "apiserver", "us")
		loop.mark("restart of us's API server done")
		loop.await(t, 2)
		loop.finish(t, "eu/client → "+euVIP+" while us's API server restarted")
		after := r.state(t).Procs["apiserver/us"]
		if after == nil || !after.Alive() || after.PID == before.PID {
			t.Errorf("API server of us after the restart: %+v (before: pid %d)", after, before.PID)
		}
		r.awaitClusters(ctx, t, "both clusters after the restart", []string{"eu", "us"})
		rep := r.status(ctx, t)
		if !rep.Healthy {
			t.Errorf("lab status after the restart: %v", rep.Problems)
		}
		for _, n := range rep.Nodes {
			if !slices.Contains(n.ReadyClusters, "us") {
				t.Errorf("agent of %s/%s does not report us ready: %v", n.Cluster, n.Name, n.ReadyClusters)
			}
		}
	})

	step("DisconnectReconnect", func(t *testing.T) {
		r.annotate(ctx, t, "trellis.io/affinity=none")
		r.must(ctx, t, "disconnect", "eu", "us")
		t.Cleanup(func() { r.run(context.Background(), "connect", "eu", "us") })
		r.awaitClusters(ctx, t, "eu/client served by eu alone after the disconnect", []string{"eu"})
		// Cross-cluster pod → pod no longer works: each side drained the
		// other's nodes, tunnels included.
		usEcho := podIP(t, st, "us/echo-n1")
		out, code, err := r.exec(ctx, "eu/client", r.bin, "lab", "http-get", "--timeout", "1s", "http://"+usEcho+":8080/")
		var p Probe
		json.Unmarshal([]byte(out), &p)
		if err != nil || code == 0 || p.OK || p.Error == "" {
			t.Errorf("eu/client → us/echo-n1 (%s) after the disconnect: exit %d, %v: %q; want no answer", usEcho, code, err, out)
		}
		vr := r.verify(ctx, t)
		isolated := 0
		for _, c := range vr.Checks {
			if c.Isolated {
				isolated++
			}
		}
		if vr.Failed != 0 || isolated != 12 {
			t.Errorf("lab verify after the disconnect: %d failed, %d isolated checks (want 0, 12)", vr.Failed, isolated)
		}
		if rep := r.status(ctx, t); !rep.Healthy || !slices.Equal(rep.Disconnected, []string{"eu/us"}) {
			t.Errorf("lab status after the disconnect: healthy=%v, disconnected %v, problems %v", rep.Healthy, rep.Disconnected, rep.Problems)
		}

		r.must(ctx, t, "connect", "eu", "us")
		r.awaitClusters(ctx, t, "both clusters after the reconnect", []string{"eu", "us"})
		vr = r.verify(ctx, t)
		if vr.Failed != 0 || vr.Skipped != 0 || vr.Passed != 28 {
			t.Errorf("lab verify after the reconnect: %d passed, %d failed, %d skipped; want 28 passed", vr.Passed, vr.Failed, vr.Skipped)
		}
	})

	step("NodeDownUp", func(t *testing.T) {
		r.annotate(ctx, t, "trellis.io/affinity=none")
		r.must(ctx, t, "node", "down", "us/n2")
		t.Cleanup(func() { r.run(context.Background(), "node", "up", "us/n2") })
		remaining := []string{"eu/echo-n1", "eu/echo-n2", "us/echo-n1"}
		r.awaitPods(ctx, t, "the backends left with us/n2 down", remaining)
		r.must(ctx, t, "node", "up", "us/n2")
		r.awaitPods(ctx, t, "every backend with us/n2 up again", append(remaining, "us/echo-n2"))
	})

	step("ThirdCluster", func(t *testing.T) {
		r.annotate(ctx, t, "trellis.io/affinity=none")
		out := r.must(ctx, t, "add-cluster", "ap", "--id", "3", "--region", "ap")
		t.Log(strings.TrimSpace(out))
		r.awaitClusters(ctx, t, "eu/client served by all three clusters", []string{"ap", "eu", "us"})
		vr := r.verify(ctx, t)
		pairs := map[string]bool{}
		for _, c := range vr.Checks {
			if !c.OK {
				t.Errorf("lab verify: %s %s → %s (%s): %s %s", c.Kind, c.From, c.To, c.Target, c.Skipped, c.Detail)
			}
			if c.Kind == "pod-to-pod" {
				pairs[strings.Split(c.From, "/")[0]+"→"+strings.Split(c.To, "/")[0]] = true
			}
		}
		// 8 pods × 5 echo pods, and TCP and UDP from 3 clients.
		if len(vr.Checks) != 8*5+3*2 || len(pairs) != 9 {
			t.Errorf("lab verify: %d checks over cluster pairs %v; want 46 over all 9 pairs", len(vr.Checks), slices.Sorted(maps.Keys(pairs)))
		}
		rep := r.status(ctx, t)
		if !rep.Healthy || len(rep.Clusters) != 3 || len(rep.Nodes) != 5 {
			t.Errorf("lab status with ap: healthy=%v, %d clusters, %d nodes, problems %v", rep.Healthy, len(rep.Clusters), len(rep.Nodes), rep.Problems)
		}
	})

	step("Down", func(t *testing.T) {
		if out, err := r.run(ctx, "down"); err != nil {
			t.Fatal(err)
		} else {
			t.Log(strings.TrimSpace(out))
		}
		if left := leftovers(t, r.name, procs); len(left) > 0 {
			t.Errorf("lab down left behind: %s", strings.Join(left, "; "))
		}
		if after := rootLinks(t); !slices.Equal(after, linksBefore) {
			t.Errorf("links of the root namespace changed: before %v, after %v", linksBefore, after)
		}
		if out, err := r.run(ctx, "down"); err != nil || !strings.Contains(out, "nothing to remove") {
			t.Errorf("second lab down: %q, %v; want nothing to remove", out, err)
		}
	})
}

func (r *labRun) state(t testing.TB) *State {
	t.Helper()
	st, err := loadState(filepath.Join(BaseDir, r.name))
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// serviceURL is the http URL of cluster's first service: its VIP, port 80.
func serviceURL(t testing.TB, st *State, cluster string) string {
	t.Helper()
	c, ok := st.Topology.cluster(cluster)
	if !ok || len(c.Services) == 0 {
		t.Fatalf("no cluster %s with a service in the state", cluster)
	}
	return "http://" + c.Services[0].VIP + ":80/"
}

// upLab brings the default lab up for t (down at cleanup, as
// newLabRun arranges) and returns it, its state and a context that
// ends after timeout.
func upLab(t *testing.T, timeout time.Duration) (*labRun, *State, context.Context) {
	t.Helper()
	privtest.RequireRoot(t)
	r := newLabRun(t)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	if _, err := r.run(ctx, "up"); err != nil {
		t.Fatal(err)
	}
	return r, r.state(t), ctx
}

func podIP(t testing.TB, st *State, ref string) string {
	t.Helper()
	cluster, pod, _ := strings.Cut(ref, "/")
	if c, ok := st.Topology.cluster(cluster); ok {
		for _, n := range c.Nodes {
			for _, p := range n.Pods {
				if p.Name == pod {
					return p.IP
				}
			}
		}
	}
	t.Fatalf("no pod %s in the state", ref)
	return ""
}

// must runs a lab verb and fails the test when it fails.
func (r *labRun) must(ctx context.Context, t testing.TB, args ...string) string {
	t.Helper()
	start := time.Now()
	out, err := r.run(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("lab %s: %s", strings.Join(args, " "), time.Since(start).Round(time.Millisecond))
	return out
}

// exec runs `trellis lab exec POD -- argv…` and returns its stdout and
// exit code; err is for a failure to run it at all.
func (r *labRun) exec(ctx context.Context, pod string, argv ...string) (string, int, error) {
	args := append([]string{"lab", "exec", "--name", r.name, pod, "--"}, argv...)
	out, err := exec.CommandContext(ctx, r.bin, args...).Output()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode(), nil
	}
	return string(out), 0, err
}

func (r *labRun) annotate(ctx context.Context, t testing.TB, kv string) {
	t.Helper()
	if _, err := r.run(ctx, "annotate", "eu", "default/echo", kv); err != nil {
		t.Fatal(err)
	}
}

func (r *labRun) status(ctx context.Context, t *testing.T) Report {
	t.Helper()
	out, err := r.run(ctx, "status", "-o", "json")
	var rep Report
	if jerr := json.Unmarshal([]byte(out), &rep); jerr != nil {
		t.Fatalf("lab status -o json: %v (%v)\n%s", jerr, err, out)
	}
	return rep
}

func (r *labRun) verify(ctx context.Context, t *testing.T) VerifyReport {
	t.Helper()
	out, err := r.run(ctx, "verify", "-o", "json")
	var vr VerifyReport
	if jerr := json.Unmarshal([]byte(out), &vr); jerr != nil {
		t.Fatalf("lab verify -o json: %v (%v)\n%s", jerr, err, out)
	}
	return vr
}

// curl runs `lab curl eu/client default/echo` (exit 1 just means some
// requests failed: the result says which).
func (r *labRun) curl(ctx context.Context, n int) (CurlResult, error) {
	out, err := r.run(ctx, "curl", "eu/client", "default/echo", "-n", strconv.Itoa(n), "-o", "json")
	var cr CurlResult
	if jerr := json.Unmarshal([]byte(out), &cr); jerr != nil {
		return cr, fmt.Errorf("lab curl -o json: %v (%v)\n%s", jerr, err, out)
	}
	return cr, nil
}

// awaitCurl polls `lab curl eu/client default/echo -n 20` until a round
// has no failed request and satisfies ok, for at most 30 s.
func (r *labRun) awaitCurl(ctx context.Context, t testing.TB, what string, ok func(CurlResult) bool) {
	t.Helper()
	start := time.Now()
	rounds := 0
	var last CurlResult
	testutil.EventuallyNoError(t, 30*time.Second, what, func() error {
		rounds++
		cr, err := r.curl(ctx, 20)
		if err != nil {
			return err
		}
		last = cr
		var errs []string
		for _, p := range cr.Probes {
			if !p.OK {
				errs = append(errs, p.Error)
			}
		}
		if cr.Failed != 0 || !ok(cr) {
			return fmt.Errorf("last round answered by %v, %d failed %v", cr.PerPod, cr.Failed, errs)
		}
		return nil
	})
	t.Logf("%s: after %d rounds (%s): %v", what, rounds, time.Since(start).Round(time.Millisecond), last.PerPod)
}

// awaitClusters waits until eu/client's requests are answered by exactly
// the clusters want (sorted).
func (r *labRun) awaitClusters(ctx context.Context, t testing.TB, what string, want []string) {
	t.Helper()
	r.awaitCurl(ctx, t, what, func(cr CurlResult) bool {
		return slices.Equal(slices.Sorted(maps.Keys(cr.PerCluster)), want)
	})
}

// awaitPods waits until eu/client's requests are answered by exactly the
// pods want ("cluster/pod"). 20 requests over 4 backends miss one with a
// probability of 0.3%, and it is polled.
func (r *labRun) awaitPods(ctx context.Context, t testing.TB, what string, want []string) {
	t.Helper()
	slices.Sort(want)
	r.awaitCurl(ctx, t, what, func(cr CurlResult) bool {
		return slices.Equal(slices.Sorted(maps.Keys(cr.PerPod)), want)
	})
}

// requestLoop sends requests from a pod to a target until finished: each
// batch is one `lab exec POD -- trellis lab http-get -n 200`, a new
// connection per request, one batch after the other.
type requestLoop struct {
	r      *labRun
	stop   chan struct{}
	done   chan struct{}
	notify chan struct{}

	mu      sync.Mutex
	start   time.Time
	batches []batch
	marks   []string
	err     error
}

type batch struct {
	start, end time.Time
	probes     []Probe
}

const loopBatch = 200

func (r *labRun) startLoop(ctx context.Context, t testing.TB, pod, target string) *requestLoop {
	return r.startLoopN(ctx, t, pod, target, loopBatch, 2*time.Second)
}

// startLoopN is startLoop with n requests a batch, each with timeout:
// fewer and shorter where many time out, so that a batch ends soon after
// the window it watches and a sequential client notices a failover soon.
func (r *labRun) startLoopN(ctx context.Context, t testing.TB, pod, target string, n int, timeout time.Duration) *requestLoop {
	l := &requestLoop{r: r, stop: make(chan struct{}), done: make(chan struct{}), notify: make(chan struct{}, 1), start: time.Now()}
	go func() {
		defer close(l.done)
		for {
			select {
			case <-l.stop:
				return
			case <-ctx.Done():
				return
			default:
			}
			b := batch{start: time.Now()}
			out, code, err := r.exec(ctx, pod, r.bin, "lab", "http-get", "-n", strconv.Itoa(n), "--timeout", timeout.String(), target)
			b.end = time.Now()
			sc := bufio.NewScanner(strings.NewReader(out))
			for sc.Scan() {
				var p Probe
				if jerr := json.Unmarshal(sc.Bytes(), &p); jerr != nil {
					err = errors.Join(err, fmt.Errorf("http-get printed %q", sc.Text()))
					continue
				}
				b.probes = append(b.probes, p)
			}
			if err == nil && len(b.probes) != n {
				err = fmt.Errorf("http-get in %s exited %d after %d of %d requests", pod, code, len(b.probes), n)
			}
			l.mu.Lock()
			l.batches = append(l.batches, b)
			if err != nil && l.err == nil && ctx.Err() == nil {
				l.err = err
			}
			l.mu.Unlock()
			select {
			case l.notify <- struct{}{}:
			default:
			}
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { l.halt() })
	return l
}

func (l *requestLoop) halt() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	<-l.done
}

// mark notes an event on the loop's clock, for the failure report.
func (l *requestLoop) mark(what string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.marks = append(l.marks, fmt.Sprintf("%s: %s", time.Since(l.start).Round(time.Millisecond), what))
}

// await waits until n more batches have completed since the call.
func (l *requestLoop) await(t testing.TB, n int) {
	t.Helper()
	l.mu.Lock()
	want := len(l.batches) + n
	l.mu.Unlock()
	timeout := time.After(time.Minute)
	for {
		l.mu.Lock()
		got, err := len(l.batches), l.err
		l.mu.Unlock()
		if got >= want {
			return
		}
		if err != nil {
			t.Fatalf("request loop: %v", err)
		}
		select {
		case <-l.notify:
		case <-l.done:
			l.mu.Lock()
			err := l.err
			l.mu.Unlock()
			t.Fatalf("request loop ended early: %v", err)
		case <-timeout:
			t.Fatalf("request loop: %d batches of %d after a minute", got-want+n, n)
		}
	}
}

// finish stops the loop and fails the test for every failed request,
// saying when it failed.
func (l *requestLoop) finish(t *testing.T, what string) {
	t.Helper()
	l.halt()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		t.Errorf("%s: request loop: %v", what, l.err)
	}
	total, per := 0, map[string]int{}
	var failures []string
	for i, b := range l.batches {
		for j, p := range b.probes {
			total++
			if p.OK {
				per[p.From.Cluster]++
				continue
			}
			failures = append(failures, fmt.Sprintf("batch %d (%s–%s after the loop started) request %d: %s",
				i, b.start.Sub(l.start).Round(time.Millisecond), b.end.Sub(l.start).Round(time.Millisecond), j, p.Error))
		}
	}
	t.Logf("%s: %d requests in %d batches over %s, answered by %v, %d failed",
		what, total, len(l.batches), time.Since(l.start).Round(time.Millisecond), per, len(failures))
	if len(failures) > 0 {
		t.Errorf("%s: %d of %d requests failed:\n  %s\nevents:\n  %s", what, len(failures), total,
			strings.Join(failures, "\n  "), strings.Join(l.marks, "\n  "))
	}
}
