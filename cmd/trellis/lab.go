package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/lab"
)

func newLabCmd(g *globalOptions) *cobra.Command {
	var name string
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "Run Trellis clusters on this machine",
		Long: `Run a multi-cluster Trellis mesh on this machine: every node is a network
namespace with its own agent and cgroup, every pod a namespace with a veth
into its node, every cluster's mesh API server a process in its own
namespace; all of them hang off one bridge with no uplink. Needs root.

  trellis lab up                       build the default lab (clusters eu and us)
  trellis lab verify                   pod→pod and pod→service connectivity matrix
  trellis lab curl eu/client echo      which cluster answers the global service
  trellis lab annotate eu echo trellis.io/affinity=local
  trellis lab pod stop eu/echo-n1      take a backend out (pod start brings it back)
  trellis lab pod crash eu/echo-n1     kill -9 its echo server, telling no one
  trellis lab node down us/n2          take a node out (node up brings it back)
  trellis lab node crash eu/n1         kill -9 its agent and pods, link down, telling no one
  trellis lab partition gossip eu us   drop the gossip (port 51872) between two clusters' nodes
  trellis lab heal gossip eu us        let it through again
  trellis lab restart agent eu/n1      restart a node's agent; its pods keep running
  trellis lab restart apiserver us     restart a cluster's mesh API server
  trellis lab disconnect eu us         separate two clusters (connect joins them again)
  trellis lab add-cluster ap --id 3    a third cluster joins the running mesh
  trellis lab encryption enable        WireGuard between every node (--cluster eu: one cluster;
                                       --type ipsec; --strict); disable turns it off again
  trellis lab encryption rotate --cluster eu   new keys (--node eu/n1: one node)
  trellis lab encryption status        per node: type, key, peers by path, strict drops
  trellis lab encryption capture --marker SECRET   what the underlay bridge carries
  trellis lab down                     remove everything the lab made`,
	}
	cmd.PersistentFlags().StringVar(&name, "name", lab.DefaultName, "the lab's name (1-12 lowercase letters and digits)")
	opts := func(cmd *cobra.Command, out io.Writer) (lab.Options, error) {
		log, err := g.logger()
		if err != nil {
			return lab.Options{}, err
		}
		return lab.Options{Name: name, Out: out, Log: log}, nil
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
	cmd.AddCommand(newLabUpCmd(opts), newLabDownCmd(opts), newLabStatusCmd(opts), newLabExecCmd(opts),
		newLabCurlCmd(opts), newLabAnnotateCmd(opts), newLabPodCmd(opts), newLabNodeCmd(opts), newLabClusterCmd(opts),
		newLabPartitionCmd(opts, true), newLabPartitionCmd(opts, false), newLabVerifyCmd(opts), newLabRestartCmd(opts), newLabConnectCmd(opts), newLabDisconnectCmd(opts),
		newLabAddClusterCmd(opts), newLabEncryptionCmd(opts), newLabTopologyCmd(), newLabEchoServerCmd(), newLabHTTPGetCmd(),
		newLabEtcdCmd(g))
	return cmd
}

type labOpts func(cmd *cobra.Command, out io.Writer) (lab.Options, error)

// run1 is the RunE of a verb that takes one argument and only acts.
func (opts labOpts) run1(verb func(context.Context, lab.Options, string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		o, err := opts(cmd, cmd.OutOrStdout())
		if err != nil {
			return err
		}
		return verb(cmd.Context(), o, args[0])
	}
}

func newLabUpCmd(opts labOpts) *cobra.Command {
	var (
		file, output string
		timeout      time.Duration
		keep         bool
		kube         bool
		kubeBin      string
	)
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Build a lab and wait until every agent sees every cluster ready",
		Long: `Build a lab: the bridge, each cluster's mesh API server (all sharing one CA),
the nodes with their agents, the pods with their echo servers, the services;
join the clusters with 'trellis connect --mesh'; and wait until every agent
reports every cluster ready. Without -f it builds clusters eu (ID 1) and us
(ID 2), two nodes each, one echo pod per node, one client pod per cluster and
the global service default/echo.

With --kubernetes every cluster also gets a real kube-apiserver (on an etcd of
its own, both in the cluster's API server namespace); the lab writes the
Nodes, Pods, Services and EndpointSlices a cluster's kubelets and controllers
would, the mesh API servers run the Kubernetes source, the agents run
--kubernetes, and annotate, pod stop/start and node down/up act through the
Kubernetes API. It needs a kube-apiserver binary (make kube-apiserver).

A lab that fails to come up is removed again, unless --keep.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			progress := cmd.OutOrStdout()
			if output == "json" {
				progress = cmd.ErrOrStderr()
			}
			o, err := opts(cmd, progress)
			if err != nil {
				return err
			}
			up := lab.UpOptions{Options: o, ReadyTimeout: timeout, Keep: keep, Kubernetes: kube, KubeAPIServer: kubeBin}
			if file != "" {
				t, err := lab.LoadTopology(file)
				if err != nil {
					return err
				}
				up.Topology = &t
			}
			rep, err := lab.Up(cmd.Context(), up)
			if err != nil {
				return err
			}
			// The table follows the progress lines after a blank one.
			return render(cmd.OutOrStdout(), output, rep, func(w io.Writer) {
				fmt.Fprintln(w)
				lab.PrintReport(w, rep)
			})
		},
	}
	cmd.Flags().StringVarP(&file, "file", "f", "", "topology file (YAML); default: the built-in eu+us topology")
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Minute, "how long to wait for API servers and agents to be ready")
	cmd.Flags().BoolVar(&keep, "keep", false, "keep a lab that failed to come up, for inspection")
	cmd.Flags().BoolVar(&kube, "kubernetes", false, "Kubernetes mode: a kube-apiserver per cluster, the mesh API servers' Kubernetes source, agents with --kubernetes")
	cmd.Flags().StringVar(&kubeBin, "kube-apiserver", "", "kube-apiserver binary for --kubernetes (default: kube-apiserver beside this binary, else on $PATH)")
	addOutputFlag(cmd, &output)
	return cmd
}

func newLabDownCmd(opts labOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "down",
		Short: "Remove every namespace, link, cgroup, pin and process of a lab",
		Long: `Remove the lab: its processes (by recorded PID, and any other process inside
its namespaces or cgroups), its bpffs pins, namespaces (with their links),
cgroups and state directory. It finds leftovers by name too, so it works after
a crash, and does nothing when there is nothing to remove.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o, err := opts(cmd, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			return lab.Down(cmd.Context(), o)
		},
	}
}

func newLabStatusCmd(opts labOpts) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the lab's clusters, nodes, pods and services, and their health",
		Long:  `Show the lab and check it: API servers ready, agents running and seeing every cluster ready, echo servers running. Exits 1 when something is unhealthy.`,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			o, err := opts(cmd, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			rep, err := lab.Status(cmd.Context(), o)
			if err != nil {
				return err
			}
			err = render(cmd.OutOrStdout(), output, rep, func(w io.Writer) { lab.PrintReport(w, rep) })
			if err == nil && !rep.Healthy {
				err = fmt.Errorf("lab %s is not healthy: %d problems", rep.Name, len(rep.Problems))
			}
			return err
		},
	}
	addOutputFlag(cmd, &output)
	return cmd
}

func newLabExecCmd(opts labOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "exec CLUSTER/POD -- COMMAND [ARG…]",
		Short: "Run a command inside a pod (its network namespace and cgroup)",
		Long: `Run a command inside a pod: in its network namespace and in its cgroup, so
that the node's eBPF socket load balancer translates its connections to
service VIPs. Exits with the command's exit code.`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			o, err := opts(cmd, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			code, err := lab.Exec(cmd.Context(), o, args[0], args[1:], lab.ExecOptions{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr})
			if err != nil {
				return err
			}
			if code != 0 {
				os.Exit(code)
			}
			return nil
		},
	}
}

func newLabCurlCmd(opts labOpts) *cobra.Command {
	var (
		co     lab.CurlOptions
		output string
	)
	cmd := &cobra.Command{
		Use:   "curl CLUSTER/POD SERVICE",
		Short: "Send requests from a pod to a service and show who answered",
		Long: `Send N requests from inside a pod to SERVICE (namespace/name, or name in
namespace default, at the VIP of the pod's cluster; or a literal IP:PORT),
each on a fresh socket in the pod's cgroup, and show which cluster, node and
pod answered each one, with a count per cluster. Exits 1 if any failed.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			o, err := opts(cmd, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			res, err := lab.Curl(cmd.Context(), o, args[0], args[1], co)
			if err != nil {
				return err
			}
			err = render(cmd.OutOrStdout(), output, res, func(w io.Writer) { lab.PrintCurl(w, res) })
			if err == nil && res.Failed > 0 {
				err = fmt.Errorf("%d of %d requests failed", res.Failed, len(res.Probes))
			}
			return err
		},
	}
	cmd.Flags().IntVarP(&co.Count, "count", "n", 10, "number of requests")
	cmd.Flags().BoolVar(&co.UDP, "udp", false, "send UDP datagrams to the service's UDP port instead of HTTP GETs")
	cmd.Flags().DurationVar(&co.Timeout, "timeout", 2*time.Second, "timeout per request")
	addOutputFlag(cmd, &output)
	return cmd
}

func newLabAnnotateCmd(opts labOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "annotate CLUSTER SERVICE KEY=VALUE|KEY- …",
		Short: "Set (or remove) annotations on a service in a cluster's registry",
		Long: `Read SERVICE (namespace/name, or name in namespace default) from CLUSTER's
registry, set each KEY=VALUE (KEY- removes KEY) and write it back, e.g.
'trellis lab annotate eu echo trellis.io/affinity=local'.`,
		Args: cobra.MinimumNArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			o, err := opts(cmd, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			return lab.Annotate(cmd.Context(), o, args[0], args[1], args[2:])
		},
	}
}

func newLabPodCmd(opts labOpts) *cobra.Command {
	cmd := &cobra.Command{Use: "pod", Short: "Stop, crash or start a pod's echo server (and its readiness)"}
	cmd.AddCommand(&cobra.Command{
		Use:   "stop CLUSTER/POD",
		Short: "Kill the pod's echo server and mark the pod not ready",
		Args:  cobra.ExactArgs(1),
		RunE:  opts.run1(lab.PodStop),
	}, &cobra.Command{
		Use:   "crash CLUSTER/POD",
		Short: "Kill -9 the pod's echo server and tell no one (the pod stays registered ready; only its node's probes notice)",
		Args:  cobra.ExactArgs(1),
		RunE:  opts.run1(lab.PodCrash),
	}, &cobra.Command{
		Use:   "start CLUSTER/POD",
		Short: "Restart the pod's stopped or crashed echo server and mark the pod ready",
		Args:  cobra.ExactArgs(1),
		RunE:  opts.run1(lab.PodStart),
	})
	return cmd
}

func newLabNodeCmd(opts labOpts) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Take a node down or bring it back"}
	cmd.AddCommand(&cobra.Command{
		Use:   "down CLUSTER/NODE",
		Short: "Kill the node's agent and pods, set its veth down, mark its pods not ready",
		Args:  cobra.ExactArgs(1),
		RunE:  opts.run1(lab.NodeDown),
	}, &cobra.Command{
		Use:   "up CLUSTER/NODE",
		Short: "Bring a node back: veth up, pods and agent restarted; waits for the agent",
		Args:  cobra.ExactArgs(1),
		RunE:  opts.run1(lab.NodeUp),
	}, &cobra.Command{
		Use:   "crash CLUSTER/NODE…",
		Short: "Kill -9 the nodes' agents and pods (all at once) and set their underlay links down, telling no one (only the gossip notices); node up brings each back",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			o, err := opts(cmd, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			return lab.NodesCrash(cmd.Context(), o, args...)
		},
	})
	return cmd
}

func newLabClusterCmd(opts labOpts) *cobra.Command {
	cmd := &cobra.Command{Use: "cluster", Short: "Crash a whole cluster or bring it back"}
	cmd.AddCommand(&cobra.Command{
		Use:   "crash CLUSTER",
		Short: "Kill -9 the cluster's API server and every node's agent and pods, set their underlay links down, telling no one; cluster up brings it back",
		Args:  cobra.ExactArgs(1),
		RunE:  opts.run1(lab.ClusterCrash),
	}, &cobra.Command{
		Use:   "up CLUSTER",
		Short: "Bring a crashed cluster back: API server and nodes restarted; waits for them and every agent",
		Args:  cobra.ExactArgs(1),
		RunE:  opts.run1(lab.ClusterUp),
	})
	return cmd
}

// newLabPartitionCmd is `lab partition gossip A B` (or heal).
func newLabPartitionCmd(opts labOpts, partition bool) *cobra.Command {
	use, short, verb := "partition", "Cut something between two clusters", lab.PartitionGossip
	gossipShort := "Drop the gossip (UDP and TCP 51872) between the two clusters' node IPs, leaving data traffic alone"
	if !partition {
		use, short, verb = "heal", "Undo a partition", lab.HealGossip
		gossipShort = "Let the gossip between the two clusters' nodes through again"
	}
	cmd := &cobra.Command{Use: use, Short: short}
	cmd.AddCommand(&cobra.Command{
		Use:   "gossip CLUSTER CLUSTER",
		Short: gossipShort,
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			o, err := opts(cmd, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			return verb(cmd.Context(), o, args[0], args[1])
		},
	})
	return cmd
}

func newLabRestartCmd(opts labOpts) *cobra.Command {
	cmd := &cobra.Command{Use: "restart", Short: "Restart a node's agent or a cluster's mesh API server"}
	cmd.AddCommand(&cobra.Command{
		Use:   "agent CLUSTER/NODE",
		Short: "Stop the node's agent (SIGTERM) and start it again; waits until it is ready",
		Long: `Stop only the node's agent (SIGTERM, then wait for it to exit) and start it
again with the same arguments, in the same namespace and cgroup; the new PID
goes into the lab's state. The node's pods keep running, and the eBPF socket
load balancer and tunnel the agent pinned keep working while it is away.
Returns once the new agent reports every cluster ready.`,
		Args: cobra.ExactArgs(1),
		RunE: opts.run1(lab.RestartAgent),
	}, &cobra.Command{
		Use:   "apiserver CLUSTER",
		Short: "Stop the cluster's mesh API server (SIGTERM) and start it again; waits for it and the agents",
		Long: `Stop the cluster's mesh API server (SIGTERM, then wait for it to exit) and
start it again with the same arguments and state dir, so it keeps its etcd
data, CA, credentials and registry. Returns once it is ready and every agent
reports every cluster ready and connected again.`,
		Args: cobra.ExactArgs(1),
		RunE: opts.run1(lab.RestartAPIServer),
	})
	return cmd
}

func newLabConnectCmd(opts labOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "connect CLUSTER_A CLUSTER_B",
		Short: "Join two clusters of the lab again ('trellis connect' on their API servers)",
		Long: `Run 'trellis connect' on the two clusters' API server state dirs, from inside
the first one's namespace, and wait until every agent of both clusters
reports both ready. 'lab up' joins every pair; this undoes 'lab disconnect'.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			o, err := opts(cmd, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			return lab.ConnectClusters(cmd.Context(), o, args[0], args[1])
		},
	}
}

func newLabDisconnectCmd(opts labOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "disconnect CLUSTER_A CLUSTER_B",
		Short: "Separate two clusters of the lab ('trellis disconnect' on their API servers)",
		Long: `Run 'trellis disconnect' on the two clusters' API server state dirs, from
inside the first one's namespace: each side's agents drop the other cluster
and drain its nodes, endpoints and services (tunnels to its nodes included),
and each side revokes the other's credentials. Waits until every agent of
both clusters has drained the other. From then on pods of the two clusters
cannot reach each other, and 'lab verify' checks that they cannot.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			o, err := opts(cmd, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			return lab.DisconnectClusters(cmd.Context(), o, args[0], args[1])
		},
	}
}

func newLabAddClusterCmd(opts labOpts) *cobra.Command {
	var ao lab.AddClusterOptions
	cmd := &cobra.Command{
		Use:   "add-cluster NAME --id N",
		Short: "Build one more cluster and join it to the running mesh",
		Long: `Build one more cluster into the running lab, shaped like the default ones:
its mesh API server, --nodes nodes (n1, n2, …) with an agent and an echo pod
each, a client pod on n1, and the global service default/echo at VIP
10.96.<id>.10; pod CIDR 10.<id>.0.0/16, the next free underlay addresses.
Every existing pod gets routes to its pod CIDR and VIP, and it is joined with
every existing cluster ('trellis connect', pairwise). Returns once every
agent, old and new, reports every cluster ready. 'lab down' removes it with
the rest; a failed add-cluster removes what it built.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			o, err := opts(cmd, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			ao.Options, ao.Cluster = o, args[0]
			return lab.AddCluster(cmd.Context(), ao)
		},
	}
	cmd.Flags().Uint32Var(&ao.ID, "id", 0, "cluster ID, 1-255 (not 96): pod CIDR 10.<id>.0.0/16, VIP 10.96.<id>.10")
	cmd.Flags().StringVar(&ao.Region, "region", "", "region (default: the cluster's name)")
	cmd.Flags().IntVar(&ao.Nodes, "nodes", 1, "number of nodes")
	cmd.Flags().DurationVar(&ao.ReadyTimeout, "timeout", 2*time.Minute, "how long to wait for the API server and the agents to be ready")
	cmd.MarkFlagRequired("id")
	return cmd
}

func newLabVerifyCmd(opts labOpts) *cobra.Command {
	var (
		vo     lab.VerifyOptions
		output string
	)
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Check pod→pod and pod→service connectivity; exit 1 on failure",
		Long: `Check the lab's connectivity from inside the pods: HTTP from every pod to
every echo pod's IP (every pair of nodes, within and across clusters), and
from every client pod to each service of its cluster at its VIP, TCP and UDP.
Prints a pass/fail matrix; exits 1 when a check fails.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			o, err := opts(cmd, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			rep, err := lab.Verify(cmd.Context(), o, vo)
			if err != nil {
				return err
			}
			err = render(cmd.OutOrStdout(), output, rep, func(w io.Writer) { lab.PrintVerify(w, rep) })
			if err == nil && rep.Failed > 0 {
				err = fmt.Errorf("verify: %d of %d checks failed", rep.Failed, rep.Passed+rep.Failed)
			}
			return err
		},
	}
	cmd.Flags().IntVarP(&vo.Count, "count", "n", 6, "requests per service check")
	cmd.Flags().DurationVar(&vo.Timeout, "timeout", 2*time.Second, "timeout per request")
	addOutputFlag(cmd, &output)
	return cmd
}

func newLabTopologyCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "topology",
		Short: "Print the built-in topology as YAML, a starting point for 'lab up -f'",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			t := lab.DefaultTopology()
			if err := t.Validate(); err != nil {
				return err
			}
			data, err := yaml.Marshal(t)
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(data)
			return err
		},
	}
}

// newLabEchoServerCmd is what echo pods run.
func newLabEchoServerCmd() *cobra.Command {
	var (
		id   lab.Identity
		port int
	)
	cmd := &cobra.Command{
		Use:    "echo-server",
		Short:  "Answer HTTP and UDP on --port with this pod's cluster, node and pod name",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return lab.EchoServer(cmd.Context(), id, port)
		},
	}
	cmd.Flags().StringVar(&id.Cluster, "cluster", "", "cluster name")
	cmd.Flags().StringVar(&id.Node, "node", "", "node name")
	cmd.Flags().StringVar(&id.Pod, "pod", "", "pod name")
	cmd.Flags().IntVar(&port, "port", lab.EchoPort, "TCP and UDP port")
	return cmd
}

// newLabHTTPGetCmd is what `lab curl` and `lab verify` run inside pods.
func newLabHTTPGetCmd() *cobra.Command {
	var (
		count   int
		timeout time.Duration
	)
	cmd := &cobra.Command{
		Use:    "http-get URL…",
		Short:  "Send requests (http:// GET or udp:// datagram) and print one JSON line per answer",
		Hidden: true,
		Args:   cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if failed := lab.HTTPGet(cmd.Context(), cmd.OutOrStdout(), args, count, timeout); failed > 0 {
				cmd.SilenceErrors = true
				return fmt.Errorf("%d requests failed", failed)
			}
			return nil
		},
	}
	cmd.Flags().IntVarP(&count, "count", "n", 1, "requests per URL")
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Second, "timeout per request")
	return cmd
}

// newLabEtcdCmd is what a Kubernetes-mode lab runs as each kube-apiserver's
// etcd, inside the cluster's API server namespace.
func newLabEtcdCmd(g *globalOptions) *cobra.Command {
	var dataDir, listen string
	cmd := &cobra.Command{
		Use:    "etcd",
		Short:  "Run an embedded etcd for a Kubernetes-mode lab cluster's kube-apiserver (plain HTTP on a loopback address)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			return lab.RunEtcd(cmd.Context(), dataDir, listen, log)
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", "", "etcd data directory")
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:2381", "loopback host:port to serve clients on")
	return cmd
}
