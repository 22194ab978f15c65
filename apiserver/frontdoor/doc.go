// Package frontdoor is the etcd front door of a mesh API server: the TLS
// listener remote clusters' agents dial (--etcd-listen), standing between
// them and the cluster's embedded etcd.
//
// Why it exists. etcd authorizes a request by the common name of the
// client certificate and cannot revoke a certificate: it checks no serial
// and no revocation list, and it checks a watch's permission only when
// the watch is created, so a remote cluster whose etcd user is deleted
// keeps every watch it already holds until it reconnects. Deleting and
// re-issuing a remote therefore revived its old certificates, and a
// revoked remote kept reading. The front door makes revocation real: it
// accepts a remote cluster only with the one certificate serial currently
// issued to it, and closes that cluster's connections (and with them its
// watches) the moment the serial is replaced or revoked.
//
// What it owns:
//
//   - The set of valid certificates: for each remote cluster, at most one
//     serial (Allow replaces it, Revoke removes it). The API server keeps
//     the same set in etcd and loads it at start; the door itself holds
//     it only in memory.
//   - The handshake: TLS with the etcd server certificate, a client
//     certificate required and verified against the client CA only, and
//     accepted only when its CN is remote-<cluster> (CommonName) and its
//     serial is the one allowed for <cluster>. Anything else is refused
//     with a TLS alert (with TLS 1.3 the client sees it on its first
//     read).
//   - The accepted connections: each is forwarded byte for byte (L4) to
//     the internal etcd over a new TLS connection that authenticates as
//     the door's own read-only identity (one etcd user for every remote
//     cluster: they all have the same rights). The door tracks them per
//     cluster and closes them on Allow (those with another serial), on
//     Revoke, when either side closes, and when Serve's context ends.
//
// Lifetimes and goroutines: Serve runs until its context ends; it starts
// one goroutine per accepted connection (handshake, upstream dial, one
// direction of the copy) plus one for the other direction, and returns
// only after every one of them has stopped. When either side of a
// connection closes, both are closed.
//
// Limits:
//
//   - A handshake must finish within Config.HandshakeTimeout, and at most
//     Config.MaxHandshakes run at once; connections beyond that are
//     closed unanswered. So a slow or hostile client pins nothing for
//     long, but a flood of connections can delay honest handshakes.
//   - Authenticated connections are not limited in number or duration: a
//     holder of the current certificate may open as many as it likes,
//     and each costs an upstream etcd connection. Revoke ends them all.
//   - The door does not look inside the stream: what a remote may read is
//     the etcd role of the door's identity (read on trellis/v1/), enforced
//     by etcd itself.
//   - Revocation is by serial, per remote cluster, in this process: a
//     stolen current certificate works until the cluster is re-issued or
//     revoked. Certificates still expire (a year), but the door does not
//     need expiry to revoke.
//   - Only with the embedded etcd: an external etcd has no door, and its
//     operator revokes with etcd's own tools.
package frontdoor
