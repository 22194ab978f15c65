package strict

// The eBPF object is built from c/strict.c by bpf2go, with the flags of
// the bpf package (see bpf/gen.go): the generated strict_bpfel.go and
// strict_bpfel.o are committed, so `go build` needs no clang; run `make
// generate` (clang, llvm-strip and the libbpf headers: make bpf-toolchain)
// after editing the C source, and `make check-generate` to see that the
// committed object is what the source builds. Little-endian only, like
// the bpf package. -mcpu=v3 as there: TCX needs Linux 6.6, which has every
// v3 instruction.

//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -tags linux -target bpfel strict c/strict.c -- -O2 -mcpu=v3 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
