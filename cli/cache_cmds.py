"""extract / info / verify."""
from __future__ import annotations

import sys

import click

from .common import CONTEXT, emit_json, friendly, int_list, note, printable, progress_view, table


@click.command(context_settings=CONTEXT)
@click.argument("data")
@click.option("--model", default="RN50", help="open_clip ResNet CLIP name (RN50, RN101, RN50x4, ..., RN-tiny).")
@click.option("--pretrained", type=click.Path(dir_okay=False), default=None,
              help="Local checkpoint (OpenAI .pt or open_clip state dict). Without: seeded random weights.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Cache file to write, e.g. cache/NAME.h5.")
@click.option("--shots", default="1,2,4,8,16", callback=int_list, help="Few-shot sizes K.")
@click.option("--seeds", default="1,2,3", callback=int_list, help="Few-shot sampling seeds.")
@click.option("--views", default=10, type=click.IntRange(min=0), help="Augmented views per train image (plus one plain view).")
@click.option("--templates", default=None, help="Template set name (photo, imagenet, dtd, ...) or a file, one per line.")
@click.option("--image-root", type=click.Path(file_okay=False), default=None, help="Image folder for split files / manifests.")
@click.option("--classnames", type=click.Path(dir_okay=False, readable=False), default=None,
              help="File with one class name per line.")
@click.option("--device", default="cpu", help="cpu or cuda[:N].")
@click.option("--batch-size", default=64, type=click.IntRange(min=1))
@click.option("--workers", default=0, type=click.IntRange(min=0), help="DataLoader worker processes.")
@click.option("--dense-dtype", default="float16", type=click.Choice(["float16", "float32"]))
@click.option("--amp-dtype", default="float16", type=click.Choice(["float16", "bfloat16"]),
              help="Autocast dtype on CUDA (CPU always runs float32).")
@click.option("--decode", default="pil", type=click.Choice(["pil", "device"]),
              help="device: decode the JPEGs of the plain view (val, test, train view 0) with "
                   "torchvision.io.decode_jpeg on --device (nvJPEG on CUDA) and preprocess them there; "
                   "other files and the augmented views use Pillow. Pixels differ from pil by about 1/255.")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images in the cache and continue.")
@click.option("--overwrite", is_flag=True, help="Discard an existing cache or unfinished run and start afresh.")
@click.option("--init-seed", default=0, type=int, help="Seed of the random init when no --pretrained.")
@click.option("--aug-seed", default=0, type=int, help="Seed of the augmented views.")
@click.option("--val-fraction", default=0.2, type=click.FloatRange(0, 1, max_open=True))
@click.option("--test-fraction", default=0.3, type=click.FloatRange(0, 1, max_open=True))
@click.option("--split-seed", default=1, type=int, help="Seed for carving val/test when DATA has none.")
@click.option("--num-shards", default=1, type=click.IntRange(min=1),
              help="Split the work over this many processes (under torchrun: set automatically).")
@click.option("--shard-index", default=0, type=click.IntRange(min=0), help="This process's shard, 0-based.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@friendly
def extract(data, as_json, quiet, **kw):
    """Run CLIP once over DATA and write every feature the methods need into one HDF5 cache.

    DATA is an ImageFolder tree (class folders, optionally under train/ val/ test/), a CoOp split
    JSON (with --image-root) or a CSV/JSONL manifest with columns path,label,split. Rerunning an
    interrupted command resumes it.

    Several GPUs or nodes (shared filesystem): torchrun --nproc-per-node N -m cachekit extract ...
    Each rank encodes its share of the batches; rank 0 assembles the one cache.
    """
    from cachekit.extraction import ExtractOptions, extract as run

    view = progress_view(quiet, as_json)
    try:
        res = run(ExtractOptions(data=data, progress=view, **kw))
    finally:
        view.close()
    if as_json:
        emit_json(res)
    else:
        if res.get("weights"):
            note(f"weights: {res['weights']}")
        for name, classes in (res.get("with_replacement") or {}).items():
            note(f"NOTE: few-shot set {name}: {len(classes)} class(es) have fewer images than K and were "
                 f"sampled with replacement: {', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''}")
        if res.get("bad_images"):
            note(f"NOTE: {res['bad_images']} unreadable image(s) skipped and recorded in the cache (cachekit info --json)")
        click.echo(f"{res['status']}: {printable(res['cache'])}")


@click.command(context_settings=CONTEXT)
@click.argument("cache", type=click.Path(dir_okay=False, readable=False))
@click.option("--json", "as_json", is_flag=True)
@friendly
def info(cache, as_json):
    """Show what is inside CACHE: splits, views, shapes, dtypes, sizes and provenance."""
    from cachekit.cache import open_cache
    from cachekit.info import describe

    with open_cache(cache) as c:
        d = describe(c)
    if as_json:
        emit_json(d)
        return
    click.echo(f"{printable(d['path'])}  ({d['file_bytes'] / 2**20:.1f} MiB)")
    click.echo(f"model {d['model']}: {d['weights']}")
    click.echo(f"classes {d['classes']}, embed dim {d['embed_dim']}, dense map {'x'.join(map(str, d['dense_shape']))}, "
               f"{d['views']} augmented views + 1 plain")
    click.echo(f"few-shot sets: shots {d['shots']} x seeds {d['seeds']}")
    rows = [[s, v["images"], v["views"], "x".join(map(str, v["dense"]["shape"])), v["dense"]["dtype"],
             f"{v['dense']['bytes'] / 2**20:.1f} MiB", "x".join(map(str, v["pooled"]["shape"])) + " " + v["pooled"]["dtype"]]
            for s, v in d["splits"].items()]
    click.echo(table(rows, ["split", "images", "views", "dense", "dtype", "size", "pooled"]))
    if d["val_is_test"]:
        click.echo("NOTE: test is the same data as val (no separate test split).")
    if d["bad_images"]:
        click.echo(f"{d['bad_images']} unreadable image(s) recorded and skipped (see --json).")
    p = d["provenance"]
    click.echo(f"built {p['created']} by cachekit {p['cachekit_version']} (open_clip {p['open_clip_version']}, "
               f"torch {p['torch_version']}); dataset fingerprint {p['dataset_fingerprint'][:16]}")


@click.command(context_settings=CONTEXT)
@click.argument("cache", type=click.Path(dir_okay=False, readable=False))
@click.option("--sample", default=32, type=click.IntRange(min=1), help="Rows per split for the attnpool check.")
@click.option("--quick", is_flag=True, help="Skip hashing and the NaN/Inf scan of the large datasets (dense maps, "
              "pooled features); the output lists what was skipped.")
@click.option("--json", "as_json", is_flag=True)
@friendly
def verify(cache, sample, quick, as_json):
    """Check CACHE against its schema: every group, dataset and attribute present with its dtype, shape
    and type (JSON attributes parse), attributes as written, every dataset's sha256, NaN/Inf, and that the
    stored attention-pooling weights applied to the stored dense maps reproduce the stored pooled
    features. Every problem is named."""
    from cachekit.cache import Cache
    from cachekit.verify import verify as run

    with Cache(cache, check=False) as c:  # verify reports missing parts itself, one by one
        rep = run(c, sample=sample, full=not quick)
    if as_json:
        emit_json(rep.to_dict())
    else:
        for chk in rep.checks:
            tag = "FAIL" if not chk["ok"] else ("skip" if chk.get("skipped") is True else "ok  ")
            click.echo(f"{tag} {chk['check']}: {chk['detail']}")
    if not rep.ok:
        names = ", ".join(c["check"] for c in rep.failed)
        click.echo(f"Error: cache {printable(cache)} failed: {names}; fix: rebuild it with `cachekit extract "
                   "--overwrite`", err=True)
        sys.exit(1)


COMMANDS = [extract, info, verify]
