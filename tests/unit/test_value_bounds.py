"""Kvstore values are bounded in size and nesting before they are decoded."""

from __future__ import annotations

import json
import time

import pytest

from clustermesh.models import (
    MAX_JSON_DEPTH,
    MAX_VALUE_BYTES,
    ClusterConfig,
    ClusterService,
    InvalidValue,
    IPIdentity,
    Node,
    decode_json,
    json_depth,
    parse_labels,
)
from plexus.commands.clustermesh import _render


@pytest.mark.parametrize(("raw", "depth"), [
    (b"1", 0),
    (b"[]", 1),
    (b'{"a": [1, {"b": []}]}', 4),
    (b'{"a": "[[[[{{{{"}', 1),            # brackets inside strings do not count
    (b'["\\"[[[", "\\\\", []]', 2),        # nor do escaped quotes end the string early
    (b"[[[", 3),                           # unclosed still nests
    (b"]]][", 0),                          # a decoder fails at the first stray closer
    (b"[" * 200_000 + b"]" * 200_000, 200_000),
])
def test_depth_is_measured_without_decoding(raw: bytes, depth: int) -> None:
    assert json_depth(raw) == depth


def test_the_deepest_allowed_value_decodes_and_one_more_level_does_not() -> None:
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert decode_json(ok, "v") == json.loads(ok)
    with pytest.raises(InvalidValue, match="nests 65 levels deep"):
        decode_json("[" + ok + "]", "v")


@pytest.mark.parametrize("raw", [
    b"[" * 200_000 + b"]" * 200_000,
    b'{"IP": ' * 200_000 + b"1" + b"}" * 200_000,
    b"[" * 200_000,
    b'"' + b"x" * MAX_VALUE_BYTES + b'"',
    b"\xff\xfe{}",
    '["\\"", "{}"]'.encode("utf-16-le"),  # only UTF-8: the scan must see where strings end
    b'{"IP": "10.0.0.1", "ID": 1' + b"0" * 5000 + b"}",
    b'{"IP": "10.0.0.1", "ID": 1, "Mask": "' + b"/" * 64 + b'"}',
    b'{"IP": "10.0.0.1", "ID": 1e400}',
])
def test_hostile_values_are_invalid_and_nothing_else(raw: bytes) -> None:
    for decode in (IPIdentity.from_json, Node.from_json, ClusterService.from_json,
                   ClusterConfig.from_json):
        with pytest.raises(InvalidValue):
            decode(raw)


def test_a_hostile_value_is_refused_quickly() -> None:
    worst = b"[]" * (MAX_VALUE_BYTES // 2)
    start = time.monotonic()
    assert json_depth(worst) == 1
    with pytest.raises(InvalidValue, match=r"over the .* byte limit"):
        decode_json(worst + b"[]", "v")
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("raw", [b"k8s:a=b;\xff", b"k8s:a=b;\x00", b"k:" + b"x" * MAX_VALUE_BYTES])
def test_bad_label_values_are_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidValue):
        parse_labels(raw)


def test_a_mask_longer_than_the_address_is_invalid() -> None:
    eight_bytes = "//////////8="
    with pytest.raises(InvalidValue, match="Mask is longer"):
        IPIdentity.from_json(json.dumps({"IP": "10.0.0.1", "ID": 1, "Mask": eight_bytes}))
    assert IPIdentity.from_json(json.dumps({"IP": "10.0.0.0", "ID": 1, "Mask": "////AA=="})).prefix_len == 24


def test_cluster_config_capabilities_of_the_wrong_type_are_invalid() -> None:
    with pytest.raises(InvalidValue, match="maxConnectedClusters"):
        ClusterConfig.from_json(json.dumps({"id": 2, "capabilities": {"maxConnectedClusters": "x"}}))


def test_status_shows_a_refused_config_file_in_full() -> None:
    why = "/etc/plexus/clustermesh/west: not UTF-8 text (invalid start byte at byte 0)"
    out = _render({"enabled": True, "clusters": {
        "west": {"name": "west", "ready": False, "connected": False, "configError": why,
                 "configFile": "/etc/plexus/clustermesh/west"}}})
    assert f"  west: {why}" in out


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-8-sig"])
def test_only_utf8_json_is_decoded(encoding: str) -> None:
    assert decode_json(b'{"a": 1}', "v") == {"a": 1}
    with pytest.raises(InvalidValue):
        decode_json('{"a": 1}'.encode(encoding), "v")


@pytest.mark.parametrize("ip", [
    "10.1.2.3", "0.0.0.0", "255.255.255.255", "010.1.2.3", "1.2.3", "1.2.3.4 ", " 1.2.3.4",
    "1.2.3.04", "256.1.1.1", "1.2.3.4\x00", "0x1.2.3.4", "1.2.3.4.5", "", "fd00::1",
    "FD00:0:0::1", "::ffff:1.2.3.4", "1.2.3.4/32", "\u0661.2.3.4"])
def test_the_fast_ipv4_path_reads_addresses_as_ipaddress_does(ip: str) -> None:
    """IPv4 addresses are checked in C; whatever that path takes must come out as ipaddress
    would write it, and whatever ipaddress refuses stays refused."""
    import ipaddress

    from clustermesh.ownership import Owned

    value = json.dumps({"IP": ip, "ID": 70000}).encode()
    try:
        expected: str | None = str(ipaddress.ip_address(ip))
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(InvalidValue, match="not an IP address"):
            IPIdentity.from_json(value)
        return
    entry = IPIdentity.from_json(value)
    addr = ipaddress.ip_address(ip)
    assert (entry.ip, entry.prefix) == (expected, f"{addr}/{addr.max_prefixlen}")
    owned = Owned.of([Node("n1", "west", 2, (), "10.1.0.0/16", "fd00::/64")])
    assert owned.covers(entry.prefix) == any(
        addr in ipaddress.ip_network(c) for c in ("10.1.0.0/16", "fd00::/64"))
