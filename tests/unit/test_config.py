from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bpf.config import BpfConfig
from bpf.module import module as bpf
from clustermesh.module import module as clustermesh
from plexus.agent import load_config
from plexus.app import MODULES
from plexus.core.config import ConfigError

GOOD = """
cluster: {name: east, id: 1}
node: {name: n1, ip: 172.31.1.11, podCIDR: 10.1.1.0/24}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return p


def test_good_config_fills_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), MODULES)
    assert cfg.cluster.name == "east"
    assert str(cfg.node.pod_cidr) == "10.1.1.0/24"
    assert cfg.metrics.port == 9962
    assert cfg.node.mtu == 1500


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD + "bogus: 1\n", "bogus: unknown field"),
    (GOOD.replace("id: 1", "id: x"), "cluster.id: Input should be a valid integer"),
    (GOOD.replace("id: 1", "id: 300"), "cluster.id: Value error, cluster id 300 is outside 1..255"),
    ("cluster: {name: east, id: 1}\n", "node: required field is missing"),
    (GOOD.replace("name: east", "name: East_1"), "cluster.name: Value error, cluster name 'East_1'"),
    (GOOD.replace("podCIDR: 10.1.1.0/24", "podCIDR: 10.1.1.0/33"), "node.podCIDR:"),
    (GOOD + "node2: [\n", "invalid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    (GOOD + "clustermesh: {configDir: /x, color: red}\n", "clustermesh.color: unknown field"),
])
def test_bad_config_names_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, MODULES)
    assert str(path) in str(e.value)
    assert expected in str(e.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml", MODULES)


def test_a_module_section_is_read_as_that_modules_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD + "bpf: {pinDir: /sys/fs/bpf/x}\n"), MODULES)
    assert cfg.section(bpf) == BpfConfig(pin_dir=Path("/sys/fs/bpf/x"))
    with pytest.raises(TypeError, match="'bpf' is not a ClusterMeshConfig"):
        cfg.section(replace(clustermesh, name="bpf"))
