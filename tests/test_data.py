"""Tests for the dataset layer (cachekit.data) and the view transforms (cachekit.augment)."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cachekit import data as D
from cachekit.augment import (OPENAI_MEAN, OPENAI_STD, AugmentedView, crop_params, plain_transform,
                              view_seed)
from cachekit.data import Item, load_dataset, sample_fewshot
from cachekit.errors import BadImageError, CachekitError


# --------------------------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------------------------- #
def write_image(path: Path, size=(8, 6), seed=0, mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def make_folder(root: Path, classes: dict[str, int], ext=".png", start=0) -> Path:
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            write_image(root / name / f"img{i:03d}{ext}", seed=start + 100 * c + i)
    return root


def items_by_split(spec):
    return {s: [(it.path, it.label) for it in spec.splits[s]] for s in D.SPLITS}


def err_text(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "; fix: " in msg, msg
    return msg


# --------------------------------------------------------------------------------------------- #
# ImageFolder
# --------------------------------------------------------------------------------------------- #
def test_imagefolder_flat_carves_val_and_test(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 10, "golden_retriever": 7, "ant": 3})
    (root / "cat" / ".hidden.png").write_bytes(b"x")          # hidden: ignored
    (root / "cat" / "notes.txt").write_text("ignored")          # not an image: ignored
    write_image(root / "cat" / "deep" / "UPPER.JPG", seed=99, fmt="JPEG")  # nested, upper-case ext
    (root / ".git").mkdir()                                      # hidden folder: not a class
    spec = load_dataset(root)
    assert spec.source_format == "imagefolder"
    assert spec.classnames == ["ant", "cat", "golden retriever"]
    assert spec.root == root.absolute()
    assert not spec.val_is_test and spec.split_seed == 1
    assert spec.origin["val"] == "carved from train (seed 1, fraction 0.2)"
    assert spec.origin["test"] == "carved from train (seed 1, fraction 0.3)"
    all_paths = [it.path for s in D.SPLITS for it in spec.splits[s]]
    assert len(all_paths) == len(set(all_paths)) == 21
    assert "cat/deep/UPPER.JPG" in all_paths
    assert not any("hidden" in p or p.endswith(".txt") for p in all_paths)
    counts = spec.describe()["splits"]
    # per class (n): test = round(0.3 n), val = round(0.2 n), each >= 1 for n >= 3
    assert counts["test"]["per_class"] == {"ant": 1, "cat": 3, "golden retriever": 2}
    assert counts["val"]["per_class"] == {"ant": 1, "cat": 2, "golden retriever": 1}
    assert counts["train"]["per_class"] == {"ant": 1, "cat": 6, "golden retriever": 4}
    for s in D.SPLITS:  # dataset order is kept within every split
        paths = [it.path for it in spec.splits[s]]
        assert paths == sorted(paths)
        assert all(spec.classnames[it.label].replace(" ", "_") == it.path.split("/")[0] for it in spec.splits[s])
    json.dumps(spec.describe())


def test_imagefolder_carving_deterministic_and_seeded(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 20, "b": 20})
    one, two = load_dataset(root), load_dataset(root)
    assert items_by_split(one) == items_by_split(two)
    other = load_dataset(root, split_seed=2)
    assert items_by_split(other) != items_by_split(one)
    assert other.origin["val"] == "carved from train (seed 2, fraction 0.2)"
    # a class's carving does not depend on the other classes (per-class seeds)
    make_folder(tmp_path / "ds", {"c": 5}, start=7000)
    more = load_dataset(root)
    for s in D.SPLITS:
        assert [it.path for it in more.splits[s] if it.path[0] in "ab"] == [it.path for it in one.splits[s]]


def test_imagefolder_fractions(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 10})
    spec = load_dataset(root, val_fraction=0.1, test_fraction=0.5)
    assert [len(spec.splits[s]) for s in D.SPLITS] == [4, 1, 5]
    with pytest.raises(CachekitError) as e:
        load_dataset(root, val_fraction=0.6, test_fraction=0.5)
    assert "val_fraction 0.6" in err_text(e)
    with pytest.raises(CachekitError) as e:
        load_dataset(root, val_fraction=-0.1)
    assert "val_fraction -0.1" in err_text(e)


def test_imagefolder_small_classes():
    items = [Item(f"c{c}/{i}", c) for c, n in enumerate([1, 2, 3, 4]) for i in range(n)]
    rest, carved = D._carve(items, ["c0", "c1", "c2", "c3"], 1, {"test": 0.3, "val": 0.2})
    per = lambda lst: [sum(it.label == c for it in lst) for c in range(4)]  # noqa: E731
    assert per(rest) == [1, 1, 1, 2]
    assert per(carved["test"]) == [0, 1, 1, 1]
    assert per(carved["val"]) == [0, 0, 1, 1]


def test_imagefolder_train_val_test(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        make_folder(tmp_path / "ds" / split, {"b_x": n, "a": n}, start=len(split) * 1000)
    spec = load_dataset(tmp_path / "ds")
    assert spec.classnames == ["a", "b x"]
    assert spec.origin == {"train": "given", "val": "given", "test": "given"}
    assert [len(spec.splits[s]) for s in D.SPLITS] == [8, 4, 6]
    assert spec.splits["train"][0] == Item("train/a/img000.png", 0)
    assert spec.splits["test"][-1] == Item("test/b_x/img002.png", 1)
    assert not spec.val_is_test


def test_imagefolder_train_test_carves_val(tmp_path):
    make_folder(tmp_path / "ds" / "train", {"a": 10, "b": 5})
    make_folder(tmp_path / "ds" / "test", {"a": 2, "b": 2}, start=500)
    spec = load_dataset(tmp_path / "ds", split_seed=3)
    assert spec.origin["val"] == "carved from train (seed 3, fraction 0.2)"
    assert spec.origin["test"] == "given"
    assert len(spec.splits["val"]) == 3 and len(spec.splits["train"]) == 12
    assert all(it.path.startswith("train/") for it in spec.splits["val"])
    assert {it.path for it in spec.splits["val"]}.isdisjoint(it.path for it in spec.splits["train"])
    assert not spec.val_is_test


def test_imagefolder_train_val_is_test(tmp_path):
    make_folder(tmp_path / "ds" / "train", {"a": 3, "b": 3})
    make_folder(tmp_path / "ds" / "val", {"a": 2, "b": 1}, start=500)
    spec = load_dataset(tmp_path / "ds")
    assert spec.val_is_test
    assert spec.splits["test"] == spec.splits["val"] and len(spec.splits["val"]) == 3
    assert spec.origin["test"] == "same as val"
    assert spec.describe()["val_is_test"] is True


def test_imagefolder_train_only_subtree(tmp_path):
    make_folder(tmp_path / "ds" / "train", {"a": 10})
    spec = load_dataset(tmp_path / "ds")
    assert [len(spec.splits[s]) for s in D.SPLITS] == [5, 2, 3]


def test_imagefolder_errors(tmp_path):
    make_folder(tmp_path / "mixed" / "train", {"a": 2})
    make_folder(tmp_path / "mixed", {"cat": 2})
    with pytest.raises(CachekitError) as e:
        load_dataset(tmp_path / "mixed")
    assert "cat" in err_text(e) and "train" in err_text(e)

    make_folder(tmp_path / "notrain" / "val", {"a": 2})
    with pytest.raises(CachekitError) as e:
        load_dataset(tmp_path / "notrain")
    assert "no train/" in err_text(e)

    make_folder(tmp_path / "differ" / "train", {"a": 2, "b": 2})
    make_folder(tmp_path / "differ" / "test", {"a": 2, "c": 2})
    with pytest.raises(CachekitError) as e:
        load_dataset(tmp_path / "differ")
    assert "extra: c" in err_text(e) and "missing: b" in err_text(e)

    make_folder(tmp_path / "empty_class", {"a": 2})
    (tmp_path / "empty_class" / "zebra").mkdir()
    (tmp_path / "empty_class" / "zebra" / "readme.txt").write_text("no images")
    with pytest.raises(CachekitError) as e:
        load_dataset(tmp_path / "empty_class")
    assert "empty class folder" in err_text(e) and "zebra" in err_text(e)

    (tmp_path / "nothing").mkdir()
    with pytest.raises(CachekitError) as e:
        load_dataset(tmp_path / "nothing")
    assert "no images at all" in err_text(e) and "nothing" in err_text(e)

    write_image(tmp_path / "loose" / "x.png")
    with pytest.raises(CachekitError) as e:
        load_dataset(tmp_path / "loose")
    assert "no class folders" in err_text(e)

    make_folder(tmp_path / "dup", {"red_car": 1, "red car": 1})
    with pytest.raises(CachekitError) as e:
        load_dataset(tmp_path / "dup")
    assert "duplicate class name 'red car'" in err_text(e)

    with pytest.raises(CachekitError) as e:
        load_dataset(tmp_path / "empty_class", image_root=tmp_path)
    assert "--image-root" in err_text(e)


def test_missing_data_and_unknown_format(tmp_path):
    with pytest.raises(CachekitError) as e:
        load_dataset(tmp_path / "nope")
    assert "nope" in err_text(e) and "does not exist" in err_text(e)
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(CachekitError) as e:
        load_dataset(tmp_path / "list.txt")
    assert "unknown dataset format" in err_text(e) and "list.txt" in err_text(e)


def test_broken_symlink_reported(tmp_path):
    make_folder(tmp_path / "ds", {"a": 2})
    os.symlink(tmp_path / "gone.png", tmp_path / "ds" / "a" / "link.png")
    with pytest.raises(CachekitError) as e:
        load_dataset(tmp_path / "ds")
    assert "a/link.png" in err_text(e) and "1 image file(s) missing" in err_text(e)


# --------------------------------------------------------------------------------------------- #
# CoOp split file
# --------------------------------------------------------------------------------------------- #
def coop_tree(tmp_path):
    images = make_folder(tmp_path / "oxford_pets" / "images", {"abyssinian": 4, "beagle": 4})
    split = {
        "train": [["abyssinian/img000.png", 0, "abyssinian"], ["beagle/img000.png", 1, "beagle"],
                  ["abyssinian/img001.png", 0, "abyssinian"], ["beagle/img001.png", 1, "beagle"]],
        "val": [["abyssinian/img002.png", 0, "abyssinian"], ["beagle/img002.png", 1, "beagle"]],
        "test": [["abyssinian/img003.png", 0, "abyssinian"], ["beagle/img003.png", 1, "beagle"]],
    }
    path = tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json"
    path.write_text(json.dumps(split, indent=1))
    return path, images, split


def test_coop_split_file(tmp_path):
    path, images, split = coop_tree(tmp_path)
    spec = load_dataset(path, image_root=images)
    assert spec.source_format == "coop" and spec.root == images.absolute()
    assert spec.classnames == ["abyssinian", "beagle"]
    for s in D.SPLITS:
        assert [(it.path, it.label) for it in spec.splits[s]] == [(p, lab) for p, lab, _ in split[s]]
    assert spec.origin == {"train": "given", "val": "given", "test": "given"}
    # the dataset folder holding one split_zhou_*.json is recognised too
    assert items_by_split(load_dataset(path.parent, image_root=images)) == items_by_split(spec)
    # classnames override
    names = tmp_path / "names.txt"
    names.write_text("Abyssinian cat\nBeagle dog\n")
    assert load_dataset(path, image_root=images, classnames_file=names).classnames == ["Abyssinian cat", "Beagle dog"]


def test_coop_needs_image_root(tmp_path):
    path, _, _ = coop_tree(tmp_path)
    with pytest.raises(CachekitError) as e:
        load_dataset(path)
    assert "--image-root" in err_text(e) and path.name in err_text(e)
    with pytest.raises(CachekitError) as e:
        load_dataset(path.parent)
    assert "--image-root" in err_text(e)


@pytest.mark.parametrize("mutate, expected", [
    (lambda s: s["train"].append(["beagle/img003.png", 1, "pug"]), "conflicting class names for label 1"),
    (lambda s: s["train"].append(["beagle/img003.png", -1, "x"]), "label -1 out of range"),
    (lambda s: s["train"].append(["beagle/img003.png", "1", "beagle"]), "malformed entry"),
    (lambda s: s["val"].append(["../../secret.png", 1, "beagle"]), "../../secret.png"),
    (lambda s: s["val"].append(["/etc/passwd.png", 1, "beagle"]), "/etc/passwd.png"),
    (lambda s: s["test"].extend([[f"beagle/missing{i}.png", 1, "beagle"] for i in range(7)]),
     "7 listed image file(s) missing"),
    (lambda s: s["test"].append(["abyssinian/img000.png", 0, "abyssinian"]), "in both train and test"),
    (lambda s: s.update(train=[], val=[], test=[]), "no images at all"),
])
def test_coop_validation(tmp_path, mutate, expected):
    path, images, split = coop_tree(tmp_path)
    mutate(split)
    path.write_text(json.dumps(split))
    with pytest.raises(CachekitError) as e:
        load_dataset(path, image_root=images)
    msg = err_text(e)
    assert expected in msg
    if "missing" in expected:
        assert "beagle/missing0.png" in msg and "..." in msg
    if "conflicting" in expected or "malformed" in expected:
        assert str(path) in msg


def test_coop_malformed_json_names_line(tmp_path):
    path, images, _ = coop_tree(tmp_path)
    path.write_text('{\n"train": [\n["a.png", 0, "a"],\n]\n}')
    with pytest.raises(CachekitError) as e:
        load_dataset(path, image_root=images)
    assert str(path) in err_text(e) and "line 4" in err_text(e)
    path.write_text('{"images": []}')
    with pytest.raises(CachekitError) as e:
        load_dataset(path, image_root=images)
    assert "not a CoOp split file" in err_text(e)


def test_coop_path_normalised_and_absolute_inside_root(tmp_path):
    path, images, split = coop_tree(tmp_path)
    split["val"] = [["beagle/../beagle/img002.png", 1, "beagle"],
                    [str(images.absolute() / "abyssinian" / "img002.png"), 0, "abyssinian"]]
    path.write_text(json.dumps(split))
    spec = load_dataset(path, image_root=images)
    assert [it.path for it in spec.splits["val"]] == ["beagle/img002.png", "abyssinian/img002.png"]


# --------------------------------------------------------------------------------------------- #
# manifests
# --------------------------------------------------------------------------------------------- #
def write_csv(path: Path, rows, header=("path", "label", "split")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_manifest_names(tmp_path):
    make_folder(tmp_path / "img", {"dog": 3, "cat": 3})
    rows = [("img/dog/img000.png", "dog", "train", "x"), ("img/cat/img000.png", "cat", "TRAIN", "y"),
            ("img/dog/img001.png", "dog", "Val", ""), ("img/cat/img001.png", " cat ", "val", ""),
            ("img/dog/img002.png", "dog", " test", ""), ("img/cat/img002.png", "cat", "test", "")]
    man = write_csv(tmp_path / "m.csv", rows, header=("path", "label", "split", "extra"))
    spec = load_dataset(man)
    assert spec.source_format == "manifest" and spec.root == tmp_path.absolute()
    assert spec.classnames == ["cat", "dog"]
    assert [(it.path, it.label) for it in spec.splits["train"]] == [("img/dog/img000.png", 1), ("img/cat/img000.png", 0)]
    assert [len(spec.splits[s]) for s in D.SPLITS] == [2, 2, 2]


def test_csv_manifest_int_labels_image_root(tmp_path):
    make_folder(tmp_path / "img", {"a": 4, "b": 4})
    rows = [(f"{c}/img{i:03d}.png", lab, "train") for lab, c in enumerate("ab") for i in range(4)]
    (tmp_path / "meta").mkdir()
    man = write_csv(tmp_path / "meta" / "m.csv", rows)
    spec = load_dataset(man, image_root=tmp_path / "img")
    assert spec.classnames == ["class_0", "class_1"]
    assert spec.root == (tmp_path / "img").absolute()
    assert spec.origin["test"].startswith("carved from train")
    names = tmp_path / "names.txt"
    names.write_text("n01440764 tench\nn01443537 goldfish\n")  # ImageNet style lines
    assert load_dataset(man, image_root=tmp_path / "img", classnames_file=names).classnames == ["tench", "goldfish"]
    # without --image-root the paths are relative to the manifest's folder: all missing
    with pytest.raises(CachekitError) as e:
        load_dataset(man)
    assert "8 listed image file(s) missing" in err_text(e) and "a/img000.png" in err_text(e)


def test_jsonl_manifest(tmp_path):
    make_folder(tmp_path, {"x": 2, "y": 2})
    lines = [{"path": "x/img000.png", "label": 1, "split": "train"},
             {"path": "y/img000.png", "label": 0, "split": "train", "note": "extra keys are fine"},
             "",
             {"path": "x/img001.png", "label": 1, "split": "val"},
             {"path": "y/img001.png", "label": 0, "split": "val"}]
    man = tmp_path / "m.jsonl"
    man.write_text("\n".join(json.dumps(x) if x else "" for x in lines) + "\n")
    names = tmp_path / "names.txt"
    names.write_text("yak\n\nxerus\n")
    spec = load_dataset(man, classnames_file=names)
    assert spec.classnames == ["yak", "xerus"]
    assert spec.val_is_test and spec.splits["test"] == spec.splits["val"]
    assert spec.splits["train"] == [Item("x/img000.png", 1), Item("y/img000.png", 0)]


@pytest.mark.parametrize("kind, body, expected, with_names", [
    ("csv", "path,label,split\nx/img000.png,x,train\nx/img001.png,x,training\n", "unknown split \"training\" in {m} line 3", False),
    ("csv", "path,label\nx/img000.png,x\n", "manifest {m} line 1: header has no 'split' column", False),
    ("csv", "path,label,split\nx/img000.png,x,train\nx/img001.png\n", "malformed CSV in {m} line 3", False),
    ("csv", "path,label,split\nx/img000.png,x,train\n\"x/img001.png,x,train\n", "malformed CSV in {m}", False),
    ("csv", "path,label,split\nx/img000.png,0,train\nx/img001.png,5,train\n",
     "label 5 out of range in {m} line 3", True),
    ("csv", "path,label,split\nx/img000.png,-1,train\n", "label -1 out of range in {m} line 2", False),
    ("csv", "path,label,split\n../x/img000.png,x,train\n", "../x/img000.png", False),
    ("csv", "path,label,split\nx/img000.png,x,train\nx/img000.png,x,train\n", "duplicate train entry x/img000.png in {m} lines 2 and 3", False),
    ("csv", "path,label,split\n", "no images at all in manifest {m}", False),
    ("csv", "path,label,split\nx/img000.png,x,val\n", "has no train images", False),
    ("csv", "path,label,split\nx/img000.png,a,train\nx/img001.png,b,train\n", "classnames file {n} has 3 names but CSV manifest {m} has 2 classes", True),
    ("jsonl", '{"path": "x/img000.png", "label": "x", "split": "train"}\n{"path": "x/img001.png", "label": \n',
     "malformed JSON in {m} line 2", False),
    ("jsonl", '{"path": "x/img000.png", "label": "x"}\n', "malformed JSONL in {m} line 1", False),
    ("jsonl", '{"path": "x/img000.png", "label": "x", "split": "train"}\n{"path": "x/img001.png", "label": 1, "split": "train"}\n',
     "in {m} line 2 is an integer", False),
    ("jsonl", '{"path": "x/img000.png", "label": "x", "split": 3}\n', "unknown split 3 in {m} line 1", False),
])
def test_manifest_validation(tmp_path, kind, body, expected, with_names):
    make_folder(tmp_path, {"x": 2})
    names = tmp_path / "names.txt"
    names.write_text("only\nthree\nnames\n")
    man = tmp_path / f"m.{kind}"
    man.write_text(body)
    with pytest.raises(CachekitError) as e:
        load_dataset(man, classnames_file=names if with_names else None)
    assert expected.format(m=man, n=names) in err_text(e)


def test_manifest_path_escape_and_absolute(tmp_path):
    make_folder(tmp_path / "root", {"x": 2})
    write_image(tmp_path / "outside.png")
    man = write_csv(tmp_path / "root" / "m.csv", [(str(tmp_path / "outside.png"), "x", "train")])
    with pytest.raises(CachekitError) as e:
        load_dataset(man)
    assert str(tmp_path / "outside.png") in err_text(e) and "outside the image root" in err_text(e)
    man = write_csv(tmp_path / "root" / "m.csv", [("x/../../outside.png", "x", "train")])
    with pytest.raises(CachekitError) as e:
        load_dataset(man)
    assert "x/../../outside.png" in err_text(e) and "escapes the image root" in err_text(e)
    man = write_csv(tmp_path / "root" / "m.csv", [(str(tmp_path / "root" / "x" / "img000.png"), "x", "train"),
                                                  ("./x/img001.png", "x", "test")])
    spec = load_dataset(man)
    assert spec.splits["train"] == [Item("x/img000.png", 0)] and spec.splits["test"] == [Item("x/img001.png", 0)]


def test_classnames_file_errors(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 3, "b": 3})
    names = tmp_path / "names.txt"
    names.write_text("one\n")
    with pytest.raises(CachekitError) as e:
        load_dataset(root, classnames_file=names)
    assert str(names) in err_text(e) and "1 names" in err_text(e) and "2 classes" in err_text(e)
    names.write_text("one\none\n")
    with pytest.raises(CachekitError) as e:
        load_dataset(root, classnames_file=names)
    assert "duplicate class name 'one'" in err_text(e) and str(names) in err_text(e)
    with pytest.raises(CachekitError) as e:
        load_dataset(root, classnames_file=tmp_path / "absent.txt")
    assert "absent.txt" in err_text(e)
    names.write_text("alpha_1\nbeta\n")
    assert load_dataset(root, classnames_file=names).classnames == ["alpha_1", "beta"]


# --------------------------------------------------------------------------------------------- #
# fingerprint and describe
# --------------------------------------------------------------------------------------------- #
def test_fingerprint(tmp_path):
    make_folder(tmp_path / "img", {"a": 3, "b": 3})
    rows = [(f"{c}/img{i:03d}.png", c, "train") for c in "ab" for i in range(3)]
    man = write_csv(tmp_path / "m.csv", rows)
    kw = dict(image_root=tmp_path / "img")
    fp = load_dataset(man, **kw).fingerprint()
    assert len(fp) == 64 and fp == load_dataset(man, **kw).fingerprint()
    # a file's size changes
    target = tmp_path / "img" / "a" / "img000.png"
    write_image(target, size=(9, 6), seed=123)
    fp2 = load_dataset(man, **kw).fingerprint()
    assert fp2 != fp
    # a label changes
    rows[1] = (rows[1][0], "b", "train")
    write_csv(man, rows)
    fp3 = load_dataset(man, **kw).fingerprint()
    assert fp3 not in (fp, fp2)
    # class names change
    names = tmp_path / "n.txt"
    names.write_text("A\nB\n")
    assert load_dataset(man, classnames_file=names, **kw).fingerprint() != fp3
    # independent re-computation of the documented recipe
    spec = load_dataset(man, **kw)
    h = hashlib.sha256()
    for s, p, lab in sorted((s, it.path, it.label) for s in D.SPLITS for it in spec.splits[s]):
        h.update(json.dumps([s, p, lab, (spec.root / p).stat().st_size]).encode() + b"\n")
    h.update(json.dumps(spec.classnames).encode())
    assert spec.fingerprint() == h.hexdigest()


# --------------------------------------------------------------------------------------------- #
# few-shot sampling
# --------------------------------------------------------------------------------------------- #
def reference_fewshot(items, num_classes, k, seed):
    """Independent re-implementation of the documented CoOp/Dassl recipe, on the items themselves."""
    rng = random.Random(seed)
    out, rep = [], []
    for c in range(num_classes):
        pool = [it for it in items if it.label == c]
        if len(pool) >= k:
            out += rng.sample(pool, k)
        else:
            out += rng.choices(pool, k=k)
            rep.append(c)
    return out, rep


def make_items(counts, shuffle_seed=0):
    items = [Item(f"c{c}/{i}.png", c) for c, n in enumerate(counts) for i in range(n)]
    random.Random(shuffle_seed).shuffle(items)
    return items


def test_sample_fewshot_counts_grouping_determinism():
    items = make_items([10, 7, 16, 3])
    fs = sample_fewshot(items, 4, 4, seed=1)
    assert fs.k == 4 and fs.seed == 1 and fs.indices.dtype == np.int64 and fs.indices.shape == (16,)
    labels = [items[i].label for i in fs.indices]
    assert labels == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert fs.labels.tolist() == labels
    assert fs.with_replacement == [3]
    for c in range(3):  # without replacement: distinct
        assert len(set(fs.indices[4 * c:4 * c + 4].tolist())) == 4
    assert np.array_equal(fs.indices, sample_fewshot(items, 4, 4, seed=1).indices)
    assert not np.array_equal(fs.indices, sample_fewshot(items, 4, 4, seed=2).indices)
    ref, rep = reference_fewshot(items, 4, 4, 1)
    assert [items[i] for i in fs.indices] == ref and rep == fs.with_replacement


def test_sample_fewshot_errors():
    with pytest.raises(CachekitError) as e:
        sample_fewshot(make_items([3, 0, 2]), 3, 1, seed=1)
    assert "class 1 has no training images" in err_text(e)
    with pytest.raises(CachekitError) as e:
        sample_fewshot(make_items([3, 2]), 1, 1, seed=1)
    assert "outside 0..0" in err_text(e)
    with pytest.raises(CachekitError):
        sample_fewshot(make_items([3]), 1, 0, seed=1)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 12), min_size=1, max_size=6), k=st.integers(1, 9),
       seed=st.integers(0, 2**32), shuffle=st.integers(0, 100))
def test_property_sampling_exactly_k(counts, k, seed, shuffle):
    items = make_items(counts, shuffle)
    fs = sample_fewshot(items, len(counts), k, seed)
    assert len(fs.indices) == k * len(counts)
    assert [items[i].label for i in fs.indices] == [c for c in range(len(counts)) for _ in range(k)]
    assert fs.with_replacement == [c for c, n in enumerate(counts) if n < k]
    ref, _ = reference_fewshot(items, len(counts), k, seed)
    assert [items[i] for i in fs.indices] == ref


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=5),
       vf=st.sampled_from([0.0, 0.1, 0.2, 0.25]), tf=st.sampled_from([0.0, 0.3, 0.5]), seed=st.integers(0, 99))
def test_property_carving_stratified(counts, vf, tf, seed):
    items = make_items(counts, seed)
    keys = [f"c{c}" for c in range(len(counts))]
    rest, carved = D._carve(items, keys, seed, {"test": tf, "val": vf})
    again = D._carve(items, keys, seed, {"test": tf, "val": vf})
    assert (rest, carved) == again
    assert sorted(rest + carved["val"] + carved["test"], key=items.index) == items
    for split, part in (("train", rest), ("val", carved["val"]), ("test", carved["test"])):
        assert part == sorted(part, key=items.index)  # dataset order kept
    for c, n in enumerate(counts):
        nv = sum(it.label == c for it in carved["val"])
        nt = sum(it.label == c for it in carved["test"])
        assert (nt, nv) == expected_carve_counts(n, tf, vf)
        assert n - nv - nt >= 1
        if n >= 3:
            assert nv >= (1 if vf else 0) and nt >= (1 if tf else 0)


def expected_carve_counts(n, tf, vf):
    """The documented rule: round half up; >= 1 each (fraction > 0) when n >= 3; >= 1 left for train."""
    t, v = math.floor(n * tf + 0.5), math.floor(n * vf + 0.5)
    if n >= 3:
        t, v = (max(1, t) if tf else t), (max(1, v) if vf else v)
    while t + v > n - 1:
        if v >= t:
            v -= 1
        else:
            t -= 1
    return t, v


# --------------------------------------------------------------------------------------------- #
# property test: manifests with random class/split mixes
# --------------------------------------------------------------------------------------------- #
POOL_SIZE = 12


@pytest.fixture(scope="module")
def image_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    for i in range(POOL_SIZE):
        write_image(root / f"p{i}.png", seed=i)
    return root


CLASS_WORDS = ["zebra", "ant", "mole", "b", "Ant"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(assign=st.lists(st.tuples(st.integers(0, len(CLASS_WORDS) - 1), st.sampled_from(D.SPLITS),
                                 st.sampled_from(["lower", "upper", "title"])),
                       min_size=1, max_size=POOL_SIZE),
       fmt=st.sampled_from(["csv", "jsonl"]), order_seed=st.integers(0, 1000))
def test_property_manifest_parses_consistently(image_pool, assign, fmt, order_seed):
    rows = [(f"p{i}.png", CLASS_WORDS[c], getattr(split, case)()) for i, (c, split, case) in enumerate(assign)]
    random.Random(order_seed).shuffle(rows)
    with tempfile.TemporaryDirectory() as tmp:
        man = Path(tmp) / f"m.{fmt}"
        if fmt == "csv":
            write_csv(man, rows)
        else:
            man.write_text("".join(json.dumps({"path": p, "label": lab, "split": s}) + "\n" for p, lab, s in rows))
        has = {s: any(r[2].lower() == s for r in rows) for s in D.SPLITS}
        if not has["train"]:
            with pytest.raises(CachekitError, match="no train images"):
                load_dataset(man, image_root=image_pool)
            return
        if {r[1] for r in rows} != {r[1] for r in rows if r[2].lower() == "train"}:
            # a class without train images: refused before anything else (few-shot sets come from train)
            with pytest.raises(CachekitError, match="have no train images"):
                load_dataset(man, image_root=image_pool)
            return
        spec = load_dataset(man, image_root=image_pool)
    used = sorted({r[1] for r in rows})
    assert spec.classnames == used
    label_of = {p: used.index(lab) for p, lab, _ in rows}
    for s in D.SPLITS:
        assert all(label_of[it.path] == it.label for it in spec.splits[s])
    given_rows = {s: [r[0] for r in rows if r[2].lower() == s] for s in D.SPLITS}
    if has["val"] and has["test"]:
        for s in D.SPLITS:
            assert [it.path for it in spec.splits[s]] == given_rows[s]
    elif has["val"]:
        assert spec.val_is_test and spec.splits["test"] == spec.splits["val"]
        assert [it.path for it in spec.splits["val"]] == given_rows["val"]
    else:
        assert not spec.val_is_test
        carved = [it.path for it in spec.splits["train"] + spec.splits["val"]]
        if has["test"]:
            assert [it.path for it in spec.splits["test"]] == given_rows["test"]
        else:
            carved += [it.path for it in spec.splits["test"]]
        assert sorted(carved) == sorted(given_rows["train"])
    desc = spec.describe()
    assert sum(desc["splits"]["train"]["per_class"].values()) == len(spec.splits["train"])


# --------------------------------------------------------------------------------------------- #
# image loading
# --------------------------------------------------------------------------------------------- #
def _gradient16(width=256, height=3):
    return np.tile((np.arange(width) * 257).astype(np.uint16), (height, 1))


def _mode_images(tmp: Path) -> dict[str, Path]:
    out = {}
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    for mode in ("L", "1", "CMYK", "RGBA", "LA"):
        img = rgb.convert(mode)
        out[mode] = tmp / f"{mode}.{'tif' if mode == 'CMYK' else 'png'}"
        img.save(out[mode])
    rgb.convert("CMYK").save(tmp / "cmyk.jpg")
    out["CMYK-jpeg"] = tmp / "cmyk.jpg"
    rgb.convert("P").save(tmp / "p.png")
    out["P"] = tmp / "p.png"
    pt = rgb.convert("P")
    pt.info["transparency"] = 0
    pt.save(tmp / "pt.png", transparency=0)
    out["P-transparency"] = tmp / "pt.png"
    rgb.convert("P").save(tmp / "p.gif")
    out["GIF"] = tmp / "p.gif"
    rgb.save(tmp / "x.webp")
    out["WEBP"] = tmp / "x.webp"
    rgb.save(tmp / "x.bmp")
    out["BMP"] = tmp / "x.bmp"
    return out


def test_load_image_modes(tmp_path):
    paths = _mode_images(tmp_path)
    for name, path in paths.items():
        assert Image.open(path).size == (7, 5)
        img = D.load_image(path)
        assert img.mode == "RGB" and img.size == (7, 5), name
        assert D.check_image(path) is None
    tiny = tmp_path / "tiny.png"
    Image.new("L", (1, 1), 200).save(tiny)
    assert D.load_image(tiny).getpixel((0, 0)) == (200, 200, 200)


def test_alpha_composited_on_white(tmp_path):
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (10, 20, 30, 255))
    img.save(tmp_path / "a.png")
    out = D.load_image(tmp_path / "a.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 20, 30)
    la = Image.new("LA", (1, 1), (0, 128))
    la.save(tmp_path / "la.png")
    assert D.load_image(tmp_path / "la.png").getpixel((0, 0)) == (127, 127, 127)
    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 50, 60, 70] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "pt.png", transparency=0)
    out = D.load_image(tmp_path / "pt.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (50, 60, 70)


def test_high_bit_depth_keeps_gradient(tmp_path):
    grad = _gradient16()
    Image.fromarray(grad).save(tmp_path / "g16.png")  # I;16
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    Image.frombytes("I;16B", (256, 3), grad.astype(">u2").tobytes()).save(tmp_path / "g16b.tif")
    assert Image.open(tmp_path / "g16b.tif").mode == "I;16B"
    Image.fromarray(grad.astype(np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    Image.fromarray((grad / 65535.0).astype(np.float32)).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    for name in ("g16.png", "g16b.tif", "i32.tif", "f.tif"):
        out = np.asarray(D.load_image(tmp_path / name))
        assert out.shape == (3, 256, 3), name
        assert np.array_equal(out[1, :, 0], np.arange(256)), name
        assert (out[..., 0] == out[..., 2]).all()
    # signed / out-of-range values are stretched min..max, never saturated
    Image.fromarray((np.arange(256, dtype=np.int32) * 1000 - 50_000)[None].repeat(2, 0)).save(tmp_path / "s.tif")
    out = np.asarray(D.load_image(tmp_path / "s.tif"))[0, :, 0]
    assert out[0] == 0 and out[-1] == 255 and len(np.unique(out)) == 256
    # float in [0, 255] is kept; NaN does not break loading
    f = np.linspace(0, 255, 256, dtype=np.float32)[None].repeat(2, 0)
    f[1, 0] = np.nan
    Image.fromarray(f).save(tmp_path / "f255.tif")
    out = np.asarray(D.load_image(tmp_path / "f255.tif"))
    assert np.array_equal(out[0, :, 0], np.arange(256)) and out[1, 0, 0] == 0


def test_bad_images_raise(tmp_path):
    good = tmp_path / "good.jpg"
    write_image(good, size=(64, 48), fmt="JPEG")
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    write_image(tmp_path / "good.png", size=(64, 48))
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "text.png").write_text("this is not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    corrupt = bytearray(png)
    corrupt[len(png) // 2:len(png) // 2 + 40] = os.urandom(40)
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    (tmp_path / "folder.png").mkdir()
    for name in ("trunc.jpg", "trunc.png", "text.png", "empty.jpg", "corrupt.png", "missing.png", "folder.png"):
        path = tmp_path / name
        with pytest.raises(BadImageError) as e:
            D.load_image(path)
        assert e.value.path == str(path) and str(path) in str(e.value), name
        assert "\n" not in str(e.value)
        reason = D.check_image(path)
        assert reason and "\n" not in reason, name
    assert "truncated" in D.check_image(tmp_path / "trunc.jpg")
    assert "not an image" in D.check_image(tmp_path / "text.png")
    assert D.check_image(tmp_path / "missing.png") == "file not found"


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= D.MAX_PIXELS
    write_image(tmp_path / "big.png", size=(40, 30))
    assert D.load_image(tmp_path / "big.png").size == (40, 30)
    monkeypatch.setattr(D, "MAX_PIXELS", 1000)
    with pytest.raises(BadImageError) as e:
        D.load_image(tmp_path / "big.png")
    assert "40x30" in str(e.value) and "decompression-bomb limit" in str(e.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow's own error (above twice its limit)
    monkeypatch.setattr(D, "MAX_PIXELS", 10**9)
    with pytest.raises(BadImageError, match="decompression-bomb"):
        D.load_image(tmp_path / "big.png")


def test_large_image_above_pillow_default_loads(tmp_path):
    # 9600 x 9600 = 92 MP is above Pillow's default 89 MP warning limit
    Image.new("1", (9600, 9600), 1).save(tmp_path / "huge.png")
    assert D.check_image(tmp_path / "huge.png") is None


# --------------------------------------------------------------------------------------------- #
# augmentation
# --------------------------------------------------------------------------------------------- #
@pytest.fixture
def photo():
    arr = np.random.default_rng(3).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def test_view_seed_is_stable():
    expected = int.from_bytes(hashlib.sha256(b"cachekit-view\x001\x00cat/1.jpg\x003").digest()[:8], "big") & (2**63 - 1)
    assert view_seed(1, "cat/1.jpg", 3) == expected
    assert view_seed(1, "cat/1.jpg", 4) != expected and view_seed(2, "cat/1.jpg", 3) != expected


def test_augmented_view_deterministic_and_global_rng_untouched(photo):
    aug = AugmentedView(64, OPENAI_MEAN, OPENAI_STD)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    a = aug(photo, 1, "cat/1.jpg", 0)
    b = aug(photo, 1, "cat/1.jpg", 0)
    others = [aug(photo, 1, "cat/1.jpg", v) for v in range(1, 5)] + [aug(photo, 2, "cat/1.jpg", 0),
                                                                      aug(photo, 1, "cat/2.jpg", 0)]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), np_state))
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert all(not torch.equal(a, o) for o in others)
    json.dumps(aug.params())
    assert aug.params()["scale"] == [0.5, 1.0] and aug.params()["flip"] == 0.5


def test_augmented_view_matches_torchvision_pipeline(photo):
    """Same seed on the global RNG -> torchvision's RandomResizedCrop + flip give the same tensor."""
    import torchvision.transforms as T
    aug = AugmentedView(48, OPENAI_MEAN, OPENAI_STD, scale=(0.5, 1.0))
    tv = T.Compose([T.RandomResizedCrop(48, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(0.5), T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    state = torch.get_rng_state()
    try:
        flips = set()
        for view in range(12):
            torch.manual_seed(view_seed(5, "k", view))
            expected = tv(photo)
            assert torch.equal(aug(photo, 5, "k", view), expected)
            g = aug.generator(5, "k", view)
            crop_params(90, 120, (0.5, 1.0), (3 / 4, 4 / 3), g)
            flips.add(torch.rand(1, generator=g).item() < 0.5)
        assert flips == {True, False}
        # extreme aspect ratio exercises the centre-crop fallback
        strip = Image.new("RGB", (400, 4), (9, 9, 9))
        for view in range(3):
            torch.manual_seed(view_seed(5, "strip", view))
            assert torch.equal(aug(strip, 5, "strip", view), tv(strip))
    finally:
        torch.set_rng_state(state)


@pytest.mark.parametrize("image_size, size", [(224, (300, 200)), (64, (31, 50)), (64, (64, 64)), ((64, 48), (100, 90))])
def test_plain_transform_equals_open_clip(image_size, size):
    open_clip = pytest.importorskip("open_clip")
    arr = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    ours = plain_transform(image_size, OPENAI_MEAN, OPENAI_STD)(img)
    theirs = open_clip.image_transform(image_size, is_train=False)(img)
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    if not isinstance(image_size, tuple):
        ours = plain_transform(image_size, OPENAI_MEAN, OPENAI_STD, interpolation="bilinear")(img)
        theirs = open_clip.image_transform(image_size, is_train=False, interpolation="bilinear")(img)
        assert torch.equal(ours, theirs)
    json.dumps(plain_transform(image_size, OPENAI_MEAN, OPENAI_STD).params())
