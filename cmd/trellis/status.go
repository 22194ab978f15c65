package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/agent"
)

func newStatusCmd() *cobra.Command {
	var socket, output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show what the node agent sees: clusters, their health, global services",
		Long: `Ask the node agent for its view of the mesh: per cluster whether it is
connected and ready, which kinds are synced, entry counts, rejected entries by
reason and the last error; per global service the backends carrying traffic,
by cluster. Exits 1 when a cluster is not ready.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
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
	addOutputFlag(cmd, &output)
	return cmd
}
