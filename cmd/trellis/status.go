package main

import (
	"encoding/json"
	"fmt"

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
			st, err := agent.FetchStatus(cmd.Context(), socket)
			if err != nil {
				return err
			}
			switch output {
			case "json":
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if err := enc.Encode(st); err != nil {
					return err
				}
			case "", "table":
				agent.PrintStatus(cmd.OutOrStdout(), st)
			default:
				return fmt.Errorf("--output %q: want table or json", output)
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
	cmd.Flags().StringVarP(&output, "output", "o", "table", "table or json")
	return cmd
}
