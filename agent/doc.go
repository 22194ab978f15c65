// Package agent is the per-node daemon: it joins the node to the mesh.
//
// It wires clustermesh (every connected cluster merged into one desired
// state) to the node: it registers the node, and in standalone or lab mode
// the node's pods, with the local cluster's registry; serves its status on
// a unix socket for `trellis status`; and hands each merged snapshot to the
// datapath reconcilers.
//
// Lifetimes: Run(ctx) owns every goroutine it starts and returns after
// they stop.
package agent
