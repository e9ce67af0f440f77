"""Tip-Adapter, training-free: logits = 100 f W^T + alpha * exp(-beta (1 - f F^T)) L.

Also holds `count_correct`, the exact vectorised accuracy counter shared by the Tip-Adapter and APE searches.
"""
from __future__ import annotations

import torch

from ..errors import CachekitError
from . import zeroshot
from .base import Selection, accuracy, first_best
from .grids import alpha_grid, beta_grid


def affinity(f: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """Cosine affinity of L2-normalised queries f (M, D) to cache keys F (N, D): (M, N) = f @ F.T."""
    return f @ F.t()


def cache_logits(A: torch.Tensor, L: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-beta * (1 - A)) @ L: affinity A (M, N), key labels L (N, C) -> (M, C)."""
    return torch.exp(-beta * (1 - A)) @ L


def logits(f: torch.Tensor, W: torch.Tensor, F: torch.Tensor, L: torch.Tensor,
           alpha: float, beta: float) -> torch.Tensor:
    """Tip-Adapter logits 100 f W^T + alpha * exp(-beta (1 - f F^T)) L, shape (M, C)."""
    return zeroshot.logits(f, W) + alpha * cache_logits(affinity(f, F), L, beta)


# ----------------------------------------------------------------------------------------------------------
# Exact vectorised counting of correct predictions of z + alpha * k over a grid of alpha.

_PAIR_BLOCK = 1 << 22  # bound on alphas x candidate pairs held at once


def count_correct(z: torch.Tensor, k: torch.Tensor, labels: torch.Tensor,
                  alphas: torch.Tensor) -> torch.Tensor:
    """Correct-prediction counts of the logits z + alpha * k[g], for every g and every alpha at once.

    z (M, C), k (G, M, C), labels (M,), alphas (A,) -> LongTensor (G, A) where
    out[g, a] = sum_m [argmax_c(z[m] + alphas[a] * k[g, m]) == labels[m]]  (argmax = first maximum).

    Exact: it equals evaluating `z + alphas[a] * k[g]` and `argmax` literally, bit for bit, because every
    logit it compares is computed with the same two float operations (multiply, then add). It is fast
    because the logits are linear in alpha: a class that is below the true class by a clear margin at both
    ends of the alpha range is below it at every alpha in between, and one that is above it by a clear
    margin at both ends is above it everywhere. Only the remaining (sample, class) pairs, usually few,
    are evaluated at every alpha.
    """
    if z.dim() != 2 or k.dim() != 3 or k.shape[1:] != z.shape:
        raise CachekitError(f"count_correct: z {tuple(z.shape)} and k {tuple(k.shape)} do not match; "
                            "fix: pass z (M, C) and k (G, M, C)")
    G, M, C = k.shape
    al = alphas.to(dtype=z.dtype).reshape(-1)
    A = al.numel()
    y = labels.reshape(-1).long()
    lo, hi = al.min(), al.max()
    yi = y.view(1, M, 1).expand(G, M, 1)

    d_lo = z + lo * k
    d_lo = d_lo - d_lo.gather(2, yi)
    d_hi = z + hi * k
    d_hi = d_hi - d_hi.gather(2, yi)
    d_max = torch.maximum(d_lo, d_hi)
    d_min = torch.minimum(d_lo, d_hi)
    del d_lo, d_hi
    # A margin far above the rounding error of the two-operation logits (relative 1e-4 of the row scale).
    tol = 1e-4 * (z.abs().amax(dim=1).unsqueeze(0) + torch.maximum(lo.abs(), hi.abs()) * k.abs().amax(dim=2))
    tol = tol.unsqueeze(2)  # (G, M, 1)
    is_true = torch.zeros(G, M, C, dtype=torch.bool, device=z.device)
    is_true.scatter_(2, yi, True)
    always_wrong = ((d_min > tol) & ~is_true).any(dim=2)  # (G, M): some class beats y at every alpha
    cand = (d_max >= -tol) & ~is_true & ~always_wrong.unsqueeze(2)  # could tie or beat y somewhere
    del d_max, d_min, is_true

    counts = (~always_wrong).sum(dim=1, dtype=torch.long).unsqueeze(1).repeat(1, A)  # (G, A)
    g_idx, m_idx, c_idx = torch.nonzero(cand, as_tuple=True)
    if g_idx.numel() == 0:
        return counts
    wrong = torch.zeros(A, G * M, dtype=torch.int32, device=z.device)
    block = max(1, _PAIR_BLOCK // max(A, 1))
    al_col = al.unsqueeze(1)
    for s in range(0, g_idx.numel(), block):
        g, m, c = g_idx[s:s + block], m_idx[s:s + block], c_idx[s:s + block]
        t = y[m]
        lc = z[m, c].unsqueeze(0) + al_col * k[g, m, c].unsqueeze(0)  # (A, P)
        lt = z[m, t].unsqueeze(0) + al_col * k[g, m, t].unsqueeze(0)
        beats = (lc > lt) | ((lc == lt) & (c < t).unsqueeze(0))  # argmax keeps the first maximum
        wrong.index_add_(1, g * M + m, beats.to(torch.int32))
    counts -= (wrong > 0).view(A, G, M).sum(dim=2).t()
    return counts


# ----------------------------------------------------------------------------------------------------------


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
    z = zeroshot.logits(val_f, W)
    A = affinity(val_f, F)
    al = torch.tensor(alphas, dtype=z.dtype, device=z.device)
    counts = torch.empty(n_beta, n_alpha, dtype=torch.long)
    for i, beta in enumerate(betas):
        counts[i] = count_correct(z, cache_logits(A, L, beta).unsqueeze(0), val_y, al)[0].cpu()
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
