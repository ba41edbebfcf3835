"""Typed attributes of this node: set by one module, read by another, checked by type."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from plexus.agent import build, config_model
from plexus.app import MODULES
from plexus.core.node import NODE_ATTRIBUTES, POD_MTU, WIREGUARD_PUBLIC_KEY, NodeAttr, NodeAttributes
from plexus.node.module import EndpointManager


def test_set_and_get_are_typed() -> None:
    attrs = NodeAttributes()
    assert attrs.get(POD_MTU) is None
    attrs.set(POD_MTU, 1420)
    attrs.set(WIREGUARD_PUBLIC_KEY, "k" * 43 + "=")
    mtu: int | None = attrs.get(POD_MTU)
    assert mtu == 1420 and attrs.get(WIREGUARD_PUBLIC_KEY) == "k" * 43 + "="
    attrs.delete(POD_MTU)
    assert attrs.get(POD_MTU) is None


def test_a_value_of_the_wrong_type_is_refused() -> None:
    attrs = NodeAttributes()
    with pytest.raises(TypeError, match="node attribute pod-mtu is a int, not str"):
        attrs.set(POD_MTU, "1420")  # type: ignore[misc]  # mypy refuses it too
    assert attrs.get(POD_MTU) is None


async def test_readers_wait_for_the_modules_that_will_set_attributes() -> None:
    attrs = NodeAttributes()
    done = attrs.register_initializer("encryption")
    assert not attrs.initialized.is_set()
    changes = attrs.watch()
    attrs.set(WIREGUARD_PUBLIC_KEY, "key")
    done()
    await asyncio.wait_for(attrs.initialized.wait(), 1)
    assert await asyncio.wait_for(anext(changes), 1) == {"wireguard-public-key"}
    attrs.set(WIREGUARD_PUBLIC_KEY, "key")  # unchanged: nobody woken
    attrs.set(NodeAttr("flavour", str), "x")
    assert await asyncio.wait_for(anext(changes), 1) == {"flavour"}
    assert isinstance(changes, AsyncGenerator)
    await changes.aclose()


async def test_the_pod_mtu_a_module_sets_is_the_mtu_pods_get(tmp_path: Path) -> None:
    cfg = config_model(MODULES).model_validate({
        "cluster": {"name": "east", "id": 1},
        "node": {"name": "n1", "ip": "172.31.1.11", "podCIDR": "10.1.1.0/24", "mtu": 1500},
        "stateDir": str(tmp_path)})
    app = build(cfg, MODULES)
    manager = app.components["endpoints"]
    assert isinstance(manager, EndpointManager)
    assert (await manager._node({}, None))["mtu"] == 1500
    app.hive.require(NODE_ATTRIBUTES).set(POD_MTU, 1420)  # what encryption sets
    assert (await manager._node({}, None))["mtu"] == 1420


def test_annotations_are_strings_kept_apart_from_typed_attributes() -> None:
    attrs = NodeAttributes()
    attrs.set(POD_MTU, 1420)
    attrs.annotate("egress.plexus.io/gateway-probes", "east/n2=up")
    assert attrs.annotations() == {"egress.plexus.io/gateway-probes": "east/n2=up"}
    with pytest.raises(TypeError, match="is a str, not int"):
        attrs.annotate("x", 1)  # type: ignore[arg-type]
    attrs.annotate("egress.plexus.io/gateway-probes", None)
    assert attrs.annotations() == {} and attrs.get(POD_MTU) == 1420
