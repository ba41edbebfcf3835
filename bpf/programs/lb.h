// Plexus global service load-balancing, on the pod's host-side veth (IPv4, TCP and UDP).
//
// Inlined into datapath.c by the loader (bcc rewrites map calls only in the main file).
// lb4_from_pod runs at tc ingress (the pod's egress) before policy, for packets conntrack
// does not already know: a packet to a frontend (cluster IP, port, protocol) is DNATed to a
// backend, so policy then sees the backend. lb4_to_pod runs last at tc egress (the pod's
// ingress), for connections conntrack marks as a service's or does not know: a reply from a
// backend gets the frontend back as its source. A connection sticks to its backend through lb4_ct (keyed by
// the client's 5-tuple to the frontend); lb4_reverse maps the backend's replies back.
// A backend that is gone from lb4_backends is never chosen: a connection that pointed at
// it is sent to another one. Everything is pinned under PIN_DIR, so a restart adopts it.
//
// Maps: lb4_services  {vip, port, proto} -> {count, affinity, backend ids[LB_MAX_BACKENDS]}
//       lb4_backends  backend id -> {addr, port, proto, cluster id}
// Ports are in network byte order in every map, as on the wire.

#define LB_MAX_BACKENDS 64    // a power of two: slots are masked with it for the verifier
#define LB_PROBES 4           // backend ids tried when a slot points at a deleted backend
#define LB_VERDICT_TRANSLATED 3
#define LB_VERDICT_NO_BACKEND 4

struct lb4_key { u32 vip; u16 port; u8 proto; u8 pad; };
struct lb4_service { u16 count; u8 affinity; u8 flags; u32 backends[LB_MAX_BACKENDS]; };
struct lb4_backend { u32 addr; u16 port; u8 proto; u8 cluster_id; };
struct lb4_ct_key { u32 client; u32 vip; u16 cport; u16 vport; u8 proto; u8 pad[3]; };
struct lb4_ct_value { u32 backend_id; u32 pad; u64 created; };
struct lb4_rev_key { u32 backend; u32 client; u16 bport; u16 cport; u8 proto; u8 pad[3]; };
struct lb4_rev_value { u32 vip; u16 vport; u16 pad; };
struct lb4_event {
    u64 ts; u32 ifindex; u32 client; u32 vip; u32 backend; u32 backend_id;
    u16 cport; u16 vport; u16 bport; u8 proto; u8 verdict;
};

BPF_TABLE_PINNED("hash", struct lb4_key, struct lb4_service, lb4_services, 65536, PIN_DIR "/lb4_services", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", u32, struct lb4_backend, lb4_backends, 65536, PIN_DIR "/lb4_backends", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct lb4_ct_key, struct lb4_ct_value, lb4_ct, 262144, PIN_DIR "/lb4_ct");
BPF_TABLE_PINNED("lru_hash", struct lb4_rev_key, struct lb4_rev_value, lb4_reverse, 262144, PIN_DIR "/lb4_reverse");
BPF_PERF_OUTPUT(lb4_flows);

// Rewrite one address and its port (destination when dst, else source), checksums included.
// Ports in network byte order, as the maps hold them.
static __always_inline void lb4_rewrite(struct __sk_buff *skb, struct flow4 *p, int dst,
                                        u32 old_addr, u32 new_addr, u16 old_port, u16 new_port) {
    u32 csum_off = p->l4off + (p->proto == IPPROTO_TCP ? __builtin_offsetof(struct tcphdr, check)
                                                       : __builtin_offsetof(struct udphdr, check));
    u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;  // UDP: 0 means no sum
    u32 addr_off = p->l3off + (dst ? __builtin_offsetof(struct iphdr, daddr)
                              : __builtin_offsetof(struct iphdr, saddr));
    u32 port_off = p->l4off + (dst ? 2 : 0);
    bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, BPF_F_PSEUDO_HDR | mangled | sizeof(u32));
    bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | sizeof(u16));
    bpf_l3_csum_replace(skb, p->l3off + __builtin_offsetof(struct iphdr, check), old_addr,
                        new_addr, sizeof(u32));
    bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(u32), 0);
    bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(u16), 0);
}

// A backend of the service for a new connection: a random slot, then the next few if the
// chosen one points at a backend already deleted (maps are updated one entry at a time) or
// at the client itself (its reply could not come back from the frontend: no hairpin SNAT).
static __always_inline struct lb4_backend *lb4_select(struct lb4_service *svc, u32 client,
                                                      u32 *id) {
    u32 count = svc->count;
    if (count == 0 || count > LB_MAX_BACKENDS) return 0;
    u32 slot = bpf_get_prandom_u32() % count;
#pragma unroll
    for (int i = 0; i < LB_PROBES; i++) {
        u32 idx = (slot + i) % count;
        asm volatile("" : "+r"(idx));  // keep the mask: the verifier needs to see the bound
        u32 candidate = svc->backends[idx & (LB_MAX_BACKENDS - 1)];
        struct lb4_backend *be = lb4_backends.lookup(&candidate);
        if (be && be->addr != client) {
            *id = candidate;
            return be;
        }
    }
    return 0;
}

// Pod egress: DNAT a packet to a frontend. TC_ACT_OK to go on (translated or not a service),
// TC_ACT_SHOT when the service has no backend. When translated, `f` becomes the packet as it
// now is (the backend's address and port) and `ct_flags` gets CT_REVNAT.
static __always_inline int lb4_from_pod(struct __sk_buff *skb, struct flow4 *f, u32 *ct_flags) {
    if (!f->has_ports) return TC_ACT_OK;
    u16 cport = htons(f->sport), vport = htons(f->dport);
    struct lb4_key key = { .vip = f->daddr, .port = vport, .proto = f->proto, .pad = 0 };
    struct lb4_service *svc = lb4_services.lookup(&key);
    if (!svc) return TC_ACT_OK;

    struct lb4_ct_key ck;
    __builtin_memset(&ck, 0, sizeof(ck));
    ck.client = f->saddr; ck.vip = f->daddr; ck.cport = cport; ck.vport = vport; ck.proto = f->proto;
    u32 id = 0;
    struct lb4_backend *be = 0;
    int fresh = 0;
    struct lb4_ct_value *ct = lb4_ct.lookup(&ck);
    if (ct) {
        id = ct->backend_id;
        be = lb4_backends.lookup(&id);  // sticks to its backend while that one exists
    }
    if (!be) {
        be = lb4_select(svc, f->saddr, &id);
        fresh = 1;
    }
    struct lb4_event ev;
    __builtin_memset(&ev, 0, sizeof(ev));
    if (fresh) {
        ev.ts = bpf_ktime_get_ns(); ev.ifindex = skb->ifindex; ev.client = f->saddr;
        ev.vip = f->daddr; ev.cport = cport; ev.vport = vport; ev.proto = f->proto;
    }
    if (!be) {
        ev.verdict = LB_VERDICT_NO_BACKEND;
        lb4_flows.perf_submit(skb, &ev, sizeof(ev));
        count_as(COUNT_NO_BACKEND);
        return TC_ACT_SHOT;
    }
    u32 baddr = be->addr;
    u16 bport = be->port;
    if (fresh) {
        struct lb4_ct_value cv = { .backend_id = id, .pad = 0, .created = ev.ts };
        lb4_ct.update(&ck, &cv);
        struct lb4_rev_key rk;
        __builtin_memset(&rk, 0, sizeof(rk));
        rk.backend = baddr; rk.client = f->saddr; rk.bport = bport; rk.cport = cport; rk.proto = f->proto;
        struct lb4_rev_value rv = { .vip = f->daddr, .vport = vport, .pad = 0 };
        lb4_reverse.update(&rk, &rv);
        ev.verdict = LB_VERDICT_TRANSLATED;
        ev.backend = baddr; ev.bport = bport; ev.backend_id = id;
        lb4_flows.perf_submit(skb, &ev, sizeof(ev));
    }
    lb4_rewrite(skb, f, 1, f->daddr, baddr, vport, bport);
    f->daddr = baddr;
    f->dport = ntohs(bport);
    *ct_flags = CT_REVNAT;
    return TC_ACT_OK;
}

// Pod ingress: a backend's reply comes from the frontend the pod connected to.
static __always_inline void lb4_to_pod(struct __sk_buff *skb, struct flow4 *f) {
    if (!f->has_ports) return;
    struct lb4_rev_key rk;
    __builtin_memset(&rk, 0, sizeof(rk));
    rk.backend = f->saddr; rk.client = f->daddr; rk.bport = htons(f->sport);
    rk.cport = htons(f->dport); rk.proto = f->proto;
    struct lb4_rev_value *rv = lb4_reverse.lookup(&rk);
    if (!rv) return;
    u32 vip = rv->vip;
    u16 vport = rv->vport;
    lb4_rewrite(skb, f, 0, f->saddr, vip, rk.bport, vport);
}
