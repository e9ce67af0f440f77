"""Benchmarks: every figure is a ratio against a baseline measured in the same run.

Each `bench_*` function is pure in the sense that it returns a JSON-able dict and prints nothing (progress
goes to its `progress` callback, see cachekit.progress); the files it needs (generated images, small caches)
go into a temporary folder that is removed afterwards. Every result carries the machine (CPU model, cores,
torch version and threads, device, load average), the date, the exact `cachekit bench ...` command that
reproduces it, the parameters, a `ratios` dict (baseline time / cachekit time, or cachekit throughput /
baseline throughput: higher is better for cachekit), and a `table`, rendered as a markdown section by
`render_markdown` and written into a document the caller names by `write_docs_section(res, path)` (the CLI's
`--docs PATH`; nothing is derived from where the package is installed).

Where a baseline is too slow to run in full it is timed on a part and extrapolated linearly; the result
then says so (`extrapolated: true` and a note), and so does the table.

Benchmarks: 1 refine, 2 grid (re-extraction priced with RN50's timed forward), 3 io, 4 safe, 5 extract,
6 scale (an ImageNet-shaped rehearsal through the real `extract` with an RN50-shaped stand-in encoder, see
docs/scale.md), 7 search (the APE search on a device), 8 gpu (every GPU measurement in one run, `make bench-gpu`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .errors import CachekitError
from .progress import Counter, Progress, tick
from .store import os_errors

BENCHES = ("refine", "grid", "io", "safe", "extract", "scale", "search", "gpu")
RATIO_MEANING = "higher is better for cachekit: baseline time / cachekit time (or cachekit rate / baseline rate)"


# --------------------------------------------------------------------------------------------- common
class _Phases:
    """Progress of one benchmark: task `bench NAME`, one unit per phase, the phase now running as info.
    Reported between timed regions, never inside one."""

    def __init__(self, progress: Progress | None, name: str, phases: list[str]):
        self.progress, self.task, self.phases, self.done = progress, f"bench {name}", list(phases), 0
        tick(progress, self.task, 0, len(self.phases), "phase", now=self.phases[0])

    def next(self):
        self.done = min(self.done + 1, len(self.phases))
        info = {"now": self.phases[self.done]} if self.done < len(self.phases) else {}
        tick(self.progress, self.task, self.done, len(self.phases), "phase", **info)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    dev = str(device)
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": dev,
        "device_name": _cpu_model(),
        "load_average_start": _loadavg(),
    }
    if dev.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(dev))
    return info


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _opt(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + name.replace("_", "-")
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"{flag} {value}"


def command_line(name: str, params: dict) -> str:
    """The `cachekit bench NAME ...` command that reproduces a result (every option spelled out)."""
    parts = ["cachekit bench", name]
    parts += [_opt(k, v) for k, v in params.items() if v is not None]
    return " ".join(parts)


def _check_device(device: str) -> str:
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CachekitError("--device cuda asked for but no CUDA device is visible; fix: --device cpu")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise CachekitError(f"--device {device!r} is not a torch device; fix: cpu or cuda[:N]") from None
    return device


def _sync(device: str):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


@contextlib.contextmanager
def _threads(n: int | None):
    """Run with `n` torch threads (None: leave torch's default), restoring the old value afterwards."""
    old = torch.get_num_threads()
    if n is not None:
        if int(n) < 1:
            raise CachekitError(f"--threads {n} must be >= 1")
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _workdir(path):
    if path is not None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    d = Path(tempfile.mkdtemp(prefix="cachekit-bench-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _timed(fn, device: str = "cpu"):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _median_time(fn, repeats: int = 5, min_seconds: float = 0.05, device: str = "cpu") -> float:
    """Median seconds per call over `repeats` measurements (after one warm-up call); calls that are faster
    than `min_seconds` are repeated inside one measurement to beat the timer resolution."""
    fn()
    t, _ = _timed(fn, device)
    inner = max(1, int(math.ceil(min_seconds / max(t, 1e-9)))) if t < min_seconds else 1
    out = []
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t0) / inner)
    return statistics.median(out)


def _result(name: str, params: dict, cli_params: dict, device: str) -> dict:
    return {
        "bench": name,
        "command": command_line(name, cli_params),
        "date": _now(),
        "machine": machine_info(device),
        "params": params,
        "ratios": {},
        "headline": None,
        "ratio_meaning": RATIO_MEANING,
        "extrapolated": False,
        "extrapolated_ratios": [],
        "checks": {},
        "notes": [],
        "table": {"header": [], "rows": []},
    }


def _finish(res: dict) -> dict:
    res["machine"]["load_average_end"] = _loadavg()
    for k, v in res["ratios"].items():
        if not (isinstance(v, float) and math.isfinite(v) and v > 0):
            raise CachekitError(f"benchmark {res['bench']}: ratio {k}={v!r} is not a positive finite number")
    return res


def _fmt_s(s: float) -> str:
    if s >= 100:
        return f"{s:,.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def _fmt_x(r: float) -> str:
    if r >= 100:
        return f"{r:,.0f}×"
    if r >= 10:
        return f"{r:.1f}×"
    return f"{r:.2f}×"


def _make_images(root: Path, layout: dict[str, int], classes: int, size=(96, 72), seed: int = 0,
                 ext: str = "jpg", quality: int = 90) -> Path:
    """An ImageFolder tree: for each split in `layout`, `layout[split]` images spread over `classes` class
    folders (a class-coloured block on noise, saved as JPEG by default)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (classes, 3))
    w, h = size
    for split, n in layout.items():
        for i in range(n):
            c = i % classes
            d = root / split / f"class_{c:04d}"
            d.mkdir(parents=True, exist_ok=True)
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            arr[y0:y0 + h // 2, x0:x0 + w // 2] = colours[c]
            kw = {"quality": quality} if ext in ("jpg", "jpeg") else {}
            Image.fromarray(arr).save(d / f"img_{i:06d}.{ext}", **kw)
    return root


def _write_dense_cache(path: Path, dense_batches, n: int, shape: tuple, dtype: str = "float16",
                       labels=None, split: str = "val") -> Path:
    """A minimal file that `Cache(..., check=False)` reads, holding one split's dense maps with exactly the writer's
    dataset layout (cachekit.extraction._assemble: chunk = one map, no compression, no filters)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["format"] = "cachekit"
        f.attrs["schema_version"] = 1
        f.attrs["dense_shape"] = json.dumps([int(s) for s in shape])
        f.attrs["dense_dtype"] = dtype
        f.attrs["note"] = "benchmark file: only the dense maps of one split, in the writer's layout"
        g = f.create_group(f"splits/{split}")
        lab = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        g.create_dataset("labels", data=lab)
        ds = g.create_dataset("dense", shape=(n,) + tuple(shape), dtype=np.dtype(dtype), chunks=(1,) + tuple(shape))
        row = 0
        for b in dense_batches:
            b = np.asarray(b)
            ds[row:row + len(b)] = b.astype(dtype, copy=False)
            row += len(b)
        if row != n:
            raise CachekitError(f"internal: wrote {row} maps, expected {n}")
    return path


def _trunk(visual, x: torch.Tensor) -> torch.Tensor:
    """The frozen backbone up to the map entering attnpool (`dense_and_pooled` without the attnpool)."""
    return visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))


# --------------------------------------------------------------------------------------------- 1. refine
def literal_members(W: torch.Tensor, F: torch.Tensor | None, key_labels: torch.Tensor | None) -> list[torch.Tensor]:
    """Members of each class i (float64): its text row W[i] and its cache keys F[key_labels == i]."""
    W = W.double()
    if F is None:
        return [W[i:i + 1] for i in range(W.shape[0])]
    y = key_labels.reshape(-1).long()
    F = F.double()
    return [torch.cat([W[i:i + 1], F[y == i]], dim=0) for i in range(W.shape[0])]


def literal_pair_sum(members: list[torch.Tensor], pairs) -> torch.Tensor:
    """Sum over the given ordered class pairs (i, j) of mean_{m, n} x_im[d] * x_jn[d] (D,), float64.

    The literal O(S^2 D) work per pair: every product of a member of i with a member of j is formed
    (one tensor op per pair, vectorised over members and channels); a Python loop runs over the pairs.
    """
    acc = torch.zeros(members[0].shape[1], dtype=torch.float64)
    for i, j in pairs:
        xi, xj = members[i], members[j]
        acc += (xi.unsqueeze(1) * xj.unsqueeze(0)).mean(dim=(0, 1))
    return acc


def literal_scores(W: torch.Tensor, F: torch.Tensor | None, key_labels: torch.Tensor | None,
                   w0: float = 0.5, w1: float = 0.5) -> torch.Tensor:
    """APE's criterion J (D,) = -w0 sim + w1 var by the literal definition, float64: sim is the mean over
    all C(C-1) ordered class pairs i != j of the mean over their members' products; var is the unbiased
    per-channel variance of W over classes, computed from its definition."""
    C = W.shape[0]
    members = literal_members(W, F, key_labels)
    sim = literal_pair_sum(members, ((i, j) for i in range(C) for j in range(C) if i != j)) / (C * (C - 1))
    Wd = W.double()
    mean = Wd.sum(dim=0) / C
    var = ((Wd - mean) ** 2).sum(dim=0) / (C - 1)
    return -w0 * sim + w1 * var


def _synthetic_keys(C: int, S: int, D: int, seed: int, dtype=torch.float32, uneven: bool = False):
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.functional.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=-1)
    counts = [1 + (c % S) for c in range(C)] if uneven else [S] * C
    y = torch.cat([torch.full((k,), c, dtype=torch.long) for c, k in enumerate(counts)])
    F = torch.nn.functional.normalize(W[y] + 0.5 * torch.randn(len(y), D, generator=g, dtype=torch.float64), dim=-1)
    return W.to(dtype), F.to(dtype), y


def bench_refine(classes: int = 1000, shots: int = 16, dim: int = 1024, pairs: int = 2000, repeats: int = 5,
                 check_classes: int = 7, check_shots: int = 4, check_dim: int = 48, seed: int = 0,
                 threads: int | None = None, progress: Progress | None = None) -> dict:
    """Closed-form APE channel criterion (`refine.scores`, O(C S D)) vs the literal pairwise loop
    (O(C^2 S^2 D)). The loop is timed on `pairs` random ordered class pairs and extrapolated linearly to
    all C(C-1) of them (unless `pairs` covers them all)."""
    from .methods import refine

    if classes < 2 or shots < 1 or dim < 1 or pairs < 1:
        raise CachekitError("bench refine needs --classes >= 2, --shots >= 1, --dim >= 1, --pairs >= 1")
    cli = dict(classes=classes, shots=shots, dim=dim, pairs=pairs, repeats=repeats, check_classes=check_classes,
               check_shots=check_shots, check_dim=check_dim, seed=seed, threads=threads)
    with _threads(threads):
        res = _result("refine", dict(cli), cli, "cpu")
        steps = _Phases(progress, "refine", ["closed form", "literal loop", "agreement check"])
        W, F, y = _synthetic_keys(classes, shots, dim, seed)

        t_closed = _median_time(lambda: refine.scores(W, F, y), repeats=repeats)
        steps.next()

        total_pairs = classes * (classes - 1)
        t_setup, members = _timed(lambda: literal_members(W, F, y))
        rng = np.random.default_rng(seed)
        if pairs >= total_pairs:
            sample = [(i, j) for i in range(classes) for j in range(classes) if i != j]
        else:
            i = rng.integers(0, classes, pairs)
            j = (i + rng.integers(1, classes, pairs)) % classes  # j != i, uniform over the others
            sample = list(zip(i.tolist(), j.tolist()))
        literal_pair_sum(members, sample[:min(20, len(sample))])  # warm-up
        t_pairs, _ = _timed(lambda: literal_pair_sum(members, sample))
        extrapolated = len(sample) < total_pairs
        t_literal = t_setup + t_pairs * total_pairs / len(sample)
        steps.next()

        # Agreement on a small case (uneven class sizes), both in float64.
        Wc, Fc, yc = _synthetic_keys(check_classes, check_shots, check_dim, seed + 1, torch.float64, uneven=True)
        closed = refine.scores(Wc, Fc, yc).double()
        lit = literal_scores(Wc, Fc, yc)
        diff = float((closed - lit).abs().max())
        Wt = Wc[:, :]
        diff_text = float((refine.scores(Wt, None, None, text_only=True).double()
                           - literal_scores(Wt, None, None)).abs().max())
        steps.next()

    res["closed_form"] = {"seconds": t_closed, "function": "cachekit.methods.refine.scores"}
    res["literal"] = {"seconds": t_literal, "extrapolated": extrapolated, "pairs_timed": len(sample),
                      "pairs_total": total_pairs, "seconds_timed": t_pairs, "seconds_setup": t_setup,
                      "seconds_per_pair": t_pairs / len(sample)}
    res["extrapolated"] = extrapolated
    res["ratios"] = {"literal_over_closed": t_literal / t_closed}
    res["extrapolated_ratios"] = ["literal_over_closed"] if extrapolated else []
    res["headline"] = "literal_over_closed"
    res["checks"] = {"small_case": {"classes": check_classes, "max_shots": check_shots, "dim": check_dim,
                                    "uneven_class_sizes": True, "dtype": "float64",
                                    "max_abs_diff": diff, "max_abs_diff_text_only": diff_text,
                                    "agree": diff < 1e-6 and diff_text < 1e-6}}
    lit_label = (f"literal pairwise loop, timed on {len(sample):,} of {total_pairs:,} ordered class pairs, "
                 f"EXTRAPOLATED linearly" if extrapolated else f"literal pairwise loop, all {total_pairs:,} pairs")
    res["table"] = {
        "header": ["what", "time", "ratio vs closed form"],
        "rows": [
            [f"closed form `refine.scores` (C={classes}, S={shots}, D={dim}), median of {repeats}",
             _fmt_s(t_closed), "1×"],
            [lit_label, _fmt_s(t_literal) + (" (extrapolated)" if extrapolated else ""),
             _fmt_x(t_literal / t_closed) + (" (extrapolated)" if extrapolated else "")],
            [f"agreement on C={check_classes}, uneven 1..{check_shots} keys/class, D={check_dim} (float64)",
             f"max abs diff {diff:.1e}", "text-only: " + f"{diff_text:.1e}"],
        ],
    }
    res["notes"] = [
        "Inputs: synthetic L2-normalised text rows W (C, D) and S keys per class, float32 (the criterion does "
        "not depend on their values for timing).",
        "Literal loop: for every ordered pair i != j, all (S+1)x(S+1) member products (text row + keys) over D "
        "channels in one tensor op, mean, summed in a Python loop over pairs; float64.",
    ]
    if extrapolated:
        res["notes"].append(f"The literal loop was timed on {len(sample):,} random ordered pairs "
                            f"({_fmt_s(t_pairs)}) and extrapolated linearly to all {total_pairs:,} pairs.")
    return _finish(res)


# --------------------------------------------------------------------------------------------- 2. grid
def grid_configs(n: int, dim: int) -> list[tuple[str, dict]]:
    """`n` distinct Tip-Adapter / APE configurations (method, overrides), alternating tip and ape."""
    scales = (1, 2, 3, 5, 7, 10)
    tip = [("tip", {"s": [sb, sa]}) for sb in scales for sa in scales]
    tops = sorted({max(1, int(round(dim * f))) for f in (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)})
    weights = ((0.5, 0.5), (0.3, 0.7), (0.7, 0.3), (0.2, 0.8), (0.8, 0.2))
    ape = [("ape", {"top_k": q, "weights": list(w), "s": [7, 7, sg]}) for sg in (1, 2) for q in tops
           for w in weights]
    out = []
    for a, b in zip(tip, ape):
        out += [a, b]
    longer = tip if len(tip) > len(ape) else ape
    out += longer[min(len(tip), len(ape)):]
    if n > len(out):
        raise CachekitError(f"--configs {n}: at most {len(out)} distinct configurations; fix: pass fewer")
    return out[:n]


def ape_grid_configs(n: int, dim: int) -> list[tuple[int, tuple]]:
    """`n` distinct APE (top_k, weights) pairs: up to 10 Q values x 10 criterion weight pairs, Q first."""
    tops = sorted({max(1, min(dim, int(round(dim * f)))) for f in
                   (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)})
    weights = [(round(w, 1), round(1 - w, 1)) for w in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    out = [(q, w) for q in tops for w in weights]
    if n > len(out):
        raise CachekitError(f"--ape-configs {n}: at most {len(out)} distinct configurations; fix: pass fewer")
    return out[:n]


def naive_ape_counts(z, A, div, L, val_y, points, betas, alphas, gammas):
    """Correct-prediction counts at the given (i, j, k) grid points, one point at a time (naive loop).

    Per point, as the authors' search does: r = exp(gamma div); cache = exp(-beta (1 - A)) @ (L * r);
    logits = z + alpha * cache; count argmax == y. z, A and div are computed once, outside the loop.
    """
    out = []
    for i, j, k in points:
        r = torch.exp(gammas[k] * div)
        cache = torch.exp(-betas[i] * (1 - A)) @ (L * r.unsqueeze(1))
        logits = z + alphas[j] * cache
        out.append(int((logits.argmax(dim=-1) == val_y).sum()))
    return out


def _grid_points(n):
    return [(i, j, k) for i in range(n[0]) for j in range(n[1]) for k in range(n[2])]


def _synthetic_search_features(C, S, M, D, seed):
    """Class-clustered L2-normalised features: text rows, S keys per class, M val samples."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=-1)

    def draw(y, sigma):
        return torch.nn.functional.normalize(mu[y] + sigma * torch.randn(len(y), D, generator=g) / math.sqrt(D),
                                             dim=-1)

    W = draw(torch.arange(C), 3.5)  # zero-shot ~30%, cache ~85% at C=100, D=1024
    ky = torch.arange(C).repeat_interleave(S)
    vy = torch.arange(M) % C
    return W, draw(ky, 4.5), ky, draw(vy, 4.5), vy


def bench_grid(shots: int = 16, classes: int = 100, val: int = 1000, configs: int = 100, views: int = 10,
               model: str = "RN-tiny", batch_size: int = 64, workers: int = 0, device: str = "cpu",
               dim: int = 1024, top_k: int = 500, naive_points: int = 100, check_n=(6, 4, 4),
               ape_configs: int = 100, reextract_model: str = "RN50", reextract_sample: int = 8, seed: int = 0,
               threads: int | None = None, workdir=None, progress: Progress | None = None) -> dict:
    """(a) `configs` Tip/APE configurations through `Runner` on one cache vs re-running the authors'
    pipeline (extract, then search) per configuration; (b) the vectorised APE search `ape.select` vs a
    naive per-point loop over the (beta, alpha, gamma) grid; (c) an APE sweep grid of `ape_configs`
    (Q x criterion weights) configurations on the (b) features, each refined and searched as `Runner`
    does it, against re-extracting per configuration.

    Re-extraction costs what the cache's real model costs: `reextract_model` (RN50) forward passes timed on
    `reextract_sample` images (`rn50_throughput`) and extrapolated to every encoded image, on both sides (the
    cache needs its one extraction too); the measured extraction with `model` (the tiny model the cache is
    built with here) gives the second set of rows and ratios (`*_tiny_model`)."""
    from .cache import open_cache
    from .extraction import ExtractOptions, extract
    from .methods import ape
    from .methods.grids import alpha_grid, beta_grid, gamma_grid
    from .methods import zeroshot
    from .methods.refine import refine
    from .runner import ApeSearches, Inputs, Runner, refine_channels

    device = _check_device(device)
    check_n = tuple(int(x) for x in check_n)
    if len(check_n) != 3 or min(check_n) < 1:
        raise CachekitError("--check-n must be three positive integers, e.g. 6,4,4")
    if val < classes:
        raise CachekitError(f"--val {val} must be >= --classes {classes} (one val image per class at least)")
    if not 1 <= top_k <= dim:
        raise CachekitError(f"--top-k {top_k} must lie in 1..--dim ({dim})")
    if reextract_sample < 1:
        raise CachekitError(f"--reextract-sample {reextract_sample} must be >= 1")
    cli = dict(shots=shots, classes=classes, val=val, configs=configs, views=views, model=model,
               batch_size=batch_size, workers=workers, device=device, dim=dim, top_k=top_k,
               naive_points=naive_points, check_n=check_n, ape_configs=ape_configs,
               reextract_model=reextract_model, reextract_sample=reextract_sample, seed=seed, threads=threads)
    with _threads(threads), _workdir(workdir) as wd:
        res = _result("grid", dict(cli), cli, device)
        steps = _Phases(progress, "grid", ["(a) images and extract", f"(a) {reextract_model} forward sample",
                                           "(a) configurations on the cache",
                                           "(b) vectorised search and its floor", "(b) naive loop",
                                           "(b) same-pick check", "(c) APE sweep grid"])
        # (a) one real cache: generated JPEGs -> extract with the CLIP model.
        tree = _make_images(wd / "images", {"train": classes * shots, "val": val}, classes, size=(80, 60),
                            seed=seed)
        opts = ExtractOptions(data=str(tree), out=str(wd / "grid.h5"), model=model, shots=(shots,), seeds=(1,),
                              views=views, batch_size=batch_size, workers=workers, device=device,
                              init_seed=seed, overwrite=True)
        t_extract, summary = _timed(lambda: extract(opts), device)
        steps.next()
        n_encoded = classes * shots * (views + 1) + val
        # What one extraction costs with the cache's real model: a timed sample of its forward, extrapolated.
        if reextract_model == model:
            rn, t_real, real_extrapolated = None, t_extract, False
        else:
            rn = rn50_throughput(reextract_model, n=reextract_sample, batch=min(4, reextract_sample), device=device,
                                 seed=seed)
            t_real, real_extrapolated = n_encoded / rn["images_per_s"], True
        steps.next()
        cfgs = None
        run_times = []
        with open_cache(wd / "grid.h5") as c:
            D = c.embed_dim
            cfgs = grid_configs(configs, D)
            runner = Runner(c)
            t_load, _ = _timed(lambda: runner.inputs(shots, 1))
            done = Counter(progress, "bench grid (a) configurations", total=len(cfgs), unit="config")
            for method, ov in cfgs:
                t, _ = _timed(lambda: runner.run(method, shots, 1, ov))
                run_times.append((method, t))
                done.advance()
            done.close()
        steps.next()
        sum_runs = sum(t for _, t in run_times)
        cached_total = t_extract + t_load + sum_runs
        authors_total = configs * t_extract + sum_runs
        cached_real = t_real + t_load + sum_runs
        authors_real = configs * t_real + sum_runs
        mean_run = sum_runs / configs

        # (b) vectorised APE search vs naive loop, on synthetic class-clustered features.
        Wb, Fb, kyb, vfb, vyb = _synthetic_search_features(classes, shots, val, dim, seed)
        Lb = torch.nn.functional.one_hot(kyb, classes).float()
        idx, _ = refine_channels(Wb, Fb, kyb, top_k)
        full_n = (200, 20, 20)
        t_vec, sel = _timed(lambda: ape.select(vfb, vyb, Wb, Fb, Lb, kyb, idx, s=(7, 7, 1), n=full_n))
        # The floor of any exact search that visits every point: producing the cache values, no counting.
        t_floor, n_values = _timed(lambda: ape.cache_values_only(vfb, vyb, Wb, Fb, Lb, kyb, idx, s=(7, 7, 1),
                                                                 n=full_n))
        steps.next()
        zb = zeroshot.logits(vfb, Wb)
        F_r, W_r = refine(Fb, idx), refine(Wb, idx)
        Ab = refine(vfb, idx) @ F_r.t()
        divb = ape.kl_divergence_bits(F_r, W_r, kyb)
        betas, alphas, gammas = beta_grid(7, full_n[0]), alpha_grid(7, full_n[1]), gamma_grid(1, full_n[2])
        all_points = _grid_points(full_n)
        npts = max(1, min(naive_points, len(all_points)))
        t_naive_part, _ = _timed(lambda: naive_ape_counts(zb, Ab, divb, Lb, vyb, all_points[:npts], betas,
                                                          alphas, gammas))
        naive_extrapolated = npts < len(all_points)
        t_naive = t_naive_part * len(all_points) / npts
        steps.next()
        # Same pick on a reduced grid: the naive loop over every point vs ape.select.
        cb, ca, cg = beta_grid(7, check_n[0]), alpha_grid(7, check_n[1]), gamma_grid(1, check_n[2])
        cpoints = _grid_points(check_n)
        counts = naive_ape_counts(zb, Ab, divb, Lb, vyb, cpoints, cb, ca, cg)
        best = max(counts)
        naive_pick = cpoints[counts.index(best)]
        vec_sel = ape.select(vfb, vyb, Wb, Fb, Lb, kyb, idx, s=(7, 7, 1), n=check_n)
        vec_pick = tuple(int(x) for x in vec_sel.extra["grid_index"])
        zs_acc = float((zb.argmax(dim=-1) == vyb).float().mean() * 100)
        steps.next()

        # (c) an APE sweep grid on the (b) features, each configuration as Runner.run("ape") does it.
        xb = Inputs(W=Wb, F=Fb, key_labels=kyb, L=Lb, val_f=vfb, val_y=vyb, test_f=vfb, test_y=vyb)
        searches = ApeSearches()
        ape_cfgs = ape_grid_configs(ape_configs, dim)

        def sweep_c():
            for q, w in ape_cfgs:
                idx_c, _ = refine_channels(Wb, Fb, kyb, q, w)
                searches.select((shots, 1), xb, idx_c, (7, 7, 1), full_n)

        t_sweep, _ = _timed(sweep_c)
        steps.next()
        n_searched = len(searches)
        t_authors_c = len(ape_cfgs) * t_extract + t_sweep  # re-extract per configuration, same searches
        ratio_c = t_authors_c / (t_extract + t_sweep)
        t_authors_c_real = len(ape_cfgs) * t_real + t_sweep
        ratio_c_real = t_authors_c_real / (t_real + t_sweep)

    res["cache"] = {"model": model, "random_weights": True, "classes": classes, "shots": shots, "views": views,
                    "val": val, "embed_dim": D, "encoded_images": n_encoded, "extract_summary_images":
                    summary.get("images")}
    res["grid_a"] = {
        "configs": [{"method": m, "overrides": ov, "seconds": t} for (m, ov), (_, t) in zip(cfgs, run_times)],
        "seconds_extract": t_extract, "seconds_load_inputs": t_load, "seconds_runs": sum_runs,
        "seconds_cached_total": cached_total, "seconds_authors_total": authors_total,
        "authors_total_is_computed": True,
        "reextract_model": reextract_model, "reextract_throughput": rn,
        "seconds_extract_reextract_model": t_real, "reextract_extract_extrapolated": real_extrapolated,
        "seconds_cached_total_reextract_model": cached_real, "seconds_authors_total_reextract_model": authors_real,
    }
    res["grid_b"] = {
        "features": "synthetic class-clustered", "classes": classes, "keys": classes * shots, "val": val,
        "dim": dim, "top_k": top_k, "zero_shot_val_acc": zs_acc, "grid": list(full_n),
        "seconds_vectorised": t_vec, "vectorised_pick": dict(sel.params),
        "seconds_cache_values_only": t_floor, "cache_values": n_values,
        "seconds_naive": t_naive, "naive_points_timed": npts, "grid_points": len(all_points),
        "seconds_naive_timed": t_naive_part, "naive_extrapolated": naive_extrapolated,
    }
    res["grid_c"] = {
        "configs": [{"top_k": q, "weights": list(w)} for q, w in ape_cfgs], "seconds": t_sweep,
        "searches_run": n_searched, "searches_reused": len(ape_cfgs) - n_searched,
        "seconds_per_config": t_sweep / len(ape_cfgs),
        "seconds_authors_computed": t_authors_c, "seconds_authors_computed_reextract_model": t_authors_c_real,
    }
    res["extrapolated"] = naive_extrapolated or real_extrapolated
    res["ratios"] = {
        "pipeline_total": authors_real / cached_real,
        "per_extra_config": (t_real + mean_run) / mean_run,
        "ape_search_naive_over_vectorised": t_naive / t_vec,
        "ape_sweep_vs_reextract": ratio_c_real,
        "ape_search_over_cache_values_only": t_vec / t_floor,
    }
    if real_extrapolated:
        res["ratios"].update(pipeline_total_tiny_model=authors_total / cached_total,
                             per_extra_config_tiny_model=(t_extract + mean_run) / mean_run,
                             ape_sweep_vs_reextract_tiny_model=ratio_c)
    res["headline"] = "pipeline_total"
    res["extrapolated_ratios"] = (["ape_search_naive_over_vectorised"] if naive_extrapolated else []) + (
        ["pipeline_total", "per_extra_config", "ape_sweep_vs_reextract"] if real_extrapolated else [])
    res["checks"] = {"same_pick_reduced_grid": {
        "grid": list(check_n), "naive_pick": list(naive_pick), "vectorised_pick": list(vec_pick),
        "naive_val_correct": best, "vectorised_val_acc": vec_sel.val_acc,
        "naive_val_acc": best * 100.0 / val, "same": naive_pick == vec_pick}}
    ext = " (extrapolated)" if naive_extrapolated else ""
    rx = " (extrapolated)" if real_extrapolated else ""
    n_tip = sum(1 for m, _ in cfgs if m == "tip")
    real_rows = []
    if real_extrapolated:
        real_rows = [
            [f"(a) one extract of the same {n_encoded:,} images with {reextract_model}: {n_encoded:,} / "
             f"{rn['images_per_s']:.2f} img/s, EXTRAPOLATED from a timed sample of {rn['images']} {reextract_model} "
             f"forward passes ({rn['image_size']} px, random weights; forward only, so a lower bound)",
             _fmt_s(t_real) + rx, ""]]
    tiny_rows = []
    if real_extrapolated:
        tiny_rows = [
            [f"(a) the same {configs} configurations with the measured {model} extract instead: on the cache vs "
             f"re-extracting per configuration", f"{_fmt_s(cached_total)} vs {_fmt_s(authors_total)}",
             _fmt_x(authors_total / cached_total)],
            [f"(a) one more configuration with the {model} extract: on the cache vs re-extract + search",
             f"{_fmt_s(mean_run)} vs {_fmt_s(t_extract + mean_run)}", _fmt_x((t_extract + mean_run) / mean_run)]]
    rm = reextract_model if real_extrapolated else model
    res["table"] = {
        "header": ["what", "time", "ratio"],
        "rows": [
            [f"(a) one `extract` of the images ({model}, {classes} classes x {shots} shots x {views + 1} views "
             f"+ {val} val = {n_encoded:,} images), measured", _fmt_s(t_extract), ""],
        ] + real_rows + [
            [f"(a) {configs} configurations ({n_tip} tip, {configs - n_tip} ape) through `Runner` on the cache, "
             f"incl. one {rm} extract and loading the inputs", _fmt_s(cached_real) + rx, "1×"],
            [f"(a) authors' way: re-extract per configuration = {configs} x one {rm} extract + the same "
             f"searches (computed, not run {configs} times)", _fmt_s(authors_real) + rx,
             _fmt_x(authors_real / cached_real) + rx],
            [f"(a) one more configuration: on the cache vs {rm} re-extract + search",
             f"{_fmt_s(mean_run)} vs {_fmt_s(t_real + mean_run)}{rx}", _fmt_x((t_real + mean_run) / mean_run) + rx],
        ] + tiny_rows + [
            [f"(b) `ape.select`, full grid {full_n[0]}x{full_n[1]}x{full_n[2]} = {len(all_points):,} points "
             f"(C={classes}, N={classes * shots} keys, M={val} val, Q={top_k} of D={dim})", _fmt_s(t_vec), "1×"],
            [f"(b) floor of an exact search over every point: only computing the {n_values:,} cache values "
             "(exp + batched matmul, as `ape.select` does), no counting", _fmt_s(t_floor),
             _fmt_x(t_floor / t_vec)],
            [f"(b) naive per-point loop, timed on {npts} of {len(all_points):,} points"
             + (", EXTRAPOLATED linearly" if naive_extrapolated else ""), _fmt_s(t_naive) + ext,
             _fmt_x(t_naive / t_vec) + ext],
            [f"(b) same pick on a reduced {check_n[0]}x{check_n[1]}x{check_n[2]} grid",
             f"naive {list(naive_pick)} vs vectorised {list(vec_pick)}", "same" if naive_pick == vec_pick else "DIFFERENT"],
            [f"(c) APE sweep grid: {len(ape_cfgs)} configurations (Q x criterion weights) on one {shots}-shot "
             f"set (C={classes}, M={val} val, D={dim}), refine + full {len(all_points):,}-point search each "
             f"({n_searched} distinct channel sets searched, {len(ape_cfgs) - n_searched} reused)",
             f"**{_fmt_s(t_sweep)}** ({_fmt_s(t_sweep / len(ape_cfgs))} per configuration)", "1×"],
            [f"(c) floor for this grid: {n_searched} searches x the (b) floor "
             "(computed)", _fmt_s(n_searched * t_floor), _fmt_x(n_searched * t_floor / t_sweep)],
            [f"(c) the same grid re-extracting per configuration: {len(ape_cfgs)} x one {rm} extract + the same "
             f"searches (computed)", _fmt_s(t_authors_c_real) + rx + " vs one extract + grid "
             + _fmt_s(t_real + t_sweep), _fmt_x(ratio_c_real) + rx],
        ] + ([[f"(c) the same with the measured {model} extract", _fmt_s(t_authors_c) + " vs one extract + grid "
               + _fmt_s(t_extract + t_sweep), _fmt_x(ratio_c)]] if real_extrapolated else []),
    }
    res["notes"] = [
        f"(a) uses a real cache: {classes * shots + val} generated JPEGs (80x60) encoded by `extract` with "
        f"{model} (random init: the accuracies are chance, only the times matter).",
        "(a) the authors' scripts re-extract features for every configuration with the cache's model: that cost is "
        f"ONE extraction multiplied by {configs}; the searches are the same in both columns. "
        + (f"The cache here is built with {model} (fast), but a user's cache holds {reextract_model} features, so "
           f"the main rows price one extraction at {reextract_model}'s forward throughput on this machine "
           f"({rn['images_per_s']:.2f} img/s over {rn['images']} timed images at {rn['image_size']} px, after one "
           f"warm-up batch), EXTRAPOLATED to the {n_encoded:,} images: forward passes only, no decoding or "
           f"writing, so the re-extraction baseline is a lower bound. The {model} rows use the measured "
           f"extraction ({_fmt_s(t_extract)})." if real_extrapolated else
           f"One measured extraction: {_fmt_s(t_extract)}."),
        f"(a) tip configurations vary the search scales s=(s_beta, s_alpha); ape ones vary top_k, the criterion "
        f"weights and s_gamma; every run searches the default grid on {val} val images. The total ratio grows with "
        f"the number of configurations towards the per-configuration ratio ({configs} run here; default 100).",
        "(b) uses synthetic class-clustered features (not the cache's: random-init features are degenerate, every "
        "grid point ties, which would make the same-pick check vacuous); "
        f"zero-shot val accuracy {zs_acc:.1f}%.",
        "(b) naive loop: per grid point exp(-beta(1-A)) @ (L * exp(gamma div)), then argmax and count, with "
        "A, div and the zero-shot logits computed once outside the loop.",
    ]
    res["notes"].append(
        "(b) floor: a search that evaluates every grid point must at least produce each cache value "
        "exp(-beta(1-A)) (L * r) for every (val sample, class, beta, gamma); that row times only this part of "
        "`ape.select` (same blocks, same kernels), with nothing counted. The (c) floor is that time per "
        "search run: a lower bound on the grid for any search that visits every point, on this machine.")
    res["notes"].append(
        "(c) what `cachekit sweep` runs for an APE grid file with top_k and weights lists: per configuration "
        "`refine_channels` then `ape.select` (val search, then test once), through the Runner's search memo "
        "(a configuration whose channels equal an earlier one's reuses that search: exact, same arithmetic). "
        "Synthetic features as in (b): search cost depends on how many classes compete per sample.")
    if naive_extrapolated:
        res["notes"].append(f"(b) the naive loop was timed on the first {npts} of {len(all_points):,} points "
                            f"({_fmt_s(t_naive_part)}) and extrapolated linearly.")
    return _finish(res)


# --------------------------------------------------------------------------------------------- 3. io
def _drop_page_cache(paths) -> bool:
    """Ask the kernel to drop the cached pages of these files (posix_fadvise DONTNEED after fsync)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _warm_page_cache(paths):
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def bench_io(images: int = 512, dense_shape=(2048, 7, 7), dtype: str = "float16", batch: int = 64,
             repeats: int = 3, cold: bool = True, cache: str | None = None, split: str = "val", seed: int = 0,
             threads: int | None = None, workdir=None, progress: Progress | None = None) -> dict:
    """Read throughput of dense maps from a cache (`Cache.dense` sequential batches, `DenseSource.get`
    random batches) vs numpy reads of the same bytes from a .npy, warm and (with `cold`) after dropping
    the files from the page cache."""
    from .cache import Cache

    dense_shape = tuple(int(x) for x in dense_shape)
    if dtype not in ("float16", "float32"):
        raise CachekitError(f"--dtype {dtype} is not supported; fix: float16 or float32")
    if images < 1 or batch < 1 or repeats < 1:
        raise CachekitError("--images, --batch and --repeats must be >= 1")
    cli = dict(images=images, dense_shape=dense_shape, dtype=dtype, batch=batch, repeats=repeats, cold=cold,
               cache=cache, split=split, seed=seed, threads=threads)
    with _threads(threads), _workdir(workdir) as wd:
        res = _result("io", dict(cli), cli, "cpu")
        steps = _Phases(progress, "io", ["maps to read", "timed reads"])
        npy = wd / "dense.npy"
        if cache is None:
            rng = np.random.default_rng(seed)
            n = images

            def batches():
                for s in range(0, n, 64):
                    m = min(64, n - s)
                    yield np.maximum(rng.standard_normal((m,) + dense_shape, dtype=np.float32), 0).astype(dtype)

            h5 = _write_dense_cache(wd / "io.h5", batches(), n, dense_shape, dtype, split=split)
            source = "synthetic post-ReLU maps written with the cache writer's dataset layout (one map per chunk, " \
                     "uncompressed)"
        else:
            h5 = Path(cache)
            with Cache(h5, check=False) as c:
                n = min(images, c.num_images(split))
                dense_shape = tuple(c.dense_shape)
                dtype = str(c.meta.get("dense_dtype", "float16"))
            source = f"existing cache {h5} (split {split}, view 0, first {n} rows)"
        with Cache(h5, check=False) as c:
            ds = c.file["splits"][split]["dense"]
            arr = np.asarray(ds[0, :n] if split == "train" else ds[:n])
        np.save(npy, arr)
        nbytes = int(arr.nbytes)
        del arr
        files = [str(h5), str(npy)]
        perm = np.random.default_rng(seed + 1).permutation(n)
        rand_batches = [np.sort(perm[s:s + batch]) for s in range(0, n, batch)]

        def cache_seq():
            with Cache(h5, check=False) as c:
                for s in range(0, n, batch):
                    c.dense(split, np.arange(s, min(n, s + batch)))

        def cache_rand():
            with Cache(h5, check=False) as c:
                src = c.dense_source(split, rows=np.arange(n))
                for b in rand_batches:
                    src.get(b)

        def npy_seq_raw():
            np.load(npy)

        def npy_seq():
            a = np.load(npy, mmap_mode="r")
            for s in range(0, n, batch):
                torch.from_numpy(np.array(a[s:s + batch], dtype=np.float32))  # always a real copy

        def npy_rand():
            a = np.load(npy, mmap_mode="r")
            for b in rand_batches:
                torch.from_numpy(a[b].astype(np.float32, copy=False))

        def h5_raw_seq():  # the cache's I/O alone: what Cache.dense does, minus the float32 conversion
            import h5py

            with h5py.File(h5, "r", rdcc_nbytes=64 << 20) as f:
                ds = f["splits"][split]["dense"]
                buf = np.empty((batch,) + tuple(ds.shape[-3:]), dtype=ds.dtype)
                for s in range(0, n, batch):
                    for j in range(min(batch, n - s)):
                        ds.read_direct(buf, np.s_[0, s + j] if split == "train" else np.s_[s + j], np.s_[j])

        def npy_seq_raw_batches():
            a = np.load(npy, mmap_mode="r")
            for s in range(0, n, batch):
                np.array(a[s:s + batch])

        modes = {"cache_seq": cache_seq, "npy_seq": npy_seq, "h5_raw_seq": h5_raw_seq,
                 "npy_seq_raw_batches": npy_seq_raw_batches, "npy_seq_raw": npy_seq_raw,
                 "cache_rand": cache_rand, "npy_rand": npy_rand}
        states = (["cold"] if cold else []) + ["warm"]
        times: dict[str, dict[str, list[float]]] = {s: {m: [] for m in modes} for s in states}
        dropped = False
        steps.next()
        reads = Counter(progress, "bench io reads", total=repeats * len(states) * len(modes), unit="read")
        for _ in range(repeats):
            for state in states:
                for name, fn in modes.items():
                    if state == "cold":
                        dropped = _drop_page_cache(files)
                    else:
                        _warm_page_cache(files)
                    t, _ = _timed(fn)
                    times[state][name].append(t)
                    reads.advance()
        reads.close()
        steps.next()
        fs_type = _fs_type(wd)

    gbs = {s: {m: nbytes / statistics.median(v) / 1e9 for m, v in d.items()} for s, d in times.items()}
    res["data"] = {"source": source, "maps": n, "dense_shape": list(dense_shape), "dtype": dtype,
                   "bytes": nbytes, "workdir_filesystem": fs_type,
                   "cold_method": "os.posix_fadvise(DONTNEED) on both files before each cold read" if cold else None,
                   "page_cache_dropped": dropped if cold else None}
    res["gb_per_s"] = gbs
    res["seconds"] = {s: {m: statistics.median(v) for m, v in d.items()} for s, d in times.items()}
    for s in states:
        res["ratios"][f"{s}_seq_cache_over_numpy"] = gbs[s]["cache_seq"] / gbs[s]["npy_seq"]
        res["ratios"][f"{s}_seq_h5_raw_over_numpy_raw"] = gbs[s]["h5_raw_seq"] / gbs[s]["npy_seq_raw_batches"]
        res["ratios"][f"{s}_random_cache_over_numpy"] = gbs[s]["cache_rand"] / gbs[s]["npy_rand"]
    res["headline"] = "warm_seq_cache_over_numpy"
    rows = []
    labels = {
        "cache_seq": f"`Cache.dense` over all rows, batches of {batch}",
        "npy_seq": f"numpy: `np.load(mmap)` slices of {batch} + float32 (same output)",
        "h5_raw_seq": f"h5py `read_direct` per map into a {dtype} buffer, batches of {batch} (the cache's I/O "
                      "without the float32 conversion)",
        "npy_seq_raw_batches": f"numpy: `np.load(mmap)` slices of {batch}, copied, no conversion",
        "npy_seq_raw": "numpy: `np.load` of the whole array into a new array, no conversion (page faults of the "
                       "fresh allocation included)",
        "cache_rand": f"`DenseSource.get`, random batches of {batch}",
        "npy_rand": "numpy: `np.load(mmap)[sorted idx]` + float32, same batches",
    }
    base = {"cache_seq": "npy_seq", "npy_seq": "npy_seq", "h5_raw_seq": "npy_seq_raw_batches",
            "npy_seq_raw_batches": "npy_seq_raw_batches", "npy_seq_raw": "npy_seq_raw_batches",
            "cache_rand": "npy_rand", "npy_rand": "npy_rand"}
    for s in states:
        for m in modes:
            rows.append([s, labels[m], f"{gbs[s][m]:.2f} GB/s", _fmt_x(gbs[s][m] / gbs[s][base[m]])])
    res["table"] = {"header": ["page cache", "read", "throughput", "ratio vs numpy (same output)"], "rows": rows}
    res["notes"] = [
        f"Data: {source}; {n} maps of {'x'.join(map(str, dense_shape))} {dtype} = {nbytes / 1e6:.1f} MB; "
        "GB/s counts the stored bytes. `Cache.dense` and `DenseSource.get` return float32 tensors (conversion "
        "included) and are compared with numpy rows converted the same way; the raw rows (stored dtype, no "
        "conversion) are compared with numpy raw slices. Small absolute numbers: the machine was shared.",
        f"Median of {repeats} repeats per mode, modes interleaved; each read opens the file afresh.",
        f"Files in {fs_type or 'a local filesystem'}.",
    ]
    if cold:
        res["notes"].append("'cold' = after fsync + posix_fadvise(POSIX_FADV_DONTNEED) on the .h5 and the .npy: "
                            "the guest page cache is dropped, but a VM host or disk cache may still serve the bytes, "
                            "so read 'cold-ish'. 'warm' = both files read once just before.")
    else:
        res["notes"].append("warm page cache only (both files read once just before each measurement).")
    return _finish(res)


def _fs_type(path: Path) -> str | None:
    try:
        best, fstype = "", None
        p = str(Path(path).resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and p.startswith(parts[1]) and len(parts[1]) >= len(best):
                best, fstype = parts[1], parts[2]
        return fstype
    except OSError:
        return None


# --------------------------------------------------------------------------------------------- 4. safe
class _ViewDataset(torch.utils.data.Dataset):
    """Sample s -> (view s // n + 1, image s % n): decode the JPEG and draw its seeded augmented view."""

    def __init__(self, root: Path, rels: list[str], views: int, aug, aug_seed: int):
        self.root, self.rels, self.views, self.aug, self.aug_seed = root, rels, views, aug, aug_seed

    def __len__(self):
        return len(self.rels) * self.views

    def __getitem__(self, s):
        from .data import load_image

        n = len(self.rels)
        view, i = s // n + 1, s % n
        return self.aug(load_image(self.root / self.rels[i]), self.aug_seed, self.rels[i], view)


def _loader(ds, batches, workers: int, cuda: bool):
    return torch.utils.data.DataLoader(ds, batch_sampler=[list(map(int, b)) for b in batches],
                                       num_workers=workers, pin_memory=cuda)


def _epoch_perms(n: int, epochs: int, seed: int) -> list[np.ndarray]:
    gen = torch.Generator().manual_seed(int(seed))  # the same draws as cachekit.methods.safe.fit
    return [torch.randperm(n, generator=gen).numpy() for _ in range(epochs)]


def usual_safe_epochs(visual, ds, labels, W, params, heads, config, workers: int = 0) -> dict:
    """SAFE the usual way: for every batch decode + augment the images, run the frozen trunk, then the
    same attnpool training step as `cachekit.methods.safe.fit` (same permutation, batches, lr schedule,
    optimiser and loss). Returns seconds per epoch and the per-epoch mean loss."""
    import torch.nn.functional as Fn

    from .attnpool import AttnPool
    from .methods import safe
    from .methods.safe import lr_schedule

    dev = torch.device(config.device)
    cuda = dev.type == "cuda"
    frozen = AttnPool.from_params(params, heads).to(dev).eval()
    model = AttnPool.from_params(params, heads).to(dev)
    model.requires_grad_(False)
    trainable = model.param_groups(config.train_groups)
    for p in trainable:
        p.requires_grad_(True)
    n, bs = len(ds), config.batch_size
    lrs = lr_schedule(config, math.ceil(n / bs))
    opt = torch.optim.AdamW(trainable, lr=float(lrs[0]), eps=config.eps, weight_decay=config.weight_decay)
    Wd = W.to(dev, torch.float32)
    y_all = labels.to(dev)
    scale = float(config.logit_scale)
    it, out = 0, []
    for perm in _epoch_perms(n, config.epochs, config.seed):
        _sync(config.device)
        t0 = time.perf_counter()
        model.train()
        batches = [np.sort(perm[s:s + bs]) for s in range(0, n, bs)]
        total = 0.0
        for idx, x in zip(batches, _loader(ds, batches, workers, cuda)):
            x = x.to(dev, non_blocking=True)
            with torch.no_grad(), torch.autocast("cuda", enabled=cuda):
                dense = _trunk(visual, x)
            dense = dense.float()
            y = y_all[torch.as_tensor(idx, device=dev)]
            for g in opt.param_groups:
                g["lr"] = float(lrs[it])
            lo = None
            if config.consistency != "none":
                with torch.no_grad():
                    lo = scale * Fn.normalize(frozen(dense), dim=-1).float() @ Wd.t()
            _, loss, _, _ = safe.loss_terms(model(dense), lo, y, Wd, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            it += 1
        _sync(config.device)
        out.append({"seconds": time.perf_counter() - t0, "loss": total / n})
    return {"epochs": out}


def bench_safe(images: int = 32, epochs: int = 1, model: str = "RN50", views: int = 1, batch_size: int = 16,
               classes: int = 4, device: str = "cpu", workers: int = 0, image_size=(320, 240), repeats: int = 1,
               seed: int = 1, threads: int | None = None, workdir=None, progress: Progress | None = None) -> dict:
    """Seconds per SAFE epoch on cached dense maps (in memory and streamed from HDF5) vs the usual way:
    decode + augment JPEGs, frozen trunk forward, the same attnpool training step. Same samples, batches,
    batch size and machine, one run."""
    from .augment import AugmentedView
    from .cache import Cache
    from .methods import safe
    from .models import attnpool_params, load_model

    device = _check_device(device)
    image_size = tuple(int(x) for x in image_size)
    if min(images, epochs, views, batch_size, classes, repeats) < 1:
        raise CachekitError("--images, --epochs, --views, --batch-size, --classes and --repeats must be >= 1")
    cli = dict(images=images, epochs=epochs, model=model, views=views, batch_size=batch_size, classes=classes,
               device=device, workers=workers, image_size=image_size, repeats=repeats, seed=seed, threads=threads)
    cuda = device.startswith("cuda")
    with _threads(threads), _workdir(workdir) as wd:
        res = _result("safe", dict(cli), cli, device)
        steps = _Phases(progress, "safe", ["images and model", "dense maps (one-time)", "warm-up fit",
                                           "timed epochs"])
        root = _make_images(wd / "images", {"train": images}, classes, size=image_size, seed=seed)
        rels = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
        img_labels = torch.tensor([int(Path(r).parent.name.split("_")[1]) for r in rels])
        bundle = load_model(model, None, init_seed=seed, device=device)
        visual = bundle.visual
        if cuda:
            visual = visual.to(memory_format=torch.channels_last)
        pre = bundle.preprocess_cfg
        aug = AugmentedView(bundle.image_size, pre["mean"], pre["std"])
        ds = _ViewDataset(root, rels, views, aug, aug_seed=seed)
        labels = img_labels.repeat(views)
        params0, heads = attnpool_params(visual)
        D = params0["c_proj.weight"].shape[0]
        g = torch.Generator().manual_seed(seed)
        W = torch.nn.functional.normalize(torch.randn(classes, D, generator=g), dim=-1)
        config = safe.SafeConfig(epochs=epochs, batch_size=batch_size, warmup_epochs=0, device=device, seed=seed)
        steps.next()

        # One-time extraction of the dense maps of every sample (the cache's job; not part of an epoch).
        n = len(ds)
        chunks = [np.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
        maps = []
        t_pre0 = time.perf_counter()
        for x in _loader(ds, chunks, workers, cuda):
            with torch.inference_mode(), torch.autocast("cuda", enabled=cuda):
                maps.append(_trunk(visual, x.to(device)).float().cpu())
        dense = torch.cat(maps)
        _sync(device)
        t_precompute = time.perf_counter() - t_pre0
        del maps
        h5 = _write_dense_cache(wd / "safe.h5", (dense[s:s + 64].numpy() for s in range(0, n, 64)), n,
                                tuple(dense.shape[1:]), "float16", labels=labels.numpy(), split="val")
        steps.next()

        def fit_on(source):
            stamps = []
            _sync(device)
            t0 = time.perf_counter()
            fit = safe.fit(source, labels, W, params0, heads, config,
                           callback=lambda e: (_sync(device), stamps.append(time.perf_counter())))
            total = stamps[-1] - t0
            return {"seconds_total": total, "seconds_per_epoch": total / epochs,
                    "loss": [e["loss"] for e in fit.log]}

        # Warm-up (not timed): one small fit, so neither side pays first-call costs.
        m = min(n, batch_size)
        safe.fit(safe.TensorSource(dense[:m]), labels[:m], W, params0, heads,
                 safe.SafeConfig(epochs=1, batch_size=m, warmup_epochs=0, device=device, seed=seed))
        steps.next()
        runs = {"usual": [], "mem": [], "h5": []}
        done = Counter(progress, "bench safe runs", total=3 * repeats, unit="run")
        for _ in range(repeats):  # interleaved, so a change in machine load hits all three alike
            runs["usual"].append(usual_safe_epochs(visual, ds, labels, W, params0, heads, config, workers=workers))
            done.advance(last="usual")
            runs["mem"].append(fit_on(safe.TensorSource(dense)))
            done.advance(last="in memory")
            with Cache(h5, check=False) as c:
                runs["h5"].append(fit_on(c.dense_source("val")))
            done.advance(last="hdf5")
        done.close()
        steps.next()

    def med(key, runs_):
        return statistics.median(r[key] for r in runs_)

    usual = runs["usual"][0]
    usual_s = statistics.median(sum(e["seconds"] for e in u["epochs"]) / epochs for u in runs["usual"])
    cached_mem = {**runs["mem"][0], "seconds_per_epoch": med("seconds_per_epoch", runs["mem"]),
                  "seconds_total": med("seconds_total", runs["mem"])}
    cached_h5 = {**runs["h5"][0], "seconds_per_epoch": med("seconds_per_epoch", runs["h5"]),
                 "seconds_total": med("seconds_total", runs["h5"])}
    res["setup"] = {"model": model, "random_weights": True, "samples": n, "images": images, "views": views,
                    "dense_shape": list(dense.shape[1:]), "jpeg_size": list(image_size),
                    "seconds_one_time_dense_extraction": t_precompute}
    res["cached_memory"] = cached_mem
    res["cached_hdf5"] = cached_h5
    res["usual"] = {"seconds_per_epoch": usual_s, "loss": [e["loss"] for e in usual["epochs"]]}
    res["ratios"] = {"usual_over_cached_memory": usual_s / cached_mem["seconds_per_epoch"],
                     "usual_over_cached_hdf5": usual_s / cached_h5["seconds_per_epoch"]}
    res["headline"] = "usual_over_cached_memory"
    loss_diff = abs(usual["epochs"][-1]["loss"] - cached_mem["loss"][-1])
    rel = loss_diff / max(abs(cached_mem["loss"][-1]), 1e-12)
    res["checks"] = {"final_loss_usual": usual["epochs"][-1]["loss"], "final_loss_cached_memory": cached_mem["loss"][-1],
                     "final_loss_cached_hdf5": cached_h5["loss"][-1], "abs_diff_usual_vs_cached_memory": loss_diff,
                     "rel_diff_usual_vs_cached_memory": rel, "losses_close": rel <= 0.02}
    res["table"] = {
        "header": ["SAFE epoch", "s / epoch", "ratio (usual / this)", "final loss"],
        "rows": [
            [f"usual: decode + augment {n} JPEG views, {model} trunk forward, attnpool step", _fmt_s(usual_s), "1×",
             f"{usual['epochs'][-1]['loss']:.5f}"],
            ["cachekit: `safe.fit` on in-memory float32 maps (`TensorSource`)", _fmt_s(cached_mem["seconds_per_epoch"]),
             _fmt_x(res["ratios"]["usual_over_cached_memory"]), f"{cached_mem['loss'][-1]:.5f}"],
            ["cachekit: `safe.fit` streaming float16 maps from HDF5 (`DenseSource`)",
             _fmt_s(cached_h5["seconds_per_epoch"]), _fmt_x(res["ratios"]["usual_over_cached_hdf5"]),
             f"{cached_h5['loss'][-1]:.5f}"],
            ["(one-time: extracting the dense maps of these samples, not in any epoch)", _fmt_s(t_precompute), "", ""],
        ],
    }
    res["notes"] = [
        f"{images} generated {image_size[0]}x{image_size[1]} JPEGs, {views} augmented view(s) each = {n} samples, "
        f"{classes} classes, batch {batch_size}, {epochs} epoch(s), {model} with random weights on {device} "
        "(weights do not change speed); text classifier: random unit rows (no text tower needed).",
        "Both sides use the same SafeConfig (RAFT defaults, warm-up 0), the same permutation, batches, lr schedule, "
        "optimiser and loss; the cached side includes fit()'s one-off pooling of the frozen logits in its epoch time.",
        f"Median of {repeats} interleaved repeat(s), after one untimed warm-up fit.",
        "Same training, checked: the float32 in-memory run and the usual run see the same maps and take the same "
        "steps, so their epoch losses agree closely (not bit for bit: the usual way computes the frozen logits in "
        "the same batch, so the L1 consistency term starts at exactly 0 with a zero subgradient, while fit() pools "
        "them in a separate pass whose rounding differs by ~1e-6); the HDF5 maps are float16, as in a default cache.",
    ]
    return _finish(res)


# --------------------------------------------------------------------------------------------- 5. extract
def bench_extract(model: str = "RN50", images: int = 64, device: str = "cpu", batch_size: int = 32,
                  workers: int = 0, views: int = 0, classes: int = 4, image_size=(500, 375), decode: str = "pil",
                  seed: int = 0, threads: int | None = None, workdir=None,
                  progress: Progress | None = None) -> dict:
    """Images/s of a full `extract` from JPEG files vs the bare `encode_image` forward on the same
    preprocessed batches, in one run; decode "both" times extract with Pillow and with device decoding."""
    from .augment import AugmentedView, plain_transform
    from .data import load_image
    from .extraction import ExtractOptions, extract
    from .models import load_model

    device = _check_device(device)
    image_size = tuple(int(x) for x in image_size)
    if images < 2 * classes:
        raise CachekitError(f"--images {images} must be at least 2 x --classes ({2 * classes}): half train, half val")
    if decode not in ("pil", "device", "both"):
        raise CachekitError(f"--decode {decode} is not supported; fix: pil, device or both")
    cli = dict(model=model, images=images, device=device, batch_size=batch_size, workers=workers, views=views,
               classes=classes, image_size=image_size, decode=decode, seed=seed, threads=threads)
    cuda = device.startswith("cuda")
    n_train = (images // 2 // classes) * classes
    n_val = images - n_train
    with _threads(threads), _workdir(workdir) as wd:
        res = _result("extract", dict(cli), cli, device)
        decodes = ["pil", "device"] if decode == "both" else [decode]
        steps = _Phases(progress, "extract", ["images"] + [f"extract --decode {d}" for d in decodes]
                        + ["bare forward"])
        root = _make_images(wd / "images", {"train": n_train, "val": n_val}, classes, size=image_size, seed=seed)
        steps.next()
        t_by_decode = {}
        for dec in decodes:
            opts = ExtractOptions(data=str(root), out=str(wd / f"extract-{dec}.h5"), model=model,
                                  shots=(n_train // classes,), seeds=(1,), views=views, batch_size=batch_size,
                                  workers=workers, device=device, init_seed=seed, overwrite=True, decode=dec)
            t_by_decode[dec], summary = _timed(lambda: extract(opts), device)
            steps.next()
        t_extract = t_by_decode[decodes[0]]
        encoded = n_train * (views + 1) + n_val

        # Bare forward: the same images and views, preprocessed beforehand (not timed), same batch size.
        t_load, bundle = _timed(lambda: load_model(model, None, init_seed=seed, device=device), device)
        pre = bundle.preprocess_cfg
        plain = plain_transform(bundle.image_size, pre["mean"], pre["std"])
        aug = AugmentedView(bundle.image_size, pre["mean"], pre["std"])
        entries = []
        for split in ("train", "val"):
            for p in sorted((root / split).rglob("*.jpg")):
                rel = str(p.relative_to(root))
                for v in range(views + 1 if split == "train" else 1):
                    entries.append((rel, v))
        xs = [plain(load_image(root / r)) if v == 0 else aug(load_image(root / r), 0, r, v) for r, v in entries]
        batches = [torch.stack(xs[s:s + batch_size]) for s in range(0, len(xs), batch_size)]
        del xs
        visual = bundle.visual
        enc = bundle.model
        if cuda:
            visual.to(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", enabled=cuda):
            enc.encode_image(batches[0].to(device))  # warm-up (not counted)
            _sync(device)
            t0 = time.perf_counter()
            for x in batches:
                x = x.to(device, non_blocking=True)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                enc.encode_image(x).float().cpu()
            _sync(device)
            t_bare = time.perf_counter() - t0
        steps.next()

    ips_extract = encoded / t_extract
    ips_bare = len(entries) / t_bare
    res["setup"] = {"model": model, "random_weights": True, "train_images": n_train, "val_images": n_val,
                    "views": views, "encoded_images": encoded, "jpeg_size": list(image_size),
                    "summary_images": summary.get("images")}
    res["extract"] = {"seconds": t_extract, "images_per_s": ips_extract, "decode": decodes[0],
                      "by_decode": {d: {"seconds": t, "images_per_s": encoded / t} for d, t in t_by_decode.items()}}
    res["bare"] = {"seconds": t_bare, "images_per_s": ips_bare, "seconds_model_construction": t_load}
    ips_extract_nobuild = encoded / max(t_extract - t_load, 1e-9)
    res["ratios"] = {"extract_over_bare": ips_extract / ips_bare,
                     "extract_without_model_build_over_bare": ips_extract_nobuild / ips_bare}
    res["headline"] = "extract_over_bare"
    res["table"] = {
        "header": ["what", "images/s", "ratio vs bare forward"],
        "rows": [
            [f"bare `encode_image` on the same {len(entries)} preprocessed images, batch {batch_size}",
             f"{ips_bare:.1f}", "1×"],
            [f"full `extract` from {image_size[0]}x{image_size[1]} JPEGs on disk ({encoded} encoded images: "
             f"{n_train} train x {views + 1} view(s) + {n_val} val; model build, text, checks and writing included)",
             f"{ips_extract:.1f}", _fmt_x(ips_extract / ips_bare)],
            [f"the same, minus the model construction measured separately ({_fmt_s(t_load)})",
             f"{ips_extract_nobuild:.1f}", _fmt_x(ips_extract_nobuild / ips_bare)],
        ] + ([[f"full `extract --decode device` (plain-view JPEGs decoded by torchvision.io.decode_jpeg on {device})",
               f"{encoded / t_by_decode['device']:.1f}", _fmt_x(encoded / t_by_decode['device'] / ips_bare)]]
             if decode == "both" else []),
    }
    if decode == "both":
        res["ratios"]["extract_device_decode_over_bare"] = encoded / t_by_decode["device"] / ips_bare
    res["notes"] = [
        f"{model} with random weights on {device}, batch {batch_size}, {workers} DataLoader worker(s); "
        f"{n_train} train + {n_val} val generated JPEGs ({classes} classes), val is test; "
        f"extract decoding: {decodes[0]}" + (" (first row), then device" if decode == "both" else "") + ".",
        "Full extract = wall time of `cachekit.extraction.extract`: model construction, text encoding, decoding every "
        "train image once more to check it, encoding, HDF5 segments and assembly. Bare = `encode_image` alone on "
        "tensors preprocessed beforehand (same images, same preprocessing, same batch size, one warm-up batch "
        "first). Target on GPU: >= 0.9.",
    ]
    return _finish(res)


# --------------------------------------------------------------------------------------------- 6. scale
# A stand-in encoder with RN50's shapes (dense 2048x7x7, pooled 1024, 32 heads) that costs almost nothing, so
# `bench scale` measures cachekit (writer, segments, assembly, publish, verify, readers, methods) and not the
# CPU's convolutions. It is plugged into the real `cachekit.extraction` through the module's model loader
# (`cachekit.extraction.load_model`, see `standin_installed`); everything else runs unchanged.
#
# How it makes maps: the generated images carry their class in their mean colour (10 levels per channel, so up
# to 1000 classes; per-pixel noise on top), which survives decoding, resizing, RandomResizedCrop and flips. For
# each (preprocessed) view the stand-in reads the class c back from the mean colour and draws, from a seed
# hashed from the view's pixels (so a rerun, a resume or another batch size gives the same map), the map
#     dense = relu(u_c + sigma e + bank_j)        (u_c: class profile (Cd,), e ~ N(0, I), bank_j: one of 64
#                                                  fixed spatial patterns (Cd, H*W))
# Its attention pooling is open_clip's AttentionPool2d with the key projection set to zero, so every query
# attends uniformly to the HW+1 tokens and the layer equals c_proj(v_proj(mean_t(dense) + mean(pos))) exactly:
# that is what it computes (the stored weights reproduce the stored pooled features, as `verify` checks, and
# SAFE trains on them like on any attention-pooling layer). Text embeddings are the pooled class prototypes
# plus per-prompt noise. With sigma 4.5 and text noise 0.5 zero-shot accuracy at 1000 classes is about 60%
# (RN50 on ImageNet: about 60%), so the searches do realistic work per sample. Views of one image are
# independent draws of its class (the stand-in cannot tell two views of one image apart).

STANDIN_MODEL = "RN50-standin"
_LEVELS, _LO, _STEP, _PIXEL_NOISE = 10, 28, 22, 5  # class colour: _LO + _STEP * level per channel
STANDIN_MAX_CLASSES = _LEVELS ** 3
_STANDIN_DEFAULTS = {"dense_shape": [2048, 7, 7], "dim": 1024, "heads": 32, "image_size": 32, "seed": 0,
                     "sigma": 4.5, "text_noise": 0.5, "bank": 64}


def standin_colour(c: int) -> tuple[int, int, int]:
    """The mean RGB colour that carries class c (c < 1000) in the stand-in's images."""
    L = _LEVELS
    return tuple(_LO + _STEP * k for k in (c // (L * L), (c // L) % L, c % L))


def _make_scale_images(root: Path, layout: dict[str, int], classes: int, px: int = 32, seed: int = 0) -> Path:
    """An ImageFolder tree with train/val/test sub-trees; image i of a split is class i % classes
    (folder class_NNNN), a (px*5/4) x px JPEG of the class colour plus uniform per-pixel noise."""
    rng = np.random.default_rng(seed)
    for split, n in layout.items():
        for c in range(min(n, classes)):
            (root / split / f"class_{c:04d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            c = i % classes
            standin_image(c, px, rng).save(root / split / f"class_{c:04d}" / f"img_{i:06d}.jpg", quality=95)
    return root


def standin_image(c: int, px: int, rng: np.random.Generator):
    """A (px*5/4) x px PIL image of class c's colour plus uniform per-pixel noise."""
    from PIL import Image

    w, h = px + px // 4, px
    arr = np.asarray(standin_colour(c), dtype=np.int16) + rng.integers(-_PIXEL_NOISE, _PIXEL_NOISE + 1, (h, w, 3),
                                                                       dtype=np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _view_seeds(x: torch.Tensor) -> list[int]:
    import hashlib

    x = x.detach().float().cpu().contiguous()
    return [int.from_bytes(hashlib.blake2b(x[i].numpy().tobytes(), digest_size=8).digest(), "little") >> 1
            for i in range(x.shape[0])]


class _StandInStem(torch.nn.Module):
    """Preprocessed views (B, 3, S, S) -> RN50-shaped maps (B, Cd, H, W); see the section comment."""

    def __init__(self, spec: dict, mean, std):
        super().__init__()
        self.cd, self.h, self.w = (int(v) for v in spec["dense_shape"])
        self.seed, self.sigma = int(spec["seed"]), float(spec["sigma"])
        g = torch.Generator().manual_seed(self.seed)
        self.register_buffer("bank", torch.randn(int(spec["bank"]), self.cd, self.h * self.w, generator=g))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self._profiles: dict[int, torch.Tensor] = {}

    def profile(self, c: int) -> torch.Tensor:
        p = self._profiles.get(c)
        if p is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7 * c + 1)
            p = self._profiles[c] = torch.randn(self.cd, generator=g)
        return p

    def classes(self, x: torch.Tensor) -> torch.Tensor:
        """The class each view carries in its mean colour."""
        pix = (x.detach().float().cpu() * self.std + self.mean) * 255.0
        k = ((pix.mean(dim=(2, 3)) - _LO) / _STEP).round().clamp(0, _LEVELS - 1).long()
        return k[:, 0] * _LEVELS * _LEVELS + k[:, 1] * _LEVELS + k[:, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.classes(x).tolist()
        seeds = _view_seeds(x)
        z = torch.stack([self.profile(c) + self.sigma * torch.randn(self.cd, generator=torch.Generator().manual_seed(s))
                         for c, s in zip(cls, seeds)])
        idx = torch.tensor([s % self.bank.shape[0] for s in seeds])
        d = self.bank.cpu()[idx]  # a copy
        d += z.unsqueeze(-1)
        d.relu_()
        return d.view(len(cls), self.cd, self.h, self.w).to(x.device)


def _uniform_attnpool_class():
    from open_clip.modified_resnet import AttentionPool2d

    class UniformAttnPool(AttentionPool2d):
        """open_clip's AttentionPool2d with a zero key projection: uniform attention over the HW+1 tokens, so
        forward(x) = c_proj(v_proj(mean_t(x) + mean(positional_embedding))) exactly; computed that way."""

        def forward(self, x):
            t = x.flatten(2).mean(dim=-1) + self.positional_embedding.mean(dim=0).to(x.dtype)
            return self.c_proj(self.v_proj(t))

        def reference_forward(self, x):  # open_clip's own computation, for the tests
            return AttentionPool2d.forward(self, x)

    return UniformAttnPool


def _make_standin_attnpool(spec: dict):
    cd, h, w = (int(v) for v in spec["dense_shape"])
    if h != w:
        raise CachekitError(f"stand-in dense shape {spec['dense_shape']}: H must equal W (attention pooling)")
    heads, dim = int(spec["heads"]), int(spec["dim"])
    if cd % heads:
        raise CachekitError(f"stand-in: {heads} heads do not divide {cd} channels; fix: --heads dividing Cd")
    ap = _uniform_attnpool_class()(h, cd, heads, dim)
    g = torch.Generator().manual_seed(int(spec["seed"]) + 17)
    with torch.no_grad():
        ap.positional_embedding.copy_(torch.randn(h * w + 1, cd, generator=g) / math.sqrt(cd))
        for lin, scale in ((ap.q_proj, 1 / math.sqrt(cd)), (ap.v_proj, 1 / math.sqrt(cd)), (ap.c_proj, 1 / math.sqrt(cd))):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * scale)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.01)
        ap.k_proj.weight.zero_()
        ap.k_proj.bias.zero_()
    return ap


class _StandInTokenizer:
    """Prompts -> (n, 77) ids: [class + 1, crc32 of the prompt, 0, ...]; the class is the NNNN of the class name
    (folder class_NNNN, named "class NNNN")."""

    context_length = 77

    def __call__(self, texts):
        import re
        import zlib

        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            m = re.search(r"class[ _](\d+)", t)
            if m is None:
                raise CachekitError(f"stand-in encoder: prompt {t!r} names no class NNNN; fix: run it on the images "
                                    "`bench scale` generates (class folders class_NNNN)")
            ids[i, 0] = int(m.group(1)) + 1
            ids[i, 1] = zlib.crc32(t.encode("utf-8")) & 0x7FFFFFFF
        return ids


class _StandInVisual(torch.nn.Module):
    def __init__(self, spec: dict, mean, std):
        super().__init__()
        self.stem = _StandInStem(spec, mean, std)
        self.layer1 = self.layer2 = self.layer3 = self.layer4 = torch.nn.Identity()
        self.attnpool = _make_standin_attnpool(spec)
        self.image_size = int(spec["image_size"])


class _StandInCLIP(torch.nn.Module):
    def __init__(self, spec: dict, mean, std):
        super().__init__()
        self.visual = _StandInVisual(spec, mean, std)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(100.0)))
        self.text_noise, self.dim = float(spec["text_noise"]), int(spec["dim"])
        self._protos: dict[int, torch.Tensor] = {}

    def prototypes(self, classes) -> torch.Tensor:
        """Unit pooled features (len(classes), D) of the classes' noise-free maps (each averaged over 4 spatial
        patterns), computed 64 classes at a time and kept."""
        st = self.visual.stem
        missing = sorted({int(c) for c in classes} - set(self._protos))
        for i in range(0, len(missing), 64):
            chunk = missing[i:i + 64]
            U = torch.stack([st.profile(c) for c in chunk])
            d = torch.relu(U[:, None, :, None] + st.bank[:4].cpu()[None]).mean(dim=1)
            with torch.no_grad():
                p = torch.nn.functional.normalize(self.visual.attnpool.cpu()(d.view(len(chunk), st.cd, st.h, st.w)),
                                                  dim=-1)
            self._protos.update(zip(chunk, p))
        return torch.stack([self._protos[int(c)] for c in classes])

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.cpu()
        cls = (ids[:, 0] - 1).tolist()
        noise = torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(int(s)))
                             for s in ids[:, 1].tolist()])
        return self.prototypes(cls) + self.text_noise * noise / math.sqrt(self.dim)


def standin_bundle(spec: dict | None = None, name: str = STANDIN_MODEL, device: str = "cpu"):
    """A `cachekit.models.ModelBundle` around the stand-in encoder (see the section comment)."""
    from .augment import OPENAI_MEAN, OPENAI_STD
    from .models import ModelBundle

    spec = {**_STANDIN_DEFAULTS, **(spec or {})}

    class StandInBundle(ModelBundle):
        @property
        def weights_label(self) -> str:
            return ("stand-in encoder of cachekit bench scale (synthetic RN50-shaped maps, not a CLIP model): "
                    "accuracies are not meaningful")

    model = _StandInCLIP(spec, OPENAI_MEAN, OPENAI_STD).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    pre = {"size": int(spec["image_size"]), "mode": "RGB", "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
           "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0,
           "standin": {k: spec[k] for k in ("dense_shape", "dim", "heads", "sigma", "text_noise", "bank")}}
    return StandInBundle(model=model, name=name, checkpoint="random", checkpoint_sha256="random",
                         init_seed=int(spec["seed"]), preprocess_cfg=pre, tokenizer=_StandInTokenizer())


@contextlib.contextmanager
def standin_installed(spec: dict | None = None):
    """While active, `cachekit.extraction` builds the stand-in encoder instead of an open_clip model.

    The seam is the extract module's model loader (`cachekit.extraction.load_model`, called once per run by
    `_Job.prepare`); nothing else of the extraction is touched. Restored on exit."""
    import importlib

    X = importlib.import_module(".extraction", __package__)  # the module (the package's `extract` is a function)
    if not callable(getattr(X, "load_model", None)):
        raise CachekitError("internal: cachekit.extraction has no load_model seam for the stand-in encoder; "
                            "fix: update cachekit.bench.standin_installed")
    orig = X.load_model

    def load(name, pretrained=None, init_seed=0, device="cpu"):
        return standin_bundle({**(spec or {}), "seed": int((spec or {}).get("seed", init_seed))}, name=name,
                              device=device)

    X.load_model = load
    try:
        yield
    finally:
        X.load_model = orig


# --------------------------------------------------------------------------------------------- scale: processes
def _proc_status_kib(field_name: str, pid: int | str = "self") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _tree_bytes(paths) -> int:
    """Bytes allocated on disk (st_blocks) by these files and everything under these folders."""
    total = 0
    for p in paths:
        p = Path(p)
        try:
            if p.is_dir():
                with os.scandir(p) as it:
                    for e in it:
                        try:
                            total += _tree_bytes([e.path]) if e.is_dir(follow_symlinks=False) else \
                                e.stat(follow_symlinks=False).st_blocks * 512
                        except OSError:
                            pass
            elif p.exists():
                total += p.stat().st_blocks * 512
        except OSError:
            pass
    return total


class _DiskWatch:
    """Samples, every `every` seconds in a thread, the disk bytes of some paths and the RSS of process `pid`
    (when set): (time, disk bytes, RSS bytes or None) triples."""

    def __init__(self, paths, every: float = 0.25, pid: int | None = None):
        import threading

        self.paths, self.every, self.samples, self.pid = list(paths), every, [], pid
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        rss = _proc_status_kib("VmRSS", self.pid) if self.pid else None
        self.samples.append((time.time(), _tree_bytes(self.paths), None if rss is None else rss * 1024))

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self):
        self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._th.join()
        self._sample()


_CHILD = "import sys; from cachekit.bench import _scale_child; _scale_child(sys.argv[1])"
_WORKER = "from cachekit.bench import _scale_worker; _scale_worker()"


def _child_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _log_tail(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").strip().splitlines() if ln.strip()]
    except OSError:
        lines = []
    return (lines[-1] if lines else "(no output)")[:300]


def _run_child(job: dict, wd: Path, name: str, watch=None) -> dict:
    """Run one `_scale_child` job in a fresh Python process (the SIGKILL run); its result dict plus wall time,
    exit code and peak RSS (os.wait4's ru_maxrss of that process alone). `watch`: paths whose disk use is
    sampled meanwhile."""
    import subprocess

    result = wd / f"{name}.json"
    result.unlink(missing_ok=True)
    log = wd / f"{name}.log"
    job = {**job, "result": str(result)}
    watcher = _DiskWatch(watch) if watch else contextlib.nullcontext()
    with open(log, "wb") as lf, watcher:
        t0 = time.time()
        p = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(job)], stdout=lf, stderr=subprocess.STDOUT,
                             env=_child_env())
        if watch:
            watcher.pid = p.pid
        try:
            while True:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                time.sleep(0.05)
        except BaseException:
            p.kill()
            p.wait()
            raise
        p.returncode = os.waitstatus_to_exitcode(status)
        t1 = time.time()
    out = json.loads(result.read_text()) if result.exists() else {}
    out.update(returncode=p.returncode, wall_s=t1 - t0, peak_rss_bytes=int(ru.ru_maxrss) * 1024)
    if watch:
        out["disk"] = watcher.samples
    if p.returncode != 0 and not job.get("kill_at"):
        raise CachekitError(f"bench scale: the {name} process failed (exit {p.returncode}): {_log_tail(log)}; "
                            f"fix: see {log} (rerun with --workdir to keep it)")
    return out


class _Worker:
    """One Python process that runs `_scale_child` jobs one after another, so imports are paid once. A job's peak
    RSS is the process's VmHWM after the job, reset to the current RSS before it (/proc/self/clear_refs 5): the
    most memory the process held while that step ran (its imports included, as in a command of its own)."""

    def __init__(self, wd: Path, threads: int | None):
        import subprocess

        self.wd, self.log = wd, wd / "worker.log"
        self._lf = open(self.log, "wb")
        self.p = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._lf, env=_child_env(), text=True)
        self.threads = threads
        hello = self.p.stdout.readline().split()  # "READY <RSS bytes after the imports>"
        if not hello or hello[0] != "READY":
            self.close()
            raise CachekitError(f"bench scale: the worker process did not start: {_log_tail(self.log)}; "
                                f"fix: see {self.log}")
        self.base_rss_bytes = int(hello[1])

    def run(self, job: dict, name: str, watch=None) -> dict:
        result = self.wd / f"{name}.json"
        result.unlink(missing_ok=True)
        job = {**job, "result": str(result), "threads": self.threads}
        watcher = _DiskWatch(watch, pid=self.p.pid) if watch else contextlib.nullcontext()
        with watcher:
            t0 = time.time()
            try:
                self.p.stdin.write(json.dumps(job) + "\n")
                self.p.stdin.flush()
                line = self.p.stdout.readline()
            except (BrokenPipeError, OSError):
                line = ""
            t1 = time.time()
        if not line:
            raise CachekitError(f"bench scale: the worker process died during {name}: {_log_tail(self.log)}; "
                                f"fix: see {self.log} (rerun with --workdir to keep it)")
        out = json.loads(result.read_text())
        if out.get("error"):
            raise CachekitError(f"bench scale: {name} failed: {out['error']}; fix: see {self.log} (rerun with "
                                "--workdir to keep it)")
        out.update(wall_s=t1 - t0, peak_rss_bytes=out.get("vm_hwm_bytes", 0))
        if watch:
            out["disk"] = watcher.samples
        return out

    def close(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=60)
        except Exception:
            self.p.kill()
            self.p.wait()
        self._lf.close()


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, default=str))
    os.replace(tmp, path)


_JOBS = {}


def _run_job(job: dict) -> dict:
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    out = {"t_begin": time.time(), "peak_rss_reset": _reset_peak_rss(),
           "rss_start_bytes": (_proc_status_kib("VmRSS") or 0) * 1024}
    out.update(_JOBS[job["kind"]](job, out))
    out["vm_hwm_bytes"] = (_proc_status_kib("VmHWM") or 0) * 1024
    out["t_end"] = time.time()
    return out


def _scale_child(arg: str):
    """Entry point of a process that runs one job (the SIGKILL run); result written as JSON."""
    job = json.loads(arg)
    _write_json(job["result"], _run_job(job))


def _scale_worker():
    """Entry point of the worker process: one JSON job per line on stdin, 'DONE' on stdout after each."""
    import traceback

    import importlib

    import open_clip  # noqa: F401  imported once here, as a command imports it before its work
    for mod in ("extraction", "runner", "verify", "info"):
        importlib.import_module(f".{mod}", __package__)
    sys.stdout.write(f"READY {(_proc_status_kib('VmRSS') or 0) * 1024}\n")
    sys.stdout.flush()

    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            out = _run_job(job)
        except Exception as exc:  # reported to the parent, which raises it
            traceback.print_exc(file=sys.stderr)
            msg = str(exc).splitlines()[0] if str(exc) else ""
            out = {"error": f"{type(exc).__name__}: {msg}"}
        _write_json(job["result"], out)
        sys.stdout.write("DONE\n")
        sys.stdout.flush()


def _child_extract(job, ev):
    import signal

    from .extraction import ExtractOptions, extract

    ev.update(steps={}, units=[], extract_initial=None)
    kill_at = job.get("kill_at")

    def progress(step):
        ev["steps"].setdefault(step.task, time.time())
        if step.task == "extract" and ev["extract_initial"] is None:
            ev["extract_initial"], ev["extract_total"] = step.done, step.total

    def on_unit(info):
        ev["units"].append(time.time())
        ev["units_total"] = info["total"]
        if kill_at and info["published"] >= math.ceil(kill_at * info["total"]):
            ev["killed_after_units"] = info["published"]
            _write_json(job["result"], ev)
            os.kill(os.getpid(), signal.SIGKILL)

    opts = ExtractOptions(**job["opts"], progress=progress, on_unit=on_unit)
    with standin_installed(job["standin"]):
        ev["t_call"] = time.time()
        ev["summary"] = extract(opts)
    ev["t_return"] = time.time()
    return ev


def _child_verify(job, ev):
    from .cache import Cache
    from .verify import verify

    if job.get("cold"):
        ev["page_cache_dropped"] = _drop_page_cache([job["cache"]])
    t0 = time.perf_counter()
    with Cache(job["cache"], check=False) as c:
        rep = verify(c)
    ev["seconds"] = time.perf_counter() - t0
    ev["ok"] = rep.ok
    ev["failed"] = [c["check"] + ": " + c["detail"] for c in rep.failed]
    return ev


def _child_info(job, ev):
    from .cache import open_cache
    from .info import describe

    t0 = time.perf_counter()
    with open_cache(job["cache"]) as c:
        d = describe(c)
    ev["seconds"] = time.perf_counter() - t0
    ev["file_bytes"] = d["file_bytes"]
    return ev


class _Subset:
    """Maps `idx` of a dense-map source, addressed 0..len(idx)-1 (SAFE's `get` protocol)."""

    def __init__(self, source, idx):
        self.source, self.idx = source, np.asarray(idx, dtype=np.int64)

    def __len__(self):
        return len(self.idx)

    def get(self, indices):
        return self.source.get(self.idx[np.asarray(indices, dtype=np.int64)])


def _child_safe(job, ev):
    """SAFE steps on the train views of one few-shot set: in memory (the slice that fits --max-memory) or
    streamed from HDF5; 3 epochs over a random subset of steps x batch maps (epoch 2 after dropping the page
    cache: cold reads; epoch 3 warm)."""
    from .cache import Cache
    from .methods import safe
    from .task import CacheTask

    device, cache_path = job["device"], job["cache"]
    c = Cache(cache_path)
    k, mm = int(job["k"]), int(job["max_memory"])
    views = tuple(range(1, c.views + 1)) or (0,)
    full = c.dense_source("train", c.fewshot(k, 1), views)
    # What --max-memory counts: the maps in the cache's dtype (CacheTask holds them so).
    n_full, bytes_full = len(full), full.stored_nbytes
    per_map = bytes_full // n_full
    ev.update(k=k, maps_full=n_full, bytes_full_stored=bytes_full, max_memory=mm, sliced=False)
    _drop_page_cache([cache_path])
    if job["mode"] == "memory":
        task = CacheTask(c, k, 1, device=device, max_memory=mm)
        t0 = time.perf_counter()
        src, labels = task.train_dense()
        if not isinstance(src, safe.TensorSource):  # the set does not fit: its first maps that do
            n_fit = max(1, min(len(src), mm // per_map))
            src, labels = safe.TensorSource(torch.from_numpy(src.read_stored(np.arange(n_fit)))), labels[:n_fit]
            ev["sliced"] = True
        ev["seconds_load"] = time.perf_counter() - t0
        ev["rss_after_load_bytes"] = (_proc_status_kib("VmRSS") or 0) * 1024
    else:
        forced = bytes_full <= mm  # a small cache fits: stream anyway (said so)
        task = CacheTask(c, k, 1, device=device, max_memory=0 if forced else mm)
        src, labels = task.train_dense()
        ev["forced_streaming"] = forced
    ev["source"] = type(src).__name__
    ev["maps_source"] = len(src)
    rng = np.random.default_rng(int(job["seed"]))
    n_sub = min(len(src), int(job["steps"]) * int(job["batch"]))
    sub = np.sort(rng.choice(len(src), n_sub, replace=False))
    s = _Subset(src, sub)
    y = labels[torch.from_numpy(sub)]
    W = task.W.cpu()
    params0, heads = task.attnpool()
    cfg = safe.SafeConfig(epochs=3, batch_size=int(job["batch"]), warmup_epochs=0, device=device, seed=1)
    stamps, drops = [], []

    def cb(entry):
        _sync(device)
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            d0 = time.perf_counter()
            _drop_page_cache([cache_path])
            drops.append(time.perf_counter() - d0)

    _drop_page_cache([cache_path])
    t0 = time.perf_counter()
    fit = safe.fit(s, y, W, params0, heads, cfg, callback=cb)
    ev.update(maps_timed=n_sub, steps=math.ceil(n_sub / cfg.batch_size), batch=cfg.batch_size,
              seconds_epoch1_with_prepass=stamps[0] - t0, seconds_epoch_cold=stamps[1] - stamps[0] - drops[0],
              seconds_epoch_warm=stamps[2] - stamps[1], loss=[e["loss"] for e in fit.log])
    # Reading alone (the I/O part of a step): the same batches, cold then warm.
    batches = [sub[i:i + cfg.batch_size] for i in range(0, n_sub, cfg.batch_size)]
    for state in ("cold", "warm"):
        if state == "cold":
            _drop_page_cache([cache_path])
        t0 = time.perf_counter()
        for b in batches:
            src.get(b)
        ev[f"seconds_read_{state}"] = time.perf_counter() - t0
    ev["stored_bytes_per_map"] = per_map
    c.close()
    return ev


def _ape_curve_inputs(c, k: int, classes: int, m: int):
    """Features of a (classes, m) APE search taken from the cache: its first `classes` classes, their keys of the
    (k, 1) set, and up to m val samples of those classes (val first, then test features as more val)."""
    W = c.text_classifier()[:classes]
    F, ky = c.train_keys(k, 1)
    keep = ky < classes
    F, ky = F[keep], ky[keep]
    f = torch.cat([c.features("val"), c.features("test")])
    y = torch.cat([c.labels("val"), c.labels("test")])
    keep = (y < classes).nonzero().flatten()[:m]
    return W, F, ky, f[keep], y[keep]


def _child_eval(job, ev):
    """`Runner.run` of each method on the (k, 1) set, then the APE search curve over (classes, val) points."""
    from .cache import open_cache
    from .methods import ape
    from .runner import Runner, refine_channels

    device = job["device"]
    k = int(job["k"])
    with open_cache(job["cache"]) as c:
        runner = Runner(c, device=device)
        t0 = time.perf_counter()
        runner.inputs(k, 1).load()
        ev["seconds_load_inputs"] = time.perf_counter() - t0
        ev["runs"] = []
        for m in job["methods"]:
            t0 = time.perf_counter()
            rec = runner.run(m, k, 1)
            _sync(device)
            ev["runs"].append({"method": m, "seconds": time.perf_counter() - t0, "val_acc": rec["metrics"]["val_acc"],
                               "test_acc": rec["metrics"]["test_acc"], "params": rec["params"]})
        ev["vm_hwm_after_eval_bytes"] = (_proc_status_kib("VmHWM") or 0) * 1024
        ev["val"], ev["test"], ev["classes"] = c.num_images("val"), c.num_images("test"), c.num_classes
        ev["curve"] = []
        for classes, m in job["curve"]:
            W, F, ky, vf, vy = (t.to(device) for t in _ape_curve_inputs(c, k, classes, m))
            L = torch.nn.functional.one_hot(ky, W.shape[0]).float()
            idx, _ = refine_channels(W, F, ky, min(int(job["top_k"]), W.shape[1]))
            _sync(device)
            t0 = time.perf_counter()
            sel = ape.select(vf, vy, W, F, L, ky, idx)
            _sync(device)
            ev["curve"].append({"classes": int(W.shape[0]), "val": int(vy.numel()), "keys": int(F.shape[0]),
                                "seconds": time.perf_counter() - t0, "val_acc": sel.val_acc})
    return ev


_JOBS.update(extract=_child_extract, safe=_child_safe, eval=_child_eval, verify=_child_verify, info=_child_info)


# --------------------------------------------------------------------------------------------- scale: bench
def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def _rate(b: float, s: float) -> str:
    return f"{b / max(s, 1e-9) / 1e9:.2f} GB/s"


def _raw_write(path: Path, nbytes: int, block: int = 8 << 20) -> float:
    """Seconds to write `nbytes` sequentially (8 MiB blocks of random bytes) and fsync: the disk's own pace."""
    buf = np.random.default_rng(0).integers(0, 256, block, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf[:min(block, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    t = time.perf_counter() - t0
    path.unlink()
    return t


def _phases(ev: dict) -> dict:
    """Seconds of an extract process: setup (dataset, model, image checks, plan, text), segments (encoding and
    writing units), assembly (the cache from the segments, checksums, publish, clean-up)."""
    units = ev.get("units") or []
    t_enc = ev["steps"].get("extract", ev.get("t_call"))
    out = {"setup": t_enc - ev["t_call"]}
    if units:
        out["segments"] = units[-1] - t_enc
        if ev.get("t_return"):
            out["assembly"] = ev["t_return"] - units[-1]
    if ev.get("t_return"):
        out["total"] = ev["t_return"] - ev["t_call"]
    return out


def _rss_by_phase(ev: dict) -> dict:
    """Peak RSS (sampled every 0.25 s) of an extract process in each of its phases (see `_phases`)."""
    units = ev.get("units") or []
    t_enc = ev["steps"].get("extract", ev.get("t_call"))
    bounds = {"setup": (ev["t_call"], t_enc)}
    if units:
        bounds["segments"] = (t_enc, units[-1])
        if ev.get("t_return"):
            bounds["assembly"] = (units[-1], ev["t_return"])
    out = {}
    for name, (a, b) in bounds.items():
        vals = [x[2] for x in ev.get("disk", []) if len(x) > 2 and x[2] is not None and a <= x[0] <= b]
        if vals:
            out[name] = max(vals)
    return out


def _encoder_micro(root: Path, spec: dict, batch: int, n_batches: int = 3) -> dict:
    """Per-view seconds of: decoding + preprocessing a generated JPEG (Pillow, plain and augmented), the stand-in
    forward, and the float16 conversion of every map: torch's .half() (what `extract` does) and numpy's astype (what it
    did before, kept as the comparison)."""
    from .augment import AugmentedView, plain_transform
    from .data import load_image
    from .models import dense_and_pooled

    b = standin_bundle(spec)
    pre = b.preprocess_cfg
    plain = plain_transform(b.image_size, pre["mean"], pre["std"])
    aug = AugmentedView(b.image_size, pre["mean"], pre["std"])
    files = sorted((root / "train").rglob("*.jpg"))[:batch]
    t0 = time.perf_counter()
    xs = [aug(load_image(p), 0, p.name, 1 + i % 3) if i % 2 else plain(load_image(p)) for i, p in enumerate(files)]
    t_pre = (time.perf_counter() - t0) / len(files)
    x = torch.stack(xs)
    labels = [int(p.parent.name.split("_")[1]) for p in files]
    decoded = b.visual.stem.classes(x).tolist()
    with torch.inference_mode():
        dense_and_pooled(b.visual, x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(n_batches):
            dense, pooled = dense_and_pooled(b.visual, x)
        t_fwd = (time.perf_counter() - t0) / (n_batches * len(xs))
    f32 = dense.float().cpu()
    t0 = time.perf_counter()
    for _ in range(n_batches):
        f32.numpy().astype(np.float16, copy=False)
    t_np = (time.perf_counter() - t0) / (n_batches * len(xs))
    t0 = time.perf_counter()
    for _ in range(n_batches):
        f32.half().numpy()
    t_half = (time.perf_counter() - t0) / (n_batches * len(xs))
    return {"seconds_per_view_decode_preprocess": t_pre, "seconds_per_map_standin_forward": t_fwd,
            "seconds_per_map_float16_numpy_astype": t_np, "seconds_per_map_float16_torch_half": t_half,
            "class_decode_correct": sum(int(a == b_) for a, b_ in zip(decoded, labels)), "class_decode_checked": len(labels)}


def _parse_curve(curve) -> list[tuple[int, int]]:
    if isinstance(curve, str):
        curve = [p for p in curve.split(",") if p.strip()]
    out = []
    for p in curve:
        if isinstance(p, str):
            a, _, b = p.strip().lower().partition("x")
            p = (a, b)
        try:
            c, m = int(p[0]), int(p[1])
        except (TypeError, ValueError, IndexError):
            raise CachekitError(f"--ape-curve point {p!r} is not CLASSESxVAL; fix: e.g. 100x1000,1000x1000") from None
        if c < 2 or m < 1:
            raise CachekitError(f"--ape-curve point {c}x{m}: needs >= 2 classes and >= 1 val sample")
        out.append((c, m))
    return out


def bench_scale(classes: int = 1000, shots=(1, 4), views: int = 10, val: int = 2000, test: int = 10000,
                dense_shape=(2048, 7, 7), dim: int = 1024, heads: int = 32, batch_size: int = 64, input_px: int = 32,
                workers: int = 0, kill_at: float = 0.5, safe_steps: int = 6, safe_batch: int = 64,
                max_memory: int = 4 << 30, ape_curve="100x1000,1000x500,1000x1000,1000x2000",
                methods=("zeroshot", "tip", "ape", "gda"), top_k: int = 500, rn50_sample: int = 8,
                device: str = "cpu", seed: int = 0, threads: int | None = None, workdir=None, keep: bool = False,
                progress: Progress | None = None) -> dict:
    """Scale rehearsal: an ImageNet-shaped cache written by the real `extract` (segments, assembly, publish) with
    the stand-in encoder, then: the same bytes written raw; peak RSS and disk; a SIGKILL at `kill_at` of the
    units and the resume; `verify`; `info`; SAFE steps in memory vs streaming; `eval` of the training-free
    methods and APE's search time over (classes, val) points. Every heavy step runs in its own process (its
    peak RSS is that process's). See docs/scale.md."""
    from . import schema as S
    from .cache import open_cache

    device = _check_device(device)
    shots = tuple(sorted({int(k) for k in (shots if not isinstance(shots, (int, str)) else str(shots).split(","))}))
    dense_shape = tuple(int(x) for x in dense_shape)
    curve = _parse_curve(ape_curve)
    methods = tuple(methods.split(",") if isinstance(methods, str) else methods)
    if not 2 <= classes <= STANDIN_MAX_CLASSES:
        raise CachekitError(f"--classes {classes}: the stand-in encoder carries 2..{STANDIN_MAX_CLASSES} classes")
    if not shots or shots[0] < 1 or views < 0 or val < classes or test < 1:
        raise CachekitError("bench scale needs --shots >= 1, --views >= 0, --val >= --classes, --test >= 1")
    if not 0 < kill_at < 1:
        raise CachekitError(f"--kill-at {kill_at} must lie strictly between 0 and 1")
    if len(dense_shape) != 3 or min(batch_size, input_px, safe_steps, safe_batch, dim, heads) < 1:
        raise CachekitError("--dense-shape needs Cd,H,W; sizes must be >= 1")
    cli = dict(classes=classes, shots=list(shots), views=views, val=val, test=test, dense_shape=dense_shape, dim=dim,
               heads=heads, batch_size=batch_size, input_px=input_px, workers=workers, kill_at=kill_at,
               safe_steps=safe_steps, safe_batch=safe_batch, max_memory=max_memory,
               ape_curve=",".join(f"{a}x{b}" for a, b in curve), methods=",".join(methods), top_k=top_k,
               rn50_sample=rn50_sample, device=device, seed=seed, threads=threads)
    kmax, kmin = max(shots), min(shots)
    spec = {**_STANDIN_DEFAULTS, "dense_shape": list(dense_shape), "dim": dim, "heads": heads,
            "image_size": input_px, "seed": seed}
    _make_standin_attnpool(spec)  # shape errors now, before any work
    per_map = int(np.prod(dense_shape)) * 2
    maps = {"train": classes * kmax * (views + 1), "val": val, "test": test}
    n_maps = sum(maps.values())
    dense_bytes = n_maps * per_map
    pooled_bytes = n_maps * dim * 4
    payload = dense_bytes + pooled_bytes
    with _threads(threads), _workdir(workdir) as wd:
        res = _result("scale", dict(cli), cli, device)
        free = shutil.disk_usage(wd).free
        need = int(2.1 * payload) + (256 << 20)
        if free < need:
            raise CachekitError(f"bench scale needs about {_gb(need)} free in {wd} (segments + the assembled cache), "
                                f"{_gb(free)} are free; fix: smaller --classes/--shots/--views/--test, or --workdir on "
                                "a larger disk")
        steps = _Phases(progress, "scale", ["images", "encoder and input costs", "raw sequential write",
                                            "extract (uninterrupted)", "verify and info", "SIGKILL and resume",
                                            "SAFE in memory", "SAFE streaming", "eval and APE curve", "RN50 sample"])
        t0 = time.perf_counter()
        root = _make_scale_images(wd / "images", {"train": classes * kmax, "val": val, "test": test}, classes,
                                  px=input_px, seed=seed)
        t_images = time.perf_counter() - t0
        steps.next()
        micro = _encoder_micro(root, spec, batch_size)
        steps.next()
        t_raw = _raw_write(wd / "raw.bin", payload)
        steps.next()

        out = wd / "scale.h5"
        opts = dict(data=str(root), out=str(out), model=STANDIN_MODEL, shots=list(shots), seeds=[1], views=views,
                    templates="imagenet", batch_size=batch_size, workers=workers, device="cpu", init_seed=seed)
        watch = [out, Path(str(out) + ".tmp"), Path(str(out) + ".parts")]
        job = {"kind": "extract", "opts": opts, "standin": spec}
        worker = _Worker(wd, threads)
        try:
            full = worker.run(job, "extract-full", watch=watch)
            ph = _phases(full)
            final_bytes = _tree_bytes([out])
            disk_peak = max(x[1] for x in full["disk"])
            with open_cache(out) as c:
                sums = {p: c.file[p].attrs[S.CHECKSUM] for s in ("train", "val", "test")
                        for p in (S.split_path(s, S.DENSE), S.split_path(s, S.POOLED))}
            n_units = full["units_total"]
            steps.next()
            ver = worker.run({"kind": "verify", "cache": str(out), "cold": True}, "verify")
            inf = worker.run({"kind": "info", "cache": str(out)}, "info")
            steps.next()

            out.unlink()
            killed = _run_child({**job, "kill_at": kill_at, "threads": threads}, wd, "extract-killed", watch=watch)
            segs_left = len(list(Path(str(out) + ".parts").glob("seg-*.h5")))
            resumed = worker.run(job, "extract-resume", watch=watch)
            ph_k, ph_r = _phases(killed), _phases(resumed)
            with open_cache(out) as c:
                same = all(c.file[p].attrs[S.CHECKSUM] == v for p, v in sums.items())
            steps.next()

            sjob = {"kind": "safe", "cache": str(out), "max_memory": int(max_memory), "steps": safe_steps,
                    "batch": safe_batch, "device": device, "seed": seed}
            s_mem = worker.run({**sjob, "mode": "memory", "k": kmin}, "safe-memory")
            steps.next()
            s_str = worker.run({**sjob, "mode": "stream", "k": kmax}, "safe-stream")
            steps.next()
            ev = worker.run({"kind": "eval", "cache": str(out), "k": kmax, "methods": list(methods), "curve": curve,
                             "top_k": top_k, "device": device}, "eval")
            steps.next()
        finally:
            worker.close()
        rn50 = rn50_throughput(n=rn50_sample, threads=threads) if rn50_sample else None
        steps.next()
        if not keep and workdir is not None:
            for p in [out, Path(str(out) + ".results")]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ figures
    base_rss = worker.base_rss_bytes

    def mem(r):
        """Peak RSS of a step in the worker, and what a command of its own would hold: the worker's RSS after
        its imports + the step's growth over the RSS it started at."""
        grow = max(0, r["peak_rss_bytes"] - r.get("rss_start_bytes", 0))
        return {"peak_rss_bytes": r["peak_rss_bytes"], "rss_start_bytes": r.get("rss_start_bytes"),
                "growth_bytes": grow, "as_command_bytes": base_rss + grow}

    def mem_s(r):
        m = mem(r)
        return f"peak RSS as a command ~{_gb(m['as_command_bytes'])} (+{_gb(m['growth_bytes'])} during the step)"

    def per_step(r, which):
        if which == "mean":
            return (r["seconds_epoch_cold"] + r["seconds_epoch_warm"]) / (2 * r["steps"])
        return r[f"seconds_epoch_{which}"] / r["steps"]

    t_cachekit = ph["segments"] + ph["assembly"]
    res["cache"] = {"classes": classes, "shots": list(shots), "views": views, "maps": maps, "maps_total": n_maps,
                    "dense_shape": list(dense_shape), "dense_bytes": dense_bytes, "pooled_bytes": pooled_bytes,
                    "file_bytes": final_bytes, "units": n_units, "batch_size": batch_size, "input_px": input_px,
                    "seconds_make_images": t_images}
    res["encoder"] = micro
    res["worker_rss_after_imports_bytes"] = base_rss
    res["raw_write"] = {"bytes": payload, "seconds": t_raw}
    res["extract"] = {"phases": ph, "process_wall_s": full["wall_s"], **mem(full),
                      "rss_peak_by_phase_bytes": _rss_by_phase(full),
                      "disk_peak_bytes": disk_peak, "disk_extra_during_assembly_bytes": disk_peak - final_bytes,
                      "seconds_per_map_segments": ph["segments"] / n_maps, "seconds_per_map_assembly":
                      ph["assembly"] / n_maps}
    res["resume"] = {"kill_at": kill_at, "killed_after_units": killed.get("killed_after_units"),
                     "units_total": n_units, "segments_left": segs_left, "killed_returncode": killed["returncode"],
                     "killed_process_peak_rss_bytes": killed["peak_rss_bytes"], "killed_phases": ph_k,
                     "killed_rss_peak_by_phase_bytes": _rss_by_phase(killed),
                     "resume_phases": ph_r, "resume_units_encoded": len(resumed.get("units", [])),
                     "identical_to_uninterrupted": same, **mem(resumed)}
    res["verify"] = {**{k: ver.get(k) for k in ("seconds", "ok", "failed", "page_cache_dropped")}, **mem(ver)}
    res["info"] = {"seconds": inf["seconds"], **mem(inf)}
    drop = ("disk", "vm_hwm_bytes", "t_begin", "t_end")
    res["safe"] = {name: {**{k: v for k, v in r.items() if k not in drop}, **mem(r),
                          "seconds_per_step_mean": per_step(r, "mean"), "seconds_per_step_cold": per_step(r, "cold"),
                          "seconds_per_step_warm": per_step(r, "warm"),
                          "seconds_epoch_extrapolated": per_step(r, "mean") * math.ceil(r["maps_full"] / r["batch"])}
                   for name, r in (("memory", s_mem), ("stream", s_str))}
    res["eval"] = {**{k: v for k, v in ev.items() if k not in drop}, **mem(ev)}
    res["rn50"] = rn50

    mem_step, str_cold = per_step(s_mem, "mean"), per_step(s_str, "cold")
    ratios = {"extract_write_vs_raw_write": t_raw / t_cachekit,
              "segments_write_vs_raw_write": t_raw / ph["segments"],
              "resume_vs_uninterrupted": ph["total"] / ph_r["total"],
              "safe_memory_step_over_stream_step_cold": mem_step / str_cold}
    res["ratios"] = {k: float(v) for k, v in ratios.items()}
    res["headline"] = "extract_write_vs_raw_write"
    res["checks"] = {"verify_ok": bool(ver.get("ok")), "resumed_identical": bool(same),
                     "killed_by_sigkill": killed["returncode"] == -9,
                     "standin_class_decode": f"{micro['class_decode_correct']}/{micro['class_decode_checked']}",
                     "stream_source": s_str["source"], "memory_source": s_mem["source"]}

    # ------------------------------------------------------------------ table
    rows = [
        ["cache written", f"{classes} classes, shots {list(shots)} (seed 1), {views} views: "
         f"{maps['train']:,} train + {val:,} val + {test:,} test maps of {'x'.join(map(str, dense_shape))} float16",
         f"{_gb(dense_bytes)} dense + {_gb(pooled_bytes)} pooled; file {_gb(final_bytes)}"],
        ["raw sequential write of the same bytes (8 MiB blocks, fsync)", _fmt_s(t_raw), _rate(payload, t_raw)],
        [f"`extract`: segments ({n_units:,} units of {batch_size}: decode, stand-in, float16, segment files)",
         _fmt_s(ph["segments"]), f"{_rate(payload, ph['segments'])}; {ph['segments'] / n_maps * 1e3:.2f} ms per map"],
        ["`extract`: assembly (read segments, write the cache, sha256, check, publish, remove segments)",
         _fmt_s(ph["assembly"]), f"{_rate(payload, ph['assembly'])}; {ph['assembly'] / n_maps * 1e3:.2f} ms per map"],
        ["`extract`: segments + assembly, vs the raw write", _fmt_s(t_cachekit),
         f"{_rate(payload, t_cachekit)} = {_fmt_x(t_raw / t_cachekit)} of raw"],
        ["`extract`: setup (dataset listing, image checks, stand-in build, plan, text)", _fmt_s(ph["setup"]),
         mem_s(full) + "; sampled RSS peak by phase: " + ", ".join(
             f"{k} {_gb(v)}" for k, v in _rss_by_phase(full).items())],
        ["disk: peak during the run (segments + cache being assembled)", _gb(disk_peak),
         f"extra during assembly: {_gb(disk_peak - final_bytes)} over the final {_gb(final_bytes)}"],
        [f"SIGKILL after {killed.get('killed_after_units')}/{n_units} units published ({kill_at:.0%}), then the same "
         f"command: resume", _fmt_s(ph_r["total"]),
         f"setup {_fmt_s(ph_r['setup'])}, {len(resumed.get('units', [])):,} units "
         f"{_fmt_s(ph_r.get('segments', 0))}, assembly {_fmt_s(ph_r.get('assembly', 0))}; "
         f"arrays {'identical' if same else 'DIFFERENT'} to the uninterrupted run"],
        ["`verify` (full: sha256 of every dataset, NaN/Inf, attnpool; page cache dropped first)",
         _fmt_s(ver["seconds"]), f"{_rate(final_bytes, ver['seconds'])}; {'ok' if ver.get('ok') else 'FAILED'}; "
                                 + mem_s(ver)],
        ["`info` (open with the schema check + describe)", _fmt_s(inf["seconds"]), mem_s(inf)],
    ]
    for name, r in (("in memory", s_mem), ("streaming", s_str)):
        what = (f"K={r['k']} train views, {r['maps_source']:,} maps"
                + (" (the first maps that fit)" if r.get("sliced") else "")
                + (f", {_gb(r['bytes_full_stored'])} as stored > --max-memory {_gb(max_memory)}"
                   if name == "streaming" and not r.get("forced_streaming") else "")
                + (" (they fit --max-memory: streaming forced)" if r.get("forced_streaming") else ""))
        timing = (f"{_fmt_s(per_step(r, 'mean'))} / step" if name == "in memory" else
                  f"{_fmt_s(per_step(r, 'cold'))} / step cold, {_fmt_s(per_step(r, 'warm'))} warm")
        n_steps = math.ceil(r["maps_full"] / r["batch"])
        extra = (f"loaded in {_fmt_s(r['seconds_load'])}" if name == "in memory" else
                 f"reading alone {r['maps_timed'] * r['stored_bytes_per_map'] / max(r['seconds_read_cold'], 1e-9) / 1e9:.2f}"
                 " GB/s cold")
        rows.append([f"SAFE {name} ({r['source']}): {what}", timing,
                     f"batch {r['batch']}; a full epoch ({n_steps:,} steps): {_fmt_s(per_step(r, 'mean') * n_steps)} "
                     f"EXTRAPOLATED; {extra}; {mem_s(r)}"])
    for r in ev["runs"]:
        rows.append([f"`eval` {r['method']} (C={ev['classes']}, K={kmax}, {ev['val']:,} val, {ev['test']:,} test)",
                     _fmt_s(r["seconds"]), f"val {r['val_acc']:.1f}%, test {r['test_acc']:.1f}%"])
    rows.append(["`eval`: loading the inputs once, then the methods above", _fmt_s(ev["seconds_load_inputs"]),
                 f"peak RSS as a command ~{_gb(base_rss + max(0, ev['vm_hwm_after_eval_bytes'] - ev['rss_start_bytes']))}"])
    for p in ev["curve"]:
        rows.append([f"APE search, full 80,000-point grid: C={p['classes']}, {p['val']:,} val, {p['keys']:,} keys",
                     _fmt_s(p["seconds"]), f"{p['seconds'] / (p['classes'] * p['val']) * 1e6:.1f} µs per class x val"])
    if rn50:
        rows.append([f"RN50 forward on this CPU (random weights, 224 px, {rn50['images']} images timed)",
                     f"{rn50['images_per_s']:.2f} img/s",
                     f"a real extract of these {n_maps:,} maps: >= {_fmt_s(n_maps / rn50['images_per_s'])} EXTRAPOLATED "
                     "(forward only)"])
    res["extrapolated"] = True
    res["table"] = {"header": ["what", "measured", "notes"], "rows": rows}
    res["notes"] = [
        f"Stand-in encoder (`{STANDIN_MODEL}`): RN50-shaped maps ({'x'.join(map(str, dense_shape))}) and pooled "
        f"features ({dim}), {heads} heads, {micro['seconds_per_map_standin_forward'] * 1e3:.2f} ms per map; "
        f"generated {input_px}px JPEGs, decode + preprocessing {micro['seconds_per_view_decode_preprocess'] * 1e3:.2f} "
        f"ms per view; float16 conversion with torch (what `extract` does) "
        f"{micro['seconds_per_map_float16_torch_half'] * 1e3:.2f} ms per map (numpy astype, used before: "
        f"{micro['seconds_per_map_float16_numpy_astype'] * 1e3:.2f} ms). Everything else is cachekit's real code.",
        "The steps run one after another in a worker process (imports paid once). Memory: a step's peak is the "
        "worker's VmHWM, reset before the step (/proc/self/clear_refs); 'as a command' = the worker's RSS right after "
        f"its imports ({_gb(base_rss)}) + the step's growth over the RSS it started at. The SIGKILL run is a process "
        f"of its own (peak {_gb(killed['peak_rss_bytes'])}, ru_maxrss). {workers} DataLoader worker(s), batch "
        f"{batch_size}; disk sampled every 0.25 s (allocated blocks of the cache, its .tmp and .parts).",
        "GB/s counts the cache's payload (dense + pooled bytes); the raw write writes the same number of bytes.",
        f"SAFE: {safe_steps} steps of batch {safe_batch} on a random subset of the set's maps, 3 epochs: the first "
        "includes fit()'s frozen-logit pass, the page cache is dropped before the second (cold) and not before the "
        "third (warm); in memory the two are averaged. Full epochs are per-step times x steps, EXTRAPOLATED "
        "linearly; `fit-safe` also pools every val map once per epoch (not included).",
        "APE curve: the cache's own features (first C classes, their keys, val then test samples of those classes).",
    ]
    return _finish(res)


def rn50_throughput(model: str = "RN50", n: int = 8, batch: int = 4, device: str = "cpu", seed: int = 0,
                    threads: int | None = None) -> dict:
    """Images/s of `encode_image` of `model` (random weights) at its own resolution (224 px for RN50), timed on
    `n` random images after one warm-up batch: the cost a per-configuration re-extraction pays per image (forward
    only; decoding, augmentation and writing come on top, so extrapolations from it are lower bounds)."""
    from .models import load_model

    device = _check_device(device)
    with _threads(threads):
        bundle = load_model(model, None, init_seed=seed, device=device)
        size = bundle.image_size
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(max(1, n), 3, size, size, generator=g)
        cuda = device.startswith("cuda")
        enc = bundle.model
        if cuda:
            enc.visual.to(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", enabled=cuda):
            enc.encode_image(x[:batch].to(device))
            _sync(device)
            t0 = time.perf_counter()
            for s in range(0, len(x), batch):
                enc.encode_image(x[s:s + batch].to(device)).float().cpu()
            _sync(device)
            t = time.perf_counter() - t0
    return {"model": model, "image_size": size, "images": len(x), "batch": batch, "seconds": t,
            "images_per_s": len(x) / t, "device": device, "threads": torch.get_num_threads() if threads is None
            else threads}


# --------------------------------------------------------------------------------------------- 7. search
SEARCH_TARGET_SECONDS = 0.1  # a full 80,000-point APE search at C=100, 1,000 val on one GPU


def bench_search(classes: int = 100, val: int = 1000, shots: int = 16, dim: int = 1024, top_k: int = 500,
                 device: str = "cuda", repeats: int = 5, cpu_baseline: bool = True, seed: int = 0,
                 threads: int | None = None, progress: Progress | None = None) -> dict:
    """One full APE search (`ape.select`, 200x20x20 = 80,000 points) with every tensor on `device`, median of
    `repeats`, against the same search on the CPU in the same run (`cpu_baseline`, one timing) and against the
    search's floor on the device (producing every cache value, no counting). Same pick on both devices checked."""
    from .methods import ape
    from .runner import refine_channels

    device = _check_device(device)
    if classes < 2 or val < classes or shots < 1 or not 1 <= top_k <= dim or repeats < 1:
        raise CachekitError("bench search needs --classes >= 2, --val >= --classes, --shots >= 1, "
                            "1 <= --top-k <= --dim, --repeats >= 1")
    cli = dict(classes=classes, val=val, shots=shots, dim=dim, top_k=top_k, device=device, repeats=repeats,
               cpu_baseline=cpu_baseline, seed=seed, threads=threads)
    full_n = (200, 20, 20)
    with _threads(threads):
        res = _result("search", dict(cli), cli, device)
        baseline = cpu_baseline and not device.startswith("cpu")
        steps = _Phases(progress, "search", ["features", f"search on {device}", "floor"]
                        + (["search on cpu"] if baseline else []))
        W, F, ky, vf, vy = _synthetic_search_features(classes, shots, val, dim, seed)
        L = torch.nn.functional.one_hot(ky, classes).float()
        idx, _ = refine_channels(W, F, ky, top_k)
        dev = [t.to(device) for t in (vf, vy, W, F, L, ky, idx)]
        steps.next()
        t_dev = _median_time(lambda: ape.select(*dev, s=(7, 7, 1), n=full_n), repeats=repeats, device=device)
        sel = ape.select(*dev, s=(7, 7, 1), n=full_n)
        steps.next()
        t_floor = _median_time(lambda: ape.cache_values_only(*dev, s=(7, 7, 1), n=full_n), repeats=repeats,
                               device=device)
        steps.next()
        t_cpu = sel_cpu = None
        if baseline:
            t_cpu, sel_cpu = _timed(lambda: ape.select(vf, vy, W, F, L, ky, idx, s=(7, 7, 1), n=full_n))
            steps.next()
    res["search"] = {"seconds": t_dev, "device": device, "pick": dict(sel.params), "val_acc": sel.val_acc,
                     "grid_index": list(sel.extra["grid_index"]), "seconds_floor": t_floor,
                     "seconds_cpu": t_cpu, "features": "synthetic class-clustered", "keys": classes * shots}
    res["ratios"] = {"floor_over_search": t_floor / t_dev}
    if baseline:
        res["ratios"]["cpu_over_device"] = t_cpu / t_dev
        same = list(sel_cpu.extra["grid_index"]) == list(sel.extra["grid_index"]) and sel_cpu.val_acc == sel.val_acc
        res["checks"]["same_pick_as_cpu"] = {"cpu": list(sel_cpu.extra["grid_index"]),
                                             "device": list(sel.extra["grid_index"]), "same": same}
    res["headline"] = "cpu_over_device" if baseline else "floor_over_search"
    if classes == 100 and val == 1000:
        res["checks"]["target"] = {"seconds_max": SEARCH_TARGET_SECONDS, "seconds": t_dev,
                                   "met": t_dev <= SEARCH_TARGET_SECONDS, "device": device}
    rows = [[f"`ape.select` on {device}: full 200x20x20 grid (C={classes}, N={classes * shots} keys, M={val} val, "
             f"Q={top_k} of D={dim}), median of {repeats}", _fmt_s(t_dev), "1×"],
            [f"floor on {device}: only the {classes * val * full_n[0] * full_n[2]:,} cache values, no counting",
             _fmt_s(t_floor), _fmt_x(t_floor / t_dev)]]
    if baseline:
        rows.append(["the same search on the CPU (one timing)", _fmt_s(t_cpu), _fmt_x(t_cpu / t_dev)])
        rows.append(["same pick on CPU and device", f"cpu {res['checks']['same_pick_as_cpu']['cpu']} vs "
                     f"{device} {res['checks']['same_pick_as_cpu']['device']}",
                     "same" if res["checks"]["same_pick_as_cpu"]["same"] else "DIFFERENT"])
    if "target" in res["checks"]:
        rows.append([f"target: <= {SEARCH_TARGET_SECONDS} s on one GPU", _fmt_s(t_dev),
                     "met" if res["checks"]["target"]["met"] else "NOT met"])
    res["table"] = {"header": ["what", "time", "ratio vs the device search"], "rows": rows}
    res["notes"] = [
        "Synthetic class-clustered features as in `bench grid` (b) (the search's work depends on how many classes "
        "compete per sample); every tensor on the device, so the search runs there (as `eval --device` / "
        "`sweep --device` run it); counts come back to the CPU once per block.",
        "Ratios: the CPU time over the device time (higher: the device is faster); the floor over the search (1 "
        "would mean counting is free).",
    ]
    return _finish(res)


# --------------------------------------------------------------------------------------------- 8. gpu (suite)
GPU_TARGETS = {"extract_over_bare": 0.9, "usual_over_cached_memory": 20.0, "search_seconds_c100": SEARCH_TARGET_SECONDS}


def gpu_plan(device: str = "cuda", tiny: bool = False, workers: int = 8) -> list[tuple[str, str, dict]]:
    """(docs section, benchmark, keyword arguments) of every GPU measurement; `tiny`: the same steps at sizes
    that run in seconds on a CPU (the dry run). Sized for about 8 minutes on one H100/H200 otherwise."""
    if tiny:
        w = 0
        return [
            ("gpu-extract", "extract", dict(model="RN-tiny", images=8, device=device, batch_size=4, workers=w, views=1,
                                            classes=2, image_size=(48, 40), decode="both")),
            ("gpu-safe", "safe", dict(model="RN-tiny", images=4, views=1, batch_size=2, epochs=1, workers=w,
                                      classes=2, image_size=(48, 40), device=device)),
            ("gpu-search-100", "search", dict(classes=4, val=8, shots=2, dim=32, top_k=16, device=device, repeats=1)),
            ("gpu-search-1000", "search", dict(classes=6, val=12, shots=2, dim=32, top_k=16, device=device,
                                               repeats=1)),
            ("gpu-scale", "scale", dict(classes=3, shots=(1, 2), views=1, val=3, test=3, dense_shape=(8, 2, 2), dim=4,
                                        heads=2, batch_size=4, input_px=16, safe_steps=1, safe_batch=2,
                                        ape_curve="3x6", rn50_sample=0, device=device)),
        ]
    return [
        ("gpu-extract", "extract", dict(model="RN50", images=2048, device=device, batch_size=256, workers=workers,
                                        views=0, classes=8, image_size=(500, 375), decode="both")),
        ("gpu-safe", "safe", dict(model="RN50", images=512, views=4, batch_size=64, epochs=2, workers=workers,
                                  classes=8, image_size=(500, 375), device=device, repeats=1)),
        ("gpu-search-100", "search", dict(classes=100, val=1000, device=device, repeats=5)),
        ("gpu-search-1000", "search", dict(classes=1000, val=1000, device=device, repeats=3)),
        ("gpu-scale", "scale", dict(classes=100, shots=(1, 4), views=10, val=500, test=1000, safe_steps=20,
                                    safe_batch=128, ape_curve="100x500,100x1000", rn50_sample=0, device=device,
                                    workers=min(workers, 4))),
    ]


def bench_gpu(device: str = "cuda", tiny: bool = False, workers: int = 8, docs=None, threads: int | None = None,
              progress: Progress | None = None) -> dict:
    """Every GPU measurement of docs/benchmarks.md in one run (`make bench-gpu`): extract vs bare encode_image
    (fp16 autocast, channels_last, Pillow and nvJPEG decoding), a SAFE epoch on cached maps vs the usual way, the
    APE search at C=100 and C=1000 with 1,000 val, and a small scale rehearsal with SAFE and eval on the device.
    Each result is written to its own section of `docs` (when given); returns the summary of the targets."""
    device = _check_device(device)
    if not device.startswith("cuda") and not tiny:
        raise CachekitError(f"bench gpu measures a GPU; --device {device} needs --tiny (the CPU dry run); fix: "
                            "--device cuda, or add --tiny")
    cli = dict(device=device, tiny=tiny, workers=workers, threads=threads)
    funcs = {"extract": bench_extract, "safe": bench_safe, "search": bench_search, "scale": bench_scale}
    plan = gpu_plan(device, tiny, workers)
    res = _result("gpu", dict(cli), cli, device)
    t0 = time.perf_counter()
    parts = {}
    bar = Counter(progress, "bench gpu", total=len(plan), unit="bench")
    for section, name, kw in plan:
        r = funcs[name](**kw, threads=threads, progress=progress)
        r["docs_section"] = section
        r["command"] += f" --docs-section {section}"
        if docs is not None:
            write_docs_section(r, docs)
        parts[section] = {"command": r["command"], "ratios": r["ratios"], "checks": r["checks"],
                          "headline": r["headline"]}
        bar.advance(last=section)
    bar.close()
    seconds = time.perf_counter() - t0
    ex = parts["gpu-extract"]["ratios"]
    sf = parts["gpu-safe"]["ratios"]
    s100 = parts["gpu-search-100"]["checks"].get("target", {})
    t100 = s100.get("seconds")  # None at the tiny sizes, where the C=100 target does not apply
    targets = [
        ("full `extract` images/s over bare `encode_image` (Pillow decoding)", ex["extract_over_bare"],
         GPU_TARGETS["extract_over_bare"], ">="),
        ("the same with `--decode device` (nvJPEG)", ex.get("extract_device_decode_over_bare"),
         GPU_TARGETS["extract_over_bare"], ">="),
        ("SAFE epoch: usual way over cached maps in memory", sf["usual_over_cached_memory"],
         GPU_TARGETS["usual_over_cached_memory"], ">="),
        ("SAFE epoch: usual way over cached maps streamed from HDF5", sf["usual_over_cached_hdf5"],
         GPU_TARGETS["usual_over_cached_memory"], ">="),
        ("APE search, full 80,000-point grid, C=100, 1,000 val (seconds)", t100, GPU_TARGETS["search_seconds_c100"],
         "<="),
    ]
    rows, met = [], {}
    for what, value, target, op in targets:
        if value is None:
            rows.append([what, "not measured at these sizes", f"{op} {target:g}", "-"])
            continue
        ok = value >= target if op == ">=" else value <= target
        met[what] = ok
        shown = _fmt_s(value) if op == "<=" else _fmt_x(value)
        rows.append([what, shown, f"{op} {target:g}", "met" if ok else "NOT met"])
    res["parts"] = parts
    res["targets"] = [{"what": w, "value": v, "target": t, "op": o} for w, v, t, o in targets]
    res["checks"] = {"targets_met": met, "tiny": tiny}
    res["ratios"] = {"extract_over_bare": float(ex["extract_over_bare"]),
                     "usual_over_cached_memory": float(sf["usual_over_cached_memory"])}
    res["headline"] = "extract_over_bare"
    res["seconds"] = seconds
    res["table"] = {"header": ["target", "measured", "target", "status"], "rows": rows}
    res["notes"] = [
        f"Run by `make bench-gpu` (tools/bench_gpu.sh) in {_fmt_s(seconds)}; each measurement wrote its own section "
        "(gpu-extract, gpu-safe, gpu-search-100, gpu-search-1000, gpu-scale) with its exact command.",
    ] + (["TINY dry run (--tiny): toy sizes and models, to check the script; the numbers mean nothing."] if tiny else [])
    return _finish(res)


# --------------------------------------------------------------------------------------------- docs
def render_markdown(res: dict) -> str:
    """The markdown section of one result (without the markers), as in docs/benchmarks.md."""
    m = res["machine"]
    dev = m["device"] if m["device"] == "cpu" else f"{m['device']} ({m['device_name']})"
    head = res["table"]["header"]
    rows = res["table"]["rows"]
    lines = [
        f"### `cachekit bench {res['bench']}`",
        "",
        f"- Command: `{res['command']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''}), "
        f"device {dev}; load average {m.get('load_average_start')} at start, {m.get('load_average_end')} at end "
        "(the machine was shared)",
        f"- Date: {res['date']}",
        f"- Headline: **{res['headline']} = {_fmt_x(res['ratios'][res['headline']])}**"
        + (" (extrapolated baseline)" if res["headline"] in res.get("extrapolated_ratios", []) else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    lines.append("")
    for n in res.get("notes", []):
        lines.append(f"- {n}")
    lines.append("")
    return "\n".join(lines)


def replace_section(text: str, name: str, body: str) -> str:
    """Replace what lies between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` (markers kept); append
    the section with its markers when the document has none."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    body = body.strip("\n")
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if len(pat.findall(text)) > 1:
        raise CachekitError(f"the benchmarks document has more than one {start} section; fix: keep one")
    block = f"{start}\n{body}\n{end}"
    if pat.search(text):
        return pat.sub(lambda _: block, text, count=1)
    if start in text or end in text:
        raise CachekitError(f"the benchmarks document has an unmatched {start} / {end} marker; fix: repair it")
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_docs_section(res: dict, path) -> Path:
    """Replace this result's section (`res["docs_section"]`, default its name) of the markdown file `path`,
    written atomically; a missing file is created with a title. Only `path` is written."""
    if path is None:
        raise CachekitError("no benchmarks document given; fix: name the markdown file to update (--docs PATH)")
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    new = replace_section(text, res.get("docs_section") or res["bench"], render_markdown(res))
    tmp = path.with_name(path.name + ".tmp")
    with os_errors(str(path), "--docs path"):
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, path)
    return path
