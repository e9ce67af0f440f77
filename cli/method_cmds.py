"""refine / eval: the training-free methods on a cache."""
from __future__ import annotations

import json
import math
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
    if not all(math.isfinite(w) for w in weights):
        raise CachekitError(f"--weights {weights[0]},{weights[1]} must be finite numbers; fix: e.g. --weights 0.5,0.5")
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

    from cachekit.errors import CachekitError
    from cachekit.store import os_errors

    methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not methods:
        raise CachekitError("--method names no method; fix: e.g. --method zeroshot,tip,ape")
    overrides = overrides_for(methods, preset, parse_sets(sets))
    with open_cache(cache) as c:
        records = evaluate(c, methods, shots, seeds, overrides, progress=not as_json)
        _weights_note(c)
        if preset:
            from cachekit.methods.presets import get_preset

            if get_preset(preset)["templates"] != c.templates():
                note(f"NOTE: the cache's text classifier was built with other templates than preset {preset}'s; "
                     f"templates are fixed at extract time (cachekit extract --templates {preset}).")
    if out:
        with os_errors(out):
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        with os_errors(out), open(out, "a", encoding="utf-8") as fh:
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


@click.command("fit-safe", context_settings=CONTEXT)
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--shots", "k", type=int, default=None, help="K (default: largest in the cache).")
@click.option("--seed", type=int, default=None, help="Few-shot seed (default: first in the cache).")
@click.option("--epochs", default=50, type=click.IntRange(min=1))
@click.option("--warmup-epochs", default=None, type=click.IntRange(min=0), help="Default: min(10, epochs // 5).")
@click.option("--lr", default=1e-4, type=float)
@click.option("--batch-size", default=64, type=click.IntRange(min=1))
@click.option("--train", "train_groups", default="pos,qkv,c_proj", help="Parameter groups to train.")
@click.option("--temperature", default=2.0, type=float, help="CE on 100*cos/temperature.")
@click.option("--consistency", default="l1", type=click.Choice(["l1", "kl", "none"]))
@click.option("--consistency-weight", default=0.5, type=float)
@click.option("--blend", default="feature", type=click.Choice(["feature", "logit"]))
@click.option("--train-seed", default=1, type=int, help="Seed of the shuffling.")
@click.option("--device", default="cpu")
@click.option("--max-memory", default="4GiB", help="Hold dense maps in memory up to this size, else stream them.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the fitted layer here instead of NAME.results/.")
@click.option("--retrain", is_flag=True, help="Train even if a fit with these settings is stored.")
@click.option("--json", "as_json", is_flag=True)
@friendly
def fit_safe(cache, k, seed, epochs, warmup_epochs, lr, batch_size, train_groups, temperature, consistency,
             consistency_weight, blend, train_seed, device, max_memory, out, retrain, as_json):
    """SAFE: fine-tune the attention-pooling layer on the cached dense maps, blend with the original.

    No CLIP backbone runs: the augmented train views' dense maps come from the cache. The fitted layer,
    its per-epoch log and the blend chosen on val are stored keyed by (K, seed, settings), so
    `cachekit eval --method safe` reuses them.
    """
    from cachekit.cache import open_cache
    from cachekit.methods.safe import SafeConfig
    from cachekit.safe_run import fit_safe as run

    warm = min(10, epochs // 5) if warmup_epochs is None else warmup_epochs
    cfg = SafeConfig.from_dict(dict(epochs=epochs, warmup_epochs=warm, lr=lr, batch_size=batch_size,
                                    train_groups=tuple(g.strip() for g in train_groups.split(",") if g.strip()),
                                    temperature=temperature, consistency=consistency,
                                    consistency_weight=consistency_weight, seed=train_seed, device=device))
    with open_cache(cache) as c:
        k = max(c.shots) if k is None else k
        seed = c.seeds[0] if seed is None else seed
        res = run(c, k, seed, cfg, blend=blend, max_memory=parse_bytes(max_memory), reuse=not retrain,
                  out=out, progress=not as_json)
        _weights_note(c)
    sel = res["selection"]
    summary = {"k": k, "seed": seed, "config": res["key"]["config"], "blend": sel.params,
               "val_acc": sel.val_acc, "test_acc": sel.test_acc,
               "val_acc_frozen": sel.extra["val_acc_frozen"], "test_acc_frozen": sel.extra.get("test_acc_frozen"),
               "trained": res["trained"], "stored": res["stored"], "seconds": round(res["seconds"], 3),
               "log": res["log"]}
    if as_json:
        emit_json(summary)
        return
    last = res["log"][-1] if res["log"] else {}
    click.echo(f"SAFE K={k} seed={seed}: {'trained' if res['trained'] else 'reused stored fit'}"
               f" ({len(res['log'])} epochs, final loss {last.get('loss', float('nan')):.4f})")
    click.echo(table([["frozen CLIP", f"{summary['val_acc_frozen']:.2f}", _fmt(summary["test_acc_frozen"])],
                      [f"SAFE ({sel.params['mode']} blend, beta={sel.params['beta']:.2f})", f"{sel.val_acc:.2f}",
                       _fmt(sel.test_acc)]], ["model", "val acc", "test acc"]))
    if res["stored"]:
        click.echo(f"stored in {res['stored']}")


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


def parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 1000, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("kmgib")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise click.BadParameter(f"{text!r} is not a size like 512MiB or 4GiB") from None


COMMANDS.append(fit_safe)
