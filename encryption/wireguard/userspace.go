package wireguard

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// userspace is the backend of a device process: the UAPI on its socket.
type userspace struct {
	cfg  Config
	uapi uapiConn

	mu  sync.Mutex
	pid int // the process that served the last exchange
}

// openUserspace adopts the device process serving cfg.SocketPath or
// starts one. linkExists says whether a TUN link of cfg.Name is there.
func openUserspace(ctx context.Context, cfg Config, linkExists bool) (*userspace, error) {
	u := &userspace{cfg: cfg, uapi: uapiConn{cfg.SocketPath}}
	pid, err := u.probe(ctx)
	if err == nil {
		cfg.Logger.Info("adopted WireGuard device process", "device", cfg.Name, "pid", pid, "socket", cfg.SocketPath)
		return u, nil
	}
	if !errors.Is(err, ErrDeviceGone) {
		return nil, err
	}
	if linkExists {
		// A device process that was killed leaves its TUN for the kernel
		// to delete a moment later; one that is starting has its TUN
		// before its socket. Wait for either to settle.
		if err := u.waitSocketOrLinkGone(ctx); err == nil {
			return u, nil
		} else if !errors.Is(err, ErrDeviceGone) {
			return nil, err
		}
	}
	if err := removeStaleSocket(ctx, cfg.SocketPath); err != nil {
		return nil, err
	}
	if err := u.start(ctx); err != nil {
		return nil, err
	}
	return u, nil
}

// probe reads the device once. It fails with ErrDeviceGone when nobody
// serves the socket.
func (u *userspace) probe(ctx context.Context) (int, error) {
	if _, err := u.get(ctx); err != nil {
		return 0, err
	}
	return u.lastPID(), nil
}

// waitSocketOrLinkGone waits, after the TUN link was found with nobody
// serving the socket, until the socket is served (nil) or the link is
// gone (ErrDeviceGone): a killed process's link goes a moment after it.
// A link still there without a server after StartTimeout is an error.
func (u *userspace) waitSocketOrLinkGone(ctx context.Context) error {
	deadline := time.Now().Add(u.cfg.StartTimeout)
	for {
		if _, err := u.probe(ctx); err == nil {
			u.cfg.Logger.Info("adopted WireGuard device process", "device", u.cfg.Name, "pid", u.lastPID(), "socket", u.cfg.SocketPath)
			return nil
		} else if !errors.Is(err, ErrDeviceGone) {
			return err
		}
		if err := waitLinkGone(ctx, u.cfg.Name, 0); err == nil {
			return ErrDeviceGone
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("a TUN link %s exists but no device process serves %s (after %s): another program's TUN, or a device process whose socket was removed; delete the link (ip link del %s) or find its process",
				u.cfg.Name, u.cfg.SocketPath, u.cfg.StartTimeout, u.cfg.Name)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (u *userspace) lastPID() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.pid
}

// exchange records who served an exchange and classifies its error: a
// socket nobody serves is ErrDeviceGone (and the process, if it was our
// child, is reaped).
func (u *userspace) exchange(pid int, err error) error {
	u.mu.Lock()
	prev := u.pid
	if pid != 0 {
		u.pid = pid
	}
	u.mu.Unlock()
	if pid != 0 && prev != 0 && pid != prev {
		u.cfg.Logger.Info("WireGuard device process changed", "device", u.cfg.Name, "pid", pid, "previous", prev)
	}
	if err == nil {
		return nil
	}
	if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
		gone := "device process"
		if prev != 0 {
			gone = fmt.Sprintf("device process %d", prev)
			reapIfChild(prev)
		}
		return fmt.Errorf("%w: %s does not serve %s (%w)", ErrDeviceGone, gone, u.cfg.SocketPath, err)
	}
	return fmt.Errorf("socket %s: %w", u.cfg.SocketPath, err)
}

func (u *userspace) get(ctx context.Context) (state, error) {
	s, pid, err := u.uapi.get(ctx)
	return s, u.exchange(pid, err)
}

func (u *userspace) set(ctx context.Context, cfg wgtypes.Config) error {
	pid, err := u.uapi.set(ctx, cfg)
	return u.exchange(pid, err)
}

func (u *userspace) close() error { return nil }

// start starts a device process and waits for its socket.
func (u *userspace) start(ctx context.Context) error {
	cfg := u.cfg
	if len(cfg.StartCommand) == 0 {
		return fmt.Errorf("no device process serves %s and no StartCommand to start one", cfg.SocketPath)
	}
	argv := append(append([]string{}, cfg.StartCommand...),
		"--name", cfg.Name, "--mtu", strconv.Itoa(cfg.MTU), "--socket", cfg.SocketPath)
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return fmt.Errorf("start device process: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(cfg.LogPath), 0o700); err != nil {
		return fmt.Errorf("start device process: log directory: %w", err)
	}
	logFile, err := os.OpenFile(cfg.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("start device process: open log: %w", err)
	}
	defer logFile.Close()
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		return fmt.Errorf("start device process: %w", err)
	}
	defer devNull.Close()
	env := cfg.StartEnv
	if env == nil {
		env = os.Environ()
	}
	logStart, _ := logFile.Seek(0, io.SeekEnd)
	proc, err := os.StartProcess(path, argv, &os.ProcAttr{
		Dir:   "/",
		Env:   env,
		Files: []*os.File{devNull, logFile, logFile},
		// A session of its own: not in the agent's process group, so a
		// signal to the agent's group (Ctrl-C, a service manager that
		// stops the group) does not take encryption down with it.
		Sys: &syscall.SysProcAttr{Setsid: true},
	})
	if err != nil {
		return fmt.Errorf("start device process %s: %w", path, err)
	}
	pid := proc.Pid
	// The process outlives us: we never wait for it, except to reap it if
	// it exits before it serves its socket.
	proc.Release()
	cfg.Logger.Info("started WireGuard device process", "device", cfg.Name, "pid", pid, "socket", cfg.SocketPath, "log", cfg.LogPath)

	deadline := time.Now().Add(cfg.StartTimeout)
	for {
		served, err := u.probe(ctx)
		if err == nil {
			if served != pid {
				cfg.Logger.Warn("another device process serves the socket; adopted it", "device", cfg.Name, "pid", served, "started", pid)
			}
			return nil
		}
		if !errors.Is(err, ErrDeviceGone) {
			return err
		}
		var ws unix.WaitStatus
		if wpid, _ := unix.Wait4(pid, &ws, unix.WNOHANG, nil); wpid == pid {
			return fmt.Errorf("device process %d %s before serving %s; see %s%s", pid, exitString(ws), cfg.SocketPath, cfg.LogPath, logTail(cfg.LogPath, logStart))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("device process %d does not serve %s after %s (left running); see %s%s", pid, cfg.SocketPath, cfg.StartTimeout, cfg.LogPath, logTail(cfg.LogPath, logStart))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("device process %d started, socket %s not served yet: %w", pid, cfg.SocketPath, ctx.Err())
		case <-time.After(25 * time.Millisecond):
		}
	}
}

func exitString(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return "was killed by " + ws.Signal().String()
	}
	return fmt.Sprintf("exited with status %d", ws.ExitStatus())
}

// logTail returns ": " and the last lines the log got since offset, for an
// error message.
func logTail(path string, offset int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const tailBytes = 2048
	st, err := f.Stat()
	if err != nil || st.Size() <= offset {
		return ""
	}
	start := max(offset, st.Size()-tailBytes)
	buf := make([]byte, st.Size()-start)
	n, _ := f.ReadAt(buf, start)
	lines := strings.Split(strings.TrimSpace(string(buf[:n])), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return ": " + strings.Join(lines, " | ")
}

// DevicePID returns the PID of the device process serving socketPath,
// from the connection's peer credentials, or ErrDeviceGone when nobody
// serves it. (The lab kills leftover device processes by PID.)
func DevicePID(ctx context.Context, socketPath string) (int, error) {
	c, pid, err := uapiConn{socketPath}.dial(ctx)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
			return 0, fmt.Errorf("wireguard: %w: nobody serves %s (%w)", ErrDeviceGone, socketPath, err)
		}
		return 0, fmt.Errorf("wireguard: socket %s: %w", socketPath, err)
	}
	c.Close()
	return pid, nil
}

// stopDeviceProcess stops the process serving cfg.SocketPath: SIGTERM,
// then SIGKILL after timeout, and waits for it to exit; it removes the
// socket file when nobody serves it any more. Nobody serving it is not an
// error.
func stopDeviceProcess(ctx context.Context, cfg Config, timeout time.Duration) error {
	c, pid, err := uapiConn{cfg.SocketPath}.dial(ctx)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
			return removeStaleSocket(ctx, cfg.SocketPath)
		}
		return fmt.Errorf("socket %s: %w", cfg.SocketPath, err)
	}
	// The pidfd is opened while the connection is: the process is alive
	// (or a zombie not yet reaped), so the PID cannot have been reused,
	// and signals through the pidfd reach this process or none.
	pidfd, err := unix.PidfdOpen(pid, 0)
	c.Close()
	if errors.Is(err, unix.ESRCH) {
		reapIfChild(pid)
		return removeStaleSocket(ctx, cfg.SocketPath)
	}
	if err != nil {
		return fmt.Errorf("pidfd of device process %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	if err := unix.PidfdSendSignal(pidfd, unix.SIGTERM, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("signal device process %d: %w", pid, err)
	}
	exited, err := waitPidfd(ctx, pidfd, timeout)
	if err != nil {
		return fmt.Errorf("wait for device process %d: %w", pid, err)
	}
	if !exited {
		cfg.Logger.Warn("device process did not exit on SIGTERM; killing it", "device", cfg.Name, "pid", pid, "after", timeout)
		if err := unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("kill device process %d: %w", pid, err)
		}
		if exited, err = waitPidfd(ctx, pidfd, timeout); err != nil || !exited {
			return fmt.Errorf("device process %d still running after SIGKILL (%v)", pid, err)
		}
	}
	reapIfChild(pid)
	cfg.Logger.Info("stopped WireGuard device process", "device", cfg.Name, "pid", pid)
	return removeStaleSocket(ctx, cfg.SocketPath)
}

// waitPidfd waits up to timeout for the process to exit.
func waitPidfd(ctx context.Context, pidfd int, timeout time.Duration) (bool, error) {
	deadline := time.Now().Add(timeout)
	for {
		// Poll in short slices so that ctx is honoured.
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 50)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return false, err
		}
		if n > 0 {
			return true, nil
		}
		if time.Now().After(deadline) {
			return false, nil
		}
		if err := ctx.Err(); err != nil {
			return false, err
		}
	}
}

// reapIfChild collects pid's exit status if it is an exited child of this
// process (the agent that started it), so that it leaves no zombie. It
// never blocks and does nothing for another process's child.
func reapIfChild(pid int) {
	var ws unix.WaitStatus
	unix.Wait4(pid, &ws, unix.WNOHANG, nil)
}
