// Package gossip owns this node's membership in the mesh-wide gossip, and
// the set of members it believes dead.
//
// Every agent of every cluster of a mesh is one member of one
// hashicorp/memberlist pool (SWIM with Lifeguard): members probe each
// other over UDP, ask others to probe indirectly when a direct probe
// fails, suspect a member that neither answers, and declare it dead when
// the suspicion is not refuted in time. The package turns that into a
// view a consumer can read whole at any moment (Members, Dead) plus a
// coalescing notification channel (Changes).
//
// # Identity
//
// A member is named "<cluster>/<node>" (unique in a mesh because cluster
// names are), and carries its cluster, node and region in memberlist's
// node metadata (at most 512 bytes, a versioned binary encoding, see
// meta.go). Metadata is checked on receipt, before memberlist stores the
// member: a peer whose metadata does not decode, names an invalid cluster
// or node, or disagrees with its member name is ignored and counted, never
// stored and never fatal.
//
// # The key
//
// All traffic is encrypted and authenticated with one mesh-wide AES-256
// key (memberlist's AES-GCM, GossipVerifyIncoming/Outgoing on): a process
// without the key can neither join nor disturb the pool, and Start refuses
// a Config without a 32-byte key. The key is not per node: `trellis
// connect` hands it out with the cluster files (their gossipKey field), so
// every agent of the mesh reads the same one. Holding the key makes a
// process a full member, able to say anything about anyone: what gossip
// says is therefore an input to be corroborated, never an authority (see
// docs/design.md, "Gossip", for the rule the merge applies).
//
// # Left is not dead
//
// Close leaves the pool gracefully: the others record the member as Left,
// which is not Dead, because an agent that stops (restart, upgrade) leaves
// its node's datapath and pods running. A restarted agent joins again
// under the same name; memberlist's incarnation numbers let the new
// process refute whatever the pool still believes of the old one, so a
// restart within the detection window shows at most a brief suspicion of
// the old incarnation and never a dead node, and a restart after the
// others saw it Left (or Dead, after a crash) turns it Alive again.
//
// # Lifetimes
//
// Start binds the UDP and TCP port, joins the seeds and runs one goroutine
// that rejoins seeds which are not alive members (after a partition longer
// than memberlist's gossip-to-the-dead window, the halves would otherwise
// never meet again). The goroutine and the pool stop when the context
// passed to Start is cancelled or Close is called; either leaves first.
package gossip
