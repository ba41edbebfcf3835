"""`plexus vm create | list | delete | join` and `plexus vmagent`.

The operator's commands run with the cluster's admin access: `--etcd` and `--pki` (the
cluster's PKI directory, holding its CA key). Without `--etcd` they act on the lab: they run
inside the cluster's control-plane namespace with the lab's PKI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from plexus.commands.common import LAB_DIR, add_output_arg, emit, table

DEFAULT_VM_STATE = Path("/var/lib/plexus-vm")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = sub.add_parser("vm", help="enrol VMs and metal hosts")
    vsub = vm.add_subparsers(dest="vm_command", required=True, metavar="COMMAND")

    p = vsub.add_parser("create", help="enrol a VM and write its join bundle")
    p.add_argument("name")
    _admin_args(p)
    p.add_argument("--ip", required=True, help="the VM's address")
    p.add_argument("--labels", default="", help="k=v,k=v: what policies select it by")
    p.add_argument("--namespace", default="default", help="the namespace its identity carries")
    p.add_argument("--ttl", default="24h", help="how long the bundle's certificate is valid")
    p.add_argument("--lease", type=int, default=30, help="seconds of silence before withdrawal")
    p.add_argument("-o", "--output", type=Path, help="bundle file (default: NAME.bundle.yaml)")
    p.set_defaults(func=_create)

    p = vsub.add_parser("list", help="list the enrolled VMs and their state")
    _admin_args(p, cluster_required=False)
    add_output_arg(p)
    p.set_defaults(func=_list)

    p = vsub.add_parser("delete", help="revoke a VM and remove it from the mesh")
    p.add_argument("name")
    _admin_args(p)
    p.set_defaults(func=_delete)

    p = vsub.add_parser("join", help="on the host: check a bundle and run the vmagent with it")
    p.add_argument("bundle", type=Path)
    p.add_argument("--name", help="this host's VM name: a bundle for another is refused")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_VM_STATE)
    p.add_argument("--api-socket", type=Path, help="default: STATE_DIR/agent.sock")
    p.add_argument("--wg-device", default="plx_wg0", help="the host's WireGuard device")
    p.add_argument("--no-encryption", action="store_true", help="no WireGuard on this host")
    p.add_argument("--bgp", action="store_true",
                   help="a metal host: peer with its router as the cluster's BGP manifests that "
                        "select this host say, announcing its address")
    p.add_argument("--strict", action="store_true",
                   help="drop traffic to a pod whose node has no WireGuard peer yet")
    p.add_argument("--uplink", default="eth0",
                   help="the host's interface, where its policies are enforced")
    p.add_argument("--bpf-pin-dir", type=Path, default=Path("/sys/fs/bpf/plexus"),
                   help="where the datapath pins its maps")
    p.add_argument("--no-bpf", action="store_true", help="no datapath (no policy) on this host")
    p.add_argument("--config-only", action="store_true",
                   help="write the agent config and exit (run it with `plexus vmagent`)")
    p.set_defaults(func=_join)

    p = sub.add_parser("vmagent", help="run the agent of an enrolled VM or metal host")
    p.add_argument("--config", required=True, help="the config `plexus vm join` wrote")
    p.set_defaults(func=_vmagent)


def _admin_args(p: argparse.ArgumentParser, cluster_required: bool = True) -> None:
    p.add_argument("--cluster", required=cluster_required, help="the VM's cluster")
    p.add_argument("--etcd", action="append", help="the cluster's etcd (repeatable); "
                                                   "without it, the lab's")
    p.add_argument("--pki", type=Path, help="the cluster's PKI directory (ca.key, admin.crt)")
    p.add_argument("--advertise", action="append",
                   help="the etcd endpoints the VM reaches (default: --etcd)")
    p.add_argument("--mesh-pki", type=Path,
                   help="a directory with one PKI directory per cluster of the mesh: the VM "
                        "reads the others through their read-only endpoints")


def _lab_clusters() -> list[str]:
    from plexus.lab.topology import default
    return [c.name for c in default().clusters]


def _in_lab(cluster: str, argv: list[str]) -> int:
    """The lab's etcd answers inside its control-plane namespace: run there, as admin."""
    from plexus.lab.topology import default

    pki = LAB_DIR / "pki" / cluster
    if not pki.exists():
        print(f"plexus: no lab cluster {cluster} (is the lab up?), and no --etcd given",
              file=sys.stderr)
        return 1
    c = default().cluster(cluster)
    full = [sys.executable, "-m", "plexus", "vm", *argv, "--cluster", cluster,
            "--etcd", "https://127.0.0.1:2379", "--pki", str(pki), "--mesh-pki", str(LAB_DIR / "pki"),
            *(f for url in c.etcd_urls for f in ("--advertise", url))]
    root = str(Path(__file__).resolve().parents[2])
    return subprocess.run(["ip", "netns", "exec", c.control_plane.netns, *full],
                          env={**os.environ, "PYTHONPATH": root}).returncode


def _admin(args: argparse.Namespace, cluster: str) -> Any:
    from clustermesh.kvstore import KvStore, Tls
    from vmagent.enrol import ClusterAdmin, remote_access

    pki: Path = args.pki
    if pki is None or not (pki / "ca.key").exists():
        raise SystemExit(f"plexus: --pki must be cluster {cluster}'s PKI directory holding ca.key")
    kv = KvStore(args.etcd, Tls(pki / "ca.crt", pki / "admin.crt", pki / "admin.key"))
    remotes = {}
    if args.mesh_pki is not None:
        for d in sorted(args.mesh_pki.iterdir()):
            if d.is_dir() and d.name != cluster and (d / "remote.crt").exists():
                remotes[d.name] = remote_access(d)
    return ClusterAdmin(cluster, kv, pki, args.advertise or args.etcd, remotes)


def _run_admin(args: argparse.Namespace, cluster: str, op: Any) -> int:
    from clustermesh.kvstore import KvError, PermissionDenied, Unavailable
    from vmagent.enrol import EnrolError

    admin = _admin(args, cluster)

    async def main() -> int:
        try:
            return int(await op(admin))
        finally:
            await admin.kv.close()

    try:
        return asyncio.run(main())
    except EnrolError as e:
        print(f"plexus: {e}", file=sys.stderr)
        return 1
    except Unavailable as e:
        print(f"plexus: cannot reach cluster {cluster}'s etcd ({', '.join(args.etcd)}): {e}; "
              "nothing was changed", file=sys.stderr)
        return 1
    except PermissionDenied as e:
        print(f"plexus: cluster {cluster}'s etcd refused: {e} (enrolling needs the cluster's "
              "root user)", file=sys.stderr)
        return 1
    except KvError as e:
        print(f"plexus: cluster {cluster}'s etcd failed: {e}", file=sys.stderr)
        return 1


def _create(args: argparse.Namespace) -> int:
    from vmagent.bundle import write_bundle
    from vmagent.enrol import EnrolError, parse_duration, parse_labels
    from vmagent.enrol import create as enrol_create

    out: Path = (args.output or Path(f"{args.name}.bundle.yaml")).resolve()
    if not args.etcd:
        return _in_lab(args.cluster, [
            "create", args.name, "--ip", args.ip, "--labels", args.labels, "--namespace",
            args.namespace, "--ttl", args.ttl, "--lease", str(args.lease), "-o", str(out)])
    try:
        labels = parse_labels(args.labels)
        ttl = parse_duration(args.ttl)
    except EnrolError as e:
        print(f"plexus: {e}", file=sys.stderr)
        return 2

    async def op(admin: Any) -> int:
        bundle = await enrol_create(admin, args.name, args.ip, labels, namespace=args.namespace,
                                    ttl=ttl, lease=args.lease)
        write_bundle(out, bundle)
        print(f"VM {args.name} enrolled in cluster {args.cluster} ({args.ip}); join bundle "
              f"{out} (0600, certificate until {bundle.expires})")
        return 0

    return _run_admin(args, args.cluster, op)


def _list(args: argparse.Namespace) -> int:
    from vmagent.enrol import list_vms

    if not args.etcd:
        rows: list[dict[str, Any]] = []
        for c in ([args.cluster] if args.cluster else _lab_clusters()):
            if not (LAB_DIR / "pki" / c).exists():
                continue
            r = subprocess.run(_lab_list_argv(c), capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr, end="")
                return r.returncode
            rows += yaml.safe_load(r.stdout) or []
        emit(args, rows, _render)
        return 0
    if not args.cluster:
        print("plexus: --cluster is required with --etcd", file=sys.stderr)
        return 2

    async def op(admin: Any) -> int:
        emit(args, await list_vms(admin.kv, args.cluster), _render)
        return 0

    return _run_admin(args, args.cluster, op)


def _lab_list_argv(cluster: str) -> list[str]:
    from plexus.lab.topology import default

    c = default().cluster(cluster)
    pki = LAB_DIR / "pki" / cluster
    return ["ip", "netns", "exec", c.control_plane.netns, sys.executable, "-m", "plexus", "vm",
            "list", "--cluster", cluster, "--etcd", "https://127.0.0.1:2379", "--pki", str(pki),
            "-o", "json"]


def _render(rows: list[dict[str, Any]]) -> str:
    return table([(r["name"], r["cluster"], r["ip"],
                   ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())),
                   r["identity"] or "", r["state"], r["expires"]) for r in rows],
                 ["NAME", "CLUSTER", "IP", "LABELS", "IDENTITY", "STATE", "CERT EXPIRES"])


def _delete(args: argparse.Namespace) -> int:
    from vmagent.enrol import delete as enrol_delete

    if not args.etcd:
        return _in_lab(args.cluster, ["delete", args.name])

    async def op(admin: Any) -> int:
        for line in await enrol_delete(admin, args.name):
            print(line)
        print(f"VM {args.name} revoked and removed from cluster {args.cluster}")
        return 0

    return _run_admin(args, args.cluster, op)


# ---- host side ----------------------------------------------------------------------

def _address_is_local(ip: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def _join(args: argparse.Namespace) -> int:
    from vmagent.bundle import load_bundle
    from vmagent.join import unpack

    bundle = load_bundle(args.bundle, name=args.name)  # ConfigError: exit 2, file and field
    if not _address_is_local(str(bundle.ip)):
        print(f"plexus: {args.bundle}: ip: {bundle.ip} is no address of this host: the bundle is "
              f"for VM {bundle.name}", file=sys.stderr)
        return 2
    config = unpack(bundle, args.state_dir.resolve(),
                                (args.api_socket or args.state_dir / "agent.sock").resolve(),
                                args.wg_device, not args.no_encryption,
                                None if args.no_bpf else args.bpf_pin_dir, args.uplink,
                                strict=args.strict, bgp=args.bgp)
    if args.config_only:
        print(config)
        return 0
    if not args.no_bpf and args.bpf_pin_dir is not None:
        from bpf.loader import compile_early

        # the host registers only once its programs are in place: their compile is the
        # longest step of a join, so it runs while the agent imports and starts its modules
        compile_early(args.bpf_pin_dir)
    return _run_vmagent(config)


def _vmagent(args: argparse.Namespace) -> int:
    return _run_vmagent(Path(args.config))


def _run_vmagent(config: Path) -> int:
    from plexus.agent import run
    from plexus.app import VM_MODULES
    from plexus.core import log

    log.setup("info")
    return asyncio.run(run(config, VM_MODULES))
