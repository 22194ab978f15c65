package identity

// Design notes.
//
// Keys. For cluster C (name) with cluster ID K:
//
//	trellis/v1/identities/C/<id>          v1.Identity JSON (id = K<<16 | local).
//	                                       Published: remote clusters read it.
//	                                       No lease: it must survive restarts.
//	trellis/alloc/C/labels/<sha256 hex>   decimal <id>: the label index. The
//	                                       hash is of the canonical label set
//	                                       (see canonicalLabels). Private.
//	trellis/alloc/C/refs/<id>/<replica>   the label hash; bound to the
//	                                       replica's own lease. One per API
//	                                       server replica using <id>.
//
// Invariant: an index key L→N exists exactly when identity key N exists and
// holds the labels L. Allocation writes both in one transaction and GC
// deletes both in one transaction, so only a hand edit can break it;
// Acquire heals what it finds broken: a missing identity key is re-created
// from the index, and an index that names an identity with other labels
// (or no identity of this cluster at all) is deleted and the labels
// allocated afresh.
//
// Acquire. A per-label-set reference count in memory answers repeated
// acquisitions without etcd. The first one (0→1) in a replica reads the
// index; if present, it reads the identity key and checks its labels, then
// commits
//
//	If(ModRevision(index) == seen, ModRevision(idKey) == seen)
//	Then(Put(index, same value), Put(ref, lease))
//
// If the index is absent it picks a free local id and commits
//
//	If(CreateRevision(index) == 0, CreateRevision(idKey) == 0)
//	Then(Put(idKey, JSON), Put(index), Put(ref, lease))
//
// A failed compare means another replica (or GC) got there first: re-read
// and try again (another replica that won the same labels is simply
// joined), at most maxAttempts times. The free id is chosen from a local
// bitmap of used ids, loaded once and refreshed by every GC pass, so no
// allocation scans etcd; the probe starts at a position derived from the
// label hash, so two replicas allocating different label sets at the same
// moment rarely pick the same id, and a label set that was collected and
// comes back tends to get its old id again.
//
// Release. At zero references the replica deletes its ref key (comparing
// its value, the label hash, so a late retry never deletes a ref that now
// belongs to another label set). If that fails, Run retries it. The lease
// is the backstop: a replica that dies leaves refs that expire after
// LeaseTTL.
//
// GC, and why it never deletes an identity in use. etcd cannot compare
// "this prefix is empty", so GC compares something every reference writer
// touches: every transaction that creates a ref key also writes the index
// key of that identity (the re-put of an unchanged value still bumps its
// ModRevision). A GC pass lists identity keys, index keys and ref keys at
// one revision R. An identity with no ref at R is a candidate, remembered
// with the ModRevisions of its identity key and index key(s). It is deleted
// only when it was a candidate with exactly the same ModRevisions for at
// least GCGrace and in an earlier pass, by
//
//	If(ModRevision(idKey) == m0, ModRevision(index) == m1 ...)
//	Then(Delete(idKey), Delete(index) ...)
//
// Race-freedom: a ref committed before R is seen at R (or was deleted,
// which is a release). A ref committed after R bumped the index, so the
// delete's compare fails. A ref transaction that reads the index before
// the delete and commits after it fails its own compare (the index is gone
// or re-created with a new ModRevision) and re-allocates. A new label set
// cannot take the id while the identity key exists (allocation requires
// CreateRevision(idKey) == 0), and if it takes the id of an orphan index
// the identity key's compare fails. So no delete ever commits while a ref
// key written by a successful transaction exists. Writing the private
// index rather than the published identity key keeps reference churn
// invisible to the remote clusters that watch identities. (The argument
// assumes only allocators write under trellis/alloc/: an index key put by
// hand after a GC listing is not among the keys that pass compares.)
//
// The grace period (default max(GCInterval, LeaseTTL)) is what keeps a live
// replica's identities when its lease is lost: etcd deletes the refs at
// once, and the replica notices within a keepalive interval (LeaseTTL/3),
// grants a new lease and re-publishes every reference through the same
// transaction, which bumps the index and restarts the grace. It also keeps
// a released identity (and so its number) for a while in case its pods
// come back.
//
// Lease. The allocator holds its own kvstore.Session (one lease, kept
// alive until Close) rather than going through the client's lease manager:
// that one re-publishes a SyncStore's keys with plain puts, while a
// reference must be re-published through the compare above. When the
// session is lost (revoked, expired, or no renewal for a whole TTL) it
// re-publishes, with backoff, every reference that was on that lease. A
// reference whose identity was collected meanwhile (the replica was cut
// off for longer than the grace) is allocated again, preferring the same
// id; if another replica already re-allocated the labels under another id,
// the new id is used from then on and an error is logged.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/source"
	"github.com/trellis-mesh/trellis/kvstore"
)

// Defaults for [Config].
const (
	DefaultGCInterval     = time.Minute
	DefaultLeaseTTL       = 15 * time.Minute
	DefaultRequestTimeout = 30 * time.Second
)

// AllocPrefix is the root of the allocator's private keys; remote clusters,
// which may read only trellis/v1/, never see them.
const AllocPrefix = "trellis/alloc/"

// maxAttempts bounds the read-then-compare-and-swap rounds of one Acquire;
// maxProbes bounds the ids one allocation round tries after finding an id
// taken by another replica.
const (
	maxAttempts = 32
	maxProbes   = 64
)

// Errors, matched with errors.Is.
var (
	// ErrNoFreeID: every local id of the configured range is in use.
	ErrNoFreeID = errors.New("no free identity")
	// ErrNotAcquired: Release of labels this allocator holds no reference on.
	ErrNotAcquired = errors.New("labels not acquired")
	// ErrClosed: the allocator was closed.
	ErrClosed = errors.New("identity allocator closed")
	// ErrContention: Acquire lost every compare-and-swap it tried.
	ErrContention = errors.New("too much contention")
)

var _ source.IdentityAllocator = (*Allocator)(nil)

// Config describes an Allocator. Client, Cluster, ClusterID and Replica are
// required; the rest have useful zero values.
type Config struct {
	// Client is the etcd connection. The allocator never closes it; it
	// must stay open until Close.
	Client *kvstore.Client
	// Cluster is the local cluster's name, the <cluster> segment of keys.
	Cluster string
	// ClusterID forms the high bits of every identity allocated.
	ClusterID v1.ClusterID
	// Replica names this API server replica among those sharing the etcd:
	// the pod name, or hostname-pid. It must be unique among live replicas
	// (two live replicas with one name would drop each other's
	// references); a restarted replica may reuse its name. 1-253
	// characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'.
	Replica string

	// GCInterval is the time between garbage collection passes; default
	// one minute.
	GCInterval time.Duration
	// GCGrace is how long an identity must stay unreferenced, with nobody
	// acquiring it, before it is deleted; default max(GCInterval,
	// LeaseTTL). Shorter than LeaseTTL/3 (the keepalive interval) risks
	// deleting the identities of a replica that is re-publishing its
	// references after a lost lease.
	GCGrace time.Duration
	// LeaseTTL is the TTL of the lease that holds this replica's
	// references: how long they outlive a replica that stops without
	// coming back; default 15 minutes. etcd raises TTLs below its minimum
	// (about 2 s).
	LeaseTTL time.Duration
	// MinLocalID and MaxLocalID bound the local part of allocated
	// identities; defaults 1 and 65535. Raise MinLocalID to keep low ids
	// for identities allocated elsewhere.
	MinLocalID, MaxLocalID uint16
	// RequestTimeout bounds one etcd request; default 30 s.
	RequestTimeout time.Duration

	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	if c.GCInterval == 0 {
		c.GCInterval = DefaultGCInterval
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = DefaultLeaseTTL
	}
	if c.GCGrace == 0 {
		c.GCGrace = max(c.GCInterval, c.LeaseTTL)
	}
	if c.MinLocalID == 0 {
		c.MinLocalID = 1
	}
	if c.MaxLocalID == 0 {
		c.MaxLocalID = math.MaxUint16
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

func (c *Config) validate() error {
	if c.Client == nil {
		return errors.New("identity: config: Client is required (an open kvstore.Client)")
	}
	if err := v1.ValidateClusterName(c.Cluster); err != nil {
		return fmt.Errorf("identity: config: Cluster: %w", err)
	}
	if err := v1.ValidateClusterID(c.ClusterID); err != nil {
		return fmt.Errorf("identity: config: ClusterID: %w", err)
	}
	if msg := checkReplica(c.Replica); msg != "" {
		return fmt.Errorf("identity: config: Replica %q: %s", c.Replica, msg)
	}
	if c.GCInterval < 0 || c.GCGrace < 0 || c.RequestTimeout < 0 {
		return fmt.Errorf("identity: config: negative duration (GCInterval %s, GCGrace %s, RequestTimeout %s)", c.GCInterval, c.GCGrace, c.RequestTimeout)
	}
	if c.LeaseTTL < time.Second {
		return fmt.Errorf("identity: config: LeaseTTL %s: want at least 1s (etcd leases count whole seconds)", c.LeaseTTL)
	}
	if c.MinLocalID > c.MaxLocalID {
		return fmt.Errorf("identity: config: MinLocalID %d > MaxLocalID %d", c.MinLocalID, c.MaxLocalID)
	}
	return nil
}

func checkReplica(s string) string {
	if s == "" {
		return "required: a name unique among the API server replicas sharing this etcd (the pod name, or hostname-pid)"
	}
	if len(s) > 253 {
		return "longer than 253 characters"
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-') {
			return "want only A-Z, a-z, 0-9, '.', '_', ':' and '-' (it is a key segment)"
		}
	}
	return ""
}

// Allocator hands out the cluster's numeric identities. It is safe for
// concurrent use, and for several replicas (each with its own Allocator and
// Replica name) sharing one etcd.
type Allocator struct {
	cfg    Config
	client *kvstore.Client
	log    *slog.Logger

	idPrefix, indexPrefix, refsPrefix string

	// ctx is cancelled by Close; it bounds lease renewal and re-publishing.
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once

	// mu guards entries and every entry's users. Lock order: entry.mu
	// before mu.
	mu      sync.Mutex
	entries map[string]*entry // by canonical label set

	sessionMu sync.Mutex
	session   *kvstore.Session // nil: none granted (or lost)

	view idView

	allocated, collected, republished, gcPasses atomic.Uint64
	heldSets, heldRefs                          atomic.Int64

	hooks testHooks
}

// entry is this replica's use of one label set.
type entry struct {
	ls *labelSet
	// users counts goroutines between getEntry and putEntry; guarded by
	// Allocator.mu. An entry leaves the map when it has no users, no
	// references and no ref key to clean up.
	users int

	// mu serialises the etcd work for this label set.
	mu      sync.Mutex
	refs    int
	id      v1.NumericIdentity
	session *kvstore.Session // the session the ref key was put with
	// stale: refs is 0 but deleting the ref key failed; Run retries.
	stale bool
}

// testHooks let tests interleave etcd operations deterministically. Nil
// hooks do nothing.
type testHooks struct {
	// beforeJoin runs in Acquire after it read the label index and the
	// identity key, just before the transaction that takes the reference.
	beforeJoin func(id v1.NumericIdentity)
	// beforeGCDelete runs in a GC pass just before a delete transaction.
	beforeGCDelete func(id v1.NumericIdentity)
}

// New returns an Allocator for cfg. It does not contact etcd.
func New(cfg Config) (*Allocator, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	clusterAlloc := AllocPrefix + cfg.Cluster + "/"
	a := &Allocator{
		cfg:         cfg,
		client:      cfg.Client,
		log:         cfg.Logger.With("component", "identity", "cluster", cfg.Cluster, "replica", cfg.Replica),
		idPrefix:    v1.KindPrefix(v1.KindIdentities, cfg.Cluster),
		indexPrefix: clusterAlloc + "labels/",
		refsPrefix:  clusterAlloc + "refs/",
		ctx:         ctx,
		cancel:      cancel,
		entries:     make(map[string]*entry),
	}
	a.view.min, a.view.max = cfg.MinLocalID, cfg.MaxLocalID
	return a, nil
}

// Close stops lease renewal and reference re-publishing and waits for
// them. It does not revoke the lease: this replica's references stay until
// it expires (LeaseTTL), so a restart keeps every identity. Acquire and
// Release fail with ErrClosed afterwards and Run returns. Safe on nil and
// safe to call twice.
func (a *Allocator) Close() error {
	if a == nil {
		return nil
	}
	a.closeOnce.Do(func() {
		a.cancel()
		// Barrier: a grant in progress finishes (and registers its
		// watcher with wg) before we wait; later ones see ctx done.
		a.sessionMu.Lock()
		a.session = nil
		a.sessionMu.Unlock()
		a.wg.Wait()
	})
	return nil
}

// Acquire returns the identity for labels, allocating it on first use, and
// takes one reference on it. labels must form a valid v1.Identity label
// set (errors match v1.ErrInvalid); the map is not retained.
func (a *Allocator) Acquire(ctx context.Context, labels map[string]string) (v1.NumericIdentity, error) {
	ls, err := a.newLabelSet(labels)
	if err != nil {
		return 0, fmt.Errorf("identity: acquire: %w", err)
	}
	if a.ctx.Err() != nil {
		return 0, fmt.Errorf("identity: acquire %s: %w", ls, ErrClosed)
	}
	e := a.getEntry(ls, true)
	e.mu.Lock()
	defer e.mu.Unlock()
	defer a.putEntry(e) // runs first, with e.mu held
	if e.refs > 0 {
		e.refs++
		a.heldRefs.Add(1)
		return e.id, nil
	}
	id, session, err := a.publish(ctx, e.ls, 0)
	if err != nil {
		return 0, fmt.Errorf("identity: acquire %s in cluster %s: %w", ls, a.cfg.Cluster, err)
	}
	e.refs, e.id, e.session, e.stale = 1, id, session, false
	a.heldRefs.Add(1)
	a.heldSets.Add(1)
	return id, nil
}

// Release drops one reference on the identity of labels. When this
// replica's last reference goes, its ref key is deleted; the identity
// itself is deleted by a GC pass once no replica has used it for GCGrace.
// Release fails only when this allocator holds no reference on labels
// (ErrNotAcquired) or is closed: if etcd cannot be reached, the reference
// is still dropped and Run deletes the ref key later.
func (a *Allocator) Release(ctx context.Context, labels map[string]string) error {
	ls, err := a.newLabelSet(labels)
	if err != nil {
		return fmt.Errorf("identity: release: %w", err)
	}
	if a.ctx.Err() != nil {
		return fmt.Errorf("identity: release %s: %w", ls, ErrClosed)
	}
	e := a.getEntry(ls, false)
	if e == nil {
		return fmt.Errorf("identity: release %s: %w", ls, ErrNotAcquired)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	defer a.putEntry(e) // runs first, with e.mu held
	if e.refs == 0 {
		return fmt.Errorf("identity: release %s: %w", ls, ErrNotAcquired)
	}
	e.refs--
	a.heldRefs.Add(-1)
	if e.refs > 0 {
		return nil
	}
	a.heldSets.Add(-1)
	if err := a.deleteRef(ctx, e); err != nil {
		e.stale = true
		a.log.Warn("delete identity reference failed; will retry", "id", e.id, "labels", ls.String(), "err", err)
	}
	return nil
}

// Identities lists the identities of this cluster as etcd holds them,
// sorted by ID. Entries that fail to decode are logged and skipped.
func (a *Allocator) Identities(ctx context.Context) ([]v1.Identity, error) {
	var out []v1.Identity
	_, err := a.list(ctx, a.idPrefix, 0, false, func(kv kvstore.KeyValue) {
		id, err := v1.DecodeIdentityEntry(kv.Key, kv.Value)
		if err != nil {
			a.log.Warn("skipping undecodable identity", "key", kv.Key, "err", err)
			return
		}
		out = append(out, id)
	})
	if err != nil {
		return nil, fmt.Errorf("identity: list identities of cluster %s: %w", a.cfg.Cluster, err)
	}
	sortIdentities(out)
	return out, nil
}

// Stats are counters for status output and metrics.
type Stats struct {
	// LabelSets is how many label sets this replica holds references on;
	// References is the sum of their reference counts.
	LabelSets, References int
	// Allocated counts identities this replica created, Collected those
	// its GC deleted, Republished references it re-published after a lost
	// lease, GCPasses its completed GC passes.
	Allocated, Collected, Republished, GCPasses uint64
}

// Stats returns the allocator's counters. It does not wait for etcd.
func (a *Allocator) Stats() Stats {
	return Stats{
		LabelSets:   int(a.heldSets.Load()),
		References:  int(a.heldRefs.Load()),
		Allocated:   a.allocated.Load(),
		Collected:   a.collected.Load(),
		Republished: a.republished.Load(),
		GCPasses:    a.gcPasses.Load(),
	}
}

// getEntry returns the entry for ls, creating it if create is set (else
// nil when absent), and counts the caller as a user until putEntry.
func (a *Allocator) getEntry(ls *labelSet, create bool) *entry {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := a.entries[ls.canonical]
	if e == nil {
		if !create {
			return nil
		}
		e = &entry{ls: ls}
		a.entries[ls.canonical] = e
	}
	e.users++
	return e
}

// putEntry ends a use begun by getEntry. The caller holds e.mu.
func (a *Allocator) putEntry(e *entry) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e.users--
	a.maybeForgetLocked(e)
}

// maybeForgetLocked drops e from the map when nothing needs it. Callers
// hold e.mu and a.mu.
func (a *Allocator) maybeForgetLocked(e *entry) {
	if e.users == 0 && e.refs == 0 && !e.stale && a.entries[e.ls.canonical] == e {
		delete(a.entries, e.ls.canonical)
	}
}

// snapshot returns the current entries.
func (a *Allocator) snapshot() []*entry {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*entry, 0, len(a.entries))
	for _, e := range a.entries {
		out = append(out, e)
	}
	return out
}

// requestContext bounds one etcd request.
func (a *Allocator) requestContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, a.cfg.RequestTimeout)
}

// Keys.

func (a *Allocator) idKey(id v1.NumericIdentity) string { return v1.IdentityKey(a.cfg.Cluster, id) }

func (a *Allocator) indexKey(ls *labelSet) string { return a.indexPrefix + ls.hash }

func (a *Allocator) refKey(id v1.NumericIdentity) string {
	return a.refsPrefix + id.String() + "/" + a.cfg.Replica
}

// parseID parses a decimal identity of this cluster (as found in index
// values and key segments), checking its cluster bits and local range.
func (a *Allocator) parseID(s string) (v1.NumericIdentity, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || strconv.FormatUint(n, 10) != s {
		return 0, fmt.Errorf("%q is not a decimal identity", cut(s))
	}
	id := v1.NumericIdentity(n)
	if id.ClusterID() != a.cfg.ClusterID {
		return 0, fmt.Errorf("identity %d has cluster bits %d, want %d", id, id.ClusterID(), a.cfg.ClusterID)
	}
	if id.Local() == 0 {
		return 0, fmt.Errorf("identity %d has local part 0", id)
	}
	return id, nil
}

// cut bounds a string from etcd before it goes into an error or a log.
func cut(s string) string {
	const n = 200
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// sleep waits d or until ctx ends, reporting whether ctx is still alive.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// refSuffixID parses the <id> of a ref key "<id>/<replica>" relative to
// the refs prefix.
func refSuffixID(rest string) (string, bool) {
	id, _, ok := strings.Cut(rest, "/")
	return id, ok
}
