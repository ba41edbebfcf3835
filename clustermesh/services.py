"""Global services: one service per namespace/name, backends from every cluster sharing it."""

from __future__ import annotations

from collections.abc import Iterable

from clustermesh.models import ClusterService
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
        local_backends = [Backend(ip, ports, local.cluster) for ip, ports in
                          sorted(local.backends.items())] if local else []
        remote_backends = [Backend(ip, ports, s.cluster) for s in remotes
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
