// Package kubetest runs a real kube-apiserver for tests: the binary `make
// kube-apiserver` builds (bin/kube-apiserver, from the hack/kube-apiserver
// tools module) as a child process on loopback, against an etcd the test
// gives it, with a static system:masters token and RBAC on. There is no
// kubelet, scheduler or controller manager: a test writes the objects
// those would (Pods with their status, EndpointSlices, ServiceAccounts).
package kubetest

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Server is a real kube-apiserver child process for tests.
type Server struct {
	Host   string // https://127.0.0.1:<port>
	Token  string // a system:masters bearer token
	CAFile string // the self-signed serving chain kube-apiserver wrote
	Log    string // its stdout and stderr
}

// Config returns a client config that authenticates with the static token
// and verifies the server against the certificate it generated.
func (k *Server) Config() *rest.Config { return k.ConfigFor(k.Token) }

// ConfigFor is a client config with another token (one of
// Options.Users').
func (k *Server) ConfigFor(token string) *rest.Config {
	return &rest.Config{
		Host:            k.Host,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAFile: k.CAFile},
		QPS:             100, Burst: 200,
	}
}

// RepoRoot walks up from the working directory to the main module's go.mod.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.HasPrefix(string(data), "module github.com/trellis-mesh/trellis\n") {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("no go.mod of github.com/trellis-mesh/trellis above the working directory")
		}
		dir = parent
	}
}

// Binary returns <repo>/bin/kube-apiserver, or skips the test
// when it has not been built.
func Binary(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(RepoRoot(t), "bin", "kube-apiserver")
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("%s not found (%v): run `make kube-apiserver` to build it", bin, err)
	}
	return bin
}

// Start runs the kube-apiserver binary against etcdURL and
// waits for /readyz. The process (and its process group) is killed when the
// test ends; on failure the tail of its log is printed.
func Start(t testing.TB, bin, etcdURL string) *Server {
	t.Helper()
	return StartWith(t, bin, etcdURL, Options{})
}

// Options tune StartWith.
type Options struct {
	// Users are static-token users besides the system:masters one (name →
	// token), for tests that act as a service account: RBAC matches a
	// ServiceAccount subject by the user name
	// system:serviceaccount:<namespace>:<name>, however it authenticated.
	Users map[string]string
}

// StartWith is Start with options.
func StartWith(t testing.TB, bin, etcdURL string, opts Options) *Server {
	t.Helper()
	dir := t.TempDir()
	certDir := filepath.Join(dir, "certs")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		t.Fatal(err)
	}

	// Service-account signing key (kube-apiserver refuses to start without one).
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	saKey, saPub := filepath.Join(dir, "sa.key"), filepath.Join(dir, "sa.pub")
	writePEM(t, saKey, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key))
	writePEM(t, saPub, "PUBLIC KEY", pub)

	// Static token file: token,user,uid,groups.
	tok := make([]byte, 16)
	if _, err := rand.Read(tok); err != nil {
		t.Fatal(err)
	}
	token := hex.EncodeToString(tok)
	tokens := filepath.Join(dir, "tokens.csv")
	lines := token + ",trellis-test,trellis-test-uid,system:masters\n"
	for name, tok := range opts.Users {
		lines += fmt.Sprintf("%s,%s,%s-uid\n", tok, name, name)
	}
	if err := os.WriteFile(tokens, []byte(lines), 0o600); err != nil {
		t.Fatal(err)
	}

	port := freePort(t)
	logPath := filepath.Join(dir, "kube-apiserver.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin,
		"--etcd-servers="+etcdURL,
		"--bind-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(port),
		"--cert-dir="+certDir,
		"--service-cluster-ip-range=10.96.0.0/16",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+saPub,
		"--service-account-signing-key-file="+saKey,
		"--token-auth-file="+tokens,
		"--authorization-mode=RBAC",
		// As kubeadm and most distributions run it: a privileged
		// container (the chart's agent.privileged) is otherwise refused
		// ("disallowed by cluster policy").
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
	)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, so cleanup can kill everything it starts; and
	// SIGKILL if this test binary dies without running cleanups.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("start %s: %v", bin, err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		pgid := cmd.Process.Pid
		// Take the tail before stopping it, so it shows the failure and
		// not the shutdown.
		var lastLines string
		if t.Failed() {
			lastLines = tail(logPath, 60)
		}
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-exited
		}
		logFile.Close()
		if t.Failed() {
			t.Logf("kube-apiserver (pid %d) log tail, %s:\n%s", pgid, logPath, lastLines)
		}
	})

	k := &Server{
		Host:   "https://127.0.0.1:" + strconv.Itoa(port),
		Token:  token,
		CAFile: filepath.Join(certDir, "apiserver.crt"),
		Log:    logPath,
	}
	deadline := time.Now().Add(90 * time.Second)
	var lastErr error
	for {
		select {
		case <-exited:
			t.Fatalf("kube-apiserver exited before it was ready (%v); log tail:\n%s", waitErr, tail(logPath, 60))
		default:
		}
		if lastErr = k.ready(); lastErr == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("kube-apiserver not ready after %s: %v", time.Since(start).Round(time.Second), lastErr)
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("kube-apiserver ready at %s after %s", k.Host, time.Since(start).Round(10*time.Millisecond))
	return k
}

// ready asks /readyz with the token, verifying the server certificate
// against the chain kube-apiserver wrote into its cert dir.
func (k *Server) ready() error {
	pemData, err := os.ReadFile(k.CAFile)
	if err != nil {
		return fmt.Errorf("serving certificate not written yet: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemData) {
		return fmt.Errorf("no certificate in %s", k.CAFile)
	}
	client := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	defer client.CloseIdleConnections()
	req, err := http.NewRequest(http.MethodGet, k.Host+"/readyz", nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+k.Token)
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/readyz: %s", resp.Status)
	}
	return nil
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}

// Kubeconfig writes a kubeconfig file for the server (context name
// context, the static token) and returns its path.
func (k *Server) Kubeconfig(t testing.TB, context string) string {
	t.Helper()
	ca, err := os.ReadFile(k.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	data := KubeconfigYAML([]Context{{Name: context, Server: k, CAPEM: ca}})
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// KubeconfigFor writes a kubeconfig with another token (one of
// Options.Users') and returns its path.
func (k *Server) KubeconfigFor(t testing.TB, token string) string {
	t.Helper()
	ca, err := os.ReadFile(k.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	as := *k
	as.Token = token
	if err := os.WriteFile(path, KubeconfigYAML([]Context{{Name: "test", Server: &as, CAPEM: ca}}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// Context is one context of a kubeconfig KubeconfigYAML writes.
type Context struct {
	Name   string
	Server *Server
	CAPEM  []byte
}

// KubeconfigYAML is a kubeconfig with one cluster, user and context per
// entry, the first current.
func KubeconfigYAML(contexts []Context) []byte {
	var b strings.Builder
	b.WriteString("apiVersion: v1\nkind: Config\nclusters:\n")
	for _, c := range contexts {
		fmt.Fprintf(&b, "- name: %s\n  cluster:\n    server: %s\n    certificate-authority-data: %s\n", c.Name, c.Server.Host, base64Std(c.CAPEM))
	}
	b.WriteString("users:\n")
	for _, c := range contexts {
		fmt.Fprintf(&b, "- name: %s\n  user:\n    token: %s\n", c.Name, c.Server.Token)
	}
	b.WriteString("contexts:\n")
	for _, c := range contexts {
		fmt.Fprintf(&b, "- name: %s\n  context:\n    cluster: %s\n    user: %s\n", c.Name, c.Name, c.Name)
	}
	if len(contexts) > 0 {
		fmt.Fprintf(&b, "current-context: %s\n", contexts[0].Name)
	}
	return []byte(b.String())
}

func base64Std(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// Namespace creates namespace name with its "default" ServiceAccount,
// which the ServiceAccount admission plugin wants for every pod and no
// controller manager runs here to create.
func Namespace(t testing.TB, ctx context.Context, cs kubernetes.Interface, name string) {
	t.Helper()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: name, Name: "default"}}
	if _, err := cs.CoreV1().ServiceAccounts(name).Create(ctx, sa, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create service account %s/default: %v", name, err)
	}
}
