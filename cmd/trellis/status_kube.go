package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/trellis-mesh/trellis/agent"
	"github.com/trellis-mesh/trellis/clustermesh/kubepeer"
)

// nodeStatus is one node's agent status as `trellis status --context`
// fetched it, or why it could not.
type nodeStatus struct {
	Node   string        `json:"node"`
	Status *agent.Status `json:"status,omitempty"`
	Error  string        `json:"error,omitempty"`
}

// fetchKubeStatuses asks every agent of a Kubernetes cluster (or the one
// on node) for its status, through the Kubernetes API's node proxy to the
// agent's --metrics-listen port: the operator needs no route to the nodes,
// only the right to proxy to them (nodes/proxy).
func fetchKubeStatuses(ctx context.Context, kubeconfig, kubeContext, node string, port int) ([]nodeStatus, error) {
	cfg, err := kubepeer.RESTConfig(kubeconfig, kubeContext)
	if err != nil {
		return nil, err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig context %q: %w", kubeContext, err)
	}
	var names []string
	if node != "" {
		names = []string{node}
	} else {
		nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, fmt.Errorf("list the nodes of context %q: %w", kubeContext, err)
		}
		for _, n := range nodes.Items {
			names = append(names, n.Name)
		}
		slices.Sort(names)
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("context %q has no nodes", kubeContext)
	}
	out := make([]nodeStatus, 0, len(names))
	for _, name := range names {
		ns := nodeStatus{Node: name}
		reqCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		body, err := cs.CoreV1().RESTClient().Get().
			Resource("nodes").Name(name + ":" + strconv.Itoa(port)).SubResource("proxy").Suffix("v1/status").
			DoRaw(reqCtx)
		cancel()
		if err != nil {
			ns.Error = fmt.Sprintf("agent on %s (port %d): %v", name, port, err)
		} else {
			var st agent.Status
			if err := json.Unmarshal(body, &st); err != nil {
				ns.Error = fmt.Sprintf("agent on %s: status: %v", name, err)
			} else {
				ns.Status = &st
			}
		}
		out = append(out, ns)
	}
	return out, nil
}

// printKubeStatuses prints each node's status under its name.
func printKubeStatuses(w io.Writer, statuses []nodeStatus) {
	for i, ns := range statuses {
		if i > 0 {
			fmt.Fprintln(w)
		}
		fmt.Fprintf(w, "NODE %s\n", ns.Node)
		if ns.Status == nil {
			fmt.Fprintf(w, "  unreachable: %s\n", ns.Error)
			continue
		}
		agent.PrintStatus(w, *ns.Status)
	}
}

// kubeStatusProblem is the first problem that makes status exit 1: an
// unreachable agent, or a cluster some agent does not have ready.
func kubeStatusProblem(statuses []nodeStatus) error {
	var errs []error
	for _, ns := range statuses {
		if ns.Status == nil {
			errs = append(errs, errors.New(ns.Error))
			continue
		}
		for _, c := range ns.Status.Clusters {
			if !c.Ready {
				errs = append(errs, fmt.Errorf("node %s: cluster %s is not ready", ns.Node, c.Name))
			}
		}
	}
	return errors.Join(errs...)
}
