package agent

// Local health: the agent probes the endpoints of its own node.
//
// Design notes. A pod whose process crashed is still registered ready:
// nothing but the node it runs on can notice soon, and every request the
// socket LB sends it fails until something does. So the agent probes its
// node's pods (standalone mode: the pod files its CNI step wrote under
// <state-dir>/pods/; Kubernetes mode: the pods scheduled on the node, see
// kubernetes.go) on the target ports of the services that have them as
// backends, from inside the node's network namespace, where the agent
// runs.
//
//   - Which ports, and how: those the merged snapshot gives the pod's IP
//     as a backend, TCP only, each with its service's check
//     (trellis.io/health-check: a TCP connect by default, or an HTTP GET
//     of a path that must answer 2xx or 3xx; a port two services check
//     differently is probed both ways). They are remembered while the pod
//     exists, so a pod that left every service's backends (marked not
//     ready because its probes failed) is still probed, and comes back
//     when they pass.
//   - When: each endpoint on its own schedule, every Interval with ±10%
//     jitter (so a node's probes do not all go at once), the next one
//     only after the last finished, at most MaxConcurrent probes at a
//     time. A probe of all the pod's ports fails when one fails or takes
//     longer than Timeout.
//   - Down after FailureThreshold failures in a row, up again after
//     SuccessThreshold successes in a row; a new pod starts up (its
//     registry readiness is the CNI step's until its probes say
//     otherwise).
//   - Datapath first, then the source: a change triggers an apply at once
//     with the down endpoints left out of every service's backends; after
//     that apply the registrar marks the endpoint not ready (or ready
//     again) in the registry (Kubernetes mode: the agent sets the pod's
//     trellis.io/healthy condition, which the Kubernetes source reads), so
//     that the other nodes and clusters learn it through the normal
//     publish path. The local datapath does not wait for the round trip
//     through the source and etcd, and the source stays the one every
//     other agent reads.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
)

// Defaults of HealthConfig, and of `trellis agent`'s --health-* flags.
const (
	DefaultHealthInterval         = 100 * time.Millisecond
	DefaultHealthTimeout          = 500 * time.Millisecond
	DefaultHealthFailureThreshold = 3
	DefaultHealthSuccessThreshold = 2
	DefaultHealthMaxConcurrent    = 16
)

// HealthConfig says how the agent probes the endpoints of its node. The
// zero value probes nothing.
type HealthConfig struct {
	// Interval between two probes of one endpoint (±10% jitter); 0: no
	// probing, the registry's readiness alone decides.
	Interval time.Duration
	// Timeout of one probe (a TCP connect, or an HTTP GET from connect to
	// status line); default DefaultHealthTimeout.
	Timeout time.Duration
	// FailureThreshold failures in a row take an endpoint out, and
	// SuccessThreshold successes in a row bring it back; defaults 3 and 2.
	FailureThreshold int
	SuccessThreshold int
	// MaxConcurrent bounds the probes in flight; default 16.
	MaxConcurrent int
}

func (c HealthConfig) withDefaults() HealthConfig {
	if c.Timeout <= 0 {
		c.Timeout = DefaultHealthTimeout
	}
	if c.FailureThreshold <= 0 {
		c.FailureThreshold = DefaultHealthFailureThreshold
	}
	if c.SuccessThreshold <= 0 {
		c.SuccessThreshold = DefaultHealthSuccessThreshold
	}
	if c.MaxConcurrent <= 0 {
		c.MaxConcurrent = DefaultHealthMaxConcurrent
	}
	return c
}

// Validate names a setting that cannot work.
func (c HealthConfig) Validate() error {
	var errs []error
	if c.Interval < 0 {
		errs = append(errs, errors.New("--health-interval must not be negative (0 turns probing off)"))
	}
	if c.Timeout < 0 || c.FailureThreshold < 0 || c.SuccessThreshold < 0 || c.MaxConcurrent < 0 {
		errs = append(errs, errors.New("--health-timeout and the --health-*-threshold flags must not be negative"))
	}
	return errors.Join(errs...)
}

// HealthStatus is what `trellis status` shows of local health.
type HealthStatus struct {
	Interval         time.Duration    `json:"interval"`
	Timeout          time.Duration    `json:"timeout"`
	FailureThreshold int              `json:"failureThreshold"`
	SuccessThreshold int              `json:"successThreshold"`
	Endpoints        []EndpointHealth `json:"endpoints"`
}

// EndpointHealth is one probed endpoint of the node.
type EndpointHealth struct {
	Pod   string     `json:"pod"` // namespace/name
	IP    netip.Addr `json:"ip"`
	Ports []uint16   `json:"ports"`
	// Checks are the probes of each port: "tcp 8080", "http 8080 /healthz".
	Checks []string `json:"checks,omitempty"`
	Down   bool     `json:"down"`
	// Since is when it last went down or came back up; zero if it never
	// changed.
	Since     time.Time `json:"since,omitzero"`
	LastProbe time.Time `json:"lastProbe,omitzero"`
	LastError string    `json:"lastError,omitempty"`
	// Failures and Successes count the probes in a row.
	Failures  int `json:"failures"`
	Successes int `json:"successes"`
}

// portCheck is one probe of an endpoint: a port and how to check it.
type portCheck struct {
	port  uint16
	check v1.HealthCheck
}

func (c portCheck) String() string {
	if c.check.IsHTTP() {
		return fmt.Sprintf("http %d %s", c.port, c.check.Path)
	}
	return fmt.Sprintf("tcp %d", c.port)
}

func comparePortChecks(a, b portCheck) int {
	if a.port != b.port {
		return int(a.port) - int(b.port)
	}
	return strings.Compare(a.check.String(), b.check.String())
}

// probeFunc checks one endpoint address the way check says.
type probeFunc func(ctx context.Context, addr netip.AddrPort, check v1.HealthCheck, timeout time.Duration) error

// dialFunc opens a probe's connection; (*net.Dialer).DialContext, but
// for tests that probe from a network namespace of theirs.
type dialFunc func(ctx context.Context, network, address string) (net.Conn, error)

// tcpProbe connects and closes with a reset, leaving no TIME_WAIT.
func tcpProbe(ctx context.Context, addr netip.AddrPort, timeout time.Duration) error {
	return tcpProbeWith(ctx, new(net.Dialer).DialContext, addr, timeout)
}

func tcpProbeWith(ctx context.Context, dial dialFunc, addr netip.AddrPort, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := dial(ctx, "tcp", addr.String())
	if err != nil {
		return err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	return c.Close()
}

// maxProbeBody is how much of an HTTP check's answer is read (and
// thrown away): the status line decides.
const maxProbeBody = 4 << 10

// newHTTPProber returns the probe of both checks; an HTTP check GETs the check's path on addr, one
// connection per probe (closed with a reset, as tcpProbe's), no proxy, no
// redirect followed (a 3xx passes, as a kubelet's probe does), 2xx and
// 3xx pass. The path was validated at the source (printable ASCII,
// starting with "/"), so it cannot smuggle a header.
func newHTTPProber() probeFunc { return newProber(new(net.Dialer).DialContext) }

// newProber is newHTTPProber with connections from dial.
func newProber(dial dialFunc) probeFunc {
	client := &http.Client{
		Transport: &http.Transport{
			Proxy:             nil,
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, address string) (net.Conn, error) {
				c, err := dial(ctx, network, address)
				if tc, ok := c.(*net.TCPConn); ok {
					tc.SetLinger(0)
				}
				return c, err
			},
			MaxResponseHeaderBytes: 16 << 10,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return func(ctx context.Context, addr netip.AddrPort, check v1.HealthCheck, timeout time.Duration) error {
		if !check.IsHTTP() {
			return tcpProbeWith(ctx, dial, addr, timeout)
		}
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr.String()+check.Path, nil)
		if err != nil {
			return fmt.Errorf("path %q: %w", check.Path, err)
		}
		req.Header.Set("User-Agent", "trellis-agent/health")
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, io.LimitReader(resp.Body, maxProbeBody))
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("GET %s: %s; want 2xx or 3xx", check.Path, resp.Status)
		}
		return nil
	}
}

// healthChecker probes the node's endpoints. run owns the schedule; the
// state behind mu is read by the apply loop, the registrar and status.
type healthChecker struct {
	cfg HealthConfig
	// pods lists the node's pods (the pods dir, or the Kubernetes pods
	// of the node); an error is logged at debug level, whoever reads the
	// same pods reports it.
	pods     func() ([]PodFile, error)
	snapshot func() *clustermesh.Snapshot
	probe    probeFunc
	// onChange is called (from run) whenever an endpoint goes down or up.
	onChange func()
	log      *slog.Logger
	// podsEvery is how often the pods dir is read again.
	podsEvery time.Duration

	mu  sync.Mutex
	eps map[netip.Addr]*endpointHealth
	// gen counts the changes of the set of down endpoints.
	gen uint64
}

type endpointHealth struct {
	EndpointHealth
	checks   []portCheck
	inFlight bool
	next     time.Time
}

// podsDirLister lists the pod files of a pods dir (standalone mode).
func podsDirLister(dir string) func() ([]PodFile, error) {
	return func() ([]PodFile, error) {
		pods, err := readPods(dir)
		out := make([]PodFile, 0, len(pods))
		for _, p := range pods {
			out = append(out, p)
		}
		return out, err
	}
}

func newHealthChecker(cfg HealthConfig, pods func() ([]PodFile, error), snapshot func() *clustermesh.Snapshot, onChange func(), log *slog.Logger) *healthChecker {
	return &healthChecker{
		cfg: cfg.withDefaults(), pods: pods, snapshot: snapshot, probe: newHTTPProber(),
		onChange: onChange, log: log, podsEvery: time.Second,
		eps: make(map[netip.Addr]*endpointHealth),
	}
}

// down is the set of endpoints probed down and its generation; nil when
// none is.
func (h *healthChecker) down() (map[netip.Addr]bool, uint64) {
	if h == nil {
		return nil, 0
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	var out map[netip.Addr]bool
	for ip, e := range h.eps {
		if e.Down {
			if out == nil {
				out = make(map[netip.Addr]bool)
			}
			out[ip] = true
		}
	}
	return out, h.gen
}

// isDown says whether ip is probed down.
func (h *healthChecker) isDown(ip netip.Addr) bool {
	if h == nil {
		return false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	e := h.eps[ip]
	return e != nil && e.Down
}

// verdict is what local health says of a pod at ips: down when any of
// them is probed down (why: its last error); known is false while it is
// not down and some IP has not passed a probe yet (a new pod, one whose
// last probes failed but not enough to take it down), or the checker has
// not seen it yet, so that a mark is set only on a result. An IP with
// nothing to probe is known up.
func (h *healthChecker) verdict(ips []netip.Addr) (down, known bool, why string) {
	if h == nil {
		return false, false, ""
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	known = true
	for _, ip := range ips {
		e := h.eps[ip]
		switch {
		case e == nil:
			known = false
		case e.Down:
			return true, true, e.LastError
		case len(e.checks) > 0 && e.Successes == 0:
			known = false
		}
	}
	return false, known, ""
}

// status lists the probed endpoints, by pod.
func (h *healthChecker) status() *HealthStatus {
	if h == nil {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	st := &HealthStatus{Interval: h.cfg.Interval, Timeout: h.cfg.Timeout,
		FailureThreshold: h.cfg.FailureThreshold, SuccessThreshold: h.cfg.SuccessThreshold,
		Endpoints: []EndpointHealth{}}
	for _, e := range h.eps {
		eh := e.EndpointHealth
		eh.Ports = slices.Clone(eh.Ports)
		for _, c := range e.checks {
			eh.Checks = append(eh.Checks, c.String())
		}
		st.Endpoints = append(st.Endpoints, eh)
	}
	slices.SortFunc(st.Endpoints, func(a, b EndpointHealth) int { return a.IP.Compare(b.IP) })
	return st
}

type probeResult struct {
	ip  netip.Addr
	at  time.Time
	err error
}

// run probes until ctx ends; it returns after every probe it started.
func (h *healthChecker) run(ctx context.Context) {
	results := make(chan probeResult, h.cfg.MaxConcurrent)
	var wg sync.WaitGroup
	defer wg.Wait()
	inFlight := 0
	var podsRead time.Time
	var portsVersion uint64
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case r := <-results:
			inFlight--
			if h.record(r) && h.onChange != nil {
				h.onChange()
			}
		case <-timer.C:
		}
		now := time.Now()
		if now.Sub(podsRead) >= h.podsEvery {
			podsRead = now
			if h.refreshPods(now) && h.onChange != nil {
				h.onChange()
			}
			portsVersion = 0 // new pods need their ports
		}
		if snap := h.snapshot(); snap != nil && snap.Version != portsVersion {
			portsVersion = snap.Version
			h.refreshPorts(snap)
		}
		for _, ip := range h.due(now, h.cfg.MaxConcurrent-inFlight) {
			inFlight++
			wg.Add(1)
			go func() {
				defer wg.Done()
				results <- probeResult{ip: ip.ip, err: h.probeAll(ctx, ip.ip, ip.checks), at: time.Now()}
			}()
		}
		timer.Reset(h.wake(now, podsRead))
	}
}

type dueProbe struct {
	ip     netip.Addr
	checks []portCheck
}

// due marks up to n endpoints whose probe is due as in flight.
func (h *healthChecker) due(now time.Time, n int) []dueProbe {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []dueProbe
	for ip, e := range h.eps {
		if len(out) >= n {
			break
		}
		if e.inFlight || len(e.checks) == 0 || now.Before(e.next) {
			continue
		}
		e.inFlight = true
		out = append(out, dueProbe{ip, slices.Clone(e.checks)})
	}
	return out
}

// wake is how long until the next probe is due or the pods dir is read.
func (h *healthChecker) wake(now, podsRead time.Time) time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	next := podsRead.Add(h.podsEvery)
	for _, e := range h.eps {
		if !e.inFlight && len(e.checks) > 0 && e.next.Before(next) {
			next = e.next
		}
	}
	return max(next.Sub(now), 5*time.Millisecond)
}

// probeAll runs every check of ip; the first failure fails it.
func (h *healthChecker) probeAll(ctx context.Context, ip netip.Addr, checks []portCheck) error {
	for _, c := range checks {
		addr := netip.AddrPortFrom(ip, c.port)
		if err := h.probe(ctx, addr, c.check, h.cfg.Timeout); err != nil {
			kind := "tcp"
			if c.check.IsHTTP() {
				kind = "http"
			}
			return fmt.Errorf("%s %s: %w", kind, addr, err)
		}
	}
	return nil
}

// jitter is the interval ±10%.
func (h *healthChecker) jitter() time.Duration {
	return time.Duration(float64(h.cfg.Interval) * (0.9 + 0.2*rand.Float64()))
}

// record folds a probe's result in; true when the endpoint went down or
// came back up.
func (h *healthChecker) record(r probeResult) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	e := h.eps[r.ip]
	if e == nil {
		return false // its pod went meanwhile
	}
	e.inFlight = false
	e.LastProbe = r.at
	e.next = r.at.Add(h.jitter())
	if r.err != nil {
		e.Failures, e.Successes, e.LastError = e.Failures+1, 0, r.err.Error()
		if !e.Down && e.Failures >= h.cfg.FailureThreshold {
			e.Down, e.Since = true, r.at
			h.gen++
			h.log.Warn("endpoint fails its probes: out of the datapath, marking it not ready", "pod", e.Pod, "ip", r.ip,
				"failures", e.Failures, "err", r.err)
			return true
		}
		return false
	}
	e.Successes, e.Failures = e.Successes+1, 0
	if e.Down && e.Successes >= h.cfg.SuccessThreshold {
		downFor := r.at.Sub(e.Since).Round(time.Millisecond)
		e.Down, e.Since = false, r.at
		h.gen++
		h.log.Info("endpoint passes its probes again: back in the datapath, marking it ready", "pod", e.Pod, "ip", r.ip,
			"successes", e.Successes, "downFor", downFor)
		return true
	}
	return false
}

// refreshPods takes the node's pods: new ones start up, vanished ones
// are forgotten. True when a down one vanished.
func (h *healthChecker) refreshPods(now time.Time) bool {
	pods, err := h.pods()
	if err != nil {
		h.log.Debug("health: listing the node's pods", "err", err) // the registrar reports it
	}
	byIP := make(map[netip.Addr]PodFile, len(pods))
	for _, p := range pods {
		if p.IP.IsValid() {
			byIP[p.IP] = p
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	changed := false
	for ip, e := range h.eps {
		if p, ok := byIP[ip]; !ok || p.Namespace+"/"+p.Name != e.Pod {
			if e.Down {
				changed = true
			}
			delete(h.eps, ip)
		}
	}
	for ip, p := range byIP {
		if h.eps[ip] == nil {
			h.eps[ip] = &endpointHealth{EndpointHealth: EndpointHealth{Pod: p.Namespace + "/" + p.Name, IP: ip}, next: now.Add(h.jitter())}
		}
	}
	if changed {
		h.gen++
	}
	return changed
}

// refreshPorts gives each endpoint the TCP target ports the snapshot
// serves on it, each with its service's check; one it is no backend of
// keeps the checks it had.
func (h *healthChecker) refreshPorts(snap *clustermesh.Snapshot) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.eps) == 0 {
		return
	}
	checks := make(map[netip.Addr][]portCheck)
	for _, svc := range snap.Services {
		for _, b := range svc.Backends {
			if h.eps[b.IP] == nil {
				continue
			}
			for i, p := range svc.Ports {
				c := portCheck{port: b.TargetPort(i), check: svc.HealthCheck}
				if c.check.Type == v1.HealthCheckTCP {
					c.check.Type = "" // one spelling, so equal checks dedupe
				}
				if c.port != 0 && p.Protocol == v1.ProtocolTCP && !slices.Contains(checks[b.IP], c) {
					checks[b.IP] = append(checks[b.IP], c)
				}
			}
		}
	}
	for ip, cs := range checks {
		slices.SortFunc(cs, comparePortChecks)
		e := h.eps[ip]
		e.checks, e.Ports = cs, nil
		for _, c := range cs {
			if !slices.Contains(e.Ports, c.port) {
				e.Ports = append(e.Ports, c.port)
			}
		}
	}
}

// withoutDown is snap with the down endpoints left out of every service's
// backends: a shallow copy sharing everything else (snapshots are
// immutable), or snap itself when none is down.
func withoutDown(snap *clustermesh.Snapshot, down map[netip.Addr]bool) *clustermesh.Snapshot {
	if len(down) == 0 || snap == nil {
		return snap
	}
	out := *snap
	out.Services = make(map[clustermesh.ServiceName]*clustermesh.MergedService, len(snap.Services))
	for name, svc := range snap.Services {
		if !slices.ContainsFunc(svc.Backends, func(b clustermesh.Backend) bool { return down[b.IP] }) {
			out.Services[name] = svc
			continue
		}
		s := *svc
		s.Backends = slices.DeleteFunc(slices.Clone(svc.Backends), func(b clustermesh.Backend) bool { return down[b.IP] })
		out.Services[name] = &s
	}
	return &out
}
