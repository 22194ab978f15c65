package main

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/lab"
)

func newLabEncryptionCmd(opts labOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "encryption",
		Short: "Turn node-to-node encryption on or off in the lab, rotate keys, look at the wire",
		Long: `Change the clusters' encryption setting the way an operator does ('trellis
encryption' inside each cluster's API server namespace) and wait until every
agent of the lab shows the result: nodes of two clusters that both run
WireGuard reach each other on path "encrypted", every other pair stays on
"tunnel" (clear VXLAN). 'capture' shows what crosses the lab's underlay
bridge, and whether a marker sent by a pod can be read there.

  trellis lab encryption enable                  WireGuard in every cluster
  trellis lab encryption enable --cluster eu     only eu: eu↔us stays clear
  trellis lab encryption rotate --node eu/n1     one node's key
  trellis lab encryption status                  per node: type, key, paths
  trellis lab encryption capture --seconds 5     what the underlay carries
  trellis lab encryption disable`,
	}
	cmd.AddCommand(newLabEncryptionEnableCmd(opts), newLabEncryptionDisableCmd(opts), newLabEncryptionRotateCmd(opts),
		newLabEncryptionStatusCmd(opts), newLabEncryptionCaptureCmd(opts))
	return cmd
}

func newLabEncryptionEnableCmd(opts labOpts) *cobra.Command {
	var (
		clusters []string
		typ      string
		strict   bool
	)
	cmd := &cobra.Command{
		Use:   "enable [--cluster NAME …] [--type wireguard|ipsec] [--strict]",
		Short: "Turn encryption on in clusters (all by default) and wait until the agents apply it",
		Long: `Turn encryption on in the named clusters (every cluster of the lab without
--cluster) and wait until every agent shows it: with WireGuard, path
"encrypted" between every two nodes whose clusters both have it on. With
IPsec on a kernel without ESP it fails with the kernel options the agents
name.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if typ != v1.EncryptionWireGuard && typ != v1.EncryptionIPsec {
				return fmt.Errorf("--type %q: want wireguard or ipsec", typ)
			}
			o, err := opts(cmd, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			return lab.SetEncryption(cmd.Context(), o, clusters, v1.EncryptionRequest{Type: typ, Strict: strict})
		},
	}
	cmd.Flags().StringSliceVar(&clusters, "cluster", nil, "a cluster to change (repeat or comma-separate; default: every cluster)")
	cmd.Flags().StringVar(&typ, "type", v1.EncryptionWireGuard, "wireguard or ipsec")
	cmd.Flags().BoolVar(&strict, "strict", false, "drop unencrypted pod traffic between nodes that both have encryption on")
	return cmd
}

func newLabEncryptionDisableCmd(opts labOpts) *cobra.Command {
	var clusters []string
	cmd := &cobra.Command{
		Use:   "disable [--cluster NAME …]",
		Short: "Turn encryption off in clusters (all by default) and wait until the devices are gone",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o, err := opts(cmd, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			return lab.SetEncryption(cmd.Context(), o, clusters, v1.EncryptionRequest{})
		},
	}
	cmd.Flags().StringSliceVar(&clusters, "cluster", nil, "a cluster to change (repeat or comma-separate; default: every cluster)")
	return cmd
}

func newLabEncryptionRotateCmd(opts labOpts) *cobra.Command {
	var cluster, node string
	cmd := &cobra.Command{
		Use:   "rotate --cluster NAME | --node CLUSTER/NODE",
		Short: "Give a cluster's nodes (or one node) new WireGuard keys and wait for fresh handshakes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (cluster == "") == (node == "") {
				return errors.New("name exactly one of --cluster and --node")
			}
			o, err := opts(cmd, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			if node != "" {
				return lab.RotateNodeKey(cmd.Context(), o, node)
			}
			return lab.RotateEncryption(cmd.Context(), o, cluster)
		},
	}
	cmd.Flags().StringVar(&cluster, "cluster", "", "rotate every node of this cluster ('trellis encryption rotate')")
	cmd.Flags().StringVar(&node, "node", "", "rotate only this node, through its agent's status socket")
	return cmd
}

func newLabEncryptionStatusCmd(opts labOpts) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show each node's encryption: type, key, peers by path, strict drops, error",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			o, err := opts(cmd, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			rep, err := lab.Status(cmd.Context(), o)
			if err != nil {
				return err
			}
			return render(cmd.OutOrStdout(), output, rep.Nodes, func(w io.Writer) {
				if !lab.PrintEncryption(w, rep.Nodes) {
					fmt.Fprintln(w, "no agent reports encryption (agents without a tunnel, or not running)")
				}
			})
		},
	}
	addOutputFlag(cmd, &output)
	return cmd
}

func newLabEncryptionCaptureCmd(opts labOpts) *cobra.Command {
	var (
		seconds float64
		marker  string
		output  string
	)
	cmd := &cobra.Command{
		Use:   "capture [--seconds 5] [--marker TEXT]",
		Short: "Count what crosses the lab's underlay bridge, by endpoints and protocol",
		Long: `Read every frame that enters the lab's bridge for a while (an AF_PACKET socket
in the bridge namespace) and count the IPv4 ones by their outer endpoints
(node↔node, node↔apiserver, other) and protocol/port: udp/8472 is clear VXLAN,
udp/51871 WireGuard. With --marker, count the frames that contain TEXT anywhere:
a pod's payload is readable in a VXLAN frame and not in a WireGuard one, e.g.

  trellis lab encryption capture --marker SECRET &
  trellis lab exec eu/client -- curl -s http://10.2.2.10:8080/SECRET`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if seconds <= 0 {
				return fmt.Errorf("--seconds %v: want more than 0", seconds)
			}
			o, err := opts(cmd, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			c, err := lab.Capture(cmd.Context(), o, []byte(marker))
			if err != nil {
				return err
			}
			select {
			case <-cmd.Context().Done():
			case <-time.After(time.Duration(seconds * float64(time.Second))):
			}
			rep, err := c.Stop()
			if err != nil {
				return err
			}
			return render(cmd.OutOrStdout(), output, rep, rep.Print)
		},
	}
	cmd.Flags().Float64Var(&seconds, "seconds", 5, "how long to capture")
	cmd.Flags().StringVar(&marker, "marker", "", "count the frames that contain this text")
	addOutputFlag(cmd, &output)
	return cmd
}
