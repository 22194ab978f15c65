package kvstore

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Why a session ended, matched with errors.Is against Session.Err and
// against the errors of a write that used a lost session.
var (
	// ErrSessionLost: etcd revoked the lease, it expired, or no renewal
	// succeeded for a whole TTL. Keys put with the session are gone (or
	// about to be) and must be written again under a new session.
	ErrSessionLost = errors.New("etcd lease lost")
	// ErrSessionClosed: the owner closed the session.
	ErrSessionClosed = errors.New("session closed")
	// ErrClientClosed: the Client the session belongs to was closed.
	ErrClientClosed = errors.New("kvstore client closed")
)

// Session is one etcd lease that this process keeps alive until Close, or
// until the lease is lost. Keys written with OpPut(...).WithSession(s), or
// by a SyncStore with WithLease, vanish with it, so they outlive this
// process by at most the TTL.
//
// It is the only lease type in Trellis: the client's lease manager (which
// spreads a SyncStore's keys over leases) and the identity allocator (which
// re-publishes its references through compare-and-swap when a lease is
// lost) both hold Sessions and watch Done.
type Session struct {
	client *Client
	id     clientv3.LeaseID
	ttl    time.Duration
	cancel context.CancelFunc
	done   chan struct{}

	mu  sync.Mutex
	err error // why it ended; set before done closes
}

// NewSession grants a lease of ttl (rounded up to whole seconds; etcd
// raises TTLs below its minimum of about 2 s) and keeps it alive in the
// background.
func (c *Client) NewSession(ctx context.Context, ttl time.Duration) (*Session, error) {
	secs := max(int64(math.Ceil(ttl.Seconds())), 1)
	rctx, cancel := c.requestContext(ctx)
	resp, err := c.etcd.Grant(rctx, secs)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("kvstore: grant lease (ttl %ds): %w", secs, err)
	}
	// The keepalive runs until Close or until the client closes (which
	// closes every keepalive channel), not under the caller's ctx: the
	// session outlives the request that created it.
	kctx, kcancel := context.WithCancel(context.Background())
	ch, err := c.etcd.KeepAlive(kctx, resp.ID)
	if err != nil {
		kcancel()
		return nil, fmt.Errorf("kvstore: keep lease %x alive: %w", int64(resp.ID), err)
	}
	s := &Session{client: c, id: resp.ID, ttl: time.Duration(resp.TTL) * time.Second, cancel: kcancel, done: make(chan struct{})}
	go s.keepAlive(kctx, ch)
	c.log.Debug("granted lease", "lease", s.String(), "ttl", s.ttl)
	return s, nil
}

func (s *Session) keepAlive(ctx context.Context, ch <-chan *clientv3.LeaseKeepAliveResponse) {
	for range ch {
		// Draining keeps clientv3 from logging a full channel; the
		// responses carry nothing we need.
	}
	// The channel closes when etcd reports the lease gone, when no renewal
	// succeeded for a whole TTL, or when ctx or the client ends.
	var err error
	switch {
	case ctx.Err() != nil:
		err = ErrSessionClosed
	case s.client.etcd.Ctx().Err() != nil:
		err = ErrClientClosed
	default:
		err = ErrSessionLost
	}
	s.mu.Lock()
	s.err = err
	s.mu.Unlock()
	close(s.done)
}

// Done is closed when the session ends: lost, closed, or its client
// closed. Err says which.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err is nil while the session is alive, then ErrSessionLost,
// ErrSessionClosed or ErrClientClosed.
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// TTL is the lease's TTL as etcd granted it.
func (s *Session) TTL() time.Duration { return s.ttl }

// String is the lease ID in hex, as etcdctl shows it.
func (s *Session) String() string { return fmt.Sprintf("%x", int64(s.id)) }

// Close stops renewing the lease without revoking it, so the keys on it
// outlive a restart by up to the TTL. Safe on nil and safe to call twice.
func (s *Session) Close() {
	if s == nil {
		return
	}
	s.cancel()
	<-s.done
}

// Revoke deletes the lease, and with it every key put with the session,
// then closes the session.
func (s *Session) Revoke(ctx context.Context) error {
	rctx, cancel := s.client.requestContext(ctx)
	_, err := s.client.etcd.Revoke(rctx, s.id)
	cancel()
	s.Close()
	if err != nil {
		return fmt.Errorf("kvstore: revoke lease %s: %w", s, err)
	}
	return nil
}
