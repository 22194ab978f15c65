package agent

import (
	"context"
	"encoding/base64"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/trellis-mesh/trellis/clustermesh"
)

// EncryptionOnlyDatapath is the agent's real encryption step (encryptor:
// when to publish, rotate, withdraw, drain) over a stand-in WireGuard
// device, and nothing else of the kernel datapath: for the tests of what
// the agent publishes, where a real device, tunnel and their namespaces
// would add minutes and prove nothing more about publication (the real
// device carries traffic in encryption/wireguard's and the lab's tests).
type EncryptionOnlyDatapath struct {
	e     *encryptor
	again time.Duration
}

// NewEncryptionOnlyDatapath is the step of node in cluster; dir holds its
// rotation count.
func NewEncryptionOnlyDatapath(cluster, node, dir string, log *slog.Logger) *EncryptionOnlyDatapath {
	wg := &keyedWireGuard{&fakeWireGuard{handshake: map[string]time.Time{}, rx: map[string]uint64{}}}
	return &EncryptionOnlyDatapath{e: newEncryptor(nodeRef{cluster, node}, 51871, wg, nil,
		filepath.Join(dir, "rotation"), "", log)}
}

// Apply runs the step and its finish, as KernelDatapath.Apply does around
// the tunnel.
func (d *EncryptionOnlyDatapath) Apply(ctx context.Context, snap *clustermesh.Snapshot) error {
	_, again, err := d.e.step(ctx, snap)
	d.again = again
	if err != nil {
		return err
	}
	return d.e.finish(ctx)
}

// RetryIn is how soon the step wants to run again (a drain).
func (d *EncryptionOnlyDatapath) RetryIn() time.Duration { return d.again }

// Published is what the node publishes.
func (d *EncryptionOnlyDatapath) Published() (NodeKeys, <-chan struct{}) { return d.e.Published() }

// keyedWireGuard is fakeWireGuard with well-formed public keys (standard
// base64 of 32 bytes, one per key generation), which the mesh API server
// accepts.
type keyedWireGuard struct{ *fakeWireGuard }

func (w *keyedWireGuard) pub() string {
	var k [32]byte
	k[0], k[31] = 't', byte(w.key)
	return base64.StdEncoding.EncodeToString(k[:])
}

func (w *keyedWireGuard) Up(ctx context.Context) (string, error) {
	w.fakeWireGuard.Up(ctx)
	return w.pub(), nil
}

func (w *keyedWireGuard) Rotate(ctx context.Context) (string, error) {
	w.fakeWireGuard.Rotate(ctx)
	return w.pub(), nil
}
