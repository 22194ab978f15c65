// Package bpf is Trellis's eBPF socket load balancer: the C programs (in
// c/, compiled by bpf2go into socklb_bpfel.{go,o}), typed wrappers for
// their maps, attaching to a cgroup, pinning, and a reconciler that
// converges the maps onto a desired list of services.
//
// # What it does
//
// Four cgroup v2 sock_addr programs translate service addresses at the
// socket layer for every process inside one cgroup subtree, whatever its
// network namespace:
//
//	connect4, sendmsg4     VIP:port (+TCP/UDP) -> a random backend IP:port
//	recvmsg4, getpeername4 backend IP:port     -> the VIP:port the socket used
//
// # Maps
//
//	services  (VIP, port, proto) -> (service id, backend count, flags,   ServiceMap
//	                                 backends of slots 0-3)
//	slots     (service id, n)    -> backend id, n in [0, count)          SlotMap
//	backends  backend id         -> (IP, port, cluster id)               BackendMap
//	revnat    (socket cookie, backend IP, port) -> VIP:port (LRU)        RevNATMap
//	conn      socket cookie % 131072 -> (cookie, backend, VIP:port)     array
//
// connect4 remembers the VIP of a connected socket in conn (one slot per
// socket, found without hashing), sendmsg4 that of an unconnected UDP
// socket in revnat; recvmsg4 and getpeername4 read conn first, then
// revnat. See the design notes in c/socklb.c.
//
// The Go types (ServiceKey, Backend, ...) use netip.Addr and host-order
// port numbers. The kernel-side structs hold the IPv4 address and the port
// in network byte order, exactly as sock_addr programs see sin_addr and
// sin_port; the map wrappers convert in both directions, so no caller ever
// handles a byte-swapped value.
//
// # Lifetimes
//
// Load creates (or adopts, from a pin directory) the maps and loads the
// programs; Objects.AttachCgroup attaches them. Open does both for an agent:
// it adopts whatever an earlier agent pinned under Config.PinDir (maps by
// MapReplacements, links by link.LoadPinnedLink followed by link.Update to
// the freshly loaded programs), so a restart never leaves a moment without
// a program or with empty maps. LB.Close releases this process's file
// descriptors and leaves pinned state in place; Uninstall removes the pins
// and detaches the links. Without a PinDir nothing outlives LB.Close.
//
// LB.Set takes the full desired list of services and converges the maps:
// backends and slots first, the service count last, removals after that,
// so a program never follows a count onto a slot that is not written yet.
// IDs are allocated stably and recovered from the maps after adoption. A
// Set whose input matches the maps writes nothing, and a Set after someone
// else changed the maps repairs them (see reconcile.go).
package bpf
