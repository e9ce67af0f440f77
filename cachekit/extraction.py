"""`cachekit extract`: run a ResNet CLIP once over a dataset into one self-contained HDF5 cache.

Durability: work is cut into units (one batch of one split and view). Each finished unit is
written to `OUT.parts/seg-*.h5` and published atomically; a rerun of the same command skips the
published units. When every unit exists, the cache is assembled into `OUT.tmp` and renamed onto
`OUT`. A kill at any moment therefore loses at most the batches in flight, and `OUT` is never
half-written.

The cache's layout is `cachekit.schema`; the assembly writes it through that module's names and
helpers (`set_attrs`, `write_dataset`, `Checksum`, `seal`) and checks the result against it before
publishing.

Callbacks (the library never prints): `ExtractOptions.progress` receives `cachekit.progress.Step`
reports ("check train images", "extract"); `ExtractOptions.on_unit` is called after each unit's
segment is published (see ExtractOptions).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import queue
import traceback
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from . import __version__
from . import schema as S
from .augment import AugmentedView, plain_transform
from .cache import read_identity
from .data import (MAX_FEWSHOT_ROWS, _display, _file_problem, _gib, _text_problem, available_memory, check_image,
                   jpeg_bytes, load_dataset, load_image, sample_fewshot)
from .errors import BadImageError, CacheInUseError, CachekitError
from .models import attnpool_params, dense_and_pooled, encode_templates, load_model, text_classifier
from .progress import Counter, Progress
from .schema import Attr, AttnpoolAttr, FewshotAttr, SplitAttr, TextAttr
from .store import WriterLock, check_space, os_errors, publish, tmp_path, unique_tmp_path, write_json_atomic
from .templates import resolve_templates

DENSE_DTYPES = S.DENSE_DTYPES
# The parts folder's own small files (not the cache; see cachekit.schema for that): a segment holds one
# unit's maps, pooled features and bad-image reasons; text.h5 the text embeddings; plan.json the identity;
# sample.json the few-shot sets the image check gave (a resume skips the check).
_SEG_DENSE, _SEG_POOLED, _SEG_BAD = "dense", "pooled", "bad"
_TEXT_EMB, _TEXT_TRUNCATED = "embeddings", "truncated_prompts"
_PLAN_IDENTITY = "identity"


@dataclass
class ExtractOptions:
    data: str
    out: str
    model: str = "RN50"
    pretrained: str | None = None
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    views: int = 10
    templates: str | None = None
    image_root: str | None = None
    classnames: str | None = None
    device: str = "cpu"
    batch_size: int = 64
    workers: int = 0
    dense_dtype: str = "float16"
    skip_bad: bool = False
    overwrite: bool = False
    init_seed: int = 0
    aug_seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.3
    split_seed: int = 1
    # Progress reports (cachekit.progress.Step) go here; the CLI passes cli.progress_view.ProgressView.
    # None: nobody listens. A bool is accepted for old callers and means None (the library never prints).
    progress: Progress | None = None
    num_shards: int = 1
    shard_index: int = 0
    amp_dtype: str = "float16"  # autocast dtype on CUDA (float16 or bfloat16); CPU runs in float32
    decode: str = "pil"  # "device": plain-view JPEGs decoded by torchvision.io.decode_jpeg on --device
    # Called after each unit (one batch of one split and view) is published as OUT.parts/seg-*.h5, in the
    # writer thread, with {"split", "view", "start", "stop", "segment", "published", "total"}: `published`
    # units of the `total` this call encodes are on disk. An exception raised here stops the extraction
    # like a kill (published segments stay; the same call again resumes) and reaches the caller of
    # extract(); a test stops after N units that way, and a fault-injection harness sleeps in it.
    on_unit: Callable[[dict], None] | None = field(default=None, repr=False)

    def __post_init__(self):
        if isinstance(self.progress, bool):
            self.progress = None

    def validate(self):
        """Check every option before any work (one CachekitError each); normalises shots and seeds."""
        self.shots = _int_list(self.shots, "--shots", "e.g. --shots 1,2,4,8,16", lo=1, hi=MAX_FEWSHOT_ROWS)
        self.seeds = _int_list(self.seeds, "--seeds", "e.g. --seeds 1,2,3", lo=-INT64_MAX - 1, hi=INT64_MAX)
        _int_opt(self.views, "--views", 0, MAX_VIEWS, "e.g. --views 10")
        _int_opt(self.batch_size, "--batch-size", 1, INT64_MAX, "e.g. --batch-size 64")
        cpus = _cpus()
        _int_opt(self.workers, "--workers", 0, max(8, 4 * cpus), f"at most 4 per CPU ({cpus} here), e.g. --workers {cpus}")
        for name, v in (("--init-seed", self.init_seed), ("--aug-seed", self.aug_seed), ("--split-seed", self.split_seed)):
            _int_opt(v, name, -INT64_MAX - 1, INT64_MAX, "an integer seed, e.g. 0")
        _int_opt(self.num_shards, "--num-shards", 1, INT64_MAX, "e.g. --num-shards 2")
        _int_opt(self.shard_index, "--shard-index", 0, INT64_MAX, "e.g. --shard-index 0")
        if self.dense_dtype not in DENSE_DTYPES:
            raise CachekitError(f"--dense-dtype {self.dense_dtype} is not supported; fix: one of {', '.join(DENSE_DTYPES)}")
        if not isinstance(self.device, str) or not self.device.strip():
            raise CachekitError(f"--device {self.device!r} is not a device; fix: cpu, cuda or cuda:N")
        from .runner import check_device  # the one device check of every command

        check_device(self.device)
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise CachekitError(f"--shard-index {self.shard_index} is outside 0..{self.num_shards - 1}; "
                                "fix: give 0 <= --shard-index < --num-shards")
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise CachekitError(f"--amp-dtype {self.amp_dtype} is not supported; fix: float16 or bfloat16")
        if self.decode not in ("pil", "device"):
            raise CachekitError(f"--decode {self.decode} is not supported; fix: pil or device")
        if self.overwrite and self.num_shards > 1:
            raise CachekitError("--overwrite cannot be combined with --num-shards (one shard would wipe the "
                                "others' work); fix: delete the old cache first, then start the shards")
        self._check_paths()
        self.shots = tuple(sorted(set(self.shots)))
        self.seeds = tuple(sorted(set(self.seeds)))

    def _check_paths(self):
        """Path options: UTF-8 text (they are stored in the cache), a readable checkpoint file, and an --out
        whose files (OUT, OUT.tmp, OUT.parts/, OUT.lock and, with --overwrite, the results folder) are none
        of the inputs and hold none of them."""
        for name, v in (("DATA", self.data), ("--out", self.out), ("--image-root", self.image_root),
                        ("--classnames", self.classnames), ("--templates", self.templates),
                        ("--pretrained", self.pretrained)):
            if v is None:
                continue
            if not isinstance(v, (str, os.PathLike)) or not str(v).strip():
                raise CachekitError(f"{name} {v!r} is not a path; fix: give a file or folder path")
            problem = _text_problem(os.fspath(v))
            if problem:
                raise CachekitError(f"{name} {_display(v)} {problem}; fix: rename it or choose another path "
                                    "(cachekit stores paths as UTF-8 text)")
        if self.pretrained is not None:
            problem, _ = _file_problem(self.pretrained)
            if problem:
                raise CachekitError(f"--pretrained {self.pretrained}: {problem}; fix: pass a readable checkpoint "
                                    "file (OpenAI .pt or an open_clip state dict)")
        out = Path(os.path.abspath(os.fspath(self.out)))
        if out.is_dir():
            raise CachekitError(f"--out {out} is a folder; fix: give the cache file path, e.g. {out}/cache.h5")
        inputs = [("DATA", self.data), ("--image-root", self.image_root), ("--classnames", self.classnames),
                  ("--pretrained", self.pretrained)]
        if self.templates is not None and os.path.isfile(self.templates):
            inputs.append(("--templates", self.templates))
        writes = [(out, "--out"), (tmp_path(out), "its temporary file"), (_parts_dir(out), "its parts folder"),
                  (Path(f"{out}.lock"), "its lock file")]
        if self.overwrite:
            writes.append((out.with_suffix(".results"), "its results folder (removed by --overwrite)"))
        for w, what in writes:
            wr = os.path.realpath(w)
            for label, path in inputs:
                if path is None:
                    continue
                pr = os.path.realpath(os.fspath(path))
                if pr == wr or pr.startswith(wr.rstrip(os.sep) + os.sep):
                    rel = "is" if pr == wr else "holds"
                    subject = f"--out {self.out}" if what == "--out" else f"--out {self.out}: {what} {w}"
                    raise CachekitError(f"{subject} {rel} the {label} this command reads; fix: choose another "
                                        "--out path")


INT64_MAX = 2**63 - 1
#: Most augmented views per train image (each is a full encode of every train image).
MAX_VIEWS = 10_000


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _int_opt(v, name: str, lo: int, hi: int, fix: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise CachekitError(f"{name} {v!r} is not an integer; fix: {fix}")
    if not lo <= int(v) <= hi:
        raise CachekitError(f"{name} {v} is out of range {lo}..{hi}; fix: {fix}")
    return int(v)


def _int_list(values, name: str, fix: str, lo: int, hi: int) -> tuple[int, ...]:
    if values is None or isinstance(values, (str, bytes)):
        raise CachekitError(f"{name} {values!r} is not a list of integers; fix: {fix}")
    try:
        values = list(values)
    except TypeError:
        raise CachekitError(f"{name} {values!r} is not a list of integers; fix: {fix}") from None
    if not values:
        raise CachekitError(f"{name} names no value; fix: {fix}")
    return tuple(_int_opt(v, name, lo, hi, fix) for v in values)


#: Memory estimates for _check_resources: a plan entry (a tuple in a list, a str reference, the batch
#: index lists) and a batch's activations relative to its input tensor (ResNet stems are widest).
_PLAN_BYTES_PER_ROW = 200
_ACTIVATION_FACTOR = 24


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _unit_name(split: str, view: int, start: int) -> str:
    return f"seg-{split}-v{view:03d}-{start:09d}.h5"


class _Rows(torch.utils.data.Dataset):
    """One entry per (image, view); returns (tensor, error reason or '', entry index).

    With raw_jpeg, a plain view of a JPEG comes back undecoded (a 1-D uint8 tensor of the file's bytes) for
    `_device_plain` to decode and preprocess on the device."""

    def __init__(self, root: Path, entries: list[tuple[str, int]], plain, aug, aug_seed: int, size: int,
                 raw_jpeg: bool = False):
        self.root, self.entries, self.plain, self.aug = root, entries, plain, aug
        self.aug_seed, self.size, self.raw_jpeg = aug_seed, size, raw_jpeg

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        rel, view = self.entries[i]
        if view == 0 and self.raw_jpeg:
            data = jpeg_bytes(self.root / rel)
            if data is not None:
                return torch.from_numpy(data), "", i
        return (*self.decoded(i), i)

    def decoded(self, i) -> tuple[torch.Tensor, str]:
        """Entry i decoded by Pillow and transformed: (tensor, ''), or (zeros, reason) for a bad image."""
        rel, view = self.entries[i]
        try:
            img = load_image(self.root / rel)
        except BadImageError as exc:
            return torch.zeros(3, self.size, self.size), exc.reason
        return (self.plain(img) if view == 0 else self.aug(img, self.aug_seed, rel, view)), ""


def _sample_sets(spec, opts: ExtractOptions, progress: Progress | None):
    """Few-shot sets for every (K, seed); with --skip-bad, unreadable train images are dropped
    from the pool and the sets resampled until every sampled image decodes."""
    train = spec.splits["train"]
    C = len(spec.classnames)
    alive = np.arange(len(train))
    bad: dict[str, str] = {}
    checked: set[int] = set()
    while True:
        items = [train[i] for i in alive]
        sets = {}
        for k in opts.shots:
            for s in opts.seeds:
                fs = sample_fewshot(items, C, k, s)
                sets[(k, s)] = (alive[fs.indices], list(fs.with_replacement))
        union = sorted({int(i) for pos, _ in sets.values() for i in pos})
        todo = [i for i in union if i not in checked]
        bar = Counter(progress, "check train images", total=len(todo), unit="img")
        reasons = []
        with ThreadPoolExecutor(max(1, opts.workers)) as pool:
            for r in pool.map(lambda i: check_image(spec.root / train[i].path), todo):
                reasons.append(r)
                bar.advance()
        bar.close()
        checked.update(todo)
        new_bad = [(i, r) for i, r in zip(todo, reasons) if r]
        if not new_bad:
            return sets, np.asarray(union, dtype=np.int64), bad
        if not opts.skip_bad:
            i, r = new_bad[0]
            raise BadImageError(spec.root / train[i].path, r)
        for i, r in new_bad:
            bad[train[i].path] = r
        drop = {i for i, _ in new_bad}
        alive = np.asarray([i for i in alive if i not in drop], dtype=np.int64)


def _save_sample(path: Path, ident: dict, sets, train_rows, bad_train) -> None:
    """OUT.parts/sample.json: the few-shot sets the checked train images gave, so a resumed run skips the check
    (minutes at ImageNet size)."""
    obj = {_PLAN_IDENTITY: ident, "train_rows": [int(i) for i in train_rows], "bad_train": dict(bad_train),
           "sets": [[int(k), int(s), [int(i) for i in pos], [int(c) for c in repl]]
                    for (k, s), (pos, repl) in sets.items()]}
    write_json_atomic(path, obj)


def _load_sample(path: Path, ident: dict, opts: ExtractOptions, n_train: int):
    """The stored sets when they were made for exactly this identity (dataset fingerprint included) and are
    well-formed; else None, and the images are checked again."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(obj, dict) or obj.get(_PLAN_IDENTITY) != ident:
            return None
        sets = {(int(k), int(s)): (np.asarray(pos, dtype=np.int64), [int(c) for c in repl])
                for k, s, pos, repl in obj["sets"]}
        rows = np.asarray(obj["train_rows"], dtype=np.int64)
        bad = {str(p): str(r) for p, r in obj["bad_train"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if bad and not opts.skip_bad:
        return None  # drawn around broken images under --skip-bad: without it, the check must run and refuse
    every = [rows] + [pos for pos, _ in sets.values()]
    if set(sets) != {(k, s) for k in opts.shots for s in opts.seeds} or any(
            a.ndim != 1 or (a.size and (a.min() < 0 or a.max() >= n_train)) for a in every):
        return None
    if any(not set(pos.tolist()) <= set(rows.tolist()) for pos, _ in sets.values()):
        return None
    return sets, rows, bad


def _identity(opts, spec, bundle, templates) -> dict:
    """Everything that changes a cache's contents; a rerun must match it exactly to resume."""
    return {
        "model": bundle.name,
        "checkpoint_sha256": bundle.checkpoint_sha256,
        "init_seed": bundle.init_seed if bundle.random_weights else None,
        "dataset_fingerprint": spec.fingerprint(),
        "shots": list(opts.shots),
        "seeds": list(opts.seeds),
        "views": opts.views,
        "templates": templates,
        "dense_dtype": opts.dense_dtype,
        "aug_seed": opts.aug_seed,
        "split": {"val_fraction": opts.val_fraction, "test_fraction": opts.test_fraction,
                  "split_seed": opts.split_seed},
        "preprocess": bundle.preprocess_cfg,
        # Mixing batches computed under different arithmetic would make a cache no single run makes.
        "precision": f"amp-{opts.amp_dtype}" if opts.device.startswith("cuda") else "float32",
        # Device decoding resizes tensors, not PIL images: pixels differ (a fifth of a level of 255 on average).
        **({"decode": f"torchvision.io.decode_jpeg on {opts.device.split(':')[0]}"}
           if opts.decode == "device" else {}),
    }


def _read_plan(path: Path) -> dict | None:
    """OUT.parts/plan.json, or None when it cannot be read as the plan extract writes."""
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    ok = (isinstance(plan, dict) and isinstance(plan.get(_PLAN_IDENTITY), dict)
          and isinstance(plan.get("batch_size"), int) and not isinstance(plan.get("batch_size"), bool)
          and plan["batch_size"] >= 1)
    return plan if ok else None


def _mismatch(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(keys)


def _shard(opts) -> tuple[str, int, int]:
    """(mode, index, count): 'single'; 'torchrun' (one rank per process, from torchrun's env);
    or 'manual' (--num-shards/--shard-index, e.g. a SLURM array: the last shard to finish assembles)."""
    if opts.num_shards > 1:
        return "manual", opts.shard_index, opts.num_shards
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return "torchrun", int(os.environ.get("RANK", "0")), world
    return "single", 0, 1


def extract(opts: ExtractOptions) -> dict:
    """Run the extraction described by `opts`; returns a JSON-able summary."""
    opts.validate()
    mode, rank, world = _shard(opts)
    if mode == "torchrun":
        return _extract_torchrun(opts, rank, world)
    out = Path(opts.out)
    job = _Job(opts)
    if mode == "single":
        with WriterLock(out):
            done = job.prepare(opts.overwrite)
            if done:
                return done
            job.encode(job.units)
            return job.finish()
    # manual shard: lock only this shard while encoding; assemble if it is the last one done.
    with WriterLock(Path(f"{out}.shard{rank}")):
        done = job.prepare(overwrite=False)
        if done:
            return done
        job.encode(job.units[rank::world])
    if not job.all_units_done():
        return {"cache": str(out), "status": f"shard {rank}/{world} done; the last shard to finish assembles"}
    try:
        with WriterLock(out):
            return {"cache": str(out), "status": "already complete"} if out.exists() else job.finish()
    except CacheInUseError:
        return {"cache": str(out), "status": f"shard {rank}/{world} done; another shard is assembling"}


def _extract_torchrun(opts, rank: int, world: int) -> dict:
    """torchrun: rank 0 checks and plans, every rank encodes units[rank::world], rank 0 assembles."""
    import torch.distributed as dist

    cuda = opts.device.startswith("cuda")
    if cuda:
        opts.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(opts.device)
    dist.init_process_group("nccl" if cuda else "gloo")
    lock = WriterLock(Path(opts.out)) if rank == 0 else contextlib.nullcontext()
    try:
        with lock:
            job = _Job(opts)
            status = [None]
            if rank == 0:
                try:
                    status[0] = job.prepare(overwrite=opts.overwrite) or "go"
                except CachekitError as exc:
                    status[0] = exc
            dist.broadcast_object_list(status, src=0)
            if isinstance(status[0], CachekitError):
                raise status[0]
            if status[0] != "go":
                return status[0]
            if rank != 0:
                job.prepare(overwrite=False)
            job.encode(job.units[rank::world])
            dist.barrier()
            res = [job.finish() if rank == 0 else None]
            dist.broadcast_object_list(res, src=0)
            return {**res[0], "rank": rank, "world_size": world}
    finally:
        dist.destroy_process_group()


class _Job:
    """One extraction: dataset, model, plan (units), and the parts folder they are written to."""

    def __init__(self, opts: ExtractOptions):
        self.opts = opts
        self.out = Path(opts.out)
        self.parts = _parts_dir(self.out)
        self.spec = load_dataset(opts.data, image_root=opts.image_root, classnames_file=opts.classnames,
                                 val_fraction=opts.val_fraction, test_fraction=opts.test_fraction,
                                 split_seed=opts.split_seed)
        self.tmpl_label, self.templates = resolve_templates(opts.templates)
        self._check_request()
        with os_errors(str(self.out.parent)):
            self.out.parent.mkdir(parents=True, exist_ok=True)

    def _check_request(self):
        """What depends on the dataset, before any model or allocation: the few-shot sets' size, and an
        --out that is none of the dataset's images."""
        spec, opts = self.spec, self.opts
        C = spec.num_classes
        for k in opts.shots:
            if k * C > MAX_FEWSHOT_ROWS:
                raise CachekitError(f"--shots {k}: a {k}-shot set of {C} classes would hold {k * C:,} rows, over the "
                                    f"limit of {MAX_FEWSHOT_ROWS:,} (cachekit.data.MAX_FEWSHOT_ROWS); fix: use K <= "
                                    f"{MAX_FEWSHOT_ROWS // C:,}")
        out = os.path.realpath(self.out)
        root = os.path.realpath(spec.root)
        if out.startswith(root.rstrip(os.sep) + os.sep):
            rel = Path(os.path.relpath(out, root)).as_posix()
            if any(it.path == rel for s in spec.splits.values() for it in s):
                raise CachekitError(f"--out {self.out} is an image of the dataset this command reads; "
                                    "fix: choose another --out path")

    def _check_resources(self, row_items: dict, B: int):
        """Refuse, before encoding, a run that cannot fit: the disk at --out (segments, then the assembled
        cache beside them), the memory of the plan (one entry per image and view) and of one batch."""
        opts, bundle = self.opts, self.bundle
        ap = bundle.visual.attnpool
        HW1, Cd = ap.positional_embedding.shape
        D = ap.c_proj.out_features
        dense_row = Cd * (HW1 - 1) * np.dtype(opts.dense_dtype).itemsize
        rows = sum(len(items) * (opts.views + 1 if split == "train" else 1) for split, items in row_items.items())
        seg_bytes = rows * (dense_row + D * 4)
        done = sum(p.stat().st_size for p in self.parts.glob("seg-*.h5")) if self.parts.exists() else 0
        ap_bytes = sum(p.numel() * 4 for p in ap.parameters())
        check_space(self.out.parent, max(0, seg_bytes - done) + seg_bytes + ap_bytes + (1 << 20),
                    f"{self.out} (the batches in {self.parts.name}/, then the assembled cache beside them)")
        have = available_memory()
        plan = rows * _PLAN_BYTES_PER_ROW
        if plan > have // 2:
            raise CachekitError(f"the plan holds {rows:,} (image, view) rows: about {_gib(plan)} of memory, "
                                f"{_gib(have)} are available (limit: half); fix: fewer --views or fewer images")
        S = bundle.image_size
        b = min(B, max(len(items) for items in row_items.values()))
        per_image = 3 * S * S * 4 * (_ACTIVATION_FACTOR + 2 * opts.workers) + Cd * (HW1 - 1) * 4 * 6
        if b * per_image > have:
            fix = (f"use --batch-size {have // per_image} or less" if have >= per_image else
                   "free memory or use a machine with more (even one image does not fit)")
            raise CachekitError(f"--batch-size {B} needs about {_gib(b * per_image)} of memory for one batch of {b} "
                                f"images (estimate), {_gib(have)} are available; fix: {fix}")
        if opts.device.startswith("cuda"):
            free, _total = torch.cuda.mem_get_info(torch.device(opts.device))
            gpu = b * 3 * S * S * 4 * _ACTIVATION_FACTOR // 2  # autocast: half-precision activations
            if gpu > free:
                raise CachekitError(f"--batch-size {B} needs about {_gib(gpu)} of GPU memory for one batch "
                                    f"(estimate), {_gib(free)} are free on {opts.device}; fix: use --batch-size "
                                    f"{max(1, B * free // gpu)} or less")

    def _check_plan(self, plan_path: Path, ident: dict) -> dict:
        """The unfinished run's plan, refused in one line when damaged or made for other settings."""
        plan = _read_plan(plan_path)
        if plan is None:
            raise CachekitError(f"unfinished extraction in {self.parts} has a damaged plan ({plan_path.name}); "
                                "fix: pass --overwrite to start afresh")
        if plan[_PLAN_IDENTITY] != ident:
            raise CachekitError(f"unfinished extraction in {self.parts} was started with a different "
                                f"{_mismatch(plan[_PLAN_IDENTITY], ident)}; fix: rerun it with the same options, "
                                "or pass --overwrite to start afresh")
        return plan

    def prepare(self, overwrite: bool) -> dict | None:
        """Load the model, check an existing cache or unfinished run, write the plan and text
        embeddings. Returns a summary when there is nothing left to do."""
        opts, out, parts = self.opts, self.out, self.parts
        if overwrite:
            for p in (out, tmp_path(out)):
                p.unlink(missing_ok=True)
            shutil.rmtree(out.with_suffix(".results"), ignore_errors=True)
        self.bundle = bundle = load_model(opts.model, opts.pretrained, init_seed=opts.init_seed, device=opts.device)
        self.ident = ident = _identity(opts, self.spec, bundle, self.templates)
        plan_path = parts / "plan.json"
        if overwrite and plan_path.exists() and (_read_plan(plan_path) or {}).get(_PLAN_IDENTITY) != ident:
            # An unfinished run of these very settings is kept, so an interrupted --overwrite resumes.
            shutil.rmtree(parts, ignore_errors=True)
        if out.exists():
            try:
                old = read_identity(out)
            except (CachekitError, KeyError, ValueError) as exc:
                reason = str(exc).split(";")[0]
                raise CachekitError(f"--out {out} exists and is not a readable cachekit cache ({reason}); "
                                    "fix: choose another --out, or pass --overwrite to replace it") from None
            if old != ident:
                raise CachekitError(f"{out} exists and was built with a different {_mismatch(old, ident)}; "
                                    "fix: choose another --out, or pass --overwrite to rebuild it")
            # A kill between the final rename and the clean-up leaves the (now useless) segments.
            shutil.rmtree(parts, ignore_errors=True)
            return {"cache": str(out), "status": "already complete", "weights": bundle.weights_label}

        spec = self.spec
        plan = self._check_plan(plan_path, ident) if plan_path.exists() else None
        sample_path = parts / "sample.json"
        stored = _load_sample(sample_path, ident, opts, len(spec.splits["train"])) if plan else None
        self.sample_reused = stored is not None
        self.sets, self.train_rows, self.bad_train = stored or _sample_sets(spec, opts, opts.progress)
        row_items = {"train": [spec.splits["train"][i] for i in self.train_rows], "val": spec.splits["val"]}
        if not spec.val_is_test:
            row_items["test"] = spec.splits["test"]
        for split in row_items:
            if not row_items[split]:
                raise CachekitError(f"split {split} has no images; fix: add images to it or let cachekit carve it")
        self.row_items = row_items

        # Units: one batch of one (split, view), in a fixed order so resumed runs batch identically.
        B = opts.batch_size if plan is None else plan["batch_size"]
        self._check_resources(row_items, B)
        if plan is None:
            with os_errors(str(parts)):
                parts.mkdir(parents=True, exist_ok=True)
                write_json_atomic(plan_path, {_PLAN_IDENTITY: ident, "batch_size": B, "cachekit_version": __version__})
        if not self.sample_reused:
            with os_errors(str(parts)):
                _save_sample(sample_path, ident, self.sets, self.train_rows, self.bad_train)
        self.units, self.entries = [], []
        for split, items in row_items.items():
            for view in range(opts.views + 1 if split == "train" else 1):
                for start in range(0, len(items), B):
                    stop = min(start + B, len(items))
                    idx = list(range(len(self.entries), len(self.entries) + stop - start))
                    self.entries.extend((it.path, view) for it in items[start:stop])
                    self.units.append((split, view, start, stop, idx))

        # Text embeddings: one small unit of their own (identical whoever writes it).
        text_path = parts / "text.h5"
        if not text_path.exists():
            emb, truncated = encode_templates(bundle, spec.classnames, self.templates, device=opts.device)
            check_space(parts, emb.numel() * 4 + (64 << 10), str(text_path))
            tmp = unique_tmp_path(text_path)
            with os_errors(str(text_path)), h5py.File(tmp, "w") as f:
                f[_TEXT_EMB] = emb.numpy()
                f.attrs[_TEXT_TRUNCATED] = truncated
            publish(tmp, text_path)
        return None

    def _done(self, u) -> bool:
        return (self.parts / _unit_name(*u[:3])).exists()

    def all_units_done(self) -> bool:
        return all(self._done(u) for u in self.units)

    def encode(self, units):
        todo = [u for u in units if not self._done(u)]
        total = sum(u[3] - u[2] for u in units)
        if todo:
            _encode_units(self.opts, self.parts, self.spec, self.bundle, self.entries, todo,
                          total - sum(u[3] - u[2] for u in todo), total)

    def finish(self) -> dict:
        summary = _assemble(self.opts, self.out, self.parts, self.spec, self.bundle, self.ident, self.tmpl_label,
                            self.templates, self.units, self.row_items, self.sets, self.train_rows, self.bad_train)
        shutil.rmtree(self.parts, ignore_errors=True)
        return summary


def _collate(batch):
    """Stack the decoded views; a batch holding raw JPEG bytes stays a list (decoded on the device)."""
    xs, reasons, idx = zip(*batch)
    x = torch.stack(xs) if all(t.dim() == 3 for t in xs) else list(xs)
    return x, list(reasons), torch.tensor(idx)


def _device_plain(xs: list, rows: _Rows, device: str, idx, reasons: list) -> torch.Tensor:
    """Decode the raw JPEGs of a batch with torchvision.io.decode_jpeg on `device` (nvJPEG on CUDA, one
    batched call), then the same plain preprocessing on the device; already decoded views are moved there.
    If the device decoder refuses the batch, its JPEGs are decoded by Pillow instead (which names a broken one)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [j for j, t in enumerate(xs) if t.dim() == 1]
    out = list(xs)
    try:
        for j, img in zip(raw, decode_jpeg([xs[j] for j in raw], mode=ImageReadMode.RGB, device=device)):
            out[j] = rows.plain(img)
    except RuntimeError:
        for j in raw:
            out[j], reasons[j] = rows.decoded(int(idx[j]))
    return torch.stack([t.to(device, non_blocking=True) for t in out])


def _encode_units(opts, parts, spec, bundle, entries, todo, done_images, total_images):
    size = bundle.image_size
    pre = bundle.preprocess_cfg
    plain = plain_transform(size, pre["mean"], pre["std"])
    aug = AugmentedView(size, pre["mean"], pre["std"])
    dataset = _Rows(spec.root, entries, plain, aug, opts.aug_seed, size, raw_jpeg=opts.decode == "device")
    cuda = opts.device.startswith("cuda")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[u[4] for u in todo], collate_fn=_collate,
                                         num_workers=opts.workers, pin_memory=cuda)
    it = iter(loader)  # workers fork here, before the writer thread touches h5py
    visual = bundle.visual
    if cuda:
        visual = visual.to(memory_format=torch.channels_last)

    q: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []
    published = [0]

    def writer():
        while True:
            job = q.get()
            if job is None:
                return
            if failure:
                continue
            (split, view, start, stop), dense, pooled, reasons = job
            try:
                final = parts / _unit_name(split, view, start)
                tmp = tmp_path(final)
                check_space(parts, dense.nbytes + pooled.nbytes + (64 << 10), str(final))
                with os_errors(str(final)), h5py.File(tmp, "w") as f:
                    f.create_dataset(_SEG_DENSE, data=dense)
                    f.create_dataset(_SEG_POOLED, data=pooled)
                    f[_SEG_BAD] = np.asarray(reasons, dtype=h5py.string_dtype())
                with os_errors(str(final)):
                    publish(tmp, final)
                published[0] += 1
                if opts.on_unit is not None:
                    opts.on_unit({"split": split, "view": view, "start": start, "stop": stop,
                                  "segment": str(final), "published": published[0], "total": len(todo)})
            except BaseException as exc:  # surfaced in the main thread
                failure.append(exc)

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    bar = Counter(opts.progress, "extract", total=total_images, unit="img", initial=done_images)
    try:
        for (split, view, start, stop, _), (x, reasons, _idx) in zip(todo, it):
            if failure:
                raise failure[0]
            reasons = list(reasons)
            if isinstance(x, list):
                x = _device_plain(x, dataset, opts.device, _idx, reasons)
            if any(reasons):
                j = next(i for i, r in enumerate(reasons) if r)
                path = spec.root / entries[_idx[j]][0]
                if not opts.skip_bad or split == "train":
                    raise BadImageError(path, reasons[j])
            with torch.inference_mode(), torch.autocast("cuda", dtype=getattr(torch, opts.amp_dtype), enabled=cuda):
                x = x.to(opts.device, non_blocking=True)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                dense, pooled = dense_and_pooled(visual, x)
            # torch casts to float16 bit-identically to numpy and ~15x faster; on CUDA it also halves the copy.
            dense = dense.to(getattr(torch, opts.dense_dtype)).cpu().numpy()
            if not np.isfinite(dense).all():
                raise CachekitError(f"dense maps of {split} view {view} are not finite in {opts.dense_dtype}; "
                                    "fix: rerun with --dense-dtype float32")
            q.put(((split, view, start, stop), dense, pooled.float().cpu().numpy(), reasons))
            bar.advance(stop - start)
    finally:
        q.put(None)
        th.join()
        del it
    if failure:
        raise failure[0]
    bar.close()


def _assemble(opts, out, parts, spec, bundle, ident, tmpl_label, templates, units, row_items,
              sets, train_rows, bad_train) -> dict:
    tmp = tmp_path(out)
    # The assembled file is about the segments' size; check before writing a byte of it.
    ap_bytes = sum(p.numel() * 4 for p in bundle.visual.attnpool.parameters())
    check_space(out.parent, sum(p.stat().st_size for p in parts.glob("*.h5")) + ap_bytes + (1 << 20), str(out))
    V = opts.views
    bad_rows: dict[str, list[tuple[str, str]]] = {}

    def write(f):
        ap_params, heads = attnpool_params(bundle.visual)
        with h5py.File(parts / "text.h5", "r") as tf:
            emb = tf[_TEXT_EMB][()]
            truncated = int(tf.attrs[_TEXT_TRUNCATED])
        # Shapes from the first segment.
        with h5py.File(parts / _unit_name(*units[0][:3]), "r") as sf:
            dshape = sf[_SEG_DENSE].shape[1:]
            D = sf[_SEG_POOLED].shape[1]

        for split, items in row_items.items():
            nv = V + 1 if split == "train" else 1
            su = [u for u in units if u[0] == split]
            keep = np.ones(len(items), dtype=bool)
            for (_, view, start, stop, _) in su:
                with h5py.File(parts / _unit_name(split, view, start), "r") as sf:
                    reasons = S.strings(sf[_SEG_BAD])
                for j, r in enumerate(reasons):
                    if r:
                        keep[start + j] = False
                        bad_rows.setdefault(split, []).append((items[start + j].path, r))
            n = int(keep.sum())
            g = f.create_group(S.split_path(split))
            S.write_dataset(g, S.PATHS, [it.path for it, k in zip(items, keep) if k], dtype=S.string_dtype())
            S.write_dataset(g, S.LABELS, np.asarray([it.label for it, k in zip(items, keep) if k], dtype=np.int64))
            if split == "train":
                S.write_dataset(g, S.SOURCE_INDEX, np.asarray(train_rows, dtype=np.int64))
            lead = (nv, n) if split == "train" else (n,)
            one = (1, 1) if split == "train" else (1,)
            dd = g.create_dataset(S.DENSE, shape=lead + dshape, dtype=np.dtype(opts.dense_dtype), chunks=one + dshape)
            pd = g.create_dataset(S.POOLED, shape=lead + (D,), dtype=np.float32)
            # Written in C order (view by view, rows in order), so the checksums stream.
            dh, ph = S.Checksum(dd.dtype, dd.shape), S.Checksum(pd.dtype, pd.shape)
            for view in range(nv):
                row = 0
                for (_, v, start, stop, _) in su:
                    if v != view:
                        continue
                    with h5py.File(parts / _unit_name(split, view, start), "r") as sf:
                        k = keep[start:stop]
                        dense = sf[_SEG_DENSE][()][k]
                        pooled = sf[_SEG_POOLED][()][k]
                    sel = (view, slice(row, row + len(pooled))) if split == "train" else (slice(row, row + len(pooled)),)
                    dd[sel] = dense
                    pd[sel] = pooled
                    dh.update(dense)
                    ph.update(pooled)
                    row += len(pooled)
            S.set_attrs(dd, {S.CHECKSUM: dh.hexdigest()})
            S.set_attrs(pd, {S.CHECKSUM: ph.hexdigest()})
            S.set_attrs(g, {SplitAttr.VIEWS: nv, SplitAttr.NUM_IMAGES: n})
        if spec.val_is_test:
            f[S.split_path("test")] = f[S.split_path("val")]  # a hard link: the same data, stored once

        f.create_group(S.FEWSHOT)
        for (k, s), (pos, repl) in sorted(sets.items()):
            rows = np.searchsorted(train_rows, pos).astype(np.int64)
            ds = S.write_dataset(f, S.fewshot_path(k, s), rows)
            S.set_attrs(ds, {FewshotAttr.K: k, FewshotAttr.SEED: s, FewshotAttr.WITH_REPLACEMENT: list(repl)})

        S.write_dataset(f, S.CLASSNAMES, list(spec.classnames), dtype=S.string_dtype())
        t = f.create_group(S.TEXT)
        S.write_dataset(f, S.TEMPLATES, list(templates), dtype=S.string_dtype())
        S.write_dataset(f, S.EMBEDDINGS, emb)
        S.write_dataset(f, S.CLASSIFIER, text_classifier(torch.from_numpy(emb)).numpy())
        S.set_attrs(t, {TextAttr.TEMPLATE_SET: tmpl_label, TextAttr.TRUNCATED_PROMPTS: truncated})
        f.create_group(S.MODEL)
        S.write_dataset(f, S.LOGIT_SCALE, np.float32(bundle.model.logit_scale.exp().item()))
        ap = f.create_group(S.ATTNPOOL)
        for name, val in ap_params.items():
            S.write_dataset(f, S.attnpool_path(name), val.numpy())
        S.set_attrs(ap, {AttnpoolAttr.NUM_HEADS: heads})
        all_bad = [(s, p, r) for s, rows in bad_rows.items() for p, r in rows]
        all_bad += [("train", p, r) for p, r in sorted(bad_train.items())]
        f.create_group(S.BAD_IMAGES)
        for j, column in enumerate(S.BAD_IMAGE_COLUMNS):
            S.write_dataset(f, S.bad_images_path(column), [x[j] for x in all_bad], dtype=S.string_dtype())

        import open_clip
        pre = bundle.preprocess_cfg
        S.set_attrs(f, {
            Attr.FORMAT: S.FORMAT,
            Attr.SCHEMA_VERSION: S.SCHEMA_VERSION,
            Attr.CACHEKIT_VERSION: __version__,
            Attr.OPEN_CLIP_VERSION: str(open_clip.__version__),
            Attr.TORCH_VERSION: str(torch.__version__),
            Attr.H5PY_VERSION: h5py.__version__,
            Attr.MODEL: bundle.name,
            Attr.CHECKPOINT: bundle.checkpoint,
            Attr.CHECKPOINT_SHA256: bundle.checkpoint_sha256,
            Attr.WEIGHTS: bundle.weights_label,
            Attr.RANDOM_WEIGHTS: bundle.random_weights,
            Attr.INIT_SEED: bundle.init_seed,
            Attr.IMAGE_SIZE: bundle.image_size,
            Attr.PREPROCESS: pre,
            Attr.AUGMENT: {**AugmentedView(bundle.image_size, pre["mean"], pre["std"]).params(),
                           "seed": opts.aug_seed, "views": V, "view0": "plain (val preprocessing)"},
            Attr.VIEWS: V,
            Attr.SHOTS: list(opts.shots),
            Attr.SEEDS: list(opts.seeds),
            Attr.DENSE_DTYPE: opts.dense_dtype,
            Attr.DATASET_FINGERPRINT: spec.fingerprint(),
            Attr.DATASET: spec.describe(),
            Attr.DATASET_FORMAT: spec.source_format,
            Attr.VAL_IS_TEST: bool(spec.val_is_test),
            Attr.IDENTITY: ident,
            Attr.CREATED: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            Attr.EMBED_DIM: int(D),
            Attr.DENSE_SHAPE: list(dshape),
        })
        S.seal(f)
        problems, _ = S.check(f)
        if problems:  # a writer bug: never publish a cache its own reader would refuse
            raise CachekitError(f"internal error: the assembled cache does not match cachekit.schema "
                                f"({'; '.join(map(str, problems[:3]))}); fix: report this bug")
        return all_bad, D

    try:
        with os_errors(str(out)), h5py.File(tmp, "w") as f:
            try:
                all_bad, D = write(f)
            except BaseException as exc:
                # Drop the dataset handles held by write()'s frame before the file closes: a handle
                # outliving a failed close (e.g. disk full) crashes h5py later.
                traceback.clear_frames(exc.__traceback__)
                raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with os_errors(str(out)):
        publish(tmp, out)
    return {
        "cache": str(out),
        "status": "complete",
        "weights": bundle.weights_label,
        "model": bundle.name,
        "classes": len(spec.classnames),
        "images": {s: len(v) - len(bad_rows.get(s, [])) for s, v in row_items.items()},
        "views": V,
        "shots": list(opts.shots),
        "seeds": list(opts.seeds),
        "bad_images": len(all_bad),
        "val_is_test": bool(spec.val_is_test),
        "with_replacement": {f"K{k}_seed{s}": [spec.classnames[c] for c in repl]
                             for (k, s), (_, repl) in sorted(sets.items()) if repl},
    }
