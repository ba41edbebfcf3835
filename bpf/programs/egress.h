// Plexus egress gateway (IPv4: TCP, UDP and ICMP echo; other protocols are dropped, never
// leaked).
//
// Inlined into datapath.c by the loader. Two halves:
// - steering, on the source node, after policy at the pod's veth: egress_policy (LPM on
//   source pod IP then destination) says where a selected pod's packet leaves. An excluded
//   destination leaves as before; a covered one is sent through the node's VXLAN device (its
//   remote the gateway node) to the active gateway; with no healthy gateway it is dropped.
// - NAT, on the gateway's uplink: egress_snat (same key) names the egress IP a packet leaves
//   with and the pod's node. egress_nat_out (tc egress) gives a connection a port of the
//   egress IP, kept in egress_nat (forward) and egress_revnat (replies); egress_nat_in (tc
//   ingress) puts the pod back as the reply's destination and sends the reply back through
//   the tunnel to the pod's node (the way the request came: WireGuard would refuse a packet
//   from an outside source between nodes). A translation lives as long as a conntrack entry
//   of datapath.c after its last packet (TCP 6 h, 10 s after a FIN or RST, 60 s otherwise):
//   an expired one is made anew and its port may go to another connection; the agent sweeps
//   expired ones away.
// Every map is pinned under PIN_DIR: a restarted agent keeps established connections.

#define EGRESS_EXCLUDED 1       // leaves as before
#define EGRESS_NO_GATEWAY 2     // no healthy gateway: dropped
#define EGRESS_PORT_MIN 32768
#define EGRESS_PORT_SPAN 28232  // ports 32768..60999, as Linux's ephemeral range
#define EGRESS_PORT_PROBES 8
#define EGRESS_VNI 0xE6E6       // the tunnel's VXLAN network id
#define REASON_NO_EGRESS_GATEWAY 1
#define ACTION_EGRESS_SNAT 3    // a flow event's verdict: a new connection translated here
#define COUNT_NO_EGRESS_GATEWAY 3
#define COUNT_EGRESS_NO_PORT 4  // the gateway found no free port for a new connection

struct egress_key { u32 prefixlen; u32 source; u32 destination; };
struct egress_value { u32 gateway; u32 egress_ip; u32 flags; };
// key 0: this node's tunnel device and the MAC every egress tunnel device carries
struct egress_tunnel { u32 ifindex; u8 mac[6]; u8 pad[2]; };
struct egress_nat_key { u32 saddr; u32 daddr; u16 sport; u16 dport; u8 proto; u8 pad[3]; };
// forward: the egress IP and port; reverse: the pod's address and port, and `via`, the
// pod's node to tunnel the reply back to (0: a pod of this node, routed); `seen`: the last
// packet (written at most once a second), `flags`: EGRESS_NAT_CLOSING
struct egress_nat_value { u32 addr; u32 via; u16 port; u16 flags; u16 pad[2]; u64 seen; };
#define EGRESS_NAT_CLOSING 1    // a FIN or RST went by
#define TCP_SYN 0x02
#define TCP_ACK 0x10
#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO_REQUEST 8
struct egress_icmp { u8 type; u8 code; u16 check; u16 id; u16 seq; };

BPF_TABLE_PINNED("lpm_trie", struct egress_key, struct egress_value, egress_policy, 262144, PIN_DIR "/egress_policy", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct egress_key, struct egress_value, egress_snat, 262144, PIN_DIR "/egress_snat", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", u32, struct egress_tunnel, egress_tunnel, 1, PIN_DIR "/egress_tunnel");
BPF_TABLE_PINNED("lru_hash", struct egress_nat_key, struct egress_nat_value, egress_nat, 262144, PIN_DIR "/egress_nat");
BPF_TABLE_PINNED("lru_hash", struct egress_nat_key, struct egress_nat_value, egress_revnat, 262144, PIN_DIR "/egress_revnat");

// Both tries: the most specific destination of this source (prefixlen counts both addresses)
static __always_inline struct egress_value *egress_steering(u32 source, u32 destination) {
    struct egress_key k = { .prefixlen = 64, .source = source, .destination = destination };
    return egress_policy.lookup(&k);
}

static __always_inline struct egress_value *egress_translation(u32 source, u32 destination) {
    struct egress_key k = { .prefixlen = 64, .source = source, .destination = destination };
    return egress_snat.lookup(&k);
}

static __always_inline int egress_nat_live(struct egress_nat_value *v, u64 now, u8 proto) {
    u64 life = (v->flags & EGRESS_NAT_CLOSING) ? CT_CLOSE_NS
             : proto == IPPROTO_TCP ? CT_LIFETIME_TCP_NS : CT_LIFETIME_NS;
    return now - v->seen < life;
}

// What a packet of a live translation tells its entries: a FIN or RST closes it, a new SYN
// opens it again (the pod reused the tuple); 1 when they are due to be written.
static __always_inline u16 egress_nat_flags(u16 flags, u8 tcp_flags) {
    if ((tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN) return 0;
    return flags | (tcp_flags & (TCP_FIN | TCP_RST) ? EGRESS_NAT_CLOSING : 0);
}

static __always_inline void egress_nat_touch(struct egress_nat_value *v, struct egress_nat_value *pair,
                                             u64 now, u8 tcp_flags) {
    u16 flags = egress_nat_flags(v->flags, tcp_flags);
    if (now - v->seen < CT_REFRESH_NS && flags == v->flags) return;
    v->seen = now;
    v->flags = flags;
    if (pair) { pair->seen = now; pair->flags = flags; }
}

// Into the node's tunnel device, to the node `remote` (network order); dropped, never
// leaked, while there is no tunnel.
static __always_inline int egress4_tunnel(struct __sk_buff *skb, u32 remote) {
    u32 zero = 0;
    struct egress_tunnel *t = egress_tunnel.lookup(&zero);
    if (!t || !t->ifindex) {
        count_as(COUNT_NO_EGRESS_GATEWAY);
        return TC_ACT_SHOT;
    }
    struct bpf_tunnel_key key = {};
    key.remote_ipv4 = ntohl(remote);
    key.tunnel_id = EGRESS_VNI;
    key.tunnel_ttl = 64;
    if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), 0) < 0) return TC_ACT_SHOT;
    // every tunnel device has the same MAC: the frame is for the other end's device
    bpf_skb_store_bytes(skb, 0, t->mac, 6, 0);
    return bpf_redirect(t->ifindex, 0);
}

static __always_inline int egress4_drop(struct __sk_buff *skb, struct flow4 *f) {
    count_as(COUNT_NO_EGRESS_GATEWAY);
    struct flow_event ev = { .ts = bpf_ktime_get_ns(), .ifindex = skb->ifindex,
                             .saddr = f->saddr, .daddr = f->daddr, .identity = ID_WORLD,
                             .sport = f->sport, .dport = f->dport, .proto = f->proto,
                             .direction = DIR_EGRESS, .verdict = ACTION_DENY,
                             .reason = REASON_NO_EGRESS_GATEWAY, .tcp_flags = f->tcp_flags };
    flows.perf_submit(skb, &ev, sizeof(ev));
    return TC_ACT_SHOT;
}

// After policy allowed a pod's packet: TC_ACT_OK to leave as before, else a verdict.
static __always_inline int egress4_steer(struct __sk_buff *skb, struct flow4 *f) {
    struct egress_value *v = egress_steering(f->saddr, f->daddr);
    if (!v || (v->flags & EGRESS_EXCLUDED)) return TC_ACT_OK;
    if ((v->flags & EGRESS_NO_GATEWAY) || !v->gateway) return egress4_drop(skb, f);
    return egress4_tunnel(skb, v->gateway);
}

// The tunnel device, tc ingress, on every node. What another node sends through it is a
// request this gateway translates, or a reply to a pod steered from here. Anything else (a
// source that steers here before this gateway has the translation, or after it dropped it)
// is dropped: forwarded, it would leave with the pod's own address.
int egress_tunnel_in(struct __sk_buff *skb) {
    struct flow4 f;
    if (!parse4(skb, &f, ETH_HLEN)) return TC_ACT_OK;  // not IPv4: nothing is steered
    struct egress_value *t = egress_translation(f.saddr, f.daddr);
    if (t && !(t->flags & EGRESS_EXCLUDED)) return TC_ACT_OK;
    struct egress_value *s = egress_steering(f.daddr, f.saddr);
    if (s && !(s->flags & EGRESS_EXCLUDED)) return TC_ACT_OK;
    return egress4_drop(skb, &f);
}

// An ICMP echo of `type`: its identifier (network order), which a translation takes as the
// port; 0 when the packet is none (or is cut short).
static __always_inline int egress_icmp_echo(struct __sk_buff *skb, struct flow4 *f, u8 type,
                                            u16 *id) {
    if (f->proto != IPPROTO_ICMP) return 0;
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct egress_icmp *icmp = data + (f->l4off & 0x7F);
    if ((void *)(icmp + 1) > data_end || icmp->type != type || icmp->code) return 0;
    *id = icmp->id;
    return 1;
}

// The address (source, or destination when `dst`) and the port (an ICMP echo's identifier)
// rewritten, checksums with them; ICMP's checksum covers no address.
static __always_inline void egress_rewrite(struct __sk_buff *skb, struct flow4 *f, int dst,
                                           u32 old_addr, u32 new_addr, u16 old_port, u16 new_port) {
    int icmp = f->proto == IPPROTO_ICMP;
    u32 csum_off = f->l4off + (icmp ? __builtin_offsetof(struct egress_icmp, check)
                               : f->proto == IPPROTO_TCP ? __builtin_offsetof(struct tcphdr, check)
                                                         : __builtin_offsetof(struct udphdr, check));
    u64 mangled = f->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
    u32 addr_off = sizeof(struct ethhdr) + (dst ? __builtin_offsetof(struct iphdr, daddr)
                                                : __builtin_offsetof(struct iphdr, saddr));
    u32 port_off = f->l4off + (icmp ? __builtin_offsetof(struct egress_icmp, id) : dst ? 2 : 0);
    if (!icmp)
        bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, BPF_F_PSEUDO_HDR | mangled | sizeof(u32));
    bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | sizeof(u16));
    bpf_l3_csum_replace(skb, sizeof(struct ethhdr) + __builtin_offsetof(struct iphdr, check),
                        old_addr, new_addr, sizeof(u32));
    bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(u32), 0);
    bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(u16), 0);
}

// The gateway's uplink, tc egress: a selected pod's packet leaves with the egress IP.
int egress_nat_out(struct __sk_buff *skb) {
    struct flow4 f;
    if (!parse4(skb, &f, ETH_HLEN)) return TC_ACT_OK;
    struct egress_value *v = egress_translation(f.saddr, f.daddr);
    if (!v || (v->flags & EGRESS_EXCLUDED)) return TC_ACT_OK;
    if (!v->egress_ip) return TC_ACT_SHOT;  // cannot be translated: never leaked
    u16 sport = htons(f.sport), dport = htons(f.dport);
    // an ICMP echo's identifier stands for the port; other portless packets: never leaked
    if (!f.has_ports && !egress_icmp_echo(skb, &f, ICMP_ECHO_REQUEST, &sport)) return TC_ACT_SHOT;
    struct egress_nat_key fwd = { .saddr = f.saddr, .daddr = f.daddr, .sport = sport,
                                  .dport = dport, .proto = f.proto };
    struct egress_nat_value *nat = egress_nat.lookup(&fwd);
    u64 now = bpf_ktime_get_coarse_ns();
    if (!nat || nat->addr != v->egress_ip || !egress_nat_live(nat, now, f.proto)) {
        // a port of the egress IP no other connection to this peer holds: the pod's own
        // first, then random ones, so two pods using one source port both get through
        struct egress_nat_key rev = { .saddr = f.daddr, .daddr = v->egress_ip, .sport = dport,
                                      .proto = f.proto };
        u16 port = sport;
        int found = 0;
#pragma unroll
        for (int i = 0; i < EGRESS_PORT_PROBES; i++) {
            rev.dport = port;
            struct egress_nat_value *held = egress_revnat.lookup(&rev);
            if (!held || (held->addr == f.saddr && held->port == sport)
                || !egress_nat_live(held, now, f.proto)) { found = 1; break; }
            port = htons(EGRESS_PORT_MIN + bpf_get_prandom_u32() % EGRESS_PORT_SPAN);
        }
        if (!found) { count_as(COUNT_EGRESS_NO_PORT); return TC_ACT_SHOT; }
        u16 flags = egress_nat_flags(0, f.tcp_flags);
        struct egress_nat_value out = { .addr = v->egress_ip, .port = port, .flags = flags,
                                        .seen = now };
        struct egress_nat_value back = { .addr = f.saddr, .via = v->gateway, .port = sport,
                                         .flags = flags, .seen = now };
        if (egress_revnat.update(&rev, &back) || egress_nat.update(&fwd, &out)) return TC_ACT_SHOT;
        nat = egress_nat.lookup(&fwd);
        if (!nat) return TC_ACT_SHOT;
        // one flow per translation made: the pod, its peer and the egress IP and port
        struct flow_event ev = { .ts = bpf_ktime_get_ns(), .ifindex = skb->ifindex,
                                 .saddr = f.saddr, .daddr = f.daddr, .identity = ID_WORLD,
                                 .sport = ntohs(sport), .dport = f.dport, .proto = f.proto,
                                 .direction = DIR_EGRESS, .verdict = ACTION_EGRESS_SNAT,
                                 .tcp_flags = f.tcp_flags, .nat_port = port,
                                 .nat_addr = v->egress_ip };
        flows.perf_submit(skb, &ev, sizeof(ev));
    } else {
        struct egress_nat_key rev = { .saddr = f.daddr, .daddr = nat->addr, .sport = dport,
                                      .dport = nat->port, .proto = f.proto };
        egress_nat_touch(nat, egress_revnat.lookup(&rev), now, f.tcp_flags);
    }
    egress_rewrite(skb, &f, 0, f.saddr, nat->addr, sport, nat->port);
    return TC_ACT_OK;
}

// The gateway's uplink, tc ingress: a reply to the egress IP goes back to the pod.
int egress_nat_in(struct __sk_buff *skb) {
    struct flow4 f;
    if (!parse4(skb, &f, ETH_HLEN)) return TC_ACT_OK;
    u16 dport = htons(f.dport);
    if (!f.has_ports && !egress_icmp_echo(skb, &f, ICMP_ECHO_REPLY, &dport)) return TC_ACT_OK;
    struct egress_nat_key rev = { .saddr = f.saddr, .daddr = f.daddr, .sport = htons(f.sport),
                                  .dport = dport, .proto = f.proto };
    struct egress_nat_value *back = egress_revnat.lookup(&rev);
    u64 now = bpf_ktime_get_coarse_ns();
    if (!back || !egress_nat_live(back, now, f.proto)) return TC_ACT_OK;
    struct egress_nat_key fwd = { .saddr = back->addr, .daddr = f.saddr, .sport = back->port,
                                  .dport = rev.sport, .proto = f.proto };
    egress_nat_touch(back, egress_nat.lookup(&fwd), now, f.tcp_flags);
    u32 via = back->via;
    egress_rewrite(skb, &f, 1, f.daddr, back->addr, dport, back->port);
    if (!via) return TC_ACT_OK;
    return egress4_tunnel(skb, via);
}
