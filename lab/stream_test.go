package lab

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/trellis-mesh/trellis/internal/privtest"
)

// tcpStream is one long-lived TCP connection between two pods that keeps
// exchanging data for the whole test: the client writes a known byte
// sequence (with a marker string in every chunk, for captures to look
// for), the server echoes it, and the client checks every byte it gets
// back. A reset, a lost or corrupted byte, or a pause longer than
// streamStallLimit fails it. The sockets are made inside the pods'
// network namespaces, so they travel the pods' paths.
type tcpStream struct {
	name   string
	marker []byte
	ln     net.Listener
	conn   net.Conn
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	err      error
	sent     int64
	echoed   int64
	started  time.Time
	lastRead time.Time
	maxStall time.Duration
	stallEnd time.Time // when the longest pause ended
}

const (
	streamChunk      = 1024
	streamInterval   = 5 * time.Millisecond
	streamStallLimit = 30 * time.Second
)

// streamByte is byte i of every stream: the marker at the start of each
// chunk, then a pattern that depends on the offset.
func streamByte(marker []byte, i int64) byte {
	if off := i % streamChunk; off < int64(len(marker)) {
		return marker[off]
	}
	return byte(i*7 + i/streamChunk)
}

// startStream connects client pod src to a listener it opens in pod dst
// on port.
func startStream(t *testing.T, src, dst *podLayout, port int, marker []byte) *tcpStream {
	t.Helper()
	s := &tcpStream{name: src.ref() + "→" + dst.ref(), marker: marker}
	addr := netip.AddrPortFrom(dst.ip, uint16(port)).String()
	inNS(t, dst.ns, func() error {
		var err error
		s.ln, err = net.Listen("tcp", addr)
		return err
	})
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := s.ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	inNS(t, src.ns, func() error {
		var err error
		s.conn, err = net.DialTimeout("tcp", addr, 10*time.Second)
		return err
	})
	server, ok := <-accepted
	if !ok {
		t.Fatalf("stream %s: accept failed", s.name)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.started = time.Now()
	s.lastRead = s.started
	s.wg.Add(3)
	go func() { // echo
		defer s.wg.Done()
		_, err := io.Copy(server, server)
		if err != nil && ctx.Err() == nil {
			s.fail(fmt.Errorf("server side: %w", err))
		}
		server.Close()
	}()
	go func() { // writer
		defer s.wg.Done()
		buf := make([]byte, streamChunk)
		tick := time.NewTicker(streamInterval)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			s.mu.Lock()
			off := s.sent
			s.mu.Unlock()
			for i := range buf {
				buf[i] = streamByte(marker, off+int64(i))
			}
			s.conn.SetWriteDeadline(time.Now().Add(streamStallLimit))
			if _, err := s.conn.Write(buf); err != nil {
				if ctx.Err() == nil {
					s.fail(fmt.Errorf("write at byte %d: %w", off, err))
				}
				return
			}
			s.mu.Lock()
			s.sent += int64(len(buf))
			s.mu.Unlock()
		}
	}()
	go func() { // reader
		defer s.wg.Done()
		buf := make([]byte, 64<<10)
		for {
			s.conn.SetReadDeadline(time.Now().Add(streamStallLimit))
			n, err := s.conn.Read(buf)
			now := time.Now()
			s.mu.Lock()
			if n > 0 {
				if d := now.Sub(s.lastRead); d > s.maxStall {
					s.maxStall, s.stallEnd = d, now
				}
				s.lastRead = now
			}
			for i := range n {
				if want := streamByte(marker, s.echoed+int64(i)); buf[i] != want {
					s.mu.Unlock()
					s.fail(fmt.Errorf("byte %d came back as %#x, want %#x", s.echoed+int64(i), buf[i], want))
					return
				}
			}
			s.echoed += int64(n)
			s.mu.Unlock()
			if err != nil {
				if ctx.Err() == nil {
					s.fail(fmt.Errorf("read after %d bytes: %w", s.echoed, err))
				}
				return
			}
		}
	}()
	t.Cleanup(s.stop)
	return s
}

func (s *tcpStream) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		s.err = err
	}
}

// progress returns the bytes echoed so far and the first error.
func (s *tcpStream) progress() (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.echoed, s.err
}

func (s *tcpStream) stop() {
	if s.cancel == nil {
		return
	}
	s.cancel()
	s.conn.Close()
	s.ln.Close()
	s.wg.Wait()
	s.cancel = nil
}

// check fails t when the stream broke, and otherwise waits (up to 30 s)
// for it to move on: it must still be alive, not merely not dead yet.
func (s *tcpStream) check(t *testing.T, when string) {
	t.Helper()
	start, err := s.progress()
	deadline := time.Now().Add(30 * time.Second)
	for err == nil {
		var now int64
		now, err = s.progress()
		if now >= start+16*streamChunk {
			return
		}
		if time.Now().After(deadline) {
			err = fmt.Errorf("no progress for 30 s (%d bytes echoed)", now)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("TCP stream %s %s: %v", s.name, when, err)
}

// summary is the stream's figures for the log.
func (s *tcpStream) summary() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Sprintf("%s: %s echoed, longest pause %s (ended %s after the stream started, at %s), error %v", s.name, formatBytes(s.echoed),
		s.maxStall.Round(time.Millisecond), s.stallEnd.Sub(s.started).Round(time.Millisecond), s.stallEnd.Format("15:04:05.000"), s.err)
}

func formatBytes(n int64) string {
	if n < 1<<20 {
		return strconv.FormatInt(n>>10, 10) + " KiB"
	}
	return strconv.FormatInt(n>>20, 10) + " MiB"
}

// inNS runs fn in the named network namespace (a socket made there stays
// there).
func inNS(t *testing.T, name string, fn func() error) {
	t.Helper()
	ns, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("open netns %s: %v", name, err)
	}
	defer ns.Close()
	if err := privtest.InNetNS(ns, fn); err != nil {
		t.Fatalf("in netns %s: %v", name, err)
	}
}
