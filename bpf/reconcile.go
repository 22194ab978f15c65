//go:build linux

package bpf

// Design notes: the reconciler
//
// Set takes the full desired list of services and converges the three maps
// onto it. Each call reads the maps back (one batch lookup per chunk), so a
// Set also repairs entries someone else changed or removed; what the maps
// hold is the truth, and the reconciler keeps only its last ID allocation
// in memory to keep IDs stable when an entry was damaged.
//
// Writes happen in six phases, each one a batch, and every boundary
// between phases is a state a program may safely observe:
//
//  1. backends that are new or differ        (nothing points at them yet)
//  2. slots that are new or differ           (a changed slot < count swaps
//     one backend for another atomically; slots >= count are not read yet)
//  3. services that are new or differ        (the count flips here, with
//     the inline copies of slots [0, InlineSlots), which programs read
//     from the service value itself)
//  4. services no longer desired             (lookups stop matching)
//  5. slots no longer desired                (nothing reads them any more)
//  6. backends no longer referenced          (no slot points at them)
//
// So a program that reads count=n finds n written slots and each slot's
// backend, and the backends a service value inlines stay until a later
// phase-3 write has replaced that value. A shrinking service first moves
// surviving backends into the low slots (phase 2), then lowers the count
// (3), then drops the tail (5).
//
// IDs. Service IDs are keyed by ServiceKey and backend IDs by the whole
// Backend (IP, port, cluster): a backend whose cluster changes is a new
// backend. An ID keeps its owner across Set calls (from memory, or from the
// maps after an agent restart). A new owner gets the lowest ID that no map
// entry uses at the start of this Set, so an ID freed in phase 4-6 is not
// reused before the next Set: a program racing with phase 6 can never
// follow a stale slot to some other service's backend.
//
// Slots. Backends keep the slot they already occupy; new backends fill the
// holes. Removing one backend out of a hundred rewrites one slot.
//
// Capacity. A map holds at most its max_entries, and between phases 1-3
// and 4-6 the old and the new entries are both in it. Set checks that peak
// against each map's size before it writes anything, and refuses the whole
// state with ErrMapFull naming the map: a partial write would leave some
// services programmed from the new state and others from the old one.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
)

// Service is one frontend and its backends, as LB.Set wants it.
type Service struct {
	VIP   netip.Addr
	Port  uint16
	Proto Protocol
	// Backends in any order; duplicates are ignored. An empty list keeps
	// the service programmed with no backends: connect() to it fails with
	// EPERM.
	Backends []Backend
}

// Key returns the services-map key of s.
func (s Service) Key() ServiceKey {
	return ServiceKey{VIP: s.VIP.Unmap(), Port: s.Port, Proto: s.Proto}
}

// Stats counts what the reconciler did since Open.
type Stats struct {
	// Syncs counts Set calls that converged; SyncErrors those that failed.
	Syncs, SyncErrors uint64
	// MapWrites is Updates + Deletes: map entries created, replaced or
	// removed, over all three maps. A Set whose input matches the maps adds
	// nothing here.
	MapWrites uint64
	Updates   uint64
	Deletes   uint64
	// Services, Slots and Backends are the entry counts after the last Set.
	Services, Slots, Backends int
}

// table is what the reconciler needs from a map. The typed kernel maps
// implement it; tests use an in-memory fake.
type table[K comparable, V comparable] interface {
	Dump() (map[K]V, error)
	BatchUpdate(keys []K, values []V) error
	BatchDelete(keys []K) error
}

// sized is implemented by tables that hold a bounded number of entries
// (the kernel maps: max_entries).
type sized interface{ MaxEntries() uint32 }

// capacity is t's size, 0 when unbounded.
func capacity(t any) int {
	if s, ok := t.(sized); ok {
		return int(s.MaxEntries())
	}
	return 0
}

// ErrMapFull says a desired state does not fit in a map; Set wrote
// nothing.
var ErrMapFull = errors.New("map too small")

type reconciler struct {
	mu       sync.Mutex
	services table[ServiceKey, ServiceValue]
	slots    table[SlotKey, uint32]
	backends table[uint32, Backend]

	// Last allocation that converged.
	serviceIDs map[ServiceKey]uint32
	backendIDs map[beKey]uint32
	// mirror is what the maps hold after the last successful write, so
	// Update can plan without reading the maps back; nil after a failure
	// (the next call reads them).
	mirror *mapContents

	stats Stats
}

func newReconciler(services table[ServiceKey, ServiceValue], slots table[SlotKey, uint32], backends table[uint32, Backend]) *reconciler {
	return &reconciler{
		services:   services,
		slots:      slots,
		backends:   backends,
		serviceIDs: map[ServiceKey]uint32{},
		backendIDs: map[beKey]uint32{},
	}
}

func (r *reconciler) Stats() Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stats
}

// beKey identifies a backend inside the reconciler: raw IPv4 address,
// port, cluster ID. A flat array hashes much faster than Backend, whose
// netip.Addr carries a pointer.
type beKey [3]uint32

func keyOf(b Backend) beKey {
	a := b.IP.Unmap().As4()
	return beKey{binary.NativeEndian.Uint32(a[:]), uint32(b.Port), b.ClusterID}
}

func (k beKey) backend() Backend {
	var a [4]byte
	binary.NativeEndian.PutUint32(a[:], k[0])
	return Backend{IP: netip.AddrFrom4(a), Port: uint16(k[1]), ClusterID: k[2]}
}

// desiredService is a validated Service with its backends deduplicated.
type desiredService struct {
	key      ServiceKey
	backends []beKey
}

func validate(services []Service) ([]desiredService, int, error) {
	var errs []error
	seen := make(map[ServiceKey]bool, len(services))
	out := make([]desiredService, 0, len(services))
	total := 0
	for _, s := range services {
		k := s.Key()
		switch {
		case !k.VIP.Is4():
			errs = append(errs, fmt.Errorf("service %v: VIP must be IPv4", k))
			continue
		case k.Port == 0:
			errs = append(errs, fmt.Errorf("service %v: port 0", k))
			continue
		case k.Proto != TCP && k.Proto != UDP:
			errs = append(errs, fmt.Errorf("service %v: protocol must be tcp or udp", k))
			continue
		case seen[k]:
			errs = append(errs, fmt.Errorf("service %v: listed twice", k))
			continue
		}
		seen[k] = true
		d := desiredService{key: k, backends: make([]beKey, 0, len(s.Backends))}
		for _, b := range s.Backends {
			ip := b.IP.Unmap()
			if !ip.Is4() || b.Port == 0 {
				errs = append(errs, fmt.Errorf("service %v: backend %v: want an IPv4 address and a port", k, b))
				continue
			}
			d.backends = append(d.backends, keyOf(b))
		}
		// A service's count is 32 bits: the slots map's size is the limit
		// that applies, checked when planning.
		d.backends = dedupe(d.backends)
		total += len(d.backends)
		out = append(out, d)
	}
	return out, total, errors.Join(errs...)
}

// dedupe removes repeated keys in place, keeping the first of each.
func dedupe(keys []beKey) []beKey {
	if len(keys) <= 16 {
		out := keys[:0]
		for _, k := range keys {
			if !slices.Contains(out, k) {
				out = append(out, k)
			}
		}
		return out
	}
	seen := make(map[beKey]struct{}, len(keys))
	out := keys[:0]
	for _, k := range keys {
		if _, ok := seen[k]; !ok {
			seen[k] = struct{}{}
			out = append(out, k)
		}
	}
	return out
}

// idAllocator hands out the lowest IDs >= 1 that are not taken.
type idAllocator struct {
	taken map[uint32]struct{}
	next  uint32
}

func (a *idAllocator) alloc() (uint32, error) {
	for {
		a.next++
		if a.next == 0 {
			return 0, errors.New("out of IDs")
		}
		if _, ok := a.taken[a.next]; !ok {
			a.taken[a.next] = struct{}{}
			return a.next, nil
		}
	}
}

// plan is the set of writes one Set performs, phase by phase.
type plan struct {
	backendUpd map[uint32]Backend
	slotUpd    map[SlotKey]uint32
	serviceUpd map[ServiceKey]ServiceValue
	serviceDel []ServiceKey
	slotDel    []SlotKey
	backendDel []uint32
	serviceIDs map[ServiceKey]uint32
	backendIDs map[beKey]uint32
	nServices  int
	nSlots     int
	nBackends  int
}

// mapContents is the content of the three maps.
type mapContents struct {
	services map[ServiceKey]ServiceValue
	slots    map[SlotKey]uint32
	backends map[uint32]Backend
}

// Set converges the maps, reading them back first so that anything
// changed behind the reconciler's back is repaired.
func (r *reconciler) Set(ctx context.Context, services []Service) error {
	return r.converge(ctx, services, false)
}

// Update converges the maps like Set but plans against what the last
// successful write left in them, without reading them back: the cheap path
// for frequent small changes. A periodic Set repairs drift.
func (r *reconciler) Update(ctx context.Context, services []Service) error {
	return r.converge(ctx, services, true)
}

func (r *reconciler) converge(ctx context.Context, services []Service, trustMirror bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	err := r.set(ctx, services, trustMirror)
	if err != nil {
		r.stats.SyncErrors++
		return err
	}
	r.stats.Syncs++
	return nil
}

func (r *reconciler) set(ctx context.Context, services []Service, trustMirror bool) error {
	desired, total, err := validate(services)
	if err != nil {
		return fmt.Errorf("bpf: set services: %w", err)
	}
	cur := r.mirror
	if !trustMirror || cur == nil {
		if cur, err = r.dump(); err != nil {
			return fmt.Errorf("bpf: set services: %w", err)
		}
	}
	r.mirror = nil
	p, err := r.plan(desired, total, cur.services, cur.slots, cur.backends)
	if err != nil {
		return fmt.Errorf("bpf: set services: %w", err)
	}
	if err := r.fits(p, cur); err != nil {
		return fmt.Errorf("bpf: set services: %w", err)
	}
	if err := r.apply(ctx, p); err != nil {
		return fmt.Errorf("bpf: set services: %w", err)
	}
	r.mirror = cur.after(p)
	r.serviceIDs = p.serviceIDs
	r.backendIDs = p.backendIDs
	r.stats.Services, r.stats.Slots, r.stats.Backends = p.nServices, p.nSlots, p.nBackends
	return nil
}

// fits checks that each map can hold what it holds now plus the entries
// the plan adds, which is its size between the phases that add and the
// phases that delete.
func (r *reconciler) fits(p *plan, cur *mapContents) error {
	var errs []error
	check := func(name string, size, now, added, want int) {
		if size > 0 && now+added > size {
			errs = append(errs, fmt.Errorf("%w: the %s map holds %d entries; this state needs %d, and %d while the %d entries it replaces are still in place (maps keep the size they were created with: an agent started after `trellis agent --uninstall` creates them at the current default size)",
				ErrMapFull, name, size, want, now+added, now+added-want))
		}
	}
	check("services", capacity(r.services), len(cur.services), countNew(p.serviceUpd, cur.services), p.nServices)
	check("slots", capacity(r.slots), len(cur.slots), countNew(p.slotUpd, cur.slots), p.nSlots)
	check("backends", capacity(r.backends), len(cur.backends), countNew(p.backendUpd, cur.backends), p.nBackends)
	return errors.Join(errs...)
}

// countNew counts the keys of upd that cur does not have.
func countNew[K comparable, V1, V2 any](upd map[K]V1, cur map[K]V2) int {
	n := 0
	for k := range upd {
		if _, ok := cur[k]; !ok {
			n++
		}
	}
	return n
}

// dump reads the three maps.
func (r *reconciler) dump() (*mapContents, error) {
	svc, err := r.services.Dump()
	if err != nil {
		return nil, err
	}
	slots, err := r.slots.Dump()
	if err != nil {
		return nil, err
	}
	be, err := r.backends.Dump()
	if err != nil {
		return nil, err
	}
	return &mapContents{services: svc, slots: slots, backends: be}, nil
}

// after folds a plan's writes into the state it was planned against.
func (m *mapContents) after(p *plan) *mapContents {
	for k, v := range p.backendUpd {
		m.backends[k] = v
	}
	for k, v := range p.slotUpd {
		m.slots[k] = v
	}
	for k, v := range p.serviceUpd {
		m.services[k] = v
	}
	for _, k := range p.serviceDel {
		delete(m.services, k)
	}
	for _, k := range p.slotDel {
		delete(m.slots, k)
	}
	for _, k := range p.backendDel {
		delete(m.backends, k)
	}
	return m
}

func (r *reconciler) plan(desired []desiredService, total int, curSvc map[ServiceKey]ServiceValue, curSlots map[SlotKey]uint32, curBe map[uint32]Backend) (*plan, error) {
	p := &plan{
		backendUpd: map[uint32]Backend{},
		slotUpd:    map[SlotKey]uint32{},
		serviceUpd: map[ServiceKey]ServiceValue{},
		serviceIDs: make(map[ServiceKey]uint32, len(desired)),
		backendIDs: make(map[beKey]uint32, total),
	}

	// Service IDs: memory first, then what the map says, then fresh ones
	// that no entry uses now.
	svcAlloc := idAllocator{taken: make(map[uint32]struct{}, len(curSvc)+len(desired))}
	for _, v := range curSvc {
		svcAlloc.taken[v.ID] = struct{}{}
	}
	for k := range curSlots {
		svcAlloc.taken[k.ServiceID] = struct{}{}
	}
	claimed := make(map[uint32]struct{}, len(desired))
	claim := func(k ServiceKey, id uint32) bool {
		if _, ok := claimed[id]; ok || id == 0 {
			return false
		}
		p.serviceIDs[k] = id
		claimed[id] = struct{}{}
		svcAlloc.taken[id] = struct{}{}
		return true
	}
	for _, d := range desired {
		claim(d.key, r.serviceIDs[d.key])
	}
	for _, d := range desired {
		if _, ok := p.serviceIDs[d.key]; !ok {
			claim(d.key, curSvc[d.key].ID)
		}
	}
	for _, d := range desired {
		if _, ok := p.serviceIDs[d.key]; ok {
			continue
		}
		id, err := svcAlloc.alloc()
		if err != nil {
			return nil, fmt.Errorf("allocate service id: %w", err)
		}
		p.serviceIDs[d.key] = id
	}

	// Backend IDs, the same way. A backend listed by several services
	// gets one ID. wanted ends up holding every desired backend ID.
	beAlloc := idAllocator{taken: make(map[uint32]struct{}, len(curBe)+total)}
	for id := range curBe {
		beAlloc.taken[id] = struct{}{}
	}
	for _, id := range curSlots {
		beAlloc.taken[id] = struct{}{}
	}
	wanted := make(map[uint32]struct{}, total)
	order := make([]beKey, 0, total)
	for _, d := range desired {
		for _, b := range d.backends {
			if _, ok := p.backendIDs[b]; !ok {
				p.backendIDs[b] = 0
				order = append(order, b)
			}
		}
	}
	claimBe := func(b beKey, id uint32) {
		if _, ok := wanted[id]; ok || id == 0 {
			return
		}
		p.backendIDs[b] = id
		wanted[id] = struct{}{}
		beAlloc.taken[id] = struct{}{}
	}
	for _, b := range order {
		claimBe(b, r.backendIDs[b])
	}
	var byTuple map[beKey]uint32
	for _, b := range order {
		if p.backendIDs[b] != 0 {
			continue
		}
		if byTuple == nil {
			byTuple = make(map[beKey]uint32, len(curBe))
			for id, cur := range curBe {
				k := keyOf(cur)
				if old, ok := byTuple[k]; !ok || id < old {
					byTuple[k] = id
				}
			}
		}
		claimBe(b, byTuple[b])
	}
	for _, b := range order {
		if p.backendIDs[b] != 0 {
			continue
		}
		id, err := beAlloc.alloc()
		if err != nil {
			return nil, fmt.Errorf("allocate backend id: %w", err)
		}
		p.backendIDs[b] = id
		wanted[id] = struct{}{}
	}

	// Backends: write the new and the changed.
	for b, id := range p.backendIDs {
		if cur, ok := curBe[id]; !ok || keyOf(cur) != b {
			p.backendUpd[id] = b.backend()
		}
	}
	for id := range curBe {
		if _, ok := wanted[id]; !ok {
			p.backendDel = append(p.backendDel, id)
		}
	}

	// Services and their slots. A backend keeps the slot it holds; the
	// others fill the holes. mark[id] == i+1 means "backend of desired
	// service i"; placed[id] == i+1 means "already has a slot".
	mark := make(map[uint32]int, total)
	placed := make(map[uint32]int, total)
	counts := make(map[uint32]uint32, len(desired))
	wantSvc := make(map[ServiceKey]struct{}, len(desired))
	var slots, ids []uint32
	for i, d := range desired {
		stamp := i + 1
		id := p.serviceIDs[d.key]
		count := len(d.backends)
		counts[id] = uint32(count)
		wantSvc[d.key] = struct{}{}

		// ids[j] is the ID of d.backends[j].
		ids = slices.Grow(ids[:0], count)[:count]
		for j, b := range d.backends {
			ids[j] = p.backendIDs[b]
			mark[ids[j]] = stamp
		}
		slots = slices.Grow(slots[:0], count)[:count]
		for n := range count {
			slots[n] = 0
			if be, ok := curSlots[SlotKey{id, uint32(n)}]; ok && mark[be] == stamp && placed[be] != stamp {
				slots[n] = be
				placed[be] = stamp
			}
		}
		next := 0
		for n := range count {
			if slots[n] != 0 {
				continue
			}
			for placed[ids[next]] == stamp {
				next++
			}
			be := ids[next]
			slots[n] = be
			placed[be] = stamp
		}
		for n, be := range slots {
			k := SlotKey{id, uint32(n)}
			if cur, ok := curSlots[k]; !ok || cur != be {
				p.slotUpd[k] = be
			}
		}
		p.nSlots += count

		v := ServiceValue{ID: id, Count: uint32(count)}
		for n := range min(count, InlineSlots) {
			b := d.backends[slices.Index(ids, slots[n])].backend()
			v.Inline[n] = netip.AddrPortFrom(b.IP, b.Port)
		}
		if cur, ok := curSvc[d.key]; !ok || cur != v {
			p.serviceUpd[d.key] = v
		}
	}
	for k := range curSvc {
		if _, ok := wantSvc[k]; !ok {
			p.serviceDel = append(p.serviceDel, k)
		}
	}
	for k := range curSlots {
		if count, ok := counts[k.ServiceID]; !ok || k.Slot >= count {
			p.slotDel = append(p.slotDel, k)
		}
	}
	p.nServices, p.nBackends = len(desired), len(p.backendIDs)
	return p, nil
}

func (r *reconciler) apply(ctx context.Context, p *plan) error {
	// Stopping between phases is always safe; see the design notes.
	steps := []struct {
		what string
		n    int
		run  func() error
	}{
		{"update backends", len(p.backendUpd), func() error { return batchUpdate(r.backends, p.backendUpd) }},
		{"update slots", len(p.slotUpd), func() error { return batchUpdate(r.slots, p.slotUpd) }},
		{"update services", len(p.serviceUpd), func() error { return batchUpdate(r.services, p.serviceUpd) }},
		{"delete services", len(p.serviceDel), func() error { return r.services.BatchDelete(p.serviceDel) }},
		{"delete slots", len(p.slotDel), func() error { return r.slots.BatchDelete(p.slotDel) }},
		{"delete backends", len(p.backendDel), func() error { return r.backends.BatchDelete(p.backendDel) }},
	}
	for i, s := range steps {
		if s.n == 0 {
			continue
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("%s: %w", s.what, err)
		}
		if err := s.run(); err != nil {
			return fmt.Errorf("%s: %w", s.what, err)
		}
		r.stats.MapWrites += uint64(s.n)
		if i < 3 {
			r.stats.Updates += uint64(s.n)
		} else {
			r.stats.Deletes += uint64(s.n)
		}
	}
	return nil
}

func batchUpdate[K comparable, V comparable](t table[K, V], m map[K]V) error {
	keys := make([]K, 0, len(m))
	values := make([]V, 0, len(m))
	for k, v := range m {
		keys = append(keys, k)
		values = append(values, v)
	}
	return t.BatchUpdate(keys, values)
}
