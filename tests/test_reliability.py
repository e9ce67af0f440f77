"""Faults and bad inputs: kills part-way (SIGKILL, SIGINT) then a rerun, two writers, readers during
a write, a full disk, a read-only location, and a table of bad inputs.

The machinery is tests/harness/reliability.py (imported as `harness.reliability`: pytest puts tests/ on
sys.path), shared with `python -m tests.harness.reliability --out docs/reliability.md` (`make reliability`). Every victim is a real `python -m cachekit ...` child process; kill points are
reached through progress events logged by hooks installed in the child (see that module), so they do
not depend on the machine's speed. Tests marked `xfail(strict=True, reason="BUG: ...")` are known
bugs: they start passing (and so fail, strictly) once fixed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness import reliability as R


@pytest.fixture(scope="module")
def base(tree, tiny_cache, tmp_path_factory):
    # tiny_cache was built from `tree` with exactly R.EXTRACT_ARGS: it is the uninterrupted extract.
    return R.Base(tree, tiny_cache, tmp_path_factory.mktemp("reliability"))


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory):
    with R.tmpfs(tmp_path_factory.mktemp("mount-probe") / "m", "64k") as ok:
        return ok


def test_patch_points_and_uses_resolve():
    """Every library name the harness patches or calls still exists (after a library redesign this names
    the entry of R.PATCH_POINTS / R.USES to update)."""
    for key, (module, attr, _) in R.PATCH_POINTS.items():
        owner, name, real = R.resolve(module, attr)
        assert callable(real), key
    for dotted in R.USES:
        R.resolve_use(dotted)


def test_child_hooks_installed(tmp_path):
    """The generated sitecustomize finds the harness from a child process started anywhere: the hooks log
    the publish of a stored result."""
    import subprocess
    import sys

    env = R.hook_env(tmp_path / "events")
    code = ("from pathlib import Path\nfrom cachekit import store\n"
            "p = Path(r'%s'); t = p.with_name('x.json.tmp'); t.write_text('{}'); store.publish(t, p)\n"
            % (tmp_path / "x.json"))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "not installed" not in r.stderr, r.stderr
    assert ("published", "x.json") in R.read_events(tmp_path / "events")



def test_child_unit_delay_through_on_unit(tmp_path):
    """CACHEKIT_FAULT_UNIT_DELAY reaches extract through the documented ExtractOptions.on_unit callback (the
    hooks chain a sleep after the caller's own callback); the library reads no such variable itself."""
    import subprocess
    import sys

    env = R.hook_env(tmp_path / "events", CACHEKIT_FAULT_UNIT_DELAY=0.3)
    code = ("import time\nfrom cachekit.extraction import ExtractOptions\nseen = []\n"
            "o = ExtractOptions(data='d', out='o.h5', on_unit=seen.append)\n"
            "t = time.monotonic(); o.on_unit({'published': 1}); dt = time.monotonic() - t\n"
            "assert seen == [{'published': 1}] and dt >= 0.3, (seen, dt)\n"
            "assert ExtractOptions(data='d', out='o.h5').on_unit is not None\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "not installed" not in r.stderr, r.stderr
    src = (Path(R.resolve("cachekit.extraction")[2].__file__)).read_text()
    assert "CACHEKIT_UNIT_DELAY" not in src


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


def test_kill_between_rename_and_cleanup_leaves_no_parts(base, tmp_path, monkeypatch):
    """A kill right after the final rename (simulated in-process: the state on disk is the same) left
    OUT.parts, as large as the cache, forever (fixed in 549ae08): the rerun must remove it."""
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


def test_manual_shards_via_cli(base, tmp_path):
    (what, ok, detail), = R.check_shards(base, tmp_path, concurrent=False)
    assert ok, (what, detail)


def test_concurrent_result_stores_all_succeed(base, tmp_path):
    (what, ok, detail), = R.check_concurrent_results(base, tmp_path, puts=40)
    assert ok, (what, detail)


def test_interrupted_overwrite_resumes(base, tmp_path):
    (what, ok, detail), = R.check_overwrite_resume(base, tmp_path)
    assert ok, (what, detail)


def test_sweep_of_another_cache_into_same_out(base, tmp_path):
    (what, ok, detail), = R.check_sweep_shared_out(base, tmp_path)
    assert ok, (what, detail)


# --------------------------------------------------------------------------------------------- #
# disk full
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("command", ["refine", "sweep"])
def test_disk_full_one_line_error_cache_intact_then_rerun(base, tmp_path, command):
    """8 KiB left on the filesystem of an existing cache: a one-line 'no space left ... fix:' error, the
    cache still verifies and is unchanged, no partial result is listed; after making room the same
    command gives the uninterrupted result (for sweep: a torn last row is cut and re-run)."""
    # sweep writes plain JSON lines: safe in-process; refine's HDF5 write runs in a child (see R.disk_full_writer)
    what, ok, detail = R.disk_full_writer(base, tmp_path, command, 8 << 10, child=command != "sweep")
    assert ok, (what, detail)


@pytest.fixture(scope="module")
def disk_full(base, can_mount, tmp_path_factory):
    """The children that run out of space, run at the same time (each on its own tmpfs)."""
    from concurrent.futures import ThreadPoolExecutor

    if not can_mount:
        return None
    work = tmp_path_factory.mktemp("disk-full")
    jobs = {size: (R.disk_full_extract, (base, work / size, size)) for size in ("1m", "100k", "2m")}
    jobs["fit-safe"] = (R.disk_full_writer, (base, work / "fit-safe", "fit-safe", 8 << 10, True, False))
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {k: pool.submit(fn, *args) for k, (fn, args) in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("size", [
    "1m",  # out of space while assembling
    "100k",  # out of space while writing the batches
    "2m",  # free space between a naive estimate and the real size
])
def test_disk_full_extract(disk_full, size):
    """Once HDF5 fails to write a file the process can segfault later (h5py objects of that file freed),
    so the commands must refuse before writing: a one-line error, exit 1; then the rerun resumes."""
    if disk_full is None:
        pytest.skip("needs a tmpfs mount (root) to run out of space for real")
    what, ok, detail = disk_full[size]
    assert ok, (what, detail)


def test_disk_full_fit_safe(disk_full):
    """The SAFE fit (3.5 MiB) on a disk with 8 KiB free: HDF5 failed to flush on close, then the process
    segfaulted (fixed in e9e8f44: free space is checked first)."""
    if disk_full is None:
        pytest.skip("needs a tmpfs mount (root): injected errors are OSErrors")
    what, ok, detail = disk_full["fit-safe"]
    assert ok, (what, detail)


def test_disk_full_zero_bytes(base, tmp_path, can_mount):
    """0 bytes free: even the lock's PID cannot be written (was an OSError traceback and a leaked flock)."""
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
