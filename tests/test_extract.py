"""extract: exactness of the cached path against the full model, resume, formats, refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cachekit.cache import open_cache
from cachekit.errors import CachekitError
from cachekit.extraction import extract
from conftest import extract_opts, make_tree


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_cached_path_equals_full_model(tiny_cache, tree):
    """attnpool(cached dense) == stored pooled == a fresh encode_image of the same image."""
    from cachekit.attnpool import attnpool_single_query
    from cachekit.augment import AugmentedView, plain_transform
    from cachekit.data import load_image
    from cachekit.models import load_model

    bundle = load_model("RN-tiny", None, init_seed=0)
    pre = bundle.preprocess_cfg
    with open_cache(tiny_cache) as c:
        params, heads = c.attnpool_params()
        for split in ("val", "test"):
            rows = np.arange(c.num_images(split))
            dense, pooled = c.dense(split, rows), c.pooled(split)
            x = torch.stack([plain_transform(bundle.image_size, pre["mean"], pre["std"])(load_image(tree / p))
                             for p in c.paths(split)])
            with torch.no_grad():
                fresh = bundle.model.encode_image(x)
                repooled = attnpool_single_query(dense, params, heads)
            assert _rel(repooled, pooled) < 1e-5
            assert _rel(pooled, fresh) < 1e-5
        # An augmented train view is reproducible from (aug seed, path, view) alone.
        aug = AugmentedView(bundle.image_size, pre["mean"], pre["std"])
        paths = c.paths("train")
        for view in (1, 2):
            x = torch.stack([aug(load_image(tree / p), 0, p, view) for p in paths])
            with torch.no_grad():
                fresh = bundle.model.encode_image(x)
            assert _rel(c.pooled("train", view=view), fresh) < 1e-5
        assert c.random_weights and "random weights" in c.weights_label


def test_fewshot_sets_and_union(tiny_cache):
    with open_cache(tiny_cache) as c:
        assert c.fewshot_names() == [(1, 1), (1, 2), (2, 1), (2, 2)]
        union = set()
        for k, s in c.fewshot_names():
            rows = c.fewshot(k, s)
            assert len(rows) == 3 * k
            assert c.train_labels(k, s).tolist() == np.repeat(np.arange(3), k).tolist()
            union |= set(rows.tolist())
        # each train image is encoded once, and only the sampled ones are encoded
        assert union == set(range(c.num_images("train")))
        assert len(set(c.paths("train"))) == c.num_images("train")
        F, y = c.train_keys(2, 1)
        assert F.shape == (6, c.embed_dim) and torch.allclose(F.norm(dim=-1), torch.ones(6))
        X, yv = c.train_views(2, 1)
        assert X.shape == (2 * 6, c.embed_dim) and yv.tolist() == y.tolist() * 2


def test_rerun_is_noop_and_mismatch_refused(tiny_cache, tree):
    assert extract(extract_opts(tree, tiny_cache))["status"] == "already complete"
    with pytest.raises(CachekitError, match="init_seed"):
        extract(extract_opts(tree, tiny_cache, init_seed=5))
    with pytest.raises(CachekitError, match="views"):
        extract(extract_opts(tree, tiny_cache, views=3))


def test_overwrite_rebuilds(tmp_path):
    data = make_tree(tmp_path / "d", classes=2, per_class=5)
    out = tmp_path / "c.h5"
    extract(extract_opts(data, out, shots=(1,), seeds=(1,), views=1))
    res = extract(extract_opts(data, out, shots=(1,), seeds=(1,), views=1, init_seed=3, overwrite=True))
    assert res["status"] == "complete"
    with open_cache(out) as c:
        assert c.meta["init_seed"] == 3


def _arrays(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def _assert_same_arrays(a, b):
    pa, pb = _arrays(a), _arrays(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k


class _Stop(Exception):
    pass


def _stop_after(n, seen):
    """An on_unit callback that stops the extraction (as a kill would) once n units are published."""
    def on_unit(info):
        seen.append(info)
        if info["published"] >= n:
            raise _Stop(n)
    return on_unit


def test_resume_after_in_process_stop(tmp_path, tree):
    ref = tmp_path / "ref.h5"
    extract(extract_opts(tree, ref))
    out = tmp_path / "out.h5"
    seen = []
    with pytest.raises(_Stop):
        extract(extract_opts(tree, out, on_unit=_stop_after(3, seen)))
    assert [(u["split"], u["view"], u["start"], u["published"]) for u in seen] == [
        ("train", 0, 0, 1), ("train", 0, 4, 2), ("train", 0, 8, 3)]
    assert all(Path(u["segment"]).exists() and u["total"] == seen[0]["total"] > 3 for u in seen)
    assert not out.exists() and len(list((tmp_path / "out.h5.parts").glob("seg-*.h5"))) == 3
    extract(extract_opts(tree, out))
    _assert_same_arrays(ref, out)
    assert not (tmp_path / "out.h5.parts").exists()


def test_resume_reuses_the_checked_sample_and_rechecks_when_it_is_damaged(tmp_path, tree, monkeypatch):
    """A resumed run takes the few-shot sets from OUT.parts/sample.json instead of decoding every sampled train
    image again; a damaged or foreign sample.json is ignored and the images are checked again."""
    import cachekit.extraction as X

    ref = tmp_path / "ref.h5"
    extract(extract_opts(tree, ref))
    checked = []
    real = X.check_image
    monkeypatch.setattr(X, "check_image", lambda p: (checked.append(p), real(p))[1])
    for i, damage in enumerate((None, "{not json", json.dumps({"identity": {"model": "other"}}))):
        out = tmp_path / f"out-{i}.h5"
        parts = Path(f"{out}.parts")
        with pytest.raises(_Stop):
            extract(extract_opts(tree, out, on_unit=_stop_after(2, [])))
        first = len(checked)
        stored = json.loads((parts / "sample.json").read_text())
        assert first > 0 and len(stored["train_rows"]) == first  # every image of the union checked once
        if damage is not None:
            (parts / "sample.json").write_text(damage)
        extract(extract_opts(tree, out))
        assert len(checked) - first == (0 if damage is None else first)
        _assert_same_arrays(ref, out)
        checked.clear()


def _cli(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return [sys.executable, "-m", "cachekit", *args], env


# How a child process gets slowed down per unit: the library reads no environment variable, so a
# sitecustomize (found first on PYTHONPATH) installs an on_unit callback that sleeps.
_DELAY_SITECUSTOMIZE = """\
import os, time
_delay = float(os.environ.get("CACHEKIT_UNIT_DELAY", "0") or 0)
if _delay:
    import cachekit.extraction as _ex

    _post_init = _ex.ExtractOptions.__post_init__

    def __post_init__(self):
        _post_init(self)
        user = self.on_unit

        def on_unit(info):
            if user is not None:
                user(info)
            time.sleep(_delay)

        self.on_unit = on_unit

    _ex.ExtractOptions.__post_init__ = __post_init__
"""


def _unit_delay_env(tmp_path, seconds, env=None) -> dict:
    site = tmp_path / "_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_DELAY_SITECUSTOMIZE)
    env = dict(env if env is not None else os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["CACHEKIT_UNIT_DELAY"] = str(seconds)
    return env


def test_resume_after_sigkill(tmp_path, tree):
    """A real SIGKILL of the extract process part-way, then a rerun: same arrays as uninterrupted."""
    args = ["extract", str(tree), "--model", "RN-tiny", "--shots", "1,2", "--seeds", "1,2", "--views", "2",
            "--batch-size", "2", "--dense-dtype", "float32", "-q"]
    ref = tmp_path / "ref.h5"
    extract(extract_opts(tree, ref, batch_size=2))
    out = tmp_path / "out.h5"
    parts = tmp_path / "out.h5.parts"
    cmd, env = _cli(*args, "--out", str(out))
    p = subprocess.Popen(cmd, env=_unit_delay_env(tmp_path, 0.2, env), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("seg-*.h5"))) < 3:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_before = len(list(parts.glob("seg-*.h5")))
    assert n_before >= 3 and not out.exists()
    cmd, env = _cli(*args, "--out", str(out))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_same_arrays(ref, out)


def test_coop_and_manifest_formats(tmp_path):
    data = make_tree(tmp_path / "imgs", classes=2, per_class=6)
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    split = {"train": [], "val": [], "test": []}
    rows = []
    for i, rel in enumerate(files):
        lab = int(rel.split("/")[0].split("_")[1])
        s = ("train", "train", "train", "val", "test", "test")[i % 6]
        split[s].append([rel, lab, f"thing {lab}"])
        rows.append((rel, f"thing {lab}", s))
    sj = tmp_path / "split_zhou_Test.json"
    sj.write_text(json.dumps(split))
    csv = tmp_path / "m.csv"
    csv.write_text("path,label,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    for src in (sj, csv):
        out = tmp_path / f"{src.stem}.h5"
        extract(extract_opts(src, out, image_root=str(data), shots=(1,), seeds=(1,), views=1))
        with open_cache(out) as c:
            assert c.classnames == ["thing 0", "thing 1"]
            assert c.num_images("val") == len(split["val"]) and c.num_images("test") == len(split["test"])
            assert c.meta["dataset_format"] == ("coop" if src is sj else "manifest")


def test_bad_image_error_and_skip(tmp_path):
    root = tmp_path / "d"
    for split, n in (("train", 5), ("val", 3), ("test", 3)):
        make_tree(root / split, classes=2, per_class=n, seed=len(split))
    broken = b"\x89PNG\r\n\x1a\n not really a png"
    # (two different broken files: the same bytes in two classes would be refused as one image twice)
    (root / "val" / "class_1" / "zz_broken.png").write_bytes(broken + b" (val)")
    (root / "train" / "class_0" / "zz_broken.png").write_bytes(broken + b" (train)")
    out = tmp_path / "c.h5"
    # K=6 samples every train image of class_0, the broken one included.
    with pytest.raises(CachekitError, match="train/class_0/zz_broken.png"):
        extract(extract_opts(root, out, shots=(6,), seeds=(1,), views=1))
    with pytest.raises(CachekitError, match="val/class_1/zz_broken.png"):
        extract(extract_opts(root, out, shots=(1,), seeds=(1,), views=1, overwrite=True))
    assert not out.exists()
    extract(extract_opts(root, out, shots=(6,), seeds=(1,), views=1, skip_bad=True, overwrite=True))
    with open_cache(out) as c:
        assert sorted((b["split"], b["path"]) for b in c.bad_images()) == [
            ("train", "train/class_0/zz_broken.png"), ("val", "val/class_1/zz_broken.png")]
        assert all("zz_broken" not in p for s in ("train", "val", "test") for p in c.paths(s))
        assert c.num_images("val") == 6
        assert c.with_replacement(6, 1) == [0, 1]  # 5 good images left per class < K=6


def test_resume_without_skip_bad_still_refuses_a_broken_train_image(tmp_path, monkeypatch):
    """Sets drawn around a broken image under --skip-bad are not reused by a resume without it: the check runs
    again and refuses, as a fresh run would; with --skip-bad again they are reused and the result is the same."""
    import cachekit.extraction as X

    root = tmp_path / "d"
    for split, n in (("train", 5), ("val", 3), ("test", 3)):
        make_tree(root / split, classes=2, per_class=n, seed=len(split))
    (root / "train" / "class_0" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ref = tmp_path / "ref.h5"
    extract(extract_opts(root, ref, shots=(6,), seeds=(1,), views=1, skip_bad=True))
    out = tmp_path / "c.h5"
    with pytest.raises(_Stop):
        extract(extract_opts(root, out, shots=(6,), seeds=(1,), views=1, skip_bad=True, on_unit=_stop_after(1, [])))
    with pytest.raises(CachekitError, match="train/class_0/zz_broken.png"):
        extract(extract_opts(root, out, shots=(6,), seeds=(1,), views=1))
    checked = []
    real = X.check_image
    monkeypatch.setattr(X, "check_image", lambda p: (checked.append(p), real(p))[1])
    extract(extract_opts(root, out, shots=(6,), seeds=(1,), views=1, skip_bad=True))
    assert checked == []
    _assert_same_arrays(ref, out)


def _val_only_cache(tmp_path):
    """A cache of a tree with train/ and val/ only (no test/): val doubles as test."""
    root = tmp_path / "d"
    make_tree(root / "train", classes=2, per_class=5)
    make_tree(root / "val", classes=2, per_class=3, seed=1)
    out = tmp_path / "c.h5"
    extract(extract_opts(root, out, shots=(1,), seeds=(1,), views=1))
    return out


def test_val_is_test_hard_link(tmp_path):
    out = _val_only_cache(tmp_path)
    with open_cache(out) as c:
        assert c.val_is_test
        assert torch.equal(c.pooled("val"), c.pooled("test"))
    with h5py.File(out, "r") as f:
        assert f["splits/val"] == f["splits/test"]  # the same object: stored once


def test_second_writer_refused(tmp_path, tree):
    from cachekit.store import WriterLock

    out = tmp_path / "c.h5"
    with WriterLock(out):
        cmd, env = _cli("extract", str(tree), "--model", "RN-tiny", "--out", str(out), "-q")
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 1
    assert f"in use by PID {os.getpid()}" in r.stderr and "Traceback" not in r.stderr


def _one_thread_reference(tree, ref, batch_size):
    """A single-process extract with one torch thread: torchrun runs each rank with one thread, and CPU
    conv results depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(extract_opts(tree, ref, batch_size=batch_size))
    finally:
        torch.set_num_threads(threads)


def _torchrun_extract_cmd(tree, out, batch_size):
    import shutil as _sh

    torchrun = _sh.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    return [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "cachekit", "extract", str(tree),
            "--model", "RN-tiny", "--shots", "1,2", "--seeds", "1,2", "--views", "2", "--batch-size",
            str(batch_size), "--dense-dtype", "float32", "--out", str(out), "-q"]


def test_torchrun_two_gloo_ranks_equal_single_process(tmp_path, tree):
    """torchrun with 2 CPU ranks (gloo): same arrays as a single-process run."""
    ref = tmp_path / "ref.h5"
    _one_thread_reference(tree, ref, 3)
    out = tmp_path / "dist.h5"
    cmd = _torchrun_extract_cmd(tree, out, 3) + ["--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_arrays(ref, out)
    assert not (tmp_path / "dist.h5.parts").exists()


def test_torchrun_killed_then_rerun_equals_single_process(tmp_path, tree):
    """Every torchrun rank SIGKILLed part-way (a lost node), then the same torchrun command again: it resumes
    from the published segments and the cache equals a single-process run."""
    ref = tmp_path / "ref.h5"
    _one_thread_reference(tree, ref, 2)
    out, parts = tmp_path / "dist.h5", tmp_path / "dist.h5.parts"
    cmd = _torchrun_extract_cmd(tree, out, 2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, env=_unit_delay_env(tmp_path, 0.3, env), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(parts.glob("seg-*.h5"))) < 4:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # torchrun and both ranks at once
    p.wait()
    n_before = len(list(parts.glob("seg-*.h5")))
    assert n_before >= 4 and not out.exists()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_arrays(ref, out)
    assert not parts.exists()


def test_manual_shards_last_one_assembles(tmp_path, tree):
    ref = tmp_path / "ref.h5"
    extract(extract_opts(tree, ref))
    out = tmp_path / "sh.h5"
    r0 = extract(extract_opts(tree, out, num_shards=2, shard_index=0))
    assert "last shard" in r0["status"] and not out.exists()
    r1 = extract(extract_opts(tree, out, num_shards=2, shard_index=1))
    assert r1["status"] == "complete"
    _assert_same_arrays(ref, out)


def test_dataloader_workers_give_the_same_arrays(tmp_path, tree, tiny_cache):
    out = tmp_path / "w.h5"
    extract(extract_opts(tree, out, workers=2))
    _assert_same_arrays(tiny_cache, out)


def test_eval_marks_val_equal_test(tmp_path):
    from click.testing import CliRunner

    from cachekit.cli.main import cli

    out = _val_only_cache(tmp_path)
    res = CliRunner().invoke(cli, ["eval", str(out), "--method", "zeroshot,tip", "--set", "tip.n=[5,5]", "--json"])
    recs = [json.loads(x) for x in res.stdout.splitlines()]
    assert recs and all(r["selection"] == "val (val and test are the same data)" for r in recs)
    res = CliRunner().invoke(cli, ["eval", str(out), "--method", "zeroshot"])
    assert "same data" in res.stderr and "same data" in res.stdout


def test_device_jpeg_decoding(tmp_path):
    """--decode device: plain-view JPEGs decoded by torchvision.io.decode_jpeg (here on the CPU, the same call
    nvJPEG serves on CUDA) and preprocessed as tensors; the cache holds exactly the model's output on those
    tensors, pixels stay within half a level of 255 of the Pillow path on average, PNG / CMYK JPEG / truncated JPEG take
    the Pillow path, augmented views do not change, and the decode path is part of the cache identity."""
    from PIL import Image

    from cachekit.augment import plain_transform
    from cachekit.data import load_image
    from cachekit.extraction import _device_plain, _Rows
    from cachekit.models import dense_and_pooled, load_model

    tree = make_tree(tmp_path / "data", classes=3, per_class=6, size=(53, 41), ext="jpg")
    make_tree(tmp_path / "png", classes=1, per_class=1, size=(30, 30), seed=3)
    os.replace(tmp_path / "png" / "class_0" / "img_00.png", tree / "class_1" / "zz_png.png")
    Image.open(tree / "class_2" / "img_00.jpg").convert("CMYK").save(tree / "class_2" / "zz_cmyk.jpg")
    pil_out, dev_out = tmp_path / "pil.h5", tmp_path / "dev.h5"
    extract(extract_opts(tree, pil_out, views=1))
    extract(extract_opts(tree, dev_out, views=1, decode="device"))

    bundle = load_model("RN-tiny", None, init_seed=0)
    pre = bundle.preprocess_cfg
    plain = plain_transform(bundle.image_size, pre["mean"], pre["std"])
    level = 1 / 255 / min(pre["std"])  # one level of 255 in normalised units
    with open_cache(pil_out) as a, open_cache(dev_out) as b:
        assert "decode" not in a.meta["identity"] and "decode_jpeg on cpu" in b.meta["identity"]["decode"]
        for split in ("val", "test"):
            paths = b.paths(split)
            rows = _Rows(tree, [(p, 0) for p in paths], plain, None, 0, bundle.image_size, raw_jpeg=True)
            raw = [rows[i][0] for i in range(len(paths))]  # what the DataLoader hands over
            assert [t.dim() == 1 for t in raw] == [p.endswith(".jpg") and "cmyk" not in p for p in paths]
            reasons = [""] * len(paths)
            x = _device_plain(raw, rows, "cpu", torch.arange(len(paths)), reasons)
            ref = torch.stack([plain(load_image(tree / p)) for p in paths])
            diff = (x - ref).abs().amax(dim=(1, 2, 3))
            mean = (x - ref).abs().mean(dim=(1, 2, 3))
            # Resized as tensors, not PIL images: not bit-equal; a fifth of a level on average, a few
            # levels at most where Pillow clamps between its two passes (noise images, upscaled here).
            assert 0 < diff.max() <= 16 * level and mean.max() <= 0.5 * level
            for p, d in zip(paths, diff):
                if not p.endswith(".jpg") or "cmyk" in p:
                    assert d == 0  # Pillow path
            with torch.no_grad():
                fresh = bundle.model.encode_image(x)
                dense, _ = dense_and_pooled(bundle.visual, x)
            rows = np.arange(len(paths))
            assert _rel(b.pooled(split), fresh) < 1e-5
            # The dense maps tell the two paths apart (random-init pooled features barely depend on pixels).
            assert _rel(b.dense(split, rows), dense) < 1e-5 < 1e-4 < _rel(a.dense(split, rows), dense)
        for view in (1,):  # augmented views never take the device path
            assert torch.equal(a.pooled("train", view=view), b.pooled("train", view=view))
    with pytest.raises(CachekitError, match="decode"):
        extract(extract_opts(tree, pil_out, views=1, decode="device"))
    # A truncated JPEG: Pillow names it, with or without device decoding.
    data = (tree / "class_0" / "img_01.jpg").read_bytes()
    (tree / "class_0" / "img_01.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(CachekitError, match="img_01.jpg.*truncated"):
        extract(extract_opts(tree, tmp_path / "bad.h5", views=1, decode="device"))
