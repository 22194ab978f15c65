package main

import (
	"fmt"
	"net/netip"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/agent"
	"github.com/trellis-mesh/trellis/bpf"
	"github.com/trellis-mesh/trellis/tunnel"
)

func newAgentCmd(g *globalOptions) *cobra.Command {
	var (
		cfg        agent.Config
		dp         agent.DatapathConfig
		tunnelMode string
		nodeIP     string
		podCIDRs   []string
		uninstall  bool
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the node agent: connect this node to every cluster of the mesh",
		Long: `Run the per-node agent. It watches the mesh API server of every cluster in
--config-dir (the local one included), validates what they publish, merges
it into one desired state and serves its status on --status-socket for
'trellis status'.

In standalone mode (--registry-url) it also registers this node, and the
pods its CNI step records under <state-dir>/pods/, with the local cluster's
registry.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			if nodeIP != "" {
				if cfg.NodeIP, err = netip.ParseAddr(nodeIP); err != nil {
					return fmt.Errorf("--node-ip %q: %w", nodeIP, err)
				}
			}
			for _, s := range podCIDRs {
				p, err := netip.ParsePrefix(s)
				if err != nil {
					return fmt.Errorf("--pod-cidrs %q: %w", s, err)
				}
				cfg.PodCIDRs = append(cfg.PodCIDRs, p)
			}
			cfg.Logger = log
			dp.Tunnel, dp.NodeIP, dp.PodCIDRs, dp.Logger = tunnel.Mode(tunnelMode), cfg.NodeIP, cfg.PodCIDRs, log
			if dp.CgroupRoot != "" && dp.PinDir == "" && cfg.NodeName != "" {
				dp.PinDir = bpf.PinDir(cfg.NodeName)
			}
			if uninstall {
				if err := agent.Uninstall(cmd.Context(), dp); err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), "removed the agent's pinned eBPF maps and links and its tunnel device and routes")
				return nil
			}
			var datapath agent.Datapath
			if dp.CgroupRoot != "" || (dp.Tunnel != "" && dp.Tunnel != "none") {
				kd, err := agent.NewKernelDatapath(dp)
				if err != nil {
					return err
				}
				defer kd.Close()
				datapath = kd
			}
			a, err := agent.New(cfg, datapath)
			if err != nil {
				return err
			}
			return a.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.NodeName, "node-name", "", "this node's name")
	f.StringVar(&cfg.ClusterName, "cluster-name", "", "the cluster this node belongs to")
	f.StringVar(&cfg.ConfigDir, "config-dir", "", "directory with one <cluster>.yaml per cluster (written by 'trellis connect')")
	f.StringVar(&cfg.StateDir, "state-dir", "", "the agent's state directory")
	f.StringVar(&cfg.StatusSocket, "status-socket", "", "unix socket for 'trellis status' ")
	f.StringVar(&cfg.RegistryURL, "registry-url", "", "local mesh API server's HTTP address, to register this node and its pods (standalone mode)")
	f.StringVar(&cfg.RegistryTokenFile, "registry-token-file", "", "file with the local API server's admin token")
	f.StringVar(&nodeIP, "node-ip", "", "this node's underlay address")
	f.StringSliceVar(&podCIDRs, "pod-cidrs", nil, "this node's pod CIDRs")
	f.IntVar(&cfg.MaxConnectedClusters, "max-connected-clusters", 255, "255 or 511; must match every cluster's")
	f.StringVar(&dp.CgroupRoot, "cgroup-root", "", "cgroup v2 directory whose processes get eBPF socket load balancing (the node's root cgroup; a node cgroup in the lab); empty disables it")
	f.StringVar(&dp.PinDir, "bpf-pin-dir", "", "bpffs directory for the load balancer's pinned maps and links (default /sys/fs/bpf/trellis/<node-name>)")
	f.StringVar(&tunnelMode, "tunnel", "none", "how to reach remote pod CIDRs: vxlan, geneve, native or none")
	f.StringVar(&dp.UnderlayDevice, "underlay-device", "", "the device tunnels and native routes use (default: the one holding --node-ip)")
	f.Uint32Var(&dp.VNI, "vni", 0, "VXLAN/Geneve network identifier (default 126)")
	f.Uint16Var(&dp.Port, "tunnel-port", 0, "VXLAN/Geneve UDP port (default 8472 / 6081)")
	f.BoolVar(&uninstall, "uninstall", false, "remove the datapath state (pinned eBPF maps and links, tunnel device and routes) and exit")
	return cmd
}
