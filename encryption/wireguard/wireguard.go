package wireguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Defaults. Every node of a mesh must agree on the port.
const (
	// DefaultDevice is the WireGuard link's name.
	DefaultDevice = "trellis_wg"
	// DefaultPort is the UDP port WireGuard listens on and sends to.
	DefaultPort = 51871
	// Overhead is what WireGuard adds to a packet in the worst case, an
	// IPv6 underlay: outer IPv6 header 40 + UDP 8 + WireGuard data header
	// 16 + authentication tag 16.
	Overhead = 80
	// DefaultMTU is the device's MTU over a 1500-byte underlay.
	DefaultMTU = 1500 - Overhead
	// DefaultStartTimeout bounds how long Open waits for a device process
	// it started to serve its socket.
	DefaultStartTimeout = 10 * time.Second
	// DefaultStopTimeout bounds how long Remove waits for a device process
	// to exit after SIGTERM before it sends SIGKILL.
	DefaultStopTimeout = 5 * time.Second
	// DefaultSocketDir holds the UAPI sockets of DefaultSocketPath.
	DefaultSocketDir = "/var/run/trellis/wireguard"
)

// DefaultSocketPath is where the device process of the link name serves
// its UAPI when the Config names no path: DefaultSocketDir/<name>.sock.
// Nodes that share a machine (the lab) must pass paths of their own.
func DefaultSocketPath(name string) string { return filepath.Join(DefaultSocketDir, name+".sock") }

// Mode says which WireGuard implementation runs the device.
type Mode string

const (
	// ModeAuto uses the kernel's WireGuard where the kernel has it, and
	// the userspace device process otherwise.
	ModeAuto Mode = ""
	// ModeKernel is a link of type "wireguard".
	ModeKernel Mode = "kernel"
	// ModeUserspace is wireguard-go in a device process of its own.
	ModeUserspace Mode = "userspace"
)

// Errors callers test with errors.Is.
var (
	// ErrDeviceGone means the device process is no longer there: nobody
	// listens on its socket. Open again to start a new one.
	ErrDeviceGone = errors.New("device process gone")
	// ErrClosed is returned by the methods of a closed Device.
	ErrClosed = errors.New("wireguard: device handle closed")
)

// Config says where a node's device is and how to start it. The zero
// value of every field but StartCommand is usable.
type Config struct {
	// Name is the link's name; default DefaultDevice.
	Name string
	// Port is the listen port Configure uses when its DeviceConfig has
	// none; default DefaultPort.
	Port int
	// MTU of a device Open creates; default DefaultMTU. A device that is
	// adopted keeps its MTU.
	MTU int
	// Mode defaults to ModeAuto.
	Mode Mode
	// SocketPath is the device process's UAPI socket; default
	// DefaultSocketPath(Name). At most 107 bytes.
	SocketPath string
	// StartCommand is the argv that starts a device process, without the
	// flags: Open appends --name, --mtu and --socket. The agent passes its
	// own executable and "agent", "wireguard-device". Needed only when
	// there is no device yet in userspace mode.
	StartCommand []string
	// StartEnv is the started process's environment; nil means the
	// caller's.
	StartEnv []string
	// LogPath receives the started process's stdout and stderr (appended,
	// created 0600); default SocketPath with ".log" for ".sock".
	LogPath string
	// StartTimeout bounds the wait for a started process's socket; default
	// DefaultStartTimeout.
	StartTimeout time.Duration
	// Logger defaults to discarding.
	Logger *slog.Logger
}

func (cfg Config) withDefaults() Config {
	if cfg.Name == "" {
		cfg.Name = DefaultDevice
	}
	if cfg.Port == 0 {
		cfg.Port = DefaultPort
	}
	if cfg.MTU == 0 {
		cfg.MTU = DefaultMTU
	}
	if cfg.SocketPath == "" {
		cfg.SocketPath = DefaultSocketPath(cfg.Name)
	}
	if cfg.LogPath == "" {
		cfg.LogPath = strings.TrimSuffix(cfg.SocketPath, ".sock") + ".log"
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = DefaultStartTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg
}

func (cfg Config) check() error {
	if err := checkLinkName(cfg.Name); err != nil {
		return err
	}
	if cfg.Port < 1 || cfg.Port > 65535 {
		return fmt.Errorf("port %d out of range", cfg.Port)
	}
	if cfg.MTU < 576 || cfg.MTU > 65535 {
		return fmt.Errorf("MTU %d out of range (576-65535)", cfg.MTU)
	}
	switch cfg.Mode {
	case ModeAuto, ModeKernel:
	case ModeUserspace:
	default:
		return fmt.Errorf("mode %q: want kernel, userspace or empty (auto)", cfg.Mode)
	}
	if cfg.Mode != ModeKernel {
		if err := checkSocketPath(cfg.SocketPath); err != nil {
			return err
		}
	}
	return nil
}

// backend is one implementation's way to read and write a device.
type backend interface {
	get(ctx context.Context) (state, error)
	set(ctx context.Context, cfg wgtypes.Config) error
	close() error
}

// Device is a handle on a node's WireGuard device. Its methods are safe
// for concurrent use; Configure calls run one at a time.
type Device struct {
	cfg  Config
	mode Mode
	log  *slog.Logger

	mu     sync.Mutex // serializes Configure; guards closed
	closed bool
	b      backend
	user   *userspace // the backend in userspace mode
}

// Open returns a handle on the device cfg names, creating it when there
// is none:
//
//   - a kernel WireGuard link of that name is adopted as it is;
//   - in ModeAuto and ModeKernel with no link, one is created where the
//     kernel has WireGuard (ModeKernel fails wrapping errors.ErrUnsupported
//     where it has not);
//   - otherwise the device process serving SocketPath is adopted as it is
//     (peers and sessions untouched), or, when nobody serves it, a stale
//     socket file is removed and StartCommand started in a session of its
//     own, and Open waits (StartTimeout) for its socket.
//
// A link of that name that is neither (or a TUN without a device process)
// is an error naming it. Open works in the caller's network namespace:
// the link is looked up and created there, and a started device process is
// born there.
func Open(ctx context.Context, cfg Config) (*Device, error) {
	cfg = cfg.withDefaults()
	if err := cfg.check(); err != nil {
		return nil, fmt.Errorf("wireguard: device %s: %w", cfg.Name, err)
	}
	d := &Device{cfg: cfg, log: cfg.Logger}
	link, err := netlink.LinkByName(cfg.Name)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		link = nil
	case err != nil:
		return nil, fmt.Errorf("wireguard: device %s: look up link: %w", cfg.Name, err)
	}

	if cfg.Mode != ModeUserspace && (link == nil || link.Type() == "wireguard") {
		kb, err := openKernel(cfg, link)
		switch {
		case err == nil:
			d.mode, d.b = ModeKernel, kb
			return d, nil
		case cfg.Mode == ModeKernel || !errors.Is(err, errors.ErrUnsupported):
			return nil, fmt.Errorf("wireguard: device %s: %w", cfg.Name, err)
		}
		cfg.Logger.Debug("kernel WireGuard unavailable; using the userspace device", "device", cfg.Name, "reason", err)
	}
	if link != nil && !isTUN(link) {
		return nil, fmt.Errorf("wireguard: device %s: a %s link of that name exists and is not a WireGuard device; delete it or choose another name", cfg.Name, link.Type())
	}
	u, err := openUserspace(ctx, cfg, link != nil)
	if err != nil {
		return nil, fmt.Errorf("wireguard: device %s: %w", cfg.Name, err)
	}
	d.mode, d.b, d.user = ModeUserspace, u, u
	return d, nil
}

// isTUN reports whether l is a TUN link (a wireguard-go device's kind).
func isTUN(l netlink.Link) bool {
	t, ok := l.(*netlink.Tuntap)
	return ok && t.Mode == netlink.TUNTAP_MODE_TUN
}

// Name is the link's name.
func (d *Device) Name() string { return d.cfg.Name }

// Mode is ModeKernel or ModeUserspace.
func (d *Device) Mode() Mode { return d.mode }

// PID is the device process's PID (as the kernel saw it on the last
// exchange with the process), 0 for a kernel device.
func (d *Device) PID() int {
	if d.user == nil {
		return 0
	}
	return d.user.lastPID()
}

// Configure makes the device hold exactly cfg: it reads the device and
// writes only the differences, in one operation (see the package's design
// notes). It returns what it wrote; nothing when the device was
// converged.
func (d *Device) Configure(ctx context.Context, cfg DeviceConfig) (ConfigureResult, error) {
	want, err := cfg.normalize(d.cfg.Port)
	if err != nil {
		return ConfigureResult{}, fmt.Errorf("wireguard: configure %s: %w", d.cfg.Name, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ConfigureResult{}, ErrClosed
	}
	cur, err := d.b.get(ctx)
	if err != nil {
		return ConfigureResult{}, fmt.Errorf("wireguard: configure %s: read device: %w", d.cfg.Name, err)
	}
	set, res := plan(cur, want)
	if !res.Changed() {
		return res, nil
	}
	if err := d.b.set(ctx, set); err != nil {
		return ConfigureResult{}, fmt.Errorf("wireguard: configure %s: %s: %w", d.cfg.Name, describe(res), err)
	}
	d.log.Info("configured WireGuard device", "device", d.cfg.Name, "changes", describe(res))
	return res, nil
}

// describe summarizes res for logs and errors.
func describe(res ConfigureResult) string {
	var parts []string
	if res.PrivateKey {
		parts = append(parts, "private key")
	}
	if res.ListenPort {
		parts = append(parts, "listen port")
	}
	for _, p := range []struct {
		verb string
		keys []wgtypes.Key
	}{{"add", res.Added}, {"update", res.Updated}, {"remove", res.Removed}} {
		if len(p.keys) == 0 {
			continue
		}
		names := make([]string, len(p.keys))
		for i, k := range p.keys {
			names[i] = k.String()
		}
		parts = append(parts, fmt.Sprintf("%s peer %s", p.verb, strings.Join(names, ", ")))
	}
	if len(parts) == 0 {
		return "nothing"
	}
	return strings.Join(parts, "; ")
}

// Status reads the device.
func (d *Device) Status(ctx context.Context) (Status, error) {
	d.mu.Lock()
	closed := d.closed
	d.mu.Unlock()
	if closed {
		return Status{}, ErrClosed
	}
	s, err := d.b.get(ctx)
	if err != nil {
		return Status{}, fmt.Errorf("wireguard: status of %s: %w", d.cfg.Name, err)
	}
	st := statusFrom(s)
	st.Name, st.Mode, st.PID = d.cfg.Name, d.mode, d.PID()
	return st, nil
}

// Close releases the handle and leaves the device running. Safe on nil
// and twice.
func (d *Device) Close() error {
	if d == nil {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	return d.b.close()
}

// Remove takes the device cfg names down, whether a handle is open or
// not: a device process serving SocketPath gets SIGTERM (SIGKILL after
// DefaultStopTimeout) and Remove waits for it to exit and removes the
// socket; a kernel link of that name is deleted. Nothing there is not an
// error. Like Open it works in the caller's network namespace.
func Remove(ctx context.Context, cfg Config) error {
	cfg = cfg.withDefaults()
	if err := cfg.check(); err != nil {
		return fmt.Errorf("wireguard: remove device %s: %w", cfg.Name, err)
	}
	var errs []error
	if cfg.Mode != ModeKernel {
		if err := stopDeviceProcess(ctx, cfg, DefaultStopTimeout); err != nil {
			errs = append(errs, err)
		}
	}
	link, err := netlink.LinkByName(cfg.Name)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
	case err != nil:
		errs = append(errs, fmt.Errorf("look up link: %w", err))
	case link.Type() == "wireguard" && cfg.Mode != ModeUserspace:
		if err := netlink.LinkDel(link); err != nil && !errors.Is(err, syscall.ENODEV) {
			errs = append(errs, fmt.Errorf("delete link: %w", err))
		} else {
			cfg.Logger.Info("deleted kernel WireGuard device", "device", cfg.Name)
		}
	case isTUN(link):
		// The process that held it has exited; the kernel deletes a TUN
		// link with its last file descriptor, a moment later.
		if err := waitLinkGone(ctx, cfg.Name, 2*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("wireguard: remove device %s: %w", cfg.Name, err)
	}
	return nil
}

// waitLinkGone waits up to timeout for the link name to disappear.
func waitLinkGone(ctx context.Context, name string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, err := netlink.LinkByName(name)
		var notFound netlink.LinkNotFoundError
		if errors.As(err, &notFound) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("link %s still there %s after its device process exited", name, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
