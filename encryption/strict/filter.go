//go:build linux

package strict

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// DefaultMaxPrefixes is the default capacity of each family's map.
const DefaultMaxPrefixes = 262144

// Config says where a Filter lives.
type Config struct {
	// Device is the tunnel device to filter (tunnel.DefaultVXLANDevice or
	// tunnel.DefaultGeneveDevice). Required.
	Device string
	// NetNS is the network namespace of Device; 0 or -1 (netns.None())
	// means the caller's. The Filter does not close it, and it must stay
	// open while the Filter is used.
	NetNS netns.NsHandle
	// PinDir, when not empty, is a directory on a bpffs (the caller mounts
	// it, e.g. with bpf.EnsureBPFFS) of the Filter's own, created if
	// needed: the maps and both links are pinned there, so the filter
	// keeps dropping while no agent runs, and the next Open adopts them.
	// Empty: nothing is pinned, and Close detaches everything.
	PinDir string
	// MaxPrefixes is the capacity of each family's map when Open creates
	// it; 0 means DefaultMaxPrefixes. Adopted maps keep their capacity.
	MaxPrefixes int
	// Logger defaults to discarding.
	Logger *slog.Logger
}

// Stats are a Filter's counters.
type Stats struct {
	// IngressDrops and EgressDrops count the packets the programs dropped
	// (a GRO or GSO aggregate counts once), read from the kernel: they
	// include the drops of earlier agents as long as the counter map was
	// pinned, and those made while no agent ran.
	IngressDrops, EgressDrops uint64
	// Sets counts Set calls, Writes the map updates and deletes Set made
	// since Open, LastWrites those of the last Set (0 when it found the
	// maps converged).
	Sets, Writes, LastWrites uint64
	// Attaches counts links this Filter attached (rather than adopted),
	// Open's included: after Open, a rise means the device was recreated
	// and Set attached the programs to the new one.
	Attaches uint64
}

// Filter is the strict encryption filter on one device. Its methods are
// safe for concurrent use.
type Filter struct {
	cfg Config
	log *slog.Logger

	mu    sync.Mutex
	objs  *strictObjects // nil once closed
	maps  [2]lpmMap      // IPv4, IPv6
	links [2]link.Link   // by direction; nil when not attached
	// current reports, by direction, whether links[i] runs this Filter's
	// program: attached by it, or adopted and updated by Open.
	current [2]bool
	stats   Stats
}

// Open loads the programs and attaches them to cfg.Device, at TCX ingress
// and egress, ahead of programs attached there before. With a PinDir it
// adopts what an earlier Open pinned there: the maps (entries and counters
// carry over) and the links, which are switched to the newly loaded
// programs in place (link update: the device is never without a filter)
// when they are still attached to cfg.Device. A pinned link whose device
// is gone (deleted, or deleted and recreated) is replaced by a new link.
//
// A missing device is an error that names it and matches ErrNoDevice.
func Open(cfg Config) (_ *Filter, err error) {
	if cfg.Device == "" {
		return nil, errors.New("strict: config needs a Device")
	}
	if len(cfg.Device) > unix.IFNAMSIZ-1 {
		return nil, fmt.Errorf("strict: device name %q longer than %d bytes", cfg.Device, unix.IFNAMSIZ-1)
	}
	if cfg.MaxPrefixes < 0 || cfg.MaxPrefixes > 1<<24 {
		return nil, fmt.Errorf("strict: MaxPrefixes %d out of range [0, %d]", cfg.MaxPrefixes, 1<<24)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	f := &Filter{cfg: cfg, log: cfg.Logger.With("device", cfg.Device)}
	defer func() {
		if err != nil {
			f.Close() // what is pinned stays
		}
	}()

	// The device first: without it there is nothing to do.
	ifindex, err := f.deviceIndex()
	if err != nil {
		return nil, err
	}
	if cfg.PinDir != "" {
		if err := preparePinDir(cfg.PinDir); err != nil {
			return nil, err
		}
	}
	if err := f.load(); err != nil {
		return nil, err
	}
	if cfg.PinDir != "" {
		if err := f.adoptLinks(ifindex); err != nil {
			return nil, err
		}
	}
	if err := f.ensureLinks(ifindex); err != nil {
		return nil, err
	}
	return f, nil
}

func preparePinDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("strict: create pin dir: %w", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("strict: statfs pin dir %s: %w", dir, err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("strict: pin dir %s is not on a bpffs (mount one at /sys/fs/bpf: bpf.EnsureBPFFS)", dir)
	}
	return nil
}

// mapNames are the maps of the object, which are also their pin names.
var mapNames = []string{strictMapTrellisStrict4, strictMapTrellisStrict6, strictMapTrellisSdrops}

// load loads the programs, creating their maps or adopting those pinned
// in PinDir, and pins the maps it created.
func (f *Filter) load() error {
	// A no-op on kernels that account BPF memory to the cgroup (5.11+).
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("strict: load: %w", err)
	}
	spec, err := loadStrict()
	if err != nil {
		return fmt.Errorf("strict: load: %w", err)
	}
	if n := f.cfg.MaxPrefixes; n != 0 {
		spec.Maps[strictMapTrellisStrict4].MaxEntries = uint32(n)
		spec.Maps[strictMapTrellisStrict6].MaxEntries = uint32(n)
	}
	replacements := map[string]*ebpf.Map{}
	defer func() {
		for _, m := range replacements {
			m.Close() // LoadAndAssign cloned them.
		}
	}()
	if f.cfg.PinDir != "" {
		for _, name := range mapNames {
			path := filepath.Join(f.cfg.PinDir, name)
			m, err := ebpf.LoadPinnedMap(path, nil)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				return fmt.Errorf("strict: adopt pinned map %s: %w", path, err)
			}
			ms := spec.Maps[name]
			if ms.Type == ebpf.LPMTrie {
				ms.MaxEntries = m.MaxEntries()
			}
			if err := ms.Compatible(m); err != nil {
				m.Close()
				return fmt.Errorf("strict: adopt pinned map %s: %w (pinned by an incompatible version: run Uninstall on %s)", path, err, f.cfg.PinDir)
			}
			replacements[name] = m
		}
	}
	objs := &strictObjects{}
	if err := spec.LoadAndAssign(objs, &ebpf.CollectionOptions{MapReplacements: replacements}); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return fmt.Errorf("strict: load programs: %+v", verr)
		}
		return fmt.Errorf("strict: load programs: %w", err)
	}
	f.objs = objs
	f.maps = [2]lpmMap{
		&kernelLPM{m: objs.TrellisStrict4, name: strictMapTrellisStrict4, addrLen: 4},
		&kernelLPM{m: objs.TrellisStrict6, name: strictMapTrellisStrict6, addrLen: 16},
	}
	if f.cfg.PinDir == "" {
		return nil
	}
	for _, name := range mapNames {
		if _, ok := replacements[name]; ok {
			f.log.Debug("strict: adopted pinned map", "map", name)
			continue
		}
		path := filepath.Join(f.cfg.PinDir, name)
		if err := f.mapByName(name).Pin(path); err != nil {
			return fmt.Errorf("strict: pin map %s: %w", path, err)
		}
	}
	return nil
}

func (f *Filter) mapByName(name string) *ebpf.Map {
	switch name {
	case strictMapTrellisStrict4:
		return f.objs.TrellisStrict4
	case strictMapTrellisStrict6:
		return f.objs.TrellisStrict6
	case strictMapTrellisSdrops:
		return f.objs.TrellisSdrops
	}
	return nil
}

// Set converges both maps onto prefixes, the full set of pod CIDRs that
// must be reached encrypted (IPv4 and IPv6; masked, duplicates merged): it
// adds the missing prefixes before it deletes the stale ones, and writes
// nothing when the maps already hold exactly that set (Stats.LastWrites ==
// 0); entries someone else added or removed are repaired. Invalid prefixes
// and a set that does not fit (ErrMapFull) are refused whole, before
// anything is written. When a put fails, Set does not delete (the filter
// errs on the side of dropping) and returns the error.
//
// Set also re-attaches a program whose link is no longer on the device
// named Config.Device (the device was deleted and recreated, say by the
// tunnel's drift repair): call it after the tunnel's Set. A missing device
// does not keep Set from converging the maps; the error names it.
func (f *Filter) Set(ctx context.Context, prefixes []netip.Prefix) error {
	if f == nil {
		return ErrClosed
	}
	v4, v6, err := normalize(prefixes)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.objs == nil {
		return ErrClosed
	}
	f.stats.Sets++
	var errs []error
	if ifindex, err := f.deviceIndex(); err != nil {
		errs = append(errs, err)
	} else if err := f.ensureLinks(ifindex); err != nil {
		errs = append(errs, err)
	}
	writes, err := converge(ctx, f.maps[:], [][]netip.Prefix{v4, v6})
	f.stats.Writes += uint64(writes)
	f.stats.LastWrites = uint64(writes)
	if writes > 0 {
		f.log.Info("strict: prefixes set", "ipv4", len(v4), "ipv6", len(v6), "writes", writes)
	}
	return errors.Join(append(errs, err)...)
}

// Prefixes returns what the maps hold, IPv4 first, each family sorted.
func (f *Filter) Prefixes() ([]netip.Prefix, error) {
	if f == nil {
		return nil, ErrClosed
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.objs == nil {
		return nil, ErrClosed
	}
	var out []netip.Prefix
	for _, m := range f.maps {
		have, err := m.entries()
		if err != nil {
			return nil, err
		}
		var ps []netip.Prefix
		for p := range have {
			ps = append(ps, p)
		}
		out = append(out, sortPrefixes(ps)...)
	}
	return out, nil
}

// Stats returns the counters; the drop counters are read from the kernel.
func (f *Filter) Stats() (Stats, error) {
	if f == nil {
		return Stats{}, ErrClosed
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.objs == nil {
		return Stats{}, ErrClosed
	}
	s := f.stats
	for dir, p := range []*uint64{&s.IngressDrops, &s.EgressDrops} {
		var perCPU []uint64
		if err := f.objs.TrellisSdrops.Lookup(uint32(dir), &perCPU); err != nil {
			return Stats{}, fmt.Errorf("strict: read %s drop counter: %w", directions[dir].name, err)
		}
		for _, n := range perCPU {
			*p += n
		}
	}
	return s, nil
}

// Close releases this process's handles. Pinned maps and links stay: the
// device keeps its filter until Remove or Uninstall. Without a PinDir,
// Close detaches the programs and frees the maps. Close on nil and a
// second Close are fine.
func (f *Filter) Close() error {
	if f == nil {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closeLocked()
}

func (f *Filter) closeLocked() error {
	var errs []error
	for d, l := range f.links {
		if l != nil {
			if err := l.Close(); err != nil {
				errs = append(errs, fmt.Errorf("strict: close %s link: %w", directions[d].name, err))
			}
			f.links[d], f.current[d] = nil, false
		}
	}
	if f.objs != nil {
		if err := f.objs.Close(); err != nil {
			errs = append(errs, fmt.Errorf("strict: close objects: %w", err))
		}
		f.objs = nil
	}
	return errors.Join(errs...)
}

// Remove detaches both programs, removes every pin of the Filter (and
// PinDir, when that leaves it empty) and closes the Filter: strict mode is
// off. Remove on nil is fine.
func (f *Filter) Remove() error {
	if f == nil {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var errs []error
	for d, l := range f.links {
		if l == nil {
			continue
		}
		if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("strict: detach %s link: %w", directions[d].name, err))
		}
	}
	errs = append(errs, f.closeLocked())
	if f.cfg.PinDir != "" {
		errs = append(errs, Uninstall(f.cfg.PinDir))
	}
	f.log.Info("strict: filter removed")
	return errors.Join(errs...)
}

// Uninstall detaches the links pinned in pinDir and removes every pin
// this package makes there, then pinDir itself if that leaves it empty. A
// missing pinDir is not an error, so Uninstall also cleans up after a
// crashed agent. It needs no device and no namespace.
func Uninstall(pinDir string) error {
	if _, err := os.Stat(pinDir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	for _, d := range directions {
		for _, path := range []string{linkPinPath(pinDir, d), linkPinPath(pinDir, d) + tmpSuffix} {
			if err := detachPinned(path); err != nil {
				errs = append(errs, fmt.Errorf("strict: uninstall: %w", err))
			}
		}
	}
	for _, name := range mapNames {
		if err := os.Remove(filepath.Join(pinDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("strict: uninstall: unpin map: %w", err))
		}
	}
	if err := os.Remove(pinDir); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOTEMPTY) {
		errs = append(errs, fmt.Errorf("strict: uninstall: %w", err))
	}
	return errors.Join(errs...)
}

// detachPinned detaches the link pinned at path, if any, and removes the
// pin.
func detachPinned(path string) error {
	l, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		// Not loadable as a link: drop the pin anyway.
		if rmErr := os.Remove(path); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
			return fmt.Errorf("load pinned link %s: %w", path, err)
		}
		return nil
	}
	defer l.Close()
	var errs []error
	// Detach first: another process may still hold the link open.
	if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
		errs = append(errs, fmt.Errorf("detach link %s: %w", path, err))
	}
	if err := l.Unpin(); err != nil {
		errs = append(errs, fmt.Errorf("unpin link %s: %w", path, err))
	}
	return errors.Join(errs...)
}
