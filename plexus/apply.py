"""`plexus apply -f`: validate manifests, then store them in the cluster's etcd.

Every document is checked against its kind's model before anything is written, so a bad
file changes nothing. Each feature declares the kinds it owns in `MANIFEST_KINDS`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgp.models import MANIFEST_KINDS as BGP_KINDS
from bpf.models import MANIFEST_KINDS as BPF_KINDS
from clustermesh.kvstore import KvStore
from clustermesh.manifests import MANIFEST_KINDS as CLUSTERMESH_KINDS
from clustermesh.manifests import manifest_key
from plexus.core.config import ConfigError, Strict, parse, read_yaml_documents

KINDS: dict[str, type[Strict]] = {**CLUSTERMESH_KINDS, **BPF_KINDS, **BGP_KINDS}


@dataclass(frozen=True)
class Document:
    kind: str
    namespace: str
    name: str
    body: dict[str, Any]

    def key(self, cluster: str) -> str:
        return manifest_key(cluster, self.kind, self.namespace, self.name)


def load_documents(paths: list[Path]) -> list[Document]:
    """Parse and validate every document of every file; raise ConfigError listing all problems."""
    docs: list[Document] = []
    problems: list[str] = []
    for path in paths:
        try:
            raw_docs = read_yaml_documents(path)
        except ConfigError as e:
            problems.extend(str(e).splitlines())
            continue
        for i, raw in enumerate(raw_docs, start=1):
            where = f"{path}: document {i}"
            if not isinstance(raw, dict):
                problems.append(f"{where}: expected a mapping")
                continue
            kind = raw.get("kind")
            if kind not in KINDS:
                problems.append(f"{where}: kind {kind!r} is not one of {', '.join(sorted(KINDS))}")
                continue
            meta = m if isinstance(m := raw.get("metadata"), dict) else {}
            label = f"{where} ({kind} {meta.get('namespace', 'default')}/{meta.get('name', '?')})"
            try:
                model = parse(KINDS[kind], raw, label)
            except ConfigError as e:
                problems.extend(str(e).splitlines())
                continue
            body = model.model_dump(mode="json", by_alias=True, exclude_none=True)
            md = body.get("metadata", {})
            docs.append(Document(kind, md.get("namespace", "default"), md["name"], body))
    if problems:
        raise ConfigError("plexus apply", problems)
    return docs


async def apply(kv: KvStore, cluster: str, docs: list[Document]) -> list[str]:
    out = []
    for d in docs:
        await kv.put(d.key(cluster), json.dumps(d.body))
        out.append(f"{d.kind.lower()}/{d.namespace}/{d.name} applied")
    return out


async def delete(kv: KvStore, cluster: str, docs: list[Document]) -> list[str]:
    out = []
    for d in docs:
        gone = await kv.delete(d.key(cluster))
        out.append(f"{d.kind.lower()}/{d.namespace}/{d.name} {'deleted' if gone else 'not found'}")
    return out
