package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

// The output of every command that prints a result: a table for people
// (the default) or indented JSON for scripts (-o json). Progress and logs
// go to stderr under -o json, so that stdout stays one JSON document.

// addOutputFlag registers -o/--output on cmd, bound to output.
func addOutputFlag(cmd *cobra.Command, output *string) {
	cmd.Flags().StringVarP(output, "output", "o", "table", "table or json")
}

// checkOutput refuses an --output value other than table or json; commands
// call it before they do any work.
func checkOutput(output string) error {
	if output != "table" && output != "json" {
		return fmt.Errorf("--output %q: want table or json", output)
	}
	return nil
}

// render writes v as indented JSON for --output json, else with table.
func render(w io.Writer, output string, v any, table func(io.Writer)) error {
	if output == "json" {
		return printJSON(w, v)
	}
	table(w)
	return nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
