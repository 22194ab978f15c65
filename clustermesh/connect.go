package clustermesh

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/api/client"
	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Connecting clusters: each side mints a client certificate for the other,
// signed by its own client CA, and each side's agents get a cluster file
// for the other that carries the other's server CA and pins its ID and pod
// CIDRs. No CA is shared. The exchange is here; how a cluster is reached
// (its admin API and where its agents read cluster files) is a Peer, so a
// Kubernetes flavour (kubeconfig contexts, Secrets) can plug in beside the
// state-dir one.

// Peer is one cluster as `connect` reaches it.
type Peer interface {
	// Describe names the peer in messages (a URL, a state dir).
	Describe() string
	Info(ctx context.Context) (v1.ClusterInfo, error)
	// Issue mints read-only credentials for cluster forCluster's agents.
	Issue(ctx context.Context, forCluster string) (v1.RemoteCredentials, error)
	// Revoke removes forCluster's access.
	Revoke(ctx context.Context, forCluster string) error
	// ClusterFiles are the cluster files this cluster's agents read now:
	// their pins must not conflict with a cluster being connected.
	ClusterFiles(ctx context.Context) ([]ClusterFile, error)
	// WriteClusterFile and RemoveClusterFile change what this cluster's
	// agents connect to.
	WriteClusterFile(ctx context.Context, f ClusterFile) error
	RemoveClusterFile(ctx context.Context, name string) error
}

// ConnectOptions tune Connect.
type ConnectOptions struct {
	// DialTimeout bounds the reachability check of etcd endpoints.
	DialTimeout time.Duration
}

// Connect joins a and b in both directions.
func Connect(ctx context.Context, a, b Peer, opts ConnectOptions) error {
	return ConnectMesh(ctx, []Peer{a, b}, opts)
}

// ConnectMesh joins every pair of peers. Every check runs before anything
// is written, so a refused mesh changes nothing.
func ConnectMesh(ctx context.Context, peers []Peer, opts ConnectOptions) error {
	if len(peers) < 2 {
		return errors.New("connect: name at least two clusters")
	}
	if opts.DialTimeout == 0 {
		opts.DialTimeout = 3 * time.Second
	}
	infos := make([]v1.ClusterInfo, len(peers))
	for i, p := range peers {
		info, err := p.Info(ctx)
		if err != nil {
			return fmt.Errorf("connect: cluster at %s is unreachable: %w (is its mesh API server running?)", p.Describe(), err)
		}
		infos[i] = info
	}
	if err := checkMesh(infos); err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	if err := checkPinned(ctx, peers, infos); err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	for _, info := range infos {
		if err := checkReachable(ctx, info, opts.DialTimeout); err != nil {
			return fmt.Errorf("connect: %w", err)
		}
	}
	key, err := meshKey(ctx, peers, infos)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	for i, reader := range peers {
		for j, target := range peers {
			// j == i too: a cluster's agents read their own cluster through
			// the same read-only path.
			if err := link(ctx, reader, infos[i], target, infos[j], key); err != nil {
				return err
			}
		}
	}
	return nil
}

// ConnectSelf gives a lone cluster's agents the cluster file of their own
// cluster, as ConnectMesh gives every cluster it joins.
func ConnectSelf(ctx context.Context, p Peer) error {
	info, err := p.Info(ctx)
	if err != nil {
		return fmt.Errorf("connect: cluster at %s is unreachable: %w (is its mesh API server running?)", p.Describe(), err)
	}
	key, err := meshKey(ctx, []Peer{p}, []v1.ClusterInfo{info})
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	return link(ctx, p, info, p, info, key)
}

// meshKey picks the gossip key of the mesh being connected: the one the
// peers' cluster files already carry (a cluster joining a mesh takes the
// mesh's key), or a new one when none does. Peers whose files carry
// different keys are two meshes: they are merged under a new key only when
// every file of every peer is about to be written again (every cluster
// they read is being connected), as otherwise some cluster would keep
// the old key; else the connect is refused.
func meshKey(ctx context.Context, peers []Peer, infos []v1.ClusterInfo) ([]byte, error) {
	connecting := make(map[string]bool, len(infos))
	for _, info := range infos {
		connecting[info.Name] = true
	}
	var all []ClusterFile
	var outside []string
	for i, p := range peers {
		files, err := p.ClusterFiles(ctx)
		if err != nil {
			return nil, fmt.Errorf("read the cluster files of %s: %w", p.Describe(), err)
		}
		for _, f := range files {
			all = append(all, f)
			if !connecting[f.Name] && len(f.GossipKey) != 0 {
				outside = append(outside, fmt.Sprintf("%s (read by %s)", f.Name, infos[i].Name))
			}
		}
	}
	key, err := MeshGossipKey(all)
	switch {
	case err == nil && key != nil:
		return key, nil
	case err != nil && len(outside) > 0:
		slices.Sort(outside)
		return nil, fmt.Errorf("%w; not being connected now: %s", err, strings.Join(slices.Compact(outside), ", "))
	}
	key = make([]byte, GossipKeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("generate the mesh gossip key: %w", err)
	}
	return key, nil
}

// link makes reader's agents connect to target, pinning what target said
// of itself.
func link(ctx context.Context, reader Peer, readerInfo v1.ClusterInfo, target Peer, targetInfo v1.ClusterInfo, gossipKey []byte) error {
	creds, err := target.Issue(ctx, readerInfo.Name)
	if err != nil {
		return fmt.Errorf("connect: %s issuing credentials for %s: %w", targetInfo.Name, readerInfo.Name, err)
	}
	if creds.Cluster != targetInfo.Name || creds.ClusterID != targetInfo.ID {
		return fmt.Errorf("connect: credentials from %s name cluster %s (ID %d), its info said %s (ID %d): was its API server replaced meanwhile? run connect again",
			target.Describe(), creds.Cluster, creds.ClusterID, targetInfo.Name, targetInfo.ID)
	}
	f := ClusterFile{
		Name: targetInfo.Name, ID: targetInfo.ID, PodCIDRs: targetInfo.PodCIDRs,
		Endpoints: creds.Endpoints, CA: creds.CAPEM, Cert: creds.CertPEM, Key: creds.KeyPEM,
		GossipKey: gossipKey,
	}
	if err := reader.WriteClusterFile(ctx, f); err != nil {
		return fmt.Errorf("connect: writing %s's cluster file for %s: %w", targetInfo.Name, readerInfo.Name, err)
	}
	return nil
}

// checkMesh refuses what would not work, saying what to change.
func checkMesh(infos []v1.ClusterInfo) error {
	var errs []error
	for i := range infos {
		for j := i + 1; j < len(infos); j++ {
			a, b := infos[i], infos[j]
			if a.Name == b.Name {
				errs = append(errs, fmt.Errorf("two clusters are both named %q: give each a unique --cluster-name", a.Name))
				continue
			}
			if err := pinConflict(a.Name, a.ID, a.PodCIDRs, b.Name, b.ID, b.PodCIDRs); err != nil {
				errs = append(errs, err)
			}
			if a.MaxConnectedClusters != b.MaxConnectedClusters {
				errs = append(errs, fmt.Errorf("%s allows %d connected clusters and %s %d: use the same --max-connected-clusters everywhere", a.Name, a.MaxConnectedClusters, b.Name, b.MaxConnectedClusters))
			}
		}
	}
	return errors.Join(errs...)
}

// pinConflict says why clusters a and b cannot be in one mesh, or returns
// nil.
func pinConflict(a string, aID v1.ClusterID, aCIDRs []netip.Prefix, b string, bID v1.ClusterID, bCIDRs []netip.Prefix) error {
	if aID == bID {
		return fmt.Errorf("clusters %s and %s both use cluster ID %d: restart one with a unique --cluster-id (1-%d)", a, b, aID, v1.MaxClusterID)
	}
	if pa, pb, ok := v1.PrefixesOverlap(aCIDRs, bCIDRs); ok {
		return fmt.Errorf("pod CIDR %s of %s overlaps %s of %s: clusters in a mesh need disjoint --pod-cidrs", pa, a, pb, b)
	}
	return nil
}

// checkPinned refuses to add a cluster that conflicts with one a peer's
// agents already read: connecting A with B and later A with C must not
// give A's agents two clusters that claim one range. A file for a cluster
// being connected is replaced, so it is not compared.
func checkPinned(ctx context.Context, peers []Peer, infos []v1.ClusterInfo) error {
	connecting := make(map[string]bool, len(infos))
	for _, info := range infos {
		connecting[info.Name] = true
	}
	var errs []error
	for _, p := range peers {
		files, err := p.ClusterFiles(ctx)
		if err != nil {
			return fmt.Errorf("read the cluster files of %s: %w", p.Describe(), err)
		}
		for _, f := range files {
			if connecting[f.Name] {
				continue
			}
			for _, info := range infos {
				if err := pinConflict(info.Name, info.ID, info.PodCIDRs, f.Name, f.ID, f.PodCIDRs); err != nil {
					errs = append(errs, fmt.Errorf("%w (%s is already connected to %s; disconnect it first)", err, f.Name, p.Describe()))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// checkReachable dials every etcd endpoint a cluster advertises, so a
// wrong --advertise-address is caught now rather than by every agent.
func checkReachable(ctx context.Context, info v1.ClusterInfo, timeout time.Duration) error {
	for _, e := range info.Endpoints {
		u, err := url.Parse(e)
		if err != nil {
			return fmt.Errorf("cluster %s advertises an invalid etcd endpoint %q: %w", info.Name, e, err)
		}
		d := net.Dialer{Timeout: timeout}
		conn, err := d.DialContext(ctx, "tcp", u.Host)
		if err != nil {
			return fmt.Errorf("etcd endpoint %s of cluster %s is unreachable from here: %w (check its --advertise-address)", e, info.Name, err)
		}
		conn.Close()
	}
	return nil
}

// Disconnect separates a and b: each side's agents drop the other (their
// cluster file goes) and each side revokes the certificate it issued to
// the other, which also ends the other's open connections.
func Disconnect(ctx context.Context, a, b Peer) error {
	ia, err := a.Info(ctx)
	if err != nil {
		return fmt.Errorf("disconnect: cluster at %s is unreachable: %w", a.Describe(), err)
	}
	ib, err := b.Info(ctx)
	if err != nil {
		return fmt.Errorf("disconnect: cluster at %s is unreachable: %w", b.Describe(), err)
	}
	var errs []error
	if err := a.RemoveClusterFile(ctx, ib.Name); err != nil {
		errs = append(errs, err)
	}
	if err := b.RemoveClusterFile(ctx, ia.Name); err != nil {
		errs = append(errs, err)
	}
	if err := b.Revoke(ctx, ia.Name); err != nil {
		errs = append(errs, err)
	}
	if err := a.Revoke(ctx, ib.Name); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("disconnect %s and %s: %w", ia.Name, ib.Name, err)
	}
	return nil
}

// StateDirPeer reaches a mesh API server through its state dir: the admin
// token and HTTP address it writes there, and <state-dir>/clusters as the
// config dir its agents read (the lab's layout; a real deployment copies
// that directory to its nodes).
type StateDirPeer struct {
	Dir string
	// ConfigDir overrides <Dir>/clusters.
	ConfigDir string
	// Dial, when set, opens the connections to the API server (the lab
	// dials from inside a namespace).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// ClustersDir is the default config dir under an API server's state dir.
func ClustersDir(stateDir string) string { return filepath.Join(stateDir, v1.StateClustersDir) }

func (p *StateDirPeer) Describe() string { return p.Dir }

func (p *StateDirPeer) configDir() string {
	if p.ConfigDir != "" {
		return p.ConfigDir
	}
	return ClustersDir(p.Dir)
}

// client finds the API server from its state dir, every time: a
// restarted server may listen elsewhere.
func (p *StateDirPeer) client() (*client.Client, error) {
	return client.FromStateDir(p.Dir, p.Dial)
}

func (p *StateDirPeer) Info(ctx context.Context) (v1.ClusterInfo, error) {
	c, err := p.client()
	if err != nil {
		return v1.ClusterInfo{}, err
	}
	return c.Info(ctx)
}

func (p *StateDirPeer) Issue(ctx context.Context, forCluster string) (v1.RemoteCredentials, error) {
	c, err := p.client()
	if err != nil {
		return v1.RemoteCredentials{}, err
	}
	return c.IssueRemote(ctx, forCluster)
}

func (p *StateDirPeer) Revoke(ctx context.Context, forCluster string) error {
	c, err := p.client()
	if err != nil {
		return err
	}
	return c.RevokeRemote(ctx, forCluster)
}

func (p *StateDirPeer) ClusterFiles(context.Context) ([]ClusterFile, error) {
	loaded, err := scanDir(p.configDir())
	if err != nil {
		return nil, err
	}
	var out []ClusterFile
	for _, lf := range loaded {
		// An unreadable file pins nothing; agents refuse it too.
		if lf.err == nil {
			out = append(out, lf.file)
		}
	}
	return out, nil
}

func (p *StateDirPeer) WriteClusterFile(_ context.Context, f ClusterFile) error {
	return WriteClusterFile(p.configDir(), f)
}

func (p *StateDirPeer) RemoveClusterFile(_ context.Context, name string) error {
	return RemoveClusterFile(p.configDir(), name)
}
