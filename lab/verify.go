package lab

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// VerifyOptions tune Verify.
type VerifyOptions struct {
	// Count is the number of requests per service check (default 6).
	Count   int
	Timeout time.Duration
}

// Check is one connectivity check.
type Check struct {
	Kind    string `json:"kind"` // pod-to-pod, service-tcp, service-udp
	From    string `json:"from"`
	To      string `json:"to"`
	Target  string `json:"target"`
	OK      bool   `json:"ok"`
	Skipped string `json:"skipped,omitempty"`
	// Isolated marks a pod-to-pod check between clusters separated with
	// `lab disconnect`: it passes when no request is answered.
	Isolated bool   `json:"isolated,omitempty"`
	Detail   string `json:"detail,omitempty"`
}

// VerifyReport is the connectivity matrix.
type VerifyReport struct {
	Datapath bool    `json:"datapath"`
	Checks   []Check `json:"checks"`
	Passed   int     `json:"passed"`
	Failed   int     `json:"failed"`
	Skipped  int     `json:"skipped"`
}

// Verify checks the lab's connectivity: from every pod to every echo pod's
// IP (HTTP :8080, across every pair of nodes and clusters), and from every
// client pod to each service of its cluster at its VIP (TCP and UDP), each
// request from a process in the pod's namespace and cgroup. Pods that are
// stopped and nodes that are down are skipped. Between clusters separated
// with `lab disconnect` the pod-to-pod checks are turned around: their
// agents have drained each other (tunnels included), so a check passes
// when the request is not answered.
func Verify(ctx context.Context, opts Options, vo VerifyOptions) (*VerifyReport, error) {
	if err := requireRoot(); err != nil {
		return nil, err
	}
	if vo.Count <= 0 {
		vo.Count = 6
	}
	if vo.Timeout == 0 {
		vo.Timeout = 2 * time.Second
	}
	l, err := open(opts, false)
	if err != nil {
		return nil, err
	}
	defer l.close()
	st := l.state
	rep := &VerifyReport{Datapath: st.Datapath}

	down := func(p *podLayout) string {
		switch {
		case st.DownNodes[p.node.ref()]:
			return "node " + p.node.ref() + " is down"
		case p.Echo && st.StoppedPods[p.ref()]:
			return "pod stopped"
		}
		return ""
	}
	// Jobs: one http-get run per source pod for the pod-to-pod checks, one
	// per service check; each job fills the checks at its indices.
	type job struct {
		from    *podLayout
		idx     []int
		targets []string
		count   int
	}
	var jobs []*job
	add := func(c Check, j *job, target string, why string) {
		c.Target = target
		rep.Checks = append(rep.Checks, c)
		if why != "" {
			rep.Checks[len(rep.Checks)-1].Skipped = why
			return
		}
		j.idx = append(j.idx, len(rep.Checks)-1)
		j.targets = append(j.targets, target)
	}
	pods := l.lay.allPods()
	for _, from := range pods {
		j := &job{from: from, count: 1}
		for _, to := range pods {
			if to.Echo {
				target := "http://" + netip.AddrPortFrom(to.ip, EchoPort).String() + "/"
				isolated := !st.joined(from.node.cluster.Name, to.node.cluster.Name)
				add(Check{Kind: "pod-to-pod", From: from.ref(), To: to.ref(), Isolated: isolated}, j, target, down(from)+down(to))
			}
		}
		jobs = append(jobs, j)
	}
	for _, cl := range l.lay.clusters {
		for _, n := range cl.nodes {
			for _, from := range n.pods {
				if from.Echo {
					continue
				}
				for _, s := range cl.Services {
					for _, proto := range []v1.Protocol{v1.ProtocolTCP, v1.ProtocolUDP} {
						addr, err := l.serviceAddr(cl, s.Namespace+"/"+s.Name, proto)
						if err != nil {
							continue // no port of this protocol
						}
						target, kind := "http://"+addr.String()+"/", "service-tcp"
						if proto == v1.ProtocolUDP {
							target, kind = "udp://"+addr.String(), "service-udp"
						}
						j := &job{from: from, count: vo.Count}
						add(Check{Kind: kind, From: from.ref(), To: s.Namespace + "/" + s.Name}, j, target, down(from))
						jobs = append(jobs, j)
					}
				}
			}
		}
	}

	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	for _, j := range jobs {
		if len(j.targets) == 0 {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			probes, err := l.probe(ctx, j.from, j.targets, j.count, vo.Timeout)
			for i, ci := range j.idx {
				got := probes[min(i*j.count, len(probes)):min((i+1)*j.count, len(probes))]
				judge(&rep.Checks[ci], got, err)
			}
		}()
	}
	wg.Wait()
	for _, c := range rep.Checks {
		switch {
		case c.Skipped != "":
			rep.Skipped++
		case c.OK:
			rep.Passed++
		default:
			rep.Failed++
		}
	}
	return rep, nil
}

// judge fills c from its probes: all must succeed, and a pod-to-pod probe
// must be answered by the pod it was sent to.
func judge(c *Check, probes []Probe, err error) {
	if c.Isolated {
		judgeIsolated(c, probes, err)
		return
	}
	if len(probes) == 0 {
		c.Detail = "no answer"
		if err != nil {
			c.Detail = err.Error()
		}
		return
	}
	per := map[string]int{}
	failed := 0
	var firstErr string
	for _, p := range probes {
		if !p.OK {
			failed++
			if firstErr == "" {
				firstErr = p.Error
			}
			continue
		}
		if c.Kind == "pod-to-pod" && p.From.Cluster+"/"+p.From.Pod != c.To {
			failed++
			firstErr = "answered by " + p.From.String()
			continue
		}
		per[p.From.Cluster]++
	}
	var parts []string
	for _, k := range sortedKeys(per) {
		parts = append(parts, fmt.Sprintf("%s %d", k, per[k]))
	}
	c.Detail = strings.Join(parts, ", ")
	if failed > 0 {
		c.Detail = fmt.Sprintf("%d/%d failed: %s", failed, len(probes), firstErr)
		return
	}
	c.OK = true
}

// judgeIsolated fills an isolated check: it passes when every probe ran
// and none was answered.
func judgeIsolated(c *Check, probes []Probe, err error) {
	if len(probes) == 0 {
		c.Detail = "no probe ran"
		if err != nil {
			c.Detail = err.Error()
		}
		return
	}
	for _, p := range probes {
		if p.OK {
			c.Detail = "answered by " + p.From.String() + " although the clusters are disconnected"
			return
		}
	}
	c.OK = true
	c.Detail = "no answer (clusters disconnected): " + probes[0].Error
}

// PrintVerify writes the pod-to-pod matrix and the service checks.
func PrintVerify(w io.Writer, r *VerifyReport) {
	var rows, cols []string
	cell := map[string]string{}
	seenRow, seenCol := map[string]bool{}, map[string]bool{}
	for _, c := range r.Checks {
		if c.Kind != "pod-to-pod" {
			continue
		}
		if !seenRow[c.From] {
			seenRow[c.From] = true
			rows = append(rows, c.From)
		}
		if !seenCol[c.To] {
			seenCol[c.To] = true
			cols = append(cols, c.To)
		}
		cell[c.From+"→"+c.To] = verdict(c)
		if c.Isolated && c.OK {
			cell[c.From+"→"+c.To] = "cut"
		}
	}
	fmt.Fprintf(w, "Pod → pod (HTTP to each echo pod's IP:%d)\n", EchoPort)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprint(tw, "FROM \\ TO")
	for _, c := range cols {
		fmt.Fprint(tw, "\t"+c)
	}
	fmt.Fprintln(tw)
	for _, r := range rows {
		fmt.Fprint(tw, r)
		for _, c := range cols {
			fmt.Fprint(tw, "\t"+cell[r+"→"+c])
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nPod → service (VIP of the client's cluster)")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FROM\tSERVICE\tTARGET\tRESULT\tANSWERED BY")
	for _, c := range r.Checks {
		if c.Kind == "pod-to-pod" {
			continue
		}
		detail := c.Detail
		if c.Skipped != "" {
			detail = c.Skipped
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", c.From, c.To, c.Target, verdict(c), detail)
	}
	tw.Flush()
	var failures []Check
	for _, c := range r.Checks {
		if c.Kind == "pod-to-pod" && !c.OK && c.Skipped == "" {
			failures = append(failures, c)
		}
	}
	if len(failures) > 0 {
		fmt.Fprintln(w, "\nFailures:")
		for _, c := range failures {
			fmt.Fprintf(w, "  %s → %s: %s\n", c.From, c.To, c.Detail)
		}
	}
	if isolated := countIsolated(r.Checks); isolated > 0 {
		fmt.Fprintf(w, "\ncut: no answer, as it should be between disconnected clusters (%d checks)\n", isolated)
	}
	fmt.Fprintf(w, "\n%d passed, %d failed, %d skipped", r.Passed, r.Failed, r.Skipped)
	if !r.Datapath {
		fmt.Fprint(w, " (datapath off: agents started without the datapath flags)")
	}
	fmt.Fprintln(w)
}

func countIsolated(checks []Check) int {
	n := 0
	for _, c := range checks {
		if c.Isolated {
			n++
		}
	}
	return n
}

func verdict(c Check) string {
	switch {
	case c.Skipped != "":
		return "skip"
	case c.OK:
		return "ok"
	}
	return "FAIL"
}
