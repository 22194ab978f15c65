// Package lab runs a multi-cluster Trellis mesh on one Linux machine, in
// network namespaces, for demos and end-to-end tests (`trellis lab …`).
// Demo is the older narrated store-layer demo that `make demo` still runs.
//
// # What a lab is
//
// A Topology (YAML; DefaultTopology when none is given) lists clusters,
// their nodes, the pods on each node and the services each cluster
// registers. Up builds it; every other verb works on the running lab
// through its state file; Down removes it. The default lab is clusters eu
// (ID 1, 10.1.0.0/16) and us (ID 2, 10.2.0.0/16), nodes n1 and n2 each
// (10.<id>.<n>.0/24), an echo pod per node (echo-n1, echo-n2; label
// app=echo), a client pod per cluster on n1, and the global service
// default/echo (80 → 8080, TCP and UDP) at 10.96.<id>.10 in each cluster.
//
// # Layout
//
// For lab <lab> (1-12 lowercase letters and digits) and cluster index i,
// node index j (both from 0, in topology order):
//
//	bridge     netns tl-<lab>-br: bridge br0, MTU 1500, no address and no uplink
//	API server netns tl-<lab>-<cluster>-api, eth0 = underlay .10+i/24,
//	           bridge port <cluster>-api; etcd on :2379, HTTP on :9870
//	node       netns tl-<lab>-<cluster>-<node>, eth0 = underlay .100+10i+j+1/24
//	           (eu/n1 .101, eu/n2 .102, us/n1 .111 …), bridge port
//	           <cluster>-<node> (a<i> / n<i>-<j> when a name would pass 15
//	           characters); ip_forward=1, rp_filter=0, inside the netns only
//	pod        netns tl-<lab>-<cluster>-<node>-<pod>, eth0 = pod IP/32, MTU
//	           1420 (room for WireGuard over IPv6, the worst case, so
//	           encryption on or off never changes it); node side lxc-<pod>
//	           (or lxc<hash>)
//
// The underlay is 192.168.100.0/24 unless the topology says otherwise; it
// exists only inside lab namespaces. Pod IPs default to .10, .11, … of the
// node's pod CIDR.
//
// Pods are wired as a CNI plugin would (Calico's style): the pod routes
// every pod CIDR and service VIP of the lab via 169.254.1.1, a link-local
// gateway no interface holds, resolved by a permanent neighbour entry to
// the node-side veth's MAC; also its own node's underlay address, so that
// the agent's health probes from the node namespace are answered; the
// node routes the pod IP/32 to its veth
// with a permanent neighbour entry for the pod's MAC. No ARP, no proxy
// ARP, and no namespace has a default route: nothing leaves the lab.
// Traffic between nodes is the agents' business (VXLAN over eth0).
//
// Cgroups (cgroup v2, found in /proc/self/mounts):
// <cgroup2>/trellis-lab-<lab>/<cluster>-api for the API server,
// …/<cluster>-<node> for the node's agent (and its --cgroup-root), and
// …/<cluster>-<node>/<pod> for each pod's processes, so the node's socket
// LB translates exactly its pods' (and agent's) connections.
//
// Files: /var/run/trellis-lab/<lab>/ holds state.json, <cluster>/apiserver
// (the API server's state dir: its own server and client CAs in pki/,
// created on its first start; clusters/ in it is its agents' config dir),
// <cluster>/<node> (the agent's state dir: pods/, agent.sock) and logs/.
//
// The lab gives no two clusters a CA in common. It once gave every API
// server one shared CA, and with it every cluster's root and writer
// certificates were root and writer on every other cluster's etcd, and any
// cluster could mint a server certificate for another: the lab would have
// shown a mesh whose clusters trust each other completely, which no real
// deployment should be. `trellis connect` hands each reader its target's
// own server CA; each target's client CA stays in its state dir.
// Agents pin under /sys/fs/bpf/trellis/<lab>-<cluster>-<node>.
//
// # Kubernetes mode
//
// `lab up --kubernetes` (kubernetes.go) gives every cluster a real
// kube-apiserver, in the API server namespace beside the mesh API server:
// on the underlay address :6443, with its own etcd (the hidden `trellis
// lab etcd`, an embedded etcd in plain HTTP on the namespace's loopback
// :2381), both daemons in the API server's cgroup (process keys
// kube-apiserver/<cluster>, kube-etcd/<cluster>). Its files are in
// <cluster>/kube/: the static token file (an admin token, system:masters,
// for the lab and the mesh API server; one token per agent, group
// trellis-lab:agents, bound to a ClusterRole of agent.KubernetesRBAC),
// the service account key pair, the self-signed serving certificate it
// writes into certs/, etcd/ and admin.kubeconfig; each agent's kubeconfig
// is <cluster>/<node>/kubeconfig. The lab writes what kubelets and
// controllers would: Nodes, Pods with their status, the Services
// (clusterIP = VIP) and one EndpointSlice per Service (<name>-lab). The
// mesh API servers run --source kubernetes, the agents --kubernetes (no
// registry, no pod files read). annotate, pod stop/start and node
// down/up write through the Kubernetes API (see kubernetes.go); pod crash
// tells no one, as always; add-cluster is refused. The encryption verbs
// work as in registry mode: each agent publishes its keys on its own Node
// (annotations the Kubernetes source reads). The state says
// "kubernetes": true, so every verb knows.
//
// # Processes
//
// API servers, agents and echo servers are daemons in sessions of their
// own, logging to logs/. Each is cloned from a thread that entered its
// namespace, straight into its cgroup (clone3 CLONE_INTO_CGROUP), so it is
// never outside either, and it keeps the host's mount namespace (bpffs
// and the cgroup2 mount stay visible, which `ip netns exec` would hide by
// remounting /sys). The same goes for `lab exec` and the `lab http-get`
// helper behind `lab curl` and `lab verify`: their requests come from the
// pod's namespace and cgroup, as a pod's would. The state records every
// PID with its start time, so a reused PID is never signalled.
//
// The lab tool itself stays in the root namespace and never opens a
// socket to a lab address from there (it would be routed out of the
// machine): registry calls dial from a thread inside the cluster's API
// server namespace, and clusters are joined by running `trellis connect
// --mesh` inside the first API server's namespace, from where every API
// server is reachable over the bridge.
//
// Agents always get the datapath flags from agentDatapathArgs
// (--cgroup-root, --bpf-pin-dir, --tunnel vxlan, --underlay-device eth0).
// An agent that refuses one (a renamed flag) makes the lab fail with the
// agent's log; the lab never falls back to agents without datapath. An
// agent command line never lacks --cgroup-root: the agent's default is the
// machine's cgroup2 root, so one replayed from an older lab's state gets
// --cgroup-root none.
//
// # Changing a running lab
//
// Besides annotate, pod stop/start and node down/up (and pod crash: a
// SIGKILL of the echo server that tells no one, the pod file and the
// registry untouched, so only the node's agent probing its pods notices;
// pod start brings it back; node crash: its agent and pods kill -9 and
// its link down, telling no one, so only the gossip notices; cluster
// crash: the same for every node of a cluster and its API server at once,
// which the gossip alone takes for a partition of itself; cluster up
// brings it back), the mesh verbs
// (mesh.go, addcluster.go) each hold the lab's lock and return only once
// the agents agree:
//
//   - RestartAgent and RestartAPIServer stop the one recorded process
//     (SIGTERM; SIGKILL only after a grace period, 20 s for an API server,
//     whose embedded etcd waits for open watch streams as it closes) and
//     start it again with its recorded argv, in the same namespace and
//     cgroup, recording the new PID. Pods keep running; an API server
//     keeps its state dir (etcd data, CAs, credentials, registry).
//   - DisconnectClusters and ConnectClusters run `trellis disconnect` /
//     `trellis connect` on two API servers' state dirs inside the first
//     one's namespace and record the separated pairs in the state
//     (Disconnected). "Ready" then means: every agent reports ready and
//     connected every cluster joined with its own, and no longer watches
//     the ones disconnected from it. Verify turns the pod-to-pod checks
//     between separated clusters around (Check.Isolated: they pass when
//     nothing answers), since each side drained the other's nodes and so
//     its tunnels.
//   - AddCluster appends a StandardCluster to the topology, so it takes
//     the next cluster index of the address plan above (API server
//     .10+i, nodes .100+10i+j+1) and no running name or address changes
//     (a name that would switch the bridge ports to their short form is
//     refused); it gives every existing pod routes to the new pod CIDR
//     and VIP, and joins the new cluster with each existing one pairwise,
//     so separated pairs stay separated. A failed AddCluster removes what
//     it built of the new cluster again.
//
// # Encryption
//
// Agents run their encryption step (the default) and get the lab's IPsec
// key file, <lab dir>/ipsec.key, written at the first agent start. The
// verbs in encryption.go change a cluster's setting with `trellis
// encryption enable|disable|rotate` inside its API server's namespace (or
// one node's key through its agent's status socket) and return once every
// agent's status shows the result: SetEncryption waits for "encrypted"
// between nodes whose clusters both run WireGuard and "tunnel" elsewhere
// (devices gone after off; for IPsec, the setting reported, or the error
// the agents report); the rotations wait for new keys and a handshake with
// each peer after the rotation. Capture (capture.go) counts what crosses
// the bridge, so a test or the demo can show that pod payload travels only
// inside WireGuard: see its design notes.
//
// # Teardown
//
// Down removes, in order: processes (recorded ones, then any other inside
// the lab's cgroups or namespaces, each by PID: SIGTERM, then SIGKILL
// after 5 s), bpffs pin dirs, namespaces (their veths, bridge and tunnel
// devices go with them), cgroups deepest first, and the lab's directory.
// It finds everything by name as well as from the state file, so it also
// cleans up after a crashed `lab up` or a lost state file, and a second
// Down finds nothing to do. A failed Up tears down what it built (unless
// UpOptions.Keep).
package lab
