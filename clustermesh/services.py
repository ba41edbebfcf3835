"""Global services: one service per namespace/name, backends from every cluster sharing it."""

from __future__ import annotations

from collections.abc import Iterable

from clustermesh.models import ClusterService, L4Addr
from clustermesh.tables import Backend, GlobalService

AFFINITY_LABEL = "service.cilium.io/affinity"


def merge(services: Iterable[ClusterService], local_cluster: str) -> list[GlobalService]:
    """Merge per-cluster services into global ones, honouring affinity.

    The local cluster's copy decides the frontends and the affinity; remote copies count
    only when shared. local: local backends while any exist, else remote; remote: the
    reverse; none: all of them.
    """
    groups: dict[tuple[str, str], list[ClusterService]] = {}
    for svc in services:
        groups.setdefault((svc.namespace, svc.name), []).append(svc)
    out = []
    for (ns, name), copies in sorted(groups.items()):
        local = next((s for s in copies if s.cluster == local_cluster), None)
        remotes = sorted((s for s in copies if s.cluster != local_cluster and s.shared),
                         key=lambda s: s.cluster)
        if local is None and not remotes:
            continue
        lead = local or remotes[0]
        affinity = lead.labels.get(AFFINITY_LABEL, "none")
        numbers = {name: addr.port for pm in lead.frontends.values() for name, addr in pm.items()}
        local_backends = [Backend(ip, _by_frontend_name(ports, numbers), local.cluster)
                          for ip, ports in sorted(local.backends.items())] if local else []
        remote_backends = [Backend(ip, _by_frontend_name(ports, numbers), s.cluster) for s in remotes
                           for ip, ports in sorted(s.backends.items())]
        if affinity == "local":
            backends = local_backends or remote_backends
        elif affinity == "remote":
            backends = remote_backends or local_backends
        else:
            backends = local_backends + remote_backends
        out.append(GlobalService(namespace=ns, name=name, frontends=dict(lead.frontends),
                                 backends=tuple(backends), affinity=affinity))
    return out


def _by_frontend_name(ports: dict[str, L4Addr], numbers: dict[str, int]) -> dict[str, L4Addr]:
    """A backend's ports under the frontend's port names.

    Cilium matches a backend port to a frontend port by name, "" when unnamed
    (pkg/clustermesh/store PortConfiguration). Plexus before this release keyed an
    unnamed port by its number: such a key stands for the unnamed port, and the other way
    round, so a mesh with an older Plexus cluster still finds every backend."""
    out = dict(ports)
    for name, number in numbers.items():
        if name in out:
            continue
        alias = str(number) if name == "" else "" if name == str(number) else None
        if alias is not None and alias in ports:
            out[name] = ports[alias]
    return out
