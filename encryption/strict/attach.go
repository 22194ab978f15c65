//go:build linux

package strict

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/trellis-mesh/trellis/internal/nsthread"
)

// direction is one hook of the filter.
type direction struct {
	name   string // also the link's pin name, "link_" + name
	attach ebpf.AttachType
	prog   func(*strictObjects) *ebpf.Program
}

// directions, indexed by the C program's DIR_INGRESS (0) and DIR_EGRESS (1):
// also the keys of the drop counter map.
var directions = [2]direction{
	{"ingress", ebpf.AttachTCXIngress, func(o *strictObjects) *ebpf.Program { return o.StrictIngress }},
	{"egress", ebpf.AttachTCXEgress, func(o *strictObjects) *ebpf.Program { return o.StrictEgress }},
}

// tmpSuffix names the pin a new link takes before it is renamed over the
// old link's pin, so that the path always holds a link. One left behind by
// a crash is detached by the next Open or by Uninstall. (Not ".new": bpffs
// refuses names with a dot, EPERM.)
const tmpSuffix = "_new"

func linkPinPath(dir string, d direction) string { return filepath.Join(dir, "link_"+d.name) }

// inNS runs fn on a thread in Config.NetNS (or the caller's namespace):
// interface indexes, TCX attachment and queries name devices of the
// calling thread's namespace.
func (f *Filter) inNS(fn func() error) error {
	if f.cfg.NetNS > 0 {
		return nsthread.Do(f.cfg.NetNS, fn)
	}
	return fn()
}

// deviceIndex returns the index of Config.Device in Config.NetNS.
func (f *Filter) deviceIndex() (int, error) {
	var idx int
	err := f.inNS(func() error {
		l, err := netlink.LinkByName(f.cfg.Device)
		if err != nil {
			return err
		}
		idx = l.Attrs().Index
		return nil
	})
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		return 0, fmt.Errorf("strict: device %s: %w", f.cfg.Device, ErrNoDevice)
	case err != nil:
		return 0, fmt.Errorf("strict: find device %s: %w", f.cfg.Device, err)
	}
	return idx, nil
}

// attachedLinks returns the IDs of the links attached at d on the device
// with index ifindex in Config.NetNS.
func (f *Filter) attachedLinks(ifindex int, d direction) ([]link.ID, error) {
	var res *link.QueryResult
	err := f.inNS(func() (err error) {
		res, err = link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: d.attach})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("strict: query tcx %s programs of %s: %w", d.name, f.cfg.Device, err)
	}
	var ids []link.ID
	for _, p := range res.Programs {
		if id, ok := p.LinkID(); ok {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

func linkID(l link.Link) (link.ID, error) {
	info, err := l.Info()
	if err != nil {
		return 0, err
	}
	return info.ID, nil
}

// adoptLinks takes over the links pinned in PinDir that are attached to
// the device ifindex, switching them to this Filter's programs. Pinned
// links that are not (their device is gone) stay in f.links for
// ensureLinks to replace. Leftover temporary pins are detached.
func (f *Filter) adoptLinks(ifindex int) error {
	for i, d := range directions {
		path := linkPinPath(f.cfg.PinDir, d)
		if err := detachPinned(path + tmpSuffix); err != nil {
			return fmt.Errorf("strict: remove leftover: %w", err)
		}
		old, err := link.LoadPinnedLink(path, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("strict: load pinned %s link %s: %w", d.name, path, err)
		}
		f.links[i] = old
		attached, err := f.attachedLinks(ifindex, d)
		if err != nil {
			return err
		}
		id, err := linkID(old)
		if err != nil || !slices.Contains(attached, id) {
			f.log.Info("strict: pinned link is no longer on the device, attaching anew", "direction", d.name, "link", id)
			continue
		}
		if err := old.Update(d.prog(f.objs)); err != nil {
			f.log.Warn("strict: pinned link refused the new program, attaching anew", "direction", d.name, "link", id, "err", err)
			continue
		}
		f.current[i] = true
		f.log.Debug("strict: adopted pinned link", "direction", d.name, "link", id)
	}
	return nil
}

// ensureLinks makes sure that each direction's link runs this Filter's
// program and is attached to the device ifindex. Where not (no link yet, a
// pinned link whose device is gone, one that refused the update), it
// attaches a new link at the head of the device's TCX chain, pins it in
// place of the old one, and detaches and releases the old one.
func (f *Filter) ensureLinks(ifindex int) error {
	for i, d := range directions {
		if l := f.links[i]; l != nil && f.current[i] {
			attached, err := f.attachedLinks(ifindex, d)
			if err != nil {
				return err
			}
			if id, err := linkID(l); err == nil && slices.Contains(attached, id) {
				continue
			}
			f.log.Warn("strict: link is no longer on the device (recreated?), attaching anew", "direction", d.name)
		}
		if err := f.attach(i, ifindex); err != nil {
			return err
		}
	}
	return nil
}

// attach attaches a new link for directions[i] to the device ifindex and
// puts it in place of f.links[i].
func (f *Filter) attach(i, ifindex int) error {
	d := directions[i]
	prog := d.prog(f.objs)
	var nl link.Link
	err := f.inNS(func() (err error) {
		nl, err = link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: d.attach, Anchor: link.Head()})
		return err
	})
	if err != nil {
		return fmt.Errorf("strict: attach tcx %s to %s (index %d): %w", d.name, f.cfg.Device, ifindex, err)
	}
	if f.cfg.PinDir != "" {
		// Pin beside the old pin, then rename over it: the path never
		// lacks a link, so a crash leaves at worst both attached.
		path := linkPinPath(f.cfg.PinDir, d)
		if err := nl.Pin(path + tmpSuffix); err != nil {
			nl.Close()
			return fmt.Errorf("strict: pin %s link: %w", d.name, err)
		}
		if err := os.Rename(path+tmpSuffix, path); err != nil {
			nl.Unpin()
			nl.Close()
			return fmt.Errorf("strict: pin %s link: %w", d.name, err)
		}
	}
	if old := f.links[i]; old != nil {
		// Dead (its device is gone) or running an older program: either
		// way it must not stay attached beside the new one.
		if err := old.Detach(); err != nil {
			f.log.Debug("strict: detach replaced link", "direction", d.name, "err", err)
		}
		old.Close()
	}
	f.links[i] = nl
	f.current[i] = true
	f.stats.Attaches++
	id, _ := linkID(nl)
	f.log.Info("strict: attached", "direction", d.name, "ifindex", ifindex, "link", id)
	return nil
}
