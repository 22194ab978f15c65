package kvstore

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// leaseManager spreads lease-bound keys over Sessions, at most limit keys
// per session (etcd's put cost grows with the keys on a lease), and tells
// the owners of a lost session's keys so they can publish them again.
type leaseManager struct {
	client *Client
	ttl    time.Duration
	limit  int
	log    *slog.Logger

	ctx    context.Context // cancelled by close: stops the loss watchers
	cancel context.CancelFunc
	wg     sync.WaitGroup

	grantMu sync.Mutex // serialises grants so concurrent acquirers share one new session

	mu        sync.Mutex
	current   *Session
	leases    map[*Session]map[string]struct{}
	keyLease  map[string]*Session
	observers map[string]func(keys []string) // key prefix → owner
}

func newLeaseManager(client *Client, ttl time.Duration, limit int, log *slog.Logger) *leaseManager {
	ctx, cancel := context.WithCancel(context.Background())
	return &leaseManager{
		client: client, ttl: ttl, limit: limit, log: log,
		ctx: ctx, cancel: cancel,
		leases:    make(map[*Session]map[string]struct{}),
		keyLease:  make(map[string]*Session),
		observers: make(map[string]func([]string)),
	}
}

// observe registers fn to be told which keys under prefix lost their lease.
// It returns a function that removes the registration.
func (m *leaseManager) observe(prefix string, fn func(keys []string)) (remove func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.observers[prefix] = fn
	return func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		delete(m.observers, prefix)
	}
}

// acquire returns the session key should be put with, granting a new one
// when the current one is full.
func (m *leaseManager) acquire(ctx context.Context, key string) (*Session, error) {
	m.mu.Lock()
	if s, ok := m.keyLease[key]; ok {
		m.mu.Unlock()
		return s, nil
	}
	if s := m.current; s != nil && len(m.leases[s]) < m.limit {
		m.attachLocked(key, s)
		m.mu.Unlock()
		return s, nil
	}
	m.mu.Unlock()

	m.grantMu.Lock()
	defer m.grantMu.Unlock()
	// Another acquirer may have granted a session while we waited.
	m.mu.Lock()
	if s := m.current; s != nil && len(m.leases[s]) < m.limit {
		m.attachLocked(key, s)
		m.mu.Unlock()
		return s, nil
	}
	m.mu.Unlock()

	s, err := m.client.NewSession(ctx, m.ttl)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	m.leases[s] = make(map[string]struct{})
	m.current = s
	m.attachLocked(key, s)
	m.mu.Unlock()

	m.wg.Add(1)
	go m.watch(s)
	return s, nil
}

func (m *leaseManager) attachLocked(key string, s *Session) {
	m.leases[s][key] = struct{}{}
	m.keyLease[key] = s
}

// release forgets key (it was deleted).
func (m *leaseManager) release(key string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if s, ok := m.keyLease[key]; ok {
		delete(m.leases[s], key)
		delete(m.keyLease, key)
	}
}

// live reports whether s is a session this manager holds.
func (m *leaseManager) live(s *Session) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.leases[s]
	return ok
}

// lost drops session s and tells the owners of its keys. Called when the
// session ends and when a write says its lease does not exist.
func (m *leaseManager) lost(s *Session) {
	m.mu.Lock()
	keys, ok := m.leases[s]
	if !ok {
		m.mu.Unlock()
		return
	}
	delete(m.leases, s)
	if m.current == s {
		m.current = nil
	}
	byOwner := make(map[string][]string)
	for key := range keys {
		delete(m.keyLease, key)
		for prefix := range m.observers {
			if strings.HasPrefix(key, prefix) {
				byOwner[prefix] = append(byOwner[prefix], key)
				break
			}
		}
	}
	notify := make(map[string]func([]string), len(byOwner))
	for prefix := range byOwner {
		notify[prefix] = m.observers[prefix]
	}
	m.mu.Unlock()

	// Stop renewing a lease that a failed write found missing; a no-op
	// for one that already ended.
	s.cancel()
	m.log.Warn("etcd lease lost; re-publishing its keys", "lease", s.String(), "keys", len(keys))
	for prefix, fn := range notify {
		fn(byOwner[prefix])
	}
}

// watch waits for s to end. A session that was lost takes its keys with
// it; one closed by close (or with the client) needs nothing more.
func (m *leaseManager) watch(s *Session) {
	defer m.wg.Done()
	select {
	case <-s.Done():
	case <-m.ctx.Done():
		return
	}
	if errors.Is(s.Err(), ErrSessionLost) {
		m.lost(s)
	}
}

// close stops renewals. Leases are left to expire rather than revoked, so a
// restarting writer's keys survive the restart.
func (m *leaseManager) close() {
	m.cancel()
	m.wg.Wait()
	m.mu.Lock()
	sessions := make([]*Session, 0, len(m.leases))
	for s := range m.leases {
		sessions = append(sessions, s)
	}
	m.mu.Unlock()
	for _, s := range sessions {
		s.Close()
	}
}
