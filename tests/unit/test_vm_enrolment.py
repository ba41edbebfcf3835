"""VM enrolment, pure: labels and durations from the command line, the spec and host records
in etcd, the keys a VM's role may write, and the join bundle's checks."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import yaml

from clustermesh.models import InvalidValue
from clustermesh.pki import issue_client, make_cluster_pki, sign
from clustermesh.vms import VmHost, VmSpec, parse_vm_key, vm_grants, vm_host_prefix
from plexus.core.config import ConfigError
from vmagent.bundle import Bundle, load_bundle, sign_bundle, write_bundle
from vmagent.enrol import EnrolError, parse_duration, parse_labels


def test_labels_and_durations() -> None:
    assert parse_labels("app=db, env=prod") == {"app": "db", "env": "prod"}
    assert parse_labels("") == {}
    for bad, why in (("app", "not key=value"), ("a=1,a=2", "given twice"),
                     ("app=a b", "not a label value"), ("-x=1", "not a label key")):
        with pytest.raises(EnrolError, match=why):
            parse_labels(bad)
    assert parse_duration("24h") == datetime.timedelta(hours=24)
    assert parse_duration("90m") == datetime.timedelta(minutes=90)
    for bad in ("", "24", "h", "-1h", "0s", "1y"):
        with pytest.raises(EnrolError, match="--ttl"):
            parse_duration(bad)


def test_spec_and_host_records_round_trip_and_refuse_bad_values() -> None:
    spec = VmSpec("db1", "east", "172.31.3.10", {"app": "db"}, lease=30, cert_serial="ab")
    assert VmSpec.from_json(spec.to_json()) == spec
    for raw, why in (('{"name": "DB", "cluster": "east", "ip": "1.2.3.4"}', "VM name"),
                     ('{"name": "db", "cluster": "east", "ip": "x"}', "not an IP"),
                     ('{"name": "db", "cluster": "east", "ip": "1.2.3.4", "lease": 0}', "lease"),
                     ('{"name": "db", "cluster": "east", "ip": "1.2.3.4", "labels": {"a": 1}}',
                      "label value")):
        with pytest.raises(InvalidValue, match=why):
            VmSpec.from_json(raw)
    assert VmHost.from_json(VmHost("k" * 43 + "=").to_json()).wireguard_pubkey == "k" * 43 + "="
    with pytest.raises(InvalidValue, match="wireguardPubKey"):
        VmHost.from_json('{"wireguardPubKey": "nope"}')


def test_keys_and_the_role_a_vm_gets() -> None:
    assert parse_vm_key("east", "plexus/vms/v1/east/db1/spec") == ("db1", "spec")
    assert parse_vm_key("east", "plexus/vms/v1/east/db1/host/node") == ("db1", "node")
    assert parse_vm_key("east", "plexus/vms/v1/east/db1/host/other") is None
    assert parse_vm_key("east", "plexus/vms/v1/west/db1/spec") is None
    writes = [g for g in vm_grants("east", "db1") if g.perm != "read"]
    assert [(g.key, g.prefix) for g in writes] == [(vm_host_prefix("east", "db1"), True)]


def _bundle(pki: Path, name: str = "db1", valid: datetime.timedelta = datetime.timedelta(hours=1),
            not_before: datetime.datetime | None = None) -> Bundle:
    key, cert, _ = issue_client(pki, f"vm-{name}", "east", valid, not_before=not_before)
    b = Bundle.model_validate({
        "name": name, "cluster": "east", "clusterID": 1, "ip": "172.31.3.10",
        "labels": {"app": "db"}, "expires": "2030-01-01T00:00:00Z",
        "etcd": {"endpoints": ["https://172.31.1.250:2379"], "ca": (pki / "ca.crt").read_text(),
                 "cert": cert.decode(), "key": key.decode()}})
    return sign_bundle(b, lambda data: sign(pki, data))


def test_bundle_checks(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    make_cluster_pki("east", pki, ["127.0.0.1"])
    path = tmp_path / "b.yaml"
    write_bundle(path, _bundle(pki))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_bundle(path, name="db1").name == "db1"

    def variant(change: dict[str, object], name: str) -> Path:
        data = yaml.safe_load(path.read_text())
        data.update(change)
        p = tmp_path / name
        p.write_text(yaml.safe_dump(data))
        os.chmod(p, 0o600)
        return p

    cases: list[tuple[dict[str, object], str]] = [
        ({"ip": "172.31.3.11"}, "signature: does not match"),
        ({"signature": "!!"}, "signature: not base64"),
        ({"lease": 1}, "lease: Input should be greater than or equal to 2")]
    for change, why in cases:
        with pytest.raises(ConfigError, match=why):
            load_bundle(variant(change, "v.yaml"))
    # a certificate made for another VM, signed all the same
    other = _bundle(pki, name="db2").model_copy(update={"name": "db1"})
    write_bundle(tmp_path / "o.yaml", sign_bundle(other, lambda data: sign(pki, data)))
    with pytest.raises(ConfigError, match="made for 'vm-db2', not for VM 'db1'"):
        load_bundle(tmp_path / "o.yaml")
    old = _bundle(pki, not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2))
    write_bundle(tmp_path / "x.yaml", old)
    with pytest.raises(ConfigError, match=r"x\.yaml: etcd\.cert: expired at"):
        load_bundle(tmp_path / "x.yaml")
