"""`plexus apply -f FILE` and `plexus delete -f FILE`."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

from plexus.commands.common import LAB_DIR


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, helptext in (("apply", "validate manifests and store them in a cluster"),
                           ("delete", "remove the manifests named in files from a cluster")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("-f", "--filename", action="append", required=True, type=Path)
        p.add_argument("--cluster", help="the cluster the manifests belong to")
        p.add_argument("--etcd", action="append", help="the cluster's etcd endpoint (repeatable)")
        p.add_argument("--cacert", type=Path)
        p.add_argument("--cert", type=Path)
        p.add_argument("--key", type=Path)
        p.add_argument("--lab", metavar="CLUSTER", help="a lab cluster (east, west)")
        p.add_argument("--dry-run", action="store_true", help="validate only")
        p.set_defaults(func=_run, action=name)


def _run(args: argparse.Namespace) -> int:
    from clustermesh.kvstore import KvError, KvStore, PermissionDenied, Tls, Unavailable
    from plexus import apply as manifests

    docs = manifests.load_documents(args.filename)  # ConfigError -> exit 2 with the problems
    if args.dry_run:
        for d in docs:
            print(f"{d.kind.lower()}/{d.namespace}/{d.name} valid")
        return 0
    if args.lab:
        return _in_lab(args)
    if not args.cluster or not args.etcd:
        print("plexus: --cluster and --etcd (or --lab CLUSTER) are required", file=sys.stderr)
        return 2
    tls = Tls(args.cacert, args.cert, args.key) if args.cacert else None

    async def main() -> list[str]:
        async with KvStore(args.etcd, tls) as kv:
            op = manifests.apply if args.action == "apply" else manifests.delete
            return await op(kv, args.cluster, docs)

    nothing = "nothing was applied" if args.action == "apply" else "some may have been deleted"
    try:
        for line in asyncio.run(main()):
            print(line)
    except Unavailable as e:
        print(f"plexus: cannot reach the cluster's etcd ({', '.join(args.etcd)}): {e}; {nothing}",
              file=sys.stderr)
        return 1
    except PermissionDenied as e:
        print(f"plexus: the cluster's etcd refused the {args.action}: {e} (the certificate's user "
              f"may not write plexus/manifests/); {nothing}", file=sys.stderr)
        return 1
    except KvError as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "too large" in str(e):
            print(f"plexus: the cluster's etcd refused the manifests as too large ({e}): its "
                  f"--max-request-bytes is below what `plexus apply` allows "
                  f"({manifests.MAX_APPLY_BYTES // 1024} KiB); {nothing}", file=sys.stderr)
        else:
            print(f"plexus: the cluster's etcd refused the {args.action}: {e}; {nothing}",
                  file=sys.stderr)
        return 1
    return 0


def _in_lab(args: argparse.Namespace) -> int:
    """Lab etcd is reachable only inside its namespace: run there, with the lab's admin certs."""
    pki = LAB_DIR / "pki" / args.lab
    if not pki.exists():
        print(f"plexus: no lab cluster {args.lab} (is the lab up?)", file=sys.stderr)
        return 1
    argv = [sys.executable, "-m", "plexus", args.action, "--cluster", args.lab,
            "--etcd", "https://127.0.0.1:2379", "--cacert", str(pki / "ca.crt"),
            "--cert", str(pki / "admin.crt"), "--key", str(pki / "admin.key")]
    for f in args.filename:
        argv += ["-f", str(f.resolve())]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run(["ip", "netns", "exec", f"plx-{args.lab}-cp", *argv], env=env).returncode
