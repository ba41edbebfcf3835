"""`plexus clustermesh-apiserver [status]` and
`plexus clustermesh status | list | certs | connect | remote-endpoint`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from plexus.commands.common import (
    add_agent_args,
    add_output_arg,
    client,
    emit,
    lab_apiserver_socket,
    table,
)
from plexus.core.client import Client

APISERVER_SOCKET = "/run/plexus/clustermesh-apiserver.sock"
KVSTOREMESH_SOCKET = "/run/plexus/kvstoremesh.sock"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("clustermesh-apiserver",
                       help="publish a cluster's state into its etcd (Cilium's layout)",
                       allow_abbrev=False,
                       description="Run the apiserver (with --cluster-name, --cluster-id, --etcd), "
                                   "or show a running one's status.")
    p.add_argument("--cluster-name", help="required to run")
    p.add_argument("--cluster-id", type=int, help="required to run")
    p.add_argument("--etcd", action="append", help="endpoint URL (repeatable; required to run)")
    p.add_argument("--cacert", type=Path)
    p.add_argument("--cert", type=Path)
    p.add_argument("--key", type=Path)
    p.add_argument("--identity-gc-grace", type=float, default=300.0,
                   help="seconds an unused identity is kept (default %(default)s)")
    p.add_argument("--vm-pki", type=Path,
                   help="the cluster's PKI directory (ca.key): renew enrolled VMs' certificates")
    p.add_argument("--api-socket", type=Path, default=Path(APISERVER_SOCKET),
                   help="unix socket of its local API (default %(default)s)")
    p.add_argument("--metrics-address", default="127.0.0.1",
                   help="where /metrics and /healthz listen (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=9963,
                   help="port of /metrics and /healthz; 0 disables (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_apiserver)
    aps = p.add_subparsers(dest="apiserver_command", metavar="ACTION")
    st = aps.add_parser("status", help="synced prefixes, what it wrote, its last error")
    st.add_argument("--socket", default=os.environ.get("PLEXUS_APISERVER_SOCKET", APISERVER_SOCKET),
                    help="the apiserver's API socket (default: %(default)s, "
                         "or $PLEXUS_APISERVER_SOCKET)")
    st.add_argument("--cluster", help="a lab cluster such as east (uses its apiserver's socket)")
    add_output_arg(st)
    st.set_defaults(func=_apiserver_status)

    km = sub.add_parser("kvstoremesh",
                        help="copy every remote cluster into this cluster's etcd (Cilium's KVStoreMesh)",
                        allow_abbrev=False,
                        description="Run KVStoreMesh (with --cluster-name, --cluster-id, --etcd, "
                                    "--config-dir), or show a running one's status.")
    km.add_argument("--cluster-name", help="required to run")
    km.add_argument("--cluster-id", type=int, help="required to run")
    km.add_argument("--etcd", action="append", help="this cluster's etcd endpoint URL (repeatable)")
    km.add_argument("--cacert", type=Path)
    km.add_argument("--cert", type=Path)
    km.add_argument("--key", type=Path)
    km.add_argument("--config-dir", type=Path, help="one file per remote cluster, as the agent's")
    km.add_argument("--api-socket", type=Path, default=Path(KVSTOREMESH_SOCKET),
                    help="unix socket of its local API (default %(default)s)")
    km.add_argument("--metrics-address", default="127.0.0.1")
    km.add_argument("--metrics-port", type=int, default=9964,
                    help="port of /metrics and /healthz; 0 disables (default %(default)s)")
    km.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    km.set_defaults(func=_kvstoremesh)
    kms = km.add_subparsers(dest="kvstoremesh_command", metavar="ACTION")
    kst = kms.add_parser("status", help="per remote cluster: ready, keys copied, failures")
    kst.add_argument("--socket", default=KVSTOREMESH_SOCKET,
                     help="its API socket (default: %(default)s)")
    add_output_arg(kst)
    kst.set_defaults(func=_kvstoremesh_status)

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
    r = cms.add_parser("remote-endpoint",
                       help="serve other clusters read-only access to this cluster's etcd")
    r.add_argument("--pki", required=True, type=Path, help="this cluster's PKI folder (from `certs`)")
    r.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="where other clusters connect (the `endpoints` file of `certs`)")
    r.add_argument("--etcd", required=True, action="append", help="this cluster's etcd (repeatable)")
    r.set_defaults(func=_remote_endpoint)


def _apiserver(args: argparse.Namespace) -> int:
    from plexus.clustermesh_apiserver import MODULES, load_config, run

    missing = [flag for flag, v in (("--cluster-name", args.cluster_name),
                                    ("--cluster-id", args.cluster_id), ("--etcd", args.etcd)) if not v]
    if missing:
        print(f"plexus clustermesh-apiserver: {', '.join(missing)} required")
        return 2
    config = load_config({
        "cluster": {"name": args.cluster_name, "id": args.cluster_id},
        "etcd": {"endpoints": args.etcd, "trustedCaFile": args.cacert, "certFile": args.cert,
                 "keyFile": args.key},
        "apiSocket": args.api_socket,
        "metrics": {"address": args.metrics_address, "port": args.metrics_port or None},
        "logLevel": args.log_level,
        "apiserver": {"identityGcGrace": args.identity_gc_grace},
        "vmsigner": {"pki": args.vm_pki},
    }, MODULES)
    return asyncio.run(run(config))


def _kvstoremesh(args: argparse.Namespace) -> int:
    from plexus.kvstoremesh import MODULES, load_config, run

    missing = [flag for flag, v in (("--cluster-name", args.cluster_name), ("--cluster-id", args.cluster_id),
                                    ("--etcd", args.etcd), ("--config-dir", args.config_dir)) if not v]
    if missing:
        print(f"plexus kvstoremesh: {', '.join(missing)} required")
        return 2
    config = load_config({
        "cluster": {"name": args.cluster_name, "id": args.cluster_id},
        "etcd": {"endpoints": args.etcd, "trustedCaFile": args.cacert, "certFile": args.cert,
                 "keyFile": args.key},
        "configDir": args.config_dir,
        "apiSocket": args.api_socket,
        "metrics": {"address": args.metrics_address, "port": args.metrics_port or None},
        "logLevel": args.log_level,
    }, MODULES)
    return asyncio.run(run(config))


def _render_kvstoremesh(s: dict[str, Any]) -> str:
    k = dict(s["modules"].get("kvstoremesh", {}))
    rows = [[name, "yes" if c.get("ready") else "no", "yes" if c.get("connected") else "no",
             str(sum(c.get("entries", {}).values())), str(c.get("failures", 0)),
             str(c.get("invalidEntries", 0)), c.get("configError") or c.get("lastFailure", "")]
            for name, c in k.get("clusters", {}).items()]
    head = f"kvstoremesh of cluster {s['cluster']} (id {s['clusterID']})  ready {k.get('ready')}"
    return head + "\n" + table(rows, ["CLUSTER", "READY", "CONNECTED", "KEYS", "FAILURES", "INVALID",
                                      "LAST ERROR"])


def _kvstoremesh_status(args: argparse.Namespace) -> int:
    emit(args, Client(Path(args.socket)).get("/v1/status"), _render_kvstoremesh)
    return 0


def _render_apiserver(s: dict[str, Any]) -> str:
    a = dict(s["modules"].get("apiserver", {}))
    lines = [f"cluster {s['cluster']} (id {s['clusterID']})  pid {s['pid']}  "
             f"health {a.pop('health', 'ok')}  ready {'yes' if a.get('ready') else 'no'}", ""]
    rows = [(name, "yes" if w["synced"] else "no", w["prefix"], w["revision"], w["relists"],
             w["compactions"], w["events"], w["errors"], (w["lastError"] or "")[:60])
            for name, w in a.get("prefixes", {}).items()]
    lines.append(table(rows, ["SOURCE", "SYNCED", "PREFIX", "REVISION", "RELISTS", "COMPACTIONS",
                              "EVENTS", "ERRORS", "LAST ERROR"]))
    written = a.get("written", {})
    lines += ["",
              f"sources: nodes {a.get('nodes', 0)}  endpoints {a.get('endpoints', 0)}  "
              f"services {a.get('services', 0)}  rejected {len(a.get('rejected', {}))}",
              f"written: puts {written.get('puts', 0)}  deletes {written.get('deletes', 0)}  "
              f"published {a.get('published', 0)}  identities allocated "
              f"{a.get('identitiesAllocated', 0)}",
              f"etcd errors: {a.get('etcdErrors', 0)}  last error: {a.get('lastError') or '-'}"]
    for key, why in a.get("rejected", {}).items():
        lines.append(f"  rejected {key}: {json.dumps(why)}")
    return "\n".join(lines)


def _apiserver_status(args: argparse.Namespace) -> int:
    sock = lab_apiserver_socket(args.cluster) if args.cluster else Path(args.socket)
    emit(args, Client(sock).get("/v1/status"), _render_apiserver)
    return 0


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
            c.get("services", 0), c.get("failures", 0), c.get("refusedEntries", 0),
            f"{sum(synced.values())}/{len(synced)}" if synced else "-",
            (c.get("configError") or c.get("lastFailure") or "")[:60]))
    # The table cuts errors short; a refused config file is shown in full, file first.
    refused = [f"  {name}: {c['configError']}" for name, c in s["clusters"].items()
               if c.get("configFile") and c.get("configError")]
    out = table(rows, ["CLUSTER", "READY", "CONNECTED", "ID", "NODES", "ENDPOINTS",
                       "IDENTITIES", "SERVICES", "FAILURES", "REFUSED", "SYNCED", "LAST ERROR"]) + \
        ("\n\nrefused config files:\n" + "\n".join(refused) if refused else "") + \
        f"\n\nglobal services: {s.get('globalServices', 0)}"
    for name, c in s["clusters"].items():
        if c.get("refusedEntries"):
            out += f"\nrefused from {name}: {c['refusedEntries']} (last: {c.get('lastRefused', '')})"
            out += "".join(f"\n  {why}" for why in (c.get("refused") or {}).values())
    return out


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


def _remote_endpoint(args: argparse.Namespace) -> int:
    from clustermesh.etcd_proxy import ReadOnlyEtcdProxy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(ReadOnlyEtcdProxy(args.listen, args.etcd, args.pki).serve())
    except (OSError, ValueError) as e:
        print(f"plexus clustermesh remote-endpoint: {e}", file=sys.stderr)
        return 1
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
