"""The egress gateway in the lab: what the external server `plx-ext` sees of the pods."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from plexus.lab.external import PORT
from plexus.lab.lab import Lab
from plexus.lab.topology import pod_netns

EXT_IP = "198.51.100.10"
ASK = """import json, socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        print(s.makefile().readline().strip())
except OSError as e:
    print(json.dumps({"error": str(e)}))
"""


def ask_external(lab: Lab, cluster: str, node: str, pod: str, timeout: float = 3.0) -> dict[str, Any]:
    """From a pod, one connection to the external server: the address it says it saw."""
    ns = pod_netns(lab.topo.node(cluster, node), pod)
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ASK, EXT_IP, str(PORT),
                        str(timeout)], capture_output=True, text=True, timeout=timeout + 20)
    assert r.returncode == 0, r.stderr
    answer: dict[str, Any] = json.loads(r.stdout)
    return answer


@pytest.fixture(scope="module")
def pods(lab: Lab) -> Iterator[dict[str, dict[str, Any]]]:
    made = {"plain": lab.pod_add("east", "n1", "egplain", {"app": "plain"})}
    try:
        yield made
    finally:
        for p in made.values():
            lab.pod_del(p["cluster"], p["node"], p["pod"])


def test_a_pod_no_policy_selects_reaches_the_external_server_with_its_own_address(
        lab: Lab, pods: dict[str, dict[str, Any]]) -> None:
    before = len(lab.external_clients())
    answer = ask_external(lab, "east", "n1", "egplain")
    assert answer.get("ip") == pods["plain"]["ip"], answer
    seen = lab.external_clients(since=before)
    assert [c["ip"] for c in seen] == [pods["plain"]["ip"]]
