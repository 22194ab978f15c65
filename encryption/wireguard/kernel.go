package wireguard

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// The kernel device: a link of type "wireguard" made through netlink and
// configured through wgctrl's generic netlink client.
//
// UNTESTED ON THE DEVELOPMENT MACHINE: its kernel has no WireGuard (no
// CONFIG_WIREGUARD, no loadable modules), so this file is written to the
// kernel's interface and wgctrl's documentation, and only its "not
// supported" path and the conversions run in tests there. The tests that
// need a kernel device skip on errors.ErrUnsupported.
//
// wgctrl.New also opens its userspace client, which looks for sockets in
// /var/run/wireguard; Open only takes the kernel path for a link of type
// "wireguard" in this namespace, and kernel reads check the device type,
// so a userspace device of the same name there is never mistaken for ours.

type kernel struct {
	name   string
	client *wgctrl.Client
}

// openKernel adopts the kernel WireGuard link (link non-nil) or creates
// one. It fails wrapping errors.ErrUnsupported when the kernel has no
// WireGuard.
func openKernel(cfg Config, link netlink.Link) (*kernel, error) {
	created := false
	if link == nil {
		la := netlink.NewLinkAttrs()
		la.Name = cfg.Name
		la.MTU = cfg.MTU
		err := netlink.LinkAdd(&netlink.Wireguard{LinkAttrs: la})
		if errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.EAFNOSUPPORT) {
			return nil, fmt.Errorf("create kernel WireGuard link: %w: needs CONFIG_WIREGUARD (module wireguard): %w", errors.ErrUnsupported, err)
		}
		if err != nil {
			return nil, fmt.Errorf("create kernel WireGuard link: %w", err)
		}
		created = true
		l, err := netlink.LinkByName(cfg.Name)
		if err == nil {
			link = l
			err = netlink.LinkSetUp(l)
		}
		if err != nil {
			netlink.LinkDel(&netlink.Wireguard{LinkAttrs: la})
			return nil, fmt.Errorf("set kernel WireGuard link up: %w", err)
		}
	}
	c, err := wgctrl.New()
	if err != nil {
		if created {
			netlink.LinkDel(link)
		}
		return nil, fmt.Errorf("wgctrl: %w", err)
	}
	k := &kernel{name: cfg.Name, client: c}
	if _, err := k.get(context.Background()); err != nil {
		c.Close()
		if created {
			netlink.LinkDel(link)
		}
		return nil, err
	}
	if created {
		cfg.Logger.Info("created kernel WireGuard device", "device", cfg.Name, "mtu", cfg.MTU)
	} else {
		cfg.Logger.Info("adopted kernel WireGuard device", "device", cfg.Name)
	}
	return k, nil
}

func (k *kernel) get(context.Context) (state, error) {
	d, err := k.client.Device(k.name)
	if err != nil {
		return state{}, fmt.Errorf("read kernel device: %w", err)
	}
	if d.Type != wgtypes.LinuxKernel {
		return state{}, fmt.Errorf("read kernel device: wgctrl found a %s device, not the kernel's", d.Type)
	}
	return stateFromWgtypes(d), nil
}

func (k *kernel) set(_ context.Context, cfg wgtypes.Config) error {
	// wgctrl would fall back to /var/run/wireguard/<name>.sock if the
	// link were gone; check it is still the kernel's.
	l, err := netlink.LinkByName(k.name)
	if err != nil {
		return fmt.Errorf("write kernel device: %w", err)
	}
	if l.Type() != "wireguard" {
		return fmt.Errorf("write kernel device: link %s is a %s link now", k.name, l.Type())
	}
	if err := k.client.ConfigureDevice(k.name, cfg); err != nil {
		return fmt.Errorf("write kernel device: %w", err)
	}
	return nil
}

func (k *kernel) close() error { return k.client.Close() }

// stateFromWgtypes converts wgctrl's device.
func stateFromWgtypes(d *wgtypes.Device) state {
	s := state{PrivateKey: d.PrivateKey, ListenPort: d.ListenPort, FirewallMark: d.FirewallMark}
	for _, p := range d.Peers {
		ps := peerState{
			PublicKey:           p.PublicKey,
			PresharedKey:        p.PresharedKey,
			PersistentKeepalive: p.PersistentKeepaliveInterval,
			RxBytes:             p.ReceiveBytes,
			TxBytes:             p.TransmitBytes,
		}
		// The kernel says "never" as the epoch.
		if !p.LastHandshakeTime.IsZero() && !p.LastHandshakeTime.Equal(time.Unix(0, 0)) {
			ps.LastHandshake = p.LastHandshakeTime
		}
		if p.Endpoint != nil {
			ap := p.Endpoint.AddrPort()
			ps.Endpoint = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
		for _, n := range p.AllowedIPs {
			if pfx, ok := ipNetToPrefix(n); ok {
				ps.AllowedIPs = append(ps.AllowedIPs, pfx)
			}
		}
		s.Peers = append(s.Peers, ps)
	}
	return s
}
