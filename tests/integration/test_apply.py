"""`plexus apply -f` against a real etcd: all or nothing, errors name the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from clustermesh.kvstore import KvStore
from tests.support import Etcd

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
