// Command benchtable turns rounds of the datapath benchmarks into the
// README's service translation tables. Its input is the output of several
// runs of
//
//	go test ./bpf -run '^$' -bench Connect -benchtime 3000x -count 1
//
// one after the other (make bench does this), so that every round measures
// every variant within a short time of the others. The n-th result of a
// benchmark belongs to round n. For each variant it prints the median and
// the min–max over the rounds of the median connect() time in a round
// (p50-ns/connect) and of the mean (ns/op); each ratio is computed within
// a round and then summarised the same way, so a slow round moves both
// sides of a ratio together. The tightest ratio is the one between the VIP
// and the floor measured in one client, connect by connect
// (ConnectVIPvsDirectSockLB).
//
// Usage: go run ./hack/benchtable [file...]   (standard input without files)
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Benchmark names, without the -GOMAXPROCS suffix (bpf/bench_linux_test.go).
const (
	noLB      = "BenchmarkConnectDirectNoLB"
	floor     = "BenchmarkConnectDirectSockLB/services=%d"
	vipSockLB = "BenchmarkConnectVIPSockLB/services=%d"
	vipIPT    = "BenchmarkConnectVIPIPTables/services=%d"
	paired    = "BenchmarkConnectVIPvsDirectSockLB/services=%d"

	unitMean    = "ns/op"
	unitP50     = "p50-ns/connect"
	unitProgNS  = "connect4-ns/run"
	unitPairVIP = "vip-p50-ns/connect"
	unitPairDir = "direct-p50-ns/connect"
	unitPair    = "vip/direct-p50"
)

var serviceCounts = []int{10, 10000}

// results holds, per benchmark name, one map of metrics (unit -> value)
// per round, in input order.
type results map[string][]map[string]float64

var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+\d+\s+(.+)$`)

// parse reads `go test -bench` output; lines that are not results are
// skipped.
func parse(r io.Reader) (results, error) {
	res := results{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(strings.TrimSpace(sc.Text()))
		if m == nil {
			continue
		}
		fields := strings.Fields(m[2])
		if len(fields)%2 != 0 {
			return nil, fmt.Errorf("benchtable: odd metric list in %q", sc.Text())
		}
		metrics := map[string]float64{}
		for i := 0; i < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				return nil, fmt.Errorf("benchtable: metric %s of %s: %w", fields[i+1], m[1], err)
			}
			metrics[fields[i+1]] = v
		}
		res[m[1]] = append(res[m[1]], metrics)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("benchtable: read: %w", err)
	}
	return res, nil
}

// values returns one metric of a benchmark, one value per round.
func (res results) values(name, unit string) []float64 {
	var out []float64
	for _, m := range res[name] {
		if v, ok := m[unit]; ok {
			out = append(out, v)
		}
	}
	return out
}

// ratios returns num/den of one metric, round by round.
func (res results) ratios(num, den, unit string) []float64 {
	a, b := res.values(num, unit), res.values(den, unit)
	var out []float64
	for i := range min(len(a), len(b)) {
		if b[i] != 0 {
			out = append(out, a[i]/b[i])
		}
	}
	return out
}

// summary is the median, minimum and maximum of some values.
type summary struct {
	n                int
	median, min, max float64
}

func summarize(vs []float64) summary {
	if len(vs) == 0 {
		return summary{}
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return summary{n: len(s), median: med, min: s[0], max: s[len(s)-1]}
}

// format prints s with the given verb, after dividing by scale, and a unit.
func (s summary) format(verb string, scale float64, unit string) string {
	if s.n == 0 {
		return "–"
	}
	f := func(v float64) string { return fmt.Sprintf(verb, v/scale) }
	return fmt.Sprintf("%s%s (%s–%s)", f(s.median), unit, f(s.min), f(s.max))
}

func micros(vs []float64) string { return summarize(vs).format("%.1f", 1000, " µs") }
func nanos(vs []float64) string  { return summarize(vs).format("%.0f", 1, " ns") }
func times(vs []float64) string  { return summarize(vs).format("%.2f", 1, "×") }

func thousands(n int) string {
	if n < 1000 {
		return strconv.Itoa(n)
	}
	return fmt.Sprintf("%d %03d", n/1000, n%1000)
}

// write prints the tables.
func write(w io.Writer, res results) error {
	rounds := len(res.values(noLB, unitMean))
	for _, n := range serviceCounts {
		rounds = max(rounds, len(res.values(fmt.Sprintf(floor, n), unitMean)))
	}
	if rounds == 0 {
		return errors.New("benchtable: no Connect benchmark results in the input")
	}
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }

	for _, t := range []struct{ what, unit string }{
		{"Median connect() time in a round", unitP50},
		{"Mean connect() time in a round", unitMean},
	} {
		p("%s, median (min–max) of %d rounds:\n\n", t.what, rounds)
		p("| services programmed | no translation | eBPF LB: direct to backend (floor) | eBPF LB: VIP | iptables DNAT: VIP |\n")
		p("|---|---|---|---|---|\n")
		for i, n := range serviceCounts {
			none := ""
			if i == 0 {
				none = micros(res.values(noLB, t.unit))
			}
			p("| %s | %s | %s | %s | %s |\n", thousands(n), none,
				micros(res.values(fmt.Sprintf(floor, n), t.unit)),
				micros(res.values(fmt.Sprintf(vipSockLB, n), t.unit)),
				micros(res.values(fmt.Sprintf(vipIPT, n), t.unit)))
		}
		p("\n")
	}

	p("Ratios of median connect() times, each within one round, median (min–max):\n\n")
	p("| services programmed | eBPF VIP ÷ floor, one client alternating | eBPF VIP ÷ floor, separate runs | floor ÷ no translation | iptables VIP ÷ no translation |\n")
	p("|---|---|---|---|---|\n")
	for _, n := range serviceCounts {
		f, v, ipt := fmt.Sprintf(floor, n), fmt.Sprintf(vipSockLB, n), fmt.Sprintf(vipIPT, n)
		p("| %s | %s | %s | %s | %s |\n", thousands(n),
			times(res.values(fmt.Sprintf(paired, n), unitPair)),
			times(res.ratios(v, f, unitP50)),
			times(res.ratios(f, noLB, unitP50)),
			times(res.ratios(ipt, noLB, unitP50)))
	}

	p("\nOne client alternating VIP and floor connects: median connect() time of each, median (min–max):\n\n")
	p("| services programmed | floor | VIP |\n")
	p("|---|---|---|\n")
	for _, n := range serviceCounts {
		pr := fmt.Sprintf(paired, n)
		p("| %s | %s | %s |\n", thousands(n), micros(res.values(pr, unitPairDir)), micros(res.values(pr, unitPairVIP)))
	}

	p("\nconnect4 program run time per connect() (BPF run-time stats), median (min–max):\n\n")
	p("| services programmed | floor (no service matches) | VIP (translated) |\n")
	p("|---|---|---|\n")
	for _, n := range serviceCounts {
		p("| %s | %s | %s |\n", thousands(n),
			nanos(res.values(fmt.Sprintf(floor, n), unitProgNS)),
			nanos(res.values(fmt.Sprintf(vipSockLB, n), unitProgNS)))
	}
	return nil
}

func main() {
	var in io.Reader = os.Stdin
	if len(os.Args) > 1 {
		var rs []io.Reader
		for _, name := range os.Args[1:] {
			f, err := os.Open(name)
			if err != nil {
				fmt.Fprintln(os.Stderr, "benchtable:", err)
				os.Exit(1)
			}
			defer f.Close()
			rs = append(rs, f)
		}
		in = io.MultiReader(rs...)
	}
	res, err := parse(in)
	if err == nil {
		err = write(os.Stdout, res)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
