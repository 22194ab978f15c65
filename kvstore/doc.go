// Package kvstore is Trellis's only door to etcd: outside it, only the
// code that manages etcd users and roles holds a raw client (Client.Auth).
//
// It owns:
//
//   - Embedded: an in-process, single-member etcd server, bounded
//     (auto-compaction, a quota, no peer listener, and a maintenance loop
//     that defragments and recovers from NOSPACE), the mesh API server's
//     default store and the store every test runs against.
//   - Client: a connection to one etcd cluster (TLS/mTLS, timeouts, a rate
//     limiter with a larger bootstrap burst, health), with single-key
//     Get/Put/Delete, paged List at one revision, and Txn
//     (compare-and-swap over Cmp and Op values).
//   - Session: one lease kept alive until Close or lost (Done, Err). The
//     client's lease manager spreads a SyncStore's lease-bound keys over
//     Sessions and re-publishes them when one is lost; the identity
//     allocator holds its own.
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
//   - WatchKey: the single-key reader (a cluster's cluster-config): the
//     key's state, then every change, with a re-read after a broken watch.
//   - RecordStore: typed JSON records under a private prefix, written
//     synchronously (the registry's registered objects).
//
// Lifetimes: Embedded and Client are closed by their owner; Embedded's
// maintenance loop runs in Run(ctx), which its owner stops before Close. A Session ends
// with Close (the lease is left to expire), Revoke, or its Client's Close.
// SyncStore and WatchStore do their work in Run(ctx), WatchKey until its
// ctx ends; none of them closes the Client it was given.
//
// The package knows nothing of what the values mean: WatchStore is generic
// over a decode function, so api/v1 validation happens at the edge where
// values enter the process.
package kvstore
