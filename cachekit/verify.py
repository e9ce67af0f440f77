"""`cachekit verify`: is a cache complete, consistent and intact?

Every check names the fields it finds wrong (keys as in docs/cache-format.md: `/splits/val/labels`,
`/@views`, `/fewshot/K2_seed1@k`), and nothing raises: a field that is missing, of the wrong kind, dtype,
shape or type, unparsable JSON, a value outside its rule, an attribute changed after writing, a dataset
whose data does not match its sha256, NaN/Inf, or maps that no longer pool to the stored features.
Open the cache with `Cache(path, check=False)` so a damaged one can be reported on.
"""
from __future__ import annotations

import h5py
import numpy as np
import torch

from . import schema as S
from .attnpool import attnpool_single_query
from .cache import Cache
from .schema import ATTRIBUTE, Attr, AttnpoolAttr

# attnpool(stored dense) vs stored pooled, relative to the row's max |pooled|. Float16 storage rounds
# the map (about 5e-5 relative on O(1) maps); CUDA autocast adds float16 arithmetic on top.
TOLERANCE = {"float32": 1e-4, "float16": 5e-3}
CHECKS = ("structure", "attributes", "shapes", "checksums", "finite", "attnpool")


class Report:
    def __init__(self):
        self.checks: list[dict] = []

    def add(self, name: str, ok: bool, detail: str = "", skipped=(), problems=()):
        """`detail`: one line (long lists cut short); `problems`: every problem found, one string each,
        starting with the field's key; `skipped`: what the check left out (keys, or True for all of it)."""
        c = {"check": name, "ok": bool(ok), "detail": detail}
        if problems:
            c["problems"] = [str(p) for p in problems]
        if skipped:
            c["skipped"] = skipped if skipped is True else list(skipped)
        self.checks.append(c)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.checks if not c["ok"]]

    @property
    def skipped(self) -> list[dict]:
        return [c for c in self.checks if c.get("skipped")]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": self.checks}


def _join(items, limit=12) -> str:
    items = list(items)
    return "; ".join(map(str, items[:limit])) + (f"; ... ({len(items) - limit} more)" if len(items) > limit else "")


def verify(cache: Cache, sample: int = 32, full: bool = True) -> Report:
    """Run every check. `full` hashes and scans every dataset; without it (`--quick`) the large ones
    (dense maps and pooled features) are neither hashed nor scanned for NaN/Inf, and the report says so."""
    r = Report()
    try:
        v = S.View(cache.file)
        problems, dims = S.check(v)
    except Exception as exc:  # a file so broken the schema walk fails: say so, never a traceback
        why = f"cannot walk the file: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        r.add("structure", False, why, problems=[f"/: {why}"])
        return r
    bad_keys = {p.key for p in problems}
    objects = [p for p in problems if p.kind != ATTRIBUTE and p.what in ("missing", "kind", "unexpected")]
    attrs = [p for p in problems if p.kind == ATTRIBUTE]
    shapes = [p for p in problems if p.kind != ATTRIBUTE and p.what in ("dtype", "shape")]
    r.add("structure", not objects, _join(objects) if objects else "every group and dataset present, nothing extra",
          problems=objects)
    r.add("attributes", not attrs, _join(attrs) if attrs else
          f"every attribute present, of its type, and as written (/@{S.ATTRS_CHECKSUM})", problems=attrs)

    datasets = [it for it in S.instances(v, dims) if it.field.kind == S.DATASET and not _affected(it.key, bad_keys)]
    _guard(r, ("shapes",), lambda: [_shapes(v, dims, shapes, bad_keys)])
    _guard(r, ("checksums", "finite"), lambda: _scan(v, datasets, bad_keys, full))
    _guard(r, ("attnpool",), lambda: [_attnpool(cache, dims, bad_keys, sample)])
    return r


def _affected(key: str, bad_keys) -> bool:
    """`key` is itself reported, or lies in a group or dataset that is (missing, wrong kind)."""
    return key in bad_keys or any(key.startswith(b + "/") or key.startswith(b + "@") for b in bad_keys if "@" not in b)


def _guard(r: Report, names: tuple, fn) -> None:
    """Run checks; an unforeseen error becomes failed checks saying so, not a traceback."""
    try:
        results = fn()
    except Exception as exc:
        why = f"could not run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        for name in names:
            r.add(name, False, why, problems=[f"{name}: {why}"])
        return
    for name, (ok, detail, skipped, problems) in zip(names, results):
        r.add(name, ok, detail, skipped, problems)


def _shapes(v: S.View, dims: S.Dims, problems, bad_keys) -> tuple:
    out = [str(p) for p in problems]
    C = dims.get("C")
    for s in S.SPLITS:
        key = S.split_path(s, S.LABELS)
        if _affected(key, bad_keys) or C is None or v.get(key) is None:
            continue
        lab = v.get(key)[()]
        if len(lab) and (lab.min() < 0 or lab.max() >= C):
            out.append(f"{key}: labels outside 0..{C - 1}")
    tl_key = S.split_path("train", S.LABELS)
    fs = v.get(S.FEWSHOT)
    if C is not None and not _affected(tl_key, bad_keys) and v.get(tl_key) is not None \
            and not _affected(S.FEWSHOT, bad_keys) and isinstance(fs, h5py.Group):
        tl = v.get(tl_key)[()]
        for name in fs:
            path = f"{S.FEWSHOT}/{name}"
            ks = S.parse_fewshot_key(name)
            if _affected(path, bad_keys) or ks is None:
                continue
            rows = v.get(path)[()]
            if len(rows) and (rows.min() < 0 or rows.max() >= len(tl)):
                out.append(f"{path}: rows outside the train split 0..{len(tl) - 1}")
            elif not np.array_equal(tl[rows], np.repeat(np.arange(C), ks[0])):
                out.append(f"{path}: not K={ks[0]} rows per class, class-grouped")
    return not out, _join(out) if out else "dtypes, row counts and shapes agree; labels and few-shot rows valid", (), out


def _scan(v: S.View, datasets, bad_keys, full: bool) -> list[tuple]:
    """One read of each dataset: its sha256 against the stored one, and NaN/Inf in float data."""
    bad_sum, nonfinite, skipped, done = [], [], [], 0
    seen: dict = {}
    for it in datasets:
        if it.field.large and not full:
            skipped.append(it.key)
            continue
        ds = v.get(it.path)
        if ds.id not in seen:  # a hard-linked dataset (test = val) is read once
            c, finite = S.Checksum(ds.dtype, ds.shape), True
            for b in S.iter_blocks(ds):
                c.update(b)
                if finite and ds.dtype.kind == "f" and not np.isfinite(b).all():
                    finite = False
            seen[ds.id] = (c.hexdigest(), finite)
        got, finite = seen[ds.id]
        if not finite:
            nonfinite.append(it.key)
        key_attr = S.attr_key(it.path, S.CHECKSUM)
        if key_attr in bad_keys:
            continue  # its checksum attribute is missing or malformed: reported under attributes
        done += 1
        if v.attrs(it.path).get(S.CHECKSUM) != got:
            bad_sum.append(f"{it.key}: data does not match {key_attr}")
    tail = f"; skipped (--quick): {', '.join(skipped)}" if skipped else ""
    return [(not bad_sum, (_join(bad_sum) if bad_sum else f"all {done} stored sha256 match") + tail, skipped, bad_sum),
            (not nonfinite, ("NaN/Inf in: " + ", ".join(nonfinite) if nonfinite else "no NaN/Inf") + tail, skipped,
             [f"{k}: NaN or Inf" for k in nonfinite])]


def _attnpool(cache: Cache, dims: S.Dims, bad_keys, sample: int) -> tuple:
    """The stored attnpool weights applied to stored dense maps must give the stored pooled features."""
    needs = ([S.attr_key(S.ROOT, a) for a in (Attr.VIEWS, Attr.DENSE_DTYPE, Attr.DENSE_SHAPE, Attr.EMBED_DIM)]
             + [S.attr_key(S.ATTNPOOL, AttnpoolAttr.NUM_HEADS), S.ATTNPOOL]
             + [S.attnpool_path(p) for p in S.ATTNPOOL_PARAMS]
             + [S.split_path(s, d) for s in S.SPLITS for d in (S.DENSE, S.POOLED)]
             + [S.split_path(s) for s in S.SPLITS])
    broken = [k for k in needs if _affected(k, bad_keys)]
    if broken:
        return True, f"skipped: needs {', '.join(broken[:4])}{' ...' if len(broken) > 4 else ''} (see above)", True, ()
    V = dims.V
    params = {p: torch.from_numpy(np.asarray(cache.file[S.attnpool_path(p)][()])).float() for p in S.ATTNPOOL_PARAMS}
    heads = int(cache.file[S.ATTNPOOL].attrs[AttnpoolAttr.NUM_HEADS])
    dd = dims.dense_dtype
    tol = TOLERANCE.get(dd, 5e-3)
    worst, where = 0.0, ""
    for s in S.SPLITS:
        n = int(cache.file[S.split_path(s, S.POOLED)].shape[-2])
        if n == 0:
            continue
        rows = np.unique(np.linspace(0, n - 1, min(sample, n)).round().astype(np.int64))
        for view in ((0, V) if (s == "train" and V > 0) else (0,)):
            dense = cache.dense(s, rows, view=view)
            with torch.no_grad():
                got = attnpool_single_query(dense, params, heads)
            ds = cache.file[S.split_path(s, S.POOLED)]
            want = torch.from_numpy(np.asarray(ds[view] if s == "train" else ds[()], dtype=np.float32))
            want = want[torch.from_numpy(rows)]
            rel = ((got - want).abs().amax(dim=-1) / want.abs().amax(dim=-1).clamp_min(1e-12)).max().item()
            if not np.isfinite(rel):
                rel = float("inf")
            if rel > worst:
                worst, where = rel, f"{S.split_path(s, S.DENSE)} view {view}"
    ok = worst <= tol
    detail = f"max relative error {worst:.2e} (tolerance {tol:.0e} for {dd} maps)" + (f" at {where}" if not ok else "")
    return ok, detail, (), ([] if ok else [f"{where}: attnpool(dense) differs from pooled, {detail}"])


__all__ = ["verify", "Report", "TOLERANCE", "CHECKS"]
