package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/tunnel"
)

// The encryption step of the datapath apply: it decides, per remote node,
// which path the tunnel routes its pod CIDRs on, and keeps this node's
// WireGuard device, key and peers in step with the cluster's setting.
//
// Rules (a pair is encrypted when both nodes have encryption on):
//   - The cluster's setting (clustermesh.Snapshot.Encryption) says whether
//     this node runs WireGuard. A remote node runs it when it publishes a
//     key; its cluster's setting is not consulted, so meshes may mix.
//   - Peers are configured before routes move to them: a node's route
//     moves to the WireGuard device only once a handshake with it
//     succeeded (every peer has a persistent keepalive, so the handshake
//     happens as soon as both sides know each other). Until then its
//     traffic goes in clear, or, with strict on, nowhere.
//   - Once a pair is established it never falls back to clear by itself: a
//     failed handshake or a blocked UDP port must not downgrade the
//     traffic. Only the peer withdrawing its key, or this node turning
//     encryption off, moves it back to the tunnel.
//   - Turning off drains: the key is withdrawn first while routes stay on
//     the device, until this node's own entry shows the withdrawal (so its
//     peers are about to see it too) and drainGrace passed; then the routes
//     move back to the tunnel; the device goes once its peers have sent
//     nothing for drainQuiet (at most drainMax after the switch). Its
//     peers route to it in clear once they see the withdrawal, but keep
//     its device entry for peerLinger, to decrypt what it still sends.
//   - A rotation (the setting's count went up, or `trellis encryption
//     rotate --status-socket` for this node alone) replaces the private
//     key on the device and publishes the new public key; peers move to it
//     as they see it. Established routes stay on the device meanwhile.

const (
	// peerKeepalive makes each side send to the other as soon as it is
	// configured, which starts the handshake that gates the route move.
	peerKeepalive = 25 * time.Second
	// handshakeFresh is how recent a handshake must be to count: after
	// 180 s without a new one WireGuard rejects the session's keys.
	handshakeFresh = 180 * time.Second
	drainGrace     = 2 * time.Second
	drainQuiet     = 5 * time.Second
	drainMax       = time.Minute
	// peerLinger is how long a peer that withdrew its key stays on the
	// device: its drain (drainGrace after it sees its own withdrawal)
	// with room for the withdrawal to reach it.
	peerLinger = 10 * time.Second
	// pendingRetry is how soon an apply runs again while a peer waits for
	// its handshake or a drain is in progress.
	pendingRetry = 500 * time.Millisecond
)

// wireGuard is this node's WireGuard device and key, as the encryption
// step uses them (encryption/wireguard behind it in the agent; a fake in
// the decision tests).
type wireGuard interface {
	// Up makes the device run with the node's private key (starting it, or
	// adopting the running one) and returns the public key.
	Up(ctx context.Context) (publicKey string, err error)
	// Running reports whether a device is there (adopting it if so),
	// without starting one.
	Running(ctx context.Context) bool
	// Rotate gives the node a new private key, on the device and on disk,
	// and returns the new public key.
	Rotate(ctx context.Context) (publicKey string, err error)
	// SetPeers makes the device's peers exactly peers.
	SetPeers(ctx context.Context, peers []wgPeer) error
	// Peers reports the device's peers by public key.
	Peers(ctx context.Context) (map[string]wgPeerStatus, error)
	// Down removes the device.
	Down(ctx context.Context) error
	Close() error
}

type wgPeer struct {
	PublicKey  string
	Endpoint   netip.AddrPort
	AllowedIPs []netip.Prefix
	Keepalive  time.Duration
}

type wgPeerStatus struct {
	LastHandshake time.Time
	RxBytes       uint64
	TxBytes       uint64
}

// strictFilter drops clear pod traffic to and from the given pod CIDRs on
// the tunnel device (encryption/strict).
type strictFilter interface {
	Set(ctx context.Context, prefixes []netip.Prefix) error
	Drops() (ingress, egress uint64, err error)
	Remove() error
	Close() error
}

// encryptor is the encryption step's state. Guarded by mu (Apply runs on
// the reconcile goroutine; status and rotate requests come from others).
type encryptor struct {
	node    nodeRef
	port    uint16
	wg      wireGuard
	strict  func() (strictFilter, error) // opens (or adopts) the filter
	stateFn string                       // file holding the last rotation count applied
	log     *slog.Logger
	now     func() time.Time

	mu          sync.Mutex
	published   NodeKeys // what this node publishes
	publishedCh chan struct{}
	ipsec       ipsecState
	up          bool // the device runs under this process
	established map[string]bool
	// configured are the peers on the device by node; prune is what they
	// become once the tunnel moved the routes (nil: nothing to prune).
	configured  map[nodeRef]wgPeer
	prune       map[nodeRef]wgPeer
	lingering   map[nodeRef]lingeringPeer
	rotateAsked bool
	filter      strictFilter
	draining    *drainState
	status      EncryptionStatus
}

type nodeRef struct{ cluster, name string }

func (r nodeRef) String() string { return r.cluster + "/" + r.name }

type drainState struct {
	since    time.Time // encryption turned off
	switched time.Time // routes moved back to the tunnel (zero: not yet)
	lastRx   uint64
	rxAt     time.Time // when lastRx last changed
}

// EncryptionStatus is what `trellis status` shows about encryption.
type EncryptionStatus struct {
	Type      string `json:"type,omitempty"`
	Strict    bool   `json:"strict,omitempty"`
	PublicKey string `json:"publicKey,omitempty"`
	// Draining: encryption was turned off and the device is going.
	Draining bool                 `json:"draining,omitempty"`
	Peers    []PeerEncryption     `json:"peers,omitempty"`
	Strictly *StrictFilterCounter `json:"strictDrops,omitempty"`
	Error    string               `json:"error,omitempty"`
}

// PeerEncryption is one remote node as the encryption step sees it.
type PeerEncryption struct {
	Node string `json:"node"`
	// Path is where its pod CIDRs are routed: tunnel (clear), encrypted,
	// or blocked (strict, handshake pending).
	Path          string    `json:"path"`
	PublicKey     string    `json:"publicKey,omitempty"`
	LastHandshake time.Time `json:"lastHandshake,omitzero"`
	RxBytes       uint64    `json:"rxBytes,omitempty"`
	TxBytes       uint64    `json:"txBytes,omitempty"`
}

// StrictFilterCounter counts clear pod packets strict mode dropped.
type StrictFilterCounter struct {
	Ingress uint64 `json:"ingress"`
	Egress  uint64 `json:"egress"`
}

func newEncryptor(node nodeRef, port uint16, wg wireGuard, strict func() (strictFilter, error), stateFile, ipsecKeyFile string, log *slog.Logger) *encryptor {
	return &encryptor{
		node: node, port: port, wg: wg, strict: strict, stateFn: stateFile, log: log, now: time.Now,
		ipsec:       ipsecState{keyFile: ipsecKeyFile},
		publishedCh: make(chan struct{}, 1), established: make(map[string]bool), configured: make(map[nodeRef]wgPeer),
		lingering: make(map[nodeRef]lingeringPeer),
	}
}

// NodeKeys are what a node publishes about its encryption in its Node
// entry: zero values when it runs none.
type NodeKeys struct {
	WireGuard  string // public key
	IPsecIndex uint8
}

// Published returns what this node should publish, and a channel that
// receives when it changes.
func (e *encryptor) Published() (NodeKeys, <-chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.published, e.publishedCh
}

func (e *encryptor) publish(k NodeKeys) {
	if e.published == k {
		return
	}
	e.published = k
	select {
	case e.publishedCh <- struct{}{}:
	default:
	}
}

func (e *encryptor) publishWireGuard(key string) {
	k := e.published
	k.WireGuard = key
	e.publish(k)
}

func (e *encryptor) publishIPsec(index uint8) {
	k := e.published
	k.IPsecIndex = index
	e.publish(k)
}

// Status reports the last step's view, with the strict filter's drop
// counters read now: drops happen between applies, and an operator
// looking for them must not wait for the next one.
func (e *encryptor) Status() EncryptionStatus {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.status
	st.Peers = slices.Clone(st.Peers)
	if e.filter != nil && st.Strictly != nil {
		if in, out, err := e.filter.Drops(); err == nil {
			st.Strictly = &StrictFilterCounter{Ingress: in, Egress: out}
		}
	}
	// Handshakes and byte counts too: once every peer is established no
	// apply runs until the mesh changes, and a rotation's new handshake
	// would not show for minutes.
	if e.up && len(st.Peers) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		have, err := e.wg.Peers(ctx)
		cancel()
		if err == nil {
			for i, p := range st.Peers {
				if ps, ok := have[p.PublicKey]; ok && p.PublicKey != "" {
					st.Peers[i].LastHandshake, st.Peers[i].RxBytes, st.Peers[i].TxBytes = ps.LastHandshake, ps.RxBytes, ps.TxBytes
				}
			}
		}
	}
	return st
}

// AskRotate makes the next step give this node a new key.
func (e *encryptor) AskRotate() {
	e.mu.Lock()
	e.rotateAsked = true
	e.mu.Unlock()
}

// step runs the encryption step for snap. It returns the path of each
// remote node (by "cluster/name"; absent means the tunnel) and how soon
// it wants to run again (0: not before the next change).
func (e *encryptor) step(ctx context.Context, snap *clustermesh.Snapshot) (paths map[string]tunnel.Path, again time.Duration, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	setting := snap.Encryption
	st := EncryptionStatus{Type: setting.Type, Strict: setting.Strict}
	defer func() {
		if err != nil {
			st.Error = err.Error()
		}
		e.status = st
	}()
	wantWG := setting.Type == v1.EncryptionWireGuard
	if wantWG {
		paths, again, err = e.on(ctx, snap, &st)
	} else {
		paths, again, err = e.off(ctx, snap, &st)
	}
	var ipsecErr error
	if setting.Type == v1.EncryptionIPsec {
		var index uint8
		index, ipsecErr = e.ipsecOn(ctx, snap)
		e.publishIPsec(index)
		if ipsecErr != nil {
			again = max(again, time.Second)
		}
	} else {
		e.publishIPsec(0)
		ipsecErr = e.ipsecOff(ctx)
	}
	strictErr := e.stepStrict(ctx, snap, setting.Strict && setting.Type != v1.EncryptionNone, &st)
	return paths, again, errors.Join(err, ipsecErr, strictErr)
}

// on is the step while this node has WireGuard on.
func (e *encryptor) on(ctx context.Context, snap *clustermesh.Snapshot, st *EncryptionStatus) (map[string]tunnel.Path, time.Duration, error) {
	e.draining = nil
	pub, err := e.wg.Up(ctx)
	if err != nil {
		// Without a device nothing can be encrypted; peers already
		// established keep their route (the tunnel leaves it while the
		// device is missing), the rest stay as the setting allows.
		return e.fallbackPaths(snap), time.Second, fmt.Errorf("wireguard: %w", err)
	}
	e.up = true
	if due, count := e.rotationDue(snap.Encryption.Rotation); due || e.rotateAsked {
		if pub, err = e.wg.Rotate(ctx); err != nil {
			return e.fallbackPaths(snap), time.Second, fmt.Errorf("wireguard: rotate the key: %w", err)
		}
		e.log.Info("wireguard key rotated", "publicKey", pub, "rotation", count)
		e.rotateAsked = false
		if err := e.saveRotation(count); err != nil {
			e.log.Warn("cannot record the rotation count; the next start may rotate again", "err", err)
		}
	}
	e.publishWireGuard(pub)
	st.PublicKey = pub

	// Peers are added before the routes move to them, and removed only
	// after the routes moved away (finish): until then the union.
	want, refs := e.peersOf(snap)
	lingerAgain := e.linger(want)
	for ref, l := range e.lingering {
		want[ref] = l.peer
	}
	union := maps.Clone(want)
	for ref, p := range e.configured {
		if _, ok := union[ref]; !ok {
			union[ref] = p
		}
	}
	if err := e.wg.SetPeers(ctx, peerList(union)); err != nil {
		return e.fallbackPaths(snap), time.Second, fmt.Errorf("wireguard: configure peers: %w", err)
	}
	e.configured, e.prune = union, want
	have, err := e.wg.Peers(ctx)
	if err != nil {
		return e.fallbackPaths(snap), time.Second, fmt.Errorf("wireguard: read peers: %w", err)
	}
	paths := make(map[string]tunnel.Path)
	again := lingerAgain
	now := e.now()
	for ref, key := range refs {
		name := ref.String()
		ps := have[key]
		if !e.established[name] && !ps.LastHandshake.IsZero() && now.Sub(ps.LastHandshake) < handshakeFresh {
			e.established[name] = true
			e.log.Info("encrypted path to a node is up", "peer", name)
		}
		path := tunnel.PathTunnel
		switch {
		case e.established[name]:
			path = tunnel.PathEncrypted
		case snap.Encryption.Strict:
			path = tunnel.PathBlocked
			again = minRetry(again, pendingRetry)
		default:
			again = minRetry(again, pendingRetry)
		}
		paths[name] = path
		st.Peers = append(st.Peers, PeerEncryption{Node: name, Path: path.String(), PublicKey: key,
			LastHandshake: ps.LastHandshake, RxBytes: ps.RxBytes, TxBytes: ps.TxBytes})
	}
	// A node that withdrew its key (or left) starts over.
	for name := range e.established {
		if _, ok := paths[name]; !ok {
			delete(e.established, name)
		}
	}
	e.addClearPeers(snap, st)
	return paths, again, nil
}

// linger keeps, for peerLinger, the device entry of a peer that withdrew
// its key or left: a node turning encryption off keeps sending encrypted
// until it sees its own withdrawal published and drainGrace passed, and
// those packets must still be decrypted here, or its connections stall
// until it switches. No route of ours points at a lingering peer. A peer
// whose pod CIDRs another wanted peer now holds goes at once (WireGuard
// gives an address to one peer only). It returns when to run again for
// the next expiry (0: none pending).
func (e *encryptor) linger(want map[nodeRef]wgPeer) time.Duration {
	now := e.now()
	held := make(map[netip.Prefix]bool)
	for _, p := range want {
		for _, c := range p.AllowedIPs {
			held[c] = true
		}
	}
	for ref, p := range e.configured {
		if _, ok := want[ref]; ok {
			continue
		}
		if _, ok := e.lingering[ref]; !ok {
			e.lingering[ref] = lingeringPeer{peer: p, until: now.Add(peerLinger)}
		}
	}
	var again time.Duration
	for ref, l := range e.lingering {
		_, back := want[ref]
		taken := slices.ContainsFunc(l.peer.AllowedIPs, func(c netip.Prefix) bool { return held[c] })
		if back || taken || !now.Before(l.until) {
			delete(e.lingering, ref)
			continue
		}
		again = minRetry(again, l.until.Sub(now))
	}
	return again
}

type lingeringPeer struct {
	peer  wgPeer
	until time.Time
}

// minRetry is the sooner of two retry delays, 0 meaning none.
func minRetry(a, b time.Duration) time.Duration {
	if a == 0 || (b != 0 && b < a) {
		return b
	}
	return a
}

// fallbackPaths are the paths when the device cannot be configured: an
// established peer keeps the device's route, a strict peer is blocked,
// the rest go in clear.
func (e *encryptor) fallbackPaths(snap *clustermesh.Snapshot) map[string]tunnel.Path {
	paths := make(map[string]tunnel.Path)
	for ref := range e.keyed(snap) {
		switch {
		case e.established[ref.String()]:
			paths[ref.String()] = tunnel.PathEncrypted
		case snap.Encryption.Strict:
			paths[ref.String()] = tunnel.PathBlocked
		}
	}
	return paths
}

// off is the step while this node has WireGuard off: nothing, or a drain.
func (e *encryptor) off(ctx context.Context, snap *clustermesh.Snapshot, st *EncryptionStatus) (map[string]tunnel.Path, time.Duration, error) {
	e.publishWireGuard("")
	if !e.up {
		// A device left by an earlier process (it crashed while draining,
		// or the setting changed while no agent ran) is drained too.
		if !e.wg.Running(ctx) {
			e.established = make(map[string]bool)
			e.addClearPeers(snap, st)
			return nil, 0, nil
		}
		e.up = true
	}
	now := e.now()
	if e.draining == nil {
		e.draining = &drainState{since: now, rxAt: now}
		e.log.Info("encryption turned off: withdrawing the key, then the routes, then the device")
	}
	d := e.draining
	st.Draining = true
	have, err := e.wg.Peers(ctx)
	if err != nil {
		have = nil
	}
	var rx uint64
	for _, ps := range have {
		rx += ps.RxBytes
	}
	if rx != d.lastRx {
		d.lastRx, d.rxAt = rx, now
	}

	withdrawn := true
	if self := snap.Nodes[e.node.cluster][e.node.name]; self != nil && self.WireGuardPublicKey != "" {
		withdrawn = false
	}
	if d.switched.IsZero() && withdrawn && now.Sub(d.since) >= drainGrace {
		// Quiet is measured from here: until now peers had every reason
		// to send encrypted.
		d.switched, d.rxAt = now, now
		e.log.Info("encryption off: routes back to the tunnel; the device stays until peers go quiet")
	}
	if d.switched.IsZero() {
		// Phase 1: peers have not all seen the withdrawal; keep sending
		// encrypted to those established.
		paths := make(map[string]tunnel.Path)
		for name := range e.established {
			paths[name] = tunnel.PathEncrypted
		}
		e.addClearPeers(snap, st)
		return paths, pendingRetry, nil
	}
	if now.Sub(d.rxAt) < drainQuiet && now.Sub(d.switched) < drainMax {
		e.addClearPeers(snap, st)
		return nil, pendingRetry, nil
	}
	if err := e.wg.Down(ctx); err != nil {
		return nil, time.Second, fmt.Errorf("wireguard: remove the device: %w", err)
	}
	e.log.Info("encryption off: device removed")
	e.up, e.draining = false, nil
	e.established = make(map[string]bool)
	e.configured, e.prune = make(map[nodeRef]wgPeer), nil
	clear(e.lingering)
	st.Draining = false
	e.addClearPeers(snap, st)
	return nil, 0, nil
}

// addClearPeers lists, for status, the remote nodes without a path entry.
func (e *encryptor) addClearPeers(snap *clustermesh.Snapshot, st *EncryptionStatus) {
	listed := make(map[string]bool, len(st.Peers))
	for _, p := range st.Peers {
		listed[p.Node] = true
	}
	for cluster, nodes := range snap.Nodes {
		for name, n := range nodes {
			ref := nodeRef{cluster, name}
			if ref == e.node || listed[ref.String()] {
				continue
			}
			path := tunnel.PathTunnel
			if e.draining != nil && e.draining.switched.IsZero() && e.established[ref.String()] {
				path = tunnel.PathEncrypted
			}
			st.Peers = append(st.Peers, PeerEncryption{Node: ref.String(), Path: path.String(), PublicKey: n.WireGuardPublicKey})
		}
	}
	slices.SortFunc(st.Peers, func(a, b PeerEncryption) int { return strings.Compare(a.Node, b.Node) })
}

// keyed lists the remote nodes that publish a WireGuard key and can be
// peers (an underlay IP and pod CIDRs), with their key.
func (e *encryptor) keyed(snap *clustermesh.Snapshot) map[nodeRef]string {
	out := make(map[nodeRef]string)
	for cluster, nodes := range snap.Nodes {
		for name, n := range nodes {
			ref := nodeRef{cluster, name}
			if ref == e.node || n.WireGuardPublicKey == "" || len(n.IPs) == 0 || len(n.PodCIDRs) == 0 {
				continue
			}
			out[ref] = n.WireGuardPublicKey
		}
	}
	return out
}

// peersOf is the device's peers for snap: every keyed remote node,
// reached at its first IP, owning its pod CIDRs.
func (e *encryptor) peersOf(snap *clustermesh.Snapshot) (map[nodeRef]wgPeer, map[nodeRef]string) {
	refs := e.keyed(snap)
	peers := make(map[nodeRef]wgPeer, len(refs))
	for ref, key := range refs {
		n := snap.Nodes[ref.cluster][ref.name]
		peers[ref] = wgPeer{
			PublicKey: key, Endpoint: netip.AddrPortFrom(n.IPs[0], e.port),
			AllowedIPs: slices.Clone(n.PodCIDRs), Keepalive: peerKeepalive,
		}
	}
	return peers, refs
}

// peerList is peers in a stable order. A node that rotated its key
// appears once, under its new key (its old entry is replaced, not kept
// beside it: two peers cannot own one pod CIDR).
func peerList(peers map[nodeRef]wgPeer) []wgPeer {
	out := slices.Collect(maps.Values(peers))
	slices.SortFunc(out, func(a, b wgPeer) int { return strings.Compare(a.PublicKey, b.PublicKey) })
	return out
}

// finish runs after the tunnel applied the step's paths: peers no longer
// wanted go now that no route points at them.
func (e *encryptor) finish(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.prune == nil || !e.up {
		return nil
	}
	if len(e.prune) != len(e.configured) {
		if err := e.wg.SetPeers(ctx, peerList(e.prune)); err != nil {
			return fmt.Errorf("wireguard: remove departed peers: %w", err)
		}
	}
	e.configured, e.prune = e.prune, nil
	return nil
}

// stepStrict keeps the strict filter on the tunnel device in step: on
// with the pod CIDRs of every keyed node while strict is on, removed
// otherwise.
func (e *encryptor) stepStrict(ctx context.Context, snap *clustermesh.Snapshot, on bool, st *EncryptionStatus) error {
	if !on {
		if e.filter != nil {
			err := e.filter.Remove()
			e.filter = nil
			if err != nil {
				return fmt.Errorf("strict filter: remove: %w", err)
			}
		}
		return nil
	}
	if e.strict == nil {
		return errors.New("strict encryption needs the tunnel (--tunnel vxlan or geneve): its filter sits on the tunnel device")
	}
	if e.filter == nil {
		f, err := e.strict()
		if err != nil {
			return fmt.Errorf("strict filter: %w", err)
		}
		e.filter = f
	}
	var prefixes []netip.Prefix
	if snap.Encryption.Type == v1.EncryptionIPsec {
		prefixes = e.ipsecPeers(snap)
	} else {
		for ref := range e.keyed(snap) {
			prefixes = append(prefixes, snap.Nodes[ref.cluster][ref.name].PodCIDRs...)
		}
	}
	if err := e.filter.Set(ctx, prefixes); err != nil {
		return fmt.Errorf("strict filter: %w", err)
	}
	if in, out, err := e.filter.Drops(); err == nil {
		st.Strictly = &StrictFilterCounter{Ingress: in, Egress: out}
	}
	return nil
}

// rotationDue reports whether the setting's rotation count is above the
// one this node last applied. A node that never applied one takes the
// current count without rotating: its key is new anyway.
func (e *encryptor) rotationDue(count uint64) (bool, uint64) {
	data, err := os.ReadFile(e.stateFn)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			if err := e.saveRotation(count); err != nil {
				e.log.Warn("cannot record the rotation count", "err", err)
			}
		}
		return false, count
	}
	last, err := strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64)
	if err != nil {
		e.log.Warn("unreadable rotation count; taking the current one", "file", e.stateFn, "err", err)
		return false, count
	}
	return count > last, count
}

func (e *encryptor) saveRotation(count uint64) error {
	tmp := e.stateFn + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.FormatUint(count, 10)+"\n"), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, e.stateFn)
}

// Close releases the device and filter handles; both stay in the kernel.
func (e *encryptor) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	var errs []error
	if e.filter != nil {
		errs = append(errs, e.filter.Close())
	}
	errs = append(errs, e.wg.Close(), e.ipsec.close())
	return errors.Join(errs...)
}

// EncryptionConfig is how this node encrypts when its cluster turns
// encryption on.
type EncryptionConfig struct {
	// Node and Cluster name this node (its own entry in the snapshot
	// shows when its key withdrawal was published).
	Node, Cluster string
	// StateDir holds the private key (0600), the last rotation count
	// applied, and the userspace device's socket and log.
	StateDir string
	// Device is the WireGuard device's name; default trellis_wg.
	Device string
	// Port is the UDP port of every node's device; default 51871. All
	// nodes of a mesh use the same.
	Port uint16
	// MTU of the device; default the underlay's MTU less 80 (WireGuard
	// over IPv6, the worst case).
	MTU int
	// StartCommand runs the userspace device as a process of its own (the
	// agent's binary: `trellis agent wireguard-device ...`), so that it
	// outlives an agent restart.
	StartCommand []string
	// StrictPinDir is the bpffs directory of the strict filter's pinned
	// programs and map, so that strictness outlives the agent too.
	StrictPinDir string
	// IPsecKeyFile is the pre-shared key file IPsec derives its keys from
	// (the same on every node); without it the node cannot run IPsec and
	// says so in status when its cluster asks for it.
	IPsecKeyFile string
}
