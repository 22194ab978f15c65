package main

import (
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// globalOptions are the flags every subcommand shares.
type globalOptions struct {
	logLevel string
}

func (o *globalOptions) logger() (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", o.logLevel)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})), nil
}

func newRootCmd() *cobra.Command {
	opts := &globalOptions{}
	root := &cobra.Command{
		Use:   "trellis",
		Short: "Trellis joins clusters into one network mesh",
		Long: `Trellis joins Kubernetes or plain Linux clusters into one mesh: pods reach
pods in other clusters, global services are load balanced across every
cluster that runs them, traffic fails over between regions, and one switch
encrypts traffic between nodes.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&opts.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	root.AddCommand(
		newVersionCmd(),
		newAPIServerCmd(opts),
		newAgentCmd(opts),
		newStatusCmd(),
		newConnectCmd(),
		newDisconnectCmd(),
		newEncryptionCmd(),
		newLabCmd(opts),
	)
	return root
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version of this binary",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			version := "devel"
			if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
				version = bi.Main.Version
			}
			fmt.Fprintf(cmd.OutOrStdout(), "trellis %s\n", version)
			return nil
		},
	}
}
