"""`cachekit sweep`: methods x shots x seeds x hyper-parameter grids on one cache, resumable.

Rows are appended to a JSON-lines file, one fsync'd line per finished run, each with a `row_key`;
a rerun skips rows already there, and a torn last line (a kill mid-write) is cut off first.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from .cache import Cache
from .errors import CachekitError
from .results import ResultStore, canonical
from .runner import DEFAULTS, Runner, method_params

GRID_KEYS = ("methods", "shots", "seeds", "preset")


def load_grid(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CachekitError(f"grid file {p} does not exist; fix: give a JSON or YAML grid file")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            grid = yaml.safe_load(text)
        else:
            grid = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CachekitError(f"grid file {p} cannot be parsed: {first}; fix: valid JSON or YAML") from None
    return validate_grid(grid, str(p))


def validate_grid(grid, where: str = "grid") -> dict:
    if not isinstance(grid, dict):
        raise CachekitError(f"{where} must be a mapping with keys {', '.join(GRID_KEYS)}; fix: see docs/sweep.md")
    unknown = [k for k in grid if k not in GRID_KEYS]
    if unknown:
        raise CachekitError(f"{where} has unknown key {unknown[0]!r}; fix: use only {', '.join(GRID_KEYS)}")
    methods = grid.get("methods")
    if isinstance(methods, list):
        if not all(isinstance(m, str) for m in methods):
            raise CachekitError(f"{where}: 'methods' must list method names; fix: e.g. methods: [tip, ape]")
        methods = {m: {} for m in methods}
    if not isinstance(methods, dict) or not methods:
        raise CachekitError(f"{where}: 'methods' must list at least one method; fix: e.g. methods: {{ape: {{top_k: [300, 500]}}}}")
    for m, params in methods.items():
        if m not in DEFAULTS:
            raise CachekitError(f"{where}: unknown method {m!r}; fix: one of {', '.join(DEFAULTS)}")
        params = params or {}
        if not isinstance(params, dict):
            raise CachekitError(f"{where}: parameters of {m} must be a mapping of lists; fix: e.g. top_k: [300, 500]")
        for name, values in params.items():
            if not isinstance(values, list) or not values:
                raise CachekitError(f"{where}: {m}.{name} must be a non-empty list of candidate values; "
                                    f"fix: e.g. {name}: [{json.dumps(values)}]")
            for v in values:  # unknown names and wrongly-typed values fail here, before any run
                method_params(m, {name: v})
        methods[m] = params
    for key in ("shots", "seeds"):
        v = grid.get(key)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                   for x in v)):
            raise CachekitError(f"{where}: {key} must be a list of integers; fix: e.g. {key}: [1, 2]")
    return {"methods": methods, "shots": grid.get("shots"), "seeds": grid.get("seeds"),
            "preset": grid.get("preset")}


def expand(grid: dict, cache: Cache) -> list[dict]:
    """Every (method, K, seed, params) row, in a fixed order."""
    from .presets_apply import overrides_for

    have = cache.fewshot_names()
    shots = grid["shots"] or sorted({k for k, _ in have})
    seeds = grid["seeds"] or sorted({s for _, s in have})
    for k in shots:
        for s in seeds:
            cache.fewshot(k, s)
    base = overrides_for(list(grid["methods"]), grid.get("preset"), {})
    rows = []
    for m, params in grid["methods"].items():
        names = list(params)
        for combo in itertools.product(*(params[n] for n in names)) if names else [()]:
            over = {**base.get(m, {}), **dict(zip(names, combo))}
            for k in shots:
                for s in seeds:
                    rows.append({"method": m, "k": int(k), "seed": int(s), "overrides": over})
    return rows


def row_key(row: dict, cache_build: str) -> str:
    """Unique per cache build too, so rows of another cache in the same file are never taken as done."""
    return canonical({"cache": cache_build, "method": row["method"], "k": row["k"], "seed": row["seed"],
                      "params": method_params(row["method"], row["overrides"])})


def _existing(out: Path) -> set[str]:
    """Keys of finished rows; truncates a torn last line left by a kill."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(out, "r+b") as fh:
            fh.truncate(cut)
        data = data[:cut]
    keys = set()
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            try:
                keys.add(json.loads(line)["row_key"])
            except (json.JSONDecodeError, KeyError):
                raise CachekitError(f"{out} has a line that is not a sweep row; fix: use a new --out file") from None
    return keys


def sweep(cache: Cache, grid: dict, out, progress: bool = False) -> dict:
    from tqdm import tqdm

    from .store import WriterLock, os_errors

    out = Path(out)
    rows = expand(grid, cache)
    runner = Runner(cache)
    build = ResultStore(cache).build
    with os_errors(str(out)):
        out.parent.mkdir(parents=True, exist_ok=True)
    with WriterLock(out, kind="results file"):
        done = _existing(out)
        todo = [r for r in rows if row_key(r, build) not in done]
        records = []
        with os_errors(str(out)), open(out, "a", encoding="utf-8") as fh:
            for r in tqdm(todo, desc="sweep", unit="run", disable=not progress or None, leave=False):
                rec = runner.run(r["method"], r["k"], r["seed"], r["overrides"])
                rec["row_key"] = row_key(r, build)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                records.append(rec)
    return {"out": str(out), "rows": len(rows), "skipped": len(rows) - len(todo), "ran": len(todo),
            "records": records}
