"""The runtime side: call the plugin exactly as a container runtime does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from plexus.cni.errors import CniError

REPO_ROOT = Path(__file__).resolve().parents[2]


def call_plugin(command: str, *, container_id: str, netns: str, ifname: str = "eth0",
                config: dict[str, Any], cni_args: dict[str, str] | None = None,
                host_netns: str | None = None, timeout: float = 60) -> dict[str, Any]:
    """Exec the plugin with CNI_* variables and the config on stdin; raise CniError."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_PATH": str(Path(sys.executable).parent),
        "CNI_ARGS": ";".join(f"{k}={v}" for k, v in (cni_args or {}).items()),
    }
    argv = [sys.executable, "-m", "plexus.cni"]
    if host_netns:
        argv = ["ip", "netns", "exec", host_netns, *argv]
    r = subprocess.run(argv, input=json.dumps(config), capture_output=True, text=True,
                       env=env, timeout=timeout)
    out = json.loads(r.stdout) if r.stdout.strip() else {}
    if r.returncode != 0:
        if isinstance(out, dict) and "code" in out:
            raise CniError(int(out["code"]), str(out.get("msg", "")), str(out.get("details", "")))
        raise CniError(999, f"plugin failed with exit code {r.returncode}", r.stderr.strip())
    return out
