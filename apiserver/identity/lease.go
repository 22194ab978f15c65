package identity

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// currentLease returns the lease new references are put with, granting
// one (and starting its keepalive) when there is none.
func (a *Allocator) currentLease(ctx context.Context) (clientv3.LeaseID, error) {
	a.leaseMu.Lock()
	defer a.leaseMu.Unlock()
	if a.lease != 0 {
		return a.lease, nil
	}
	if a.ctx.Err() != nil {
		return 0, ErrClosed
	}
	ttl := int64(math.Ceil(a.cfg.LeaseTTL.Seconds()))
	rctx, cancel := a.requestContext(ctx)
	resp, err := a.etcd.Grant(rctx, ttl)
	cancel()
	if err != nil {
		return 0, fmt.Errorf("grant lease (ttl %ds): %w", ttl, err)
	}
	a.lease = resp.ID
	a.wg.Add(1)
	go a.keepAlive(resp.ID)
	a.log.Debug("granted lease", "lease", fmt.Sprintf("%x", int64(resp.ID)), "ttl", resp.TTL)
	return resp.ID, nil
}

// forgetLease stops handing out id to new references.
func (a *Allocator) forgetLease(id clientv3.LeaseID) {
	a.leaseMu.Lock()
	defer a.leaseMu.Unlock()
	if a.lease == id {
		a.lease = 0
	}
}

// keepAlive renews lease id until Close. If the lease is lost (revoked,
// expired, or not renewed for a whole TTL) it re-publishes the references
// that were on it.
func (a *Allocator) keepAlive(id clientv3.LeaseID) {
	defer a.wg.Done()
	ch, err := a.etcd.KeepAlive(a.ctx, id)
	if err == nil {
		for range ch {
			// Drain: the responses carry nothing we need, and a full
			// channel makes clientv3 log.
		}
	}
	if a.ctx.Err() != nil {
		return
	}
	a.forgetLease(id)
	if a.etcd.Ctx().Err() != nil {
		a.log.Warn("etcd client closed before the identity allocator; references are no longer renewed", "lease", fmt.Sprintf("%x", int64(id)))
		return
	}
	a.log.Warn("identity lease lost; re-publishing references", "lease", fmt.Sprintf("%x", int64(id)), "err", err)
	a.republish(a.ctx, id)
}

// republish puts every reference that was on the lost lease again, under
// the current lease, retrying with backoff until all are done or ctx ends.
func (a *Allocator) republish(ctx context.Context, lost clientv3.LeaseID) {
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

// republishEntry re-puts e's reference if it was on the lost lease.
func (a *Allocator) republishEntry(ctx context.Context, e *entry, lost clientv3.LeaseID) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.refs == 0 || e.lease != lost {
		return nil
	}
	id, lease, err := a.publish(ctx, e.ls, e.id)
	if err != nil {
		return err
	}
	if id != e.id {
		// Only when the identity was collected while this replica was cut
		// off and another replica re-allocated the labels first.
		a.log.Error("identity changed while its lease was lost; callers still hold the old number", "labels", e.ls.String(), "old", e.id, "new", id)
	}
	e.id, e.lease = id, lease
	a.republished.Add(1)
	return nil
}
