package agent

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/gossip"
)

// distrust ignores the dead set when this member is more likely the one
// cut off (rule 3), and trusts it otherwise.
func TestGossipDistrust(t *testing.T) {
	now := time.Now()
	at := func(d ...time.Duration) []time.Time {
		var out []time.Time
		for _, x := range d {
			out = append(out, now.Add(-x))
		}
		return out
	}
	samples := []aliveSample{{at: now.Add(-50 * time.Second), n: 6}, {at: now, n: 5}}
	for _, tc := range []struct {
		name        string
		seen, known int
		deaths      []time.Time
		samples     []aliveSample
		score       int
		want        string // substring; "" trusted
	}{
		{"one node crashed", 5, 6, at(0), samples, 0, ""},
		{"two apart", 4, 6, at(0, 20*time.Second), samples, 0, ""},
		{"a third within 5s is not more than a third", 4, 6, at(0, 4*time.Second), samples, 0, ""},
		{"more than a third within 5s", 3, 6, at(0, time.Second, 4*time.Second), samples, 0, "within"},
		{"fewer than half seen", 2, 3, at(0), []aliveSample{{at: now.Add(-time.Minute / 2), n: 6}}, 0, "fewer than half"},
		{"slow member", 5, 6, at(0), samples, 4, "health score"},
	} {
		got := distrust(tc.seen, tc.known, tc.deaths, tc.samples, tc.score)
		if (tc.want == "") != (got == "") || !strings.Contains(got, tc.want) {
			t.Errorf("%s: distrust %q, want %q", tc.name, got, tc.want)
		}
	}
}

// printGossip shows the counts, the dead members and the trust.
func TestPrintGossip(t *testing.T) {
	since := time.Now().Add(-2 * time.Second)
	for _, tc := range []struct {
		g    *GossipStatus
		want []string
	}{
		{&GossipStatus{Off: "no mesh key in the cluster files (trellis connect writes one)"}, []string{"Gossip: off: no mesh key"}},
		{&GossipStatus{Member: "us/n1", Address: "192.168.0.3:51872", Alive: 3, Dead: 1, Trusted: true,
			DeadMembers: []GossipDead{{Member: "eu/n1", Since: since}}, Excluding: []string{"eu/n1"}},
			[]string{"us/n1 on 192.168.0.3:51872, members 3 alive, 0 suspect, 1 dead, 0 left", "dead set trusted",
				"dead: eu/n1 since " + since.Format(time.TimeOnly), "backends left out on: eu/n1"}},
		{&GossipStatus{Member: "us/n1", Alive: 2, Dead: 2, Distrust: "2 of 4 members went dead within 5s"},
			[]string{"dead set ignored: 2 of 4 members went dead within 5s"}},
		{&GossipStatus{Member: "us/n1", Alive: 2, Dead: 2, Distrust: "2 of 4 members went dead within 5s",
			Corroborated: []string{"eu/n1", "eu/n2"}, Excluding: []string{"eu/n1", "eu/n2"},
			Probes: []GossipProbe{{Target: "eu", At: since, Took: 500 * time.Millisecond, Down: true, Err: "no answer within 500ms"},
				{Target: "us/n2", At: since, Took: time.Millisecond, Reachable: true, Heartbeat: true}}},
			[]string{"dead set ignored: 2 of 4", "dead all the same (their cluster's control plane or their pods do not answer either): eu/n1, eu/n2",
				"control plane of eu: down: no answer within 500ms (probed at " + since.Format(time.TimeOnly) + " in 500ms)",
				"pods of us/n2: answers (probed at", "backends left out on: eu/n1, eu/n2"}},
	} {
		var b strings.Builder
		PrintStatus(&b, Status{Node: "n1", Cluster: "us", Gossip: tc.g})
		for _, want := range tc.want {
			if !strings.Contains(b.String(), want) {
				t.Errorf("status lacks %q:\n%s", want, b.String())
			}
		}
	}
}

// decide is the partition rule on one view: rule 3 distrusts a whole
// cluster's nodes dying at once, and rule 2 trusts them all the same
// when that cluster's control plane does not answer this agent either;
// a cluster that answers (a gossip-only partition), a stale probe, a slow
// member, or another cluster's silence corroborate nothing.
func TestGossipDecide(t *testing.T) {
	now := time.Now()
	ago := func(d time.Duration) time.Time { return now.Add(-d) }
	mb := func(name string, st gossip.State, since time.Time) gossip.Member {
		return gossip.Member{Name: name, State: st, Since: since}
	}
	alive := func(name string) gossip.Member { return mb(name, gossip.Alive, ago(time.Hour)) }
	dead := func(name string, d time.Duration) gossip.Member { return mb(name, gossip.Dead, ago(d)) }
	// probe is a completed probe of cluster, done d ago.
	probe := func(cluster string, d time.Duration, reachable, heartbeat, saw bool) *clusterProbe {
		return &clusterProbe{last: clustermesh.Liveness{Cluster: cluster, Start: ago(d + 100*time.Millisecond), Reachable: reachable, Heartbeat: heartbeat},
			done: ago(d), sawHeartbeat: saw}
	}
	down := func(cluster string) *clusterProbe { return probe(cluster, 100*time.Millisecond, false, false, true) }
	up := func(cluster string) *clusterProbe { return probe(cluster, 100*time.Millisecond, true, true, true) }
	euCrashed := []gossip.Member{alive("us/n1"), alive("us/n2"), dead("eu/n1", 300*time.Millisecond), dead("eu/n2", 200*time.Millisecond)}
	for _, tc := range []struct {
		name         string
		members      []gossip.Member
		score        int
		probes       map[string]*clusterProbe
		last         []string // the trusted set before
		distrusted   bool
		trusted      []string
		corroborated []string
		probe        []string
	}{
		{name: "one node dead: trusted without a probe", members: []gossip.Member{alive("us/n1"), alive("us/n2"), alive("eu/n2"), dead("eu/n1", time.Second)},
			trusted: []string{"eu/n1"}},
		{name: "a whole cluster dead, not probed yet: ignored, probe it", members: euCrashed,
			distrusted: true, probe: []string{"eu", "eu/n1", "eu/n2"}},
		{name: "a whole cluster dead and its control plane silent: corroborated", members: euCrashed,
			probes: map[string]*clusterProbe{"eu": down("eu")}, distrusted: true,
			trusted: []string{"eu/n1", "eu/n2"}, corroborated: []string{"eu/n1", "eu/n2"}, probe: []string{"eu/n1", "eu/n2"}},
		{name: "gossip-only partition: the control plane answers", members: euCrashed,
			probes: map[string]*clusterProbe{"eu": up("eu")}, distrusted: true, probe: []string{"eu/n1", "eu/n2"}},
		{name: "control plane answers, heartbeat gone after it was seen: corroborated", members: euCrashed,
			probes: map[string]*clusterProbe{"eu": probe("eu", 100*time.Millisecond, true, false, true)}, distrusted: true,
			trusted: []string{"eu/n1", "eu/n2"}, corroborated: []string{"eu/n1", "eu/n2"}, probe: []string{"eu/n1", "eu/n2"}},
		{name: "etcd answers without a heartbeat never seen: proves nothing", members: euCrashed,
			probes: map[string]*clusterProbe{"eu": probe("eu", 100*time.Millisecond, true, false, false)}, distrusted: true, probe: []string{"eu/n1", "eu/n2"}},
		{name: "a stale silence counts no more: probe again", members: euCrashed,
			probes: map[string]*clusterProbe{"eu": probe("eu", 4*time.Second, false, false, true)}, distrusted: true, probe: []string{"eu", "eu/n1", "eu/n2"}},
		{name: "a probe that could not be made proves nothing", members: euCrashed,
			probes:     map[string]*clusterProbe{"eu": {failed: "no cluster file", done: ago(100 * time.Millisecond), last: clustermesh.Liveness{Start: ago(100 * time.Millisecond)}}},
			distrusted: true, probe: []string{"eu/n1", "eu/n2"}},
		{name: "the slow member trusts no probe", members: euCrashed, score: gossipMaxHealthScore,
			probes: map[string]*clusterProbe{"eu": down("eu")}, distrusted: true},
		{name: "a silent cluster corroborates its own nodes only, not another's claimed dead",
			members: []gossip.Member{alive("us/n1"), dead("us/n2", 200*time.Millisecond), dead("eu/n1", 300*time.Millisecond), dead("eu/n2", 200*time.Millisecond)},
			probes:  map[string]*clusterProbe{"eu": down("eu"), "us": up("us")}, distrusted: true,
			trusted: []string{"eu/n1", "eu/n2"}, corroborated: []string{"eu/n1", "eu/n2"}, probe: []string{"eu/n1", "eu/n2", "us/n2"}},
		{name: "a death trusted before the distrust stays while its cluster's probe runs", members: euCrashed,
			probes: map[string]*clusterProbe{"eu": {inflight: true}}, last: []string{"eu/n2"}, distrusted: true,
			trusted: []string{"eu/n2"}, probe: []string{"eu/n1", "eu/n2"}},
		{name: "and goes when the probe finds the cluster answering", members: euCrashed,
			probes: map[string]*clusterProbe{"eu": up("eu")}, last: []string{"eu/n2"}, distrusted: true, probe: []string{"eu/n1", "eu/n2"}},
		{name: "no hold without a probe running", members: euCrashed,
			probes: map[string]*clusterProbe{"eu": probe("eu", livenessRetryUp/2, true, true, true)}, last: []string{"eu/n2"}, distrusted: true,
			probe: []string{"eu", "eu/n1", "eu/n2"}},
		{name: "a suspect of a silent cluster is dead: its suspicion need not time out",
			members: []gossip.Member{alive("us/n1"), alive("us/n2"), dead("eu/n2", 100*time.Millisecond), mb("eu/n1", gossip.Suspect, ago(300*time.Millisecond))},
			probes:  map[string]*clusterProbe{"eu": down("eu")}, trusted: []string{"eu/n1", "eu/n2"}, corroborated: []string{"eu/n1"}, probe: []string{"eu/n1"}},
		{name: "a suspect of an answering cluster is not",
			members: []gossip.Member{alive("us/n1"), alive("us/n2"), dead("eu/n2", 100*time.Millisecond), mb("eu/n1", gossip.Suspect, ago(300*time.Millisecond))},
			probes:  map[string]*clusterProbe{"eu": up("eu")}, trusted: []string{"eu/n2"}, probe: []string{"eu/n1"}},
		{name: "nor for the slow member",
			members: []gossip.Member{alive("us/n1"), alive("us/n2"), alive("eu/n2"), mb("eu/n1", gossip.Suspect, ago(300*time.Millisecond))},
			probes:  map[string]*clusterProbe{"eu": down("eu")}, score: gossipMaxHealthScore, distrusted: true},
		{name: "gossip-only partition: the control plane and the pods answer", members: euCrashed,
			probes: map[string]*clusterProbe{"eu": up("eu"), "eu/n1": up("eu/n1"), "eu/n2": up("eu/n2")}, distrusted: true},
		{name: "every node crashed, the API server lives: the silent pods corroborate", members: euCrashed,
			probes: map[string]*clusterProbe{"eu": up("eu"), "eu/n1": probe("eu/n1", 100*time.Millisecond, false, true, false),
				"eu/n2": probe("eu/n2", 100*time.Millisecond, false, true, false)}, distrusted: true,
			trusted: []string{"eu/n1", "eu/n2"}, corroborated: []string{"eu/n1", "eu/n2"}},
		{name: "a node whose pods answer is not dead for another's silent pods", members: euCrashed,
			probes:     map[string]*clusterProbe{"eu": up("eu"), "eu/n1": probe("eu/n1", 100*time.Millisecond, false, true, false), "eu/n2": up("eu/n2")},
			distrusted: true, trusted: []string{"eu/n1"}, corroborated: []string{"eu/n1"}},
		{name: "silent pods are probed again soon: their corroboration must not lapse", members: euCrashed,
			probes: map[string]*clusterProbe{"eu": up("eu"), "eu/n1": probe("eu/n1", livenessRetryDown+10*time.Millisecond, false, true, false),
				"eu/n2": probe("eu/n2", 100*time.Millisecond, false, true, false)}, distrusted: true,
			trusted: []string{"eu/n1", "eu/n2"}, corroborated: []string{"eu/n1", "eu/n2"}, probe: []string{"eu/n1"}},
		{name: "a suspect member's cluster is probed ahead of its death",
			members: []gossip.Member{alive("us/n1"), alive("us/n2"), alive("eu/n2"), mb("eu/n1", gossip.Suspect, ago(50*time.Millisecond))},
			probe:   []string{"eu", "eu/n1"}},
		{name: "not while a probe runs",
			members: []gossip.Member{alive("us/n1"), alive("us/n2"), alive("eu/n2"), mb("eu/n1", gossip.Suspect, ago(50*time.Millisecond))},
			probes:  map[string]*clusterProbe{"eu": {inflight: true}}, probe: []string{"eu/n1"}},
		{name: "new evidence reprobes after the minimum gap",
			members: []gossip.Member{alive("us/n1"), alive("us/n2"), alive("eu/n2"), mb("eu/n1", gossip.Suspect, ago(50*time.Millisecond))},
			probes:  map[string]*clusterProbe{"eu": probe("eu", livenessMinGap+10*time.Millisecond, true, true, true)}, probe: []string{"eu", "eu/n1"}},
		{name: "no new evidence: an answering cluster waits for the long retry",
			members: []gossip.Member{alive("us/n1"), alive("us/n2"), dead("eu/n1", livenessRetryUp), dead("eu/n2", livenessRetryUp)},
			probes:  map[string]*clusterProbe{"eu": probe("eu", livenessRetryUp/2, true, true, true)}, distrusted: true, probe: []string{"eu/n1", "eu/n2"}},
		{name: "a silent cluster is probed again soon", members: euCrashed,
			probes: map[string]*clusterProbe{"eu": probe("eu", livenessRetryDown+10*time.Millisecond, false, false, true)}, distrusted: true,
			trusted: []string{"eu/n1", "eu/n2"}, corroborated: []string{"eu/n1", "eu/n2"}, probe: []string{"eu", "eu/n1", "eu/n2"}},
	} {
		probes := tc.probes
		if probes == nil {
			probes = map[string]*clusterProbe{}
		}
		samples := []aliveSample{{at: ago(30 * time.Second), n: 4}}
		last := map[string]map[string]bool{}
		for _, n := range tc.last {
			c, node, _ := strings.Cut(n, "/")
			if last[c] == nil {
				last[c] = map[string]bool{}
			}
			last[c][node] = true
		}
		v := decide(tc.members, "us/n1", tc.score, &samples, probes, last, now)
		if got := v.distrust != ""; got != tc.distrusted {
			t.Errorf("%s: distrust %q, want distrusted %v", tc.name, v.distrust, tc.distrusted)
		}
		if got := nodeNames(v.trusted); !slices.Equal(got, tc.trusted) {
			t.Errorf("%s: trusted %v, want %v", tc.name, got, tc.trusted)
		}
		if !slices.Equal(v.corroborated, tc.corroborated) {
			t.Errorf("%s: corroborated %v, want %v", tc.name, v.corroborated, tc.corroborated)
		}
		if !slices.Equal(v.probe, tc.probe) {
			t.Errorf("%s: probe %v, want %v", tc.name, v.probe, tc.probe)
		}
	}
}

// probePods connects to a node's pods that back services: a pod that
// accepts, or refuses (its node answered), makes the node answer; a node
// with no such pod cannot be probed. (Pods that do not answer at all are
// the lab's business: TestLabClusterCrash; here everything is on
// loopback, where nothing goes unanswered.)
func TestProbePods(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	open := netip.MustParseAddrPort(ln.Addr().String())
	closed, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := netip.MustParseAddrPort(closed.Addr().String())
	closed.Close()
	nodeIP := netip.MustParseAddr("192.168.7.1")
	snap := func(pods ...netip.AddrPort) *clustermesh.Snapshot {
		s := &clustermesh.Snapshot{
			Nodes:    map[string]map[string]*v1.Node{"eu": {"n1": {Cluster: "eu", Name: "n1", IPs: []netip.Addr{nodeIP}}}},
			IPCache:  map[string]map[netip.Addr]clustermesh.IPCacheEntry{"eu": {}},
			Services: map[clustermesh.ServiceName]*clustermesh.MergedService{},
		}
		svc := &clustermesh.MergedService{ServiceName: clustermesh.ServiceName{Namespace: "default", Name: "echo"},
			Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80}}}
		for _, p := range pods {
			s.IPCache["eu"][p.Addr()] = clustermesh.IPCacheEntry{NodeIP: nodeIP, Cluster: "eu"}
			svc.Backends = append(svc.Backends, clustermesh.Backend{Cluster: "eu", IP: p.Addr(), TargetPorts: []uint16{p.Port()}})
		}
		s.Services[svc.ServiceName] = svc
		return s
	}
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		pods []netip.AddrPort
	}{{"accepts", []netip.AddrPort{open}}, {"refuses", []netip.AddrPort{refused}}} {
		lv, err := probePods(ctx, snap(tc.pods...), "eu", "n1", time.Second)
		if err != nil || !lv.Reachable {
			t.Errorf("a pod that %s: %+v, %v; want the node answering", tc.name, lv, err)
		}
	}
	if _, err := probePods(ctx, snap(), "eu", "n1", time.Second); !errors.Is(err, errNoPods) {
		t.Errorf("a node without pods: %v, want errNoPods", err)
	}
	if _, err := probePods(ctx, snap(open), "eu", "n9", time.Second); err == nil {
		t.Error("an unknown node was probed")
	}
}
