package bpf

// The eBPF object is built from c/socklb.c by bpf2go. The generated
// socklb_bpfel.go and socklb_bpfel.o are committed, so `go build` needs no
// clang; run `make generate` (clang, llvm-strip and libbpf headers: the
// Debian packages clang, llvm and libbpf-dev) after editing the C source.
// Only the little-endian object is built: every platform Trellis runs on
// (amd64, arm64) is little-endian.
//
// The include paths name the multiarch directory that holds asm/types.h on
// Debian; clang ignores the one that does not exist on the build host.
// -mcpu=v3 (bpf2go's default is v1): the seqlock on trellis_conn4 uses BPF
// atomics that fetch, which need Linux 5.12 or later.

//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -tags linux -target bpfel socklb c/socklb.c -- -O2 -mcpu=v3 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
