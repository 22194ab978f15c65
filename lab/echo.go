package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"
)

// Identity is what an echo pod answers: who it is.
type Identity struct {
	Cluster string `json:"cluster"`
	Node    string `json:"node"`
	Pod     string `json:"pod"`
}

func (id Identity) String() string { return id.Cluster + "/" + id.Node + "/" + id.Pod }

// EchoServer answers every HTTP request on TCP port and every UDP datagram
// on the same UDP port with id as JSON, until ctx ends. It runs inside an
// echo pod (`trellis lab echo-server`).
func EchoServer(ctx context.Context, id Identity, port int) error {
	body, _ := json.Marshal(id)
	body = append(body, '\n')
	addr := net.JoinHostPort("", strconv.Itoa(port))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("echo: listen tcp %s: %w", addr, err)
	}
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		ln.Close()
		return fmt.Errorf("echo: listen udp %s: %w", addr, err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.Write(body)
		}),
		ReadHeaderTimeout: 5 * time.Second,
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		srv.Serve(ln)
	}()
	go func() {
		defer wg.Done()
		buf := make([]byte, 2048)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(body, from)
		}
	}()
	<-ctx.Done()
	shutdown, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	srv.Shutdown(shutdown)
	pc.Close()
	wg.Wait()
	return nil
}

// Probe is the outcome of one request a pod made.
type Probe struct {
	Target  string   `json:"target"`
	OK      bool     `json:"ok"`
	From    Identity `json:"from,omitzero"` // who answered
	Error   string   `json:"error,omitempty"`
	Latency string   `json:"latency"`
	// At is when the request started.
	At time.Time `json:"at,omitzero"`
}

// HTTPGet sends count requests to each target and writes one Probe per
// request as a JSON line to out. A target is an http:// URL (a GET on a
// fresh connection each time, so each one passes the socket LB's connect
// hook) or udp://host:port (one datagram, one answer, through the
// sendmsg/recvmsg hooks). It runs inside a pod (`trellis lab http-get`),
// so the requests come from the pod's namespace and cgroup.
func HTTPGet(ctx context.Context, out io.Writer, targets []string, count int, timeout time.Duration) (failed int) {
	enc := json.NewEncoder(out)
	client := &http.Client{Timeout: timeout, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	for _, t := range targets {
		for range count {
			start := time.Now()
			p := Probe{Target: t, At: start}
			id, err := probeOnce(ctx, client, t, timeout)
			p.Latency = time.Since(start).Round(time.Microsecond).String()
			if err != nil {
				p.Error = err.Error()
				failed++
			} else {
				p.OK, p.From = true, id
			}
			enc.Encode(p)
		}
	}
	return failed
}

func probeOnce(ctx context.Context, client *http.Client, target string, timeout time.Duration) (Identity, error) {
	var id Identity
	u, err := url.Parse(target)
	if err != nil {
		return id, err
	}
	var body []byte
	switch u.Scheme {
	case "http":
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
		if err != nil {
			return id, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return id, err
		}
		defer resp.Body.Close()
		body, err = io.ReadAll(io.LimitReader(resp.Body, 4096))
		if err != nil {
			return id, err
		}
		if resp.StatusCode != http.StatusOK {
			return id, fmt.Errorf("%s", resp.Status)
		}
	case "udp":
		// An unconnected socket, so the datagram passes the sendmsg hook
		// and the answer the recvmsg hook, which must make it appear to
		// come from the address it was sent to.
		dst, err := net.ResolveUDPAddr("udp4", u.Host)
		if err != nil {
			return id, err
		}
		pc, err := net.ListenPacket("udp4", ":0")
		if err != nil {
			return id, err
		}
		defer pc.Close()
		pc.SetDeadline(time.Now().Add(timeout))
		if _, err := pc.WriteTo([]byte("trellis-lab\n"), dst); err != nil {
			return id, err
		}
		buf := make([]byte, 2048)
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return id, err
		}
		if f, ok := from.(*net.UDPAddr); !ok || !f.IP.Equal(dst.IP) || f.Port != dst.Port {
			return id, fmt.Errorf("the answer came from %s, not %s", from, dst)
		}
		body = buf[:n]
	default:
		return id, fmt.Errorf("target %q: want http:// or udp://", target)
	}
	if err := json.Unmarshal(body, &id); err != nil || id.Pod == "" {
		return id, errors.New("the answer is not an echo pod's")
	}
	return id, nil
}
