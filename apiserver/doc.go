// Package apiserver is the mesh API server: the per-cluster process that
// other clusters connect to.
//
// It owns an etcd (embedded by default, an external cluster by flag),
// turns the cluster's source of truth (Kubernetes informers or the
// standalone registry) into the key layout of docs/design.md through one
// SyncStore per kind, writes the cluster-config and a heartbeat, allocates
// identities, manages etcd users and roles (the local writer may write
// trellis/, remote clusters may only read trellis/v1/), keeps a server CA
// and a client CA (package pki), mints client certificates for remote
// clusters and revokes them (remotes.go), serves the etcd front door
// remote clusters dial (package frontdoor; the embedded etcd itself
// listens on loopback only), and serves health, readiness, metrics, the
// registry API and the admin API over HTTP.
//
// Lifetimes: Run(ctx) does everything and returns when ctx ends, after
// stopping every goroutine it started and closing etcd.
package apiserver
