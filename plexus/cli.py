"""The `plexus` command line."""

from __future__ import annotations

import argparse
import sys

from plexus.commands import agent, apply, bgp, bpf, clustermesh, egress, encrypt, lab, observe, relay, vm
from plexus.core.client import ClientError
from plexus.core.config import ConfigError

COMMAND_GROUPS = [
    agent,
    lab,
    clustermesh,
    apply,
    encrypt,
    bpf,
    observe,
    relay,
    bgp,
    egress,
    vm,
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plexus", description=(
        "Connect clusters, VMs and metal hosts into one routed, encrypted, "
        "policy-enforced network."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ClientError as e:
        print(f"plexus: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"plexus: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
