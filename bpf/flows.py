"""Flows: what the datapath decided about a connection, kept per node and written as Hubble does.

A `Flow` is one verdict (a policy verdict or a service translation) with both ends named:
IP, port, identity, labels, namespace, pod, cluster. The node keeps the last ones in a
`FlowRing` (bounded; what falls out is gone, what a slow reader misses is counted), answers
`--last N`, `--since` and `--follow` from it, and narrows with a `FlowFilter`: criteria that
all must hold, each a set of values any of which matches, each negatable.

On the wire every flow is Hubble's `GetFlowsResponse` as `hubble observe -o json` prints it
(`{"flow": {...}, "node_name": ..., "time": ...}`, protojson with proto field names), so
scripts written against Hubble read Plexus unchanged; `Flow.from_json` reads it back, which
is how the relay and the web page filter what nodes sent.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import datetime
import ipaddress
import json
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from plexus.core.api import ApiError
from plexus.core.module import Key

# ---- the flow ------------------------------------------------------------------------------
VERDICTS = ("FORWARDED", "DROPPED", "TRANSLATED")
DIRECTIONS = ("INGRESS", "EGRESS")
# what kind of event a flow came from: an L3/L4 policy verdict, a service translation, or an
# egress gateway's translation of a pod's connection to its egress IP
KINDS = ("policy-verdict", "translation", "egress-gateway")
# Hubble's DropReason numbers for the reasons this datapath drops for
DROP_REASONS = {"POLICY_DENIED": 133, "SERVICE_BACKEND_NOT_FOUND": 158, "NO_EGRESS_GATEWAY": 194}
DROP_REASON_OF_EVENT = {1: "NO_EGRESS_GATEWAY"}  # a flow event's reason (datapath.c) when dropped
PROTOCOLS = {1: "ICMPv4", 6: "TCP", 17: "UDP", 58: "ICMPv6"}
TCP_FLAG_BITS = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10),
                 ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80))
# Cilium's monitor message types, which Hubble's event_type.type carries
_EVENT_TYPE = {"drop": 1, "trace": 4, "policy-verdict": 5}
# The egress gateway names the policy behind a translation it made: (pod IP, destination IP)
# -> "cluster/namespace/name", "" when none does (any more)
EGRESS_POLICY_OF: Key[Callable[[str, str], str]] = Key("egress-policy-of")
_LABEL_NAMESPACE = "io.kubernetes.pod.namespace"
_LABEL_CLUSTER = "io.cilium.k8s.policy.cluster"


@dataclass(frozen=True, slots=True)
class Peer:
    """One end of a flow."""

    ip: str
    port: int = 0
    identity: int = 0
    labels: tuple[str, ...] = ()   # source-prefixed, as identities hold them: "k8s:app=web"
    namespace: str = ""
    pod: str = ""                  # the pod's name, without its namespace
    cluster: str = ""

    def label_map(self) -> dict[str, str]:
        out = {}
        for lbl in self.labels:
            kv = lbl.partition(":")[2] if ":" in lbl.partition("=")[0] else lbl
            k, _, v = kv.partition("=")
            out[k] = v
        return out

    def name(self) -> str:
        """`namespace/pod` when known, else the IP."""
        return f"{self.namespace}/{self.pod}" if self.pod else self.ip


@dataclass(frozen=True, slots=True)
class Flow:
    time_ns: int                   # when the datapath saw the packet (Unix time, ns)
    node: str                      # "cluster/node", as Hubble names nodes in a mesh
    kind: str                      # one of KINDS
    verdict: str                   # one of VERDICTS
    direction: str                 # one of DIRECTIONS, as the pod sees it
    protocol: str                  # PROTOCOLS' names, or the number
    source: Peer
    destination: Peer
    drop_reason: str = ""          # a key of DROP_REASONS when verdict is DROPPED
    tcp_flags: int = 0
    is_reply: bool | None = False  # verdicts are taken on a connection's first packet
    service: str = ""              # "namespace/name" of the service the destination was reached by
    egress_policy: str = ""        # egress-gateway: the policy ("cluster/namespace/name")
    egress_ip: str = ""            # ... and the address and port the connection left with
    egress_port: int = 0
    # its JSON once made (or as read): a flow sent to many readers, or passed on by the relay,
    # is written once
    _json: dict[str, Any] | None = field(default=None, init=False, compare=False, repr=False)

    # ---- Hubble's JSON ----
    def to_json(self) -> dict[str, Any]:
        """Hubble's GetFlowsResponse for this flow (protojson, proto names, zero values left out)."""
        if self._json is None:
            object.__setattr__(self, "_json", self._make_json())
        assert self._json is not None
        return self._json

    def _make_json(self) -> dict[str, Any]:
        stamp = rfc3339(self.time_ns)
        ipv6 = ":" in self.source.ip
        f: dict[str, Any] = {"time": stamp, "verdict": self.verdict}
        if self.drop_reason:
            f["drop_reason"] = DROP_REASONS.get(self.drop_reason, 0)
        f["IP"] = {"source": self.source.ip, "destination": self.destination.ip,
                   "ipVersion": "IPv6" if ipv6 else "IPv4"}
        l4 = self._l4()
        if l4:
            f["l4"] = l4
        f["source"] = _endpoint_json(self.source)
        f["destination"] = _endpoint_json(self.destination)
        f["Type"] = "L3_L4"
        f["node_name"] = self.node
        if self.kind in ("translation", "egress-gateway"):
            event = {"type": _EVENT_TYPE["trace"]}
        elif self.verdict == "DROPPED":
            event = {"type": _EVENT_TYPE["drop"], "sub_type": DROP_REASONS.get(self.drop_reason, 0)}
        else:
            event = {"type": _EVENT_TYPE["policy-verdict"]}
        f["event_type"] = event
        if self.service:
            ns, _, name = self.service.rpartition("/")
            f["destination_service"] = {"name": name, **({"namespace": ns} if ns else {})}
        f["traffic_direction"] = self.direction
        if self.kind == "egress-gateway":  # not Hubble's: readers of Hubble's JSON skip it
            f["egress_gateway"] = {"policy": self.egress_policy, "gateway": self.node,
                                   "egress_ip": self.egress_ip, "egress_port": self.egress_port}
        if self.drop_reason:
            f["drop_reason_desc"] = self.drop_reason
        if self.is_reply is not None:
            f["is_reply"] = self.is_reply
        f["Summary"] = self.summary()
        return {"flow": f, "node_name": self.node, "time": stamp}

    def _l4(self) -> dict[str, Any]:
        if self.protocol in ("TCP", "UDP"):
            body: dict[str, Any] = {k: v for k, v in (("source_port", self.source.port),
                                                       ("destination_port", self.destination.port)) if v}
            flags = {name: True for name, bit in TCP_FLAG_BITS if self.tcp_flags & bit}
            if self.protocol == "TCP" and flags:
                body["flags"] = flags
            return {self.protocol: body}
        if self.protocol in ("ICMPv4", "ICMPv6"):
            return {self.protocol: {}}
        return {}

    def flag_names(self) -> list[str]:
        return [name for name, bit in TCP_FLAG_BITS if self.tcp_flags & bit]

    def summary(self) -> str:
        if self.protocol == "TCP":
            return "TCP Flags: " + ", ".join(self.flag_names()) if self.tcp_flags else "TCP"
        return self.protocol

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Flow:
        """The flow of a GetFlowsResponse (what `to_json` writes); KeyError/ValueError when
        it is not one."""
        f = doc["flow"]
        ip = f["IP"]
        l4: dict[str, Any] = f.get("l4") or {}
        protocol: str = next(iter(l4), "")
        body: dict[str, Any] = l4.get(protocol) or {}
        event = f.get("event_type") or {}
        svc = f.get("destination_service")
        egress = f.get("egress_gateway") or {}
        flow = cls(
            time_ns=parse_time(f["time"]), node=f.get("node_name", doc.get("node_name", "")),
            kind="egress-gateway" if egress else
            "translation" if event.get("type") == _EVENT_TYPE["trace"] else "policy-verdict",
            verdict=f["verdict"], direction=f.get("traffic_direction", ""),
            protocol=protocol or "",
            source=_endpoint_from(f.get("source") or {}, ip["source"], body.get("source_port", 0)),
            destination=_endpoint_from(f.get("destination") or {}, ip["destination"],
                                       body.get("destination_port", 0)),
            drop_reason=f.get("drop_reason_desc", ""),
            tcp_flags=sum(bit for name, bit in TCP_FLAG_BITS if (body.get("flags") or {}).get(name)),
            is_reply=f.get("is_reply"),
            service=(f"{svc.get('namespace', '')}/{svc['name']}" if svc else ""),
            egress_policy=str(egress.get("policy", "")), egress_ip=str(egress.get("egress_ip", "")),
            egress_port=int(egress.get("egress_port", 0)))
        object.__setattr__(flow, "_json", doc)
        return flow

    def compact(self) -> str:
        """One line, the way `hubble observe` prints one by default."""
        t = datetime.datetime.fromtimestamp(self.time_ns / 1e9).strftime("%b %d %H:%M:%S.%f")[:-3]

        def at(p: Peer) -> str:
            who = f"{p.cluster}/{p.name()}" if p.cluster and p.pod else p.name()
            if p.pod and p.ip:
                who += f" ({p.ip})"
            elif not p.pod and p.identity:
                who += f" (ID:{p.identity})"
            return f"{who}:{p.port}" if p.port else who

        how = self.verdict
        if self.drop_reason:
            how += f" ({self.drop_reason})"
        via = f" via {self.service}" if self.service else ""
        if self.kind == "egress-gateway":
            via = (f" by {self.egress_policy or '(policy gone)'} through {self.node} as "
                   f"{self.egress_ip}:{self.egress_port}")
        flags = f" {','.join(self.flag_names())}" if self.tcp_flags else ""
        arrow = "<>" if self.kind == "translation" else ("->" if self.direction == "EGRESS" else "<-")
        if self.direction == "INGRESS":
            left, right = self.destination, self.source
        else:
            left, right = self.source, self.destination
        return (f"{t} [{self.node}]: {at(left)} {arrow} {at(right)}{via} "
                f"{self.kind} {how} ({self.protocol}{flags})")


def _endpoint_json(p: Peer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.identity:
        out["identity"] = p.identity
    if p.cluster:
        out["cluster_name"] = p.cluster
    if p.namespace:
        out["namespace"] = p.namespace
    if p.labels:
        out["labels"] = list(p.labels)
    if p.pod:
        out["pod_name"] = p.pod
    return out


def _endpoint_from(e: dict[str, Any], ip: str, port: int) -> Peer:
    return Peer(ip=ip, port=int(port), identity=int(e.get("identity", 0)),
                labels=tuple(e.get("labels", ())), namespace=e.get("namespace", ""),
                pod=e.get("pod_name", ""), cluster=e.get("cluster_name", ""))


def rfc3339(ns: int) -> str:
    """Unix ns as RFC 3339 in UTC with nanoseconds, as protojson writes a Timestamp."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = datetime.datetime.fromtimestamp(secs, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"


_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_time(text: str) -> int:
    """An RFC 3339 time as Unix ns; ValueError naming the text when it is not one."""
    m = _TIME.match(text)
    if not m:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    zone = "+00:00" if m[3] == "Z" else m[3]
    base = datetime.datetime.fromisoformat(m[1] + zone)
    return int(base.timestamp()) * 1_000_000_000 + int((m[2] or "0").ljust(9, "0"))


def peer_labels(labels: Iterable[str]) -> tuple[str, str]:
    """(namespace, cluster) that an identity's labels name."""
    ns = cluster = ""
    for lbl in labels:
        kv = lbl.partition(":")[2]
        k, _, v = kv.partition("=")
        if k == _LABEL_NAMESPACE:
            ns = v
        elif k == _LABEL_CLUSTER:
            cluster = v
    return ns, cluster


def lost_json(node: str, source: str, count: int, now_ns: int | None = None) -> dict[str, Any]:
    """Hubble's LostEvent response: `count` events lost at `source` (PERF_EVENT_RING_BUFFER:
    the kernel's buffer overran; OBSERVER_EVENTS_QUEUE: this reader was too slow)."""
    stamp = rfc3339(now_ns if now_ns is not None else time.time_ns())
    return {"lost_events": {"source": source, "num_events_lost": count}, "node_name": node, "time": stamp}


# ---- filters -------------------------------------------------------------------------------
class FilterError(ValueError):
    """A filter the flows cannot be narrowed with; says which one and why."""


# criterion name -> what it looks at; a `from-`/`to-` form looks at one end only
PEER_FIELDS = ("pod", "namespace", "label", "identity", "cluster", "ip", "port")
FLOW_FIELDS = ("protocol", "verdict", "drop-reason", "type", "node", "service")
FIELDS = (*PEER_FIELDS, *(f"{side}-{f}" for side in ("from", "to") for f in PEER_FIELDS), *FLOW_FIELDS)


@dataclass(frozen=True, slots=True)
class Criterion:
    field: str
    values: tuple[str, ...]
    negate: bool = False

    def check(self) -> None:
        if self.field not in FIELDS:
            raise FilterError(f"filter {self.field!r}: no such filter (known: {', '.join(FIELDS)})")
        if not self.values:
            raise FilterError(f"filter {self.field!r}: needs a value")
        base = self.field.partition("-")[2] if self.field.startswith(("from-", "to-")) else self.field
        for v in self.values:
            if base == "ip":
                try:
                    ipaddress.ip_network(v, strict=False)
                except ValueError:
                    raise FilterError(f"filter {self.field}: {v!r} is not an IP or CIDR") from None
            elif base in ("identity", "port") and not v.isdigit():
                raise FilterError(f"filter {self.field}: {v!r} is not a number")
            elif base == "verdict" and v.upper() not in VERDICTS:
                raise FilterError(f"filter verdict: {v!r} is not one of {', '.join(VERDICTS)}")
            elif base == "type" and v not in KINDS:
                raise FilterError(f"filter type: {v!r} is not one of {', '.join(KINDS)}")
            elif base == "drop-reason" and v.upper() not in DROP_REASONS:
                raise FilterError(f"filter drop-reason: {v!r} is not one of {', '.join(DROP_REASONS)}")

    def matches(self, flow: Flow) -> bool:
        hit = any(self._one(flow, v) for v in self.values)
        return hit != self.negate

    def _one(self, flow: Flow, value: str) -> bool:
        name = self.field
        if name in FLOW_FIELDS:
            if name == "protocol":
                return flow.protocol.lower() == value.lower() or (
                    value.lower() == "icmp" and flow.protocol.startswith("ICMP"))
            if name == "verdict":
                return flow.verdict == value.upper()
            if name == "drop-reason":
                return flow.drop_reason == value.upper()
            if name == "type":
                return flow.kind == value
            if name == "node":
                return flow.node == value or flow.node.endswith("/" + value) or (
                    flow.node.replace("/", "-") == value)
            return flow.service == value or flow.service.endswith("/" + value)
        side, _, base = name.partition("-") if name.startswith(("from-", "to-")) else ("", "", name)
        peers = {"from": (flow.source,), "to": (flow.destination,)}.get(side, (flow.source, flow.destination))
        return any(_peer_matches(p, base, value) for p in peers)


def _peer_matches(p: Peer, field_: str, value: str) -> bool:
    if field_ == "pod":
        ns, slash, pod = value.rpartition("/")
        if slash and ns != p.namespace:
            return False
        return bool(p.pod) and p.pod.startswith(pod) if pod else bool(slash)
    if field_ == "namespace":
        return p.namespace == value
    if field_ == "label":
        k, eq, v = value.partition("=")
        k = k.partition(":")[2] if ":" in k else k
        labels = p.label_map()
        return k in labels and (not eq or labels[k] == v)
    if field_ == "identity":
        return p.identity == int(value)
    if field_ == "cluster":
        return p.cluster == value
    if field_ == "ip":
        try:
            return ipaddress.ip_address(p.ip) in ipaddress.ip_network(value, strict=False)
        except ValueError:
            return False
    return p.port == int(value)  # port


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Every criterion must hold; an empty filter lets everything through."""

    criteria: tuple[Criterion, ...] = ()

    def matches(self, flow: Flow) -> bool:
        return all(c.matches(flow) for c in self.criteria)

    def to_query(self) -> str:
        return json.dumps([[c.field, list(c.values), c.negate] for c in self.criteria])

    @classmethod
    def from_query(cls, text: str | None) -> FlowFilter:
        """The filter `to_query` wrote; FilterError naming what is wrong."""
        if not text:
            return cls()
        try:
            raw = json.loads(text)
            crits = tuple(Criterion(str(f), tuple(str(v) for v in vals), bool(neg)) for f, vals, neg in raw)
        except (ValueError, TypeError) as e:
            raise FilterError(f"filters: expected a JSON list of [field, [values], negate]: {e}") from None
        for c in crits:
            c.check()
        return cls(crits)

    @classmethod
    def of(cls, *criteria: tuple[str, Sequence[str]] | tuple[str, Sequence[str], bool]) -> FlowFilter:
        crits = tuple(Criterion(c[0], tuple(c[1]), bool(c[2]) if len(c) > 2 else False)
                      for c in criteria)
        for c in crits:
            c.check()
        return cls(crits)


# ---- the ring ------------------------------------------------------------------------------
@dataclass(eq=False)
class Subscription:
    filter: FlowFilter
    queue: asyncio.Queue[Flow]
    overflowed: int = 0    # flows this reader missed because it fell behind


class FlowRing:
    """The last `capacity` flows of this node, and the readers following new ones."""

    def __init__(self, capacity: int = 4096, node: str = "", queue_size: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"flow ring capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self.node = node
        self.queue_size = queue_size
        self.flows: collections.deque[Flow] = collections.deque(maxlen=capacity)
        self.subscribers: set[Subscription] = set()
        self.seen = 0          # flows recorded since start
        self.lost_perf = 0     # events the kernel's perf buffer overwrote before we read them
        self.lost_readers = 0  # flows slow readers missed

    def record(self, flow: Flow) -> None:
        """Keep `flow` in time order (one older than the newest kept, as a slow node's, goes
        where its time puts it); hand it to the readers it matches."""
        if self.flows and flow.time_ns < self.flows[-1].time_ns:
            at = bisect.bisect_right(self.flows, flow.time_ns, key=lambda f: f.time_ns)
            if len(self.flows) < self.capacity:
                self.flows.insert(at, flow)
            elif at > 0:  # full: the oldest goes; a flow older than all kept is not kept
                self.flows.popleft()
                self.flows.insert(at - 1, flow)
        else:
            self.flows.append(flow)
        self.seen += 1
        for sub in self.subscribers:
            if not sub.filter.matches(flow):
                continue
            if sub.queue.full():
                sub.overflowed += 1
                self.lost_readers += 1
            else:
                sub.queue.put_nowait(flow)

    def lost(self, count: int) -> None:
        self.lost_perf += count

    def recent(self, flt: FlowFilter, last: int | None = None, since_ns: int | None = None) -> list[Flow]:
        """The ring's flows that `flt` lets through, oldest first: from `since_ns` on, the
        last `last` of them (None: all)."""
        out = [f for f in self.flows if (since_ns is None or f.time_ns >= since_ns) and flt.matches(f)]
        if last is not None:
            out = out[-last:] if last else []
        return out

    async def observe(self, flt: FlowFilter, last: int | None = None, since_ns: int | None = None,
                      follow: bool = False) -> AsyncGenerator[dict[str, Any], None]:
        """Hubble responses: the recent flows, then (following) the new ones as they come, with
        a lost-events response whenever flows were lost (perf buffer or this reader's queue)."""
        sub = Subscription(flt, asyncio.Queue(maxsize=self.queue_size))
        # subscribed and history read with no await between: no flow falls between the two
        if follow:
            self.subscribers.add(sub)
        history = self.recent(flt, last, since_ns)
        lost_seen = self.lost_perf
        try:
            if lost_seen:
                yield lost_json(self.node, "PERF_EVENT_RING_BUFFER", lost_seen)
            for f in history:
                yield f.to_json()
            if not follow:
                return
            reported = 0
            while True:
                flow = await sub.queue.get()
                if self.lost_perf > lost_seen:
                    yield lost_json(self.node, "PERF_EVENT_RING_BUFFER", self.lost_perf - lost_seen)
                    lost_seen = self.lost_perf
                if sub.overflowed > reported:
                    yield lost_json(self.node, "OBSERVER_EVENTS_QUEUE", sub.overflowed - reported)
                    reported = sub.overflowed
                yield flow.to_json()
        finally:
            self.subscribers.discard(sub)

    def status(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "flows": len(self.flows), "seen": self.seen,
                "lostPerfBuffer": self.lost_perf, "lostSlowReaders": self.lost_readers}


def observe_request(ring: FlowRing, q: dict[str, str]) -> AsyncGenerator[Any, None]:
    """Hubble's GetFlows over `ring`: `last` (default 20; with `since`, every one), `since` (a
    duration or an RFC 3339 time), `follow` ("1"), `filters` (FlowFilter.to_query). A bad
    request is an API error 400 naming what is wrong."""
    try:
        flt = FlowFilter.from_query(q.get("filters"))
        since = parse_since(q["since"]) if q.get("since") else None
        last_raw = q.get("last")
        last = int(last_raw) if last_raw not in (None, "") else (None if since is not None else 20)
    except (FilterError, ValueError) as e:
        raise ApiError(400, str(e)) from None
    if last is not None and last < 0:
        raise ApiError(400, f"last: {last} is negative")
    return ring.observe(flt, last, since, follow=q.get("follow") == "1")


def parse_since(text: str, now_ns: int | None = None) -> int:
    """`5m`, `30s`, `1h`, `2h30m` ago, or an RFC 3339 time, as Unix ns."""
    now = now_ns if now_ns is not None else time.time_ns()
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", text.strip())
    if m and text.strip():
        h, mins, s = m.groups()
        ago = int(h or 0) * 3600 + int(mins or 0) * 60 + float(s or 0)
        return now - int(ago * 1e9)
    try:
        return parse_time(text.strip())
    except ValueError:
        raise FilterError(f"since: {text!r} is neither a duration (5m, 30s, 1h) nor an RFC 3339 time") \
            from None
