//go:build linux

package bpf

import (
	"bytes"
	"fmt"
	"os/exec"
	"testing"

	"github.com/cilium/ebpf"
)

// setupIPTablesDNAT writes the services as kube-proxy's iptables mode
// does: a KUBE-SERVICES chain hooked from nat OUTPUT with one match rule
// per service jumping to a per-service chain, which jumps to a
// per-endpoint chain that DNATs. Rule evaluation is linear in the number
// of services, which is what the comparison shows. Everything lives in the
// test's own network namespace.
func setupIPTablesDNAT(b *testing.B, env *lbEnv, services []Service) *ebpf.Program {
	if _, err := exec.LookPath("iptables-restore"); err != nil {
		b.Skip("iptables-restore not installed: make bench installs it (apt-get install -y iptables)")
	}
	var rules bytes.Buffer
	rules.WriteString("*nat\n:KUBE-SERVICES - [0:0]\n")
	for i := range services {
		fmt.Fprintf(&rules, ":KUBE-SVC-%d - [0:0]\n:KUBE-SEP-%d - [0:0]\n", i, i)
	}
	rules.WriteString("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n")
	for i, svc := range services {
		be := svc.Backends[0]
		fmt.Fprintf(&rules, "-A KUBE-SERVICES -d %s/32 -p tcp -m comment --comment \"default/svc-%d cluster IP\" -m tcp --dport %d -j KUBE-SVC-%d\n", svc.VIP, i, svc.Port, i)
		fmt.Fprintf(&rules, "-A KUBE-SVC-%d -m comment --comment \"default/svc-%d -> %s:%d\" -j KUBE-SEP-%d\n", i, i, be.IP, be.Port, i)
		fmt.Fprintf(&rules, "-A KUBE-SEP-%d -p tcp -m comment --comment \"default/svc-%d\" -m tcp -j DNAT --to-destination %s:%d\n", i, i, be.IP, be.Port)
	}
	rules.WriteString("COMMIT\n")
	cmd := exec.Command("ip", "netns", "exec", env.nsName, "iptables-restore", "--noflush")
	cmd.Stdin = &rules
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("iptables-restore in %s: %v\n%s", env.nsName, err, out)
	}
	// iptables DNATs after the routing decision for locally generated
	// packets, so the VIP range needs a route (kube-proxy nodes have a
	// default route; this namespace must not). The eBPF LB rewrites before
	// routing and needs none.
	if out, err := exec.Command("ip", "-n", env.nsName, "route", "add", "198.19.0.0/16", "dev", "trellis0").CombinedOutput(); err != nil {
		b.Fatalf("route to the VIP range in %s: %v\n%s", env.nsName, err, out)
	}
	// The rules and the route go with the namespace at cleanup. The client
	// still runs in env's cgroup, where no program is attached.
	return nil
}

// BenchmarkConnectVIPIPTables is BenchmarkConnectVIPSockLB's twin through
// iptables DNAT rules written the way kube-proxy writes them.
func BenchmarkConnectVIPIPTables(b *testing.B) {
	benchConnectServices(b, setupIPTablesDNAT, vipsTarget)
}
