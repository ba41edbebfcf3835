"""An egress gateway path in namespaces, no agent: a source node with pods, a gateway node
and the lab's external server, each node's datapath loaded and attached, the maps left empty
(a pod leaves directly until its entries are written). For the datapath tests and the
throughput benchmark.

    pods -- source node (from_pod: steer) ==VXLAN== gateway (uplink: SNAT) -- external server
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpf import attach
from bpf.egress import TUNNEL_MAC, EgressMaps
from plexus.cni import ops as cni
from plexus.cni.ops import in_netns
from tests.support import ROOT, netns, sh, stop_pid, unique, wait_until

EXT, EXCLUDED_EXT, EGRESS_IP = "198.51.100.10", "198.51.100.200", "10.255.0.10"
SOURCE_NODE, GATEWAY_NODE = "172.30.0.1", "172.30.0.2"
ASK = """import json, socket, sys
ip, port, timeout, sport = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
try:
    with socket.create_connection((ip, port), timeout=timeout, source_address=("", sport)) as s:
        print(s.makefile().readline().strip())
except OSError as e:
    print(json.dumps({"error": str(e)}))
"""


@dataclass
class Lab:
    source: str
    gateway: str
    ext: str
    steering: EgressMaps
    snat: EgressMaps
    source_dp: Any
    gateway_dp: Any
    pods: dict[str, tuple[str, str]]  # name -> (netns, ip)
    pin: Path
    uplink: str


def ask(lab: Lab, pod: str, ip: str = EXT, sport: int = 0, timeout: float = 2.0) -> dict[str, Any]:
    r = subprocess.run(["ip", "netns", "exec", lab.pods[pod][0], sys.executable, "-c", ASK, ip,
                        "8080", str(timeout), str(sport)], capture_output=True, text=True,
                       timeout=timeout + 20)
    assert r.returncode == 0, r.stderr
    answer: dict[str, Any] = json.loads(r.stdout)
    return answer


def tunnel(ns: str, dp: Any) -> int:
    name = "plxeg0"
    sh("ip", "link", "add", name, "address", TUNNEL_MAC, "type", "vxlan",
       "external", "dstport", "8472", ns=ns)
    sh("ip", "link", "set", name, "up", ns=ns)
    with in_netns(f"/var/run/netns/{ns}"):
        idx = attach.attach_ingress(name, (dp.egress_tunnel_in.fd, dp.egress_tunnel_in.name))
    assert idx is not None
    return idx


@contextmanager
def egress_path(pod_mtu: int = 1400, underlay_mtu: int = 1500) -> Iterator[Lab]:
    from bpf.loader import Datapath

    with ExitStack() as stack:
        pin = Path(tempfile.mkdtemp(prefix="plexus-egfs-"))
        sh("mount", "-t", "bpf", "plexus-egtest", str(pin))
        stack.callback(pin.rmdir)
        stack.callback(sh, "umount", str(pin), check=False)
        source, gateway, ext = (stack.enter_context(netns("plx-te")) for _ in range(3))
        underlay, uplink = unique("plxu"), unique("plxx")
        sh("ip", "-n", source, "link", "add", underlay, "type", "veth", "peer", "name", "eth0",
           "netns", gateway)
        sh("ip", "-n", gateway, "link", "add", uplink, "type", "veth", "peer", "name", "eth0",
           "netns", ext)
        for ns, dev, addr in ((source, underlay, f"{SOURCE_NODE}/24"),
                              (gateway, "eth0", f"{GATEWAY_NODE}/24"),
                              (gateway, uplink, "198.51.100.1/24"), (ext, "eth0", f"{EXT}/24"),
                              (ext, "eth0", f"{EXCLUDED_EXT}/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "mtu", str(underlay_mtu), "up")
        sh("ip", "-n", source, "route", "add", "default", "via", GATEWAY_NODE)
        sh("ip", "-n", gateway, "route", "add", "10.9.1.0/24", "via", SOURCE_NODE)
        sh("ip", "-n", ext, "route", "add", "default", "via", "198.51.100.1")  # BGP's part
        for ns in (source, gateway):
            sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=ns)
        source_dp = Datapath(pin / "source")
        gateway_dp = Datapath(pin / "gateway")
        steering, snat = EgressMaps(source_dp.bpf), EgressMaps(gateway_dp.bpf)
        steering.tunnel_set(tunnel(source, source_dp))
        snat.tunnel_set(tunnel(gateway, gateway_dp))  # replies go back through it
        with in_netns(f"/var/run/netns/{gateway}"):
            attach.attach(uplink, (gateway_dp.egress_nat_out.fd, gateway_dp.egress_nat_out.name),
                          (gateway_dp.egress_nat_in.fd, gateway_dp.egress_nat_in.name), uplink=True)
        pods = {}
        for i, name in enumerate(("a", "b", "plain")):
            pod_ns = stack.enter_context(netns("plx-te"))
            ip = f"10.9.1.{i + 2}"
            host_if = unique("plxp")
            with in_netns(f"/var/run/netns/{source}"):
                cni.add(f"/var/run/netns/{pod_ns}", "eth0", host_if, ip, pod_mtu)
                attach.attach(host_if, (source_dp.from_pod.fd, source_dp.from_pod.name),
                              (source_dp.to_pod.fd, source_dp.to_pod.name))
            pods[name] = (pod_ns, ip)
        server = subprocess.Popen(["ip", "netns", "exec", ext, sys.executable, "-m",
                                   "plexus.lab.external", "--bind", "0.0.0.0", "--state-dir",
                                   str(pin)], cwd=ROOT, stdout=subprocess.DEVNULL)
        stack.callback(stop_pid, server)
        wait_until(lambda: ":8080 " in sh("ss", "-ltnH", ns=ext).stdout, 10,
                   what="the external server to listen")
        yield Lab(source, gateway, ext, steering, snat, source_dp, gateway_dp, pods, pin, uplink)


