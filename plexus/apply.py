"""`plexus apply -f`: validate manifests, then store them in the cluster's etcd.

Every document of every file is checked before anything is written, and the documents are
written in one etcd transaction, so a bad file, or a write etcd refuses, changes nothing.
Each feature declares the kinds it owns in `MANIFEST_KINDS`. Every problem names the file,
the document (its index, and its kind and name once known) and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bgp.models import MANIFEST_KINDS as BGP_KINDS
from bpf.models import MANIFEST_KINDS as BPF_KINDS
from clustermesh.kvstore import KvStore
from clustermesh.manifests import MANIFEST_KINDS as CLUSTERMESH_KINDS
from clustermesh.manifests import manifest_key
from egress.models import MANIFEST_KINDS as EGRESS_KINDS
from plexus.core.config import ConfigError, Strict, parse

KINDS: dict[str, type[Strict]] = {**CLUSTERMESH_KINDS, **BPF_KINDS, **BGP_KINDS,
                               **EGRESS_KINDS}

MIB = 1024 * 1024
# etcd refuses a request over --max-request-bytes (1.5 MiB by default) and a transaction of
# more than --max-txn-ops operations (128 by default); one apply is one transaction.
MAX_APPLY_BYTES = 1 * MIB
MAX_DOCUMENTS = 128
MAX_FILE_BYTES = 4 * MIB
# YAML aliases can make a small file expand without end; bound what a document may hold.
MAX_VALUES = 100_000
MAX_DEPTH = 64


@dataclass(frozen=True)
class Document:
    kind: str
    namespace: str
    name: str
    body: dict[str, Any]
    where: str = ""  # "FILE: document N", for messages

    def key(self, cluster: str) -> str:
        return manifest_key(cluster, self.kind, self.namespace, self.name)

    def stored(self) -> str:
        return json.dumps(self.body)


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: keys given here override the merged ones
            key = self.construct_object(key_node, deep=deep)
            try:
                again = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: construct_mapping below says so
            if again:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB // 10 else f"{n} bytes"


def read_documents(path: Path) -> list[Any]:
    """The non-empty YAML documents of one file; ConfigError in words for anything else."""
    source = str(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(source, [f"cannot read: {e.strerror}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(source, [f"larger than {_size(MAX_FILE_BYTES)}, the most `plexus apply` "
                                   "reads from one file"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(source, [f"not a YAML text file: byte {data[e.start]:#04x} at offset "
                                   f"{e.start} is not UTF-8"]) from None
    docs: list[Any] = []
    try:
        for doc in yaml.load_all(text, Loader=_Loader):
            if doc is not None:
                docs.append(doc)
    except yaml.reader.ReaderError as e:
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise ConfigError(source, [f"not a YAML text file: character U+{code:04X} at offset "
                                   f"{e.position} is not allowed in YAML"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(source, [f"document {len(docs) + 1}: {where}invalid YAML: "
                                   f"{problem}"]) from None
    except RecursionError:
        raise ConfigError(source, [f"document {len(docs) + 1}: nested too deeply to read"]) from None
    if not docs:
        raise ConfigError(source, ["no document: the file is empty (or only comments)"])
    return docs


def _bound(raw: Any) -> str | None:
    """Why `raw` is too big to validate (counting what YAML aliases repeat), or None."""
    count = 0
    stack: list[tuple[Any, int]] = [(raw, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return f"more than {MAX_VALUES} values (YAML aliases count each time they are used)"
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return None


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "true or false"}.get(type(value), type(value).__name__)


def _document(raw: Any, where: str) -> tuple[Document | None, list[str]]:
    """Validate one document; (document, []) or (None, problems)."""
    if not isinstance(raw, dict):
        return None, [f"{where}: expected a mapping with kind, metadata and spec, "
                      f"got {_type_name(raw)}"]
    if (too_big := _bound(raw)) is not None:
        return None, [f"{where}: too large to validate: {too_big}"]
    kinds = ", ".join(sorted(KINDS))
    kind = raw.get("kind")
    if kind is None:
        return None, [f"{where}: kind: required field is missing; expected one of {kinds}"]
    if not isinstance(kind, str):
        return None, [f"{where}: kind: expected a string, got {_type_name(kind)}"]
    if kind not in KINDS:
        return None, [f"{where}: kind {kind!r} is not one of {kinds}"]
    meta = m if isinstance(m := raw.get("metadata"), dict) else {}
    label = f"{where} ({kind} {meta.get('namespace', 'default')}/{meta.get('name', '?')})"
    try:
        model = parse(KINDS[kind], raw, label)
    except ConfigError as e:
        return None, str(e).splitlines()
    body = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    md = body.get("metadata", {})
    doc = Document(kind, md.get("namespace", "default"), md["name"], body, where)
    size = len(doc.stored())
    if size > MAX_APPLY_BYTES:
        return None, [f"{label}: the manifest is too large: {_size(size)} as stored, and etcd "
                      f"takes at most {_size(MAX_APPLY_BYTES)} in one apply"]
    return doc, []


def load_documents(paths: list[Path]) -> list[Document]:
    """Parse and validate every document of every file; raise ConfigError listing all problems."""
    docs: list[Document] = []
    problems: list[str] = []
    seen: dict[tuple[str, str, str], Document] = {}
    for path in paths:
        try:
            raw_docs = read_documents(path)
        except ConfigError as e:
            problems.extend(str(e).splitlines())
            continue
        for i, raw in enumerate(raw_docs, start=1):
            doc, found = _document(raw, f"{path}: document {i}")
            problems.extend(found)
            if doc is None:
                continue
            ident = (doc.kind, doc.namespace, doc.name)
            if (first := seen.get(ident)) is not None:
                problems.append(f"{doc.where} ({doc.kind} {doc.namespace}/{doc.name}): the same "
                                f"{doc.kind} as {first.where}; each may appear once")
                continue
            seen[ident] = doc
            docs.append(doc)
    if not problems:
        total = sum(len(d.stored()) for d in docs)
        if len(docs) > MAX_DOCUMENTS:
            problems.append(f"{len(docs)} documents; one apply writes at most {MAX_DOCUMENTS} "
                            "(one etcd transaction): split them over several applies")
        elif total > MAX_APPLY_BYTES:
            problems.append(f"the documents are {_size(total)} together as stored; one apply "
                            f"writes at most {_size(MAX_APPLY_BYTES)} (one etcd transaction): "
                            "split them over several applies")
    if problems:
        raise ConfigError("plexus apply", problems)
    return docs


def _created(stored: bytes) -> str | None:
    """The creationTimestamp of a stored manifest, if it has one."""
    try:
        meta = json.loads(stored).get("metadata", {})
    except (ValueError, AttributeError):
        return None
    value = meta.get("creationTimestamp") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


async def apply(kv: KvStore, cluster: str, docs: list[Document],
                now: datetime | None = None) -> list[str]:
    """Store every document in one transaction: all of them, or (on error) none.

    Each keeps the `metadata.creationTimestamp` of the version it replaces, or is stamped
    with the time now when it is new, as Kubernetes' API server does: features that let
    the older of two manifests win (egress gateway policies) then agree on every agent.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    items = []
    for d in docs:
        old = await kv.get(d.key(cluster))
        created = (_created(old.value) if old is not None else None) or stamp
        body = {**d.body, "metadata": {**d.body.get("metadata", {}), "creationTimestamp": created}}
        items.append((d.key(cluster), json.dumps(body)))
    await kv.put_many(items)
    return [f"{d.kind.lower()}/{d.namespace}/{d.name} applied" for d in docs]


async def delete(kv: KvStore, cluster: str, docs: list[Document]) -> list[str]:
    out = []
    for d in docs:
        gone = await kv.delete(d.key(cluster))
        out.append(f"{d.kind.lower()}/{d.namespace}/{d.name} {'deleted' if gone else 'not found'}")
    return out
