"""Property-based tests: whatever a user feeds the CLI (manifests, grid files, option values), the outcome
is success or a one-line `Error: ...` with exit code 1 or 2, never a traceback, and a failed extract
leaves no cache file.

Example counts are modest and derandomized (the same examples every run). Strategies are biased toward
near-valid inputs (a valid manifest of the test tree with a few mutations, grids of the fast methods with
mostly well-typed candidates) so that a fair share of examples run all the way; the `*_any_values`
properties feed arbitrary JSON to known parameters.
"""
from __future__ import annotations

import csv
import io
import itertools
import json

import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from harness import reliability as R

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def base(tree, tiny_cache, tmp_path_factory):
    return R.Base(tree, tiny_cache, tmp_path_factory.mktemp("fuzz"))


_counter = itertools.count()


def fresh(base):
    d = base.work / f"ex{next(_counter):05d}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def assert_clean(r: R.CliResult, out=None):
    """Success, or one `Error:` line with exit 1/2; no traceback; no cache left by a failed extract."""
    assert r.exc is None, f"traceback: {r.exc}"
    assert "Traceback" not in r.stdout + r.stderr
    event("success" if r.code == 0 else f"error exit {r.code}")
    if r.code == 0:
        return
    problems = R.one_line_error_problems(r)
    assert not problems, problems
    if out is not None:
        assert not out.exists(), f"{out} left behind by a failed extract"
        assert not out.with_name(out.name + ".tmp").exists()


# --------------------------------------------------------------------------------------------- #
# manifests: a valid CSV/JSONL of the test tree, mutated; or raw garbage
# --------------------------------------------------------------------------------------------- #
ODD = st.sampled_from(["", " ", "../x.png", "/etc/hostname", "class_0", "class_9", "0", "-1", "7", "train", "val",
                       "test", " TEST ", "validation", "class_0/img_00.png", "class_1/img_03.png", "a,b", '"',
                       "x\ny", "ü", "class_0/../class_1/img_01.png", "./class_2/img_02.png"])
CELL = st.one_of(ODD, st.text(max_size=10))
JSON_CELL = st.one_of(CELL, st.integers(-3, 9), st.none(), st.booleans(), st.floats(allow_nan=True),
                      st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))
MUTATION = st.tuples(st.sampled_from(["drop", "cell", "dup", "garbage", "delkey"]), st.integers(0, 200),
                     st.integers(0, 2), JSON_CELL)
HEADERS = st.sampled_from([("path", "label", "split"), ("split", "path", "label"), ("path", "label"),
                           ("PATH", "Label", " split "), ("path", "label", "split", "extra"), ("file", "label", "split")])


def _manifest_text(base, fmt, header, muts, int_labels):
    rows = [list(r) for r in R._rows(base, labels="int" if int_labels else "name")]
    rows = [dict(zip(("path", "label", "split"), r)) for r in rows]
    if int_labels and fmt == "jsonl":
        for r in rows:
            r["label"] = int(r["label"])
    garbage = []
    for op, i, col, val in muts:
        if not rows:
            break
        i %= len(rows)
        key = ("path", "label", "split")[col]
        if op == "drop":
            rows.pop(i)
        elif op == "cell":
            rows[i][key] = val if fmt == "jsonl" else str(val)
        elif op == "dup":
            rows.append(dict(rows[i]))
        elif op == "delkey":
            rows[i].pop(key, None)
        else:
            garbage.append((i, str(val)))
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in rows]
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(h.strip().lower(), "") for h in header])
        lines = buf.getvalue().splitlines()
    for i, g in garbage:
        lines.insert(min(i, len(lines)), g)
    return "\n".join(lines) + "\n"


@FUZZ
@given(fmt=st.sampled_from(["csv", "jsonl"]), header=HEADERS, muts=st.lists(MUTATION, max_size=3),
       int_labels=st.booleans(), raw=st.one_of(st.none(), st.none(), st.text(max_size=60), st.binary(max_size=40)))
def test_manifest_fuzz(base, fmt, header, muts, int_labels, raw):
    d = fresh(base)
    m = d / f"m.{fmt}"
    if raw is None:
        m.write_text(_manifest_text(base, fmt, header, muts, int_labels))
    elif isinstance(raw, bytes):
        m.write_bytes(raw)
    else:
        m.write_text(raw)
    out = d / "c.h5"
    r = R.run_cli(["extract", m, "--image-root", base.tree, *R.SMALL_EXTRACT, "--out", out])
    assert_clean(r, out)


# --------------------------------------------------------------------------------------------- #
# grid files
# --------------------------------------------------------------------------------------------- #
FAST_METHODS = ("zeroshot", "tip", "ape", "gda")  # the trained ones (safe, tipf, ...) are too slow here
# Mostly well-typed candidate values, so that many grids run; arbitrary values: *_any_values below.
def _either(good, edge):
    return st.one_of(good, good, good, edge)


def _floats(lo, hi, n):
    return st.lists(st.floats(lo, hi, allow_nan=False), min_size=n, max_size=n)


def _ints(lo, hi, n):
    return st.lists(st.integers(lo, hi), min_size=n, max_size=n)


TYPED = {
    "tip": {"s": _either(_floats(0.5, 12, 2), _floats(-2, 12, 2)), "n": _either(_ints(1, 5, 2), _ints(-1, 5, 2))},
    "ape": {"top_k": _either(st.integers(1, 64), st.integers(-3, 80)),
            "weights": _floats(-2, 2, 2),
            "s": _either(_floats(0.5, 12, 3), _floats(-2, 12, 3)),
            "n": _either(_ints(1, 4, 3), _ints(-1, 4, 3))},
}
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-3, 3) | st.text(max_size=4),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=2),
                        max_leaves=5)


@st.composite
def method_params(draw, typed=True):
    m = draw(st.sampled_from(FAST_METHODS + FAST_METHODS[1:3] * 2 + ("nope",)))
    params = {}
    known = TYPED.get(m, {})
    names = draw(st.lists(st.sampled_from(sorted(known) + ["foo"]), max_size=2, unique=True))
    if m == "ape" and "top_k" not in names and draw(st.integers(0, 4)):
        names.append("top_k")  # the default Q=500 is out of range for the tiny cache's D=64
    for n in names:
        vals = known.get(n, st.integers(0, 3)) if typed else ANY_JSON
        params[n] = draw(st.one_of(st.lists(vals, min_size=1, max_size=2),
                                   st.just([]) if typed else ANY_JSON, vals if not typed else st.nothing())
                         if draw(st.integers(0, 9)) == 0 else st.lists(vals, min_size=1, max_size=2))
    return m, params


@st.composite
def grids(draw, typed=True):
    g = {}
    mp = draw(st.lists(method_params(typed), min_size=draw(st.sampled_from([0, 1, 1, 1])), max_size=2,
                       unique_by=lambda x: x[0]))
    form = draw(st.sampled_from(["dict"] * 5 + ["list", "junk"]))
    g["methods"] = ({m: (p or draw(st.sampled_from([None, {}]))) for m, p in mp} if form == "dict"
                    else [m for m, _ in mp] if form == "list" else draw(ANY_JSON))
    for key in ("shots", "seeds"):
        if draw(st.booleans()):
            g[key] = draw(_either(st.lists(st.integers(1, 2), min_size=1, max_size=2, unique=True),
                                  st.one_of(st.lists(st.integers(-1, 3), max_size=2), ANY_JSON)))
    if draw(st.integers(0, 3)) == 0:
        g["preset"] = draw(st.sampled_from([None, "imagenet", "dtd", "nope", 5]))
    if draw(st.integers(0, 9)) == 0:
        g[draw(st.sampled_from(["shotz", "extra", "Methods"]))] = draw(ANY_JSON)
    return g


def _rows_estimate(g) -> int:
    m = g.get("methods")
    if isinstance(m, list):
        m = {k: {} for k in m if isinstance(k, str)}
    if not isinstance(m, dict):
        return 0
    combos = 0
    for p in m.values():
        n = 1
        for v in (p or {}).values() if isinstance(p, dict) else []:
            n *= len(v) if isinstance(v, list) else 1
        combos += n
    ks = g.get("shots") if isinstance(g.get("shots"), list) and g.get("shots") else [1, 2]
    ss = g.get("seeds") if isinstance(g.get("seeds"), list) and g.get("seeds") else [1, 2]
    return combos * len(ks) * len(ss)


def _write_grid(d, g, as_yaml, junk):
    p = d / ("grid.yaml" if as_yaml else "grid.json")
    if junk is not None:
        p.write_text(junk)
    else:
        p.write_text(yaml.safe_dump(g) if as_yaml else json.dumps(g))
    return p


@FUZZ
@given(g=grids(), as_yaml=st.booleans(), junk=st.one_of(st.none(), st.none(), st.none(), st.text(max_size=40)))
def test_grid_fuzz(base, g, as_yaml, junk):
    assume(_rows_estimate(g) <= 12)
    d = fresh(base)
    r = R.run_cli(["sweep", base.cache, "--grid", _write_grid(d, g, as_yaml, junk), "--out", d / "rows.jsonl",
                   "--json"])
    assert_clean(r)


@st.composite
def grids_any_values(draw):
    m = draw(st.sampled_from(["tip", "ape"]))
    name = draw(st.sampled_from(sorted(TYPED[m])))
    return {"methods": {m: {name: draw(st.lists(ANY_JSON, min_size=1, max_size=2))}}, "shots": [1], "seeds": [1]}


@settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(g=grids_any_values())
def test_grid_fuzz_any_values(base, g):
    """Any JSON as candidate values of a known parameter: validated before any run."""
    d = fresh(base)
    r = R.run_cli(["sweep", base.cache, "--grid", _write_grid(d, g, False, None), "--out", d / "rows.jsonl", "--json"])
    assert_clean(r)


# --------------------------------------------------------------------------------------------- #
# CLI option values: refine / eval / sweep
# --------------------------------------------------------------------------------------------- #
INT_TEXT = st.one_of(st.integers(-3, 70).map(str), st.sampled_from(["", "x", "1.5", "1e3", "-0", "99999999999999999999"]))
INT_LIST = st.one_of(st.lists(st.integers(-1, 3), min_size=1, max_size=3).map(lambda v: ",".join(map(str, v))),
                     st.sampled_from(["", ",", "1,,2", "a", "1;2", " 1 , 2 "]))
WEIGHTS = st.one_of(st.lists(st.floats(-2, 2, allow_nan=False), min_size=0, max_size=3).map(
    lambda v: ",".join(f"{x:g}" for x in v)), st.sampled_from(["", ",", "a,b", "1", "0.5;0.5"]))


@st.composite
def set_options(draw, typed=True):
    out = []
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            out.append(draw(st.sampled_from(["ape.top_k", "x", "=1", "tip.", "nope.x=1", "ape.foo=1", "tip.s=[7,7"])))
            continue
        m = draw(st.sampled_from(["tip", "ape"]))
        name = draw(st.sampled_from(sorted(TYPED[m])))
        val = draw(TYPED[m][name] if typed else ANY_JSON)
        out.append(f"{m}.{name}={json.dumps(val)}")
    return out


@st.composite
def cli_calls(draw, typed=True):
    cmd = draw(st.sampled_from(["refine", "eval", "sweep"]))
    args = [cmd, "<cache>"]
    if cmd == "refine":
        args += ["--top-k", draw(INT_TEXT)]
        if draw(st.booleans()):
            args += ["--shots", draw(INT_TEXT)]
        if draw(st.booleans()):
            args += ["--seed", draw(INT_TEXT)]
        if draw(st.booleans()):
            args += ["--weights", draw(WEIGHTS)]
        if draw(st.booleans()):
            args.append("--text-only")
    elif cmd == "eval":
        methods = draw(st.lists(st.sampled_from(FAST_METHODS + ("nope", " tip ", "", ",")), min_size=1, max_size=2))
        args += ["--method", ",".join(methods)]
        for opt in ("--shots", "--seeds"):
            if draw(st.booleans()):
                args += [opt, draw(INT_LIST)]
        for s in draw(set_options(typed)):
            args += ["--set", s]
        if draw(st.integers(0, 3)) == 0:
            args += ["--preset", draw(st.sampled_from(["imagenet", "eurosat", "nope", ""]))]
    else:
        args += ["--grid", draw(st.sampled_from(["<grid>", "<missing>", "<dir>"]))]
        if draw(st.booleans()):
            args += ["--out", draw(st.sampled_from(["<out>", "<dir>", "<nested>"]))]
    if draw(st.booleans()):
        args.append("--json")
    if draw(st.integers(0, 9)) == 0:
        args.insert(draw(st.integers(1, len(args))), draw(st.sampled_from(["--bogus", "-x", "--json=1"])))
    return args


def _materialize(base, d, args):
    grid = d / "grid.json"
    grid.write_text(json.dumps({"methods": {"zeroshot": {}, "tip": {"n": [[5, 5]]}}, "shots": [1]}))
    sub = {"<cache>": str(base.cache), "<grid>": str(grid), "<missing>": str(d / "missing.json"), "<dir>": str(d),
           "<out>": str(d / "rows.jsonl"), "<nested>": str(d / "new" / "deeper" / "rows.jsonl")}
    return [sub.get(a, a) for a in args]


@FUZZ
@given(args=cli_calls())
def test_cli_option_fuzz(base, args):
    d = fresh(base)
    assert_clean(R.run_cli(_materialize(base, d, args)))


@settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(sets=set_options(typed=False).filter(bool))
def test_cli_set_fuzz_any_values(base, sets):
    """Any JSON as --set values: validated before any run."""
    args = ["eval", base.cache, "--method", "tip,ape", "--shots", "1", "--seeds", "1"]
    for s in sets:
        args += ["--set", s]
    assert_clean(R.run_cli(args))
