"""Reading a cachekit cache: `open_cache(path)` and its typed accessors.

The layout is `cachekit.schema` (documented in docs/cache-format.md). Opening a cache checks it against
the schema once, without reading any array: every group and dataset present with its dtype and shape,
every attribute present, of its type, valid JSON where it holds JSON, and equal to what the writer
recorded (`/@attrs_sha256`). Any problem is one CachekitError naming the field and the fix. Whole
datasets read through the accessors (labels, paths, few-shot rows, pooled features, text, attention-pooling
weights, ...) are checked against their stored sha256 on first read; the dense maps, read row by row, are
checked by `cachekit verify` only. `Cache(path, check=False)` skips all of this (for `verify`, which
reports every problem itself).
"""
from __future__ import annotations

import os
import stat
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import torch

from . import schema as S
from .errors import CachekitError
from .schema import Attr, AttnpoolAttr, FewshotAttr

FORMAT = S.FORMAT
SCHEMA_VERSION = S.SCHEMA_VERSION
SPLIT_NAMES = S.SPLITS

_REBUILD = "rebuild it with `cachekit extract --overwrite`"


def _damaged(path, what: str, more: int = 0) -> CachekitError:
    return CachekitError(f"cache {path} is damaged: {what}{f' (and {more} more problems)' if more else ''}; "
                         f"fix: {_REBUILD} (`cachekit verify {path}` lists every problem)")


def _open_h5(path: Path, check: bool = True) -> h5py.File:
    """Open read-only with a clear one-line error for every way a path can fail to be a cache.
    `check`: also compare the file with the schema (see the module doc); else open anything that looks
    like a cache, for `verify` to report on."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CachekitError(f"cache {path} does not exist; fix: build it with `cachekit extract`") from None
    except PermissionError:
        raise CachekitError(f"cannot read cache {path}: permission denied; fix: make it readable (e.g. chmod a+r, "
                            "and a+x on its folders) or give another path") from None
    except (OSError, ValueError) as exc:
        raise CachekitError(f"cannot read cache {path} ({getattr(exc, 'strerror', None) or exc}); "
                            "fix: give the path of a cache file") from None
    if stat.S_ISDIR(st.st_mode):
        raise CachekitError(f"cache {path} is a directory; fix: give the .h5 file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device: reading it could block forever
        raise CachekitError(f"cache {path} is not a regular file (a FIFO, socket or device); fix: give the .h5 file")
    if not os.access(path, os.R_OK):
        raise CachekitError(f"cannot read cache {path}: permission denied; fix: make it readable (e.g. chmod a+r) "
                            "or give another path")
    if not h5py.is_hdf5(str(path)):
        raise CachekitError(f"{path} is not an HDF5 file (truncated or another format); "
                            "fix: rebuild it with `cachekit extract` or give the right path")
    try:
        f = h5py.File(path, "r", rdcc_nbytes=64 << 20)
    except OSError as exc:
        raise CachekitError(f"cannot open {path} as HDF5 ({str(exc).splitlines()[0]}); "
                            "fix: the file is damaged, rebuild it with `cachekit extract`") from None
    try:
        _check_open(f, path, check)
    except BaseException:
        f.close()
        raise
    return f


def _check_open(f: h5py.File, path: Path, check: bool) -> None:
    fmt = f.attrs.get(Attr.FORMAT)
    if fmt != FORMAT and (check or S.SPLITS_GROUP not in f):
        raise CachekitError(f"{path} is an HDF5 file but not a cachekit cache; "
                            "fix: give a cache made by `cachekit extract`")
    if not check:
        return
    v = f.attrs.get(Attr.SCHEMA_VERSION)
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v != SCHEMA_VERSION:
        raise CachekitError(f"{path} has cache schema version {int(v)}, this cachekit reads {SCHEMA_VERSION}; "
                            f"fix: rebuild the cache with this cachekit version (`cachekit extract --overwrite`)")
    problems, _ = S.check(f, extras=False)
    if problems:
        raise _damaged(path, str(problems[0]), len(problems) - 1)


def read_identity(path) -> dict:
    with Cache(path) as c:
        return c.meta[Attr.IDENTITY]


class Cache:
    """A read-only view of one cache file. Small arrays are read on demand; dense maps lazily."""

    def __init__(self, path, check: bool = True):
        self.path = Path(path)
        self.check = check
        self.file = _open_h5(self.path, check)
        self._verified: set[str] = set()
        self._finite: set[str] = set()

    # context manager / lifetime
    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # raw access, checked
    def _obj(self, path: str):
        obj = self.file.get(path)
        if obj is None:
            raise _damaged(self.path, f"{path} is missing")
        return obj

    def _dataset(self, path: str, verify: bool = True) -> h5py.Dataset:
        """The dataset at `path`; on its first use with `verify` its data is checked against its stored
        sha256 (when the cache was opened with check=True)."""
        ds = self._obj(path)
        if not isinstance(ds, h5py.Dataset):
            raise _damaged(self.path, f"{path} is not a dataset")
        if verify and self.check and path not in self._verified:
            if ds.attrs.get(S.CHECKSUM) != S.dataset_checksum(ds):
                raise _damaged(self.path, f"{path} does not match {S.attr_key(path, S.CHECKSUM)} "
                                          "(its data changed after writing)")
            self._verified.add(path)
        return ds

    def _read(self, path: str) -> np.ndarray:
        """A whole dataset; with check, a float one must hold finite numbers only (NaN/Inf would turn every
        score that uses it into NaN, silently)."""
        data = self._dataset(path)[()]
        if self.check and path not in self._finite and np.issubdtype(np.asarray(data).dtype, np.floating):
            if not np.isfinite(data).all():
                raise _damaged(self.path, f"{path} holds NaN or Inf values")
            self._finite.add(path)
        return data

    def _rows_in_range(self, path: str, values: np.ndarray, n: int, what: str) -> np.ndarray:
        """Integers read from `path` that index something of size n (labels, rows): each in 0..n-1."""
        if self.check and values.size and (values.min() < 0 or values.max() >= n):
            bad = values[(values < 0) | (values >= n)]
            raise _damaged(self.path, f"{path} holds {what} {int(bad[0])}, outside 0..{n - 1}")
        return values

    def _attr(self, path: str, name: str):
        try:
            return S.read_attr(self._obj(path), name)
        except S.FieldError as exc:
            raise _damaged(self.path, str(exc)) from None

    # metadata
    @cached_property
    def meta(self) -> dict:
        """Root attributes, JSON ones decoded (with check=False a malformed one keeps its raw value)."""
        try:
            return S.read_attrs(self.file, lenient=not self.check)
        except S.FieldError as exc:
            raise _damaged(self.path, str(exc)) from None

    def _meta(self, name: str):
        m = self.meta
        if name not in m:
            raise _damaged(self.path, f"{S.attr_key(S.ROOT, name)} is missing")
        return m[name]

    @property
    def random_weights(self) -> bool:
        return bool(self._meta(Attr.RANDOM_WEIGHTS))

    @property
    def weights_label(self) -> str:
        return self._meta(Attr.WEIGHTS)

    @property
    def val_is_test(self) -> bool:
        return bool(self._meta(Attr.VAL_IS_TEST))

    @cached_property
    def classnames(self) -> list[str]:
        return S.strings(self._read(S.CLASSNAMES))

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def views(self) -> int:
        """Number of augmented train views (view 0, the plain view, comes on top)."""
        return int(self._meta(Attr.VIEWS))

    @property
    def shots(self) -> list[int]:
        return list(self._meta(Attr.SHOTS))

    @property
    def seeds(self) -> list[int]:
        return list(self._meta(Attr.SEEDS))

    @property
    def embed_dim(self) -> int:
        return int(self._meta(Attr.EMBED_DIM))

    @property
    def dense_shape(self) -> tuple[int, ...]:
        return tuple(self._meta(Attr.DENSE_SHAPE))

    # splits
    def _split(self, split: str) -> h5py.Group:
        if split not in SPLIT_NAMES:
            raise CachekitError(f"unknown split {split!r}; fix: one of {', '.join(SPLIT_NAMES)}")
        return self._obj(S.split_path(split))

    def _split_ds(self, split: str, name: str, verify: bool = True) -> h5py.Dataset:
        self._split(split)
        return self._dataset(S.split_path(split, name), verify)

    def labels(self, split: str) -> torch.Tensor:
        path = S.split_path(split, S.LABELS)
        values = np.asarray(self._split_ds(split, S.LABELS)[()])
        return torch.from_numpy(self._rows_in_range(path, values, self.num_classes, "label")).long()

    def paths(self, split: str) -> list[str]:
        return S.strings(self._split_ds(split, S.PATHS)[()])

    def num_images(self, split: str) -> int:
        return int(self._split_ds(split, S.LABELS, verify=False).shape[0])

    def pooled(self, split: str, view: int | None = None, rows=None) -> torch.Tensor:
        """Raw (un-normalised) pooled features. Train: (V+1, N, D), or (N, D) for one `view`."""
        ds = self._split_ds(split, S.POOLED)
        if split == "train":
            data = ds[()] if view is None else ds[view]
        else:
            if view not in (None, 0):
                raise CachekitError(f"split {split} has only view 0")
            data = ds[()]
        data = np.asarray(data, dtype=np.float32)
        if self.check and not np.isfinite(data).all():
            raise _damaged(self.path, f"{S.split_path(split, S.POOLED)} holds NaN or Inf values")
        t = torch.from_numpy(data)
        if rows is not None:
            t = t[..., torch.as_tensor(np.asarray(rows), dtype=torch.long), :]
        return t

    def features(self, split: str, view: int = 0, rows=None) -> torch.Tensor:
        """L2-normalised pooled features (N, D) of one view."""
        return torch.nn.functional.normalize(self.pooled(split, view=view, rows=rows), dim=-1)

    def _dense_ds(self, split: str) -> h5py.Dataset:
        # Read row by row: too large to hash on every open; `cachekit verify` checks its sha256.
        return self._split_ds(split, S.DENSE, verify=False)

    def dense(self, split: str, rows, view: int = 0) -> torch.Tensor:
        """Dense maps (len(rows), C, H, W) as float32, read row by row (h5py fancy indexing is slow)."""
        ds = self._dense_ds(split)
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
        for name in self._obj(S.FEWSHOT).keys():
            path = f"{S.FEWSHOT}/{name}"
            out.append((int(self._attr(path, FewshotAttr.K)), int(self._attr(path, FewshotAttr.SEED))))
        return sorted(out)

    def fewshot(self, k: int, seed: int) -> np.ndarray:
        """Rows of the train split (class-grouped, K per class) of the few-shot set (K, seed)."""
        path = S.fewshot_path(k, seed)
        if path not in self.file:
            have = ", ".join(f"K={a} seed={b}" for a, b in self.fewshot_names())
            raise CachekitError(f"the cache has no few-shot set K={k} seed={seed}; fix: use one of {have}, "
                                "or extract again with those --shots/--seeds")
        rows = np.asarray(self._read(path))
        return self._rows_in_range(path, rows, self.num_images("train"), "train row")

    def with_replacement(self, k: int, seed: int) -> list[int]:
        self.fewshot(k, seed)
        return list(self._attr(S.fewshot_path(k, seed), FewshotAttr.WITH_REPLACEMENT))

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
        return torch.from_numpy(self._read(S.CLASSIFIER)).float()

    def text_embeddings(self) -> torch.Tensor:
        return torch.from_numpy(self._read(S.EMBEDDINGS)).float()

    def templates(self) -> list[str]:
        return S.strings(self._read(S.TEMPLATES))

    @property
    def logit_scale(self) -> float:
        return float(self._read(S.LOGIT_SCALE))

    def attnpool_params(self) -> tuple[dict[str, torch.Tensor], int]:
        params = {k: torch.from_numpy(np.asarray(self._read(S.attnpool_path(k)))).float()
                  for k in self._obj(S.ATTNPOOL).keys()}
        return params, int(self._attr(S.ATTNPOOL, AttnpoolAttr.NUM_HEADS))

    def bad_images(self) -> list[dict]:
        cols = [S.strings(self._read(S.bad_images_path(c))) for c in S.BAD_IMAGE_COLUMNS]
        return [dict(zip(S.BAD_IMAGE_COLUMNS, row)) for row in zip(*cols)]


class DenseSource:
    """Dense maps of chosen rows and views of one split, addressed 0..len-1 (views outer).

    Implements the `get(indices)` protocol SAFE trains on, streaming from HDF5 so memory stays
    bounded by one batch; `load_stored()` gives an in-memory tensor (in the cache's dtype) when it fits.
    """

    def __init__(self, cache: Cache, split: str, rows=None, views=(0,)):
        self.cache, self.split = cache, split
        n = cache.num_images(split)
        self.rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        self.views = tuple(views)
        self._addr = [(v, r) for v in self.views for r in self.rows]

    def __len__(self):
        return len(self._addr)

    def read_stored(self, indices) -> np.ndarray:
        """The maps at `indices` in that order, in the cache's dtype, read straight into one array (file order)."""
        ds = self.cache._dense_ds(self.split)
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        out = np.empty((len(indices),) + ds.shape[-3:], dtype=ds.dtype)
        for j in np.argsort(indices, kind="stable"):
            v, r = self._addr[indices[j]]
            ds.read_direct(out, np.s_[v, r] if self.split == "train" else np.s_[r], np.s_[j])
        return out

    def get(self, indices) -> torch.Tensor:
        # torch converts float16 several times faster than numpy
        return torch.from_numpy(self.read_stored(indices)).float()

    @property
    def nbytes(self) -> int:
        """Bytes of these maps as float32 (as `get` hands them out)."""
        shape = self.cache.dense_shape
        return len(self) * int(np.prod(shape)) * 4

    @property
    def stored_nbytes(self) -> int:
        """Bytes of these maps in the cache's dtype (what `load_stored` returns)."""
        ds = self.cache._dense_ds(self.split)
        return len(self) * int(np.prod(ds.shape[-3:])) * ds.dtype.itemsize

    def load_stored(self) -> torch.Tensor:
        """Every map in the cache's dtype (float16 unless extracted as float32: half the memory of float32)."""
        return torch.from_numpy(self.read_stored(np.arange(len(self))))


def open_cache(path) -> Cache:
    """Open a cache read-only. Use as a context manager or call `.close()`."""
    return Cache(path)
