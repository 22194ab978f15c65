package lab

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/trellis-mesh/trellis/api/client"
	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Verbs that change a running lab. Each holds the lab's lock.

// Annotate sets annotations (KEY=VALUE; KEY- removes KEY) on a service
// ("namespace/name" or "name") in cluster's registry: it GETs the
// service, changes its annotations and PUTs it back, from inside the
// cluster's API server namespace.
func Annotate(ctx context.Context, opts Options, cluster, service string, kvs []string) error {
	if err := requireRoot(); err != nil {
		return err
	}
	if len(kvs) == 0 {
		return errors.New("lab annotate: give at least one KEY=VALUE (or KEY- to remove)")
	}
	l, err := open(opts, true)
	if err != nil {
		return err
	}
	defer l.close()
	c, err := l.lay.cluster(cluster)
	if err != nil {
		return err
	}
	ns, name, ok := strings.Cut(service, "/")
	if !ok {
		ns, name = DefaultNamespace, service
	}
	if l.kubernetes() {
		return l.annotateKube(ctx, c, ns, name, kvs)
	}
	var svcs []v1.ServiceRequest
	if err := l.withAPI(c, func(api *client.Client) (err error) {
		svcs, err = api.Services(ctx)
		return err
	}); err != nil {
		return err
	}
	i := slices.IndexFunc(svcs, func(s v1.ServiceRequest) bool { return s.Namespace == ns && s.Name == name })
	if i < 0 {
		return fmt.Errorf("lab annotate: cluster %s has no service %s/%s", cluster, ns, name)
	}
	svc := svcs[i]
	if svc.Annotations == nil {
		svc.Annotations = map[string]string{}
	}
	for _, kv := range kvs {
		if k, found := strings.CutSuffix(kv, "-"); found && !strings.Contains(kv, "=") {
			delete(svc.Annotations, k)
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return fmt.Errorf("lab annotate: %q: want KEY=VALUE or KEY-", kv)
		}
		svc.Annotations[k] = v
	}
	if err := l.withAPI(c, func(api *client.Client) error { return api.PutService(ctx, svc) }); err != nil {
		return err
	}
	// Keep the state's copy in step, for status and for rebuilding.
	for si, s := range c.Services {
		if s.Namespace == ns && s.Name == name {
			c.Services[si].Annotations = maps.Clone(svc.Annotations)
		}
	}
	if err := l.save(); err != nil {
		return err
	}
	fmt.Fprintf(l.opts.Out, "%s: service %s/%s annotations now %v\n", cluster, ns, name, svc.Annotations)
	return nil
}

// PodStop stops an echo pod's server and marks the pod not ready (its
// agent withdraws it from every service within a second).
func PodStop(ctx context.Context, opts Options, pod string) error {
	return withPod(opts, pod, func(l *lab, p *podLayout) error {
		if err := writePodFile(p, false); err != nil {
			return err
		}
		if l.kubernetes() {
			if err := l.kubeSetStopped(ctx, p, true); err != nil {
				return err
			}
		}
		if err := l.stopProc(echoKey(p)); err != nil {
			return err
		}
		if l.state.StoppedPods == nil {
			l.state.StoppedPods = map[string]bool{}
		}
		l.state.StoppedPods[p.ref()] = true
		fmt.Fprintf(l.opts.Out, "pod %s stopped and marked not ready\n", p.ref())
		return l.save()
	})
}

// crashTimeLayout is how PodCrash says when it killed.
const crashTimeLayout = "15:04:05.000000"

// PodCrash kills a pod's echo server with SIGKILL and tells no one: its
// pod file still says ready and the registry is not touched, as when a
// pod's process crashes. Only the node's agent, probing its pods, can
// notice. PodStart brings it back.
func PodCrash(ctx context.Context, opts Options, pod string) error {
	return withPod(opts, pod, func(l *lab, p *podLayout) error {
		key := echoKey(p)
		proc := l.state.Procs[key]
		if !proc.Alive() {
			return fmt.Errorf("lab: pod %s runs no echo server (stopped, crashed, or not an echo pod)", p.ref())
		}
		killed := time.Now()
		if err := unix.Kill(proc.PID, unix.SIGKILL); err != nil {
			return fmt.Errorf("lab: kill -9 the echo server of %s (pid %d): %w", p.ref(), proc.PID, err)
		}
		for deadline := time.Now().Add(5 * time.Second); proc.Alive(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				return fmt.Errorf("lab: the echo server of %s (pid %d) survives SIGKILL", p.ref(), proc.PID)
			}
		}
		delete(l.state.Procs, key)
		fmt.Fprintf(l.opts.Out, "pod %s crashed at %s: its echo server (pid %d) killed with SIGKILL, nobody told\n",
			p.ref(), killed.Format(crashTimeLayout), proc.PID)
		return l.save()
	})
}

// PodStart restarts a stopped or crashed pod's echo server and marks it
// ready.
func PodStart(ctx context.Context, opts Options, pod string) error {
	return withPod(opts, pod, func(l *lab, p *podLayout) error {
		if l.state.DownNodes[p.node.ref()] {
			return fmt.Errorf("lab: node %s is down: `trellis lab node up %s` first", p.node.ref(), p.node.ref())
		}
		if !l.state.Procs[echoKey(p)].Alive() {
			if err := l.startEcho(p); err != nil {
				return err
			}
		}
		if err := writePodFile(p, true); err != nil {
			return err
		}
		if l.kubernetes() {
			if err := l.kubeSetStopped(ctx, p, false); err != nil {
				return err
			}
		}
		delete(l.state.StoppedPods, p.ref())
		fmt.Fprintf(l.opts.Out, "pod %s started and marked ready\n", p.ref())
		return l.save()
	})
}

func withPod(opts Options, pod string, fn func(*lab, *podLayout) error) error {
	return withLab(opts, func(l *lab) error {
		p, err := l.lay.pod(pod)
		if err != nil {
			return err
		}
		return fn(l, p)
	})
}

// NodeDown takes a node out: its agent and echo servers are killed, its
// underlay veth goes down, and — playing the node controller that would
// notice — its pods are marked not ready in the cluster's registry, so
// that the other nodes withdraw them.
func NodeDown(ctx context.Context, opts Options, node string) error {
	return withNode(opts, node, func(l *lab, n *nodeLayout) error {
		var errs []error
		if err := l.stopProc(agentKey(n)); err != nil {
			errs = append(errs, err)
		}
		for _, p := range n.pods {
			if err := l.stopProc(echoKey(p)); err != nil {
				errs = append(errs, err)
			}
			if err := writePodFile(p, false); err != nil {
				errs = append(errs, err)
			}
			if l.kubernetes() {
				continue // marked below, through the Kubernetes API
			}
			ready := false
			err := l.withAPI(n.cluster, func(api *client.Client) error {
				return api.PutEndpoint(ctx, v1.EndpointRequest{
					IP: p.ip, Namespace: p.Namespace, Pod: p.Name, Node: n.Name, NodeIP: n.ip, Ready: &ready, Labels: p.Labels,
				})
			})
			if err != nil {
				errs = append(errs, err)
			}
		}
		if err := l.setLinkState(n, false); err != nil {
			errs = append(errs, err)
		}
		if l.state.DownNodes == nil {
			l.state.DownNodes = map[string]bool{}
		}
		l.state.DownNodes[n.ref()] = true
		if l.kubernetes() {
			// The node lifecycle controller's work once the node's grace
			// period is over: Node not ready, its pods and endpoints too.
			if err := l.kubeSync(ctx, n.cluster, n.pods, []*nodeLayout{n}); err != nil {
				errs = append(errs, err)
			}
		}
		if err := l.save(); err != nil {
			errs = append(errs, err)
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
		fmt.Fprintf(l.opts.Out, "node %s down: agent and pods stopped, underlay veth down, its pods marked not ready\n", n.ref())
		return nil
	})
}

// NodeUp reverses NodeDown and waits for the agent to be ready.
func NodeUp(ctx context.Context, opts Options, node string) error {
	return withNode(opts, node, func(l *lab, n *nodeLayout) error {
		if err := l.startNode(n); err != nil {
			return err
		}
		if l.kubernetes() {
			if err := l.kubeSync(ctx, n.cluster, n.pods, []*nodeLayout{n}); err != nil {
				return err
			}
		}
		if err := l.waitAgents(ctx, []*nodeLayout{n}, time.Minute); err != nil {
			return err
		}
		fmt.Fprintf(l.opts.Out, "node %s up: agent ready, pods running\n", n.ref())
		return l.save()
	})
}

// startNode brings a down or crashed node back without waiting: veth up,
// the pods that were not stopped started and marked ready, the agent
// started; the node is no longer down in the state.
func (l *lab) startNode(n *nodeLayout) error {
	if err := l.setLinkState(n, true); err != nil {
		return err
	}
	for _, p := range n.pods {
		if l.state.StoppedPods[p.ref()] {
			continue
		}
		if !l.state.Procs[echoKey(p)].Alive() {
			if err := l.startEcho(p); err != nil {
				return err
			}
		}
		if err := writePodFile(p, true); err != nil {
			return err
		}
	}
	if !l.state.Procs[agentKey(n)].Alive() {
		if err := l.startAgent(n); err != nil {
			return err
		}
	}
	delete(l.state.DownNodes, n.ref())
	return l.save()
}

func withNode(opts Options, node string, fn func(*lab, *nodeLayout) error) error {
	return withLab(opts, func(l *lab) error {
		n, err := l.lay.node(node)
		if err != nil {
			return err
		}
		return fn(l, n)
	})
}
