package tunnel

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// overhead is the encapsulation overhead for the underlay's family.
func (t *Tunnel) overhead() int {
	if t.cfg.LocalIP.Is4() {
		return overheadIPv4
	}
	return overheadIPv6
}

// deviceSpec is the tunnel device Set wants, given the underlay device.
func (t *Tunnel) deviceSpec(under netlink.Link) netlink.Link {
	attrs := netlink.LinkAttrs{
		Name:         t.cfg.Device,
		MTU:          under.Attrs().MTU - t.overhead(),
		HardwareAddr: NodeMAC(t.cfg.LocalIP),
	}
	if t.cfg.Mode == ModeGeneve {
		// Collect-metadata ("external") mode: the device has no fixed
		// remote; each route's encap names the remote node.
		return &netlink.Geneve{LinkAttrs: attrs, FlowBased: true, Dport: t.cfg.Port}
	}
	return &netlink.Vxlan{
		LinkAttrs:    attrs,
		VxlanId:      int(t.cfg.VNI),
		VtepDevIndex: under.Attrs().Index,
		SrcAddr:      net.IP(t.cfg.LocalIP.AsSlice()),
		Port:         int(t.cfg.Port),
		Learning:     false, // the FDB is static: Set writes every entry
	}
}

// ensureDevice creates, adopts or replaces the tunnel device and brings its
// MTU, MAC, addresses and state in line. The caller holds t.mu.
func (t *Tunnel) ensureDevice() (netlink.Link, error) {
	under, err := t.h.LinkByName(t.cfg.UnderlayDevice)
	if err != nil {
		return nil, fmt.Errorf("tunnel: find underlay device %q: %w", t.cfg.UnderlayDevice, err)
	}
	want := t.deviceSpec(under)
	if t.cfg.deviceSpecOverride != nil {
		want = t.cfg.deviceSpecOverride(t, under)
	}
	link, err := t.h.LinkByName(t.cfg.Device)
	switch {
	case err == nil:
		if why := incompatible(link, want); why != "" {
			t.log.Warn("tunnel: replacing incompatible device", "device", t.cfg.Device, "reason", why)
			t.stats.Changes++
			if err := t.h.LinkDel(link); err != nil {
				return nil, fmt.Errorf("tunnel: delete incompatible device %s (%s): %w", t.cfg.Device, why, err)
			}
			t.stats.DeviceRecreates++
			// The kernel flushed the entries on the old device with it.
			t.owned = newOwnedState()
			if link, err = t.createDevice(want); err != nil {
				return nil, err
			}
		}
	case isLinkNotFound(err):
		if t.hadDevice {
			t.stats.Repairs++
			t.log.Warn("tunnel: device vanished; recreating it", "device", t.cfg.Device)
		}
		if link, err = t.createDevice(want); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("tunnel: find device %s: %w", t.cfg.Device, err)
	}
	t.hadDevice = true
	if err := t.configureDevice(link, want); err != nil {
		return nil, err
	}
	return link, nil
}

func (t *Tunnel) createDevice(want netlink.Link) (netlink.Link, error) {
	t.stats.Changes++
	if err := t.h.LinkAdd(want); err != nil {
		err = fmt.Errorf("tunnel: create %s device %s: %w", want.Type(), t.cfg.Device, deviceError(want, t.cfg, err))
		return nil, err
	}
	t.log.Info("tunnel: created device", "device", t.cfg.Device, "type", want.Type(),
		"vni", t.cfg.VNI, "port", t.cfg.Port, "mtu", want.Attrs().MTU, "underlay", t.cfg.UnderlayDevice)
	link, err := t.h.LinkByName(t.cfg.Device)
	if err != nil {
		return nil, fmt.Errorf("tunnel: find device %s after creating it: %w", t.cfg.Device, err)
	}
	return link, nil
}

// deviceError turns the kernel's answer to a failed link creation into one
// that says what is missing and what to do.
func deviceError(want netlink.Link, cfg Config, err error) error {
	switch {
	case errors.Is(err, unix.EOPNOTSUPP):
		// rtnetlink answers EOPNOTSUPP for a link kind no loaded module
		// registers ("Unknown device type" in iproute2).
		if want.Type() == "geneve" {
			return &UnsupportedFeatureError{
				Feature: "Geneve tunnel device",
				Kernel:  "CONFIG_GENEVE (module geneve)",
				Hint:    "load the geneve module, or use mode vxlan",
				Err:     err,
			}
		}
		return &UnsupportedFeatureError{
			Feature: "VXLAN tunnel device",
			Kernel:  "CONFIG_VXLAN (module vxlan)",
			Hint:    "load the vxlan module, or use mode native where the nodes share an L2 segment",
			Err:     err,
		}
	case errors.Is(err, unix.EEXIST) && want.Type() == "vxlan":
		return fmt.Errorf("%w (another VXLAN device may already use VNI %d on UDP port %d; flannel's flannel.1 uses VNI 1 on 8472: set a different VNI)", err, cfg.VNI, cfg.Port)
	case errors.Is(err, unix.EADDRINUSE):
		return fmt.Errorf("%w (UDP port %d is taken, perhaps by a tunnel device with other flags: set a different port)", err, cfg.Port)
	}
	return err
}

// incompatible says why an existing device cannot be adopted ("vni: 1 vs
// 2": have vs want), or "" when it can. MTU, MAC, addresses and up/down are
// not reasons: they are changed in place.
func incompatible(have, want netlink.Link) string {
	if have.Type() != want.Type() {
		return fmt.Sprintf("type: %s vs %s", have.Type(), want.Type())
	}
	switch w := want.(type) {
	case *netlink.Vxlan:
		h, ok := have.(*netlink.Vxlan)
		if !ok {
			return fmt.Sprintf("type: %T vs vxlan", have)
		}
		switch {
		case h.VxlanId != w.VxlanId:
			return fmt.Sprintf("vni: %d vs %d", h.VxlanId, w.VxlanId)
		case h.VtepDevIndex != w.VtepDevIndex:
			return fmt.Sprintf("vtep device index: %d vs %d", h.VtepDevIndex, w.VtepDevIndex)
		case !h.SrcAddr.Equal(w.SrcAddr):
			return fmt.Sprintf("vtep ip: %s vs %s", h.SrcAddr, w.SrcAddr)
		case h.Port != w.Port:
			return fmt.Sprintf("port: %d vs %d", h.Port, w.Port)
		case h.Learning != w.Learning:
			return fmt.Sprintf("learning: %t vs %t", h.Learning, w.Learning)
		case h.FlowBased != w.FlowBased:
			return fmt.Sprintf("external: %t vs %t", h.FlowBased, w.FlowBased)
		case h.GBP != w.GBP:
			return fmt.Sprintf("gbp: %t vs %t", h.GBP, w.GBP)
		case len(h.Group) > 0 && !h.Group.IsUnspecified():
			return fmt.Sprintf("group: %s vs none", h.Group)
		}
	case *netlink.Geneve:
		h, ok := have.(*netlink.Geneve)
		if !ok {
			return fmt.Sprintf("type: %T vs geneve", have)
		}
		switch {
		case h.FlowBased != w.FlowBased:
			return fmt.Sprintf("external: %t vs %t", h.FlowBased, w.FlowBased)
		case h.Dport != w.Dport:
			return fmt.Sprintf("port: %d vs %d", h.Dport, w.Dport)
		case len(h.Remote) > 0 && !h.Remote.IsUnspecified():
			return fmt.Sprintf("remote: %s vs none", h.Remote)
		}
	}
	return ""
}

// configureDevice sets MTU, MAC and the local VTEP addresses, then brings
// the device up, writing only what differs.
func (t *Tunnel) configureDevice(link netlink.Link, want netlink.Link) error {
	name := t.cfg.Device
	if mtu := want.Attrs().MTU; link.Attrs().MTU != mtu {
		t.stats.Changes++
		if err := t.h.LinkSetMTU(link, mtu); err != nil {
			return fmt.Errorf("tunnel: set mtu %d on %s: %w", mtu, name, err)
		}
	}
	if mac := want.Attrs().HardwareAddr; !bytes.Equal(link.Attrs().HardwareAddr, mac) {
		t.stats.Changes++
		if err := t.h.LinkSetHardwareAddr(link, mac); err != nil {
			return fmt.Errorf("tunnel: set address %s on %s: %w", mac, name, err)
		}
	}
	if err := t.ensureAddrs(link); err != nil {
		return err
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		t.stats.Changes++
		if err := t.h.LinkSetUp(link); err != nil {
			return fmt.Errorf("tunnel: set %s up: %w", name, err)
		}
	}
	return nil
}

// localVTEPs are the addresses the tunnel device should hold: VTEPAddr of
// the first local pod CIDR of each family, as a host prefix.
func (t *Tunnel) localVTEPs() []netip.Prefix {
	var out []netip.Prefix
	var have4, have6 bool
	for _, c := range t.cfg.LocalPodCIDRs {
		if !c.IsValid() {
			continue
		}
		a := VTEPAddr(c).Unmap()
		switch {
		case a.Is4() && !have4:
			have4 = true
			out = append(out, netip.PrefixFrom(a, 32))
		case a.Is6() && !have6:
			have6 = true
			out = append(out, netip.PrefixFrom(a, 128))
		}
	}
	return out
}

// ensureAddrs makes the device hold exactly the local VTEP addresses (IPv6
// link-local addresses are the kernel's and are left alone).
func (t *Tunnel) ensureAddrs(link netlink.Link) error {
	addrs, err := t.h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("tunnel: list addresses of %s: %w", t.cfg.Device, err)
	}
	want := t.localVTEPs()
	have := map[netip.Prefix]netlink.Addr{}
	for _, a := range addrs {
		if p := prefixFromIPNet(a.IPNet); p.IsValid() && !p.Addr().IsLinkLocalUnicast() {
			have[p] = a
		}
	}
	for _, w := range want {
		if _, ok := have[w]; ok {
			delete(have, w)
			continue
		}
		t.stats.Changes++
		if err := t.h.AddrAdd(link, &netlink.Addr{IPNet: ipNet(w)}); err != nil && !isExist(err) {
			return fmt.Errorf("tunnel: add address %s to %s: %w", w, t.cfg.Device, err)
		}
	}
	for p, a := range have {
		t.stats.Changes++
		if err := t.h.AddrDel(link, &a); err != nil && !isNotExist(err) {
			return fmt.Errorf("tunnel: delete address %s from %s: %w", p, t.cfg.Device, err)
		}
	}
	return nil
}
