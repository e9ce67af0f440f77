"""`cachekit sweep`: methods x shots x seeds x hyper-parameter grids on one cache, resumable.

Rows go through the one results writer (records.ResultsFile): one fsync'd line per finished run, each with its
record key; a rerun skips rows already there, and a torn last line (a kill mid-write) is cut off first.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from .cache import Cache
from .errors import CachekitError
from .methods.presets import overrides_for
from .methods.registry import get_method
from .progress import Counter, Progress
from .records import ResultsFile, read_results
from .runner import Runner, _sets

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
    """Every method, parameter name and candidate value is checked here, before any run."""
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
        try:
            spec = get_method(m)
        except CachekitError as exc:
            raise CachekitError(f"{where}: {exc}") from None
        params = params or {}
        if not isinstance(params, dict):
            raise CachekitError(f"{where}: parameters of {m} must be a mapping of lists; fix: e.g. top_k: [300, 500]")
        for name, values in params.items():
            if not isinstance(values, list) or not values:
                raise CachekitError(f"{where}: {m}.{name} must be a non-empty list of candidate values; "
                                    f"fix: e.g. {name}: [{json.dumps(values)}]")
            for v in values:
                spec.make_config({name: v})
        methods[m] = params
    for key in ("shots", "seeds"):
        v = grid.get(key)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                   for x in v)):
            raise CachekitError(f"{where}: {key} must be a list of integers; fix: e.g. {key}: [1, 2]")
    preset = grid.get("preset")
    if preset is not None:
        from .methods.presets import get_preset

        get_preset(preset)
    return {"methods": methods, "shots": grid.get("shots"), "seeds": grid.get("seeds"), "preset": preset}


def expand(grid: dict, cache: Cache) -> list[dict]:
    """Every (method, K, seed, overrides) row, in a fixed order."""
    sets = _sets(cache, grid["shots"], grid["seeds"])
    base = overrides_for(list(grid["methods"]), grid.get("preset"), {})
    rows = []
    for m, params in grid["methods"].items():
        names = list(params)
        for combo in itertools.product(*(params[n] for n in names)) if names else [()]:
            over = {**base.get(m, {}), **dict(zip(names, combo))}
            for k, s in sets:
                rows.append({"method": m, "k": int(k), "seed": int(s), "overrides": over})
    return rows


def sweep(cache: Cache, grid: dict, out, progress: Progress | None = None, runner: Runner | None = None) -> dict:
    out = Path(out)
    rows = expand(grid, cache)
    runner = runner or Runner(cache, progress=progress)
    with ResultsFile(out) as rf:
        keyed = [(runner.key(r["method"], r["k"], r["seed"], r["overrides"]), r) for r in rows]
        todo = [(key, r) for key, r in keyed if key not in rf]
        bar = Counter(progress, "sweep", len(todo), "run")
        records = []
        for _, r in todo:
            rec = runner.run(r["method"], r["k"], r["seed"], r["overrides"])
            rf.append(rec)
            records.append(rec)
            bar.advance()
        bar.close()
    keys = {key for key, _ in keyed}
    rows_of_grid = [r for r in read_results(out).records if r["key"] in keys] if keys else []
    return {"out": str(out), "rows": len(rows), "skipped": len(rows) - len(todo), "ran": len(todo),
            "records": records, "grid_records": rows_of_grid}
