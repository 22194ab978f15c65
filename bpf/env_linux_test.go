//go:build linux

package bpf

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/trellis-mesh/trellis/internal/privtest"
	"github.com/vishvananda/netns"
)

// Addresses of the privileged tests. They come from 198.18.0.0/15 (RFC
// 2544, benchmarking) and exist only on a veth inside each
// test's own network namespace.
var (
	testVIP     = netip.MustParseAddr("198.19.0.10")
	testVIPPort = netip.AddrPortFrom(testVIP, 80)
	backend1    = Backend{IP: netip.MustParseAddr("198.18.0.1"), Port: 8080, ClusterID: 1}
	backend2    = Backend{IP: netip.MustParseAddr("198.18.0.2"), Port: 8080, ClusterID: 2}
)

// lbEnv is a network namespace with two backend servers ("backend-1",
// "backend-2") and a server on the VIP itself ("untranslated", which
// answers whoever reaches the VIP untranslated), plus a test cgroup.
type lbEnv struct {
	ns     netns.NsHandle
	nsName string
	cgroup string
	// accepted counts the TCP connections each server accepted, by name.
	accepted map[string]*atomic.Int64
}

func newLBEnv(t testing.TB) *lbEnv {
	t.Helper()
	privtest.RequireRoot(t)
	ns, nsName := privtest.NewNetNS(t)
	privtest.AddVeth(t, ns, "trellis0",
		netip.PrefixFrom(backend1.IP, 32), netip.PrefixFrom(backend2.IP, 32), netip.PrefixFrom(testVIP, 32))
	env := &lbEnv{ns: ns, nsName: nsName, accepted: map[string]*atomic.Int64{
		"backend-1":    startServer(t, ns, netip.AddrPortFrom(backend1.IP, backend1.Port), "backend-1"),
		"backend-2":    startServer(t, ns, netip.AddrPortFrom(backend2.IP, backend2.Port), "backend-2"),
		"untranslated": startServer(t, ns, testVIPPort, "untranslated"),
	}}
	env.cgroup = privtest.NewCgroup(t)
	return env
}

// translated is how many TCP connections the backends have accepted: the
// ones a client made to the VIP reach them only when translated.
func (e *lbEnv) translated() int64 {
	return e.accepted["backend-1"].Load() + e.accepted["backend-2"].Load()
}

// open opens an LB and closes it at cleanup.
func open(t testing.TB, cfg Config) *LB {
	t.Helper()
	lb, err := Open(cfg)
	privtest.SkipIfNotSupported(t, err)
	t.Cleanup(func() { lb.Close() })
	return lb
}

// newPinDir returns a fresh directory on bpffs, uninstalled at cleanup.
func newPinDir(t testing.TB) string {
	t.Helper()
	if err := EnsureBPFFS(); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(BPFFSPath, privtest.UniqueName("trellis-test"))
	t.Cleanup(func() {
		if err := Uninstall(dir); err != nil {
			t.Errorf("uninstall %s: %v", dir, err)
		}
		os.RemoveAll(dir)
	})
	return dir
}

// client runs a client helper in the env's namespace, inside the test
// cgroup when inCgroup is set.
func (e *lbEnv) client(t testing.TB, inCgroup bool, helper string, args ...string) *clientResult {
	t.Helper()
	return e.clientIn(t, map[bool]string{true: e.cgroup}[inCgroup], helper, args...)
}

func (e *lbEnv) clientIn(t testing.TB, cgroup, helper string, args ...string) *clientResult {
	t.Helper()
	cmd := helperCommand(helper, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := privtest.RunInNetNSAndCgroup(t, cmd, e.ns, cgroup); err != nil {
		t.Fatalf("client %s %v: %v\n%s", helper, args, err, stderr.String())
	}
	r, err := parseResult(stdout.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// helperCommand is privtest.HelperCommand without Go's asynchronous
// preemption signals, which would interrupt the clients' blocking socket
// calls and skew the benchmark's timings.
func helperCommand(helper string, args ...string) *exec.Cmd {
	cmd := privtest.HelperCommand(helper, args...)
	cmd.Env = append(cmd.Env, "GODEBUG=asyncpreemptoff=1")
	return cmd
}

// startServer serves TCP and UDP on addr inside ns: it answers every
// connection and every datagram with name and a newline. It returns the
// count of TCP connections accepted.
func startServer(t testing.TB, ns netns.NsHandle, addr netip.AddrPort, name string) *atomic.Int64 {
	t.Helper()
	var ln *net.TCPListener
	var pc *net.UDPConn
	err := privtest.InNetNS(ns, func() error {
		var err error
		if ln, err = net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(addr)); err != nil {
			return err
		}
		pc, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		if ln != nil {
			ln.Close()
		}
		t.Fatalf("listen on %s: %v", addr, err)
	}
	msg := []byte(name + "\n")
	accepted := new(atomic.Int64)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Write(msg)
			c.Close()
		}
	}()
	go func() {
		defer wg.Done()
		buf := make([]byte, 1500)
		for {
			_, from, err := pc.ReadFromUDPAddrPort(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err == nil {
				pc.WriteToUDPAddrPort(msg, from)
			}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		pc.Close()
		wg.Wait()
	})
	return accepted
}

// attachedPrograms counts the programs attached to a cgroup for a hook.
func attachedPrograms(t testing.TB, cgroup string, attach ebpf.AttachType) int {
	t.Helper()
	f, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: attach})
	if err != nil {
		t.Fatal(err)
	}
	return len(res.Programs)
}
