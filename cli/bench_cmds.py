"""bench: speed ratios against a baseline measured in the same run (library: cachekit.bench)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from .common import CONTEXT, emit_json, friendly, int_list, note, table
from .progress_view import ProgressView


def _shape(ctx, param, value):
    out = int_list(ctx, param, value)
    if out is None or len(out) < 1 or min(out) < 1:
        raise click.BadParameter(f"{value!r} must be positive integers, e.g. 2048,7,7")
    return out


def _pair(ctx, param, value):
    out = _shape(ctx, param, value)
    if len(out) != 2:
        raise click.BadParameter(f"{value!r} must be two integers W,H, e.g. 320,240")
    return out


def _common(fn):
    """Output options shared by every bench subcommand; the command returns its result, this prints it."""

    @friendly
    @functools.wraps(fn)
    def run(as_json, quiet, out_path, docs_path, docs_section, **kw):
        view = ProgressView(quiet=quiet or as_json)
        if getattr(fn, "writes_docs", False):  # a suite that writes its parts' sections itself
            kw["docs"] = docs_path
        try:
            res = fn(progress=view, **kw)
        finally:
            view.close()
        _finish(res, as_json, out_path, docs_path, docs_section)

    run = click.option("--docs-section", default=None,
                       help="Name of the section --docs replaces (default: the benchmark's name), to keep "
                            "runs at several sizes side by side.")(run)
    run = click.option("--docs", "docs_path", type=click.Path(dir_okay=False), default=None,
                       help="Markdown file to update: this benchmark's section (between its <!-- bench:NAME --> "
                            "markers) is replaced, or appended; e.g. docs/benchmarks.md. Without it no document "
                            "is written.")(run)
    run = click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
                       help="Save the JSON result to this file.")(run)
    run = click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")(run)
    run = click.option("--json", "as_json", is_flag=True, help="Print the JSON result on stdout (no progress).")(run)
    run = click.option("--threads", type=click.IntRange(min=1), default=None,
                       help="torch threads for the run (default: torch's own). 1 is steadier on a shared machine.")(run)
    return run


def _finish(res: dict, as_json: bool, out_path, docs_path, docs_section=None):
    from cachekit.bench import write_docs_section
    from cachekit.store import os_errors

    if docs_section:
        res["docs_section"] = docs_section
        res["command"] += f" --docs-section {docs_section}"
    if out_path:
        p = Path(out_path)
        with os_errors(str(p)):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
        note(f"saved {p}")
    if docs_path:
        note(f"updated section '{res.get('docs_section', res['bench'])}' of {write_docs_section(res, docs_path)}")
    if as_json:
        emit_json(res)
        return
    click.echo(table(res["table"]["rows"], res["table"]["header"]))
    h = res["headline"]
    click.echo(f"{h}: {res['ratios'][h]:.3g}x" + (" (extrapolated baseline)" if h in res["extrapolated_ratios"] else ""))
    for n in res["notes"]:
        note(f"- {n}")
    note(f"reproduce: {res['command']}")


@click.group(context_settings=CONTEXT)
def bench():
    """Speed ratios of cachekit against the usual way, measured in the same run.

    Every subcommand prints a table (or --json), can save it (--out) and can replace its own section of a
    markdown file (--docs docs/benchmarks.md). Baselines too slow to run in full are timed on a part and
    extrapolated linearly; the output says so. Progress goes to stderr (-q: none).
    """


@bench.command("refine", context_settings=CONTEXT)
@click.option("--classes", default=1000, type=click.IntRange(min=2))
@click.option("--shots", default=16, type=click.IntRange(min=1))
@click.option("--dim", default=1024, type=click.IntRange(min=1))
@click.option("--pairs", default=2000, type=click.IntRange(min=1),
              help="Ordered class pairs the literal loop is timed on (then extrapolated to all C(C-1)).")
@click.option("--repeats", default=5, type=click.IntRange(min=1), help="Timings of the closed form (median).")
@click.option("--check-classes", default=7, type=click.IntRange(min=2))
@click.option("--check-shots", default=4, type=click.IntRange(min=1))
@click.option("--check-dim", default=48, type=click.IntRange(min=1))
@click.option("--seed", default=0, type=int)
@_common
def refine_cmd(**kw):
    """Closed-form APE channel criterion vs the literal O(C^2 S^2 D) pairwise loop."""
    from cachekit.bench import bench_refine

    return bench_refine(**kw)


@bench.command("grid", context_settings=CONTEXT)
@click.option("--shots", default=16, type=click.IntRange(min=1))
@click.option("--classes", default=100, type=click.IntRange(min=2))
@click.option("--val", default=1000, type=click.IntRange(min=2), help="Val images (also the test split).")
@click.option("--configs", default=100, type=click.IntRange(min=1), help="Tip/APE configurations to run.")
@click.option("--views", default=10, type=click.IntRange(min=0), help="Augmented views per train image.")
@click.option("--model", default="RN-tiny", help="CLIP model of the cache (random weights).")
@click.option("--batch-size", default=64, type=click.IntRange(min=1))
@click.option("--workers", default=0, type=click.IntRange(min=0))
@click.option("--device", default="cpu")
@click.option("--dim", default=1024, type=click.IntRange(min=1), help="(b) feature dimension of the synthetic features.")
@click.option("--top-k", default=500, type=click.IntRange(min=1), help="(b) APE refined channels.")
@click.option("--naive-points", default=100, type=click.IntRange(min=1),
              help="(b) grid points the naive loop is timed on (then extrapolated).")
@click.option("--check-n", default="6,4,4", callback=_shape, help="(b) reduced grid (n_beta,n_alpha,n_gamma) for the same-pick check.")
@click.option("--ape-configs", default=100, type=click.IntRange(min=1),
              help="(c) APE sweep configurations (10 Q values x 10 criterion weight pairs at most).")
@click.option("--reextract-model", default="RN50",
              help="Model whose extraction a re-extract-per-configuration baseline pays: its forward is timed on a "
                   "sample and extrapolated (the cache's own --model is measured too, as a second row).")
@click.option("--reextract-sample", default=8, type=click.IntRange(min=1),
              help="Images the --reextract-model forward is timed on.")
@click.option("--seed", default=0, type=int)
@_common
def grid_cmd(**kw):
    """(a) Tip/APE configurations on one cache vs re-extracting per configuration; (b) vectorised APE
    search vs a naive per-point loop; (c) a 100-configuration APE sweep grid (Q x weights) vs
    re-extracting per configuration."""
    from cachekit.bench import bench_grid

    return bench_grid(**kw)


@bench.command("io", context_settings=CONTEXT)
@click.option("--images", default=512, type=click.IntRange(min=1), help="Dense maps to read.")
@click.option("--dense-shape", default="2048,7,7", callback=_shape, help="Map shape (RN50: 2048,7,7).")
@click.option("--dtype", default="float16", type=click.Choice(["float16", "float32"]))
@click.option("--batch", default=64, type=click.IntRange(min=1))
@click.option("--repeats", default=3, type=click.IntRange(min=1))
@click.option("--cold/--no-cold", default=True, help="Also measure after dropping the files from the page cache.")
@click.option("--cache", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Read an existing cache instead of synthetic maps.")
@click.option("--split", default="val", type=click.Choice(["train", "val", "test"]))
@click.option("--seed", default=0, type=int)
@_common
def io_cmd(**kw):
    """Dense-map read throughput from a cache vs numpy reads of the same bytes."""
    from cachekit.bench import bench_io

    return bench_io(**kw)


@bench.command("safe", context_settings=CONTEXT)
@click.option("--images", default=32, type=click.IntRange(min=1))
@click.option("--epochs", default=1, type=click.IntRange(min=1))
@click.option("--model", default="RN50", help="CLIP model (random weights), e.g. RN50 or RN-tiny-224.")
@click.option("--views", default=1, type=click.IntRange(min=1), help="Augmented views per image.")
@click.option("--batch-size", default=16, type=click.IntRange(min=1))
@click.option("--classes", default=4, type=click.IntRange(min=1))
@click.option("--device", default="cpu", help="cpu or cuda[:N].")
@click.option("--workers", default=0, type=click.IntRange(min=0), help="DataLoader workers of the usual way.")
@click.option("--image-size", default="320,240", callback=_pair, help="JPEG width,height.")
@click.option("--repeats", default=1, type=click.IntRange(min=1), help="Interleaved repeats (median).")
@click.option("--seed", default=1, type=int)
@_common
def safe_cmd(**kw):
    """Seconds per SAFE epoch on cached dense maps vs decode + augment + backbone every epoch."""
    from cachekit.bench import bench_safe

    return bench_safe(**kw)


@bench.command("extract", context_settings=CONTEXT)
@click.option("--model", default="RN50", help="CLIP model (random weights).")
@click.option("--images", default=64, type=click.IntRange(min=2))
@click.option("--device", default="cpu", help="cpu or cuda[:N].")
@click.option("--batch-size", default=32, type=click.IntRange(min=1))
@click.option("--workers", default=0, type=click.IntRange(min=0))
@click.option("--views", default=0, type=click.IntRange(min=0), help="Augmented views per train image.")
@click.option("--classes", default=4, type=click.IntRange(min=1))
@click.option("--image-size", default="500,375", callback=_pair, help="JPEG width,height.")
@click.option("--decode", default="pil", type=click.Choice(["pil", "device", "both"]),
              help="JPEG decoding of the timed extract (extract --decode); both: time each, one run.")
@click.option("--seed", default=0, type=int)
@_common
def extract_cmd(**kw):
    """Images/s of a full extract from JPEGs vs the bare encode_image forward."""
    from cachekit.bench import bench_extract

    return bench_extract(**kw)


def _writes_docs(fn):
    """Mark a command whose library function writes its parts' sections itself (it gets docs=PATH)."""
    fn.writes_docs = True
    return fn


def _bytes(ctx, param, value):
    from .common import parse_bytes

    return parse_bytes(value)


@bench.command("scale", context_settings=CONTEXT)
@click.option("--classes", default=1000, type=click.IntRange(min=2, max=1000))
@click.option("--shots", default="1,4", callback=int_list,
              help="Few-shot sets (seed 1); the train pool holds max(shots) images per class.")
@click.option("--views", default=10, type=click.IntRange(min=0), help="Augmented views per train image.")
@click.option("--val", default=2000, type=click.IntRange(min=2), help="Val images (>= --classes).")
@click.option("--test", default=10000, type=click.IntRange(min=1), help="Test images.")
@click.option("--dense-shape", default="2048,7,7", callback=_shape, help="Map shape Cd,H,W (RN50: 2048,7,7).")
@click.option("--dim", default=1024, type=click.IntRange(min=1), help="Pooled feature size D (RN50: 1024).")
@click.option("--heads", default=32, type=click.IntRange(min=1), help="Attention-pooling heads (RN50: 32).")
@click.option("--batch-size", default=64, type=click.IntRange(min=1), help="extract --batch-size.")
@click.option("--input-px", default=32, type=click.IntRange(min=8), help="Input resolution of the stand-in.")
@click.option("--workers", default=0, type=click.IntRange(min=0), help="extract --workers.")
@click.option("--kill-at", default=0.5, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="SIGKILL the extraction after this fraction of its units, then resume it.")
@click.option("--safe-steps", default=6, type=click.IntRange(min=1), help="SAFE steps timed per epoch.")
@click.option("--safe-batch", default=64, type=click.IntRange(min=1))
@click.option("--max-memory", default="4GiB", callback=_bytes,
              help="fit-safe --max-memory: the in-memory side loads the smallest set (or its first maps that fit); "
                   "the streaming side streams the largest.")
@click.option("--ape-curve", default="100x1000,1000x500,1000x1000,1000x2000",
              help="APE search points CLASSESxVAL, on the cache's features.")
@click.option("--methods", default="zeroshot,tip,ape,gda", help="Methods `eval` runs on the largest set.")
@click.option("--top-k", default=500, type=click.IntRange(min=1), help="APE's Q in the curve.")
@click.option("--rn50-sample", default=8, type=click.IntRange(min=0),
              help="RN50 forward passes timed (224 px) to price a real extraction of the cache; 0: skip.")
@click.option("--device", default="cpu", help="Device of SAFE and eval (extract runs the stand-in on the CPU).")
@click.option("--seed", default=0, type=int)
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Folder for the images, the cache and the logs (default: a temporary folder, removed).")
@click.option("--keep", is_flag=True, help="With --workdir: keep the cache afterwards.")
@_common
def scale_cmd(**kw):
    """Scale rehearsal: an ImageNet-shaped cache through the real writer with a stand-in encoder; write speed
    vs a raw write, peak RSS and disk, SIGKILL + resume, verify, info, SAFE in memory vs streaming, eval at
    C=1000 and APE's search curve (docs/scale.md)."""
    from cachekit.bench import bench_scale

    return bench_scale(**kw)


@bench.command("search", context_settings=CONTEXT)
@click.option("--classes", default=100, type=click.IntRange(min=2))
@click.option("--val", default=1000, type=click.IntRange(min=2))
@click.option("--shots", default=16, type=click.IntRange(min=1))
@click.option("--dim", default=1024, type=click.IntRange(min=1))
@click.option("--top-k", default=500, type=click.IntRange(min=1))
@click.option("--device", default="cuda", help="cuda[:N] (or cpu).")
@click.option("--repeats", default=5, type=click.IntRange(min=1))
@click.option("--cpu-baseline/--no-cpu-baseline", default=True, help="Also time the search on the CPU.")
@click.option("--seed", default=0, type=int)
@_common
def search_cmd(**kw):
    """A full 80,000-point APE search with its tensors on a device vs on the CPU (target on one GPU at
    C=100, 1,000 val: <= 0.1 s)."""
    from cachekit.bench import bench_search

    return bench_search(**kw)


@bench.command("gpu", context_settings=CONTEXT)
@click.option("--device", default="cuda", help="cuda[:N]; cpu only with --tiny.")
@click.option("--tiny", is_flag=True, help="Dry run: toy sizes and models (seconds, any device).")
@click.option("--workers", default=8, type=click.IntRange(min=0), help="DataLoader workers of extract/safe.")
@_common
@_writes_docs
def gpu_cmd(**kw):
    """Every GPU measurement (make bench-gpu): extract vs bare forward, SAFE epoch, APE search at C=100 and
    C=1000, a small scale rehearsal on the device; --docs writes each section (gpu-*) and the targets (gpu)."""
    from cachekit.bench import bench_gpu

    return bench_gpu(**kw)


COMMANDS = [bench]
