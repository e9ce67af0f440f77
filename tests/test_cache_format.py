"""docs/cache-format.md, cachekit.schema and the writer agree, both ways; the code names fields through
the schema."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import h5py

from cachekit import schema as S

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cache-format.md"
PLACEHOLDERS = {"{split}": r"(train|val|test)", "{K}": r"\d+", "{seed}": r"\d+", "{param}": r"[a-z_]+(\.[a-z]+)?"}


def documented() -> dict[str, str]:
    """path pattern -> kind, from the layout table."""
    out = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `([^`]+)` \| (group|dataset|attribute) \|", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _regex(path: str) -> re.Pattern:
    rx = re.escape(path)
    for k, v in PLACEHOLDERS.items():
        rx = rx.replace(re.escape(k), v)
    return re.compile(rx + "$")


def written(path) -> dict[str, str]:
    out = {}
    with h5py.File(path, "r") as f:
        for k in f.attrs:
            out[f"/@{k}"] = "attribute"

        def visit(name, obj):
            out["/" + name] = "group" if isinstance(obj, h5py.Group) else "dataset"
            for k in obj.attrs:
                out[f"/{name}@{k}"] = "attribute"

        f.visititems(visit)
    return out


def test_every_written_object_is_documented(tiny_cache):
    doc = {(_regex(p), kind) for p, kind in documented().items()}
    for path, kind in written(tiny_cache).items():
        assert any(rx.match(path) and k == kind for rx, k in doc), f"{path} ({kind}) is not in docs/cache-format.md"


def test_every_documented_object_is_written(tiny_cache):
    have = written(tiny_cache)
    assert len(documented()) > 40
    for pattern, kind in documented().items():
        rx = _regex(pattern)
        assert any(rx.match(p) and k == kind for p, k in have.items()), f"documented {pattern} ({kind}) is not written"


def test_docs_table_is_the_schema():
    """The layout table is generated from cachekit.schema: one row per field, in order, nothing else."""
    text = DOC.read_text()
    assert S.docs_section(text) == S.markdown_table(), \
        "docs/cache-format.md is stale; fix: python -m cachekit.schema --docs docs/cache-format.md"
    assert list(documented()) == [f.key for f in S.FIELDS]
    assert f"(schema version {S.SCHEMA_VERSION})" in text.splitlines()[0]


def test_schema_fields_are_complete():
    """Every field says what it is; every dataset has a dtype, a shape rule and a checksum attribute."""
    keys = [f.key for f in S.FIELDS]
    assert len(keys) == len(set(keys))
    for f in S.FIELDS:
        assert f.doc and f.kind in (S.GROUP, S.DATASET, S.ATTRIBUTE), f.key
        if f.kind == S.DATASET:
            assert f.dtype in ("float32", "int64", "str", "dense") and f.shape and f.rule, f.key
            assert S.attr_key(f.path, S.CHECKSUM) in keys, f.key
        if f.kind == S.ATTRIBUTE:
            assert f.dtype in ("str", "int", "bool") and (f.json is None or f.dtype == "str"), f.key


def test_written_cache_matches_schema_exactly(tiny_cache):
    """check() finds nothing (no extras either), and every instance the schema expects exists."""
    with h5py.File(tiny_cache, "r") as f:
        problems, dims = S.check(f)
        assert problems == []
        assert (dims.C, dims.V, dims.get("shots"), dims.get("seeds")) == (3, 2, [1, 2], [1, 2])
        keys = {it.key for it in S.instances(f, dims)}
    assert "/fewshot/K2_seed1@with_replacement" in keys and "/model/attnpool/c_proj.bias@sha256" in keys
    have = written(tiny_cache)
    assert set(have) <= keys  # (written() sees /splits/test once; instances lists every split)
    # 28 root attributes; classnames 2; /splits 1 + 3 splits x 11; source_index 2; /fewshot 1 + 4 sets x 5;
    # /text 1 + 2 + 3 x 2; /model 1; logit_scale 2; /model/attnpool 1 + 1 + 9 x 2; /bad_images 1 + 3 x 2
    assert len(keys) == len(have) == 28 + 2 + 1 + 33 + 2 + 1 + 20 + 9 + 1 + 2 + 20 + 7


def test_checksum_is_canonical_for_strings_and_covers_dtype_and_shape():
    a = S.array_checksum(["ab", "c"], h5py.string_dtype())
    assert a == S.array_checksum([b"ab", b"c"], h5py.string_dtype())  # however the strings come back
    assert a != S.array_checksum(["a", "bc"], h5py.string_dtype())  # lengths are part of it
    import numpy as np

    x = np.arange(6, dtype=np.int64)
    assert S.array_checksum(x) != S.array_checksum(x.astype(np.int32))
    assert S.array_checksum(x) != S.array_checksum(x.reshape(2, 3))
    assert S.array_checksum(x) == S.array_checksum(x.astype(">i8"))  # byte order of storage does not matter


def _schema_names() -> set[str]:
    """Attribute names, object paths and their parts; not the split names (values of `{split}` that code
    branches on) nor verify's report labels (`attnpool` is a check's name)."""
    from cachekit.verify import CHECKS

    names = {f.name for f in S.FIELDS if f.name}
    for f in S.FIELDS:
        if f.kind == S.ATTRIBUTE:
            continue
        parts = [p for p in f.path.split("/") if p and "{" not in p]
        names |= set(parts)
        for i in range(len(parts)):
            names.add("/".join(parts[i:]))
        if "{" not in f.path:
            names |= {f.path, f.path.lstrip("/")}
    return names - set(S.SPLITS) - set(CHECKS)


# Files that must name cache fields only through cachekit.schema. The parts folder's own segment files
# (and plan.json) are not the cache: extraction.py names their fields once, in these module constants.
CODE = ("cachekit/cache.py", "cachekit/verify.py", "cachekit/info.py", "cachekit/extraction.py")
PARTS_CONSTANTS = {"_SEG_DENSE", "_SEG_POOLED", "_SEG_BAD", "_TEXT_EMB", "_TEXT_TRUNCATED", "_PLAN_IDENTITY"}


def test_code_names_fields_through_the_schema():
    names = _schema_names()
    assert {"labels", "views", "identity", "text/classifier", "sha256", "k", "num_heads"} <= names
    hits = []
    for rel in CODE:
        tree = ast.parse((ROOT / rel).read_text())
        skip: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body and \
                    isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
                skip.add(id(node.body[0].value))  # docstrings
            if isinstance(node, ast.Dict):
                skip |= {id(k) for k in node.keys if k is not None}  # keys of result records
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in PARTS_CONSTANTS
                                                    for t in node.targets):
                skip |= {id(n) for n in ast.walk(node.value)}
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Tuple) and all(
                    isinstance(e, ast.Name) and e.id in PARTS_CONSTANTS for e in t.elts) for t in node.targets):
                skip |= {id(n) for n in ast.walk(node.value)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                    and node.value.strip("/") in names:
                hits.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert hits == [], "field names written as literals (use cachekit.schema): " + "; ".join(hits)
