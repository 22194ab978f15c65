package tunnel

import (
	"cmp"
	"crypto/sha256"
	"fmt"
	"net"
	"net/netip"
	"slices"
)

// macPrefix starts every VTEP MAC: 0x02 is a locally administered unicast
// address, 0x74 is 't' for trellis.
var macPrefix = [2]byte{0x02, 0x74}

// NodeMAC is the MAC address of the VTEP of the node whose underlay IP is
// ip. Every node computes it the same way, so a node needs nothing but a
// remote node's IP to address frames to it, and no MAC travels through the
// mesh API.
//
// For an IPv4 underlay the MAC is 02:74 followed by the four address bytes
// (192.168.0.2 → 02:74:c0:a8:00:02), which reads back to the node at a
// glance. For an IPv6 underlay the last four bytes are the first four of
// SHA-256 over the 16 address bytes; Set reports two nodes whose MACs
// collide instead of installing either twice.
func NodeMAC(ip netip.Addr) net.HardwareAddr {
	ip = ip.Unmap()
	mac := make(net.HardwareAddr, 6)
	copy(mac, macPrefix[:])
	if ip.Is4() {
		b := ip.As4()
		copy(mac[2:], b[:])
		return mac
	}
	b := ip.As16()
	sum := sha256.Sum256(b[:])
	copy(mac[2:], sum[:4])
	return mac
}

// VTEPAddr is the overlay address of a node's VTEP in one address family:
// the network address of the node's first pod CIDR of that family
// (10.1.2.0/24 → 10.1.2.0), as flannel does. The local node puts it on its
// tunnel device as a /32 (/128); remote nodes use it as the gateway of
// their routes and the key of their neighbour entry.
func VTEPAddr(podCIDR netip.Prefix) netip.Addr {
	return podCIDR.Masked().Addr()
}

// nodePlan is what one remote node needs in the kernel.
type nodePlan struct {
	name     string
	path     Path
	underlay netip.Addr
	mac      net.HardwareAddr // tunnel modes only
	vteps    []netip.Addr     // tunnel modes: one per overlay family
	routes   []routePlan
}

type routePlan struct {
	dst netip.Prefix
	via netip.Addr
}

// plan is the desired state computed from Set's input, before any kernel
// work. errs are per-node problems; the nodes in nodes are the ones that can
// be installed.
type plan struct {
	nodes []nodePlan
	errs  []error
}

// makePlan validates nodes and computes the desired state. It is pure: the
// same input gives the same plan whatever the order of nodes.
//
//   - A node whose IP is localIP is the local node and is skipped.
//   - Tunnel modes: a node's underlay IP must be of localIP's family (the
//     tunnel device has one source address); its VTEP per overlay family is
//     VTEPAddr of its first pod CIDR of that family, and each pod CIDR is
//     routed via the VTEP of its family.
//   - Native mode: each pod CIDR is routed via the node's IP, so it must be
//     of the node IP's family.
//   - A pod CIDR that overlaps a local pod CIDR or one already taken by
//     another node (nodes are taken in name order) is refused.
func makePlan(mode Mode, localIP netip.Addr, localCIDRs []netip.Prefix, nodes []Node) plan {
	var p plan
	sorted := slices.Clone(nodes)
	slices.SortStableFunc(sorted, func(a, b Node) int {
		return cmp.Or(cmp.Compare(a.Name, b.Name), a.IP.Compare(b.IP))
	})

	var claims []claim
	for _, c := range localCIDRs {
		claims = append(claims, claim{c.Masked(), "the local node"})
	}
	seenName := map[string]bool{}
	seenIP := map[netip.Addr]string{}
	seenMAC := map[string]string{}

	for _, n := range sorted {
		ip := n.IP.Unmap()
		nerr := func(format string, args ...any) {
			p.errs = append(p.errs, fmt.Errorf("tunnel: node %q (%s): "+format, append([]any{n.Name, n.IP}, args...)...))
		}
		switch {
		case n.Name == "":
			nerr("empty name")
			continue
		case !ip.IsValid() || ip.IsUnspecified() || ip.IsMulticast():
			nerr("invalid underlay IP")
			continue
		case ip == localIP.Unmap():
			continue // the local node
		case seenName[n.Name]:
			nerr("duplicate node name")
			continue
		case seenIP[ip] != "":
			nerr("underlay IP already used by node %q", seenIP[ip])
			continue
		}
		seenName[n.Name] = true
		seenIP[ip] = n.Name

		if n.Path > PathBlocked {
			nerr("unknown path %d", n.Path)
			continue
		}
		np := nodePlan{name: n.Name, path: n.Path, underlay: ip}
		if mode != ModeNative {
			if ip.Is4() != localIP.Unmap().Is4() {
				nerr("underlay family differs from the local IP %s", localIP)
				continue
			}
			np.mac = NodeMAC(ip)
			if other, ok := seenMAC[np.mac.String()]; ok {
				nerr("VTEP MAC %s collides with node %q", np.mac, other)
				continue
			}
			seenMAC[np.mac.String()] = n.Name
		}

		var vtep4, vtep6 netip.Addr
		for _, c := range n.PodCIDRs {
			if !c.IsValid() {
				nerr("invalid pod CIDR %s", c)
				continue
			}
			c = c.Masked()
			if c.Addr().Is4In6() {
				c = netip.PrefixFrom(c.Addr().Unmap(), c.Bits()-96)
			}
			if c.Bits() == 0 {
				nerr("pod CIDR %s would be a default route", c)
				continue
			}
			if owner := overlapping(claims, c); owner != "" {
				nerr("pod CIDR %s overlaps %s", c, owner)
				continue
			}
			var via netip.Addr
			if mode == ModeNative {
				if c.Addr().Is4() != ip.Is4() {
					nerr("pod CIDR %s: native routing needs a node IP of the same family", c)
					continue
				}
				via = ip
			} else {
				vtep := &vtep6
				if c.Addr().Is4() {
					vtep = &vtep4
				}
				if !vtep.IsValid() {
					*vtep = VTEPAddr(c)
					np.vteps = append(np.vteps, *vtep)
				}
				via = *vtep
			}
			claims = append(claims, claim{c, fmt.Sprintf("node %q's %s", n.Name, c)})
			np.routes = append(np.routes, routePlan{dst: c, via: via})
		}
		p.nodes = append(p.nodes, np)
	}
	return p
}

// claim is a pod CIDR already taken, and by whom.
type claim struct {
	prefix netip.Prefix
	owner  string
}

// overlapping returns the owner of the first claim that overlaps c, or "".
// It is quadratic in the number of pod CIDRs, which is fine for the mesh
// sizes Trellis targets (a few thousand nodes).
func overlapping(claims []claim, c netip.Prefix) string {
	for _, cl := range claims {
		if cl.prefix.Overlaps(c) {
			return cl.owner
		}
	}
	return ""
}
