package agent

import (
	"strings"
	"testing"
	"time"
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
