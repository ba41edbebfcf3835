"""One node's bpf module with its real datapath and two pods, client and web, for the flow
tests and the visibility benchmark: web's ingress allows client on TCP 8080 and 5201 (iperf3),
denies 9090 and, being enforced, everything else."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path

from bpf import attach
from bpf.config import BpfConfig
from bpf.module import BpfDatapath
from bpf.policy import ALLOW, DENY, INGRESS
from clustermesh.models import Identity, IPIdentity
from plexus.cni import ops as cni
from plexus.cni.ops import in_netns
from plexus.core.node import LocalNode
from tests.bpf_fixture import bpf_module
from tests.support import eventually, netns, sh, unique

CLIENT_ID, WEB_ID = 131300, 65600
CLIENT, WEB = "10.9.1.2", "10.9.1.3"
TCP = 6


@asynccontextmanager
async def flow_node(state_dir: Path, ring: int = 4096, pages: int = 64
                    ) -> AsyncIterator[tuple[BpfDatapath, dict[str, str], dict[str, int]]]:
    """(module, pod namespaces by name, host-side ifindexes by name); all removed afterwards."""
    with ExitStack() as stack:
        bpffs = Path(tempfile.mkdtemp(prefix="plexus-flowfs-"))
        sh("mount", "-t", "bpf", "plexus-flowtest", str(bpffs))
        stack.callback(bpffs.rmdir)
        stack.callback(sh, "umount", str(bpffs), check=False)
        module, tables = bpf_module(state_dir, LocalNode("east", 1, "n1", "172.31.1.11", "10.9.1.0/24"),
                                    BpfConfig(enabled=True, pin_dir=bpffs / secrets.token_hex(3),
                                              flow_ring=ring, flow_buffer_pages=pages))
        tables["identities"].upsert(Identity(CLIENT_ID, ("k8s:app=client",
                                                         "k8s:io.cilium.k8s.policy.cluster=west",
                                                         "k8s:io.kubernetes.pod.namespace=shop"), "west"))
        tables["identities"].upsert(Identity(WEB_ID, ("k8s:app=web", "k8s:io.cilium.k8s.policy.cluster=east",
                                                      "k8s:io.kubernetes.pod.namespace=shop"), "east"))
        tables["ipcache"].upsert(IPIdentity(CLIENT, CLIENT_ID, namespace="shop", pod_name="client",
                                            cluster="west"))
        tables["ipcache"].upsert(IPIdentity(WEB, WEB_ID, namespace="shop", pod_name="web", cluster="east"))
        await module.start()
        assert module.dp is not None, module.hive.health
        dp = module.dp
        node_ns = stack.enter_context(netns("plx-tf"))
        pods, host_ifs = {}, {}

        def wire(pod_ns: str, ip: str) -> int | None:  # pyroute2's sync calls, off the loop
            host_if = unique("plxf")
            with in_netns(f"/var/run/netns/{node_ns}"):
                cni.add(f"/var/run/netns/{pod_ns}", "eth0", host_if, ip, 1500)
                attach.attach(host_if, (dp.from_pod.fd, dp.from_pod.name), (dp.to_pod.fd, dp.to_pod.name))
                return attach.ifindex(host_if)

        for name, ip in (("client", CLIENT), ("web", WEB)):
            pod_ns = stack.enter_context(netns("plx-tf"))
            idx = await asyncio.to_thread(wire, pod_ns, ip)
            assert idx is not None
            pods[name], host_ifs[name] = pod_ns, idx
        web_if = host_ifs["web"]
        dp.policy_set(web_if, CLIENT_ID, 8080, TCP, INGRESS, ALLOW)
        dp.policy_set(web_if, CLIENT_ID, 5201, TCP, INGRESS, ALLOW)
        dp.policy_set(web_if, CLIENT_ID, 9090, TCP, INGRESS, DENY)
        dp.enforce_set(web_if, INGRESS)
        await eventually(lambda: f"{CLIENT}/32" in dp.ipcache_items(), 10, what="ipcache in the map")
        try:
            yield module, pods, host_ifs
        finally:
            module._polling.clear()
            await eventually(lambda: not any(t.name == "bpf-flows" for t in threading.enumerate()), 5)
            await module.stop()
            await module.hive.stop_module("bpf")
            for name in ("flows", "flows6", "lb4_flows"):
                table = dp.bpf[name]
                for cpu in list(table._open_key_fds):
                    del table[cpu]
            shutil.rmtree(bpffs / module.config.pin_dir.name, ignore_errors=True)
