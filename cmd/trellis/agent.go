package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/trellis-mesh/trellis/agent"
	"github.com/trellis-mesh/trellis/bpf"
	"github.com/trellis-mesh/trellis/gossip"
	"github.com/trellis-mesh/trellis/tunnel"
)

// off is the flag value that turns a part of the datapath off. It exists
// only here: past flag parsing, a part that is off is a nil config.
const off = "none"

// agentOptions are `trellis agent`'s flags as typed.
type agentOptions struct {
	cfg       agent.Config
	nodeIP    string
	podCIDRs  []string
	uninstall bool
	gossip    bool
	// kubernetes and kubeconfig: Kubernetes mode.
	kubernetes bool
	kubeconfig string

	cgroupRoot string
	// cgroupRootErr is why --cgroup-root has no default (no cgroup2 mount).
	cgroupRootErr  error
	pinDir         string
	tunnelMode     string
	underlayDevice string
	vni            uint32
	tunnelPort     uint16

	encryption   bool
	wgPort       uint16
	wgMTU        int
	ipsecKeyFile string
}

func newAgentCmd(g *globalOptions) *cobra.Command {
	o := &agentOptions{}
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the node agent: connect this node to every cluster of the mesh",
		Long: `Run the per-node agent. It watches the mesh API server of every cluster in
--config-dir (the local one included), validates what they publish, merges
it into one desired state and serves its status on --status-socket for
'trellis status'.

In standalone mode (--registry-url) it also registers this node, and the
pods its CNI step records under <state-dir>/pods/, with the local cluster's
registry, and probes them (--health-interval): a pod whose probes fail
leaves this node's datapath at once and is marked not ready in the
registry, and comes back when they pass.

In Kubernetes mode (--kubernetes, with --kubeconfig or in-cluster) it reads
its Node for the node IP and pod CIDRs (unless --node-ip and --pod-cidrs
say), probes the pods scheduled on the node, and marks one whose probes
fail with the pod condition trellis.io/healthy=False (True again when they
pass), which the mesh API server's Kubernetes source reads. It needs get
on nodes, list and watch on pods, and patch on pods/status.

It programs the node's kernel: eBPF socket load balancing for every
process under --cgroup-root (by default the cgroup2 mount, the machine's
root cgroup) and routes to remote pod CIDRs with --tunnel. "none" turns
either off.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			if err := o.complete(log); err != nil {
				return err
			}
			if o.kubernetes && !o.uninstall {
				if err := o.fromKubernetes(cmd.Context()); err != nil {
					return err
				}
			}
			dp, err := o.datapath(log)
			if err != nil {
				return err
			}
			if o.uninstall {
				if err := agent.Uninstall(cmd.Context(), dp); err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), "removed the agent's pinned eBPF maps and links and its tunnel device and routes")
				return nil
			}
			// Before the datapath attaches anything: a command line that
			// cannot run must not touch the kernel even for a moment.
			if err := o.cfg.Validate(); err != nil {
				return fmt.Errorf("agent: %w", err)
			}
			var datapath agent.Datapath
			if dp.LB != nil || dp.Tunnel != nil {
				kd, err := agent.NewKernelDatapath(dp)
				if err != nil {
					return err
				}
				defer kd.Close()
				datapath = kd
			}
			a, err := agent.New(o.cfg, datapath)
			if err != nil {
				return err
			}
			return a.Run(cmd.Context())
		},
	}
	o.addFlags(cmd.Flags(), bpf.CgroupV2Root)
	cmd.AddCommand(newAgentWireGuardDeviceCmd(g))
	return cmd
}

// addFlags binds the flags to o. --cgroup-root defaults to what
// findCgroupRoot returns: the cgroup2 mount point, in production.
func (o *agentOptions) addFlags(f *pflag.FlagSet, findCgroupRoot func() (string, error)) {
	f.StringVar(&o.cfg.NodeName, "node-name", "", "this node's name")
	f.StringVar(&o.cfg.ClusterName, "cluster-name", "", "the cluster this node belongs to")
	f.StringVar(&o.cfg.ConfigDir, "config-dir", "", "directory with one <cluster>.yaml per cluster (written by 'trellis connect')")
	f.StringVar(&o.cfg.StateDir, "state-dir", "", "the agent's state directory")
	f.StringVar(&o.cfg.StatusSocket, "status-socket", "", "unix socket for 'trellis status' ")
	f.StringVar(&o.cfg.MetricsListen, "metrics-listen", "", "TCP address to serve Prometheus /metrics and the status as JSON (/v1/status) on (e.g. :9962); read-only but unauthenticated: bind it to the node's or pod's network only. The status socket serves both too")
	f.BoolVar(&o.kubernetes, "kubernetes", false, "Kubernetes mode: read this node's IP and pod CIDRs from its Node, probe the pods scheduled on it and mark them with the pod condition trellis.io/healthy (needs get nodes, list/watch pods, patch pods/status)")
	f.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig for --kubernetes (default: in-cluster, the pod's service account)")
	f.StringVar(&o.cfg.RegistryURL, "registry-url", "", "local mesh API server's HTTP address, to register this node and its pods (standalone mode)")
	f.StringVar(&o.cfg.RegistryCAFile, "registry-ca-file", "", "the local API server's server CA (its <state-dir>/pki/ca.crt), to verify it")
	f.StringVar(&o.cfg.RegistryTokenFile, "registry-token-file", "", "file with this node's registry credential (trellis apiserver issue-node-credential)")
	f.StringVar(&o.nodeIP, "node-ip", "", "this node's underlay address (with --kubernetes, default: the Node's first InternalIP)")
	f.StringSliceVar(&o.podCIDRs, "pod-cidrs", nil, "this node's pod CIDRs (with --kubernetes, default: the Node's spec.podCIDRs)")
	f.IntVar(&o.cfg.MaxConnectedClusters, "max-connected-clusters", 255, "255 or 511; must match every cluster's")

	var defaultCgroupRoot string
	defaultCgroupRoot, o.cgroupRootErr = findCgroupRoot()
	f.StringVar(&o.cgroupRoot, "cgroup-root", defaultCgroupRoot, "cgroup v2 directory whose processes get eBPF socket load balancing (the node's root cgroup: the cgroup2 mount; a node cgroup in the lab), or none")
	f.StringVar(&o.pinDir, "bpf-pin-dir", "", "bpffs directory for the load balancer's pinned maps and links (default /sys/fs/bpf/trellis/<node-name>)")
	f.StringVar(&o.tunnelMode, "tunnel", off, "how to reach remote pod CIDRs: vxlan, geneve, native or none")
	f.StringVar(&o.underlayDevice, "underlay-device", "", "the device tunnels and native routes use (default: the one holding --node-ip)")
	f.Uint32Var(&o.vni, "vni", 0, "VXLAN/Geneve network identifier (default 126)")
	f.Uint16Var(&o.tunnelPort, "tunnel-port", 0, "VXLAN/Geneve UDP port (default 8472 / 6081)")
	f.BoolVar(&o.encryption, "encryption", true, "let this node encrypt when its cluster's encryption setting says so (trellis encryption enable); false: it stays in clear and says so in status")
	f.Uint16Var(&o.wgPort, "wireguard-port", 0, "WireGuard UDP port, the same on every node (default 51871)")
	f.IntVar(&o.wgMTU, "wireguard-mtu", 0, "WireGuard device MTU (default: the underlay's less 80)")
	f.StringVar(&o.ipsecKeyFile, "ipsec-key-file", "", "IPsec pre-shared key file, the same on every node ('<index> <hex key>' lines); needed only for --type ipsec")
	f.DurationVar(&o.cfg.Health.Interval, "health-interval", agent.DefaultHealthInterval, "how often the agent probes each pod of its node on its services' TCP target ports (±10% jitter); 0 turns local health probing off")
	f.DurationVar(&o.cfg.Health.Timeout, "health-timeout", agent.DefaultHealthTimeout, "timeout of one local health probe")
	f.IntVar(&o.cfg.Health.FailureThreshold, "health-failure-threshold", agent.DefaultHealthFailureThreshold, "failed probes in a row that take a pod out of the datapath and mark it not ready")
	f.IntVar(&o.cfg.Health.SuccessThreshold, "health-success-threshold", agent.DefaultHealthSuccessThreshold, "passed probes in a row that bring a pod probed down back")
	f.BoolVar(&o.gossip, "gossip", true, "join the mesh-wide gossip when the cluster files carry a mesh key: nodes it says are dead lose their backends at once (never a service's last ones)")
	f.IntVar(&o.cfg.Gossip.Port, "gossip-port", gossip.DefaultPort, "gossip UDP and TCP port, the same on every node")
	f.BoolVar(&o.uninstall, "uninstall", false, "remove the datapath state (pinned eBPF maps and links, tunnel device and routes) and exit")
}

// complete parses the flags the agent's Config holds in typed form.
func (o *agentOptions) complete(log *slog.Logger) error {
	if o.nodeIP != "" {
		ip, err := netip.ParseAddr(o.nodeIP)
		if err != nil {
			return fmt.Errorf("--node-ip %q: %w", o.nodeIP, err)
		}
		o.cfg.NodeIP = ip
	}
	o.cfg.Gossip.Disabled = !o.gossip
	if o.kubeconfig != "" && !o.kubernetes {
		return errors.New("--kubeconfig is only used with --kubernetes")
	}
	o.cfg.PodCIDRs = nil
	for _, s := range o.podCIDRs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return fmt.Errorf("--pod-cidrs %q: %w", s, err)
		}
		o.cfg.PodCIDRs = append(o.cfg.PodCIDRs, p)
	}
	o.cfg.Logger = log
	return nil
}

// fromKubernetes connects to the Kubernetes API (Kubernetes mode) and
// fills the node's IP and pod CIDRs the flags left empty from its Node.
func (o *agentOptions) fromKubernetes(ctx context.Context) error {
	client, err := agent.NewKubernetesClient(o.kubeconfig)
	if err != nil {
		return err
	}
	o.cfg.Kubernetes = client
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return o.cfg.FromKubernetes(ctx)
}

// datapath builds the datapath config from the flags (after complete):
// a part whose flag says none is nil. The same config serves the running
// datapath and --uninstall.
func (o *agentOptions) datapath(log *slog.Logger) (agent.DatapathConfig, error) {
	dp := agent.DatapathConfig{Logger: log}
	switch o.cgroupRoot {
	case off:
	case "":
		if o.cgroupRootErr != nil {
			return dp, fmt.Errorf("--cgroup-root has no default: %w; name a cgroup v2 directory, or none to run without the socket load balancer", o.cgroupRootErr)
		}
		return dp, errors.New("--cgroup-root is empty: name a cgroup v2 directory, or none to run without the socket load balancer")
	default:
		dp.LB = &bpf.Config{PinDir: o.pinDir, CgroupPath: o.cgroupRoot}
		if dp.LB.PinDir == "" && o.cfg.NodeName != "" {
			dp.LB.PinDir = bpf.PinDir(o.cfg.NodeName)
		}
	}
	switch mode := tunnel.Mode(o.tunnelMode); mode {
	case off:
	case tunnel.ModeVXLAN, tunnel.ModeGeneve, tunnel.ModeNative:
		dp.Tunnel = &tunnel.Config{
			Mode: mode, UnderlayDevice: o.underlayDevice, LocalIP: o.cfg.NodeIP, LocalPodCIDRs: o.cfg.PodCIDRs,
			VNI: o.vni, Port: o.tunnelPort, Logger: log,
		}
	default:
		return dp, fmt.Errorf("--tunnel %q: want vxlan, geneve, native or none", o.tunnelMode)
	}
	if dp.Tunnel != nil && o.encryption {
		exe, err := os.Executable()
		if err != nil {
			return dp, fmt.Errorf("encryption: find this executable to start the WireGuard device process: %w", err)
		}
		strictPins := ""
		if o.pinDir != "" {
			strictPins = filepath.Join(o.pinDir, "strict")
		}
		dp.Encryption = &agent.EncryptionConfig{
			Node: o.cfg.NodeName, Cluster: o.cfg.ClusterName, StateDir: o.cfg.StateDir,
			Port: o.wgPort, MTU: o.wgMTU, StrictPinDir: strictPins, IPsecKeyFile: o.ipsecKeyFile,
			// The device process outlives this agent: a command of its own.
			StartCommand: []string{exe, "agent", "wireguard-device"},
		}
	}
	return dp, nil
}
