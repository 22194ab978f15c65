// Package ipsec owns one node's IPsec state: the xfrm states (ESP SAs) and
// policies that encrypt pod-to-pod traffic between the node and its peers,
// in the node's network namespace. It speaks xfrm netlink and knows nothing
// of clusters or etcd; the agent turns the mesh's nodes into []Node, reads
// the key file with LoadKeys, computes a Desired with Plan and hands it to
// a Manager. The alternative to encryption/wireguard (issue 12).
//
// # Lifetime
//
// New opens an xfrm netlink socket in Config.NetNS and checks the kernel
// (CheckKernel); Apply(ctx, Desired) converges, as often as the agent
// likes; Close releases the socket and leaves the kernel state in place,
// so traffic stays encrypted across an agent restart and the next process
// adopts it. Cleanup removes every Trellis object. Open is New without the
// kernel check, for Cleanup on a node that no longer runs IPsec.
//
// # Key file
//
// One pre-shared key file, the same on every node, mode 0600 (LoadKeys
// makes a group- or other-accessible file private and logs a warning):
//
//	# <index 1-15> <key: hex or base64, at least 32 random bytes>
//	1 3f0c…e1                  (openssl rand -hex 32)
//	2 q83bT…Yw==               (openssl rand -base64 32)
//
// The highest index is the current one, unless a line "current <index>"
// names another (to wrap around after 15). A node publishes the index it
// sends with in its Node object (KeyIndex, 0: no IPsec).
//
// # Keys and SPIs
//
// Each direction of each node pair under each index has its own key and
// SPI (Keys.Derive): HKDF-SHA256 of the index's PSK, with info binding the
// source node's name, the destination node's name and the index, 40 bytes:
// 36 for the AEAD key (AES-256 + 4-byte salt, rfc4106(gcm(aes)), 128-bit
// ICV), 4 for the SPI, whose top 4 bits are replaced by the index. Both
// nodes of a pair compute the same values with no exchange. A compromised
// pair key tells nothing about another pair's.
//
// SPI collisions: the kernel finds an inbound SA by destination and SPI
// alone, so the in states of one node must have distinct SPIs. 28 bits of
// hash leave a chance of about n²/2²⁹ that two of a node's n peers
// collide under one index (1 in 54 000 for 100 peers, 1 in 540 for 1 000).
// Plan finds such a collision, keeps the peer first in name order and
// reports the other, whose traffic under that index is then dropped;
// rotating to a new key index reshuffles every SPI and so resolves it.
//
// # Plan
//
// For the local node L and each peer P that runs IPsec, with the same
// underlay family:
//
//	state  out  L → P  ESP tunnel, spi/key Derive(L, P, L.KeyIndex)
//	state  in   P → L  ESP tunnel, spi/key Derive(P, L, i) for i in
//	                   {P.KeyIndex, L.KeyIndex, keys.Current()} ∪ opts.Accept
//	policy out  <L pod CIDR> → <P pod CIDR>  tmpl esp tunnel L → P reqid Reqid
//	policy in   <P pod CIDR> → <L pod CIDR>  tmpl esp tunnel P → L reqid Reqid
//	policy fwd  <P pod CIDR> → <L pod CIDR>  tmpl esp tunnel P → L reqid Reqid
//
// for every local and peer pod CIDR of one family. States carry
// XFRM_STATE_AF_UNSPEC and an empty selector, so one state carries both
// inner families (IPv6 pods over an IPv4 underlay): the policies decide
// what enters a tunnel. (This inter-family case is built as the kernel
// documents it but has not run on a kernel with ESP yet; see the tests.)
// Only traffic between pod CIDRs is encrypted, not the nodes' own.
//
// # Ownership
//
// Every Trellis state and policy template carries reqid Reqid
// (0x7e000001); every state or policy with a reqid in 0x7e000000/8
// (OwnerReqidBase, OwnerReqidMask; 0x7e = 126, the rtm_protocol of
// Trellis's routes) is Trellis's. Apply diffs the kernel's xfrm objects in
// that range against the Desired on every call: it adds what is missing,
// replaces what differs (policies in place; states, whose keys the kernel
// cannot change, by delete and add), deletes the rest — including a
// crashed earlier process's objects — adds before it deletes, and writes
// nothing when converged (Stats.LastWrites). Other owners' objects are
// never touched; a desired object whose place one holds is reported.
// Cleanup deletes the whole range. Policies have no mark, priority 0, type
// main.
//
// Security over availability: a policy is installed even when its state
// could not be (a missing key index, a kernel without ESP), so that the
// traffic it selects is dropped, never sent in the clear.
//
// # Rotation
//
//  1. The operator appends index k+1 with a new random key to the key file
//     and distributes it to every node (keeping k).
//  2. Each agent, on reading the file, keeps sending with k for as long as
//     it likes (its Node.KeyIndex is its choice) but already accepts k+1:
//     Plan installs in states for keys.Current() from every peer.
//  3. The agent moves: local.KeyIndex = k+1, and opts.Accept = [k] for the
//     grace period. Apply adds the out states of k+1, then deletes those of
//     k. The agent publishes KeyIndex k+1.
//  4. Peers accept k+1 already (step 2), and keep accepting k from this
//     node for as long as it publishes k (P.KeyIndex) plus their own grace.
//  5. When the grace period is over, the agent drops k from opts.Accept;
//     Apply deletes the in states of k. The operator may then remove k
//     from the file.
//
// A node whose file lacks k+1 while a peer already sends with it drops
// that peer's traffic (reported by Plan) until the file arrives: hence
// distributing the file before the agents move (step 3), e.g. after a
// delay. After index 15 the next key is index 1, with a line "current 1"
// in the file (else 15, the highest, would stay current).
//
// # Kernel check
//
// New (CheckKernel) adds a throwaway ESP state per address family in the
// node's namespace (documentation addresses, reqid in Trellis's range, no
// policy) and deletes it. The kernel's answer says what is missing: ENOSYS
// ("Requested AEAD algorithm not found") — no rfc4106(gcm(aes)):
// CONFIG_CRYPTO_GCM and what it needs; EPROTONOSUPPORT ("Requested type
// not found") — no ESP: CONFIG_INET_ESP, CONFIG_INET6_ESP; no NETLINK_XFRM
// socket at all — CONFIG_XFRM_USER. The algorithm is looked up before the
// ESP type, so when GCM is missing the check asks again with cbc(aes) and
// hmac(sha256), then cipher_null, to learn whether ESP is missing too.
// When /proc/config.gz is readable, the options named are narrowed to
// those not built in. The error matches ErrNotSupported (and
// errors.ErrUnsupported), is an *UnsupportedError listing the missing
// features and options, and says what to do: use --type wireguard, or a
// kernel with those options. On the development VM (Linux 6.18, no
// modules) New fails so, naming CONFIG_CRYPTO_GCM, CONFIG_CRYPTO_GHASH,
// CONFIG_INET_ESP and CONFIG_INET6_ESP; policies install there, and the
// privileged tests check them.
//
// The xfrm messages are built and read with vishvananda/netlink's nl layer
// rather than its XfrmState/XfrmPolicy API: xfrm.go says why.
package ipsec
