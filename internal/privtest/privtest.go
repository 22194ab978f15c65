//go:build linux

package privtest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/trellis-mesh/trellis/internal/cgroup2"
	"github.com/trellis-mesh/trellis/internal/nsthread"
)

// RequireRoot skips t unless the test runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: run make test as root")
	}
}

// SkipIfNotSupported skips t when err says the kernel lacks a feature:
// it matches ebpf.ErrNotSupported (cilium/ebpf's feature probes) or
// errors.ErrUnsupported (what Trellis packages wrap for missing kernel
// features such as WireGuard or Geneve). Any other non-nil error fails
// the test.
func SkipIfNotSupported(t testing.TB, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, errors.ErrUnsupported) {
		t.Skip("kernel lacks a feature:", err)
	}
	t.Fatal(err)
}

// UniqueName returns prefix-<pid>-<random hex>, short enough for an
// interface name when prefix is at most 3 characters.
func UniqueName(prefix string) string {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return fmt.Sprintf("%s-%d-%s", prefix, os.Getpid(), hex.EncodeToString(b[:]))
}

// UniqueShortName returns prefix followed by 6 random hex digits, for
// names with tight rules: a lab name (at most 12 lowercase letters and
// digits) or an interface name (at most 15 bytes). It carries no PID, so
// it is unique per run by chance alone (1 in 16 million per pair).
func UniqueShortName(prefix string) string {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return prefix + hex.EncodeToString(b[:])
}

// NewNetNS creates a named network namespace (visible to `ip netns`),
// brings its loopback up, and deletes it at cleanup. The calling thread's
// namespace is unchanged.
func NewNetNS(t testing.TB) (netns.NsHandle, string) {
	t.Helper()
	return NewNetNSWithPrefix(t, "trellis-test")
}

// NewNetNSWithPrefix is NewNetNS for a namespace named
// UniqueName(prefix), so that one a crashed test left behind names the
// tests that made it.
func NewNetNSWithPrefix(t testing.TB, prefix string) (netns.NsHandle, string) {
	t.Helper()
	name := UniqueName(prefix)
	if err := nsthread.CreateNamed(name); err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	ns, err := netns.GetFromName(name)
	if err != nil {
		netns.DeleteNamed(name)
		t.Fatalf("open netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		ns.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", name, err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("set lo up in %s: %v", name, err)
	}
	return ns, name
}

// NetlinkHandle returns a netlink handle bound to ns, closed at cleanup:
// links, addresses and routes made through it are made in ns, whichever
// namespace the calling thread is in.
func NetlinkHandle(t testing.TB, ns netns.NsHandle) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("netlink handle in netns %d: %v", ns, err)
	}
	t.Cleanup(h.Close)
	return h
}

// AddVeth creates a veth pair inside ns, name and name+"p", both up, and
// puts addrs on name. Addresses on it are local to ns: a process in ns
// reaches them through loopback, and nothing leaves the namespace. (A veth
// pair rather than a dummy interface: some test kernels have no dummy
// driver.) The pair disappears with the namespace.
func AddVeth(t testing.TB, ns netns.NsHandle, name string, addrs ...netip.Prefix) {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("netlink handle: %v", err)
	}
	defer h.Close()
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}
	if err := h.LinkAdd(v); err != nil {
		t.Fatalf("add veth %s: %v", name, err)
	}
	for _, a := range addrs {
		nl, err := netlink.ParseAddr(a.String())
		if err != nil {
			t.Fatal(err)
		}
		if err := h.AddrAdd(v, nl); err != nil {
			t.Fatalf("add %s to %s: %v", a, name, err)
		}
	}
	for _, n := range []string{name, name + "p"} {
		l, err := h.LinkByName(n)
		if err == nil {
			err = h.LinkSetUp(l)
		}
		if err != nil {
			t.Fatalf("set %s up: %v", n, err)
		}
	}
}

// InNetNS runs fn on an OS thread that has entered ns. Sockets fn creates
// belong to ns for their whole life, whichever thread later uses them;
// goroutines fn starts do not run in ns.
func InNetNS(ns netns.NsHandle, fn func() error) error { return nsthread.Do(ns, fn) }

// CgroupV2Root returns the cgroup v2 mount point (cgroup2.Mount), the
// machine's root cgroup: tests create cgroups below it and never attach
// anything to it.
func CgroupV2Root() (string, error) { return cgroup2.Mount() }

// NewCgroup creates <cgroup2 root>/trellis-test-<pid>-<rand> and removes
// it at cleanup, after moving any process still in it (or in a child
// cgroup) to the root cgroup.
func NewCgroup(t testing.TB) string {
	t.Helper()
	root, err := CgroupV2Root()
	if err != nil {
		t.Fatalf("cgroup2 root: %v", err)
	}
	path := filepath.Join(root, UniqueName("trellis-test"))
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		if err := removeCgroup(root, path); err != nil {
			t.Errorf("remove cgroup %s: %v", path, err)
		}
	})
	return path
}

// removeCgroup removes path and its descendants, moving their processes
// to root first.
func removeCgroup(root, path string) error {
	entries, err := os.ReadDir(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeCgroup(root, filepath.Join(path, e.Name())); err != nil {
				return err
			}
		}
	}
	var lastErr error
	for range 50 {
		if err := moveProcs(path, root); err != nil {
			return err
		}
		lastErr = unix.Rmdir(path)
		if lastErr == nil || errors.Is(lastErr, os.ErrNotExist) {
			return nil
		}
		if !errors.Is(lastErr, unix.EBUSY) {
			return lastErr
		}
		time.Sleep(20 * time.Millisecond)
	}
	return lastErr
}

func moveProcs(from, to string) error {
	data, err := os.ReadFile(filepath.Join(from, "cgroup.procs"))
	if err != nil {
		return err
	}
	for _, f := range strings.Fields(string(data)) {
		if _, err := strconv.Atoi(f); err != nil {
			continue
		}
		err := os.WriteFile(filepath.Join(to, "cgroup.procs"), []byte(f), 0)
		if err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("move pid %s out of %s: %w", f, from, err)
		}
	}
	return nil
}

// StartInNetNSAndCgroup starts cmd as a process that is inside cgroupPath
// and network namespace ns from its first instruction: it is cloned into
// the cgroup (clone3 CLONE_INTO_CGROUP via SysProcAttr.UseCgroupFD) from
// an OS thread that has entered ns. An empty cgroupPath leaves the cgroup
// alone; ns < 0 (netns.None()) leaves the namespace alone.
//
// The child gets SIGKILL if the test process dies. At cleanup a child
// that was not waited for is killed (by PID) and reaped; call cmd.Wait
// yourself only from the test goroutine, before the test ends.
func StartInNetNSAndCgroup(t testing.TB, cmd *exec.Cmd, ns netns.NsHandle, cgroupPath string) error {
	t.Helper()
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	if cmd.WaitDelay == 0 {
		// Bound Wait when the child is gone but a stdin/stdout copier
		// is still blocked.
		cmd.WaitDelay = 5 * time.Second
	}
	if cgroupPath != "" {
		fd, err := unix.Open(cgroupPath, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open cgroup %s: %w", cgroupPath, err)
		}
		defer unix.Close(fd)
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
	}
	var err error
	if ns >= 0 {
		err = InNetNS(ns, cmd.Start)
	} else {
		err = cmd.Start()
	}
	if err != nil {
		return fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return nil
}

// RunInNetNSAndCgroup is StartInNetNSAndCgroup followed by cmd.Wait.
func RunInNetNSAndCgroup(t testing.TB, cmd *exec.Cmd, ns netns.NsHandle, cgroupPath string) error {
	t.Helper()
	if err := StartInNetNSAndCgroup(t, cmd, ns, cgroupPath); err != nil {
		return err
	}
	return cmd.Wait()
}

// helperEnv names the helper a re-executed test binary runs.
const helperEnv = "TRELLIS_PRIVTEST_HELPER"

// Helper is a function a test binary can run as a child process: it gets
// the arguments given to HelperCommand and its return value is the exit
// code.
type Helper func(args []string, stdin io.Reader, stdout io.Writer) int

// Main is for TestMain: when the binary was started by HelperCommand it
// runs the named helper and exits; otherwise it runs the tests and then
// fails the run if any eBPF file descriptor (map, program, link) is still
// open, which means some test or helper forgot a Close.
func Main(m *testing.M, helpers map[string]Helper) {
	if name := os.Getenv(helperEnv); name != "" {
		h, ok := helpers[name]
		if !ok {
			fmt.Fprintf(os.Stderr, "unknown helper %q\n", name)
			os.Exit(2)
		}
		os.Exit(h(os.Args[1:], os.Stdin, os.Stdout))
	}
	code := m.Run()
	if leaks := bpfFDs(); len(leaks) > 0 {
		fmt.Fprintf(os.Stderr, "leaked eBPF file descriptors: %s\n", strings.Join(leaks, ", "))
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// HelperCommand returns a command that re-executes the test binary as the
// helper name (see Main) with args.
func HelperCommand(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), helperEnv+"="+name)
	return cmd
}

// bpfFDs lists this process's open eBPF file descriptors.
func bpfFDs() []string {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err == nil && strings.HasPrefix(target, "anon_inode:bpf-") {
			out = append(out, e.Name()+"->"+target)
		}
	}
	return out
}
