# Trellis: the two commands a newcomer runs are `make demo` and `make test`.
GO       ?= go
BIN      := bin/trellis
# An execution count, not a duration: a duration -fuzztime races the fuzz
# coordinator's deadline and fails spuriously with "context deadline
# exceeded" on Go 1.26 (go.dev/issue/75804), more so on a loaded machine.
FUZZTIME ?= 100000x
FUZZ_PKGS := ./api/v1

.PHONY: all build demo test vet unit chart fuzz bench generate check-generate clean kube-apiserver bpf-toolchain

# A real kube-apiserver for the Kubernetes-source tests, built from the Go
# module proxy in its own tools module (hack/kube-apiserver). The first build
# takes several minutes; later ones come from the Go build cache.
KUBE_APISERVER := bin/kube-apiserver

all: build

build:
	$(GO) build -o $(BIN) ./cmd/trellis

## demo: build trellis and run the lab demo (needs root; uses sudo when it exists).
demo: build
	./hack/as-root.sh ./$(BIN) lab demo --log-level warn

## test: go vet, every test (privileged ones too when root), the Helm chart's checks, and a short fuzz run.
test: vet unit chart fuzz

vet:
	$(GO) vet ./...

unit: $(KUBE_APISERVER)
	$(GO) test -count=1 -timeout 25m ./...

## chart: render deploy/helm/trellis with Helm (as a Go library) and dry-run every object on a real kube-apiserver.
# Its own module (deploy/helm/test): Helm needs newer k8s.io modules than
# Trellis uses. It runs the trellis binary too (the chart's API server
# config on the chart's RBAC), hence build.
chart: build $(KUBE_APISERVER)
	cd deploy/helm/test && $(GO) vet ./... && $(GO) test -count=1 -timeout 10m ./...

kube-apiserver: $(KUBE_APISERVER)

$(KUBE_APISERVER):
	cd hack/kube-apiserver && $(GO) build -o ../../$(KUBE_APISERVER) k8s.io/kubernetes/cmd/kube-apiserver

fuzz:
	./hack/fuzz.sh $(FUZZTIME) $(FUZZ_PKGS)

# The packages with eBPF C sources and committed bpf2go output, and that
# output (check-generate compares only it: the rest of a package may hold
# work in progress).
BPF_PKGS := bpf encryption/strict
BPF_GENERATED := $(foreach p,$(BPF_PKGS),'$(p)/*_bpfel.*')

## generate: rebuild the eBPF objects from their C sources: bpf/socklb_bpfel.{go,o} (bpf/c/socklb.c) and encryption/strict/strict_bpfel.{go,o} (encryption/strict/c/strict.c) (needs: make bpf-toolchain).
generate:
	@command -v clang >/dev/null || { echo "clang missing: run make bpf-toolchain (as root)"; exit 1; }
	$(GO) generate $(addprefix ./,$(addsuffix /...,$(BPF_PKGS)))

## check-generate: the committed eBPF objects build from source and are up to date.
check-generate: generate
	git diff --exit-code -- $(BPF_GENERATED) || { echo "generated files differ from the committed ones: run make generate and commit"; exit 1; }
	@untracked=$$(git ls-files --others --exclude-standard -- $(BPF_GENERATED)); \
	if [ -n "$$untracked" ]; then echo "generated files not committed: $$untracked"; exit 1; fi

## bpf-toolchain: clang, llvm-strip and the libbpf headers for make generate (Debian, as root).
bpf-toolchain:
	apt-get update && apt-get install -y clang llvm libbpf-dev

## bench: the benchmarks whose figures the README quotes.
# The datapath variants run interleaved (hack/bench-datapath.sh):
# BENCH_ROUNDS rounds of -count 1 over all of them, then the README's
# service translation tables.
BENCH_ROUNDS ?= 7
bench:
	$(GO) test -run '^$$' -bench . -benchtime 5x -count 5 ./kvstore | tee bench.out
	$(GO) test -run '^$$' -bench . -benchtime 1x -count 3 ./clustermesh | tee -a bench.out
	@# The datapath benchmarks need root and iptables (for the kube-proxy-style comparison).
	@if [ "$$(id -u)" -eq 0 ]; then \
		command -v iptables-restore >/dev/null || apt-get install -y iptables || { apt-get update && apt-get install -y iptables; }; \
		GO=$(GO) ./hack/bench-datapath.sh $(BENCH_ROUNDS) bench-connect.out | tee -a bench.out; \
		$(GO) test -run '^$$' -bench 'MapUpdate' -count 5 ./bpf | tee -a bench.out; \
		$(GO) test -run '^$$' -bench 'LargeService' -benchtime 1x -count 5 ./internal/scalebench | tee -a bench.out; \
	else echo "skipping ./bpf and ./internal/scalebench benchmarks: they need root"; fi

clean:
	rm -rf bin bench.out bench-connect.out
