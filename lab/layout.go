package lab

import (
	"fmt"
	"hash/fnv"
	"net/netip"
	"path/filepath"
	"regexp"
)

// The layout is every name and address a lab uses, derived from the lab
// name and its topology alone, so that every verb (and `down` after a
// crash) computes the same names. See the package doc for the plan.

const (
	// BaseDir holds one directory per lab.
	BaseDir = "/var/run/trellis-lab"
	// BPFRoot is where agents pin their eBPF objects; a lab's nodes pin
	// under BPFRoot/<lab>-<cluster>-<node>.
	BPFRoot = "/sys/fs/bpf/trellis"
	// DefaultName is the lab's name when none is given.
	DefaultName = "lab"

	bridgeName  = "br0"
	nodeDevice  = "eth0" // the node's underlay veth, inside the node namespace
	podDevice   = "eth0" // the pod's veth, inside the pod namespace
	apiHTTPPort = 9870
	apiEtcdPort = 2379
	// tunnelMTUGap is what the pods' MTU leaves for encapsulation: the
	// worst case of every path a node may move a pod's traffic to without
	// touching the pod, WireGuard over an IPv6 underlay (80 bytes,
	// encryption/wireguard.Overhead; VXLAN over IPv4 needs 50), so turning
	// encryption on or off never needs a pod MTU change.
	tunnelMTUGap = 80
	underlayMTU  = 1500
)

// podGateway is the pods' next hop: a link-local address that no
// interface holds; each pod has a permanent neighbour entry mapping it to
// its node-side veth's MAC (so no ARP and no proxy ARP are needed).
var podGateway = netip.MustParseAddr("169.254.1.1")

var labNameRE = regexp.MustCompile(`^[a-z0-9]{1,12}$`)

// ValidateName checks a lab name: 1-12 lowercase letters and digits. No
// dashes, so that the prefix tl-<name>- of its namespaces never matches
// another lab's.
func ValidateName(name string) error {
	if !labNameRE.MatchString(name) {
		return fmt.Errorf("lab name %q: want 1-12 lowercase letters and digits", name)
	}
	return nil
}

type layout struct {
	name       string
	dir        string // BaseDir/<name>
	cgroupRoot string // <cgroup2>/trellis-lab-<name>; "" when unknown
	bridgeNS   string
	underlay   netip.Prefix
	podRoutes  []netip.Prefix // what pods route via their node: every pod CIDR and VIP
	clusters   []*clusterLayout
}

type clusterLayout struct {
	*Cluster
	index      int
	ns         string
	ip         netip.Addr
	bridgePort string
	stateDir   string
	cgroup     string
	log        string
	nodes      []*nodeLayout
}

type nodeLayout struct {
	*Node
	cluster    *clusterLayout
	ns         string
	ip         netip.Addr
	bridgePort string
	podCIDR    netip.Prefix
	stateDir   string
	socket     string
	cgroup     string
	pinDir     string
	log        string
	pods       []*podLayout
}

type podLayout struct {
	*Pod
	node     *nodeLayout
	ns       string
	ip       netip.Addr
	hostVeth string
	cgroup   string
	log      string
}

// nsPrefix is the prefix of every network namespace of lab name.
func nsPrefix(name string) string { return "tl-" + name + "-" }

// cgroupDirName is the lab's cgroup under the cgroup2 root.
func cgroupDirName(name string) string { return "trellis-lab-" + name }

// pinPrefix is the prefix of every bpffs pin dir of lab name, under BPFRoot.
func pinPrefix(name string) string { return name + "-" }

// newLayout derives the lab's names and addresses. t must be validated.
// cgroup2 is the cgroup v2 mount point ("" leaves cgroups out).
func newLayout(name, baseDir, cgroup2 string, t *Topology) (*layout, error) {
	l := &layout{
		name:     name,
		dir:      filepath.Join(baseDir, name),
		bridgeNS: nsPrefix(name) + "br",
		underlay: netip.MustParsePrefix(t.Underlay).Masked(),
	}
	if cgroup2 != "" {
		l.cgroupRoot = filepath.Join(cgroup2, cgroupDirName(name))
	}
	host := func(n int) netip.Addr {
		a := l.underlay.Addr().As4()
		v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
		v += uint32(n)
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	}
	// Bridge port names: <cluster>-api and <cluster>-<node> when they fit
	// an interface name, otherwise a<i> and n<i>-<j>.
	short := true
	for _, c := range t.Clusters {
		for _, n := range c.Nodes {
			if len(c.Name)+1+len(n.Name) > 15 {
				short = false
			}
		}
		if len(c.Name)+4 > 15 {
			short = false
		}
	}
	logs := filepath.Join(l.dir, "logs")
	for ci := range t.Clusters {
		c := &t.Clusters[ci]
		cl := &clusterLayout{
			Cluster:  c,
			index:    ci,
			ns:       nsPrefix(name) + c.Name + "-api",
			ip:       host(10 + ci),
			stateDir: filepath.Join(l.dir, c.Name, "apiserver"),
			log:      filepath.Join(logs, c.Name+"-apiserver.log"),
		}
		cl.bridgePort = fmt.Sprintf("a%d", ci)
		if short {
			cl.bridgePort = c.Name + "-api"
		}
		if l.cgroupRoot != "" {
			cl.cgroup = filepath.Join(l.cgroupRoot, c.Name+"-api")
		}
		l.podRoutes = append(l.podRoutes, netip.MustParsePrefix(c.PodCIDR))
		for _, s := range c.Services {
			l.podRoutes = append(l.podRoutes, netip.PrefixFrom(netip.MustParseAddr(s.VIP), 32))
		}
		for ni := range c.Nodes {
			n := &c.Nodes[ni]
			nl := &nodeLayout{
				Node:     n,
				cluster:  cl,
				ns:       nsPrefix(name) + c.Name + "-" + n.Name,
				ip:       host(100 + 10*ci + ni + 1),
				podCIDR:  netip.MustParsePrefix(n.PodCIDR),
				stateDir: filepath.Join(l.dir, c.Name, n.Name),
				pinDir:   filepath.Join(BPFRoot, pinPrefix(name)+c.Name+"-"+n.Name),
				log:      filepath.Join(logs, c.Name+"-"+n.Name+"-agent.log"),
			}
			nl.socket = filepath.Join(nl.stateDir, "agent.sock")
			nl.bridgePort = fmt.Sprintf("n%d-%d", ci, ni)
			if short {
				nl.bridgePort = c.Name + "-" + n.Name
			}
			if l.cgroupRoot != "" {
				nl.cgroup = filepath.Join(l.cgroupRoot, c.Name+"-"+n.Name)
			}
			veths := map[string]bool{}
			for pi := range n.Pods {
				p := &n.Pods[pi]
				pl := &podLayout{
					Pod:  p,
					node: nl,
					ns:   nl.ns + "-" + p.Name,
					ip:   netip.MustParseAddr(p.IP),
					log:  filepath.Join(logs, c.Name+"-"+p.Name+"-echo.log"),
				}
				pl.hostVeth = hostVethName(p.Name, veths)
				veths[pl.hostVeth] = true
				if nl.cgroup != "" {
					pl.cgroup = filepath.Join(nl.cgroup, p.Name)
				}
				nl.pods = append(nl.pods, pl)
			}
			cl.nodes = append(cl.nodes, nl)
		}
		l.clusters = append(l.clusters, cl)
	}
	// Names that must be unique across the lab.
	seen := map[string]string{}
	claim := func(kind, v string) error {
		if v == "" {
			return nil
		}
		if other, ok := seen[kind+v]; ok {
			return fmt.Errorf("lab: %s %q is used twice (%s); rename a node or pod", kind, v, other)
		}
		seen[kind+v] = v
		return nil
	}
	for _, c := range l.clusters {
		if err := claim("namespace", c.ns); err != nil {
			return nil, err
		}
		if err := claim("cgroup", c.cgroup); err != nil {
			return nil, err
		}
		for _, n := range c.nodes {
			if err := claim("namespace", n.ns); err != nil {
				return nil, err
			}
			if err := claim("bridge port", n.bridgePort); err != nil {
				return nil, err
			}
			if err := claim("cgroup", n.cgroup); err != nil {
				return nil, err
			}
			for _, p := range n.pods {
				if err := claim("namespace", p.ns); err != nil {
					return nil, err
				}
			}
		}
	}
	return l, nil
}

// hostVethName is the node-side veth of a pod: lxc-<pod> when it fits,
// otherwise lxc + a hash of the pod name.
func hostVethName(pod string, taken map[string]bool) string {
	name := "lxc-" + pod
	if len(name) <= 15 && !taken[name] {
		return name
	}
	h := fnv.New32a()
	h.Write([]byte(pod))
	sum := h.Sum32()
	for {
		name = fmt.Sprintf("lxc%08x", sum)
		if !taken[name] {
			return name
		}
		sum++
	}
}

func (l *layout) cluster(name string) (*clusterLayout, error) {
	for _, c := range l.clusters {
		if c.Name == name {
			return c, nil
		}
	}
	return nil, fmt.Errorf("lab %s has no cluster %q", l.name, name)
}

// node finds "cluster/node".
func (l *layout) node(ref string) (*nodeLayout, error) {
	cl, rest, err := l.splitRef(ref, "CLUSTER/NODE")
	if err != nil {
		return nil, err
	}
	for _, n := range cl.nodes {
		if n.Name == rest {
			return n, nil
		}
	}
	return nil, fmt.Errorf("cluster %s has no node %q", cl.Name, rest)
}

// pod finds "cluster/pod".
func (l *layout) pod(ref string) (*podLayout, error) {
	cl, rest, err := l.splitRef(ref, "CLUSTER/POD")
	if err != nil {
		return nil, err
	}
	for _, n := range cl.nodes {
		for _, p := range n.pods {
			if p.Name == rest {
				return p, nil
			}
		}
	}
	return nil, fmt.Errorf("cluster %s has no pod %q", cl.Name, rest)
}

func (l *layout) splitRef(ref, want string) (*clusterLayout, string, error) {
	for i := 0; i < len(ref); i++ {
		if ref[i] == '/' {
			cl, err := l.cluster(ref[:i])
			return cl, ref[i+1:], err
		}
	}
	return nil, "", fmt.Errorf("%q: want %s", ref, want)
}

func (l *layout) allNodes() []*nodeLayout {
	var out []*nodeLayout
	for _, c := range l.clusters {
		out = append(out, c.nodes...)
	}
	return out
}

func (l *layout) allPods() []*podLayout {
	var out []*podLayout
	for _, n := range l.allNodes() {
		out = append(out, n.pods...)
	}
	return out
}

func (n *nodeLayout) ref() string { return n.cluster.Name + "/" + n.Name }
func (p *podLayout) ref() string  { return p.node.cluster.Name + "/" + p.Name }

// podFile is where the node's agent finds the pod (agent.PodFile).
func (p *podLayout) podFile() string {
	return filepath.Join(p.node.stateDir, "pods", p.Namespace+"_"+p.Name+".json")
}
