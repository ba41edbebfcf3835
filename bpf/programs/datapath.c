// Plexus datapath: identity-based policy on a pod's host-side veth.
//
// from_pod runs at tc ingress of the host veth (the pod's egress), to_pod at tc egress (the
// pod's ingress). The peer's identity comes from the ipcache (LPM tries, one per family);
// verdicts come from the policy map, shared by both families; replies to allowed connections
// pass through a small conntrack.
// Maps are pinned under PIN_DIR so a restarted agent adopts them.
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

#define DIR_EGRESS 0   // traffic leaving the pod
#define DIR_INGRESS 1  // traffic entering the pod
#define ACTION_ALLOW 1
#define ACTION_DENY 2
#define ID_WORLD 2
#define CT_LIFETIME_NS (60ULL * 1000000000ULL)

struct ipcache_key { u32 prefixlen; u32 addr; };
struct ipcache_value { u32 identity; u32 host_ip; u32 flags; };
struct policy_key { u32 ifindex; u32 identity; u16 port; u8 proto; u8 direction; };
struct policy_value { u8 action; u8 pad[3]; };
struct enforce_key { u32 ifindex; u32 direction; };
struct ct_key { u32 saddr; u32 daddr; u16 sport; u16 dport; u32 proto; };
struct flow_event {
    u64 ts; u32 ifindex; u32 saddr; u32 daddr; u32 identity;
    u16 sport; u16 dport; u8 proto; u8 direction; u8 verdict; u8 reason;
};

BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct ipcache_value, ipcache, 262144, PIN_DIR "/ipcache", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct policy_key, struct policy_value, policy, 1048576, PIN_DIR "/policy");
BPF_TABLE_PINNED("hash", struct enforce_key, u32, enforce, 65536, PIN_DIR "/enforce");
BPF_TABLE_PINNED("lru_hash", struct ct_key, u64, conntrack, 262144, PIN_DIR "/conntrack");
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, 4, PIN_DIR "/counters");
BPF_PERF_OUTPUT(flows);

static __always_inline u32 lookup_identity(u32 addr) {
    struct ipcache_key k = { .prefixlen = 32, .addr = addr };
    struct ipcache_value *v = ipcache.lookup(&k);
    return v ? v->identity : ID_WORLD;
}

static __always_inline int verdict(u32 ifindex, u32 identity, u16 port, u8 proto, u8 dir) {
    struct policy_key k = { .ifindex = ifindex, .identity = identity, .port = port,
                            .proto = proto, .direction = dir };
    struct policy_value *v;
    int allowed = 0;
    // exact port, any port, any protocol: a deny anywhere wins
    v = policy.lookup(&k);
    if (v) { if (v->action == ACTION_DENY) return ACTION_DENY; allowed = 1; }
    k.port = 0;
    v = policy.lookup(&k);
    if (v) { if (v->action == ACTION_DENY) return ACTION_DENY; allowed = 1; }
    k.proto = 0;
    v = policy.lookup(&k);
    if (v) { if (v->action == ACTION_DENY) return ACTION_DENY; allowed = 1; }
    if (allowed) return ACTION_ALLOW;
    struct enforce_key e = { .ifindex = ifindex, .direction = dir };
    return enforce.lookup(&e) ? ACTION_DENY : ACTION_ALLOW;  // not selected: allow all
}

// ---- IPv6 ---------------------------------------------------------------------------------
// Its own ipcache (LPM trie on 128-bit prefixes), conntrack and flow events; the verdict is
// the same function on the same policy map, so one rule covers both families. ICMPv6 has no
// ports: only a protocol-any rule allows it, as ICMP. Neighbour discovery and MLD are link
// plumbing, never policy: without them nothing on the link would resolve.
#include <uapi/linux/ipv6.h>

#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_ICMPV6 58
#define NEXTHDR_DEST 60
#define IPV6_EXT_MAX 4  // extension headers walked before the transport header

struct ipcache6_key { u32 prefixlen; u8 addr[16]; };
// host_ip: the node's address; an IPv4 node address is stored IPv4-mapped (::ffff:a.b.c.d)
struct ipcache6_value { u32 identity; u8 host_ip[16]; u32 flags; };
struct ct6_key { u8 saddr[16]; u8 daddr[16]; u16 sport; u16 dport; u32 proto; };
struct flow_event6 {
    u64 ts; u32 ifindex; u8 saddr[16]; u8 daddr[16]; u32 identity;
    u16 sport; u16 dport; u8 proto; u8 direction; u8 verdict; u8 reason;
};

BPF_TABLE_PINNED("lpm_trie", struct ipcache6_key, struct ipcache6_value, ipcache6, 262144, PIN_DIR "/ipcache6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct ct6_key, u64, conntrack6, 262144, PIN_DIR "/conntrack6");
BPF_PERF_OUTPUT(flows6);

static __always_inline u32 lookup_identity6(const u8 *addr) {
    struct ipcache6_key k = { .prefixlen = 128 };
    __builtin_memcpy(k.addr, addr, 16);
    struct ipcache6_value *v = ipcache6.lookup(&k);
    return v ? v->identity : ID_WORLD;
}

static __always_inline int link_plumbing(u8 icmp6_type) {
    // MLD query/report/done (130-132), RS, RA, NS, NA, redirect (133-137), MLDv2 report (143)
    return (icmp6_type >= 130 && icmp6_type <= 137) || icmp6_type == 143;
}

static __always_inline int handle6(struct __sk_buff *skb, u8 dir) {
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
    if ((void *)(ip6 + 1) > data_end) return TC_ACT_OK;
    u8 proto = ip6->nexthdr;
    void *l4 = (void *)(ip6 + 1);
    int later_fragment = 0;
#pragma unroll
    for (int i = 0; i < IPV6_EXT_MAX; i++) {
        if (proto != NEXTHDR_HOP && proto != NEXTHDR_ROUTING && proto != NEXTHDR_DEST &&
            proto != NEXTHDR_FRAGMENT)
            break;
        u8 *ext = l4;
        if ((void *)(ext + 8) > data_end) return TC_ACT_OK;
        if (proto == NEXTHDR_FRAGMENT) {
            if (((ext[2] << 8) | ext[3]) & 0xFFF8) later_fragment = 1;  // no transport header
            l4 += 8;
        } else {
            l4 += (ext[1] + 1) * 8;
        }
        proto = ext[0];
    }
    u16 sport = 0, dport = 0;
    if (!later_fragment && (proto == IPPROTO_TCP || proto == IPPROTO_UDP)) {
        u16 *ports = l4;
        if ((void *)(ports + 2) > data_end) return TC_ACT_OK;
        sport = ntohs(ports[0]);
        dport = ntohs(ports[1]);
    } else if (!later_fragment && proto == NEXTHDR_ICMPV6) {
        u8 *type = l4;
        if ((void *)(type + 1) > data_end) return TC_ACT_OK;
        if (link_plumbing(*type)) return TC_ACT_OK;
    }
    u8 *saddr = (u8 *)&ip6->saddr;
    u8 *daddr = (u8 *)&ip6->daddr;
    u32 identity = lookup_identity6(dir == DIR_EGRESS ? daddr : saddr);
    u32 ifindex = skb->ifindex;
    struct ct6_key fwd = { .sport = sport, .dport = dport, .proto = proto };
    struct ct6_key reverse = { .sport = dport, .dport = sport, .proto = proto };
    __builtin_memcpy(fwd.saddr, saddr, 16);
    __builtin_memcpy(fwd.daddr, daddr, 16);
    __builtin_memcpy(reverse.saddr, daddr, 16);
    __builtin_memcpy(reverse.daddr, saddr, 16);
    u64 now = bpf_ktime_get_ns();
    int action;
    u8 reason = 0;
    u64 *seen = conntrack6.lookup(&fwd);
    if (!seen)
        seen = conntrack6.lookup(&reverse);
    if (seen && now - *seen < CT_LIFETIME_NS) {
        *seen = now;
        action = ACTION_ALLOW;
        reason = 1;
    } else {
        action = verdict(ifindex, identity, dport, proto, dir);
    }
    u32 idx = action == ACTION_ALLOW ? 0 : 1;
    u64 *count = counters.lookup(&idx);
    if (count) *count += 1;
    if (action == ACTION_ALLOW && reason == 0)
        conntrack6.update(&fwd, &now);
    if (reason == 0) {
        struct flow_event6 ev = { .ts = now, .ifindex = ifindex, .identity = identity,
                                  .sport = sport, .dport = dport, .proto = proto,
                                  .direction = dir, .verdict = action, .reason = reason };
        __builtin_memcpy(ev.saddr, saddr, 16);
        __builtin_memcpy(ev.daddr, daddr, 16);
        flows6.perf_submit(skb, &ev, sizeof(ev));
    }
    return action == ACTION_ALLOW ? TC_ACT_OK : TC_ACT_SHOT;
}

static __always_inline int handle(struct __sk_buff *skb, u8 dir) {
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end) return TC_ACT_OK;
    if (eth->h_proto == htons(ETH_P_IPV6)) return handle6(skb, dir);
    if (eth->h_proto != htons(ETH_P_IP)) return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end) return TC_ACT_OK;
    u16 sport = 0, dport = 0;
    u8 proto = ip->protocol;
    if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
        u16 *ports = (void *)ip + ip->ihl * 4;
        if ((void *)(ports + 2) > data_end) return TC_ACT_OK;
        sport = ntohs(ports[0]);
        dport = ntohs(ports[1]);
    }
    u32 peer = dir == DIR_EGRESS ? ip->daddr : ip->saddr;
    u32 identity = lookup_identity(peer);
    u32 ifindex = skb->ifindex;
    // A flow already let through, either way round, passes without a new verdict or event.
    struct ct_key fwd = { .saddr = ip->saddr, .daddr = ip->daddr, .sport = sport,
                          .dport = dport, .proto = proto };
    struct ct_key reverse = { .saddr = ip->daddr, .daddr = ip->saddr, .sport = dport,
                              .dport = sport, .proto = proto };
    u64 now = bpf_ktime_get_ns();
    int action;
    u8 reason = 0;
    u64 *seen = conntrack.lookup(&fwd);
    if (!seen)
        seen = conntrack.lookup(&reverse);
    if (seen && now - *seen < CT_LIFETIME_NS) {
        *seen = now;
        action = ACTION_ALLOW;
        reason = 1;
    } else {
        // the port that matters is the destination's: ours on ingress, theirs on egress
        action = verdict(ifindex, identity, dport, proto, dir);
    }
    u32 idx = action == ACTION_ALLOW ? 0 : 1;
    u64 *count = counters.lookup(&idx);
    if (count) *count += 1;
    if (action == ACTION_ALLOW && reason == 0)
        conntrack.update(&fwd, &now);
    if (reason == 0) {
        struct flow_event ev = { .ts = now, .ifindex = ifindex, .saddr = ip->saddr,
                                 .daddr = ip->daddr, .identity = identity, .sport = sport,
                                 .dport = dport, .proto = proto, .direction = dir,
                                 .verdict = action, .reason = reason };
        flows.perf_submit(skb, &ev, sizeof(ev));
    }
    return action == ACTION_ALLOW ? TC_ACT_OK : TC_ACT_SHOT;
}

// Global service load-balancing (lb.h, inlined by the loader): the service translation
// comes before policy on the way out, so policy sees the backend, and the reverse
// translation after policy on the way in, so the reply matches the conntrack entry.
#include "lb.h"

int from_pod(struct __sk_buff *skb) {
    int lb = lb4_from_pod(skb);
    return lb == TC_ACT_OK ? handle(skb, DIR_EGRESS) : lb;
}

int to_pod(struct __sk_buff *skb) {
    int action = handle(skb, DIR_INGRESS);
    if (action == TC_ACT_OK)
        lb4_to_pod(skb);
    return action;
}
