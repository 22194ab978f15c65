package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/trellis-mesh/trellis/agent"
	"github.com/trellis-mesh/trellis/clustermesh"
)

// Setup beyond namespaces and processes: joining the clusters, and the pod
// files through which the lab plays CNI to the agents. Every API server
// creates its own CAs on first start, as a real cluster's would: the lab
// shares none between clusters (see doc.go).

// connect joins every cluster with every other (and with itself) by
// running `trellis connect --mesh` inside the first API server's
// namespace, from where every API server is reachable. A lone cluster
// gets only its own cluster file.
func (l *lab) connect(ctx context.Context) error {
	first := l.lay.clusters[0]
	if len(l.lay.clusters) == 1 {
		peer := &clustermesh.StateDirPeer{Dir: first.stateDir, Dial: dialerIn(first.ns)}
		if err := clustermesh.ConnectSelf(ctx, peer); err != nil {
			return fmt.Errorf("lab: %s's own cluster file: %w", first.Name, err)
		}
		return nil
	}
	argv := []string{l.opts.Binary, "connect", "--mesh"}
	for _, c := range l.lay.clusters {
		argv = append(argv, c.stateDir)
	}
	out, err := l.runTrellisIn(ctx, first, argv)
	if err != nil {
		return err
	}
	l.log.Debug("clusters connected", "output", out)
	return nil
}

// writePodFile tells the node's agent about the pod.
func writePodFile(p *podLayout, ready bool) error {
	pf := agent.PodFile{Namespace: p.Namespace, Name: p.Name, IP: p.ip, Ready: ready, Labels: p.Labels}
	data, err := json.MarshalIndent(pf, "", "  ")
	if err != nil {
		return err
	}
	path := p.podFile()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("lab: pods dir: %w", err)
	}
	// Write and rename, so the agent never reads half a file.
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("lab: pod file: %w", err)
	}
	return os.Rename(tmp, path)
}
