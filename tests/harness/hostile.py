"""Hostile-input harness: property-based generation of bad and odd inputs, run through the real CLI.

Run from the repo root: ``python -m tests.harness.hostile --out docs/hostile-inputs.md`` (the full run, a few
minutes on 2 cores); ``tests/test_hostile.py`` runs a fixed sample of it in under a minute.

What is generated (hypothesis, seeded, generation phase only: no shrinking, no example database):

* DATA trees (ImageFolder, flat or train/val/test): 1-3 mutations of a small tree, among symlink loops, links
  and copies across classes or splits, FIFOs, broken links, unreadable folders and files, names that are not
  UTF-8, empty and corrupt images, duplicate class names, and harmless oddities (hidden files, nested folders,
  unicode names, a symlinked folder outside the dataset, test/ that is val/ again) that must still work;
* CSV and JSONL manifests and CoOp split files: a per-class split assignment plus 0-2 mutations (bad paths,
  labels of 10**12 or 5000 digits, label gaps, duplicate rows, overlaps, encodings, broken quoting, deep JSON,
  val listed again as test, ...);
* template and class-name files, and the options of extract/info/verify (and a few of the other commands);
* cache mutations: one dataset or attribute of a small cache edited (out-of-range rows and labels, NaN, retyped,
  deleted, ...) with or without resealing its checksums, or the file truncated, then read by info / verify /
  eval / refine / fit-safe;
* sweep grid files and results files for report.

Each case runs once, in-process through click's CliRunner (a SIGALRM timeout turns a hang into a result), or as
a ``python -m cachekit`` child with a timeout (marked ``child``). Unreadable files and folders are made with
chmod when not running as root; as root (where chmod 000 does not stop reads) the harness denies them in-process
by wrapping os.scandir, os.stat, os.access and open, so the library sees PermissionError as it would.

Every case is classified:

* ``clean``: exit 0 with a right answer (the case's checks: e.g. a cache that verifies, no image in two classes
  or in train and val/test, val_is_test exactly when asked for), or one ``Error: ...`` line and exit 1 (2 for
  click usage errors) naming what the case expects;
* ``traceback``: an uncaught exception, a printed traceback, or the top-level guard's ``internal error`` line
  (a bug it caught);
* ``hang``: over the time limit;
* ``data lost``: an input, an existing cache or a results file changed or deleted (results files may only grow);
* ``wrong``: an exit 0 where an error was due or a wrong answer, a refusal of a good input, an error line that
  does not name the problem, or output that is not one clean line.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import datetime as _dt
import errno
import hashlib
import io
import json
import os
import platform
import shutil
import signal
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

import numpy as np

TIMEOUT_S = 60  # per case (in-process: SIGALRM; child: subprocess timeout)
EXTRACT = ["--model", "RN-tiny", "--shots", "1", "--seeds", "1", "--views", "0", "--batch-size", "16",
           "--dense-dtype", "float32", "-q"]
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------- #
# images and trees
# --------------------------------------------------------------------------------------------- #
def png(path: Path, seed: int, size=(12, 10)) -> Path:
    """A small RGB PNG whose content depends on `seed` (distinct seeds, distinct bytes)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def tree(root: Path, layout: str = "flat", classes: int = 3, seed: int = 0) -> Path:
    """flat: root/c{i}/img{j}.png, 5 per class; split: root/{train,val,test}/c{i}/..., 3/2/2 per class."""
    root = Path(root)
    counts = {"train": 5} if layout == "flat" else {"train": 3, "val": 2, "test": 2}
    n = 0
    for split, k in counts.items():
        base = root if layout == "flat" else root / split
        for c in range(classes):
            for j in range(k):
                png(base / f"c{c}" / f"img{j}.png", seed * 100_000 + n)
                n += 1
    return root


def stable_hash(obj) -> int:
    """A hash of a description that is the same in every process (str hashes are salted per process)."""
    return zlib.crc32(repr(obj).encode("utf-8", "backslashreplace"))


def _fsjoin(folder: Path, name: bytes) -> str:
    """A path whose last component is raw bytes (e.g. not UTF-8), as the str os functions take."""
    return os.fsdecode(os.fsencode(str(folder)) + b"/" + name)


# --------------------------------------------------------------------------------------------- #
# permission denied, also as root
# --------------------------------------------------------------------------------------------- #
_REAL = {"scandir": os.scandir, "stat": os.stat, "access": os.access, "open": builtins.open, "listdir": os.listdir}


@contextlib.contextmanager
def denied(paths):
    """Make `paths` unreadable for the code run inside: chmod 000 when that works (not root), else wrap
    os.scandir / os.listdir / os.stat / os.access / open so that listing or opening them, or anything below
    a denied folder, raises PermissionError (EACCES) as the kernel would."""
    paths = [os.path.realpath(p) for p in paths]
    if not paths:
        yield "none"
        return
    if os.geteuid() != 0:
        modes = {p: os.stat(p).st_mode for p in paths}
        for p in paths:
            os.chmod(p, 0)
        try:
            yield "chmod 000"
        finally:
            for p, m in modes.items():
                os.chmod(p, m)
        return

    def hit(p, below_only=False) -> bool:
        try:
            r = os.path.realpath(os.fspath(p)) if not isinstance(p, int) else None
        except (TypeError, ValueError):
            return False
        if r is None:
            return False
        for d in paths:
            if r.startswith(d.rstrip(os.sep) + os.sep):
                return True
            if not below_only and r == d:
                return True
        return False

    def err(p):
        return PermissionError(errno.EACCES, "Permission denied", os.fspath(p) if not isinstance(p, int) else p)

    def scandir(p="."):
        if hit(p):
            raise err(p)
        return _REAL["scandir"](p)

    def listdir(p="."):
        if hit(p):
            raise err(p)
        return _REAL["listdir"](p)

    def stat(p, *a, **k):
        if hit(p, below_only=True):  # a file inside a denied folder cannot even be stat'ed
            raise err(p)
        return _REAL["stat"](p, *a, **k)

    def access(p, mode, *a, **k):
        if hit(p):
            return False
        return _REAL["access"](p, mode, *a, **k)

    def open_(p, *a, **k):
        if not isinstance(p, int) and hit(p):
            raise err(p)
        return _REAL["open"](p, *a, **k)

    os.scandir, os.listdir, os.stat, os.access, builtins.open = scandir, listdir, stat, access, open_
    io_open = io.open
    io.open = open_
    try:
        yield "simulated (root): os.scandir/os.stat/os.access/open raise EACCES"
    finally:
        os.scandir, os.listdir, os.stat, os.access = _REAL["scandir"], _REAL["listdir"], _REAL["stat"], _REAL["access"]
        builtins.open = _REAL["open"]
        io.open = io_open


# --------------------------------------------------------------------------------------------- #
# running one CLI call
# --------------------------------------------------------------------------------------------- #
class _Hang(BaseException):
    """Raised by SIGALRM in the main thread: never caught by cachekit (it catches Exception)."""


@dataclass
class Run:
    code: int | None
    stdout: str
    stderr: str
    exc: str | None = None  # "Type: message" of an uncaught exception
    hang: bool = False
    seconds: float = 0.0

    @property
    def lines(self) -> list[str]:
        return [ln.rstrip("\r") for ln in self.stderr.split("\n")] if self.stderr else []

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.lines if ln.startswith("Error:")]


_LOCK = threading.Lock()


def invoke(args, env: dict | None = None, timeout: float = TIMEOUT_S) -> Run:
    """`cachekit ARGS` in-process (click's CliRunner), with a plain CLI's warning filters."""
    from click.testing import CliRunner

    from cachekit.cli.main import cli

    args = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
    t0 = time.monotonic()
    use_alarm = threading.current_thread() is threading.main_thread()
    with _LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=cat)

        def alarm(signum, frame):
            raise _Hang()

        old = signal.signal(signal.SIGALRM, alarm) if use_alarm else None
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            res = CliRunner().invoke(cli, args, env=env, catch_exceptions=True)
        except _Hang:
            return Run(None, "", "", hang=True, seconds=time.monotonic() - t0)
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    exc = None
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        e = res.exception
        exc = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return Run(res.exit_code, res.stdout, shown + res.stderr, exc, seconds=time.monotonic() - t0)


def invoke_child(args, env: dict | None = None, timeout: float = TIMEOUT_S, prelude: str | None = None) -> Run:
    """`python -m cachekit ARGS` as a child process (arguments passed as bytes: names need not be UTF-8).
    `prelude`: Python run before the CLI in the child (e.g. to make a library function raise)."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "2")
    e.update(env or {})
    if prelude is None:
        cmd = [sys.executable, "-m", "cachekit"]
    else:
        cmd = [sys.executable, "-c", prelude + "\nimport sys\nsys.argv[0] = 'cachekit'\n"
               "from cachekit.cli.main import main\nmain()\n"]
    argv = [os.fsencode(a) if isinstance(a, (str, os.PathLike)) else a for a in cmd + [os.fspath(x) if
            isinstance(x, os.PathLike) else str(x) for x in args]]
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, env=e, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Run(None, "", "", hang=True, seconds=time.monotonic() - t0)
    out, err = p.stdout.decode("utf-8", "backslashreplace"), p.stderr.decode("utf-8", "backslashreplace")
    exc = None
    if p.returncode < 0:
        exc = f"killed by {signal.Signals(-p.returncode).name}"
    elif "Traceback (most recent call last)" in err:
        exc = err.strip().splitlines()[-1][:200]
    return Run(p.returncode, out, err, exc, seconds=time.monotonic() - t0)


# --------------------------------------------------------------------------------------------- #
# data-loss detection
# --------------------------------------------------------------------------------------------- #
def snapshot(folder: Path) -> dict[bytes, tuple]:
    """Every regular file and symlink under `folder` (not following links): sha256 / link target."""
    out: dict[bytes, tuple] = {}
    top = os.fsencode(str(folder))
    if not os.path.lexists(top):
        return out
    if not os.path.isdir(top):
        return {top: _fingerprint(top)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            fp = _fingerprint(p)
            if fp is not None:
                out[p] = fp
    return out


def _fingerprint(p: bytes):
    try:
        st = os.lstat(p)
    except OSError:
        return None
    import stat as _st

    if _st.S_ISLNK(st.st_mode):
        return ("link", os.readlink(p))
    if not _st.S_ISREG(st.st_mode):
        return None
    h = hashlib.sha256()
    with _REAL["open"](p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return ("file", st.st_size, h.hexdigest())


def lost(before: dict, after: dict, may_change=(), append_only=()) -> list[str]:
    """Files of `before` deleted or changed in `after`; `may_change`: path prefixes allowed to change;
    `append_only`: files that may only grow (their old bytes must stay their prefix)."""
    allow = [os.fsencode(str(p)) for p in may_change]
    grow = {os.fsencode(str(p)) for p in append_only}
    out = []
    for p, fp in before.items():
        if any(p == a or p.startswith(a.rstrip(b"/") + b"/") or p.startswith(a + b".") for a in allow):
            continue
        if p not in after:
            out.append(f"deleted {os.fsdecode(p)}")
        elif after[p] != fp:
            if p in grow and after[p][0] == "file" and _is_prefix(p, fp):
                continue
            out.append(f"changed {os.fsdecode(p)}")
    return out


_PREFIXES: dict[bytes, bytes] = {}


def _is_prefix(p: bytes, old_fp) -> bool:
    old = _PREFIXES.get(p)
    if old is None:
        return False
    with _REAL["open"](p, "rb") as fh:
        return fh.read(len(old)) == old


# --------------------------------------------------------------------------------------------- #
# cases
# --------------------------------------------------------------------------------------------- #
@dataclass
class Base:
    """Shared inputs, built once: a small tree, a cache of it and a results file of that cache."""

    work: Path
    tree: Path
    cache: Path
    results: Path

    @classmethod
    def build(cls, work: Path) -> "Base":
        work = Path(work)
        t = tree(work / "base" / "data", "split", seed=99)
        cache = work / "base" / "base.h5"
        r = invoke(["extract", t, "--model", "RN-tiny", "--shots", "1,2", "--seeds", "1", "--views", "1",
                    "--batch-size", "16", "--dense-dtype", "float32", "-q", "--out", cache])
        if r.code != 0:
            raise RuntimeError(f"building the base cache failed: {r.stderr[-300:]} {r.exc}")
        results = work / "base" / "rows.jsonl"
        r = invoke(["eval", cache, "--method", "zeroshot,tip", "--shots", "1", "--seeds", "1", "--out", results,
                    "-q", "--json"])
        if r.code != 0:
            raise RuntimeError(f"building the base results failed: {r.stderr[-300:]} {r.exc}")
        return cls(work, t, cache, results)


@dataclass
class Case:
    family: str
    name: str  # unique within the family: the drawn description
    build: Callable[[Path, Base], list]  # makes the inputs in a fresh folder; returns the CLI arguments
    expect: str = "either"  # ok | error | either
    needles: tuple = ()  # what the error line must name (expect == "error")
    check: Callable[[Path, Run], list[str]] | None = None  # the right answer, when the exit code is 0
    may_change: tuple = ()  # relative paths (in the case folder) the command may create or rewrite
    append_only: tuple = ()  # relative paths that may only grow
    deny: tuple = ()  # relative paths made unreadable
    child: bool = False
    env: dict | None = None
    prelude: str | None = None  # child only: Python run before the CLI
    debug: bool = False  # the traceback is asked for (--debug): expected on stderr, with one Error line
    planted: bool = False  # a failure planted in the library: one `internal error` line is the right answer

    @property
    def key(self) -> str:
        return f"{self.family}: {self.name}"


@dataclass
class Outcome:
    case: Case
    kind: str  # clean | traceback | hang | data lost | wrong
    code: int | None
    line: str
    detail: str = ""
    seconds: float = 0.0
    deny_mode: str = ""


def classify(case: Case, run: Run, losses: list[str], folder: Path) -> tuple[str, str, str]:
    """(kind, the line shown, detail)."""
    errs = run.error_lines
    first = errs[0] if errs else next((ln for ln in reversed((run.stdout + "\n" + run.stderr).split("\n"))
                                       if ln.strip()), "")
    if run.hang:
        return "hang", f"no answer within {TIMEOUT_S} s", ""
    if losses:
        return "data lost", first, "; ".join(losses[:3])
    printed = "Traceback (most recent call last)" in run.stdout + run.stderr
    if case.debug:
        probs = []
        if not printed:
            probs.append("no traceback printed with --debug")
        if run.code != 1 or len(errs) != 1 or "internal error" not in errs[0]:
            probs.append(f"expected exit 1 and one internal-error line, got exit {run.code}: {errs}")
        return ("wrong" if probs else "clean"), first, "; ".join(probs)
    if run.exc or printed:
        return "traceback", f"TRACEBACK {run.exc or ''}".strip(), ""
    if case.planted:
        ok = run.code == 1 and len(errs) == 1 and "internal error" in errs[0] and "--debug" in errs[0]
        return ("clean" if ok else "wrong"), first, "" if ok else f"expected one internal-error line, exit 1"
    if errs and "internal error" in errs[0]:
        return "traceback", first, "caught by the top-level guard"
    if run.code == 0:
        if case.expect == "error":
            return "wrong", first, f"exit 0, expected an error naming {list(case.needles)}"
        probs = case.check(folder, run) if case.check else []
        return ("wrong" if probs else "clean"), first or "exit 0", "; ".join(probs[:3])
    probs = []
    if run.code not in (1, 2):
        probs.append(f"exit code {run.code}")
    if len(errs) != 1:
        probs.append(f"{len(errs)} 'Error:' lines")
    elif run.code == 1:
        other = [ln for ln in run.lines if ln.strip() and not ln.startswith(("Error:", "NOTE:", "weights:"))]
        if other:
            probs.append(f"more than the error line on stderr: {other[:2]}")
    if case.expect == "ok":
        probs.append("refused an input that must work")
    elif case.expect == "error" and errs:
        low = errs[0].lower()
        missing = [n for n in case.needles if n.lower() not in low]
        if missing:
            probs.append(f"error line does not name {missing}")
    if errs and "fix:" not in errs[0] and run.code == 1:
        probs.append("no 'fix:' in the error line")
    return ("wrong" if probs else "clean"), first, "; ".join(probs)


def run_case(case: Case, folder: Path, base: Base, timeout: float = TIMEOUT_S) -> Outcome:
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        args = case.build(folder, base)
    except Exception as exc:  # a harness bug: say so, never count it as the library's
        raise RuntimeError(f"building case {case.key} failed: {type(exc).__name__}: {exc}") from exc
    before = {**snapshot(folder), **snapshot(base.cache), **snapshot(base.results), **snapshot(base.tree)}
    for rel in case.append_only:
        p = os.fsencode(str(folder / rel))
        if os.path.exists(p):
            with _REAL["open"](p, "rb") as fh:
                _PREFIXES[p] = fh.read()
    with denied([folder / p for p in case.deny]) as mode:
        if case.child:
            run = invoke_child(args, env=case.env, timeout=timeout, prelude=case.prelude)
        else:
            run = invoke(args, env=case.env, timeout=timeout)
    after = {**snapshot(folder), **snapshot(base.cache), **snapshot(base.results), **snapshot(base.tree)}
    losses = lost(before, after, [folder / p for p in case.may_change], [folder / p for p in case.append_only])
    kind, line, detail = classify(case, run, losses, folder)
    return Outcome(case, kind, run.code, line.replace(str(folder), "$CASE").replace(str(base.work), "$WORK"),
                   detail.replace(str(folder), "$CASE"), time.monotonic() - t0, mode)


# --------------------------------------------------------------------------------------------- #
# right answers
# --------------------------------------------------------------------------------------------- #
def cache_problems(out: Path, val_is_test: bool | None = None, classes: int | None = None) -> list[str]:
    """A cache is right when it opens and verifies, no image (by resolved file or by content) is in two classes
    or in train and val/test, val and test share images only as val_is_test (then all of them), and
    val_is_test / the class count are what the case asked for."""
    from cachekit.cache import Cache
    from cachekit.errors import CachekitError
    from cachekit.verify import verify

    if not Path(out).exists():
        return [f"exit 0 but no cache at {out}"]
    probs = []
    try:
        with Cache(out) as c:
            rep = verify(c, sample=4, full=False)
            if not rep.ok:
                probs.append(f"verify fails: {', '.join(x['check'] for x in rep.failed)}")
            root = Path(c.meta["dataset"]["root"])
            owner: dict[str, int] = {}
            where: dict[str, set] = {}
            for s in SPLITS:
                for p, y in zip(c.paths(s), c.labels(s).tolist()):
                    with _REAL["open"](root / p, "rb") as fh:
                        k = hashlib.sha256(fh.read()).hexdigest()
                    if owner.setdefault(k, y) != y:
                        probs.append(f"{p} is in two classes")
                    where.setdefault(k, set()).add(s)
            for k, ss in where.items():
                if "train" in ss and len(ss) > 1:
                    probs.append(f"an image is in {sorted(ss)}")
                if {"val", "test"} <= ss and not c.val_is_test:
                    probs.append("val and test share an image but val_is_test is false")
            if c.val_is_test and sorted(c.paths("val")) != sorted(c.paths("test")):
                probs.append("val_is_test but test differs from val")
            if val_is_test is not None and c.val_is_test != val_is_test:
                probs.append(f"val_is_test is {c.val_is_test}, expected {val_is_test}")
            if classes is not None and c.num_classes != classes:
                probs.append(f"{c.num_classes} classes, expected {classes}")
    except CachekitError as exc:
        probs.append(f"the cache does not open: {exc}")
    return probs


def expect_cache(rel: str = "out.h5", **kw):
    return lambda folder, run: cache_problems(folder / rel, **kw)


# --------------------------------------------------------------------------------------------- #
# family 1: DATA trees
# --------------------------------------------------------------------------------------------- #
def _classes(base: Path) -> list[Path]:
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def _m(fn, verdict, needle="", layouts=("flat", "split")):
    return {"fn": fn, "verdict": verdict, "needle": needle, "layouts": layouts}


def _tb(root: Path, layout: str, split: str = "train") -> Path:
    return root if layout == "flat" else root / split


def _tm_hidden(root, layout, ctx):
    c = _classes(_tb(root, layout))[0]
    (c / ".DS_Store").write_bytes(b"\0junk")
    png(c / ".hidden.png", 7001)


def _tm_nonimage(root, layout, ctx):
    c = _classes(_tb(root, layout))[1]
    (c / "readme.txt").write_text("notes")
    (c / "labels.csv").write_text("a,b\n")


def _tm_nested(root, layout, ctx):
    c = _classes(_tb(root, layout))[2]
    png(c / "sub" / "deeper" / "n.png", 7002)


def _tm_unicode(root, layout, ctx):
    for split in (SPLITS if layout == "split" else ("train",)):
        c = _classes(_tb(root, layout, split))[1]
        c.rename(c.with_name("café ü"))
    png(_classes(_tb(root, layout))[0] / "ö ñ.png", 7003)


def _tm_upper_ext(root, layout, ctx):
    png(_classes(_tb(root, layout))[0] / "UPPER.PNG", 7004)


def _tm_macosx(root, layout, ctx):
    (_classes(_tb(root, layout))[0] / "__MACOSX").mkdir()
    (_classes(_tb(root, layout))[0] / "__MACOSX" / "._img0.png").write_bytes(b"\0\5junk")


def _tm_link_outside(root, layout, ctx):
    ext = root.parent / "outside"
    png(ext / "o1.png", 7005)
    png(ext / "o2.png", 7006)
    os.symlink(ext, _classes(_tb(root, layout))[2] / "linked")


def _tm_same_class_copy(root, layout, ctx):
    c = _classes(_tb(root, layout))[0]
    shutil.copy(c / "img0.png", c / "img0_copy.png")


def _tm_loose(root, layout, ctx):
    png(root / "loose.png", 7007)


def _tm_dir_like_image(root, layout, ctx):
    (_classes(_tb(root, layout))[1] / "folder.jpg").mkdir()


def _tm_newline(root, layout, ctx):
    png(_classes(_tb(root, layout))[2] / "new\nline.png", 7008)


def _tm_empty_class(root, layout, ctx):
    for split in (SPLITS if layout == "split" else ("train",)):
        (_tb(root, layout, split) / "zz_empty").mkdir()


def _tm_fifo(root, layout, ctx):
    os.mkfifo(_classes(_tb(root, layout))[0] / "pipe.png")


def _tm_broken(root, layout, ctx):
    os.symlink(root.parent / "gone.png", _classes(_tb(root, layout))[1] / "gone.png")


def _tm_link_parent(root, layout, ctx):
    os.symlink("..", _classes(_tb(root, layout))[0] / "up")


def _tm_link_root(root, layout, ctx):
    os.symlink(root, _classes(_tb(root, layout))[1] / "all")


def _tm_link_self(root, layout, ctx):
    d = _classes(_tb(root, layout))[2] / "sub"
    png(d / "s.png", 7009)
    os.symlink(".", d / "again")


def _tm_link_sibling(root, layout, ctx):
    cs = _classes(_tb(root, layout))
    os.symlink(cs[1], cs[0] / "other")


def _tm_copy_other_class(root, layout, ctx):
    cs = _classes(_tb(root, layout))
    shutil.copy(cs[1] / "img0.png", cs[0] / "stolen.png")


def _tm_hardlink_other_class(root, layout, ctx):
    cs = _classes(_tb(root, layout))
    os.link(cs[2] / "img1.png", cs[0] / "hard.png")


def _tm_nonutf8_file(root, layout, ctx):
    src = _classes(_tb(root, layout))[0]
    shutil.copy(src / "img0.png", _fsjoin(src, b"bad\xff.png"))
    os.remove(src / "img0.png")


def _tm_nonutf8_folder(root, layout, ctx):
    for split in (SPLITS if layout == "split" else ("train",)):
        c = _classes(_tb(root, layout, split))[1]
        os.rename(c, _fsjoin(c.parent, b"cl\xe9ss"))


def _tm_unreadable_sub(root, layout, ctx):
    c = _classes(_tb(root, layout))[0]
    png(c / "private" / "p.png", 7010)
    ctx["deny"].append(os.path.relpath(c / "private", ctx["folder"]))


def _tm_unreadable_class(root, layout, ctx):
    c = _classes(_tb(root, layout))[1]
    ctx["deny"].append(os.path.relpath(c, ctx["folder"]))


def _tm_unreadable_image(root, layout, ctx):
    c = _classes(_tb(root, layout))[2]
    ctx["deny"].append(os.path.relpath(c / "img1.png", ctx["folder"]))


def _bad_target(root, layout) -> Path:
    return _classes(_tb(root, layout, "val"))[0] if layout == "split" else _classes(root)[0]


def _tm_zero_byte(root, layout, ctx):
    (_bad_target(root, layout) / "zero.png").write_bytes(b"")


def _tm_text_image(root, layout, ctx):
    (_bad_target(root, layout) / "text.png").write_text("not an image")


def _tm_bomb(root, layout, ctx):
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 30000, 20000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    (_bad_target(root, layout) / "bomb.png").write_bytes(data)


def _tm_dup_names(root, layout, ctx):
    for split in (SPLITS if layout == "split" else ("train",)):
        b = _tb(root, layout, split)
        png(b / "red_car" / "r.png", 7100 + len(split))
        png(b / "red car" / "r.png", 7200 + len(split))


def _tm_class_called_train(root, layout, ctx):
    png(root / "train" / "t.png", 7011)


def _tm_test_links_val(root, layout, ctx):
    shutil.rmtree(root / "test")
    os.symlink("val", root / "test")
    ctx["val_is_test"] = True


def _tm_test_copy_val(root, layout, ctx):
    shutil.rmtree(root / "test")
    shutil.copytree(root / "val", root / "test")
    ctx["val_is_test"] = True


def _tm_val_links_train(root, layout, ctx):
    c = _classes(root / "val")[0]
    os.symlink(_classes(root / "train")[0] / "img0.png", c / "linked.png")


def _tm_val_copy_train(root, layout, ctx):
    shutil.copy(_classes(root / "train")[1] / "img1.png", _classes(root / "val")[1] / "copied.png")


def _tm_partial_val_test(root, layout, ctx):
    shutil.copy(_classes(root / "val")[2] / "img0.png", _classes(root / "test")[2] / "also.png")


def _tm_split_missing_class(root, layout, ctx):
    shutil.rmtree(_classes(root / "test")[2])


def _tm_class_links_root(root, layout, ctx):
    os.symlink(root, _tb(root, layout) / "zz_root")
    if layout == "split":
        for s in ("val", "test"):
            os.symlink(root, root / s / "zz_root")


TREE_MUTATIONS: dict[str, dict] = {
    # harmless oddities: the extraction must work and be right
    "hidden-files": _m(_tm_hidden, "ok"),
    "non-image-files": _m(_tm_nonimage, "ok"),
    "nested-subfolder": _m(_tm_nested, "ok"),
    "unicode-names": _m(_tm_unicode, "ok"),
    "uppercase-extension": _m(_tm_upper_ext, "ok"),
    "macosx-folder": _m(_tm_macosx, "ok"),
    "symlinked-folder-outside": _m(_tm_link_outside, "ok"),
    "copy-in-same-class": _m(_tm_same_class_copy, "ok"),
    "loose-image-in-root": _m(_tm_loose, "ok"),
    "folder-named-like-image": _m(_tm_dir_like_image, "ok"),
    "newline-in-file-name": _m(_tm_newline, "ok"),
    "test-is-a-link-to-val": _m(_tm_test_links_val, "ok", layouts=("split",)),
    "test-is-a-copy-of-val": _m(_tm_test_copy_val, "ok", layouts=("split",)),
    # bad inputs: one clean error naming the problem
    "empty-class-folder": _m(_tm_empty_class, "error", "empty class folder"),
    "fifo-as-image": _m(_tm_fifo, "error", "FIFO"),
    "broken-symlink": _m(_tm_broken, "error", "broken link"),
    "symlink-to-parent": _m(_tm_link_parent, "error", "symlink loop"),
    "symlink-to-dataset-root": _m(_tm_link_root, "error", "symlink loop"),
    "symlink-to-itself": _m(_tm_link_self, "error", "symlink loop"),
    "class-folder-links-root": _m(_tm_class_links_root, "error", "symlink loop"),
    "symlink-to-sibling-class": _m(_tm_link_sibling, "error", "two classes"),
    "copy-in-other-class": _m(_tm_copy_other_class, "error", "two classes"),
    "hardlink-in-other-class": _m(_tm_hardlink_other_class, "error", "two classes"),
    "file-name-not-utf8": _m(_tm_nonutf8_file, "error", "not valid UTF-8"),
    "folder-name-not-utf8": _m(_tm_nonutf8_folder, "error", "not valid UTF-8"),
    "unreadable-subfolder": _m(_tm_unreadable_sub, "error", "permission denied"),
    "unreadable-class-folder": _m(_tm_unreadable_class, "error", "permission denied"),
    "unreadable-image": _m(_tm_unreadable_image, "error", "permission denied"),
    "zero-byte-image": _m(_tm_zero_byte, "error", "not an image"),
    "text-file-as-image": _m(_tm_text_image, "error", "not an image"),
    "decompression-bomb-header": _m(_tm_bomb, "error", "decompression-bomb"),
    "duplicate-class-names": _m(_tm_dup_names, "error", "duplicate class name"),
    "class-folder-called-train": _m(_tm_class_called_train, "error", "mixes split folders", ("flat",)),
    "val-image-links-train": _m(_tm_val_links_train, "error", "both train and val", ("split",)),
    "val-image-copies-train": _m(_tm_val_copy_train, "error", "both train and val", ("split",)),
    "val-and-test-partly-overlap": _m(_tm_partial_val_test, "error", "both val and test", ("split",)),
    "split-missing-a-class": _m(_tm_split_missing_class, "error", "differ", ("split",)),
}
# mutations that rewrite the same thing: at most one of each group per case
_TREE_EXCLUSIVE = [{"test-is-a-link-to-val", "test-is-a-copy-of-val", "val-and-test-partly-overlap",
                    "split-missing-a-class"},
                   {"unicode-names", "folder-name-not-utf8", "unreadable-class-folder"},
                   {"class-folder-called-train", "loose-image-in-root"}]


def _image_error(name: str, layout: str) -> bool:
    """Bad image bytes are found when an image is decoded: in flat layouts the file may be carved into train
    and not sampled (then never read), so the verdict there is 'either'."""
    return name in ("zero-byte-image", "text-file-as-image", "decompression-bomb-header") and layout == "flat"


def tree_case(desc: tuple) -> Case:
    layout, names = desc
    verdicts = [TREE_MUTATIONS[n]["verdict"] for n in names]
    errors = [n for n in names if TREE_MUTATIONS[n]["verdict"] == "error"]
    expect = "error" if errors else "ok"
    if any(_image_error(n, layout) for n in names) and len(errors) == sum(_image_error(n, layout) for n in names):
        expect = "either"
    needles = (TREE_MUTATIONS[errors[0]]["needle"],) if len(errors) == 1 and expect == "error" else ()
    ctx: dict = {"deny": [], "val_is_test": False}

    def build(folder: Path, base: Base) -> list:
        root = tree(folder / "data", layout, seed=stable_hash(desc) % 1000)
        ctx["folder"] = folder
        for n in names:
            TREE_MUTATIONS[n]["fn"](root, layout, ctx)
        case.deny = tuple(ctx["deny"])
        return ["extract", root, *EXTRACT, "--out", folder / "out.h5"]

    case = Case("DATA tree", f"{layout}: {', '.join(names) or 'unchanged'}", build, expect, needles,
                check=lambda f, r: cache_problems(f / "out.h5", val_is_test=ctx["val_is_test"],
                                                  classes=3 + ("duplicate-class-names" in names)),
                may_change=("out.h5",))
    del verdicts
    return case


def tree_strategy():
    from hypothesis import strategies as st

    @st.composite
    def draw(d):
        layout = d(st.sampled_from(["flat", "split"]))
        pool = sorted(n for n, m in TREE_MUTATIONS.items() if layout in m["layouts"])
        names = d(st.lists(st.sampled_from(pool), min_size=0, max_size=3, unique=True))
        kept = []
        for n in names:
            if not any(n in g and kept_g for g in _TREE_EXCLUSIVE for kept_g in [set(kept) & g]):
                kept.append(n)
        return layout, tuple(sorted(kept))

    return draw()


# --------------------------------------------------------------------------------------------- #
# family 2 and 3: manifests (CSV, JSONL) and CoOp split files
# --------------------------------------------------------------------------------------------- #
POOL_PER_CLASS = 8


def image_pool(root: Path, seed: int = 0) -> Path:
    for c in range(3):
        for j in range(POOL_PER_CLASS):
            png(root / f"c{c}" / f"i{j}.png", 50_000 + seed * 1000 + c * 100 + j)
    return root


def _assignment_rows(assign) -> list[list]:
    """[path, class index, split] per image from per-class (n_train, n_val, n_test)."""
    rows = []
    for c, (nt, nv, ns) in enumerate(assign):
        j = 0
        for split, n in (("train", nt), ("val", nv), ("test", ns)):
            for _ in range(n):
                rows.append([f"c{c}/i{j}.png", c, split])
                j += 1
    return rows


# mutation -> (formats it applies to, verdict, needle)
LIST_MUTATIONS: dict[str, tuple] = {
    "crlf-line-ends": (("csv", "jsonl"), "ok", ""),
    "utf8-bom": (("csv", "jsonl", "coop"), "ok", ""),
    "extra-columns": (("csv", "jsonl", "coop"), "ok", ""),
    "blank-lines": (("csv", "jsonl"), "ok", ""),
    "split-in-capitals-and-spaces": (("csv", "jsonl"), "ok", ""),
    "absolute-path-inside-root": (("csv", "jsonl", "coop"), "ok", ""),
    "dot-segments-in-path": (("csv", "jsonl", "coop"), "ok", ""),
    "val-listed-again-as-test": (("csv", "jsonl", "coop"), "ok", ""),
    "unicode-class-names": (("csv", "jsonl", "coop"), "ok", ""),
    "missing-file": (("csv", "jsonl", "coop"), "error", "missing"),
    "path-escapes-root": (("csv", "jsonl", "coop"), "error", "escapes the image root"),
    "absolute-path-outside": (("csv", "jsonl", "coop"), "error", "outside the image root"),
    "nul-in-path": (("csv", "jsonl", "coop"), "error", "NUL"),
    "empty-path": (("csv", "jsonl", "coop"), "error", "empty image path"),
    "path-is-a-folder": (("csv", "jsonl", "coop"), "error", "a folder, not a file"),
    "path-is-a-fifo": (("csv", "jsonl", "coop"), "error", "FIFO"),
    "path-unreadable": (("csv", "jsonl", "coop"), "error", "permission denied"),
    "unknown-split": (("csv", "jsonl"), "error", "unknown split"),
    "negative-label": (("csv", "jsonl", "coop"), "error", "out of range"),
    "label-10**12": (("csv", "jsonl", "coop"), "error", "no train images"),
    "label-of-5000-digits": (("csv", "jsonl", "coop"), "error", ""),
    "label-gap": (("csv", "jsonl", "coop"), "error", "no train images"),
    "mixed-int-and-name-labels": (("jsonl",), "error", "earlier labels"),
    "float-label": (("jsonl", "coop"), "error", ""),
    "duplicate-row": (("csv", "jsonl", "coop"), "error", "duplicate"),
    "image-in-train-and-test": (("csv", "jsonl", "coop"), "error", "both train and test"),
    "val-and-test-partly-overlap": (("csv", "jsonl", "coop"), "error", "both val and test"),
    "symlink-to-other-class-image": (("csv", "jsonl", "coop"), "error", "two classes"),
    "copy-of-train-image-in-val": (("csv", "jsonl", "coop"), "error", "both train and val"),
    "not-utf8": (("csv", "jsonl", "coop"), "error", "not UTF-8"),
    "utf16": (("csv", "jsonl", "coop"), "error", "not UTF-8"),
    "broken-quote": (("csv",), "error", "malformed CSV"),
    "short-row": (("csv",), "error", "malformed CSV"),
    "no-split-column": (("csv",), "error", "no 'split' column"),
    "empty-file": (("csv", "jsonl", "coop"), "error", ""),
    "nested-10**5-deep": (("jsonl", "coop"), "error", "nested too deeply"),
    "lone-surrogate-in-path": (("jsonl", "coop"), "error", "not valid UTF-8"),
    "not-an-object": (("jsonl", "coop"), "error", ""),
    "manifest-is-a-fifo": (("csv", "jsonl", "coop"), "error", "FIFO"),
    "manifest-unreadable": (("csv", "jsonl", "coop"), "error", "permission denied"),
    "conflicting-class-names": (("coop",), "error", "conflicting class names"),
    "entry-of-two-fields": (("coop",), "error", "malformed entry"),
    "bool-label": (("coop", "jsonl"), "error", ""),
    "no-image-root": (("coop",), "error", "--image-root"),
    "image-root-is-a-file": (("coop", "csv"), "error", "not a directory"),
}


_BIG = "__5000_DIGITS__"
#: mutations of integer labels (on class-name labels they would only add a class name)
_INT_ONLY = {"negative-label", "label-10**12", "label-of-5000-digits", "label-gap"}


def _label_value(fmt: str, names: bool, c: int):
    return (["cat", "dog", "yak"][c] if names else c)


def list_case(desc: tuple) -> Case:
    """desc = (fmt, names (class-name labels), assign ((train, val, test) per class), mutations)."""
    fmt, names, assign, muts = desc
    no_train = any(a[0] == 0 for a in assign)
    errors = [m for m in muts if LIST_MUTATIONS[m][1] == "error"]
    expect = "error" if errors or no_train else "ok"
    needles = ((LIST_MUTATIONS[errors[0]][2],) if len(errors) == 1 and not no_train and LIST_MUTATIONS[errors[0]][2]
               else ("no train images",) if no_train and not errors else ())
    has_val = any(a[1] for a in assign) or "val-and-test-partly-overlap" in muts
    has_test = any(a[2] for a in assign)
    val_is_test = (has_val and not has_test) or ("val-listed-again-as-test" in muts and has_val)
    ext = {"csv": "m.csv", "jsonl": "m.jsonl", "coop": "split_zhou_X.json"}[fmt]

    def build(folder: Path, base: Base) -> list:
        img = image_pool(folder / "img", seed=stable_hash(desc) % 97)
        rows = _assignment_rows(assign)
        label = {c: _label_value(fmt, names, c) for c in range(3)}
        if "unicode-class-names" in muts and names:
            label = {0: "chat noir", 1: "Hund ü", 2: "ヤク"}
        image_root = img
        man = folder / ext
        extra_args: list = []
        deny: list = []
        if "val-and-test-partly-overlap" in muts:
            rows.append(["c0/i7.png", 0, "val"])
            rows.append(["c0/i7.png", 0, "test"])
            rows.append(["c1/i7.png", 1, "test"])
        if "val-listed-again-as-test" in muts:
            rows = [r for r in rows if r[2] != "test"] + [[p, c, "test"] for p, c, s in rows if s == "val"]
        if "image-in-train-and-test" in muts:
            first_train = next(r for r in rows if r[2] == "train")
            rows.append([first_train[0], first_train[1], "test"])
        if "duplicate-row" in muts:
            rows.append(list(rows[0]))
        if "missing-file" in muts:
            rows.append(["c0/nope.png", 0, rows[0][2]])
        if "path-escapes-root" in muts:
            rows.append(["../outside.png", 0, "train"])
        if "absolute-path-outside" in muts:
            rows.append([str(png(folder / "elsewhere.png", 9)), 0, "train"])
        if "absolute-path-inside-root" in muts:
            rows[0][0] = str(img / rows[0][0])
        if "dot-segments-in-path" in muts:
            rows[1][0] = "./" + rows[1][0].replace("/", "/./x/../", 1)
        if "nul-in-path" in muts:
            rows.append(["c0/a\x00b.png", 0, "train"])
        if "empty-path" in muts:
            rows.append(["", 0, "train"])
        if "path-is-a-folder" in muts:
            rows.append(["c1", 1, "train"])
        if "path-is-a-fifo" in muts:
            os.mkfifo(img / "c2" / "fifo.png")
            rows.append(["c2/fifo.png", 2, "train"])
        if "path-unreadable" in muts:
            deny.append(os.path.relpath(img / rows[0][0], folder) if not os.path.isabs(rows[0][0])
                        else os.path.relpath(rows[0][0], folder))
        if "unknown-split" in muts:
            rows.append(["c0/i6.png", 0, "training"])
        if "symlink-to-other-class-image" in muts:
            os.symlink(img / "c1" / "i0.png", img / "c0" / "link.png")
            rows.append(["c0/link.png", 0, "train"])
        if "copy-of-train-image-in-val" in muts:
            first_train = next(r for r in rows if r[2] == "train")
            shutil.copy(img / first_train[0], img / "copy.png")
            rows.append(["copy.png", first_train[1], "val"])
        lab = [label[r[1]] if isinstance(r[1], int) else r[1] for r in rows]
        if "negative-label" in muts:
            lab[0] = -1
        if "label-10**12" in muts:
            lab[-1] = 10**12
        if "label-of-5000-digits" in muts:
            lab[-1] = _BIG  # written as 5000 nines (Python refuses str() of such an int by default)
        if "label-gap" in muts:
            lab = [(x + 5 if x == 2 else x) if isinstance(x, int) else x for x in lab]
        if "mixed-int-and-name-labels" in muts:
            lab[-1] = "cat" if isinstance(lab[-1], int) else 2
        if "float-label" in muts:
            lab[-1] = 1.0
        if "bool-label" in muts:
            lab[-1] = True
        splits = [r[2] for r in rows]
        if "split-in-capitals-and-spaces" in muts:
            splits = [f" {s.upper()} " for s in splits]
        paths = [r[0] for r in rows]
        if "lone-surrogate-in-path" in muts:
            paths.append("c0/\udcff.png")
            lab.append(lab[0])
            splits.append("train")
        text = _render(fmt, paths, lab, splits, names, muts)
        text = text.replace(f'"{_BIG}"', "9" * 5000).replace(_BIG, "9" * 5000)
        data = text.encode("utf-8") if isinstance(text, str) else text
        if "utf8-bom" in muts:
            data = b"\xef\xbb\xbf" + data
        if "not-utf8" in muts:
            data = data.replace(b"c0/i0.png", b"c0/i\xff0.png", 1) if b"c0/i0.png" in data else data + b"\xff"
        if "utf16" in muts:
            data = text.encode("utf-16") if isinstance(text, str) else data
        if "empty-file" in muts:
            data = b""
        if "manifest-is-a-fifo" in muts:
            os.mkfifo(man)
        else:
            man.write_bytes(data)
        if "manifest-unreadable" in muts:
            deny.append(ext)
        case.deny = tuple(deny)
        if fmt == "coop":
            if "image-root-is-a-file" in muts:
                extra_args = ["--image-root", folder / ext]
            elif "no-image-root" not in muts:
                extra_args = ["--image-root", image_root]
        elif "image-root-is-a-file" in muts:
            extra_args = ["--image-root", img / "c0" / "i0.png"]
        else:
            extra_args = ["--image-root", image_root]
        return ["extract", man, *extra_args, *EXTRACT, "--out", folder / "out.h5"]

    case = Case({"csv": "CSV manifest", "jsonl": "JSONL manifest", "coop": "CoOp split file"}[fmt],
                f"{'names' if names else 'ints'} {'/'.join(''.join(map(str, a)) for a in assign)}: "
                f"{', '.join(muts) or 'plain'}", build, expect, needles,
                check=lambda f, r: cache_problems(f / "out.h5", val_is_test=val_is_test, classes=3),
                may_change=("out.h5",))
    return case


def _render(fmt: str, paths, labels, splits, names: bool, muts) -> str | bytes:
    nl = "\r\n" if "crlf-line-ends" in muts else "\n"
    if fmt == "csv":
        import csv as _csv

        buf = io.StringIO()
        w = _csv.writer(buf, lineterminator=nl)
        header = ["path", "label", "split"] + (["source", "note"] if "extra-columns" in muts else [])
        if "no-split-column" in muts:
            header = ["path", "label", "part"]
        w.writerow(header)
        for p, lab, s in zip(paths, labels, splits):
            w.writerow([p, lab, s] + (["web", "x,y"] if "extra-columns" in muts else []))
            if "blank-lines" in muts:
                buf.write(nl)
        text = buf.getvalue()
        if "broken-quote" in muts:
            text += f'"c0/i6.png,{labels[0]},train{nl}'
        if "short-row" in muts:
            text += f"c0/i6.png{nl}"
        return text
    if fmt == "jsonl":
        lines = []
        for p, lab, s in zip(paths, labels, splits):
            obj = {"path": p, "label": lab, "split": s}
            if "extra-columns" in muts:
                obj["note"] = {"nested": [1, 2]}
            lines.append(json.dumps(obj))
            if "blank-lines" in muts:
                lines.append("   ")
        if "nested-10**5-deep" in muts:
            lines.append("[" * 100_000 + "]" * 100_000)
        if "not-an-object" in muts:
            lines.append('["c0/i0.png", 0, "train"]')
        if "label-of-5000-digits" in muts:
            lines[-1] = lines[-1]  # the label is already a 5000-digit integer in the JSON text
        return nl.join(lines) + nl
    # CoOp: [path, int label, class name]
    names_of = {}
    obj: dict = {s: [] for s in SPLITS}
    for p, lab, s in zip(paths, labels, splits):
        s = s.strip().lower()
        cls = lab if isinstance(lab, int) and not isinstance(lab, bool) else lab
        name = {0: "cat", 1: "dog", 2: "yak"}.get(cls, f"class {cls}") if isinstance(cls, int) else str(cls)
        if "unicode-class-names" in muts and isinstance(cls, int):
            name = {0: "chat noir", 1: "Hund ü", 2: "ヤク"}.get(cls, name)
        names_of.setdefault(cls if not isinstance(cls, bool) else -7, name)
        obj.setdefault(s, []).append([p, cls, name])
    obj = {s: v for s, v in obj.items() if v}
    if "conflicting-class-names" in muts:
        first = obj["train"][0]
        obj["train"].append([first[0].replace("i0", "i7"), first[1], first[2] + " other"])
    if "entry-of-two-fields" in muts:
        obj["train"].append(["c0/i6.png", 0])
    if "extra-columns" in muts:
        obj["meta"] = {"note": "extra top-level keys are ignored"}
    if "nested-10**5-deep" in muts:
        return "[" * 100_000 + "]" * 100_000
    if "not-an-object" in muts:
        return json.dumps([obj.get("train", [])])
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    return text


def list_strategy(fmt: str):
    from hypothesis import strategies as st

    per_class = st.tuples(st.sampled_from([0, 3, 4]), st.integers(0, 2), st.integers(0, 2))
    pool = sorted(m for m, (fmts, _, _) in LIST_MUTATIONS.items() if fmt in fmts)
    weights_ok = [m for m in pool if LIST_MUTATIONS[m][1] == "ok"]

    @st.composite
    def draw(d):
        names = d(st.booleans()) if fmt != "coop" else False
        assign = d(st.lists(per_class, min_size=3, max_size=3).map(tuple))
        if d(st.integers(0, 3)) == 0:
            assign = tuple((a[0] or 3, a[1], a[2]) for a in assign)
        else:
            assign = tuple((max(a[0], 3), a[1], a[2]) for a in assign)
        k = d(st.integers(0, 2))
        muts = d(st.lists(st.sampled_from(pool if d(st.booleans()) else weights_ok or pool), min_size=k,
                          max_size=k, unique=True))
        # integer-only mutations on name labels (and the reverse) would say nothing new
        muts = [m for m in muts if not (names and m in _INT_ONLY)]
        return fmt, names, assign, tuple(sorted(muts))

    return draw()


# --------------------------------------------------------------------------------------------- #
# family 4: template and class-name files
# --------------------------------------------------------------------------------------------- #
TEXT_FILES: dict[str, tuple] = {
    # (option, content or special, verdict, needle)
    "templates: plain": ("--templates", "a photo of a {}.\nart of the {}.\n", "ok", ""),
    "templates: comments and blank lines": ("--templates", "# mine\n\n  a {} photo  \n", "ok", ""),
    "templates: a format spec": ("--templates", "a {:>3} photo\n", "ok", ""),
    "templates: literal braces": ("--templates", "a {{logo}} of {}\n", "ok", ""),
    "templates: unicode": ("--templates", "une photo d'un {} ✓\n", "ok", ""),
    "templates: not UTF-8": ("--templates", b"a \xff {}\n", "error", "not UTF-8"),
    "templates: UTF-16": ("--templates", "a {}\n".encode("utf-16"), "error", "not UTF-8"),
    "templates: empty": ("--templates", "", "error", "no template"),
    "templates: no braces": ("--templates", "a photo\n", "error", "exactly one {}"),
    "templates: two braces": ("--templates", "a {} and {}\n", "error", "exactly one {}"),
    "templates: a named field": ("--templates", "a {x} of {}\n", "error", "exactly one {}"),
    "templates: only escaped braces": ("--templates", "{{}}\n", "error", "exactly one {}"),
    "templates: a NUL": ("--templates", "a \x00 {}\n", "error", "NUL"),
    "templates: a FIFO": ("--templates", "<fifo>", "error", "FIFO"),
    "templates: a folder": ("--templates", "<folder>", "error", "folder"),
    "templates: unreadable": ("--templates", "<denied>", "error", "permission denied"),
    "templates: a name not UTF-8": ("--templates", "<nonutf8-name>", "error", "not valid UTF-8"),
    "classnames: plain": ("--classnames", "ant\nbee\ncow\n", "ok", ""),
    "classnames: wnid lines": ("--classnames", "n01440764 tench\nn01443537 goldfish\nn01484850 shark\n", "ok", ""),
    "classnames: unicode": ("--classnames", "fourmi ✓\nabeille\nvache\n", "ok", ""),
    "classnames: not UTF-8": ("--classnames", b"ant\nb\xffee\ncow\n", "error", "not UTF-8"),
    "classnames: two names": ("--classnames", "ant\nbee\n", "error", "has 2 names"),
    "classnames: duplicate": ("--classnames", "ant\nant\ncow\n", "error", "duplicate class name"),
    "classnames: empty": ("--classnames", "\n\n", "error", "empty"),
    "classnames: a NUL": ("--classnames", "ant\nb\x00ee\ncow\n", "error", "NUL"),
    "classnames: a FIFO": ("--classnames", "<fifo>", "error", "FIFO"),
    "classnames: unreadable": ("--classnames", "<denied>", "error", "permission denied"),
}


def text_case(name: str) -> Case:
    opt, content, verdict, needle = TEXT_FILES[name]

    def build(folder: Path, base: Base) -> list:
        root = tree(folder / "data", "flat", seed=3)
        f = folder / "file.txt"
        if content == "<fifo>":
            os.mkfifo(f)
        elif content == "<folder>":
            f.mkdir()
        elif content == "<nonutf8-name>":
            f = Path(_fsjoin(folder, b"t\xff.txt"))
            f.write_text("a {}\n")
        else:
            f.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
            if content == "<denied>":
                pass
        if content == "<denied>":
            f.write_text("a {}\n" if opt == "--templates" else "a\nb\nc\n")
            case.deny = ("file.txt",)
        return ["extract", root, *EXTRACT, opt, f, "--out", folder / "out.h5"]

    case = Case("template/class-name file", name, build, verdict, (needle,) if needle else (),
                check=expect_cache(classes=3), may_change=("out.h5",))
    return case


# --------------------------------------------------------------------------------------------- #
# family 5: options of extract / info / verify (and the guard on the other commands)
# --------------------------------------------------------------------------------------------- #
def _opt_case(name: str, make: Callable[[Path, Base], list], verdict: str, needle: str = "", check=None,
              may_change=("out.h5",), deny=(), family="option") -> Case:
    return Case(family, name, make, verdict, (needle,) if needle else (), check=check, may_change=may_change,
                deny=deny)


def _extract_with(*opts, data=None):
    def make(folder: Path, base: Base) -> list:
        root = tree(folder / "data", "flat", seed=5) if data is None else data(folder, base)
        return ["extract", root, *EXTRACT, *[o(folder, base) if callable(o) else o for o in opts],
                "--out", folder / "out.h5"]

    return make


EXTRACT_OPTION_VALUES: dict[str, list[tuple]] = {
    # option -> [(value, verdict, needle)]
    "--shots": [(",", "error", "names no number"), ("", "error", ""), ("0", "error", "out of range"),
                ("-1", "error", "out of range"), ("x", "error", "not an integer"), ("1,,2", "ok", ""),
                (" 2 ", "ok", ""), ("99999999999999999999", "error", "out of range"), ("1e3", "error", ""),
                ("100000000", "error", "out of range"), ("4000000", "error", "over the limit"), ("3", "ok", "")],
    "--seeds": [(",", "error", "names no number"), ("x", "error", ""), ("-5", "ok", ""),
                ("99999999999999999999", "error", "out of range"), ("1,1,1", "ok", "")],
    "--views": [("-1", "error", ""), ("10001", "error", "out of range"), ("abc", "error", ""), ("2", "ok", "")],
    "--batch-size": [("0", "error", ""), ("-3", "error", ""), ("1000000000000", "ok", ""), ("1", "ok", "")],
    "--workers": [("-1", "error", ""), ("100000", "error", "out of range"), ("1", "ok", "")],
    "--device": [("gpu0", "error", "not a torch device"), ("cuda:99", "error", ""), ("", "error", ""),
                 ("meta", "error", "only cpu and cuda"), ("mps", "error", ""), ("cpu", "ok", "")],
    "--val-fraction": [("nan", "error", ""), ("1", "error", ""), ("-0.1", "error", ""), ("0.9", "error", "nothing for train"),
                       ("0.25", "ok", "")],
    "--test-fraction": [("inf", "error", ""), ("0.85", "error", "nothing for train")],
    "--split-seed": [("99999999999999999999999", "error", "out of range"), ("-1", "ok", "")],
    "--init-seed": [("99999999999999999999999", "error", "out of range"), ("-7", "ok", "")],
    "--aug-seed": [("-99999999999999999999999", "error", "out of range")],
    "--model": [("RN999", "error", "unknown model"), ("", "error", ""), ("../../etc/passwd", "error", "unknown model")],
    "--dense-dtype": [("float64", "error", "")],
    "--amp-dtype": [("int8", "error", "")],
    "--decode": [("gpu", "error", "")],
    "--num-shards": [("0", "error", "")],
}


def option_cases() -> list[Case]:
    cases = []
    for opt, values in EXTRACT_OPTION_VALUES.items():
        for value, verdict, needle in values:
            args = [opt, value]
            if opt == "--device" and value.startswith("cuda"):
                try:
                    import torch

                    if torch.cuda.is_available():
                        continue  # a GPU here: no error to expect
                except Exception:  # noqa: BLE001
                    pass
            cases.append(_opt_case(f"extract {opt} {value!r}", _extract_with(*args), verdict, needle,
                                   check=expect_cache(classes=3)))
    # path options
    paths = {
        "--out is DATA (a manifest), with --overwrite": (_out_is_manifest, "error", "the DATA this command reads"),
        "--out is an image of the dataset, with --overwrite": (
            lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT, "--overwrite", "--out",
                          f / "data" / "c0" / "img0.png"], "error", "image of the dataset"),
        "--out is a folder": (lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT, "--out", f / "data"],
                              "error", ""),
        "--out below a file": (lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT, "--out",
                                             _touch(f / "afile") / "c.h5"], "error", "not a folder"),
        "--out an existing text file": (lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT, "--out",
                                                      _write(f / "out.h5", "notes")], "error", "not a readable"),
        "--out a FIFO": (lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT, "--out", _fifo(f / "out.h5")],
                         "error", ""),
        "--out whose results folder is DATA, with --overwrite": (_out_results_is_data, "error", "this command reads"),
        "--out named with a byte that is not UTF-8": (
            lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT, "--out", _fsjoin(f, b"o\xff.h5")],
            "error", "not valid UTF-8"),
        "DATA named with a byte that is not UTF-8": (
            lambda f, b: ["extract", _rename(tree(f / "data", seed=6), b"d\xffata"), *EXTRACT, "--out", f / "out.h5"],
            "error", "not valid UTF-8"),
        "--out the same cache again (already complete)": (_out_same_cache, "ok", ""),
        "--pretrained missing": (lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT, "--pretrained",
                                               f / "nope.pt", "--out", f / "out.h5"], "error", ""),
        "--pretrained a FIFO": (lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT, "--pretrained",
                                              _fifo(f / "p.pt"), "--out", f / "out.h5"], "error", "FIFO"),
        "--pretrained garbage": (lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT, "--pretrained",
                                               _write(f / "p.pt", "garbage"), "--out", f / "out.h5"], "error",
                                 "cannot read checkpoint"),
        "--pretrained empty": (lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT, "--pretrained",
                                             _write(f / "p.pt", ""), "--out", f / "out.h5"], "error", ""),
        "--image-root on an ImageFolder tree": (lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT,
                                                              "--image-root", f, "--out", f / "out.h5"], "error",
                                                "--image-root"),
        "--shard-index 5 of 2": (lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT, "--num-shards", "2",
                                               "--shard-index", "5", "--out", f / "out.h5"], "error", "shard-index"),
        "DATA a FIFO named .csv": (lambda f, b: ["extract", _fifo(f / "m.csv"), *EXTRACT, "--out", f / "out.h5"],
                                   "error", "FIFO"),
        "DATA missing": (lambda f, b: ["extract", f / "nope", *EXTRACT, "--out", f / "out.h5"], "error",
                         "does not exist"),
        "DATA an unreadable folder": (lambda f, b: ["extract", tree(f / "data", seed=6), *EXTRACT, "--out",
                                                    f / "out.h5"], "error", "permission denied", None, ("data",)),
    }
    for name, spec in paths.items():
        make, verdict, needle = spec[:3]
        deny = spec[4] if len(spec) > 4 else ()
        c = _opt_case(name, make, verdict, needle, check=expect_cache(classes=3), deny=deny)
        if name.startswith("--out the same cache"):
            c.may_change = ()
        cases.append(c)
    # info / verify on hostile cache paths
    for cmd in ("info", "verify"):
        for name, make, needle in [
            ("missing", lambda f, b: f / "nope.h5", "does not exist"),
            ("a folder", lambda f, b: f, ""),
            ("a FIFO", lambda f, b: _fifo(f / "c.h5"), "not a regular file"),
            ("a text file", lambda f, b: _write(f / "c.h5", "hello"), "not an HDF5 file"),
            ("an empty file", lambda f, b: _write(f / "c.h5", ""), "not an HDF5 file"),
            ("truncated to half", lambda f, b: _truncated(b.cache, f / "c.h5", 0.5), ""),
            ("unreadable", lambda f, b: _copy(b.cache, f / "c.h5"), "permission denied"),
            ("named with a byte that is not UTF-8", lambda f, b: _copy(b.cache, Path(_fsjoin(f, b"c\xff.h5"))), None),
        ]:
            verdict = "ok" if needle is None else "error"
            deny = ("c.h5",) if name == "unreadable" else ()
            cases.append(_opt_case(f"{cmd} on a cache path that is {name}",
                                   (lambda mk, cm: lambda f, b: [cm, mk(f, b)])(make, cmd), verdict, needle or "",
                                   may_change=(), deny=deny))
    for value, verdict in (("0", "error"), ("99999999999", "ok"), ("x", "error")):
        cases.append(_opt_case(f"verify --sample {value}", lambda f, b, v=value: ["verify", b.cache, "--sample", v],
                               verdict, may_change=()))
    # the guard on the other commands (their checks are their owners'; the guard must leave no traceback)
    for name, argv in [
        ("eval --shots ,", ["eval", "<cache>", "--shots", ","]),
        ("eval --device gpu0", ["eval", "<cache>", "--method", "zeroshot", "--device", "gpu0"]),
        ("fit-safe --max-memory 1e400GiB", ["fit-safe", "<cache>", "--max-memory", "1e400GiB"]),
        ("refine --top-k x", ["refine", "<cache>", "--top-k", "x"]),
        ("report CACHE.h5", ["report", "<cache>", "--out", "<folder>/rep"]),
        ("eval --set tip.s=[nan,1]", ["eval", "<cache>", "--method", "tip", "--set", "tip.s=[NaN, 1]"]),
        ("eval --out the cache itself", ["eval", "<cache>", "--method", "zeroshot", "--out", "<cache>"]),
        ("sweep --grid a FIFO", ["sweep", "<cache>", "--grid", "<fifo>", "--out", "<folder>/s.jsonl"]),
    ]:
        cases.append(_opt_case(name, (lambda a: lambda f, b: [
            str(b.cache) if x == "<cache>" else str(_fifo(f / "g.yaml")) if x == "<fifo>" else
            x.replace("<folder>", str(f)) for x in a])(argv), "error", may_change=("rep", "s.jsonl")))
    return cases


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("a file")
    return p


def _write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _fifo(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(p)
    return p


def _copy(src: Path, dst) -> Path:
    shutil.copy(src, dst)
    return Path(dst)


def _truncated(src: Path, dst: Path, frac: float) -> Path:
    data = Path(src).read_bytes()
    dst.write_bytes(data[: int(len(data) * frac)])
    return dst


def _rename(p: Path, name: bytes) -> str:
    new = _fsjoin(p.parent, name)
    os.rename(p, new)
    return new


def _out_is_manifest(f: Path, b: Base) -> list:
    img = image_pool(f / "img")
    man = f / "m.csv"
    man.write_text("path,label,split\n" + "".join(f"img/c{c}/i{j}.png,c{c},train\n" for c in range(3) for j in range(5)))
    return ["extract", man, *EXTRACT, "--overwrite", "--out", man]


def _out_results_is_data(f: Path, b: Base) -> list:
    data = tree(f / "cache.results", seed=8)
    return ["extract", data, *EXTRACT, "--overwrite", "--out", f / "cache.h5"]


def _out_same_cache(f: Path, b: Base) -> list:
    t = tree(f / "data", seed=6)
    r = invoke(["extract", t, *EXTRACT, "--out", f / "out.h5"])
    if r.code != 0:
        raise RuntimeError(r.stderr[-300:])
    return ["extract", t, *EXTRACT, "--out", f / "out.h5"]


# --------------------------------------------------------------------------------------------- #
# family 6: cache mutations
# --------------------------------------------------------------------------------------------- #
CACHE_TARGETS = ["/fewshot/K1_seed1", "/splits/train/labels", "/splits/val/labels", "/splits/test/labels",
                 "/splits/val/pooled", "/splits/train/pooled", "/splits/val/paths", "/text/classifier",
                 "/classnames", "/splits/train/source_index", "/model/attnpool/c_proj.weight",
                 "/splits/val/dense", "@views", "@shots", "@dataset", "@val_is_test", "/fewshot/K1_seed1@k",
                 "/splits/train@num_images"]
CACHE_MUTATIONS = ["out-of-range", "negative", "nan", "inf", "flip", "delete", "retype", "reshape", "empty",
                   "garbage-json", "huge-int"]
CACHE_COMMANDS = {
    "info": ["info", "<c>"],
    "verify": ["verify", "<c>", "--quick"],
    "eval": ["eval", "<c>", "--method", "zeroshot,tip", "--shots", "1", "--seeds", "1", "-q"],
    "eval --out rows": ["eval", "<c>", "--method", "zeroshot", "--shots", "1", "--seeds", "1", "--out", "<rows>",
                        "-q"],
    "refine": ["refine", "<c>", "--top-k", "8", "--shots", "1", "--seeds", "1", "-q"],
    "fit-safe": ["fit-safe", "<c>", "--shots", "1", "--seeds", "1", "--epochs", "1", "--batch-size", "4", "-q"],
}
# what each command certainly reads whole (a checksum-breaking edit there must be refused)
_READS = {
    "eval": {"/fewshot/K1_seed1", "/splits/train/labels", "/splits/val/labels", "/splits/test/labels",
             "/splits/val/pooled", "/splits/train/pooled", "/text/classifier", "/classnames"},
    "fit-safe": {"/fewshot/K1_seed1", "/splits/train/labels", "/model/attnpool/c_proj.weight", "/classnames"},
}
# datasets whose values the reader checks when it reads them (rows and labels in range, floats finite)
_CHECKED_VALUES = {"/fewshot/K1_seed1", "/splits/train/labels", "/splits/val/labels", "/splits/test/labels",
                   "/splits/val/pooled", "/splits/train/pooled", "/text/classifier", "/model/attnpool/c_proj.weight"}
# eval --out into the base results file: its rows are already there, so nothing may be read at all


def mutate_cache(path: Path, target: str, mutation: str, reseal: bool) -> bool:
    """Edit one field of the cache at `path`; False when the mutation does not apply to that field."""
    import h5py

    from cachekit import schema as S

    with h5py.File(path, "r+") as f:
        if "@" in target:
            obj_path, name = target.split("@")
            obj = f[obj_path or "/"]
            if name not in obj.attrs:
                return False
            if mutation == "delete":
                del obj.attrs[name]
            elif mutation == "garbage-json":
                obj.attrs[name] = "{not json"
            elif mutation == "huge-int":
                obj.attrs[name] = np.int64(2**62)
            elif mutation == "negative":
                obj.attrs[name] = np.int64(-3)
            elif mutation == "retype":
                obj.attrs[name] = np.float64(1.5)
            else:
                return False
        else:
            if target not in f:
                return False
            ds = f[target]
            data = ds[()]
            kind = ds.dtype.kind
            if mutation == "delete":
                del f[target]
            elif mutation == "retype":
                del f[target]
                f[target] = np.asarray(["x"] * max(1, np.asarray(data).shape[0] if np.ndim(data) else 1),
                                       dtype=h5py.string_dtype())
            elif mutation == "reshape":
                del f[target]
                f[target] = np.zeros((3, 2), dtype=np.float32)
            elif mutation == "empty":
                del f[target]
                f[target] = np.zeros((0,) + tuple(np.shape(data))[1:], dtype=ds.dtype)
            else:
                a = np.array(data)
                if a.size == 0:
                    return False
                flat = a.reshape(-1)
                if mutation == "out-of-range" and kind in "iu":
                    flat[0] = 10**6
                elif mutation == "negative" and kind == "i":
                    flat[-1] = -1
                elif mutation in ("nan", "inf") and kind == "f":
                    flat[0] = np.nan if mutation == "nan" else np.inf
                elif mutation == "flip" and kind in "iuf":
                    flat[0] = flat[0] + 1
                elif mutation == "flip" and kind == "O":
                    flat[0] = b"changed" if isinstance(flat[0], bytes) else "changed"
                else:
                    return False
                ds[...] = a
            if reseal and target in f and mutation not in ("delete",):
                ds2 = f[target]
                S.set_attrs(ds2, {S.CHECKSUM: S.dataset_checksum(ds2)})
        if reseal:
            S.seal(f)
    return True


def cache_case(desc: tuple) -> Case:
    target, mutation, reseal, command = desc
    reads = _READS.get(command, set())
    attr = "@" in target
    structural = mutation in (("delete", "garbage-json", "retype") if attr else ("delete", "retype", "reshape", "empty"))
    invalid = mutation in ("out-of-range", "negative", "nan", "inf") and not attr and target in _CHECKED_VALUES
    if structural:
        expect = "error"  # every command checks the layout when it opens the cache
    elif command == "verify":
        expect = "either" if reseal and mutation == "flip" else "error"
    elif target in reads and (not reseal or invalid):
        expect = "error"  # its checksum no longer matches, or the value cannot be right
    else:
        expect = "either"  # a resealed in-range edit, or data the command does not read

    def build(folder: Path, base: Base) -> list:
        c = folder / "c.h5"
        shutil.copy(base.cache, c)
        try:
            applies = mutate_cache(c, target, mutation, reseal)
        except Exception as exc:  # noqa: BLE001 - h5py cannot write that edit: not a case
            raise _NotApplicable() from exc
        if not applies:
            raise _NotApplicable()
        rows = folder / "rows.jsonl"
        shutil.copy(base.results, rows)
        return [str(c) if a == "<c>" else str(rows) if a == "<rows>" else a for a in CACHE_COMMANDS[command]]

    return Case("cache mutation", f"{command}: {target} {mutation}{' (resealed)' if reseal else ''}", build, expect,
                may_change=("c.results",), append_only=("rows.jsonl",))


class _NotApplicable(Exception):
    pass


def cache_strategy():
    from hypothesis import strategies as st

    return st.tuples(st.sampled_from(CACHE_TARGETS), st.sampled_from(CACHE_MUTATIONS), st.booleans(),
                     st.sampled_from(sorted(CACHE_COMMANDS)))


def file_level_cases() -> list[Case]:
    out = []
    for name, mutate in [
        ("truncated to 99%", lambda p: p.write_bytes(p.read_bytes()[: int(p.stat().st_size * 0.99)])),
        ("garbage appended", lambda p: p.write_bytes(p.read_bytes() + os.urandom(4096))),
        ("first 8 bytes zeroed", lambda p: p.write_bytes(b"\0" * 8 + p.read_bytes()[8:])),
        ("a byte in the middle flipped", lambda p: _flip_middle(p)),
    ]:
        for cmd in ("info", "eval", "verify"):
            def build(folder, base, mutate=mutate, cmd=cmd):
                c = folder / "c.h5"
                shutil.copy(base.cache, c)
                mutate(c)
                return [a if a != "<c>" else str(c) for a in CACHE_COMMANDS[cmd]]

            out.append(Case("cache mutation", f"{cmd}: file {name}", build, "either", may_change=("c.results",)))
    return out


def _flip_middle(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------- #
# family 7: grid files (sweep) and family 8: results files (report)
# --------------------------------------------------------------------------------------------- #
def grid_strategy():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from(["tip", "ape", "zeroshot", "gda", "x", "", "1e3"]))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.sampled_from(
                                                               ["n", "s", "top_k", "alpha", "beta", "k"]), inner,
                                                               max_size=2)), max_leaves=6)
    methods = st.dictionaries(st.sampled_from(["zeroshot", "tip", "ape", "nope"]),
                              st.dictionaries(st.sampled_from(["s", "n", "top_k", "zz"]), values, max_size=2),
                              max_size=2)
    grid = st.fixed_dictionaries({"methods": st.one_of(methods, values)},
                                 optional={"shots": st.one_of(st.just([1]), values),
                                           "seeds": st.one_of(st.just([1]), values),
                                           "preset": st.sampled_from(["default", "imagenet", "nope", 3])})
    return st.tuples(st.one_of(grid, values), st.sampled_from(["json", "yaml"]))


def grid_case(desc) -> Case:
    obj, fmt = desc

    def build(folder: Path, base: Base) -> list:
        g = folder / f"grid.{fmt}"
        if fmt == "json":
            g.write_text(json.dumps(obj))
        else:
            import yaml

            g.write_text(yaml.safe_dump(obj))
        c = folder / "c.h5"
        shutil.copy(base.cache, c)
        return ["sweep", c, "--grid", g, "--out", folder / "s.jsonl", "--json", "-q"]

    return Case("grid file", f"{fmt}: {json.dumps(obj, sort_keys=True, default=str)[:160]}", build, "either",
                may_change=("s.jsonl", "c.results"))


FIXED_GRIDS = {
    "not UTF-8": (b"methods:\n  tip: {s: [[7, 7]]}\n\xff\n", "yaml", "error"),
    "YAML aliases ten levels deep (billion laughs)": (
        ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
            f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))
         + "methods: *j\n").encode(), "yaml", "error"),
    "JSON nested 10**5 deep": (("[" * 100_000 + "]" * 100_000).encode(), "json", "error"),
    "empty file": (b"", "yaml", "error"),
    "a JSON string": (b'"tip"', "json", "error"),
    "tip.s candidates as text": (json.dumps({"methods": {"tip": {"s": ["x"]}}}).encode(), "json", "error"),
    "shots [-1]": (json.dumps({"methods": {"zeroshot": {}}, "shots": [-1]}).encode(), "json", "error"),
    "shots [10**30]": (json.dumps({"methods": {"zeroshot": {}}, "shots": [10**30]}).encode(), "json", "error"),
    "seeds as a string": (json.dumps({"methods": {"zeroshot": {}}, "seeds": "1,2"}).encode(), "json", "error"),
    "NaN candidates": (b'{"methods": {"tip": {"s": [[NaN, 1]]}}}', "json", "error"),
    "a valid small grid": (json.dumps({"methods": {"zeroshot": {}, "tip": {"s": [[7, 7]]}}, "shots": [1],
                                       "seeds": [1]}).encode(), "json", "ok"),
}


def fixed_grid_case(name: str) -> Case:
    data, fmt, verdict = FIXED_GRIDS[name]

    def build(folder: Path, base: Base) -> list:
        g = folder / f"grid.{fmt}"
        g.write_bytes(data)
        c = folder / "c.h5"
        shutil.copy(base.cache, c)
        return ["sweep", c, "--grid", g, "--out", folder / "s.jsonl", "--json", "-q"]

    return Case("grid file", name, build, verdict, may_change=("s.jsonl", "c.results"))


RESULTS_FILES = {
    "not UTF-8": b"\xff\xfe\x00garbage\n",
    "a torn last line": None,  # the base rows with half a line appended
    "JSON nested 10**5 deep": ("[" * 100_000 + "]" * 100_000 + "\n").encode(),
    "rows of the wrong type": b'[1, 2]\n"x"\n3\n',
    "objects without keys": b"{}\n{}\n",
    "NaN and huge numbers": b'{"method": "tip", "metrics": {"test_acc": NaN}, "key": 1e999}\n',
    "an HDF5 file": "<cache>",
    "empty": b"",
    "a 5000-digit number": ('{"method": "tip", "k": ' + "9" * 5000 + "}\n").encode(),
}


def results_case(name: str) -> Case:
    content = RESULTS_FILES[name]

    def build(folder: Path, base: Base) -> list:
        r = folder / "rows.jsonl"
        if content is None:
            data = base.results.read_bytes()
            r.write_bytes(data + data[: len(data) // 3])
        elif content == "<cache>":
            shutil.copy(base.cache, r)
        else:
            r.write_bytes(content)
        return ["report", r, "--out", folder / "rep", "--no-plots", "-q"]

    return Case("results file", f"report on {name}", build, "either", may_change=("rep",))


# --------------------------------------------------------------------------------------------- #
# fixed cases: the bugs of issue 13 (each also a test in tests/test_hostile.py) and real processes
# --------------------------------------------------------------------------------------------- #
def fixed_cases() -> list[Case]:
    cases = [
        tree_case(("flat", ("symlink-to-parent",))),
        tree_case(("flat", ("unreadable-subfolder",))),
        tree_case(("flat", ("unreadable-class-folder",))),
        tree_case(("flat", ("fifo-as-image",))),
        tree_case(("flat", ("file-name-not-utf8",))),
        tree_case(("flat", ("folder-name-not-utf8",))),
        tree_case(("split", ("test-is-a-link-to-val",))),
        list_case(("csv", True, ((3, 2, 0), (3, 2, 0), (3, 2, 0)), ("val-listed-again-as-test",))),
        list_case(("csv", True, ((3, 2, 2), (3, 2, 2), (3, 2, 2)), ("val-and-test-partly-overlap",))),
        list_case(("csv", False, ((3, 1, 1), (3, 1, 1), (3, 1, 1)), ("label-10**12",))),
        list_case(("coop", False, ((3, 1, 1), (3, 1, 1), (3, 1, 1)), ("label-10**12",))),
        list_case(("csv", False, ((3, 1, 1), (3, 1, 1), (3, 1, 1)), ("label-gap",))),
        text_case("templates: not UTF-8"),
        cache_case(("/fewshot/K1_seed1", "out-of-range", True, "eval")),
        cache_case(("/fewshot/K1_seed1", "out-of-range", True, "fit-safe")),
    ]
    # real processes
    cases.append(Case("process", "python -m cachekit extract DATA.csv where DATA.csv is a FIFO", lambda f, b: [
        "extract", _fifo(f / "m.csv"), *EXTRACT, "--out", f / "out.h5"], "error", ("FIFO",), child=True))
    cases.append(Case("process", "python -m cachekit info CACHE where CACHE is a FIFO",
                      lambda f, b: ["info", _fifo(f / "c.h5")], "error", ("not a regular file",), child=True))
    cases.append(Case("process", "python -m cachekit extract with a file name that is not UTF-8", lambda f, b: [
        "extract", _nonutf8_tree(f), *EXTRACT, "--out", f / "out.h5"], "error", ("not valid UTF-8",), child=True))
    cases.append(Case("process", "python -m cachekit extract --shots ,", lambda f, b: [
        "extract", tree(f / "data"), *EXTRACT, "--shots", ",", "--out", f / "out.h5"], "error", ("names no number",),
        child=True))
    boom = ("import cachekit.data as D\n"
            "def boom(*a, **k):\n    raise RuntimeError('planted failure')\n"
            "D.load_dataset = boom\nimport cachekit.extraction as E\nE.load_dataset = boom\n")
    cases.append(Case("process", "an unexpected exception (planted): one internal-error line", lambda f, b: [
        "extract", tree(f / "data"), *EXTRACT, "--out", f / "out.h5"], "error", ("internal error", "--debug"),
        child=True, prelude=boom, planted=True))
    cases.append(Case("process", "the same with --debug: the traceback, then the line", lambda f, b: [
        "--debug", "extract", tree(f / "data"), *EXTRACT, "--out", f / "out.h5"], child=True, prelude=boom,
        debug=True))
    cases.append(Case("process", "the same with CACHEKIT_DEBUG=1", lambda f, b: [
        "extract", tree(f / "data"), *EXTRACT, "--out", f / "out.h5"], child=True, prelude=boom, debug=True,
        env={"CACHEKIT_DEBUG": "1"}))
    cases.append(Case("process", "python -m cachekit extract of a good tree", lambda f, b: [
        "extract", tree(f / "data"), *EXTRACT, "--out", f / "out.h5"], "ok", child=True,
        check=expect_cache(classes=3), may_change=("out.h5",)))
    return cases


def _nonutf8_tree(f: Path) -> Path:
    root = tree(f / "data")
    os.rename(root / "c0" / "img0.png", _fsjoin(root / "c0", b"\xe9t\xe9.png"))
    return root


# --------------------------------------------------------------------------------------------- #
# generation
# --------------------------------------------------------------------------------------------- #
def draw(strategy, n: int, seed: int) -> list:
    """n examples of a hypothesis strategy, reproducible from `seed` (generation only: no shrinking, no
    example database, no health checks: the values are inputs to try, not a test)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    out: list = []

    @hseed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(x):
        out.append(x)

    collect()
    return out


def _dedupe(cases: list[Case]) -> list[Case]:
    seen, out = set(), []
    for c in cases:
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def plan(seed: int = 0, scale: float = 1.0) -> list[Case]:
    """Every case of a run: the fixed ones, then the generated ones (`scale` multiplies the draws)."""
    n = lambda k: max(1, int(k * scale))  # noqa: E731
    cases = fixed_cases()
    cases += [tree_case(d) for d in draw(tree_strategy(), n(45), seed)]
    for fmt, k in (("csv", 30), ("jsonl", 25), ("coop", 25)):
        cases += [list_case(d) for d in draw(list_strategy(fmt), n(k), seed + 1)]
    cases += [text_case(k) for k in TEXT_FILES]
    cases += option_cases()
    cases += [cache_case(d) for d in draw(cache_strategy(), n(40), seed + 2)]
    cases += file_level_cases()
    cases += [grid_case(d) for d in draw(grid_strategy(), n(12), seed + 3)]
    cases += [fixed_grid_case(k) for k in FIXED_GRIDS]
    cases += [results_case(k) for k in RESULTS_FILES]
    return _dedupe(cases)


def run_plan(cases: list[Case], work: Path, base: Base | None = None, log=None) -> list[Outcome]:
    work = Path(work)
    base = base or Base.build(work)
    out = []
    for i, case in enumerate(cases):
        folder = work / "cases" / f"{i:03d}"
        try:
            o = run_case(case, folder, base)
        except RuntimeError as exc:
            if isinstance(exc.__cause__, _NotApplicable):
                continue
            raise
        out.append(o)
        if log:
            log(f"[{i + 1}/{len(cases)}] {o.kind:9s} {o.seconds:5.1f}s {case.key}: {o.line[:150]}"
                + (f"  <- {o.detail}" if o.detail else ""))
        shutil.rmtree(folder, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------------------------- #
KINDS = ("clean", "traceback", "hang", "data lost", "wrong")


def counts(outcomes: list[Outcome]) -> dict:
    c = {k: 0 for k in KINDS}
    for o in outcomes:
        c[o.kind] += 1
    return {"tried": len(outcomes), **c}


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "\\n").replace("\r", "\\r")


def render(outcomes: list[Outcome], seconds: float, seed: int, scale: float, deny_mode: str) -> str:
    import cachekit

    c = counts(outcomes)
    fams: dict[str, list[Outcome]] = {}
    for o in outcomes:
        fams.setdefault(o.case.family, []).append(o)
    try:
        import torch

        tv = torch.__version__
    except Exception:  # noqa: BLE001
        tv = "?"
    lines = [
        "# Hostile inputs",
        "",
        f"Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} by `tests/harness/hostile.py` "
        f"(cachekit {cachekit.__version__}) in {seconds / 60:.1f} min on {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs; Python {platform.python_version()}, torch {tv}; seed {seed}, scale {scale}.",
        "",
        "Reproduce from the repo root: `python -m tests.harness.hostile --out docs/hostile-inputs.md` "
        "(`--seed`, `--scale` change the draws). Fast sample: `pytest tests/test_hostile.py`; the full run: "
        "`pytest -m slow tests/test_hostile.py`. What is generated and how each case is judged: the docstring of "
        "`tests/harness/hostile.py`.",
        "",
        f"Unreadable files and folders: {deny_mode}.",
        "",
        "## Counts",
        "",
        "| cases tried | clean | tracebacks | hangs | data lost | wrong |",
        "|---|---|---|---|---|---|",
        f"| {c['tried']} | {c['clean']} | {c['traceback']} | {c['hang']} | {c['data lost']} | {c['wrong']} |",
        "",
        "*clean*: exit 0 with a right answer, or one `Error: ...` line (exit 1, or 2 for usage errors) naming the "
        "problem; *tracebacks* include the top-level guard's `internal error` lines (a bug it caught); *wrong*: an "
        "accepted bad input, a refused good one, a wrong answer, or an error that does not name the problem.",
        "",
        "| family | tried | clean | tracebacks | hangs | data lost | wrong | expected error / ok / either |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fam, os_ in fams.items():
        fc = counts(os_)
        ex = {k: sum(o.case.expect == k for o in os_) for k in ("error", "ok", "either")}
        lines.append(f"| {fam} | {fc['tried']} | {fc['clean']} | {fc['traceback']} | {fc['hang']} | "
                     f"{fc['data lost']} | {fc['wrong']} | {ex['error']} / {ex['ok']} / {ex['either']} |")
    bad = [o for o in outcomes if o.kind != "clean"]
    lines += ["", "## Failures", ""]
    if bad:
        lines += ["| kind | case | exit | line | detail |", "|---|---|---|---|---|"]
        lines += [f"| {o.kind} | {_md(o.case.key)} | {o.code} | {_md(o.line[:200])} | {_md(o.detail[:200])} |"
                  for o in bad]
    else:
        lines.append("None.")
    lines += ["", "## Every case", "", "<details><summary>case, outcome, exit code and the line printed</summary>", "",
              "| family | case | expected | outcome | exit | line |", "|---|---|---|---|---|---|"]
    lines += [f"| {_md(o.case.family)} | {_md(o.case.name[:160])} | {o.case.expect} | {o.kind} | {o.code} | "
              f"{_md(o.line[:220])} |" for o in outcomes]
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the markdown report here (e.g. docs/hostile-inputs.md)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the generated draws")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cachekit-hostile-") as tmp:
        work = a.work or Path(tmp)
        cases = plan(a.seed, a.scale)
        log = None if a.quiet else (lambda s: print(s, flush=True))
        outcomes = run_plan(cases, work, log=log)
    deny_mode = ("chmod 000 (not root)" if os.geteuid() != 0 else
                 "simulated: running as root, where chmod 000 does not stop reads, the harness wraps os.scandir, "
                 "os.stat, os.access and open to raise PermissionError for them")
    text = render(outcomes, time.monotonic() - t0, a.seed, a.scale, deny_mode)
    if a.out:
        a.out.write_text(text)
    c = counts(outcomes)
    print(" ".join(f"{k}={v}" for k, v in c.items()))
    return 0 if c["clean"] == c["tried"] else 1


if __name__ == "__main__":
    sys.exit(main())
