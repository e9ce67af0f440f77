"""Fault injection and bad-input checks for cachekit; writes a reliability report (docs/reliability.md).

    python -m tests.harness.reliability --out docs/reliability.md [--kills N] [--seed S]   # from the repo root
    make reliability                                                                      # the same

This is a test harness, not part of the installed package: it drives cachekit from outside (the CLI as a
child process, or in-process through click's CliRunner) and patches a few library names in those children
(the table :data:`PATCH_POINTS` below; :data:`USES` lists what it otherwise calls).

Faults. Each writing command (extract, refine, fit-safe, sweep) runs as a real subprocess,
``python -m cachekit ...``, on a tiny RN-tiny tree/cache, and is killed with SIGKILL or SIGINT at a
seeded random point part-way. Then the *same* command is run again and the final state is compared
with an uninterrupted run: every dataset of the cache (extract) or of the stored result (refine,
fit-safe), the sweep rows (key and metrics, no duplicates), `cachekit verify`, and leftovers that a
reader could see. SIGINT must exit 130 with "Interrupted: ... rerun the same command to resume" and no
traceback. On top: a second writer while the first runs, readers while a writer appends, a full disk
(a small tmpfs; monkeypatched ENOSPC where mounting is not possible) and a read-only location.

Kill points are reached through progress *events* rather than wall-clock guesses, so they are the
same on a fast or a loaded machine. The child processes get a generated `sitecustomize.py` (on
PYTHONPATH, together with the folder this harness is imported from) that calls :func:`install_hooks`
when ``CACHEKIT_FAULT_DIR`` is set; the hooks only log events (``published <file>``, ``epoch <n>``,
``row``) and, where asked, pause:

* ``CACHEKIT_FAULT_PAUSE_BEFORE=<glob>``: sleep before renaming a finished ``.tmp`` onto a file whose
  name matches (the temporary file is complete, the rename has not happened);
* ``CACHEKIT_FAULT_PAUSE_AFTER=<glob>``: sleep right after that rename (the next step not yet done);
* ``CACHEKIT_FAULT_EPOCH_DELAY`` / ``CACHEKIT_FAULT_ROW_DELAY``: seconds to sleep after each SAFE epoch /
  each sweep row, so a kill lands in the middle of the work;
* ``CACHEKIT_FAULT_PAUSE_ROW=<n>``: sleep once `n` sweep rows are written, before the next;
* ``CACHEKIT_FAULT_UNIT_DELAY``: seconds extract sleeps after each published batch (through the
  documented ``ExtractOptions.on_unit`` callback, set by the hooks; the library reads no test-only
  environment variable).

Bad inputs: :data:`BAD_CASES`, each a CLI call (in-process, click's CliRunner) with the expected
outcome: a one-line ``Error: ...`` naming the problem with a non-zero exit and no traceback and no cache
file left, or success. Cases that currently fail carry ``bug=...`` (tests mark them xfail).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import fnmatch
import hashlib
import importlib
import json
import os
import platform
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cachekit.synthetic import make_tree  # (re-exported: the harness and its tests build trees with it)

FAULT_DIR = "CACHEKIT_FAULT_DIR"
PAUSE_S = 60.0  # a paused child sleeps this long; the driver signals it long before
TIMEOUT_S = 180.0  # longest wait for an event or an exit

# --------------------------------------------------------------------------------------------- #
# what the harness needs from cachekit: patch these names (and nothing else), call these
# --------------------------------------------------------------------------------------------- #
#: Library names the harness replaces with wrappers: key -> (module, attribute, what the wrapper relies on).
#: In the children, :func:`install_hooks` patches them at interpreter start (sitecustomize), before the CLI
#: imports the modules that use them, so a module that did `from .store import publish` gets the wrapper too.
#: tests/test_reliability.py checks that every entry still resolves.
PATCH_POINTS: dict[str, tuple[str, str, str]] = {
    "publish": ("cachekit.store", "publish",
                "publish(tmp, final) renames every finished .tmp (plan.json, seg-*.h5, the cache, a stored result) "
                "onto its final name: logs `published NAME`, pauses before/after it"),
    "safe_fit": ("cachekit.methods.safe", "fit",
                 "fit(..., callback=cb) calls cb(dict with 'epoch') after each epoch: logs `epoch N`, delays"),
    "runner_run": ("cachekit.runner", "Runner.run",
                   "`cachekit sweep` calls it once per row, after the previous row is written: delays, pauses"),
    "extract_options": ("cachekit.extraction", "ExtractOptions.__post_init__",
                        "dataclass hook run by every ExtractOptions(...): the wrapper chains a sleeping callback "
                        "onto its documented `on_unit` (called after each published unit)"),
    "extract_publish": ("cachekit.extraction", "publish",
                        "in-process only (check_overwrite_resume): counts the seg-*.h5 a rerun encodes; extract "
                        "must look the name up in its module at call time"),
}

#: Library names the harness calls or reads (not patched). tests/test_reliability.py checks they resolve.
USES: tuple[str, ...] = (
    "cachekit.__version__",
    "cachekit.synthetic.make_tree",
    "cachekit.cli.main.cli",  # the CLI in-process (click's CliRunner); children run `python -m cachekit`
    "cachekit.cache.open_cache",
    "cachekit.cache.Cache.num_images",
    "cachekit.cache.Cache.views",
    "cachekit.cache.Cache.val_is_test",
    "cachekit.cache.Cache.paths",
    "cachekit.cache.Cache.labels",
    "cachekit.cache.Cache.classnames",
    "cachekit.cache.Cache.with_replacement",
    "cachekit.results.ResultStore",  # .list() -> [{kind, params, file}], .get(kind, params)
    "cachekit.results.ResultStore.list",
    "cachekit.results.ResultStore.get",
    "cachekit.verify.verify",  # -> .ok, .failed[i]["check"]
    "cachekit.runner.store_refine",  # store_refine(cache, k, seed, top_k, weights), also in a child script
    "cachekit.errors.CachekitError",
    "cachekit.schema.seal",  # seal(h5py.File): rewrites /@attrs_sha256 after the harness edits a cache's attributes
)

#: The harness needs no test-only environment variable, option or hook in the library itself: it reaches
#: everything through the PATCH_POINTS above and documented callbacks (ExtractOptions.on_unit, safe.fit's
#: callback).


def resolve(dotted_module: str, attr: str = ""):
    """(owner, name, value) of `module` + `attr` ("Runner.run" walks into the class)."""
    owner = importlib.import_module(dotted_module)
    if not attr:
        return None, dotted_module, owner
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    return owner, name, getattr(owner, name)


def resolve_use(dotted: str):
    """The object named by an entry of :data:`USES` (the longest importable module prefix, then attributes)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        return resolve(".".join(parts[:i]), ".".join(parts[i:]))[2]
    raise ModuleNotFoundError(dotted)


def patch(key: str, make_wrapper: Callable) -> Callable[[], None]:
    """Replace the library name PATCH_POINTS[key] with make_wrapper(real); returns the undo."""
    module, attr, _ = PATCH_POINTS[key]
    owner, name, real = resolve(module, attr)
    setattr(owner, name, make_wrapper(real))
    return lambda: setattr(owner, name, real)


# --------------------------------------------------------------------------------------------- #
# hooks that run inside the child processes
# --------------------------------------------------------------------------------------------- #
_SITECUSTOMIZE = """\
import os
if os.environ.get("CACHEKIT_FAULT_DIR"):
    try:
        import sys
        if {root!r} not in sys.path:
            sys.path.append({root!r})
        from {module} import install_hooks
        install_hooks()
    except Exception as exc:  # never break the child itself
        import sys
        sys.stderr.write(f"cachekit fault hooks not installed: {{exc}}\\n")
"""


def harness_import() -> tuple[str, str]:
    """(sys.path entry, module name) under which a child process imports this module: `tests.harness.
    reliability` below the repo root (python -m from the root), `harness.reliability` below tests/ (pytest
    puts tests/ on sys.path, as for conftest)."""
    spec = globals().get("__spec__")
    name = spec.name if spec is not None and spec.name else __name__
    if name == "__main__":  # run as a file: the repo layout is known
        name = "tests.harness.reliability"
    root = Path(__file__).resolve().parents[name.count(".")]
    return str(root), name


def _event(kind: str, detail: str = ""):
    d = os.environ.get(FAULT_DIR)
    if not d:
        return
    fd = os.open(os.path.join(d, "events.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{time.monotonic():.4f} {kind} {detail}\n".encode())
    finally:
        os.close(fd)


def install_hooks():
    """Wrap the PATCH_POINTS publish (and, when asked, extract_options, safe_fit and runner_run) to log
    events and pause. Called in child processes by the generated sitecustomize."""
    before = os.environ.get("CACHEKIT_FAULT_PAUSE_BEFORE")
    after = os.environ.get("CACHEKIT_FAULT_PAUSE_AFTER")

    def publish_wrapper(real_publish):
        def publish(tmp, final):
            name = Path(final).name
            if before and fnmatch.fnmatch(name, before):
                _event("pause-before", name)
                time.sleep(PAUSE_S)
            real_publish(tmp, final)
            _event("published", name)
            if after and fnmatch.fnmatch(name, after):
                _event("pause-after", name)
                time.sleep(PAUSE_S)

        return publish

    patch("publish", publish_wrapper)
    unit_delay = float(os.environ.get("CACHEKIT_FAULT_UNIT_DELAY", "0") or 0)
    if unit_delay:
        def post_init_wrapper(real_post_init):
            def __post_init__(self):
                real_post_init(self)
                inner = self.on_unit

                def on_unit(info):
                    if inner is not None:
                        inner(info)
                    time.sleep(unit_delay)

                self.on_unit = on_unit

            return __post_init__

        patch("extract_options", post_init_wrapper)
    epoch_delay = float(os.environ.get("CACHEKIT_FAULT_EPOCH_DELAY", "0") or 0)
    if epoch_delay:
        def fit_wrapper(real_fit):
            def fit(*args, callback=None, **kw):
                def cb(entry):
                    if callback is not None:
                        callback(entry)
                    _event("epoch", str(entry.get("epoch", "")))
                    time.sleep(epoch_delay)

                return real_fit(*args, callback=cb, **kw)

            return fit

        patch("safe_fit", fit_wrapper)
    row_delay = float(os.environ.get("CACHEKIT_FAULT_ROW_DELAY", "0") or 0)
    pause_row = int(os.environ.get("CACHEKIT_FAULT_PAUSE_ROW", "0") or 0)
    if row_delay or pause_row:
        def run_wrapper(real_run):
            done = [0]

            def run(self, *args, **kw):
                if pause_row and done[0] == pause_row:  # the first `pause_row` rows are written and fsync'd
                    _event("pause-row", str(done[0]))
                    time.sleep(PAUSE_S)
                rec = real_run(self, *args, **kw)
                done[0] += 1
                time.sleep(row_delay)
                return rec

            return run

        patch("runner_run", run_wrapper)


def hook_env(events_dir: Path, **extra) -> dict:
    """Environment for a child `python -m cachekit ...` with the fault hooks on."""
    events_dir = Path(events_dir)
    events_dir.mkdir(parents=True, exist_ok=True)
    site = events_dir / "_site"
    site.mkdir(exist_ok=True)
    root, module = harness_import()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(root=root, module=module))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEKIT_FAULT_")}  # only what is asked
    # the sitecustomize first, then the folder the harness is imported from (the sitecustomize imports it)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + rest + ([root] if root not in rest else []))
    env[FAULT_DIR] = str(events_dir)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in extra.items():
        env[k] = str(v)
    return env


def read_events(events_dir: Path) -> list[tuple[str, str]]:
    p = Path(events_dir) / "events.log"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2:
            out.append((parts[1], parts[2] if len(parts) > 2 else ""))
    return out


# --------------------------------------------------------------------------------------------- #
# small helpers: HDF5 comparison, the CLI in-process
# --------------------------------------------------------------------------------------------- #


def h5_contents(path) -> tuple[dict, dict]:
    """(datasets: name -> array, attributes: 'obj@name' -> value) of an HDF5 file."""
    import h5py

    arrays, attrs = {}, {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            arrays[name] = obj[()]
        for k, v in obj.attrs.items():
            attrs[f"{name}@{k}"] = v

    with h5py.File(path, "r") as f:
        for k, v in f.attrs.items():
            attrs[f"/@{k}"] = v
        f.visititems(visit)
    return arrays, attrs


def _without_ignored(name: str, value, ignore_attrs):
    """A cache's `/@attrs_sha256` (JSON {"/path@name": sha256} of every other attribute) without the entries
    of ignored attributes (a build's `created` time differs, so does its digest)."""
    if name != "attrs_sha256":
        return value
    try:
        d = json.loads(value)
    except (TypeError, ValueError):
        return value
    if not isinstance(d, dict):
        return value
    return json.dumps({k: v for k, v in d.items() if k.rsplit("@", 1)[-1] not in ignore_attrs}, sort_keys=True)


def h5_diff(a, b, ignore_attrs=("created",)) -> list[str]:
    """Differences between two HDF5 files: every dataset (bit-exact) and every attribute (but
    `ignore_attrs`, also within a `/@attrs_sha256` digest table)."""
    import numpy as np

    (pa, aa), (pb, ab) = h5_contents(a), h5_contents(b)
    out = []
    if sorted(pa) != sorted(pb):
        out.append(f"datasets differ: only in first {sorted(set(pa) - set(pb))}, only in second {sorted(set(pb) - set(pa))}")
    for k in sorted(set(pa) & set(pb)):
        x, y = pa[k], pb[k]
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y):
            out.append(f"dataset {k} differs")
    for k in sorted(set(aa) | set(ab)):
        if k.rsplit("@", 1)[1] in ignore_attrs:
            continue
        name = k.rsplit("@", 1)[1]
        x = _without_ignored(name, aa.get(k, "<missing>"), ignore_attrs)
        y = _without_ignored(name, ab.get(k, "<missing>"), ignore_attrs)
        if not np.array_equal(np.asarray(x), np.asarray(y)):
            out.append(f"attribute {k} differs")
    return out


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def terminal_lines(text: str) -> list[str]:
    """Lines as a terminal shows them: split at newlines only (str.splitlines also splits at control
    characters such as \x1c-\x1e, \x0b, \x0c, \x85 that an echoed input may contain)."""
    return [ln.rstrip("\r") for ln in text.split("\n")] if text else []


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    exc: str | None = None  # "Type: message" of an uncaught exception (a traceback for a user)

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in terminal_lines(self.stderr) if ln.startswith("Error:")]

    @property
    def first_line(self) -> str:
        if self.exc:
            return f"TRACEBACK {self.exc}"
        if self.error_lines:
            return self.error_lines[0]
        lines = [ln for ln in terminal_lines(self.stdout + self.stderr) if ln.strip()]
        return lines[-1] if lines else ""


_CLI_LOCK = threading.Lock()  # CliRunner swaps sys.stdout/stderr: one in-process call at a time


def run_cli(args, env: dict | None = None) -> CliResult:
    """Run `cachekit ARGS` in-process with click's CliRunner."""
    from click.testing import CliRunner

    from cachekit.cli.main import cli

    with _CLI_LOCK, warnings.catch_warnings(record=True) as caught:
        # the warning filters of a plain `python -m cachekit` (pytest records more), shown on stderr
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=cat)
        res = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=True)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    exc = None
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        e = res.exception
        exc = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return CliResult(res.exit_code, res.stdout, shown + res.stderr, exc)


def run_child(args, env: dict | None = None, timeout=TIMEOUT_S) -> CliResult:
    """Run `python -m cachekit ARGS` as a child process."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "2")
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "cachekit", *map(str, args)], env=e, capture_output=True, text=True,
                       timeout=timeout)
    exc = None
    if p.returncode < 0:
        exc = f"killed by {signal.Signals(-p.returncode).name} (exit {p.returncode})"
    elif "Traceback (most recent call last)" in p.stderr:
        exc = p.stderr.strip().splitlines()[-1][:200]
    return CliResult(p.returncode, p.stdout, p.stderr, exc)


def one_line_error_problems(r: CliResult, needles=()) -> list[str]:
    """Why `r` is not a clean one-line `Error: ...` (empty when it is)."""
    p = []
    if r.exc:
        p.append(f"uncaught exception (traceback): {r.exc}")
    if r.code == 0:
        p.append("exit code 0, expected an error")
    elif r.code not in (1, 2):
        p.append(f"exit code {r.code}, expected 1 or 2")
    if "Traceback" in r.stdout + r.stderr:
        p.append("traceback printed")
    errs = r.error_lines
    if len(errs) != 1:
        p.append(f"{len(errs)} 'Error:' lines in stderr, expected 1: {r.stderr.strip()[-300:]!r}")
    elif r.code == 1:
        # cachekit's own informational lines (NOTE: ..., weights: ...) may come before the error
        other = [ln for ln in terminal_lines(r.stderr)
                 if ln.strip() and not ln.startswith(("Error:", "NOTE:", "weights:"))]
        if other:
            p.append(f"stderr has more than the error line: {other[:3]}")
    for n in needles:
        if errs and n not in errs[0]:
            p.append(f"error line does not name {n!r}: {errs[0]}")
    return p


# --------------------------------------------------------------------------------------------- #
# the commands under test
# --------------------------------------------------------------------------------------------- #
EXTRACT_ARGS = ["--model", "RN-tiny", "--shots", "1,2", "--seeds", "1,2", "--views", "2", "--batch-size", "4",
                "--dense-dtype", "float32", "-q"]
SWEEP_GRID = {"methods": {"zeroshot": {}, "tip": {"n": [[10, 5]], "s": [[7, 7], [3, 3]]},
                          "ape": {"top_k": [8, 32], "n": [[10, 5, 5]]}},
              "shots": [1, 2], "seeds": [1, 2]}
SWEEP_ROWS = (1 + 2 + 2) * 4
REFINE_ARGS = ["--top-k", "16", "--shots", "2", "--seeds", "1", "--json"]
SAFE_EPOCHS = 4
SAFE_ARGS = ["--shots", "2", "--seeds", "1", "--epochs", str(SAFE_EPOCHS), "--warmup-epochs", "0",
             "--batch-size", "4", "--json"]
UNIT_DELAY = 0.1
EPOCH_DELAY = 0.1
ROW_DELAY = 0.05


@dataclass
class Base:
    """Shared inputs: an image tree and an uninterrupted cache of it built with EXTRACT_ARGS."""

    tree: Path
    cache: Path
    work: Path

    @classmethod
    def build(cls, work: Path) -> "Base":
        work = Path(work)
        tree = make_tree(work / "base" / "data")
        cache = work / "base" / "tiny.h5"
        r = run_cli(["extract", tree, *EXTRACT_ARGS, "--out", cache])
        if r.code != 0:
            raise RuntimeError(f"building the base cache failed: {r.first_line}")
        return cls(tree, cache, work)


@dataclass
class Workspace:
    dir: Path
    events: Path
    target: Path  # the cache (or, for extract, --out)
    args: list[str]

    @property
    def results(self) -> Path:
        return self.target.with_suffix(".results")


class Command:
    """One writing command: how to set up a workspace, its arguments, its kill phases and its state."""

    name = ""
    phases: tuple[str, ...] = ()

    _refs: dict = {}  # uninterrupted results, per (command, base cache): computed once per process

    def __init__(self, base: Base):
        self.base = base

    @property
    def _ref(self):
        return Command._refs.get((self.name, str(self.base.cache), str(self.base.work)))

    @_ref.setter
    def _ref(self, value):
        Command._refs[(self.name, str(self.base.cache), str(self.base.work))] = value

    def workspace(self, d: Path) -> Workspace:
        raise NotImplementedError

    def env(self, ws: Workspace, phase: str) -> dict:
        return hook_env(ws.events)

    def wait_point(self, phase: str, rng: random.Random):
        """(description, predicate(ws) -> bool, extra delay in seconds) for a kill in `phase`."""
        raise NotImplementedError

    def state(self, ws: Workspace):
        raise NotImplementedError

    def reference(self):
        if self._ref is None:
            d = self.base.work / "reference" / self.name
            shutil.rmtree(d, ignore_errors=True)
            ws = self.workspace(d)
            r = run_cli(ws.args)
            if r.code != 0:
                raise RuntimeError(f"uninterrupted {self.name} failed: {r.first_line}")
            self._ref = (ws, self.state(ws))
        return self._ref

    def compare(self, ws: Workspace) -> list[str]:
        raise NotImplementedError

    def after_kill(self, ws: Workspace, phase: str) -> list[str]:
        """What a reader sees right after the kill: never a partial result."""
        return []

    def leftovers(self, ws: Workspace) -> list[str]:
        return []


def _count(ws: Workspace, kind: str, pattern: str = "*") -> int:
    return sum(1 for k, d in read_events(ws.events) if k == kind and fnmatch.fnmatch(d, pattern))


def _has(ws: Workspace, kind: str, pattern: str = "*") -> bool:
    return _count(ws, kind, pattern) > 0


def _copy_cache(base: Base, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    dst = d / "cache.h5"
    shutil.copy(base.cache, dst)
    return dst


def _results_view(cache: Path) -> tuple[list[dict], list[str]]:
    """(ResultStore.list() entries, problems: an entry that get() cannot return whole)."""
    from cachekit.cache import open_cache
    from cachekit.results import ResultStore

    problems = []
    with open_cache(cache) as c:
        store = ResultStore(c)
        entries = store.list()
        for e in entries:
            if store.get(e["kind"], e["params"]) is None:
                problems.append(f"listed result {e['file']} cannot be read whole")
    return entries, problems


def _tmp_files(d: Path) -> list[str]:
    return sorted(p.name for p in Path(d).glob("*.tmp")) if Path(d).is_dir() else []


class Extract(Command):
    name = "extract"
    phases = ("start", "encode", "assemble")

    def workspace(self, d):
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        out = d / "out.h5"
        return Workspace(d, d / "events", out, ["extract", str(self.base.tree), *EXTRACT_ARGS, "--out", str(out)])

    def units(self) -> int:
        from cachekit.cache import open_cache

        with open_cache(self.base.cache) as c:
            b = 4
            n = lambda s: -(-c.num_images(s) // b)  # noqa: E731
            return n("train") * (c.views + 1) + n("val") + (0 if c.val_is_test else n("test"))

    def env(self, ws, phase):
        extra = {"CACHEKIT_FAULT_UNIT_DELAY": UNIT_DELAY}
        if phase == "assemble":
            extra["CACHEKIT_FAULT_PAUSE_BEFORE"] = ws.target.name
        if phase == "publish-gap":
            extra["CACHEKIT_FAULT_PAUSE_AFTER"] = ws.target.name
        return hook_env(ws.events, **extra)

    def wait_point(self, phase, rng):
        if phase == "start":
            d = rng.uniform(0, UNIT_DELAY)
            return (f"{d:.2f}s after the plan was written", lambda ws: _has(ws, "published", "plan.json"), d)
        if phase == "encode":
            n = rng.randint(1, self.units() - 1)
            d = rng.uniform(0, UNIT_DELAY * 0.9)
            return (f"{d:.2f}s after batch {n}/{self.units()} was published",
                    lambda ws: _count(ws, "published", "seg-*") >= n, d)
        if phase == "assemble":
            d = rng.uniform(0, 0.5)
            return (f"assembled .tmp complete, before its rename (+{d:.2f}s)",
                    lambda ws: _has(ws, "pause-before"), d)
        if phase == "publish-gap":
            return ("after the rename onto OUT, before removing OUT.parts",
                    lambda ws: _has(ws, "pause-after"), 0.0)
        raise ValueError(phase)

    def state(self, ws):
        return ws.target

    def reference(self):
        # The base cache was built by this very command (EXTRACT_ARGS on the base tree), uninterrupted.
        return (None, self.base.cache)

    def compare(self, ws):
        from cachekit.cache import open_cache
        from cachekit.verify import verify

        if not ws.target.exists():
            return [f"{ws.target.name} does not exist after the rerun"]
        p = [f"cache vs uninterrupted: {x}" for x in h5_diff(self.reference()[1], ws.target)]
        with open_cache(ws.target) as c:
            rep = verify(c)
        if not rep.ok:
            p.append("verify failed: " + ", ".join(c["check"] for c in rep.failed))
        return p

    def after_kill(self, ws, phase):
        if ws.target.exists():  # only legitimate once the rename happened
            from cachekit.cache import open_cache
            from cachekit.verify import verify

            try:
                with open_cache(ws.target) as c:
                    if not verify(c).ok:
                        return [f"{ws.target.name} exists after the kill but fails verify"]
            except Exception as exc:  # noqa: BLE001
                return [f"{ws.target.name} exists after the kill but cannot be opened: {exc}"]
        return []

    def leftovers(self, ws):
        left = []
        for p in (ws.target.with_name(ws.target.name + ".tmp"), ws.target.with_name(ws.target.name + ".parts")):
            if p.exists():
                left.append(p.name)
        return left


class _ResultCommand(Command):
    """A command that stores a result next to a copy of the base cache (refine, fit-safe)."""

    kind = ""
    args: list = []  # the command's options after the cache path

    def workspace(self, d):
        d = Path(d)
        cache = _copy_cache(self.base, d)
        return Workspace(d, d / "events", cache, [self.name, str(cache), *self.args])

    def state(self, ws):
        entries, _ = _results_view(ws.target)
        return [e for e in entries if e["kind"] == self.kind]

    def compare(self, ws):
        ref_ws, ref_entries = self.reference()
        entries, problems = _results_view(ws.target)
        mine = [e for e in entries if e["kind"] == self.kind]
        p = list(problems)
        if [e["file"] for e in mine] != [e["file"] for e in ref_entries]:
            return p + [f"results {[e['file'] for e in mine]} != uninterrupted {[e['file'] for e in ref_entries]}"]
        for e in mine:
            diff = h5_diff(ref_ws.results / e["file"], ws.results / e["file"], ignore_attrs=self.ignore_attrs)
            p += [f"{e['file']} vs uninterrupted: {x}" for x in diff]
        if file_sha256(ws.target) != file_sha256(self.base.cache):
            p.append("the cache file itself changed")
        return p

    ignore_attrs = ("created",)

    def after_kill(self, ws, phase):
        entries, problems = _results_view(ws.target)
        if phase.startswith("before") or phase in ("train",):
            if any(e["kind"] == self.kind for e in entries):
                problems.append("a result is listed although the kill came before its rename")
        if file_sha256(ws.target) != file_sha256(self.base.cache):
            problems.append("the cache file changed")
        return problems

    def leftovers(self, ws):
        return _tmp_files(ws.results)


class Refine(_ResultCommand):
    name = "refine"
    kind = "refine"
    phases = ("before-rename", "after-rename")
    args = REFINE_ARGS

    def env(self, ws, phase):
        key = "CACHEKIT_FAULT_PAUSE_BEFORE" if phase == "before-rename" else "CACHEKIT_FAULT_PAUSE_AFTER"
        return hook_env(ws.events, **{key: "refine-*.h5"})

    def wait_point(self, phase, rng):
        d = rng.uniform(0, 0.3)
        kind = "pause-before" if phase == "before-rename" else "pause-after"
        what = "result .tmp complete, before its rename" if phase == "before-rename" else "right after the rename"
        return (f"{what} (+{d:.2f}s)", lambda ws: _has(ws, kind), d)


class FitSafe(_ResultCommand):
    name = "fit-safe"
    kind = "safe"
    phases = ("train", "before-rename")
    args = SAFE_ARGS

    def env(self, ws, phase):
        extra = {"CACHEKIT_FAULT_EPOCH_DELAY": EPOCH_DELAY}
        if phase == "before-rename":
            extra["CACHEKIT_FAULT_PAUSE_BEFORE"] = "safe-*.h5"
        return hook_env(ws.events, **extra)

    def wait_point(self, phase, rng):
        if phase == "train":
            n = rng.randint(1, SAFE_EPOCHS - 1)
            d = rng.uniform(0, EPOCH_DELAY * 0.9)
            return (f"{d:.2f}s after epoch {n}/{SAFE_EPOCHS}", lambda ws: _count(ws, "epoch") >= n, d)
        d = rng.uniform(0, 0.3)
        return (f"fitted layer .tmp complete, before its rename (+{d:.2f}s)", lambda ws: _has(ws, "pause-before"), d)


def read_rows(path: Path) -> tuple[list[dict], bool]:
    """(complete JSON rows, whether a torn last line is present)."""
    if not path.exists():
        return [], False
    data = path.read_bytes()
    torn = bool(data) and not data.endswith(b"\n")
    lines = data.split(b"\n")
    if torn:
        lines = lines[:-1]
    rows = [json.loads(x) for x in lines if x.strip()]
    return rows, torn


class Sweep(Command):
    name = "sweep"
    phases = ("rows", "between-rows")

    def workspace(self, d):
        d = Path(d)
        cache = _copy_cache(self.base, d)
        grid = d / "grid.json"
        grid.write_text(json.dumps(SWEEP_GRID))
        out = d / "rows.jsonl"
        ws = Workspace(d, d / "events", cache, ["sweep", str(cache), "--grid", str(grid), "--out", str(out), "--json"])
        ws.rows = out  # type: ignore[attr-defined]
        return ws

    def env(self, ws, phase):
        return hook_env(ws.events, CACHEKIT_FAULT_ROW_DELAY=ROW_DELAY)

    def wait_point(self, phase, rng):
        n = rng.randint(1, SWEEP_ROWS - 1)
        if phase == "between-rows":
            return (f"paused after row {n}/{SWEEP_ROWS} was fsync'd, before the next",
                    lambda ws: _has(ws, "pause-row"), 0.0, {"CACHEKIT_FAULT_PAUSE_ROW": n})
        d = rng.uniform(0, ROW_DELAY * 1.5)

        def ready(ws):
            p = ws.rows
            return p.exists() and p.read_bytes().count(b"\n") >= n

        return (f"{d:.2f}s after row {n}/{SWEEP_ROWS}", ready, d)

    def state(self, ws):
        return read_rows(ws.rows)[0]

    def compare(self, ws):
        rows, torn = read_rows(ws.rows)
        ref = self.reference()[1]
        p = []
        if torn:
            p.append("a torn last line is left")
        keys = [r["key"] for r in rows]
        if len(set(keys)) != len(keys):
            p.append(f"{len(keys) - len(set(keys))} duplicate row(s)")
        got = [(r["key"], r["metrics"], r["params"]) for r in rows]
        want = [(r["key"], r["metrics"], r["params"]) for r in ref]
        if got != want:
            bad = sum(1 for a, b in zip(got, want) if a != b) + abs(len(got) - len(want))
            p.append(f"rows differ from the uninterrupted sweep ({len(got)} vs {len(want)} rows, {bad} differ)")
        if file_sha256(ws.target) != file_sha256(self.base.cache):
            p.append("the cache file changed")
        return p

    def after_kill(self, ws, phase):
        try:
            read_rows(ws.rows)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return [f"a complete line is not JSON: {exc}"]
        return []

    def leftovers(self, ws):
        return []


COMMANDS: dict[str, type[Command]] = {"extract": Extract, "refine": Refine, "fit-safe": FitSafe, "sweep": Sweep}
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT}
# SIGTERM (a batch scheduler's preemption, `kill PID`): Python dies at once, as with SIGKILL, exit -15.
REPORT_SIGNALS = {**SIGNALS, "SIGTERM": signal.SIGTERM}


# --------------------------------------------------------------------------------------------- #
# one kill trial: start, wait for the point, signal, check, rerun, compare
# --------------------------------------------------------------------------------------------- #
@dataclass
class Trial:
    command: str
    signal: str
    phase: str
    seed: int
    dir: Path
    point: str = ""
    pid: int = 0
    killed: bool = False  # the process was still running when signalled
    rc: int | None = None
    stderr: str = ""
    problems: list[str] = field(default_factory=list)
    rerun_rc: int | None = None
    rerun_line: str = ""
    leftovers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    extra: list = field(default_factory=list)  # (what, ok, detail) of checks made at the kill point

    @property
    def survived(self) -> bool:
        return self.killed and not self.problems

    def describe(self) -> str:
        return (f"{self.command} {self.signal} [{self.phase}] at {self.point}: "
                + ("survived" if self.survived else "; ".join(self.problems) or "not killed"))


def _sigint_default():
    # A shell starts background jobs with SIGINT ignored and children inherit that; the victim stands for a
    # command in a terminal, where Ctrl-C reaches it, whatever way the harness itself was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Victim:
    """A `python -m cachekit ...` child in its own session (so a signal can go to its group)."""

    def __init__(self, args, env, log: Path):
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "cachekit", *map(str, args)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True,
                                     preexec_fn=_sigint_default)

    def wait_until(self, predicate, timeout=TIMEOUT_S) -> bool:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if predicate():
                return True
            if self.proc.poll() is not None:
                return bool(predicate())
            time.sleep(0.02)
        return False

    def signal(self, sig):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def finish(self, timeout=TIMEOUT_S) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            rc = self.proc.wait()
        self.log.close()
        return rc


def start_trial(cmd: Command, sig_name: str, phase: str, seed: int, d: Path, on_point=None) -> Trial:
    """Run the command as a child and kill it at a seeded point of `phase` (blocking). At the point,
    before the signal, `on_point(workspace, pid)` may run checks against the live writer; it returns
    rows (what, ok, detail) kept in `Trial.extra`."""
    t = Trial(cmd.name, sig_name, phase, seed, Path(d))
    rng = random.Random(f"{cmd.name}/{sig_name}/{phase}/{seed}")
    shutil.rmtree(d, ignore_errors=True)
    ws = cmd.workspace(d)
    t.point, predicate, delay, *more = cmd.wait_point(phase, rng)
    env = cmd.env(ws, phase)
    env.update({k: str(v) for k, v in (more[0] if more else {}).items()})
    t0 = time.monotonic()
    v = Victim(ws.args, env, Path(d) / "stderr.txt")
    t.pid = v.proc.pid
    reached = v.wait_until(lambda: predicate(ws))
    if reached and delay:
        time.sleep(delay)
    if reached and on_point is not None and v.proc.poll() is None:
        t.extra += on_point(ws, v.proc.pid)
    t.killed = reached and v.proc.poll() is None
    if t.killed:
        v.signal(REPORT_SIGNALS[sig_name])
    else:
        v.signal(signal.SIGKILL)
    t.rc = v.finish()
    t.stderr = (Path(d) / "stderr.txt").read_text(errors="replace")
    t.seconds = time.monotonic() - t0
    t._ws = ws  # type: ignore[attr-defined]
    if not t.killed:
        t.problems.append(f"kill point not reached (exit {t.rc}): {t.stderr.strip()[-300:]}")
    return t


def finish_trial(cmd: Command, t: Trial) -> Trial:
    """Check what the kill left, rerun the same command in-process, compare with an uninterrupted run.
    A check that itself fails (e.g. a result format the harness does not know) is a problem of this
    trial, not an error of the whole run."""
    try:
        return _finish_trial(cmd, t)
    except Exception as exc:  # noqa: BLE001
        t.problems.append(f"harness check failed: {type(exc).__name__}: {exc}")
        return t


def _finish_trial(cmd: Command, t: Trial) -> Trial:
    if not t.killed:
        return t
    ws = t._ws  # type: ignore[attr-defined]
    if t.signal == "SIGINT":
        if t.rc != 130:
            t.problems.append(f"SIGINT exit code {t.rc}, expected 130")
        if "Traceback" in t.stderr:
            t.problems.append("SIGINT printed a traceback: " + t.stderr.strip().splitlines()[-1][:200])
        if not ("Interrupted:" in t.stderr and "rerun the same command to resume" in t.stderr):
            t.problems.append(f"SIGINT message missing: {t.stderr.strip()[-200:]!r}")
    elif t.rc != -REPORT_SIGNALS[t.signal]:
        t.problems.append(f"{t.signal} exit code {t.rc}")
    t.problems += [f"after the kill: {x}" for x in cmd.after_kill(ws, t.phase)]
    r = run_cli(ws.args)
    t.rerun_rc, t.rerun_line = r.code, r.first_line
    if r.code != 0:
        t.problems.append(f"rerun failed (exit {r.code}): {r.first_line}")
        return t
    t.problems += cmd.compare(ws)
    t.leftovers = cmd.leftovers(ws)
    if t.leftovers:
        t.problems.append(f"left behind after the rerun: {', '.join(t.leftovers)}")
    return t


def run_trials(base: Base, plan: list[tuple], work: Path, parallel: int = 4,
               commands: dict | None = None) -> list[Trial]:
    """Up to `parallel` children are killed at a time (threads); each killed trial is then checked and
    rerun in this process as soon as it is done, while the other children run.
    A plan entry is (command, signal, phase, seed) or (command, signal, phase, seed, on_point)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    commands = commands if commands is not None else {}
    for name, *_ in plan:
        commands.setdefault(name, COMMANDS[name](base))
    trials: list[Trial | None] = [None] * len(plan)

    def kill(i):
        name, sig, phase, seed, *hook = plan[i]
        return i, start_trial(commands[name], sig, phase, seed,
                              Path(work) / f"{i:03d}-{name}-{sig}-{phase}-{seed}", hook[0] if hook else None)

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        for fut in as_completed([pool.submit(kill, i) for i in range(len(plan))]):
            i, t = fut.result()
            trials[i] = finish_trial(commands[t.command], t)
    return trials


def scenario_plan(seed: int = 0) -> list[tuple]:
    """One kill per command and signal at fixed phases, with checks against the live writer:
    a second writer and a reader of --out during extract, readers during refine and sweep, a second
    sweep; plus the kill between extract's final rename and the removal of OUT.parts."""
    return [
        ("extract", "SIGKILL", "assemble", seed, both(second_writer_at, reader_of_out_at)),
        ("extract", "SIGINT", "encode", seed),
        ("refine", "SIGKILL", "after-rename", seed),
        ("refine", "SIGINT", "before-rename", seed, readers_at),
        ("fit-safe", "SIGKILL", "before-rename", seed),
        ("fit-safe", "SIGINT", "train", seed),
        ("sweep", "SIGKILL", "rows", seed),
        ("sweep", "SIGINT", "between-rows", seed, both(second_writer_at, readers_at)),
        ("extract", "SIGKILL", "publish-gap", seed),
    ]


def random_plan(commands, signals, kills: int, seed: int, phases: dict | None = None) -> list[tuple]:
    """`kills` seeded random kill points per (command, signal): a phase, then a point in it."""
    rng = random.Random(seed)
    plan = []
    for name in commands:
        ph = (phases or {}).get(name) or COMMANDS[name].phases
        for sig in signals:
            for _ in range(kills):
                plan.append((name, sig, rng.choice(ph), rng.randrange(1 << 30)))
    return plan


# --------------------------------------------------------------------------------------------- #
# concurrency: two writers, readers during a write
# --------------------------------------------------------------------------------------------- #
def second_writer_at(ws: Workspace, pid: int) -> list[tuple[str, bool, str]]:
    """At a kill point: the same command again, in-process, must be refused naming the writer's PID."""
    r = run_cli(ws.args)
    prob = one_line_error_problems(r, [f"in use by PID {pid}"]) + ([] if r.code == 1 else [f"exit {r.code}"])
    return [(f"second `{ws.args[0]}` on the same output while the first runs", not prob,
             r.first_line if not prob else "; ".join(prob))]


def readers_at(ws: Workspace, pid: int) -> list[tuple[str, bool, str]]:
    """At a kill point of a writer next to a complete cache (refine, fit-safe, sweep): info, eval and
    verify work, and ResultStore.list/get show no partial result."""
    rows = []
    bad, names = [], []
    for args in (["info", ws.target], ["eval", ws.target, "--method", "zeroshot", "--json"],
                 ["verify", ws.target, "--quick"]):
        r = run_cli(args)
        names.append(args[0])
        if r.code != 0:
            bad.append(f"{args[0]}: {r.first_line}")
    entries, problems = _results_view(ws.target)
    tmp = _tmp_files(ws.results)
    rows.append((f"readers (info, eval, verify) while `{ws.args[0]}` writes", not bad,
                 "; ".join(bad) or "all exit 0"))
    rows.append((f"ResultStore.list/get while `{ws.args[0]}` writes", not problems,
                 "; ".join(problems) or f"{len(entries)} result(s) listed, all readable whole; "
                 f"{len(tmp)} .tmp file(s) on disk, not listed"))
    return rows


def check_shards(base: Base, work: Path, concurrent: bool = True) -> list[tuple[str, bool, str]]:
    """extract --num-shards 2: both shards (at once, as children, like a SLURM array; or one after the
    other in-process) exit 0 without a traceback, and the cache equals the single-process one."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "sharded.h5"
    calls = [["extract", base.tree, *EXTRACT_ARGS, "--out", out, "--num-shards", "2", "--shard-index", str(i)]
             for i in range(2)]
    if concurrent:
        e = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        procs = [subprocess.Popen([sys.executable, "-m", "cachekit", *map(str, c)], env=e, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for c in calls]
        results = []
        for p in procs:
            so, se = p.communicate(timeout=TIMEOUT_S)
            exc = se.strip().splitlines()[-1][:200] if "Traceback (most recent call last)" in se else None
            results.append(CliResult(p.returncode, so, se, exc))
    else:
        results = [run_cli(c) for c in calls]
    prob = [f"shard {i}: exit {r.code}, {r.first_line}" for i, r in enumerate(results) if r.code != 0 or r.exc]
    if not out.exists():
        prob.append("no cache assembled")
    else:
        prob += [f"vs single process: {x}" for x in h5_diff(base.cache, out)]
    how = "started together (children)" if concurrent else "one after the other"
    return [(f"extract --num-shards 2, shards {how}: both exit 0, same cache", not prob,
             "; ".join(prob) or " / ".join(r.first_line for r in results))]


def check_overwrite_resume(base: Base, work: Path) -> list[tuple[str, bool, str]]:
    """`extract --overwrite` interrupted (SIGINT) part-way, then rerun as its message says: the batches
    already encoded must not be encoded again (at scale they are hours of GPU time)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "ow.h5"
    shutil.copy(base.cache, out)  # an existing cache: the reason to pass --overwrite
    args = ["extract", base.tree, *EXTRACT_ARGS, "--out", out, "--overwrite"]
    ev = work / "events"
    v = Victim(args, hook_env(ev, CACHEKIT_FAULT_UNIT_DELAY=UNIT_DELAY), work / "stderr.txt")
    reached = v.wait_until(lambda: _count(Workspace(work, ev, out, args), "published", "seg-*") >= 6)
    if reached and v.proc.poll() is None:
        v.signal(signal.SIGINT)
    rc = v.finish()
    msg = (work / "stderr.txt").read_text(errors="replace").strip().splitlines()
    msg = msg[-1] if msg else ""
    done = len(list(out.with_name(out.name + ".parts").glob("seg-*.h5")))
    rerun = [a for a in args if a != "--overwrite"] if "without --overwrite" in msg else args
    encoded = []

    def counting_wrapper(real):
        def counting(tmp, final):
            if Path(final).name.startswith("seg-"):
                encoded.append(Path(final).name)
            return real(tmp, final)

        return counting

    undo = patch("extract_publish", counting_wrapper)
    try:
        r = run_cli(rerun)
    finally:
        undo()
    prob = []
    if rc != 130 or not reached:
        prob.append(f"the interrupted run exited {rc}")
    if r.code != 0:
        prob.append(f"rerun failed: {r.first_line}")
    elif encoded and len(encoded) > Extract(base).units() - done:
        prob.append(f"the rerun ({'same command' if rerun == args else 'without --overwrite'}) encoded "
                    f"{len(encoded)} batches again although {done} were finished and kept")
    else:
        prob += [f"vs uninterrupted: {x}" for x in h5_diff(base.cache, out)]
    return [("extract --overwrite interrupted, then rerun as its message says: finished batches are reused",
             not prob, "; ".join(prob) or f"{done} batches kept, {len(encoded)} encoded by the rerun; message: {msg}")]


def check_sweep_shared_out(base: Base, work: Path) -> list[tuple[str, bool, str]]:
    """Two different caches swept into one --out (or a cache rebuilt with other settings at the same
    path, swept again): the second sweep must run its own rows, not skip them as 'already done'."""
    import h5py

    from cachekit.schema import seal

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    a, b = work / "a.h5", work / "b.h5"
    shutil.copy(base.cache, a)
    shutil.copy(base.cache, b)
    with h5py.File(b, "r+") as f:  # another cache: other weights (init seed), built at another time
        ident = json.loads(f.attrs["identity"])
        ident["init_seed"] = 12345
        f.attrs["identity"] = json.dumps(ident, sort_keys=True)
        f.attrs["init_seed"] = 12345
        f.attrs["created"] = "2000-01-01T00:00:00+00:00"
        seal(f)  # a consistent attribute digest table, as the writer leaves it
    grid = work / "grid.json"
    grid.write_text(json.dumps({"methods": ["zeroshot"], "shots": [1, 2], "seeds": [1]}))
    out = work / "all.jsonl"
    ra = run_cli(["sweep", a, "--grid", grid, "--out", out, "--json"])
    rb = run_cli(["sweep", b, "--grid", grid, "--out", out, "--json"])
    rows, _ = read_rows(out)
    per = {str(a): 0, str(b): 0}
    for r in rows:
        per[r.get("cache", "?")] = per.get(r.get("cache", "?"), 0) + 1
    prob = [f"sweep {n} exit {r.code}: {r.first_line}" for n, r in (("A", ra), ("B", rb)) if r.code != 0]
    if per.get(str(b), 0) != 2:
        prob.append(f"rows of cache B in the file: {per.get(str(b), 0)} of 2 (skipped as 'already done' because "
                    "they match cache A's rows)")
    return [("sweep of another cache into the same --out runs its own rows", not prob,
             "; ".join(prob) or f"rows per cache: {per}")]


_PUT_LOOP = """
import sys
from cachekit.cache import open_cache
from cachekit.errors import CachekitError
from cachekit.runner import store_refine
fails = []
with open_cache(sys.argv[1]) as c:
    for i in range(int(sys.argv[2])):
        try:
            store_refine(c, 2, 1, 1 + i % 64, (0.5, 0.5))
        except CachekitError as exc:
            fails.append(str(exc))
print(len(fails), fails[0] if fails else "")
"""


def check_concurrent_results(base: Base, work: Path, puts: int = 60) -> list[tuple[str, bool, str]]:
    """Two processes store results next to the same cache at once (parallel fit-safe / sweep / refine
    jobs): every store must succeed (each result is its own atomically published file)."""
    from cachekit.cache import open_cache
    from cachekit.errors import CachekitError
    from cachekit.runner import store_refine

    work = Path(work)
    cache = _copy_cache(base, work)
    e = dict(os.environ)
    e.pop(FAULT_DIR, None)
    child = subprocess.Popen([sys.executable, "-c", _PUT_LOOP, str(cache), str(puts)], env=e,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fails, detail = 0, []
    with open_cache(cache) as c:  # this process is the second writer, once the child has started storing
        store_dir = cache.with_suffix(".results")
        t0 = time.monotonic()
        while not any(store_dir.glob("*.h5")) and child.poll() is None and time.monotonic() - t0 < TIMEOUT_S:
            time.sleep(0.01)
        for i in range(puts):
            try:
                store_refine(c, 2, 1, 1 + (i * 7) % 64, (0.5, 0.5))
            except CachekitError as exc:
                fails += 1
                detail = detail or [str(exc)]
    so, se = child.communicate(timeout=TIMEOUT_S)
    if child.returncode != 0:
        detail.append(f"child exit {child.returncode}: {se.strip()[-200:]}")
    else:
        n, _, msg = so.strip().partition(" ")
        fails += int(n)
        if int(n) and not detail:
            detail.append(msg)
    _, bad = _results_view(cache)
    ok = not fails and not detail and not bad
    return [("two processes storing results next to the same cache at once", ok,
             f"{2 * puts} stores, {fails} refused" + (f": {detail[0]}" if detail else "") + ("; " + "; ".join(bad) if bad else ""))]


def reader_of_out_at(ws: Workspace, pid: int) -> list[tuple[str, bool, str]]:
    """At a kill point of extract: `info OUT` says cleanly that there is no cache yet."""
    r = run_cli(["info", ws.target])
    prob = one_line_error_problems(r, ["does not exist"]) if not ws.target.exists() else (
        [] if r.code == 0 else [r.first_line])
    return [("`info` on the --out of a running extract", not prob, r.first_line if not prob else "; ".join(prob))]


def both(*fns):
    def on_point(ws, pid):
        return [row for fn in fns for row in fn(ws, pid)]

    return on_point


# --------------------------------------------------------------------------------------------- #
# disk full and read-only locations
# --------------------------------------------------------------------------------------------- #
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """Mount a tmpfs of `size` at `path` (root only); yields False when mounting is impossible."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
    except OSError:
        yield False
        return
    if r.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only_bind(src: Path, dst: Path):
    """A read-only bind mount of `src` at `dst` (root only); yields False when impossible."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True)
    except OSError:
        yield False
        return
    if r.returncode != 0:
        yield False
        return
    try:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], capture_output=True)
        probe = dst / ".rw-probe"
        try:
            probe.write_text("x")
            probe.unlink()
            writable = True
        except OSError:
            writable = False
        yield r.returncode == 0 and not writable
    finally:
        subprocess.run(["umount", "-l", str(dst)], capture_output=True)


def fill(path: Path, leave_bytes: int):
    """Fill the filesystem holding `path` until about `leave_bytes` remain."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    n = max(0, free - leave_bytes)
    with open(Path(path) / "filler.bin", "wb") as fh:
        while n > 0:
            k = min(n, 1 << 20)
            try:
                fh.write(b"\0" * k)
                fh.flush()
            except OSError:
                break
            n -= k


@contextlib.contextmanager
def inject_oserror(err: int, where: str = ""):
    """In-process fallback: every file opened for writing (h5py, open, os.open) under `where` fails."""
    import builtins

    import h5py

    real_h5 = h5py.File.__init__
    real_open = builtins.open
    real_os_open = os.open

    def hit(name) -> bool:
        return str(os.fspath(name)).startswith(where) if where else True

    def h5_init(self, name, mode="r", *a, **kw):
        if mode not in ("r",) and hit(name):
            raise OSError(err, os.strerror(err), str(name))
        return real_h5(self, name, mode, *a, **kw)

    def _open(file, mode="r", *a, **kw):
        if any(c in mode for c in "wax+") and isinstance(file, (str, os.PathLike)) and hit(file):
            raise OSError(err, os.strerror(err), str(file))
        return real_open(file, mode, *a, **kw)

    def _os_open(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and hit(path):
            raise OSError(err, os.strerror(err), str(path))
        return real_os_open(path, flags, *a, **kw)

    h5py.File.__init__ = h5_init
    builtins.open = _open
    os.open = _os_open
    try:
        yield
    finally:
        h5py.File.__init__ = real_h5
        builtins.open = real_open
        os.open = real_os_open


def _verify_ok(cache: Path) -> bool:
    r = run_cli(["verify", cache, "--quick"])
    return r.code == 0


def disk_full_extract(base: Base, work: Path, size: str = "1m") -> tuple[str, bool, str]:
    """extract (a small tree, SMALL_EXTRACT) onto a small tmpfs: with 1m it runs out of space while
    assembling (the attention-pooling weights alone are larger), with 100k while writing the batches;
    then room is made and the same command is rerun: it must resume to the same cache as an
    uninterrupted run."""
    work = Path(work) / size
    tree = _split_tree(work / "small-tree")
    args = ["extract", tree, *SMALL_EXTRACT]
    ref = work / "reference.h5"
    r0 = run_cli([*args, "--out", ref])
    if r0.code != 0:
        return ("extract --out on a full disk", False, f"uninterrupted run failed: {r0.first_line}")
    mnt = work / "tmpfs-extract"
    with tmpfs(mnt, size) as mounted:
        if not mounted:
            out = work / "enospc" / "c.h5"
            with inject_oserror(errno.ENOSPC, str(out.parent)):
                r = run_cli([*args, "--out", out])
            prob = one_line_error_problems(r, ["no space left"])
            return ("extract --out with ENOSPC injected (no tmpfs)", not prob, r.first_line if not prob else "; ".join(prob))
        out = mnt / "c.h5"
        # A child process: h5py can crash the process that saw the failed write, and that must not be this one.
        r = run_child([*args, "--out", out])
        prob = one_line_error_problems(r, ["no space left", "fix:"])
        if out.exists():
            prob.append("a cache file exists after the failure")
        subprocess.run(["mount", "-o", "remount,size=32m", str(mnt)], capture_output=True)
        r2 = run_cli([*args, "--out", out])
        if r2.code != 0:
            prob.append(f"rerun after making room failed: {r2.first_line}")
        else:
            prob += [f"after resuming: {x}" for x in h5_diff(ref, out)]
            if not _verify_ok(out):
                prob.append("verify fails after resuming")
        return (f"extract --out on a full disk ({size} tmpfs), then room made and the same command rerun",
                not prob, r.first_line if not prob else "; ".join(prob))


def disk_full_writer(base: Base, work: Path, name: str, free: int, child: bool = True,
                     rerun: bool = True) -> tuple[str, bool, str] | None:
    """refine / fit-safe / sweep next to an existing cache on a tmpfs with `free` bytes left: a one-line
    error, the cache intact, no partial result; then room is made and the same command reruns to the
    uninterrupted result. `child`: run the failing call as a child process (a failed call can leave a
    lock held or h5py objects behind in the calling process). `rerun=False`: only the failing call (a
    SAFE fit for one epoch). None when no tmpfs can be mounted and `free` is 0 (the in-process fallback
    cannot tell 0 bytes from a few)."""
    cmd = COMMANDS[name](base)
    work = Path(work)
    mnt = work / f"tmpfs-{name}-{free}"
    size = 2 * base.cache.stat().st_size + (4 << 20)  # room for the cache and, later, a SAFE fit
    with tmpfs(mnt, str(size)) as mounted:
        if not mounted and free == 0:
            return None
        ws = cmd.workspace(mnt / "ws")
        if not rerun and name == "fit-safe":
            ws.args = [*ws.args, "--epochs", "1"]
        if mounted:
            # on a real disk the lock file of an earlier run exists already
            ws.target.with_suffix(".results.lock").touch()
            fill(mnt, free)
            label = f"{free // 1024} KiB free" if free else "0 bytes free"
            r = run_child(ws.args) if child else run_cli(ws.args)
        else:
            label = "ENOSPC injected"
            with inject_oserror(errno.ENOSPC, str(ws.dir)):
                r = run_cli(ws.args)
        prob = one_line_error_problems(r, ["no space left", "fix:"])
        if not _verify_ok(ws.target):
            prob.append("the existing cache no longer verifies")
        _, bad = _results_view(ws.target)
        prob += bad
        if file_sha256(ws.target) != file_sha256(base.cache):
            prob.append("the cache file changed")
        with contextlib.suppress(OSError):
            (mnt / "filler.bin").unlink()
        if not rerun:
            return (f"{name} next to an existing cache, disk full ({label})", not prob,
                    r.first_line if not prob else "; ".join(prob))
        r2 = run_cli(ws.args)
        if r2.code != 0:
            prob.append(f"rerun after making room failed: {r2.first_line}")
        else:
            prob += [f"after rerun: {x}" for x in cmd.compare(ws)]
        return (f"{name} next to an existing cache, disk full ({label}), then room made and rerun",
                not prob, r.first_line if not prob else "; ".join(prob))


def check_disk_full(base: Base, work: Path, free_bytes=(8 << 10, 0)) -> list[tuple[str, bool, str]]:
    """ENOSPC for every writing command. Rows: (what, ok, detail)."""
    rows = [disk_full_extract(base, work, size) for size in ("1m", "100k", "2m")]
    for name in ("refine", "fit-safe", "sweep"):
        for free in free_bytes:
            row = disk_full_writer(base, work, name, free)
            if row is not None:
                rows.append(row)
    return rows


def check_read_only(base: Base, work: Path) -> list[tuple[str, bool, str]]:
    rows = []
    work = Path(work)
    src = work / "ro-src"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copy(base.cache, src / "tiny.h5")
    mnt = work / "ro"
    grid = work / "grid-ro.json"
    grid.write_text(json.dumps(SWEEP_GRID))
    with read_only_bind(src, mnt) as mounted:
        cache = mnt / "tiny.h5"
        if not mounted:  # a plain folder: everything under it gets EROFS injected
            mnt.mkdir(parents=True, exist_ok=True)
            shutil.copy(base.cache, cache)
        calls = [
            ("extract --out in a read-only folder", ["extract", base.tree, *EXTRACT_ARGS, "--out", mnt / "new.h5"], ["Read-only"]),
            ("refine on a cache in a read-only folder", ["refine", cache, *REFINE_ARGS], ["Read-only"]),
            ("fit-safe on a cache in a read-only folder", ["fit-safe", cache, *SAFE_ARGS[:-1], "--epochs", "1"], ["Read-only"]),
            ("sweep on a cache in a read-only folder", ["sweep", cache, "--grid", grid, "--json"], ["Read-only"]),
            ("eval --out in a read-only folder", ["eval", cache, "--method", "zeroshot", "--out", mnt / "rows.jsonl"],
             ["Read-only"]),
        ]
        for what, args, needles in calls:
            if mounted:
                r = run_cli(args)
            else:
                with inject_oserror(errno.EROFS, str(mnt) + os.sep):
                    r = run_cli(args)
            prob = one_line_error_problems(r, needles)
            rows.append((what + ("" if mounted else " (EROFS injected)"), not prob,
                         r.first_line if not prob else "; ".join(prob)))
        ok = run_cli(["verify", cache, "--quick"]).code == 0 and run_cli(["info", cache]).code == 0
        rows.append(("info and verify of a cache in a read-only folder", ok, "exit 0" if ok else "failed"))
    return rows


# --------------------------------------------------------------------------------------------- #
# bad inputs
# --------------------------------------------------------------------------------------------- #
SMALL_EXTRACT = ["--model", "RN-tiny", "--shots", "1", "--seeds", "1", "--views", "0", "--batch-size", "8",
                 "--dense-dtype", "float32", "-q"]


@dataclass
class Call:
    args: list
    needles: tuple = ()
    out: Path | None = None  # an extract --out that must not exist afterwards (or must be unchanged)
    check: Callable[[CliResult], list[str]] | None = None
    child: bool = False  # run as `python -m cachekit` (what a user sees: warnings filters, stderr, crashes)


@dataclass
class BadCase:
    id: str
    what: str
    build: Callable[["Base", Path], Call]
    expect: str = "error"  # "error" or "ok"
    bug: str | None = None


def _split_tree(root: Path, per=(3, 2, 2), classes=2, seed=0) -> Path:
    for split, n in zip(("train", "val", "test"), per):
        make_tree(root / split, classes=classes, per_class=n, seed=seed + len(split))
    return root


def _png_header_only(path: Path, w: int, h: int):
    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _bad_image_case(kind: str, name: str):
    def build(base, d):
        from PIL import Image

        root = _split_tree(d / "data")
        p = root / "val" / "class_1" / name
        if kind == "corrupt":
            p.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
        elif kind == "truncated-jpeg":
            src = d / "full.jpg"
            Image.linear_gradient("L").convert("RGB").resize((120, 90)).save(src, quality=90)
            data = src.read_bytes()
            p.write_bytes(data[: len(data) // 2])
        elif kind == "truncated-png":
            src = d / "full.png"
            Image.effect_noise((120, 90), 60).convert("RGB").save(src)
            data = src.read_bytes()
            p.write_bytes(data[: len(data) // 2])
        elif kind == "text":
            p.write_text("this is not an image\n")
        elif kind == "empty":
            p.write_bytes(b"")
        elif kind == "bomb":
            _png_header_only(p, 25000, 20000)
        out = d / "c.h5"
        return Call(["extract", root, *SMALL_EXTRACT, "--out", out], (name,), out, child=kind == "bomb")

    return build


def _modes_tree(base, d):
    import numpy as np
    from PIL import Image

    root = _split_tree(d / "data", per=(3, 1, 2))
    v0, v1 = root / "val" / "class_0", root / "val" / "class_1"
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8))
    rgb.convert("L").save(v0 / "m_gray.png")
    rgb.convert("P").save(v0 / "m_palette.png")
    pt = rgb.convert("P")
    pt.info["transparency"] = 0
    pt.save(v0 / "m_palette_transparent.png", transparency=0)
    rgb.convert("CMYK").save(v0 / "m_cmyk.jpg")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    rgba.save(v1 / "m_rgba.png")
    rgb.convert("LA").save(v1 / "m_la.png")
    rgb.convert("1").save(v1 / "m_bilevel.png")
    Image.fromarray((rng.integers(0, 65535, (32, 40))).astype(np.uint16)).save(v1 / "m_gray16.png")
    Image.fromarray(rng.integers(0, 1 << 20, (32, 40)).astype(np.int32), "I").save(v1 / "m_int32.tif")
    Image.fromarray(rng.random((32, 40)).astype(np.float32), "F").save(v1 / "m_float.tif")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(v0 / "m_1x1.png")
    Image.linear_gradient("L").resize((4000, 3000)).convert("RGB").save(v0 / "m_huge_12mp.jpg", quality=60)
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    frames[0].save(v1 / "m_animated.gif", save_all=True, append_images=frames[1:])
    out = d / "c.h5"
    names = sorted(p.name for p in (root / "val").rglob("m_*"))

    def check(r):
        from cachekit.cache import open_cache

        if r.code != 0 or not out.exists():
            return [f"failed (exit {r.code}): {r.first_line}"]
        with open_cache(out) as c:
            have = {Path(p).name for p in c.paths("val")}
        missing = [n for n in names if n not in have]
        p = [f"not in the cache: {missing}"] if missing else []
        if not _verify_ok(out):
            p.append("verify fails")
        return p

    return Call(["extract", root, *SMALL_EXTRACT, "--out", out], (), out, check)


def _fewer_than_k(base, d, need_message: bool):
    root = d / "data"
    make_tree(root, classes=3, per_class=8)
    for p in sorted((root / "class_2").glob("*.png"))[3:]:
        p.unlink()  # class_2: 3 images -> 1 train after carving val/test
    out = d / "c.h5"

    def check(r):
        from cachekit.cache import open_cache

        if r.code != 0:
            return [f"failed (exit {r.code}): {r.first_line}"]
        with open_cache(out) as c:
            repl = c.with_replacement(4, 1)
        p = [] if repl == [2] else [f"with_replacement attr is {repl}, expected [2]"]
        if need_message and "replacement" not in (r.stdout + r.stderr).lower():
            p.append("extract's output does not say that class_2 was sampled with replacement")
        return p

    return Call(["extract", root, *SMALL_EXTRACT[:2], "--shots", "4", *SMALL_EXTRACT[4:], "--out", out], (), out, check)


def _manifest(d: Path, name: str, text, root: Path | None = None, extra=(), needles=None) -> Call:
    m = d / name
    if isinstance(text, bytes):
        m.write_bytes(text)
    else:
        m.write_text(text)
    out = d / "c.h5"
    args = ["extract", m, *SMALL_EXTRACT, "--out", out]
    if root is not None:
        args += ["--image-root", root]
    return Call([*args, *extra], (m.name,) if needles is None else tuple(needles), out)


def _rows(base: Base, fmt="csv", labels="name") -> list[tuple[str, str, str]]:
    files = sorted(p.relative_to(base.tree).as_posix() for p in base.tree.rglob("*.png"))
    rows = []
    for i, rel in enumerate(files):
        cls = rel.split("/")[0]
        lab = cls if labels == "name" else str(int(cls.split("_")[1]))
        rows.append((rel, lab, ("train", "train", "train", "val", "test")[i % 5]))
    return rows


def _csv(rows) -> str:
    return "path,label,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)


def _case_manifest_reordered_names(base, d):
    rows = [(p, {"class_0": "cat", "class_1": "dog", "class_2": "fox"}[lab], s) for p, lab, s in _rows(base)]
    names = d / "names.txt"
    names.write_text("fox\ndog\ncat\n")  # the same names, another order
    call = _manifest(d, "m.csv", _csv(rows), base.tree, ["--classnames", names])
    out = call.out

    def check(r):
        if r.code != 0:
            return one_line_error_problems(r, ["classnames"])
        from cachekit.cache import open_cache

        with open_cache(out) as c:
            names_ = c.classnames
            got = {Path(p).parts[0]: names_[int(y)] for p, y in zip(c.paths("val"), c.labels("val"))}
        want = {"class_0": "cat", "class_1": "dog", "class_2": "fox"}
        return [] if got == want else [f"images silently relabelled: folder -> cache class name {got}, manifest said {want}"]

    call.check = check
    return call


def _damaged_cache(base: Base, d: Path, delete=(), del_attrs=()) -> Path:
    import h5py

    d.mkdir(parents=True, exist_ok=True)
    p = d / "damaged.h5"
    shutil.copy(base.cache, p)
    with h5py.File(p, "r+") as f:
        for name in delete:
            del f[name]
        for a in del_attrs:
            del f.attrs[a]
    return p


def _grid_case(text: str, suffix: str = ".json", needles=()):
    def build(base, d):
        g = d / f"grid{suffix}"
        g.write_text(text)
        c = _copy_cache(base, d)
        return Call(["sweep", c, "--grid", g, "--out", d / "rows.jsonl", "--json"], needles)

    return build


def _other_cache_case(variant: str):
    def build(base, d):
        c = _copy_cache(base, d)
        before = file_sha256(c)
        if variant == "model":
            args = ["extract", base.tree, *EXTRACT_ARGS, "--model", "RN-tiny-224", "--out", c]
            needles = ("model",)
        else:
            other = make_tree(d / "other", classes=3, per_class=8, seed=7)
            args = ["extract", other, *EXTRACT_ARGS, "--out", c]
            needles = ("dataset_fingerprint",)

        def check(r):
            return [] if file_sha256(c) == before else ["the existing cache was modified"]

        return Call(args, (*needles, "--overwrite"), None, check)

    return build


def _foreign_out_case(kind: str):
    def build(base, d):
        import h5py
        import numpy as np

        out = d / "c.h5"
        if kind == "text":
            out.write_text("my notes, not a cache\n")
        else:
            with h5py.File(out, "w") as f:
                f["x"] = np.arange(3)
        before = file_sha256(out)

        def check(r):
            return [] if file_sha256(out) == before else [f"{out.name} was modified"]

        return Call(["extract", base.tree, *EXTRACT_ARGS, "--out", out],
                    ("not an HDF5 file", "--overwrite") if kind == "text" else ("not a cachekit cache", "--overwrite"),
                    None, check)

    return build


def _simple(args_fn, needles=()):
    def build(base, d):
        return Call(args_fn(base, d), needles)

    return build


def _truncated_copy(base: Base, d: Path, frac=0.6) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "trunc.h5"
    data = base.cache.read_bytes()
    p.write_bytes(data[: int(len(data) * frac)])
    return p


def _text_file(d: Path, name="notes.h5") -> Path:
    p = d / name
    p.write_text("hello\n")
    return p


def _grid_file(d: Path) -> Path:
    p = d / "grid.json"
    p.write_text(json.dumps({"methods": ["zeroshot"]}))
    return p


def _foreign_h5(d: Path) -> Path:
    import h5py
    import numpy as np

    p = d / "foreign.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.arange(3)
    return p


BAD_CASES: list[BadCase] = [
    # images
    BadCase("img-corrupt", "corrupt PNG (garbage after the signature) in val",
            _bad_image_case("corrupt", "zz_bad.png")),
    BadCase("img-truncated-jpeg", "JPEG cut in half", _bad_image_case("truncated-jpeg", "zz_cut.jpg")),
    BadCase("img-truncated-png", "PNG cut in half", _bad_image_case("truncated-png", "zz_cut.png")),
    BadCase("img-not-image", "text file named .jpg", _bad_image_case("text", "zz_text.jpg")),
    BadCase("img-empty-file", "empty (0-byte) .png", _bad_image_case("empty", "zz_empty.png")),
    BadCase("img-bomb", "PNG header claiming 25000x20000 (500 MP, over the bomb limit)",
            _bad_image_case("bomb", "zz_bomb.png")),
    BadCase("img-modes", "grayscale, palette (+transparency), CMYK, RGBA, LA, 1-bit, 16-bit, 32-bit int, float, "
            "1x1, 4000x3000 (12 MP) and animated GIF images together", _modes_tree, expect="ok"),
    # trees and class names
    BadCase("empty-class-folder", "a class folder without images",
            lambda b, d: (make_tree(d / "data", classes=2, per_class=5), (d / "data" / "class_9").mkdir(),
                          Call(["extract", d / "data", *SMALL_EXTRACT, "--out", d / "c.h5"],
                               ("empty class folder", "class_9"), d / "c.h5"))[-1]),
    BadCase("images-without-classes", "images directly in DATA, no class folders",
            lambda b, d: (make_tree(d / "x", classes=1, per_class=3),
                          shutil.move(str(d / "x" / "class_0"), str(d / "data")),
                          Call(["extract", d / "data", *SMALL_EXTRACT, "--out", d / "c.h5"],
                               ("no class folders",), d / "c.h5"))[-1]),
    BadCase("duplicate-class-folders", "class folders red_car and 'red car' (same class name)",
            lambda b, d: (make_tree(d / "data", classes=2, per_class=5),
                          (d / "data" / "class_0").rename(d / "data" / "red_car"),
                          (d / "data" / "class_1").rename(d / "data" / "red car"),
                          Call(["extract", d / "data", *SMALL_EXTRACT, "--out", d / "c.h5"],
                               ("duplicate class name", "red car"), d / "c.h5"))[-1]),
    BadCase("classnames-duplicate", "--classnames file with a name twice",
            lambda b, d: ((d / "n.txt").write_text("cat\ncat\ndog\n"),
                          Call(["extract", b.tree, *SMALL_EXTRACT, "--classnames", d / "n.txt", "--out", d / "c.h5"],
                               ("duplicate class name", "cat"), d / "c.h5"))[-1]),
    BadCase("classnames-count", "--classnames file with 2 names for 3 classes",
            lambda b, d: ((d / "n.txt").write_text("cat\ndog\n"),
                          Call(["extract", b.tree, *SMALL_EXTRACT, "--classnames", d / "n.txt", "--out", d / "c.h5"],
                               ("n.txt", "2 names"), d / "c.h5"))[-1]),
    BadCase("manifest-classnames-reordered", "CSV with class-name labels cat/dog/fox and --classnames listing "
            "fox/dog/cat", _case_manifest_reordered_names, expect="ok"),
    BadCase("fewer-than-k", "a class with 1 train image, --shots 4 (sampled with replacement)",
            lambda b, d: _fewer_than_k(b, d, False), expect="ok"),
    BadCase("fewer-than-k-said", "... and extract's output says so",
            lambda b, d: _fewer_than_k(b, d, True), expect="ok"),
    # split JSON
    BadCase("coop-syntax", "split JSON with a syntax error",
            lambda b, d: _manifest(d, "split_zhou_X.json", '{"train": [["a.png", 0, "a"],', b.tree)),
    BadCase("coop-not-object", "split JSON that is a list",
            lambda b, d: _manifest(d, "split_zhou_X.json", "[1, 2, 3]", b.tree)),
    BadCase("coop-bad-entry", "split JSON entry with a string label",
            lambda b, d: _manifest(d, "split_zhou_X.json", json.dumps({"train": [["class_0/img_00.png", "x", "a"]]}),
                                   b.tree)),
    BadCase("coop-no-root", "split JSON without --image-root",
            lambda b, d: _manifest(d, "split_zhou_X.json", json.dumps({"train": []}))),
    # CSV
    BadCase("csv-header", "CSV without a path column",
            lambda b, d: _manifest(d, "m.csv", "file,label,split\na.png,0,train\n", b.tree)),
    BadCase("csv-quote", "CSV with an unterminated quote",
            lambda b, d: _manifest(d, "m.csv", 'path,label,split\n"class_0/img_00.png,0,train\n', b.tree)),
    BadCase("csv-short-row", "CSV row with two fields",
            lambda b, d: _manifest(d, "m.csv", "path,label,split\nclass_0/img_00.png,0\n", b.tree)),
    BadCase("csv-split", "CSV with split 'training'",
            lambda b, d: _manifest(d, "m.csv", "path,label,split\nclass_0/img_00.png,0,training\n", b.tree)),
    BadCase("csv-empty", "empty CSV", lambda b, d: _manifest(d, "m.csv", "", b.tree)),
    BadCase("csv-binary", "CSV that is not UTF-8",
            lambda b, d: _manifest(d, "m.csv", b"path,label,split\n\xff\xfe\x00\x01,0,train\n", b.tree)),
    BadCase("csv-missing-file", "CSV listing a file that does not exist",
            lambda b, d: _manifest(d, "m.csv", _csv(_rows(b)) + "class_0/nope.png,class_0,train\n", b.tree,
                                   needles=("class_0/nope.png",))),
    BadCase("csv-escape", "CSV path ../outside.png escaping the image root",
            lambda b, d: _manifest(d, "m.csv", _csv(_rows(b)) + "../outside.png,class_0,train\n", b.tree)),
    BadCase("csv-absolute", "CSV with an absolute path outside the image root",
            lambda b, d: _manifest(d, "m.csv", _csv(_rows(b)) + "/etc/hostname,class_0,train\n", b.tree)),
    BadCase("csv-overlap", "CSV with the same image in train and test",
            lambda b, d: _manifest(d, "m.csv", _csv(_rows(b)) + f"{_rows(b)[0][0]},class_0,test\n", b.tree)),
    # JSONL
    BadCase("jsonl-syntax", "JSONL with a broken line",
            lambda b, d: _manifest(d, "m.jsonl", '{"path": "class_0/img_00.png", "label": 0, "split": "train"}\n{"path": \n',
                                   b.tree)),
    BadCase("jsonl-keys", "JSONL object without 'split'",
            lambda b, d: _manifest(d, "m.jsonl", '{"path": "class_0/img_00.png", "label": 0}\n', b.tree)),
    BadCase("jsonl-mixed", "JSONL mixing integer and string labels",
            lambda b, d: _manifest(d, "m.jsonl", '{"path": "class_0/img_00.png", "label": 0, "split": "train"}\n'
                                   '{"path": "class_1/img_00.png", "label": "b", "split": "train"}\n', b.tree)),
    BadCase("jsonl-duplicate", "JSONL listing one image twice in train",
            lambda b, d: _manifest(d, "m.jsonl", '{"path": "class_0/img_00.png", "label": 0, "split": "train"}\n' * 2,
                                   b.tree)),
    BadCase("data-missing", "DATA that does not exist",
            _simple(lambda b, d: ["extract", d / "nope", *SMALL_EXTRACT, "--out", d / "c.h5"], ("nope",))),
    BadCase("data-unknown-format", "DATA with an unknown suffix (.txt)",
            lambda b, d: _manifest(d, "list.txt", "a.png\n")),
    # options against a cache
    BadCase("top-k-negative", "refine --top-k -1",
            _simple(lambda b, d: ["refine", _copy_cache(b, d), "--top-k", "-1"], ("--top-k -1",))),
    BadCase("top-k-huge", "refine --top-k 10**12 (kept whole, with a note: docs/eval.md)",
            _simple(lambda b, d: ["refine", _copy_cache(b, d), "--top-k", str(10 ** 12)]), expect="ok"),
    BadCase("refine-weights", "refine --weights 1 (one number)",
            _simple(lambda b, d: ["refine", _copy_cache(b, d), "--top-k", "4", "--weights", "1"], ("--weights",))),
    BadCase("refine-weights-nan", "refine --weights nan,1",
            _simple(lambda b, d: ["refine", _copy_cache(b, d), "--top-k", "4", "--weights", "nan,1"],
                    ("--weights", "finite"))),
    BadCase("eval-set-nan", "eval --set ape.weights=[NaN,1]",
            _simple(lambda b, d: ["eval", b.cache, "--method", "ape", "--set", "ape.weights=[NaN,1]"], ("weights",))),
    BadCase("eval-shots", "eval --shots 7 (not in the cache)",
            _simple(lambda b, d: ["eval", b.cache, "--method", "zeroshot", "--shots", "7"], ("K=7",))),
    BadCase("eval-seeds", "eval --seeds 9 (not in the cache)",
            _simple(lambda b, d: ["eval", b.cache, "--method", "zeroshot", "--seeds", "9"], ("seed=9",))),
    BadCase("fit-safe-shots", "fit-safe --shots 7 (not in the cache)",
            _simple(lambda b, d: ["fit-safe", b.cache, "--shots", "7", "--epochs", "1"], ("K=7",))),
    BadCase("fit-safe-lr", "fit-safe --lr nan",
            _simple(lambda b, d: ["fit-safe", b.cache, "--lr", "nan", "--epochs", "1"], ("lr",))),
    BadCase("eval-set-syntax", "eval --set without '='",
            _simple(lambda b, d: ["eval", b.cache, "--set", "ape.top_k"], ("METHOD.PARAM=VALUE",))),
    BadCase("eval-set-shape", "eval --set ape.weights=[1] (one weight)",
            _simple(lambda b, d: ["eval", b.cache, "--method", "ape", "--set", "ape.weights=[1]"], ("weights",))),
    BadCase("eval-set-type", "eval --set tip.s=\"x\" (a string)",
            _simple(lambda b, d: ["eval", b.cache, "--method", "tip", "--set", 'tip.s="x"'], ("tip", "s"))),
    BadCase("eval-preset", "eval --preset no-such-preset",
            _simple(lambda b, d: ["eval", b.cache, "--method", "tip", "--preset", "no-such-preset"], ("no-such-preset",))),
    BadCase("eval-no-method", "eval --method ',,,' (no method)",
            _simple(lambda b, d: ["eval", b.cache, "--method", ",,,"], ("--method",))),
    BadCase("out-below-file", "extract --out below a regular file (afile/c.h5)",
            _simple(lambda b, d: ["extract", b.tree, *SMALL_EXTRACT, "--out", _text_file(d, "afile") / "c.h5"],
                    ("afile",))),
    BadCase("sweep-out-below-file", "sweep --out below a regular file",
            _simple(lambda b, d: ["sweep", b.cache, "--grid", _grid_file(d), "--out", _text_file(d, "afile") / "r.jsonl"],
                    ("afile",))),
    # grids
    BadCase("grid-binary", "sweep --grid naming a binary file (the cache itself)",
            _simple(lambda b, d: ["sweep", b.cache, "--grid", b.cache], ("grid",))),
    BadCase("grid-methods-nested", "sweep grid with methods: [[]] (a list inside the list)",
            _grid_case(json.dumps({"methods": [[]]}), needles=("methods",))),
    BadCase("grid-shots", "sweep grid with shots [7] (not in the cache)",
            _grid_case(json.dumps({"methods": ["zeroshot"], "shots": [7]}), needles=("K=7",))),
    BadCase("grid-list", "sweep grid that is a YAML list", _grid_case("- ape\n- tip\n", ".yaml", ("mapping",))),
    BadCase("grid-yaml-syntax", "sweep grid with a YAML syntax error",
            _grid_case("methods: [ape\n", ".yaml", ("cannot be parsed",))),
    BadCase("grid-scalar-values", "sweep grid with ape.top_k: 5 (not a list)",
            _grid_case(json.dumps({"methods": {"ape": {"top_k": 5}}}), needles=("top_k",))),
    BadCase("grid-unknown-method", "sweep grid with method 'nope'",
            _grid_case(json.dumps({"methods": ["nope"]}), needles=("nope",))),
    BadCase("grid-missing", "sweep --grid that does not exist",
            _simple(lambda b, d: ["sweep", b.cache, "--grid", d / "nope.json"], ("nope.json",))),
    BadCase("grid-bad-value", "sweep grid with tip.s: [\"x\"] (a string)",
            _grid_case(json.dumps({"methods": {"tip": {"s": ["x"]}}}), needles=("tip",))),
    # caches
    BadCase("cache-other-model", "extract onto an existing --out built with another model (RN-tiny-224)",
            _other_cache_case("model")),
    BadCase("cache-other-dataset", "extract onto an existing --out built from another dataset",
            _other_cache_case("dataset")),
    BadCase("out-not-hdf5", "extract --out naming an existing text file", _foreign_out_case("text")),
    BadCase("out-foreign-hdf5", "extract --out naming a foreign HDF5 file", _foreign_out_case("h5")),
    BadCase("refine-not-hdf5", "refine on a text file",
            _simple(lambda b, d: ["refine", _text_file(d), "--top-k", "4"], ("not an HDF5 file",))),
    BadCase("sweep-foreign", "sweep on a foreign HDF5 file",
            _simple(lambda b, d: ["sweep", _foreign_h5(d), "--grid", _grid_file(d)], ("not a cachekit cache",))),
    BadCase("fit-safe-truncated", "fit-safe on a cache truncated to 60%",
            _simple(lambda b, d: ["fit-safe", _truncated_copy(b, d), "--epochs", "1"], ("trunc.h5",))),
    BadCase("refine-truncated", "refine on a cache truncated to 99%",
            _simple(lambda b, d: ["refine", _truncated_copy(b, d, 0.99), "--top-k", "4"], ("trunc.h5",))),
    BadCase("eval-damaged", "eval on a cache missing text/classifier",
            _simple(lambda b, d: ["eval", _damaged_cache(b, d, delete=["text/classifier"]), "--method", "zeroshot"],
                    ("damaged.h5",))),
    BadCase("info-damaged", "info on a cache missing splits/train/pooled",
            _simple(lambda b, d: ["info", _damaged_cache(b, d, delete=["splits/train/pooled"])], ("damaged.h5",))),
    BadCase("extract-onto-damaged", "extract onto an existing --out whose identity attribute is missing",
            _simple(lambda b, d: ["extract", b.tree, *EXTRACT_ARGS, "--out", _damaged_cache(b, d, del_attrs=["identity"])],
                    ("damaged.h5",))),
]


@dataclass
class BadResult:
    case: BadCase
    result: CliResult | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def run_bad_case(case: BadCase, base: Base, d: Path) -> BadResult:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    call = case.build(base, d)
    r = run_child(call.args) if call.child else run_cli(call.args)
    p = []
    if case.expect == "error":
        p += one_line_error_problems(r, call.needles)
        if call.out is not None:
            for q in (call.out, call.out.with_name(call.out.name + ".tmp")):
                if q.exists():
                    p.append(f"{q.name} left behind")
    elif r.exc:
        p.append(f"uncaught exception (traceback): {r.exc}")
    elif r.code != 0 and call.check is None:
        p.append(f"failed (exit {r.code}): {r.first_line}")
    if call.check is not None and not r.exc:
        p += call.check(r)
    return BadResult(case, r, p)


# --------------------------------------------------------------------------------------------- #
# the report
# --------------------------------------------------------------------------------------------- #
def _md(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def machine() -> str:
    try:
        import torch

        tv = torch.__version__
    except Exception:  # noqa: BLE001
        tv = "?"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{platform.node()}: {platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs; "
            f"Python {platform.python_version()}, torch {tv}")


# Bugs this harness found (November 2026), the check that shows each (matched against the text of a
# failing row: a kill trial, a fault row or a bad-input id) and the fix. The report marks each as open
# or fixed according to this run.
FOUND = [
    ("publish-gap", "a kill between extract's final rename and the removal of OUT.parts left OUT.parts "
     "(as large as the cache) forever", "remove OUT.parts when OUT exists with the same identity (549ae08)"),
    ("(1m tmpfs)", "extract on a full disk printed its error, then segfaulted (exit 139): h5py objects of a file "
     "HDF5 failed to write crash the process when freed", "check free space before every HDF5 file (e9e8f44)"),
    ("(100k tmpfs)", "the same while writing the batches (segments)", "as above (e9e8f44)"),
    ("(2m tmpfs)", "the free-space check before assembling leaves out the attention-pooling weights (3.3 MiB for "
     "RN-tiny, ~60 MiB for RN50): between the estimate and the real size, the segfault is back",
     "count the attention-pooling weights in the estimate (4320591)"),
    ("fit-safe next to an existing cache, disk full (8", "fit-safe on a full disk: h5py RuntimeError on close, "
     "then a segfault", "check free space first (e9e8f44); building small HDF5 files in memory (io.BytesIO) and "
     "writing them with plain I/O would remove the failure mode"),
    ("0 bytes free", "the lock's PID write was outside os_errors: OSError traceback, flock leaked in-process",
     "os_errors around the write, unlock on failure (549ae08)"),
    ("eval --out", "eval --out on a read-only/full location: OSError traceback", "os_errors (549ae08)"),
    ("out-below-file", "--out below a regular file: FileExistsError traceback", "EEXIST/ENOTDIR in os_errors (549ae08)"),
    ("eval-no-method", "eval --method ',,,': IndexError traceback", "refuse an empty method list (549ae08)"),
    ("grid-binary", "sweep --grid naming a binary file: UnicodeDecodeError traceback", "read inside the try (549ae08)"),
    ("grid-methods-nested", "grid methods: [[]]: TypeError traceback", "methods must be names (549ae08)"),
    ("damaged", "a cache missing a dataset/attribute: KeyError traceback in info/eval/refine/extract",
     "refuse damaged caches on open, verify excepted (549ae08)"),
    ("img-bomb", "Pillow's DecompressionBombWarning printed before the one-line error", "filter it (549ae08)"),
    ("manifest-classnames-reordered", "class-name labels + --classnames in another order silently relabelled "
     "images (names replaced by position)", "match names, never by position (549ae08)"),
    ("eval-set-", "--set values not validated (tip.s=\"x\", ape.weights=[1]): tracebacks",
     "value types checked before any run (6a38c6a)"),
    ("grid-bad-value", "grid candidate values not validated: traceback part-way through a sweep", "(6a38c6a)"),
    ("num-shards", "extract --num-shards: a shard that does not assemble crashes in the CLI (KeyError 'weights'), "
     "exit 1 although its work is done", "summaries without weights are printed without it (4320591)"),
    ("storing results next to the same cache", "two processes storing results next to one cache (parallel "
     "fit-safe/sweep/refine jobs) fail at random with 'in use by PID'",
     "WriterLock(wait=...) retries the flock; result stores wait (4320591)"),
    ("another cache into the same --out", "sweep: a row's key does not name the cache, so sweeping another cache "
     "(or a cache rebuilt with other settings) into an --out that already holds rows skips every row as 'already "
     "done': its results are silently missing", "row keys name the cache build (4320591)"),
    ("--overwrite interrupted", "extract --overwrite interrupted says 'rerun the same command to resume', but that "
     "command deletes OUT.parts and encodes every batch again",
     "--overwrite keeps an unfinished run of the same settings (df397b7)"),
]


def _found_key(text: str) -> str | None:
    return next((key for key, _, _ in FOUND if key in text), None)


def write_report(path: Path, trials: list[Trial], extra_faults: list[tuple[str, bool, str]],
                 bad: list[BadResult], argv: list[str], seconds: float, kills: int, seed: int,
                 work: Path | None = None):
    from cachekit import __version__

    def clean(x) -> str:
        x = str(x)
        if work is not None:
            x = x.replace(str(work), "$WORK")
        return _md(x)

    by = {}
    for t in trials:
        by.setdefault((t.command, t.signal), []).append(t)
    lines = [
        "# Reliability report",
        "",
        f"Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} by `tests/harness/reliability.py` "
        f"(cachekit {__version__}) in {seconds / 60:.1f} min on {machine()}.",
        "",
        f"Reproduce, from the repo root: `{' '.join(argv)}` (or `make reliability`), as root for the tmpfs / read-only bind mounts "
        "(without them ENOSPC/EROFS are injected in-process). Tests: `pytest tests/test_reliability.py "
        "tests/test_fuzz.py` (fast), `pytest -m slow tests/test_reliability.py` (many random kill points). "
        "`$WORK` below is the scratch folder.",
        "",
        "## Faults injected",
        "",
        "Each writing command runs as `python -m cachekit ...` on a tiny RN-tiny cache (3 classes, shots 1,2 x "
        "seeds 1,2, 2 augmented views) and is killed part-way, then the same command is run again. "
        "*Survived* means: SIGINT exited 130 with `Interrupted: ... rerun the same command to resume` and no "
        "traceback; right after the kill no reader saw a partial cache or result; the rerun exited 0; the final "
        "state equals an uninterrupted run (every dataset of the cache or stored result bit-exact, sweep rows "
        "with the same key/metrics/params and no duplicates, the cache file unchanged by refine/fit-safe/"
        "sweep, `verify` passing) and no `.tmp`/`.parts` is left behind. Kill points are reached through "
        "progress events logged by hooks in the child (see the docstring of `tests/harness/reliability.py`), then a "
        "seeded random extra delay, so they land at the same place on a fast or a loaded machine.",
        "",
        f"Per command and signal: one fixed scenario (with checks against the live writer) and {kills} seeded "
        f"random kill point(s) (seed {seed}); plus one kill of extract between its final rename and the removal "
        "of `OUT.parts` (phase `publish-gap`).",
        "",
        "Phases: extract `start` (after the plan is written), `encode` (after batch n of 13), `assemble` (the "
        "assembled `.tmp` complete, before its rename), `publish-gap`; refine `before-rename` / `after-rename`; "
        "fit-safe `train` (after epoch n) / `before-rename`; sweep `rows` (after row n) / `between-rows` (paused "
        "after row n was fsync'd).",
        "",
        "| command | signal | kills | survived | phases | failures |",
        "|---|---|---|---|---|---|",
    ]
    for (cmd, sig), ts in sorted(by.items()):
        killed = [t for t in ts if t.killed]
        surv = sum(t.survived for t in ts)
        phases = {}
        for t in ts:
            phases[t.phase] = phases.get(t.phase, 0) + 1
        fails = "; ".join(sorted({f"[{t.phase}] {p}" for t in ts for p in t.problems}))[:400] or "-"
        lines.append(f"| {cmd} | {sig} | {len(killed)} | {surv}/{len(ts)} | "
                     f"{', '.join(f'{k} x{v}' for k, v in phases.items())} | {clean(fails)} |")
    total = len(trials)
    lines += ["", f"**Total: {sum(t.survived for t in trials)}/{total} kills survived.**", "",
              "<details><summary>Every kill point</summary>", ""]
    for t in trials:
        lines.append(f"- {t.command} {t.signal} [{t.phase}] {clean(t.point)}: "
                     + ("survived" if t.survived else "**FAILED** " + clean("; ".join(t.problems))))
    lines += ["", "</details>", "", "### Concurrency, disk full, read-only", "",
              "| fault | result | detail |", "|---|---|---|"]
    for what, ok, detail in extra_faults:
        lines.append(f"| {clean(what)} | {'ok' if ok else '**FAILED**'} | {clean(detail)[:300]} |")
    lines += ["", f"{sum(x[1] for x in extra_faults)}/{len(extra_faults)} handled as expected.", "",
              "## Bad inputs", "",
              "Each is one CLI call (in-process, click's CliRunner, with a plain CLI's warning filters). Expected: "
              "a one-line `Error: ...` naming the problem, exit 1 (2 for click usage errors), no traceback and no "
              "cache file left; or, for inputs that must work, success (checked: in the cache, `verify` passes). "
              "`BUG` rows are known failures (strict xfail tests in tests/test_reliability.py).", "",
              "| case | input | expected | result | exit | error line / outcome |", "|---|---|---|---|---|---|"]
    for b in bad:
        r = b.result
        status = "ok" if b.ok else ("**BUG**" if b.case.bug else "**FAILED**")
        detail = r.first_line if r is not None else ""
        if not b.ok:
            detail = "; ".join(b.problems) + (f" - {detail}" if detail and detail not in "; ".join(b.problems) else "")
        lines.append(f"| {b.case.id} | {_md(b.case.what)} | {b.case.expect} | {status} | "
                     f"{r.code if r else '-'} | {clean(detail)[:300]} |")
    nb = sum(b.ok for b in bad)
    lines += ["", f"{nb}/{len(bad)} bad inputs handled as expected.", "", "## Failures in this run", ""]
    fails = ([f"kill: {t.command} {t.signal} [{t.phase}]: " + "; ".join(t.problems) for t in trials if not t.survived]
             + [f"{what}: {detail}" for what, ok, detail in extra_faults if not ok]
             + [f"bad input {b.case.id}: " + "; ".join(b.problems) for b in bad if not b.ok])
    for text in fails:
        lines.append(f"- {clean(text)[:400]}")
    if not fails:
        lines.append("None.")
    open_keys = {_found_key(t) for t in fails} - {None}
    lines += ["", "## Bugs this harness found", "",
              "Status according to this run (`open`: its check failed above; the tests mark it "
              "`xfail(strict=True, reason=\"BUG: ...\")`).", "",
              "| bug | status | fix |", "|---|---|---|"]
    for key, what, fix in FOUND:
        lines.append(f"| {_md(what)} | {'**open**' if key in open_keys else 'fixed'} | {_md(fix)} |")
    lines.append("")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tests.harness.reliability", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=3, help="random kill points per command and signal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="the report to write (make reliability: docs/reliability.md)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--parallel", type=int, default=4, help="children killed at the same time")
    ap.add_argument("--no-bad-inputs", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    t0 = time.monotonic()
    cleanup = a.work is None
    work = Path(a.work or tempfile.mkdtemp(prefix="cachekit-reliability-"))
    try:
        print(f"work folder {work}", file=sys.stderr)
        base = Base.build(work)
        cmds = [c for c in a.commands.split(",") if c]
        plan = [p for p in scenario_plan(a.seed) if p[0] in cmds] + random_plan(cmds, list(REPORT_SIGNALS), a.kills, a.seed)
        print(f"{len(plan)} kill trials ...", file=sys.stderr)
        trials = run_trials(base, plan, work / "kills", parallel=a.parallel)
        extra = []
        for t in trials:
            print(("ok   " if t.survived else "FAIL ") + t.describe(), file=sys.stderr)
            extra += t.extra
        for fn in (check_disk_full, check_read_only, check_shards, check_concurrent_results, check_overwrite_resume,
                   check_sweep_shared_out):
            print(f"{fn.__name__} ...", file=sys.stderr)
            rows = fn(base, work / fn.__name__)
            for what, ok, detail in rows:
                print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}", file=sys.stderr)
            extra += rows
        bad = []
        if not a.no_bad_inputs:
            for i, case in enumerate(BAD_CASES):
                b = run_bad_case(case, base, work / "bad" / f"{i:02d}-{case.id}")
                print(f"{'ok  ' if b.ok else ('BUG ' if case.bug else 'FAIL')} {case.id}: "
                      f"{'; '.join(b.problems) or (b.result.first_line if b.result else '')}", file=sys.stderr)
                bad.append(b)
        cmdline = ["python", "-m", "tests.harness.reliability"] + (argv if argv is not None else sys.argv[1:])
        write_report(Path(a.out), trials, extra, bad, cmdline, time.monotonic() - t0, a.kills, a.seed, work)
        print(f"wrote {a.out}", file=sys.stderr)
        failed = [t for t in trials if not t.survived] + [x for x in extra if not x[1]]
        return 1 if failed else 0
    finally:
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
