// Plexus datapath: identity-based policy on a pod's host-side veth.
//
// from_pod runs at tc ingress of the host veth (the pod's egress), to_pod at tc egress (the
// pod's ingress). The peer's identity comes from the ipcache (LPM tries, one per family);
// verdicts come from the policy map, shared by both families. A connection's first packet gets
// the verdict; conntrack then lets the rest of it and its replies through with one lookup and
// no ipcache or policy lookup at all, so an established flow costs the least it can.
// Maps are pinned under PIN_DIR so a restarted agent adopts them.
// Every function takes `l2`, the length of the link header: ETH_HLEN on a veth or an uplink,
// 0 on an L3 device (an enrolled host's WireGuard TUN, where decrypted traffic arrives);
// each entry point passes a constant, so the offsets stay constants the verifier checks.
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
#define NS_PER_S 1000000000ULL
#define CT_LIFETIME_NS (60ULL * NS_PER_S)         // UDP, ICMP and the rest
#define CT_LIFETIME_TCP_NS (21600ULL * NS_PER_S)  // an open TCP connection may idle for hours
#define CT_CLOSE_NS (10ULL * NS_PER_S)            // after a FIN or RST: the tuple may come back
#define CT_REFRESH_NS (1000000000ULL)  // an entry's clock is written at most once a second:
                                       // a write per packet bounces its cache line across CPUs
#define CT_REVNAT 1  // a service connection: its replies get the frontend back as their source
#define CT_NEW 2     // (returned only) the packet got a verdict: no entry let it through
#define CT_CLOSING 4 // a FIN or RST went by: the connection is ending
#define TCP_FIN 0x01
#define TCP_RST 0x04
#define REASON_NEW 0  // flow events are sent for a connection's first packet only

struct ipcache_key { u32 prefixlen; u32 addr; };
struct ipcache_value { u32 identity; u32 host_ip; u32 flags; };
struct policy_key { u32 ifindex; u32 identity; u16 port; u8 proto; u8 direction; };
struct policy_value { u8 action; u8 pad[3]; };
struct enforce_key { u32 ifindex; u32 direction; };
// Conntrack is per endpoint and direction: an allowed connection gets two entries on the veth
// that allowed it, its own (its direction) and its replies' (reversed tuple, the other
// direction). Two pods on one node each decide for themselves: one's egress entry never lets a
// packet into the other past that one's ingress policy.
struct ct_key { u32 ifindex; u32 saddr; u32 daddr; u16 sport; u16 dport; u8 proto; u8 direction; u8 pad[2]; };
struct ct_value { u64 seen; u32 flags; u32 pad; };
// nat_addr, nat_port (network order): what an egress gateway translated the source to
struct flow_event {
    u64 ts; u32 ifindex; u32 saddr; u32 daddr; u32 identity;
    u16 sport; u16 dport; u8 proto; u8 direction; u8 verdict; u8 reason; u8 tcp_flags; u8 pad;
    u16 nat_port; u32 nat_addr;
};

BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct ipcache_value, ipcache, 262144, PIN_DIR "/ipcache", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct policy_key, struct policy_value, policy, 1048576, PIN_DIR "/policy", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct enforce_key, u32, enforce, 65536, PIN_DIR "/enforce", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_value, conntrack, 524288, PIN_DIR "/conntrack");
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, 8, PIN_DIR "/counters");
BPF_PERF_OUTPUT(flows);
// An enrolled host's WireGuard device (an L3 device) -> its uplink: the host is one endpoint,
// so what arrives decrypted is judged, and its connections tracked, as the uplink's (a
// service connection the uplink translated gets its reply translated back here).
BPF_TABLE_PINNED("hash", u32, u32, endpoint_alias, 64, PIN_DIR "/endpoint_alias");

static __always_inline u32 endpoint_ifindex(struct __sk_buff *skb, u32 l2) {
    u32 idx = skb->ifindex;
    if (l2) return idx;  // a link device is its own endpoint's
    u32 *alias = endpoint_alias.lookup(&idx);
    return alias ? *alias : idx;
}

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

// counters: packets forwarded, dropped by policy, dropped for want of a service backend
#define COUNT_FORWARDED 0
#define COUNT_POLICY_DENIED 1
#define COUNT_NO_BACKEND 2

static __always_inline void count_as(u32 idx) {
    u64 *n = counters.lookup(&idx);
    if (n) *n += 1;
}

static __always_inline void count(int action) {
    count_as(action == ACTION_ALLOW ? COUNT_FORWARDED : COUNT_POLICY_DENIED);
}

static __always_inline u64 ct_lifetime(u8 proto, u32 flags) {
    if (flags & CT_CLOSING) return CT_CLOSE_NS;
    return proto == IPPROTO_TCP ? CT_LIFETIME_TCP_NS : CT_LIFETIME_NS;
}

// The flags a packet adds to its connection's entries: `ct_flags`, and CT_CLOSING on a FIN or RST.
static __always_inline u32 ct_marks(u32 ct_flags, u8 tcp_flags) {
    return ct_flags | (tcp_flags & (TCP_FIN | TCP_RST) ? CT_CLOSING : 0);
}

// A live entry lets the packet through; 0 when there is none or it has expired. `write` is
// set when the entry is due to be written (its clock, or `marks` it lacks), which the caller
// does for both of the pair.
static __always_inline int ct_live(struct ct_value *v, u64 now, u8 proto, u32 marks, int *write) {
    if (!v || now - v->seen >= ct_lifetime(proto, v->flags)) return 0;
    *write = now - v->seen >= CT_REFRESH_NS || (v->flags & marks) != marks;
    return 1;
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
struct ct6_key { u32 ifindex; u8 saddr[16]; u8 daddr[16]; u16 sport; u16 dport; u8 proto; u8 direction; u8 pad[2]; };
struct flow_event6 {
    u64 ts; u32 ifindex; u8 saddr[16]; u8 daddr[16]; u32 identity;
    u16 sport; u16 dport; u8 proto; u8 direction; u8 verdict; u8 reason;
};

BPF_TABLE_PINNED("lpm_trie", struct ipcache6_key, struct ipcache6_value, ipcache6, 262144, PIN_DIR "/ipcache6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct ct6_key, struct ct_value, conntrack6, 262144, PIN_DIR "/conntrack6");
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

static __always_inline int handle6(struct __sk_buff *skb, u8 dir, u32 l2) {
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ipv6hdr *ip6 = data + l2;
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
    u8 tcp_flags = 0;
    if (!later_fragment && (proto == IPPROTO_TCP || proto == IPPROTO_UDP)) {
        u16 *ports = l4;
        if ((void *)(ports + 2) > data_end) return TC_ACT_OK;
        sport = ntohs(ports[0]);
        dport = ntohs(ports[1]);
        u8 *tcp = l4;
        if (proto == IPPROTO_TCP && (void *)(tcp + 14) <= data_end) tcp_flags = tcp[13];
    } else if (!later_fragment && proto == NEXTHDR_ICMPV6) {
        u8 *type = l4;
        if ((void *)(type + 1) > data_end) return TC_ACT_OK;
        if (link_plumbing(*type)) return TC_ACT_OK;
    }
    u8 *saddr = (u8 *)&ip6->saddr;
    u8 *daddr = (u8 *)&ip6->daddr;
    u32 ifindex = endpoint_ifindex(skb, l2);
    struct ct6_key fwd = { .ifindex = ifindex, .sport = sport, .dport = dport, .proto = proto,
                           .direction = dir };
    __builtin_memcpy(fwd.saddr, saddr, 16);
    __builtin_memcpy(fwd.daddr, daddr, 16);
    u64 now = bpf_ktime_get_coarse_ns();
    u32 marks = ct_marks(0, tcp_flags);
    int write = 0;
    struct ct_value *seen = conntrack6.lookup(&fwd);
    struct ct6_key reverse = { .ifindex = ifindex, .sport = dport, .dport = sport, .proto = proto,
                               .direction = !dir };
    __builtin_memcpy(reverse.saddr, daddr, 16);
    __builtin_memcpy(reverse.daddr, saddr, 16);
    if (ct_live(seen, now, proto, marks, &write)) {
        if (write) {
            seen->seen = now;
            seen->flags |= marks;
            struct ct_value *pair = conntrack6.lookup(&reverse);
            if (pair) { pair->seen = now; pair->flags |= marks; }
        }
        count(ACTION_ALLOW);
        return TC_ACT_OK;
    }
    u32 identity = lookup_identity6(dir == DIR_EGRESS ? daddr : saddr);
    int action = verdict(ifindex, identity, dport, proto, dir);
    count(action);
    if (action == ACTION_ALLOW) {
        struct ct_value v = { .seen = now, .flags = marks };
        conntrack6.update(&fwd, &v);
        conntrack6.update(&reverse, &v);
    }
    struct flow_event6 ev = { .ts = bpf_ktime_get_ns(), .ifindex = ifindex, .identity = identity,
                              .sport = sport, .dport = dport, .proto = proto,
                              .direction = dir, .verdict = action, .reason = REASON_NEW };
    __builtin_memcpy(ev.saddr, saddr, 16);
    __builtin_memcpy(ev.daddr, daddr, 16);
    flows6.perf_submit(skb, &ev, sizeof(ev));
    return action == ACTION_ALLOW ? TC_ACT_OK : TC_ACT_SHOT;
}

// An IPv4 packet's addresses, ports (host order; 0 when it has none) and where they are.
struct flow4 {
    u32 saddr; u32 daddr; u16 sport; u16 dport; u8 proto; u8 has_ports; u16 l4off; u8 tcp_flags;
    u8 l3off;
};

// 0 when the packet is not IPv4 or is cut short.
static __always_inline int parse4(struct __sk_buff *skb, struct flow4 *f, u32 l2) {
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    if (l2) {
        struct ethhdr *eth = data;
        if ((void *)(eth + 1) > data_end || eth->h_proto != htons(ETH_P_IP)) return 0;
    } else if (skb->protocol != htons(ETH_P_IP)) {
        return 0;
    }
    struct iphdr *ip = data + l2;
    if ((void *)(ip + 1) > data_end) return 0;
    f->saddr = ip->saddr;
    f->daddr = ip->daddr;
    f->proto = ip->protocol;
    f->sport = f->dport = 0;
    f->has_ports = 0;
    f->tcp_flags = 0;
    f->l3off = l2;
    f->l4off = l2 + ip->ihl * 4;
    int later_fragment = ip->frag_off & htons(0x1FFF);  // carries no transport header
    if (!later_fragment && (f->proto == IPPROTO_TCP || f->proto == IPPROTO_UDP)) {
        u16 *ports = (void *)ip + ip->ihl * 4;
        if ((void *)(ports + 2) > data_end) return 1;  // cut short: judged as portless
        f->sport = ntohs(ports[0]);
        f->dport = ntohs(ports[1]);
        f->has_ports = 1;
        u8 *tcp = (void *)ports;
        if (f->proto == IPPROTO_TCP && (void *)(tcp + 14) <= data_end) f->tcp_flags = tcp[13];
    }
    return 1;
}

// 1 when a live conntrack entry lets the packet through (counted); its flags in `flags`.
// `ct_flags` are what this packet says of its connection (a service's): an entry made before
// it knew gets them, and so does its pair; so does CT_CLOSING on a FIN or RST.
static __always_inline int ct4_pass(u32 ifindex, struct flow4 *f, u8 dir, u32 ct_flags,
                                    u32 *flags) {
    struct ct_key fwd = { .ifindex = ifindex, .saddr = f->saddr, .daddr = f->daddr,
                          .sport = f->sport, .dport = f->dport, .proto = f->proto,
                          .direction = dir };
    struct ct_value *seen = conntrack.lookup(&fwd);
    u64 now = bpf_ktime_get_coarse_ns();
    u32 marks = ct_marks(ct_flags, f->tcp_flags);
    int write = 0;
    if (!ct_live(seen, now, f->proto, marks, &write)) return 0;
    if (write) {
        seen->seen = now;
        seen->flags |= marks;
        struct ct_key reverse = { .ifindex = ifindex, .saddr = f->daddr, .daddr = f->saddr,
                                  .sport = f->dport, .dport = f->sport, .proto = f->proto,
                                  .direction = !dir };
        struct ct_value *pair = conntrack.lookup(&reverse);
        if (pair) { pair->seen = now; pair->flags |= marks; }
    }
    count(ACTION_ALLOW);
    *flags = seen->flags;
    return 1;
}

// The verdict on an IPv4 packet at the pod's veth. `ct_flags` are stored with a new
// connection; `flags` returns those of the entry that let the packet through, or CT_NEW.
static __always_inline int handle4(struct __sk_buff *skb, struct flow4 *f, u8 dir, u32 ct_flags,
                                   u32 *flags) {
    u32 ifindex = endpoint_ifindex(skb, f->l3off);
    if (ct4_pass(ifindex, f, dir, ct_flags, flags)) return TC_ACT_OK;
    u32 identity = lookup_identity(dir == DIR_EGRESS ? f->daddr : f->saddr);
    // the port that matters is the destination's: ours on ingress, theirs on egress
    int action = verdict(ifindex, identity, f->dport, f->proto, dir);
    count(action);
    if (action == ACTION_ALLOW) {
        struct ct_value v = { .seen = bpf_ktime_get_coarse_ns(),
                              .flags = ct_marks(ct_flags, f->tcp_flags) };
        struct ct_key fwd = { .ifindex = ifindex, .saddr = f->saddr, .daddr = f->daddr,
                              .sport = f->sport, .dport = f->dport, .proto = f->proto,
                              .direction = dir };
        struct ct_key reverse = { .ifindex = ifindex, .saddr = f->daddr, .daddr = f->saddr,
                                  .sport = f->dport, .dport = f->sport, .proto = f->proto,
                                  .direction = !dir };
        conntrack.update(&fwd, &v);
        conntrack.update(&reverse, &v);
        *flags = ct_flags | CT_NEW;
    }
    struct flow_event ev = { .ts = bpf_ktime_get_ns(), .ifindex = ifindex, .saddr = f->saddr,
                             .daddr = f->daddr, .identity = identity, .sport = f->sport,
                             .dport = f->dport, .proto = f->proto, .direction = dir,
                             .verdict = action, .reason = REASON_NEW, .tcp_flags = f->tcp_flags };
    flows.perf_submit(skb, &ev, sizeof(ev));
    return action == ACTION_ALLOW ? TC_ACT_OK : TC_ACT_SHOT;
}

// IPv6 goes its own way; anything neither IPv4 nor IPv6 is not policy's business.
static __always_inline int handle_other(struct __sk_buff *skb, u8 dir, u32 l2) {
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    if (l2) {
        struct ethhdr *eth = data;
        if ((void *)(eth + 1) > data_end || eth->h_proto != htons(ETH_P_IPV6)) return TC_ACT_OK;
    } else if (skb->protocol != htons(ETH_P_IPV6)) {
        return TC_ACT_OK;
    }
    return handle6(skb, dir, l2);
}

// Global service load-balancing (lb.h, inlined by the loader): the service translation
// comes before policy on the way out, so policy sees the backend, and the reverse
// translation after policy on the way in, so the reply matches the conntrack entry. Only a
// connection conntrack marks as a service's, or one it does not know, pays for the reverse
// lookup.
#include "lb.h"
// The egress gateway (egress.h): where an allowed packet of a selected pod leaves.
#include "egress.h"

static __always_inline int from_endpoint(struct __sk_buff *skb, u32 l2) {
    struct flow4 f;
    u32 ct_flags = 0, flags = 0;
    if (!parse4(skb, &f, l2)) return handle_other(skb, DIR_EGRESS, l2);
    // An established connection that is not a service's needs nothing more: conntrack first
    // spares it the service lookup. (A service connection's entries hold the backend, not the
    // frontend this packet is addressed to, so it does not match here.)
    if (ct4_pass(endpoint_ifindex(skb, l2), &f, DIR_EGRESS, 0, &flags) && !(flags & CT_REVNAT))
        return l2 ? egress4_steer(skb, &f) : TC_ACT_OK;
    int lb = lb4_from_pod(skb, &f, &ct_flags);  // f is the backend's from here on
    int action = lb == TC_ACT_OK ? handle4(skb, &f, DIR_EGRESS, ct_flags, &flags) : lb;
    // an L3 device is an enrolled host's tunnel: never an egress gateway's source
    return action == TC_ACT_OK && l2 ? egress4_steer(skb, &f) : action;
}

static __always_inline int to_endpoint(struct __sk_buff *skb, u32 l2) {
    struct flow4 f;
    u32 flags = 0;
    if (!parse4(skb, &f, l2)) return handle_other(skb, DIR_INGRESS, l2);
    int action = handle4(skb, &f, DIR_INGRESS, 0, &flags);
    if (action == TC_ACT_OK && (flags & (CT_REVNAT | CT_NEW)))
        lb4_to_pod(skb, &f);
    return action;
}

int from_pod(struct __sk_buff *skb) { return from_endpoint(skb, ETH_HLEN); }
int to_pod(struct __sk_buff *skb) { return to_endpoint(skb, ETH_HLEN); }
// the same on an L3 device (no link header)
int from_pod_l3(struct __sk_buff *skb) { return from_endpoint(skb, 0); }
int to_pod_l3(struct __sk_buff *skb) { return to_endpoint(skb, 0); }
