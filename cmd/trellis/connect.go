package main

import (
	"fmt"

	"github.com/spf13/cobra"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/clustermesh/kubepeer"
)

// kubeFlags name clusters by kubeconfig context, for connect and
// disconnect.
type kubeFlags struct {
	contexts   []string
	kubeconfig string
	namespace  string
}

func (k *kubeFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringArrayVar(&k.contexts, "context", nil, "a Kubernetes cluster, by kubeconfig context, where Trellis is installed (repeat it; may be mixed with state dirs)")
	cmd.Flags().StringVar(&k.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
	cmd.Flags().StringVarP(&k.namespace, "namespace", "n", v1.KubeDefaultNamespace, "namespace Trellis is installed in, in every --context")
}

// peers are the clusters named: contexts first, then state dirs.
func (k *kubeFlags) peers(stateDirs []string) ([]clustermesh.Peer, error) {
	var peers []clustermesh.Peer
	for _, c := range k.contexts {
		p, err := kubepeer.New(k.kubeconfig, c, k.namespace)
		if err != nil {
			return nil, err
		}
		peers = append(peers, p)
	}
	for _, dir := range stateDirs {
		peers = append(peers, &clustermesh.StateDirPeer{Dir: dir})
	}
	return peers, nil
}

func newConnectCmd() *cobra.Command {
	var (
		mesh    bool
		allowCA bool
		kube    kubeFlags
	)
	cmd := &cobra.Command{
		Use:   "connect {--context A --context B | STATE_DIR_A STATE_DIR_B} [more…]",
		Short: "Join clusters: exchange credentials and write their agents' cluster files",
		Long: `Join clusters, each named by its mesh API server's state dir or, on
Kubernetes, by a kubeconfig context (--context, repeated). Each side mints
a read-only client certificate for the other, and each cluster's agents get a
cluster file for every other cluster and for their own: in
<state-dir>/clusters, or on Kubernetes in the Secret trellis-clustermesh
their DaemonSet mounts. Two clusters are joined both ways; with --mesh,
every pair of the clusters given.

On Kubernetes everything goes through the Kubernetes API: the mesh API
server keeps what it says of its cluster in the ConfigMap
trellis-cluster-info and answers credential requests made as Secrets
(trellis-remote-<cluster>), so connecting needs the right to write Secrets
in Trellis's namespace and no network path to the mesh API server. The etcd
endpoints the clusters advertise must be reachable from here.

Every cluster keeps its own CAs: the cluster file it writes for a reader
carries the target's server CA, and the certificate in it is signed by the
target's own client CA, which never leaves the target. The file also pins
the target's cluster ID and pod CIDRs: agents refuse a cluster whose
published config later says otherwise.

It refuses, and changes nothing, when clusters share an ID or their pod
CIDRs overlap (also with a cluster one of them is already connected to),
or an etcd endpoint is unreachable.`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			n := len(args) + len(kube.contexts)
			switch {
			case n < 2:
				return fmt.Errorf("%d clusters given: name at least two (state dirs or --context)", n)
			case n > 2 && !mesh:
				return fmt.Errorf("%d clusters given: pass --mesh to connect every pair", n)
			}
			peers, err := kube.peers(args)
			if err != nil {
				return err
			}
			if err := clustermesh.ConnectMesh(cmd.Context(), peers, clustermesh.ConnectOptions{}); err != nil {
				return err
			}
			for _, p := range peers {
				fmt.Fprintf(cmd.OutOrStdout(), "%s: cluster files written for %d clusters\n", p.Describe(), n)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "connected %d clusters; their agents pick up the new cluster files within a second (a mounted Secret: within the kubelet's sync period, about a minute)\n", n)
			return nil
		},
	}
	kube.add(cmd)
	cmd.Flags().BoolVar(&mesh, "mesh", false, "connect every pair of the clusters given")
	// Kept so scripts that pass it still run: CAs are exchanged at connect
	// now, so mismatching CAs are the normal case.
	cmd.Flags().BoolVar(&allowCA, "allow-mismatching-ca", false, "no effect: every cluster keeps its own CAs, exchanged at connect")
	cmd.Flags().MarkDeprecated("allow-mismatching-ca", "every cluster keeps its own CAs now and connect exchanges them; the flag has no effect")
	return cmd
}

func newDisconnectCmd() *cobra.Command {
	var kube kubeFlags
	cmd := &cobra.Command{
		Use:   "disconnect {--context A --context B | STATE_DIR_A STATE_DIR_B}",
		Short: "Separate two clusters: their agents drain each other and credentials are revoked",
		Args:  cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if n := len(args) + len(kube.contexts); n != 2 {
				return fmt.Errorf("%d clusters given: name exactly two (state dirs or --context)", n)
			}
			peers, err := kube.peers(args)
			if err != nil {
				return err
			}
			if err := clustermesh.Disconnect(cmd.Context(), peers[0], peers[1]); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "disconnected; agents drain the other cluster within a second")
			return nil
		},
	}
	kube.add(cmd)
	return cmd
}
