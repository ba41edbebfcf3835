"""`plexus apply -f` against a real etcd: all or nothing, errors name the field."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from clustermesh.kvstore import KvStore
from tests.support import Etcd, free_port

ROOT = Path(__file__).resolve().parents[2]
GOOD = """apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {service.cilium.io/global: "true", service.cilium.io/affinity: local}
spec:
  clusterIP: 10.96.1.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def plexus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plexus", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


async def test_apply_stores_and_delete_removes(tmp_path: Path, etcd: Etcd) -> None:
    f = tmp_path / "svc.yaml"
    f.write_text(GOOD)
    r = plexus("apply", "-f", str(f), "--cluster", "east", "--etcd", etcd.endpoint)
    assert r.returncode == 0, r.stderr
    assert "service/shop/web applied" in r.stdout
    async with KvStore([etcd.endpoint]) as kv:
        got = await kv.get("plexus/manifests/v1/east/Service/shop/web")
        assert got is not None
        body = json.loads(got.value)
        assert body["spec"]["ports"][0]["targetPort"] == 8080
        assert body["spec"]["clusterIP"] == "10.96.1.10"
    r = plexus("delete", "-f", str(f), "--cluster", "east", "--etcd", etcd.endpoint)
    assert r.returncode == 0 and "deleted" in r.stdout
    async with KvStore([etcd.endpoint]) as kv:
        assert await kv.get("plexus/manifests/v1/east/Service/shop/web") is None


async def test_a_bad_document_writes_nothing_and_names_the_field(tmp_path: Path, etcd: Etcd) -> None:
    f = tmp_path / "svc.yaml"
    bad = GOOD.replace("port: 80,", "port: 70000,").replace("web\n  namespace", "api\n  namespace")
    f.write_text(GOOD + "---\n" + bad + "---\nkind: Mystery\n")
    r = plexus("apply", "-f", str(f), "--cluster", "east", "--etcd", etcd.endpoint)
    assert r.returncode == 2
    assert ("document 2 (Service shop/api): spec.ports[0].port: "
            "Input should be less than or equal to 65535") in r.stderr
    assert "document 3: kind 'Mystery' is not one of" in r.stderr
    async with KvStore([etcd.endpoint]) as kv:
        items, _ = await kv.list_prefix("plexus/manifests/")
        assert items == []  # the good first document was not written either


def test_annotation_values_are_checked(tmp_path: Path) -> None:
    f = tmp_path / "svc.yaml"
    f.write_text(GOOD.replace("affinity: local", "affinity: sideways"))
    r = plexus("apply", "-f", str(f), "--dry-run")
    assert r.returncode == 2
    assert ("metadata: Value error, annotation service.cilium.io/affinity "
            "must be local, remote or none") in r.stderr


def _nothing_stored(etcd: Etcd) -> bool:
    async def empty() -> bool:
        async with KvStore([etcd.endpoint]) as kv:
            items, _ = await kv.list_prefix("plexus/")
            return items == []
    return asyncio.run(empty())


def test_files_at_the_edges_name_the_problem_and_write_nothing(tmp_path: Path, etcd: Etcd) -> None:
    cases = {
        "app.bin": (b"\x7fELF\x02\x01\x01\x00\xc0\xff" * 300,
                    "app.bin: not a YAML text file: byte 0xc0 at offset 8 is not UTF-8"),
        "empty.yaml": (b"", "empty.yaml: no document: the file is empty (or only comments)"),
        "big.yaml": (GOOD.replace(
            "annotations: {", "annotations: {note: " + "x" * 10 * 1024 * 1024 + ", ").encode(),
            "big.yaml: larger than 4.0 MiB, the most `plexus apply` reads from one file"),
        "ip.yaml": (GOOD.replace("10.96.1.10", "10.96.1.999").encode(),
                    "ip.yaml: document 1 (Service shop/web): spec.clusterIP: Input is not a valid "
                    "IPv4 address or IPv6 address (got '10.96.1.999')"),
    }
    for name, (content, message) in cases.items():
        f = tmp_path / name
        f.write_bytes(content)
        r = plexus("apply", "-f", str(f), "--cluster", "east", "--etcd", etcd.endpoint)
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert message in r.stderr, (name, r.stderr)
        assert "Traceback" not in r.stderr and "cannot reach" not in r.stderr
        assert "lax-or-strict" not in r.stderr
    assert _nothing_stored(etcd)


def test_a_write_etcd_refuses_applies_nothing(tmp_path: Path) -> None:
    data = Path(tempfile.mkdtemp(prefix="plexus-etcd-small-"))
    small = Etcd("small", f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}",
                 data / "data")
    try:
        small.start(["--max-request-bytes", "4096"])
        big = GOOD.replace("web\n  namespace", "big\n  namespace").replace(
            "annotations: {", "annotations: {note: " + "x" * 5000 + ", ")
        f = tmp_path / "two.yaml"
        f.write_text(GOOD + "---\n" + big)
        r = plexus("apply", "-f", str(f), "--cluster", "east", "--etcd", small.endpoint)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "the cluster's etcd refused the manifests as too large" in r.stderr
        assert "nothing was applied" in r.stderr and "cannot reach" not in r.stderr
        assert _nothing_stored(small)  # the first, small document was not written either
    finally:
        small.stop()
        shutil.rmtree(data, ignore_errors=True)


def test_an_unreachable_etcd_is_said_so(tmp_path: Path) -> None:
    f = tmp_path / "svc.yaml"
    f.write_text(GOOD)
    endpoint = f"http://127.0.0.1:{free_port()}"
    r = plexus("apply", "-f", str(f), "--cluster", "east", "--etcd", endpoint)
    assert r.returncode == 1
    assert f"cannot reach the cluster's etcd ({endpoint})" in r.stderr
    assert "nothing was applied" in r.stderr
