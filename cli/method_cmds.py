"""refine / eval: the training-free methods on a cache."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .common import CONTEXT, emit_json, float_list, friendly, int_list, note, table


def _weights_note(cache):
    if cache.random_weights:
        note(f"NOTE: {cache.weights_label}")
    if cache.val_is_test:
        note("NOTE: val and test are the same data here: hyper-parameters were chosen on it, so 'test' is optimistic.")


@click.command(context_settings=CONTEXT)
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--top-k", "top_k", required=True, type=int, help="Q, the number of channels to keep.")
@click.option("--shots", "k", type=int, default=None, help="K of the few-shot set (default: largest in the cache).")
@click.option("--seed", type=int, default=None, help="Few-shot seed (default: first in the cache).")
@click.option("--weights", default="0.5,0.5", callback=float_list, help="w0,w1: similarity and variance weights.")
@click.option("--text-only", is_flag=True, help="APE-T's variant: text rows only.")
@click.option("--json", "as_json", is_flag=True)
@friendly
def refine(cache, top_k, k, seed, weights, text_only, as_json):
    """APE channel refinement: keep the TOP-K channels that minimise inter-class similarity.

    The selection and per-channel scores are stored with the cache (NAME.results/), keyed by
    (K, seed, Q, weights, variant).
    """
    from cachekit.cache import open_cache
    from cachekit.errors import CachekitError
    from cachekit.runner import store_refine

    if len(weights) != 2:
        raise CachekitError(f"--weights needs two numbers w0,w1, got {len(weights)}; fix: e.g. --weights 0.5,0.5")
    with open_cache(cache) as c:
        k = max(c.shots) if k is None else k
        seed = c.seeds[0] if seed is None else seed
        res = store_refine(c, k, seed, top_k, weights, text_only)
        _weights_note(c)
    if as_json:
        emit_json(res)
    else:
        ch = res["channels"]
        click.echo(f"kept {len(ch)} channels for K={res['k']} seed={res['seed']} weights={res['weights']} "
                   f"({res['variant']}): {ch[:12]}{' ...' if len(ch) > 12 else ''}")
        click.echo(f"stored in {res['stored']}")


def parse_sets(values) -> dict:
    """--set METHOD.PARAM=VALUE (VALUE is JSON, or a plain string)."""
    out: dict = {}
    for v in values or ():
        if "=" not in v or "." not in v.split("=", 1)[0]:
            raise click.BadParameter(f"{v!r} is not METHOD.PARAM=VALUE (e.g. ape.top_k=700)")
        key, val = v.split("=", 1)
        m, p = key.split(".", 1)
        try:
            val = json.loads(val)
        except json.JSONDecodeError:
            pass
        out.setdefault(m, {})[p] = val
    return out


@click.command("eval", context_settings=CONTEXT)
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--method", "methods", default="zeroshot,tip,ape,gda", help="Comma-separated methods.")
@click.option("--shots", default=None, callback=int_list, help="Shots to run (default: all in the cache).")
@click.option("--seeds", default=None, callback=int_list, help="Seeds to run (default: all in the cache).")
@click.option("--preset", default=None, help="Per-dataset preset (imagenet, caltech101, ...): templates aside, search scales, Q, weights.")
@click.option("--set", "sets", multiple=True, help="Override a hyper-parameter: METHOD.PARAM=VALUE, e.g. ape.top_k=700.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Append JSON lines of every run here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines on stdout instead of the table.")
@friendly
def eval_(cache, methods, shots, seeds, preset, sets, out, as_json):
    """Run METHODS on every (K, seed) of CACHE: hyper-parameters chosen on val, accuracy on test.

    Prints a table (rows methods, columns shots, mean ± std over seeds of test accuracy).
    """
    from cachekit.cache import open_cache
    from cachekit.presets_apply import overrides_for
    from cachekit.runner import evaluate, summarize

    methods = [m.strip() for m in methods.split(",") if m.strip()]
    overrides = overrides_for(methods, preset, parse_sets(sets))
    with open_cache(cache) as c:
        _weights_note(c)
        records = evaluate(c, methods, shots, seeds, overrides, progress=not as_json)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
    if as_json:
        for r in records:
            click.echo(json.dumps(r))
        return
    header, rows = summarize(records)
    click.echo(table(rows, header))
    click.echo(f"test accuracy (%), mean ± std over seeds; hyper-parameters chosen on {records[0]['selection']}")


COMMANDS = [refine, eval_]
