package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/clustermesh"
)

func newConnectCmd() *cobra.Command {
	var (
		mesh    bool
		allowCA bool
	)
	cmd := &cobra.Command{
		Use:   "connect STATE_DIR_A STATE_DIR_B [STATE_DIR…]",
		Short: "Join clusters: exchange credentials and write their agents' cluster files",
		Long: `Join clusters, each named by its mesh API server's state dir. Each side mints
a read-only client certificate for the other, and each cluster's agents get a
cluster file (in <state-dir>/clusters) for every other cluster and for their
own. Two clusters are joined both ways; with --mesh, every pair of the
clusters given.

Every cluster keeps its own CAs: the cluster file it writes for a reader
carries the target's server CA, and the certificate in it is signed by the
target's own client CA, which never leaves the target. The file also pins
the target's cluster ID and pod CIDRs: agents refuse a cluster whose
published config later says otherwise.

It refuses, and changes nothing, when clusters share an ID or their pod
CIDRs overlap (also with a cluster one of them is already connected to),
or an etcd endpoint is unreachable.`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 2 && !mesh {
				return fmt.Errorf("%d clusters given: pass --mesh to connect every pair", len(args))
			}
			peers := make([]clustermesh.Peer, len(args))
			for i, dir := range args {
				peers[i] = &clustermesh.StateDirPeer{Dir: dir}
			}
			if err := clustermesh.ConnectMesh(cmd.Context(), peers, clustermesh.ConnectOptions{}); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "connected %d clusters; their agents pick up the new cluster files within a second\n", len(args))
			return nil
		},
	}
	cmd.Flags().BoolVar(&mesh, "mesh", false, "connect every pair of the clusters given")
	// Kept so scripts that pass it still run: CAs are exchanged at connect
	// now, so mismatching CAs are the normal case.
	cmd.Flags().BoolVar(&allowCA, "allow-mismatching-ca", false, "no effect: every cluster keeps its own CAs, exchanged at connect")
	cmd.Flags().MarkDeprecated("allow-mismatching-ca", "every cluster keeps its own CAs now and connect exchanges them; the flag has no effect")
	return cmd
}

func newDisconnectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "disconnect STATE_DIR_A STATE_DIR_B",
		Short: "Separate two clusters: their agents drain each other and credentials are revoked",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, b := &clustermesh.StateDirPeer{Dir: args[0]}, &clustermesh.StateDirPeer{Dir: args[1]}
			if err := clustermesh.Disconnect(cmd.Context(), a, b); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "disconnected; agents drain the other cluster within a second")
			return nil
		},
	}
}
