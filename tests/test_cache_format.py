"""docs/cache-format.md and the writer agree, both ways."""
from __future__ import annotations

import re
from pathlib import Path

import h5py

DOC = Path(__file__).resolve().parents[1] / "docs" / "cache-format.md"
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
