package etcdchild

// A real multi-member etcd cluster for tests: each member is a child
// process of its own (the test binary re-executed), so a test can kill -9
// one, as a crashed machine would, and watch the others elect a leader.
// Clients and peers speak TLS with certificates of a CA the cluster makes
// for itself; clients must present a certificate of that CA (mTLS), whose
// common name etcd takes as the user once auth is enabled.

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

const envMember = "TRELLIS_ETCDCHILD_MEMBER"

// memberSpec is what a member's child process is told, as JSON in its
// environment.
type memberSpec struct {
	Name, Dir          string
	ClientURL, PeerURL string
	InitialCluster     string
	Token              string
	CAFile             string
	CertFile, KeyFile  string
}

// serveMember runs one cluster member until stdin closes.
func serveMember(specJSON string) {
	var spec memberSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "etcd member child: bad spec:", err)
		os.Exit(1)
	}
	cu, err := url.Parse(spec.ClientURL)
	if err != nil {
		fmt.Fprintln(os.Stderr, "etcd member child:", err)
		os.Exit(1)
	}
	pu, err := url.Parse(spec.PeerURL)
	if err != nil {
		fmt.Fprintln(os.Stderr, "etcd member child:", err)
		os.Exit(1)
	}
	tlsInfo := transport.TLSInfo{CertFile: spec.CertFile, KeyFile: spec.KeyFile, TrustedCAFile: spec.CAFile, ClientCertAuth: true}
	ec := embed.NewConfig()
	ec.Name, ec.Dir = spec.Name, spec.Dir
	ec.ListenClientUrls, ec.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	ec.ListenPeerUrls, ec.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	ec.InitialCluster, ec.InitialClusterToken = spec.InitialCluster, spec.Token
	ec.ClientTLSInfo, ec.PeerTLSInfo = tlsInfo, tlsInfo
	ec.EnableGRPCGateway = false
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(ec)
	if err != nil {
		fmt.Fprintln(os.Stderr, "etcd member child:", err)
		os.Exit(1)
	}
	go func() {
		if err := <-e.Err(); err != nil {
			fmt.Fprintln(os.Stderr, "etcd member child:", err)
			os.Exit(1)
		}
	}()
	// Ready only once the cluster has a leader and this member has
	// published itself: that needs the others, which start concurrently.
	<-e.Server.ReadyNotify()
	fmt.Println("ready")
	var b [1]byte
	os.Stdin.Read(b[:])
	e.Close()
	os.Exit(0)
}

// Cluster is a running multi-member etcd cluster of child processes.
type Cluster struct {
	// CAFile is the CA that signed every certificate of the cluster:
	// clients trust it for the members' certificates, and members accept
	// client certificates it signed.
	CAFile  string
	ca      *testCA
	dir     string
	members []*Member
}

// Member is one member's child process.
type Member struct {
	Name      string
	ClientURL string
	cmd       *exec.Cmd
	stdin     io.WriteCloser
	done      chan struct{}
}

// PID is the member's process ID.
func (m *Member) PID() int { return m.cmd.Process.Pid }

// Running reports whether the member's process is alive.
func (m *Member) Running() bool {
	select {
	case <-m.done:
		return false
	default:
		return true
	}
}

// StartCluster runs an n-member etcd cluster, one child process per member,
// with TLS for clients and peers and client certificates required. It
// returns once every member serves; the members stop at cleanup (killed
// if they do not within 20 s).
func StartCluster(tb testing.TB, n int) *Cluster {
	tb.Helper()
	dir := tb.TempDir()
	ca, err := newTestCA(dir)
	if err != nil {
		tb.Fatal(err)
	}
	certFile, keyFile, err := ca.issue(dir, "member", true)
	if err != nil {
		tb.Fatal(err)
	}
	c := &Cluster{CAFile: ca.certFile, ca: ca, dir: dir}
	var specs []memberSpec
	var initial []string
	for i := range n {
		s := memberSpec{
			Name: fmt.Sprintf("m%d", i), Dir: filepath.Join(dir, fmt.Sprintf("m%d", i)),
			ClientURL: "https://" + freeLoopback(tb), PeerURL: "https://" + freeLoopback(tb),
			Token: "etcdchild-" + filepath.Base(dir), CAFile: ca.certFile, CertFile: certFile, KeyFile: keyFile,
		}
		specs = append(specs, s)
		initial = append(initial, s.Name+"="+s.PeerURL)
	}
	ready := make(chan error, n)
	for _, s := range specs {
		s.InitialCluster = strings.Join(initial, ",")
		m, stdout, err := startMember(s)
		if err != nil {
			tb.Fatal(err)
		}
		c.members = append(c.members, m)
		go func() {
			line, err := bufio.NewReader(stdout).ReadString('\n')
			if err == nil && line != "ready\n" {
				err = fmt.Errorf("said %q", line)
			}
			if err != nil {
				err = fmt.Errorf("etcd member %s did not start: %w", s.Name, err)
			}
			ready <- err
		}()
	}
	tb.Cleanup(c.stop)
	timeout := time.After(60 * time.Second)
	for range n {
		select {
		case err := <-ready:
			if err != nil {
				tb.Fatal(err)
			}
		case <-timeout:
			tb.Fatalf("etcd cluster of %d did not start within 60s", n)
		}
	}
	return c
}

func startMember(s memberSpec) (*Member, io.Reader, error) {
	spec, err := json.Marshal(s)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envMember+"="+string(spec))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start etcd member %s: %w", s.Name, err)
	}
	m := &Member{Name: s.Name, ClientURL: s.ClientURL, cmd: cmd, stdin: stdin, done: make(chan struct{})}
	go func() { cmd.Wait(); close(m.done) }()
	return m, stdout, nil
}

// Endpoints are the members' client URLs, in member order.
func (c *Cluster) Endpoints() []string {
	var out []string
	for _, m := range c.members {
		out = append(out, m.ClientURL)
	}
	return out
}

// Members are the cluster's members, in order.
func (c *Cluster) Members() []*Member { return c.members }

// Member returns the member serving clientURL, nil if none does.
func (c *Cluster) Member(clientURL string) *Member {
	for _, m := range c.members {
		if m.ClientURL == clientURL {
			return m
		}
	}
	return nil
}

// Kill sends SIGKILL to m's process, as a crashed machine would stop, and
// waits until it is gone.
func (c *Cluster) Kill(tb testing.TB, m *Member) {
	tb.Helper()
	if err := syscall.Kill(m.PID(), syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		tb.Fatalf("kill etcd member %s (pid %d): %v", m.Name, m.PID(), err)
	}
	<-m.done
}

// ClientCert issues a client certificate of the cluster's CA with
// commonName (etcd's user once auth is enabled) and returns its files.
func (c *Cluster) ClientCert(tb testing.TB, commonName string) (certFile, keyFile string) {
	tb.Helper()
	certFile, keyFile, err := c.ca.issue(c.dir, commonName, false)
	if err != nil {
		tb.Fatal(err)
	}
	return certFile, keyFile
}

// stop ends every member still running: stdin closes, which each takes as
// the signal to stop; one that has not stopped after 20 s is killed.
func (c *Cluster) stop() {
	for _, m := range c.members {
		m.stdin.Close()
	}
	deadline := time.After(20 * time.Second)
	for _, m := range c.members {
		select {
		case <-m.done:
		case <-deadline:
			syscall.Kill(m.PID(), syscall.SIGKILL)
			<-m.done
		}
	}
}

func freeLoopback(tb testing.TB) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// testCA is the cluster's own CA.
type testCA struct {
	cert     *x509.Certificate
	key      *ecdsa.PrivateKey
	certFile string
}

func newTestCA(dir string) (*testCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("etcdchild: CA key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "etcdchild test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("etcdchild: CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	ca := &testCA{cert: cert, key: key, certFile: filepath.Join(dir, "ca.crt")}
	if err := os.WriteFile(ca.certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return nil, fmt.Errorf("etcdchild: write CA: %w", err)
	}
	return ca, nil
}

// issue signs a certificate for name: a member's (serving clients and
// peers on 127.0.0.1, and a client of the other members) or a client's
// (common name name).
func (ca *testCA) issue(dir, name string, member bool) (certFile, keyFile string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", fmt.Errorf("etcdchild: key for %s: %w", name, err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return "", "", err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if member {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		tmpl.DNSNames = []string{"localhost"}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return "", "", fmt.Errorf("etcdchild: certificate for %s: %w", name, err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", err
	}
	certFile, keyFile = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return "", "", fmt.Errorf("etcdchild: write %s: %w", certFile, err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return "", "", fmt.Errorf("etcdchild: write %s: %w", keyFile, err)
	}
	return certFile, keyFile, nil
}
