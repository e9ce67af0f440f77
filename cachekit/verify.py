"""`cachekit verify`: is a cache complete, consistent and intact?"""
from __future__ import annotations

import numpy as np
import torch

from .attnpool import attnpool_single_query
from .cache import SPLIT_NAMES, Cache
from .store import ArrayHasher

ATTNPOOL_PARAMS = ("positional_embedding", "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                   "v_proj.weight", "v_proj.bias", "c_proj.weight", "c_proj.bias")
REQUIRED = (["classnames", "fewshot", "bad_images", "text/templates", "text/embeddings", "text/classifier",
             "model/logit_scale"]
            + [f"model/attnpool/{p}" for p in ATTNPOOL_PARAMS]
            + [f"splits/{s}/{d}" for s in SPLIT_NAMES for d in ("paths", "labels", "dense", "pooled")])
# attnpool(stored dense) vs stored pooled, relative to the row's max |pooled|. Float16 storage rounds
# the map (about 5e-5 relative on O(1) maps); CUDA autocast adds float16 arithmetic on top.
TOLERANCE = {"float32": 1e-4, "float16": 5e-3}


class Report:
    def __init__(self):
        self.checks: list[dict] = []

    def add(self, name: str, ok: bool, detail: str = ""):
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.checks if not c["ok"]]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": self.checks}


def verify(cache: Cache, sample: int = 32, full: bool = True) -> Report:
    """Run every check; `full` streams every dataset for checksums and NaN/Inf (else samples)."""
    r = Report()
    f = cache.file
    missing = [p for p in REQUIRED if p not in f]
    r.add("structure", not missing, "missing: " + ", ".join(missing) if missing else "all groups present")
    if missing:
        return r

    C, D, V = cache.num_classes, cache.embed_dim, cache.views
    dshape = cache.dense_shape
    problems = []
    for s in SPLIT_NAMES:
        g = f[f"splits/{s}"]
        n = g["labels"].shape[0]
        lead = (V + 1, n) if s == "train" else (n,)
        if g["paths"].shape != (n,):
            problems.append(f"{s}/paths has {g['paths'].shape[0]} rows, labels {n}")
        if g["dense"].shape != lead + dshape:
            problems.append(f"{s}/dense shape {g['dense'].shape} != {lead + dshape}")
        if g["pooled"].shape != lead + (D,):
            problems.append(f"{s}/pooled shape {g['pooled'].shape} != {lead + (D,)}")
        lab = g["labels"][()]
        if n and (lab.min() < 0 or lab.max() >= C):
            problems.append(f"{s}/labels outside 0..{C - 1}")
    ntrain = f["splits/train/labels"].shape[0]
    tl = f["splits/train/labels"][()]
    for name, ds in f["fewshot"].items():
        rows = ds[()]
        k = int(ds.attrs["k"])
        if rows.shape != (C * k,) or (len(rows) and (rows.min() < 0 or rows.max() >= ntrain)):
            problems.append(f"fewshot/{name} has bad rows")
        elif not np.array_equal(tl[rows], np.repeat(np.arange(C), k)):
            problems.append(f"fewshot/{name} is not K per class, class-grouped")
    if f["text/classifier"].shape != (C, D):
        problems.append(f"text/classifier shape {f['text/classifier'].shape} != {(C, D)}")
    r.add("shapes", not problems, "; ".join(problems) or "row counts and shapes agree")

    # Checksums and finiteness, streamed per row block.
    bad_sum, nonfinite = [], []

    def visit(name, ds):
        if not hasattr(ds, "shape") or ds.dtype.kind not in "fiu":
            return
        want = ds.attrs.get("sha256")
        if ds.ndim == 0:
            blocks = [np.asarray(ds[()])]
        else:
            step = max(1, (8 << 20) // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
            blocks = (ds[i:i + step] for i in range(0, ds.shape[0], step))
        h = ArrayHasher()
        finite = True
        for b in blocks:
            if want is not None:
                h.update(b)
            if ds.dtype.kind == "f" and not np.isfinite(b).all():
                finite = False
        if want is not None and h.hexdigest() != want:
            bad_sum.append(name)
        if not finite:
            nonfinite.append(name)

    if full:
        f.visititems(visit)
        r.add("checksums", not bad_sum, "mismatch in: " + ", ".join(bad_sum) if bad_sum else "all stored sha256 match")
        r.add("finite", not nonfinite, "NaN/Inf in: " + ", ".join(nonfinite) if nonfinite else "no NaN/Inf")

    # The stored attnpool weights applied to stored dense maps must give the stored pooled features.
    params, heads = cache.attnpool_params()
    tol = TOLERANCE.get(cache.meta["dense_dtype"], 5e-3)
    worst, where = 0.0, ""
    for s in SPLIT_NAMES:
        n = cache.num_images(s)
        if n == 0:
            continue
        rows = np.unique(np.linspace(0, n - 1, min(sample, n)).round().astype(np.int64))
        for view in ((0, V) if (s == "train" and V > 0) else (0,)):
            dense = cache.dense(s, rows, view=view)
            with torch.no_grad():
                got = attnpool_single_query(dense, params, heads)
            want = cache.pooled(s, view=view)[torch.from_numpy(rows)]
            rel = ((got - want).abs().amax(dim=-1) / want.abs().amax(dim=-1).clamp_min(1e-12)).max().item()
            if not np.isfinite(rel):
                rel = float("inf")
            if rel > worst:
                worst, where = rel, f"{s} view {view}"
    r.add("attnpool", worst <= tol,
          f"max relative error {worst:.2e} (tolerance {tol:.0e} for {cache.meta['dense_dtype']} maps)"
          + (f" at {where}" if worst > tol else ""))
    return r
