// Package strict is the enforcement behind `--strict` encryption: eBPF
// programs on the tunnel device (trellis_vxlan, trellis_geneve) that drop
// plaintext pod traffic to or from the pod CIDRs of nodes that must be
// reached encrypted, with per-direction drop counters.
//
// When both ends of a node pair have encryption on, the agent routes their
// pod traffic through WireGuard (trellis_wg) and never through the tunnel
// device, or leaves it unreachable until the encrypted path is up. This
// package is the second line: whatever the routes say (a stale route, a
// race at start, an agent bug, packets forged on the underlay), no
// plaintext packet of such a pair crosses the tunnel device. The agent
// turns the mesh into the set of "must be encrypted" pod CIDRs (those of
// remote nodes with encryption on, while the local node has it on) and
// calls Set; it knows nothing of the mesh.
//
// # What it owns
//
//   - Two TCX links on Config.Device in Config.NetNS, ingress and egress,
//     at the head of the device's chain, running strict_ingress and
//     strict_egress (c/strict.c, built by bpf2go into strict_bpfel.{go,o}).
//   - Two LPM trie maps of prefixes, trellis_strict4 and trellis_strict6,
//     DefaultMaxPrefixes entries each by default (Config.MaxPrefixes;
//     allocated per entry, so size costs nothing until used).
//   - A per-CPU array of drop counters, trellis_sdrops: ingress, egress.
//   - With a PinDir, these pins there: the three maps by name, and
//     link_ingress and link_egress. Nothing else; PinDir should be a
//     directory of its own.
//
// Ingress (packets the device has just decapsulated) drops a packet whose
// inner source is in the set; egress (packets about to be encapsulated)
// drops one whose inner destination is. Everything else goes on to the
// next program (TCX_NEXT). The set empty, the programs stay attached and
// drop nothing: the agent keeps the filter while strict mode is on and
// calls Remove when it goes off.
//
// What a program sees: a VXLAN or Geneve device is an Ethernet device, so
// at TCX ingress and egress alike skb->data is the inner Ethernet header
// (the stack pushes the MAC header back before tc ingress), and the inner
// IP header starts 14 bytes in (TestSkbLayoutOnVXLAN records both). The
// programs do not hard-code that: they read the addresses relative to the
// network header the stack has set and take the family from
// skb->protocol, so the same object would serve an L3 device. See the
// design notes in c/strict.c.
//
// # Lifetimes
//
// Open loads the programs, creates the maps or adopts those pinned in
// PinDir (entries and counters carry over), and attaches the programs. A
// pinned link still attached to the device is adopted and switched to the
// newly loaded program in place (link update), so an agent restart never
// leaves the device without a filter, and never attaches a second one. A
// pinned link whose device is gone (deleted, or deleted and recreated) is
// replaced by a new link, pinned in its place. Set converges the maps onto
// the full desired set (adds before deletes, no write when converged,
// drift repaired) and re-attaches to a recreated device; call it after the
// tunnel's Set. Close releases this process's handles and leaves pinned
// state in place: the filter keeps dropping while no agent runs. Remove
// detaches and unpins everything; Uninstall does the same from the pin
// directory alone, for an agent that crashed or was never started with
// strict mode again.
//
// # Why this mechanism
//
// TCX programs and LPM tries: TCX (Linux 6.6) gives links that are owned,
// pinnable, updatable in place and that detach by themselves when the
// device goes, with an explicit position in the chain and no qdisc to
// share; LPM tries match a packet against thousands of prefixes in one
// lookup, both families alike; per-CPU counters make every drop visible
// (Stats) without a lock on the hot path.
//
// Not rp_filter. Strict reverse-path filtering on the tunnel device would
// drop a packet whose source is routed through trellis_wg, but the kernel
// applies max(conf/all, conf/<dev>) (IN_DEV_MAXCONF), so with all=2 a
// device's 1 becomes loose mode, which accepts any source that is routed
// anywhere: the plaintext packet is accepted, silently. Loose mode is the
// common default: systemd's sysctl.d/50-default.conf writes 2 to default
// and to every interface (new ones too, through udev, which also races
// an agent's own write to the device), and some distributions set all=2
// as well. Checked here in two namespaces: all=0 and the device at 1
// dropped a packet whose source route used another device (3 of 3), all=2
// and the device at 1 delivered it (3 of 3). rp_filter is also IPv4 only
// (IPv6 has no such sysctl), looks only at ingress, and counts only in one
// namespace-wide counter (IPReversePathFilter in /proc/net/netstat), not
// per device, direction or peer.
//
// Not iptables or nftables: another dependency (binaries or a netlink
// library) and rules that share tables and chains with kube-proxy and the
// CNI, which insert, flush and reorder them on their own schedule; a drop
// rule would have to win an ordering fight it cannot see. A TCX link
// moves for no one's reload; it runs before legacy tc on both hooks and
// before netfilter at ingress, and at egress it sees a packet after every
// routing and netfilter decision, once it is certain to be encapsulated.
//
// The filter assumes encrypted pod traffic never crosses the tunnel
// device: WireGuard carries pod packets directly on trellis_wg. A design
// that put VXLAN inside WireGuard would need the filter on another device.
//
// Counters count what the programs dropped: a GRO or GSO aggregate counts
// once. They live in a pinned map with a PinDir, so they accumulate across
// agent restarts until Remove.
package strict
