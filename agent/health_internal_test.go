package agent

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
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
		dir, snap.Load, func() { changes <- struct{}{} }, slog.New(slog.DiscardHandler))
	h.podsEvery = 20 * time.Millisecond
	h.probe = func(_ context.Context, addr netip.AddrPort, _ time.Duration) error {
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
