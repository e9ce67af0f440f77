"""The CLI: help everywhere, JSON on stdout, one-line errors, verify catching damage, refine/eval/sweep/report."""
from __future__ import annotations

import json
import re
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cachekit.cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(res, *needles):
    assert res.exit_code != 0
    assert "Traceback" not in res.output + res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("Error:"), res.stderr
    for n in needles:
        assert n in err[0], err[0]


@pytest.mark.parametrize("cmd", [[], ["extract"], ["info"], ["verify"], ["refine"], ["eval"], ["sweep"],
                                 ["report"], ["fit-safe"], ["demo"]])
def test_help(cmd):
    res = run(*cmd, "--help")
    assert res.exit_code == 0 and "Usage:" in res.output


def test_info_json(tiny_cache):
    res = run("info", tiny_cache, "--json")
    assert res.exit_code == 0
    d = json.loads(res.stdout)
    assert d["classes"] == 3 and d["views"] == 2 and d["random_weights"] is True
    assert d["splits"]["train"]["dense"]["shape"][0] == 3
    assert "random weights" in d["weights"]


@pytest.fixture
def cache_copy(tiny_cache, tmp_path):
    p = tmp_path / "copy.h5"
    shutil.copy(tiny_cache, p)
    return p


def test_verify_ok_and_flipped_byte(cache_copy):
    assert run("verify", cache_copy).exit_code == 0
    with h5py.File(cache_copy, "r") as f:
        off = f["splits/val/dense"].id.get_chunk_info(0).byte_offset
    with open(cache_copy, "r+b") as fh:
        fh.seek(off + 100)
        b = fh.read(1)
        fh.seek(off + 100)
        fh.write(bytes([b[0] ^ 0xFF]))
    res = run("verify", cache_copy, "--json")
    assert res.exit_code == 1
    d = json.loads(res.stdout)
    bad = {c["check"]: c["detail"] for c in d["checks"] if not c["ok"]}
    assert "splits/val/dense" in bad["checksums"]


def test_verify_catches_nan_and_attnpool_mismatch(cache_copy):
    with h5py.File(cache_copy, "r+") as f:
        f["splits/test/pooled"][0, 0] = np.nan
        f["model/attnpool/c_proj.bias"][0] += 1.0
    d = json.loads(run("verify", cache_copy, "--json").stdout)
    failed = {c["check"] for c in d["checks"] if not c["ok"]}
    assert {"finite", "attnpool", "checksums"} <= failed


def test_verify_missing_group(cache_copy):
    with h5py.File(cache_copy, "r+") as f:
        del f["text/classifier"]
    d = json.loads(run("verify", cache_copy, "--json").stdout)
    assert d["checks"][0]["check"] == "structure" and "text/classifier" in d["checks"][0]["detail"]


def test_bad_cache_files(tmp_path, tiny_cache):
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(tiny_cache.read_bytes()[:4096])
    one_line_error(run("info", trunc), str(trunc))
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    one_line_error(run("verify", text), "not an HDF5 file")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    one_line_error(run("eval", foreign), "not a cachekit cache")
    one_line_error(run("info", tmp_path / "missing.h5"), "does not exist")


def test_refine_stores_and_validates(cache_copy):
    res = run("refine", cache_copy, "--top-k", 16, "--shots", 2, "--seeds", 1, "--json")
    assert res.exit_code == 0, res.output
    [d] = json.loads(res.stdout)
    assert len(d["channels"]) == 16 and len(d["scores"]) == 64
    assert (cache_copy.parent / "copy.results").is_dir()
    from cachekit.cache import open_cache
    from cachekit.results import ResultStore

    with open_cache(cache_copy) as c:
        got = ResultStore(c).get("refine", {k: d[k] for k in ("k", "seed", "top_k", "weights", "variant")})
    assert got["arrays"]["channels"].tolist() == d["channels"]
    one_line_error(run("refine", cache_copy, "--top-k", 0), "--top-k 0")
    # Q wider than the cache: every channel kept, and a note says so (docs/eval.md)
    res = run("refine", cache_copy, "--top-k", 65, "--shots", 1, "--seeds", 2, "--json")
    assert res.exit_code == 0 and len(json.loads(res.stdout)[0]["channels"]) == 64
    assert "exceeds the cache's 64 channels" in res.stderr
    one_line_error(run("refine", cache_copy, "--top-k", 8, "--shots", 7), "K=7")
    one_line_error(run("refine", cache_copy, "--top-k", 8, "--seeds", 9), "seed=9")


def test_eval_table_and_json(cache_copy):
    res = run("eval", cache_copy, "--method", "zeroshot,tip,ape", "--set", "ape.top_k=16",
              "--set", "tip.n=[20,5]", "--set", "ape.n=[20,5,5]", "--json")
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in res.stdout.splitlines()]
    assert len(recs) == 3 * 2 * 2
    assert {r["selection"] for r in recs} == {"val"}
    assert all(r["random_weights"] for r in recs)
    assert {r["method"] for r in recs} == {"zeroshot", "tip", "ape"}
    assert all(r["config"]["top_k"] == 16 for r in recs if r["method"] == "ape")
    res = run("eval", cache_copy, "--method", "zeroshot", "--shots", 1)
    assert res.exit_code == 0 and "1-shot" in res.stdout and "random weights" in res.stderr
    one_line_error(run("eval", cache_copy, "--method", "nope"), "nope")
    one_line_error(run("eval", cache_copy, "--method", "ape", "--set", "ape.foo=1"), "foo")


def test_sweep_resumes_and_cuts_torn_line(cache_copy, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("methods:\n  zeroshot: {}\n  ape:\n    top_k: [8, 16]\n    weights: [[0.5, 0.5], [0.7, 0.3]]\n"
                    "    n: [[10, 5, 5]]\nshots: [2]\n")
    out = tmp_path / "rows.jsonl"
    res = run("sweep", cache_copy, "--grid", grid, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["rows"] == (1 + 4) * 2 and d["ran"] == 10
    lines = out.read_text().splitlines()
    # a kill mid-write leaves a torn last line: it is cut and that row re-run
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:30])
    d = json.loads(run("sweep", cache_copy, "--grid", grid, "--out", out, "--json").stdout)
    assert d["ran"] == 1 and d["skipped"] == 9
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(again) == 10 and again[-1]["key"] == json.loads(lines[-1])["key"]
    assert again[-1]["metrics"] == json.loads(lines[-1])["metrics"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"methods": ["ape"], "shotz": [1]}))
    one_line_error(run("sweep", cache_copy, "--grid", bad), "shotz")
    bad.write_text(json.dumps({"methods": {"ape": {"top_q": [1]}}}))
    one_line_error(run("sweep", cache_copy, "--grid", bad), "top_q")


def test_report(cache_copy, tmp_path):
    out = tmp_path / "r.jsonl"
    assert run("eval", cache_copy, "--method", "zeroshot,tip", "--set", "tip.n=[10,5]", "--out", out).exit_code == 0
    res = run("report", out, "--out", tmp_path / "rep", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert re.search(r"\| zeroshot +\|", md) and "1-shot" in md and "random weights" in md
    assert d["plot"] and (tmp_path / "rep" / "accuracy_vs_shots.png").stat().st_size > 1000


def test_fit_safe_stores_and_eval_reuses(cache_copy):
    args = ["fit-safe", cache_copy, "--shots", 2, "--seeds", 1, "--epochs", 3, "--batch-size", 4, "--json"]
    res = run(*args)
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["extra"]["trained"] and len(d["extra"]["log"]) == 3 and d["extra"]["stored"]
    d2 = json.loads(run(*args).stdout)
    assert not d2["extra"]["trained"] and d2["metrics"] == d["metrics"] and d2["params"] == d["params"]
    res = run("eval", cache_copy, "--method", "safe", "--shots", 2, "--seeds", 1, "--set", "safe.epochs=3",
              "--set", "safe.batch_size=4", "--json")
    rec = json.loads(res.stdout)
    assert rec["extra"]["trained"] is False and rec["metrics"]["test_acc"] == d["metrics"]["test_acc"]
    assert rec["key"] == d["key"]


def test_trained_adapters_and_safe_a_run_from_the_cache(cache_copy):
    res = run("eval", cache_copy, "--method", "tipf,apet,safe-a", "--shots", 2, "--seeds", 1,
              "--set", "tipf.epochs=2", "--set", "tipf.n=[10,5]",
              "--set", "apet.epochs=2", "--set", "apet.top_k=16", "--set", "apet.n=[10,5]",
              "--set", 'safe-a.safe={"epochs": 2, "warmup_epochs": 0, "batch_size": 4}',
              "--set", 'safe-a.adapter_config={"epochs": 2, "n": [10, 5]}', "--json")
    assert res.exit_code == 0, res.output
    recs = {r["method"]: r for r in map(json.loads, res.stdout.splitlines())}
    assert set(recs) == {"tipf", "apet", "safe-a"}
    for r in recs.values():
        assert 1 <= r["params"]["epoch"] <= 2 and r["metrics"]["test_acc"] is not None
    assert recs["safe-a"]["extra"]["safe_trained"] is True


def test_preset_then_user_override():
    from cachekit.methods.presets import overrides_for

    o = overrides_for(["ape", "tip", "apet"], "imagenet", {"ape": {"top_k": 7}})
    assert o["ape"] == {"s": [7, 7, 0.5], "n": [200, 20, 5], "top_k": 7, "weights": [0.7, 0.3]}
    assert overrides_for(["safe"], "imagenet", {})["safe"] == {"batch_size": 128, "consistency_weight": 1.0}
    assert o["tip"] == {"s": [7, 7], "n": [200, 20]}
    assert o["apet"]["top_k"] == 500 and o["apet"]["weights"] == [0.2, 0.8]
    assert "gda" not in overrides_for(["gda"], "dtd", {})


def test_eval_doc_lists_every_parameter():
    """docs/eval.md's parameter table is generated from the declarations and kept in sync."""
    from pathlib import Path

    from cachekit.docs_gen import eval_parameter_table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "eval.md").read_text()
    assert eval_parameter_table() in doc


def test_runner_reuses_an_ape_search_only_for_the_same_channels(tiny_cache):
    """Configurations whose (Q, weights) select the same channels share one search; the reused row equals a
    fresh search in a new Runner, and a different channel set is searched anew."""
    from cachekit.cache import open_cache
    from cachekit.runner import Runner, refine_channels

    grid = {"n": [10, 5, 5], "top_k": 6}
    with open_cache(tiny_cache) as c:
        r = Runner(c)
        x = r.inputs(2, 1)
        # J = -w0 sim + w1 var: doubling both weights doubles J exactly, so the same channels in the same order
        idx_a = refine_channels(x.W, x.F, x.key_labels, 6, (0.5, 0.5))[0]
        idx_b = refine_channels(x.W, x.F, x.key_labels, 6, (1.0, 1.0))[0]
        idx_c = refine_channels(x.W, x.F, x.key_labels, 6, (1.0, 0.0))[0]
        assert torch.equal(idx_a, idx_b) and not torch.equal(idx_a, idx_c)
        first = r.run("ape", 2, 1, {**grid, "weights": [0.5, 0.5]})
        second = r.run("ape", 2, 1, {**grid, "weights": [1.0, 1.0]})
        other = r.run("ape", 2, 1, {**grid, "weights": [1.0, 0.0]})
        fresh = Runner(c).run("ape", 2, 1, {**grid, "weights": [1.0, 1.0]})
        fresh_other = Runner(c).run("ape", 2, 1, {**grid, "weights": [1.0, 0.0]})
    assert second["extra"]["search"].startswith("reused")
    assert all("search" not in r["extra"] for r in (first, other, fresh))
    assert len(r._ape_searches) == 2
    assert second["config"]["weights"] == [1.0, 1.0]
    for key in ("metrics", "params"):
        assert second[key] == fresh[key] == first[key]
        assert other[key] == fresh_other[key]


def test_lock_and_write_errors_name_what_they_are(cache_copy, tmp_path):
    import errno

    from cachekit.errors import CacheInUseError, CachekitError
    from cachekit.store import WriterLock, os_errors

    out = tmp_path / "rows.jsonl"
    grid = tmp_path / "grid.yaml"
    grid.write_text("methods:\n  zeroshot: {}\nshots: [1]\nseeds: [1]\n")
    with WriterLock(out, kind="results file"):
        one_line_error(run("sweep", cache_copy, "--grid", grid, "--out", out), "results file", "in use by PID")
        with pytest.raises(CacheInUseError, match=r"^cache .* in use by PID"):
            with WriterLock(out):
                pass
    assert run("sweep", cache_copy, "--grid", grid, "--out", out).exit_code == 0
    # Results of refine / fit-safe go beside the cache: the hint says so instead of naming an --out.
    with pytest.raises(CachekitError, match="choose a writable location for the cache"):
        with os_errors("x", "location for the cache (results go beside it)"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(CachekitError, match="choose a writable --out location"):
        with os_errors("x"):
            raise PermissionError(errno.EACCES, "Permission denied")
