"""The one core (issue 11): registry, declared settings, refine -> eval, one record and one results file,
report grouping, outputs that never clobber inputs, and checks that run over every registered method."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachekit.cli.main import cli
from cachekit.errors import CachekitError

ROOT = Path(__file__).resolve().parents[1]
# Small settings for every method, so a run over all of them stays quick on the tiny cache.
SMALL = {"tip": {"n": [10, 5]}, "ape": {"n": [10, 5, 5]}, "tipf": {"epochs": 2, "n": [10, 5]},
         "apet": {"epochs": 2, "n": [10, 5]}, "safe": {"epochs": 2, "batch_size": 4},
         "safe-a": {"safe": {"epochs": 2, "batch_size": 4}, "adapter_config": {"epochs": 2, "n": [10, 5]}}}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(res, *needles):
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output + res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("Error:"), res.stderr
    for n in needles:
        assert n in err[0], err[0]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def cache_copy(tiny_cache, tmp_path):
    p = tmp_path / "copy.h5"
    shutil.copy(tiny_cache, p)
    return p


# ------------------------------------------------------------------------------------------- registry
def test_every_method_is_registered_with_declared_settings():
    from cachekit.methods.registry import get_method, list_methods

    assert list_methods() == ["zeroshot", "tip", "ape", "gda", "tipf", "apet", "safe", "safe-a"]
    for m in list_methods():
        spec = get_method(m)
        cfg = spec.make_config()
        assert cfg.to_dict() == spec.defaults()
        assert type(spec.make_config(spec.defaults())) is spec.config  # defaults pass their own checker
        for p in spec.config.spec():
            assert p.help, (m, p.name)
    with pytest.raises(CachekitError, match="unknown method 'nope'"):
        get_method("nope")


@pytest.mark.parametrize("method,param,bad", [
    ("tip", "n", [10, 2.5]), ("tip", "s", [7]), ("ape", "top_k", 0), ("ape", "top_k", True),
    ("ape", "weights", [float("nan"), 1]), ("ape", "channels", "some"), ("tipf", "epochs", 0),
    ("tipf", "epoch_size", 0), ("apet", "normalize", "yes"), ("safe", "lr", 0), ("safe", "warmup_epochs", 99),
    ("safe", "train_groups", ["mlp"]), ("safe", "blend", "mean"), ("safe-a", "adapter", "gda"),
    ("safe-a", "safe", {"epochs": -1}), ("safe-a", "adapter_config", {"nope": 1}),
])
def test_one_checker_refuses_bad_values_with_one_line(method, param, bad):
    from cachekit.methods.registry import get_method

    with pytest.raises(CachekitError) as e:
        get_method(method).make_config({param: bad})
    msg = str(e.value)
    assert "\n" not in msg and "fix:" in msg


def test_grids_too_large_to_search_are_refused_before_any_allocation(cache_copy):
    res = run("eval", cache_copy, "--method", "tip", "--set", "tip.n=[100000000,100000000]")
    one_line_error(res, "10,000,000,000,000,000 grid points", "limit is 10,000,000", "--set tip.n=[200,20]")
    grid = cache_copy.parent / "g.yaml"
    grid.write_text("methods:\n  ape: {n: [[200, 20, 20], [2000, 100, 100]]}\n")
    one_line_error(run("sweep", cache_copy, "--grid", grid), "ape.n=[2000, 100, 100]", "limit")


def test_derived_warmup_is_computed_once_and_keys_agree():
    from cachekit.methods.registry import get_method

    safe = get_method("safe")
    assert safe.make_config({"epochs": 20}).warmup_epochs == 4
    assert safe.make_config({"epochs": 5}).warmup_epochs == 1  # eval --set safe.epochs=5 was refused before
    assert safe.make_config({}).warmup_epochs == 10
    assert safe.make_config({"epochs": 20}).fit_key() == safe.make_config({"epochs": 20, "warmup_epochs": 4}).fit_key()


def test_set_for_unknown_or_idle_method(cache_copy):
    one_line_error(run("eval", cache_copy, "--method", "zeroshot", "--set", "nope.x=1"), "unknown method 'nope'")
    one_line_error(run("eval", cache_copy, "--method", "zeroshot", "--set", "ape.top_q=1"), "top_q")
    res = run("eval", cache_copy, "--method", "zeroshot", "--set", "tip.n=[10,5]", "--shots", 1, "--seeds", 1)
    assert res.exit_code == 0, res.output
    assert "settings for tip are ignored" in res.stderr


# ------------------------------------------------------------------------------- over every method
def _all_records(cache, methods, test_y=None):
    from cachekit.cache import open_cache
    from cachekit.runner import Runner

    with open_cache(cache) as c:
        r = Runner(c)
        if test_y is not None:
            r.inputs(2, 1).test_y = test_y(r.inputs(2, 1).test_y)
        return {m: r.run(m, 2, 1, SMALL.get(m)) for m in methods}


def test_selection_never_sees_test_labels_for_any_method(cache_copy):
    """Shuffling the test labels changes nothing that was chosen on val, for every registered method."""
    from cachekit.methods.registry import list_methods

    methods = list_methods()
    a = _all_records(cache_copy, methods)
    g = torch.Generator().manual_seed(0)
    b = _all_records(cache_copy, methods, test_y=lambda y: y[torch.randperm(len(y), generator=g)])
    for m in methods:
        assert a[m]["params"] == b[m]["params"], m
        assert a[m]["metrics"]["val_acc"] == b[m]["metrics"]["val_acc"], m
        assert a[m]["key"] == b[m]["key"], m
        assert set(a[m]) >= {"key", "method", "shots", "seed", "config", "params", "metrics", "cache_build",
                             "selection", "dataset", "weights"}


def test_record_keys_name_every_setting(cache_copy):
    from cachekit.cache import open_cache
    from cachekit.runner import Runner

    with open_cache(cache_copy) as c:
        r = Runner(c)
        k1 = r.key("ape", 2, 1, {"top_k": 8})
        assert k1 == r.key("ape", 2, 1, {"top_k": 8, "s": [7.0, 7.0, 1]})  # the default, spelled otherwise
        assert k1 != r.key("ape", 2, 1, {"top_k": 9}) and k1 != r.key("ape", 2, 2, {"top_k": 8})
        assert r.key("safe-a", 2, 1, {"safe": {}}) == r.key("safe-a", 2, 1, {"safe": {"epochs": 50}})


# -------------------------------------------------------------------------------------- refine -> eval
def test_refine_then_eval_uses_the_stored_channels(cache_copy):
    """`refine --top-k 16` is what eval's APE uses (auto: the only one stored), and the row says so; the
    default Q=500 on this 64-wide cache keeps all channels with a note instead of failing."""
    assert run("refine", cache_copy, "--top-k", 16).exit_code == 0
    res = run("eval", cache_copy, "--method", "ape,apet", "--set", "ape.n=[10,5,5]", "--set", "apet.epochs=1",
              "--set", "apet.n=[10,5]", "--json")
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in res.stdout.splitlines()]
    ape = [r for r in recs if r["method"] == "ape"]
    assert len(ape) == 4 and all(r["config"]["top_k"] == 16 and r["config"]["channels"] == "stored" for r in ape)
    assert all(r["extra"]["channels"].startswith("stored by `cachekit refine`") for r in ape)
    apet = [r for r in recs if r["method"] == "apet"]  # no --text-only refinement stored: computed, Q clipped
    assert all(r["config"]["channels"] == "computed" and r["config"]["top_k"] == 64 for r in apet)
    assert "apet.top_k=500 exceeds the cache's 64 channels" in res.stderr
    # An explicit top_k means the criterion, computed now; channels=stored without a refinement is an error.
    res = run("eval", cache_copy, "--method", "ape", "--set", "ape.top_k=8", "--set", "ape.n=[10,5,5]", "--json")
    assert all(json.loads(x)["config"]["channels"] == "computed" for x in res.stdout.splitlines())
    one_line_error(run("eval", cache_copy, "--method", "apet", "--set", "apet.channels=stored"),
                   "no refinement (text-only) is stored", "--text-only")


def test_stored_channels_equal_computed_channels_of_the_same_settings(cache_copy):
    """A stored refinement is the criterion's selection: the same (Q, weights) computed now gives the same row."""
    from cachekit.cache import open_cache
    from cachekit.runner import Runner, refine_stored

    with open_cache(cache_copy) as c:
        refine_stored(c, 12, (0.7, 0.3), shots=[2], seeds=[1])
        stored = Runner(c).run("ape", 2, 1, {"channels": "stored", "n": [10, 5, 5]})
        computed = Runner(c).run("ape", 2, 1, {"channels": "computed", "top_k": 12, "weights": [0.7, 0.3],
                                               "n": [10, 5, 5]})
    assert stored["config"]["top_k"] == 12 and stored["config"]["weights"] == [0.7, 0.3]
    assert stored["params"] == computed["params"] and stored["metrics"] == computed["metrics"]


def test_readme_use_flow_runs_as_printed_on_a_tiny_cache(tiny_cache, tmp_path, monkeypatch):
    """Every `cachekit ...` line of the README's Use block, in order, with the tiny model and a tiny image tree
    instead of the checkpoint and DATA (and small grids), exits 0."""
    from conftest import make_tree

    text = (ROOT / "README.md").read_text()
    block = text.split("## Use", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    cmds = [re.sub(r"\s+", " ", c.replace("\\\n", " ")).split("#")[0].strip()
            for c in re.split(r"\n(?=cachekit )", block.strip())]
    cmds = [c for c in cmds if c.startswith("cachekit ")]
    assert [c.split()[1] for c in cmds] == ["extract", "info", "verify", "refine", "eval", "fit-safe", "eval",
                                            "sweep", "report"]
    monkeypatch.chdir(tmp_path)
    data = make_tree(tmp_path / "DATA")
    (tmp_path / "grid.yaml").write_text("methods:\n  tip: {n: [[10, 5]]}\n  ape: {top_k: [8, 16], n: [[10, 5, 5]]}\n")
    for c in cmds:
        args = c.split()[1:]
        args = [str(data) if a == "DATA" else a for a in args]
        if args[0] == "extract":  # the tiny model instead of RN50 + checkpoint; fewer shots and views
            i = args.index("--pretrained")
            del args[i:i + 2]
            args[args.index("--model") + 1] = "RN-tiny"
            args[args.index("--shots") + 1] = "1,2"
            args[args.index("--views") + 1] = "2"
            args += ["--dense-dtype", "float32"]
        elif "--shots" in args:  # K=16 of the README is K=2 here
            args[args.index("--shots") + 1] = "2"
        if args[0] == "fit-safe":
            args += ["--epochs", "2", "--batch-size", "4"]
        if args[0] == "eval" and "safe" in args:
            args += ["--set", "safe.epochs=2", "--set", "safe.batch_size=4", "--json"]
        res = run(*args)
        assert res.exit_code == 0, (c, res.output)
        if args[0] == "eval" and "safe" in args:
            assert json.loads(res.stdout)["extra"]["trained"] is False  # fit-safe's fit, reused
    assert (tmp_path / "report" / "report.md").is_file()


def test_readme_python_block_runs_as_printed_on_a_tiny_tree(tree, tmp_path, monkeypatch, capsys):
    """The README's Python block, with the tiny model and a tiny tree instead of RN50 + checkpoint and DATA."""
    text = (ROOT / "README.md").read_text()
    code = text.split("\nPython:\n", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    subs = [('data="DATA"', f'data="{tree}"'),
            ('model="RN50", pretrained="RN50.pt"', 'model="RN-tiny", shots=(1, 2), views=2, batch_size=4'),
            ("k=16", "k=2"), ('run("ape", 16, 1,', 'run("ape", 2, 1,')]
    for old, new in subs:
        assert old in code, old  # the README still says what this test replaces
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    exec(compile(code, "README.md", "exec"), {})
    metrics = eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) == {"val_acc", "test_acc"}


# ------------------------------------------------------------------------------ fit-safe and eval agree
def test_fit_safe_then_eval_trains_once(cache_copy, monkeypatch):
    from cachekit.methods import safe

    calls = []
    fit = safe.fit
    monkeypatch.setattr(safe, "fit", lambda *a, **k: (calls.append(1), fit(*a, **k))[1])
    res = run("fit-safe", cache_copy, "--shots", 1, "--seeds", 1, "--epochs", 20, "--batch-size", 8, "--json")
    assert res.exit_code == 0, res.output
    res = run("eval", cache_copy, "--method", "safe", "--shots", 1, "--seeds", 1, "--set", "safe.epochs=20",
              "--set", "safe.batch_size=8", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["extra"]["trained"] is False
    assert len(calls) == 1


# ------------------------------------------------------------------------------- results and report
def test_eval_out_rerun_adds_no_duplicates_and_report_counts_seeds(cache_copy, tmp_path):
    out = tmp_path / "r.jsonl"
    args = ["eval", cache_copy, "--method", "zeroshot,tip", "--set", "tip.n=[10,5]", "--out", out]
    assert run(*args).exit_code == 0
    first = out.read_text()
    assert run(*args).exit_code == 0
    assert out.read_text() == first and len(first.splitlines()) == 2 * 2 * 2
    res = run("report", out, "--out", tmp_path / "rep", "--no-plots")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("(n=2)") == 4 and "(n=4)" not in md


def test_report_keeps_configurations_apart_and_names_the_best_on_val(cache_copy, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("methods:\n  ape:\n    top_k: [4, 64]\n    n: [[10, 5, 5]]\nshots: [2]\n")
    out = tmp_path / "s.jsonl"
    assert run("sweep", cache_copy, "--grid", grid, "--out", out).exit_code == 0
    res = run("report", out, "--out", tmp_path / "rep", "--no-plots", "--json")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ape")]
    assert len(rows) == 3, md  # top_k 4, top_k 64, best on val
    assert any('"top_k": 4' in r for r in rows) and any('"top_k": 64' in r for r in rows)
    assert all("(n=2)" in r for r in rows) and "best on val" in rows[-1]


def test_report_never_merges_two_caches_that_share_a_name(tiny_cache, tmp_path):
    from conftest import extract_opts, make_tree

    from cachekit.extraction import extract

    a, b = tmp_path / "a" / "pets.h5", tmp_path / "b" / "pets.h5"
    shutil.copy(tiny_cache, a.parent.mkdir() or a)
    extract(extract_opts(make_tree(tmp_path / "other"), b, shots=(1,), seeds=(1,)))
    out = tmp_path / "both.jsonl"
    for c in (a, b):
        assert run("eval", c, "--method", "zeroshot", "--shots", 1, "--seeds", 1, "--out", out).exit_code == 0
    assert len(out.read_text().splitlines()) == 2
    assert run("report", out, "--out", tmp_path / "rep", "--no-plots").exit_code == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("## pets (cache build") == 2


def test_report_names_unreadable_lines_in_one_line(cache_copy, tmp_path):
    out = tmp_path / "r.jsonl"
    assert run("eval", cache_copy, "--method", "zeroshot", "--out", out).exit_code == 0
    with open(out, "a") as fh:
        fh.write("not json\n" + json.dumps({"method": "x"}) + "\n" + "[" * 100000 + "\n" + "9" * 5000 + "\n")
    res = run("report", out, "--out", tmp_path / "rep", "--no-plots")
    assert res.exit_code == 0 and "Traceback" not in res.output
    assert "skipped 4 unreadable line(s): line 5 (not JSON), line 6 (no 'key' field), line 7 (not JSON)" in res.stderr
    one_line_error(run("report", cache_copy, "--out", tmp_path / "rep2"), "HDF5 file, not a results file")


# --------------------------------------------------------------------------- outputs never clobber inputs
def test_outputs_never_clobber_the_cache_or_the_grid(cache_copy, tmp_path):
    before = sha(cache_copy)
    grid = tmp_path / "grid.yaml"
    grid.write_text("methods: [zeroshot]\n")
    one_line_error(run("fit-safe", cache_copy, "--shots", 1, "--seeds", 1, "--epochs", 1, "--out", cache_copy),
                   "is the cache this command reads")
    one_line_error(run("sweep", cache_copy, "--grid", grid, "--out", cache_copy), "is the cache this command reads")
    one_line_error(run("sweep", cache_copy, "--grid", grid, "--out", grid), "is the grid file this command reads")
    one_line_error(run("eval", cache_copy, "--method", "zeroshot", "--out", cache_copy), "is the cache")
    other = tmp_path / "other.h5"
    shutil.copy(cache_copy, other)
    one_line_error(run("eval", cache_copy, "--method", "zeroshot", "--out", other), "is an HDF5 file")
    one_line_error(run("fit-safe", cache_copy, "--shots", 1, "--seeds", 1, "--epochs", 1, "--out", other),
                   "is a cachekit cache")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    one_line_error(run("sweep", cache_copy, "--grid", grid, "--out", notes), "not a cachekit results file")
    assert notes.read_text() == "my notes\n"
    rows = tmp_path / "rows.jsonl"
    assert run("eval", cache_copy, "--method", "zeroshot", "--out", rows).exit_code == 0
    one_line_error(run("report", rows, "--out", rows), "is the results file this command reads")
    one_line_error(run("report", rows, "--out", notes), "is a file, not a folder")
    assert notes.read_text() == "my notes\n"
    assert sha(cache_copy) == before == sha(other)


# ------------------------------------------------------------------------------------------- devices
def test_eval_and_sweep_take_a_device(cache_copy, tmp_path):
    import torch as _t

    res = run("eval", cache_copy, "--method", "zeroshot,tip", "--set", "tip.n=[10,5]", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    cpu = [json.loads(x) for x in res.stdout.splitlines()]
    base = [json.loads(x) for x in run("eval", cache_copy, "--method", "zeroshot,tip", "--set", "tip.n=[10,5]",
                                       "--json").stdout.splitlines()]
    assert [r["metrics"] for r in cpu] == [r["metrics"] for r in base]
    if not _t.cuda.is_available():
        one_line_error(run("eval", cache_copy, "--method", "zeroshot", "--device", "cuda"), "no CUDA GPU", "--device cpu")
        grid = tmp_path / "g.yaml"
        grid.write_text("methods: [zeroshot]\n")
        one_line_error(run("sweep", cache_copy, "--grid", grid, "--device", "cuda:0"), "no CUDA GPU")
        one_line_error(run("fit-safe", cache_copy, "--device", "cuda", "--epochs", 1), "no CUDA GPU")
    one_line_error(run("eval", cache_copy, "--method", "zeroshot", "--device", "gpu0"), "not a torch device")


def test_runner_moves_inputs_and_trained_methods_to_its_device(cache_copy):
    from cachekit.cache import open_cache
    from cachekit.runner import Runner

    with open_cache(cache_copy) as c:
        r = Runner(c, device="cpu")
        t = r.inputs(1, 1).load()
        assert all(getattr(t, n).device.type == "cpu" for n in ("W", "F", "val_f", "test_y"))
        _, cfg, _ = r.resolve("tipf", 1, 1, {})
        assert cfg.device == "cpu"
