# Trellis: the two commands a newcomer runs are `make demo` and `make test`.
GO       ?= go
BIN      := bin/trellis
FUZZTIME ?= 5s
FUZZ_PKGS := ./api/v1

.PHONY: all build demo test vet unit fuzz bench generate clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/trellis

## demo: build trellis and run the lab demo (needs root; uses sudo when it exists).
demo: build
	./hack/as-root.sh ./$(BIN) lab demo

## test: go vet, every test (privileged ones too when root), and a short fuzz run.
test: vet unit fuzz

vet:
	$(GO) vet ./...

unit:
	$(GO) test -count=1 -timeout 25m ./...

fuzz:
	./hack/fuzz.sh $(FUZZTIME) $(FUZZ_PKGS)

## bench: the benchmarks whose figures the README quotes.
bench:
	$(GO) test -run '^$$' -bench . -benchtime 5x -count 5 ./kvstore | tee bench.out

clean:
	rm -rf bin bench.out
