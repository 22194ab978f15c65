// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Trellis strict encryption filter: TCX programs on the tunnel device
// (trellis_vxlan, trellis_geneve) that drop plaintext pod traffic to or
// from the pod CIDRs of nodes that must be reached through WireGuard.
//
// Design notes
//
//   - Two LPM tries hold the "must be encrypted" pod CIDRs, one per address
//     family, written by the agent (encryption/strict/filter.go):
//       trellis_strict4  (prefix length, IPv4 address) -> 1
//       trellis_strict6  (prefix length, IPv6 address) -> 1
//     The value is reserved: 1 today, other values mean the same.
//
//   - strict_ingress runs at TCX ingress of the tunnel device, on
//     packets the device has just decapsulated: it drops those whose inner
//     SOURCE is in the set (a node that must reach us encrypted sent
//     plaintext, or someone on the underlay forged its pods' traffic).
//     strict_egress runs at TCX egress, on packets about to be
//     encapsulated: it drops those whose inner DESTINATION is in the set.
//
//   - Where the IP header is: a VXLAN or Geneve device is an Ethernet
//     device, so skb->data points at the inner Ethernet header on both
//     hooks (at ingress the stack pushes the MAC header back for tc), and
//     the IP header follows at 14. An L3 device (WireGuard, ipip) starts
//     at the IP header. Rather than hard-code either, the programs read the
//     addresses relative to the network header the stack has set
//     (bpf_skb_load_bytes_relative, BPF_HDR_START_NET), and take the family
//     from skb->protocol, so one object serves any device. That helper reads
//     only the linear part of the skb; VXLAN and Geneve pull the inner IP
//     header into it before delivery (pskb_inet_may_pull), and the IP stack
//     has it linear on output, but when it is not, the programs pull the
//     first bytes and try once more. A packet still too short to hold its
//     IP header is no traffic: it goes on, and the IP stack drops it.
//
//   - Verdicts: TCX_NEXT when the packet is not to be dropped, so programs
//     attached after this one (another CNI's, say) still run; TCX_DROP
//     otherwise. Nothing else is touched.
//
//   - trellis_sdrops counts drops per direction (0 ingress, 1 egress), per
//     CPU. A GRO or GSO aggregate counts once.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// TCX verdicts (include/uapi/linux/bpf.h since Linux 6.6; Debian's
// linux-libc-dev may predate them).
#ifndef TCX_NEXT
#define TCX_NEXT -1
#define TCX_PASS 0
#define TCX_DROP 2
#endif

#define DIR_INGRESS 0
#define DIR_EGRESS 1

// How many bytes the programs pull into the linear part when the IP
// header is not there: Ethernet, two VLAN tags and an IPv6 header fit.
#define PULL_LEN 128

struct strict4_key {
	__u32 prefixlen;
	__u8 addr[4];  // network byte order
};

struct strict6_key {
	__u32 prefixlen;
	__u8 addr[16];  // network byte order
};

// Sizes are defaults: the loader may change max_entries before creating
// the maps (see strict.Config.MaxPrefixes). LPM tries allocate per entry,
// so an empty map costs nothing whatever its size.
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct strict4_key);
	__type(value, __u32);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} trellis_strict4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct strict6_key);
	__type(value, __u32);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} trellis_strict6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 2);
} trellis_sdrops SEC(".maps");

// load_net copies len bytes at offset off of the network header into to.
static __always_inline int load_net(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	if (bpf_skb_load_bytes_relative(skb, off, to, len, BPF_HDR_START_NET) == 0)
		return 0;
	__u32 pull = skb->len < PULL_LEN ? skb->len : PULL_LEN;
	if (bpf_skb_pull_data(skb, pull) < 0)
		return -1;
	return bpf_skb_load_bytes_relative(skb, off, to, len, BPF_HDR_START_NET) == 0 ? 0 : -1;
}

static __always_inline int filter(struct __sk_buff *skb, __u32 dir)
{
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct strict4_key k = {.prefixlen = 32};
		__u32 off = dir == DIR_INGRESS ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr);
		if (load_net(skb, off, k.addr, sizeof(k.addr)) < 0)
			return TCX_NEXT;
		if (!bpf_map_lookup_elem(&trellis_strict4, &k))
			return TCX_NEXT;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct strict6_key k = {.prefixlen = 128};
		__u32 off = dir == DIR_INGRESS ? offsetof(struct ipv6hdr, saddr) : offsetof(struct ipv6hdr, daddr);
		if (load_net(skb, off, k.addr, sizeof(k.addr)) < 0)
			return TCX_NEXT;
		if (!bpf_map_lookup_elem(&trellis_strict6, &k))
			return TCX_NEXT;
	} else {
		return TCX_NEXT;
	}
	__u64 *drops = bpf_map_lookup_elem(&trellis_sdrops, &dir);
	if (drops)
		*drops += 1;  // per CPU, and tc runs with migration off
	return TCX_DROP;
}

SEC("tcx/ingress")
int strict_ingress(struct __sk_buff *skb)
{
	return filter(skb, DIR_INGRESS);
}

SEC("tcx/egress")
int strict_egress(struct __sk_buff *skb)
{
	return filter(skb, DIR_EGRESS);
}

char __license[] SEC("license") = "Dual BSD/GPL";
