// Package kvstore is Trellis's only door to etcd.
//
// It owns four things:
//
//   - Embedded: an in-process etcd server, the mesh API server's default
//     store and the store every test runs against.
//   - Client: a connection to one etcd cluster (TLS/mTLS, timeouts, a rate
//     limiter with a larger bootstrap burst, health) plus the lease manager
//     that keeps lease-backed keys alive and re-publishes them when a lease
//     is lost.
//   - SyncStore: the writer. One per key prefix. The caller states the
//     desired entries; the store converges etcd to them, coalescing updates,
//     skipping no-op writes, retrying with backoff, deleting stale keys left
//     by an earlier run only after the new full set is published, and then
//     writing the synced canary.
//   - WatchStore: the reader. One per key prefix. It lists (in pages, at one
//     revision), then watches from that revision; after a compaction or a
//     lost watch it relists and emits deletes only for keys that really
//     vanished. It keeps serving its cache while disconnected and reports
//     Synced only after the list and, when the writer advertises canaries,
//     after the canary.
//
// Lifetimes: Embedded and Client are closed by their owner. SyncStore and
// WatchStore do their work in Run(ctx) and stop when ctx is cancelled; they
// never close the Client they were given.
//
// The package knows nothing of what the values mean: WatchStore is generic
// over a decode function, so api/v1 validation happens at the edge where
// values enter the process.
package kvstore
