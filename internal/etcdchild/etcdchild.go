// Package etcdchild runs etcd in child processes: single-member embedded
// etcds for benchmarks (Start), so the CPU and heap a benchmark measures
// are its own and not etcd's, and multi-member TLS clusters for tests
// (StartCluster), one process per member, so a test can kill one. The
// child is the test binary itself, re-executed: the package's TestMain
// calls ServeIfChild first.
package etcdchild

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/kvstore"
)

const (
	envAddrs = "TRELLIS_ETCDCHILD_ADDRS"
	envDir   = "TRELLIS_ETCDCHILD_DIR"
)

// ServeIfChild, in the child, serves one embedded etcd per requested
// address, or one cluster member, until its stdin closes (the parent went
// away or stops it), then exits. In the parent it returns at once.
func ServeIfChild() {
	if spec := os.Getenv(envMember); spec != "" {
		serveMember(spec)
	}
	addrs := os.Getenv(envAddrs)
	if addrs == "" {
		return
	}
	var running []*kvstore.Embedded
	for i, a := range strings.Split(addrs, ",") {
		e, err := kvstore.StartEmbedded(context.Background(), kvstore.EmbeddedConfig{Dir: filepath.Join(os.Getenv(envDir), strconv.Itoa(i)), ClientAddr: a})
		if err != nil {
			fmt.Fprintln(os.Stderr, "etcd child:", err)
			os.Exit(1)
		}
		running = append(running, e)
	}
	fmt.Println("ready")
	var b [1]byte
	os.Stdin.Read(b[:])
	for _, e := range running {
		e.Close()
	}
	os.Exit(0)
}

// Start runs n etcds in a child process and returns their client URLs. The
// child stops at cleanup.
func Start(tb testing.TB, n int) []string {
	tb.Helper()
	var addrs, urls []string
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		addrs = append(addrs, l.Addr().String())
		urls = append(urls, "http://"+l.Addr().String())
		l.Close()
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envAddrs+"="+strings.Join(addrs, ","), envDir+"="+tb.TempDir())
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "ready\n" {
		tb.Fatalf("etcd child did not start: %q %v", line, err)
	}
	return urls
}
