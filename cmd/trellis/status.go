package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/agent"
)

func newStatusCmd() *cobra.Command {
	var (
		socket, output string
		kubeContext    string
		kubeconfig     string
		node           string
		agentPort      int
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show what the node agent sees: clusters, their health, global services",
		Long: `Ask the node agent for its view of the mesh: per cluster whether it is
connected and ready, which kinds are synced, entry counts, rejected entries by
reason and the last error; per global service the backends carrying traffic,
by cluster. Exits 1 when a cluster is not ready.

With --context it asks the agents of that Kubernetes cluster instead (every
node's, or --node's), through the Kubernetes API's node proxy to their
--metrics-listen port (the chart's agent.metricsPort): what each agent
sees, under its node's name. It needs the right to proxy to nodes
(nodes/proxy) and exits 1 when an agent does not answer.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if cmd.Flags().Changed("context") {
				statuses, err := fetchKubeStatuses(cmd.Context(), kubeconfig, kubeContext, node, agentPort)
				if err != nil {
					return err
				}
				if err := render(cmd.OutOrStdout(), output, statuses, func(w io.Writer) { printKubeStatuses(w, statuses) }); err != nil {
					return err
				}
				if err := kubeStatusProblem(statuses); err != nil {
					cmd.SilenceErrors = true
					return err
				}
				return nil
			}
			st, err := agent.FetchStatus(cmd.Context(), socket)
			if err != nil {
				return err
			}
			if err := render(cmd.OutOrStdout(), output, st, func(w io.Writer) { agent.PrintStatus(w, st) }); err != nil {
				return err
			}
			for _, c := range st.Clusters {
				if !c.Ready {
					cmd.SilenceErrors = true
					return fmt.Errorf("cluster %s is not ready", c.Name)
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&socket, "socket", agent.DefaultStatusSocket, "the agent's status socket")
	cmd.Flags().StringVar(&kubeContext, "context", "", "ask the agents of this Kubernetes cluster (kubeconfig context) instead of the local socket")
	cmd.Flags().StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file for --context (default: $KUBECONFIG, else ~/.kube/config)")
	cmd.Flags().StringVar(&node, "node", "", "with --context, only the agent of this node")
	cmd.Flags().IntVar(&agentPort, "agent-port", 9962, "with --context, the agents' --metrics-listen port")
	addOutputFlag(cmd, &output)
	return cmd
}
