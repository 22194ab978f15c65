package lab

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"slices"

	"sigs.k8s.io/yaml"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Topology is what a lab builds: clusters, their nodes and pods, and the
// services each cluster registers. It is plain data (YAML or JSON, the
// same keys); Validate checks it and fills what has a default.
type Topology struct {
	// Underlay is the subnet of the lab bridge that API servers and nodes
	// share. Default DefaultUnderlay. It exists only inside the lab's
	// namespaces.
	Underlay string    `json:"underlay,omitempty"`
	Clusters []Cluster `json:"clusters"`
}

// Cluster is one cluster: a mesh API server and its nodes.
type Cluster struct {
	Name     string    `json:"name"`
	ID       uint32    `json:"id"`
	Region   string    `json:"region,omitempty"`
	Zone     string    `json:"zone,omitempty"`
	PodCIDR  string    `json:"podCIDR"`
	Nodes    []Node    `json:"nodes"`
	Services []Service `json:"services,omitempty"`
}

// Node is one node: a network namespace running an agent.
type Node struct {
	Name string `json:"name"`
	// PodCIDR is the node's share of the cluster's pod CIDR.
	PodCIDR string `json:"podCIDR"`
	Pods    []Pod  `json:"pods,omitempty"`
}

// Pod is one pod on a node: a network namespace with a veth into the node.
type Pod struct {
	Name string `json:"name"`
	// Namespace is the pod's (Kubernetes) namespace; default "default".
	Namespace string            `json:"namespace,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
	// Echo runs the echo server (HTTP and UDP on EchoPort) in the pod.
	Echo bool `json:"echo,omitempty"`
	// IP defaults to the node's pod CIDR's 10th address onwards (x.x.x.10,
	// .11, …) in the order of the node's pods.
	IP string `json:"ip,omitempty"`
}

// Service is a service a cluster registers with its registry API.
type Service struct {
	Namespace string           `json:"namespace,omitempty"`
	Name      string           `json:"name"`
	VIP       string           `json:"vip"`
	Ports     []v1.ServicePort `json:"ports"`
	// Selector picks the backends among the cluster's registered pods.
	Selector    map[string]string `json:"selector,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// Defaults of the lab's layout.
const (
	DefaultUnderlay = "192.168.100.0/24"
	// EchoPort is where echo pods listen, TCP (HTTP) and UDP.
	EchoPort = 8080
	// DefaultNamespace is the pods' and services' namespace when none is
	// given.
	DefaultNamespace = "default"
)

// DefaultTopology is the lab `trellis lab up` builds without -f: clusters
// eu (ID 1) and us (ID 2), two nodes each with one echo pod per node, one
// client pod per cluster, and the global service default/echo (port 80 →
// 8080, TCP and UDP) registered in both, at VIP 10.96.<id>.10.
func DefaultTopology() Topology {
	t := Topology{Underlay: DefaultUnderlay}
	for _, c := range []struct {
		name string
		id   uint32
	}{{"eu", 1}, {"us", 2}} {
		t.Clusters = append(t.Clusters, StandardCluster(c.name, c.id, c.name, 2))
	}
	return t
}

// StandardCluster is a cluster shaped like those of DefaultTopology, the
// shape `lab add-cluster` adds: pod CIDR 10.<id>.0.0/16, nodes n1…n<nodes>
// with pod CIDRs 10.<id>.<n>.0/24, an echo pod per node (echo-n<n>, label
// app=echo), a client pod on n1, and the global service default/echo
// (port 80 → 8080, TCP and UDP) at VIP 10.96.<id>.10. id must be 1-255
// (and not 96, whose pod CIDR would hold the VIPs) for the addresses to
// exist; Validate says so.
func StandardCluster(name string, id uint32, region string, nodes int) Cluster {
	cl := Cluster{Name: name, ID: id, Region: region, PodCIDR: fmt.Sprintf("10.%d.0.0/16", id)}
	for n := 1; n <= nodes; n++ {
		node := Node{Name: fmt.Sprintf("n%d", n), PodCIDR: fmt.Sprintf("10.%d.%d.0/24", id, n)}
		node.Pods = append(node.Pods, Pod{Name: fmt.Sprintf("echo-n%d", n), Labels: map[string]string{"app": "echo"}, Echo: true})
		if n == 1 {
			node.Pods = append(node.Pods, Pod{Name: "client", Labels: map[string]string{"app": "client"}})
		}
		cl.Nodes = append(cl.Nodes, node)
	}
	cl.Services = []Service{{
		Namespace: DefaultNamespace, Name: "echo", VIP: fmt.Sprintf("10.96.%d.10", id),
		Ports: []v1.ServicePort{
			{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: EchoPort},
			{Name: "udp", Protocol: v1.ProtocolUDP, Port: 80, TargetPort: EchoPort},
		},
		Selector:    map[string]string{"app": "echo"},
		Annotations: map[string]string{"trellis.io/global": "true"},
	}}
	return cl
}

// LoadTopology reads a topology file (YAML or JSON). Unknown keys are an
// error, and the result is validated.
func LoadTopology(path string) (Topology, error) {
	var t Topology
	data, err := os.ReadFile(path)
	if err != nil {
		return t, fmt.Errorf("lab: topology: %w", err)
	}
	if err := yaml.UnmarshalStrict(data, &t); err != nil {
		return t, fmt.Errorf("lab: topology %s: %w", path, err)
	}
	if err := t.Validate(); err != nil {
		return t, fmt.Errorf("lab: topology %s: %w", path, err)
	}
	return t, nil
}

// Limits of the address plan (see the package doc): API servers get
// underlay host 10+i, nodes 100+10*i+j+1 for cluster i and node j.
const (
	maxClusters        = 15
	maxNodesPerCluster = 9
)

var podNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$`)

// Validate checks t and fills defaults (underlay, namespaces, pod IPs). It
// reports every problem it finds.
func (t *Topology) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if t.Underlay == "" {
		t.Underlay = DefaultUnderlay
	}
	under, err := netip.ParsePrefix(t.Underlay)
	switch {
	case err != nil:
		bad("underlay %q: %v", t.Underlay, err)
	case !under.Addr().Is4() || under.Bits() > 24:
		bad("underlay %s: want an IPv4 subnet of /24 or larger", t.Underlay)
	}
	if len(t.Clusters) == 0 {
		bad("no clusters")
	}
	if len(t.Clusters) > maxClusters {
		bad("%d clusters: the lab's address plan holds at most %d", len(t.Clusters), maxClusters)
	}
	names, ids := map[string]bool{}, map[uint32]string{}
	var cidrs []netip.Prefix
	var cidrOwner []string
	vips := map[netip.Addr]string{}
	for ci := range t.Clusters {
		c := &t.Clusters[ci]
		if err := v1.ValidateClusterName(c.Name); err != nil {
			bad("cluster %q: %v", c.Name, err)
		}
		if names[c.Name] {
			bad("cluster %q appears twice", c.Name)
		}
		names[c.Name] = true
		if err := v1.ValidateClusterID(v1.ClusterID(c.ID)); err != nil {
			bad("cluster %s: %v", c.Name, err)
		} else if other, ok := ids[c.ID]; ok {
			bad("clusters %s and %s share ID %d", other, c.Name, c.ID)
		}
		ids[c.ID] = c.Name
		cp, err := netip.ParsePrefix(c.PodCIDR)
		if err != nil || !cp.Addr().Is4() || cp != cp.Masked() {
			bad("cluster %s: podCIDR %q: want an IPv4 CIDR without host bits", c.Name, c.PodCIDR)
			continue
		}
		for i, o := range cidrs {
			if o.Overlaps(cp) {
				bad("pod CIDRs of %s (%s) and %s (%s) overlap", cidrOwner[i], o, c.Name, cp)
			}
		}
		cidrs, cidrOwner = append(cidrs, cp), append(cidrOwner, c.Name)
		if len(c.Nodes) == 0 {
			bad("cluster %s has no nodes", c.Name)
		}
		if len(c.Nodes) > maxNodesPerCluster {
			bad("cluster %s: %d nodes: the lab's address plan holds at most %d per cluster", c.Name, len(c.Nodes), maxNodesPerCluster)
		}
		nodeNames, podNames := map[string]bool{}, map[string]bool{}
		var nodeCIDRs []netip.Prefix
		for ni := range c.Nodes {
			n := &c.Nodes[ni]
			if !podNameRE.MatchString(n.Name) || n.Name == "api" {
				bad("cluster %s: node name %q: want a DNS label of at most 32 characters, not \"api\"", c.Name, n.Name)
			}
			if nodeNames[n.Name] {
				bad("cluster %s: node %q appears twice", c.Name, n.Name)
			}
			nodeNames[n.Name] = true
			np, err := netip.ParsePrefix(n.PodCIDR)
			if err != nil || np != np.Masked() || !cp.Contains(np.Addr()) || np.Bits() < cp.Bits() || np.Bits() > 28 {
				bad("node %s/%s: podCIDR %q: want a subnet (/28 or larger) of the cluster's %s", c.Name, n.Name, n.PodCIDR, cp)
				continue
			}
			for _, o := range nodeCIDRs {
				if o.Overlaps(np) {
					bad("node %s/%s: podCIDR %s overlaps another node's %s", c.Name, n.Name, np, o)
				}
			}
			nodeCIDRs = append(nodeCIDRs, np)
			next := np.Addr()
			for range 10 {
				next = next.Next()
			}
			podIPs := map[netip.Addr]bool{}
			for pi := range n.Pods {
				p := &n.Pods[pi]
				if p.Namespace == "" {
					p.Namespace = DefaultNamespace
				}
				if !podNameRE.MatchString(p.Name) {
					bad("pod %s/%s: want a DNS label of at most 32 characters", c.Name, p.Name)
				}
				if podNames[p.Name] {
					bad("cluster %s: pod %q appears twice (pod names are unique per cluster)", c.Name, p.Name)
				}
				podNames[p.Name] = true
				if p.IP == "" {
					for podIPs[next] {
						next = next.Next()
					}
					p.IP = next.String()
					next = next.Next()
				}
				ip, err := netip.ParseAddr(p.IP)
				if err != nil || !np.Contains(ip) || ip == np.Addr() || ip == lastAddr(np) {
					bad("pod %s/%s: ip %q: want a host address of the node's %s", c.Name, p.Name, p.IP, np)
					continue
				}
				if podIPs[ip] {
					bad("pod %s/%s: ip %s is taken", c.Name, p.Name, ip)
				}
				podIPs[ip] = true
			}
		}
		svcNames := map[string]bool{}
		for si := range c.Services {
			s := &c.Services[si]
			if s.Namespace == "" {
				s.Namespace = DefaultNamespace
			}
			key := s.Namespace + "/" + s.Name
			if s.Name == "" || svcNames[key] {
				bad("cluster %s: service %q: empty or duplicate name", c.Name, key)
			}
			svcNames[key] = true
			vip, err := netip.ParseAddr(s.VIP)
			if err != nil || !vip.Is4() {
				bad("service %s/%s: vip %q: want an IPv4 address", c.Name, key, s.VIP)
			} else if other, ok := vips[vip]; ok {
				bad("service %s/%s: vip %s is used by %s too", c.Name, key, vip, other)
			} else {
				vips[vip] = c.Name + "/" + key
			}
			if len(s.Ports) == 0 {
				bad("service %s/%s: no ports", c.Name, key)
			}
			if len(s.Selector) == 0 {
				bad("service %s/%s: no selector (it would have no backends)", c.Name, key)
			}
		}
	}
	for vip, owner := range vips {
		for i, p := range cidrs {
			if p.Contains(vip) {
				bad("service %s: vip %s lies inside pod CIDR %s of %s", owner, vip, p, cidrOwner[i])
			}
		}
		if under.IsValid() && under.Contains(vip) {
			bad("service %s: vip %s lies inside the underlay %s", owner, vip, under)
		}
	}
	return errors.Join(errs...)
}

func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// cluster returns the named cluster.
func (t *Topology) cluster(name string) (*Cluster, bool) {
	i := slices.IndexFunc(t.Clusters, func(c Cluster) bool { return c.Name == name })
	if i < 0 {
		return nil, false
	}
	return &t.Clusters[i], true
}
