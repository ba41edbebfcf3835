"""The relay: finds every node of every connected cluster in the mesh's node table, follows
each node's flows over mutual TLS, and merges them into one stream in time order.

A flow waits `mergeWindowMs` for older ones from slower nodes, then goes into the relay's
ring, from which `plexus observe --relay` and the web page are answered exactly as a node
answers (`bpf.flows`). A node that cannot be reached is shown as down with the reason and
tried again; it never stops the others.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import ssl
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bpf.flows import Flow, FlowRing, observe_request, rfc3339
from clustermesh.config import RemoteClusterFile
from clustermesh.kvstore import KvStore, Tls
from clustermesh.remote import ClusterWatcher, MeshTables
from clustermesh.tables import identities_table, ipcache_table, nodes_table, services_table
from clustermesh.vms import VM_NODE_LABEL
from plexus.core.api import StreamError, stream_ndjson
from plexus.core.config import ConfigError, load
from plexus.core.manifests import manifests_table
from plexus.core.module import Hive, Key, Module
from plexus.core.tls import client_context
from plexus.relay.config import RelayConfig, RelaySection

log = logging.getLogger(__name__)
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.5, 5.0


@dataclass
class NodeLink:
    """The relay's connection to one node's flow server."""

    key: str                  # cluster/node
    cluster: str
    address: str
    state: str = "connecting"  # connecting, connected, down
    error: str = ""
    flows: int = 0
    lost: int = 0              # events the node reported lost
    last_ns: int = 0           # the newest flow's time: a reconnect asks from there on
    changed: float = field(default_factory=time.time)
    task: asyncio.Task[None] | None = None

    def set_state(self, state: str, error: str = "") -> None:
        if state != self.state:
            self.changed = time.time()
            if state == "down":
                log.warning("relay: node %s (%s) down: %s", self.key, self.address, error)
            elif state == "connected":
                log.info("relay: node %s (%s) connected", self.key, self.address)
        self.state, self.error = state, error

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.key, "cluster": self.cluster, "address": self.address, "state": self.state,
                "error": self.error, "flows": self.flows, "lost": self.lost,
                "since": rfc3339(int(self.changed * 1e9))}


class Rate:
    """Events per second over the last `span` seconds, counted in one-second buckets."""

    def __init__(self, span: int = 5) -> None:
        self.span = span
        self.buckets: collections.deque[list[int]] = collections.deque()

    def add(self, n: int = 1, now: float | None = None) -> None:
        sec = int(now if now is not None else time.monotonic())
        if self.buckets and self.buckets[-1][0] == sec:
            self.buckets[-1][1] += n
        else:
            self.buckets.append([sec, n])
        while self.buckets and self.buckets[0][0] <= sec - self.span - 1:
            self.buckets.popleft()

    def per_second(self, now: float | None = None) -> float:
        sec = int(now if now is not None else time.monotonic())
        full = [n for s, n in self.buckets if sec - self.span <= s < sec]
        return sum(full) / self.span


class Merger:
    """Flows from several nodes in time order: each waits `window_ns` for older ones."""

    def __init__(self, window_ns: int) -> None:
        self.window_ns = window_ns
        self.heap: list[tuple[int, int, Flow]] = []
        self.seq = 0
        self.late = 0  # flows that came after newer ones were passed on

    def push(self, flow: Flow) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (flow.time_ns, self.seq, flow))

    def pop_ready(self, now_ns: int, passed_ns: int) -> Iterator[Flow]:
        """The flows older than `now_ns - window_ns`, oldest first; `passed_ns` is the newest
        time passed on so far (what comes older than it is counted late)."""
        cutoff = now_ns - self.window_ns
        while self.heap and self.heap[0][0] <= cutoff:
            t, _, flow = heapq.heappop(self.heap)
            if t < passed_ns:
                self.late += 1
            yield flow


def _tls(cfg_ca: Path | None, cert: Path | None, key: Path | None) -> Tls | None:
    return Tls(cfg_ca, cert, key) if cfg_ca is not None else None


class Relay:
    def __init__(self, hive: Hive, config: RelaySection) -> None:
        self.hive = hive
        self.config = config
        self.program: RelayConfig = hive.agent
        self.cluster = self.program.cluster.name
        self.tables = MeshTables(nodes=nodes_table(), ipcache=ipcache_table(),
                                 identities=identities_table(), services=services_table(),
                                 manifests=manifests_table())
        self.ring = FlowRing(config.ring, node=f"relay/{self.cluster}", queue_size=50_000)
        self.merger = Merger(config.merge_window_ms * 1_000_000)
        self.links: dict[str, NodeLink] = {}
        self.watchers: dict[str, ClusterWatcher] = {}
        self.remote_errors: dict[str, str] = {}
        self.tls: dict[str, ssl.SSLContext] = {}
        self.tls_errors: dict[str, str] = {}
        self.rate = Rate()
        self.received = 0
        self.passed_ns = 0
        self._arrived = asyncio.Event()
        self.listen: dict[str, Any] = {}  # where the program serves the web page
        hive.routes.stream("/v1/observe", self.observe)
        hive.routes.get("/v1/relay/status", self._status_api)
        hive.metrics.registry.register(_RelayCollector(self))

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        for cluster, creds in self.config.node_tls.items():
            try:
                self.tls[cluster] = client_context(creds.ca_file, creds.cert_file, creds.key_file)
            except (OSError, ssl.SSLError) as err:
                self.tls_errors[cluster] = f"credentials for cluster {cluster}: {err}"
                log.error("relay: %s", self.tls_errors[cluster])
        e = self.program.etcd
        self._watch(self.cluster, KvStore(e.endpoints, _tls(e.trusted_ca_file, e.cert_file, e.key_file)))
        for name, remote in self._remote_files().items():
            self._watch(name, KvStore(remote.endpoints, _tls(remote.trusted_ca_file, remote.cert_file,
                                                            remote.key_file)))
        self.hive.spawn("relay", self._follow_nodes(), "nodes")
        self.hive.spawn("relay", self._pass_on(), "merge")

    async def stop(self) -> None:
        for link in self.links.values():
            if link.task is not None:
                link.task.cancel()
        await self.hive.cancel_tasks("relay")
        for w in self.watchers.values():
            await w.kv.close()

    def _remote_files(self) -> dict[str, RemoteClusterFile]:
        d = self.program.clustermesh_dir
        out: dict[str, RemoteClusterFile] = {}
        if d is None or not d.is_dir():
            return out
        for path in sorted(d.iterdir()):
            if not path.is_file() or path.suffix in (".crt", ".key", ".pem") or path.name.startswith("."):
                continue
            try:
                out[path.name] = load(RemoteClusterFile, path)
            except ConfigError as err:
                self.remote_errors[path.name] = str(err)
                log.error("relay: remote cluster file refused: %s", err)
        return out

    def _watch(self, name: str, kv: KvStore) -> None:
        w = ClusterWatcher(name, kv, self.tables, local_cluster=self.cluster,
                           local_id=self.program.cluster.id, ids_in_use=self._ids_in_use)
        self.watchers[name] = w
        self.hive.spawn("relay", w.run(), f"watch-{name}")

    def _ids_in_use(self, asking: str) -> dict[int, str]:
        return {w.status.cluster_id: name for name, w in self.watchers.items()
                if name != asking and w.status.cluster_id is not None and w.status.connected}

    # ---- nodes ----------------------------------------------------------------------
    async def _follow_nodes(self) -> None:
        async for _ in self.tables.nodes.watch():
            wanted: dict[str, tuple[str, str]] = {}
            for n in self.tables.nodes:
                ip = n.internal_ip()
                # An enrolled host serves its flows on its own API (`plexus observe` there),
                # not to the relay: its uplink policy would judge the relay's connection.
                if ip and n.labels.get(VM_NODE_LABEL) != "true":
                    wanted[f"{n.cluster}/{n.name}"] = (n.cluster, ip)
            for key in self.links.keys() - wanted.keys():
                link = self.links.pop(key)
                if link.task is not None:
                    link.task.cancel()
                log.info("relay: node %s left the mesh", key)
            for key, (cluster, ip) in wanted.items():
                old = self.links.get(key)
                if old is not None and old.address == ip:
                    continue
                if old is not None and old.task is not None:
                    old.task.cancel()
                link = NodeLink(key, cluster, ip)
                self.links[key] = link
                link.task = self.hive.spawn("relay", self._follow(link), f"node-{key}")

    async def _follow(self, link: NodeLink) -> None:
        """Stream one node's flows for as long as the node is in the mesh."""
        delay = RECONNECT_MIN_S
        while True:
            tls = self.tls.get(link.cluster)
            if tls is None:
                link.set_state("down", self.tls_errors.get(
                    link.cluster, f"no credentials for cluster {link.cluster} (relay.nodeTls)"))
                await asyncio.sleep(RECONNECT_MAX_S)
                continue
            query = {"follow": "1"}
            if link.last_ns:
                query["since"] = rfc3339(link.last_ns + 1)
            else:
                query["last"] = str(self.config.history)
            first_lost = True
            url = f"https://{link.address}:{self.config.node_port}/v1/observe"
            try:
                async for doc in stream_ndjson(url, query, tls, opened=lambda: link.set_state("connected")):
                    lost = doc.get("lost_events")
                    if lost is not None:  # a stream's first report is the node's total so far
                        n = int(lost.get("num_events_lost", 0))
                        link.lost = n if first_lost and lost.get("source") == "PERF_EVENT_RING_BUFFER" \
                            else link.lost + n
                        first_lost = False
                        continue
                    first_lost = False
                    flow = Flow.from_json(doc)
                    link.flows += 1
                    link.last_ns = max(link.last_ns, flow.time_ns)
                    self.received += 1
                    self.merger.push(flow)
                    self._arrived.set()
                link.set_state("down", "the node ended the stream")
            except StreamError as e:
                link.set_state("down", str(e))
            except (KeyError, ValueError) as e:
                link.set_state("down", f"the node sent something that is not a flow: {e}")
            delay = RECONNECT_MIN_S if link.state == "connected" else min(delay * 2, RECONNECT_MAX_S)
            await asyncio.sleep(delay)

    async def _pass_on(self) -> None:
        """Move flows whose window has passed from the merger into the ring, oldest first."""
        tick = max(self.merger.window_ns / 1e9 / 3, 0.01)
        while True:
            if not self.merger.heap:
                self._arrived.clear()
                await self._arrived.wait()
            n = 0
            for flow in self.merger.pop_ready(time.time_ns(), self.passed_ns):
                self.passed_ns = max(self.passed_ns, flow.time_ns)
                self.ring.record(flow)
                n += 1
            if n:
                self.rate.add(n)
            await asyncio.sleep(tick)

    # ---- API ------------------------------------------------------------------------
    def observe(self, q: dict[str, str]) -> AsyncGenerator[Any, None]:
        """As a node's `/v1/observe`, over the merged flows of every node."""
        return observe_request(self.ring, q)

    def status(self) -> dict[str, Any]:
        nodes = sorted((link.as_dict() for link in self.links.values()), key=lambda d: d["name"])
        return {
            "cluster": self.cluster,
            "clusters": {name: {"connected": w.status.connected, "ready": w.status.ready}
                         for name, w in sorted(self.watchers.items())},
            "remoteErrors": self.remote_errors,
            "nodes": nodes,
            "connected": sum(1 for n in nodes if n["state"] == "connected"),
            "flowsPerSecond": round(self.rate.per_second(), 1),
            "flows": self.received,
            "late": self.merger.late,
            "lost": sum(link.lost for link in self.links.values()) + self.ring.lost_readers,
            "ring": self.ring.status(),
            "listen": self.listen,
        }

    async def _status_api(self, _q: dict[str, str], _b: Any) -> Any:
        return self.status()


class _RelayCollector(Collector):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Any]:
        nodes = GaugeMetricFamily("plexus_relay_nodes", "Nodes the relay follows, by connection state.",
                                  labels=["state"])
        states = collections.Counter(link.state for link in self.relay.links.values())
        for state in ("connecting", "connected", "down"):
            nodes.add_metric([state], float(states.get(state, 0)))
        yield nodes
        flows = CounterMetricFamily("plexus_relay_flows", "Flows the relay received from nodes.")
        flows.add_metric([], float(self.relay.received))
        yield flows
        lost = CounterMetricFamily("plexus_relay_lost_events", "Flows lost on the way (node buffers, "
                                   "slow readers), as nodes and the relay reported them.")
        lost.add_metric([], float(sum(link.lost for link in self.relay.links.values())
                                  + self.relay.ring.lost_readers))
        yield lost


RELAY: Key[Relay] = Key("relay")


def _build(hive: Hive, cfg: RelaySection) -> Relay:
    return hive.provide(RELAY, Relay(hive, cfg))


module = Module(name="relay", doc=__doc__ or "", config=RelaySection, build=_build)
