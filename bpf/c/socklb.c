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
//       trellis_svc4   (VIP, port, proto)  -> (service id, backend count, flags,
//                                              backends of slots 0-3)
//       trellis_slot4  (service id, slot n) -> backend id      n in [0, count)
//       trellis_be4    backend id           -> (IP, port, cluster id)
//     The agent writes backend slots first and the service count last, and
//     removes slots and backends only after the count no longer covers them,
//     so a reader never sees a count that covers a slot not yet written.
//     The service value carries the addresses of the backends in its first
//     LB4_INLINE_SLOTS slots, written together with the count: a slot below
//     that is read from the service's own entry, and only the others cost a
//     slot and a backend lookup. With many services those two lookups were
//     cold hash buckets and entries, a third of connect4's run time; a
//     service with up to four backends now needs one lookup in all.
//
//   - Two maps remember which VIP:port a socket asked for, so that
//     recvmsg4 (UDP source address) and getpeername4 can show it instead of
//     the backend:
//       trellis_conn4  socket cookie % size -> (cookie, backend, VIP:port)
//                      ARRAY, written by connect4 (TCP, connected UDP)
//       trellis_rev4   (socket cookie, backend IP, port) -> VIP:port
//                      LRU hash, written by sendmsg4 (unconnected UDP)
//     A connected socket has one peer, so one slot per socket will do, and
//     connect() is where the cost of a service connection is paid: the
//     array's slot is found without hashing, and the kernel hands out
//     socket cookies in sequence on each CPU, so consecutive connects write
//     neighbouring slots, warm in the cache. (The LRU write it replaces
//     was a third of connect4's run time with 10 000 services: a cold hash
//     bucket in a 2 MB table plus the LRU's own bookkeeping.) A slot is
//     overwritten by the socket whose cookie is `size` later, so, as with
//     the LRU, a long-lived socket may lose its entry after that many new
//     connections. The cookie in the slot tells a reader whether the slot is
//     still its socket's; a sequence count keeps a reader from trusting half
//     of another socket's entry (see conn_write).
//     The reverse LRU's key has the backend so that one unconnected UDP
//     socket talking to several services gets each reply mapped to the
//     right VIP; the LRU evicts entries of closed sockets. Readers try the
//     array first, then the LRU. A missing entry only means a reply or
//     getpeername() shows the backend instead of the VIP.
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

#define LB4_INLINE_SLOTS 4

struct lb4_addr {
	__u32 ip;    // network byte order
	__u16 port;  // network byte order
	__u16 pad;
};

struct lb4_service {
	__u32 id;     // service id, >= 1
	// Active slots [0, count). It was a __u16 followed by a reserved __u16
	// that was always 0; on little-endian, which is all this object is
	// built for, a pinned map written by that layout reads the same here,
	// so the wider count needs no migration.
	__u32 count;
	// Backends of slots [0, min(count, LB4_INLINE_SLOTS)), as the slots and
	// backends maps have them; the rest are 0.
	struct lb4_addr inline_be[LB4_INLINE_SLOTS];
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

struct lb4_conn {
	__u64 seq;       // odd while a writer is at work (see conn_write)
	__u64 cookie;    // bpf_get_socket_cookie, 0: empty
	__u32 be_ip;     // network byte order
	__u32 vip;       // network byte order
	__u16 be_port;   // network byte order
	__u16 vip_port;  // network byte order
	__u32 pad;
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
	__uint(max_entries, 262144);  // as many as slots: never the tighter limit
} trellis_be4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_rev_key);
	__type(value, struct lb4_rev_value);
	__uint(max_entries, 131072);
} trellis_rev4 SEC(".maps");

// The size of trellis_conn4 is fixed (the loader does not resize it): a
// power of two, so that a cookie's slot is its low bits.
#define CONN4_SLOTS 131072

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb4_conn);
	__uint(max_entries, CONN4_SLOTS);
} trellis_conn4 SEC(".maps");

// conn_slot returns the trellis_conn4 slot of the socket with this cookie.
static __always_inline struct lb4_conn *conn_slot(__u64 cookie)
{
	__u32 idx = cookie & (CONN4_SLOTS - 1);

	return bpf_map_lookup_elem(&trellis_conn4, &idx);
}

// A slot is a seqlock: a writer makes seq odd, writes, and makes it even
// again; a reader trusts what it read only if seq was the same even number
// before and after. BPF atomics that fetch are fully ordered, so this
// holds on arm64 as on x86. (bpf_spin_lock would do too, but it disables
// interrupts, which on a paravirtualised guest costs more than the rest of
// the write.) Two writers on one slot need sockets whose cookies are
// CONN4_SLOTS apart connecting at the same moment; the one that finds the
// slot busy reports it, and its caller uses trellis_rev4 instead.

// conn_write stores a translation in slot c. It returns 0 when the slot
// was busy.
static __always_inline int conn_write(struct lb4_conn *c, __u64 cookie, __u32 be_ip, __u16 be_port, __u32 vip, __u16 vip_port)
{
	__u64 seq = c->seq;

	if (seq & 1)
		return 0;
	if (__sync_val_compare_and_swap(&c->seq, seq, seq + 1) != seq)
		return 0;
	c->cookie = cookie;
	c->be_ip = be_ip;
	c->be_port = be_port;
	c->vip = vip;
	c->vip_port = vip_port;
	__sync_lock_test_and_set(&c->seq, seq + 2);
	return 1;
}

// conn_read reads the VIP:port that slot c holds for this socket and
// backend. It returns 0 when the slot holds none (or was being written).
static __always_inline int conn_read(struct lb4_conn *c, __u64 cookie, __u32 be_ip, __u16 be_port, __u32 *vip, __u16 *vip_port)
{
	__u64 seq = __sync_fetch_and_add(&c->seq, 0);

	if (seq & 1)
		return 0;
	if (c->cookie != cookie || c->be_ip != be_ip || c->be_port != be_port)
		return 0;
	*vip = c->vip;
	*vip_port = c->vip_port;
	return __sync_fetch_and_add(&c->seq, 0) == seq;
}

// pick_backend picks one of the service's backends at random and returns
// its address in ip and port. It returns 0 when there is none.
static __always_inline int pick_backend(const struct lb4_service *svc, __u32 *ip, __u16 *port)
{
	struct lb4_slot_key slot_key = {};
	__u32 count = svc->count;  // read once: the agent may flip it any time
	struct lb4_backend *be;
	__u32 *backend_id;
	__u32 slot = 0;

	if (count == 0)
		return 0;
	// A random slot in [0, count): the high half of rand * count, which
	// spares a division; one backend needs no random number at all.
	if (count > 1)
		slot = ((__u64)bpf_get_prandom_u32() * count) >> 32;
	if (slot < LB4_INLINE_SLOTS)
		goto inline_slot;

	slot_key.service_id = svc->id;
	slot_key.slot = slot;
	backend_id = bpf_map_lookup_elem(&trellis_slot4, &slot_key);
	be = backend_id ? bpf_map_lookup_elem(&trellis_be4, backend_id) : NULL;
	if (!be) {
		// Missing: the agent is removing this slot. Slot 0 is inline.
		slot = 0;
		goto inline_slot;
	}
	*ip = be->ip;
	*port = be->port;
	return 1;

inline_slot:
	*ip = svc->inline_be[slot].ip;
	*port = svc->inline_be[slot].port;
	return *port != 0;  // the agent writes no port 0
}

// translate rewrites ctx's destination when it is a service VIP:port and
// remembers the VIP for the socket: connect4 (connect set) in the socket's
// trellis_conn4 slot, sendmsg4 in trellis_rev4. It returns SYS_PROCEED or
// SYS_REJECT.
static __always_inline int translate(struct bpf_sock_addr *ctx, const int connect)
{
	struct lb4_key key = {};
	struct lb4_service *svc;
	struct lb4_rev_key rev_key = {};
	struct lb4_rev_value rev_val = {};
	struct lb4_rev_value *old;
	struct lb4_conn *conn;
	__u32 proto = ctx->protocol;
	__u32 be_ip;
	__u16 be_port;
	__u64 cookie;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;

	key.vip = ctx->user_ip4;
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)proto;

	svc = bpf_map_lookup_elem(&trellis_svc4, &key);
	if (!svc)
		return SYS_PROCEED;

	if (!pick_backend(svc, &be_ip, &be_port))
		return SYS_REJECT;

	cookie = bpf_get_socket_cookie(ctx);
	conn = connect ? conn_slot(cookie) : NULL;
	if (!conn || !conn_write(conn, cookie, be_ip, be_port, key.vip, key.port)) {
		rev_key.cookie = cookie;
		rev_key.ip = be_ip;
		rev_key.port = be_port;
		rev_val.vip = key.vip;
		rev_val.port = key.port;
		// Skip the write when the entry is already there (a UDP socket
		// sending to the same VIP over and over hits the same backend
		// often).
		old = bpf_map_lookup_elem(&trellis_rev4, &rev_key);
		if (!old || old->vip != rev_val.vip || old->port != rev_val.port)
			bpf_map_update_elem(&trellis_rev4, &rev_key, &rev_val, BPF_ANY);
	}

	ctx->user_ip4 = be_ip;
	ctx->user_port = be_port;
	return SYS_PROCEED;
}

// reverse rewrites a backend address the socket sees back to the VIP:
// from the socket's trellis_conn4 slot when it holds this socket and this
// backend, else from trellis_rev4.
static __always_inline void reverse(struct bpf_sock_addr *ctx)
{
	struct lb4_rev_key rev_key = {};
	struct lb4_rev_value *val;
	struct lb4_conn *conn;
	__u32 ip = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	__u32 vip;
	__u16 vip_port;
	__u64 cookie = bpf_get_socket_cookie(ctx);

	conn = conn_slot(cookie);
	if (!conn || !conn_read(conn, cookie, ip, port, &vip, &vip_port)) {
		rev_key.cookie = cookie;
		rev_key.ip = ip;
		rev_key.port = port;
		val = bpf_map_lookup_elem(&trellis_rev4, &rev_key);
		if (!val)
			return;
		vip = val->vip;
		vip_port = val->port;
	}
	ctx->user_ip4 = vip;
	ctx->user_port = vip_port;
}

SEC("cgroup/connect4")
int trellis_connect4(struct bpf_sock_addr *ctx)
{
	return translate(ctx, 1);
}

SEC("cgroup/sendmsg4")
int trellis_sendmsg4(struct bpf_sock_addr *ctx)
{
	return translate(ctx, 0);
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
