package lab

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/trellis-mesh/trellis/gossip"
)

// The lab's wire, as an eavesdropper on the underlay sees it: an AF_PACKET
// socket in the bridge namespace reads every frame that enters the bridge
// and sorts it by its outer endpoints and protocol, and looks for a marker
// anywhere in it. A VXLAN frame carries the pod's packet in clear inside its
// UDP payload, so a marker a pod sent shows up in it; a WireGuard frame
// carries it encrypted, so it does not.
//
// Design notes:
//   - Frames forwarded between bridge ports never reach br0's own receive
//     path (only broadcasts and frames for its MAC do), so the socket is
//     bound to no device: it sees each frame once as it enters the bridge
//     from a port (incoming), again as it leaves by another (outgoing,
//     skipped), and broadcasts once more on br0 (skipped).
//   - The datapath never waits for the capture: the kernel queues frames to
//     the socket up to its receive buffer (32 MiB) and drops the rest, which
//     PACKET_STATISTICS counts and the report shows. A frame is read whole
//     up to 64 KiB (a GSO frame may be that large) and searched there.

// Endpoint classes of a captured IPv4 frame.
const (
	ClassNodeToNode      = "node↔node"
	ClassNodeToAPIServer = "node↔apiserver"
	ClassOther           = "other"
)

const (
	captureRcvBuf   = 32 << 20
	captureFrameMax = 64<<10 + 256
	// captureWake bounds how long a reader blocks before it looks at
	// Stop and ctx again.
	captureWake = 100 * time.Millisecond
)

// wellKnownPort says whether a TCP or UDP frame is named by port p when
// either end uses it: WireGuard, VXLAN, Geneve, the API servers' etcd and
// HTTP, the echo pods. Otherwise the lower port names it.
func wellKnownPort(p uint16) bool {
	switch p {
	case wireGuardPort, 8472, 6081, apiEtcdPort, apiHTTPPort, EchoPort, gossip.DefaultPort:
		return true
	}
	return false
}

// gossipKinds are the node↔node frames of the agents' gossip (its own
// channel, encrypted and authenticated with the mesh key), which carry no
// pod traffic.
var gossipKinds = []string{fmt.Sprintf("udp/%d", gossip.DefaultPort), fmt.Sprintf("tcp/%d", gossip.DefaultPort)}

// PodTraffic is NodeToNode without the gossip's frames: what carries the
// pods' packets between nodes.
func (r *CaptureReport) PodTraffic() map[string]int {
	out := maps.Clone(r.NodeToNode)
	for _, k := range gossipKinds {
		delete(out, k)
	}
	return out
}

// CaptureReport is what a capture saw on the lab's bridge.
type CaptureReport struct {
	// Namespace is where the capture ran (the bridge namespace).
	Namespace string        `json:"namespace"`
	Duration  time.Duration `json:"duration"`
	Marker    string        `json:"marker,omitempty"`
	// Frames counts every frame that entered the bridge; IPv4 those of
	// them that carry IPv4.
	Frames int `json:"frames"`
	IPv4   int `json:"ipv4"`
	// NodeToNode, NodeToAPIServer and Other count IPv4 frames by their
	// outer protocol and port ("udp/51871", "udp/8472", "tcp/2379",
	// "icmp", "esp", ...): between two nodes' underlay IPs, between a node
	// and an API server, and anything else.
	NodeToNode      map[string]int `json:"nodeToNode"`
	NodeToAPIServer map[string]int `json:"nodeToAPIServer"`
	Other           map[string]int `json:"other"`
	// MarkerFrames counts the frames (of any kind) that contain the marker
	// anywhere; MarkerBy the IPv4 ones by class and protocol ("node↔node
	// udp/8472").
	MarkerFrames int            `json:"markerFrames"`
	MarkerBy     map[string]int `json:"markerBy,omitempty"`
	// Received and Dropped are the kernel's count of frames queued to the
	// capture and dropped for want of buffer (PACKET_STATISTICS).
	Received uint64 `json:"received"`
	Dropped  uint64 `json:"dropped"`
}

func newCaptureReport(ns string, marker []byte) *CaptureReport {
	return &CaptureReport{
		Namespace: ns, Marker: string(marker),
		NodeToNode: map[string]int{}, NodeToAPIServer: map[string]int{}, Other: map[string]int{}, MarkerBy: map[string]int{},
	}
}

// classifier sorts frames by the lab's underlay addresses.
type classifier struct {
	nodes, apis map[netip.Addr]bool
}

// frameClass is a frame's class and outer protocol; ok is false for a
// frame that is not IPv4 (or too short to tell).
func (c classifier) frameClass(frame []byte) (class, proto string, ok bool) {
	if len(frame) < 14 {
		return "", "", false
	}
	etype := binary.BigEndian.Uint16(frame[12:14])
	ip := frame[14:]
	if etype == 0x8100 && len(frame) >= 18 { // one VLAN tag
		etype = binary.BigEndian.Uint16(frame[16:18])
		ip = frame[18:]
	}
	if etype != 0x0800 || len(ip) < 20 || ip[0]>>4 != 4 {
		return "", "", false
	}
	ihl := int(ip[0]&0x0f) * 4
	if ihl < 20 || len(ip) < ihl {
		return "", "", false
	}
	src := netip.AddrFrom4([4]byte(ip[12:16]))
	dst := netip.AddrFrom4([4]byte(ip[16:20]))
	switch {
	case c.nodes[src] && c.nodes[dst]:
		class = ClassNodeToNode
	case c.nodes[src] && c.apis[dst], c.apis[src] && c.nodes[dst]:
		class = ClassNodeToAPIServer
	default:
		class = ClassOther
	}
	return class, protoName(ip[9], ip[ihl:], binary.BigEndian.Uint16(ip[6:8])&0x1fff != 0), true
}

// protoName names an IPv4 payload: "udp/8472", "tcp/2379", "icmp", "esp",
// "ip/<n>"; a fragment after the first has no ports ("udp/fragment").
func protoName(proto byte, l4 []byte, laterFragment bool) string {
	var name string
	switch proto {
	case unix.IPPROTO_TCP:
		name = "tcp"
	case unix.IPPROTO_UDP:
		name = "udp"
	case unix.IPPROTO_ICMP:
		return "icmp"
	case unix.IPPROTO_ESP:
		return "esp"
	default:
		return "ip/" + strconv.Itoa(int(proto))
	}
	if laterFragment || len(l4) < 4 {
		return name + "/fragment"
	}
	sport, dport := binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
	switch {
	case wellKnownPort(dport):
		return name + "/" + strconv.Itoa(int(dport))
	case wellKnownPort(sport):
		return name + "/" + strconv.Itoa(int(sport))
	}
	return name + "/" + strconv.Itoa(int(min(sport, dport)))
}

// add counts one frame.
func (r *CaptureReport) add(c classifier, frame []byte, marker []byte) {
	r.Frames++
	hasMarker := len(marker) > 0 && bytes.Contains(frame, marker)
	if hasMarker {
		r.MarkerFrames++
	}
	class, proto, ok := c.frameClass(frame)
	if !ok {
		return
	}
	r.IPv4++
	switch class {
	case ClassNodeToNode:
		r.NodeToNode[proto]++
	case ClassNodeToAPIServer:
		r.NodeToAPIServer[proto]++
	default:
		r.Other[proto]++
	}
	if hasMarker {
		r.MarkerBy[class+" "+proto]++
	}
}

func (r *CaptureReport) clone() *CaptureReport {
	c := *r
	c.NodeToNode = copyCounts(r.NodeToNode)
	c.NodeToAPIServer = copyCounts(r.NodeToAPIServer)
	c.Other = copyCounts(r.Other)
	c.MarkerBy = copyCounts(r.MarkerBy)
	return &c
}

func copyCounts(m map[string]int) map[string]int {
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// Total is the number of frames of one class.
func Total(counts map[string]int) int {
	n := 0
	for _, v := range counts {
		n += v
	}
	return n
}

// Breakdown is counts as "udp/51871 120, tcp/2379 4", largest first.
func Breakdown(counts map[string]int) string {
	keys := make([]string, 0, len(counts))
	for k, v := range counts {
		if v > 0 {
			keys = append(keys, k)
		}
	}
	slices.SortFunc(keys, func(a, b string) int {
		if counts[a] != counts[b] {
			return counts[b] - counts[a]
		}
		return strings.Compare(a, b)
	})
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %d", k, counts[k])
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ", ")
}

// Print writes r for humans.
func (r *CaptureReport) Print(w io.Writer) {
	fmt.Fprintf(w, "capture on the lab bridge (%s) for %s: %d frames, %d IPv4", r.Namespace, r.Duration.Round(time.Millisecond), r.Frames, r.IPv4)
	if r.Dropped > 0 {
		fmt.Fprintf(w, ", %d dropped by the kernel (capture too slow)", r.Dropped)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  ENDPOINTS\tFRAMES\tBY PROTOCOL/PORT")
	fmt.Fprintf(tw, "  %s\t%d\t%s\n", ClassNodeToNode, Total(r.NodeToNode), Breakdown(r.NodeToNode))
	fmt.Fprintf(tw, "  %s\t%d\t%s\n", ClassNodeToAPIServer, Total(r.NodeToAPIServer), Breakdown(r.NodeToAPIServer))
	fmt.Fprintf(tw, "  %s\t%d\t%s\n", ClassOther, Total(r.Other), Breakdown(r.Other))
	tw.Flush()
	if r.Marker != "" {
		fmt.Fprintf(w, "  marker %q seen in %d frames", r.Marker, r.MarkerFrames)
		if r.MarkerFrames > 0 {
			fmt.Fprintf(w, ": %s", Breakdown(r.MarkerBy))
		}
		fmt.Fprintln(w)
	}
}

func (r *CaptureReport) String() string {
	var b strings.Builder
	r.Print(&b)
	return b.String()
}

// Capturer is a running capture on the lab's bridge; Stop ends it.
type Capturer struct {
	fd     int
	start  time.Time
	cancel context.CancelFunc
	done   chan struct{}

	mu     sync.Mutex
	report *CaptureReport
	err    error // the reader's error, if it stopped on one
	result *CaptureReport
}

// Capture starts reading every frame that enters the lab's bridge (see
// the notes above), until Stop or ctx ends; marker is searched in each
// whole frame (none: no search). It needs root.
func Capture(ctx context.Context, opts Options, marker []byte) (*Capturer, error) {
	if err := requireRoot(); err != nil {
		return nil, err
	}
	l, err := open(opts, false)
	if err != nil {
		return nil, err
	}
	defer l.close()
	cl := classifier{nodes: map[netip.Addr]bool{}, apis: map[netip.Addr]bool{}}
	for _, c := range l.lay.clusters {
		cl.apis[c.ip] = true
		for _, n := range c.nodes {
			cl.nodes[n.ip] = true
		}
	}
	ns := l.lay.bridgeNS
	fd := -1
	bridgeIndex := 0
	err = inNetNS(ns, func() error {
		br, err := net.InterfaceByName(bridgeName)
		if err != nil {
			return fmt.Errorf("find %s: %w", bridgeName, err)
		}
		bridgeIndex = br.Index
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		return nil
	})
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("lab: capture on %s: %w", ns, err)
	}
	if err := setupCaptureSocket(fd); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("lab: capture on %s: %w", ns, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	c := &Capturer{fd: fd, start: time.Now(), cancel: cancel, done: make(chan struct{}), report: newCaptureReport(ns, marker)}
	marker = slices.Clone(marker)
	go c.read(ctx, cl, bridgeIndex, marker)
	return c, nil
}

func setupCaptureSocket(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, captureRcvBuf); err != nil {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, captureRcvBuf); err != nil {
			return fmt.Errorf("receive buffer: %w", err)
		}
	}
	tv := unix.NsecToTimeval(captureWake.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return fmt.Errorf("receive timeout: %w", err)
	}
	// Reset the kernel's counters: they count from here.
	if _, err := unix.GetsockoptTpacketStats(fd, unix.SOL_PACKET, unix.PACKET_STATISTICS); err != nil {
		return fmt.Errorf("packet statistics: %w", err)
	}
	return nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// read counts frames until ctx ends or the socket fails.
func (c *Capturer) read(ctx context.Context, cl classifier, bridgeIndex int, marker []byte) {
	defer close(c.done)
	buf := make([]byte, captureFrameMax)
	for ctx.Err() == nil {
		n, from, err := unix.Recvfrom(c.fd, buf, unix.MSG_TRUNC)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			c.mu.Lock()
			c.err = fmt.Errorf("lab: capture: read: %w", err)
			c.mu.Unlock()
			return
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && (ll.Pkttype == unix.PACKET_OUTGOING || ll.Ifindex == bridgeIndex) {
			continue
		}
		c.mu.Lock()
		c.report.add(cl, buf[:min(n, len(buf))], marker)
		c.mu.Unlock()
	}
}

// Report is what the capture saw so far.
func (c *Capturer) Report() *CaptureReport {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.result != nil {
		return c.result.clone()
	}
	r := c.report.clone()
	r.Duration = time.Since(c.start)
	return r
}

// Stop ends the capture and returns what it saw, with the kernel's counts
// of frames queued and dropped. Calling it again returns the same report.
func (c *Capturer) Stop() (*CaptureReport, error) {
	if c == nil {
		return nil, errors.New("lab: capture: not started")
	}
	c.cancel()
	<-c.done
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.result != nil {
		return c.result.clone(), c.err
	}
	r := c.report.clone()
	r.Duration = time.Since(c.start)
	if st, err := unix.GetsockoptTpacketStats(c.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS); err == nil {
		r.Received, r.Dropped = uint64(st.Packets), uint64(st.Drops)
	}
	unix.Close(c.fd)
	c.result = r
	return r.clone(), c.err
}
