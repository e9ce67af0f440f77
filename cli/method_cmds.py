"""refine / eval / fit-safe: methods on a cache (library: cachekit.runner)."""
from __future__ import annotations

import math

import click

from .common import (CONTEXT, device_option, emit_json, emit_json_lines, float_list, friendly, max_memory_option,
                     note, parse_sets, progress_view, quiet_option, seeds_option, shots_option, table)


def cache_notes(cache):
    if cache.random_weights:
        note(f"NOTE: {cache.weights_label}")
    if cache.val_is_test:
        note("NOTE: val and test are the same data here: hyper-parameters were chosen on it, so 'test' is optimistic.")


def record_notes(records):
    """Notes the methods attached to their runs (e.g. a Q clipped to the cache's width), each once."""
    seen = []
    for r in records:
        for n in (r.get("extra") or {}).get("notes", []):
            if n not in seen:
                seen.append(n)
    for n in seen:
        note(f"NOTE: {n}")


def print_table(records, chosen_on: str):
    from cachekit.report import summarize

    if not records:
        return
    header, rows = summarize(records)
    click.echo(table(rows, header))
    click.echo(f"test accuracy (%), mean ± std over seeds; hyper-parameters chosen on {chosen_on}")


@click.command(context_settings=CONTEXT)
@click.argument("cache", type=click.Path(dir_okay=False, readable=False))
@click.option("--top-k", "top_k", required=True, type=int, help="Q, the number of channels to keep.")
@shots_option
@seeds_option
@click.option("--weights", default="0.5,0.5", callback=float_list, help="w0,w1: similarity and variance weights.")
@click.option("--text-only", is_flag=True, help="APE-T's variant: text rows only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (a list, one entry per set).")
@quiet_option
@friendly
def refine(cache, top_k, shots, seeds, weights, text_only, as_json, quiet):
    """APE channel refinement: keep the TOP-K channels that minimise inter-class similarity.

    For each few-shot set (K, seed) asked for (default: every set), the selection and per-channel scores are
    stored with the cache (NAME.results/). `eval` and `sweep` then use it for APE (APE-T: --text-only) when it
    is the only one stored for that set and ape.top_k/ape.weights are not set (see docs/eval.md).
    """
    from cachekit.cache import open_cache
    from cachekit.errors import CachekitError
    from cachekit.runner import refine_stored

    if len(weights) != 2:
        raise CachekitError(f"--weights needs two numbers w0,w1, got {len(weights)}; fix: e.g. --weights 0.5,0.5")
    if not all(math.isfinite(w) for w in weights):
        raise CachekitError(f"--weights {weights[0]},{weights[1]} must be finite numbers; fix: e.g. --weights 0.5,0.5")
    with open_cache(cache) as c:
        res = refine_stored(c, top_k, weights, text_only, shots=shots, seeds=seeds)
        cache_notes(c)
    for n in dict.fromkeys(n for r in res for n in r.get("notes", [])):
        note(f"NOTE: {n}")
    if as_json:
        emit_json(res)
        return
    for r in res:
        ch = r["channels"]
        click.echo(f"K={r['k']} seed={r['seed']}: kept {len(ch)} channels (weights {r['weights']}, {r['variant']}): "
                   f"{ch[:8]}{' ...' if len(ch) > 8 else ''}")
    click.echo(f"stored in {res[0]['stored'].rsplit('/', 1)[0]}/")


@click.command("eval", context_settings=CONTEXT)
@click.argument("cache", type=click.Path(dir_okay=False, readable=False))
@click.option("--method", "methods", default="zeroshot,tip,ape,gda",
              help="Comma-separated methods (cachekit methods lists them).")
@shots_option
@seeds_option
@click.option("--preset", default=None, help="Per-dataset preset (imagenet, caltech101, ...): search scales, Q, "
              "weights, SAFE batch (docs/eval.md).")
@click.option("--set", "sets", multiple=True, help="Override a parameter: METHOD.PARAM=VALUE, e.g. ape.top_k=700.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Results file (JSON lines): runs already in it are not run again, new ones are appended.")
@device_option
@max_memory_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines on stdout (one record per run).")
@quiet_option
@friendly
def eval_(cache, methods, shots, seeds, preset, sets, out, device, max_memory, as_json, quiet):
    """Run METHODS on every (K, seed) of CACHE: hyper-parameters chosen on val, accuracy on test.

    Prints a table (rows: method and configuration, columns: shots, mean ± std over seeds of test accuracy).
    """
    from cachekit.cache import open_cache
    from cachekit.errors import CachekitError
    from cachekit.methods.presets import get_preset, overrides_for
    from cachekit.outputs import check_output
    from cachekit.runner import Runner, check_overrides, evaluate

    methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not methods:
        raise CachekitError("--method names no method; fix: e.g. --method zeroshot,tip,ape")
    user = parse_sets(sets)
    overrides = check_overrides(methods, overrides_for(methods + list(user), preset, user), note=note)
    if out:
        check_output(out, "results", inputs=[("cache", cache)])
    view = progress_view(quiet, as_json)
    with open_cache(cache) as c:
        runner = Runner(c, device=device, max_memory=max_memory, progress=view)
        try:
            records = evaluate(c, methods, shots, seeds, overrides, progress=view, out=out, runner=runner)
        finally:
            view.close()
        cache_notes(c)
        if preset and get_preset(preset)["templates"] != c.templates():
            note(f"NOTE: the cache's text classifier was built with other templates than preset {preset}'s; "
                 f"templates are fixed at extract time (cachekit extract --templates {preset}).")
    record_notes(records)
    if as_json:
        emit_json_lines(records)
        return
    print_table(records, records[0]["selection"] if records else "val")
    if out:
        click.echo(f"results: {out}")


def _safe_options(fn):
    """fit-safe's training options, generated from SAFE's declared parameters (one source of defaults)."""
    from cachekit.methods.registry import get_method

    kinds = {"int": int, "float": float}
    for p in reversed(get_method("safe").config.spec()):
        if p.name in ("device",):
            continue  # --device is the run's, as on eval
        flag = "--train-seed" if p.name == "seed" else "--" + p.name.replace("_", "-")
        default = "min(10, epochs // 5)" if p.name == "warmup_epochs" else (
            ",".join(p.default) if isinstance(p.default, tuple) else p.default)
        kw = dict(default=None, show_default=False, help=f"{p.help} [default: {default}]")
        if p.type == "str" and p.choices:
            kw["type"] = click.Choice(p.choices)
        elif p.type in kinds:
            kw["type"] = kinds[p.type]
        fn = click.option(flag, "safe_" + p.name, **kw)(fn)
    return fn


@click.command("fit-safe", context_settings=CONTEXT)
@click.argument("cache", type=click.Path(dir_okay=False, readable=False))
@shots_option
@seeds_option
@_safe_options
@device_option
@max_memory_option
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the fitted layer here instead of NAME.results/ (one few-shot set only).")
@click.option("--retrain", is_flag=True, help="Train even if a fit with these settings is stored.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines on stdout (one record per set).")
@quiet_option
@friendly
def fit_safe(cache, shots, seeds, device, max_memory, out, retrain, as_json, quiet, **safe):
    """SAFE: fine-tune the attention-pooling layer on the cached dense maps, blend with the original.

    No CLIP backbone runs: the augmented train views' dense maps come from the cache. For each few-shot set
    (default: every set) the fitted layer and its per-epoch log are stored keyed by (K, seed, settings), so
    `cachekit eval --method safe` with the same settings (--set safe.PARAM=...) reuses them.
    """
    from cachekit.cache import open_cache
    from cachekit.errors import CachekitError
    from cachekit.outputs import check_output
    from cachekit.runner import Runner, _sets

    overrides = {k[len("safe_"):]: v for k, v in safe.items() if v is not None}
    if "train_groups" in overrides:
        overrides["train_groups"] = [g.strip() for g in overrides["train_groups"].split(",") if g.strip()]
    from cachekit.methods.registry import get_method

    get_method("safe").make_config(overrides)  # bad settings fail before the cache is opened
    if out:
        check_output(out, "fit", inputs=[("cache", cache)])
    view = progress_view(quiet, as_json)
    records = []
    with open_cache(cache) as c:
        sets = _sets(c, shots, seeds)
        if out and len(sets) != 1:
            raise CachekitError(f"--out holds one fitted layer, but {len(sets)} few-shot sets were asked for; "
                                "fix: pick one with --shots K --seeds S, or drop --out")
        runner = Runner(c, device=device, max_memory=max_memory, progress=view, reuse_fits=not retrain, fit_out=out)
        try:
            for k, s in sets:
                records.append(runner.run("safe", k, s, overrides))
        finally:
            view.close()
        cache_notes(c)
    if as_json:
        emit_json_lines(records)
        return
    rows = []
    for r in records:
        e, m = r["extra"], r["metrics"]
        rows.append([r["shots"], r["seed"], "trained" if e["trained"] else "reused stored fit",
                     f"{e['val_acc_frozen']:.2f} / {_fmt(e['test_acc_frozen'])}",
                     f"{m['val_acc']:.2f} / {_fmt(m['test_acc'])}", f"{r['params']['mode']} {r['params']['beta']:.2f}"])
    click.echo(table(rows, ["K", "seed", "fit", "frozen val / test", "SAFE val / test", "blend beta (val)"]))
    stored = [r["extra"].get("stored") for r in records if r["extra"].get("stored")]
    if stored:
        click.echo(f"stored {len(stored)} fit(s), e.g. {stored[0]}")


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


@click.command("methods", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document: every method's parameters.")
@friendly
def methods_(as_json):
    """List the methods and their parameters (name, type, default, range), as --set and grids take them."""
    from cachekit.methods.registry import get_method, list_methods

    if as_json:
        emit_json({m: {"summary": get_method(m).summary, "trained": get_method(m).trained,
                       "parameters": [{"name": p.name, "type": p.type, "default": p.default, "range": p.describe_range(),
                                       "help": p.help} for p in get_method(m).config.spec()]}
                   for m in list_methods()})
        return
    for m in list_methods():
        spec = get_method(m)
        click.echo(f"{m}: {spec.summary}")
        for p in spec.config.spec():
            d = list(p.default) if isinstance(p.default, tuple) else p.default
            click.echo(f"  {m}.{p.name} = {d!r}  ({p.describe_range() or p.type}) {p.help}")


COMMANDS = [refine, eval_, fit_safe, methods_]
