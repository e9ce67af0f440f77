"""Run registered methods on a cache: one Task per (K, seed), hyper-parameters chosen on val, test once.

The runner dispatches through the registry (cachekit.methods.registry): it builds the method's checked
config from declared defaults + preset + user settings, lets the method resolve what depends on the cache
(APE's channel source, a Q wider than the cache), fits, selects, and returns one Record. It is the only place
that joins the cache (files) and the methods (tensor functions), SAFE included.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .cache import Cache
from .errors import CachekitError
from .methods import ape, refine
from .methods.registry import get_method, list_methods
from .progress import Counter, Progress
from .records import Record, ResultsFile
from .results import ResultStore
from .task import DEFAULT_MAX_MEMORY, CacheTask

__all__ = ["Runner", "evaluate", "refine_stored", "refine_channels", "method_defaults", "check_overrides",
           "ApeSearches", "Inputs"]


def check_device(device: str) -> str:
    """A one-line error for a device this machine does not have (before any work)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CachekitError(f"--device {device!r} is not a torch device; fix: cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CachekitError(f"--device {device}: no CUDA GPU is available here; fix: --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CachekitError(f"--device {device}: only {torch.cuda.device_count()} GPU(s); fix: cuda:0")
    elif dev.type != "cpu":
        raise CachekitError(f"--device {device}: only cpu and cuda are supported; fix: --device cpu")
    return device


def method_defaults() -> dict[str, dict]:
    """Every registered method's declared defaults (the one source for docs, presets and --set)."""
    return {m: get_method(m).defaults() for m in list_methods()}


def check_overrides(methods, overrides: dict | None, note=None) -> dict:
    """Check every `METHOD.PARAM` setting before any work: unknown methods or parameters and bad values are
    errors; settings for a method that is not being run get a one-line note (through `note`)."""
    overrides = overrides or {}
    for m in list(methods) + [m for m in overrides if m not in methods]:
        get_method(m).make_config(overrides.get(m))
    idle = [m for m in overrides if m not in methods and overrides[m]]
    if idle and note is not None:
        note(f"NOTE: settings for {', '.join(idle)} are ignored: {'it is' if len(idle) == 1 else 'they are'} "
             f"not among the methods run ({', '.join(methods)})")
    return {m: v for m, v in overrides.items() if m in methods}


#: APE's channel selection (kept under its old name for Python callers): refine.by_criterion.
refine_channels = refine.by_criterion


@dataclass
class Inputs:
    """Features of one few-shot set held in memory (what `ApeSearches.select` reads)."""

    W: torch.Tensor
    F: torch.Tensor
    key_labels: torch.Tensor
    L: torch.Tensor
    val_f: torch.Tensor
    val_y: torch.Tensor
    test_f: torch.Tensor
    test_y: torch.Tensor


class ApeSearches:
    """APE searches remembered by (inputs key, channel indices in order, grid).

    Configurations whose criterion weights or Q pick the very same channels (in the same order, so the same
    arithmetic) get the very same search, so a sweep runs it once. Keeps the latest `size` searches.
    """

    def __init__(self, size: int = 512):
        self.size = size
        self._memo: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._memo)

    def select(self, inputs_key, x, idx: torch.Tensor, s, n) -> tuple:
        """(ape.select on val then test for these channels, whether it was reused)."""
        key = (inputs_key, tuple(idx.tolist()), tuple(s), tuple(n))
        sel = self._memo.get(key)
        if sel is not None:
            return sel, True
        sel = ape.select(x.val_f, x.val_y, x.W, x.F, x.L, x.key_labels, idx, x.test_f, x.test_y,
                         s=tuple(s), n=tuple(n))
        if len(self._memo) >= self.size:
            self._memo.popitem(last=False)
        self._memo[key] = sel
        return sel, False


class Runner:
    """Runs methods on one open cache; one Task per (K, seed), reused across methods and settings.

    device: where searches and training run; max_memory: dense maps held in memory up to this many bytes
    (else streamed); reuse_fits: reuse stored SAFE fits of the same settings; fit_out: write a fitted SAFE
    layer there instead of beside the cache.
    """

    def __init__(self, cache: Cache, device: str = "cpu", max_memory: int = DEFAULT_MAX_MEMORY,
                 progress: Progress | None = None, reuse_fits: bool = True, fit_out=None):
        self.cache = cache
        self.store = ResultStore(cache)
        self.build = self.store.build
        self.device, self.max_memory, self.progress = device, max_memory, progress
        self.reuse_fits, self.fit_out = reuse_fits, fit_out
        self._tasks: OrderedDict = OrderedDict()
        self._ape_searches = ApeSearches()
        check_device(device)

    def inputs(self, k: int, seed: int) -> CacheTask:
        """The task of (K, seed); the latest 8 stay loaded."""
        key = (int(k), int(seed))
        task = self._tasks.get(key)
        if task is None:
            task = CacheTask(self.cache, k, seed, store=self.store, device=self.device,
                             max_memory=self.max_memory, progress=self.progress, reuse_fits=self.reuse_fits,
                             fit_out=self.fit_out)
            task.searches = self._ape_searches
            self._tasks[key] = task
            if len(self._tasks) > 8:
                self._tasks.popitem(last=False)
        return task

    task = inputs

    @property
    def selection_label(self) -> str:
        return "val (val and test are the same data)" if self.cache.val_is_test else "val"

    def _with_device(self, spec, overrides: dict | None) -> dict:
        over = dict(overrides or {})
        if self.device != "cpu" and "device" in spec.config.spec_by_name() and over.get("device") is None:
            over["device"] = self.device
        return over

    def resolve(self, method: str, k: int, seed: int, overrides: dict | None = None):
        """(spec, checked and resolved config, notes): what a run of these settings will be, before it runs."""
        spec = get_method(method)
        over = self._with_device(spec, overrides)
        cfg = spec.make_config(over)
        explicit = frozenset(n for n, v in (overrides or {}).items() if v is not None)
        cfg, notes = spec.estimator.resolve(cfg, self.inputs(k, seed), explicit)
        return spec, cfg, notes

    def key(self, method: str, k: int, seed: int, overrides: dict | None = None) -> str:
        _, cfg, _ = self.resolve(method, k, seed, overrides)
        return Record(method, k, seed, cfg.to_dict(), {}, {}, "", 0, self.build, "", "", "", None, "", False).key

    def run(self, method: str, k: int, seed: int, overrides: dict | None = None) -> dict:
        """One method on one few-shot set: hyper-parameters chosen on val, then test once. A record dict."""
        return self.run_record(method, k, seed, overrides).to_dict()

    def run_record(self, method: str, k: int, seed: int, overrides: dict | None = None) -> Record:
        spec, cfg, notes = self.resolve(method, k, seed, overrides)
        task = self.inputs(k, seed)
        t0 = time.perf_counter()
        est = spec.estimator(cfg).fit(task)
        sel = est.select(task)
        extra = dict(est.extra())
        if notes:
            extra["notes"] = notes
        return self.record(method, k, seed, cfg.to_dict(), sel, time.perf_counter() - t0, extra)

    def record(self, method, k, seed, config, sel, seconds, extra=None) -> Record:
        m = self.cache.meta
        return Record(method=method, shots=int(k), seed=int(seed), config=config, params=sel.params,
                      metrics={"val_acc": sel.val_acc, "test_acc": sel.test_acc}, selection=self.selection_label,
                      seconds=seconds, cache_build=self.build, dataset=self.cache.path.stem,
                      cache=str(self.cache.path), model=m["model"], pretrained=m["checkpoint"],
                      weights=m["weights"], random_weights=bool(m["random_weights"]), extra=extra or {})


def _sets(cache: Cache, shots=None, seeds=None) -> list[tuple[int, int]]:
    """The (K, seed) pairs asked for (default: every few-shot set of the cache), each checked to exist."""
    have = cache.fewshot_names()
    shots = sorted(set(shots or [k for k, _ in have]))
    seeds = sorted(set(seeds or [s for _, s in have]))
    for k in shots:
        for s in seeds:
            cache.fewshot(k, s)  # a clear error before any work when a set is missing
    return [(k, s) for k in shots for s in seeds]


def evaluate(cache: Cache, methods, shots=None, seeds=None, overrides: dict | None = None,
             progress: Progress | None = None, out=None, runner: Runner | None = None) -> list[dict]:
    """Every method on every (K, seed) asked for. With `out` (a results file), runs already there are read
    back instead of run again, and new ones are appended as they finish (an interrupted eval resumes)."""
    overrides = check_overrides(methods, overrides)
    runner = runner or Runner(cache, progress=progress)
    jobs = [(m, k, s) for k, s in _sets(cache, shots, seeds) for m in methods]
    keys = [runner.key(m, k, s, overrides.get(m)) for m, k, s in jobs]  # every setting resolved before any work
    out_records = []
    if out is None:
        bar = Counter(progress, "eval", len(jobs), "run")
        for m, k, s in jobs:
            out_records.append(runner.run(m, k, s, overrides.get(m)))
            bar.advance()
        bar.close()
        return out_records
    from .records import read_results

    with ResultsFile(out) as rf:
        done = {r["key"]: r for r in read_results(out).records} if rf.keys else {}
        bar = Counter(progress, "eval", len(jobs), "run", initial=sum(key in done for key in keys))
        for (m, k, s), key in zip(jobs, keys):
            if key in done:
                out_records.append(done[key])
                continue
            rec = runner.run(m, k, s, overrides.get(m))
            rf.append(rec)
            out_records.append(rec)
            bar.advance()
        bar.close()
    return out_records


def refine_stored(cache: Cache, top_k: int, weights=(0.5, 0.5), text_only: bool = False, shots=None,
                  seeds=None) -> list[dict]:
    """APE's channel selection for each (K, seed) asked for (default: every set), stored with the cache's
    results, where `eval`/`sweep` pick it up (docs/methods-training-free.md, "refine then eval")."""
    W = cache.text_classifier()
    D = W.shape[1]
    if int(top_k) < 1:
        raise CachekitError(f"--top-k {top_k} must be at least 1; fix: pass 1..{D}")
    q, notes = refine.clip_top_k(top_k, D, "refine --top-k")
    store = ResultStore(cache)
    store.check_writable()
    variant = "text-only" if text_only else "text+cache"
    out = []
    for k, seed in _sets(cache, shots, seeds):
        F, y = cache.train_keys(k, seed)
        idx, sc = refine_channels(W, F, y, q, weights, text_only)
        key = {"k": int(k), "seed": int(seed), "top_k": int(q), "weights": [float(w) for w in weights],
               "variant": variant}
        path = store.put("refine", key, {"channels": idx.numpy(), "scores": sc.numpy()},
                         info={"weights_label": cache.weights_label})
        out.append({**key, "channels": idx.tolist(), "scores": sc.tolist(), "stored": str(path),
                    **({"notes": notes} if notes else {})})
    return out


def store_refine(cache: Cache, k: int, seed: int, top_k: int, weights=(0.5, 0.5), text_only: bool = False) -> dict:
    """One (K, seed) of `refine_stored` (kept for Python callers)."""
    return refine_stored(cache, top_k, weights, text_only, shots=[k], seeds=[seed])[0]
