"""Tip-Adapter, training-free: logits = 100 f W^T + alpha * exp(-beta (1 - f F^T)) L.

The exact vectorised counter its search uses (LinearArgmaxCounter, count_correct) lives in `search.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import zeroshot
from ..params import Config, param
from .base import Estimator, Selection, accuracy, first_best
from .grids import MAX_GRID_POINTS, alpha_grid, beta_grid
from .search import LinearArgmaxCounter, row_chunk
from .registry import register


def affinity(f: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """Cosine affinity of L2-normalised queries f (M, D) to cache keys F (N, D): (M, N) = f @ F.T."""
    return f @ F.t()


def cache_logits(A: torch.Tensor, L: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-beta * (1 - A)) @ L: affinity A (M, N), key labels L (N, C) -> (M, C)."""
    return torch.exp(-beta * (1 - A)) @ L


def logits(f: torch.Tensor, W: torch.Tensor, F: torch.Tensor, L: torch.Tensor,
           alpha: float, beta: float) -> torch.Tensor:
    """Tip-Adapter logits 100 f W^T + alpha * exp(-beta (1 - f F^T)) L, shape (M, C).

    Computed in chunks of samples (to bound memory), the same chunks `select` uses on val.
    """
    step = row_chunk(max(F.shape[0], W.shape[0]))
    parts = [zeroshot.logits(fc, W) + alpha * cache_logits(affinity(fc, F), L, beta)
             for fc in f.split(step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


_BETA_BUDGET = 1 << 22  # (sample x class x beta) cache entries counted in one pass


def grid_counts(val_f: torch.Tensor, val_y: torch.Tensor, W: torch.Tensor, F: torch.Tensor, L: torch.Tensor,
                s_beta: float = 7, s_alpha: float = 7, n_beta: int = 200, n_alpha: int = 20) -> torch.Tensor:
    """Number of correct val predictions at every grid point: LongTensor (n_beta, n_alpha).

    Equal, bit for bit, to evaluating `logits` at each point and counting argmax hits: the zero-shot term
    and the affinity are computed once, exp(-beta (1 - A)) L once per beta (with the same operations as
    `logits`), and every alpha of a whole block of betas is counted in one LinearArgmaxCounter pass.
    """
    betas = beta_grid(s_beta, n_beta)
    alphas = alpha_grid(s_alpha, n_alpha)
    al = torch.tensor(alphas, dtype=val_f.dtype, device=val_f.device)
    y = val_y.reshape(-1).long().to(val_f.device)
    counts = torch.zeros(n_beta, n_alpha, dtype=torch.long)
    step = row_chunk(max(F.shape[0], W.shape[0]))
    for fc, yc in zip(val_f.split(step), y.split(step)):
        z = zeroshot.logits(fc, W)
        A = affinity(fc, F)
        M, C = z.shape
        block = max(1, min(n_beta, _BETA_BUDGET // max(1, M * C)))
        counter = None
        for i0 in range(0, n_beta, block):
            bs = betas[i0:i0 + block]
            # Each beta's cache with the same operations as `logits` (so the same bits), then one
            # counting pass for the whole block: column m * B + b is sample m at beta b.
            cache = torch.stack([cache_logits(A, L, beta) for beta in bs], dim=2)  # (M, C, B)
            cache = cache.permute(1, 0, 2).reshape(C, M * len(bs))
            if counter is None or counter.G != len(bs):
                counter = LinearArgmaxCounter(z, yc, al, len(bs))
            counter.set_scale(cache.abs().amax(dim=0))
            counts[i0:i0 + len(bs)] += counter.count(cache)  # count() returns CPU counts
    return counts


def select(val_f: torch.Tensor, val_y: torch.Tensor, W: torch.Tensor, F: torch.Tensor, L: torch.Tensor,
           test_f: torch.Tensor | None = None, test_y: torch.Tensor | None = None,
           s_beta: float = 7, s_alpha: float = 7, n_beta: int = 200, n_alpha: int = 20) -> Selection:
    """Grid-search (beta, alpha) on val by accuracy, then apply the best once to test.

    Grid: beta_i = 0.1 + i (s_beta - 0.1) / n_beta (i < n_beta), alpha_j likewise. Visiting order: beta
    outer, alpha inner; on equal val accuracy the first point in that order wins. Test data, when given,
    is used only after the choice is made.
    """
    betas = beta_grid(s_beta, n_beta)
    alphas = alpha_grid(s_alpha, n_alpha)
    counts = grid_counts(val_f, val_y, W, F, L, s_beta, s_alpha, n_beta, n_alpha)
    flat = first_best(counts)
    i, j = divmod(flat, n_alpha)
    best = counts.reshape(-1)[flat]
    params = {"beta": betas[i], "alpha": alphas[j]}
    val_acc = float(best.item()) * 100.0 / val_y.numel()
    test_acc = None
    if test_f is not None and test_y is not None:
        test_acc = accuracy(logits(test_f, W, F, L, params["alpha"], params["beta"]), test_y)
    extra = {"grid_index": (i, j), "grid_order": ("beta", "alpha"),
             "grid": {"s_beta": s_beta, "s_alpha": s_alpha, "n_beta": n_beta, "n_alpha": n_alpha},
             "ties": int((counts == best).sum().item())}
    return Selection(method="tip", params=params, val_acc=val_acc, test_acc=test_acc, extra=extra)


# ----------------------------------------------------------------------------------------------- registration


@dataclass
class TipConfig(Config):
    """Tip-Adapter's search grid (docs/methods-training-free.md)."""

    OWNER = "tip"
    s: tuple = param((7, 7), "floats", "search scales (s_beta, s_alpha): beta_i = 0.1 + i(s_beta - 0.1)/n_beta",
                     length=2, gt=0, search=True)
    n: tuple = param((200, 20), "ints", "search steps (n_beta, n_alpha)", length=2, ge=1, search=True,
                     max_points=MAX_GRID_POINTS)

class TipAdapter(Estimator):
    def select(self, task) -> Selection:
        s, n = self.config.s, self.config.n
        return select(task.val_f, task.val_y, task.W, task.F, task.L, task.test_f, task.test_y,
                      s_beta=s[0], s_alpha=s[1], n_beta=n[0], n_alpha=n[1])


register("tip", config=TipConfig, estimator=TipAdapter, doc="docs/methods-training-free.md",
         summary="Tip-Adapter: 100 f·Wᵀ + α exp(-β(1 - f·Fᵀ)) L, (β, α) on val")
