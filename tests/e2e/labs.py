"""What the lab's end-to-end tests share: the CLI, the lab's namespaces, applying a manifest."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from plexus.lab import ops
from plexus.lab.lab import Lab
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]


def plexus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plexus", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def lab_namespaces() -> set[str]:
    lab = Lab()
    return {ns for ns in ops.namespaces() if ns.startswith("plx-") and
            (ns in lab.topo.namespaces() or any(ns.startswith(f"plx-{n.key}-") for n in lab.topo.nodes()))}


def apply_in(cluster: str, text: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    f = tmp / f"{abs(hash(text))}.yaml"
    f.write_text(text)
    return plexus("apply", "-f", str(f), "--lab", cluster)


@contextmanager
def underlay_capture(lab: Lab, name: str) -> Iterator[Callable[[], tuple[str, str]]]:
    """tcpdump on the router's leg to every node; yields a reader of (payload text, headers)."""
    legs = [n.host.router_link for n in lab.topo.nodes()]
    paths = [lab.root / f"{name}-{leg}.pcap" for leg in legs]
    # --immediate-mode: without it the last second of packets is lost when tcpdump stops
    dumps = [subprocess.Popen(["ip", "netns", "exec", "plx-router", "tcpdump", "--immediate-mode",
                               "-Z", "root", "-i", leg, "-n", "-U", "-s", "0", "-w", str(path)],
                              stderr=subprocess.DEVNULL)
             for leg, path in zip(legs, paths, strict=True)]
    try:
        def capturing() -> bool:
            # tcpdump says "listening" before it captures: probe every leg until packets land.
            for n in lab.topo.nodes():
                ops.run("ping", "-c", "1", "-W", "1", n.host.segment.gateway, ns=n.host.netns,
                        check=False)
            return all(p.exists() and p.stat().st_size > 24 for p in paths)

        wait_until(capturing, 15, what="tcpdump capturing")

        def read() -> tuple[str, str]:
            text = headers = ""
            for path in paths:
                text += subprocess.run(["tcpdump", "-r", str(path), "-n", "-A"], capture_output=True,
                                       text=True, errors="replace").stdout
                headers += subprocess.run(["tcpdump", "-r", str(path), "-n"], capture_output=True,
                                          text=True).stdout
            return text, headers

        yield read
    finally:
        for d in dumps:
            d.terminate()
        for d in dumps:
            d.wait(10)
