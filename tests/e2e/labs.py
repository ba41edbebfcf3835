"""What the lab's end-to-end tests share: the CLI, the lab's namespaces, applying a manifest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from plexus.lab import ops
from plexus.lab.lab import Lab

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
