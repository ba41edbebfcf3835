"""This node: its identity from the agent config, its local pods, and the attributes
features publish about it.

The endpoint manager (plexus.node) provides all three; clustermesh registers them in etcd,
the datapath and encryption read them.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from plexus.core.module import Key
from plexus.core.tables import Table

T = TypeVar("T")


@dataclass(frozen=True)
class LocalNode:
    """This node, from the agent config: what it registers and where it sits."""

    cluster: str
    cluster_id: int
    name: str
    ip: str
    pod_cidr: str
    pod_cidr_v6: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Endpoint:
    """A pod on this node, registered by the CNI plugin."""

    container_id: str
    ip: str
    namespace: str
    pod_name: str
    labels: dict[str, str]
    host_ifname: str
    netns: str = ""
    ifname: str = "eth0"
    ipv6: str | None = None

    @property
    def key(self) -> str:
        return self.container_id


def endpoints_table() -> Table[str, Endpoint]:
    return Table("endpoints", key=lambda e: e.key)


# ---- attributes ----------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeAttr(Generic[T]):
    """The typed name of an attribute of this node that one module sets and others read."""

    name: str
    type: type[T]


WIREGUARD_PUBLIC_KEY: NodeAttr[str] = NodeAttr("wireguard-public-key", str)  # base64, into the node record
POD_MTU: NodeAttr[int] = NodeAttr("pod-mtu", int)  # the most a pod may send without fragmenting


ANNOTATION_PREFIX = "annotation:"  # rows of the attributes table that are record annotations


@dataclass(frozen=True)
class NodeAttribute:
    """A row of the attributes table; set and read through `NodeAttributes`."""

    name: str
    value: object


class NodeAttributes:
    """The attributes features set on this node, e.g. the WireGuard public key.

    A module that will set an attribute holds `initialized` (`register_initializer`) until
    it has: readers that publish the node (clustermesh) wait for it, so a record is never
    written without what it should carry.
    """

    def __init__(self) -> None:
        self.table: Table[str, NodeAttribute] = Table("node-attributes", key=lambda a: a.name)

    def set(self, attr: NodeAttr[T], value: T) -> None:
        if not isinstance(value, attr.type):
            raise TypeError(f"node attribute {attr.name} is a {attr.type.__name__}, "
                            f"not {type(value).__name__}")
        self.table.upsert(NodeAttribute(attr.name, value))

    def get(self, attr: NodeAttr[T]) -> T | None:
        row = self.table.get(attr.name)
        if row is None:
            return None
        value = row.value
        assert isinstance(value, attr.type)  # only `set` writes, and it checks
        return value

    def delete(self, attr: NodeAttr[T]) -> None:
        self.table.delete(attr.name)

    def annotate(self, name: str, value: str | None) -> None:
        """Set (None: remove) an annotation of this node's record, seen by every cluster."""
        key = ANNOTATION_PREFIX + name
        if value is None:
            self.table.delete(key)
        elif not isinstance(value, str):
            raise TypeError(f"node annotation {name} is a str, not {type(value).__name__}")
        else:
            self.table.upsert(NodeAttribute(key, value))

    def annotations(self) -> dict[str, str]:
        n = len(ANNOTATION_PREFIX)
        return {a.name[n:]: str(a.value) for a in self.table if a.name.startswith(ANNOTATION_PREFIX)}

    def register_initializer(self, name: str) -> Callable[[], None]:
        return self.table.register_initializer(name)

    @property
    def initialized(self) -> asyncio.Event:
        return self.table.initialized

    def watch(self) -> AsyncIterator[builtins.set[str]]:
        return self.table.watch()


LOCAL_NODE: Key[LocalNode] = Key("local-node")
ENDPOINTS: Key[Table[str, Endpoint]] = Key("endpoints")  # local pods
NODE_ATTRIBUTES: Key[NodeAttributes] = Key("node-attributes")  # this node's extras
