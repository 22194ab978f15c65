package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/trellis-mesh/trellis/encryption/wireguard"
)

// State-dir files of the WireGuard device.
const (
	wireGuardKeyFile    = "wireguard.key"      // the node's private key, 0600
	wireGuardSocketFile = "wireguard.sock"     // the device process's UAPI
	wireGuardRotation   = "wireguard.rotation" // the last rotation count applied
)

// nodeWireGuard is the node's WireGuard device and key as the encryption
// step uses them, over encryption/wireguard. It remembers the peers it
// last wrote, so that setting the key again (Up) converges without
// touching them; after an agent restart it learns them from the adopted
// device, so the first Up does not wipe the sessions the device holds.
type nodeWireGuard struct {
	cfg     wireguard.Config
	keyFile string
	log     *slog.Logger

	dev   *wireguard.Device
	key   wgtypes.Key
	haveK bool
	peers []wireguard.Peer
}

func newNodeWireGuard(cfg wireguard.Config, keyFile string, log *slog.Logger) *nodeWireGuard {
	return &nodeWireGuard{cfg: cfg, keyFile: keyFile, log: log}
}

// open adopts the running device or starts one, and learns its peers.
func (w *nodeWireGuard) open(ctx context.Context) error {
	if w.dev != nil {
		return nil
	}
	dev, err := wireguard.Open(ctx, w.cfg)
	if err != nil {
		return err
	}
	st, err := dev.Status(ctx)
	if err != nil {
		dev.Close()
		return err
	}
	w.peers = w.peers[:0]
	for _, p := range st.Peers {
		w.peers = append(w.peers, wireguard.Peer{PublicKey: p.PublicKey, Endpoint: p.Endpoint,
			AllowedIPs: p.AllowedIPs, PersistentKeepalive: p.PersistentKeepalive})
	}
	w.dev = dev
	w.log.Info("wireguard device open", "device", w.cfg.Name, "mode", dev.Mode(), "pid", dev.PID(), "peers", len(st.Peers))
	return nil
}

// configure writes the key and the remembered peers. A device process
// that died since the last call (ErrDeviceGone) is started again once.
func (w *nodeWireGuard) configure(ctx context.Context) error {
	for attempt := 0; ; attempt++ {
		if err := w.open(ctx); err != nil {
			return err
		}
		_, err := w.dev.Configure(ctx, wireguard.DeviceConfig{PrivateKey: w.key, Peers: w.peers})
		if errors.Is(err, wireguard.ErrDeviceGone) && attempt == 0 {
			w.log.Warn("wireguard device process gone; starting a new one", "device", w.cfg.Name)
			w.dev.Close()
			w.dev = nil
			continue
		}
		return err
	}
}

func (w *nodeWireGuard) Up(ctx context.Context) (string, error) {
	if !w.haveK {
		k, err := wireguard.LoadOrCreateKey(w.keyFile, w.log)
		if err != nil {
			return "", err
		}
		w.key, w.haveK = k, true
	}
	if err := w.configure(ctx); err != nil {
		return "", err
	}
	return w.key.PublicKey().String(), nil
}

func (w *nodeWireGuard) Running(ctx context.Context) bool {
	if w.dev != nil {
		return true
	}
	// Open would start a device; only a link that is there is adopted.
	if _, err := netlink.LinkByName(w.cfg.Name); err != nil {
		return false
	}
	if err := w.open(ctx); err != nil {
		w.log.Warn("a wireguard device is there but cannot be adopted", "device", w.cfg.Name, "err", err)
		return false
	}
	return true
}

// Rotate writes the new key to disk before the device: a crash in between
// leaves the device on the old key, and the next Up moves it to the new.
func (w *nodeWireGuard) Rotate(ctx context.Context) (string, error) {
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return "", fmt.Errorf("generate a key: %w", err)
	}
	if err := wireguard.WriteKey(w.keyFile, k); err != nil {
		return "", err
	}
	w.key, w.haveK = k, true
	if err := w.configure(ctx); err != nil {
		return "", err
	}
	return k.PublicKey().String(), nil
}

func (w *nodeWireGuard) SetPeers(ctx context.Context, peers []wgPeer) error {
	next := make([]wireguard.Peer, 0, len(peers))
	for _, p := range peers {
		k, err := wgtypes.ParseKey(p.PublicKey)
		if err != nil {
			return fmt.Errorf("peer key %q: %w", p.PublicKey, err)
		}
		next = append(next, wireguard.Peer{PublicKey: k, Endpoint: p.Endpoint, AllowedIPs: p.AllowedIPs, PersistentKeepalive: p.Keepalive})
	}
	prev := w.peers
	w.peers = next
	if err := w.configure(ctx); err != nil {
		w.peers = prev
		return err
	}
	return nil
}

func (w *nodeWireGuard) Peers(ctx context.Context) (map[string]wgPeerStatus, error) {
	if w.dev == nil {
		return nil, errors.New("wireguard device not open")
	}
	st, err := w.dev.Status(ctx)
	if err != nil {
		return nil, err
	}
	out := make(map[string]wgPeerStatus, len(st.Peers))
	for _, p := range st.Peers {
		out[p.PublicKey.String()] = wgPeerStatus{LastHandshake: p.LastHandshake, RxBytes: uint64(max(p.RxBytes, 0)), TxBytes: uint64(max(p.TxBytes, 0))}
	}
	return out, nil
}

func (w *nodeWireGuard) Down(ctx context.Context) error {
	if w.dev != nil {
		w.dev.Close()
		w.dev = nil
	}
	w.peers = nil
	return wireguard.Remove(ctx, w.cfg)
}

func (w *nodeWireGuard) Close() error {
	if w.dev == nil {
		return nil
	}
	err := w.dev.Close()
	w.dev = nil
	return err
}

// wireGuardConfig is the device config for an EncryptionConfig with its
// defaults filled in.
func wireGuardConfig(cfg EncryptionConfig, log *slog.Logger) wireguard.Config {
	return wireguard.Config{
		Name: cfg.Device, Port: int(cfg.Port), MTU: cfg.MTU,
		SocketPath:   filepath.Join(cfg.StateDir, wireGuardSocketFile),
		StartCommand: cfg.StartCommand,
		Logger:       log,
	}
}
