package main

import (
	"bytes"
	"strings"
	"testing"
)

// Two rounds, as two `go test -bench Connect -count 1` runs print them.
const twoRounds = `goos: linux
BenchmarkConnectDirectNoLB-2     	    3000	     20000 ns/op
BenchmarkConnectDirectSockLB/services=10-2         	    3000	     21000 ns/op	       100.0 connect4-ns/run
BenchmarkConnectDirectSockLB/services=10000-2      	    3000	     22000 ns/op	       120.0 connect4-ns/run
BenchmarkConnectVIPSockLB/services=10-2            	    3000	     23100 ns/op	       500.0 connect4-ns/run
BenchmarkConnectVIPSockLB/services=10000-2         	    3000	     24200 ns/op	       900.0 connect4-ns/run
BenchmarkConnectVIPIPTables/services=10-2          	    3000	     22000 ns/op
BenchmarkConnectVIPIPTables/services=10000-2       	    3000	     44000 ns/op
PASS
ok  	github.com/trellis-mesh/trellis/bpf	30.1s
BenchmarkConnectVIPSockLB/services=10-2            	    3000	     46200 ns/op	       700.0 connect4-ns/run
BenchmarkConnectDirectNoLB-2     	    3000	     40000 ns/op
BenchmarkConnectDirectSockLB/services=10-2         	    3000	     42000 ns/op	       300.0 connect4-ns/run
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
	r := res.ratios("BenchmarkConnectVIPSockLB/services=10", "BenchmarkConnectDirectSockLB/services=10", unitNS)
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
		"median (min–max) of 2 rounds",
		"| 10 | 30.0 µs (20.0–40.0) | 31.5 µs (21.0–42.0) | 34.6 µs (23.1–46.2) | 22.0 µs (22.0–22.0) |",
		"| 10 000 |  | 22.0 µs (22.0–22.0) | 24.2 µs (24.2–24.2) | 44.0 µs (44.0–44.0) |",
		"| 10 | 1.10× (1.10–1.10) | 1.05× (1.05–1.05) | 1.16× (1.16–1.16) | 1.10× (1.10–1.10) |",
		"| 10 000 | 1.10× (1.10–1.10) | 1.10× (1.10–1.10) | 1.21× (1.21–1.21) | 2.20× (2.20–2.20) |",
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
