"""sweep / report / demo."""
from __future__ import annotations

import click

from .common import CONTEXT, device_option, emit_json, friendly, note, progress_view, quiet_option
from .method_cmds import cache_notes, print_table, record_notes


@click.command(context_settings=CONTEXT)
@click.argument("cache", type=click.Path(dir_okay=False, readable=False))
@click.option("--grid", "grid_file", required=True, type=click.Path(dir_okay=False),
              help="JSON or YAML grid: methods (with candidate lists per parameter), shots, seeds, preset.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="JSON-lines results (default: NAME.results/sweep.jsonl next to the cache).")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document: counts and the results path.")
@quiet_option
@friendly
def sweep(cache, grid_file, out, device, as_json, quiet):
    """Run a grid of methods x shots x seeds x hyper-parameters on one cache (resumable)."""
    from pathlib import Path

    from cachekit.cache import open_cache
    from cachekit.outputs import check_output
    from cachekit.runner import Runner
    from cachekit.sweep import load_grid, sweep as run

    grid = load_grid(grid_file)
    out = out or str(Path(cache).with_suffix(".results") / "sweep.jsonl")
    check_output(out, "results", inputs=[("cache", cache), ("grid file", grid_file)])
    view = progress_view(quiet, as_json)
    with open_cache(cache) as c:
        try:
            res = run(c, grid, out, progress=view, runner=Runner(c, device=device, progress=view))
        finally:
            view.close()
        cache_notes(c)
    record_notes(res["records"])
    if as_json:
        emit_json({k: v for k, v in res.items() if k not in ("records", "grid_records")})
        return
    click.echo(f"{res['ran']} run(s), {res['skipped']} already done, results in {res['out']}")
    recs = res["grid_records"]
    print_table(recs, recs[0]["selection"] if recs else "val")


@click.command(context_settings=CONTEXT)
@click.argument("results", type=click.Path(dir_okay=False, readable=False))
@click.option("--out", "out_dir", default=None, type=click.Path(),
              help="Output folder (default: next to RESULTS, named report/).")
@click.option("--no-plots", is_flag=True)
@click.option("--figures", "figures_cache", type=click.Path(dir_okay=False), default=None,
              help="Also draw, from this cache, SAFE's attention (frozen vs fine-tuned) and APE's refinement "
                   "(similarities before/after, accuracy vs Q).")
@click.option("--figure-shots", type=int, default=None, help="K of the figures (default: the largest).")
@click.option("--figure-seed", type=int, default=None, help="Seed of the figures (default: the first).")
@click.option("--set", "sets", multiple=True, help="SAFE settings of the attention figure, e.g. safe.epochs=10 "
              "(a stored fit of the same settings is reused).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document: what was written.")
@quiet_option
@friendly
def report(results, out_dir, no_plots, figures_cache, figure_shots, figure_seed, sets, as_json, quiet):
    """Write a markdown report (tables per cache and configuration, accuracy-vs-shots plots) from eval/sweep
    JSON lines. Rows are (method, configuration), averaged over seeds only."""
    from pathlib import Path

    from cachekit.errors import CachekitError
    from cachekit.outputs import check_output
    from cachekit.records import read_results
    from cachekit.report import build_report

    from .common import parse_sets

    out_dir = out_dir or str(Path(results).parent / "report")
    check_output(out_dir, "folder", inputs=[("results file", results)])
    user = parse_sets(sets)
    if set(user) - {"safe"}:
        raise CachekitError("report --set takes safe.PARAM=VALUE only (the attention figure's SAFE); fix: "
                            "e.g. --set safe.epochs=10")
    loaded = read_results(results)
    skipped = loaded.problems_line(results)
    if skipped:
        note(f"NOTE: {skipped}")
    figs = None
    if figures_cache:
        from cachekit.cache import open_cache
        from cachekit.figures import make_figures
        from cachekit.methods.registry import get_method

        get_method("safe").make_config(user.get("safe"))
        view = progress_view(quiet, as_json)
        with open_cache(figures_cache) as c:
            try:
                figs = make_figures(c, out_dir, figure_shots, figure_seed, user.get("safe"), progress=view)
            finally:
                view.close()
    res = build_report(loaded.records, out_dir, plots=not no_plots, skipped=skipped, figures=figs)
    res["skipped_lines"] = len(loaded.skipped)
    if as_json:
        emit_json(res)
    else:
        click.echo(f"report: {res['report']}" + (f"  plot: {res['plot']}" if res["plot"] else ""))


@click.command(context_settings=CONTEXT)
@click.option("--out", "out_dir", default="cache/demo", type=click.Path(file_okay=False))
@click.option("--model", default="mini-clip", help="mini-clip (the shipped checkpoint), or any open_clip ResNet "
              "name: without --pretrained it runs with seeded random weights.")
@click.option("--pretrained", type=click.Path(dir_okay=False, exists=True), default=None)
@device_option
@click.option("--workers", default=0, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document: paths and every record.")
@quiet_option
@friendly
def demo(out_dir, model, pretrained, device, workers, as_json, quiet):
    """Extract the embedded clip-art demo data, refine, evaluate every method, report."""
    from cachekit.demo import run_demo

    view = progress_view(quiet, as_json)
    try:
        res = run_demo(out_dir, model=model, pretrained=pretrained, progress=view, device=device, workers=workers)
    finally:
        view.close()
    if as_json:
        emit_json(res)
        return
    record_notes(res["records"])
    click.echo(f"cache: {res['cache']} ({res['extract']['status']})")
    click.echo(f"weights: {res['weights']}")
    r = res["refine"]
    click.echo(f"refine: kept {r['top_k']} channels for every few-shot set (eval's APE uses them)")
    print_table(res["records"], res["records"][0]["selection"])
    click.echo(f"results: {res['results']}  report: {res['report']['report']}")


COMMANDS = [sweep, report, demo]
