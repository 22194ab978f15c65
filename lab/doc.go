// Package lab runs Trellis on one Linux machine for the demo and the
// end-to-end tests.
//
// Today it holds the demo of what exists: the wire format and the etcd
// store layer (a writer publishing one cluster, a reader in another
// cluster mirroring it through restarts and bad input). The multi-cluster
// topology in network namespaces (DESIGN.md, "The lab") replaces it as the
// mesh API server, the agents and the datapath land.
package lab
