"""Reading a cachekit cache: `open_cache(path)` and its typed accessors.

The layout is documented in docs/cache-format.md; `tests/test_cache_format.py` checks that the
document and the writer agree.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import torch

from .errors import CachekitError

FORMAT = "cachekit"
SCHEMA_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")


REQUIRED_PATHS = (["classnames", "fewshot", "bad_images", "text/templates", "text/embeddings",
                   "text/classifier", "model/logit_scale", "model/attnpool"]
                  + [f"splits/{s}/{d}" for s in SPLIT_NAMES for d in ("paths", "labels", "dense", "pooled")])
REQUIRED_ATTRS = ("identity", "views", "shots", "seeds", "embed_dim", "dense_shape", "dense_dtype", "created",
                  "weights", "random_weights", "val_is_test", "model", "checkpoint")


def _open_h5(path: Path, check: bool = True) -> h5py.File:
    """Open read-only with a clear one-line error for every way a path can fail to be a cache."""
    if not path.exists():
        raise CachekitError(f"cache {path} does not exist; fix: build it with `cachekit extract`")
    if path.is_dir():
        raise CachekitError(f"cache {path} is a directory; fix: give the .h5 file")
    if not h5py.is_hdf5(str(path)):
        raise CachekitError(f"{path} is not an HDF5 file (truncated or another format); "
                            "fix: rebuild it with `cachekit extract` or give the right path")
    try:
        f = h5py.File(path, "r", rdcc_nbytes=64 << 20)
    except OSError as exc:
        raise CachekitError(f"cannot open {path} as HDF5 ({str(exc).splitlines()[0]}); "
                            "fix: the file is damaged, rebuild it with `cachekit extract`") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise CachekitError(f"{path} is an HDF5 file but not a cachekit cache; "
                            "fix: give a cache made by `cachekit extract`")
    v = int(f.attrs.get("schema_version", -1))
    if v != SCHEMA_VERSION:
        f.close()
        raise CachekitError(f"{path} has cache schema version {v}, this cachekit reads {SCHEMA_VERSION}; "
                            "fix: rebuild the cache with this cachekit version")
    if check:
        missing = [p for p in REQUIRED_PATHS if p not in f] + [f"@{a}" for a in REQUIRED_ATTRS if a not in f.attrs]
        if missing:
            f.close()
            raise CachekitError(f"cache {path} is damaged: missing {', '.join(missing[:3])}"
                                f"{' ...' if len(missing) > 3 else ''}; fix: rebuild it with "
                                "`cachekit extract --overwrite` (`cachekit verify` lists every problem)")
    return f


def read_identity(path) -> dict:
    with _open_h5(Path(path)) as f:
        return json.loads(f.attrs["identity"])


def _strings(ds) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in ds[()]]


class Cache:
    """A read-only view of one cache file. Small arrays are read on demand; dense maps lazily."""

    def __init__(self, path, check: bool = True):
        self.path = Path(path)
        self.file = _open_h5(self.path, check)

    # context manager / lifetime
    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # metadata
    @cached_property
    def meta(self) -> dict:
        out = {}
        for k, v in self.file.attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, np.generic):
                v = v.item()
            if k in ("preprocess", "augment", "shots", "seeds", "dataset", "identity", "dense_shape"):
                v = json.loads(v)
            out[k] = v
        return out

    @property
    def random_weights(self) -> bool:
        return bool(self.meta["random_weights"])

    @property
    def weights_label(self) -> str:
        return self.meta["weights"]

    @property
    def val_is_test(self) -> bool:
        return bool(self.meta["val_is_test"])

    @cached_property
    def classnames(self) -> list[str]:
        return _strings(self.file["classnames"])

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def views(self) -> int:
        """Number of augmented train views (view 0, the plain view, comes on top)."""
        return int(self.meta["views"])

    @property
    def shots(self) -> list[int]:
        return list(self.meta["shots"])

    @property
    def seeds(self) -> list[int]:
        return list(self.meta["seeds"])

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def dense_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["dense_shape"])

    # splits
    def _split(self, split: str) -> h5py.Group:
        if split not in SPLIT_NAMES:
            raise CachekitError(f"unknown split {split!r}; fix: one of {', '.join(SPLIT_NAMES)}")
        return self.file["splits"][split]

    def labels(self, split: str) -> torch.Tensor:
        return torch.from_numpy(self._split(split)["labels"][()]).long()

    def paths(self, split: str) -> list[str]:
        return _strings(self._split(split)["paths"])

    def num_images(self, split: str) -> int:
        return int(self._split(split)["labels"].shape[0])

    def pooled(self, split: str, view: int | None = None, rows=None) -> torch.Tensor:
        """Raw (un-normalised) pooled features. Train: (V+1, N, D), or (N, D) for one `view`."""
        ds = self._split(split)["pooled"]
        if split == "train":
            data = ds[()] if view is None else ds[view]
        else:
            if view not in (None, 0):
                raise CachekitError(f"split {split} has only view 0")
            data = ds[()]
        t = torch.from_numpy(np.asarray(data, dtype=np.float32))
        if rows is not None:
            t = t[..., torch.as_tensor(np.asarray(rows), dtype=torch.long), :]
        return t

    def features(self, split: str, view: int = 0, rows=None) -> torch.Tensor:
        """L2-normalised pooled features (N, D) of one view."""
        return torch.nn.functional.normalize(self.pooled(split, view=view, rows=rows), dim=-1)

    def dense(self, split: str, rows, view: int = 0) -> torch.Tensor:
        """Dense maps (len(rows), C, H, W) as float32, read row by row (h5py fancy indexing is slow)."""
        ds = self._split(split)["dense"]
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        out = np.empty((len(rows),) + ds.shape[-3:], dtype=ds.dtype)
        order = np.argsort(rows, kind="stable")
        for j in order:
            sel = np.s_[view, rows[j]] if split == "train" else np.s_[rows[j]]
            ds.read_direct(out, sel, np.s_[j])
        return torch.from_numpy(out).float()  # torch converts float16 several times faster than numpy

    def dense_source(self, split: str, rows=None, views=(0,)) -> "DenseSource":
        return DenseSource(self, split, rows, views)

    # few-shot sets
    def fewshot_names(self) -> list[tuple[int, int]]:
        out = []
        for name, ds in self.file["fewshot"].items():
            out.append((int(ds.attrs["k"]), int(ds.attrs["seed"])))
        return sorted(out)

    def fewshot(self, k: int, seed: int) -> np.ndarray:
        """Rows of the train split (class-grouped, K per class) of the few-shot set (K, seed)."""
        name = f"K{k}_seed{seed}"
        if name not in self.file["fewshot"]:
            have = ", ".join(f"K={a} seed={b}" for a, b in self.fewshot_names())
            raise CachekitError(f"the cache has no few-shot set K={k} seed={seed}; fix: use one of {have}, "
                                "or extract again with those --shots/--seeds")
        return self.file["fewshot"][name][()]

    def with_replacement(self, k: int, seed: int) -> list[int]:
        self.fewshot(k, seed)
        return json.loads(self.file["fewshot"][f"K{k}_seed{seed}"].attrs["with_replacement"])

    def train_labels(self, k: int, seed: int) -> torch.Tensor:
        return self.labels("train")[torch.from_numpy(self.fewshot(k, seed))]

    def train_keys(self, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tip/APE cache keys: mean of the raw augmented-view features per image, L2-normalised.
        With no augmented views in the cache the plain view is used."""
        rows = self.fewshot(k, seed)
        p = self.pooled("train")[:, torch.from_numpy(rows)]
        p = p[1:] if p.shape[0] > 1 else p
        return torch.nn.functional.normalize(p.mean(dim=0), dim=-1), self.train_labels(k, seed)

    def train_views(self, k: int, seed: int, include_plain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Every augmented view of the few-shot images, each L2-normalised: (V·N, D), labels (V·N,)."""
        rows = torch.from_numpy(self.fewshot(k, seed))
        p = self.pooled("train")[:, rows]
        if not include_plain and p.shape[0] > 1:
            p = p[1:]
        y = self.train_labels(k, seed).repeat(p.shape[0])
        return torch.nn.functional.normalize(p.reshape(-1, p.shape[-1]), dim=-1), y

    # text and model
    def text_classifier(self) -> torch.Tensor:
        return torch.from_numpy(self.file["text/classifier"][()]).float()

    def text_embeddings(self) -> torch.Tensor:
        return torch.from_numpy(self.file["text/embeddings"][()]).float()

    def templates(self) -> list[str]:
        return _strings(self.file["text/templates"])

    @property
    def logit_scale(self) -> float:
        return float(self.file["model/logit_scale"][()])

    def attnpool_params(self) -> tuple[dict[str, torch.Tensor], int]:
        g = self.file["model/attnpool"]
        return {k: torch.from_numpy(g[k][()]).float() for k in g}, int(g.attrs["num_heads"])

    def bad_images(self) -> list[dict]:
        g = self.file["bad_images"]
        return [{"split": s, "path": p, "reason": r}
                for s, p, r in zip(_strings(g["split"]), _strings(g["path"]), _strings(g["reason"]))]


class DenseSource:
    """Dense maps of chosen rows and views of one split, addressed 0..len-1 (views outer).

    Implements the `get(indices)` protocol SAFE trains on, streaming from HDF5 so memory stays
    bounded by one batch; `load()` gives an in-memory tensor when it fits.
    """

    def __init__(self, cache: Cache, split: str, rows=None, views=(0,)):
        self.cache, self.split = cache, split
        n = cache.num_images(split)
        self.rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        self.views = tuple(views)
        self._addr = [(v, r) for v in self.views for r in self.rows]

    def __len__(self):
        return len(self._addr)

    def get(self, indices) -> torch.Tensor:
        ds = self.cache._split(self.split)["dense"]
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        out = np.empty((len(indices),) + ds.shape[-3:], dtype=ds.dtype)
        for j in np.argsort(indices, kind="stable"):
            v, r = self._addr[indices[j]]
            ds.read_direct(out, np.s_[v, r] if self.split == "train" else np.s_[r], np.s_[j])
        return torch.from_numpy(out).float()  # torch converts float16 several times faster than numpy

    @property
    def nbytes(self) -> int:
        shape = self.cache.dense_shape
        return len(self) * int(np.prod(shape)) * 4

    def load(self) -> torch.Tensor:
        return self.get(np.arange(len(self)))


def open_cache(path) -> Cache:
    """Open a cache read-only. Use as a context manager or call `.close()`."""
    return Cache(path)
