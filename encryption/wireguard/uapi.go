package wireguard

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// The UAPI configuration protocol (https://www.wireguard.com/xplatform/),
// client side: one connection per operation. A "get=1\n\n" request is
// answered by key=value lines and "errno=N" and a blank line; a "set=1\n"
// request carries key=value lines and a blank line, and is answered by
// "errno=N" and a blank line. wireguard-go stops reading a set at its first
// error and then reads the rest of the request as the next operation (and
// closes the connection), so a connection is never reused.

// defaultOpTimeout bounds one UAPI operation when ctx has no deadline.
const defaultOpTimeout = 10 * time.Second

// maxUAPIResponse bounds what a get may return: about 300 bytes per peer
// plus 40 per allowed IP, so 64 MiB is some 100 000 peers.
const maxUAPIResponse = 64 << 20

// UAPIError is a non-zero errno the device answered an operation with.
// wireguard-go's codes are negated errno values: -EINVAL (-22) for a line
// it refused, -EADDRINUSE (-98) for a listen port in use, -EPROTO (-71) for
// a line that is not key=value, -EIO (-5) for an I/O failure.
type UAPIError struct {
	// Op is "get" or "set".
	Op string
	// Errno is the device's answer, e.g. -22.
	Errno int64
}

func (e *UAPIError) Error() string {
	msg := fmt.Sprintf("uapi %s: errno=%d", e.Op, e.Errno)
	if e.Errno < 0 && e.Errno > -4096 {
		msg += " (" + unix.Errno(-e.Errno).Error() + ")"
	}
	return msg
}

// state is what a device holds, as a get returns it.
type state struct {
	PrivateKey   wgtypes.Key
	ListenPort   int
	FirewallMark int
	Peers        []peerState
}

// peerState is one peer of a state.
type peerState struct {
	PublicKey           wgtypes.Key
	PresharedKey        wgtypes.Key
	Endpoint            netip.AddrPort
	AllowedIPs          []netip.Prefix
	PersistentKeepalive time.Duration
	LastHandshake       time.Time
	RxBytes, TxBytes    int64
}

// uapiConn is a client of one UAPI socket.
type uapiConn struct {
	path string
}

// dial connects to the socket and returns the connection and the PID of
// the process that listens on it (its peer credentials).
func (u uapiConn) dial(ctx context.Context) (*net.UnixConn, int, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", u.path)
	if err != nil {
		return nil, 0, err
	}
	uc := c.(*net.UnixConn)
	pid, err := peerPID(uc)
	if err != nil {
		uc.Close()
		return nil, 0, err
	}
	return uc, pid, nil
}

// peerPID returns the PID in the peer credentials of c: for a client, the
// process that called listen on the socket.
func peerPID(c *net.UnixConn) (int, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", credErr)
	}
	return int(cred.Pid), nil
}

// do runs one operation: it writes req and reads the answer up to its
// blank line, returning the key=value lines before errno.
func (u uapiConn) do(ctx context.Context, op string, req []byte) ([]byte, int, error) {
	c, pid, err := u.dial(ctx)
	if err != nil {
		return nil, 0, err
	}
	defer c.Close()
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(defaultOpTimeout)
	}
	c.SetDeadline(deadline)
	// Unblock the read when ctx ends before the deadline.
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if _, err := c.Write(req); err != nil {
		return nil, pid, fmt.Errorf("uapi %s: write: %w", op, err)
	}
	body, err := readResponse(io.LimitReader(c, maxUAPIResponse), op)
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("%w (%w)", err, ctx.Err())
	}
	return body, pid, err
}

// readResponse reads one answer: lines up to and including the blank line
// that ends it. It returns the lines before "errno=", or the UAPIError.
func readResponse(r io.Reader, op string) ([]byte, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	var body []byte
	for {
		line, err := br.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			return nil, fmt.Errorf("uapi %s: line longer than 64 KiB", op)
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("uapi %s: read answer: %w", op, err)
		}
		if v, ok := strings.CutPrefix(string(line), "errno="); ok {
			errno, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return nil, fmt.Errorf("uapi %s: bad errno line %q", op, strings.TrimSpace(string(line)))
			}
			// The blank line that ends the answer.
			if end, err := br.ReadSlice('\n'); err != nil || len(end) != 1 {
				return nil, fmt.Errorf("uapi %s: no blank line after errno=%d", op, errno)
			}
			if errno != 0 {
				return nil, &UAPIError{Op: op, Errno: errno}
			}
			return body, nil
		}
		if len(line) == 1 {
			return nil, fmt.Errorf("uapi %s: answer ended without errno", op)
		}
		body = append(body, line...)
	}
}

// get reads the device's state.
func (u uapiConn) get(ctx context.Context) (state, int, error) {
	body, pid, err := u.do(ctx, "get", []byte("get=1\n\n"))
	if err != nil {
		return state{}, pid, err
	}
	s, err := parseGet(body)
	return s, pid, err
}

// set writes cfg.
func (u uapiConn) set(ctx context.Context, cfg wgtypes.Config) (int, error) {
	_, pid, err := u.do(ctx, "set", formatSet(cfg))
	return pid, err
}

// parseGet parses the key=value lines of a get answer. Keys it does not
// know are skipped, as the protocol asks, so a newer device still reads.
func parseGet(body []byte) (state, error) {
	var s state
	var peer *peerState
	var hsSec, hsNsec int64
	finishPeer := func() {
		if peer == nil {
			return
		}
		if hsSec != 0 || hsNsec != 0 {
			peer.LastHandshake = time.Unix(hsSec, hsNsec)
		}
		s.Peers = append(s.Peers, *peer)
		peer, hsSec, hsNsec = nil, 0, 0
	}
	for _, line := range strings.Split(strings.TrimSuffix(string(body), "\n"), "\n") {
		if line == "" {
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			return state{}, fmt.Errorf("uapi get: line %q is not key=value", line)
		}
		var err error
		switch key {
		case "public_key":
			finishPeer()
			peer = &peerState{}
			peer.PublicKey, err = parseHexKey(value)
		case "private_key":
			s.PrivateKey, err = parseHexKey(value)
		case "listen_port":
			s.ListenPort, err = strconv.Atoi(value)
		case "fwmark":
			s.FirewallMark, err = strconv.Atoi(value)
		default:
			if peer == nil {
				// An unknown device key.
				continue
			}
			switch key {
			case "preshared_key":
				peer.PresharedKey, err = parseHexKey(value)
			case "endpoint":
				peer.Endpoint, err = netip.ParseAddrPort(value)
				peer.Endpoint = netip.AddrPortFrom(peer.Endpoint.Addr().Unmap(), peer.Endpoint.Port())
			case "allowed_ip":
				var p netip.Prefix
				p, err = netip.ParsePrefix(value)
				peer.AllowedIPs = append(peer.AllowedIPs, p)
			case "persistent_keepalive_interval":
				var secs int
				secs, err = strconv.Atoi(value)
				peer.PersistentKeepalive = time.Duration(secs) * time.Second
			case "last_handshake_time_sec":
				hsSec, err = strconv.ParseInt(value, 10, 64)
			case "last_handshake_time_nsec":
				hsNsec, err = strconv.ParseInt(value, 10, 64)
			case "rx_bytes":
				peer.RxBytes, err = strconv.ParseInt(value, 10, 64)
			case "tx_bytes":
				peer.TxBytes, err = strconv.ParseInt(value, 10, 64)
			}
		}
		if err != nil {
			return state{}, fmt.Errorf("uapi get: %s: %w", line, err)
		}
	}
	finishPeer()
	return s, nil
}

// parseHexKey parses a key as the UAPI writes it: 64 hex digits.
func parseHexKey(s string) (wgtypes.Key, error) {
	var k wgtypes.Key
	if len(s) != 2*wgtypes.KeyLen {
		return k, fmt.Errorf("key of %d hex digits, want %d", len(s), 2*wgtypes.KeyLen)
	}
	if _, err := hex.Decode(k[:], []byte(s)); err != nil {
		return k, err
	}
	return k, nil
}

// formatSet writes cfg as a set request. Peers go in cfg's order; within
// a peer, update_only comes first, so a peer removed meanwhile is not
// created again with half its settings, and replace_allowed_ips comes
// before its allowed_ip lines.
func formatSet(cfg wgtypes.Config) []byte {
	var b strings.Builder
	b.WriteString("set=1\n")
	if cfg.PrivateKey != nil {
		fmt.Fprintf(&b, "private_key=%s\n", hex.EncodeToString(cfg.PrivateKey[:]))
	}
	if cfg.ListenPort != nil {
		fmt.Fprintf(&b, "listen_port=%d\n", *cfg.ListenPort)
	}
	if cfg.FirewallMark != nil {
		fmt.Fprintf(&b, "fwmark=%d\n", *cfg.FirewallMark)
	}
	if cfg.ReplacePeers {
		b.WriteString("replace_peers=true\n")
	}
	for _, p := range cfg.Peers {
		fmt.Fprintf(&b, "public_key=%s\n", hex.EncodeToString(p.PublicKey[:]))
		if p.Remove {
			b.WriteString("remove=true\n")
			continue
		}
		if p.UpdateOnly {
			b.WriteString("update_only=true\n")
		}
		if p.PresharedKey != nil {
			fmt.Fprintf(&b, "preshared_key=%s\n", hex.EncodeToString(p.PresharedKey[:]))
		}
		if p.Endpoint != nil {
			ap := p.Endpoint.AddrPort()
			fmt.Fprintf(&b, "endpoint=%s\n", netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
		}
		if p.PersistentKeepaliveInterval != nil {
			fmt.Fprintf(&b, "persistent_keepalive_interval=%d\n", int(p.PersistentKeepaliveInterval.Seconds()))
		}
		if p.ReplaceAllowedIPs {
			b.WriteString("replace_allowed_ips=true\n")
		}
		for _, a := range p.AllowedIPs {
			pfx, ok := ipNetToPrefix(a)
			if ok {
				fmt.Fprintf(&b, "allowed_ip=%s\n", pfx)
			}
		}
	}
	b.WriteString("\n")
	return []byte(b.String())
}

// ipNetToPrefix converts wgtypes' net.IPNet into a prefix.
func ipNetToPrefix(n net.IPNet) (netip.Prefix, bool) {
	addr, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, bits := n.Mask.Size()
	if bits == 0 {
		return netip.Prefix{}, false
	}
	if bits == 32 {
		addr = addr.Unmap()
	}
	return netip.PrefixFrom(addr, ones), true
}

// prefixToIPNet is ipNetToPrefix's inverse.
func prefixToIPNet(p netip.Prefix) net.IPNet {
	return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// sortPeers orders peers by public key, so that output is stable.
func sortPeers(ps []peerState) {
	sort.Slice(ps, func(i, j int) bool { return keyLess(ps[i].PublicKey, ps[j].PublicKey) })
}

func keyLess(a, b wgtypes.Key) bool { return string(a[:]) < string(b[:]) }
