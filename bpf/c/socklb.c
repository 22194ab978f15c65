// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Trellis socket load balancer: cgroup v2 sock_addr programs that translate
// a service VIP:port to a backend IP:port when a socket connects or sends,
// and translate the backend back to the VIP when the socket receives or
// asks for its peer. IPv4 only; IPv6 twins come later.
//
// Design notes
//
//   - Three maps describe the services, written by the agent (bpf/lb.go):
//       trellis_svc4   (VIP, port, proto)  -> (service id, backend count, flags)
//       trellis_slot4  (service id, slot n) -> backend id      n in [0, count)
//       trellis_be4    backend id           -> (IP, port, cluster id)
//     The agent writes backend slots first and the service count last, and
//     removes slots and backends only after the count no longer covers them,
//     so a reader never sees a count that covers a slot not yet written.
//
//   - trellis_rev4 is an LRU map keyed by (socket cookie, backend IP, port)
//     and holds the VIP:port the socket asked for. connect4 and sendmsg4
//     write it; recvmsg4 (UDP source address) and getpeername4 read it. The
//     backend is part of the key so that one unconnected UDP socket talking
//     to several services gets each reply mapped to the right VIP. The LRU
//     evicts entries of closed sockets; an evicted entry only means a reply
//     or getpeername() shows the backend instead of the VIP.
//
//   - Addresses and ports are stored exactly as the kernel hands them to
//     sock_addr programs: IPv4 address and port in network byte order (the
//     raw bytes of sin_addr and sin_port). The protocol is IPPROTO_TCP (6)
//     or IPPROTO_UDP (17), as sk->sk_protocol reports it.
//
//   - A service with no backends (count 0) rejects connect()/sendmsg() with
//     EPERM rather than letting packets go to a VIP nobody answers. A slot
//     or backend that is missing (the agent is mid-way through removing the
//     service) falls back to slot 0 and otherwise rejects the same way.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#define SYS_REJECT 0
#define SYS_PROCEED 1

struct lb4_key {
	__u32 vip;   // network byte order
	__u16 port;  // network byte order
	__u8 proto;  // IPPROTO_TCP or IPPROTO_UDP
	__u8 pad;
};

struct lb4_service {
	__u32 id;     // service id, >= 1
	__u16 count;  // active slots [0, count)
	__u16 flags;  // reserved, 0
};

struct lb4_slot_key {
	__u32 service_id;
	__u32 slot;
};

struct lb4_backend {
	__u32 ip;          // network byte order
	__u16 port;        // network byte order
	__u16 pad;
	__u32 cluster_id;  // 1-511 in a mesh, 0 when unknown
};

struct lb4_rev_key {
	__u64 cookie;  // bpf_get_socket_cookie
	__u32 ip;      // backend, network byte order
	__u16 port;    // backend, network byte order
	__u16 pad;
};

struct lb4_rev_value {
	__u32 vip;   // network byte order
	__u16 port;  // network byte order
	__u16 pad;
};

// Sizes are defaults: the loader may change max_entries before creating
// the maps (see bpf.MapSizes).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
	__uint(max_entries, 65536);
} trellis_svc4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_slot_key);
	__type(value, __u32);
	__uint(max_entries, 262144);
} trellis_slot4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(max_entries, 65536);
} trellis_be4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_rev_key);
	__type(value, struct lb4_rev_value);
	__uint(max_entries, 131072);
} trellis_rev4 SEC(".maps");

static __always_inline struct lb4_backend *pick_backend(const struct lb4_service *svc)
{
	struct lb4_slot_key slot_key = {};
	__u32 count = svc->count;  // read once: the agent may flip it any time
	__u32 *backend_id;

	if (count == 0)
		return NULL;

	slot_key.service_id = svc->id;
	slot_key.slot = bpf_get_prandom_u32() % count;
	backend_id = bpf_map_lookup_elem(&trellis_slot4, &slot_key);
	if (!backend_id && slot_key.slot != 0) {
		slot_key.slot = 0;
		backend_id = bpf_map_lookup_elem(&trellis_slot4, &slot_key);
	}
	if (!backend_id)
		return NULL;
	return bpf_map_lookup_elem(&trellis_be4, backend_id);
}

// translate rewrites ctx's destination when it is a service VIP:port.
// It returns SYS_PROCEED or SYS_REJECT.
static __always_inline int translate(struct bpf_sock_addr *ctx)
{
	struct lb4_key key = {};
	struct lb4_service *svc;
	struct lb4_backend *be;
	struct lb4_rev_key rev_key = {};
	struct lb4_rev_value rev_val = {};
	struct lb4_rev_value *old;
	__u32 proto = ctx->protocol;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;

	key.vip = ctx->user_ip4;
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)proto;

	svc = bpf_map_lookup_elem(&trellis_svc4, &key);
	if (!svc)
		return SYS_PROCEED;

	be = pick_backend(svc);
	if (!be)
		return SYS_REJECT;

	rev_key.cookie = bpf_get_socket_cookie(ctx);
	rev_key.ip = be->ip;
	rev_key.port = be->port;
	rev_val.vip = key.vip;
	rev_val.port = key.port;

	// Skip the write when the entry is already there (a UDP socket sending
	// to the same VIP over and over hits the same backend often).
	old = bpf_map_lookup_elem(&trellis_rev4, &rev_key);
	if (!old || old->vip != rev_val.vip || old->port != rev_val.port)
		bpf_map_update_elem(&trellis_rev4, &rev_key, &rev_val, BPF_ANY);

	ctx->user_ip4 = be->ip;
	ctx->user_port = be->port;
	return SYS_PROCEED;
}

// reverse rewrites a backend address the socket sees back to the VIP.
static __always_inline void reverse(struct bpf_sock_addr *ctx)
{
	struct lb4_rev_key rev_key = {};
	struct lb4_rev_value *val;

	rev_key.cookie = bpf_get_socket_cookie(ctx);
	rev_key.ip = ctx->user_ip4;
	rev_key.port = (__u16)ctx->user_port;

	val = bpf_map_lookup_elem(&trellis_rev4, &rev_key);
	if (!val)
		return;
	ctx->user_ip4 = val->vip;
	ctx->user_port = val->port;
}

SEC("cgroup/connect4")
int trellis_connect4(struct bpf_sock_addr *ctx)
{
	return translate(ctx);
}

SEC("cgroup/sendmsg4")
int trellis_sendmsg4(struct bpf_sock_addr *ctx)
{
	return translate(ctx);
}

SEC("cgroup/recvmsg4")
int trellis_recvmsg4(struct bpf_sock_addr *ctx)
{
	reverse(ctx);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int trellis_getpeername4(struct bpf_sock_addr *ctx)
{
	reverse(ctx);
	return SYS_PROCEED;
}

char __license[] SEC("license") = "Dual BSD/GPL";
