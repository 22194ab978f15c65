package lab

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/trellis-mesh/trellis/agent"
)

// demoLab is the lab the demo builds (and removes).
const demoLab = "demo"

// Demo tells the Trellis story on a lab of two clusters, step by step:
// a global service answered from both clusters, affinity keeping traffic
// home, failover to the other region when the local pods die and back
// when they return, WireGuard switched on live under a running TCP stream
// (a capture of the underlay shows a pod's payload readable in VXLAN
// before and only WireGuard frames after), and the agents' view. It removes the lab at the end,
// also when a step fails or the user interrupts it.
func Demo(ctx context.Context, out io.Writer, log *slog.Logger) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("the demo builds network namespaces, cgroups and eBPF programs: run it as root (make demo re-runs itself with sudo when sudo exists)")
	}
	// A reader that goes away (demo | head) must not kill the demo before
	// it removes the lab: ignore SIGPIPE, so writes just fail.
	signal.Ignore(syscall.SIGPIPE)
	d := &demo{out: out, tty: isTerminal(out), opts: Options{Name: demoLab, Out: io.Discard, Log: log}, start: time.Now()}
	// A crashed earlier demo may have left its lab behind.
	Down(ctx, d.opts)
	defer func() {
		d.step("Tear down")
		downCtx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := Down(downCtx, d.opts); err != nil {
			d.say("      down: %v", err)
		} else {
			d.say("      every namespace, link, cgroup, eBPF pin and process the lab made is gone")
		}
		d.say("\nDemo finished in %s.", time.Since(d.start).Round(time.Second))
	}()
	return d.run(ctx)
}

type demo struct {
	out   io.Writer
	tty   bool // progress spinner and bold titles only on a terminal
	opts  Options
	n     int
	start time.Time
}

const demoSteps = 8

func (d *demo) say(format string, args ...any) { fmt.Fprintf(d.out, format+"\n", args...) }

func (d *demo) step(title string) {
	d.n++
	if d.tty {
		d.say("\n\033[1m[%d/%d] %s\033[0m", d.n, demoSteps, title)
	} else {
		d.say("\n[%d/%d] %s", d.n, demoSteps, title)
	}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// waitFor polls cond with a progress line until it holds or timeout.
func (d *demo) waitFor(ctx context.Context, what string, timeout time.Duration, cond func() bool) (time.Duration, error) {
	start := time.Now()
	for i := 0; ; i++ {
		if cond() {
			if d.tty && i > 0 {
				fmt.Fprintf(d.out, "\r%-90s\r", "")
			}
			return time.Since(start), nil
		}
		if time.Since(start) > timeout {
			fmt.Fprintln(d.out)
			return time.Since(start), fmt.Errorf("demo: %s: not after %s", what, timeout)
		}
		switch {
		case d.tty:
			fmt.Fprintf(d.out, "\r      waiting for %s %s", what, []string{"|", "/", "-", "\\"}[i%4])
		case i == 0:
			d.say("      waiting for %s ...", what)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// curl sends n requests from eu/client to default/echo.
func (d *demo) curl(ctx context.Context, n int) (*CurlResult, error) {
	return Curl(ctx, d.opts, "eu/client", "default/echo", CurlOptions{Count: n, Timeout: 2 * time.Second})
}

// summary prints one line per cluster: how many requests it answered and
// from which pods.
func (d *demo) summary(r *CurlResult) {
	d.say("      %d requests from %s to %s (%s):", len(r.Probes), r.From, r.Service, r.Target)
	clusters := make([]string, 0, len(r.PerCluster))
	for c := range r.PerCluster {
		clusters = append(clusters, c)
	}
	slices.Sort(clusters)
	for _, c := range clusters {
		var pods []string
		for pod, n := range r.PerPod {
			if strings.HasPrefix(pod, c+"/") {
				pods = append(pods, fmt.Sprintf("%s %d", strings.TrimPrefix(pod, c+"/"), n))
			}
		}
		slices.Sort(pods)
		d.say("        %-4s %3d  %s  %s", c, r.PerCluster[c], bar(r.PerCluster[c]), strings.Join(pods, ", "))
	}
	if r.Failed > 0 {
		d.say("        failed %d", r.Failed)
	}
}

func bar(n int) string { return strings.Repeat("#", n) }

// onlyFrom reports whether every request was answered, all by cluster.
func onlyFrom(r *CurlResult, cluster string) bool {
	return r != nil && r.Failed == 0 && r.PerCluster[cluster] == len(r.Probes)
}

func (d *demo) run(ctx context.Context) error {
	d.say("Trellis demo: two clusters, eu and us, each with two nodes, joined into one mesh.")
	d.say("Everything runs on this machine in network namespaces; nothing leaves it.")

	d.step("Build the clusters and join them")
	var report *Report
	took, err := d.waitForErr(ctx, "the mesh API servers and four agents to be ready", func() error {
		var err error
		report, err = Up(ctx, UpOptions{Options: d.opts, ReadyTimeout: 90 * time.Second})
		return err
	})
	if err != nil {
		return err
	}
	PrintReport(d.out, report)
	d.say("      up in %s: API servers with embedded etcd, agents with the eBPF socket LB and VXLAN, `trellis connect` between them", took.Round(100*time.Millisecond))

	d.step("eu/client calls the global service default/echo (no affinity)")
	r, err := d.curl(ctx, 20)
	if err != nil {
		return err
	}
	d.summary(r)
	d.say("      the VIP is translated in eu/client's own socket calls; answers come from both clusters")

	d.step("Annotate it trellis.io/affinity=local in eu: traffic stays home")
	if err := Annotate(ctx, d.opts, "eu", "default/echo", []string{"trellis.io/affinity=local"}); err != nil {
		return err
	}
	took, err = d.waitFor(ctx, "only eu to answer", 30*time.Second, func() bool {
		r, _ = d.curl(ctx, 10)
		return onlyFrom(r, "eu")
	})
	if err != nil {
		return err
	}
	r, _ = d.curl(ctx, 20)
	d.summary(r)
	if took < 200*time.Millisecond {
		d.say("      in effect by the first request after the annotation")
	} else {
		d.say("      in effect %s after the annotation", took.Round(100*time.Millisecond))
	}

	d.step("Both eu echo pods die: requests fail over to us")
	stopped := time.Now()
	for _, pod := range []string{"eu/echo-n1", "eu/echo-n2"} {
		if err := PodStop(ctx, d.opts, pod); err != nil {
			return err
		}
	}
	if _, err = d.waitFor(ctx, "us to answer everything", 60*time.Second, func() bool {
		r, _ = d.curl(ctx, 5)
		return onlyFrom(r, "us")
	}); err != nil {
		return err
	}
	failover := time.Since(stopped)
	r, _ = d.curl(ctx, 20)
	d.summary(r)
	d.say("      failover took %s from the pods stopping to every request answered by us", failover.Round(10*time.Millisecond))

	d.step("The eu pods come back: traffic returns to eu")
	restarted := time.Now()
	for _, pod := range []string{"eu/echo-n1", "eu/echo-n2"} {
		if err := PodStart(ctx, d.opts, pod); err != nil {
			return err
		}
	}
	if _, err = d.waitFor(ctx, "both eu pods to answer everything again", 60*time.Second, func() bool {
		r, _ = d.curl(ctx, 20)
		return onlyFrom(r, "eu") && len(r.PerPod) == 2
	}); err != nil {
		return err
	}
	back := time.Since(restarted)
	r, _ = d.curl(ctx, 20)
	d.summary(r)
	d.say("      back in eu %s after the pods started", back.Round(10*time.Millisecond))

	if err := d.encryption(ctx); err != nil {
		return err
	}

	d.step("What the agent on eu/n1 sees (trellis status)")
	st, err := d.agentStatus(ctx, "eu", "n1")
	if err != nil {
		return err
	}
	agent.PrintStatus(d.out, st)
	return nil
}

func (d *demo) waitForErr(ctx context.Context, what string, fn func() error) (time.Duration, error) {
	done := make(chan error, 1)
	go func() { done <- fn() }()
	var err error
	took, _ := d.waitFor(ctx, what, 3*time.Minute, func() bool {
		select {
		case err = <-done:
			return true
		default:
			return false
		}
	})
	return took, err
}

// agentStatus asks one node's agent for its view.
func (d *demo) agentStatus(ctx context.Context, cluster, node string) (agent.Status, error) {
	rep, err := Status(ctx, d.opts)
	if err != nil {
		return agent.Status{}, err
	}
	for _, n := range rep.Nodes {
		if n.Cluster == cluster && n.Name == node {
			return agent.FetchStatus(ctx, n.StatusSocket)
		}
	}
	return agent.Status{}, fmt.Errorf("demo: no node %s/%s in the lab", cluster, node)
}
