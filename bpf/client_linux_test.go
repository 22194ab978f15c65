//go:build linux

package bpf

// Client side of the privileged tests. These functions run in a child
// process (privtest.HelperCommand) that the test places in its cgroup and
// network namespace; they use raw socket calls so that each syscall the
// programs hook (connect, sendmsg, recvmsg, getpeername) is explicit.

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// clientResult counts what a client saw.
type clientResult struct {
	Names  map[string]int `json:"names"`  // which server answered
	Peers  map[string]int `json:"peers"`  // getpeername() / recvfrom() source
	Errors map[string]int `json:"errors"` // failed attempts by message
	OK     int            `json:"ok"`
	Fail   int            `json:"fail"`
	Bench  []benchStat    `json:"bench"` // bench: one per target
}

// benchStat is the bench helper's measurement of the connects to one
// target.
type benchStat struct {
	TotalNS int64 `json:"total_ns"` // summed connect() time
	P50NS   int64 `json:"p50_ns"`   // median connect() time
}

func newResult() *clientResult {
	return &clientResult{Names: map[string]int{}, Peers: map[string]int{}, Errors: map[string]int{}}
}

func (r *clientResult) fail(err error) {
	r.Fail++
	r.Errors[err.Error()]++
}

func writeResult(w io.Writer, r *clientResult) int {
	if err := json.NewEncoder(w).Encode(r); err != nil {
		return 1
	}
	return 0
}

func sockaddr(ap netip.AddrPort) *unix.SockaddrInet4 {
	return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
}

func fromSockaddr(sa unix.Sockaddr) string {
	if s4, ok := sa.(*unix.SockaddrInet4); ok {
		return netip.AddrPortFrom(netip.AddrFrom4(s4.Addr), uint16(s4.Port)).String()
	}
	return fmt.Sprintf("%T", sa)
}

func socket(typ int) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	tv := unix.Timeval{Sec: 2}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	return fd, nil
}

// connect is connect(2) that survives a signal: after EINTR a TCP
// connection attempt goes on, so wait for it to finish.
func connect(fd int, sa unix.Sockaddr) error {
	err := unix.Connect(fd, sa)
	if err != unix.EINTR {
		return err
	}
	for {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		_, err := unix.Poll(fds, 2000)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		break
	}
	soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return err
	}
	if soErr != 0 {
		return unix.Errno(soErr)
	}
	return nil
}

// tcpOnce connects to addr, asks getpeername() who the peer is, and reads
// the server's name line.
func tcpOnce(addr netip.AddrPort) (name, peer string, err error) {
	fd, err := socket(unix.SOCK_STREAM)
	if err != nil {
		return "", "", err
	}
	defer unix.Close(fd)
	if err := connect(fd, sockaddr(addr)); err != nil {
		return "", "", fmt.Errorf("connect: %w", err)
	}
	sa, err := unix.Getpeername(fd)
	if err != nil {
		return "", "", fmt.Errorf("getpeername: %w", err)
	}
	buf := make([]byte, 128)
	n := 0
	for !strings.Contains(string(buf[:n]), "\n") && n < len(buf) {
		m, err := unix.Read(fd, buf[n:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return "", "", fmt.Errorf("read: %w", err)
		}
		if m == 0 {
			break
		}
		n += m
	}
	return strings.TrimSpace(string(buf[:n])), fromSockaddr(sa), nil
}

// helperTCP: args addr count.
func helperTCP(args []string, _ io.Reader, stdout io.Writer) int {
	addr := netip.MustParseAddrPort(args[0])
	count, _ := strconv.Atoi(args[1])
	r := newResult()
	for range count {
		name, peer, err := tcpOnce(addr)
		if err != nil {
			r.fail(err)
			continue
		}
		r.OK++
		r.Names[name]++
		r.Peers[peer]++
	}
	return writeResult(stdout, r)
}

// helperUDP: args addr count mode, mode "sendto" (an unconnected socket)
// or "connect" (connect once, then send). Peers counts the recvfrom()
// source addresses, plus "getpeername=<addr>" for a connected socket.
func helperUDP(args []string, _ io.Reader, stdout io.Writer) int {
	addr := netip.MustParseAddrPort(args[0])
	count, _ := strconv.Atoi(args[1])
	connected := args[2] == "connect"
	r := newResult()
	fd, err := socket(unix.SOCK_DGRAM)
	if err != nil {
		r.fail(err)
		return writeResult(stdout, r)
	}
	defer unix.Close(fd)
	if connected {
		if err := unix.Connect(fd, sockaddr(addr)); err != nil {
			r.fail(fmt.Errorf("connect: %w", err))
			return writeResult(stdout, r)
		}
		sa, err := unix.Getpeername(fd)
		if err != nil {
			r.fail(fmt.Errorf("getpeername: %w", err))
			return writeResult(stdout, r)
		}
		r.Peers["getpeername="+fromSockaddr(sa)]++
	}
	buf := make([]byte, 128)
	for i := range count {
		msg := []byte(fmt.Sprintf("ping %d", i))
		if connected {
			err = unix.Send(fd, msg, 0)
		} else {
			err = unix.Sendto(fd, msg, 0, sockaddr(addr))
		}
		if err != nil {
			r.fail(fmt.Errorf("send: %w", err))
			continue
		}
		n, from, err := unix.Recvfrom(fd, buf, 0)
		for err == unix.EINTR {
			n, from, err = unix.Recvfrom(fd, buf, 0)
		}
		if err != nil {
			r.fail(fmt.Errorf("recvfrom: %w", err))
			continue
		}
		r.OK++
		r.Names[strings.TrimSpace(string(buf[:n]))]++
		r.Peers[fromSockaddr(from)]++
	}
	return writeResult(stdout, r)
}

// helperLoop connects to args[0] over and over (1 ms apart) until its
// stdin closes, then reports.
func helperLoop(args []string, stdin io.Reader, stdout io.Writer) int {
	addr := netip.MustParseAddrPort(args[0])
	var stop atomic.Bool
	go func() {
		io.Copy(io.Discard, stdin)
		stop.Store(true)
	}()
	r := newResult()
	for !stop.Load() {
		name, _, err := tcpOnce(addr)
		if err != nil {
			r.fail(err)
		} else {
			r.OK++
			r.Names[name]++
		}
		time.Sleep(time.Millisecond)
	}
	return writeResult(stdout, r)
}

// helperBenchConnect: args count port target [port2 target2], where a
// target is "vips=N" (connect to the first N test VIPs, nthAddr(198, 19,
// i), in turn) or one IPv4 address. It times connect() alone, closes each
// socket with an RST (SO_LINGER 0) so that no TIME_WAIT builds up, and
// reports the summed and the median connect() time per target. The median
// is what a connect() typically costs; the sum also carries the connects
// that another process preempted. With a second target it makes count
// connects to each, alternating which of the two goes first, so both see
// the machine at the same moments.
func helperBenchConnect(args []string, _ io.Reader, stdout io.Writer) int {
	count, _ := strconv.Atoi(args[0])
	targets := [][]*unix.SockaddrInet4{benchTargets(args[1], args[2])}
	if len(args) >= 5 {
		targets = append(targets, benchTargets(args[3], args[4]))
	}
	r := newResult()
	linger := unix.Linger{Onoff: 1, Linger: 0}
	times := make([][]time.Duration, len(targets))
	for t := range times {
		times[t] = make([]time.Duration, 0, count)
	}
	once := func(t int, i int) error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &linger)
		target := targets[t][i%len(targets[t])]
		start := time.Now()
		err = connect(fd, target)
		times[t] = append(times[t], time.Since(start))
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("connect %s: %w", fromSockaddr(target), err)
		}
		return nil
	}
	for i := range count {
		var err error
		for j := range len(targets) {
			if err = once((i+j)%len(targets), i); err != nil {
				break
			}
		}
		if err != nil {
			r.fail(err)
			break
		}
		r.OK++
	}
	for _, ts := range times {
		var st benchStat
		for _, d := range ts {
			st.TotalNS += d.Nanoseconds()
		}
		if len(ts) > 0 {
			slices.Sort(ts)
			st.P50NS = ts[len(ts)/2].Nanoseconds()
		}
		r.Bench = append(r.Bench, st)
	}
	return writeResult(stdout, r)
}

func benchTargets(port, target string) []*unix.SockaddrInet4 {
	p, _ := strconv.Atoi(port)
	var out []*unix.SockaddrInet4
	if n, ok := strings.CutPrefix(target, "vips="); ok {
		vips, _ := strconv.Atoi(n)
		for i := range vips {
			out = append(out, sockaddr(netip.AddrPortFrom(nthAddr(198, 19, i), uint16(p))))
		}
		return out
	}
	return append(out, sockaddr(netip.AddrPortFrom(netip.MustParseAddr(target), uint16(p))))
}

func parseResult(out []byte) (*clientResult, error) {
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "{") {
			r := newResult()
			if err := json.Unmarshal([]byte(line), r); err != nil {
				return nil, err
			}
			return r, nil
		}
	}
	return nil, errors.New("no result line in client output: " + string(out))
}
