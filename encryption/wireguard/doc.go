// Package wireguard owns the WireGuard device of one node: it creates or
// adopts the device, converges its private key, listen port and peers to
// what the agent wants, reads its status, and takes it down. It knows
// nothing of clusters or etcd; the agent turns the mesh's nodes into
// []Peer and calls Configure. Keys live in a file of the agent's state
// dir (LoadOrCreateKey, WriteKey).
//
// # Two devices
//
// Where the kernel has WireGuard, the device is a link of type
// "wireguard", created through netlink and configured through wgctrl's
// netlink client. It outlives every process by itself. (This machine's
// kernel has no WireGuard: that path is written to the kernel's interface
// but untested here; the tests that need it skip on proof.)
//
// Elsewhere the device is wireguard-go running in a process of its own,
// the device process (RunDevice, the hidden `trellis agent
// wireguard-device` subcommand): a TUN link opened with virtio-net headers
// and TCP/UDP segmentation offloads, wireguard-go's device with the
// default bind (UDP GSO and GRO), and the UAPI configuration protocol
// (https://www.wireguard.com/xplatform/) served on a unix socket of our
// choosing. The TUN link lives exactly as long as that process holds it.
//
// # Lifetimes
//
// The device process is started once and outlives the agent that started
// it: it runs in a session of its own (not the agent's process group), its
// output goes to a log file, and the agent does not wait for it. A
// restarted agent, or one that was killed with SIGKILL, adopts the running
// process through its socket (Open): peers and sessions untouched, so
// encryption never stops for an agent restart. Close releases the handle
// only. Remove stops the device process (SIGTERM, SIGKILL after a bound)
// or deletes the kernel link.
//
// The device process stops on SIGTERM or SIGINT, or when its TUN link is
// deleted; it then closes the device and removes its socket. A device
// process that died without cleaning up (SIGKILL) leaves a socket file
// nobody listens on: calls on a Device then fail with ErrDeviceGone, and
// the next Open removes the file and starts a new process.
//
// # Design notes
//
//   - Socket: not wireguard-go's /var/run/wireguard/<name>.sock, which
//     every lab node of one machine would share, and which wgctrl's
//     userspace client searches: each node passes its own path. The socket
//     file is 0600 in a 0700 directory; the UAPI is root's only.
//   - Who serves a socket: the peer credentials of the connection
//     (SO_PEERCRED) give the device process's PID, for Remove and for the
//     lab's clean-up by PID. Signals go through a pidfd, so a PID reused
//     after the process exited is never signalled.
//   - Converging: Configure reads the device first and sends only the
//     differences: a changed peer is updated in place (update_only, and
//     replace_allowed_ips for it alone), a peer no longer wanted is
//     removed after the others are written, the private key only when it
//     differs. An unchanged peer, and every peer when the same key is set
//     again, keeps its sessions. A converged device gets no write at all.
//   - Endpoints: a peer's endpoint is written when the wanted one differs
//     from the device's. WireGuard roams (a peer's endpoint follows the
//     address its packets come from), so a roamed peer gets its configured
//     endpoint back at the next Configure; a zero endpoint means "learn
//     it" and is never written.
//   - MTU: DefaultMTU is 1420, a 1500-byte underlay less Overhead (80): the
//     outer IPv6 header 40, UDP 8, WireGuard's data header 16 and its
//     authentication tag 16. An IPv4 underlay needs 60; one MTU for every
//     node keeps the mesh simple.
package wireguard
