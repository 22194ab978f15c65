package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

func healthSnapshot(version uint64, backends ...string) *clustermesh.Snapshot {
	svc := &clustermesh.MergedService{
		ServiceName: clustermesh.ServiceName{Namespace: "default", Name: "echo"},
		Ports:       []v1.ServicePort{{Protocol: v1.ProtocolTCP, Port: 80}, {Protocol: v1.ProtocolUDP, Port: 80}},
		FrontendIPs: []netip.Addr{netip.MustParseAddr("10.96.1.10")},
	}
	for _, b := range backends {
		svc.Backends = append(svc.Backends, clustermesh.Backend{Cluster: "eu", ClusterID: 1, IP: netip.MustParseAddr(b), TargetPorts: []uint16{8080, 8080}})
	}
	other := &clustermesh.MergedService{
		ServiceName: clustermesh.ServiceName{Namespace: "default", Name: "other"},
		Ports:       []v1.ServicePort{{Protocol: v1.ProtocolTCP, Port: 81}},
		Backends:    []clustermesh.Backend{{Cluster: "us", ClusterID: 2, IP: netip.MustParseAddr("10.2.1.10"), TargetPorts: []uint16{9090}}},
	}
	return &clustermesh.Snapshot{Version: version, Services: map[clustermesh.ServiceName]*clustermesh.MergedService{
		svc.ServiceName: svc, other.ServiceName: other,
	}}
}

// withoutDown leaves the down endpoints out of every service and shares
// everything else; with none down it is the snapshot itself.
func TestWithoutDown(t *testing.T) {
	snap := healthSnapshot(1, "10.1.1.10", "10.1.2.10")
	if got := withoutDown(snap, nil); got != snap {
		t.Error("with nothing down, withoutDown copied the snapshot")
	}
	got := withoutDown(snap, map[netip.Addr]bool{netip.MustParseAddr("10.1.1.10"): true})
	echo := got.Services[clustermesh.ServiceName{Namespace: "default", Name: "echo"}]
	if len(echo.Backends) != 1 || echo.Backends[0].IP != netip.MustParseAddr("10.1.2.10") {
		t.Errorf("echo's backends with 10.1.1.10 down: %+v", echo.Backends)
	}
	if orig := snap.Services[echo.ServiceName]; len(orig.Backends) != 2 {
		t.Errorf("withoutDown changed the snapshot it was given: %+v", orig.Backends)
	}
	name := clustermesh.ServiceName{Namespace: "default", Name: "other"}
	if got.Services[name] != snap.Services[name] {
		t.Error("a service with no down backend was copied")
	}
	lb := lbServices(got)
	for _, s := range lb {
		if s.Port == 80 && (len(s.Backends) != 1 || s.Backends[0].IP != netip.MustParseAddr("10.1.2.10")) {
			t.Errorf("socket LB service %s:%d %v: backends %+v; want 10.1.2.10 alone", s.VIP, s.Port, s.Proto, s.Backends)
		}
	}
}

// The checker takes an endpoint down after FailureThreshold failed probes
// in a row and up after SuccessThreshold passed ones, tells onChange each
// time, probes only the TCP target ports the snapshot gives the pod, and
// keeps probing a pod that left every service's backends.
func TestHealthCheckerThresholds(t *testing.T) {
	dir := t.TempDir()
	writePod := func(name, ip string) {
		data, _ := json.Marshal(PodFile{Namespace: "default", Name: name, IP: netip.MustParseAddr(ip), Ready: true})
		if err := os.WriteFile(filepath.Join(dir, "default_"+name+".json"), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writePod("echo-n1", "10.1.1.10")
	writePod("client", "10.1.1.11") // no service's backend: not probed

	var snap atomic.Pointer[clustermesh.Snapshot]
	snap.Store(healthSnapshot(1, "10.1.1.10", "10.1.2.10"))
	var failing atomic.Bool
	var mu sync.Mutex
	probed := map[netip.AddrPort]int{}
	changes := make(chan struct{}, 16)
	h := newHealthChecker(HealthConfig{Interval: 10 * time.Millisecond, FailureThreshold: 3, SuccessThreshold: 2},
		podsDirLister(dir), snap.Load, func() { changes <- struct{}{} }, slog.New(slog.DiscardHandler))
	h.podsEvery = 20 * time.Millisecond
	h.probe = func(_ context.Context, addr netip.AddrPort, _ v1.HealthCheck, _ time.Duration) error {
		mu.Lock()
		probed[addr]++
		mu.Unlock()
		if failing.Load() {
			return errors.New("connection refused")
		}
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	ip := netip.MustParseAddr("10.1.1.10")
	testutil.Eventually(t, 5*time.Second, "echo-n1 probed", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return probed[netip.AddrPortFrom(ip, 8080)] >= 3
	})
	if h.isDown(ip) || len(changes) != 0 {
		t.Fatalf("a passing endpoint is down (%v) or changed (%d)", h.isDown(ip), len(changes))
	}

	failing.Store(true)
	select {
	case <-changes:
	case <-time.After(5 * time.Second):
		t.Fatal("no change within 5 s of the probes failing")
	}
	st := h.status()
	if !h.isDown(ip) || len(st.Endpoints) != 2 {
		t.Fatalf("after failures: down=%v, status %+v", h.isDown(ip), st)
	}
	e := st.Endpoints[slices.IndexFunc(st.Endpoints, func(e EndpointHealth) bool { return e.IP == ip })]
	if !e.Down || e.Since.IsZero() || e.Failures < 3 || e.LastError == "" || !slices.Equal(e.Ports, []uint16{8080}) {
		t.Errorf("status of the down endpoint: %+v", e)
	}
	if down, _ := h.down(); !down[ip] || len(down) != 1 {
		t.Errorf("down set: %v", down)
	}

	// The registry marks it not ready, so the next snapshot leaves it out;
	// it is still probed on the ports it had.
	snap.Store(healthSnapshot(2, "10.1.2.10"))
	failing.Store(false)
	select {
	case <-changes:
	case <-time.After(5 * time.Second):
		t.Fatal("no change within 5 s of the probes passing again")
	}
	if h.isDown(ip) {
		t.Error("endpoint still down after passing probes")
	}
	mu.Lock()
	defer mu.Unlock()
	for addr := range probed {
		if addr != netip.AddrPortFrom(ip, 8080) {
			t.Errorf("probed %s: only echo-n1's TCP target port is a backend of this node", addr)
		}
	}
}

// tcpProbe: a listener passes, a closed port fails.
func TestTCPProbe(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(ln.Addr().String())
	if err := tcpProbe(context.Background(), addr, time.Second); err != nil {
		t.Errorf("probe of a listener: %v", err)
	}
	ln.Close()
	if err := tcpProbe(context.Background(), addr, time.Second); err == nil {
		t.Error("probe of a closed port passed")
	}
}

// The HTTP check: 2xx and 3xx pass (a redirect is not followed), 4xx and
// 5xx fail while a TCP connect to the same port still passes, and a
// closed port fails; the path and query reach the server as written.
func TestHTTPProbe(t *testing.T) {
	var mu sync.Mutex
	var paths []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		paths = append(paths, r.URL.RequestURI())
		mu.Unlock()
		switch r.URL.Path {
		case "/ok":
			w.WriteHeader(http.StatusNoContent)
		case "/moved":
			http.Redirect(w, r, "/nowhere-that-answers", http.StatusFound)
		case "/missing":
			http.NotFound(w, r)
		default:
			http.Error(w, "broken", http.StatusInternalServerError)
		}
	}))
	defer srv.Close()
	addr := netip.MustParseAddrPort(srv.Listener.Addr().String())
	probe := newHTTPProber()
	ctx := context.Background()
	httpCheck := func(p string) v1.HealthCheck { return v1.HealthCheck{Type: v1.HealthCheckHTTP, Path: p} }
	for path, pass := range map[string]bool{"/ok?x=1": true, "/moved": true, "/missing": false, "/healthz": false} {
		err := probe(ctx, addr, httpCheck(path), time.Second)
		if (err == nil) != pass {
			t.Errorf("GET %s: %v; want pass=%v", path, err, pass)
		}
	}
	if err := probe(ctx, addr, v1.HealthCheck{}, time.Second); err != nil {
		t.Errorf("tcp check of the server answering 500: %v; want a pass", err)
	}
	if err := probe(ctx, addr, httpCheck("/healthz"), time.Second); err == nil || !strings.Contains(err.Error(), "500") {
		t.Errorf("the 500 is not named: %v", err)
	}
	mu.Lock()
	if !slices.Contains(paths, "/ok?x=1") || slices.Contains(paths, "/nowhere-that-answers") {
		t.Errorf("requests %v; want /ok?x=1 as written and no redirect followed", paths)
	}
	mu.Unlock()
	srv.Close()
	if err := probe(ctx, addr, httpCheck("/ok"), time.Second); err == nil {
		t.Error("http check of a closed port passed")
	}
}

// With an HTTP check on its service, a pod whose server answers 500
// leaves the datapath although a TCP connect still succeeds, and comes
// back when it answers 200; the real probes, against a server on this
// test's loopback.
func TestHealthCheckerHTTPCheckTakesOut(t *testing.T) {
	var failing atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if failing.Load() || r.URL.Path != "/healthz" {
			http.Error(w, "unhealthy", http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusOK)
	}))
	defer srv.Close()
	addr := netip.MustParseAddrPort(srv.Listener.Addr().String())
	snapshot := func(check v1.HealthCheck) *clustermesh.Snapshot {
		svc := &clustermesh.MergedService{
			ServiceName: clustermesh.ServiceName{Namespace: "default", Name: "echo"},
			Ports:       []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80}},
			FrontendIPs: []netip.Addr{netip.MustParseAddr("10.96.1.10")},
			HealthCheck: check,
			Backends:    []clustermesh.Backend{{Cluster: "eu", ClusterID: 1, IP: addr.Addr(), TargetPorts: []uint16{addr.Port()}}},
		}
		return &clustermesh.Snapshot{Version: 1, Services: map[clustermesh.ServiceName]*clustermesh.MergedService{svc.ServiceName: svc}}
	}
	var snap atomic.Pointer[clustermesh.Snapshot]
	snap.Store(snapshot(v1.HealthCheck{Type: v1.HealthCheckHTTP, Path: "/healthz"}))
	changes := make(chan struct{}, 16)
	pods := func() ([]PodFile, error) {
		return []PodFile{{Namespace: "default", Name: "echo-n1", IP: addr.Addr(), Ready: true}}, nil
	}
	h := newHealthChecker(HealthConfig{Interval: 10 * time.Millisecond, FailureThreshold: 3, SuccessThreshold: 2},
		pods, snap.Load, func() { changes <- struct{}{} }, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	testutil.Eventually(t, 5*time.Second, "probed", func() bool {
		st := h.status()
		return len(st.Endpoints) == 1 && st.Endpoints[0].Successes >= 2
	})
	if st := h.status(); !slices.Equal(st.Endpoints[0].Checks, []string{fmt.Sprintf("http %d /healthz", addr.Port())}) {
		t.Errorf("checks %v; want the http check of the target port", st.Endpoints[0].Checks)
	}
	failing.Store(true)
	select {
	case <-changes:
	case <-time.After(5 * time.Second):
		t.Fatal("no change within 5 s of the server answering 500")
	}
	if !h.isDown(addr.Addr()) {
		t.Fatal("the endpoint is not down after its HTTP check failed")
	}
	if err := tcpProbe(context.Background(), addr, time.Second); err != nil {
		t.Fatalf("TCP connect fails too (%v): the test would not tell the checks apart", err)
	}
	got := withoutDown(snap.Load(), func() map[netip.Addr]bool { d, _ := h.down(); return d }())
	if b := got.Services[clustermesh.ServiceName{Namespace: "default", Name: "echo"}].Backends; len(b) != 0 {
		t.Errorf("backends handed to the datapath %+v; want none", b)
	}
	if st := h.status(); !strings.Contains(st.Endpoints[0].LastError, "500") {
		t.Errorf("last error %q does not name the 500", st.Endpoints[0].LastError)
	}

	// The service goes back to the default TCP check: the pod passes,
	// since its port still accepts.
	snap.Store(func() *clustermesh.Snapshot { s := snapshot(v1.HealthCheck{}); s.Version = 2; return s }())
	select {
	case <-changes:
	case <-time.After(5 * time.Second):
		t.Fatal("no change within 5 s of the check turning to tcp")
	}
	if h.isDown(addr.Addr()) {
		t.Error("the endpoint is still down under a tcp check of an open port")
	}
}

// `trellis status` shows the probed endpoints, the down ones first with
// since when and why.
func TestPrintHealth(t *testing.T) {
	since := time.Now().Add(-3 * time.Second)
	var b strings.Builder
	PrintStatus(&b, Status{Node: "n1", Cluster: "eu", Health: &HealthStatus{
		Interval: 100 * time.Millisecond, Timeout: 500 * time.Millisecond, FailureThreshold: 3, SuccessThreshold: 2,
		Endpoints: []EndpointHealth{
			{Pod: "default/client", IP: netip.MustParseAddr("10.1.1.9")},
			{Pod: "default/echo-n1", IP: netip.MustParseAddr("10.1.1.10"), Ports: []uint16{8080}},
			{Pod: "default/echo-n2", IP: netip.MustParseAddr("10.1.1.11"), Ports: []uint16{8080}, Down: true, Since: since,
				Failures: 7, LastError: "tcp 10.1.1.11:8080: connection refused"},
		},
	}})
	out := b.String()
	for _, want := range []string{"Local health: 3 endpoints probed every 100ms", "1 down",
		"default/echo-n2  10.1.1.11  8080   down", since.Format(time.TimeOnly), "connection refused", "not probed"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	if strings.Index(out, "echo-n2") > strings.Index(out, "echo-n1") {
		t.Errorf("the down endpoint is not listed first:\n%s", out)
	}
}

// In Kubernetes mode status says so, with the node's addressing from its
// Node, and the ports column shows each port's check.
func TestPrintKubernetesAndChecks(t *testing.T) {
	var b strings.Builder
	PrintStatus(&b, Status{Node: "node-a", Cluster: "eu", NodeIP: netip.MustParseAddr("192.168.1.5"),
		PodCIDRs:   []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")},
		Kubernetes: &KubernetesStatus{Pods: 1, Patches: 3, PatchErrors: 1, LastPatchError: "forbidden"},
		Health: &HealthStatus{Interval: 100 * time.Millisecond, Endpoints: []EndpointHealth{
			{Pod: "shop/cart-1", IP: netip.MustParseAddr("10.1.0.5"), Ports: []uint16{8080, 9090},
				Checks: []string{"http 8080 /healthz", "tcp 9090"}, Down: true, LastError: "http 10.1.0.5:8080: GET /healthz: 500"},
		}}})
	out := b.String()
	for _, want := range []string{"Kubernetes mode: node IP 192.168.1.5, pod CIDRs 10.1.0.0/24; 1 pod IPs probed, 3 trellis.io/healthy marks written, 1 refused (last: forbidden)",
		"8080 http:/healthz,9090", "GET /healthz: 500"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
}

// verdict: down when any IP is down; not known while an IP with checks
// has not passed a probe since its last failure, or is not seen yet; an
// IP with nothing to probe is known up.
func TestHealthVerdict(t *testing.T) {
	ip := netip.MustParseAddr
	chk := []portCheck{{port: 8080}}
	h := &healthChecker{eps: map[netip.Addr]*endpointHealth{
		ip("10.1.1.1"): {checks: chk, EndpointHealth: EndpointHealth{Successes: 2}},
		ip("10.1.1.2"): {checks: chk, EndpointHealth: EndpointHealth{Down: true, LastError: "tcp 10.1.1.2:8080: refused"}},
		ip("10.1.1.3"): {checks: chk}, // new, not probed yet
		ip("10.1.1.4"): {},            // nothing to probe
		ip("10.1.1.5"): {checks: chk, EndpointHealth: EndpointHealth{Failures: 1}},
	}}
	for _, tc := range []struct {
		ips         []string
		down, known bool
	}{
		{[]string{"10.1.1.1"}, false, true},
		{[]string{"10.1.1.2"}, true, true},
		{[]string{"10.1.1.1", "10.1.1.2"}, true, true},
		{[]string{"10.1.1.3"}, false, false},
		{[]string{"10.1.1.4"}, false, true},
		{[]string{"10.1.1.5"}, false, false},
		{[]string{"10.1.1.9"}, false, false},
	} {
		var ips []netip.Addr
		for _, s := range tc.ips {
			ips = append(ips, ip(s))
		}
		down, known, why := h.verdict(ips)
		if down != tc.down || known != tc.known || (down && !strings.Contains(why, "refused")) {
			t.Errorf("%v: down=%v known=%v why=%q; want down=%v known=%v", tc.ips, down, known, why, tc.down, tc.known)
		}
	}
	var none *healthChecker
	if down, known, _ := none.verdict([]netip.Addr{ip("10.1.1.1")}); down || known {
		t.Error("no checker gave a verdict")
	}
}
