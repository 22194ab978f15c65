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
	f.StringVar(&cfg.Encryption, "encryption", "", "encryption type the cluster starts with until `trellis encryption` sets one: '', wireguard or ipsec")
	f.StringVar(&cfg.StateDir, "state-dir", "", "directory for the CA, certificates, admin token and etcd data")
	f.StringVar(&cfg.SecretsDir, "secrets-dir", "", "directory with the CAs and admin token to adopt into --state-dir (e.g. a mounted Kubernetes Secret): ca.crt, ca.key, client-ca.crt, client-ca.key, admin.token, each optional; copied in when the state dir has none, refused when it has others")
	f.StringSliceVar(&cfg.EtcdEndpoints, "etcd-endpoints", nil, "external etcd client URLs (default: run an embedded etcd)")
	f.StringVar(&cfg.EtcdCAFile, "etcd-ca-file", "", "CA of the external etcd")
	f.StringVar(&cfg.EtcdCertFile, "etcd-cert-file", "", "client certificate for the external etcd")
	f.StringVar(&cfg.EtcdKeyFile, "etcd-key-file", "", "client key for the external etcd")
	f.StringVar(&cfg.EtcdListen, "etcd-listen", apiserver.DefaultEtcdListen, "host:port remote clusters dial: the etcd front door (the embedded etcd itself listens on loopback, see <state-dir>/etcd.addr)")
	f.StringVar(&cfg.AdvertiseAddress, "advertise-address", "", "address remote clusters dial for etcd (default: the --etcd-listen host)")
	f.Int64Var(&cfg.EtcdQuotaBackendBytes, "etcd-quota-backend-bytes", 0, "the embedded etcd's database quota in bytes, 64 MiB to 8 GiB (0: 1 GiB); past it etcd refuses writes (NOSPACE)")
	f.StringVar(&cfg.HTTPListen, "http-listen", apiserver.DefaultHTTPListen, "host:port for /healthz, /readyz, /metrics, the registry and admin APIs (HTTPS with the server certificate)")
	f.BoolVar(&cfg.HTTPPlaintext, "http-plaintext", false, "serve the HTTP API without TLS: only on a loopback --http-listen")
	f.StringSliceVar(&cfg.ServiceCIDRs, "service-cidrs", []string{apiserver.DefaultServiceCIDR}, "the ranges service VIPs lie in; the registry refuses others")
	f.StringVar(&cfg.Source, "source", apiserver.SourceRegistry, "source of truth: registry (standalone) or kubernetes")
	f.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "kubeconfig for --source kubernetes (default: in-cluster)")
	f.StringVar(&cfg.KubernetesNamespace, "kubernetes-namespace", "", "with --source kubernetes, the namespace where the server keeps its cluster info and answers 'trellis connect --context' (default: its pod's namespace, else trellis)")

	cmd.AddCommand(newIssueRemoteCmd(), newIssueNodeCredentialCmd())
	return cmd
}

// mergeFlags returns file with every flag the user set on the command line
// taken from flags.
func mergeFlags(file, flags apiserver.Config, set *pflag.FlagSet) apiserver.Config {
	out := file
	apply := map[string]func(){
		"cluster-name":             func() { out.ClusterName = flags.ClusterName },
		"cluster-id":               func() { out.ClusterID = flags.ClusterID },
		"pod-cidrs":                func() { out.PodCIDRs = flags.PodCIDRs },
		"region":                   func() { out.Region = flags.Region },
		"zone":                     func() { out.Zone = flags.Zone },
		"max-connected-clusters":   func() { out.MaxConnectedClusters = flags.MaxConnectedClusters },
		"encryption":               func() { out.Encryption = flags.Encryption },
		"state-dir":                func() { out.StateDir = flags.StateDir },
		"secrets-dir":              func() { out.SecretsDir = flags.SecretsDir },
		"etcd-endpoints":           func() { out.EtcdEndpoints = flags.EtcdEndpoints },
		"etcd-ca-file":             func() { out.EtcdCAFile = flags.EtcdCAFile },
		"etcd-cert-file":           func() { out.EtcdCertFile = flags.EtcdCertFile },
		"etcd-key-file":            func() { out.EtcdKeyFile = flags.EtcdKeyFile },
		"etcd-listen":              func() { out.EtcdListen = flags.EtcdListen },
		"advertise-address":        func() { out.AdvertiseAddress = flags.AdvertiseAddress },
		"etcd-quota-backend-bytes": func() { out.EtcdQuotaBackendBytes = flags.EtcdQuotaBackendBytes },
		"http-listen":              func() { out.HTTPListen = flags.HTTPListen },
		"http-plaintext":           func() { out.HTTPPlaintext = flags.HTTPPlaintext },
		"service-cidrs":            func() { out.ServiceCIDRs = flags.ServiceCIDRs },
		"source":                   func() { out.Source = flags.Source },
		"kubeconfig":               func() { out.Kubeconfig = flags.Kubeconfig },
		"kubernetes-namespace":     func() { out.KubernetesNamespace = flags.KubernetesNamespace },
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
			api, err := adminAPI(stateDir, server)
			if err != nil {
				return err
			}
			creds, err := api.IssueRemote(cmd.Context(), name)
			if err != nil {
				return fmt.Errorf("API server at %s: %w", api.URL(), err)
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
	addAdminFlags(cmd, &stateDir, &server)
	cmd.Flags().StringVar(&outDir, "out", "", "write the credentials as files into this directory instead of printing JSON")
	return cmd
}

func newIssueNodeCredentialCmd() *cobra.Command {
	var node, server, stateDir, out string
	cmd := &cobra.Command{
		Use:   "issue-node-credential --node NODE",
		Short: "Mint a node's registry credential, for its agent",
		Long: `Ask a running mesh API server for the registry credential of node NODE: a
bearer token that may register that node and the endpoints on it, and read,
nothing more. Give it to the node's agent (--registry-token-file) instead of
the admin token. Issuing again replaces it: the earlier token stops working.
Prints the token, or writes it (mode 0600) to --out.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if node == "" {
				return fmt.Errorf("--node is required: the node the credential is for")
			}
			api, err := adminAPI(stateDir, server)
			if err != nil {
				return err
			}
			cred, err := api.IssueNodeCredential(cmd.Context(), node)
			if err != nil {
				return fmt.Errorf("API server at %s: %w", api.URL(), err)
			}
			if out == "" {
				_, err := fmt.Fprintln(cmd.OutOrStdout(), cred.Token)
				return err
			}
			if err := os.WriteFile(out, []byte(cred.Token+"\n"), 0o600); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote node %s's registry credential to %s\n", node, out)
			return nil
		},
	}
	cmd.Flags().StringVar(&node, "node", "", "the node the credential is for")
	addAdminFlags(cmd, &stateDir, &server)
	cmd.Flags().StringVar(&out, "out", "", "write the token to this file (mode 0600) instead of printing it")
	return cmd
}

// addAdminFlags adds the flags that find an API server from its state dir.
func addAdminFlags(cmd *cobra.Command, stateDir, server *string) {
	cmd.Flags().StringVar(stateDir, "state-dir", "", "the API server's state dir (its admin token, server CA and address)")
	cmd.Flags().StringVar(server, "server", "", "the API server's HTTPS address (default: the one in <state-dir>/http.addr)")
}

// adminAPI is an admin client of the API server whose state dir is
// stateDir, at server when given.
func adminAPI(stateDir, server string) (*client.Client, error) {
	if stateDir == "" {
		return nil, fmt.Errorf("--state-dir is required: the API server's state dir, for its admin token and server CA")
	}
	if server == "" {
		return client.FromStateDir(stateDir, nil)
	}
	token, err := client.ReadToken(filepath.Join(stateDir, v1.StateAdminTokenFile))
	if err != nil {
		return nil, fmt.Errorf("read the admin token (is --state-dir the API server's?): %w", err)
	}
	ca, err := os.ReadFile(filepath.Join(stateDir, v1.StateServerCAFile))
	if err != nil {
		return nil, fmt.Errorf("read the server CA: %w", err)
	}
	api, err := client.New(client.Config{URL: server, CAPEM: ca, Token: token})
	if err != nil {
		return nil, fmt.Errorf("--server: %w", err)
	}
	return api, nil
}
