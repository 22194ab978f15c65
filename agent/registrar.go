package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/api/client"
	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// PodFile is what the node's CNI step (the lab's, in standalone mode)
// writes into <state-dir>/pods/<namespace>_<name>.json for every pod on the
// node; the agent registers it as an endpoint and withdraws it when the
// file goes.
type PodFile struct {
	Namespace string            `json:"namespace"`
	Name      string            `json:"name"`
	IP        netip.Addr        `json:"ip"`
	Ready     bool              `json:"ready"`
	Labels    map[string]string `json:"labels,omitempty"`
}

// registrar keeps the node and its pods registered with the local
// cluster's registry API.
type registrar struct {
	api      *client.Client
	node     string
	nodeIP   netip.Addr
	podCIDRs []netip.Prefix
	// keys is what the node publishes of its encryption now and a
	// channel that receives when it changes; nil: never anything.
	keys    func() (NodeKeys, <-chan struct{})
	sent    NodeKeys // what was last registered
	podsDir string
	// down says whether local health probes a pod IP down (nil: no
	// probing); such a pod is registered not ready.
	down func(netip.Addr) bool
	// kick asks for a sync now (local health changed and the datapath
	// has it).
	kick chan struct{}
	log  *slog.Logger

	registered map[string]PodFile // file name → what was registered
}

// registerNode announces this node with its current key; retried by run
// until it works.
func (r *registrar) registerNode(ctx context.Context) error {
	var keys NodeKeys
	if r.keys != nil {
		keys, _ = r.keys()
	}
	if err := r.api.PutNode(ctx, v1.NodeRequest{Name: r.node, IPs: []netip.Addr{r.nodeIP}, PodCIDRs: r.podCIDRs,
		WireGuardPublicKey: keys.WireGuard, IPsecKeyIndex: keys.IPsecIndex}); err != nil {
		return err
	}
	if keys != r.sent {
		r.log.Info("published the node's encryption keys", "wireGuardPublicKey", keys.WireGuard, "ipsecKeyIndex", keys.IPsecIndex)
		r.sent = keys
	}
	return nil
}

// withdraw deletes an endpoint; one the registry no longer has is gone
// already.
func (r *registrar) withdraw(ctx context.Context, ip netip.Addr) error {
	if err := r.api.DeleteEndpoint(ctx, ip); err != nil && !errors.Is(err, client.ErrNotFound) {
		return err
	}
	return nil
}

// readPods reads the pod files of a pods dir, by file name; files it
// cannot read are left out and named in the error.
func readPods(dir string) (map[string]PodFile, error) {
	pods := make(map[string]PodFile)
	if dir == "" {
		return pods, nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return pods, fmt.Errorf("pods dir %s: %w", dir, err)
	}
	var errs []error
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".json") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var pod PodFile
		if err := json.Unmarshal(data, &pod); err != nil {
			errs = append(errs, fmt.Errorf("pod file %s: %w", name, err))
			continue
		}
		pods[name] = pod
	}
	return pods, errors.Join(errs...)
}

// syncPods makes the registry's endpoints of this node match the pods
// directory, and their readiness the pod files' and local health's: a
// pod whose probes fail is registered not ready.
func (r *registrar) syncPods(ctx context.Context) error {
	if r.podsDir == "" {
		return nil
	}
	pods, err := readPods(r.podsDir)
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	seen := make(map[string]bool)
	for name, pod := range pods {
		seen[name] = true
		unhealthy := pod.Ready && r.down != nil && r.down(pod.IP)
		if unhealthy {
			pod.Ready = false
		}
		if old, ok := r.registered[name]; ok && samePod(old, pod) {
			continue
		}
		if old, ok := r.registered[name]; ok && old.IP != pod.IP {
			if err := r.withdraw(ctx, old.IP); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		err = r.api.PutEndpoint(ctx, v1.EndpointRequest{
			IP: pod.IP, Namespace: pod.Namespace, Pod: pod.Name, Node: r.node, NodeIP: r.nodeIP,
			Ready: &pod.Ready, Labels: pod.Labels,
		})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		r.registered[name] = pod
		if unhealthy {
			r.log.Info("registered pod not ready: its probes fail", "pod", pod.Namespace+"/"+pod.Name, "ip", pod.IP)
		} else {
			r.log.Info("registered pod", "pod", pod.Namespace+"/"+pod.Name, "ip", pod.IP, "ready", pod.Ready)
		}
	}
	for name, pod := range r.registered {
		if seen[name] {
			continue
		}
		if err := r.withdraw(ctx, pod.IP); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(r.registered, name)
		r.log.Info("withdrew pod", "pod", pod.Namespace+"/"+pod.Name, "ip", pod.IP)
	}
	return errors.Join(errs...)
}

func samePod(a, b PodFile) bool {
	if a.Namespace != b.Namespace || a.Name != b.Name || a.IP != b.IP || a.Ready != b.Ready || len(a.Labels) != len(b.Labels) {
		return false
	}
	for k, v := range a.Labels {
		if b.Labels[k] != v {
			return false
		}
	}
	return true
}

// run registers the node, then keeps the pods in sync, until ctx ends.
func (r *registrar) run(ctx context.Context, interval time.Duration) {
	delay := 200 * time.Millisecond
	for {
		if err := r.registerNode(ctx); err == nil {
			break
		} else if ctx.Err() == nil {
			r.log.Warn("cannot register node with the local registry; retrying", "err", err, "retry", delay)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, 10*time.Second)
	}
	r.log.Info("node registered", "node", r.node, "ip", r.nodeIP)
	t := time.NewTicker(interval)
	defer t.Stop()
	var keyChanged <-chan struct{}
	if r.keys != nil {
		_, keyChanged = r.keys()
	}
	var lastErr string
	for {
		// A new key (encryption on, off, a rotation) is published at once;
		// a failure is retried at the next tick.
		if r.keys != nil {
			if keys, _ := r.keys(); keys != r.sent {
				if err := r.registerNode(ctx); err != nil && ctx.Err() == nil {
					r.log.Warn("cannot publish the node's new key; retrying", "err", err)
				}
			}
		}
		err := r.syncPods(ctx)
		if err != nil && err.Error() != lastErr && ctx.Err() == nil {
			r.log.Warn("pod registration incomplete; retrying", "err", err)
		}
		lastErr = ""
		if err != nil {
			lastErr = err.Error()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-keyChanged:
		case <-r.kick:
		}
	}
}
