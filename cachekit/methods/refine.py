"""APE channel refinement: score every feature channel, keep the top-Q, re-normalise.

J[d] = -w0 * sim[d] + w1 * var[d], where
  sim[d] = mean over ordered class pairs i != j of mu_i[d] * mu_j[d]
         = ((sum_i mu_i[d])^2 - sum_i mu_i[d]^2) / (C (C - 1)),
  mu_i   = mean of class i's members {w_i, its cache keys} (text-only variant: mu_i = w_i),
  var[d] = unbiased variance (divide by C - 1) of W[:, d] over the C classes.
mu_i[d] * mu_j[d] is the mean of x_im[d] * x_jn[d] over all members m of class i and n of class j, so sim is
the literal pairwise mean (each class pair weighted equally, whatever the class sizes) in O(C S D).
"""
from __future__ import annotations

import operator

import torch

from ..errors import CachekitError


def _check_classes(W: torch.Tensor) -> int:
    if W.dim() != 2:
        raise CachekitError(f"text classifier has shape {tuple(W.shape)}; fix: pass W as (C, D)")
    C = W.shape[0]
    if C < 2:
        raise CachekitError(f"channel refinement needs at least 2 classes, got C={C}; "
                            "fix: use a dataset with two or more classes")
    return C


def class_means(W: torch.Tensor, F: torch.Tensor, key_labels: torch.Tensor) -> torch.Tensor:
    """mu (C, D), float64: mean of {w_i} and the keys F[n] with key_labels[n] == i, per class i."""
    C = _check_classes(W)
    y = key_labels.reshape(-1).long()
    if F.dim() != 2 or F.shape[1] != W.shape[1] or F.shape[0] != y.numel():
        raise CachekitError(f"cache keys {tuple(F.shape)} / labels {tuple(y.shape)} do not match the text "
                            f"classifier {tuple(W.shape)}; fix: pass keys (N, D) and N key labels")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
        raise CachekitError(f"key labels must lie in 0..{C - 1}, got {int(y.min())}..{int(y.max())}; "
                            "fix: pass 0-based labels matching the rows of W")
    sums = W.double().clone().index_add_(0, y, F.double())
    counts = 1.0 + torch.bincount(y, minlength=C).double()
    return sums / counts.unsqueeze(1)


def inter_class_similarity(W: torch.Tensor, F: torch.Tensor | None, key_labels: torch.Tensor | None,
                           text_only: bool = False) -> torch.Tensor:
    """sim (D,): mean over ordered class pairs i != j and members m, n of x_im[d] * x_jn[d].

    Members of class i are its text row W[i] and its keys F[key_labels == i] (classes may have different
    numbers of keys); with text_only=True the members are W[i] alone and F, key_labels are ignored.
    """
    C = _check_classes(W)
    if not text_only and (F is None or key_labels is None):
        raise CachekitError("the similarity over text and keys needs the cache keys and their labels; "
                            "fix: pass F and key_labels, or text_only=True")
    mu = W.double() if text_only else class_means(W, F, key_labels)
    total = mu.sum(dim=0)
    sim = (total * total - (mu * mu).sum(dim=0)) / (C * (C - 1))
    return sim.to(W.dtype)


def channel_variance(W: torch.Tensor) -> torch.Tensor:
    """var (D,): unbiased variance (divide by C - 1) of W[:, d] over the C classes."""
    _check_classes(W)
    return W.double().var(dim=0, correction=1).to(W.dtype)


def scores(W: torch.Tensor, F: torch.Tensor | None, key_labels: torch.Tensor | None,
           w0: float = 0.5, w1: float = 0.5, text_only: bool = False) -> torch.Tensor:
    """Criterion J (D,) = -w0 * sim + w1 * var (raw terms, no normalisation); higher is better."""
    sim = inter_class_similarity(W, F, key_labels, text_only=text_only).double()
    var = channel_variance(W).double()
    return (-w0 * sim + w1 * var).to(W.dtype)


def select_channels(scores: torch.Tensor, q: int) -> torch.Tensor:
    """Indices (LongTensor, length q) of the q highest scores, by descending score.

    Equal scores are ordered by lower channel index first (stable sort), so the result is deterministic.
    """
    D = scores.numel()
    try:
        q_int = None if isinstance(q, bool) else operator.index(q)
    except TypeError:
        q_int = None
    if q_int is None or not 1 <= q_int <= D:
        raise CachekitError(f"top-k Q={q!r} is out of range for D={D} channels (valid: 1..{D}); "
                            f"fix: pass an integer Q between 1 and {D}")
    order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
    return order[:q_int].clone()


def refine(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Keep channels idx of x (..., D), then L2-normalise each row again."""
    kept = x.index_select(-1, idx.to(device=x.device, dtype=torch.long))
    return kept / kept.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def by_criterion(W: torch.Tensor, F: torch.Tensor | None, key_labels: torch.Tensor | None, top_k: int,
                 weights=(0.5, 0.5), text_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """APE's channel selection: (indices of the top-Q channels by J, per-channel scores J)."""
    w0, w1 = (float(w) for w in weights)
    sc = scores(W, None if text_only else F, None if text_only else key_labels, w0=w0, w1=w1, text_only=text_only)
    return select_channels(sc, int(top_k)), sc


def clip_top_k(top_k: int, D: int, name: str) -> tuple[int, list[str]]:
    """The one rule for a Q wider than the features: keep all D channels and say so (docs/eval.md)."""
    if int(top_k) > D:
        return D, [f"{name}={top_k} exceeds the cache's {D} channels: all {D} kept (use a value <= {D} "
                   "to refine)"]
    return int(top_k), []


def resolve_channels(cfg, task, explicit: frozenset, variant: str):
    """Where APE's (or APE-T's) channels come from, decided before the run (docs/methods-training-free.md):

    channels=computed: by the criterion from top_k and weights. channels=stored: the refinement that
    `cachekit refine` stored for this (K, seed) (its top_k and weights replace the config's). channels=auto
    (default): stored when exactly one is stored for this (K, seed) and neither top_k nor weights was set
    explicitly (by --set, a grid or a preset); else computed. A top_k above the width is clipped (note).
    Returns (config with channels "stored"/"computed", notes)."""
    from ..errors import CachekitError

    owner = type(cfg).OWNER
    mode, use = cfg.channels, None
    if mode != "computed":
        stored = task.stored_refinements(variant)
        chose = bool(explicit & {"top_k", "weights"})
        match = [r for r in stored if r["top_k"] == cfg.top_k and [float(w) for w in r["weights"]] ==
                 [float(w) for w in cfg.weights]]
        if mode == "stored":
            flag = " --text-only" if variant == "text-only" else ""
            if not stored:
                raise CachekitError(f"{owner}.channels=stored, but no refinement{' (text-only)' if flag else ''} "
                                    f"is stored for K={task.k} seed={task.seed}; fix: run `cachekit refine CACHE "
                                    f"--top-k Q --shots {task.k} --seeds {task.seed}{flag}` first, or --set "
                                    f"{owner}.channels=computed")
            if len(stored) == 1:
                use = stored[0]
            elif chose and match:
                use = match[0]
            else:
                have = "; ".join(f"top_k={r['top_k']} weights={r['weights']}" for r in stored)
                raise CachekitError(f"{owner}.channels=stored: {len(stored)} refinements are stored for "
                                    f"K={task.k} seed={task.seed} ({have}); fix: pick one with --set "
                                    f"{owner}.top_k=Q --set {owner}.weights=[w0,w1]")
        elif len(stored) == 1 and not chose:
            use = stored[0]
    if use is not None:
        cfg = cfg.replace(top_k=int(use["top_k"]), weights=[float(w) for w in use["weights"]], channels="stored")
    else:
        cfg = cfg.replace(channels="computed")
    q, notes = clip_top_k(cfg.top_k, int(task.W.shape[1]), f"{owner}.top_k")
    if q != cfg.top_k:
        if cfg.channels == "stored":  # a stored selection always fits the cache it was made on
            raise CachekitError(f"stored refinement has top_k={cfg.top_k} > {q} channels; fix: rerun refine")
        cfg = cfg.replace(top_k=q)
    return cfg, notes


def channels_for(cfg, task, variant: str) -> tuple[torch.Tensor, str]:
    """The resolved config's channel indices and a line naming their source (for the record)."""
    weights = [float(w) for w in cfg.weights]
    if cfg.channels == "stored":
        key = {"k": int(task.k), "seed": int(task.seed), "top_k": int(cfg.top_k), "weights": weights,
               "variant": variant}
        return task.refinement_channels(key), f"stored by `cachekit refine` (top_k={cfg.top_k}, weights={weights})"
    text_only = variant == "text-only"
    idx, _ = by_criterion(task.W, None if text_only else task.F, None if text_only else task.key_labels,
                          cfg.top_k, weights, text_only)
    return idx, f"computed by the criterion (top_k={cfg.top_k}, weights={weights}, {variant})"
