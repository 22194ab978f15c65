package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// The demo's encryption step: a TCP stream between the clusters keeps
// running while WireGuard is switched on in both, and a capture on the
// underlay bridge shows a pod's payload readable in VXLAN frames before
// and nowhere after, when every node↔node frame is WireGuard's.

const (
	demoStreamPort   = 9400
	demoCaptureFor   = 3 * time.Second
	demoMarkerSends  = 5
	demoStreamFrom   = "eu/client"
	demoStreamTo     = "us/echo-n2"
	demoMarkerTarget = "us/echo-n1"
)

func (d *demo) encryption(ctx context.Context) error {
	d.step("Transparent encryption: WireGuard between every node, switched on live")
	l, err := open(d.opts, false)
	if err != nil {
		return err
	}
	from, err := l.lay.pod(demoStreamFrom)
	if err != nil {
		l.close()
		return err
	}
	to, err := l.lay.pod(demoStreamTo)
	if err != nil {
		l.close()
		return err
	}
	target, err := l.lay.pod(demoMarkerTarget)
	l.close()
	if err != nil {
		return err
	}
	// Requests go to both clusters again, so that they cross the underlay.
	if err := Annotate(ctx, d.opts, "eu", "default/echo", []string{"trellis.io/affinity-"}); err != nil {
		return err
	}
	stream, err := startPodStream(ctx, from, to, demoStreamPort, nil)
	if err != nil {
		return err
	}
	defer stream.stop()
	if err := stream.awaitEcho(ctx, 10*time.Second); err != nil {
		return err
	}
	d.say("      a TCP stream %s (%s:%d) echoes 1 KiB every %s, checked byte by byte",
		stream.name, to.ip, demoStreamPort, podStreamInterval)

	suffix := make([]byte, 4)
	rand.Read(suffix)
	marker := []byte("TRELLIS-SECRET-" + hex.EncodeToString(suffix))
	url := fmt.Sprintf("http://%s/%s", netip.AddrPortFrom(target.ip, EchoPort), marker)
	d.say("      capture %s on the underlay bridge while %s sends GET %s (%d times):",
		demoCaptureFor, from.ref(), url, demoMarkerSends)
	clear, err := d.captureWithMarker(ctx, marker, from, url)
	if err != nil {
		return err
	}
	d.captureSummary(clear)
	if clear.MarkerFrames == 0 {
		return fmt.Errorf("demo: the capture did not see the marker in clear VXLAN: %s", clear)
	}
	d.say("      in clear: anyone on the underlay reads the pods' payload inside VXLAN (udp/8472)")

	d.say("\n      trellis lab encryption enable (WireGuard, every cluster; the stream keeps going):")
	opts := d.opts
	opts.Out = &indentWriter{w: d.out, indent: "        "}
	if err := SetEncryption(ctx, opts, nil, v1.EncryptionRequest{Type: v1.EncryptionWireGuard}); err != nil {
		return err
	}
	rep, err := Status(ctx, d.opts)
	if err != nil {
		return err
	}
	PrintEncryption(&indentWriter{w: d.out, indent: "      "}, rep.Nodes)

	d.say("      capture %s again, the same requests:", demoCaptureFor)
	enc, err := d.captureWithMarker(ctx, marker, from, url)
	if err != nil {
		return err
	}
	d.captureSummary(enc)
	pods := enc.PodTraffic()
	nodeToNode := Total(pods)
	wg := pods[fmt.Sprintf("udp/%d", wireGuardPort)]
	if nodeToNode == 0 || wg != nodeToNode || enc.MarkerFrames != 0 {
		return fmt.Errorf("demo: with WireGuard on, node↔node frames besides gossip %s, marker in %d frames; want every one udp/%d and none", Breakdown(pods), enc.MarkerFrames, wireGuardPort)
	}
	d.say("      => node↔node frames besides the agents' gossip (udp/tcp 51872, encrypted with the mesh key): %d, all udp/%d; marker seen 0 times (before: %d times, in %s)",
		nodeToNode, wireGuardPort, clear.MarkerFrames, Breakdown(clear.MarkerBy))

	if err := stream.awaitEcho(ctx, 10*time.Second); err != nil {
		return err
	}
	st := stream.stats()
	if st.Err != nil {
		return fmt.Errorf("demo: stream %s: %w", stream.name, st.Err)
	}
	d.say("      the stream survived the switch: %s echoed intact in %s, %d errors, longest pause %s",
		byteCount(st.Echoed), st.Took.Round(100*time.Millisecond), st.Errors, st.MaxStall.Round(time.Millisecond))
	r, err := d.curl(ctx, 20)
	if err != nil {
		return err
	}
	d.summary(r)
	if r.Failed > 0 {
		return fmt.Errorf("demo: %d of %d requests failed with encryption on", r.Failed, len(r.Probes))
	}
	d.say("      requests keep succeeding, now encrypted between nodes (affinity annotation removed, so both clusters answer)")
	return nil
}

// captureWithMarker captures for demoCaptureFor while pod from GETs url
// (which carries the marker) demoMarkerSends times.
func (d *demo) captureWithMarker(ctx context.Context, marker []byte, from *podLayout, url string) (*CaptureReport, error) {
	c, err := Capture(ctx, d.opts, marker)
	if err != nil {
		return nil, err
	}
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: dialerIn(from.ns), DisableKeepAlives: true, Proxy: nil,
	}}
	var failed int
	start := time.Now()
	for i := range demoMarkerSends {
		if err := getOnce(ctx, client, url); err != nil {
			failed++
			d.say("      request %d: %v", i+1, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(demoCaptureFor / (demoMarkerSends + 1)):
		}
	}
	select {
	case <-ctx.Done():
	case <-time.After(demoCaptureFor - time.Since(start)):
	}
	rep, err := c.Stop()
	if err != nil {
		return nil, err
	}
	if failed > 0 {
		return rep, fmt.Errorf("demo: %d of %d marker requests failed", failed, demoMarkerSends)
	}
	return rep, nil
}

func getOnce(ctx context.Context, client *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s", resp.Status)
	}
	return nil
}

// captureSummary prints a capture's classes and the marker count.
func (d *demo) captureSummary(r *CaptureReport) {
	d.say("        %-15s %5d frames  %s", ClassNodeToNode, Total(r.NodeToNode), Breakdown(r.NodeToNode))
	d.say("        %-15s %5d frames  %s", ClassNodeToAPIServer, Total(r.NodeToAPIServer), Breakdown(r.NodeToAPIServer))
	if n := Total(r.Other); n > 0 {
		d.say("        %-15s %5d frames  %s", ClassOther, n, Breakdown(r.Other))
	}
	where := ""
	if r.MarkerFrames > 0 {
		where = ": " + Breakdown(r.MarkerBy)
	}
	d.say("        marker %q seen in %d frames%s", r.Marker, r.MarkerFrames, where)
	if r.Dropped > 0 {
		d.say("        (the kernel dropped %d frames the capture could not keep up with)", r.Dropped)
	}
}

func byteCount(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// indentWriter indents every line written through it.
type indentWriter struct {
	w      io.Writer
	indent string
	mid    bool // in the middle of a line
}

func (iw *indentWriter) Write(p []byte) (int, error) {
	var b bytes.Buffer
	for _, line := range strings.SplitAfter(string(p), "\n") {
		if line == "" {
			continue
		}
		if !iw.mid {
			b.WriteString(iw.indent)
		}
		b.WriteString(line)
		iw.mid = !strings.HasSuffix(line, "\n")
	}
	if _, err := iw.w.Write(b.Bytes()); err != nil {
		return 0, err
	}
	return len(p), nil
}
