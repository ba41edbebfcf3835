"""The Grafana dashboard in docs/grafana covers every metric Plexus exports, and names none
that does not exist: the programs are built (not started) and their registries listed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "plexus-dashboard.json"


def exported(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Family name -> the series names Prometheus scrapes of it."""
    out = {}
    for fam in registry.collect():
        if fam.type == "counter":
            out[fam.name] = {fam.name + "_total"}
        elif fam.type == "histogram":
            out[fam.name] = {fam.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            out[fam.name] = {fam.name}
    return out


def every_program(tmp_path: Path) -> dict[str, set[str]]:
    from plexus import clustermesh_apiserver as apiserver
    from plexus.agent import build, config_model
    from plexus.app import MODULES
    from plexus.relay import program as relay
    from plexus.relay.config import RelayConfig

    agent = build(config_model(MODULES).model_validate({
        "cluster": {"name": "east", "id": 1},
        "node": {"name": "n1", "ip": "172.31.1.11", "podCIDR": "10.1.1.0/24"},
        "stateDir": str(tmp_path)}), MODULES)
    cm = apiserver.build(apiserver.load_config({"cluster": {"name": "east", "id": 1}, "etcd": {
        "endpoints": ["http://127.0.0.1:1"]}, "apiSocket": str(tmp_path / "cm.sock")}, apiserver.MODULES),
                         apiserver.MODULES)
    rl = relay.build(RelayConfig.model_validate({"cluster": {"name": "east", "id": 1}, "etcd": {
        "endpoints": ["http://127.0.0.1:1"]}, "apiSocket": str(tmp_path / "relay.sock")}))
    out: dict[str, set[str]] = {}
    for app in (agent, cm, rl):
        out |= exported(app.hive.metrics.registry)
    return out


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                found.append((p["title"], t["expr"]))
    walk(dash["panels"])
    return found


def test_every_panel_names_metrics_that_exist_and_every_metric_has_a_panel(tmp_path: Path) -> None:
    families = every_program(tmp_path)
    series = {s: fam for fam, names in families.items() for s in names}
    dash = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for title, expr in queries(dash):
        names = set(re.findall(r"\bplexus_[a-z0-9_]+", expr))
        assert names, f"panel {title!r}: its query names no Plexus metric: {expr}"
        unknown = names - series.keys()
        assert not unknown, f"panel {title!r}: no such metric {sorted(unknown)}"
        used |= {series[n] for n in names}
    missing = families.keys() - used
    assert not missing, f"metrics no panel shows: {sorted(missing)}"
    assert {"plexus_flows_processed", "plexus_flows_dropped_by_namespace", "plexus_relay_nodes",
            "plexus_bgp_session_up", "plexus_wireguard_peers", "plexus_datapath_drops",
            "plexus_clustermesh_apiserver_ready"} <= used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
