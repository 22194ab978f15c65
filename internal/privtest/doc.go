// Package privtest holds helpers for tests that need root and a real
// kernel: network namespaces, cgroups, child processes placed in both, and
// skipping only when the kernel proves it lacks a feature.
//
// Every helper registers its cleanup with t.Cleanup, so what a test
// creates (namespaces, cgroups, processes) is removed on failure too. Names
// include the test process's PID and a random suffix, so parallel test
// binaries never collide.
package privtest
