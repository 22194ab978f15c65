package apiserver

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// The wholeEncoder's bytes are v1.Encode's, through a long run of random
// republications of one service (backends added, removed, changed in
// state, node, zone and ports; the service's own fields changed) that
// reuse its cache, and for services too large for the limit it says so
// as encodeWhole did.
func TestWholeEncoderMatchesEncode(t *testing.T) {
	seed := uint64(rand.Int64())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	states := []v1.BackendState{v1.BackendActive, v1.BackendUnready, v1.BackendTerminating}
	backend := func(ip netip.Addr) v1.Backend {
		b := v1.Backend{IP: ip, State: states[rng.IntN(len(states))]}
		if rng.IntN(2) == 0 {
			b.Node = fmt.Sprintf("node-%d", rng.IntN(5))
		}
		if rng.IntN(3) == 0 {
			b.Zone = fmt.Sprintf("zone-%c", 'a'+rng.IntN(3))
		}
		if rng.IntN(2) == 0 {
			b.Ports = []v1.BackendPort{{Name: "http", Port: uint16(8000 + rng.IntN(100))}}
		}
		return b
	}
	svc := v1.Service{Cluster: "eu", Namespace: "default", Name: "web",
		Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}}}
	var enc wholeEncoder
	for round := range 400 {
		// Mutate: a few backends added, removed or changed.
		for range 1 + rng.IntN(4) {
			ip := netip.AddrFrom4([4]byte{10, 1, byte(rng.IntN(4)), byte(1 + rng.IntN(250))})
			i, found := slices.BinarySearchFunc(svc.Backends, ip, func(b v1.Backend, ip netip.Addr) int { return b.IP.Compare(ip) })
			switch {
			case found && rng.IntN(4) == 0:
				svc.Backends = slices.Delete(slices.Clone(svc.Backends), i, i+1)
			case found:
				svc.Backends = slices.Clone(svc.Backends)
				svc.Backends[i] = backend(ip)
			default:
				svc.Backends = slices.Insert(slices.Clone(svc.Backends), i, backend(ip))
			}
		}
		switch rng.IntN(10) {
		case 0:
			svc.Global = !svc.Global
		case 1:
			svc.FrontendIPs = []netip.Addr{netip.AddrFrom4([4]byte{172, 16, 0, byte(rng.IntN(200))})}
		case 2:
			svc.Backends = nil
		}
		if err := svc.Validate(); err != nil {
			t.Fatalf("round %d: the test built an invalid service: %v", round, err)
		}
		limit := v1.MaxValueSize
		if round%7 == 0 {
			limit = 2000 // some fit, some do not
		}
		want, err := v1.Encode(svc)
		if err != nil {
			t.Fatal(err)
		}
		got, fits, err := enc.encode(svc, limit)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if wantFits := len(want) <= limit; fits != wantFits {
			t.Fatalf("round %d: %d bytes, limit %d: fits %v, want %v", round, len(want), limit, fits, wantFits)
		}
		if fits && !bytes.Equal(got, want) {
			t.Fatalf("round %d:\n got %s\nwant %s", round, got, want)
		}
	}
}

// A 1000-backend service republished with one backend flipped: v1.Encode
// of the whole service against the wholeEncoder.
func BenchmarkWholeEncode(b *testing.B) {
	svc := v1.Service{Cluster: "us", Namespace: "default", Name: "web",
		Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}}}
	for i := range 1000 {
		svc.Backends = append(svc.Backends, v1.Backend{IP: netip.AddrFrom4([4]byte{10, 2, byte(i % 4), byte(i/4 + 1)}), State: v1.BackendActive, Node: fmt.Sprintf("node-%d", i%4+1)})
	}
	slices.SortFunc(svc.Backends, func(a, b v1.Backend) int { return a.IP.Compare(b.IP) })
	flip := func(i int) {
		if svc.Backends[i%1000].State == v1.BackendActive {
			svc.Backends[i%1000].State = v1.BackendUnready
		} else {
			svc.Backends[i%1000].State = v1.BackendActive
		}
	}
	b.Run("Encode", func(b *testing.B) {
		for i := range b.N {
			flip(i)
			if _, err := v1.Encode(svc); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("wholeEncoder", func(b *testing.B) {
		var enc wholeEncoder
		for i := range b.N {
			flip(i)
			if _, _, err := enc.encode(svc, v1.MaxValueSize); err != nil {
				b.Fatal(err)
			}
		}
	})
}
