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
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .errors import CachekitError
from .progress import Counter, Progress, tick
from .store import os_errors

BENCHES = ("refine", "grid", "io", "safe", "extract")
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
    dataset layout (cachekit.extract._assemble: chunk = one map, no compression, no filters)."""
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
               ape_configs: int = 100, seed: int = 0, threads: int | None = None, workdir=None,
               progress: Progress | None = None) -> dict:
    """(a) `configs` Tip/APE configurations through `Runner` on one cache vs re-running the authors'
    pipeline (extract, then search) per configuration; (b) the vectorised APE search `ape.select` vs a
    naive per-point loop over the (beta, alpha, gamma) grid; (c) an APE sweep grid of `ape_configs`
    (Q x criterion weights) configurations on the (b) features, each refined and searched as `Runner`
    does it, against re-extracting per configuration."""
    from .cache import open_cache
    from .extract import ExtractOptions, extract
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
    cli = dict(shots=shots, classes=classes, val=val, configs=configs, views=views, model=model,
               batch_size=batch_size, workers=workers, device=device, dim=dim, top_k=top_k,
               naive_points=naive_points, check_n=check_n, ape_configs=ape_configs, seed=seed, threads=threads)
    with _threads(threads), _workdir(workdir) as wd:
        res = _result("grid", dict(cli), cli, device)
        steps = _Phases(progress, "grid", ["(a) images and extract", "(a) configurations on the cache",
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

    res["cache"] = {"model": model, "random_weights": True, "classes": classes, "shots": shots, "views": views,
                    "val": val, "embed_dim": D, "encoded_images": n_encoded, "extract_summary_images":
                    summary.get("images")}
    res["grid_a"] = {
        "configs": [{"method": m, "overrides": ov, "seconds": t} for (m, ov), (_, t) in zip(cfgs, run_times)],
        "seconds_extract": t_extract, "seconds_load_inputs": t_load, "seconds_runs": sum_runs,
        "seconds_cached_total": cached_total, "seconds_authors_total": authors_total,
        "authors_total_is_computed": True,
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
        "seconds_authors_computed": t_authors_c,
    }
    res["extrapolated"] = naive_extrapolated
    res["ratios"] = {
        "pipeline_total": authors_total / cached_total,
        "per_extra_config": (t_extract + mean_run) / mean_run,
        "ape_search_naive_over_vectorised": t_naive / t_vec,
        "ape_sweep_vs_reextract": ratio_c,
        "ape_search_over_cache_values_only": t_vec / t_floor,
    }
    res["headline"] = "pipeline_total"
    res["extrapolated_ratios"] = ["ape_search_naive_over_vectorised"] if naive_extrapolated else []
    res["checks"] = {"same_pick_reduced_grid": {
        "grid": list(check_n), "naive_pick": list(naive_pick), "vectorised_pick": list(vec_pick),
        "naive_val_correct": best, "vectorised_val_acc": vec_sel.val_acc,
        "naive_val_acc": best * 100.0 / val, "same": naive_pick == vec_pick}}
    ext = " (extrapolated)" if naive_extrapolated else ""
    n_tip = sum(1 for m, _ in cfgs if m == "tip")
    res["table"] = {
        "header": ["what", "time", "ratio"],
        "rows": [
            [f"(a) one `extract` of the images ({model}, {classes} classes x {shots} shots x {views + 1} views "
             f"+ {val} val = {n_encoded:,} images)", _fmt_s(t_extract), ""],
            [f"(a) {configs} configurations ({n_tip} tip, {configs - n_tip} ape) through `Runner` on the cache, "
             f"incl. the one extract and loading the inputs", _fmt_s(cached_total), "1×"],
            [f"(a) authors' way: re-extract per configuration = {configs} x the measured extract + the same "
             f"searches (computed, not run {configs} times)", _fmt_s(authors_total),
             _fmt_x(authors_total / cached_total)],
            ["(a) one more configuration: on the cache vs re-extract + search",
             f"{_fmt_s(mean_run)} vs {_fmt_s(t_extract + mean_run)}", _fmt_x((t_extract + mean_run) / mean_run)],
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
            [f"(c) the same grid re-extracting per configuration: {len(ape_cfgs)} x the (a) extract + the same "
             f"searches (computed)", _fmt_s(t_authors_c) + " vs one extract + grid " + _fmt_s(t_extract + t_sweep),
             _fmt_x(ratio_c)],
        ],
    }
    res["notes"] = [
        f"(a) uses a real cache: {classes * shots + val} generated JPEGs (80x60) encoded by `extract` with "
        f"{model} (random init: the accuracies are chance, only the times matter).",
        "(a) the authors' scripts re-extract features for every configuration: that cost is ONE measured "
        f"extraction ({_fmt_s(t_extract)}) multiplied by {configs}; the searches are the same in both columns.",
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
    from .extract import ExtractOptions, extract
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
        "Full extract = wall time of `cachekit.extract.extract`: model construction, text encoding, decoding every "
        "train image once more to check it, encoding, HDF5 segments and assembly. Bare = `encode_image` alone on "
        "tensors preprocessed beforehand (same images, same preprocessing, same batch size, one warm-up batch "
        "first). Target on GPU: >= 0.9.",
    ]
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
