// Package identity allocates the cluster's numeric security identities: one
// per distinct label set, cluster ID in the high bits (cluster ID << 16 |
// local id), allocated with compare-and-swap transactions in etcd so that
// several mesh API server replicas sharing one etcd agree, stable across
// restarts, and garbage-collected once no replica uses them.
//
// An [Allocator] implements source.IdentityAllocator. It publishes every
// identity under trellis/v1/identities/<cluster>/<id>, where agents of every
// cluster read it, and keeps its bookkeeping (label index, per-replica
// references) under trellis/alloc/<cluster>/, which remote clusters cannot
// read. The allocator owns the identities prefix of its cluster: no
// SyncStore may manage that prefix, or it would delete identities other
// replicas allocated.
//
// Lifetimes: New builds an Allocator without touching etcd. Acquire and
// Release may be called at once, from any goroutine. The first Acquire that
// needs etcd grants the replica's lease and starts keeping it alive; Run(ctx)
// collects unused identities until ctx ends and then closes the allocator.
// Close (called by Run, or by an owner that never runs it) stops the lease
// renewal without revoking the lease, so the replica's references, and with
// them its identities, outlive a restart by up to LeaseTTL. The
// kvstore.Client must stay open until then; the allocator never closes it.
package identity
