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


class RowSetup:
    """What the exact counter needs about the zero-shot logits, computed once per search.

    Rows are samples repeated `G` times (row g * M + m is sample m in the g-th cache variant).
    zr (C, R): zero-shot logits z[m, c]; zd (C, R): z[m, c] - z[m, y_m], with -inf at c = y_m;
    yr (R,): true class; zmax (R,): max_c |z[m, c]|. Also holds reusable work buffers.
    """

    def __init__(self, z: torch.Tensor, labels: torch.Tensor, G: int = 1):
        M, C = z.shape
        y = labels.reshape(-1).long().to(z.device)
        if y.numel() != M:
            raise CachekitError(f"{y.numel()} labels for {M} samples; fix: pass one label per sample")
        zt = z.t()
        zd = zt - zt.gather(0, y.view(1, M))
        zd.scatter_(0, y.view(1, M), float("-inf"))
        self.M, self.G, self.C, self.R = M, G, C, G * M
        self.zr = zt.unsqueeze(1).expand(C, G, M).reshape(C, G * M).contiguous()
        self.zd = zd.unsqueeze(1).expand(C, G, M).reshape(C, G * M).contiguous()
        self.yr = y.repeat(G)
        self.y_flat = self.yr * self.R + torch.arange(self.R, device=z.device)  # flat index of (y_r, r)
        self.zmax = z.abs().amax(dim=1).repeat(G)
        self._buf = [torch.empty(C, G * M, dtype=z.dtype, device=z.device) for _ in range(3)]
        self._mask = torch.empty(C, G * M, dtype=torch.bool, device=z.device)


def correct_rows(rows: RowSetup, k: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Which rows are classified correctly at every alpha, in the class-major layout the searches use.

    k (C, R): cache term of each row (see RowSetup); alphas (A,).
    Returns bool (R, A): argmax_c(zr[:, r] + alphas[a] * k[:, r]) == yr[r], argmax = first maximum.

    Exact, bit for bit, with the literal evaluation, since every logit it compares is computed with the
    same two float operations (multiply, then add). Fast because the logits are linear in alpha: a class
    below the true class by a clear margin at both ends of the alpha range is below it at every alpha in
    between, and one above it by a clear margin at both ends is above it everywhere. Only the remaining
    (row, class) pairs, usually a few per row, are evaluated at every alpha.
    """
    C, R = k.shape
    if (C, R) != (rows.C, rows.R):
        raise CachekitError(f"cache term {tuple(k.shape)} does not match the rows ({rows.C}, {rows.R}); "
                            "fix: pass k as (C, G * M)")
    k = k.contiguous()
    al = alphas.to(dtype=k.dtype, device=k.device).reshape(-1)
    A = al.numel()
    lo, hi = float(al.min()), float(al.max())
    kd, d_lo, d_hi = rows._buf
    # Bounds only (checked with a margin), so their rounding does not matter.
    k_flat = k.view(-1)
    k_true = k_flat.index_select(0, rows.y_flat)  # (R,)
    torch.sub(k, k_true, out=kd)
    torch.add(rows.zd, kd, alpha=lo, out=d_lo)  # -inf at the true class
    torch.add(rows.zd, kd, alpha=hi, out=d_hi)
    tol = _TOL * (rows.zmax + max(abs(lo), abs(hi)) * torch.maximum(k.amax(dim=0), -k.amin(dim=0)))
    d_max = torch.maximum(d_lo, d_hi, out=kd)
    d_min = torch.minimum(d_lo, d_hi, out=d_lo)
    # Some class above the true class by the margin at both ends: wrong at every alpha.
    sure_wrong = d_min.amax(dim=0) > tol
    # Classes that could tie or beat the true class somewhere in the range: evaluate exactly.
    cand = torch.ge(d_max, -tol, out=rows._mask)
    cand &= ~sure_wrong
    flat = torch.nonzero(cand.view(-1)).squeeze(1)
    wrong = torch.zeros(R, A, dtype=k.dtype, device=k.device)  # number of classes beating the true one
    wrong[sure_wrong] = 1
    al_row = al.unsqueeze(0)
    zr_flat = rows.zr.view(-1)
    block = max(1, _PAIR_BLOCK // A)
    for s in range(0, flat.numel(), block):
        f = flat[s:s + block]
        c, r = f // R, f % R
        ft = rows.y_flat.index_select(0, r)
        lc = zr_flat.index_select(0, f).unsqueeze(1) + k_flat.index_select(0, f).unsqueeze(1) * al_row
        lt = zr_flat.index_select(0, ft).unsqueeze(1) + k_flat.index_select(0, ft).unsqueeze(1) * al_row
        # (P, A), each as z + alpha * k; argmax keeps the first maximum, so a tie goes to the lower class.
        beats = (lc > lt) | ((lc == lt) & (c < rows.yr.index_select(0, r)).unsqueeze(1))
        wrong.index_add_(0, r, beats.to(k.dtype))
    return wrong == 0


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
    ok = correct_rows(RowSetup(z, labels, G), k.permute(2, 0, 1).reshape(C, G * M), alphas)
    return ok.view(G, M, -1).sum(dim=1, dtype=torch.long)


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
    rows = RowSetup(z, val_y)
    counts = torch.empty(n_beta, n_alpha, dtype=torch.long)
    for i, beta in enumerate(betas):
        cache = cache_logits(A, L, beta)  # the same operations as `logits`, so the same bits
        counts[i] = correct_rows(rows, cache.t().contiguous(), al).sum(dim=0).cpu()
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
