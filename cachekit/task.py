"""A Task: one few-shot set (K, seed) as the methods see it.

The runner builds one Task per (cache, K, seed) and hands it to every method's estimator. Tensors load lazily
and once, on the task's device. Methods read only what they need: features and labels, the cached dense maps
and the attention-pooling weights (SAFE), stored refinements (APE), and a fit store for trained layers. The
Task is the only door between a method and the files; `TensorTask` serves tests and Python users who hold
tensors instead of a cache.
"""
from __future__ import annotations

from functools import cached_property

import torch

from .errors import CachekitError
from .progress import Progress

__all__ = ["Task", "TensorTask", "CacheTask", "DEFAULT_MAX_MEMORY"]

DEFAULT_MAX_MEMORY = 4 << 30  # bytes of float32 dense maps held in memory; above it, stream from HDF5


class Task:
    """The interface (attributes every method may read)."""

    k: int
    seed: int
    device: str = "cpu"
    val_is_test: bool = False
    progress: Progress | None = None
    max_memory: int = DEFAULT_MAX_MEMORY

    # features: W (C, D), F (N, D) keys, key_labels (N,), L (N, C), val_f/val_y, test_f/test_y
    @property
    def num_classes(self) -> int:
        return int(self.W.shape[0])

    @cached_property
    def L(self) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.key_labels, self.num_classes).to(self.F.dtype)

    def train_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise CachekitError("this task holds no augmented train views; fix: run the method on a cache")

    # Dense maps and the attention-pooling layer (SAFE).
    def attnpool(self) -> tuple[dict, int]:
        raise CachekitError("this task holds no attention-pooling weights; fix: run SAFE on a cache")

    def dense(self, split: str):
        raise CachekitError("this task holds no dense maps; fix: run SAFE on a cache")

    def train_dense(self):
        raise CachekitError("this task holds no dense maps; fix: run SAFE on a cache")

    def pooled_train_views_raw(self) -> torch.Tensor:
        raise CachekitError("this task holds no pooled train views; fix: run SAFE-A on a cache")

    # Stored results: refinements written by `cachekit refine`, and trained layers.
    def stored_refinements(self, variant: str) -> list[dict]:
        return []

    def load_fit(self, kind: str, key: dict):
        return None

    def check_fit_writable(self) -> None:
        """Raise now (before training) when a fit could not be stored afterwards."""

    def save_fit(self, kind: str, key: dict, arrays: dict, info: dict):
        return None


class TensorTask(Task):
    """A task over tensors held in memory (tests, notebooks)."""

    def __init__(self, W, F, key_labels, val_f, val_y, test_f=None, test_y=None, X=None, X_y=None, k=0,
                 seed=0, device="cpu"):
        self.W, self.F, self.key_labels = W, F, key_labels
        self.val_f, self.val_y, self.test_f, self.test_y = val_f, val_y, test_f, test_y
        self._X, self._X_y = X, X_y
        self.k, self.seed, self.device = k, seed, device

    def train_views(self):
        if self._X is None:
            return super().train_views()
        return self._X, self._X_y


class CacheTask(Task):
    """A task read from an open cache; `store` (a ResultStore) holds refinements and fits."""

    def __init__(self, cache, k: int, seed: int, store=None, device: str = "cpu",
                 max_memory: int = DEFAULT_MAX_MEMORY, progress: Progress | None = None,
                 reuse_fits: bool = True, fit_out=None):
        self.cache, self.k, self.seed, self.store = cache, int(k), int(seed), store
        self.device, self.max_memory, self.progress = device, int(max_memory), progress
        self.reuse_fits, self.fit_out = reuse_fits, fit_out
        self.val_is_test = cache.val_is_test
        cache.fewshot(k, seed)  # a clear error now when the set is missing

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def load(self) -> "CacheTask":
        """Read every pooled tensor now (they are otherwise read on first use); returns self."""
        for name in ("W", "F", "key_labels", "L", "val_f", "val_y", "test_f", "test_y"):
            getattr(self, name)
        return self

    @cached_property
    def W(self):
        return self._dev(self.cache.text_classifier())

    @cached_property
    def _keys(self):
        return self.cache.train_keys(self.k, self.seed)

    @cached_property
    def F(self):
        return self._dev(self._keys[0])

    @cached_property
    def key_labels(self):
        return self._dev(self._keys[1])

    @cached_property
    def val_f(self):
        return self._dev(self.cache.features("val"))

    @cached_property
    def val_y(self):
        return self._dev(self.cache.labels("val"))

    @cached_property
    def test_f(self):
        return self._dev(self.cache.features("test"))

    @cached_property
    def test_y(self):
        return self._dev(self.cache.labels("test"))

    def train_views(self):
        X, y = self.cache.train_views(self.k, self.seed)
        return self._dev(X), self._dev(y)

    def attnpool(self):
        return self.cache.attnpool_params()

    def _in_memory(self, src):
        from .methods.safe import TensorSource

        # In memory in the cache's dtype (float16: half of float32); TensorSource widens each batch, exactly.
        return TensorSource(src.load_stored()) if src.stored_nbytes <= self.max_memory else src

    def dense(self, split: str):
        return self._in_memory(self.cache.dense_source(split))

    def _views(self) -> tuple[int, ...]:
        return tuple(range(1, self.cache.views + 1)) or (0,)

    def train_dense(self):
        """Dense maps of every augmented view of the few-shot images (the plain view if there are none)."""
        rows = self.cache.fewshot(self.k, self.seed)
        views = self._views()
        src = self.cache.dense_source("train", rows, views)
        return self._in_memory(src), self.cache.train_labels(self.k, self.seed).repeat(len(views))

    def pooled_train_views_raw(self):
        """Raw pooled features of the augmented views (V, N, D), in train_dense's order."""
        rows = torch.from_numpy(self.cache.fewshot(self.k, self.seed))
        return self.cache.pooled("train")[list(self._views())][:, rows]

    def stored_refinements(self, variant: str) -> list[dict]:
        if self.store is None:
            return []
        out = []
        for r in self.store.list("refine"):
            p = r["params"]
            if p.get("k") == self.k and p.get("seed") == self.seed and p.get("variant") == variant:
                out.append({**p, "file": r["file"]})
        return out

    def refinement_channels(self, params: dict) -> torch.Tensor:
        from .results import require

        res = require(self.store.get("refine", params), f"refinement {params}", "rerun `cachekit refine`")
        return torch.from_numpy(res["arrays"]["channels"]).long()

    def load_fit(self, kind: str, key: dict):
        if self.store is None or not self.reuse_fits or self.fit_out is not None:
            return None
        return self.store.get(kind, key)

    def check_fit_writable(self) -> None:
        if self.fit_out is not None:
            from .outputs import check_output

            check_output(self.fit_out, "fit")
        elif self.store is not None:
            self.store.check_writable()

    def save_fit(self, kind: str, key: dict, arrays: dict, info: dict):
        if self.store is None:
            return None
        return self.store.put(kind, key, arrays, info=info, path=self.fit_out)
