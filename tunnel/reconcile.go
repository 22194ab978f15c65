package tunnel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

type fdbKey struct {
	mac string
	dst netip.Addr
}

// ownedState is what the Tunnel believes it installed, keyed like the kernel
// keys the entries.
type ownedState struct {
	neigh  map[netip.Addr]Neighbour
	fdb    map[fdbKey]FDBEntry
	routes map[netip.Prefix]Route
}

func newOwnedState() ownedState {
	return ownedState{
		neigh:  map[netip.Addr]Neighbour{},
		fdb:    map[fdbKey]FDBEntry{},
		routes: map[netip.Prefix]Route{},
	}
}

// kernelState is the part of the kernel's state that is Trellis's: permanent
// neighbour entries and FDB entries with a destination on the tunnel device
// (which is Trellis's alone), and main-table routes marked RouteProtocol.
type kernelState struct {
	neigh  map[netip.Addr]netlink.Neigh
	fdb    map[fdbKey]netlink.Neigh
	routes map[netip.Prefix]netlink.Route
	// extra are second routes to a prefix (another metric or TOS); never
	// Trellis's own doing, always stale.
	extra []netlink.Route
	// onLink are the subnets of the underlay device (native mode).
	onLink []netip.Prefix
}

func (t *Tunnel) readKernel(link netlink.Link) (*kernelState, error) {
	ks := &kernelState{
		neigh:  map[netip.Addr]netlink.Neigh{},
		fdb:    map[fdbKey]netlink.Neigh{},
		routes: map[netip.Prefix]netlink.Route{},
	}
	idx := link.Attrs().Index
	if t.cfg.Mode == ModeNative {
		addrs, err := t.h.AddrList(link, netlink.FAMILY_ALL)
		if err != nil {
			return nil, fmt.Errorf("tunnel: list addresses of %s: %w", link.Attrs().Name, err)
		}
		for _, a := range addrs {
			if p := prefixFromIPNet(a.IPNet); p.IsValid() && p.Bits() < p.Addr().BitLen() {
				ks.onLink = append(ks.onLink, p.Masked())
			}
		}
	} else {
		for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			ns, err := retryDump(func() ([]netlink.Neigh, error) { return t.h.NeighList(idx, fam) })
			if err != nil {
				return nil, fmt.Errorf("tunnel: list neighbours on %s: %w", t.cfg.Device, err)
			}
			for _, n := range ns {
				ip := addrFromIP(n.IP)
				if n.State&netlink.NUD_PERMANENT != 0 && ip.IsValid() {
					ks.neigh[ip] = n
				}
			}
		}
		if t.cfg.Mode == ModeVXLAN {
			ns, err := retryDump(func() ([]netlink.Neigh, error) { return t.h.NeighList(idx, unix.AF_BRIDGE) })
			if err != nil {
				return nil, fmt.Errorf("tunnel: list fdb on %s: %w", t.cfg.Device, err)
			}
			for _, n := range ns {
				// Entries without a destination are the device's own
				// unicast and multicast addresses, not remotes.
				dst := addrFromIP(n.IP)
				if n.State&netlink.NUD_PERMANENT != 0 && dst.IsValid() && len(n.HardwareAddr) == 6 {
					ks.fdb[fdbKey{n.HardwareAddr.String(), dst}] = n
				}
			}
		}
	}
	routes, err := t.listOwnedRoutes()
	if err != nil {
		return nil, err
	}
	for _, r := range routes {
		p := prefixFromIPNet(r.Dst)
		if _, dup := ks.routes[p]; dup || !p.IsValid() {
			ks.extra = append(ks.extra, r)
			continue
		}
		ks.routes[p] = r
	}
	return ks, nil
}

// listOwnedRoutes lists the main-table routes marked RouteProtocol, both
// families.
func (t *Tunnel) listOwnedRoutes() ([]netlink.Route, error) {
	filter := &netlink.Route{Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN}
	routes, err := retryDump(func() ([]netlink.Route, error) {
		return t.h.RouteListFiltered(netlink.FAMILY_ALL, filter, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return nil, fmt.Errorf("tunnel: list routes (proto %d): %w", RouteProtocol, err)
	}
	return routes, nil
}

// retryDump repeats a netlink dump the kernel interrupted because the table
// changed under it.
func retryDump[T any](dump func() ([]T, error)) ([]T, error) {
	var (
		out []T
		err error
	)
	for range 5 {
		out, err = dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return out, err
}

// desiredKeys are the keys of every entry the plan wants. Set deletes the
// kernel's Trellis entries that are not among them.
type desiredKeys struct {
	neigh  map[netip.Addr]bool
	fdb    map[fdbKey]bool
	routes map[netip.Prefix]bool
}

func (t *Tunnel) set(ctx context.Context, nodes []Node) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p := makePlan(t.cfg.Mode, t.cfg.LocalIP, t.cfg.LocalPodCIDRs, nodes)
	errs := p.errs
	for _, err := range p.errs {
		t.log.Warn("tunnel: refusing node", "err", err)
	}

	var (
		link netlink.Link
		err  error
	)
	if t.cfg.Mode == ModeNative {
		link, err = t.h.LinkByName(t.cfg.UnderlayDevice)
		if err != nil {
			err = fmt.Errorf("tunnel: find underlay device %q: %w", t.cfg.UnderlayDevice, err)
		}
	} else {
		link, err = t.ensureDevice()
	}
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	ks, err := t.readKernel(link)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	links := routeLinks{tunnel: link}
	for _, n := range p.nodes {
		if n.path == PathEncrypted {
			links.encrypted, links.encryptedErr = t.encryptedLink()
			break
		}
	}

	todo := p.nodes
	if t.cfg.Mode == ModeNative {
		todo = nil
		for _, n := range p.nodes {
			if !containsAddr(ks.onLink, n.underlay) {
				err := fmt.Errorf("tunnel: native routes for node %q via %s: %w %s %v (native routing needs L2 adjacency; use mode vxlan)",
					n.name, n.underlay, ErrNotOnLink, link.Attrs().Name, ks.onLink)
				t.log.Warn("tunnel: refusing node", "err", err)
				errs = append(errs, err)
				continue
			}
			todo = append(todo, n)
		}
	}

	desired := desiredKeys{neigh: map[netip.Addr]bool{}, fdb: map[fdbKey]bool{}, routes: map[netip.Prefix]bool{}}
	for _, n := range todo {
		for _, v := range n.vteps {
			desired.neigh[v] = true
		}
		if t.cfg.Mode == ModeVXLAN {
			desired.fdb[fdbKey{n.mac.String(), n.underlay}] = true
		}
		for _, r := range n.routes {
			desired.routes[r.dst] = true
		}
	}

	next := newOwnedState()
	done := 0
	for _, n := range todo {
		if err := ctx.Err(); err != nil {
			errs = append(errs, err)
			break
		}
		if err := t.applyNode(links, n, ks, &next); err != nil {
			t.log.Warn("tunnel: node not fully installed", "node", n.name, "err", err)
			errs = append(errs, err)
		}
		done++
	}
	// Nodes a cancelled context kept us from visiting keep what the kernel
	// already has for them.
	for _, n := range todo[done:] {
		t.recordPresent(links, n, ks, &next)
	}
	if ctx.Err() == nil {
		errs = append(errs, t.deleteStale(ks, desired)...)
	}
	t.owned = next
	return errors.Join(errs...)
}

func (t *Tunnel) neighbour(idx int, ip netip.Addr, mac net.HardwareAddr) *netlink.Neigh {
	fam := netlink.FAMILY_V4
	if ip.Is6() {
		fam = netlink.FAMILY_V6
	}
	return &netlink.Neigh{
		LinkIndex:    idx,
		Family:       fam,
		State:        netlink.NUD_PERMANENT,
		Type:         unix.RTN_UNICAST,
		IP:           net.IP(ip.AsSlice()),
		HardwareAddr: mac,
	}
}

func fdbEntry(idx int, mac net.HardwareAddr, dst netip.Addr) *netlink.Neigh {
	return &netlink.Neigh{
		LinkIndex:    idx,
		Family:       unix.AF_BRIDGE,
		Flags:        netlink.NTF_SELF,
		State:        netlink.NUD_PERMANENT,
		IP:           net.IP(dst.AsSlice()),
		HardwareAddr: mac,
	}
}

// routeLinks are the devices routes point into.
type routeLinks struct {
	tunnel netlink.Link // the tunnel device, or the underlay in native mode
	// encrypted is Config.EncryptedDevice, looked up when a node wants
	// it; encryptedErr says why it is not there.
	encrypted    netlink.Link
	encryptedErr error
}

// encryptedLink finds Config.EncryptedDevice.
func (t *Tunnel) encryptedLink() (netlink.Link, error) {
	if t.cfg.EncryptedDevice == "" {
		return nil, errors.New("tunnel: a node is on the encrypted path but Config.EncryptedDevice is not set")
	}
	link, err := t.h.LinkByName(t.cfg.EncryptedDevice)
	if err != nil {
		return nil, fmt.Errorf("tunnel: find encryption device %s (routes to its nodes stay as they are): %w", t.cfg.EncryptedDevice, err)
	}
	return link, nil
}

// route is the kernel route for one pod CIDR of node n, and its record. It
// fails only on the encrypted path when the device is missing.
func (t *Tunnel) route(links routeLinks, n nodePlan, rp routePlan) (*netlink.Route, Route, error) {
	r := &netlink.Route{
		Dst:      ipNet(rp.dst),
		Protocol: RouteProtocol,
		Table:    unix.RT_TABLE_MAIN,
		Scope:    netlink.SCOPE_UNIVERSE,
		Type:     unix.RTN_UNICAST,
	}
	rec := Route{Node: n.name, Dst: rp.dst, Path: n.path}
	switch n.path {
	case PathEncrypted:
		if links.encryptedErr != nil {
			return nil, rec, links.encryptedErr
		}
		r.LinkIndex = links.encrypted.Attrs().Index
		if rp.dst.Addr().Is4() {
			// IPv6 routes have no scope (the kernel lists them as
			// universe), IPv4 ones without a gateway are link-scoped.
			r.Scope = netlink.SCOPE_LINK
		}
		rec.Device = links.encrypted.Attrs().Name
		return r, rec, nil
	case PathBlocked:
		r.Type = unix.RTN_UNREACHABLE
		return r, rec, nil
	}
	link := links.tunnel
	r.LinkIndex = link.Attrs().Index
	r.Gw = net.IP(rp.via.AsSlice())
	rec.Via, rec.Device = rp.via, link.Attrs().Name
	if t.cfg.Mode != ModeNative {
		// The VTEP address is on no subnet of the device: onlink tells the
		// kernel to trust that the gateway is reachable there anyway.
		r.Flags = int(netlink.FLAG_ONLINK)
		rec.OnLink = true
	}
	if t.cfg.Mode == ModeGeneve {
		r.Encap = &ipEncap{id: uint64(t.cfg.VNI), dst: n.underlay}
		rec.TunnelDst = n.underlay
	}
	return r, rec, nil
}

// routeMatches says whether the kernel's route have is the route want
// (recorded as rec).
func (t *Tunnel) routeMatches(have, want *netlink.Route, rec Route) bool {
	if want.Type == unix.RTN_UNREACHABLE {
		// The kernel lists an IPv6 unreachable route on lo: only the type
		// says what it is.
		return have.Type == want.Type && have.Gw == nil && len(have.MultiPath) == 0 && have.Encap == nil
	}
	if have.LinkIndex != want.LinkIndex || !have.Gw.Equal(want.Gw) ||
		have.Flags&int(netlink.FLAG_ONLINK) != want.Flags&int(netlink.FLAG_ONLINK) ||
		have.Scope != want.Scope || have.Type != want.Type || have.Src != nil ||
		len(have.MultiPath) > 0 {
		return false
	}
	switch {
	case want.Encap == nil:
		return have.Encap == nil
	case have.Encap != nil:
		return have.Encap.Equal(want.Encap)
	default:
		// The netlink library does not decode "encap ip" (have.Encap is
		// nil even when the kernel holds one): trust our own record.
		prev, ok := t.owned.routes[rec.Dst]
		return ok && prev == rec
	}
}

// applyNode installs one node's entries in order neighbour → FDB → routes.
// If the neighbour or FDB entry fails, or every route fails, it removes the
// entries it created for the node in this call.
func (t *Tunnel) applyNode(links routeLinks, n nodePlan, ks *kernelState, next *ownedState) error {
	idx := links.tunnel.Attrs().Index
	dev := links.tunnel.Attrs().Name
	var undo []func()
	rollback := func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}

	for _, vtep := range n.vteps {
		rec := Neighbour{Node: n.name, IP: vtep, MAC: n.mac}
		have, ok := ks.neigh[vtep]
		if ok && bytes.Equal(have.HardwareAddr, n.mac) {
			next.neigh[vtep] = rec
			continue
		}
		nb := t.neighbour(idx, vtep, n.mac)
		t.stats.Changes++
		if err := t.h.NeighSet(nb); err != nil {
			rollback()
			return fmt.Errorf("tunnel: add neighbour %s lladdr %s on %s for node %q: %w", vtep, n.mac, dev, n.name, err)
		}
		t.noteRepair(sameNeighbour(t.owned.neigh[vtep], rec), "neighbour", vtep.String(), n.name)
		next.neigh[vtep] = rec
		if !ok {
			undo = append(undo, func() {
				t.stats.Changes++
				_ = t.h.NeighDel(nb)
				delete(next.neigh, vtep)
			})
		}
	}

	if t.cfg.Mode == ModeVXLAN {
		key := fdbKey{n.mac.String(), n.underlay}
		rec := FDBEntry{Node: n.name, MAC: n.mac, Dst: n.underlay}
		if _, ok := ks.fdb[key]; ok {
			next.fdb[key] = rec
		} else {
			fe := fdbEntry(idx, n.mac, n.underlay)
			t.stats.Changes++
			// Append, not set: set would overwrite the first remote of the
			// MAC, and a stale remote of the same MAC is deleted later.
			if err := t.h.NeighAppend(fe); err != nil {
				rollback()
				return fmt.Errorf("tunnel: add fdb %s dst %s on %s for node %q: %w", n.mac, n.underlay, dev, n.name, err)
			}
			_, was := t.owned.fdb[key]
			t.noteRepair(was, "fdb", n.mac.String(), n.name)
			next.fdb[key] = rec
			undo = append(undo, func() {
				t.stats.Changes++
				_ = t.h.NeighDel(fe)
				delete(next.fdb, key)
			})
		}
	}

	var errs []error
	installed := 0
	for _, rp := range n.routes {
		want, rec, err := t.route(links, n, rp)
		if err != nil {
			// The route stays as the kernel has it (the prefix is still
			// wanted, so nothing deletes it); keep recording what it was.
			if prev, ok := t.owned.routes[rp.dst]; ok {
				next.routes[rp.dst] = prev
			}
			errs = append(errs, fmt.Errorf("node %q: %w", n.name, err))
			continue
		}
		have, ok := ks.routes[rp.dst]
		if ok && t.routeMatches(&have, want, rec) {
			next.routes[rp.dst] = rec
			installed++
			continue
		}
		t.stats.Changes++
		if ok {
			err = t.h.RouteReplace(want)
		} else {
			err = t.h.RouteAdd(want)
			if isExist(err) {
				err = fmt.Errorf("%w (a route to %s that Trellis does not own is in the way)", err, rp.dst)
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("tunnel: add route %s (%s path, dev %s) for node %q: %w", rp.dst, n.path, rec.Device, n.name, err))
			continue
		}
		// A route the Tunnel had installed as it is now wanted was lost
		// (drift); one wanted on another path is a change.
		prev, was := t.owned.routes[rp.dst]
		t.noteRepair(was && prev == rec, "route", rp.dst.String(), n.name)
		next.routes[rp.dst] = rec
		installed++
	}
	if len(errs) > 0 && installed == 0 {
		rollback()
	}
	return errors.Join(errs...)
}

// recordPresent records the entries of node n that the kernel already has,
// without writing anything.
func (t *Tunnel) recordPresent(links routeLinks, n nodePlan, ks *kernelState, next *ownedState) {
	for _, v := range n.vteps {
		if have, ok := ks.neigh[v]; ok && bytes.Equal(have.HardwareAddr, n.mac) {
			next.neigh[v] = Neighbour{Node: n.name, IP: v, MAC: n.mac}
		}
	}
	if t.cfg.Mode == ModeVXLAN {
		key := fdbKey{n.mac.String(), n.underlay}
		if _, ok := ks.fdb[key]; ok {
			next.fdb[key] = FDBEntry{Node: n.name, MAC: n.mac, Dst: n.underlay}
		}
	}
	for _, rp := range n.routes {
		want, rec, err := t.route(links, n, rp)
		if err != nil {
			continue
		}
		if have, ok := ks.routes[rp.dst]; ok && t.routeMatches(&have, want, rec) {
			next.routes[rp.dst] = rec
		}
	}
}

func (t *Tunnel) noteRepair(was bool, kind, key, node string) {
	if was {
		t.stats.Repairs++
		t.log.Info("tunnel: repaired drift", "kind", kind, "entry", key, "node", node)
	}
}

func sameNeighbour(a, b Neighbour) bool {
	return a.IP == b.IP && a.Node == b.Node && bytes.Equal(a.MAC, b.MAC)
}

// deleteStale removes Trellis's kernel entries that the plan does not want:
// routes first, then FDB, then neighbours (the reverse of adding).
func (t *Tunnel) deleteStale(ks *kernelState, desired desiredKeys) []error {
	var errs []error
	del := func(r netlink.Route) {
		t.stats.Changes++
		if err := t.h.RouteDel(&r); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("tunnel: delete route %s: %w", r.Dst, err))
			return
		}
		t.log.Info("tunnel: deleted route", "dst", r.Dst.String(), "via", r.Gw.String())
	}
	for p, r := range ks.routes {
		if !desired.routes[p] {
			del(r)
		}
	}
	for _, r := range ks.extra {
		del(r)
	}
	for k, n := range ks.fdb {
		if desired.fdb[k] {
			continue
		}
		t.stats.Changes++
		if err := t.h.NeighDel(fdbEntry(n.LinkIndex, n.HardwareAddr, k.dst)); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("tunnel: delete fdb %s dst %s: %w", k.mac, k.dst, err))
			continue
		}
		t.log.Info("tunnel: deleted fdb entry", "mac", k.mac, "dst", k.dst.String())
	}
	for ip, n := range ks.neigh {
		if desired.neigh[ip] {
			continue
		}
		t.stats.Changes++
		if err := t.h.NeighDel(t.neighbour(n.LinkIndex, ip, n.HardwareAddr)); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("tunnel: delete neighbour %s: %w", ip, err))
			continue
		}
		t.log.Info("tunnel: deleted neighbour", "ip", ip.String())
	}
	return errs
}
