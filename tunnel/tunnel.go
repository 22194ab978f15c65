package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Mode selects how remote pod CIDRs are reached.
type Mode string

const (
	// ModeVXLAN encapsulates in VXLAN through one device with a static FDB,
	// flannel style. It is the default.
	ModeVXLAN Mode = "vxlan"
	// ModeGeneve encapsulates in Geneve through one collect-metadata device;
	// each route carries its remote in lightweight-tunnel metadata.
	ModeGeneve Mode = "geneve"
	// ModeNative routes pod CIDRs via the remote nodes' underlay IPs. The
	// nodes must share an L2 segment.
	ModeNative Mode = "native"
)

// Defaults. Every node of a mesh must agree on VNI and port.
const (
	DefaultVXLANDevice  = "trellis_vxlan"
	DefaultGeneveDevice = "trellis_geneve"
	// DefaultVNI is 126 (0x7E, the same number as RouteProtocol) rather than
	// flannel's 1: Trellis meshes clusters that may run flannel's VXLAN
	// backend on the same port 8472, and the kernel refuses a second VXLAN
	// device with the same VNI and port in one namespace.
	DefaultVNI uint32 = 0x7E
	// DefaultVXLANPort is the Linux VXLAN port flannel and Cilium use (the
	// IANA port is 4789).
	DefaultVXLANPort uint16 = 8472
	// DefaultGenevePort is the IANA Geneve port.
	DefaultGenevePort uint16 = 6081

	// RouteProtocol marks every route Trellis installs (the rtm_protocol
	// field; "proto 126" in `ip route`). Set and Cleanup find exactly their
	// own routes by it, also those of a crashed earlier process. 126 is not
	// assigned in iproute2's rt_protos. Name it with
	// `echo "126 trellis" >> /etc/iproute2/rt_protos`.
	RouteProtocol netlink.RouteProtocol = 0x7E

	// Encapsulation overhead subtracted from the underlay MTU: outer IPv4
	// header 20 + UDP 8 + VXLAN (or base Geneve) header 8 + inner Ethernet
	// 14 = 50. An IPv6 underlay's header is 40, so 70. Geneve options would
	// add more; Trellis sends none.
	overheadIPv4 = 50
	overheadIPv6 = 70
)

// Node is a remote node as the tunnel sees it.
type Node struct {
	Name    string
	Cluster string
	// IP is the node's underlay address: the outer destination of tunnel
	// packets and the gateway of native routes.
	IP       netip.Addr
	PodCIDRs []netip.Prefix
	// Path is where the node's pod CIDRs are routed; PathTunnel by
	// default.
	Path Path
}

// Path selects where a remote node's pod CIDRs are routed. The tunnel
// keeps a node's neighbour and FDB entries whatever its path, so moving a
// node from one path to another is one route replace per pod CIDR: no
// packet finds the node without a route in between.
type Path uint8

const (
	// PathTunnel routes by the tunnel's mode: VXLAN, Geneve or native.
	PathTunnel Path = iota
	// PathEncrypted routes straight into Config.EncryptedDevice (the
	// WireGuard device), which picks the peer by the destination.
	PathEncrypted
	// PathBlocked installs an unreachable route: strict encryption while
	// the encrypted path to the node is not up, so that nothing leaves in
	// clear and local senders get EHOSTUNREACH rather than a silent drop.
	PathBlocked
)

func (p Path) String() string {
	switch p {
	case PathTunnel:
		return "tunnel"
	case PathEncrypted:
		return "encrypted"
	case PathBlocked:
		return "blocked"
	}
	return fmt.Sprintf("path(%d)", uint8(p))
}

// Config describes the tunnel. The zero value of every field but
// UnderlayDevice or LocalIP is usable.
type Config struct {
	// Mode defaults to ModeVXLAN.
	Mode Mode
	// Device is the tunnel device's name: DefaultVXLANDevice or
	// DefaultGeneveDevice by mode. Unused in native mode except by Cleanup,
	// which removes a leftover tunnel device of that name.
	Device string
	// VNI is the VXLAN network identifier (Geneve: the tunnel id put in
	// every route's encap). Default DefaultVNI.
	VNI uint32
	// Port is the UDP destination port: DefaultVXLANPort or
	// DefaultGenevePort by mode.
	Port uint16
	// UnderlayDevice carries the encapsulated packets (tunnel modes) or the
	// native routes. The tunnel device's MTU is this device's MTU less the
	// encapsulation overhead. Default: the device that holds LocalIP.
	UnderlayDevice string
	// LocalIP is the node's underlay address, the tunnel's source address
	// and the input of the local VTEP MAC (NodeMAC). A node passed to Set
	// with this IP is the local node and is skipped. Default: the first
	// global unicast IPv4 address of UnderlayDevice.
	LocalIP netip.Addr
	// LocalPodCIDRs are the local node's pod CIDRs. In tunnel modes the
	// VTEPAddr of the first one of each family goes on the tunnel device as
	// a /32 (/128), so that traffic the node itself sends into the overlay
	// has a source address remote nodes route back. Remote pod CIDRs that
	// overlap them are refused. Optional.
	LocalPodCIDRs []netip.Prefix
	// EncryptedDevice is the device PathEncrypted routes into
	// (encryption/wireguard's trellis_wg); the tunnel only looks it up.
	// A node on PathEncrypted while it is missing keeps the route it has
	// and Set reports it: traffic never falls back to clear by itself.
	EncryptedDevice string
	// NetNS is the network namespace to program; 0 or -1 (netns.None())
	// means the caller's. The Tunnel does not close it.
	NetNS netns.NsHandle
	// Logger defaults to discarding.
	Logger *slog.Logger

	// deviceSpecOverride, when set, replaces the device Set wants. Tests
	// only: it lets the Geneve code path (neighbour + encap routes on a
	// collect-metadata device) run over a VXLAN collect-metadata device on
	// kernels without Geneve.
	deviceSpecOverride func(t *Tunnel, under netlink.Link) netlink.Link
}

// Stats counts what a Tunnel did since New.
type Stats struct {
	// Sets is the number of Set calls.
	Sets uint64
	// Changes is the number of netlink write requests (create, replace,
	// delete of links, addresses, neighbours, FDB entries and routes),
	// successful or not. Reads are not counted.
	Changes uint64
	// LastChanges is Changes made by the last Set: 0 when that Set found the
	// kernel already converged.
	LastChanges uint64
	// Repairs counts entries a previous Set installed that had vanished
	// behind the Tunnel's back and were put back, the device included.
	Repairs uint64
	// DeviceRecreates counts incompatible tunnel devices replaced.
	DeviceRecreates uint64
	// Errors is the number of Set calls that returned an error.
	Errors uint64
}

// Owned is the kernel state a Tunnel installed and keeps, as of its last Set.
type Owned struct {
	Mode Mode
	// Device is the tunnel device; "" in native mode.
	Device     string
	Neighbours []Neighbour
	FDB        []FDBEntry
	Routes     []Route
}

// Neighbour is a permanent neighbour entry on the tunnel device: a remote
// VTEP address and its MAC.
type Neighbour struct {
	Node string
	IP   netip.Addr
	MAC  net.HardwareAddr
}

// FDBEntry sends frames for a remote VTEP MAC to the node's underlay IP.
type FDBEntry struct {
	Node string
	MAC  net.HardwareAddr
	Dst  netip.Addr
}

// Route is one route to a remote pod CIDR.
type Route struct {
	Node   string
	Dst    netip.Prefix
	Path   Path
	Via    netip.Addr // zero on PathEncrypted and PathBlocked
	Device string     // "" on PathBlocked
	OnLink bool
	// TunnelDst is the encap destination (Geneve mode), else zero.
	TunnelDst netip.Addr
}

// Tunnel programs the routes to remote pod CIDRs into one network namespace.
// Its methods are safe for concurrent use.
type Tunnel struct {
	cfg Config
	log *slog.Logger

	mu    sync.Mutex
	h     *netlink.Handle
	owned ownedState
	stats Stats
	// hadDevice is true once the tunnel device existed, so that its
	// disappearance counts as drift.
	hadDevice bool
}

// New checks cfg, opens a netlink socket in cfg.NetNS and, in the tunnel
// modes, creates the tunnel device or adopts a compatible existing one (an
// incompatible one is replaced, and the reason logged). The device starts
// with no remote entries; Set adds them.
//
// When the kernel lacks the device type, New returns an error matching
// ErrNotSupported that names the kernel option.
func New(cfg Config) (*Tunnel, error) {
	if err := cfg.complete(); err != nil {
		return nil, err
	}
	t := &Tunnel{cfg: cfg, log: cfg.Logger, owned: newOwnedState()}
	var err error
	if cfg.NetNS > 0 {
		t.h, err = netlink.NewHandleAt(cfg.NetNS)
	} else {
		t.h, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("tunnel: open netlink socket: %w", err)
	}
	if err := t.resolveLocal(); err != nil {
		t.h.Close()
		return nil, err
	}
	if t.cfg.Mode != ModeNative {
		if _, err := t.ensureDevice(); err != nil {
			t.h.Close()
			return nil, err
		}
	}
	return t, nil
}

func (c *Config) complete() error {
	switch c.Mode {
	case "":
		c.Mode = ModeVXLAN
	case ModeVXLAN, ModeGeneve, ModeNative:
	default:
		return fmt.Errorf("tunnel: unknown mode %q (want vxlan, geneve or native)", c.Mode)
	}
	if c.Device == "" {
		c.Device = DefaultVXLANDevice
		if c.Mode == ModeGeneve {
			c.Device = DefaultGeneveDevice
		}
	}
	if len(c.Device) > 15 {
		return fmt.Errorf("tunnel: device name %q longer than 15 bytes", c.Device)
	}
	if c.VNI == 0 {
		c.VNI = DefaultVNI
	}
	if c.VNI >= 1<<24 {
		return fmt.Errorf("tunnel: VNI %d does not fit in 24 bits", c.VNI)
	}
	if c.Port == 0 {
		c.Port = DefaultVXLANPort
		if c.Mode == ModeGeneve {
			c.Port = DefaultGenevePort
		}
	}
	c.LocalIP = c.LocalIP.Unmap()
	if c.UnderlayDevice == "" && !c.LocalIP.IsValid() {
		return errors.New("tunnel: config needs UnderlayDevice or LocalIP")
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// resolveLocal fills UnderlayDevice from LocalIP or LocalIP from
// UnderlayDevice.
func (t *Tunnel) resolveLocal() error {
	if t.cfg.UnderlayDevice != "" {
		link, err := t.h.LinkByName(t.cfg.UnderlayDevice)
		if err != nil {
			return fmt.Errorf("tunnel: find underlay device %q: %w", t.cfg.UnderlayDevice, err)
		}
		addrs, err := t.h.AddrList(link, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("tunnel: list addresses of %s: %w", t.cfg.UnderlayDevice, err)
		}
		if t.cfg.LocalIP.IsValid() {
			for _, a := range addrs {
				if addrFromIP(a.IP) == t.cfg.LocalIP {
					return nil
				}
			}
			t.log.Warn("tunnel: LocalIP is not an address of the underlay device", "ip", t.cfg.LocalIP, "device", t.cfg.UnderlayDevice)
			return nil
		}
		for _, want4 := range []bool{true, false} {
			for _, a := range addrs {
				ip := addrFromIP(a.IP)
				if ip.IsGlobalUnicast() && ip.Is4() == want4 {
					t.cfg.LocalIP = ip
					return nil
				}
			}
		}
		return fmt.Errorf("tunnel: underlay device %s has no global unicast address to use as LocalIP", t.cfg.UnderlayDevice)
	}
	addrs, err := t.h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("tunnel: list addresses: %w", err)
	}
	for _, a := range addrs {
		if addrFromIP(a.IP) == t.cfg.LocalIP {
			link, err := t.h.LinkByIndex(a.LinkIndex)
			if err != nil {
				return fmt.Errorf("tunnel: find the device of %s: %w", t.cfg.LocalIP, err)
			}
			t.cfg.UnderlayDevice = link.Attrs().Name
			return nil
		}
	}
	return fmt.Errorf("tunnel: no device holds LocalIP %s", t.cfg.LocalIP)
}

// Config returns the configuration with defaults filled in.
func (t *Tunnel) Config() Config {
	if t == nil {
		return Config{}
	}
	c := t.cfg
	c.LocalPodCIDRs = slices.Clone(c.LocalPodCIDRs)
	return c
}

// Set makes the kernel hold exactly the entries that reach nodes, and
// nothing else of Trellis's: it may be called any number of times with the
// same nodes, and a call that finds everything in place writes nothing
// (Stats().LastChanges == 0). It repairs drift: a deleted route, neighbour,
// FDB entry or device is put back.
//
// Per remote node, tunnel modes add a neighbour entry (VTEP address → VTEP
// MAC), then the FDB entry (VTEP MAC → node IP; VXLAN only), then one
// onlink route per pod CIDR via the VTEP address. The route comes last so
// that no packet is routed toward a VTEP the device cannot yet address; when
// a step fails, the entries this call created for that node are removed
// again. Native mode adds one route per pod CIDR via the node IP.
//
// Entries are added before stale ones are removed. Set carries on past a
// node that fails, and returns the failures joined. Nodes the plan refuses
// (see Node validation in doc.go) are reported in the error too.
func (t *Tunnel) Set(ctx context.Context, nodes []Node) error {
	if t == nil {
		return ErrClosed
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.h == nil {
		return ErrClosed
	}
	t.stats.Sets++
	start := t.stats.Changes
	err := t.set(ctx, nodes)
	t.stats.LastChanges = t.stats.Changes - start
	if err != nil {
		t.stats.Errors++
	}
	return err
}

// Stats returns the counters.
func (t *Tunnel) Stats() Stats {
	if t == nil {
		return Stats{}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.stats
}

// Owned returns what the Tunnel installed, sorted.
func (t *Tunnel) Owned() Owned {
	if t == nil {
		return Owned{}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	o := Owned{Mode: t.cfg.Mode}
	if t.cfg.Mode != ModeNative {
		o.Device = t.cfg.Device
	}
	for _, n := range t.owned.neigh {
		n.MAC = slices.Clone(n.MAC)
		o.Neighbours = append(o.Neighbours, n)
	}
	for _, f := range t.owned.fdb {
		f.MAC = slices.Clone(f.MAC)
		o.FDB = append(o.FDB, f)
	}
	for _, r := range t.owned.routes {
		o.Routes = append(o.Routes, r)
	}
	slices.SortFunc(o.Neighbours, func(a, b Neighbour) int { return a.IP.Compare(b.IP) })
	slices.SortFunc(o.FDB, func(a, b FDBEntry) int { return a.Dst.Compare(b.Dst) })
	slices.SortFunc(o.Routes, func(a, b Route) int { return comparePrefix(a.Dst, b.Dst) })
	return o
}

// Cleanup removes every route marked with RouteProtocol from the main
// table, whoever installed it, and the tunnel device (with the neighbour
// and FDB entries on it). The underlay device is never touched. A Tunnel
// that is cleaned up can Set again.
func (t *Tunnel) Cleanup(ctx context.Context) error {
	if t == nil {
		return ErrClosed
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.h == nil {
		return ErrClosed
	}
	var errs []error
	routes, err := t.listOwnedRoutes()
	if err != nil {
		return err
	}
	for _, r := range routes {
		if err := ctx.Err(); err != nil {
			return err
		}
		t.stats.Changes++
		if err := t.h.RouteDel(&r); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("tunnel: delete route %s: %w", r.Dst, err))
		}
	}
	link, err := t.h.LinkByName(t.cfg.Device)
	switch {
	case err == nil && (link.Type() == "vxlan" || link.Type() == "geneve"):
		t.stats.Changes++
		if err := t.h.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("tunnel: delete device %s: %w", t.cfg.Device, err))
		}
	case err == nil:
		t.log.Warn("tunnel: cleanup leaves a device that is not a tunnel alone", "device", t.cfg.Device, "type", link.Type())
	case !isLinkNotFound(err):
		errs = append(errs, fmt.Errorf("tunnel: find device %s: %w", t.cfg.Device, err))
	}
	t.owned = newOwnedState()
	t.hadDevice = false
	return errors.Join(errs...)
}

// Close releases the netlink socket. It leaves the kernel state in place
// (the datapath survives the agent): use Cleanup to remove it. Close is safe
// on a nil Tunnel and safe to call twice.
func (t *Tunnel) Close() error {
	if t == nil {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.h != nil {
		t.h.Close()
		t.h = nil
	}
	return nil
}
