//go:build linux

package bpf

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Config says where an LB lives. The zero value gives maps that are
// neither pinned nor attached (useful for tests and benchmarks).
type Config struct {
	// PinDir is the bpffs directory for this scope's pins, usually
	// PinDir(scope) = /sys/fs/bpf/trellis/<scope>. Empty: nothing is
	// pinned or adopted, and everything goes away at Close.
	PinDir string
	// CgroupPath is the cgroup v2 directory to attach to. Empty: the
	// programs are loaded but not attached.
	CgroupPath string
	// Sizes of maps that Open creates (not the adopted ones).
	Sizes MapSizes
}

// LB is an attached socket load balancer and the reconciler for its maps.
type LB struct {
	cfg   Config
	objs  *Objects
	links *Links
	rec   *reconciler
	// AdoptedLinks lists the hooks whose pinned links were taken over.
	adoptedLinks []string
}

// Open loads the load balancer and attaches it to cfg.CgroupPath,
// adopting what an earlier Open pinned in cfg.PinDir:
//
//   - pinned maps are reused through MapReplacements, so their entries
//     (services, backends, reverse translations) carry over;
//   - a pinned link that is attached to cfg.CgroupPath is loaded with
//     link.LoadPinnedLink and switched to the newly loaded program with
//     link.Update, an atomic replacement: there is no moment without a
//     program. A pinned link attached elsewhere is replaced by a new link
//     on cfg.CgroupPath (new one first, then the old one detaches).
//
// With a PinDir, Open mounts bpffs at /sys/fs/bpf if needed.
func Open(cfg Config) (_ *LB, err error) {
	if cfg.PinDir != "" {
		if err := EnsureBPFFS(); err != nil {
			return nil, err
		}
	}
	objs, err := Load(LoadOptions{PinDir: cfg.PinDir, Sizes: cfg.Sizes})
	if err != nil {
		return nil, err
	}
	lb := &LB{
		cfg:  cfg,
		objs: objs,
		rec:  newReconciler(objs.Services, objs.Slots, objs.Backends),
	}
	defer func() {
		if err != nil {
			lb.Close()
		}
	}()
	if cfg.CgroupPath == "" {
		return lb, nil
	}
	if cfg.PinDir == "" {
		if lb.links, err = objs.AttachCgroup(cfg.CgroupPath); err != nil {
			return nil, err
		}
		return lb, nil
	}
	if err := lb.adoptLinks(); err != nil {
		return nil, err
	}
	return lb, nil
}

func (lb *LB) adoptLinks() error {
	wantID, err := cgroupID(lb.cfg.CgroupPath)
	if err != nil {
		return fmt.Errorf("bpf: open: %w", err)
	}
	lb.links = &Links{}
	for _, h := range hooks {
		path := linkPinPath(lb.cfg.PinDir, h)
		prog := h.prog(lb.objs)
		old, err := link.LoadPinnedLink(path, nil)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("bpf: open: load pinned %s link %s: %w", h.name, path, err)
		}
		if old != nil {
			if linkOnCgroup(old, wantID, h.attach) {
				if err := old.Update(prog); err == nil {
					*h.link(lb.links) = old
					lb.adoptedLinks = append(lb.adoptedLinks, h.name)
					continue
				}
				// Fall through: replace the link that refused the update.
			}
		}
		// Attach the new link before the old one goes, so the cgroup is
		// never without a program.
		nl, err := link.AttachCgroup(link.CgroupOptions{Path: lb.cfg.CgroupPath, Attach: h.attach, Program: prog})
		if err != nil {
			if old != nil {
				old.Close()
			}
			return fmt.Errorf("bpf: attach %s to cgroup %s: %w", h.name, lb.cfg.CgroupPath, err)
		}
		if old != nil {
			old.Unpin()
			old.Detach()
			old.Close()
		}
		if err := nl.Pin(path); err != nil {
			nl.Close()
			return fmt.Errorf("bpf: pin %s link: %w", h.name, err)
		}
		*h.link(lb.links) = nl
	}
	return nil
}

// linkOnCgroup reports whether l is a cgroup link of the given attach type
// on the cgroup with the given ID.
func linkOnCgroup(l link.Link, cgroupID uint64, attach ebpf.AttachType) bool {
	info, err := l.Info()
	if err != nil {
		return false
	}
	cg := info.Cgroup()
	return cg != nil && cg.CgroupId == cgroupID && ebpf.AttachType(cg.AttachType) == attach
}

// Set converges the maps onto services, the full desired state: see
// reconcile.go for the order of writes. Invalid input is rejected as a
// whole before anything is written. Set may be called any number of times
// with the same input; the calls after the first write nothing unless
// someone else changed the maps, in which case Set repairs them.
func (lb *LB) Set(ctx context.Context, services []Service) error {
	return lb.rec.Set(ctx, services)
}

// Update converges like Set but trusts the maps to hold what the last
// successful Set or Update wrote, so it skips reading them back: cheap for
// frequent small changes. Call Set periodically to repair drift.
func (lb *LB) Update(ctx context.Context, services []Service) error {
	return lb.rec.Update(ctx, services)
}

// Stats returns counters of the reconciler.
func (lb *LB) Stats() Stats { return lb.rec.Stats() }

// Objects returns the loaded programs and maps. They belong to lb.
func (lb *LB) Objects() *Objects { return lb.objs }

// Links returns the attached links, nil when Config.CgroupPath was empty.
// They belong to lb.
func (lb *LB) Links() *Links { return lb.links }

// AdoptedLinks names the hooks whose pinned links Open took over (as
// opposed to attaching new ones).
func (lb *LB) AdoptedLinks() []string { return lb.adoptedLinks }

// Close releases this process's handles. Pinned maps and links stay: the
// datapath keeps working until Uninstall. Without a PinDir, Close detaches
// the programs and frees the maps. Close on nil and a second Close are
// fine; Close must not run concurrently with Set.
func (lb *LB) Close() error {
	if lb == nil {
		return nil
	}
	err := errors.Join(lb.links.Close(), lb.objs.Close())
	lb.links, lb.objs = nil, nil
	return err
}

// Uninstall detaches the links pinned in pinDir and removes every pin this
// package makes there, then the directory. A missing pinDir is not an
// error, so Uninstall also cleans up after a crashed agent.
func Uninstall(pinDir string) error {
	if _, err := os.Stat(pinDir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	for _, h := range hooks {
		path := linkPinPath(pinDir, h)
		l, err := link.LoadPinnedLink(path, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			// Not loadable as a link: drop the pin anyway.
			if rmErr := os.Remove(path); rmErr != nil {
				errs = append(errs, fmt.Errorf("bpf: uninstall: %s: %w", path, err))
			}
			continue
		}
		// Detach first: another process may still hold the link open.
		if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("bpf: uninstall: detach %s: %w", h.name, err))
		}
		if err := l.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("bpf: uninstall: unpin %s: %w", h.name, err))
		}
		l.Close()
	}
	for _, name := range mapNames {
		if err := os.Remove(filepath.Join(pinDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("bpf: uninstall: unpin map: %w", err))
		}
	}
	if err := os.Remove(pinDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("bpf: uninstall: %w", err))
	}
	return errors.Join(errs...)
}
