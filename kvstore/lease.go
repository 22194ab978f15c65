package kvstore

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// leaseManager hands out etcd leases for lease-bound keys, at most limit
// keys per lease, keeps them alive, and tells the owners of a lost lease's
// keys so they can publish them again.
//
// A lease is lost when etcd revokes it (it expired while this process could
// not renew it, or someone revoked it) or when renewal has not succeeded for
// a whole TTL. Either way the keys attached to it are gone (or about to be)
// and must be re-put under a fresh lease.
type leaseManager struct {
	etcd  *clientv3.Client
	ttl   time.Duration
	limit int
	log   *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	grantMu sync.Mutex // serialises grants so concurrent acquirers share one new lease

	mu        sync.Mutex
	current   clientv3.LeaseID
	leases    map[clientv3.LeaseID]map[string]struct{}
	keyLease  map[string]clientv3.LeaseID
	observers map[string]func(keys []string) // key prefix → owner
}

func newLeaseManager(etcd *clientv3.Client, ttl time.Duration, limit int, log *slog.Logger) *leaseManager {
	ctx, cancel := context.WithCancel(context.Background())
	return &leaseManager{
		etcd: etcd, ttl: ttl, limit: limit, log: log,
		ctx: ctx, cancel: cancel,
		leases:    make(map[clientv3.LeaseID]map[string]struct{}),
		keyLease:  make(map[string]clientv3.LeaseID),
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

// acquire returns the lease key should be attached to, granting a new lease
// when the current one is full.
func (m *leaseManager) acquire(ctx context.Context, key string) (clientv3.LeaseID, error) {
	m.mu.Lock()
	if id, ok := m.keyLease[key]; ok {
		m.mu.Unlock()
		return id, nil
	}
	if id := m.current; id != 0 && len(m.leases[id]) < m.limit {
		m.attachLocked(key, id)
		m.mu.Unlock()
		return id, nil
	}
	m.mu.Unlock()

	m.grantMu.Lock()
	defer m.grantMu.Unlock()
	// Another acquirer may have granted a lease while we waited.
	m.mu.Lock()
	if id := m.current; id != 0 && len(m.leases[id]) < m.limit {
		m.attachLocked(key, id)
		m.mu.Unlock()
		return id, nil
	}
	m.mu.Unlock()

	resp, err := m.etcd.Grant(ctx, int64(m.ttl/time.Second))
	if err != nil {
		return 0, fmt.Errorf("grant lease (ttl %s): %w", m.ttl, err)
	}
	id := resp.ID
	m.mu.Lock()
	m.leases[id] = make(map[string]struct{})
	m.current = id
	m.attachLocked(key, id)
	m.mu.Unlock()

	m.wg.Add(1)
	go m.keepAlive(id)
	m.log.Debug("granted lease", "lease", fmt.Sprintf("%x", int64(id)), "ttl", m.ttl)
	return id, nil
}

func (m *leaseManager) attachLocked(key string, id clientv3.LeaseID) {
	m.leases[id][key] = struct{}{}
	m.keyLease[key] = id
}

// release forgets key (it was deleted).
func (m *leaseManager) release(key string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if id, ok := m.keyLease[key]; ok {
		delete(m.leases[id], key)
		delete(m.keyLease, key)
	}
}

// live reports whether id is a lease this manager holds.
func (m *leaseManager) live(id clientv3.LeaseID) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.leases[id]
	return ok
}

// lost drops lease id and tells the owners of its keys. Called when renewal
// stops or when etcd says the lease does not exist.
func (m *leaseManager) lost(id clientv3.LeaseID) {
	m.mu.Lock()
	keys, ok := m.leases[id]
	if !ok {
		m.mu.Unlock()
		return
	}
	delete(m.leases, id)
	if m.current == id {
		m.current = 0
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

	m.log.Warn("etcd lease lost; re-publishing its keys", "lease", fmt.Sprintf("%x", int64(id)), "keys", len(keys))
	for prefix, fn := range notify {
		fn(byOwner[prefix])
	}
}

func (m *leaseManager) keepAlive(id clientv3.LeaseID) {
	defer m.wg.Done()
	ch, err := m.etcd.KeepAlive(m.ctx, id)
	if err == nil {
		for range ch {
			// Draining keeps clientv3 from logging a full channel; the
			// responses carry nothing we need.
		}
	}
	if m.ctx.Err() != nil {
		return
	}
	// The channel closes when etcd reports the lease gone or when no renewal
	// succeeded for a whole TTL: either way the keys must be re-put.
	m.lost(id)
}

// close stops renewals. Leases are left to expire rather than revoked, so a
// restarting writer's keys survive the restart.
func (m *leaseManager) close() {
	m.cancel()
	m.wg.Wait()
}
