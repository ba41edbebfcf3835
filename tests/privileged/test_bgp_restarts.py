"""Restarts at scale with BIRD, FRR and GoBGP as the router, graceful restart on both sides.

10,000 routes; ExaBGP is killed, then the agent is restarted. Throughout, the router's RIB
is sampled: it must never hold fewer than all the routes (stale ones count, as graceful
restart keeps them). A capture in the node's namespace shows, for every session, every
route announced, nothing withdrawn, and End-of-RIB only after the last route UPDATE.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.bgp_lab import NODE_IP, ROUTER_ASN, Lab, bgp_lab
from tests.bgp_routers import ROUTERS, Router, available, start_router
from tests.bgp_wire import Capture
from tests.privileged.test_bgp_router import Agent, cluster_config, service
from tests.privileged.test_bgp_routers import ADVERTS, LOCAL, peer_config
from tests.support import eventually

pytestmark = pytest.mark.usefixtures("root")
N = 10_000
FIRST = int(ipaddress.ip_address("10.100.0.0"))


class Sampler(threading.Thread):
    """Reads the router's route count over and over, until stopped."""

    def __init__(self, router: Router) -> None:
        super().__init__(name="rib-sampler", daemon=True)
        self.router = router
        self.counts: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            c = self.router.count()
            if c >= 0:  # an answer (a router busy taking routes may miss a read)
                self.counts.append(c)
            self._done.wait(0.01)

    def stop(self) -> None:
        self._done.set()
        self.join(30)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Lab, list[Agent]]]:
    with bgp_lab() as lab:
        agents: list[Agent] = []
        try:
            yield lab, agents
        finally:
            for a in agents:
                await a.bgp.stop()


def new_agent(lab: Lab, tmp: Path, agents: list[Agent]) -> Agent:
    agent = Agent(lab, tmp, LOCAL)
    for m in [cluster_config(peer_asn=ROUTER_ASN), peer_config("ipv4"), ADVERTS]:
        agent.manifests.upsert(m)
    for i in range(N):
        agent.services.upsert(service(f"s{i}", str(ipaddress.ip_address(FIRST + i)), bgp="yes"))
    agents.append(agent)
    return agent


def synced(agent: Agent, router: Router, want: int) -> bool:
    peers = agent.bgp.peers()
    return bool(peers and peers[0]["state"] == "established" and peers[0]["endOfRib"]
                and router.count() == want)


@pytest.mark.parametrize("kind", ROUTERS)
async def test_restarts_keep_every_route_and_end_of_rib_follows_them(
        env: tuple[Lab, list[Agent]], tmp_path: Path, kind: str) -> None:
    if not available(kind):
        pytest.skip(f"{kind} is not installed (scripts/setup.sh installs it)")
    lab, agents = env
    router = start_router(lab, kind)
    capture = Capture(lab)
    agent = new_agent(lab, tmp_path, agents)
    want = {"10.1.1.0/24", *(f"{ipaddress.ip_address(FIRST + i)}/32" for i in range(N))}
    await agent.bgp.start()
    await eventually(lambda: synced(agent, router, len(want)), 60, 0.2,
                     lambda: f"{kind} holds all {len(want)} routes: {router.count()}")

    sampler = Sampler(router)
    sampler.start()
    try:
        # ExaBGP is killed: the agent starts another, which must resend everything
        proc = agent.bgp.speaker.proc
        assert proc is not None
        proc.kill()
        await eventually(lambda: agent.bgp.speaker.restarts == 1, 20, 0.05, "ExaBGP restarted")
        await eventually(lambda: synced(agent, router, len(want)), 60, 0.1,
                         f"{kind}: session back with End-of-RIB after ExaBGP was killed")

        # the agent restarts (stop is not remove): a new one, a new ExaBGP
        await agent.bgp.stop()
        agents.remove(agent)
        await eventually(lambda: not router.established(), 20, 0.05, f"{kind} saw the session go")
        again = new_agent(lab, tmp_path, agents)
        await again.bgp.start()
        await eventually(lambda: synced(again, router, len(want)), 60, 0.1,
                         f"{kind}: session back with End-of-RIB after the agent restarted")
        await eventually(lambda: len(capture.sessions(NODE_IP)) == 3 and
                         capture.sessions(NODE_IP)[-1].eor_after_routes(), 10, 0.1,
                         "the third session's End-of-RIB captured")
        seen = len(sampler.counts)
        await eventually(lambda: len(sampler.counts) >= seen + 10, 10, 0.05, "samples after End-of-RIB")
    finally:
        await asyncio.to_thread(sampler.stop)

    assert len(sampler.counts) > 20, "the router was read throughout"
    assert min(sampler.counts) == len(want), f"{kind} lost routes: as few as {min(sampler.counts)}"
    sessions = capture.sessions(NODE_IP)
    assert len(sessions) == 3
    for i, s in enumerate(sessions):
        assert s.announced() == want, f"session {i}: {len(s.announced())} of {len(want)} announced"
        assert not s.withdrawn(), f"session {i} withdrew {sorted(s.withdrawn())[:5]}"
        assert s.eor_after_routes(), f"session {i}: End-of-RIB missing or before the last route UPDATE"
        assert sum(1 for u in s.updates if u.eor) == 1, f"session {i}: one End-of-RIB"
