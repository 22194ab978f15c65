package strict

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
)

// ErrMapFull is what Set returns (wrapped, naming the map) when a family's
// prefixes do not fit its map. Nothing is written then.
var ErrMapFull = errors.New("map full")

// ErrNoDevice is what Open and Set return (wrapped, naming the device)
// when Config.Device does not exist in Config.NetNS.
var ErrNoDevice = errors.New("no such device")

// ErrClosed is what the methods of a closed Filter return.
var ErrClosed = errors.New("strict: filter closed")

// normalize returns the valid prefixes of in, masked, sorted and without
// duplicates, split by family, and an error naming the invalid ones. An
// IPv4-mapped IPv6 prefix of at least 96 bits is taken as the IPv4 prefix
// it maps, as the tunnel package takes a pod CIDR.
func normalize(in []netip.Prefix) (v4, v6 []netip.Prefix, err error) {
	var bad []string
	for _, p := range in {
		if !p.IsValid() {
			bad = append(bad, p.String())
			continue
		}
		p = p.Masked()
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		if p.Addr().Is4() {
			v4 = append(v4, p)
		} else {
			v6 = append(v6, p)
		}
	}
	if len(bad) > 0 {
		return nil, nil, fmt.Errorf("strict: invalid prefixes %v", bad)
	}
	return sortPrefixes(v4), sortPrefixes(v6), nil
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

func sortPrefixes(ps []netip.Prefix) []netip.Prefix {
	slices.SortFunc(ps, comparePrefix)
	return slices.Compact(ps)
}

// plan is what converging one map takes, in this order: delete early,
// put, delete late.
type plan struct {
	// early are stale prefixes that overlap no wanted prefix, deleted
	// first to make room when the peak would not fit. Deleting them
	// stops dropping only traffic the wanted state does not drop.
	early []netip.Prefix
	// put are the wanted prefixes the map lacks or holds with another
	// value.
	put []netip.Prefix
	// late are the other stale prefixes, deleted once every put is in, so
	// that a prefix replaced by an overlapping one (a /24 by the /23 that
	// holds it, say) is covered throughout.
	late []netip.Prefix
}

func (p plan) writes() int { return len(p.early) + len(p.put) + len(p.late) }

// valueMember is the value of every entry of the LPM maps.
const valueMember uint32 = 1

// makePlan diffs have (the map's entries and their values) against want
// (normalized: masked, sorted, unique) for a map of the given capacity.
// It refuses, with ErrMapFull, a want larger than the map, and a change
// whose peak (the map between the puts and the late deletes) would not fit
// even with the early deletes.
func makePlan(name string, have map[netip.Prefix]uint32, want []netip.Prefix, capacity int) (plan, error) {
	var p plan
	if len(want) > capacity {
		return p, fmt.Errorf("strict: %s: %d prefixes, room for %d: %w", name, len(want), capacity, ErrMapFull)
	}
	wanted := make(map[netip.Prefix]bool, len(want))
	added := 0
	for _, w := range want {
		wanted[w] = true
		v, ok := have[w]
		if !ok {
			added++
		}
		if !ok || v != valueMember {
			p.put = append(p.put, w)
		}
	}
	var stale []netip.Prefix
	for h := range have {
		if !wanted[h] {
			stale = append(stale, h)
		}
	}
	slices.SortFunc(stale, comparePrefix)
	if len(have)+added <= capacity {
		p.late = stale
		return p, nil
	}
	for _, s := range stale {
		if overlapsAny(s, want) {
			p.late = append(p.late, s)
		} else {
			p.early = append(p.early, s)
		}
	}
	if peak := len(have) + added - len(p.early); peak > capacity {
		return plan{}, fmt.Errorf("strict: %s: changing to %d prefixes needs room for %d at once (stale prefixes overlap new ones and go last), room for %d: %w",
			name, len(want), peak, capacity, ErrMapFull)
	}
	return p, nil
}

// overlapsAny reports whether p overlaps a prefix of sorted, which is
// sorted by comparePrefix and of p's family.
func overlapsAny(p netip.Prefix, sorted []netip.Prefix) bool {
	// A prefix that holds p is one of p's supernets.
	for bits := p.Bits(); bits >= 0; bits-- {
		super := netip.PrefixFrom(p.Addr(), bits).Masked()
		if _, ok := slices.BinarySearchFunc(sorted, super, comparePrefix); ok {
			return true
		}
	}
	// A prefix p holds starts at an address inside p, and the first
	// prefix at or after p's first address is such a one if any is.
	i, _ := slices.BinarySearchFunc(sorted, p, comparePrefix)
	return i < len(sorted) && p.Contains(sorted[i].Addr())
}

// lpmMap is one family's map as the reconciler sees it: the kernel's
// (kernelLPM) or a fake in tests.
type lpmMap interface {
	// mapName names the map in errors.
	mapName() string
	// capacity is the map's max_entries.
	capacity() int
	// entries reads the whole map.
	entries() (map[netip.Prefix]uint32, error)
	put(p netip.Prefix) error
	delete(p netip.Prefix) error
}

// converge makes each maps[i] hold exactly want[i] (normalized), planning
// every map before it writes any, and returns the number of writes it
// made. Within a map it deletes early, puts, then deletes late; after a
// failed put it deletes nothing more, so a prefix being replaced stays
// until its replacement is in.
func converge(ctx context.Context, maps []lpmMap, want [][]netip.Prefix) (int, error) {
	plans := make([]plan, len(maps))
	for i, m := range maps {
		have, err := m.entries()
		if err != nil {
			return 0, err
		}
		if plans[i], err = makePlan(m.mapName(), have, want[i], m.capacity()); err != nil {
			return 0, err
		}
	}
	writes := 0
	var errs []error
	for i, m := range maps {
		p := plans[i]
		for _, pfx := range p.early {
			if err := ctx.Err(); err != nil {
				return writes, err
			}
			writes++
			if err := m.delete(pfx); err != nil {
				errs = append(errs, err)
			}
		}
		putFailed := false
		for _, pfx := range p.put {
			if err := ctx.Err(); err != nil {
				return writes, err
			}
			writes++
			if err := m.put(pfx); err != nil {
				errs = append(errs, err)
				putFailed = true
			}
		}
		if putFailed {
			errs = append(errs, fmt.Errorf("strict: %s: stale prefixes %v kept after a failed put", m.mapName(), p.late))
			continue
		}
		for _, pfx := range p.late {
			if err := ctx.Err(); err != nil {
				return writes, err
			}
			writes++
			if err := m.delete(pfx); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return writes, errors.Join(errs...)
}
