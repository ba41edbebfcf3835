"""`plexus apply -f` input at the edges: every problem named by file, document and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from plexus.apply import MAX_APPLY_BYTES, MAX_DOCUMENTS, MAX_FILE_BYTES, MAX_VALUES, load_documents
from plexus.core.config import ConfigError


def service(name: str = "web", cluster_ip: str = "10.96.1.10", annotation: str = "") -> str:
    note = f"\n  annotations: {{note: '{annotation}'}}" if annotation else ""
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: shop{note}
spec:
  clusterIP: {cluster_ip}
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"""


def problems(tmp_path: Path, content: str | bytes, name: str = "m.yaml") -> str:
    f = tmp_path / name
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_documents([f])
    text = str(info.value)
    assert "Traceback" not in text
    return text


def test_a_good_file_loads(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(service("a") + "---\n" + service("b", "10.96.1.11"))
    assert [d.name for d in load_documents([f])] == ["a", "b"]


def test_a_binary_file_is_named_not_a_traceback(tmp_path: Path) -> None:
    text = problems(tmp_path, b"\x7fELF\x02\x01\x01\x00\xc0\xff" * 300, "app.bin")
    assert f"{tmp_path / 'app.bin'}: not a YAML text file: byte 0xc0 at offset 8 is not UTF-8" in text


def test_control_characters_are_not_yaml(tmp_path: Path) -> None:
    text = problems(tmp_path, "kind: Service\x01\n")
    assert "m.yaml: not a YAML text file: character U+0001 at offset 13 is not allowed" in text


@pytest.mark.parametrize("content", ["", "\n\n", "# nothing yet\n", "---\n---\n"])
def test_a_file_without_documents_is_an_error(tmp_path: Path, content: str) -> None:
    assert "m.yaml: no document: the file is empty (or only comments)" in problems(tmp_path, content)


def test_an_invalid_ip_is_said_in_words(tmp_path: Path) -> None:
    text = problems(tmp_path, service(cluster_ip="10.96.1.999"))
    assert text.endswith("m.yaml: document 1 (Service shop/web): spec.clusterIP: "
                         "Input is not a valid IPv4 address or IPv6 address (got '10.96.1.999')")
    assert "lax-or-strict" not in text and "function-" not in text and len(text.splitlines()) == 1


def test_an_invalid_ip_in_a_list_names_the_index(tmp_path: Path) -> None:
    doc = service().replace("  selector:", "  externalIPs: [192.0.2.1, nope]\n  selector:")
    text = problems(tmp_path, doc)
    assert ("document 1 (Service shop/web): spec.externalIPs[1]: Input is not a valid "
            "IPv4 address or IPv6 address (got 'nope')") in text


@pytest.mark.parametrize(("content", "message"), [
    ("- a\n- b\n", "document 1: expected a mapping with kind, metadata and spec, got a list"),
    ("just words\n", "document 1: expected a mapping with kind, metadata and spec, got a string"),
    ("metadata: {name: x}\n", "document 1: kind: required field is missing; expected one of "),
    ("kind: [Service]\n", "document 1: kind: expected a string, got a list"),
    ("kind: {a: 1}\n", "document 1: kind: expected a string, got a mapping"),
    ("kind: Mystery\n", "document 1: kind 'Mystery' is not one of "),
    ("kind: Service\nmetadata: [x]\n", "document 1 (Service default/?): metadata: "),
    ("kind: Service\n  bad: indent\n", "document 1: line 2, column 6: invalid YAML: "),
])
def test_each_document_problem_names_the_document(tmp_path: Path, content: str, message: str) -> None:
    assert f"m.yaml: {message}" in problems(tmp_path, content)


def test_every_bad_document_is_reported_and_none_is_kept(tmp_path: Path) -> None:
    text = problems(tmp_path, service("a") + "---\n- x\n---\n" + service("c", "10.0.0.999") + "---\n"
                    + service("d"))
    assert "document 2: expected a mapping" in text
    assert "document 3 (Service shop/c): spec.clusterIP: " in text
    assert "document 1" not in text and "document 4" not in text


def test_the_same_name_in_two_files_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text(service("web"))
    (tmp_path / "b.yaml").write_text(service("other") + "---\n" + service("web", "10.96.1.11"))
    with pytest.raises(ConfigError) as info:
        load_documents([f, tmp_path / "b.yaml"])
    assert (f"{tmp_path / 'b.yaml'}: document 2 (Service shop/web): the same Service as "
            f"{f}: document 1; each may appear once") in str(info.value)


def test_the_same_name_twice_in_one_file(tmp_path: Path) -> None:
    text = problems(tmp_path, service("web") + "---\n" + service("web", "10.96.1.11"))
    assert "m.yaml: document 2 (Service shop/web): the same Service as " in text
    assert "m.yaml: document 1; each may appear once" in text


def test_yaml_aliases_cannot_expand_without_bound(tmp_path: Path) -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
               f"*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    bomb = "kind: Service\nmetadata: {name: web}\nspec:\n" + "".join(f"  {line}\n" for line in levels)
    text = problems(tmp_path, bomb)
    assert f"document 1: too large to validate: more than {MAX_VALUES} values" in text


def test_a_self_referencing_document_is_refused(tmp_path: Path) -> None:
    text = problems(tmp_path, "kind: Service\nmetadata: &m {name: web, self: *m}\n")
    assert "document 1: too large to validate: nested deeper than 64 levels" in text


def test_deep_nesting_is_refused_without_a_crash(tmp_path: Path) -> None:
    text = problems(tmp_path, "kind: Service\nspec: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "m.yaml: document 1: " in text


def test_a_too_large_document_says_so_with_the_limit(tmp_path: Path) -> None:
    text = problems(tmp_path, service("a") + "---\n" + service("big", annotation="x" * 2 * 1024 * 1024))
    assert ("m.yaml: document 2 (Service shop/big): the manifest is too large: 2.0 MiB as stored, "
            "and etcd takes at most 1.0 MiB in one apply") in text


def test_a_too_large_file_is_not_read(tmp_path: Path) -> None:
    text = problems(tmp_path, service(annotation="x" * (MAX_FILE_BYTES + 1)))
    assert "m.yaml: larger than 4.0 MiB, the most `plexus apply` reads from one file" in text


def test_one_apply_fits_one_etcd_transaction(tmp_path: Path) -> None:
    many = "---\n".join(service(f"s{i}", f"10.96.2.{i % 250}") for i in range(MAX_DOCUMENTS + 1))
    assert f"{MAX_DOCUMENTS + 1} documents; one apply writes at most {MAX_DOCUMENTS}" in problems(
        tmp_path, many)
    half = "x" * (MAX_APPLY_BYTES // 2)
    text = problems(tmp_path, service("a", annotation=half) + "---\n" + service("b", annotation=half))
    assert "the documents are 1.0 MiB together as stored; one apply writes at most 1.0 MiB" in text


def test_an_unreadable_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_documents([tmp_path])
    assert f"{tmp_path}: cannot read: Is a directory" in str(info.value)


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    text = problems(tmp_path, service() + "---\n" + service("b").replace(
        "  selector:", "  clusterIP: 10.96.1.12\n  selector:"))
    assert ("m.yaml: document 2: line 18, column 3: invalid YAML: key 'clusterIP' is given "
            "twice in one mapping") in text


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(service().replace("  selector: {app: web}",
                                   "  selector:\n    <<: {app: api, tier: a}\n    app: web"))
    (doc,) = load_documents([f])
    assert doc.body["spec"]["selector"] == {"app": "web", "tier": "a"}
