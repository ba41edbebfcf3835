"""`plexus clustermesh-apiserver` and `plexus clustermesh status | certs | connect`."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from plexus.commands.common import add_agent_args, add_output_arg, client, emit, table


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("clustermesh-apiserver",
                       help="publish a cluster's state into its etcd (Cilium's layout)")
    p.add_argument("--cluster-name", required=True)
    p.add_argument("--cluster-id", required=True, type=int)
    p.add_argument("--etcd", required=True, action="append", help="endpoint URL (repeatable)")
    p.add_argument("--cacert", type=Path)
    p.add_argument("--cert", type=Path)
    p.add_argument("--key", type=Path)
    p.add_argument("--identity-gc-grace", type=float, default=300.0,
                   help="seconds an unused identity is kept (default %(default)s)")
    p.set_defaults(func=_apiserver)

    cm = sub.add_parser("clustermesh", help="the clusters this node is connected to")
    cms = cm.add_subparsers(dest="cm_command", required=True, metavar="ACTION")
    s = cms.add_parser("status", help="per cluster: ready, connected, entries, failures")
    add_agent_args(s)
    add_output_arg(s)
    s.set_defaults(func=_status)
    ls = cms.add_parser("list", help="the merged tables: nodes, endpoints, identities, services")
    ls.add_argument("table", choices=["nodes", "endpoints", "identities", "services",
                                      "global-services", "manifests"])
    ls.add_argument("--cluster", help="only what this cluster contributed")
    add_agent_args(ls)
    add_output_arg(ls)
    ls.set_defaults(func=_list)
    register_pki(cms)


def register_pki(cms: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = cms.add_parser("certs", help="make a cluster's CA and its etcd certificates")
    c.add_argument("--cluster", required=True)
    c.add_argument("--out", required=True, type=Path, help="directory for the PKI files")
    c.add_argument("--server-ip", action="append", default=[], help="IP SAN of etcd (repeatable)")
    c.set_defaults(func=_certs)
    k = cms.add_parser("connect", help="give each cluster what it needs to reach the other")
    k.add_argument("--from", dest="from_cluster", required=True)
    k.add_argument("--to", dest="to_cluster", required=True)
    k.add_argument("--pki", required=True, type=Path,
                   help="directory holding one PKI folder per cluster (from `certs`)")
    k.add_argument("--config-dir", action="append", default=[], metavar="CLUSTER=DIR",
                   help="a clustermesh config directory of a cluster's node (repeatable)")
    k.set_defaults(func=_connect)


def _apiserver(args: argparse.Namespace) -> int:
    from clustermesh.apiserver import ApiServer
    from clustermesh.kvstore import KvStore, Tls
    from clustermesh.models import InvalidValue, check_cluster_id, check_cluster_name
    from plexus.core import log as plog

    plog.setup("info", prefix=f"apiserver/{args.cluster_name}")
    try:
        check_cluster_name(args.cluster_name)
        check_cluster_id(args.cluster_id)
    except InvalidValue as e:
        print(f"plexus clustermesh-apiserver: {e}")
        return 2
    tls = Tls(args.cacert, args.cert, args.key) if args.cacert else None

    async def main() -> int:
        kv = KvStore(args.etcd, tls)
        server = ApiServer(kv, args.cluster_name, args.cluster_id, gc_grace=args.identity_gc_grace)
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(server.run())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
        finally:
            await kv.close()
        return 0

    return asyncio.run(main())


def _render(s: dict[str, Any]) -> str:
    if not s.get("enabled"):
        return "clustermesh: no etcd configured (standalone node)"
    rows = []
    for name, c in s["clusters"].items():
        synced = c.get("synced") or {}
        rows.append((
            name + (" (local)" if c.get("local") else ""),
            "yes" if c.get("ready") else "no", "yes" if c.get("connected") else "no",
            c.get("clusterID"), c.get("nodes", 0), c.get("endpoints", 0), c.get("identities", 0),
            c.get("services", 0), c.get("failures", 0),
            f"{sum(synced.values())}/{len(synced)}" if synced else "-",
            (c.get("configError") or c.get("lastFailure") or "")[:60]))
    return table(rows, ["CLUSTER", "READY", "CONNECTED", "ID", "NODES", "ENDPOINTS",
                        "IDENTITIES", "SERVICES", "FAILURES", "SYNCED", "LAST ERROR"]) + \
        f"\n\nglobal services: {s.get('globalServices', 0)}"


def _status(args: argparse.Namespace) -> int:
    emit(args, client(args).get("/v1/clustermesh/status"), _render)
    return 0


def _row(table_name: str, r: dict[str, Any]) -> tuple[Any, ...]:
    if table_name == "nodes":
        return (r["cluster"], r["name"], ",".join(a["ip"] for a in r["addresses"]),
                r["ipv4_alloc_cidr"], (r["wireguard_pubkey"] or "-")[:12])
    if table_name == "endpoints":
        return (r["cluster"], r["ip"], r["identity"], r["host_ip"], f"{r['namespace']}/{r['pod_name']}")
    if table_name == "identities":
        return (r["cluster"], r["id"], ";".join(r["labels"]))
    if table_name == "services":
        return (r["cluster"], f"{r['namespace']}/{r['name']}", ",".join(r["frontends"]),
                ",".join(r["backends"]))
    if table_name == "global-services":
        return (f"{r['namespace']}/{r['name']}", ",".join(r["frontends"]), r["affinity"],
                ",".join(f"{b['ip']}@{b['cluster']}" for b in r["backends"]))
    return (r["cluster"], r["kind"], f"{r['namespace']}/{r['name']}")


HEADERS = {
    "nodes": ["CLUSTER", "NODE", "ADDRESSES", "POD CIDR", "WG KEY"],
    "endpoints": ["CLUSTER", "IP", "IDENTITY", "HOST", "POD"],
    "identities": ["CLUSTER", "ID", "LABELS"],
    "services": ["CLUSTER", "SERVICE", "FRONTENDS", "BACKENDS"],
    "global-services": ["SERVICE", "FRONTENDS", "AFFINITY", "BACKENDS"],
    "manifests": ["CLUSTER", "KIND", "NAME"],
}


def _list(args: argparse.Namespace) -> int:
    rows = client(args).get(f"/v1/clustermesh/tables/{args.table}", cluster=args.cluster)
    emit(args, rows, lambda rs: table([_row(args.table, r) for r in rs], HEADERS[args.table]))
    return 0


def _certs(args: argparse.Namespace) -> int:
    from clustermesh.pki import make_cluster_pki

    files = make_cluster_pki(args.cluster, args.out, args.server_ip or ["127.0.0.1"])
    for f in files:
        print(f)
    return 0


def _connect(args: argparse.Namespace) -> int:
    from clustermesh.pki import connect

    dirs: dict[str, list[Path]] = {}
    for item in args.config_dir:
        cluster, sep, path = item.partition("=")
        if not sep:
            print(f"plexus clustermesh connect: --config-dir {item!r} is not CLUSTER=DIR")
            return 2
        dirs.setdefault(cluster, []).append(Path(path))
    for written in connect(args.from_cluster, args.to_cluster, args.pki, dirs):
        print(f"wrote {written}")
    return 0
