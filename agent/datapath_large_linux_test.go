//go:build linux

package agent

import (
	"context"
	"encoding/binary"
	"net/netip"
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/bpf"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/internal/privtest"
)

// A merged service of 100 000 backends on two ports lands whole in the
// kernel maps through the agent's apply, and a change of one backend
// afterwards rewrites a handful of entries, not the service.
func TestApplyLargeService(t *testing.T) {
	privtest.RequireRoot(t)
	d, err := NewKernelDatapath(DatapathConfig{LB: &bpf.Config{}})
	if err != nil {
		privtest.SkipIfNotSupported(t, err)
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	const n = 100000
	targets := []uint16{8080, 9090}
	svc := &clustermesh.MergedService{ServiceName: clustermesh.ServiceName{Namespace: "default", Name: "big"}, Global: true,
		Ports: []v1.ServicePort{
			{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080},
			{Name: "metrics", Protocol: v1.ProtocolTCP, Port: 9090, TargetPort: 9090},
		},
		FrontendIPs: []netip.Addr{addr("10.96.0.10")}}
	for i := range n {
		var ip [4]byte
		binary.BigEndian.PutUint32(ip[:], 10<<24|2<<16+uint32(i)+1)
		svc.Backends = append(svc.Backends, clustermesh.Backend{Cluster: "us", ClusterID: 2, IP: netip.AddrFrom4(ip), TargetPorts: targets})
	}
	ctx := context.Background()
	if err := d.Apply(ctx, snapshotOf(svc)); err != nil {
		t.Fatal(err)
	}
	for _, port := range []uint16{80, 9090} {
		v, err := d.lb.Objects().Services.Lookup(bpf.ServiceKey{VIP: addr("10.96.0.10"), Port: port, Proto: bpf.TCP})
		if err != nil || v.Count != n {
			t.Fatalf("port %d: service value %+v (%v), want %d slots", port, v, err, n)
		}
	}
	if s := d.lb.Stats(); s.Slots != 2*n || s.Backends != 2*n {
		t.Fatalf("stats %+v, want %d slots and backends", s, 2*n)
	}

	// One backend replaced: on each port, its backend entry, its slot
	// (and, were it among the first four, the service value) change.
	before := d.lb.Stats().MapWrites
	svc.Backends[n/2].IP = addr("10.3.0.1")
	if err := d.Apply(ctx, snapshotOf(svc)); err != nil {
		t.Fatal(err)
	}
	if w := d.lb.Stats().MapWrites - before; w == 0 || w > 8 {
		t.Fatalf("replacing one backend wrote %d map entries, want a few", w)
	}
}
