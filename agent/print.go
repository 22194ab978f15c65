package agent

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// PrintStatus renders an agent's status as `trellis status` shows it.
func PrintStatus(w io.Writer, st Status) {
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
	if k := st.Kubernetes; k != nil {
		var cidrs []string
		for _, p := range st.PodCIDRs {
			cidrs = append(cidrs, p.String())
		}
		fmt.Fprintf(w, "Kubernetes mode: node IP %s, pod CIDRs %s; %d pod IPs probed, %d trellis.io/healthy marks written",
			st.NodeIP, orDash(strings.Join(cidrs, ",")), k.Pods, k.Patches)
		if k.PatchErrors > 0 {
			fmt.Fprintf(w, ", %d refused (last: %s)", k.PatchErrors, k.LastPatchError)
		}
		fmt.Fprintln(w)
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
		// Rejected (failed validation, counted since start) and excluded
		// (decoded, but held out now) share the column: both are what
		// the cluster published and this node does not use.
		var rejected []string
		for reason, n := range c.Rejected {
			rejected = append(rejected, fmt.Sprintf("%s=%d", reason, n))
		}
		for reason, n := range c.Excluded {
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
	printEncryption(w, st.Encryption)
	printHealth(w, st.Health)
	printGossip(w, st.Gossip)
	if len(st.Services) == 0 {
		return
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tGLOBAL\tAFFINITY\tFAILOVER REGIONS\tFRONTENDS\tACTIVE BACKENDS BY CLUSTER")
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
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.Service, yesNo(s.Global), s.Affinity, orDash(strings.Join(s.FailoverRegions, ",")),
			orDash(strings.Join(s.Frontend, ",")), active)
	}
	tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// printEncryption shows the node's encryption and, per peer, whether its
// traffic is encrypted.
func printEncryption(w io.Writer, e *EncryptionStatus) {
	if e == nil {
		return
	}
	fmt.Fprintln(w)
	switch {
	case e.Type == "" && !e.Draining:
		fmt.Fprint(w, "Encryption: off")
	case e.Draining:
		fmt.Fprint(w, "Encryption: off, draining (the device goes once peers stop sending)")
	default:
		fmt.Fprintf(w, "Encryption: %s", e.Type)
		if e.Strict {
			fmt.Fprint(w, ", strict")
		}
		if e.PublicKey != "" {
			fmt.Fprintf(w, ", public key %s", e.PublicKey)
		}
	}
	if e.Strictly != nil {
		fmt.Fprintf(w, "; strict drops in %d, out %d", e.Strictly.Ingress, e.Strictly.Egress)
	}
	fmt.Fprintln(w)
	if e.Error != "" {
		fmt.Fprintf(w, "Encryption error: %s\n", e.Error)
	}
	if len(e.Peers) == 0 {
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tPATH\tKEY\tLAST HANDSHAKE\tRX\tTX")
	for _, p := range e.Peers {
		hs := "-"
		if !p.LastHandshake.IsZero() {
			hs = time.Since(p.LastHandshake).Round(time.Second).String() + " ago"
		}
		key := "-"
		if p.PublicKey != "" {
			key = p.PublicKey[:min(8, len(p.PublicKey))] + "…"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\n", p.Node, p.Path, key, hs, p.RxBytes, p.TxBytes)
	}
	tw.Flush()
}

// printHealth shows local health: the node's probed endpoints, the down
// ones first.
func printHealth(w io.Writer, h *HealthStatus) {
	if h == nil {
		return
	}
	fmt.Fprintln(w)
	down := 0
	for _, e := range h.Endpoints {
		if e.Down {
			down++
		}
	}
	fmt.Fprintf(w, "Local health: %d endpoints probed every %s (timeout %s; down after %d failures, up after %d successes), %d down\n",
		len(h.Endpoints), h.Interval, h.Timeout, h.FailureThreshold, h.SuccessThreshold, down)
	if len(h.Endpoints) == 0 {
		return
	}
	eps := slices.Clone(h.Endpoints)
	slices.SortStableFunc(eps, func(a, b EndpointHealth) int {
		if a.Down != b.Down {
			if a.Down {
				return -1
			}
			return 1
		}
		return 0
	})
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ENDPOINT\tIP\tPORTS\tSTATE\tSINCE\tLAST ERROR")
	for _, e := range eps {
		var ports []string
		for _, p := range e.Ports {
			ports = append(ports, fmt.Sprint(p))
		}
		if len(e.Checks) > 0 {
			// "tcp 8080" shows as 8080, "http 8080 /healthz" as
			// 8080 http:/healthz.
			ports = ports[:0]
			for _, c := range e.Checks {
				f := strings.Fields(c)
				switch {
				case len(f) == 3 && f[0] == "http":
					ports = append(ports, f[1]+" http:"+f[2])
				case len(f) >= 2:
					ports = append(ports, f[1])
				}
			}
		}
		state := "up"
		switch {
		case e.Down:
			state = "down"
		case len(e.Ports) == 0:
			state = "not probed (no service port)"
		case e.Failures > 0:
			state = fmt.Sprintf("up, %d failed", e.Failures)
		}
		since := "-"
		if !e.Since.IsZero() {
			since = fmt.Sprintf("%s (%s ago)", e.Since.Format(time.TimeOnly), time.Since(e.Since).Round(100*time.Millisecond))
		}
		lastErr := "-"
		if e.LastError != "" && (e.Down || e.Failures > 0) {
			lastErr = e.LastError
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", e.Pod, e.IP, orDash(strings.Join(ports, ",")), state, since, lastErr)
	}
	tw.Flush()
}

// printGossip shows the gossip: member counts, the dead ones, and whether
// the dead set is trusted.
func printGossip(w io.Writer, g *GossipStatus) {
	if g == nil {
		return
	}
	fmt.Fprintln(w)
	if g.Off != "" {
		fmt.Fprintf(w, "Gossip: off: %s\n", g.Off)
		return
	}
	trust := "trusted"
	if !g.Trusted {
		trust = "ignored: " + g.Distrust
	}
	fmt.Fprintf(w, "Gossip: %s on %s, members %d alive, %d suspect, %d dead, %d left (health score %d); dead set %s\n",
		g.Member, g.Address, g.Alive, g.Suspect, g.Dead, g.Left, g.HealthScore, trust)
	for _, d := range g.DeadMembers {
		fmt.Fprintf(w, "  dead: %s since %s (%s ago)\n", d.Member, d.Since.Format(time.TimeOnly), time.Since(d.Since).Round(100*time.Millisecond))
	}
	if len(g.Corroborated) > 0 {
		fmt.Fprintf(w, "  dead all the same (their cluster's control plane or their pods do not answer either): %s\n", strings.Join(g.Corroborated, ", "))
	}
	for _, p := range g.Probes {
		state := "answers"
		switch {
		case p.Down:
			state = "down"
		case !p.Reachable || p.Err != "":
			state = "no answer (no longer counts)"
		case !p.Heartbeat:
			state = "answers, no heartbeat"
		}
		if p.Err != "" {
			state += ": " + p.Err
		}
		what := "control plane of " + p.Target
		if strings.Contains(p.Target, "/") {
			what = "pods of " + p.Target
		}
		fmt.Fprintf(w, "  %s: %s (probed at %s in %s)\n", what, state, p.At.Format(time.TimeOnly), p.Took.Round(time.Millisecond))
	}
	if len(g.Excluding) > 0 {
		fmt.Fprintf(w, "  backends left out on: %s\n", strings.Join(g.Excluding, ", "))
	}
	if len(g.Kept) > 0 {
		fmt.Fprintf(w, "  kept (nothing else left): %s\n", strings.Join(g.Kept, ", "))
	}
}
