package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/api/client"
	"github.com/trellis-mesh/trellis/clustermesh"
)

// AddClusterOptions describe the cluster AddCluster adds to a running lab.
type AddClusterOptions struct {
	Options
	// Cluster is the new cluster's name; ID its cluster ID (1-255 but not
	// 96: its pod CIDR is 10.<id>.0.0/16 and its VIP 10.96.<id>.10).
	Cluster string
	ID      uint32
	// Region defaults to the cluster's name; Nodes to 1.
	Region string
	Nodes  int
	// ReadyTimeout bounds the wait for the new API server and for every
	// agent (default 2 minutes).
	ReadyTimeout time.Duration
}

// AddCluster builds one more cluster into a running lab, shaped like the
// default ones (StandardCluster: an echo pod per node, a client pod on n1,
// the global service default/echo), at the next free underlay addresses;
// gives every existing pod routes to its pod CIDR and VIP; joins it with
// every existing cluster (`trellis connect NEW OTHER`, pairwise, inside
// the new API server's namespace); and returns once every agent, old and
// new, reports every cluster ready. A failed AddCluster removes what it
// built of the new cluster and leaves the lab as it was.
func AddCluster(ctx context.Context, o AddClusterOptions) error {
	if err := requireRoot(); err != nil {
		return err
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = 2 * time.Minute
	}
	if o.Nodes == 0 {
		o.Nodes = 1
	}
	if o.Region == "" {
		o.Region = o.Cluster
	}
	switch {
	case o.ID < 1 || o.ID > 255 || o.ID == 96:
		return fmt.Errorf("lab add-cluster: --id %d: the lab's address plan (pod CIDR 10.<id>.0.0/16, VIP 10.96.<id>.10) needs 1-255, not 96", o.ID)
	case o.Nodes < 1 || o.Nodes > maxNodesPerCluster:
		return fmt.Errorf("lab add-cluster: --nodes %d: want 1-%d", o.Nodes, maxNodesPerCluster)
	}
	l, err := open(o.Options, true)
	if err != nil {
		return err
	}
	defer l.close()
	if l.state.Phase != "up" {
		return fmt.Errorf("lab %s is %s, not up: a cluster joins a running lab", l.opts.Name, l.state.Phase)
	}
	if l.kubernetes() {
		return fmt.Errorf("lab %s runs in Kubernetes mode, where add-cluster is not built yet: list the cluster in a topology file for `lab up --kubernetes -f`", l.opts.Name)
	}
	if _, err := l.lay.cluster(o.Cluster); err == nil {
		return fmt.Errorf("lab %s already has a cluster %s", l.opts.Name, o.Cluster)
	}

	oldTopo, oldLay := l.state.Topology, l.lay
	topo, lay, err := extendLayout(l.opts.Name, l.opts.BaseDir, l.state.Cgroup2, oldTopo, oldLay,
		StandardCluster(o.Cluster, o.ID, o.Region, o.Nodes))
	if err != nil {
		return err
	}
	c := lay.clusters[len(lay.clusters)-1]
	l.state.Topology, l.lay = topo, lay
	for _, n := range c.nodes {
		l.state.PinDirs = append(l.state.PinDirs, n.pinDir)
	}
	if err := l.save(); err != nil {
		return err
	}
	start := time.Now()
	err = l.buildCluster(ctx, c, oldLay, o.ReadyTimeout)
	if err != nil {
		l.log.Info("removing the half-added cluster", "cluster", c.Name)
		if rerr := l.removeCluster(ctx, c, oldTopo, oldLay); rerr != nil {
			err = errors.Join(err, fmt.Errorf("and removing it again: %w (`trellis lab down --name %s` removes everything)", rerr, l.opts.Name))
		}
		return err
	}
	l.step("every agent (%d) reports every cluster ready", len(l.liveNodes()))
	fmt.Fprintf(l.opts.Out, "cluster %s (ID %d, region %s, %d nodes) joined lab %s in %s\n",
		c.Name, c.ID, c.Region, len(c.nodes), l.opts.Name, time.Since(start).Round(time.Millisecond))
	return nil
}

// extendLayout is the topology and layout of a running lab (old, oldLay)
// with cluster add appended. The running clusters keep every name and
// address: a new cluster whose name would switch the lab to short bridge
// port names is refused.
func extendLayout(name, baseDir, cgroup2 string, old Topology, oldLay *layout, add Cluster) (Topology, *layout, error) {
	topo := old
	topo.Clusters = append(slices.Clone(old.Clusters), add)
	if err := topo.Validate(); err != nil {
		return old, nil, fmt.Errorf("lab add-cluster: %w", err)
	}
	lay, err := newLayout(name, baseDir, cgroup2, &topo)
	if err != nil {
		return old, nil, err
	}
	for i, c := range oldLay.clusters {
		nc := lay.clusters[i]
		same := nc.bridgePort == c.bridgePort && nc.ip == c.ip && nc.ns == c.ns
		for j, n := range c.nodes {
			same = same && nc.nodes[j].bridgePort == n.bridgePort && nc.nodes[j].ip == n.ip && nc.nodes[j].ns == n.ns
		}
		if !same {
			return old, nil, fmt.Errorf("lab add-cluster: cluster name %q is too long for the lab's bridge port names (<cluster>-api and <cluster>-<node> must fit 15 characters): choose a shorter one", add.Name)
		}
	}
	return topo, lay, nil
}

// clusterRoutes are the destinations pods route to reach cluster c: its
// pod CIDR and its services' VIPs.
func clusterRoutes(c *clusterLayout) []netip.Prefix {
	out := []netip.Prefix{netip.MustParsePrefix(c.PodCIDR)}
	for _, s := range c.Services {
		out = append(out, netip.PrefixFrom(netip.MustParseAddr(s.VIP), 32))
	}
	return out
}

// buildCluster builds cluster c into the running lab whose layout was old.
func (l *lab) buildCluster(ctx context.Context, c *clusterLayout, old *layout, timeout time.Duration) error {
	dirs := []string{c.cgroup}
	for _, n := range c.nodes {
		dirs = append(dirs, n.cgroup)
		for _, p := range n.pods {
			dirs = append(dirs, p.cgroup)
		}
	}
	for _, d := range dirs {
		if err := os.Mkdir(d, 0o755); err != nil {
			return fmt.Errorf("lab: create cgroup: %w", err)
		}
	}
	if err := l.attach(c.ns, c.bridgePort, c.ip); err != nil {
		return err
	}
	if err := l.startAPIServer(c); err != nil {
		return err
	}
	l.step("cluster %s: mesh API server in %s at %s", c.Name, c.ns, c.registryURL())
	for _, n := range c.nodes {
		if err := l.setupNode(n); err != nil {
			return err
		}
		for _, p := range n.pods {
			if err := l.setupPod(p); err != nil {
				return err
			}
		}
	}
	routes := clusterRoutes(c)
	for _, p := range old.allPods() {
		if err := setPodRoutes(p, routes, false); err != nil {
			return err
		}
	}
	l.step("nodes and pods wired: %d nodes, %d pods; every other pod routes %v", len(c.nodes), len(c.allPods()), routes)
	if err := l.waitAPIServers(ctx, []*clusterLayout{c}, timeout); err != nil {
		return err
	}
	if err := l.registerServices(ctx, []*clusterLayout{c}); err != nil {
		return err
	}
	if err := l.issueNodeCredentials(ctx, []*clusterLayout{c}); err != nil {
		return err
	}
	for _, other := range old.clusters {
		// Pairwise rather than --mesh over all: pairs separated with `lab
		// disconnect` stay separated.
		if _, err := l.runTrellisIn(ctx, c, []string{l.opts.Binary, "connect", c.stateDir, other.stateDir}); err != nil {
			return err
		}
	}
	l.step("cluster %s connected with %s", c.Name, strings.Join(clusterNames(old.clusters), ", "))
	for _, n := range c.nodes {
		for _, p := range n.pods {
			if err := writePodFile(p, true); err != nil {
				return err
			}
			if err := l.startEcho(p); err != nil {
				return err
			}
		}
	}
	for _, n := range c.nodes {
		if err := l.startAgent(n); err != nil {
			return err
		}
	}
	return l.waitAgents(ctx, l.liveNodes(), timeout)
}

func clusterNames(cs []*clusterLayout) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.Name)
	}
	return out
}

func (c *clusterLayout) allPods() []*podLayout {
	var out []*podLayout
	for _, n := range c.nodes {
		out = append(out, n.pods...)
	}
	return out
}

// removeCluster undoes a failed buildCluster of c, best effort: its
// processes, the other clusters' cluster files and credentials for it,
// the other pods' routes to it, its pins, namespaces, cgroups and state
// dir; the state goes back to topo and old.
func (l *lab) removeCluster(ctx context.Context, c *clusterLayout, topo Topology, old *layout) error {
	var errs []error
	procs := map[int]uint64{}
	keys := []string{apiKey(c)}
	namespaces := []string{c.ns}
	cgroups := []string{c.cgroup}
	for _, n := range c.nodes {
		keys = append(keys, agentKey(n))
		namespaces = append(namespaces, n.ns)
		cgroups = append(cgroups, n.cgroup)
		for _, p := range n.pods {
			keys = append(keys, echoKey(p))
			namespaces = append(namespaces, p.ns)
		}
	}
	for _, k := range keys {
		if p := l.state.Procs[k]; p.Alive() {
			procs[p.PID] = p.Start
		}
		delete(l.state.Procs, k)
	}
	for _, cg := range cgroups {
		for _, pid := range cgroupPIDs(cg) {
			if start, ok := procStart(pid); ok && pid != os.Getpid() {
				procs[pid] = start
			}
		}
	}
	for pid, start := range netnsPIDs(namespaces) {
		procs[pid] = start
	}
	if left := stopProcs(procs, 5*time.Second); len(left) > 0 {
		errs = append(errs, fmt.Errorf("lab: processes %v do not die", left))
	}
	for _, other := range old.clusters {
		if err := clustermesh.RemoveClusterFile(clustermesh.ClustersDir(other.stateDir), c.Name); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		// Revoke what a connect may have issued; a 404 means it never did.
		if err := l.withAPI(other, func(api *client.Client) error { return api.RevokeRemote(ctx, c.Name) }); err != nil && !errors.Is(err, client.ErrNotFound) {
			errs = append(errs, err)
		}
	}
	routes := clusterRoutes(c)
	for _, p := range old.allPods() {
		if err := setPodRoutes(p, routes, true); err != nil {
			errs = append(errs, err)
		}
	}
	for _, n := range c.nodes {
		if err := os.RemoveAll(n.pinDir); err != nil {
			errs = append(errs, err)
		}
		l.state.PinDirs = slices.DeleteFunc(l.state.PinDirs, func(d string) bool { return d == n.pinDir })
	}
	for _, ns := range namespaces {
		if netnsExists(ns) {
			if err := deleteNetNS(ns); err != nil {
				errs = append(errs, err)
			}
		}
		l.state.Namespaces = slices.DeleteFunc(l.state.Namespaces, func(s string) bool { return s == ns })
	}
	if err := removeCgroupTree(c.cgroup); err != nil {
		errs = append(errs, err)
	}
	for _, n := range c.nodes {
		if err := removeCgroupTree(n.cgroup); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(filepath.Join(l.dir, c.Name)); err != nil {
		errs = append(errs, err)
	}
	l.state.Topology, l.lay = topo, old
	if err := l.save(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
