"""Outputs never clobber inputs: every --out is checked before any work starts.

`check_output(out, kind, inputs)` refuses, in one line, an output path that is one of the command's inputs,
an existing file of another kind (a cache where results lines go, results lines where a fit goes), or a
location that cannot be written; it returns the path.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import CachekitError

__all__ = ["check_output", "KINDS"]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
KINDS = ("results", "fit", "folder", "json")


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _hdf5_kind(path: Path) -> str | None:
    """'cache', 'fit' or 'other' for an HDF5 file; None when it is not one."""
    with open(path, "rb") as fh:
        if fh.read(8) != HDF5_SIGNATURE:
            return None
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") == "cachekit":
                return "cache"
            if f.attrs.get("kind") == "safe":
                return "fit"
    except OSError:
        pass
    return "other"


def _writable(path: Path, what: str, shown=None):
    """`path` could be created (its nearest existing folder is writable); the message names `shown` or path."""
    shown = path if shown is None else shown
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise CachekitError(f"cannot write {what} {shown}: {parent} is a file, not a folder; fix: choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "not writable"
        try:
            if os.statvfs(parent).f_flag & os.ST_RDONLY:
                why = "on a Read-only file system"
        except OSError:
            pass
        raise CachekitError(f"cannot write {what} {shown}: {parent} is {why}; fix: choose a writable location")


def check_output(out, kind: str, inputs=(), option: str = "--out") -> Path:
    """Refuse an output that is an input, a file of another kind, or unwritable. `inputs`: (label, path)."""
    out = Path(out)
    for label, path in inputs:
        if path is not None and _same(out, Path(path)):
            raise CachekitError(f"{option} {out} is the {label} this command reads; fix: choose another "
                                f"{option} path")
    if kind == "folder":
        if out.exists() and not out.is_dir():
            raise CachekitError(f"{option} {out} is a file, not a folder; fix: choose a folder path")
        _writable(out / "x", "output folder")
        return out
    if out.is_dir():
        raise CachekitError(f"{option} {out} is a folder; fix: give a file path")
    if out.exists():
        if kind == "results":
            from .records import looks_like_results

            what = looks_like_results(out)
            if what:
                raise CachekitError(f"{option} {out} exists and is {what}; fix: give a new or a cachekit "
                                    "results (.jsonl) path")
        elif kind == "fit":
            h = _hdf5_kind(out) if out.stat().st_size else "other"
            if h != "fit":
                what = {"cache": "a cachekit cache", None: "not an HDF5 file"}.get(h, "an HDF5 file of another kind")
                raise CachekitError(f"{option} {out} exists and is {what}; fix: give a new path for the fitted "
                                    "layer (or a fit written by `cachekit fit-safe --out`)")
        elif kind == "json":
            with open(out, "rb") as fh:
                if fh.read(8) == HDF5_SIGNATURE:
                    raise CachekitError(f"{option} {out} exists and is an HDF5 file; fix: give a new .json path")
    _writable(out, "output")
    return out
