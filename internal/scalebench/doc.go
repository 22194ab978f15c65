// Package scalebench holds end-to-end benchmarks that span the writer, the
// mesh and the datapath, which no single package's tests can: the mesh API
// server's Publisher and etcd in a child process, a real agent
// (clustermesh and the eBPF socket load balancer on a test cgroup) in the
// benchmark's own, so the heap it measures is the agent's. It has no code
// outside its tests.
package scalebench
