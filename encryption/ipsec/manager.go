package ipsec

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"

	"github.com/vishvananda/netns"
)

// Config says where a Manager works.
type Config struct {
	// NetNS is the network namespace to program (the node's); 0 or
	// negative: the caller's.
	NetNS netns.NsHandle
	// Logger gets what the Manager changes; nil discards.
	Logger *slog.Logger
}

// Stats are a Manager's counters.
type Stats struct {
	// Applies is the number of Apply calls.
	Applies uint64
	// Writes is the number of xfrm write requests (add, update, delete of
	// states and policies), successful or not; reads are not counted.
	Writes uint64
	// LastWrites is Writes made by the last Apply or Cleanup: 0 when Apply
	// found the kernel already converged.
	LastWrites uint64
	// Errors is the number of Apply calls that returned an error.
	Errors uint64
}

// Manager owns the IPsec xfrm state of one network namespace: the states
// and policies whose reqid is in Trellis's range. Its methods are safe for
// concurrent use.
type Manager struct {
	log *slog.Logger

	mu    sync.Mutex
	x     xfrmKernel // nil once closed
	stats Stats
}

// New opens an xfrm netlink socket in cfg.NetNS and checks that the kernel
// can hold Trellis's ESP states (CheckKernel). On a kernel without them it
// returns an error matching ErrNotSupported that names the missing kernel
// options.
func New(cfg Config) (*Manager, error) {
	m, err := Open(cfg)
	if err != nil {
		return nil, err
	}
	if err := checkKernel(m.x); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// Open is New without the kernel check: for Cleanup on a node that no
// longer runs IPsec (its kernel may lack ESP), and for installing the
// policies alone where the kernel has no ESP (tests). It fails only when
// the kernel has no xfrm netlink interface at all (ErrNotSupported) or the
// socket cannot be opened.
func Open(cfg Config) (*Manager, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	x, err := openXfrm(cfg.NetNS)
	if err != nil {
		return nil, err
	}
	return &Manager{log: cfg.Logger, x: x}, nil
}

// Close releases the socket and leaves the kernel state in place: traffic
// stays encrypted across an agent restart, and the next process adopts
// the objects. Safe on nil and twice.
func (m *Manager) Close() error {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.x != nil {
		m.x.close()
		m.x = nil
	}
	return nil
}

// Stats returns the counters.
func (m *Manager) Stats() Stats {
	if m == nil {
		return Stats{}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stats
}

// kernelState is the namespace's xfrm objects, Trellis's (by reqid) apart
// from the others.
type kernelState struct {
	states        map[StateID]sa
	staleStates   []sa // Trellis's, of a shape Apply never makes
	foreignStates map[StateID]bool
	policies      map[PolicyID]policy
	stalePolicies []policy // Trellis's, of a shape Apply never makes
	foreignPolicy map[PolicyID]bool
	// foreignObjects counts other owners' states and policies.
	foreignObjects int
}

func (m *Manager) readKernel() (*kernelState, error) {
	sas, err := m.x.listSAs()
	if err != nil {
		return nil, err
	}
	pols, err := m.x.listPolicies()
	if err != nil {
		return nil, err
	}
	ks := &kernelState{
		states: map[StateID]sa{}, foreignStates: map[StateID]bool{},
		policies: map[PolicyID]policy{}, foreignPolicy: map[PolicyID]bool{},
	}
	for _, s := range sas {
		id := StateID{s.dst, s.spi}
		switch {
		case !IsOwnerReqid(s.reqid):
			// Only the kernel's identity matters for a conflict; a
			// foreign state with a mark lives beside ours.
			if s.proto == protoESP && s.mark == nil {
				ks.foreignStates[id] = true
			}
			ks.foreignObjects++
		case s.proto != protoESP || s.mark != nil:
			ks.staleStates = append(ks.staleStates, s)
		default:
			ks.states[id] = s
		}
	}
	for _, p := range pols {
		switch {
		case !p.owned():
			if p.plainID() {
				ks.foreignPolicy[p.id()] = true
			}
			ks.foreignObjects++
		case !p.plainID():
			// Not at a place Apply installs to: only deleting it helps.
			// (One at such a place but of another shape, two templates
			// say, is updated in place like any that differs.)
			ks.stalePolicies = append(ks.stalePolicies, p)
		default:
			ks.policies[p.id()] = p
		}
	}
	return ks, nil
}

// checkDesired refuses what Apply must never install: objects outside
// Trellis's reqid range (Cleanup could not find them again), two objects of
// one kernel identity, states without a proper key.
func checkDesired(d Desired) error {
	var errs []error
	states := map[StateID]bool{}
	for _, s := range d.States {
		switch {
		case !IsOwnerReqid(s.Reqid):
			errs = append(errs, fmt.Errorf("ipsec: state %s: reqid %#x outside Trellis's range %#x/%#x", s, s.Reqid, OwnerReqidBase, OwnerReqidMask))
		case len(s.Key) != AEADKeyBytes:
			errs = append(errs, fmt.Errorf("ipsec: state %s: key of %d bytes, want %d", s, len(s.Key), AEADKeyBytes))
		case s.SPI == 0 || !s.Src.IsValid() || !s.Dst.IsValid() || s.Src.Is4() != s.Dst.Is4():
			errs = append(errs, fmt.Errorf("ipsec: state %s: needs an SPI and two addresses of one family", s))
		case states[s.ID()]:
			errs = append(errs, fmt.Errorf("ipsec: state %s: a second state of destination %s and SPI %#08x", s, s.Dst, s.SPI))
		}
		states[s.ID()] = true
	}
	policies := map[PolicyID]bool{}
	for _, p := range d.Policies {
		switch {
		case !IsOwnerReqid(p.Reqid):
			errs = append(errs, fmt.Errorf("ipsec: policy %s: reqid %#x outside Trellis's range %#x/%#x", p, p.Reqid, OwnerReqidBase, OwnerReqidMask))
		case directionOf(kernelDir(p.Dir)) != p.Dir:
			errs = append(errs, fmt.Errorf("ipsec: policy %s: direction %s", p, p.Dir))
		case !p.Src.IsValid() || !p.Dst.IsValid() || p.Src.Addr().Is4() != p.Dst.Addr().Is4() || p.Src != p.Src.Masked() || p.Dst != p.Dst.Masked():
			errs = append(errs, fmt.Errorf("ipsec: policy %s: needs masked selector prefixes of one family", p))
		case !p.TmplSrc.IsValid() || !p.TmplDst.IsValid() || p.TmplSrc.Is4() != p.TmplDst.Is4():
			errs = append(errs, fmt.Errorf("ipsec: policy %s: needs tunnel addresses of one family", p))
		case policies[p.ID()]:
			errs = append(errs, fmt.Errorf("ipsec: policy %s: a second policy of that direction and selector", p))
		}
		policies[p.ID()] = true
	}
	return errors.Join(errs...)
}

// Apply makes Trellis's xfrm objects in the namespace exactly d's: it adds
// what is missing, replaces what differs and deletes the rest of
// Trellis's, including objects a crashed earlier process left; it never
// touches another owner's objects, and reports a desired object whose
// place another owner's holds. It writes nothing when the kernel already
// holds d (Stats.LastWrites == 0).
//
// Order: states first, so that a new policy finds its state; policies
// next; then stale policies and stale states, so nothing is deleted
// before its replacement is in. A failed step is reported and the rest
// still done; a policy whose state failed is still installed, so that the
// traffic it selects is dropped rather than sent in the clear. A state the
// kernel cannot build (no ESP, no GCM) gives an error matching
// ErrNotSupported.
//
// The kernel cannot change a state's key in place, so a state that
// differs is deleted and added again (its traffic is dropped in between);
// a new key normally comes with a new SPI, a new state, and no gap.
func (m *Manager) Apply(ctx context.Context, d Desired) error {
	if m == nil {
		return ErrClosed
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.x == nil {
		return ErrClosed
	}
	m.stats.Applies++
	start := m.stats.Writes
	err := m.apply(ctx, d)
	m.stats.LastWrites = m.stats.Writes - start
	if err != nil {
		m.stats.Errors++
	}
	return err
}

func (m *Manager) apply(ctx context.Context, d Desired) error {
	start := m.stats.Writes
	if err := checkDesired(d); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	ks, err := m.readKernel()
	if err != nil {
		return err
	}
	var errs []error
	fail := func(err error) { errs = append(errs, err) }
	write := func(op func() error) error {
		m.stats.Writes++
		return op()
	}

	wantStates := map[StateID]bool{}
	var (
		unsupported      []State
		firstUnsupported *UnsupportedError
	)
	for _, s := range d.States {
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		id := s.ID()
		wantStates[id] = true
		want := saFromState(s)
		have, ok := ks.states[id]
		switch {
		case ks.foreignStates[id]:
			fail(fmt.Errorf("ipsec: add state %s: another owner's state (reqid outside %#x/%#x) has destination %s and SPI %#08x", s, OwnerReqidBase, OwnerReqidMask, s.Dst, s.SPI))
			continue
		case ok && have.matches(want):
			continue
		case ok:
			m.log.Info("ipsec: replacing state", "state", s.String())
			if err := write(func() error { return m.x.delSA(have) }); err != nil {
				fail(fmt.Errorf("ipsec: replace state %s: delete: %w", s, err))
				continue
			}
		}
		if err := write(func() error { return m.x.addSA(want) }); err != nil {
			if u := classifySAError(err, s.Dst); u != nil {
				unsupported = append(unsupported, s)
				if firstUnsupported == nil {
					firstUnsupported = u
				}
				continue
			}
			fail(fmt.Errorf("ipsec: add state %s: %w", s, err))
			continue
		}
		m.log.Debug("ipsec: added state", "state", s.String())
	}
	if len(unsupported) > 0 {
		// One error for them all, naming everything the kernel lacks:
		// the refusal names only the first missing piece it met (the
		// algorithm before the ESP type), the full check names them all.
		var u *UnsupportedError
		if !errors.As(checkKernel(m.x), &u) {
			u = firstUnsupported
		}
		fail(fmt.Errorf("ipsec: %d of %d states not installed (the first: %s): %w", len(unsupported), len(d.States), unsupported[0], u))
	}

	wantPolicies := map[PolicyID]bool{}
	for _, p := range d.Policies {
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		id := p.ID()
		wantPolicies[id] = true
		want := policyFromPlan(p)
		have, ok := ks.policies[id]
		switch {
		case ks.foreignPolicy[id]:
			fail(fmt.Errorf("ipsec: add policy %s: another owner's policy has that direction and selector", p))
		case ok && have.matches(want):
		case ok:
			if err := write(func() error { return m.x.updatePolicy(want) }); err != nil {
				fail(fmt.Errorf("ipsec: update policy %s: %w", p, err))
			} else {
				m.log.Info("ipsec: updated policy", "policy", p.String())
			}
		default:
			if err := write(func() error { return m.x.addPolicy(want) }); err != nil {
				fail(fmt.Errorf("ipsec: add policy %s: %w", p, err))
			} else {
				m.log.Debug("ipsec: added policy", "policy", p.String())
			}
		}
	}

	var stalePolicies []policy
	for id, p := range ks.policies {
		if !wantPolicies[id] {
			stalePolicies = append(stalePolicies, p)
		}
	}
	var staleStates []sa
	for id, s := range ks.states {
		if !wantStates[id] {
			staleStates = append(staleStates, s)
		}
	}
	errs = append(errs, m.deleteAll(ctx, append(stalePolicies, ks.stalePolicies...), append(staleStates, ks.staleStates...))...)
	if n := m.stats.Writes - start; n > 0 {
		m.log.Info("ipsec: applied", "states", len(d.States), "policies", len(d.Policies), "writes", n, "errors", len(errs))
	}
	return errors.Join(errs...)
}

// deleteAll deletes policies, then states, in a stable order.
func (m *Manager) deleteAll(ctx context.Context, pols []policy, sas []sa) []error {
	slices.SortFunc(pols, func(a, b policy) int { return cmp.Compare(a.index, b.index) })
	slices.SortFunc(sas, func(a, b sa) int { return cmp.Or(a.dst.Compare(b.dst), cmp.Compare(a.spi, b.spi)) })
	var errs []error
	for _, p := range pols {
		if err := ctx.Err(); err != nil {
			return append(errs, err)
		}
		m.stats.Writes++
		if err := m.x.delPolicy(p); err != nil {
			errs = append(errs, fmt.Errorf("ipsec: delete policy %s %s → %s: %w", directionOf(p.dir), p.src, p.dst, err))
			continue
		}
		m.log.Debug("ipsec: deleted policy", "dir", directionOf(p.dir).String(), "src", p.src, "dst", p.dst)
	}
	for _, s := range sas {
		if err := ctx.Err(); err != nil {
			return append(errs, err)
		}
		m.stats.Writes++
		if err := m.x.delSA(s); err != nil {
			errs = append(errs, fmt.Errorf("ipsec: delete state %s → %s spi %#08x: %w", s.src, s.dst, s.spi, err))
			continue
		}
		m.log.Debug("ipsec: deleted state", "src", s.src, "dst", s.dst, "spi", fmt.Sprintf("%#08x", s.spi))
	}
	return errs
}

// Cleanup deletes every Trellis xfrm object of the namespace (reqid in
// Trellis's range), whoever installed it: policies first, so that no
// packet meets a policy whose state is gone. Other owners' objects stay.
func (m *Manager) Cleanup(ctx context.Context) error {
	if m == nil {
		return ErrClosed
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.x == nil {
		return ErrClosed
	}
	start := m.stats.Writes
	defer func() { m.stats.LastWrites = m.stats.Writes - start }()
	ks, err := m.readKernel()
	if err != nil {
		return err
	}
	pols := ks.stalePolicies
	for _, p := range ks.policies {
		pols = append(pols, p)
	}
	sas := ks.staleStates
	for _, s := range ks.states {
		sas = append(sas, s)
	}
	errs := m.deleteAll(ctx, pols, sas)
	if len(pols)+len(sas) > 0 {
		m.log.Info("ipsec: cleaned up", "policies", len(pols), "states", len(sas), "errors", len(errs))
	}
	return errors.Join(errs...)
}

// Installed is what Trellis has in the kernel, as Installed reads it.
type Installed struct {
	// States sorted by destination and SPI. Dir, Peer are not known to
	// the kernel and stay zero; Index is the SPI's.
	States []State
	// Policies sorted by direction and selector; Peer stays empty.
	Policies []Policy
	// Other counts Trellis's objects of a shape Apply never makes (left
	// by another version, or changed by hand): Apply deletes them.
	Other int
	// Foreign counts the namespace's xfrm objects of other owners.
	Foreign int
}

// Installed reads Trellis's xfrm objects from the kernel.
func (m *Manager) Installed(ctx context.Context) (Installed, error) {
	if m == nil {
		return Installed{}, ErrClosed
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.x == nil {
		return Installed{}, ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return Installed{}, err
	}
	ks, err := m.readKernel()
	if err != nil {
		return Installed{}, err
	}
	in := Installed{Other: len(ks.staleStates) + len(ks.stalePolicies), Foreign: ks.foreignObjects}
	for _, s := range ks.states {
		st := State{Index: SPIIndex(s.spi), Src: s.src, Dst: s.dst, SPI: s.spi, Reqid: s.reqid}
		if s.aead != nil && s.aead.name == AEADAlgorithm && s.mode == modeTunnel && s.crypt == nil && s.auth == nil && !s.foreignAttrs {
			st.Key = s.aead.key
		} else {
			in.Other++
			continue
		}
		in.States = append(in.States, st)
	}
	for _, p := range ks.policies {
		if !p.plain() {
			in.Other++
			continue
		}
		t := p.tmpls[0]
		if t.proto != protoESP || t.mode != modeTunnel || t.spi != 0 || t.optional != 0 || p.action != policyAllow || p.priority != 0 {
			in.Other++
			continue
		}
		in.Policies = append(in.Policies, Policy{Dir: directionOf(p.dir), Src: p.src, Dst: p.dst, TmplSrc: t.src, TmplDst: t.dst, Reqid: t.reqid})
	}
	slices.SortFunc(in.States, func(a, b State) int { return cmp.Or(a.Dst.Compare(b.Dst), cmp.Compare(a.SPI, b.SPI)) })
	slices.SortFunc(in.Policies, func(a, b Policy) int {
		return cmp.Or(cmp.Compare(a.Dir, b.Dir), comparePrefix(a.Src, b.Src), comparePrefix(a.Dst, b.Dst))
	})
	return in, nil
}
