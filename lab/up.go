package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// UpOptions tune Up.
type UpOptions struct {
	Options
	// Topology is what to build; nil builds DefaultTopology.
	Topology *Topology
	// ReadyTimeout bounds the wait for API servers and agents (default
	// 2 minutes).
	ReadyTimeout time.Duration
	// Keep leaves a lab that failed to come up in place for inspection
	// (`lab down` removes it); by default a failed Up tears down what it
	// built.
	Keep bool
	// Kubernetes builds the lab in Kubernetes mode (see kubernetes.go):
	// a kube-apiserver per cluster, the Kubernetes source, agents with
	// --kubernetes. KubeAPIServer is its binary (default: kube-apiserver
	// beside the trellis binary, else on $PATH).
	Kubernetes    bool
	KubeAPIServer string
}

// Up builds the lab and returns once every agent reports every cluster
// ready. The lab keeps running after Up returns (its processes are
// daemons); Down removes it.
func Up(ctx context.Context, opts UpOptions) (*Report, error) {
	if err := requireRoot(); err != nil {
		return nil, err
	}
	if err := opts.complete(); err != nil {
		return nil, err
	}
	if opts.ReadyTimeout == 0 {
		opts.ReadyTimeout = 2 * time.Minute
	}
	topo := DefaultTopology()
	if opts.Topology != nil {
		topo = *opts.Topology
	}
	if err := topo.Validate(); err != nil {
		return nil, fmt.Errorf("lab: topology: %w", err)
	}
	if opts.Kubernetes {
		bin, err := findKubeAPIServer(opts.KubeAPIServer, opts.Binary)
		if err != nil {
			return nil, err
		}
		opts.KubeAPIServer = bin
	}
	cg2, err := cgroup2Root()
	if err != nil {
		return nil, err
	}
	lock, err := lockLab(opts.Options)
	if err != nil {
		return nil, err
	}
	l := &lab{opts: opts.Options, dir: filepath.Join(opts.BaseDir, opts.Name), lock: lock, log: opts.Log.With("lab", opts.Name)}
	defer l.close()
	if err := l.refuseExisting(cg2); err != nil {
		return nil, err
	}
	lay, err := newLayout(opts.Name, opts.BaseDir, cg2, &topo)
	if err != nil {
		return nil, err
	}
	l.lay = lay
	l.state = &State{
		Name: opts.Name, Created: time.Now().UTC(), Phase: "creating", Topology: topo,
		Cgroup2: cg2, CgroupRoot: lay.cgroupRoot, Procs: map[string]*Proc{},
		Kubernetes: opts.Kubernetes,
	}
	start := time.Now()
	if err := l.build(ctx, opts); err != nil {
		if opts.Keep {
			return nil, fmt.Errorf("%w\n(the half-built lab is kept: inspect %s, then `trellis lab down --name %s`)", err, l.dir, opts.Name)
		}
		l.log.Info("tearing down the half-built lab")
		if derr := l.teardown(); derr != nil {
			err = errors.Join(err, derr)
		}
		os.Remove(filepath.Join(opts.BaseDir, opts.Name+".lock"))
		return nil, err
	}
	rep := l.report(ctx)
	rep.UpTook = time.Since(start).Round(time.Millisecond).String()
	return rep, nil
}

// refuseExisting refuses to build over a lab of the same name or its
// leftovers.
func (l *lab) refuseExisting(cg2 string) error {
	hint := fmt.Sprintf("run `trellis lab down --name %s` first", l.opts.Name)
	if _, err := os.Stat(statePath(l.dir)); err == nil {
		return fmt.Errorf("lab %s already exists (%s): %s", l.opts.Name, l.dir, hint)
	}
	if ns, _ := listNetNS(nsPrefix(l.opts.Name)); len(ns) > 0 {
		return fmt.Errorf("lab %s left namespaces behind (%s, …): %s", l.opts.Name, ns[0], hint)
	}
	if _, err := os.Stat(filepath.Join(cg2, cgroupDirName(l.opts.Name))); err == nil {
		return fmt.Errorf("lab %s left its cgroup behind: %s", l.opts.Name, hint)
	}
	if pins, _ := filepath.Glob(filepath.Join(BPFRoot, pinPrefix(l.opts.Name)+"*")); len(pins) > 0 {
		return fmt.Errorf("lab %s left bpffs pins behind (%s): %s", l.opts.Name, pins[0], hint)
	}
	return nil
}

func (l *lab) step(format string, args ...any) {
	fmt.Fprintf(l.opts.Out, "• "+format+"\n", args...)
}

func (l *lab) build(ctx context.Context, opts UpOptions) error {
	if err := os.MkdirAll(filepath.Join(l.dir, "logs"), 0o755); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	for _, n := range l.lay.allNodes() {
		l.state.PinDirs = append(l.state.PinDirs, n.pinDir)
	}
	if err := l.save(); err != nil {
		return err
	}

	// Cgroups: the lab's, one per API server, node and pod.
	dirs := []string{l.lay.cgroupRoot}
	for _, c := range l.lay.clusters {
		dirs = append(dirs, c.cgroup)
		for _, n := range c.nodes {
			dirs = append(dirs, n.cgroup)
			for _, p := range n.pods {
				dirs = append(dirs, p.cgroup)
			}
		}
	}
	for _, d := range dirs {
		if err := os.Mkdir(d, 0o755); err != nil {
			return fmt.Errorf("lab: create cgroup: %w", err)
		}
	}

	l.step("network: bridge namespace %s (%s, no uplink), underlay %s", l.lay.bridgeNS, bridgeName, l.lay.underlay)
	if err := l.setupBridge(); err != nil {
		return err
	}
	for _, c := range l.lay.clusters {
		if err := l.attach(c.ns, c.bridgePort, c.ip); err != nil {
			return err
		}
		if l.state.Kubernetes {
			// Its mesh API server starts once the objects are written
			// (upKubernetes).
			if err := l.startKubernetes(c, opts.KubeAPIServer); err != nil {
				return err
			}
			l.step("cluster %s: etcd and kube-apiserver starting in %s", c.Name, c.ns)
			continue
		}
		if err := l.startAPIServer(c); err != nil {
			return err
		}
		l.step("cluster %s: mesh API server in %s at %s", c.Name, c.ns, c.registryURL())
	}
	for _, n := range l.lay.allNodes() {
		if err := l.setupNode(n); err != nil {
			return err
		}
		for _, p := range n.pods {
			if err := l.setupPod(p); err != nil {
				return err
			}
		}
	}
	l.step("nodes and pods wired: %d nodes, %d pods", len(l.lay.allNodes()), len(l.lay.allPods()))

	if l.state.Kubernetes {
		if err := l.upKubernetes(ctx, l.lay.clusters, opts.ReadyTimeout); err != nil {
			return err
		}
	}
	if err := l.waitAPIServers(ctx, l.lay.clusters, opts.ReadyTimeout); err != nil {
		return err
	}
	// In Kubernetes mode the source reads the services, and the agents
	// need no registry credential.
	if !l.state.Kubernetes {
		if err := l.registerServices(ctx, l.lay.clusters); err != nil {
			return err
		}
		if err := l.issueNodeCredentials(ctx, l.lay.clusters); err != nil {
			return err
		}
	}
	if err := l.connect(ctx); err != nil {
		return err
	}
	l.step("API servers ready, services registered, %d clusters connected", len(l.lay.clusters))

	l.state.Datapath = true
	for _, p := range l.lay.allPods() {
		if err := writePodFile(p, true); err != nil {
			return err
		}
		if err := l.startEcho(p); err != nil {
			return err
		}
	}
	for _, n := range l.lay.allNodes() {
		if err := l.startAgent(n); err != nil {
			return err
		}
	}
	if err := l.waitAgents(ctx, l.lay.allNodes(), opts.ReadyTimeout); err != nil {
		return err
	}
	l.state.Phase = "up"
	if err := l.save(); err != nil {
		return err
	}
	l.step("every agent reports every cluster ready; datapath on (eBPF socket LB + VXLAN)")
	return nil
}
