"""Faults and bad inputs: kills part-way (SIGKILL, SIGINT) then a rerun, two writers, readers during
a write, a full disk, a read-only location, and a table of bad inputs.

The machinery is cachekit/reliability.py, shared with `python -m cachekit.reliability` (which writes
docs/reliability.md). Every victim is a real `python -m cachekit ...` child process; kill points are
reached through progress events logged by hooks installed in the child (see that module), so they do
not depend on the machine's speed. Tests marked `xfail(strict=True, reason="BUG: ...")` are known
bugs: they start passing (and so fail, strictly) once fixed.
"""
from __future__ import annotations

import shutil

import pytest

from cachekit import reliability as R


@pytest.fixture(scope="module")
def base(tree, tiny_cache, tmp_path_factory):
    # tiny_cache was built from `tree` with exactly R.EXTRACT_ARGS: it is the uninterrupted extract.
    return R.Base(tree, tiny_cache, tmp_path_factory.mktemp("reliability"))


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory):
    with R.tmpfs(tmp_path_factory.mktemp("mount-probe") / "m", "64k") as ok:
        return ok


# --------------------------------------------------------------------------------------------- #
# kills: every writing command x SIGKILL/SIGINT, then the same command again
# --------------------------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def kills(base, tmp_path_factory):
    plan = [p for p in R.scenario_plan(seed=0) if p[2] != "publish-gap"]
    trials = R.run_trials(base, plan, tmp_path_factory.mktemp("kills"), parallel=4)
    return {(t.command, t.signal): t for t in trials}


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("command", ["extract", "refine", "fit-safe", "sweep"])
def test_kill_then_rerun_equals_uninterrupted(kills, command, sig):
    """Killed part-way, the rerun gives the same arrays / rows as an uninterrupted run, verify passes,
    no reader saw a partial result, nothing is left behind; SIGINT exits 130 with the resume hint."""
    t = kills[(command, sig)]
    assert t.killed, t.describe()
    assert t.survived, t.describe()
    if sig == "SIGINT":
        assert t.rc == 130 and "Traceback" not in t.stderr
        assert "Interrupted:" in t.stderr and "rerun the same command to resume" in t.stderr


def _extra(kills, prefix):
    rows = [r for t in kills.values() for r in t.extra if r[0].startswith(prefix)]
    assert rows, f"no check {prefix!r} ran"
    return rows


def test_second_writer_refused_with_pid(kills):
    """A second extract (and a second sweep) on the same output while the first runs: exit 1, one line
    naming the PID that holds it."""
    for what, ok, detail in _extra(kills, "second"):
        assert ok, (what, detail)
    assert {r[0] for r in _extra(kills, "second")} == {"second `extract` on the same output while the first runs",
                                                       "second `sweep` on the same output while the first runs"}


def test_readers_work_while_writers_append(kills):
    """info / eval / verify on the complete cache while refine (paused with its result .tmp written) and
    sweep (between two rows) hold their locks; ResultStore.list/get never show a partial result."""
    for what, ok, detail in _extra(kills, "readers") + _extra(kills, "ResultStore"):
        assert ok, (what, detail)
    refine = next(r for r in _extra(kills, "ResultStore") if "refine" in r[0])
    assert "0 result(s) listed" in refine[2] and "1 .tmp" in refine[2], refine


def test_info_on_running_extract_says_no_cache(kills):
    for what, ok, detail in _extra(kills, "`info` on the --out"):
        assert ok, (what, detail)


@pytest.mark.xfail(strict=True, reason="BUG: a kill between extract's final rename and the removal of OUT.parts "
                   "leaves OUT.parts (as large as the cache) forever: the rerun answers 'already complete' "
                   "and never removes it")
def test_kill_between_rename_and_cleanup_leaves_no_parts(base, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    real = shutil.rmtree

    def killed_here(path, *a, **kw):
        if str(path).endswith(".parts"):
            raise KeyboardInterrupt  # the process is stopped right after the rename
        return real(path, *a, **kw)

    monkeypatch.setattr(shutil, "rmtree", killed_here)
    r = R.run_cli(["extract", base.tree, *R.EXTRACT_ARGS, "--out", out])
    monkeypatch.undo()
    assert r.code == 130 and out.exists() and (tmp_path / "c.h5.parts").exists()
    r = R.run_cli(["extract", base.tree, *R.EXTRACT_ARGS, "--out", out])
    assert r.code == 0, r.first_line
    assert not R.h5_diff(base.cache, out)
    assert not (tmp_path / "c.h5.parts").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["extract", "sweep"])
def test_many_random_kill_points(base, tmp_path, command):
    """Seeded random kill points (phase, then a point in it) for extract and sweep: all must survive."""
    plan = R.random_plan([command], list(R.SIGNALS), kills=6, seed=1234)
    trials = R.run_trials(base, plan, tmp_path, parallel=4)
    survived = sum(t.survived for t in trials)
    print(f"{command}: {survived}/{len(trials)} random kill points survived")
    for t in trials:
        print("  " + t.describe())
    assert survived == len(trials), [t.describe() for t in trials if not t.survived]


# --------------------------------------------------------------------------------------------- #
# disk full
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("command", ["refine", "sweep"])
def test_disk_full_one_line_error_cache_intact_then_rerun(base, tmp_path, command):
    """8 KiB left on the filesystem of an existing cache: a one-line 'no space left ... fix:' error, the
    cache still verifies and is unchanged, no partial result is listed; after making room the same
    command gives the uninterrupted result (for sweep: a torn last row is cut and re-run)."""
    what, ok, detail = R.disk_full_writer(base, tmp_path, command, 8 << 10)
    assert ok, (what, detail)


@pytest.mark.xfail(strict=True, reason="BUG: extract on a full disk prints its one-line error, then segfaults "
                   "(exit -11/139): h5py dataset handles kept in _assemble's frame outlive the failed close")
def test_disk_full_extract(base, tmp_path, can_mount):
    if not can_mount:
        pytest.skip("needs a tmpfs mount (root) to run out of space for real")
    what, ok, detail = R.disk_full_extract(base, tmp_path)
    assert ok, (what, detail)


@pytest.mark.xfail(strict=True, reason="BUG: when HDF5 fails to flush on close h5py raises RuntimeError "
                   "('... errno = 28 ...'), which os_errors does not convert: traceback")
def test_disk_full_fit_safe(base, tmp_path, can_mount):
    if not can_mount:
        pytest.skip("needs a tmpfs mount (root): injected errors are OSErrors")
    what, ok, detail = R.disk_full_writer(base, tmp_path, "fit-safe", 8 << 10, rerun=False)
    assert ok, (what, detail)


@pytest.mark.xfail(strict=True, reason="BUG: WriterLock.__enter__ writes the PID outside os_errors: with 0 bytes "
                   "free, an OSError traceback, and the flock stays held (fd leaked) in the calling process")
def test_disk_full_zero_bytes(base, tmp_path, can_mount):
    if not can_mount:
        pytest.skip("needs a tmpfs mount (root)")
    what, ok, detail = R.disk_full_writer(base, tmp_path, "refine", 0, child=False, rerun=False)
    assert ok, (what, detail)


# --------------------------------------------------------------------------------------------- #
# read-only location
# --------------------------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def read_only_rows(base, tmp_path_factory):
    return {what: (ok, detail) for what, ok, detail in R.check_read_only(base, tmp_path_factory.mktemp("ro"))}


def test_read_only_location_clear_error(read_only_rows):
    checked = 0
    for what, (ok, detail) in read_only_rows.items():
        if what.startswith("eval --out"):
            continue
        assert ok, (what, detail)
        checked += 1
    assert checked >= 5


@pytest.mark.xfail(strict=True, reason="BUG: eval --out writes without os_errors: OSError traceback on a read-only "
                   "(or full) location")
def test_eval_out_read_only(read_only_rows):
    (ok, detail), = [v for k, v in read_only_rows.items() if k.startswith("eval --out")]
    assert ok, detail


# --------------------------------------------------------------------------------------------- #
# bad inputs
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=f"BUG: {c.bug}")] if c.bug else [])
    for c in R.BAD_CASES])
def test_bad_input(case, base, tmp_path):
    """A one-line `Error: ...` naming the problem (and file or value), non-zero exit, no traceback, no
    cache left; or, for inputs that must work, success."""
    b = R.run_bad_case(case, base, tmp_path)
    assert b.ok, (b.problems, b.result.first_line if b.result else None)
