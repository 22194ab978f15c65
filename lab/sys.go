package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/trellis-mesh/trellis/bpf"
	"github.com/trellis-mesh/trellis/internal/nsthread"

	"golang.org/x/sys/unix"
)

// The kernel side of the lab: named network namespaces, running code and
// starting processes inside them, cgroups, and processes identified by PID
// and start time.
//
// Nothing here creates anything in the caller's (root) network namespace:
// links are made through netlink handles bound to lab namespaces, sockets
// to lab addresses are opened on threads that entered a lab namespace, and
// processes are cloned from such threads (so they keep the host's mount
// namespace, where bpffs and the cgroup2 mount are visible, unlike under
// `ip netns exec`, which remounts /sys).

const netnsDir = "/var/run/netns"

func nsPath(name string) string { return filepath.Join(netnsDir, name) }

// inNetNS runs fn on a thread inside the named namespace. Sockets fn opens
// stay in that namespace; processes fn starts are born in it.
func inNetNS(name string, fn func() error) error {
	if err := nsthread.DoPath(nsPath(name), fn); err != nil {
		return fmt.Errorf("in netns %s: %w", name, err)
	}
	return nil
}

// createNetNS creates a named namespace (as `ip netns add` does) and
// brings its loopback up.
func createNetNS(name string) error {
	if err := nsthread.CreateNamed(name); err != nil {
		return fmt.Errorf("lab: create netns %s: %w", name, err)
	}
	return nil
}

// deleteNetNS removes a named namespace (a leftover file that was never
// mounted too). The namespace itself, and the links in it, go when the
// last process in it has exited.
func deleteNetNS(name string) error {
	p := nsPath(name)
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("lab: unmount netns %s: %w", name, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("lab: remove netns %s: %w", name, err)
	}
	return nil
}

// listNetNS lists the named namespaces starting with prefix.
func listNetNS(prefix string) ([]string, error) {
	entries, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

func netnsExists(name string) bool {
	_, err := os.Stat(nsPath(name))
	return err == nil
}

// writeSysctl sets a sysctl (path under /proc/sys) inside a namespace.
func writeSysctl(ns, key, value string) error {
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	return inNetNS(ns, func() error {
		if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
			return fmt.Errorf("lab: sysctl %s=%s in %s: %w", key, value, ns, err)
		}
		return nil
	})
}

// dialIn opens a TCP connection from inside a lab namespace. Every
// connection the lab tool makes to a lab address goes through here: from
// the root namespace such an address would be routed out of the machine.
func dialIn(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := inNetNS(ns, func() error {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		conn = c
		return err
	})
	return conn, err
}

// cgroup2Root finds the cgroup v2 mount point.
func cgroup2Root() (string, error) {
	root, err := bpf.CgroupV2Root()
	if err != nil {
		return "", fmt.Errorf("lab: %w (the eBPF socket LB needs cgroup v2)", err)
	}
	return root, nil
}

// cgroupPIDs lists the processes in path and every cgroup below it.
func cgroupPIDs(path string) []int {
	var out []int
	filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		data, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if err != nil {
			return nil
		}
		for _, f := range strings.Fields(string(data)) {
			if pid, err := strconv.Atoi(f); err == nil {
				out = append(out, pid)
			}
		}
		return nil
	})
	return out
}

// removeCgroupTree removes path and its descendants, deepest first. The
// processes in them must be gone already.
func removeCgroupTree(path string) error {
	entries, err := os.ReadDir(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		if e.IsDir() {
			if err := removeCgroupTree(filepath.Join(path, e.Name())); err != nil {
				errs = append(errs, err)
			}
		}
	}
	var last error
	for range 100 {
		last = unix.Rmdir(path)
		if last == nil || errors.Is(last, unix.ENOENT) {
			return errors.Join(errs...)
		}
		if !errors.Is(last, unix.EBUSY) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.Join(append(errs, fmt.Errorf("lab: remove cgroup %s: %w", path, last))...)
}

// procSpec is a process to start inside a namespace and a cgroup.
type procSpec struct {
	ns     string
	cgroup string // "" leaves the process in the caller's cgroup
	argv   []string
	log    string // stdout and stderr; "" keeps the caller's
	daemon bool   // own session, survives the caller

	stdin          io.Reader
	stdout, stderr io.Writer
}

// command builds p's command; cleanup closes what the parent no longer
// needs once the child has started.
func (p procSpec) command() (*exec.Cmd, func(), error) {
	cmd := exec.Command(p.argv[0], p.argv[1:]...)
	cmd.Env = childEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: p.daemon}
	var closers []func()
	cleanup := func() {
		for _, c := range closers {
			c()
		}
	}
	if p.cgroup != "" {
		fd, err := unix.Open(p.cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, nil, fmt.Errorf("lab: open cgroup %s: %w", p.cgroup, err)
		}
		closers = append(closers, func() { unix.Close(fd) })
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
	}
	if p.log != "" {
		f, err := os.OpenFile(p.log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			cleanup()
			return nil, nil, fmt.Errorf("lab: log file: %w", err)
		}
		closers = append(closers, func() { f.Close() })
		cmd.Stdout, cmd.Stderr = f, f
	}
	if p.stdin != nil {
		cmd.Stdin = p.stdin
	}
	if p.stdout != nil {
		cmd.Stdout = p.stdout
	}
	if p.stderr != nil {
		cmd.Stderr = p.stderr
	}
	return cmd, cleanup, nil
}

// start starts p: cloned straight into its cgroup (clone3
// CLONE_INTO_CGROUP) from a thread inside its namespace, so it is never
// outside either.
func (p procSpec) start() (*exec.Cmd, error) {
	cmd, cleanup, err := p.command()
	if err != nil {
		return nil, err
	}
	defer cleanup()
	if err := inNetNS(p.ns, cmd.Start); err != nil {
		return nil, fmt.Errorf("lab: start %s in %s: %w", filepath.Base(p.argv[0]), p.ns, err)
	}
	return cmd, nil
}

// childEnv is the environment of lab processes: the caller's without proxy
// settings (a proxy would be dialled for lab addresses).
func childEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(k) {
		case "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY":
			continue
		}
		out = append(out, kv)
	}
	return out
}

// procStart is a process's start time (clock ticks after boot), which
// tells a PID's process from a later one that reused the PID; ok is false
// when the process is gone or a zombie.
func procStart(pid int) (start uint64, ok bool) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	// The command name (field 2) may hold spaces and parentheses: parse
	// after the last ')'.
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return 0, false
	}
	fields := strings.Fields(string(data[i+1:]))
	// fields[0] is field 3 (state); field 22 (starttime) is fields[19].
	if len(fields) < 20 || fields[0] == "Z" || fields[0] == "X" {
		return 0, false
	}
	start, err = strconv.ParseUint(fields[19], 10, 64)
	return start, err == nil
}

// alive says whether the process pid with start time start still runs.
func alive(pid int, start uint64) bool {
	if pid <= 0 {
		return false
	}
	s, ok := procStart(pid)
	return ok && (start == 0 || s == start)
}

// stopProcs sends SIGTERM to every (pid, start) still alive, waits up to
// grace, then SIGKILLs the rest and waits for them. It returns the PIDs
// that would not die.
func stopProcs(procs map[int]uint64, grace time.Duration) []int {
	for pid, start := range procs {
		if alive(pid, start) {
			unix.Kill(pid, unix.SIGTERM)
		}
	}
	wait := func(d time.Duration) []int {
		deadline := time.Now().Add(d)
		for {
			var left []int
			for pid, start := range procs {
				if alive(pid, start) {
					left = append(left, pid)
				}
			}
			if len(left) == 0 || time.Now().After(deadline) {
				return left
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	left := wait(grace)
	for _, pid := range left {
		if alive(pid, procs[pid]) {
			unix.Kill(pid, unix.SIGKILL)
		}
	}
	if len(left) > 0 {
		left = wait(5 * time.Second)
	}
	return left
}

// netnsPIDs finds the processes whose network namespace is one of the
// named ones (what `ip netns pids` does).
func netnsPIDs(names []string) map[int]uint64 {
	type devIno struct{ dev, ino uint64 }
	inodes := map[devIno]bool{}
	for _, n := range names {
		var st unix.Stat_t
		if err := unix.Stat(nsPath(n), &st); err == nil {
			inodes[devIno{st.Dev, st.Ino}] = true
		}
	}
	out := map[int]uint64{}
	if len(inodes) == 0 {
		return out
	}
	entries, _ := os.ReadDir("/proc")
	self := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		var st unix.Stat_t
		if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err != nil {
			continue
		}
		if inodes[devIno{st.Dev, st.Ino}] {
			if start, ok := procStart(pid); ok {
				out[pid] = start
			}
		}
	}
	return out
}
