"""Flows of a real datapath, through the bpf module: two pods on one node, real TCP and UDP,
what `plexus observe` is served (Hubble's JSON, filters, --follow) and lost events counted."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bpf.flows import Flow, FlowFilter
from bpf.module import BpfDatapath
from plexus.core.api import ApiError
from tests.flows_fixture import CLIENT, CLIENT_ID, WEB, WEB_ID, flow_node
from tests.support import echo, echo_server, eventually

pytestmark = pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")  # bcc

FLOOD = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2]) + i % 50))
"""


async def drain(stream: AsyncIterator[Any]) -> list[dict[str, Any]]:
    return [doc async for doc in stream]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[BpfDatapath, dict[str, str]]]:
    async with flow_node(tmp_path, ring=64, pages=1) as (module, pods, _ifs):
        yield module, pods


async def test_flows_are_recorded_filtered_and_written_as_hubble_does(
        node: tuple[BpfDatapath, dict[str, str]]) -> None:
    module, pods = node
    before = time.time_ns()
    with echo_server(pods["web"], "tcp", 8080), echo_server(pods["web"], "tcp", 9090):
        assert await asyncio.to_thread(echo, pods["client"], "tcp", WEB, 8080, "x")
        assert not await asyncio.to_thread(echo, pods["client"], "tcp", WEB, 9090, "x", 1)
        await eventually(lambda: any(f.verdict == "DROPPED" for f in module.ring.flows), 5,
                         what="the drop in the ring")

        docs = await drain(module._observe({"last": "100"}))
        flows = [Flow.from_json(d) for d in docs]
        denied = next(d["flow"] for d in docs if d["flow"]["verdict"] == "DROPPED"
                      and d["flow"]["traffic_direction"] == "INGRESS")
        # Hubble's field names, both ends named by what the mesh knows of them
        assert denied["source"] == {"identity": CLIENT_ID, "cluster_name": "west", "namespace": "shop",
                                    "labels": ["k8s:app=client", "k8s:io.cilium.k8s.policy.cluster=west",
                                               "k8s:io.kubernetes.pod.namespace=shop"], "pod_name": "client"}
        assert denied["destination"]["pod_name"] == "web" and denied["destination"]["identity"] == WEB_ID
        assert denied["l4"]["TCP"] == {"source_port": denied["l4"]["TCP"]["source_port"],
                                       "destination_port": 9090, "flags": {"SYN": True}}
        assert denied["drop_reason_desc"] == "POLICY_DENIED" and denied["node_name"] == "east/n1"
        assert denied["IP"] == {"source": CLIENT, "destination": WEB, "ipVersion": "IPv4"}
        # the packet's own time, not when it was read
        assert before <= Flow.from_json({"flow": denied}).time_ns <= time.time_ns()
        # the allowed connection: the client's egress and web's ingress, each forwarded
        fwd = [f for f in flows if f.verdict == "FORWARDED" and f.destination.port == 8080]
        assert {f.direction for f in fwd} == {"EGRESS", "INGRESS"}

        # filters narrow, combine and negate
        only = await drain(module._observe({"last": "100", "filters": FlowFilter.of(
            ("verdict", ["DROPPED"]), ("from-pod", ["shop/client"])).to_query()}))
        assert only and all(d["flow"]["verdict"] == "DROPPED" for d in only)
        none = await drain(module._observe({"last": "100", "filters": FlowFilter.of(
            ("to-port", ["9090"]), ("cluster", ["west"], True)).to_query()}))
        assert none == []
        assert await drain(module._observe({"last": "1"})) == docs[-1:]
        assert await drain(module._observe({"since": "1h"})) == docs
        with pytest.raises(ApiError, match="not an IP"):
            module._observe({"filters": FlowFilter.of(("pod", ["x"])).to_query().replace('"pod"', '"ip"')})

        # --follow: history first, then the new verdicts as they happen
        stream = module._observe({"last": "0", "follow": "1", "filters": FlowFilter.of(
            ("verdict", ["DROPPED"])).to_query()})
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        assert not await asyncio.to_thread(echo, pods["client"], "tcp", WEB, 9090, "y", 1)
        live = await asyncio.wait_for(pending, 5)
        assert live["flow"]["verdict"] == "DROPPED" and live["flow"]["l4"]["TCP"]["destination_port"] == 9090
        await stream.aclose()


async def test_a_burst_larger_than_the_buffer_is_counted_lost(
        node: tuple[BpfDatapath, dict[str, str]]) -> None:
    module, pods = node
    # no reader: the one-page buffer holds under a hundred events; each denied packet is one
    module._polling.clear()
    await eventually(lambda: not any(t.name == "bpf-flows" for t in threading.enumerate()), 5)
    sent = 2000

    def flood(count: int) -> None:
        # on one CPU: the buffers are per CPU, and the kernel reports a buffer's losses with
        # the next event written into that same buffer
        r = subprocess.run(["ip", "netns", "exec", pods["client"], "taskset", "-c", "0", sys.executable,
                            "-c", FLOOD, WEB, "7000", str(count)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    flood(sent)
    module.start_polling()
    await eventually(lambda: len(module.ring.flows) >= 50, 10, what="the buffer's events read")

    def reported() -> bool:
        nonlocal sent
        if module.ring.lost_perf:
            return True
        flood(5)  # room again: the next event written brings the count of those lost
        sent += 5
        return False

    await eventually(reported, 15, interval=0.3, what=lambda: f"{module.ring.seen} seen, none lost")
    await eventually(lambda: module.ring.seen + module.ring.lost_perf >= sent, 10,
                     what=lambda: f"{module.ring.seen} seen + {module.ring.lost_perf} lost of {sent}")
    assert module.ring.lost_perf <= sent
    assert len(module.ring.flows) == 64  # the ring keeps the last ones, no more
    first = (await drain(module._observe({"last": "5"})))[0]
    assert first["lost_events"]["source"] == "PERF_EVENT_RING_BUFFER"
    assert first["lost_events"]["num_events_lost"] == module.ring.lost_perf
    assert module.status()["flows"]["lostPerfBuffer"] == module.ring.lost_perf
