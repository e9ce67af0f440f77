"""Every field of the cache schema, damaged in turn (value edited, deleted, dtype/type changed, JSON broken):
`verify` names it, and `info` / opening the cache for eval either refuse with a one-line error or still
give the right answer. The cases come from cachekit.schema.FIELDS, so a new field is covered by itself."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cachekit import schema as S
from cachekit.cache import Cache
from cachekit.cli.main import cli
from cachekit.errors import CachekitError
from cachekit.extraction import extract
from cachekit.info import describe
from conftest import extract_opts, make_tree

K, SEED, PARAM = 2, 1, "c_proj.weight"


def _concrete(pattern: str, i: int) -> str:
    """One instance of a field's path: few-shot set K=2 seed 1, parameter c_proj.weight, and the splits in
    turn (case i of the field gets split i mod 3, shifted per field, so every split meets every mutation)."""
    p = pattern.replace("{K}", str(K)).replace("{seed}", str(SEED)).replace("{param}", PARAM)
    return p.replace("{split}", S.SPLITS[i % len(S.SPLITS)])


def _cases():
    out = []
    for n, fld in enumerate(S.FIELDS):
        if fld.kind == S.GROUP:
            muts = ["delete", "retype"]
        elif fld.kind == S.DATASET:
            muts = ["edit", "delete", "retype"]
        else:
            muts = ["edit", "delete", "retype"] + (["badjson"] if fld.json else [])
        for i, m in enumerate(muts):
            key = _concrete(fld.key, n + i)
            out.append(pytest.param(fld, key, m, id=f"{key}:{m}"))
    return out


CASES = _cases()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny attention-pooling check in verify runs faster on one thread, and the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small float16 cache with every kind of content: a separate test split, one unreadable val image
    recorded in /bad_images, few-shot sets K=1,2 x seed 1; and its right answers."""
    d = tmp_path_factory.mktemp("mut")
    root = d / "data"
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        make_tree(root / split, classes=2, per_class=n, size=(24, 20), seed=len(split))
    (root / "val" / "class_1" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = d / "base.h5"
    extract(extract_opts(root, path, shots=(1, K), seeds=(SEED,), views=1, batch_size=8, dense_dtype="float16",
                         skip_bad=True))
    with Cache(path) as c:
        answers = _answers(c)
    info = _info(path)
    assert info["bad_images"] == 1 and not info["val_is_test"]
    return path, answers, info


def _answers(c: Cache) -> dict:
    out = {f"labels/{s}": c.labels(s) for s in S.SPLITS}
    for k, s in c.fewshot_names():
        F, y = c.train_keys(k, s)
        out[f"keys/{k}/{s}"], out[f"keylabels/{k}/{s}"] = F, y
    return out


def _info(path):
    res = CliRunner().invoke(cli, ["info", str(path), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    d.pop("path"), d.pop("file_bytes")
    return d


# --------------------------------------------------------------------------------------------- #
# mutations
# --------------------------------------------------------------------------------------------- #
def _changed_dtype(dt):
    if h5py.check_string_dtype(dt) is not None:
        return None  # strings: stored as fixed-length bytes instead
    return {"f": np.float64 if dt == np.float32 else np.float32, "i": np.int32, "u": np.int32}[dt.kind]


def _mutate_dataset(f, key, how):
    ds = f[key]
    if how == "delete":
        del f[key]
        return
    data, attrs = ds[()], dict(ds.attrs)
    if how == "edit":
        if h5py.check_string_dtype(ds.dtype) is not None:
            vals = S.strings(data)
            assert vals, f"{key} is empty in the base cache: nothing to edit"
            vals[0] += "x"
            ds[...] = np.asarray(vals, dtype=object).reshape(ds.shape)
        elif ds.ndim == 0:
            ds[()] = data + 1
        else:
            flat = data.reshape(-1).copy()
            assert flat.size, f"{key} is empty in the base cache: nothing to edit"
            # integers stay in range (labels, rows): only the checksum tells
            flat[0] = (flat[0] + 1) % max(2, int(flat.max()) + 1) if ds.dtype.kind in "iu" else flat[0] + 1
            ds[...] = flat.reshape(ds.shape)
        return
    assert how == "retype"
    new = _changed_dtype(ds.dtype)
    del f[key]
    if new is None:
        vals = [v.encode() for v in S.strings(data)]
        nd = f.create_dataset(key, data=np.asarray(vals, dtype=f"S{max(1, max(map(len, vals), default=1))}"))
    else:
        nd = f.create_dataset(key, data=np.asarray(data).astype(new))
    for k, v in attrs.items():
        nd.attrs[k] = v


def _mutate_group(f, key, how):
    del f[key]
    if how == "retype":
        f.create_dataset(key, data=np.arange(3))


def _mutate_attr(f, fld, key, how):
    path, name = key.split("@")
    obj = f[path or "/"]
    raw = obj.attrs[name]
    if how == "delete":
        del obj.attrs[name]
    elif how == "badjson":
        obj.attrs[name] = raw[:-1] + ",}" if len(raw) > 1 else "{"
    elif how == "retype":
        obj.attrs[name] = 7 if fld.dtype == "str" else (str(int(raw)) if fld.dtype == "int" else 1)
    elif fld.json == "object":
        obj.attrs[name] = json.dumps({**json.loads(raw), "/@zz_mutated": "0"})
    elif fld.json == "list[int]":
        v = json.loads(raw)
        obj.attrs[name] = json.dumps(v + [max(v, default=0) + 1])
    elif fld.dtype == "int":
        obj.attrs[name] = raw + 1
    elif fld.dtype == "bool":
        obj.attrs[name] = not bool(raw)
    elif fld.name == S.CHECKSUM:
        obj.attrs[name] = ("0" if raw[0] != "0" else "1") + raw[1:]
    else:
        obj.attrs[name] = raw + "x"


def _mutate(path, fld, key, how):
    with h5py.File(path, "r+") as f:
        if fld.kind == S.ATTRIBUTE:
            _mutate_attr(f, fld, key, how)
        elif fld.kind == S.GROUP:
            _mutate_group(f, key, how)
        else:
            _mutate_dataset(f, key, how)


def _one_line_error(res, *needles):
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in res.output, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------- #
# the test
# --------------------------------------------------------------------------------------------- #
def test_cases_cover_every_field():
    covered = {c.values[0].key for c in CASES}
    assert covered == {f.key for f in S.FIELDS}
    split_cases = {(c.values[0].key, c.values[1].split("/")[2], c.values[2]) for c in CASES if "{split}" in c.values[0].key}
    for s in S.SPLITS:
        for how in ("edit", "delete", "retype"):
            assert any(k[1:] == (s, how) for k in split_cases), (s, how)
    assert len(CASES) == sum(2 if f.kind == S.GROUP else 3 + bool(f.json) for f in S.FIELDS) > 200


@pytest.mark.parametrize("fld,key,how", CASES)
def test_damaged_field(base, tmp_path, fld, key, how):
    path, answers, info = base
    p = tmp_path / "c.h5"
    shutil.copy(path, p)
    _mutate(p, fld, key, how)

    # verify names the field (and never raises)
    res = CliRunner().invoke(cli, ["verify", str(p), "--json", "--sample", "4"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    rep = json.loads(res.stdout)
    assert not rep["ok"]
    problems = [p for c in rep["checks"] if not c["ok"] for p in c["problems"]]
    assert all(c["ok"] or c["problems"] for c in rep["checks"])  # every failed check lists its problems
    assert not [c for c in rep["checks"] if "could not run" in c["detail"]]  # a check that broke on the damage
    assert any(key in p for p in problems), f"verify does not name {key}: {problems}"

    # Opening for info and eval (what `cachekit info` and `cachekit eval` do; the CLI turns a CachekitError
    # into its one line, see test_damaged_attribute_is_one_line_everywhere): a one-line CachekitError, or
    # the same answers.
    try:
        c = Cache(p)
    except CachekitError as exc:
        _one_line(exc)
        return
    with c:
        try:
            d = json.loads(json.dumps(describe(c), default=str))
        except CachekitError as exc:
            _one_line(exc)
        else:
            d.pop("path"), d.pop("file_bytes")
            assert d == info
        try:
            got = _answers(c)
        except CachekitError as exc:
            _one_line(exc)
        else:
            assert got.keys() == answers.keys()
            for name, want in answers.items():
                assert torch.equal(got[name], want), name


def _one_line(exc: CachekitError):
    msg = str(exc)
    assert "\n" not in msg and "; fix: " in msg, msg


# --------------------------------------------------------------------------------------------- #
# the cases the issue names, with their messages
# --------------------------------------------------------------------------------------------- #
def _damaged_copy(base, tmp_path, edit):
    p = tmp_path / "c.h5"
    shutil.copy(base[0], p)
    with h5py.File(p, "r+") as f:
        edit(f)
    return p


@pytest.mark.parametrize("edit,needle", [
    (lambda f: f.attrs.__setitem__(S.Attr.IDENTITY, "{not json"), "/@identity: is not valid JSON"),
    (lambda f: f.attrs.__delitem__(S.Attr.VIEWS), "/@views: attribute is missing"),
    (lambda f: f.attrs.__setitem__(S.Attr.SHOTS, "1,2"), "/@shots: is not valid JSON"),
    (lambda f: f.attrs.__setitem__(S.Attr.SHOTS, 3), "/@shots: is int 3, must be JSON list[int]"),
    (lambda f: f.attrs.__setitem__(S.Attr.CREATED, "2001-01-01T00:00:00+00:00"),
     "/@created: value '2001-01-01T00:00:00+00:00' differs from the one recorded in /@attrs_sha256"),
])
def test_damaged_attribute_is_one_line_everywhere(base, tmp_path, edit, needle):
    p = _damaged_copy(base, tmp_path, edit)
    for cmd in (["info", str(p)], ["eval", str(p), "--method", "zeroshot"]):
        line = _one_line_error(CliRunner().invoke(cli, cmd), needle, "cachekit extract --overwrite",
                               "cachekit verify")
        assert line.startswith(f"Error: cache {p} is damaged: ")
    with pytest.raises(CachekitError, match="is damaged"):
        Cache(p)
    import cachekit

    with pytest.raises(CachekitError, match="is damaged"):
        cachekit.open_cache(p)
    rep = json.loads(CliRunner().invoke(cli, ["verify", str(p), "--json"]).stdout)
    assert [c["check"] for c in rep["checks"] if not c["ok"]] == ["attributes"]
    assert needle in rep["checks"][1]["detail"]


def test_edited_labels_are_caught(base, tmp_path):
    """Labels edited in range (0 <-> 1): only the checksum can tell, and it does; readers refuse them."""
    def edit(f):
        lab = f["splits/val/labels"][()]
        f["splits/val/labels"][0] = 1 - lab[0]
    p = _damaged_copy(base, tmp_path, edit)
    rep = json.loads(CliRunner().invoke(cli, ["verify", str(p), "--json", "--quick"]).stdout)
    bad = {c["check"]: c["detail"] for c in rep["checks"] if not c["ok"]}
    assert list(bad) == ["checksums"]
    assert bad["checksums"].startswith("/splits/val/labels: data does not match /splits/val/labels@sha256")
    with Cache(p) as c:
        with pytest.raises(CachekitError, match="/splits/val/labels does not match /splits/val/labels@sha256"):
            c.labels("val")
        assert torch.equal(c.labels("test"), base[1]["labels/test"])  # the rest is readable


def test_quick_says_what_it_skips(base):
    res = CliRunner().invoke(cli, ["verify", str(base[0]), "--quick"])
    assert res.exit_code == 0, res.output
    lines = {ln.split(":", 1)[0]: ln for ln in res.stdout.splitlines()}
    large = ", ".join(S.split_path(s, d) for d in (S.DENSE, S.POOLED) for s in S.SPLITS)
    for check in ("ok   checksums", "ok   finite"):
        assert lines[check].endswith(f"; skipped (--quick): {large}"), lines[check]
    # classnames 1; 3 splits x (paths, labels, dense, pooled); source_index 1; 2 few-shot sets; text 3;
    # logit_scale 1; attnpool 9; bad_images 3
    n = 1 + 12 + 1 + 2 + 3 + 1 + 9 + 3
    assert f"all {n - 6} stored sha256 match" in lines["ok   checksums"]  # every dataset but the 6 large ones
    rep = json.loads(CliRunner().invoke(cli, ["verify", str(base[0]), "--json"]).stdout)
    assert rep["ok"] and f"all {n} stored sha256 match" in rep["checks"][3]["detail"]
    assert not any(c.get("skipped") for c in rep["checks"])


def test_other_schema_version_is_refused_with_rebuild(base, tmp_path):
    p = _damaged_copy(base, tmp_path, lambda f: f.attrs.__setitem__(S.Attr.SCHEMA_VERSION, 1))
    line = _one_line_error(CliRunner().invoke(cli, ["info", str(p)]),
                           "has cache schema version 1, this cachekit reads 2", "rebuild")
    assert "Traceback" not in line
