package lab

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// ExecOptions are the standard streams of Exec.
type ExecOptions struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
}

// Exec runs argv inside a pod ("cluster/pod"): in its network namespace
// and its cgroup, so the node's socket LB translates its connections. It
// returns the command's exit code (128+signal when killed).
func Exec(ctx context.Context, opts Options, pod string, argv []string, stdio ExecOptions) (int, error) {
	if err := requireRoot(); err != nil {
		return 0, err
	}
	if len(argv) == 0 {
		return 0, errors.New("lab exec: no command given")
	}
	l, err := open(opts, false)
	if err != nil {
		return 0, err
	}
	defer l.close()
	p, err := l.lay.pod(pod)
	if err != nil {
		return 0, err
	}
	return l.execIn(ctx, p, argv, stdio)
}

func (l *lab) execIn(ctx context.Context, p *podLayout, argv []string, stdio ExecOptions) (int, error) {
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return 0, fmt.Errorf("lab exec: %w", err)
	}
	argv = append([]string{path}, argv[1:]...)
	cmd, err := procSpec{ns: p.ns, cgroup: p.cgroup, argv: argv, stdin: stdio.Stdin, stdout: stdio.Stdout, stderr: stdio.Stderr}.start()
	if err != nil {
		return 0, err
	}
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			cmd.Process.Signal(syscall.SIGTERM)
		case <-done:
		}
	}()
	err = cmd.Wait()
	close(done)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, nil
	case errors.As(err, &ee):
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal()), nil
		}
		return ee.ExitCode(), nil
	}
	return 0, fmt.Errorf("lab exec in %s: %w", p.ref(), err)
}

// probe runs `trellis lab http-get` inside pod p and collects its probes.
func (l *lab) probe(ctx context.Context, p *podLayout, targets []string, count int, timeout time.Duration) ([]Probe, error) {
	argv := []string{l.opts.Binary, "lab", "http-get", "--count", strconv.Itoa(count), "--timeout", timeout.String()}
	argv = append(argv, targets...)
	var stdout, stderr bytes.Buffer
	code, err := l.execIn(ctx, p, argv, ExecOptions{Stdout: &stdout, Stderr: &stderr})
	if err != nil {
		return nil, err
	}
	var probes []Probe
	sc := bufio.NewScanner(&stdout)
	for sc.Scan() {
		var pr Probe
		if err := json.Unmarshal(sc.Bytes(), &pr); err != nil {
			return nil, fmt.Errorf("lab: http-get in %s printed %q: %w", p.ref(), sc.Text(), err)
		}
		probes = append(probes, pr)
	}
	if len(probes) != count*len(targets) {
		return probes, fmt.Errorf("lab: http-get in %s exited %d after %d of %d probes: %s", p.ref(), code, len(probes), count*len(targets), strings.TrimSpace(stderr.String()))
	}
	return probes, nil
}

// CurlOptions tune Curl.
type CurlOptions struct {
	// Count is the number of requests (default 10).
	Count int
	// UDP sends datagrams to the service's UDP port instead of HTTP GETs
	// to its TCP port.
	UDP     bool
	Timeout time.Duration
}

// CurlResult is what Curl saw.
type CurlResult struct {
	From       string         `json:"from"`
	Service    string         `json:"service"`
	Target     string         `json:"target"`
	Probes     []Probe        `json:"probes"`
	PerCluster map[string]int `json:"perCluster"`
	PerPod     map[string]int `json:"perPod"`
	Failed     int            `json:"failed"`
}

// Curl sends requests from inside pod ("cluster/pod") to a service
// ("namespace/name" or "name" in namespace default, at the VIP of the
// pod's cluster; or a literal ip:port), each from a fresh socket in the
// pod's cgroup, and tallies who answered.
func Curl(ctx context.Context, opts Options, pod, service string, co CurlOptions) (*CurlResult, error) {
	if err := requireRoot(); err != nil {
		return nil, err
	}
	if co.Count <= 0 {
		co.Count = 10
	}
	if co.Timeout == 0 {
		co.Timeout = 2 * time.Second
	}
	l, err := open(opts, false)
	if err != nil {
		return nil, err
	}
	defer l.close()
	p, err := l.lay.pod(pod)
	if err != nil {
		return nil, err
	}
	proto := v1.ProtocolTCP
	if co.UDP {
		proto = v1.ProtocolUDP
	}
	addr, err := l.serviceAddr(p.node.cluster, service, proto)
	if err != nil {
		return nil, err
	}
	target := "http://" + addr.String() + "/"
	if co.UDP {
		target = "udp://" + addr.String()
	}
	probes, err := l.probe(ctx, p, []string{target}, co.Count, co.Timeout)
	if err != nil {
		return nil, err
	}
	res := &CurlResult{From: p.ref(), Service: service, Target: target, Probes: probes, PerCluster: map[string]int{}, PerPod: map[string]int{}}
	for _, pr := range probes {
		if !pr.OK {
			res.Failed++
			continue
		}
		res.PerCluster[pr.From.Cluster]++
		res.PerPod[pr.From.Cluster+"/"+pr.From.Pod]++
	}
	return res, nil
}

// serviceAddr resolves a service name (or ip:port) to the VIP and port of
// cluster c for proto.
func (l *lab) serviceAddr(c *clusterLayout, service string, proto v1.Protocol) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(service); err == nil {
		return ap, nil
	}
	ns, name, ok := strings.Cut(service, "/")
	if !ok {
		ns, name = DefaultNamespace, service
	}
	i := slices.IndexFunc(c.Services, func(s Service) bool { return s.Namespace == ns && s.Name == name })
	if i < 0 {
		return netip.AddrPort{}, fmt.Errorf("cluster %s has no service %s/%s", c.Name, ns, name)
	}
	s := c.Services[i]
	for _, p := range s.Ports {
		if p.Protocol == proto {
			return netip.AddrPortFrom(netip.MustParseAddr(s.VIP), p.Port), nil
		}
	}
	return netip.AddrPort{}, fmt.Errorf("service %s/%s in %s has no %s port", ns, name, c.Name, proto)
}

// PrintCurl writes r as a table and a tally.
func PrintCurl(w io.Writer, r *CurlResult) {
	fmt.Fprintf(w, "%d requests from %s to %s (%s):\n", len(r.Probes), r.From, r.Service, r.Target)
	for i, p := range r.Probes {
		if p.OK {
			fmt.Fprintf(w, "  %3d  %-10s %-24s %s\n", i+1, p.From.Cluster, p.From.Node+"/"+p.From.Pod, p.Latency)
		} else {
			fmt.Fprintf(w, "  %3d  FAILED     %s\n", i+1, p.Error)
		}
	}
	var parts []string
	for _, c := range sortedKeys(r.PerCluster) {
		parts = append(parts, fmt.Sprintf("%s %d", c, r.PerCluster[c]))
	}
	if r.Failed > 0 {
		parts = append(parts, fmt.Sprintf("failed %d", r.Failed))
	}
	fmt.Fprintf(w, "per cluster: %s\n", strings.Join(parts, ", "))
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
