"""One result record for every run (eval, sweep, SAFE fits), and one JSON-lines file type that holds them.

A record's `key` is its full identity: cache build, method, every setting, shots, seed. `ResultsFile` is the
only writer of results lines (eval --out, sweep, demo): it holds a lock, cuts a torn last line left by a kill,
skips records whose key is already there (so a rerun after an interruption adds no duplicates) and fsyncs
each line. `read_results` is the only reader: lines it cannot use are counted and named, never a traceback.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import CachekitError

__all__ = ["Record", "record_key", "ResultsFile", "read_results", "Loaded"]

#: Fields every results line must have to be read back (the rest is informative).
REQUIRED = ("key", "method", "shots", "seed", "config", "metrics", "cache_build")


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable)


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, (tuple, set)):
        return list(x)
    raise TypeError(f"not JSON-able: {type(x).__name__}")


def record_key(cache_build: str, method: str, shots: int, seed: int, config: dict) -> str:
    """The identity of a run: the same cache build, method, settings, shots and seed give the same key."""
    ident = {"cache": cache_build, "method": method, "shots": int(shots), "seed": int(seed), "config": config}
    return hashlib.sha256(canonical(ident).encode()).hexdigest()[:20]


@dataclass
class Record:
    """One run of one method on one few-shot set (K, seed) of one cache build."""

    method: str
    shots: int
    seed: int
    config: dict  # every setting, resolved (derived defaults filled in, channel source named)
    params: dict  # hyper-parameters chosen on val
    metrics: dict  # val_acc, test_acc
    selection: str  # "val", or "val (val and test are the same data)"
    seconds: float
    cache_build: str  # which build of which cache (sha of its creation time and identity)
    dataset: str
    cache: str
    model: str
    pretrained: str | None
    weights: str
    random_weights: bool
    extra: dict = field(default_factory=dict)
    cachekit_version: str = __version__

    @property
    def key(self) -> str:
        return record_key(self.cache_build, self.method, self.shots, self.seed, self.config)

    def to_dict(self) -> dict:
        d = {"key": self.key, "method": self.method, "shots": int(self.shots), "seed": int(self.seed),
             "metrics": self.metrics, "params": self.params, "config": self.config, "selection": self.selection,
             "seconds": round(float(self.seconds), 4), "dataset": self.dataset, "cache": self.cache,
             "cache_build": self.cache_build, "model": self.model, "pretrained": self.pretrained,
             "weights": self.weights, "random_weights": bool(self.random_weights),
             "cachekit_version": self.cachekit_version}
        if self.extra:
            d["extra"] = self.extra
        return json.loads(canonical(d))  # plain JSON types only (tuples -> lists, numpy -> Python)


def _check_line(obj) -> str | None:
    """Why a parsed line is not a results record (None when it is one)."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    missing = [f for f in REQUIRED if f not in obj]
    if missing:
        return f"no {missing[0]!r} field"
    if not isinstance(obj["metrics"], dict) or not isinstance(obj["config"], dict):
        return "metrics/config are not objects"
    return None


def looks_like_results(path: Path) -> str | None:
    """None when `path` is absent, empty or a cachekit results file; else what it is instead."""
    if not path.exists():
        return None
    if path.is_dir():
        return "a folder"
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "an HDF5 file (a cache or a stored fit?)"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    lines = text.splitlines()
    complete = lines if text.endswith("\n") else lines[:-1]  # a torn last line is repaired later
    for ln in complete:
        if not ln.strip():
            continue
        try:
            why = _check_line(json.loads(ln))
        except (ValueError, RecursionError):  # bad JSON, a huge integer, nesting too deep
            why = "not JSON lines"
        if why:
            return f"not a cachekit results file ({why})"
    return None


class ResultsFile:
    """Append-only JSON-lines results under a writer lock. Use as a context manager:

    with ResultsFile(path) as rf:
        if key not in rf: rf.append(record)
    """

    def __init__(self, path):
        self.path = Path(path)
        self.keys: set[str] = set()
        self._lock = None
        self._fh = None

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __enter__(self):
        from .store import WriterLock, os_errors

        what = looks_like_results(self.path)
        if what:
            raise CachekitError(f"{self.path} exists and is {what}; fix: give a new or a cachekit results "
                                "(.jsonl) path as --out")
        with os_errors(str(self.path)):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = WriterLock(self.path, kind="results file")
        self._lock.__enter__()
        try:
            self._repair()
            with os_errors(str(self.path)):
                # Unbuffered: a failed write (disk full) leaves at most a torn line, cut on the next open, and
                # nothing buffered that close() would try (and fail) to write again.
                self._fh = open(self.path, "ab", buffering=0)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def _repair(self):
        """Cut a torn last line (a kill mid-write) and read the keys already there."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
            data = data[:cut]
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                self.keys.add(json.loads(line)["key"])

    def append(self, record) -> bool:
        """Write one record (a Record or its dict); False when its key is already in the file."""
        from .store import os_errors

        d = record.to_dict() if isinstance(record, Record) else record
        if d["key"] in self.keys:
            return False
        data = memoryview((json.dumps(d) + "\n").encode("utf-8"))
        with os_errors(str(self.path)):
            while data:
                data = data[self._fh.write(data):]
            os.fsync(self._fh.fileno())
        self.keys.add(d["key"])
        return True

    def __exit__(self, *exc):
        try:
            if self._fh is not None:
                self._fh.close()
        finally:
            self._fh = None
            self._lock.__exit__(*exc)


@dataclass
class Loaded:
    """What `read_results` found: the usable records (duplicates dropped) and the lines it skipped."""

    records: list
    skipped: list  # (line number, why)
    duplicates: int

    def problems_line(self, path) -> str | None:
        if not self.skipped:
            return None
        shown = ", ".join(f"line {n} ({why})" for n, why in self.skipped[:3])
        more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        return f"{path}: skipped {len(self.skipped)} unreadable line(s): {shown}{more}"


def read_results(path) -> Loaded:
    """Records of a results file, first occurrence of each key; a torn last line is skipped silently."""
    p = Path(path)
    if not p.is_file():
        raise CachekitError(f"results file {p} does not exist; fix: write one with `cachekit eval --out` "
                            "or `cachekit sweep --out`")
    raw = p.read_bytes()
    if raw.startswith(b"\x89HDF\r\n\x1a\n"):
        raise CachekitError(f"{p} is an HDF5 file, not a results file; fix: give the .jsonl that "
                            "`cachekit eval --out` or `cachekit sweep` wrote")
    text = raw.decode("utf-8", errors="replace")
    lines = text.splitlines()
    torn = bool(text) and not text.endswith("\n")
    records, skipped, seen, dup = [], [], set(), 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if torn and i == len(lines):
            break
        try:
            obj = json.loads(line)
            why = _check_line(obj)
        except (ValueError, RecursionError):  # bad JSON, a huge integer, nesting too deep
            why = "not JSON"
        if why:
            skipped.append((i, why))
            continue
        if obj["key"] in seen:
            dup += 1
            continue
        seen.add(obj["key"])
        records.append(obj)
    if not records:
        extra = f" ({len(skipped)} unreadable line(s))" if skipped else ""
        raise CachekitError(f"{p} holds no results{extra}; fix: run `cachekit eval --out {p}` first")
    return Loaded(records, skipped, dup)
