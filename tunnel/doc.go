// Package tunnel programs one network namespace (a node's) so that the pod
// CIDRs of remote nodes are reachable: through a VXLAN device, through a
// Geneve device, or by native routes via the remote nodes' underlay IPs. It
// speaks netlink and knows nothing of clusters or etcd; the agent turns the
// mesh's nodes into []Node and calls Set.
//
// # Lifetime
//
// New checks the Config, opens a netlink socket in Config.NetNS and, in the
// tunnel modes, creates or adopts the tunnel device. Set(ctx, nodes) takes
// the full desired state and converges, as often as the agent likes (after
// every change and on a periodic resync). Close releases the socket and
// leaves the kernel state in place: the datapath survives the agent, and
// the next process adopts the device and the routes. Cleanup removes them.
//
// # Design notes
//
// VXLAN follows flannel's VXLAN backend ("1 route, 1 arp entry and 1 FDB
// entry" per remote host) with learning off: nothing is learnt from traffic
// and no multicast group is used, so each node's tunnel knows exactly the
// nodes Set was given. For a remote node with underlay IP U and first pod
// CIDR C (per family):
//
//	neighbour  VTEPAddr(C) lladdr NodeMAC(U) dev trellis_vxlan nud permanent
//	fdb        NodeMAC(U) dst U dev trellis_vxlan self permanent
//	route      C' via VTEPAddr(C) dev trellis_vxlan onlink proto 126   (for every pod CIDR C')
//
// The local device carries NodeMAC(LocalIP) as its MAC, so frames a remote
// node addresses to NodeMAC(U) are accepted by U's device, and VTEPAddr of
// the local pod CIDR as a /32, so that traffic the node itself originates
// into the overlay has a source address the remote routes back.
//
//   - VTEP addressing: flannel's: a node's VTEP is the network address of
//     its pod CIDR (10.1.2.0 for 10.1.2.0/24). It needs no allocation and no
//     field in the mesh API, and pods never hold the network address.
//   - VTEP MAC: derived from the underlay IP (NodeMAC: 02:74 + the IPv4
//     bytes), where flannel publishes the device's random MAC in the node's
//     annotations. Deriving it means the mesh API carries no MAC and a
//     recreated device keeps its MAC, so remote nodes need no update.
//   - VNI: DefaultVNI is 126, not flannel's 1, because a meshed cluster may
//     run flannel on the same port 8472 and the kernel allows one device per
//     VNI and port. All nodes of a mesh must use the same VNI and port.
//   - MTU: underlay MTU − 50 for an IPv4 underlay (outer IPv4 20 + UDP 8 +
//     VXLAN 8 + inner Ethernet 14), − 70 for IPv6. Recomputed on every Set.
//   - Order: neighbour → FDB → route, the route last so that no packet is
//     routed toward a VTEP the device cannot yet address; when a step fails,
//     the entries created for that node in the same call are removed.
//   - Ownership: routes carry rtm_protocol RouteProtocol (126, "trellis"),
//     so Set and Cleanup find exactly their routes in the kernel, including
//     those of a crashed earlier process; permanent neighbour entries and
//     FDB entries with a destination on the tunnel device are Trellis's
//     because the device is. Set diffs the kernel against the plan on every
//     call, so a deleted entry is put back (drift repair) and an entry whose
//     node is gone is deleted. It adds before it deletes, and writes nothing
//     when nothing differs (Stats.LastChanges == 0).
//   - An existing device of the right name is adopted when VNI, port, vtep
//     device, source IP, learning and flow-based mode match; otherwise it is
//     deleted and recreated, and the reason ("vni: 1 vs 126") logged. MTU,
//     MAC and addresses are fixed in place.
//
// Geneve devices have no FDB. Geneve mode uses one collect-metadata
// ("external") device, DefaultGeneveDevice on UDP 6081, and per remote node
// a neighbour entry plus onlink routes that carry lightweight-tunnel
// metadata ("encap ip id <VNI> dst <node IP>"). The netlink library cannot
// read that metadata back, so Set trusts its own record for it. When the
// kernel lacks Geneve (no CONFIG_GENEVE, no geneve module), New returns an
// error matching ErrNotSupported that says so and suggests vxlan.
//
// Native mode installs "C via U dev <underlay> proto 126" for every pod
// CIDR C of a remote node with IP U. It needs the nodes on one L2 segment:
// a node whose IP is on no subnet of the underlay device is refused with an
// error matching ErrNotOnLink, and the others are installed.
//
// # Paths
//
// Each node passed to Set says where its pod CIDRs go (Node.Path): by the
// tunnel's mode (the default), straight into Config.EncryptedDevice (the
// WireGuard device, "C dev trellis_wg proto 126"), or to an unreachable
// route (strict encryption while the encrypted path to the node is not
// up). The tunnel owns every route to a remote pod CIDR whatever its path,
// and keeps a node's neighbour and FDB entries on every path, so moving a
// node between paths is one route replace per pod CIDR: there is no
// moment without a route, and nothing else changes. When the encrypted
// device is missing, a node that wants it keeps the route it has and Set
// reports the device: traffic never falls back to clear by itself.
//
// # Node validation
//
// Set refuses, and reports in its error: nodes without a name or with an
// invalid underlay IP, duplicate names or IPs, an underlay of the other
// family than LocalIP (tunnel modes), and pod CIDRs that overlap a local pod
// CIDR or one of another node (nodes are taken in name order, so the result
// does not depend on the order of the slice). The node whose IP is LocalIP
// is the local node and is skipped.
//
// # What the node must provide
//
// Forwarding (net.ipv4.ip_forward) in the node's namespace, and routes from
// the pods to the node; the tunnel does neither.
package tunnel
