package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
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
	url, token string
	node       string
	nodeIP     netip.Addr
	podCIDRs   []netip.Prefix
	wgKey      string
	podsDir    string
	log        *slog.Logger
	client     *http.Client

	registered map[string]PodFile // file name → what was registered
}

func (r *registrar) do(ctx context.Context, method, path string, body any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(r.url, "/")+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+r.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := r.client.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound && method == http.MethodDelete {
		return nil
	}
	if resp.StatusCode >= 300 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(msg)))
	}
	return nil
}

// registerNode announces this node; retried by run until it works.
func (r *registrar) registerNode(ctx context.Context) error {
	body := map[string]any{"ips": []netip.Addr{r.nodeIP}}
	if len(r.podCIDRs) > 0 {
		body["podCIDRs"] = r.podCIDRs
	}
	if r.wgKey != "" {
		body["wireGuardPublicKey"] = r.wgKey
	}
	return r.do(ctx, http.MethodPut, "/v1/nodes/"+r.node, body)
}

// syncPods makes the registry's endpoints of this node match the pods
// directory.
func (r *registrar) syncPods(ctx context.Context) error {
	if r.podsDir == "" {
		return nil
	}
	entries, err := os.ReadDir(r.podsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("pods dir %s: %w", r.podsDir, err)
	}
	seen := make(map[string]bool)
	var errs []error
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".json") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(r.podsDir, name))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var pod PodFile
		if err := json.Unmarshal(data, &pod); err != nil {
			errs = append(errs, fmt.Errorf("pod file %s: %w", name, err))
			continue
		}
		seen[name] = true
		if old, ok := r.registered[name]; ok && samePod(old, pod) {
			continue
		}
		if old, ok := r.registered[name]; ok && old.IP != pod.IP {
			if err := r.do(ctx, http.MethodDelete, "/v1/endpoints/"+old.IP.String(), nil); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		err = r.do(ctx, http.MethodPut, "/v1/endpoints/"+pod.IP.String(), map[string]any{
			"namespace": pod.Namespace, "pod": pod.Name, "node": r.node, "nodeIP": r.nodeIP,
			"ready": pod.Ready, "labels": pod.Labels,
		})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		r.registered[name] = pod
		r.log.Info("registered pod", "pod", pod.Namespace+"/"+pod.Name, "ip", pod.IP, "ready", pod.Ready)
	}
	for name, pod := range r.registered {
		if seen[name] {
			continue
		}
		if err := r.do(ctx, http.MethodDelete, "/v1/endpoints/"+pod.IP.String(), nil); err != nil {
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
	var lastErr string
	for {
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
		}
	}
}
