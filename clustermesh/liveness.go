package clustermesh

// Cluster liveness: whether a cluster's control plane answers this agent
// now, first hand. The gossip's partition rule (docs/design.md, rule 2)
// uses it to corroborate deaths the gossip alone may not be trusted with:
// nodes of a cluster that all stopped gossiping at once are dead, rather
// than cut off from the gossip only, when that cluster's own mesh API
// server does not answer either.
//
// A probe is one read of the cluster's heartbeat key over a connection of
// its own, to the endpoints and with the credentials of the cluster's
// file (its pinned CA): no other cluster can answer it, or make it fail
// short of cutting the network between this agent and the cluster. A new
// connection rather than the session's: the session's gRPC connection
// may still look fine for seconds (keepalive) after its peer vanished, and
// a read on it would wait for a reconnect; a fresh dial and read bounded
// by a short timeout says "answers now" or "does not".

import (
	"context"
	"errors"
	"fmt"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
)

// Liveness is one probe of a cluster's control plane.
type Liveness struct {
	Cluster string
	// Reachable: the cluster's etcd, through its API server's front door,
	// answered a read within the timeout.
	Reachable bool
	// Heartbeat: the read found the cluster's heartbeat key, which its
	// mesh API server keeps on a 30 s lease (so it goes 30 s after the
	// server died; with an external etcd, etcd may answer without it).
	Heartbeat bool
	// Start is when the probe began, Took how long it took.
	Start time.Time
	Took  time.Duration
	// Err says why the cluster is not reachable.
	Err string
}

// ErrUnknownCluster is returned for a probe of a cluster the config dir
// has no (valid) file for: there is nothing to dial.
var ErrUnknownCluster = errors.New("no cluster file for it in the config dir")

// ProbeCluster reads cluster's heartbeat key within timeout, over a new
// connection made with the cluster's file, and says whether the cluster
// answered and whether its heartbeat is there. The error is for a probe
// that could not be made (no file, bad credentials), not for a cluster
// that did not answer: that is Reachable false, with Err saying why.
func (m *Mesh) ProbeCluster(ctx context.Context, cluster string, timeout time.Duration) (Liveness, error) {
	m.mu.Lock()
	lf, ok := m.files[cluster]
	m.mu.Unlock()
	if !ok || lf.err != nil {
		return Liveness{}, fmt.Errorf("clustermesh: probe cluster %s: %w", cluster, ErrUnknownCluster)
	}
	tlsCfg, err := lf.file.TLSConfig()
	if err != nil {
		return Liveness{}, fmt.Errorf("clustermesh: probe cluster %s: cluster file: %w", cluster, err)
	}
	lv := Liveness{Cluster: cluster, Start: time.Now()}
	client, err := kvstore.NewClient(kvstore.Config{
		Endpoints: lf.file.Endpoints, TLS: tlsCfg,
		DialTimeout: timeout, RequestTimeout: timeout,
		// One read per probe, and probes are rate-limited by the caller.
		QPS: -1, Logger: m.log,
	})
	if err != nil {
		return Liveness{}, fmt.Errorf("clustermesh: probe cluster %s: %w", cluster, err)
	}
	defer client.Close()
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	kv, _, err := client.Get(rctx, v1.HeartbeatKey(cluster))
	lv.Took = time.Since(lv.Start)
	if err != nil {
		if ctx.Err() != nil {
			return Liveness{}, fmt.Errorf("clustermesh: probe cluster %s: %w", cluster, ctx.Err())
		}
		lv.Err = fmt.Sprintf("no answer within %s: %v", timeout, err)
		return lv, nil
	}
	lv.Reachable = true
	lv.Heartbeat = kv != nil
	return lv, nil
}
