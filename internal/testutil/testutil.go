// Package testutil holds helpers shared by Trellis tests: building the
// trellis binary once, running it as a child process that is always
// stopped, and finding free ports.
package testutil

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RepoRoot is the directory holding the main go.mod.
func RepoRoot(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		t.Fatal("not inside the trellis module")
	}
	return filepath.Dir(mod)
}

// BuildTrellis builds cmd/trellis into a temporary directory and returns
// the binary's path. Each test binary builds it once.
func BuildTrellis(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		removeStaleBinaries()
		dir, err := os.MkdirTemp("", fmt.Sprintf("trellis-bin-%d-", os.Getpid()))
		if err != nil {
			buildErr = err
			return
		}
		bin := filepath.Join(dir, "trellis")
		cmd := exec.Command("go", "build", "-o", bin, "./cmd/trellis")
		cmd.Dir = RepoRoot(t)
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/trellis: %v\n%s", err, out)
			return
		}
		builtBinary = bin
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBinary
}

// removeStaleBinaries deletes the binaries earlier test processes built:
// each is in trellis-bin-<pid>-*, and a process cannot remove its own at
// exit (it is built once and shared by all its tests), so the next one
// removes those whose process is gone.
func removeStaleBinaries() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "trellis-bin-*"))
	for _, dir := range dirs {
		pid, err := strconv.Atoi(strings.SplitN(strings.TrimPrefix(filepath.Base(dir), "trellis-bin-"), "-", 2)[0])
		if err != nil || syscall.Kill(pid, 0) == syscall.ESRCH {
			os.RemoveAll(dir)
		}
	}
}

// The binary is built once per test process; these are written only inside
// buildOnce.
var (
	buildOnce   sync.Once
	builtBinary string
	buildErr    error
)

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Process is a child process a test started.
type Process struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  *SyncBuffer
	err  error
}

// SyncBuffer is an io.Writer safe for concurrent writers (a process's
// output, a server's log), read back whole with String.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Start runs bin with args in its own process group. It is stopped at test
// cleanup if still running, and its output is printed when the test failed.
func Start(t testing.TB, bin string, args ...string) *Process {
	t.Helper()
	p := &Process{cmd: exec.Command(bin, args...), done: make(chan struct{}), log: &SyncBuffer{}}
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Stop(t)
		if t.Failed() {
			t.Logf("output of %s %s:\n%s", filepath.Base(bin), strings.Join(args, " "), tail(p.log.String(), 60))
		}
	})
	return p
}

// Stop sends SIGTERM, waits up to 20 s, then SIGKILLs the process group.
func (p *Process) Stop(t testing.TB) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		t.Errorf("%s did not stop on SIGTERM; killing it", p.cmd.Path)
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

// Kill ends the process group with SIGKILL, as a crash would, and waits
// for the process.
func (p *Process) Kill() {
	select {
	case <-p.done:
		return
	default:
	}
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// Wait waits for the process to exit on its own and returns its error.
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Exited is closed when the process has exited.
func (p *Process) Exited() <-chan struct{} { return p.done }

// ExitState is the process's state once Exited is closed (nil before).
func (p *Process) ExitState() *os.ProcessState { return p.cmd.ProcessState }

// Output is everything the process printed so far.
func (p *Process) Output() string { return p.log.String() }

func tail(s string, lines int) string {
	parts := strings.Split(s, "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

// pollInterval is how often Eventually, EventuallyNoError and
// Consistently look.
const pollInterval = 50 * time.Millisecond

// Eventually polls cond every 50 ms until it holds or timeout passes.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(pollInterval)
	}
}

// EventuallyNoError is Eventually for a check that says what is still
// wrong: it polls fn every 50 ms until it returns nil, and when timeout
// passes first it fails the test with fn's last error.
func EventuallyNoError(t testing.TB, timeout time.Duration, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %v", timeout, what, err)
		}
		time.Sleep(pollInterval)
	}
}

// Consistently checks a property of the form "for a while, nothing
// happens": it polls cond every 50 ms for the whole window and fails the
// test the first time cond does not hold. The window is how long the test
// looks, not a wait for something to happen; cond may log what it saw.
func Consistently(t testing.TB, window time.Duration, what string, cond func() bool) {
	t.Helper()
	start := time.Now()
	for {
		if !cond() {
			t.Fatalf("%s stopped holding after %s", what, time.Since(start).Round(time.Millisecond))
		}
		if time.Since(start) >= window {
			return
		}
		time.Sleep(pollInterval)
	}
}

// APIServer is how a test reaches a mesh API server it started: the URL
// the server wrote to <state-dir>/http.addr, an HTTP client that verifies
// it with <state-dir>/pki/ca.crt, and its admin token.
type APIServer struct {
	URL    string
	Client *http.Client
	Token  string
}

// WaitAPIServer waits until the API server with state dir dir serves and
// answers /readyz with 200, and returns how to reach it. It fails t after
// timeout.
func WaitAPIServer(t testing.TB, dir string, timeout time.Duration) *APIServer {
	t.Helper()
	var a *APIServer
	EventuallyNoError(t, timeout, "API server in "+dir+" ready", func() error {
		if a == nil {
			var err error
			if a, err = apiServerIn(dir); err != nil {
				return err
			}
		}
		resp, err := a.Client.Get(a.URL + "/readyz")
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/readyz: %s: %s", resp.Status, body)
		}
		return nil
	})
	return a
}

func apiServerIn(dir string) (*APIServer, error) {
	addr, err := os.ReadFile(filepath.Join(dir, "http.addr"))
	if err != nil {
		return nil, err
	}
	token, err := os.ReadFile(filepath.Join(dir, "admin.token"))
	if err != nil {
		return nil, err
	}
	a := &APIServer{URL: strings.TrimSpace(string(addr)), Token: strings.TrimSpace(string(token)), Client: &http.Client{Timeout: 30 * time.Second}}
	if strings.HasPrefix(a.URL, "https://") {
		ca, err := os.ReadFile(filepath.Join(dir, "pki", "ca.crt"))
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(ca) {
			return nil, fmt.Errorf("no certificate in %s/pki/ca.crt", dir)
		}
		a.Client.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}
	}
	return a, nil
}

// Do sends a request with the admin token and returns the status and
// body; it fails t only when the server cannot be reached.
func (a *APIServer) Do(t testing.TB, method, path, body string) (int, string) {
	t.Helper()
	return a.DoAs(t, a.Token, method, path, body)
}

// DoAs is Do with another bearer token ("" sends none).
func (a *APIServer) DoAs(t testing.TB, token, method, path, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, a.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := a.Client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(out)
}

// Must is Do that fails t unless the answer is a success.
func (a *APIServer) Must(t testing.TB, method, path, body string) string {
	t.Helper()
	code, out := a.Do(t, method, path, body)
	if code >= 300 {
		t.Fatalf("%s %s: %d %s", method, path, code, out)
	}
	return out
}
