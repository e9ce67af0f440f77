"""Derived results next to a cache: `NAME.results/`, one small HDF5 file per result.

Each result is keyed by (kind, params). A result file is written under a temporary name and
renamed into place, so a reader sees it whole or not at all, and the cache file itself is never
opened for writing. Results remember which cache build they came from and are ignored if the cache
was rebuilt since.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .errors import CachekitError
from .store import WriterLock, check_space, os_errors, publish, tmp_path


def canonical(params: dict) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=_jsonable)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (tuple, set)):
        return list(x)
    raise TypeError(f"not JSON-able: {type(x).__name__}")


class ResultStore:
    def __init__(self, cache):
        """`cache` is an open `Cache`; its identity and creation time tag every result."""
        self.dir = Path(str(cache.path)[: -len(cache.path.suffix)] + ".results") if cache.path.suffix \
            else Path(str(cache.path) + ".results")
        self.build = hashlib.sha256((cache.meta["created"] + json.dumps(cache.meta["identity"],
                                                                        sort_keys=True)).encode()).hexdigest()[:16]

    def check_writable(self) -> None:
        """A one-line error now when results cannot be stored beside the cache (before long work)."""
        from .outputs import _writable

        _writable(self.dir / "probe", "results beside the cache in", shown=self.dir)

    def key(self, kind: str, params: dict) -> str:
        return f"{kind}-{hashlib.sha256(canonical(params).encode()).hexdigest()[:16]}"

    def path(self, kind: str, params: dict) -> Path:
        return self.dir / (self.key(kind, params) + ".h5")

    def get(self, kind: str, params: dict) -> dict | None:
        """{'arrays': {...}, 'attrs': {...}} of a stored result, or None."""
        p = self.path(kind, params)
        if not p.exists():
            return None
        try:
            with h5py.File(p, "r") as f:
                if f.attrs.get("cache_build") != self.build or f.attrs.get("params") != canonical(params):
                    return None
                arrays = {}
                f.visititems(lambda n, o: arrays.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
                attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        except OSError:
            return None  # a damaged result is recomputed, never trusted
        attrs["params"] = json.loads(attrs["params"])
        if "info" in attrs:
            attrs["info"] = json.loads(attrs["info"])
        return {"arrays": arrays, "attrs": attrs}

    def put(self, kind: str, params: dict, arrays: dict[str, np.ndarray], info: dict | None = None,
            path=None) -> Path:
        """Store a result atomically; `path` writes it to that file instead of the results folder."""
        final = Path(path) if path is not None else self.path(kind, params)
        where = "--out location" if path is not None else "location for the cache (results go beside it)"
        with os_errors(str(final.parent), where):
            final.parent.mkdir(parents=True, exist_ok=True)
        # Each result is its own file: the lock only serialises the short write, so wait for it.
        with WriterLock(final.parent if path is None else final, wait=120,
                        kind="results folder" if path is None else "results file", where=where):
            check_space(final.parent, sum(np.asarray(a).nbytes for a in arrays.values()) + (256 << 10), str(final))
            tmp = tmp_path(final)
            with os_errors(str(final), where):
                with h5py.File(tmp, "w") as f:
                    for name, arr in arrays.items():
                        f.create_dataset(name, data=np.asarray(arr))
                    f.attrs["kind"] = kind
                    f.attrs["params"] = canonical(params)
                    f.attrs["info"] = json.dumps(info or {}, sort_keys=True, default=_jsonable)
                    f.attrs["cache_build"] = self.build
                    f.attrs["cachekit_version"] = __version__
                    f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                publish(tmp, final)
        return final

    def list(self, kind: str | None = None) -> list[dict]:
        out = []
        if not self.dir.is_dir():
            return out
        for p in sorted(self.dir.glob("*.h5")):
            try:
                with h5py.File(p, "r") as f:
                    if f.attrs.get("cache_build") != self.build:
                        continue
                    k = f.attrs["kind"]
                    if kind is None or k == kind:
                        out.append({"kind": k, "params": json.loads(f.attrs["params"]), "file": p.name,
                                    "created": f.attrs["created"]})
            except (OSError, KeyError):
                continue
        return out


def require(result: dict | None, what: str, fix: str) -> dict:
    if result is None:
        raise CachekitError(f"{what} is not in the cache results; fix: {fix}")
    return result
