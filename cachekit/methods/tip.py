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

_PAIR_BLOCK = 1 << 22  # bound on (alphas x candidate pairs) evaluated at once
_TOL = 1e-4  # relative margin, far above the rounding error of a two-operation logit


def correct_rows(zr: torch.Tensor, k: torch.Tensor, yr: torch.Tensor, alphas: torch.Tensor,
                 zmax: torch.Tensor) -> torch.Tensor:
    """Which rows are classified correctly at every alpha, in the class-major layout the searches use.

    zr, k (C, R): zero-shot logits and cache term of R rows (rows are samples, or (grid point, sample)
    pairs); yr (R,) the true class of each row; alphas (A,); zmax (R,) = max_c |zr[c, r]|.
    Returns bool (A, R): argmax_c(zr[:, r] + alphas[a] * k[:, r]) == yr[r], argmax = first maximum.

    Exact, bit for bit, with the literal evaluation, since every logit it compares is computed with the
    same two float operations (multiply, then add). Fast because the logits are linear in alpha: a class
    below the true class by a clear margin at both ends of the alpha range is below it at every alpha in
    between, and one above it by a clear margin at both ends is above it everywhere. Only the remaining
    (row, class) pairs, usually few, are evaluated at every alpha.
    """
    C, R = k.shape
    al = alphas.to(dtype=k.dtype).reshape(-1)
    A = al.numel()
    lo, hi = float(al.min()), float(al.max())
    yi = yr.view(1, R)
    correct = torch.ones(A, R, dtype=torch.bool, device=k.device)
    # Bounds only (tolerance-checked), so a fused multiply-add is fine here.
    l_lo = torch.add(zr, k, alpha=lo)
    l_hi = torch.add(zr, k, alpha=hi)
    t_lo = l_lo.gather(0, yi).squeeze(0)
    t_hi = l_hi.gather(0, yi).squeeze(0)
    l_lo.scatter_(0, yi, float("-inf"))
    l_hi.scatter_(0, yi, float("-inf"))
    tol = _TOL * (zmax + max(abs(lo), abs(hi)) * torch.maximum(k.amax(dim=0), -k.amin(dim=0)))
    open_rows = (l_lo.amax(dim=0) >= t_lo - tol) | (l_hi.amax(dim=0) >= t_hi - tol)
    r_idx = torch.nonzero(open_rows).squeeze(1)
    if r_idx.numel() == 0:
        return correct
    d_lo = l_lo[:, r_idx] - t_lo[r_idx]
    d_hi = l_hi[:, r_idx] - t_hi[r_idx]
    del l_lo, l_hi
    tol_o = tol[r_idx]
    # Some class above the true class by the margin at both ends: wrong at every alpha.
    sure_wrong = (torch.minimum(d_lo, d_hi) > tol_o).any(dim=0)
    correct[:, r_idx[sure_wrong]] = False
    # Classes that could tie or beat the true class somewhere in the range: evaluate exactly.
    cand = (torch.maximum(d_lo, d_hi) >= -tol_o) & ~sure_wrong
    del d_lo, d_hi
    c_idx, j_idx = torch.nonzero(cand, as_tuple=True)
    if c_idx.numel() == 0:
        return correct
    wrong = torch.zeros(A, r_idx.numel(), dtype=torch.int32, device=k.device)
    al_col = al.unsqueeze(1)
    block = max(1, _PAIR_BLOCK // A)
    for s in range(0, c_idx.numel(), block):
        c, j = c_idx[s:s + block], j_idx[s:s + block]
        r = r_idx[j]
        t = yr[r]
        lc = zr[c, r].unsqueeze(0) + al_col * k[c, r].unsqueeze(0)  # (A, P), as z + alpha * k
        lt = zr[t, r].unsqueeze(0) + al_col * k[t, r].unsqueeze(0)
        beats = (lc > lt) | ((lc == lt) & (c < t).unsqueeze(0))  # argmax keeps the first maximum
        wrong.index_add_(1, j, beats.to(torch.int32))
    correct[:, r_idx] &= wrong == 0
    return correct


def count_correct(z: torch.Tensor, k: torch.Tensor, labels: torch.Tensor,
                  alphas: torch.Tensor) -> torch.Tensor:
    """Correct-prediction counts of the logits z + alpha * k[g], for every g and every alpha at once.

    z (M, C), k (G, M, C), labels (M,), alphas (A,) -> LongTensor (G, A) with
    out[g, a] = sum_m [argmax_c(z[m] + alphas[a] * k[g, m]) == labels[m]] (argmax = first maximum),
    exactly as the literal evaluation gives it (see `correct_rows`).
    """
    if z.dim() != 2 or k.dim() != 3 or k.shape[1:] != z.shape:
        raise CachekitError(f"count_correct: z {tuple(z.shape)} and k {tuple(k.shape)} do not match; "
                            "fix: pass z (M, C) and k (G, M, C)")
    G, M, C = k.shape
    y = labels.reshape(-1).long().to(z.device)
    zr = z.t().unsqueeze(1).expand(C, G, M).reshape(C, G * M)
    kr = k.permute(2, 0, 1).reshape(C, G * M)
    ok = correct_rows(zr, kr, y.repeat(G), alphas, z.abs().amax(dim=1).repeat(G))
    return ok.view(-1, G, M).sum(dim=2, dtype=torch.long).t()


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
    y = val_y.reshape(-1).long().to(z.device)
    zr, zmax = z.t().contiguous(), z.abs().amax(dim=1)
    counts = torch.empty(n_beta, n_alpha, dtype=torch.long)
    for i, beta in enumerate(betas):
        cache = cache_logits(A, L, beta)  # the same operations as `logits`, so the same bits
        counts[i] = correct_rows(zr, cache.t().contiguous(), y, al, zmax).sum(dim=1).cpu()
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
