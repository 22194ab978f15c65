package identity

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"maps"
	"slices"
	"strings"
	"sync"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// labelSet is a validated label set with its canonical form and hash.
type labelSet struct {
	labels    map[string]string // a private copy
	canonical string
	hash      string // hex SHA-256 of canonical: the index key's last segment
	seed      uint64 // from the hash: where the free-id probe starts
}

// canonicalLabels is the label set's one spelling: "k=v" pairs sorted by
// key and joined with ';'. It is unambiguous for valid labels, because
// neither label keys nor label values may contain '=' or ';'.
func canonicalLabels(labels map[string]string) string {
	var b strings.Builder
	for i, k := range slices.Sorted(maps.Keys(labels)) {
		if i > 0 {
			b.WriteByte(';')
		}
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(labels[k])
	}
	return b.String()
}

// newLabelSet validates labels as the labels of a v1.Identity of this
// cluster (errors match v1.ErrInvalid) and computes their canonical form.
func (a *Allocator) newLabelSet(labels map[string]string) (*labelSet, error) {
	probe := v1.Identity{Cluster: a.cfg.Cluster, ID: v1.MakeIdentity(a.cfg.ClusterID, a.cfg.MinLocalID), Labels: labels}
	if err := probe.Validate(); err != nil {
		return nil, err
	}
	c := canonicalLabels(labels)
	sum := sha256.Sum256([]byte(c))
	return &labelSet{
		labels:    maps.Clone(labels),
		canonical: c,
		hash:      hex.EncodeToString(sum[:]),
		seed:      binary.BigEndian.Uint64(sum[:8]),
	}, nil
}

// String is the canonical form in braces, cut for logs and errors.
func (ls *labelSet) String() string { return "{" + cut(ls.canonical) + "}" }

func sortIdentities(ids []v1.Identity) {
	slices.SortFunc(ids, func(x, y v1.Identity) int {
		switch {
		case x.ID < y.ID:
			return -1
		case x.ID > y.ID:
			return 1
		}
		return 0
	})
}

// idView is this replica's idea of which local ids are taken. It is only
// a hint for choosing a candidate: the allocation transaction is the
// authority, and a conflict marks the id taken. It is loaded on first use
// and replaced by every GC pass, which lists all identities anyway.
type idView struct {
	min, max uint16 // the configured local range; set once by New

	mu     sync.Mutex
	loaded bool
	used   [1 << 16 / 64]uint64
}

func (v *idView) isLoaded() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.loaded
}

// replace installs the used set from a listing.
func (v *idView) replace(used []uint16) {
	v.mu.Lock()
	defer v.mu.Unlock()
	clear(v.used[:])
	for _, l := range used {
		v.used[l/64] |= 1 << (l % 64)
	}
	v.loaded = true
}

func (v *idView) mark(l uint16) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.used[l/64] |= 1 << (l % 64)
}

func (v *idView) unmark(l uint16) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.used[l/64] &^= 1 << (l % 64)
}

// pick returns a local id believed free and marks it taken, so that
// concurrent allocations in this replica choose different ids. prefer,
// when nonzero and in range, is returned whatever the view says: it is the
// id a reference had before its identity was collected, which the view may
// not know yet is free. Otherwise pick probes upwards from a position given
// by seed, wrapping around the range.
func (v *idView) pick(seed uint64, prefer uint16) (uint16, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	free := func(l uint16) bool { return v.used[l/64]&(1<<(l%64)) == 0 }
	if prefer >= v.min && prefer <= v.max && prefer != 0 {
		v.used[prefer/64] |= 1 << (prefer % 64)
		return prefer, true
	}
	n := uint64(v.max) - uint64(v.min) + 1
	start := seed % n
	for i := uint64(0); i < n; i++ {
		l := uint16(uint64(v.min) + (start+i)%n)
		if v.used[l/64] == ^uint64(0) {
			// Skip the rest of a full word, but not past the end of
			// the range, where the probe wraps to min.
			i += min(63-uint64(l%64), uint64(v.max)-uint64(l))
			continue
		}
		if free(l) {
			v.used[l/64] |= 1 << (l % 64)
			return l, true
		}
	}
	return 0, false
}
