package charttest

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"k8s.io/client-go/rest"
)

// The kube-apiserver harness: a real kube-apiserver (bin/kube-apiserver,
// built by `make kube-apiserver` from hack/kube-apiserver) on an embedded
// etcd of its own. The same flags as apiserver/k8s's harness; a copy,
// because this module cannot import the main module's packages (their
// k8s.io versions differ from Helm's).

// kubeAPIServer is a running kube-apiserver.
type kubeAPIServer struct {
	Host   string // https://127.0.0.1:<port>
	Token  string // a system:masters bearer token
	CAFile string // the self-signed serving certificate kube-apiserver wrote
	// users are the extra static-token users it started with (name →
	// token).
	users map[string]string
}

// Config is a client config for the system:masters user.
func (k *kubeAPIServer) Config() *rest.Config {
	return k.ConfigFor(k.Token)
}

// ConfigFor is a client config with another token.
func (k *kubeAPIServer) ConfigFor(token string) *rest.Config {
	return &rest.Config{
		Host:            k.Host,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAFile: k.CAFile},
		QPS:             100, Burst: 200,
	}
}

// repoRoot walks up to the main module's go.mod.
func repoRoot(t *testing.T) string {
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
			t.Fatal("no go.mod of github.com/trellis-mesh/trellis above the working directory")
		}
		dir = parent
	}
}

// repoBinary returns <repo>/bin/<name>, or skips the test saying how to
// build it (`make test` builds both before it runs this module).
func repoBinary(t *testing.T, name, target string) string {
	t.Helper()
	bin := filepath.Join(repoRoot(t), "bin", name)
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("%s not found (%v): run `make %s` to build it", bin, err, target)
	}
	return bin
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startEtcd runs an embedded etcd for the kube-apiserver on loopback and
// returns its client URL; it stops when the test ends.
func startEtcd(t *testing.T) string {
	t.Helper()
	cfg := embed.NewConfig()
	cfg.Dir = t.TempDir()
	cfg.Name = "charttest"
	client, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", freePort(t)))
	peer, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", freePort(t)))
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*client}, []url.URL{*client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*peer}, []url.URL{*peer}
	cfg.InitialCluster = cfg.Name + "=" + peer.String()
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop()) // its shutdown logs errors of closed listeners
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		t.Fatalf("embedded etcd: %v", err)
	}
	t.Cleanup(e.Close)
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		t.Fatal("embedded etcd not ready after 60 s")
	}
	return client.String()
}

// startKubeAPIServer runs bin/kube-apiserver on a new etcd and waits for
// /readyz. users are extra static-token users (name → token), for tests
// that act as a service account: kube-apiserver's RBAC matches a
// ServiceAccount subject by the user name
// system:serviceaccount:<namespace>:<name>, however it authenticated.
func startKubeAPIServer(t *testing.T, users map[string]string) *kubeAPIServer {
	t.Helper()
	bin := repoBinary(t, "kube-apiserver", "kube-apiserver")
	etcdURL := startEtcd(t)
	dir := t.TempDir()
	certDir := filepath.Join(dir, "certs")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		t.Fatal(err)
	}
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

	token := randomToken(t)
	lines := token + ",charttest,charttest-uid,system:masters\n"
	for name, tok := range users {
		lines += fmt.Sprintf("%s,%s,%s-uid\n", tok, name, name)
	}
	tokens := filepath.Join(dir, "tokens.csv")
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
		"--service-node-port-range=30000-32767",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+saPub,
		"--service-account-signing-key-file="+saKey,
		"--token-auth-file="+tokens,
		"--authorization-mode=RBAC",
		// As kubeadm and most distributions run it: agent.privileged=true
		// makes a privileged container, which kube-apiserver otherwise
		// refuses ("disallowed by cluster policy").
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
	)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, killed at cleanup; SIGKILL if this test
	// binary dies without running cleanups.
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
		var last string
		if t.Failed() {
			last = tail(logPath, 40)
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		logFile.Close()
		if t.Failed() {
			t.Logf("kube-apiserver log tail (%s):\n%s", logPath, last)
		}
	})
	k := &kubeAPIServer{Host: "https://127.0.0.1:" + strconv.Itoa(port), Token: token, CAFile: filepath.Join(certDir, "apiserver.crt"), users: users}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		select {
		case <-exited:
			t.Fatalf("kube-apiserver exited before it was ready (%v); log tail:\n%s", waitErr, tail(logPath, 40))
		default:
		}
		err := k.ready()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("kube-apiserver not ready after %s: %v", time.Since(start).Round(time.Second), err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("kube-apiserver ready at %s after %s", k.Host, time.Since(start).Round(10*time.Millisecond))
	return k
}

func (k *kubeAPIServer) ready() error {
	pemData, err := os.ReadFile(k.CAFile)
	if err != nil {
		return fmt.Errorf("serving certificate not written yet: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemData) {
		return fmt.Errorf("no certificate in %s", k.CAFile)
	}
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
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

// kubeconfig writes a kubeconfig for token and returns its path.
func (k *kubeAPIServer) kubeconfig(t *testing.T, token string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kubeconfig")
	data := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: test
  user:
    token: %s
contexts:
- name: test
  context: {cluster: test, user: test}
current-context: test
`, k.Host, k.CAFile, token)
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func randomToken(t *testing.T) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	var lines []string
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for s.Scan() {
		lines = append(lines, s.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}

// ctx is a test's context with a deadline.
func ctx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	c, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return c
}
