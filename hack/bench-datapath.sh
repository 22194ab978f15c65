#!/usr/bin/env bash
# Runs the ./bpf connect benchmarks interleaved: ROUNDS rounds of -count 1
# over every variant, in a shuffled order each round, so that each ratio
# compares two variants measured in the same round rather than minutes
# apart. The test binary is built once. OUT gets every round's output and
# the load average before each; hack/benchtable then prints the README's
# service translation tables. Needs root (and iptables for the kube-proxy
# variant).
# Usage: hack/bench-datapath.sh [ROUNDS [OUT]]   (default: 7 bench-connect.out)
set -euo pipefail
rounds=${1:-7}
out=$(realpath "${2:-bench-connect.out}")
go=${GO:-go}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$go" test -c -o "$tmp/bpf.test" ./bpf
: > "$out"
for i in $(seq "$rounds"); do
	echo "round $i of $rounds, load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out"
	(cd bpf && "$tmp/bpf.test" -test.run '^$' -test.bench Connect -test.benchtime 3000x \
		-test.count 1 -test.shuffle on) | tee -a "$out"
done
echo "after $rounds rounds, load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out"
echo
"$go" run ./hack/benchtable "$out"
