package wireguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
)

// DeviceProcessConfig is what the device process runs. Its flags are
// --name, --mtu and --socket, which Open appends to Config.StartCommand.
type DeviceProcessConfig struct {
	// Name is the TUN link's name; default DefaultDevice.
	Name string
	// MTU is the link's MTU; default DefaultMTU.
	MTU int
	// SocketPath is where the UAPI is served; default
	// DefaultSocketPath(Name).
	SocketPath string
	// MaxProcs caps the CPUs the process runs Go code on at once
	// (runtime.GOMAXPROCS); 0 leaves Go's own choice. See
	// DefaultDeviceMaxProcs.
	MaxProcs int
	// Logger defaults to discarding.
	Logger *slog.Logger
}

// DefaultDeviceMaxProcs is the device process's MaxProcs unless said
// otherwise: half the CPUs Go sees, at least one. wireguard-go's pipeline
// hands every batch between goroutines; with as many threads as CPUs those
// handoffs become futex wakeups across CPUs, which a small or virtualized
// node pays dearly for, and the device competes with the node's own
// workloads anyway. On the 2-core development VM one thread halved the
// context switches and CPU seconds per GB and doubled throughput (README,
// encryption throughput). A GOMAXPROCS in the environment wins (0).
func DefaultDeviceMaxProcs() int {
	if os.Getenv("GOMAXPROCS") != "" {
		return 0
	}
	return max(1, runtime.NumCPU()/2)
}

// maxSocketPath is the longest path a unix socket address holds: sun_path
// is 108 bytes with the terminating NUL.
const maxSocketPath = len(unix.RawSockaddrUnix{}.Path) - 1

// RunDevice is the device process: it creates the TUN link Name with
// virtio-net headers and segmentation offloads, runs wireguard-go on it
// with the default UDP bind (GSO/GRO), sets the link's MTU and brings it
// up, and serves the UAPI on SocketPath (0600; its directory is created
// 0700). It runs until ctx is cancelled (the command's SIGTERM or SIGINT)
// or the device closes (its link was deleted), then closes the device and
// removes the socket. The device has no key, port or peer until a client
// configures it.
func RunDevice(ctx context.Context, cfg DeviceProcessConfig) (err error) {
	cfg = cfg.withDefaults()
	log := cfg.Logger
	if err := checkSocketPath(cfg.SocketPath); err != nil {
		return fmt.Errorf("wireguard: device %s: %w", cfg.Name, err)
	}
	if err := checkLinkName(cfg.Name); err != nil {
		return fmt.Errorf("wireguard: device %s: %w", cfg.Name, err)
	}
	if cfg.MTU < 576 || cfg.MTU > 65535 {
		return fmt.Errorf("wireguard: device %s: MTU %d out of range (576-65535)", cfg.Name, cfg.MTU)
	}
	if cfg.MaxProcs < 0 {
		return fmt.Errorf("wireguard: device %s: max procs %d: want 0 (Go's default) or more", cfg.Name, cfg.MaxProcs)
	}
	if cfg.MaxProcs > 0 {
		runtime.GOMAXPROCS(cfg.MaxProcs)
	}
	if l, err := netlink.LinkByName(cfg.Name); err == nil {
		return fmt.Errorf("wireguard: device %s: a %s link of that name exists already", cfg.Name, l.Type())
	}

	// The socket first: when another device process serves it, this one
	// must not touch anything.
	ln, err := listenUAPI(ctx, cfg.SocketPath)
	if err != nil {
		return fmt.Errorf("wireguard: device %s: %w", cfg.Name, err)
	}
	var ino uint64
	defer func() {
		ln.Close()
		if err := removeSocketIfOurs(cfg.SocketPath, ino); err != nil {
			log.Warn("could not remove the UAPI socket", "socket", cfg.SocketPath, "error", err)
		}
	}()
	if st, err := os.Stat(cfg.SocketPath); err == nil {
		ino = st.Sys().(*syscall.Stat_t).Ino
	}

	td, err := tun.CreateTUN(cfg.Name, cfg.MTU)
	if err != nil {
		return fmt.Errorf("wireguard: device %s: create TUN: %w", cfg.Name, err)
	}
	dev := device.NewDevice(td, conn.NewDefaultBind(), wgLogger(log))
	defer dev.Close()

	link, err := netlink.LinkByName(cfg.Name)
	if err == nil {
		err = netlink.LinkSetMTU(link, cfg.MTU)
	}
	if err == nil {
		err = netlink.LinkSetUp(link)
	}
	if err != nil {
		return fmt.Errorf("wireguard: device %s: set MTU %d and up: %w", cfg.Name, cfg.MTU, err)
	}
	offloads := tunOffloads(td)
	log.Info("WireGuard device running", "device", cfg.Name, "mtu", cfg.MTU, "socket", cfg.SocketPath,
		"pid", os.Getpid(), "tunOffloads", offloads, "batchSize", dev.BatchSize())

	var wg sync.WaitGroup
	defer wg.Wait()
	conns := newConnSet()
	defer conns.closeAll()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					log.Error("UAPI accept failed", "socket", cfg.SocketPath, "error", err)
				}
				return
			}
			if !conns.add(c) {
				c.Close()
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conns.remove(c)
				dev.IpcHandle(c)
			}()
		}
	}()

	select {
	case <-ctx.Done():
		log.Info("stopping WireGuard device", "device", cfg.Name, "reason", context.Cause(ctx))
	case <-dev.Wait():
		log.Warn("WireGuard device closed (its link was deleted?); exiting", "device", cfg.Name)
	}
	ln.Close()
	conns.closeAll()
	return nil
}

func (cfg DeviceProcessConfig) withDefaults() DeviceProcessConfig {
	if cfg.Name == "" {
		cfg.Name = DefaultDevice
	}
	if cfg.MTU == 0 {
		cfg.MTU = DefaultMTU
	}
	if cfg.SocketPath == "" {
		cfg.SocketPath = DefaultSocketPath(cfg.Name)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg
}

// checkSocketPath refuses a path a unix socket address cannot hold.
func checkSocketPath(path string) error {
	if len(path) > maxSocketPath {
		return fmt.Errorf("socket path %s is %d bytes; a unix socket path holds at most %d", path, len(path), maxSocketPath)
	}
	if path == "" {
		return errors.New("no socket path")
	}
	return nil
}

// checkLinkName refuses what the kernel refuses as an interface name.
func checkLinkName(name string) error {
	if len(name) == 0 || len(name) >= unix.IFNAMSIZ {
		return fmt.Errorf("link name %q: want 1-%d bytes", name, unix.IFNAMSIZ-1)
	}
	for _, c := range name {
		if c == '/' || c == ':' || c <= ' ' || c >= 0x7f {
			return fmt.Errorf("link name %q: character %q not allowed", name, c)
		}
	}
	return nil
}

// listenUAPI listens on path: the directory is created 0700 when missing,
// the socket file is 0600 from the moment it exists (fchmod of the socket
// before bind sets the file's mode on Linux), and a stale socket file is
// removed first. A socket another process serves is an error.
func listenUAPI(ctx context.Context, path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if err := removeStaleSocket(ctx, path); err != nil {
		return nil, err
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) { err = unix.Fchmod(int(fd), 0o600) }); cerr != nil {
			return cerr
		}
		return err
	}}
	l, err := lc.Listen(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ln := l.(*net.UnixListener)
	// We remove the file ourselves, only while it is still ours.
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		os.Remove(path)
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return ln, nil
}

// removeStaleSocket removes a socket file at path nobody listens on. A
// socket someone serves is an error naming its process; another kind of
// file is an error too.
func removeStaleSocket(ctx context.Context, path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if st.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket (%s)", path, st.Mode().Type())
	}
	c, pid, err := uapiConn{path}.dial(ctx)
	if err == nil {
		c.Close()
		return fmt.Errorf("socket %s is served by process %d", path, pid)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("socket %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	return nil
}

// removeSocketIfOurs removes path when it is still the socket file with
// inode ino (a later device process may have replaced it).
func removeSocketIfOurs(path string, ino uint64) error {
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if ino != 0 && st.Sys().(*syscall.Stat_t).Ino != ino {
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// connSet tracks open UAPI connections so that stopping closes them.
type connSet struct {
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

func newConnSet() *connSet { return &connSet{conns: make(map[net.Conn]struct{})} }

func (s *connSet) add(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *connSet) remove(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
}

func (s *connSet) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
}

// wgLogger adapts wireguard-go's printf logger to slog: its verbose lines
// at debug, its errors at error.
func wgLogger(log *slog.Logger) *device.Logger {
	return &device.Logger{
		Verbosef: func(format string, args ...any) {
			if log.Enabled(context.Background(), slog.LevelDebug) {
				log.Debug(fmt.Sprintf(format, args...), "source", "wireguard-go")
			}
		},
		Errorf: func(format string, args ...any) {
			log.Error(fmt.Sprintf(format, args...), "source", "wireguard-go")
		},
	}
}

// tunOffloads says which offloads the TUN runs with, from its flags (a
// TUN without IFF_VNET_HDR has none).
func tunOffloads(td tun.Device) string {
	nt, ok := td.(*tun.NativeTun)
	if !ok {
		return "unknown"
	}
	var flags uint16
	sc, err := nt.File().SyscallConn()
	if err != nil {
		return "unknown"
	}
	var ioErr error
	sc.Control(func(fd uintptr) {
		var ifr *unix.Ifreq
		ifr, ioErr = unix.NewIfreq("")
		if ioErr == nil {
			ioErr = unix.IoctlIfreq(int(fd), unix.TUNGETIFF, ifr)
			flags = ifr.Uint16()
		}
	})
	if ioErr != nil {
		return "unknown"
	}
	if flags&unix.IFF_VNET_HDR == 0 {
		return "none (no vnet header)"
	}
	return fmt.Sprintf("vnet header, batch %d", td.BatchSize())
}
