#!/usr/bin/env bash
# Runs every fuzz target of the given packages for a short time each.
# go test -fuzz takes one target and one package per run, hence the loop.
# Usage: hack/fuzz.sh FUZZTIME PKG...
set -euo pipefail
fuzztime=$1; shift
for pkg in "$@"; do
	for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		echo "fuzz $pkg $target ($fuzztime)"
		go test "$pkg" -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime"
	done
done
