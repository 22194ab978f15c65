package main

import (
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/agent"
	v1 "github.com/trellis-mesh/trellis/api/v1"
)

func newEncryptionCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "encryption",
		Short: "Turn node-to-node encryption on or off for a cluster, live",
		Long: `Encryption is a per-cluster setting kept by the cluster's mesh API server and
published to its agents, which apply it without a restart: each node creates
its WireGuard device and key, publishes the key, and moves its traffic to a
peer onto the encrypted path once a handshake with that peer succeeded.

A pair of nodes is encrypted when both have encryption on, and in clear
otherwise, so clusters can be switched one at a time. --strict drops
unencrypted pod traffic between nodes that both have encryption on (no clear
fallback while the encrypted path is not up).`,
	}
	cmd.AddCommand(newEncryptionEnableCmd(), newEncryptionDisableCmd(), newEncryptionRotateCmd(), newEncryptionStatusCmd())
	return cmd
}

func newEncryptionEnableCmd() *cobra.Command {
	var stateDir, server, typ string
	var strict bool
	cmd := &cobra.Command{
		Use:   "enable [--type wireguard|ipsec] [--strict]",
		Short: "Turn encryption on for the cluster (or change its type or strictness)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if typ != v1.EncryptionWireGuard && typ != v1.EncryptionIPsec {
				return fmt.Errorf("--type %q: want wireguard or ipsec", typ)
			}
			return setEncryption(cmd, stateDir, server, v1.EncryptionRequest{Type: typ, Strict: strict})
		},
	}
	cmd.Flags().StringVar(&typ, "type", v1.EncryptionWireGuard, "wireguard or ipsec")
	cmd.Flags().BoolVar(&strict, "strict", false, "drop unencrypted pod traffic between nodes that both have encryption on")
	addAdminFlags(cmd, &stateDir, &server)
	return cmd
}

func newEncryptionDisableCmd() *cobra.Command {
	var stateDir, server string
	cmd := &cobra.Command{
		Use:   "disable",
		Short: "Turn encryption off for the cluster",
		Long: `Turn encryption off. Each node first moves its traffic back to the clear
path and withdraws its key, then removes its device once its peers have
stopped sending to it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return setEncryption(cmd, stateDir, server, v1.EncryptionRequest{})
		},
	}
	addAdminFlags(cmd, &stateDir, &server)
	return cmd
}

func setEncryption(cmd *cobra.Command, stateDir, server string, req v1.EncryptionRequest) error {
	api, err := adminAPI(stateDir, server)
	if err != nil {
		return err
	}
	got, err := api.SetEncryption(cmd.Context(), req)
	if err != nil {
		return fmt.Errorf("API server at %s: %w", api.URL(), err)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "encryption: %s (the cluster's agents apply it as they see it; `trellis encryption status` shows the nodes' keys)\n", describeEncryption(got))
	return nil
}

func newEncryptionRotateCmd() *cobra.Command {
	var stateDir, server, socket string
	cmd := &cobra.Command{
		Use:   "rotate [--state-dir DIR | --status-socket SOCKET]",
		Short: "Give every node of the cluster (or one node) a new key",
		Long: `Give every node of the cluster a new key: each node replaces its WireGuard
private key, publishes the new public key, and its peers move to it; the old
key retires. Connections stay up (packets in flight during the switch are
retransmitted).

With --status-socket, only the node whose agent listens there rotates (run it
on that node).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if socket != "" {
				if err := agent.RequestKeyRotation(cmd.Context(), socket); err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), "the node takes a new key now; `trellis status` shows it")
				return nil
			}
			api, err := adminAPI(stateDir, server)
			if err != nil {
				return err
			}
			got, err := api.RotateEncryption(cmd.Context())
			if err != nil {
				return fmt.Errorf("API server at %s: %w", api.URL(), err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "encryption: %s\n", describeEncryption(got))
			return nil
		},
	}
	addAdminFlags(cmd, &stateDir, &server)
	cmd.Flags().StringVar(&socket, "status-socket", "", "rotate only the node of the agent listening on this socket")
	return cmd
}

func newEncryptionStatusCmd() *cobra.Command {
	var stateDir, server, output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the cluster's encryption setting and each node's published key",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			api, err := adminAPI(stateDir, server)
			if err != nil {
				return err
			}
			st, err := api.Encryption(cmd.Context())
			if err != nil {
				return fmt.Errorf("API server at %s: %w", api.URL(), err)
			}
			return render(cmd.OutOrStdout(), output, st, func(w io.Writer) {
				fmt.Fprintf(w, "encryption: %s\n\n", describeEncryption(st.Setting))
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NODE\tWIREGUARD KEY\tIPSEC KEY INDEX")
				for _, n := range st.Nodes {
					key, index := n.WireGuardPublicKey, "-"
					if key == "" {
						key = "-"
					}
					if n.IPsecKeyIndex != 0 {
						index = fmt.Sprint(n.IPsecKeyIndex)
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\n", n.Name, key, index)
				}
				tw.Flush()
			})
		},
	}
	addAdminFlags(cmd, &stateDir, &server)
	addOutputFlag(cmd, &output)
	return cmd
}

func describeEncryption(e v1.EncryptionConfig) string {
	if e.Type == v1.EncryptionNone {
		return "off"
	}
	s := e.Type
	if e.Strict {
		s += ", strict"
	}
	return fmt.Sprintf("%s (rotation %d)", s, e.Rotation)
}
