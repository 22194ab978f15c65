package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
)

// podStream is one long-lived TCP connection between two pods that keeps
// exchanging data, as an application's would while the network under it
// changes: the client writes a known byte sequence in chunks, the server
// (a listener the lab opens in the other pod's namespace) echoes it, and
// the client checks every byte that comes back. A reset, a lost or
// corrupted byte ends it with an error; the longest pause between echoes
// is kept. Both sockets are made inside the pods' network namespaces, so
// the bytes travel the pods' paths (veth, node, tunnel or WireGuard).
type podStream struct {
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
	lastEcho time.Time
	maxStall time.Duration
	stallEnd time.Time // when the longest pause ended
}

// streamStats is what a podStream did so far.
type streamStats struct {
	Sent, Echoed int64
	Errors       int
	Err          error
	MaxStall     time.Duration
	StallEnd     time.Time // when the longest pause ended
	Took         time.Duration
}

const (
	podStreamChunk    = 1024
	podStreamInterval = 5 * time.Millisecond
	podStreamTimeout  = 30 * time.Second // a write or an echo that waits longer fails the stream
)

// podStreamByte is byte i of a stream: the marker at the start of every
// chunk (for a capture to look for), then a pattern of the offset.
func podStreamByte(marker []byte, i int64) byte {
	if off := i % podStreamChunk; off < int64(len(marker)) {
		return marker[off]
	}
	return byte(i*7 + i/podStreamChunk)
}

// startPodStream connects pod src to a listener it opens in pod dst on
// port, and keeps them talking until stop or ctx ends. Every chunk starts
// with marker (at most a chunk; may be empty).
func startPodStream(ctx context.Context, src, dst *podLayout, port uint16, marker []byte) (*podStream, error) {
	if len(marker) > podStreamChunk {
		return nil, fmt.Errorf("lab: stream marker of %d bytes, want at most %d", len(marker), podStreamChunk)
	}
	s := &podStream{name: src.ref() + " → " + dst.ref(), marker: marker}
	addr := netip.AddrPortFrom(dst.ip, port).String()
	err := inNetNS(dst.ns, func() error {
		var err error
		s.ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("lab: stream %s: listen: %w", s.name, err)
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := s.ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	dialCtx, cancelDial := context.WithTimeout(ctx, 10*time.Second)
	s.conn, err = dialIn(dialCtx, src.ns, "tcp", addr)
	cancelDial()
	if err != nil {
		s.ln.Close()
		return nil, fmt.Errorf("lab: stream %s: dial: %w", s.name, err)
	}
	var server net.Conn
	select {
	case c, ok := <-accepted:
		if !ok {
			s.ln.Close()
			s.conn.Close()
			return nil, fmt.Errorf("lab: stream %s: accept failed", s.name)
		}
		server = c
	case <-time.After(10 * time.Second):
		s.ln.Close()
		s.conn.Close()
		return nil, fmt.Errorf("lab: stream %s: nothing accepted", s.name)
	}
	ctx, s.cancel = context.WithCancel(ctx)
	s.started = time.Now()
	s.lastEcho = s.started
	s.wg.Add(4)
	go func() { // the server echoes
		defer s.wg.Done()
		io.Copy(server, server)
	}()
	go func() { // stop: close everything, which ends the others
		defer s.wg.Done()
		<-ctx.Done()
		s.conn.Close()
		server.Close()
		s.ln.Close()
	}()
	go func() { // the client writes
		defer s.wg.Done()
		buf := make([]byte, podStreamChunk)
		var off int64
		tick := time.NewTicker(podStreamInterval)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			for i := range buf {
				buf[i] = podStreamByte(s.marker, off+int64(i))
			}
			s.conn.SetWriteDeadline(time.Now().Add(podStreamTimeout))
			n, err := s.conn.Write(buf)
			off += int64(n)
			s.mu.Lock()
			s.sent = off
			s.mu.Unlock()
			if err != nil {
				s.fail(ctx, fmt.Errorf("write after %d bytes: %w", off, err))
				return
			}
		}
	}()
	go func() { // the client checks the echo
		defer s.wg.Done()
		buf := make([]byte, 64<<10)
		var off int64
		for {
			s.conn.SetReadDeadline(time.Now().Add(podStreamTimeout))
			n, err := s.conn.Read(buf)
			now := time.Now()
			for i := range n {
				if want := podStreamByte(s.marker, off+int64(i)); buf[i] != want {
					s.fail(ctx, fmt.Errorf("byte %d came back as %#x, want %#x", off+int64(i), buf[i], want))
					return
				}
			}
			off += int64(n)
			s.mu.Lock()
			if n > 0 {
				if d := now.Sub(s.lastEcho); d > s.maxStall {
					s.maxStall, s.stallEnd = d, now
				}
				s.lastEcho, s.echoed = now, off
			}
			s.mu.Unlock()
			if err != nil {
				s.fail(ctx, fmt.Errorf("read after %d bytes: %w", off, err))
				return
			}
		}
	}()
	return s, nil
}

// fail records the stream's first error, unless it was stopped.
func (s *podStream) fail(ctx context.Context, err error) {
	if ctx.Err() != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		s.err = err
	}
}

func (s *podStream) stats() streamStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := streamStats{Sent: s.sent, Echoed: s.echoed, Err: s.err, MaxStall: s.maxStall, StallEnd: s.stallEnd, Took: time.Since(s.started)}
	if s.err != nil {
		st.Errors = 1
	}
	return st
}

// awaitEcho waits until the stream has echoed more than it had, or fails.
func (s *podStream) awaitEcho(ctx context.Context, timeout time.Duration) error {
	before := s.stats().Echoed
	deadline := time.Now().Add(timeout)
	for {
		st := s.stats()
		switch {
		case st.Err != nil:
			return fmt.Errorf("lab: stream %s: %w", s.name, st.Err)
		case st.Echoed > before:
			return nil
		case time.Now().After(deadline):
			return fmt.Errorf("lab: stream %s: nothing echoed for %s", s.name, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stop ends the stream and returns what it did.
func (s *podStream) stop() streamStats {
	if s == nil {
		return streamStats{}
	}
	s.cancel()
	s.wg.Wait()
	st := s.stats()
	if st.Err != nil && errors.Is(st.Err, net.ErrClosed) {
		st.Err, st.Errors = nil, 0
	}
	return st
}
