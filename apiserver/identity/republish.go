package identity

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/trellis-mesh/trellis/kvstore"
)

// currentSession returns the session new references are put with, starting
// one (a lease kept alive until Close) when there is none.
func (a *Allocator) currentSession(ctx context.Context) (*kvstore.Session, error) {
	a.sessionMu.Lock()
	defer a.sessionMu.Unlock()
	if a.session != nil {
		return a.session, nil
	}
	if a.ctx.Err() != nil {
		return nil, ErrClosed
	}
	rctx, cancel := a.requestContext(ctx)
	s, err := a.client.NewSession(rctx, a.cfg.LeaseTTL)
	cancel()
	if err != nil {
		return nil, err
	}
	a.session = s
	a.wg.Add(1)
	go a.watchSession(s)
	return s, nil
}

// forgetSession stops handing out s to new references.
func (a *Allocator) forgetSession(s *kvstore.Session) {
	a.sessionMu.Lock()
	defer a.sessionMu.Unlock()
	if a.session == s {
		a.session = nil
	}
}

// watchSession waits for s to end. When its lease is lost (revoked,
// expired, or not renewed for a whole TTL) it re-publishes the references
// that were on it. Close stops the renewal without revoking the lease.
func (a *Allocator) watchSession(s *kvstore.Session) {
	defer a.wg.Done()
	select {
	case <-s.Done():
	case <-a.ctx.Done():
		s.Close()
		return
	}
	a.forgetSession(s)
	if errors.Is(s.Err(), kvstore.ErrClientClosed) {
		a.log.Warn("etcd client closed before the identity allocator; references are no longer renewed", "lease", s.String())
		return
	}
	a.log.Warn("identity lease lost; re-publishing references", "lease", s.String(), "err", s.Err())
	a.republish(a.ctx, s)
}

// republish puts every reference that was on the lost session again, under
// the current one, retrying with backoff until all are done or ctx ends.
func (a *Allocator) republish(ctx context.Context, lost *kvstore.Session) {
	delay := 100 * time.Millisecond
	const maxDelay = 10 * time.Second
	for {
		failed := 0
		for _, e := range a.snapshot() {
			if err := a.republishEntry(ctx, e, lost); err != nil {
				if ctx.Err() != nil {
					return
				}
				failed++
				a.log.Warn("re-publish identity reference failed; will retry", "id", e.id, "labels", e.ls.String(), "err", err)
			}
		}
		if failed == 0 {
			return
		}
		// Full jitter, so replicas cut off together do not return in
		// lockstep.
		if !sleep(ctx, delay/2+rand.N(delay/2+1)) {
			return
		}
		delay = min(2*delay, maxDelay)
	}
}

// republishEntry re-puts e's reference if it was on the lost session.
func (a *Allocator) republishEntry(ctx context.Context, e *entry, lost *kvstore.Session) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.refs == 0 || e.session != lost {
		return nil
	}
	id, s, err := a.publish(ctx, e.ls, e.id)
	if err != nil {
		return fmt.Errorf("re-publish reference on identity %d: %w", e.id, err)
	}
	if id != e.id {
		// Only when the identity was collected while this replica was cut
		// off and another replica re-allocated the labels first.
		a.log.Error("identity changed while its lease was lost; callers still hold the old number", "labels", e.ls.String(), "old", e.id, "new", id)
	}
	e.id, e.session = id, s
	a.republished.Add(1)
	return nil
}
