"""Hostile inputs (issue 13): one test per fixed bug, the top-level guard, and a fixed sample of the harness
(tests/harness/hostile.py; its full run is marked slow and writes docs/hostile-inputs.md when run as a module).

Unreadable files and folders: as root (where chmod 000 does not stop reads) `hostile.denied` makes the library
see PermissionError by wrapping os.scandir / os.stat / os.access / open; otherwise it uses chmod 000.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from cachekit import data as D
from cachekit.data import load_dataset
from cachekit.errors import BadImageError, CachekitError
from tests.harness import hostile as H

EXTRACT = H.EXTRACT


def one_line_error(run: H.Run, *needles, code=1) -> str:
    """The run printed exactly one `Error:` line (and no traceback), exited with `code`, and names `needles`."""
    assert not run.hang, "no answer (hang)"
    assert run.exc is None and "Traceback" not in run.stdout + run.stderr, run.exc or run.stderr[-500:]
    assert run.code == code, (run.code, run.stderr[-500:])
    assert len(run.error_lines) == 1, run.stderr[-500:]
    line = run.error_lines[0]
    assert "internal error" not in line, line
    for n in needles:
        assert n.lower() in line.lower(), (n, line)
    return line


def err(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "; fix: " in msg, msg
    return msg


@pytest.fixture
def flat(tmp_path) -> Path:
    return H.tree(tmp_path / "data", "flat")


# --------------------------------------------------------------------------------------------- #
# the bugs of issue 13, one test each (each failed before its fix)
# --------------------------------------------------------------------------------------------- #
def test_extract_shots_naming_no_number_is_a_usage_error(flat, tmp_path):
    # before: TypeError traceback ('NoneType' object is not iterable)
    run = H.invoke(["extract", flat, *EXTRACT, "--shots", ",", "--out", tmp_path / "o.h5"])
    one_line_error(run, "--shots", "names no number", code=2)


def test_extract_device_that_is_not_a_device(flat, tmp_path):
    # before: RuntimeError: Invalid device string: 'gpu0'
    run = H.invoke(["extract", flat, *EXTRACT, "--device", "gpu0", "--out", tmp_path / "o.h5"])
    one_line_error(run, "--device 'gpu0'", "not a torch device", "fix:")


def test_templates_file_not_utf8(flat, tmp_path):
    # before: UnicodeDecodeError traceback
    t = tmp_path / "t.txt"
    t.write_bytes(b"a photo of a \xff {}\n")
    run = H.invoke(["extract", flat, *EXTRACT, "--templates", t, "--out", tmp_path / "o.h5"])
    one_line_error(run, str(t), "not UTF-8", "byte 0xff")


def test_template_fields_other_than_one_placeholder(tmp_path):
    # before: '{x} {}' passed the check and raised KeyError when formatted; '{{}}' put no class name in
    from cachekit.templates import resolve_templates

    for text in ("a {x} of {}\n", "{{}}\n", "a {0} and {0}\n"):
        (tmp_path / "t.txt").write_text(text)
        with pytest.raises(CachekitError) as e:
            resolve_templates(str(tmp_path / "t.txt"))
        assert "exactly one {}" in err(e)
    (tmp_path / "t.txt").write_text("a {{logo}} of {}\n")
    assert resolve_templates(str(tmp_path / "t.txt"))[1] == ["a {{logo}} of {}"]


def test_file_name_not_utf8(flat, tmp_path):
    # before: UnicodeEncodeError when the cache was written, after the whole extraction
    os.rename(flat / "c0" / "img0.png", H._fsjoin(flat / "c0", b"\xe9t\xe9.png"))
    with pytest.raises(CachekitError) as e:
        load_dataset(flat)
    assert "\\xe9t\\xe9.png is not valid UTF-8" in err(e)
    run = H.invoke(["extract", flat, *EXTRACT, "--out", tmp_path / "o.h5"])
    one_line_error(run, "not valid UTF-8", "rename")


def test_class_folder_name_not_utf8(flat):
    os.rename(flat / "c1", H._fsjoin(flat, b"cl\xe9ss"))
    with pytest.raises(CachekitError) as e:
        load_dataset(flat)
    assert "cl\\xe9ss is not valid UTF-8" in err(e)


def test_fewshot_row_out_of_range_in_cache(tiny_cache, tmp_path):
    # before: IndexError traceback in eval and fit-safe (the checksums were resealed, so the cache opened)
    c = tmp_path / "c.h5"
    shutil.copy(tiny_cache, c)
    assert H.mutate_cache(c, "/fewshot/K1_seed1", "out-of-range", reseal=True)
    for args in (["eval", c, "--method", "zeroshot,tip", "--shots", "1", "--seeds", "1"],
                 ["fit-safe", c, "--shots", "1", "--seeds", "1", "--epochs", "1"]):
        one_line_error(H.invoke(args), "is damaged", "/fewshot/K1_seed1", "train row 1000000", "outside")


def test_labels_and_nan_in_cache_refused_on_read(tiny_cache, tmp_path):
    c = tmp_path / "c.h5"
    shutil.copy(tiny_cache, c)
    assert H.mutate_cache(c, "/splits/val/labels", "out-of-range", reseal=True)
    one_line_error(H.invoke(["eval", c, "--method", "zeroshot", "--shots", "1", "--seeds", "1"]),
                   "/splits/val/labels", "label 1000000", "outside")
    shutil.copy(tiny_cache, c)
    assert H.mutate_cache(c, "/splits/val/pooled", "nan", reseal=True)
    # before: exit 0 with accuracies computed from NaN scores
    one_line_error(H.invoke(["eval", c, "--method", "zeroshot", "--shots", "1", "--seeds", "1"]),
                   "/splits/val/pooled", "NaN")


@pytest.mark.parametrize("fmt", ["coop", "csv"])
def test_label_of_10_to_the_12_refused_before_any_allocation(tmp_path, fmt):
    # before: C = 10**12 + 1 class names were allocated until the machine ran out of memory
    img = H.image_pool(tmp_path / "img")
    rows = [(f"c{c}/i{j}.png", c if c < 2 else 10**12, "train") for c in range(3) for j in range(3)]
    if fmt == "coop":
        path = tmp_path / "split_zhou_X.json"
        path.write_text(json.dumps({"train": [[p, lab, f"n{lab}"] for p, lab, _ in rows]}))
    else:
        path = tmp_path / "m.csv"
        path.write_text("path,label,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows))
    t0 = time.monotonic()
    with pytest.raises(CachekitError) as e:
        load_dataset(path, image_root=img)
    assert time.monotonic() - t0 < 5
    assert "999,999,999,998 of the 1,000,000,000,001 classes" in err(e) and "label(s) 2, 3, 4" in err(e)


def test_out_of_range_label_named_before_any_work(tmp_path):
    # before: accepted by load_dataset; extract failed after its work with "class 2 has no training images"
    img = H.image_pool(tmp_path / "img")
    man = tmp_path / "m.csv"
    man.write_text("path,label,split\n" + "".join(f"c{c}/i{j}.png,{[0, 1, 4][c]},train\n"
                                                  for c in range(3) for j in range(3)))
    with pytest.raises(CachekitError) as e:
        load_dataset(man, image_root=img)
    assert "2 of the 5 classes" in err(e) and "label(s) 2, 3" in err(e) and "labels go up to 4" in err(e)


def test_symlink_to_parent_folder_inside_a_class(flat):
    # before: the images of every class were taken into c0 too (same image in two classes, train and test)
    os.symlink("..", flat / "c0" / "up")
    with pytest.raises(CachekitError) as e:
        load_dataset(flat)
    assert "symlink loop" in err(e) and "c0/up" in err(e)


def test_symlink_to_a_sibling_class_and_copies(flat):
    os.symlink(flat / "c1", flat / "c0" / "other")
    with pytest.raises(CachekitError) as e:
        load_dataset(flat)
    assert "in two classes" in err(e) and "the same file" in err(e)
    os.remove(flat / "c0" / "other")
    shutil.copy(flat / "c2" / "img1.png", flat / "c0" / "copy.png")
    with pytest.raises(CachekitError) as e:
        load_dataset(flat)
    assert "in two classes" in err(e) and "the same content" in err(e) and "c0/copy.png" in err(e)


def test_unreadable_subfolder_is_an_error(flat):
    # before: skipped without a word (os.walk ignores the error)
    H.png(flat / "c0" / "private" / "p.png", 424242)
    with H.denied([flat / "c0" / "private"]):
        with pytest.raises(CachekitError) as e:
            load_dataset(flat)
    assert "permission denied" in err(e) and "private" in err(e)


def test_unreadable_class_folder_is_not_called_empty(flat):
    # before: "empty class folder .../c1"
    with H.denied([flat / "c1"]):
        with pytest.raises(CachekitError) as e:
            load_dataset(flat)
    assert "permission denied" in err(e) and "empty" not in err(e)


def test_unreadable_image_and_manifest(flat, tmp_path):
    with H.denied([flat / "c2" / "img3.png"]):
        with pytest.raises(CachekitError) as e:
            load_dataset(flat)
    assert "c2/img3.png (permission denied)" in err(e)
    man = tmp_path / "m.csv"
    man.write_text("path,label,split\nc0/img0.png,a,train\n")
    with H.denied([man]):
        with pytest.raises(CachekitError) as e:
            load_dataset(man, image_root=flat)
    assert "permission denied" in err(e)


def test_fifo_used_as_an_image(flat, tmp_path):
    # before: "1 image file(s) missing ... (broken links)"; and load_image on a FIFO blocked forever
    os.mkfifo(flat / "c0" / "pipe.png")
    with pytest.raises(CachekitError) as e:
        load_dataset(flat)
    assert "c0/pipe.png (a FIFO (named pipe), not a regular file)" in err(e) and "broken" not in err(e)
    with pytest.raises(BadImageError, match="FIFO"):
        D.load_image(flat / "c0" / "pipe.png")


def test_fifo_as_manifest_and_as_cache_answer_at_once(tmp_path):
    os.mkfifo(tmp_path / "m.csv")
    os.mkfifo(tmp_path / "c.h5")
    t0 = time.monotonic()
    with pytest.raises(CachekitError, match="FIFO"):
        load_dataset(tmp_path / "m.csv")
    one_line_error(H.invoke(["info", tmp_path / "c.h5"], timeout=20), "not a regular file")
    assert time.monotonic() - t0 < 15


def test_csv_listing_the_same_images_as_val_and_test_is_val_is_test(tmp_path):
    # before: val_is_test false, so results claimed a selection on val that was made on test
    img = H.image_pool(tmp_path / "img")
    rows = [(f"c{c}/i{j}.png", f"k{c}", "train") for c in range(3) for j in range(3)]
    rows += [(f"c{c}/i{j}.png", f"k{c}", s) for c in range(3) for j in (5, 6) for s in ("val", "test")]
    man = tmp_path / "m.csv"
    man.write_text("path,label,split\n" + "".join(",".join(r) + "\n" for r in rows))
    spec = load_dataset(man, image_root=img)
    assert spec.val_is_test and spec.splits["test"] == spec.splits["val"]
    assert spec.origin["test"].startswith("same as val")


def test_partial_val_test_overlap_is_an_error(tmp_path):
    # before: passed unnoticed
    img = H.image_pool(tmp_path / "img")
    rows = [(f"c{c}/i{j}.png", f"k{c}", "train") for c in range(3) for j in range(3)]
    rows += [(f"c{c}/i5.png", f"k{c}", s) for c in range(3) for s in ("val", "test")]
    rows += [("c0/i6.png", "k0", "test")]
    man = tmp_path / "m.csv"
    man.write_text("path,label,split\n" + "".join(",".join(r) + "\n" for r in rows))
    with pytest.raises(CachekitError) as e:
        load_dataset(man, image_root=img)
    assert "3 image(s)" in err(e) and "in both val and test" in err(e) and "c0/i6.png" in err(e)


def test_split_tree_whose_test_is_val_again(tmp_path):
    root = H.tree(tmp_path / "data", "split")
    shutil.rmtree(root / "test")
    os.symlink("val", root / "test")
    spec = load_dataset(root)
    assert spec.val_is_test and [it.path for it in spec.splits["test"]] == [it.path for it in spec.splits["val"]]


def test_carving_keeps_copies_of_an_image_together(tmp_path):
    root = tmp_path / "data"
    for c in range(2):
        for j in range(10):
            H.png(root / f"c{c}" / f"img{j}.png", 1000 * c + j)
        for j in range(10):  # every image twice in its class
            shutil.copy(root / f"c{c}" / f"img{j}.png", root / f"c{c}" / f"zcopy{j}.png")
    spec = load_dataset(root)
    where = {}
    for s in D.SPLITS:
        for it in spec.splits[s]:
            where.setdefault(it.path.replace("zcopy", "img"), set()).add(s)
    assert all(len(v) == 1 for v in where.values()), where


def test_manifest_edge_parsing(tmp_path):
    img = H.image_pool(tmp_path / "img")
    deep = tmp_path / "split_zhou_X.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CachekitError) as e:  # before: RecursionError
        load_dataset(deep, image_root=img)
    assert "nested too deeply" in err(e)
    man = tmp_path / "m.csv"
    man.write_text("path,label,split\nc0/i0.png," + "9" * 5000 + ",train\n")
    with pytest.raises(CachekitError) as e:  # before: ValueError (int() of more than 4300 digits)
        load_dataset(man, image_root=img)
    assert "out of range" in err(e)
    jl = tmp_path / "m.jsonl"
    jl.write_text(json.dumps({"path": "c0/\udcff.png", "label": "a", "split": "train"}) + "\n")
    with pytest.raises(CachekitError) as e:  # before: UnicodeEncodeError at the end of extract
        load_dataset(jl, image_root=img)
    assert "not valid UTF-8" in err(e)


def test_out_that_is_an_input_is_refused_and_kept(tmp_path):
    # before: `--overwrite` deleted the manifest it was reading
    img = H.image_pool(tmp_path / "img")
    man = tmp_path / "m.csv"
    man.write_text("path,label,split\n" + "".join(f"img/c{c}/i{j}.png,k{c},train\n" for c in range(3) for j in range(5)))
    before = man.read_bytes()
    run = H.invoke(["extract", man, *EXTRACT, "--overwrite", "--out", man])
    one_line_error(run, "is the DATA this command reads")
    assert man.read_bytes() == before
    run = H.invoke(["extract", img, *EXTRACT, "--overwrite", "--out", img / "c0" / "i0.png"])
    one_line_error(run, "image of the dataset")
    assert (img / "c0" / "i0.png").exists()
    del img


def test_seed_options_out_of_int64(flat, tmp_path):
    # before: ValueError (Overflow when unpacking long long) from torch.manual_seed
    run = H.invoke(["extract", flat, *EXTRACT, "--init-seed", str(10**30), "--out", tmp_path / "o.h5"])
    one_line_error(run, "--init-seed", "out of range")


def test_damaged_plan_of_an_unfinished_run(flat, tmp_path):
    # before: JSONDecodeError traceback
    parts = tmp_path / "o.h5.parts"
    parts.mkdir()
    (parts / "plan.json").write_text("{not json")
    run = H.invoke(["extract", flat, *EXTRACT, "--out", tmp_path / "o.h5"])
    one_line_error(run, "damaged plan", "--overwrite")


def test_resource_guards_name_the_limit(flat, tmp_path, monkeypatch):
    import cachekit.extraction as E

    run = H.invoke(["extract", flat, *EXTRACT, "--workers", "100000", "--out", tmp_path / "o.h5"])
    one_line_error(run, "--workers 100000", "out of range")
    monkeypatch.setattr(E, "available_memory", lambda: 1 << 20)
    run = H.invoke(["extract", flat, *EXTRACT, "--out", tmp_path / "o.h5"])
    one_line_error(run, "--batch-size 16", "of memory", "1.0 MiB are available")
    monkeypatch.undo()
    monkeypatch.setattr(E.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000))
    run = H.invoke(["extract", flat, *EXTRACT, "--out", tmp_path / "o.h5"])
    one_line_error(run, "no space left", "MiB are free")


def test_huge_image_checked_against_available_memory(tmp_path, monkeypatch):
    H.png(tmp_path / "a.png", 1, size=(20, 20))
    monkeypatch.setattr(D, "_CHECK_MEMORY_ABOVE", 100)
    monkeypatch.setattr(D, "available_memory", lambda: 1000)
    with pytest.raises(BadImageError) as e:
        D.load_image(tmp_path / "a.png")
    assert "20x20" in str(e.value) and "are available" in str(e.value)


# --------------------------------------------------------------------------------------------- #
# the top-level guard and --debug
# --------------------------------------------------------------------------------------------- #
def _plant(monkeypatch):
    import cachekit.data
    import cachekit.extraction

    def boom(*a, **k):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(cachekit.data, "load_dataset", boom)
    monkeypatch.setattr(cachekit.extraction, "load_dataset", boom)


def test_unexpected_exception_is_one_line_with_a_debug_hint(flat, tmp_path, monkeypatch):
    _plant(monkeypatch)
    monkeypatch.delenv("CACHEKIT_DEBUG", raising=False)
    run = H.invoke(["extract", flat, *EXTRACT, "--out", tmp_path / "o.h5"])
    assert run.exc is None and "Traceback" not in run.stderr
    assert run.code == 1 and run.error_lines == [
        "Error: internal error: RuntimeError: planted failure; fix: rerun with --debug for the traceback and report it"]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(flat, tmp_path, monkeypatch, how):
    _plant(monkeypatch)
    args = ["extract", flat, *EXTRACT, "--out", tmp_path / "o.h5"]
    run = H.invoke(["--debug", *args] if how == "flag" else args, env={"CACHEKIT_DEBUG": "1"} if how == "env" else None)
    assert run.code == 1
    assert "Traceback (most recent call last)" in run.stderr and "RuntimeError: planted failure" in run.stderr
    assert run.error_lines and "internal error" in run.error_lines[-1]


def test_guard_also_covers_option_callbacks(monkeypatch, tmp_path):
    from cachekit.cli import common

    monkeypatch.setattr(common, "INT_LIMIT", None)  # int_list (a --shots callback) now raises TypeError
    run = H.invoke(["eval", tmp_path / "c.h5", "--shots", "1"])
    assert run.exc is None and run.code == 1, run.stderr
    assert run.error_lines[0].startswith("Error: internal error: TypeError:")


# --------------------------------------------------------------------------------------------- #
# the harness: a fixed sample (fast) and the full run (slow)
# --------------------------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return H.Base.build(tmp_path_factory.mktemp("hostile"))


SAMPLE = [
    H.tree_case(("flat", ("symlink-to-dataset-root",))),
    H.tree_case(("split", ("val-image-links-train",))),
    H.tree_case(("split", ("hardlink-in-other-class", "hidden-files"))),
    H.tree_case(("flat", ("broken-symlink", "nested-subfolder"))),
    H.tree_case(("split", ("test-is-a-copy-of-val", "symlinked-folder-outside", "unicode-names"))),
    H.list_case(("jsonl", False, ((3, 1, 1), (3, 1, 1), (3, 1, 1)), ("mixed-int-and-name-labels",))),
    H.list_case(("coop", False, ((3, 1, 0), (3, 1, 0), (3, 1, 0)), ("conflicting-class-names",))),
    H.list_case(("csv", True, ((4, 0, 0), (3, 0, 0), (3, 0, 0)), ("utf8-bom", "crlf-line-ends"))),
    H.list_case(("csv", False, ((3, 1, 1), (3, 1, 1), (3, 1, 1)), ("path-is-a-fifo",))),
    H.text_case("templates: a FIFO"),
    H.text_case("classnames: unreadable"),
    H.cache_case(("/splits/train/labels", "negative", True, "eval")),
    H.cache_case(("@shots", "garbage-json", False, "info")),
]


def test_harness_fixed_sample(base, tmp_path):
    outcomes = H.run_plan(SAMPLE, tmp_path, base)
    bad = [(o.case.key, o.kind, o.line, o.detail) for o in outcomes if o.kind != "clean"]
    assert not bad, bad
    assert len(outcomes) == len(SAMPLE)


def test_harness_generators_draw_distinct_reproducible_cases():
    a = [H.tree_case(d).key for d in H.draw(H.tree_strategy(), 8, seed=3)]
    assert a == [H.tree_case(d).key for d in H.draw(H.tree_strategy(), 8, seed=3)]
    keys = [c.key for c in H.plan(seed=0, scale=1.0)]
    assert len(keys) == len(set(keys)) >= 150


def test_harness_classifies_data_loss_and_hangs(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("precious")
    (tmp_path / "rows.jsonl").write_text("row 1\n")
    before = H.snapshot(tmp_path)
    (tmp_path / "keep.txt").unlink()
    with open(tmp_path / "rows.jsonl", "a") as fh:
        fh.write("row 2\n")
    H._PREFIXES[os.fsencode(str(tmp_path / "rows.jsonl"))] = b"row 1\n"
    assert H.lost(before, H.snapshot(tmp_path), append_only=[tmp_path / "rows.jsonl"]) == [
        f"deleted {tmp_path / 'keep.txt'}"]
    (tmp_path / "rows.jsonl").write_text("other\n")
    assert H.lost(before, H.snapshot(tmp_path), append_only=[tmp_path / "rows.jsonl"])[-1].startswith("changed")

    import cachekit.data
    import cachekit.extraction

    os.mkfifo(tmp_path / "fifo")

    def blocks(*a, **k):
        with open(tmp_path / "fifo", "rb") as fh:  # nobody writes: blocks until the alarm
            fh.read()

    monkeypatch.setattr(cachekit.data, "load_dataset", blocks)
    monkeypatch.setattr(cachekit.extraction, "load_dataset", blocks)
    run = H.invoke(["extract", tmp_path, *EXTRACT, "--out", tmp_path / "o.h5"], timeout=2)
    assert run.hang


@pytest.mark.slow
def test_harness_full_run(tmp_path):
    base = H.Base.build(tmp_path)
    outcomes = H.run_plan(H.plan(seed=0), tmp_path, base)
    c = H.counts(outcomes)
    assert c["tried"] >= 150
    bad = [(o.case.key, o.kind, o.line, o.detail) for o in outcomes if o.kind != "clean"]
    assert not bad, bad
