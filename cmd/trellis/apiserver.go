package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/trellis-mesh/trellis/api/client"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver"
)

func newAPIServerCmd(g *globalOptions) *cobra.Command {
	var (
		cfg        apiserver.Config
		configFile string
	)
	cmd := &cobra.Command{
		Use:   "apiserver",
		Short: "Run a cluster's mesh API server",
		Long: `Run the mesh API server of one cluster: it owns an etcd (embedded by default),
publishes the cluster's nodes, endpoints, identities and global services into
it, and gives remote clusters read-only credentials.

Every flag can also be set in a YAML file given with --config, under the same
name in camelCase (--cluster-name is clusterName); flags win over the file.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			final := cfg
			if configFile != "" {
				fromFile, err := apiserver.LoadConfigFile(configFile)
				if err != nil {
					return err
				}
				final = mergeFlags(fromFile, cfg, cmd.Flags())
			}
			srv, err := apiserver.New(final, log)
			if err != nil {
				return err
			}
			return srv.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&configFile, "config", "", "YAML config file with the same settings as the flags")
	f.StringVar(&cfg.ClusterName, "cluster-name", "", "this cluster's name: a lowercase DNS label, at most 32 characters")
	f.Uint32Var(&cfg.ClusterID, "cluster-id", 0, "this cluster's ID, 1-511, unique in the mesh")
	f.StringSliceVar(&cfg.PodCIDRs, "pod-cidrs", nil, "the cluster's pod CIDRs, comma separated")
	f.StringVar(&cfg.Region, "region", "", "the cluster's region (failover prefers clusters of the same region)")
	f.StringVar(&cfg.Zone, "zone", "", "the cluster's zone")
	f.IntVar(&cfg.MaxConnectedClusters, "max-connected-clusters", 255, "255 or 511; must match across the mesh")
	f.StringVar(&cfg.Encryption, "encryption", "", "node encryption mode to advertise: '', wireguard or ipsec")
	f.StringVar(&cfg.StateDir, "state-dir", "", "directory for the CA, certificates, admin token and etcd data")
	f.StringSliceVar(&cfg.EtcdEndpoints, "etcd-endpoints", nil, "external etcd client URLs (default: run an embedded etcd)")
	f.StringVar(&cfg.EtcdCAFile, "etcd-ca-file", "", "CA of the external etcd")
	f.StringVar(&cfg.EtcdCertFile, "etcd-cert-file", "", "client certificate for the external etcd")
	f.StringVar(&cfg.EtcdKeyFile, "etcd-key-file", "", "client key for the external etcd")
	f.StringVar(&cfg.EtcdListen, "etcd-listen", apiserver.DefaultEtcdListen, "host:port remote clusters dial: the etcd front door (the embedded etcd itself listens on loopback, see <state-dir>/etcd.addr)")
	f.StringVar(&cfg.AdvertiseAddress, "advertise-address", "", "address remote clusters dial for etcd (default: the --etcd-listen host)")
	f.StringVar(&cfg.HTTPListen, "http-listen", apiserver.DefaultHTTPListen, "host:port for /healthz, /readyz, /metrics, the registry and admin APIs")
	f.StringVar(&cfg.Source, "source", apiserver.SourceRegistry, "source of truth: registry (standalone) or kubernetes")
	f.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "kubeconfig for --source kubernetes (default: in-cluster)")

	cmd.AddCommand(newIssueRemoteCmd())
	return cmd
}

// mergeFlags returns file with every flag the user set on the command line
// taken from flags.
func mergeFlags(file, flags apiserver.Config, set *pflag.FlagSet) apiserver.Config {
	out := file
	apply := map[string]func(){
		"cluster-name":           func() { out.ClusterName = flags.ClusterName },
		"cluster-id":             func() { out.ClusterID = flags.ClusterID },
		"pod-cidrs":              func() { out.PodCIDRs = flags.PodCIDRs },
		"region":                 func() { out.Region = flags.Region },
		"zone":                   func() { out.Zone = flags.Zone },
		"max-connected-clusters": func() { out.MaxConnectedClusters = flags.MaxConnectedClusters },
		"encryption":             func() { out.Encryption = flags.Encryption },
		"state-dir":              func() { out.StateDir = flags.StateDir },
		"etcd-endpoints":         func() { out.EtcdEndpoints = flags.EtcdEndpoints },
		"etcd-ca-file":           func() { out.EtcdCAFile = flags.EtcdCAFile },
		"etcd-cert-file":         func() { out.EtcdCertFile = flags.EtcdCertFile },
		"etcd-key-file":          func() { out.EtcdKeyFile = flags.EtcdKeyFile },
		"etcd-listen":            func() { out.EtcdListen = flags.EtcdListen },
		"advertise-address":      func() { out.AdvertiseAddress = flags.AdvertiseAddress },
		"http-listen":            func() { out.HTTPListen = flags.HTTPListen },
		"source":                 func() { out.Source = flags.Source },
		"kubeconfig":             func() { out.Kubeconfig = flags.Kubeconfig },
	}
	set.Visit(func(f *pflag.Flag) {
		if fn, ok := apply[f.Name]; ok {
			fn()
		}
	})
	return out
}

func newIssueRemoteCmd() *cobra.Command {
	var (
		name, server, stateDir, outDir string
	)
	cmd := &cobra.Command{
		Use:   "issue-remote --name REMOTE",
		Short: "Mint read-only credentials for a remote cluster",
		Long: `Ask a running mesh API server for a client certificate for remote cluster
REMOTE, which reads through the etcd front door. The new certificate is the
only valid one of REMOTE: any certificate issued to REMOTE before stops
working and its connections are closed. Prints the credentials as JSON, or
writes ca.crt, REMOTE.crt and REMOTE.key into --out.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if name == "" {
				return fmt.Errorf("--name is required: the remote cluster the credentials are for")
			}
			token, err := client.ReadToken(filepath.Join(stateDir, v1.StateAdminTokenFile))
			if err != nil {
				return fmt.Errorf("read the admin token (is --state-dir the API server's?): %w", err)
			}
			api, err := client.New(client.Config{URL: server, Token: token})
			if err != nil {
				return fmt.Errorf("--server: %w", err)
			}
			creds, err := api.IssueRemote(cmd.Context(), name)
			if err != nil {
				return fmt.Errorf("API server at %s: %w", server, err)
			}
			if outDir == "" {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(creds)
			}
			if err := os.MkdirAll(outDir, 0o700); err != nil {
				return err
			}
			for file, data := range map[string]string{"ca.crt": creds.CAPEM, name + ".crt": creds.CertPEM, name + ".key": creds.KeyPEM} {
				if err := os.WriteFile(filepath.Join(outDir, file), []byte(data), 0o600); err != nil {
					return err
				}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote credentials for %s to read %s (%s) into %s\n", name, creds.Cluster, strings.Join(creds.Endpoints, ","), outDir)
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "the remote cluster the credentials are for")
	cmd.Flags().StringVar(&server, "server", "http://"+apiserver.DefaultHTTPListen, "the API server's HTTP address")
	cmd.Flags().StringVar(&stateDir, "state-dir", "", "the API server's state dir (for the admin token)")
	cmd.Flags().StringVar(&outDir, "out", "", "write the credentials as files into this directory instead of printing JSON")
	return cmd
}
