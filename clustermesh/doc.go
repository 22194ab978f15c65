// Package clustermesh is an agent's view of the mesh: which clusters it is
// connected to, whether each is healthy and synced, and the one desired
// state merged from all of them.
//
// It owns:
//
//   - the config directory: one file per cluster (its name, etcd
//     endpoints, CA, client certificate and key), watched live; adding,
//     changing or removing a file needs no restart.
//   - a remote cluster's lifecycle: connect with backoff, fetch and
//     validate its cluster-config against the mesh (ID unique, name as the
//     file says, same max-connected-clusters, pod CIDRs overlapping no
//     other cluster's), then one WatchStore per kind; Ready once all are
//     synced.
//   - validation of what a cluster publishes (docs/design.md, "a remote
//     cluster cannot hijack"): entries are accepted only for that cluster,
//     with its ID bits and IPs inside its pod CIDRs; rejects are counted
//     by reason.
//   - the merged caches: global services (union across clusters, with
//     shared/affinity/region rules), nodes, and the ipcache; published as a
//     versioned Snapshot with change notifications and a periodic resync.
//   - status for `trellis status`.
//
// The local cluster is not special: it is one more file in the directory,
// watched through the same code. Draining: a cluster's entries leave the
// merged state when its file is removed or its cluster ID changes, never
// because a connection was lost or the agent restarted.
//
// clustermesh knows nothing of netlink or eBPF; the agent feeds Snapshots
// to the datapath.
package clustermesh
