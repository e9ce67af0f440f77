"""sweep / report / demo."""
from __future__ import annotations

import json

import click

from .common import CONTEXT, emit_json, friendly, note, table


@click.command(context_settings=CONTEXT)
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--grid", "grid_file", required=True, type=click.Path(dir_okay=False),
              help="JSON or YAML grid: methods (with candidate lists per parameter), shots, seeds, preset.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="JSON-lines results (default: NAME.results/sweep.jsonl next to the cache).")
@click.option("--json", "as_json", is_flag=True)
@friendly
def sweep(cache, grid_file, out, as_json):
    """Run a grid of methods x shots x seeds x hyper-parameters on one cache (resumable)."""
    from pathlib import Path

    from cachekit.cache import open_cache
    from cachekit.runner import summarize
    from cachekit.sweep import load_grid, sweep as run

    grid = load_grid(grid_file)
    with open_cache(cache) as c:
        out = out or str(Path(cache).with_suffix(".results") / "sweep.jsonl")
        res = run(c, grid, out, progress=not as_json)
        if c.random_weights:
            note(f"NOTE: {c.weights_label}")
    if as_json:
        emit_json({k: v for k, v in res.items() if k != "records"})
        return
    click.echo(f"{res['ran']} run(s), {res['skipped']} already done, results in {res['out']}")
    from cachekit.report import read_results
    from cachekit.runner import DEFAULTS

    recs = read_results(res["out"])
    for r in recs:
        cfg = {k: v for k, v in r["config"].items() if v != DEFAULTS[r["method"]].get(k)}
        r["method"] = f"{r['method']} {json.dumps(cfg, sort_keys=True)}" if cfg else r["method"]
    header, rows = summarize(recs)
    click.echo(table(rows, header))


@click.command(context_settings=CONTEXT)
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Output folder (default: next to RESULTS, named report/).")
@click.option("--no-plots", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@friendly
def report(results, out_dir, no_plots, as_json):
    """Write a markdown report (tables, accuracy-vs-shots plots) from eval/sweep JSON lines."""
    from pathlib import Path

    from cachekit.report import build_report, read_results

    recs = read_results(results)
    res = build_report(recs, out_dir or Path(results).parent / "report", plots=not no_plots)
    if as_json:
        emit_json(res)
    else:
        click.echo(f"report: {res['report']}" + (f"  plot: {res['plot']}" if res["plot"] else ""))


@click.command(context_settings=CONTEXT)
@click.option("--out", "out_dir", default="cache/demo", type=click.Path(file_okay=False))
@click.option("--model", default="RN-tiny")
@click.option("--pretrained", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--device", default="cpu")
@click.option("--workers", default=0, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True)
@friendly
def demo(out_dir, model, pretrained, device, workers, as_json):
    """Extract the embedded clip-art demo data, refine, evaluate every method, report."""
    from cachekit.demo import run_demo
    from cachekit.runner import summarize

    res = run_demo(out_dir, model=model, pretrained=pretrained, progress=not as_json, device=device,
                   workers=workers)
    if as_json:
        emit_json({k: v for k, v in res.items()})
        return
    click.echo(f"cache: {res['cache']} ({res['extract']['status']})")
    click.echo(f"weights: {res['weights']}")
    click.echo(f"refine: kept {res['refine']['top_k']} channels (K={res['refine']['k']}, seed {res['refine']['seed']})")
    header, rows = summarize(res["records"])
    click.echo(table(rows, header))
    click.echo(f"test accuracy (%), mean ± std over seeds; hyper-parameters chosen on {res['records'][0]['selection']}")
    click.echo(f"results: {res['results']}  report: {res['report']['report']}")


COMMANDS = [sweep, report, demo]
