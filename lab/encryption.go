package lab

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/agent"
	"github.com/trellis-mesh/trellis/api/client"
	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Encryption verbs: they change a cluster's encryption setting through
// `trellis encryption` run inside its API server's namespace (or ask one
// agent for a new key), then wait until every agent of the lab shows what
// the setting implies, read from the agents' status sockets:
//
//   - WireGuard: a pair of nodes is encrypted when both nodes' clusters
//     have it on (both publish a key), so each side shows the other on path
//     "encrypted"; every other pair stays on "tunnel" (clear VXLAN).
//   - Off: the node's device is gone (no longer draining, no key) and every
//     peer is on "tunnel".
//   - IPsec changes no route (xfrm policies catch the traffic on the
//     tunnel path): nodes report the type and no error; an error they show
//     (on a kernel without ESP, the missing options) is returned at once.

// encryptionTimeout bounds the wait for agents after an encryption change.
// Turning off takes longest: a node keeps its device until its peers have
// been quiet for a few seconds (at most a minute after routes moved back).
const encryptionTimeout = 2 * time.Minute

// ipsecKeyFile is the lab's IPsec pre-shared key file, the same for every
// node (agents read it only when their cluster turns IPsec on).
func (l *lab) ipsecKeyFile() string { return filepath.Join(l.dir, "ipsec.key") }

// ensureIPsecKey writes the lab's IPsec key file (index 1, 32 random
// bytes in hex, 0600) unless it exists.
func (l *lab) ensureIPsecKey() error {
	path := l.ipsecKeyFile()
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return fmt.Errorf("lab: IPsec key %s: %w", path, err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte("1 "+hex.EncodeToString(key)+"\n"), 0o600); err != nil {
		return fmt.Errorf("lab: IPsec key %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("lab: IPsec key %s: %w", path, err)
	}
	return nil
}

// SetEncryption sets the encryption of clusters (every cluster of the lab
// when empty) to req: `trellis encryption enable --type T [--strict]`
// when req.Type is set, `trellis encryption disable` otherwise, run inside
// each cluster's API server namespace. It returns once every agent of the
// lab shows the state the clusters' settings imply (see above), and
// prints one line per changed cluster with the time its nodes took. For
// IPsec it returns the first encryption error an agent of those clusters
// reports (on a kernel without ESP: the missing options).
func SetEncryption(ctx context.Context, opts Options, clusters []string, req v1.EncryptionRequest) error {
	if err := (v1.EncryptionConfig{Type: req.Type, Strict: req.Strict}).Validate(); err != nil {
		return fmt.Errorf("lab: encryption: %w", err)
	}
	return withLab(opts, func(l *lab) error {
		targets, err := l.clustersNamed(clusters)
		if err != nil {
			return err
		}
		// The settings of the clusters left alone decide their pairs too.
		settings, err := l.encryptionSettings(ctx, targets)
		if err != nil {
			return err
		}
		starts := make(map[string]time.Time, len(targets))
		for _, c := range targets {
			argv := []string{l.opts.Binary, "encryption", "disable", "--state-dir", c.stateDir}
			if req.Type != v1.EncryptionNone {
				argv = []string{l.opts.Binary, "encryption", "enable", "--type", req.Type, "--state-dir", c.stateDir}
				if req.Strict {
					argv = append(argv, "--strict")
				}
			}
			starts[c.Name] = time.Now()
			out, err := l.runTrellisIn(ctx, c, argv)
			if err != nil {
				return fmt.Errorf("lab: encryption of %s: %w", c.Name, err)
			}
			l.log.Debug("encryption set", "cluster", c.Name, "output", out)
			settings[c.Name] = v1.EncryptionConfig{Type: req.Type, Strict: req.Strict}
		}
		// Each changed cluster's line comes as soon as its nodes show the
		// new state; the wait ends when every node does.
		nodes := l.liveNodes()
		done := map[string]bool{}
		pending := func(c *clusterLayout, ok map[*nodeLayout]bool) bool {
			for _, n := range c.nodes {
				if !l.state.DownNodes[n.ref()] && !ok[n] {
					return true
				}
			}
			return false
		}
		check := func(n *nodeLayout, st agent.Status) (error, error) {
			return l.encryptionAsExpected(n, st, settings)
		}
		progress := func(ok map[*nodeLayout]bool) {
			for _, c := range targets {
				if done[c.Name] || pending(c, ok) {
					continue
				}
				done[c.Name] = true
				fmt.Fprintf(l.opts.Out, "%s (%s)\n", describeClusterEncryption(c.Name, settings[c.Name]), time.Since(starts[c.Name]).Round(time.Millisecond))
			}
		}
		return l.waitEncryption(ctx, nodes, encryptionTimeout, check, progress)
	})
}

func describeClusterEncryption(cluster string, s v1.EncryptionConfig) string {
	switch s.Type {
	case v1.EncryptionNone:
		return fmt.Sprintf("encryption off in %s: its nodes removed their WireGuard devices, every path is clear VXLAN", cluster)
	case v1.EncryptionWireGuard:
		strict := ""
		if s.Strict {
			strict = ", strict"
		}
		return fmt.Sprintf("encryption wireguard%s in %s: its nodes reach every node that has it on over trellis_wg (UDP %d)", strict, cluster, wireGuardPort)
	}
	return fmt.Sprintf("encryption %s in %s: its nodes report the setting without an error", s.Type, cluster)
}

// wireGuardPort is the agents' WireGuard UDP port (encryption/wireguard's
// default, which the lab does not change).
const wireGuardPort = 51871

// clustersNamed finds clusters by name; none names every cluster.
func (l *lab) clustersNamed(names []string) ([]*clusterLayout, error) {
	if len(names) == 0 {
		return slices.Clone(l.lay.clusters), nil
	}
	var out []*clusterLayout
	for _, name := range names {
		c, err := l.lay.cluster(name)
		if err != nil {
			return nil, err
		}
		if !slices.Contains(out, c) {
			out = append(out, c)
		}
	}
	return out, nil
}

// encryptionSettings reads the encryption setting of every cluster but
// skip from its API server.
func (l *lab) encryptionSettings(ctx context.Context, skip []*clusterLayout) (map[string]v1.EncryptionConfig, error) {
	out := make(map[string]v1.EncryptionConfig, len(l.lay.clusters))
	for _, c := range l.lay.clusters {
		if slices.Contains(skip, c) {
			continue
		}
		err := l.withAPI(c, func(api *client.Client) error {
			st, err := api.Encryption(ctx)
			out[c.Name] = st.Setting
			return err
		})
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

// encryptionAsExpected compares what n's agent shows with what settings
// (cluster → setting) imply. The first error says what n still shows; the
// second is an error the agent reports that waiting will not cure.
func (l *lab) encryptionAsExpected(n *nodeLayout, st agent.Status, settings map[string]v1.EncryptionConfig) (pending, fatal error) {
	want := settings[n.cluster.Name]
	e := st.Encryption
	if e == nil {
		return nil, fmt.Errorf("%s: its agent runs without an encryption step (no tunnel, or --encryption=false)", n.ref())
	}
	if e.Type != want.Type || e.Strict != want.Strict {
		return fmt.Errorf("%s shows encryption %s, want %s", n.ref(), encryptionWord(e.Type, e.Strict), encryptionWord(want.Type, want.Strict)), nil
	}
	if e.Error != "" {
		err := fmt.Errorf("%s: encryption error: %s", n.ref(), e.Error)
		if want.Type == v1.EncryptionIPsec {
			return nil, err
		}
		return err, nil
	}
	switch on := want.Strict && want.Type != v1.EncryptionNone; {
	case on && e.Strictly == nil:
		return fmt.Errorf("%s does not report its strict filter yet", n.ref()), nil
	case !on && e.Strictly != nil:
		return fmt.Errorf("%s still reports a strict filter", n.ref()), nil
	}
	if want.Type != v1.EncryptionWireGuard {
		if e.Draining {
			return fmt.Errorf("%s is still draining its WireGuard device", n.ref()), nil
		}
		if e.PublicKey != "" {
			return fmt.Errorf("%s still shows WireGuard key %s", n.ref(), keyPrefix(e.PublicKey)), nil
		}
	} else if e.PublicKey == "" {
		return fmt.Errorf("%s has no WireGuard key yet", n.ref()), nil
	}
	paths := make(map[string]string, len(e.Peers))
	for _, p := range e.Peers {
		paths[p.Node] = p.Path
	}
	for _, m := range l.liveNodes() {
		if m == n || !l.state.joined(n.cluster.Name, m.cluster.Name) {
			continue
		}
		wantPath := "tunnel"
		if want.Type == v1.EncryptionWireGuard && settings[m.cluster.Name].Type == v1.EncryptionWireGuard {
			wantPath = "encrypted"
		}
		got, ok := paths[m.ref()]
		switch {
		case !ok:
			return fmt.Errorf("%s does not list peer %s yet", n.ref(), m.ref()), nil
		case got != wantPath:
			return fmt.Errorf("%s shows peer %s on path %s, want %s", n.ref(), m.ref(), got, wantPath), nil
		}
	}
	return nil, nil
}

func encryptionWord(typ string, strict bool) string {
	if typ == v1.EncryptionNone {
		return "off"
	}
	if strict {
		return typ + " (strict)"
	}
	return typ
}

func keyPrefix(key string) string {
	if len(key) > 8 {
		return key[:8] + "…"
	}
	return key
}

// waitEncryption polls the agents of nodes until check passes for each
// (progress sees the nodes that passed so far after every round). A fatal
// error from check, an agent that exits or the timeout end the wait.
func (l *lab) waitEncryption(ctx context.Context, nodes []*nodeLayout, timeout time.Duration,
	check func(*nodeLayout, agent.Status) (pending, fatal error), progress func(map[*nodeLayout]bool)) error {
	deadline := time.Now().Add(timeout)
	ok := make(map[*nodeLayout]bool, len(nodes))
	for {
		var lastErr error
		for _, n := range nodes {
			if ok[n] {
				continue
			}
			if !l.state.Procs[agentKey(n)].Alive() {
				return fmt.Errorf("lab: agent of %s exited:\n%s", n.ref(), tailFile(n.log, 20))
			}
			fctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			st, err := agent.FetchStatus(fctx, n.socket)
			cancel()
			if err != nil {
				lastErr = fmt.Errorf("%s: %w", n.ref(), err)
				continue
			}
			pending, fatal := check(n, st)
			if fatal != nil {
				return fmt.Errorf("lab: %w (log: %s)", fatal, n.log)
			}
			if pending != nil {
				lastErr = pending
				continue
			}
			ok[n] = true
		}
		if progress != nil {
			progress(ok)
		}
		if lastErr == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: encryption not in effect after %s: %w (logs in %s)", timeout, lastErr, filepath.Join(l.dir, "logs"))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lab: waiting for encryption: %w (last: %v)", ctx.Err(), lastErr)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// RotateEncryption gives every node of cluster a new WireGuard key
// (`trellis encryption rotate`, inside its API server's namespace) and
// returns once each of its nodes shows a new key, every node of the lab
// that encrypts to it shows that key, and every such pair is on path
// "encrypted" with a handshake after the rotation.
func RotateEncryption(ctx context.Context, opts Options, cluster string) error {
	return withLab(opts, func(l *lab) error {
		c, err := l.lay.cluster(cluster)
		if err != nil {
			return err
		}
		var nodes []*nodeLayout
		for _, n := range c.nodes {
			if !l.state.DownNodes[n.ref()] {
				nodes = append(nodes, n)
			}
		}
		return l.rotate(ctx, nodes, "cluster "+c.Name, func() error {
			out, err := l.runTrellisIn(ctx, c, []string{l.opts.Binary, "encryption", "rotate", "--state-dir", c.stateDir})
			if err != nil {
				return fmt.Errorf("lab: rotate the keys of %s: %w", c.Name, err)
			}
			l.log.Debug("encryption rotated", "cluster", c.Name, "output", out)
			return nil
		})
	})
}

// RotateNodeKey gives one node ("eu/n1") a new WireGuard key through its
// agent's status socket (agent.RequestKeyRotation) and waits as
// RotateEncryption does.
func RotateNodeKey(ctx context.Context, opts Options, node string) error {
	return withNode(opts, node, func(l *lab, n *nodeLayout) error {
		if l.state.DownNodes[n.ref()] {
			return fmt.Errorf("lab: node %s is down", n.ref())
		}
		return l.rotate(ctx, []*nodeLayout{n}, "node "+n.ref(), func() error {
			if err := agent.RequestKeyRotation(ctx, n.socket); err != nil {
				return fmt.Errorf("lab: rotate the key of %s: %w", n.ref(), err)
			}
			return nil
		})
	})
}

// rotate runs do, which asks nodes for new keys, and waits until they
// have them and every encrypted pair they are part of handshook since.
func (l *lab) rotate(ctx context.Context, nodes []*nodeLayout, what string, do func() error) error {
	old := make(map[string]string, len(nodes))
	for _, n := range nodes {
		fctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		st, err := agent.FetchStatus(fctx, n.socket)
		cancel()
		if err != nil {
			return fmt.Errorf("lab: %s: %w", n.ref(), err)
		}
		if st.Encryption == nil || st.Encryption.Type != v1.EncryptionWireGuard || st.Encryption.PublicKey == "" {
			return fmt.Errorf("lab: %s has no WireGuard key to rotate: turn WireGuard on first (`trellis lab encryption enable --cluster %s`)", n.ref(), n.cluster.Name)
		}
		old[n.ref()] = st.Encryption.PublicKey
	}
	start := time.Now()
	if err := do(); err != nil {
		return err
	}
	// New keys first: every observer checks against them.
	fresh := make(map[string]string, len(nodes))
	err := l.waitEncryption(ctx, nodes, encryptionTimeout, func(n *nodeLayout, st agent.Status) (error, error) {
		key := ""
		if st.Encryption != nil {
			key = st.Encryption.PublicKey
		}
		if key == "" || key == old[n.ref()] {
			return fmt.Errorf("%s still shows its old key %s", n.ref(), keyPrefix(old[n.ref()])), nil
		}
		fresh[n.ref()] = key
		return nil, nil
	}, nil)
	if err != nil {
		return err
	}
	// Handshakes are read from each observer's device: the agent's status
	// shows them as of its last apply, which need not come again once
	// every peer is established.
	rotated := func(ref string) bool { _, ok := fresh[ref]; return ok }
	err = l.waitEncryption(ctx, l.liveNodes(), encryptionTimeout, func(n *nodeLayout, st agent.Status) (error, error) {
		e := st.Encryption
		if e == nil || e.Type != v1.EncryptionWireGuard {
			return nil, nil // it encrypts to nobody
		}
		var handshakes map[string]time.Time
		for _, p := range e.Peers {
			if !rotated(n.ref()) && !rotated(p.Node) {
				continue
			}
			if rotated(p.Node) && p.PublicKey != fresh[p.Node] {
				return fmt.Errorf("%s shows %s's key %s, not its new %s", n.ref(), p.Node, keyPrefix(p.PublicKey), keyPrefix(fresh[p.Node])), nil
			}
			if p.PublicKey == "" {
				continue // the peer runs no WireGuard: a clear pair
			}
			if p.Path != "encrypted" {
				return fmt.Errorf("%s shows peer %s on path %s, want encrypted", n.ref(), p.Node, p.Path), nil
			}
			if handshakes == nil {
				var err error
				if handshakes, err = deviceHandshakes(ctx, n.wireGuardSocket()); err != nil {
					return fmt.Errorf("%s: %w", n.ref(), err), nil
				}
			}
			if !handshakes[p.PublicKey].After(start) {
				return fmt.Errorf("%s's device has no handshake with %s (key %s) since the rotation", n.ref(), p.Node, keyPrefix(p.PublicKey)), nil
			}
		}
		return nil, nil
	}, nil)
	if err != nil {
		return err
	}
	var keys []string
	for _, n := range nodes {
		keys = append(keys, n.ref()+" "+keyPrefix(fresh[n.ref()]))
	}
	fmt.Fprintf(l.opts.Out, "%s rotated its WireGuard keys (%s); every peer handshook with the new ones (%s)\n",
		what, strings.Join(keys, ", "), time.Since(start).Round(time.Millisecond))
	return nil
}

// wireGuardSocket is the UAPI socket of the node's WireGuard device
// process (in the agent's state dir).
func (n *nodeLayout) wireGuardSocket() string { return filepath.Join(n.stateDir, "wireguard.sock") }

// deviceHandshakes asks a WireGuard device for its peers' last handshakes
// (UAPI get), by base64 public key.
func deviceHandshakes(ctx context.Context, socket string) (map[string]time.Time, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("WireGuard device at %s: %w", socket, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	if _, err := conn.Write([]byte("get=1\n\n")); err != nil {
		return nil, fmt.Errorf("WireGuard device at %s: %w", socket, err)
	}
	return parseHandshakes(bufio.NewReader(conn))
}

// parseHandshakes reads a UAPI get answer up to its errno line.
func parseHandshakes(r *bufio.Reader) (map[string]time.Time, error) {
	out := map[string]time.Time{}
	peer := ""
	var sec, nsec int64
	flush := func() {
		if peer != "" && (sec != 0 || nsec != 0) {
			out[peer] = time.Unix(sec, nsec)
		}
		sec, nsec = 0, 0
	}
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return nil, fmt.Errorf("WireGuard device: read: %w", err)
		}
		key, value, _ := strings.Cut(strings.TrimSuffix(line, "\n"), "=")
		switch key {
		case "public_key":
			flush()
			raw, err := hex.DecodeString(value)
			if err != nil {
				return nil, fmt.Errorf("WireGuard device: public_key %q: %w", value, err)
			}
			peer = base64.StdEncoding.EncodeToString(raw)
		case "last_handshake_time_sec":
			sec, _ = strconv.ParseInt(value, 10, 64)
		case "last_handshake_time_nsec":
			nsec, _ = strconv.ParseInt(value, 10, 64)
		case "errno":
			flush()
			if value != "0" {
				return nil, fmt.Errorf("WireGuard device: get: errno %s", value)
			}
			return out, nil
		}
	}
}
