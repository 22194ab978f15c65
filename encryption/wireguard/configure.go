package wireguard

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// DeviceConfig is the whole desired state of a device: Configure makes the
// device hold exactly this.
type DeviceConfig struct {
	// PrivateKey is the node's key (LoadOrCreateKey). Required.
	PrivateKey wgtypes.Key
	// ListenPort is the UDP port; 0 means the Config's Port (DefaultPort).
	ListenPort int
	// Peers are every peer the device should have, in any order.
	Peers []Peer
}

// Peer is one remote node.
type Peer struct {
	// PublicKey identifies the peer.
	PublicKey wgtypes.Key
	// Endpoint is the peer's underlay address and port. The zero value
	// leaves the endpoint to what the device learns from the peer's packets
	// (it is never written).
	Endpoint netip.AddrPort
	// AllowedIPs are the inner addresses the peer may send from and the
	// device routes to it (its pod CIDRs). Addresses are masked to their
	// prefix; duplicates are ignored.
	AllowedIPs []netip.Prefix
	// PersistentKeepalive, in whole seconds (rounded down), 0 for none.
	PersistentKeepalive time.Duration
}

// Status is what a device holds now.
type Status struct {
	// Name is the link's name.
	Name string
	// Mode is ModeKernel or ModeUserspace.
	Mode Mode
	// PID is the userspace device process, 0 for a kernel device.
	PID        int
	PublicKey  wgtypes.Key
	ListenPort int
	// Peers are ordered by public key.
	Peers []PeerStatus
}

// PeerStatus is one peer of a Status.
type PeerStatus struct {
	PublicKey           wgtypes.Key
	Endpoint            netip.AddrPort
	AllowedIPs          []netip.Prefix
	PersistentKeepalive time.Duration
	// LastHandshake is the time of the last completed handshake, the zero
	// time when there was none.
	LastHandshake time.Time
	// RxBytes and TxBytes count what went through the peer's sessions,
	// WireGuard's headers included.
	RxBytes, TxBytes int64
}

// Peer returns the status of the peer with key k.
func (s Status) Peer(k wgtypes.Key) (PeerStatus, bool) {
	for _, p := range s.Peers {
		if p.PublicKey == k {
			return p, true
		}
	}
	return PeerStatus{}, false
}

// ConfigureResult says what a Configure wrote. Its zero value means the
// device was converged and nothing was written.
type ConfigureResult struct {
	// PrivateKey and ListenPort are true when they were written.
	PrivateKey, ListenPort bool
	// Added, Updated and Removed are the peers created, changed in place
	// and removed, each ordered by public key.
	Added, Updated, Removed []wgtypes.Key
}

// Changed reports whether anything was written.
func (r ConfigureResult) Changed() bool {
	return r.PrivateKey || r.ListenPort || len(r.Added)+len(r.Updated)+len(r.Removed) > 0
}

// normalize checks cfg and returns it with defaults applied, allowed IPs
// masked, sorted and deduplicated, keepalives in whole seconds and peers
// ordered by public key.
func (cfg DeviceConfig) normalize(defaultPort int) (DeviceConfig, error) {
	if cfg.PrivateKey == (wgtypes.Key{}) {
		return cfg, fmt.Errorf("no private key")
	}
	if cfg.ListenPort == 0 {
		cfg.ListenPort = defaultPort
	}
	if cfg.ListenPort < 1 || cfg.ListenPort > 65535 {
		return cfg, fmt.Errorf("listen port %d out of range", cfg.ListenPort)
	}
	pub := cfg.PrivateKey.PublicKey()
	out := make([]Peer, 0, len(cfg.Peers))
	seen := make(map[wgtypes.Key]bool, len(cfg.Peers))
	for _, p := range cfg.Peers {
		switch {
		case p.PublicKey == (wgtypes.Key{}):
			return cfg, fmt.Errorf("a peer without public key")
		case p.PublicKey == pub:
			return cfg, fmt.Errorf("peer %s: the device's own public key", p.PublicKey)
		case seen[p.PublicKey]:
			return cfg, fmt.Errorf("peer %s: listed twice", p.PublicKey)
		case p.Endpoint.IsValid() && p.Endpoint.Port() == 0:
			return cfg, fmt.Errorf("peer %s: endpoint %s without port", p.PublicKey, p.Endpoint)
		case p.PersistentKeepalive < 0 || p.PersistentKeepalive > 65535*time.Second:
			return cfg, fmt.Errorf("peer %s: persistent keepalive %s out of range (0-65535s)", p.PublicKey, p.PersistentKeepalive)
		}
		seen[p.PublicKey] = true
		if p.Endpoint.IsValid() {
			p.Endpoint = netip.AddrPortFrom(p.Endpoint.Addr().Unmap(), p.Endpoint.Port())
		}
		p.PersistentKeepalive = p.PersistentKeepalive.Truncate(time.Second)
		ips := make([]netip.Prefix, 0, len(p.AllowedIPs))
		for _, a := range p.AllowedIPs {
			if !a.IsValid() {
				return cfg, fmt.Errorf("peer %s: invalid allowed IP %v", p.PublicKey, a)
			}
			if a.Addr().Is4In6() {
				a = netip.PrefixFrom(a.Addr().Unmap(), max(a.Bits()-96, 0))
			}
			ips = append(ips, a.Masked())
		}
		p.AllowedIPs = sortPrefixes(ips)
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b Peer) int { return compareKeys(a.PublicKey, b.PublicKey) })
	cfg.Peers = out
	return cfg, nil
}

// plan returns the set operation that takes the device from cur to want
// (normalized), and what it changes. A zero result means nothing to write.
func plan(cur state, want DeviceConfig) (wgtypes.Config, ConfigureResult) {
	var cfg wgtypes.Config
	var res ConfigureResult
	if cur.PrivateKey != want.PrivateKey {
		k := want.PrivateKey
		cfg.PrivateKey = &k
		res.PrivateKey = true
	}
	if cur.ListenPort != want.ListenPort {
		p := want.ListenPort
		cfg.ListenPort = &p
		res.ListenPort = true
	}
	have := make(map[wgtypes.Key]peerState, len(cur.Peers))
	for _, p := range cur.Peers {
		have[p.PublicKey] = p
	}
	wanted := make(map[wgtypes.Key]bool, len(want.Peers))
	// Adds and updates first, removals last: an allowed IP that moves from
	// a removed peer to a new one is never without a peer.
	for _, p := range want.Peers {
		wanted[p.PublicKey] = true
		old, ok := have[p.PublicKey]
		if !ok {
			pc := wgtypes.PeerConfig{PublicKey: p.PublicKey, ReplaceAllowedIPs: true, AllowedIPs: ipNets(p.AllowedIPs)}
			if p.Endpoint.IsValid() {
				pc.Endpoint = net.UDPAddrFromAddrPort(p.Endpoint)
			}
			if p.PersistentKeepalive != 0 {
				ka := p.PersistentKeepalive
				pc.PersistentKeepaliveInterval = &ka
			}
			cfg.Peers = append(cfg.Peers, pc)
			res.Added = append(res.Added, p.PublicKey)
			continue
		}
		pc := wgtypes.PeerConfig{PublicKey: p.PublicKey, UpdateOnly: true}
		changed := false
		if p.Endpoint.IsValid() && p.Endpoint != old.Endpoint {
			pc.Endpoint = net.UDPAddrFromAddrPort(p.Endpoint)
			changed = true
		}
		if p.PersistentKeepalive != old.PersistentKeepalive {
			ka := p.PersistentKeepalive
			pc.PersistentKeepaliveInterval = &ka
			changed = true
		}
		if !slices.Equal(p.AllowedIPs, sortPrefixes(slices.Clone(old.AllowedIPs))) {
			pc.ReplaceAllowedIPs = true
			pc.AllowedIPs = ipNets(p.AllowedIPs)
			changed = true
		}
		if changed {
			cfg.Peers = append(cfg.Peers, pc)
			res.Updated = append(res.Updated, p.PublicKey)
		}
	}
	removed := make([]wgtypes.Key, 0)
	for _, p := range cur.Peers {
		if !wanted[p.PublicKey] {
			removed = append(removed, p.PublicKey)
		}
	}
	slices.SortFunc(removed, compareKeys)
	for _, k := range removed {
		cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: k, Remove: true})
		res.Removed = append(res.Removed, k)
	}
	return cfg, res
}

// statusFrom turns a device's state into a Status.
func statusFrom(s state) Status {
	st := Status{ListenPort: s.ListenPort}
	if s.PrivateKey != (wgtypes.Key{}) {
		st.PublicKey = s.PrivateKey.PublicKey()
	}
	peers := slices.Clone(s.Peers)
	sortPeers(peers)
	for _, p := range peers {
		st.Peers = append(st.Peers, PeerStatus{
			PublicKey:           p.PublicKey,
			Endpoint:            p.Endpoint,
			AllowedIPs:          sortPrefixes(slices.Clone(p.AllowedIPs)),
			PersistentKeepalive: p.PersistentKeepalive,
			LastHandshake:       p.LastHandshake,
			RxBytes:             p.RxBytes,
			TxBytes:             p.TxBytes,
		})
	}
	return st
}

func ipNets(ps []netip.Prefix) []net.IPNet {
	out := make([]net.IPNet, len(ps))
	for i, p := range ps {
		out[i] = prefixToIPNet(p)
	}
	return out
}

// sortPrefixes sorts ps in place (IPv4 first, then by address and length)
// and drops duplicates.
func sortPrefixes(ps []netip.Prefix) []netip.Prefix {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(ps)
}

func compareKeys(a, b wgtypes.Key) int {
	switch {
	case keyLess(a, b):
		return -1
	case keyLess(b, a):
		return 1
	}
	return 0
}
