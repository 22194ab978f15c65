package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/trellis-mesh/trellis/agent"
	"github.com/trellis-mesh/trellis/apiserver/pki"
	"github.com/trellis-mesh/trellis/clustermesh"
)

// Setup beyond namespaces and processes: the one CA every API server
// shares, joining the clusters, and the pod files through which the lab
// plays CNI to the agents.

// setupCA creates the lab's one CA and gives it to every API server before
// its first start, so `trellis connect` finds matching CAs.
func (l *lab) setupCA() error {
	if _, _, err := pki.LoadOrCreateCA(filepath.Join(l.dir, "ca"), "lab"); err != nil {
		return fmt.Errorf("lab: CA: %w", err)
	}
	for _, c := range l.lay.clusters {
		if err := l.giveCA(c); err != nil {
			return err
		}
	}
	return nil
}

// giveCA copies the lab's CA into c's API server state dir.
func (l *lab) giveCA(c *clusterLayout) error {
	caDir := filepath.Join(l.dir, "ca")
	dst := filepath.Join(c.stateDir, "pki")
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return err
	}
	for _, f := range []string{pki.CACertFile, pki.CAKeyFile} {
		data, err := os.ReadFile(filepath.Join(caDir, f))
		if err != nil {
			return fmt.Errorf("lab: CA: %w", err)
		}
		if err := os.WriteFile(filepath.Join(dst, f), data, 0o600); err != nil {
			return fmt.Errorf("lab: CA: %w", err)
		}
	}
	return nil
}

// connect joins every cluster with every other (and with itself) by
// running `trellis connect --mesh` inside the first API server's
// namespace, from where every API server is reachable. A lone cluster
// gets only its own cluster file.
func (l *lab) connect(ctx context.Context) error {
	first := l.lay.clusters[0]
	if len(l.lay.clusters) == 1 {
		peer := &clustermesh.StateDirPeer{Dir: first.stateDir, Client: httpIn(first.ns, 30*time.Second)}
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
