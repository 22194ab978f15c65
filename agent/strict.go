package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/trellis-mesh/trellis/bpf"
	"github.com/trellis-mesh/trellis/encryption/strict"
)

// strictOnTunnel is the strict filter on the node's tunnel device
// (encryption/strict), as the encryption step uses it.
type strictOnTunnel struct {
	f *strict.Filter
}

// openStrict returns the function that opens (or adopts) the strict filter
// on device, pinned under pinDir.
func openStrict(device, pinDir string, log *slog.Logger) func() (strictFilter, error) {
	return func() (strictFilter, error) {
		if err := bpf.EnsureBPFFS(); err != nil {
			return nil, fmt.Errorf("strict filter: %w", err)
		}
		f, err := strict.Open(strict.Config{Device: device, PinDir: pinDir, Logger: log})
		if err != nil {
			return nil, err
		}
		return strictOnTunnel{f}, nil
	}
}

func (s strictOnTunnel) Set(ctx context.Context, prefixes []netip.Prefix) error {
	return s.f.Set(ctx, prefixes)
}

func (s strictOnTunnel) Drops() (uint64, uint64, error) {
	st, err := s.f.Stats()
	return st.IngressDrops, st.EgressDrops, err
}

func (s strictOnTunnel) Remove() error { return s.f.Remove() }
func (s strictOnTunnel) Close() error  { return s.f.Close() }
