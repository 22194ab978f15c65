package agent_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/agent"
	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/internal/testutil"
)

type cluster struct {
	name, stateDir string
	api            *testutil.APIServer
}

func startAPIServer(t *testing.T, bin, name string, id int) *cluster {
	t.Helper()
	c := &cluster{name: name, stateDir: t.TempDir()}
	testutil.Start(t, bin, "apiserver", "--cluster-name", name, "--cluster-id", fmt.Sprint(id),
		"--pod-cidrs", fmt.Sprintf("10.%d.0.0/16", id), "--region", name, "--state-dir", c.stateDir,
		"--etcd-listen", fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)), "--http-listen", fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t)))
	c.api = testutil.WaitAPIServer(t, c.stateDir, 60*time.Second)
	return c
}

// call sends a request with the admin token and fails t unless it
// succeeds.
func (c *cluster) call(t *testing.T, method, path, body string) string {
	t.Helper()
	return c.api.Must(t, method, path, body)
}

// nodeCredential mints node's registry credential into a file, for its
// agent.
func (c *cluster) nodeCredential(t *testing.T, node string) string {
	t.Helper()
	var cred v1.NodeCredential
	if err := json.Unmarshal([]byte(c.call(t, "POST", "/admin/v1/nodes/"+node+"/credential", "")), &cred); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "registry.token")
	if err := os.WriteFile(path, []byte(cred.Token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func (c *cluster) fileFor(t *testing.T, reader string) clustermesh.ClusterFile {
	var creds v1.RemoteCredentials
	if err := json.Unmarshal([]byte(c.call(t, "POST", "/admin/v1/remotes/"+reader, "")), &creds); err != nil {
		t.Fatal(err)
	}
	var info v1.ClusterInfo
	if err := json.Unmarshal([]byte(c.call(t, "GET", "/admin/v1/info", "")), &info); err != nil {
		t.Fatal(err)
	}
	return clustermesh.ClusterFile{Name: c.name, ID: info.ID, PodCIDRs: info.PodCIDRs,
		Endpoints: creds.Endpoints, CA: creds.CAPEM, Cert: creds.CertPEM, Key: creds.KeyPEM}
}

const echoService = `{"ports":[{"name":"http","protocol":"TCP","port":80,"targetPort":8080}],"frontendIPs":["10.96.0.10"],
	"selector":{"app":"echo"},"annotations":{"trellis.io/global":"true"}}`

// An agent process as a user runs it: it registers its node and pods with
// the local registry, watches both clusters, and `trellis status` shows
// the clusters and the global service's backends by cluster.
func TestAgentProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("runs trellis processes; skipped in -short")
	}
	bin := testutil.BuildTrellis(t)
	eu := startAPIServer(t, bin, "eu", 1)
	us := startAPIServer(t, bin, "us", 2)
	eu.call(t, "PUT", "/v1/services/default/echo", echoService)
	us.call(t, "PUT", "/v1/services/default/echo", echoService)
	us.call(t, "PUT", "/v1/nodes/node-1", `{"ips":["192.168.2.1"],"podCIDRs":["10.2.1.0/24"]}`)
	us.call(t, "PUT", "/v1/endpoints/10.2.1.10", `{"namespace":"default","pod":"echo-us","node":"node-1","labels":{"app":"echo"}}`)

	configDir, stateDir := t.TempDir(), t.TempDir()
	for _, c := range []*cluster{eu, us} {
		if err := clustermesh.WriteClusterFile(configDir, c.fileFor(t, "eu")); err != nil {
			t.Fatal(err)
		}
	}
	socket := filepath.Join(stateDir, "agent.sock")
	// No datapath: without --cgroup-root none the agent would attach its
	// socket LB to this machine's root cgroup.
	testutil.Start(t, bin, "agent", "--node-name", "node-1", "--cluster-name", "eu", "--config-dir", configDir,
		"--state-dir", stateDir, "--status-socket", socket,
		// The node's own credential, never the admin token.
		"--registry-url", eu.api.URL, "--registry-ca-file", filepath.Join(eu.stateDir, v1.StateServerCAFile),
		"--registry-token-file", eu.nodeCredential(t, "node-1"), "--node-ip", "192.168.1.1", "--pod-cidrs", "10.1.1.0/24",
		"--cgroup-root", "none", "--tunnel", "none",
		// The pods here are records with no one at their IPs, and probes
		// from this namespace would leave the machine: no local health.
		"--health-interval", "0")

	// The node's CNI step records a pod; the agent registers it.
	podsDir := filepath.Join(stateDir, "pods")
	os.MkdirAll(podsDir, 0o700)
	pod, _ := json.Marshal(agent.PodFile{Namespace: "default", Name: "echo-eu", IP: mustAddr("10.1.1.10"), Ready: true, Labels: map[string]string{"app": "echo"}})
	if err := os.WriteFile(filepath.Join(podsDir, "default_echo-eu.json"), pod, 0o600); err != nil {
		t.Fatal(err)
	}

	status := func() agent.Status {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		st, err := agent.FetchStatus(ctx, socket)
		if err != nil {
			return agent.Status{}
		}
		return st
	}
	active := func(st agent.Status) map[string][]string {
		for _, s := range st.Services {
			if s.Service == "default/echo" {
				return s.Active
			}
		}
		return nil
	}
	testutil.Eventually(t, 60*time.Second, "both clusters ready with both backends", func() bool {
		st := status()
		a := active(st)
		return len(st.Clusters) == 2 && st.Clusters[0].Ready && st.Clusters[1].Ready &&
			len(a["eu"]) == 1 && len(a["us"]) == 1
	})
	if nodes := eu.call(t, "GET", "/v1/nodes", ""); !strings.Contains(nodes, `"node-1"`) {
		t.Errorf("node not registered: %s", nodes)
	}

	// The CLI, table and JSON.
	p := testutil.Start(t, bin, "status", "--socket", socket)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		t.Fatalf("trellis status: %v\n%s", err, p.Output())
	}
	for _, want := range []string{"eu (local)", "us", "default/echo", "eu: 10.1.1.10", "us: 10.2.1.10"} {
		if !strings.Contains(p.Output(), want) {
			t.Errorf("status table lacks %q:\n%s", want, p.Output())
		}
	}
	p = testutil.Start(t, bin, "status", "--socket", socket, "--output", "json")
	if err := p.Wait(ctx); err != nil {
		t.Fatalf("trellis status -o json: %v", err)
	}
	var st agent.Status
	if err := json.Unmarshal([]byte(p.Output()), &st); err != nil || st.Cluster != "eu" || len(st.Clusters) != 2 {
		t.Errorf("status json = %+v, %v", st, err)
	}
	if !st.DatapathDisabled {
		t.Error("status: datapath enabled, want disabled by --cgroup-root none --tunnel none")
	}

	// The pod goes away: the agent withdraws it and traffic goes to us.
	os.Remove(filepath.Join(podsDir, "default_echo-eu.json"))
	testutil.Eventually(t, 30*time.Second, "eu backend withdrawn", func() bool {
		a := active(status())
		return len(a["eu"]) == 0 && len(a["us"]) == 1
	})

	// A cluster that is not ready makes `trellis status` fail with the
	// cause in the table.
	bad := us.fileFor(t, "eu")
	bad.Name, bad.Endpoints = "ghost", []string{fmt.Sprintf("https://127.0.0.1:%d", testutil.FreePort(t))}
	bad.ID, bad.PodCIDRs = 9, []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}
	clustermesh.WriteClusterFile(configDir, bad)
	testutil.Eventually(t, 30*time.Second, "ghost error in status", func() bool {
		for _, c := range status().Clusters {
			if c.Name == "ghost" && strings.Contains(c.LastError, "cannot reach") {
				return true
			}
		}
		return false
	})
	p = testutil.Start(t, bin, "status", "--socket", socket)
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	if err := p.Wait(ctx2); err == nil || !strings.Contains(p.Output(), "ghost") {
		t.Errorf("status with an unreachable cluster: err %v, output %s", err, p.Output())
	}
}
