"""`cachekit bench`: result shape, positive finite ratios, the correctness checks, docs sections (only with
--docs PATH), progress through the callback, CLI JSON.

Tiny sizes only; nothing here asserts on speed.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cachekit import bench as B
from cachekit.cli.bench_cmds import bench as bench_cli

COMMON_KEYS = {"bench", "command", "date", "machine", "params", "ratios", "headline", "ratio_meaning",
               "extrapolated", "extrapolated_ratios", "checks", "notes", "table"}
MACHINE_KEYS = {"cpu", "cores", "torch", "torch_threads", "device", "load_average_start", "load_average_end"}


def check_common(res: dict, name: str, ratio_keys: set[str]):
    assert COMMON_KEYS <= set(res), COMMON_KEYS - set(res)
    assert res["bench"] == name
    assert res["command"].startswith(f"cachekit bench {name} ")
    assert MACHINE_KEYS <= set(res["machine"])
    assert set(res["ratios"]) == ratio_keys
    assert res["headline"] in res["ratios"]
    for k, v in res["ratios"].items():
        assert isinstance(v, float) and math.isfinite(v) and v > 0, (k, v)
    assert set(res["extrapolated_ratios"]) <= set(res["ratios"])
    head, rows = res["table"]["header"], res["table"]["rows"]
    assert head and rows and all(len(r) == len(head) for r in rows)
    json.dumps(res)  # JSON-able
    md = B.render_markdown(res)
    assert res["command"] in md and res["machine"]["cpu"] in md


# ----------------------------------------------------------------------------------------------- refine
def test_literal_scores_equal_closed_form():
    from cachekit.methods import refine

    for seed, uneven in ((0, False), (1, True)):
        W, F, y = B._synthetic_keys(6, 3, 20, seed, torch.float64, uneven=uneven)
        assert (refine.scores(W, F, y, w0=0.3, w1=0.7).double() - B.literal_scores(W, F, y, 0.3, 0.7)).abs().max() < 1e-12
        assert (refine.scores(W, None, None, text_only=True).double()
                - B.literal_scores(W, None, None)).abs().max() < 1e-12


def test_bench_refine():
    res = B.bench_refine(classes=12, shots=2, dim=16, pairs=20, repeats=1, check_classes=5, check_shots=3,
                         check_dim=12, threads=1)
    check_common(res, "refine", {"literal_over_closed"})
    assert res["extrapolated"] is True and res["literal"]["pairs_timed"] == 20 and res["literal"]["pairs_total"] == 132
    assert "EXTRAPOLATED" in res["table"]["rows"][1][0] and "extrapolated" in B.render_markdown(res)
    small = res["checks"]["small_case"]
    assert small["max_abs_diff"] < 1e-6 and small["max_abs_diff_text_only"] < 1e-6 and small["agree"]


def test_bench_refine_all_pairs_not_extrapolated():
    res = B.bench_refine(classes=4, shots=1, dim=8, pairs=100, repeats=1, check_classes=3, check_shots=2,
                         check_dim=4, threads=1)
    assert res["extrapolated"] is False and res["extrapolated_ratios"] == []
    assert res["literal"]["pairs_timed"] == 12


# ----------------------------------------------------------------------------------------------- grid
def test_naive_and_vectorised_ape_search_pick_the_same_point():
    from cachekit.methods import ape, zeroshot
    from cachekit.methods.grids import alpha_grid, beta_grid, gamma_grid
    from cachekit.methods.refine import refine
    from cachekit.runner import refine_channels

    C, S, M, D, n = 5, 3, 60, 32, (5, 4, 3)
    W, F, ky, vf, vy = B._synthetic_search_features(C, S, M, D, seed=3)
    L = torch.nn.functional.one_hot(ky, C).float()
    idx, _ = refine_channels(W, F, ky, 16)
    z = zeroshot.logits(vf, W)
    F_r, W_r = refine(F, idx), refine(W, idx)
    A = refine(vf, idx) @ F_r.t()
    div = ape.kl_divergence_bits(F_r, W_r, ky)
    pts = B._grid_points(n)
    counts = B.naive_ape_counts(z, A, div, L, vy, pts, beta_grid(7, n[0]), alpha_grid(7, n[1]), gamma_grid(1, n[2]))
    sel = ape.select(vf, vy, W, F, L, ky, idx, s=(7, 7, 1), n=n)
    assert tuple(sel.extra["grid_index"]) == pts[counts.index(max(counts))]
    assert sel.val_acc == pytest.approx(max(counts) * 100.0 / M)


def test_grid_configs_distinct():
    cfgs = B.grid_configs(100, 1024)
    assert len(cfgs) == 100 and len({json.dumps(c) for c in cfgs}) == 100
    assert {m for m, _ in cfgs} == {"tip", "ape"}
    with pytest.raises(Exception):
        B.grid_configs(10_000, 64)


def test_bench_grid(tmp_path):
    res = B.bench_grid(shots=2, classes=3, val=6, configs=2, views=1, batch_size=8, dim=32, top_k=16,
                       naive_points=10, check_n=(3, 2, 2), ape_configs=12, reextract_model="RN-tiny-224",
                       reextract_sample=2, threads=1, workdir=tmp_path)
    check_common(res, "grid", {"pipeline_total", "per_extra_config", "ape_search_naive_over_vectorised",
                               "ape_sweep_vs_reextract", "ape_search_over_cache_values_only",
                               "pipeline_total_tiny_model", "per_extra_config_tiny_model",
                               "ape_sweep_vs_reextract_tiny_model"})
    # Re-extraction is priced with the real model's timed forward (extrapolated), the tiny model's as a second row.
    a = res["grid_a"]
    assert a["reextract_model"] == "RN-tiny-224" and a["reextract_throughput"]["images"] == 2
    assert a["seconds_extract_reextract_model"] == pytest.approx(
        res["cache"]["encoded_images"] / a["reextract_throughput"]["images_per_s"])
    assert {"pipeline_total", "per_extra_config", "ape_sweep_vs_reextract"} <= set(res["extrapolated_ratios"])
    rows = [r[0] for r in res["table"]["rows"]]
    assert any("RN-tiny-224" in r and "EXTRAPOLATED" in r for r in rows)
    assert any("measured RN-tiny extract" in r for r in rows)
    assert res["grid_b"]["cache_values"] == 3 * 6 * 200 * 20  # classes x val x n_beta x n_gamma
    c = res["grid_c"]
    assert len(c["configs"]) == 12 and c["searches_run"] + c["searches_reused"] == 12
    assert len({x["top_k"] for x in c["configs"]}) == 2 <= c["searches_run"]  # 10 weight pairs per Q
    assert res["checks"]["same_pick_reduced_grid"]["same"] is True
    assert "ape_search_naive_over_vectorised" in res["extrapolated_ratios"]
    assert len(res["grid_a"]["configs"]) == 2
    assert res["grid_a"]["seconds_authors_total"] > res["grid_a"]["seconds_runs"]


# ----------------------------------------------------------------------------------------------- io
def test_bench_io(tmp_path):
    res = B.bench_io(images=10, dense_shape=(16, 3, 3), batch=4, repeats=1, threads=1, workdir=tmp_path)
    check_common(res, "io", {f"{s}_{k}" for s in ("cold", "warm") for k in
                             ("seq_cache_over_numpy", "seq_h5_raw_over_numpy_raw", "random_cache_over_numpy")})
    assert res["data"]["bytes"] == 10 * 16 * 9 * 2
    res = B.bench_io(images=5, dense_shape=(8, 2, 2), batch=2, repeats=1, cold=False, threads=1, workdir=tmp_path)
    assert set(res["gb_per_s"]) == {"warm"} and "warm page cache only" in " ".join(res["notes"])


def test_bench_io_on_existing_cache(tiny_cache, tmp_path):
    res = B.bench_io(images=4, batch=2, repeats=1, cold=False, cache=str(tiny_cache), split="val", workdir=tmp_path)
    assert res["data"]["maps"] <= 4 and "existing cache" in res["data"]["source"]
    assert f"--cache {tiny_cache}" in res["command"]


# ----------------------------------------------------------------------------------------------- safe, extract
def test_bench_safe(tmp_path):
    res = B.bench_safe(images=4, epochs=1, model="RN-tiny", batch_size=2, classes=2, image_size=(48, 40),
                       threads=1, workdir=tmp_path)
    check_common(res, "safe", {"usual_over_cached_memory", "usual_over_cached_hdf5"})
    assert res["checks"]["losses_close"] is True
    assert res["setup"]["samples"] == 4


def test_bench_extract(tmp_path):
    res = B.bench_extract(model="RN-tiny", images=4, batch_size=2, classes=2, image_size=(48, 40), threads=1,
                          decode="both", workdir=tmp_path)
    check_common(res, "extract", {"extract_over_bare", "extract_without_model_build_over_bare",
                                  "extract_device_decode_over_bare"})
    assert res["setup"]["encoded_images"] == 4 and set(res["extract"]["by_decode"]) == {"pil", "device"}


def test_cuda_refused_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    for fn in (B.bench_extract, B.bench_search, B.bench_gpu, B.bench_scale):
        with pytest.raises(Exception, match="no CUDA device"):
            fn(device="cuda")


def test_rn50_throughput_is_a_timed_forward_sample():
    r = B.rn50_throughput("RN-tiny-224", n=3, batch=2, threads=1)
    assert r["images"] == 3 and r["image_size"] == 224 and r["images_per_s"] == pytest.approx(3 / r["seconds"])


# ----------------------------------------------------------------------------------------------- search
def test_bench_search_cpu():
    res = B.bench_search(classes=4, val=8, shots=2, dim=16, top_k=8, device="cpu", repeats=1, threads=1)
    check_common(res, "search", {"floor_over_search"})
    assert "target" not in res["checks"] and res["search"]["seconds_cpu"] is None
    # On a device other than the CPU the same search is timed on the CPU too, and must pick the same point
    # (exercised on CUDA by `make bench-gpu`).


# ----------------------------------------------------------------------------------------------- scale
def test_standin_attnpool_is_open_clips_attention_pooling():
    """The stand-in computes its pooling in closed form; it equals open_clip's AttentionPool2d (and cachekit's
    attnpool_single_query, which `verify` uses) on the same weights."""
    from cachekit.attnpool import attnpool_single_query
    from cachekit.models import attnpool_params

    spec = {**B._STANDIN_DEFAULTS, "dense_shape": [64, 3, 3], "dim": 32, "heads": 4}
    ap = B._make_standin_attnpool(spec)
    x = torch.relu(torch.randn(5, 64, 3, 3, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        fast, ref = ap(x), ap.reference_forward(x)
    assert (fast - ref).abs().max() < 1e-5 * ref.abs().max()
    params, heads = attnpool_params(type("Visual", (), {"attnpool": ap})())
    assert (attnpool_single_query(x, params, heads) - fast).abs().max() < 1e-5 * ref.abs().max()


def test_standin_reads_the_class_from_the_pixels_and_is_deterministic(tmp_path):
    from cachekit.augment import AugmentedView, plain_transform
    from cachekit.data import load_image

    classes = [0, 7, 58, 421, 999]
    rng = np.random.default_rng(0)
    for c in classes:
        B.standin_image(c, 24, rng).save(tmp_path / f"{c}.jpg", quality=95)
    bundle = B.standin_bundle({"image_size": 24, "dense_shape": [16, 3, 3], "dim": 8, "heads": 4})
    pre = bundle.preprocess_cfg
    plain, aug = plain_transform(24, pre["mean"], pre["std"]), AugmentedView(24, pre["mean"], pre["std"])
    for c in classes:
        p = tmp_path / f"{c}.jpg"
        img = load_image(p)
        x = torch.stack([plain(img)] + [aug(img, 0, p.name, v) for v in (1, 2, 3)])
        assert bundle.visual.stem.classes(x).tolist() == [c] * 4
        d1, d2 = bundle.visual.stem(x), bundle.visual.stem(x.flip(0)).flip(0)
        assert d1.shape == (4, 16, 3, 3) and torch.equal(d1, d2)  # per view, whatever the batch order
        assert not torch.equal(d1[1], d1[2])  # views differ


def test_standin_installed_restores_the_loader():
    import importlib

    X = importlib.import_module("cachekit.extraction")
    orig = X.load_model
    with B.standin_installed({"dense_shape": [8, 2, 2], "dim": 4, "heads": 2}):
        b = X.load_model("RN50-standin", None, init_seed=3, device="cpu")
        assert b.name == "RN50-standin" and b.random_weights and "stand-in" in b.weights_label
        assert tuple(b.visual.attnpool.positional_embedding.shape) == (5, 8)
    assert X.load_model is orig


def test_bench_scale_tiny(tmp_path):
    """The whole rehearsal at a toy size: real extract with the stand-in (segments, assembly, publish), SIGKILL
    at half and resume to identical arrays, verify, info, SAFE in memory and streaming, eval and the APE curve."""
    res = B.bench_scale(classes=3, shots=(1, 2), views=1, val=3, test=3, dense_shape=(8, 2, 2), dim=4, heads=2,
                        batch_size=2, input_px=16, safe_steps=1, safe_batch=2, ape_curve="3x6,2x4",
                        methods="zeroshot,tip,ape,gda", rn50_sample=0, threads=1, workdir=tmp_path)
    check_common(res, "scale", {"extract_write_vs_raw_write", "segments_write_vs_raw_write",
                                "resume_vs_uninterrupted", "safe_memory_step_over_stream_step_cold"})
    ch = res["checks"]
    assert ch["verify_ok"] and ch["resumed_identical"] and ch["killed_by_sigkill"]
    assert ch["memory_source"] == "TensorSource" and ch["stream_source"] == "DenseSource"
    c = res["cache"]
    assert c["maps"] == {"train": 3 * 2 * 2, "val": 3, "test": 3} and c["dense_bytes"] == 18 * 32 * 2
    r = res["resume"]
    assert 0 < r["killed_after_units"] < r["units_total"] and r["segments_left"] >= r["killed_after_units"]
    assert r["resume_units_encoded"] == r["units_total"] - r["segments_left"]
    assert {x["method"] for x in res["eval"]["runs"]} == {"zeroshot", "tip", "ape", "gda"}
    assert [(p["classes"], p["val"]) for p in res["eval"]["curve"]] == [(3, 6), (2, 4)]
    assert res["extract"]["disk_peak_bytes"] >= res["cache"]["file_bytes"] > 0
    assert res["extract"]["peak_rss_bytes"] > 0 and res["verify"]["peak_rss_bytes"] > 0
    assert not (tmp_path / "scale.h5").exists()  # the cache is removed unless --keep


def test_bench_scale_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(Exception, match="2..1000 classes"):
        B.bench_scale(classes=1001, workdir=tmp_path)
    with pytest.raises(Exception, match="CLASSESxVAL"):
        B.bench_scale(classes=3, val=3, ape_curve="3by6", workdir=tmp_path)
    with pytest.raises(Exception, match="free"):
        B.bench_scale(classes=1000, shots=(16,), test=10**7, workdir=tmp_path)


# ----------------------------------------------------------------------------------------------- gpu script
SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench_gpu.sh"


def _script(args, env_extra=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PY": sys.executable, **(env_extra or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_bench_gpu_script_refuses_without_cuda(tmp_path):
    doc = tmp_path / "b.md"
    r = _script(["--docs", str(doc)], {"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "fix:" in r.stderr and not doc.exists()
    r = _script(["--device", "cpu", "--docs", str(doc)])
    assert r.returncode == 2 and "--tiny" in r.stderr and not doc.exists()


def test_bench_gpu_script_cpu_dry_run(tmp_path):
    """`tools/bench_gpu.sh --device cpu --tiny` runs every GPU step at toy sizes and writes each section."""
    doc = tmp_path / "b.md"
    doc.write_text("# B\n\n<!-- bench:gpu-safe -->\nnot measured yet\n<!-- /bench:gpu-safe -->\n\nend\n")
    r = _script(["--device", "cpu", "--tiny", "--docs", str(doc), "--threads", "1", "-q"])
    assert r.returncode == 0, r.stderr[-2000:]
    secs = _sections(doc.read_text())
    assert set(secs) == {"gpu-extract", "gpu-safe", "gpu-search-100", "gpu-search-1000", "gpu-scale", "gpu"}
    assert "not measured yet" not in secs["gpu-safe"] and doc.read_text().index("gpu-safe") < doc.read_text().index("end")
    assert "--docs-section gpu-search-1000" in secs["gpu-search-1000"] and "TINY dry run" in secs["gpu"]
    assert "target" in r.stdout and "extract_over_bare" in r.stdout

# ----------------------------------------------------------------------------------------------- docs
def test_replace_section():
    doc = "# T\n\nintro\n<!-- bench:io -->\nold io\n<!-- /bench:io -->\nmiddle\n<!-- bench:safe -->\nold safe\n<!-- /bench:safe -->\nend\n"
    new = B.replace_section(doc, "io", "NEW IO\n")
    assert new == doc.replace("old io", "NEW IO")
    appended = B.replace_section(doc, "grid", "G")
    assert appended.startswith(doc.rstrip("\n")) and appended.endswith("<!-- bench:grid -->\nG\n<!-- /bench:grid -->\n")
    with pytest.raises(Exception, match="unmatched"):
        B.replace_section("<!-- bench:io -->\nx\n", "io", "y")


def _sections(text: str) -> dict[str, str]:
    import re

    return {m.group(1): m.group(0) for m in re.finditer(r"<!-- bench:([\w.-]+) -->.*?<!-- /bench:\1 -->", text, re.S)}


REPO_DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
TINY_REFINE = ["refine", "--classes", "6", "--shots", "1", "--dim", "8", "--pairs", "5", "--repeats", "1",
               "--check-classes", "3", "--check-shots", "2", "--check-dim", "4", "--threads", "1"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_docs_replaces_only_its_section_of_the_given_file(tmp_path, monkeypatch):
    """--docs PATH replaces this benchmark's section of PATH and writes no other file (not the repo's
    docs/benchmarks.md, nothing in the working directory)."""
    work = tmp_path / "cwd"
    work.mkdir()
    doc = tmp_path / "benchmarks.md"
    if REPO_DOC.exists():
        shutil.copy(REPO_DOC, doc)
    else:
        doc.write_text("# Benchmarks\n\n<!-- bench:refine -->\nx\n<!-- /bench:refine -->\n\n<!-- bench:io -->\ny\n<!-- /bench:io -->\n")
    before = doc.read_text()
    repo_before = REPO_DOC.read_bytes() if REPO_DOC.exists() else None
    out = tmp_path / "r.json"
    monkeypatch.chdir(work)
    res = CliRunner().invoke(bench_cli, TINY_REFINE + ["--docs", str(doc), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert json.loads(out.read_text())["ratios"] == d["ratios"]
    after = doc.read_text()
    sb, sa = _sections(before), _sections(after)
    assert set(sb) == set(sa) and "refine" in sa
    assert sa["refine"] != sb["refine"] and d["command"] in sa["refine"]
    for name in sb:
        if name != "refine":
            assert sa[name] == sb[name]
    assert after.replace(sa["refine"], "@") == before.replace(sb["refine"], "@")
    assert sorted(_files(tmp_path)) == ["benchmarks.md", "r.json"]  # nothing else, not even a .tmp
    if repo_before is not None:
        assert REPO_DOC.read_bytes() == repo_before  # the repo's document is untouched


def test_cli_docs_section_names_the_section(tmp_path):
    doc = tmp_path / "b.md"
    res = CliRunner().invoke(bench_cli, TINY_REFINE + ["--docs", str(doc), "--docs-section", "refine-small", "-q"])
    assert res.exit_code == 0, res.output
    text = doc.read_text()
    assert text.startswith("# Benchmarks") and set(_sections(text)) == {"refine-small"}
    assert "--docs-section refine-small" in _sections(text)["refine-small"]


def test_cli_without_docs_writes_no_document(tmp_path, monkeypatch):
    """Without --docs, bench prints (and writes --out): no markdown anywhere, the repo's untouched."""
    repo_before = REPO_DOC.read_bytes() if REPO_DOC.exists() else None
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(bench_cli, TINY_REFINE + ["--out", "r.json"])
    assert res.exit_code == 0, res.output
    assert sorted(_files(tmp_path)) == ["r.json"]
    if repo_before is not None:
        assert REPO_DOC.read_bytes() == repo_before
    assert not hasattr(B, "DOCS_PATH")  # nothing is derived from where the package lies
    with pytest.raises(Exception, match="--docs"):
        B.write_docs_section(json.loads(CliRunner().invoke(bench_cli, TINY_REFINE + ["--json"]).stdout), None)


def test_progress_is_a_callback_and_quiet_silences_it():
    from cachekit.progress import Step

    steps = []
    B.bench_refine(classes=4, shots=1, dim=8, pairs=3, repeats=1, check_classes=3, check_shots=1, check_dim=4,
                   threads=1, progress=steps.append)
    assert steps and all(isinstance(s, Step) for s in steps)
    mine = [s for s in steps if s.task == "bench refine"]
    assert mine[0].done == 0 and mine[-1].done == mine[-1].total == 3
    loud = CliRunner().invoke(bench_cli, TINY_REFINE)
    quiet = CliRunner().invoke(bench_cli, TINY_REFINE + ["-q"])
    assert loud.exit_code == quiet.exit_code == 0
    assert "[bench refine]" in loud.stderr and "[bench refine]" not in quiet.stderr
    assert "literal_over_closed" in quiet.stdout


def test_cli_json_parses_and_help():
    res = CliRunner().invoke(bench_cli, ["refine", "--classes", "5", "--shots", "1", "--dim", "4", "--pairs", "3",
                                         "--repeats", "1", "--check-classes", "3", "--check-shots", "1",
                                         "--check-dim", "4", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["bench"] == "refine" and d["ratios"]["literal_over_closed"] > 0
    for cmd in ([], ["refine"], ["grid"], ["io"], ["safe"], ["extract"], ["scale"], ["search"], ["gpu"]):
        r = CliRunner().invoke(bench_cli, cmd + ["--help"])
        assert r.exit_code == 0 and "Usage:" in r.output


def test_cli_table_output():
    res = CliRunner().invoke(bench_cli, ["refine", "--classes", "5", "--shots", "1", "--dim", "4", "--pairs", "3",
                                         "--repeats", "1", "--check-classes", "3", "--check-shots", "1",
                                         "--check-dim", "4"])
    assert res.exit_code == 0
    assert "literal_over_closed" in res.stdout and "reproduce: cachekit bench refine" in res.stderr


def test_cli_unwritable_out_and_docs_give_one_line_errors(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["refine", "--classes", "5", "--shots", "1", "--dim", "4", "--pairs", "3", "--repeats", "1",
            "--check-classes", "3", "--check-shots", "1", "--check-dim", "4", "-q"]
    for extra, needle in ((["--out", str(afile / "r.json")], "--out"),
                          (["--docs", str(afile / "b.md")], "--docs path")):
        res = CliRunner().invoke(bench_cli, base + extra)
        assert res.exit_code == 1 and "Traceback" not in res.output
        err = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert err == [err[0]] and err[0].startswith("Error:") and needle in err[0], res.stderr


# ----------------------------------------------------------------------------------------------- found by the rehearsal
# Problems `bench scale` found (docs/scale.md, "What the rehearsal found"), each fixed; these keep them fixed.
def test_iter_blocks_bounds_its_blocks_on_train_dense_shapes(tmp_path):
    import h5py

    from cachekit import schema as S

    with h5py.File(tmp_path / "x.h5", "w") as f:
        ds = f.create_dataset("d", shape=(2, 64, 16), dtype="float32", chunks=(1, 1, 16))
        ds[...] = np.arange(2 * 64 * 16, dtype=np.float32).reshape(2, 64, 16)
        blocks = list(S.iter_blocks(ds, block_bytes=1024))
        assert np.array_equal(np.concatenate([b.reshape(-1) for b in blocks]), ds[()].reshape(-1))
        assert max(b.nbytes for b in blocks) <= 1024  # was 4096 (one row of the first axis)
        # A block smaller than a row: the cut goes down to elements, still in C order.
        tiny = list(S.iter_blocks(ds, block_bytes=10))
        assert max(b.nbytes for b in tiny) == 8
        assert np.array_equal(np.concatenate([b.reshape(-1) for b in tiny]), ds[()].reshape(-1))
        # The digest does not depend on how the stream is cut.
        whole = S.Checksum(ds.dtype, ds.shape)
        whole.update(ds[()])
        assert S.dataset_checksum(ds) == whole.hexdigest()
        cut = S.Checksum(ds.dtype, ds.shape)
        for b in tiny:
            cut.update(b)
        assert cut.hexdigest() == whole.hexdigest()


def test_python_api_extract_survives_importing_the_module():
    import importlib

    import cachekit

    importlib.import_module("cachekit.extraction")
    import cachekit.extraction  # noqa: F401  (what every CLI command does)

    assert callable(cachekit.extract) and cachekit.extract.__module__ == "cachekit"


def test_torch_float16_cast_equals_numpy_on_edge_values():
    # extract casts dense maps with torch (fast) where it used numpy; the stored bytes must not change.
    import torch

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_000).astype(np.float32) * s for s in (1e-8, 1e-5, 1, 1e3, 7e4)]
                       + [np.array([65504, 65520, 65519.99, -7e4, 6e-8, 3e-8, 1e-40, 0.0, -0.0, np.inf, -np.inf,
                                    np.nan], dtype=np.float32)])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    got = torch.from_numpy(x).to(torch.float16).numpy()
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_dense_source_load_stored_keeps_the_cache_dtype_and_equals_get(tiny_cache):
    from cachekit.cache import open_cache

    with open_cache(tiny_cache) as c:
        src = c.dense_source("train", c.fewshot(2, 1), (1, 2))
        whole = src.get(np.arange(len(src)))
        got = src.load_stored()
        assert got.dtype == torch.float32 and c.meta["dense_dtype"] == "float32"  # tiny_cache is float32
        assert got.numel() * got.element_size() == src.stored_nbytes == src.nbytes
        assert torch.equal(got, whole)
        # in any order asked, as the maps are addressed
        idx = np.array([3, 0, len(src) - 1, 0])
        assert torch.equal(torch.from_numpy(src.read_stored(idx)), whole[idx])
