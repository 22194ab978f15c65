package main

import (
	"bytes"
	"strings"
	"testing"
)

// Two rounds, as two `go test -bench Connect -count 1` runs print them.
const twoRounds = `goos: linux
BenchmarkConnectDirectNoLB-2     	    3000	     20000 ns/op	     10000 p50-ns/connect
BenchmarkConnectDirectSockLB/services=10-2         	    3000	     21000 ns/op	       100.0 connect4-ns/run	     10500 p50-ns/connect
BenchmarkConnectDirectSockLB/services=10000-2      	    3000	     22000 ns/op	       120.0 connect4-ns/run	     11000 p50-ns/connect
BenchmarkConnectVIPSockLB/services=10-2            	    3000	     23100 ns/op	       500.0 connect4-ns/run	     11550 p50-ns/connect
BenchmarkConnectVIPSockLB/services=10000-2         	    3000	     24200 ns/op	       900.0 connect4-ns/run	     12100 p50-ns/connect
BenchmarkConnectVIPvsDirectSockLB/services=10-2    	    3000	     44000 ns/op	     10000 direct-p50-ns/connect	     10500 vip-p50-ns/connect	         1.050 vip/direct-p50
BenchmarkConnectVIPIPTables/services=10-2          	    3000	     22000 ns/op	     11000 p50-ns/connect
BenchmarkConnectVIPIPTables/services=10000-2       	    3000	     44000 ns/op	     22000 p50-ns/connect
PASS
ok  	github.com/trellis-mesh/trellis/bpf	30.1s
BenchmarkConnectVIPSockLB/services=10-2            	    3000	     46200 ns/op	       700.0 connect4-ns/run	     23100 p50-ns/connect
BenchmarkConnectDirectNoLB-2     	    3000	     40000 ns/op	     20000 p50-ns/connect
BenchmarkConnectDirectSockLB/services=10-2         	    3000	     42000 ns/op	       300.0 connect4-ns/run	     21000 p50-ns/connect
BenchmarkConnectVIPvsDirectSockLB/services=10-2    	    3000	     44000 ns/op	     10000 direct-p50-ns/connect	     10700 vip-p50-ns/connect	         1.070 vip/direct-p50
`

func TestParse(t *testing.T) {
	res, err := parse(strings.NewReader(twoRounds))
	if err != nil {
		t.Fatal(err)
	}
	if got := res.values("BenchmarkConnectVIPSockLB/services=10", unitProgNS); len(got) != 2 || got[0] != 500 || got[1] != 700 {
		t.Fatalf("connect4 run times = %v, want [500 700]", got)
	}
	if got := res.values("BenchmarkConnectVIPIPTables/services=10000", unitProgNS); len(got) != 0 {
		t.Fatalf("iptables has connect4 run times %v", got)
	}
	// Round by round: 23100/21000 and 46200/42000.
	r := res.ratios("BenchmarkConnectVIPSockLB/services=10", "BenchmarkConnectDirectSockLB/services=10", unitMean)
	if len(r) != 2 || r[0] != 1.1 || r[1] != 1.1 {
		t.Fatalf("ratios = %v, want [1.1 1.1]", r)
	}
}

func TestParseRejectsBadMetric(t *testing.T) {
	if _, err := parse(strings.NewReader("BenchmarkX-2  10  abc ns/op\n")); err == nil {
		t.Fatal("no error for a non-numeric metric")
	}
}

func TestSummarize(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want summary
	}{
		{[]float64{3, 1, 2}, summary{3, 2, 1, 3}},
		{[]float64{4, 1, 3, 2}, summary{4, 2.5, 1, 4}},
		{nil, summary{}},
	} {
		if got := summarize(c.in); got != c.want {
			t.Errorf("summarize(%v) = %+v, want %+v", c.in, got, c.want)
		}
	}
}

func TestWrite(t *testing.T) {
	res, err := parse(strings.NewReader(twoRounds))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := write(&out, res); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"Median connect() time in a round, median (min–max) of 2 rounds",
		// p50: medians of two rounds are the mean of the two.
		"| 10 | 15.0 µs (10.0–20.0) | 15.8 µs (10.5–21.0) | 17.3 µs (11.6–23.1) | 11.0 µs (11.0–11.0) |",
		"| 10 000 |  | 11.0 µs (11.0–11.0) | 12.1 µs (12.1–12.1) | 22.0 µs (22.0–22.0) |",
		"Mean connect() time in a round, median (min–max) of 2 rounds",
		"| 10 | 30.0 µs (20.0–40.0) | 31.5 µs (21.0–42.0) | 34.6 µs (23.1–46.2) | 22.0 µs (22.0–22.0) |",
		// VIP ÷ floor alternating, separate runs (p50), floor ÷ none, iptables ÷ none.
		"| 10 | 1.06× (1.05–1.07) | 1.10× (1.10–1.10) | 1.05× (1.05–1.05) | 1.10× (1.10–1.10) |",
		"| 10 000 | – | 1.10× (1.10–1.10) | 1.10× (1.10–1.10) | 2.20× (2.20–2.20) |",
		"| 10 | 10.0 µs (10.0–10.0) | 10.6 µs (10.5–10.7) |",
		"| 10 | 200 ns (100–300) | 600 ns (500–700) |",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	if err := write(&out, results{}); err == nil {
		t.Error("no error without results")
	}
}
