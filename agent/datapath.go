package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/bpf"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/encryption/ipsec"
	"github.com/trellis-mesh/trellis/encryption/strict"
	"github.com/trellis-mesh/trellis/encryption/wireguard"
	"github.com/trellis-mesh/trellis/tunnel"
)

// DatapathConfig says which parts of the kernel datapath the agent runs.
// A nil part is off.
type DatapathConfig struct {
	// LB is the eBPF socket load balancer: attached to LB.CgroupPath (the
	// node's root cgroup in production, the node's cgroup in the lab) and
	// pinned under LB.PinDir so it outlives the agent. Nil: no service
	// translation.
	LB *bpf.Config
	// Tunnel reaches remote nodes' pod CIDRs. Nil: no routes to them.
	Tunnel *tunnel.Config
	// Encryption lets the node encrypt when its cluster's setting says so
	// (it needs Tunnel: the routes move between the tunnel and the
	// encryption device). Nil: the node never encrypts, and says so in
	// status when its cluster asks it to.
	Encryption *EncryptionConfig
	// Logger defaults to discarding.
	Logger *slog.Logger
}

// KernelDatapath programs services into the eBPF socket LB and remote
// nodes into tunnel routes.
type KernelDatapath struct {
	lb  *bpf.LB
	tun *tunnel.Tunnel
	enc *encryptor
	log *slog.Logger
	// again is how soon the last apply asked to run again (0: no need).
	again time.Duration
	// lastFullSync is when the LB last read its maps back; between such
	// syncs it plans against what it wrote (see bpf.LB.Update).
	lastFullSync time.Time
	// lastNodes is what the tunnel was last set to.
	lastNodes []tunnel.Node
}

// FullSyncInterval is how often the socket LB reads its maps back to
// repair drift; every other apply only writes the difference.
const FullSyncInterval = time.Minute

// NewKernelDatapath opens (or adopts, after a restart) the load balancer
// and the tunnel. Nothing that worked before is torn down first: a
// restarted agent keeps serving from the pinned maps until its first Apply.
func NewKernelDatapath(cfg DatapathConfig) (*KernelDatapath, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	d := &KernelDatapath{log: cfg.Logger}
	if cfg.LB != nil {
		if err := bpf.EnsureBPFFS(); err != nil {
			return nil, fmt.Errorf("datapath: %w", err)
		}
		lb, err := bpf.Open(*cfg.LB)
		if err != nil {
			return nil, fmt.Errorf("datapath: socket load balancer on %s: %w", cfg.LB.CgroupPath, err)
		}
		d.lb = lb
	}
	if cfg.Tunnel != nil {
		tc := *cfg.Tunnel
		if tc.Logger == nil {
			tc.Logger = cfg.Logger
		}
		if cfg.Encryption != nil {
			tc.EncryptedDevice = cmp.Or(cfg.Encryption.Device, wireguard.DefaultDevice)
		}
		tun, err := tunnel.New(tc)
		if err != nil {
			d.Close()
			return nil, fmt.Errorf("datapath: %w", err)
		}
		d.tun = tun
	}
	if cfg.Encryption != nil {
		if d.tun == nil {
			d.Close()
			return nil, errors.New("datapath: encryption needs the tunnel: the routes to remote pod CIDRs move between the tunnel and the encryption device")
		}
		enc, err := newNodeEncryptor(*cfg.Encryption, d.tun.Config(), cfg.Logger)
		if err != nil {
			d.Close()
			return nil, fmt.Errorf("datapath: %w", err)
		}
		d.enc = enc
	}
	return d, nil
}

// newNodeEncryptor builds the encryption step over the real device, the
// strict filter on the tunnel device and IPsec. The device's MTU defaults
// to the underlay's less WireGuard's worst-case overhead.
func newNodeEncryptor(cfg EncryptionConfig, tc tunnel.Config, log *slog.Logger) (*encryptor, error) {
	if cfg.Node == "" || cfg.Cluster == "" || cfg.StateDir == "" {
		return nil, errors.New("encryption: node, cluster and state dir are required")
	}
	cfg.Device = cmp.Or(cfg.Device, wireguard.DefaultDevice)
	cfg.Port = cmp.Or(cfg.Port, uint16(wireguard.DefaultPort))
	if cfg.MTU == 0 {
		under, err := netlink.LinkByName(tc.UnderlayDevice)
		if err != nil {
			return nil, fmt.Errorf("encryption: underlay device %s for the WireGuard MTU: %w", tc.UnderlayDevice, err)
		}
		cfg.MTU = under.Attrs().MTU - wireguard.Overhead
	}
	if cfg.StrictPinDir == "" {
		cfg.StrictPinDir = filepath.Join(bpf.PinDir(cfg.Node), "strict")
	}
	// Clear pod traffic leaves through the tunnel device, or in native
	// mode straight through the underlay: strict filters there.
	clearDevice := tc.Device
	if tc.Mode == tunnel.ModeNative {
		clearDevice = tc.UnderlayDevice
	}
	wg := newNodeWireGuard(wireGuardConfig(cfg, log), filepath.Join(cfg.StateDir, wireGuardKeyFile), log)
	return newEncryptor(nodeRef{cfg.Cluster, cfg.Node}, cfg.Port, wg, openStrict(clearDevice, cfg.StrictPinDir, log),
		filepath.Join(cfg.StateDir, wireGuardRotation), cfg.IPsecKeyFile, log), nil
}

// Apply converges the kernel onto the snapshot.
func (d *KernelDatapath) Apply(ctx context.Context, snap *clustermesh.Snapshot) error {
	// Routes to new nodes go in before services may point at their pods,
	// and routes to departed nodes go only after the services stop
	// pointing there: tunnel to the union, services, tunnel to the new set.
	var errs []error
	nodes := tunnelNodes(snap)
	d.again = 0
	if d.enc != nil {
		// Peers are configured here, before the routes move to them.
		paths, again, err := d.enc.step(ctx, snap)
		if err != nil {
			errs = append(errs, fmt.Errorf("encryption: %w", err))
		}
		for i := range nodes {
			nodes[i].Path = paths[nodes[i].Name]
		}
		d.again = again
	} else if snap.Encryption.Type != v1.EncryptionNone {
		errs = append(errs, fmt.Errorf("encryption: the cluster's setting is %s, but this agent runs without a tunnel and cannot encrypt; pod traffic from this node stays in clear", snap.Encryption.Type))
	}
	if d.tun != nil {
		// The union can conflict (a departed node's pod CIDR handed to a
		// new node); then skip the intermediate step rather than stall.
		if err := d.tun.Set(ctx, unionNodes(d.lastNodes, nodes)); err != nil {
			d.log.Debug("tunnel: intermediate union not applied", "err", err)
		}
	}
	if d.lb != nil {
		set := d.lb.Update
		full := time.Since(d.lastFullSync) >= FullSyncInterval
		if full {
			set = d.lb.Set
		}
		if err := set(ctx, lbServices(snap)); err != nil {
			errs = append(errs, fmt.Errorf("socket load balancer: %w", err))
		} else if full {
			d.lastFullSync = time.Now()
		}
	}
	if d.tun != nil {
		if err := d.tun.Set(ctx, nodes); err != nil {
			errs = append(errs, fmt.Errorf("tunnel: %w", err))
		} else {
			d.lastNodes = nodes
			// Peers whose routes moved away go only now.
			if d.enc != nil {
				if err := d.enc.finish(ctx); err != nil {
					errs = append(errs, fmt.Errorf("encryption: %w", err))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// RetryIn is how soon the datapath wants another apply although nothing
// changed (a peer waiting for its handshake, a drain); 0 when it does not.
func (d *KernelDatapath) RetryIn() time.Duration { return d.again }

// Published is what this node publishes of its encryption, and a channel
// that receives when it changes.
func (d *KernelDatapath) Published() (NodeKeys, <-chan struct{}) {
	if d.enc == nil {
		return NodeKeys{}, nil
	}
	return d.enc.Published()
}

// EncryptionStatus is the encryption step's last view; nil without one.
func (d *KernelDatapath) EncryptionStatus() *EncryptionStatus {
	if d.enc == nil {
		return nil
	}
	st := d.enc.Status()
	return &st
}

// RotateKey makes the next apply give this node a new WireGuard key.
func (d *KernelDatapath) RotateKey() error {
	if d.enc == nil {
		return errors.New("this agent runs without encryption (no tunnel)")
	}
	d.enc.AskRotate()
	return nil
}

// unionNodes is old plus new, new winning for a node in both.
func unionNodes(old, cur []tunnel.Node) []tunnel.Node {
	seen := make(map[string]bool, len(cur))
	out := append([]tunnel.Node(nil), cur...)
	for _, n := range cur {
		seen[n.Name] = true
	}
	for _, n := range old {
		if !seen[n.Name] {
			out = append(out, n)
		}
	}
	return out
}

// Close releases the agent's handles and leaves the kernel state in place.
func (d *KernelDatapath) Close() error {
	if d == nil {
		return nil
	}
	var errs []error
	if d.lb != nil {
		errs = append(errs, d.lb.Close())
	}
	if d.tun != nil {
		errs = append(errs, d.tun.Close())
	}
	if d.enc != nil {
		errs = append(errs, d.enc.Close())
	}
	return errors.Join(errs...)
}

// Uninstall removes everything the datapath installed: pinned maps and
// links (detaching the programs) and the tunnel device and routes. Parts
// that are off, and an LB without a pin dir, leave nothing to remove.
func Uninstall(ctx context.Context, cfg DatapathConfig) error {
	var errs []error
	if cfg.Encryption != nil {
		errs = append(errs, uninstallEncryption(ctx, *cfg.Encryption))
	}
	if cfg.LB != nil && cfg.LB.PinDir != "" {
		if err := bpf.Uninstall(cfg.LB.PinDir); err != nil {
			errs = append(errs, fmt.Errorf("uninstall socket load balancer: %w", err))
		}
	}
	if cfg.Tunnel != nil {
		tun, err := tunnel.New(*cfg.Tunnel)
		if err == nil {
			err = tun.Cleanup(ctx)
			tun.Close()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("uninstall tunnel: %w", err))
		}
	}
	return errors.Join(errs...)
}

// uninstallEncryption removes the WireGuard device (stopping its process),
// the strict filter and Trellis's IPsec objects. The key stays: it is the
// node's identity, not datapath state.
func uninstallEncryption(ctx context.Context, cfg EncryptionConfig) error {
	var errs []error
	if cfg.StateDir != "" {
		if err := wireguard.Remove(ctx, wireGuardConfig(cfg, nil)); err != nil {
			errs = append(errs, fmt.Errorf("uninstall wireguard: %w", err))
		}
	}
	if cfg.StrictPinDir == "" && cfg.Node != "" {
		cfg.StrictPinDir = filepath.Join(bpf.PinDir(cfg.Node), "strict")
	}
	if cfg.StrictPinDir != "" {
		if err := strict.Uninstall(cfg.StrictPinDir); err != nil {
			errs = append(errs, fmt.Errorf("uninstall strict filter: %w", err))
		}
	}
	if m, err := ipsec.Open(ipsec.Config{}); err == nil {
		if err := m.Cleanup(ctx); err != nil {
			errs = append(errs, fmt.Errorf("uninstall ipsec: %w", err))
		}
		m.Close()
	}
	return errors.Join(errs...)
}

// tunnelNodes lists every node of the mesh that has an underlay address
// (its first IP) and pod CIDRs, by "cluster/name"; the tunnel skips the
// local node itself.
func tunnelNodes(snap *clustermesh.Snapshot) []tunnel.Node {
	var out []tunnel.Node
	for cluster, nodes := range snap.Nodes {
		for _, n := range nodes {
			if len(n.IPs) == 0 || len(n.PodCIDRs) == 0 {
				continue
			}
			out = append(out, tunnel.Node{Name: cluster + "/" + n.Name, Cluster: cluster, IP: n.IPs[0], PodCIDRs: n.PodCIDRs})
		}
	}
	slices.SortFunc(out, func(a, b tunnel.Node) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// lbServices turns merged services into socket LB entries: one per IPv4
// frontend and TCP/UDP service port, with the IPv4 backends that serve
// that port. The merge resolved each backend's cluster ID and target
// ports already.
func lbServices(snap *clustermesh.Snapshot) []bpf.Service {
	var out []bpf.Service
	for _, svc := range snap.Services {
		for _, vip := range svc.FrontendIPs {
			if !vip.Is4() {
				continue // the socket LB is IPv4 for now
			}
			for i, port := range svc.Ports {
				proto, ok := lbProtocol(port.Protocol)
				if !ok {
					continue
				}
				s := bpf.Service{VIP: vip, Port: port.Port, Proto: proto}
				for _, b := range svc.Backends {
					target := b.TargetPort(i)
					if !b.IP.Is4() || target == 0 {
						continue
					}
					s.Backends = append(s.Backends, bpf.Backend{IP: b.IP, Port: target, ClusterID: uint32(b.ClusterID)})
				}
				out = append(out, s)
			}
		}
	}
	// Services come out of a map: sort them, so the LB sees (and
	// allocates IDs in) the same order for the same snapshot.
	slices.SortFunc(out, func(a, b bpf.Service) int {
		return cmp.Or(a.VIP.Compare(b.VIP), cmp.Compare(a.Port, b.Port), cmp.Compare(a.Proto, b.Proto))
	})
	return out
}

func lbProtocol(p v1.Protocol) (bpf.Protocol, bool) {
	switch p {
	case v1.ProtocolTCP:
		return bpf.TCP, true
	case v1.ProtocolUDP:
		return bpf.UDP, true
	}
	return 0, false
}
