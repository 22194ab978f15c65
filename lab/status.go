package lab

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"text/tabwriter"

	"github.com/trellis-mesh/trellis/agent"
)

// Report is a lab as `lab up` and `lab status` show it.
type Report struct {
	Name     string          `json:"name"`
	Dir      string          `json:"dir"`
	Phase    string          `json:"phase"`
	UpTook   string          `json:"upTook,omitempty"`
	Underlay string          `json:"underlay"`
	BridgeNS string          `json:"bridgeNamespace"`
	Datapath bool            `json:"datapath"`
	Clusters []ClusterReport `json:"clusters"`
	Nodes    []NodeReport    `json:"nodes"`
	Pods     []PodReport     `json:"pods"`
	Services []ServiceReport `json:"services"`
	// Disconnected are the pairs of clusters separated with `lab
	// disconnect` ("eu/us").
	Disconnected []string `json:"disconnected,omitempty"`
	Healthy      bool     `json:"healthy"`
	Problems     []string `json:"problems,omitempty"`
	// Kubernetes: the lab runs in Kubernetes mode (kubernetes.go).
	Kubernetes bool `json:"kubernetes,omitempty"`
}

// ClusterReport is one cluster's API server.
type ClusterReport struct {
	Name      string `json:"name"`
	ID        uint32 `json:"id"`
	Region    string `json:"region,omitempty"`
	PodCIDR   string `json:"podCIDR"`
	Namespace string `json:"namespace"`
	APIServer string `json:"apiServer"`
	StateDir  string `json:"stateDir"`
	PID       int    `json:"pid,omitempty"`
	Running   bool   `json:"running"`
	Ready     bool   `json:"ready"`
	Error     string `json:"error,omitempty"`
}

// NodeReport is one node and its agent.
type NodeReport struct {
	Cluster       string   `json:"cluster"`
	Name          string   `json:"name"`
	Namespace     string   `json:"namespace"`
	UnderlayIP    string   `json:"underlayIP"`
	PodCIDR       string   `json:"podCIDR"`
	Cgroup        string   `json:"cgroup"`
	StatusSocket  string   `json:"statusSocket"`
	PID           int      `json:"pid,omitempty"`
	Running       bool     `json:"running"`
	Down          bool     `json:"down,omitempty"`
	ReadyClusters []string `json:"readyClusters,omitempty"`
	Ready         bool     `json:"ready"`
	DatapathError string   `json:"datapathError,omitempty"`
	Error         string   `json:"error,omitempty"`
	// Encryption is what the node's agent says of its encryption; nil when
	// it runs without an encryption step or did not answer.
	Encryption *NodeEncryption `json:"encryption,omitempty"`
}

// NodeEncryption is one node's encryption, from its agent's status.
type NodeEncryption struct {
	// Type is off, wireguard or ipsec.
	Type   string `json:"type"`
	Strict bool   `json:"strict,omitempty"`
	// Draining: turned off, the WireGuard device goes once peers are quiet.
	Draining bool `json:"draining,omitempty"`
	// KeyPrefix is the start of the node's WireGuard public key.
	KeyPrefix string `json:"keyPrefix,omitempty"`
	// Paths counts the node's peers by path (tunnel, encrypted, blocked).
	Paths map[string]int `json:"paths,omitempty"`
	// StrictDrops counts clear pod packets the strict filter dropped, in
	// and out.
	StrictDrops *agent.StrictFilterCounter `json:"strictDrops,omitempty"`
	Error       string                     `json:"error,omitempty"`
}

// nodeEncryption summarises an agent's encryption status.
func nodeEncryption(e *agent.EncryptionStatus) *NodeEncryption {
	if e == nil {
		return nil
	}
	ne := &NodeEncryption{Type: encryptionWord(e.Type, false), Strict: e.Strict, Draining: e.Draining,
		StrictDrops: e.Strictly, Error: e.Error}
	if e.PublicKey != "" {
		ne.KeyPrefix = keyPrefix(e.PublicKey)
	}
	for _, p := range e.Peers {
		if ne.Paths == nil {
			ne.Paths = map[string]int{}
		}
		ne.Paths[p.Path]++
	}
	return ne
}

// PodReport is one pod.
type PodReport struct {
	Cluster   string `json:"cluster"`
	Node      string `json:"node"`
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	IP        string `json:"ip"`
	NetNS     string `json:"netns"`
	Echo      bool   `json:"echo"`
	PID       int    `json:"pid,omitempty"`
	Running   bool   `json:"running"`
	Stopped   bool   `json:"stopped,omitempty"`
	NodeDown  bool   `json:"nodeDown,omitempty"`
}

// ServiceReport is one registered service.
type ServiceReport struct {
	Cluster     string            `json:"cluster"`
	Service     string            `json:"service"`
	VIP         string            `json:"vip"`
	Ports       []string          `json:"ports"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// Status reports the lab's processes and health.
func Status(ctx context.Context, opts Options) (*Report, error) {
	l, err := open(opts, false)
	if err != nil {
		return nil, err
	}
	defer l.close()
	return l.report(ctx), nil
}

// report checks every process and asks every API server and agent.
func (l *lab) report(ctx context.Context) *Report {
	st := l.state
	r := &Report{
		Name: l.opts.Name, Dir: l.dir, Phase: st.Phase, Underlay: l.lay.underlay.String(), BridgeNS: l.lay.bridgeNS,
		Datapath: st.Datapath, Healthy: true, Kubernetes: st.Kubernetes,
		Disconnected: sortedKeys(st.Disconnected),
	}
	problem := func(format string, args ...any) {
		r.Healthy = false
		r.Problems = append(r.Problems, fmt.Sprintf(format, args...))
	}
	for _, p := range l.kubeProblems() {
		problem("%s", p)
	}
	r.Clusters = make([]ClusterReport, len(l.lay.clusters))
	var wg sync.WaitGroup
	for i, c := range l.lay.clusters {
		p := st.Procs[apiKey(c)]
		cr := ClusterReport{
			Name: c.Name, ID: c.ID, Region: c.Region, PodCIDR: c.PodCIDR, Namespace: c.ns,
			APIServer: c.registryURL(), StateDir: c.stateDir, Running: p.Alive(),
		}
		if p != nil {
			cr.PID = p.PID
		}
		r.Clusters[i] = cr
		if cr.Running {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := l.apiReady(ctx, c); err != nil {
					r.Clusters[i].Error = err.Error()
				} else {
					r.Clusters[i].Ready = true
				}
			}()
		}
		for _, s := range c.Services {
			sr := ServiceReport{Cluster: c.Name, Service: s.Namespace + "/" + s.Name, VIP: s.VIP, Annotations: s.Annotations}
			for _, p := range s.Ports {
				sr.Ports = append(sr.Ports, fmt.Sprintf("%d/%s→%d", p.Port, p.Protocol, p.TargetPort))
			}
			r.Services = append(r.Services, sr)
		}
	}
	nodes := l.lay.allNodes()
	r.Nodes = make([]NodeReport, len(nodes))
	for i, n := range nodes {
		p := st.Procs[agentKey(n)]
		nr := NodeReport{
			Cluster: n.cluster.Name, Name: n.Name, Namespace: n.ns, UnderlayIP: n.ip.String(), PodCIDR: n.PodCIDR,
			Cgroup: n.cgroup, StatusSocket: n.socket, Running: p.Alive(), Down: st.DownNodes[n.ref()],
		}
		if p != nil {
			nr.PID = p.PID
		}
		r.Nodes[i] = nr
		if nr.Running {
			wg.Add(1)
			go func() {
				defer wg.Done()
				as, err := l.agentReady(ctx, n)
				for _, c := range as.Clusters {
					if c.Ready {
						r.Nodes[i].ReadyClusters = append(r.Nodes[i].ReadyClusters, c.Name)
					}
				}
				r.Nodes[i].DatapathError = as.DatapathError
				r.Nodes[i].Encryption = nodeEncryption(as.Encryption)
				if err != nil {
					r.Nodes[i].Error = err.Error()
				} else {
					r.Nodes[i].Ready = true
				}
			}()
		}
		for _, pod := range n.pods {
			pp := st.Procs[echoKey(pod)]
			pr := PodReport{
				Cluster: n.cluster.Name, Node: n.Name, Name: pod.Name, Namespace: pod.Namespace, IP: pod.ip.String(),
				NetNS: pod.ns, Echo: pod.Echo, Running: pp.Alive(), Stopped: st.StoppedPods[pod.ref()], NodeDown: nr.Down,
			}
			if pp != nil {
				pr.PID = pp.PID
			}
			r.Pods = append(r.Pods, pr)
		}
	}
	wg.Wait()
	for _, c := range r.Clusters {
		switch {
		case !c.Running:
			problem("API server of %s is not running", c.Name)
		case !c.Ready:
			problem("API server of %s is not ready: %s", c.Name, c.Error)
		}
	}
	for _, n := range r.Nodes {
		switch {
		case n.Down:
		case !n.Running:
			problem("agent of %s/%s is not running", n.Cluster, n.Name)
		case !n.Ready:
			problem("agent of %s/%s: %s", n.Cluster, n.Name, n.Error)
		}
		if n.DatapathError != "" {
			problem("agent of %s/%s: datapath: %s", n.Cluster, n.Name, n.DatapathError)
		} else if n.Encryption != nil && n.Encryption.Error != "" {
			problem("agent of %s/%s: encryption: %s", n.Cluster, n.Name, n.Encryption.Error)
		}
	}
	for _, p := range r.Pods {
		if p.Echo && !p.Running && !p.Stopped && !p.NodeDown {
			problem("echo server of %s/%s is not running", p.Cluster, p.Name)
		}
	}
	return r
}

// PrintReport writes r as tables.
func PrintReport(w io.Writer, r *Report) {
	dp := "on (eBPF socket LB + VXLAN)"
	if !r.Datapath {
		dp = "off (agents started without the datapath flags)"
	}
	fmt.Fprintf(w, "Lab %s (%s), state in %s", r.Name, r.Phase, r.Dir)
	if r.UpTook != "" {
		fmt.Fprintf(w, ", up in %s", r.UpTook)
	}
	fmt.Fprintf(w, "\nUnderlay %s on bridge namespace %s; datapath %s\n", r.Underlay, r.BridgeNS, dp)
	if r.Kubernetes {
		fmt.Fprintf(w, "Kubernetes mode: a kube-apiserver per cluster on its API server namespace's :%d (admin kubeconfig %s/<cluster>/kube/admin.kubeconfig); mesh API servers on the Kubernetes source\n", kubePort, r.Dir)
	}
	if len(r.Disconnected) > 0 {
		fmt.Fprintf(w, "Disconnected (every other pair is joined): %s\n", strings.Join(r.Disconnected, ", "))
	}
	fmt.Fprintln(w)

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CLUSTER\tID\tREGION\tPOD CIDR\tAPI SERVER\tNAMESPACE\tPID\tREADY")
	for _, c := range r.Clusters {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", c.Name, c.ID, c.Region, c.PodCIDR, c.APIServer, c.Namespace, pid(c.PID, c.Running), readyWord(c.Running, c.Ready))
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tUNDERLAY\tPOD CIDR\tNAMESPACE\tAGENT PID\tCLUSTERS READY\tSTATE")
	for _, n := range r.Nodes {
		state := readyWord(n.Running, n.Ready)
		if n.Down {
			state = "down"
		}
		if n.DatapathError != "" {
			state += " (datapath error)"
		}
		fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.Cluster, n.Name, n.UnderlayIP, n.PodCIDR, n.Namespace, pid(n.PID, n.Running), strings.Join(n.ReadyClusters, ","), state)
	}
	tw.Flush()
	fmt.Fprintln(w)
	if PrintEncryption(w, r.Nodes) {
		fmt.Fprintln(w)
	}
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tNODE\tIP\tNAMESPACE\tROLE\tPID\tSTATE")
	for _, p := range r.Pods {
		role, state := "client", "-"
		if p.Echo {
			role = fmt.Sprintf("echo :%d", EchoPort)
			state = readyWord(p.Running, p.Running)
			if p.Stopped {
				state = "stopped"
			}
		}
		if p.NodeDown {
			state = "node down"
		}
		fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Cluster, p.Name, p.Node, p.IP, p.NetNS, role, pid(p.PID, p.Running), state)
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tCLUSTER\tVIP\tPORTS\tANNOTATIONS")
	for _, s := range r.Services {
		var ann []string
		for _, k := range sortedKeys(s.Annotations) {
			ann = append(ann, k+"="+s.Annotations[k])
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", s.Service, s.Cluster, s.VIP, strings.Join(s.Ports, ", "), strings.Join(ann, ","))
	}
	tw.Flush()
	if len(r.Problems) > 0 {
		fmt.Fprintln(w, "\nProblems:")
		for _, p := range r.Problems {
			fmt.Fprintln(w, "  -", p)
		}
	}
}

// PrintEncryption writes the nodes' encryption as a table: type, key,
// peers by path, strict drops, error. It prints nothing and returns false
// when no node reports encryption.
func PrintEncryption(w io.Writer, nodes []NodeReport) bool {
	reported := false
	for _, n := range nodes {
		if n.Encryption != nil {
			reported = true
		}
	}
	if !reported {
		return false
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tENCRYPTION\tKEY\tPEERS BY PATH\tSTRICT DROPS IN/OUT\tERROR")
	for _, n := range nodes {
		e := n.Encryption
		if e == nil {
			fmt.Fprintf(tw, "%s/%s\t-\t-\t-\t-\t-\n", n.Cluster, n.Name)
			continue
		}
		typ := e.Type
		if e.Strict {
			typ += ", strict"
		}
		if e.Draining {
			typ += " (draining)"
		}
		var paths []string
		for _, p := range sortedKeys(e.Paths) {
			paths = append(paths, fmt.Sprintf("%s %d", p, e.Paths[p]))
		}
		drops := "-"
		if e.StrictDrops != nil {
			drops = fmt.Sprintf("%d/%d", e.StrictDrops.Ingress, e.StrictDrops.Egress)
		}
		fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%s\t%s\n", n.Cluster, n.Name, typ, dash(e.KeyPrefix), dash(strings.Join(paths, ", ")), drops, dash(shorten(e.Error, 72)))
	}
	tw.Flush()
	return true
}

// shorten cuts s to n runes with an ellipsis (tables; JSON and the
// problems list keep the whole text).
func shorten(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func pid(p int, running bool) string {
	if !running {
		return "-"
	}
	return fmt.Sprint(p)
}

func readyWord(running, ready bool) string {
	switch {
	case !running:
		return "not running"
	case ready:
		return "ready"
	}
	return "not ready"
}
