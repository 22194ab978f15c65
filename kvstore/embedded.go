package kvstore

// Design notes: the bounds of the embedded etcd.
//
// etcd keeps every revision of every key until it is compacted, and its
// database file (bbolt) never shrinks on its own: pages freed by a
// compaction are reused, but only a defragmentation returns them to the
// file system. An etcd left alone therefore grows with every write, until
// its quota trips the NOSPACE alarm and it refuses all writes. The
// embedded etcd is bounded in four layers:
//
//  1. Auto-compaction (etcd's "periodic" mode, AutoCompactionRetention,
//     1 minute by default): every retention, etcd compacts the history
//     older than one retention, so it holds 1-2 minutes of history. The
//     readers need history only to hand a listing over to its watch and to
//     resume a watch after a reconnect of a few seconds; a reader away
//     longer relists, which WatchStore does anyway after a compaction.
//  2. The quota (QuotaBackendBytes, 1 GiB by default) caps the file: about
//     twenty times the live data of the largest cluster we plan for
//     (150 000 endpoints of ~220 B of JSON take 54 MiB), and small enough
//     that a runaway writer shows up long before it fills a disk.
//  3. Run's maintenance loop, every MaintenanceInterval (10 s), reads the
//     sizes in-process (no request to etcd) and acts in this order:
//     - NOSPACE alarm: compact everything (keeping no history), defragment,
//     and disarm the alarm once the file is below three quarters of the
//     quota; otherwise log what to raise and try again every 5 minutes.
//     - pressure (the file at three quarters of the quota): compact to the
//     revision of the previous look (so at least one interval of history
//     stays) and defragment, at most once a minute. The quota counts the
//     file, not the live data, so a fragmented file trips NOSPACE too.
//     - routine: defragment when at least 64 MiB and half the file are
//     free, at most once per DefragInterval (1 hour).
//  4. At start, etcd defragments before it serves when that frees 64 MiB
//     or more: nobody is connected yet, so that stall is free.
//
// A defragmentation copies the live data into a new file and blocks every
// read and write of this single member while it runs: milliseconds for
// the few MB of a small mesh, half a second for 30 MB in use on a 2-core
// VM, growing with the data in use. That is why it runs only when it
// returns a lot, and at most hourly when nothing presses.
//
// etcd's write-ahead log is bounded apart from the database: a raft
// snapshot every 2 000 entries (instead of etcd's 10 000, whose entries
// may each be a 1 MiB transaction) lets etcd release old 64 MB WAL
// segments, of which it keeps MaxWALFiles.
//
// A single member has no peers, so it has no peer listener: etcd insists
// on a peer URL to advertise (it names the member), but nothing dials it
// and nothing listens there.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/storage/mvcc"
	"go.uber.org/zap"
)

// Defaults of EmbeddedConfig.
const (
	DefaultCompactionRetention = time.Minute
	DefaultQuotaBackendBytes   = int64(1 << 30)
	DefaultDefragInterval      = time.Hour
	DefaultMaintenanceInterval = 10 * time.Second
)

const (
	// defragMinFree is the least free space a routine or start-up
	// defragmentation must return to be worth its stall.
	defragMinFree = 64 << 20
	// pressureSpacing and nospaceRetry space out the compact-and-defrag
	// of pressure and of NOSPACE recovery: when the live data itself is
	// the problem, they would otherwise stall the member at every look.
	pressureSpacing = time.Minute
	nospaceRetry    = 5 * time.Minute
	// snapshotCount is the raft entries between snapshots, each of which
	// lets etcd release the WAL segments before it.
	snapshotCount = 2000
	// maxWALFiles is how many released WAL segments (64 MB each) etcd
	// keeps; segments a recovery still needs are never removed.
	maxWALFiles = 2
	// noPeerURL is the peer URL the member advertises: etcd requires one
	// (it enters the member ID), a single member never dials it, and port
	// 0 says there is nothing there.
	noPeerURL = "http://127.0.0.1:0"
)

// EmbeddedConfig describes an in-process, single-member etcd. The zero
// value of every bound is its default.
type EmbeddedConfig struct {
	// Dir holds etcd's data. Required; reused across restarts.
	Dir string
	// Name is the member name; "trellis" when empty.
	Name string
	// ClientAddr is host:port for clients. Port 0 picks a free port, which
	// Effective() then reports so a restart can reuse it. Default
	// 127.0.0.1:0.
	ClientAddr string
	// TLS, when set, serves clients over TLS; with ClientCertAuth, clients
	// must present a certificate signed by TrustedCAFile.
	TLS *EmbeddedTLS
	// AutoCompactionRetention is how much history etcd keeps: every
	// retention it compacts what is older than one retention (etcd's
	// "periodic" mode). Zero means DefaultCompactionRetention; negative
	// keeps all history.
	AutoCompactionRetention time.Duration
	// QuotaBackendBytes caps the database file; past it etcd raises the
	// NOSPACE alarm and refuses writes. Zero means
	// DefaultQuotaBackendBytes.
	QuotaBackendBytes int64
	// MaintenanceInterval is how often Run looks at the sizes and the
	// alarms; zero means DefaultMaintenanceInterval.
	MaintenanceInterval time.Duration
	// DefragInterval is the least time between two routine
	// defragmentations by Run; zero means DefaultDefragInterval.
	DefragInterval time.Duration
	// Logger receives what the maintenance loop does; nil discards it.
	Logger *slog.Logger
	// EtcdLogger receives etcd's own logs at warn level and above; nil
	// discards them.
	EtcdLogger *zap.Logger
}

// EmbeddedTLS names the server's certificate files.
type EmbeddedTLS struct {
	CertFile, KeyFile string
	TrustedCAFile     string
	ClientCertAuth    bool
}

func (c *EmbeddedConfig) setDefaults() {
	if c.Name == "" {
		c.Name = "trellis"
	}
	if c.ClientAddr == "" {
		c.ClientAddr = "127.0.0.1:0"
	}
	if c.AutoCompactionRetention == 0 {
		c.AutoCompactionRetention = DefaultCompactionRetention
	}
	if c.QuotaBackendBytes == 0 {
		c.QuotaBackendBytes = DefaultQuotaBackendBytes
	}
	if c.MaintenanceInterval <= 0 {
		c.MaintenanceInterval = DefaultMaintenanceInterval
	}
	if c.DefragInterval <= 0 {
		c.DefragInterval = DefaultDefragInterval
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Embedded is a running in-process etcd.
type Embedded struct {
	etcd *embed.Etcd
	cfg  EmbeddedConfig
	log  *slog.Logger

	// maintMu serialises compactions and defragmentations (Run's and
	// callers' of Defragment and Compact).
	maintMu sync.Mutex
	// compactions and defrags count, for metrics, what was done and why.
	compactions, defrags reasons
	lastDefragNanos      atomic.Int64 // how long the last defragmentation took
	// closed is set by Close. The etcd pointer stays: a metrics scrape
	// that began before Close (an HTTP server drains its handlers after
	// its owner moved on) must not find it nil.
	closed atomic.Bool
}

// reasons counts maintenance actions by why they ran.
type reasons struct {
	pressure, nospace, routine, request atomic.Int64
}

func (r *reasons) inc(reason string) {
	switch reason {
	case "pressure":
		r.pressure.Add(1)
	case "nospace":
		r.nospace.Add(1)
	case "routine":
		r.routine.Add(1)
	default:
		r.request.Add(1)
	}
}

func (r *reasons) each(fn func(reason string, n int64)) {
	fn("pressure", r.pressure.Load())
	fn("nospace", r.nospace.Load())
	fn("routine", r.routine.Load())
	fn("request", r.request.Load())
}

// StartEmbedded starts etcd and waits until it serves clients or ctx ends.
func StartEmbedded(ctx context.Context, cfg EmbeddedConfig) (*Embedded, error) {
	if cfg.Dir == "" {
		return nil, errors.New("embedded etcd: data dir is required")
	}
	if cfg.QuotaBackendBytes < 0 {
		return nil, fmt.Errorf("embedded etcd: quota %d bytes is negative", cfg.QuotaBackendBytes)
	}
	cfg.setDefaults()
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("embedded etcd: create data dir %s: %w", cfg.Dir, err)
	}
	// Resolve port 0 here, once, and keep the resolved address, so that a
	// restart from Effective() serves clients where they were.
	var err error
	if cfg.ClientAddr, err = resolvePort(cfg.ClientAddr); err != nil {
		return nil, fmt.Errorf("embedded etcd: client address: %w", err)
	}

	ec := embed.NewConfig()
	ec.Name = cfg.Name
	ec.Dir = cfg.Dir
	scheme := "http"
	if cfg.TLS != nil {
		scheme = "https"
		ec.ClientTLSInfo.CertFile = cfg.TLS.CertFile
		ec.ClientTLSInfo.KeyFile = cfg.TLS.KeyFile
		ec.ClientTLSInfo.TrustedCAFile = cfg.TLS.TrustedCAFile
		ec.ClientTLSInfo.ClientCertAuth = cfg.TLS.ClientCertAuth
	}
	clientURL := url.URL{Scheme: scheme, Host: cfg.ClientAddr}
	ec.ListenClientUrls = []url.URL{clientURL}
	ec.AdvertiseClientUrls = []url.URL{clientURL}
	// No peer listener (see the design notes). The advertised URL names
	// the member only; it is recorded at the first start, and a data dir
	// from before keeps the loopback URL it recorded then, where nothing
	// listens any more either.
	peerURL, _ := url.Parse(noPeerURL)
	ec.ListenPeerUrls = nil
	ec.AdvertisePeerUrls = []url.URL{*peerURL}
	ec.InitialCluster = ec.InitialClusterFromName(cfg.Name)
	// The member and cluster IDs derive from the peer URLs and this token.
	// The peer URL is the same for every Trellis etcd, so a random token
	// keeps the IDs of different clusters apart. It is used only when the
	// data dir is new.
	token := make([]byte, 8)
	rand.Read(token)
	ec.InitialClusterToken = "trellis-" + hex.EncodeToString(token)
	// No gRPC gateway (embed enables it by default): nothing here speaks
	// etcd's JSON API, and the gateway dials the server itself presenting
	// the server certificate as a client certificate, which a server whose
	// client CA differs from its server CA refuses.
	ec.EnableGRPCGateway = false
	if cfg.AutoCompactionRetention > 0 {
		ec.AutoCompactionMode = embed.CompactorModePeriodic
		ec.AutoCompactionRetention = cfg.AutoCompactionRetention.String()
	}
	ec.QuotaBackendBytes = cfg.QuotaBackendBytes
	ec.BootstrapDefragThresholdMegabytes = defragMinFree >> 20
	ec.SnapshotCount = snapshotCount
	ec.MaxWalFiles = maxWALFiles
	lg := cfg.EtcdLogger
	if lg == nil {
		lg = zap.NewNop()
	}
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(lg)

	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("embedded etcd: start in %s: %w", cfg.Dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd: serve: %w", err)
	case <-ctx.Done():
		e.Close()
		return nil, fmt.Errorf("embedded etcd: waiting for readiness: %w", ctx.Err())
	}
	return &Embedded{etcd: e, cfg: cfg, log: cfg.Logger.With("etcd", cfg.Dir)}, nil
}

// Endpoints are the client URLs to dial.
func (e *Embedded) Endpoints() []string {
	scheme := "http"
	if e.cfg.TLS != nil {
		scheme = "https"
	}
	return []string{scheme + "://" + e.cfg.ClientAddr}
}

// Effective is the configuration with defaults filled in and ports
// resolved: passing it to StartEmbedded again restarts the same member on
// the same addresses.
func (e *Embedded) Effective() EmbeddedConfig { return e.cfg }

// Server exposes the etcd server for callers that manage auth or inspect
// raft state.
func (e *Embedded) Server() *embed.Etcd { return e.etcd }

// Close stops etcd. It is safe on nil and safe to call twice. Stop Run
// first: a defragmentation in progress holds the database.
func (e *Embedded) Close() error {
	if e == nil || e.closed.Swap(true) {
		return nil
	}
	e.etcd.Close()
	return nil
}

// EmbeddedStatus is the state of the embedded etcd's store, read in
// process.
type EmbeddedStatus struct {
	// Revision is the store's current revision; CompactRevision the one
	// it was last compacted to (history before it is gone), -1 never.
	Revision, CompactRevision int64
	// DBSize is the database file's size, what the quota counts;
	// DBSizeInUse the part holding data (live keys and the history since
	// the last compaction). The difference is what a defragmentation
	// returns.
	DBSize, DBSizeInUse int64
	// Quota is QuotaBackendBytes.
	Quota int64
	// Alarms are the alarms raised (NOSPACE, CORRUPT); etcd refuses
	// writes while any is. NoSpace reports NOSPACE among them, the one
	// the maintenance loop recovers from.
	Alarms  []string
	NoSpace bool
}

// Status reads the store's sizes, revisions and alarms.
func (e *Embedded) Status() EmbeddedStatus {
	s := e.etcd.Server
	st := EmbeddedStatus{
		Revision: s.KV().Rev(), CompactRevision: s.KV().FirstRev(),
		DBSize: s.Backend().Size(), DBSizeInUse: s.Backend().SizeInUse(),
		Quota: e.cfg.QuotaBackendBytes,
	}
	for _, a := range s.Alarms() {
		st.Alarms = append(st.Alarms, a.Alarm.String())
		st.NoSpace = st.NoSpace || a.Alarm == pb.AlarmType_NOSPACE
	}
	return st
}

// ErrNoSpace matches CheckWritable's error while the NOSPACE alarm is
// raised.
var ErrNoSpace = errors.New("etcd NOSPACE alarm: the database reached its quota and etcd refuses writes")

// CheckWritable returns an error while etcd has an alarm raised, and so
// refuses writes: for NOSPACE one matching ErrNoSpace, with the sizes and
// what happens next.
func (e *Embedded) CheckWritable() error {
	st := e.Status()
	switch {
	case st.NoSpace:
		return fmt.Errorf("%w (file %s, in use %s, quota %s); the maintenance loop compacts, defragments and disarms it once the live data fits in three quarters of the quota, otherwise raise the quota and restart",
			ErrNoSpace, mib(st.DBSize), mib(st.DBSizeInUse), mib(st.Quota))
	case len(st.Alarms) > 0:
		return fmt.Errorf("etcd alarm %s raised: etcd refuses writes until an operator clears it", strings.Join(st.Alarms, ", "))
	}
	return nil
}

// Run is the maintenance loop of the design notes: it looks every
// MaintenanceInterval and recovers from NOSPACE, relieves pressure and
// defragments, until ctx ends. It returns nil when ctx ends (after a
// defragmentation in progress, which cannot be interrupted).
func (e *Embedded) Run(ctx context.Context) error {
	t := time.NewTicker(e.cfg.MaintenanceInterval)
	defer t.Stop()
	m := maintenance{lastDefrag: time.Now()} // a start-up defrag just ran if it was worth it
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		e.maintain(ctx, &m, time.Now())
	}
}

// maintenance is Run's memory between looks.
type maintenance struct {
	prevRev                               int64 // the revision at the previous look
	lastDefrag, lastPressure, lastNoSpace time.Time
}

func (e *Embedded) maintain(ctx context.Context, m *maintenance, now time.Time) {
	st := e.Status()
	high := st.Quota / 4 * 3
	free := st.DBSize - st.DBSizeInUse
	defer func() { m.prevRev = st.Revision }()
	switch {
	case st.NoSpace:
		if now.Sub(m.lastNoSpace) < nospaceRetry {
			return
		}
		m.lastNoSpace, m.lastDefrag = now, now
		e.recoverNoSpace(ctx, st, high)
	case st.DBSize >= high:
		if now.Sub(m.lastPressure) < pressureSpacing {
			return
		}
		m.lastPressure, m.lastDefrag = now, now
		e.relievePressure(ctx, st, m.prevRev)
	case free >= defragMinFree && free*2 >= st.DBSize && now.Sub(m.lastDefrag) >= e.cfg.DefragInterval:
		m.lastDefrag = now
		if err := e.defragment("routine"); err != nil {
			e.log.Error("etcd defragmentation failed", "err", err)
		}
	}
}

// relievePressure compacts the history older than the previous look and
// defragments when that frees a quarter of the file; otherwise the live
// data itself is close to the quota, and it says so.
func (e *Embedded) relievePressure(ctx context.Context, st EmbeddedStatus, prevRev int64) {
	e.log.Warn("etcd database at three quarters of its quota: compacting the history older than the last look",
		"size", st.DBSize, "inUse", st.DBSizeInUse, "quota", st.Quota, "revision", st.Revision, "compactTo", prevRev)
	if prevRev > 0 && prevRev > st.CompactRevision {
		if err := e.compact(ctx, prevRev, "pressure"); err != nil {
			e.log.Error("etcd pressure compaction failed", "revision", prevRev, "err", err)
		}
	}
	after := e.Status()
	if free := after.DBSize - after.DBSizeInUse; free < after.DBSize/4 {
		e.log.Error("etcd live data is close to its quota: writes will be refused (NOSPACE) unless data is deleted or --etcd-quota-backend-bytes is raised",
			"size", after.DBSize, "inUse", after.DBSizeInUse, "quota", after.Quota)
		return
	}
	if err := e.defragment("pressure"); err != nil {
		e.log.Error("etcd pressure defragmentation failed", "err", err)
	}
}

// recoverNoSpace compacts all history, defragments and, when the file is
// then below high, disarms the NOSPACE alarm.
func (e *Embedded) recoverNoSpace(ctx context.Context, st EmbeddedStatus, high int64) {
	e.log.Error("etcd NOSPACE alarm: writes are refused; compacting all history and defragmenting to recover",
		"size", st.DBSize, "inUse", st.DBSizeInUse, "quota", st.Quota, "revision", st.Revision)
	if st.Revision > st.CompactRevision {
		if err := e.compact(ctx, st.Revision, "nospace"); err != nil {
			e.log.Error("etcd NOSPACE recovery: compaction failed", "revision", st.Revision, "err", err)
			return
		}
	}
	if err := e.defragment("nospace"); err != nil {
		e.log.Error("etcd NOSPACE recovery: defragmentation failed", "err", err)
		return
	}
	after := e.Status()
	if after.DBSize >= high {
		e.log.Error("etcd NOSPACE persists: the live data alone is over three quarters of the quota; raise --etcd-quota-backend-bytes and restart, or delete data",
			"size", after.DBSize, "inUse", after.DBSizeInUse, "quota", after.Quota, "retryIn", nospaceRetry)
		return
	}
	_, err := e.etcd.Server.Alarm(ctx, &pb.AlarmRequest{
		Action: pb.AlarmRequest_DEACTIVATE, MemberID: uint64(e.etcd.Server.MemberID()), Alarm: pb.AlarmType_NOSPACE,
	})
	if err != nil {
		e.log.Error("etcd NOSPACE recovery: disarming the alarm failed", "err", err)
		return
	}
	e.log.Warn("etcd recovered from NOSPACE: writes are accepted again; readers that were behind relist",
		"size", after.DBSize, "inUse", after.DBSizeInUse, "quota", after.Quota)
}

// Compact discards the history before rev (the current revision when rev
// is 0) and waits until the space is free for reuse. Readers watching
// from before rev relist.
func (e *Embedded) Compact(ctx context.Context, rev int64) error {
	if rev == 0 {
		rev = e.etcd.Server.KV().Rev()
	}
	return e.compact(ctx, rev, "request")
}

func (e *Embedded) compact(ctx context.Context, rev int64, reason string) error {
	e.maintMu.Lock()
	defer e.maintMu.Unlock()
	_, err := e.etcd.Server.Compact(ctx, &pb.CompactionRequest{Revision: rev, Physical: true})
	if errors.Is(err, mvcc.ErrCompacted) {
		return nil // etcd's own compactor got there first
	}
	if err != nil {
		return fmt.Errorf("embedded etcd %s: compact to revision %d: %w", e.cfg.Dir, rev, err)
	}
	e.compactions.inc(reason)
	return nil
}

// Defragment returns the database's free pages to the file system. It
// blocks every read and write of the member while it runs.
func (e *Embedded) Defragment() error { return e.defragment("request") }

func (e *Embedded) defragment(reason string) error {
	e.maintMu.Lock()
	defer e.maintMu.Unlock()
	before := e.Status()
	start := time.Now()
	if err := e.etcd.Server.Defragment(); err != nil {
		return fmt.Errorf("embedded etcd %s: defragment: %w", e.cfg.Dir, err)
	}
	took := time.Since(start)
	e.lastDefragNanos.Store(int64(took))
	e.defrags.inc(reason)
	after := e.Status()
	e.log.Info("defragmented etcd", "reason", reason, "took", took,
		"sizeBefore", before.DBSize, "sizeAfter", after.DBSize, "inUse", after.DBSizeInUse)
	return nil
}

// Register adds the embedded etcd's collectors to reg: sizes, quota,
// revisions, the alarms, and the compactions and defragmentations of the
// maintenance loop by reason.
func (e *Embedded) Register(reg prometheus.Registerer) error {
	if err := reg.Register(newEmbeddedCollector(e)); err != nil {
		return fmt.Errorf("embedded etcd: register metrics: %w", err)
	}
	return nil
}

// embeddedCollector reads the metrics from the running etcd at scrape
// time, so nothing needs updating them.
type embeddedCollector struct {
	e                                                          *Embedded
	dbSize, dbInUse, quota, revision, compactRevision, noSpace *prometheus.Desc
	alarms, compactions, defrags, defragSeconds                *prometheus.Desc
}

func newEmbeddedCollector(e *Embedded) *embeddedCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("trellis_etcd_"+name, help, labels, nil)
	}
	return &embeddedCollector{
		e:               e,
		dbSize:          d("db_size_bytes", "Size of the embedded etcd's database file (what the quota counts)."),
		dbInUse:         d("db_size_in_use_bytes", "Part of the embedded etcd's database file holding data; a defragmentation returns the rest."),
		quota:           d("quota_backend_bytes", "The embedded etcd's quota: past it, the NOSPACE alarm refuses writes."),
		revision:        d("revision", "The embedded etcd's current store revision."),
		compactRevision: d("compact_revision", "The revision the embedded etcd was last compacted to (-1: never)."),
		noSpace:         d("nospace_alarm", "1 while the embedded etcd's NOSPACE alarm is raised: writes are refused."),
		alarms:          d("alarms", "Alarms the embedded etcd has raised, by type (NOSPACE, CORRUPT): writes are refused while any is.", "alarm"),
		compactions:     d("maintenance_compactions_total", "Compactions by the maintenance loop or on request, by reason (etcd's periodic auto-compaction is not counted).", "reason"),
		defrags:         d("defragmentations_total", "Defragmentations of the embedded etcd, by reason.", "reason"),
		defragSeconds:   d("last_defragmentation_seconds", "How long the last defragmentation stalled the embedded etcd."),
	}
}

func (c *embeddedCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.dbSize, c.dbInUse, c.quota, c.revision, c.compactRevision,
		c.noSpace, c.alarms, c.compactions, c.defrags, c.defragSeconds} {
		ch <- d
	}
}

func (c *embeddedCollector) Collect(ch chan<- prometheus.Metric) {
	if c.e.closed.Load() {
		return // a stopped etcd has nothing to report
	}
	st := c.e.Status()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	gauge(c.dbSize, float64(st.DBSize))
	gauge(c.dbInUse, float64(st.DBSizeInUse))
	gauge(c.quota, float64(st.Quota))
	gauge(c.revision, float64(st.Revision))
	gauge(c.compactRevision, float64(st.CompactRevision))
	noSpace := 0.0
	if st.NoSpace {
		noSpace = 1
	}
	gauge(c.noSpace, noSpace)
	for _, a := range st.Alarms {
		gauge(c.alarms, 1, a)
	}
	gauge(c.defragSeconds, time.Duration(c.e.lastDefragNanos.Load()).Seconds())
	c.e.compactions.each(func(reason string, n int64) {
		ch <- prometheus.MustNewConstMetric(c.compactions, prometheus.CounterValue, float64(n), reason)
	})
	c.e.defrags.each(func(reason string, n int64) {
		ch <- prometheus.MustNewConstMetric(c.defrags, prometheus.CounterValue, float64(n), reason)
	})
}

// mib formats a size for messages.
func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// resolvePort turns host:0 into host:<free port>. The port is free when
// chosen; etcd binds it a moment later.
func resolvePort(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("%q is not host:port: %w", addr, err)
	}
	if port != "0" {
		return addr, nil
	}
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", fmt.Errorf("find a free port on %s: %w", host, err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}
