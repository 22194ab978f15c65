package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/agent"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
)

// Waits: until the API servers answer ready and the agents report every
// joined cluster ready, failing early with the log tail of a process that
// exited.

// waitAPIServers waits until the API servers of clusters are ready,
// failing early when one exits.
func (l *lab) waitAPIServers(ctx context.Context, clusters []*clusterLayout, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	pending := slices.Clone(clusters)
	for len(pending) > 0 {
		var next []*clusterLayout
		var lastErr error
		for _, c := range pending {
			if !l.state.Procs[apiKey(c)].Alive() {
				return fmt.Errorf("lab: %s's API server exited:\n%s", c.Name, tailFile(c.log, 20))
			}
			if _, err := os.Stat(filepath.Join(c.stateDir, v1.StateHTTPAddrFile)); err != nil {
				lastErr = fmt.Errorf("%s: no %s yet", c.Name, v1.StateHTTPAddrFile)
				next = append(next, c)
				continue
			}
			if err := l.apiReady(ctx, c); err != nil {
				lastErr = fmt.Errorf("%s: %w", c.Name, err)
				next = append(next, c)
			}
		}
		pending = next
		if len(pending) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: API servers not ready after %s: %w", timeout, lastErr)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return nil
}

// agentReady says whether n's agent reports ready and connected every lab
// cluster joined with its own, and none of the clusters disconnected
// from it (those it must have drained).
func (l *lab) agentReady(ctx context.Context, n *nodeLayout) (agent.Status, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	st, err := agent.FetchStatus(ctx, n.socket)
	if err != nil {
		return st, err
	}
	seen := map[string]clustermesh.ClusterStatus{}
	for _, c := range st.Clusters {
		seen[c.Name] = c
	}
	var notReady, notConnected, notDrained []string
	for _, c := range l.lay.clusters {
		cs, ok := seen[c.Name]
		switch {
		case !l.state.joined(n.cluster.Name, c.Name):
			if ok {
				notDrained = append(notDrained, c.Name)
			}
		case !cs.Ready:
			notReady = append(notReady, c.Name)
		case !cs.Connected:
			notConnected = append(notConnected, c.Name)
		}
	}
	var problems []string
	if len(notReady) > 0 {
		problems = append(problems, "clusters not ready: "+strings.Join(notReady, ", "))
	}
	if len(notConnected) > 0 {
		problems = append(problems, "clusters not connected: "+strings.Join(notConnected, ", "))
	}
	if len(notDrained) > 0 {
		problems = append(problems, "disconnected clusters still watched: "+strings.Join(notDrained, ", "))
	}
	if len(problems) > 0 {
		return st, errors.New(strings.Join(problems, "; "))
	}
	return st, nil
}

// liveNodes are the nodes that are not down (their agents should run).
func (l *lab) liveNodes() []*nodeLayout {
	var out []*nodeLayout
	for _, n := range l.lay.allNodes() {
		if !l.state.DownNodes[n.ref()] {
			out = append(out, n)
		}
	}
	return out
}

// waitAgents waits until the agents of nodes report ready (agentReady).
// An agent that exits fails the wait with its log tail, also when it
// refused one of its flags: a renamed datapath flag is an error to fix,
// not a reason to run the lab without its datapath.
func (l *lab) waitAgents(ctx context.Context, nodes []*nodeLayout, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	pending := slices.Clone(nodes)
	for {
		var next []*nodeLayout
		var lastErr error
		for _, n := range pending {
			if !l.state.Procs[agentKey(n)].Alive() {
				return fmt.Errorf("lab: agent of %s exited:\n%s", n.ref(), tailFile(n.log, 20))
			}
			if _, err := l.agentReady(ctx, n); err != nil {
				lastErr = fmt.Errorf("%s: %w", n.ref(), err)
				next = append(next, n)
			}
		}
		pending = next
		if len(pending) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: agents not ready after %s: %w (logs in %s)", timeout, lastErr, filepath.Join(l.dir, "logs"))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// tailFile is the last lines of a log file, for error messages.
func tailFile(path string, lines int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	parts := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return "    " + strings.Join(parts, "\n    ")
}
