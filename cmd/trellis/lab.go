package main

import (
	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/lab"
)

func newLabCmd(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "Run Trellis clusters on this machine",
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "demo",
		Short: "Show Trellis working, narrated, then clean up",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			return lab.Demo(cmd.Context(), cmd.OutOrStdout(), log)
		},
	})
	return cmd
}
