package lab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The lab's wiring, all through netlink handles bound to lab namespaces:
//
//	bridge ns:  br0 (no uplink, no address) + one port per API server and node
//	API ns:     eth0 <underlay>/24
//	node ns:    eth0 <underlay>/24, forwarding on, lxc-<pod> per pod with a
//	            /32 route and a permanent neighbour entry for the pod
//	pod ns:     eth0 <pod IP>/32, 169.254.1.1 scope link with a permanent
//	            neighbour entry (the node-side veth's MAC), and routes to
//	            every pod CIDR and service VIP of the lab, and to its own
//	            node's underlay address (the agent's health probes come
//	            from it), via 169.254.1.1
//
// No namespace has a default route, so nothing can leave the lab.

// nsHandle is a netlink handle inside a named namespace.
type nsHandle struct {
	name string
	ns   netns.NsHandle
	*netlink.Handle
}

func openHandle(name string) (*nsHandle, error) {
	ns, err := netns.GetFromPath(nsPath(name))
	if err != nil {
		return nil, fmt.Errorf("lab: open netns %s: %w", name, err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("lab: netlink in %s: %w", name, err)
	}
	return &nsHandle{name: name, ns: ns, Handle: h}, nil
}

func (h *nsHandle) Close() {
	if h == nil {
		return
	}
	h.Handle.Close()
	h.ns.Close()
}

func (h *nsHandle) up(dev string) (netlink.Link, error) {
	l, err := h.LinkByName(dev)
	if err != nil {
		return nil, fmt.Errorf("lab: find %s in %s: %w", dev, h.name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("lab: set %s up in %s: %w", dev, h.name, err)
	}
	return l, nil
}

func (h *nsHandle) addAddr(dev string, p netip.Prefix) error {
	l, err := h.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("lab: find %s in %s: %w", dev, h.name, err)
	}
	err = h.AddrAdd(l, &netlink.Addr{IPNet: ipNet(p)})
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("lab: add %s to %s in %s: %w", p, dev, h.name, err)
	}
	return nil
}

// addVeth creates a veth pair from h's namespace: local stays, peer goes
// straight into peerNS (it never exists in any other namespace).
func (h *nsHandle) addVeth(local, peer string, peerNS *nsHandle, mtu int) error {
	v := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: local, MTU: mtu},
		PeerName:      peer,
		PeerMTU:       uint32(mtu),
		PeerNamespace: netlink.NsFd(int(peerNS.ns)),
	}
	if err := h.LinkAdd(v); err != nil {
		return fmt.Errorf("lab: add veth %s (%s) / %s (%s): %w", local, h.name, peer, peerNS.name, err)
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// setupBridge creates the bridge namespace's br0.
func (l *lab) setupBridge() error {
	if err := l.newNS(l.lay.bridgeNS); err != nil {
		return err
	}
	h, err := openHandle(l.lay.bridgeNS)
	if err != nil {
		return err
	}
	defer h.Close()
	if _, err := h.up("lo"); err != nil {
		return err
	}
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridgeName, MTU: underlayMTU}}
	if err := h.LinkAdd(br); err != nil {
		return fmt.Errorf("lab: add bridge %s: %w", bridgeName, err)
	}
	_, err = h.up(bridgeName)
	return err
}

// newNS records, then creates a namespace, with loopback up.
func (l *lab) newNS(name string) error {
	if err := l.recordNS(name); err != nil {
		return err
	}
	if err := createNetNS(name); err != nil {
		return err
	}
	h, err := openHandle(name)
	if err != nil {
		return err
	}
	defer h.Close()
	_, err = h.up("lo")
	return err
}

// attach creates namespace ns with eth0 = ip/underlay on the bridge through
// port.
func (l *lab) attach(ns, port string, ip netip.Addr) error {
	if err := l.newNS(ns); err != nil {
		return err
	}
	bh, err := openHandle(l.lay.bridgeNS)
	if err != nil {
		return err
	}
	defer bh.Close()
	h, err := openHandle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	if err := bh.addVeth(port, nodeDevice, h, underlayMTU); err != nil {
		return err
	}
	br, err := bh.LinkByName(bridgeName)
	if err != nil {
		return fmt.Errorf("lab: find %s: %w", bridgeName, err)
	}
	p, err := bh.LinkByName(port)
	if err != nil {
		return fmt.Errorf("lab: find %s: %w", port, err)
	}
	if err := bh.LinkSetMaster(p, br); err != nil {
		return fmt.Errorf("lab: add %s to %s: %w", port, bridgeName, err)
	}
	if _, err := bh.up(port); err != nil {
		return err
	}
	if err := h.addAddr(nodeDevice, netip.PrefixFrom(ip, l.lay.underlay.Bits())); err != nil {
		return err
	}
	_, err = h.up(nodeDevice)
	return err
}

// setupNode wires a node namespace: underlay, forwarding.
func (l *lab) setupNode(n *nodeLayout) error {
	if err := l.attach(n.ns, n.bridgePort, n.ip); err != nil {
		return err
	}
	for _, kv := range [][2]string{
		{"net.ipv4.ip_forward", "1"},
		{"net.ipv4.conf.all.rp_filter", "0"},
		{"net.ipv4.conf.default.rp_filter", "0"},
	} {
		if err := writeSysctl(n.ns, kv[0], kv[1]); err != nil {
			return err
		}
	}
	return nil
}

// setupPod wires a pod as a CNI plugin would: a namespace with a veth into
// its node, the pod IP as a /32, routes via a link-local gateway.
func (l *lab) setupPod(p *podLayout) error {
	if err := l.newNS(p.ns); err != nil {
		return err
	}
	nh, err := openHandle(p.node.ns)
	if err != nil {
		return err
	}
	defer nh.Close()
	ph, err := openHandle(p.ns)
	if err != nil {
		return err
	}
	defer ph.Close()
	mtu := underlayMTU - tunnelMTUGap
	if err := nh.addVeth(p.hostVeth, podDevice, ph, mtu); err != nil {
		return err
	}
	hostLink, err := nh.up(p.hostVeth)
	if err != nil {
		return err
	}
	if err := ph.addAddr(podDevice, netip.PrefixFrom(p.ip, 32)); err != nil {
		return err
	}
	podLink, err := ph.up(podDevice)
	if err != nil {
		return err
	}
	// Pod side: the gateway is on-link and resolved statically.
	if err := ph.NeighSet(&netlink.Neigh{
		LinkIndex: podLink.Attrs().Index, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
		IP: podGateway.AsSlice(), HardwareAddr: hostLink.Attrs().HardwareAddr,
	}); err != nil {
		return fmt.Errorf("lab: pod %s: gateway neighbour: %w", p.ref(), err)
	}
	if err := ph.RouteReplace(&netlink.Route{
		LinkIndex: podLink.Attrs().Index, Dst: ipNet(netip.PrefixFrom(podGateway, 32)), Scope: netlink.SCOPE_LINK,
	}); err != nil {
		return fmt.Errorf("lab: pod %s: gateway route: %w", p.ref(), err)
	}
	for _, dst := range l.lay.podRoutes {
		if err := ph.RouteReplace(podRoute(p, podLink, dst)); err != nil {
			return fmt.Errorf("lab: pod %s: route %s: %w", p.ref(), dst, err)
		}
	}
	// And to its own node's address, as a pod's default route would
	// carry: the node's agent probes its pods from the node's namespace,
	// from that address, and the answers must find their way back.
	if nodeIP := netip.PrefixFrom(p.node.ip, 32); !slices.Contains(l.lay.podRoutes, nodeIP) {
		if err := ph.RouteReplace(podRoute(p, podLink, nodeIP)); err != nil {
			return fmt.Errorf("lab: pod %s: route to its node %s: %w", p.ref(), nodeIP, err)
		}
	}
	// Node side: a host route and a static neighbour for the pod.
	if err := nh.NeighSet(&netlink.Neigh{
		LinkIndex: hostLink.Attrs().Index, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
		IP: p.ip.AsSlice(), HardwareAddr: podLink.Attrs().HardwareAddr,
	}); err != nil {
		return fmt.Errorf("lab: pod %s: node neighbour: %w", p.ref(), err)
	}
	if err := nh.RouteReplace(&netlink.Route{
		LinkIndex: hostLink.Attrs().Index, Dst: ipNet(netip.PrefixFrom(p.ip, 32)), Scope: netlink.SCOPE_LINK,
	}); err != nil {
		return fmt.Errorf("lab: pod %s: host route: %w", p.ref(), err)
	}
	return nil
}

// podRoute is pod p's route to dst: via the gateway, from the pod's IP.
func podRoute(p *podLayout, podLink netlink.Link, dst netip.Prefix) *netlink.Route {
	return &netlink.Route{LinkIndex: podLink.Attrs().Index, Dst: ipNet(dst), Gw: podGateway.AsSlice(), Src: p.ip.AsSlice()}
}

// setPodRoutes adds pod p's routes to dsts (a cluster that joined the lab
// later), or with del removes them.
func setPodRoutes(p *podLayout, dsts []netip.Prefix, del bool) error {
	ph, err := openHandle(p.ns)
	if err != nil {
		return err
	}
	defer ph.Close()
	podLink, err := ph.LinkByName(podDevice)
	if err != nil {
		return fmt.Errorf("lab: find %s in %s: %w", podDevice, p.ns, err)
	}
	var errs []error
	for _, dst := range dsts {
		if del {
			if err := ph.RouteDel(podRoute(p, podLink, dst)); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("lab: pod %s: remove route %s: %w", p.ref(), dst, err))
			}
			continue
		}
		if err := ph.RouteReplace(podRoute(p, podLink, dst)); err != nil {
			errs = append(errs, fmt.Errorf("lab: pod %s: route %s: %w", p.ref(), dst, err))
		}
	}
	return errors.Join(errs...)
}

// setLinkState sets a node's underlay veth (both ends) up or down.
func (l *lab) setLinkState(n *nodeLayout, up bool) error {
	var errs []error
	set := func(ns, dev string) {
		h, err := openHandle(ns)
		if err != nil {
			errs = append(errs, err)
			return
		}
		defer h.Close()
		link, err := h.LinkByName(dev)
		if err != nil {
			errs = append(errs, fmt.Errorf("lab: find %s in %s: %w", dev, ns, err))
			return
		}
		if up {
			err = h.LinkSetUp(link)
		} else {
			err = h.LinkSetDown(link)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("lab: set %s in %s: %w", dev, ns, err))
		}
	}
	set(n.ns, nodeDevice)
	set(l.lay.bridgeNS, n.bridgePort)
	return errors.Join(errs...)
}
