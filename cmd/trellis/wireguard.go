package main

import (
	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/encryption/wireguard"
)

// newAgentWireGuardDeviceCmd is the userspace WireGuard device process
// that wireguard.Open starts (and later agents adopt): it outlives the
// agent, so it is a command of its own rather than a goroutine.
func newAgentWireGuardDeviceCmd(g *globalOptions) *cobra.Command {
	var cfg wireguard.DeviceProcessConfig
	cmd := &cobra.Command{
		Use:    "wireguard-device",
		Short:  "Run a node's userspace WireGuard device (started by the agent)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			cfg.Logger = log
			return wireguard.RunDevice(cmd.Context(), cfg)
		},
	}
	cmd.Flags().StringVar(&cfg.Name, "name", wireguard.DefaultDevice, "the TUN link's name")
	cmd.Flags().IntVar(&cfg.MTU, "mtu", wireguard.DefaultMTU, "the link's MTU")
	cmd.Flags().StringVar(&cfg.SocketPath, "socket", "", "unix socket to serve the UAPI on (default "+wireguard.DefaultSocketDir+"/<name>.sock)")
	cmd.Flags().IntVar(&cfg.MaxProcs, "max-procs", wireguard.DefaultDeviceMaxProcs(), "CPUs to run Go code on at once (GOMAXPROCS); 0: Go's default")
	return cmd
}
