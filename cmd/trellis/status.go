package main

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

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
				printStatus(cmd.OutOrStdout(), st)
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

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func printStatus(w io.Writer, st agent.Status) {
	fmt.Fprintf(w, "Node %s in cluster %s, snapshot v%d", st.Node, st.Cluster, st.SnapshotVersion)
	if st.DatapathDisabled {
		fmt.Fprint(w, " (datapath disabled)")
	} else {
		fmt.Fprintf(w, ", datapath at v%d", st.AppliedVersion)
	}
	fmt.Fprintln(w)
	if st.DatapathError != "" {
		fmt.Fprintf(w, "Datapath error (%s ago): %s\n", time.Since(st.DatapathErrorAt).Round(time.Second), st.DatapathError)
	}
	if st.ConfigDirError != "" {
		fmt.Fprintf(w, "Config dir error: %s\n", st.ConfigDirError)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CLUSTER\tID\tREGION\tCONNECTED\tREADY\tSYNCED\tNODES\tENDPOINTS\tIDENTITIES\tSERVICES\tREJECTED\tLAST ERROR")
	for _, c := range st.Clusters {
		name := c.Name
		if c.Local {
			name += " (local)"
		}
		id := "-"
		if c.ClusterID != 0 {
			id = fmt.Sprint(c.ClusterID)
		}
		synced := strings.Join(c.SyncedKinds, ",")
		if len(c.SyncedKinds) == 4 {
			synced = "all"
		} else if synced == "" {
			synced = "-"
		}
		var rejected []string
		for reason, n := range c.Rejected {
			rejected = append(rejected, fmt.Sprintf("%s=%d", reason, n))
		}
		slices.Sort(rejected)
		rej := strings.Join(rejected, ",")
		if rej == "" {
			rej = "0"
		}
		lastErr := "-"
		if c.LastError != "" {
			lastErr = fmt.Sprintf("%s (%s ago)", c.LastError, time.Since(c.LastErrorAt).Round(time.Second))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%s\t%s\n", name, id, orDash(c.Region), yesNo(c.Connected), yesNo(c.Ready), synced,
			c.Entries["nodes"], c.Entries["endpoints"], c.Entries["identities"], c.Entries["services"], rej, lastErr)
	}
	tw.Flush()
	if len(st.Services) == 0 {
		return
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tGLOBAL\tAFFINITY\tFRONTENDS\tACTIVE BACKENDS BY CLUSTER")
	for _, s := range st.Services {
		var by []string
		for cluster, ips := range s.Active {
			by = append(by, fmt.Sprintf("%s: %s", cluster, strings.Join(ips, " ")))
		}
		slices.Sort(by)
		active := strings.Join(by, "; ")
		if active == "" {
			active = "none"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", s.Service, yesNo(s.Global), s.Affinity, orDash(strings.Join(s.Frontend, ",")), active)
	}
	tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
