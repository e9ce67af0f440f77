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
#
# Searches evaluate argmax_c(z[c] + alpha * k[c]) for many alphas. Doing that literally costs a full pass
# over (alphas x samples x classes) per grid point. The logits are linear in alpha, so almost every
# comparison "does class c beat the true class t" is decided by its sign with a wide margin; only the
# comparisons that are not are made on logits computed literally (z + alpha * k: multiply, then add), so
# the counts are bit-for-bit those of the literal evaluation.

_PAIR_BLOCK = 1 << 22  # bound on (alphas x pairs) evaluated literally at once
_TOL = 1e-4  # relative margin: far above the float rounding of the bounds, far below real differences


def _literal_beats(zc, kc, zt, kt, c, t, al_row):
    """(P, A): class c beats the true class t, logits computed as z + alpha * k; ties go to the lower class."""
    lc = zc.unsqueeze(1) + kc.unsqueeze(1) * al_row
    lt = zt.unsqueeze(1) + kt.unsqueeze(1) * al_row
    return (lc > lt) | ((lc == lt) & (c < t).unsqueeze(1))


def pair_wrong(zc: torch.Tensor, kc: torch.Tensor, zt: torch.Tensor, kt: torch.Tensor, c: torch.Tensor,
               t: torch.Tensor, row: torch.Tensor, n_rows: int, al: torch.Tensor,
               tolp: torch.Tensor) -> torch.Tensor:
    """Per row and alpha: does some listed class beat the row's true class? bool (n_rows, A).

    Pair p compares class c[p] (zero-shot zc, cache kc) with the true class t[p] (zt, kt) of row row[p];
    al (A,) must be ascending; tolp (P,) is the margin of each pair. Class c beats t at alpha when
    zc + alpha kc > zt + alpha kt as computed literally, or when they are equal and c < t (argmax keeps the
    first maximum). The difference crosses zero once, at alpha* = -(zc - zt) / (kc - kt): the two grid
    points next to alpha* are evaluated literally, the others follow from the sign once the margin at the
    nearest of them confirms it; a pair without such a clear crossing is evaluated literally throughout.
    """
    A = al.numel()
    wrong = torch.zeros(n_rows, A, dtype=torch.bool, device=al.device)
    if c.numel() == 0:
        return wrong
    zd, kd = zc - zt, kc - kt  # rounded: used with the margin only
    sgn = torch.sign(kd)
    nz = kd != 0
    cross = torch.where(nz, -zd / torch.where(nz, kd, torch.ones_like(kd)), torch.zeros_like(kd))
    j = torch.searchsorted(al, cross.contiguous())  # number of grid alphas below alpha*
    right_ok = (j + 1 >= A) | (sgn * (zd + al[(j + 1).clamp(max=A - 1)] * kd) > tolp)
    left_ok = (j - 2 < 0) | (-sgn * (zd + al[(j - 2).clamp(min=0)] * kd) > tolp)
    clear = right_ok & left_ok

    width = A + 1  # difference array per row: +1 where a beaten range starts, -1 after it ends
    diff = torch.zeros(n_rows * width, dtype=torch.int32, device=al.device)
    base = row * width

    def mark(first, last_excl, sel):
        n = int(sel.sum())
        if n:
            diff.index_add_(0, (base + first)[sel], torch.ones(n, dtype=torch.int32, device=al.device))
            diff.index_add_(0, (base + last_excl)[sel], torch.full((n,), -1, dtype=torch.int32,
                                                                     device=al.device))

    pos, neg = kd > 0, kd < 0
    start = torch.where(pos, j + 1, torch.zeros_like(j)).clamp(max=A)  # kd > 0: beats right of alpha*
    stop = torch.where(pos, torch.full_like(j, A), torch.where(neg, (j - 1).clamp(min=0), torch.zeros_like(j)))
    mark(start, stop, clear & (start < stop))
    for jj in (j - 1, j):  # the grid points next to the crossing, literally
        jc = jj.clamp(0, A - 1)
        al_p = al.index_select(0, jc)
        lc = zc + kc * al_p
        lt = zt + kt * al_p
        hit = clear & (jj >= 0) & (jj < A) & ((lc > lt) | ((lc == lt) & (c < t)))
        mark(jc, jc + 1, hit)
    wrong |= torch.cumsum(diff.view(n_rows, width), dim=1)[:, :A] > 0

    fb = torch.nonzero(~clear).squeeze(1)
    block = max(1, _PAIR_BLOCK // A)
    al_row = al.unsqueeze(0)
    for s0 in range(0, fb.numel(), block):
        q = fb[s0:s0 + block]
        beats = _literal_beats(zc[q], kc[q], zt[q], kt[q], c[q], t[q], al_row)
        hits = torch.zeros(n_rows, A, dtype=torch.int32, device=al.device)
        hits.index_add_(0, row[q], beats.to(torch.int32))
        wrong |= hits > 0
    return wrong


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


def correct_rows(rows: RowSetup, k: torch.Tensor, alphas: torch.Tensor, nonneg: bool = False) -> torch.Tensor:
    """bool (R, A): argmax_c(zr[:, r] + alphas[a] * k[:, r]) == yr[r] (argmax = first maximum), exactly.

    k (C, R): the cache term of each row (see RowSetup); nonneg: the caller knows k >= 0. A class below
    the true class by the margin at both ends of the alpha range is below it at every alpha (linearity);
    one above it by the margin at both ends makes the row wrong at every alpha; the remaining (row, class)
    pairs, usually a few per row, go to `pair_wrong`.
    """
    C, R = k.shape
    if (C, R) != (rows.C, rows.R):
        raise CachekitError(f"cache term {tuple(k.shape)} does not match the rows ({rows.C}, {rows.R}); "
                            "fix: pass k as (C, G * M)")
    k = k.contiguous()
    al, perm = torch.sort(alphas.to(dtype=k.dtype, device=k.device).reshape(-1))
    A = al.numel()
    lo, hi = float(al[0]), float(al[-1])
    kd, d_lo, d_hi = rows._buf
    k_flat = k.view(-1)
    torch.sub(k, k_flat.index_select(0, rows.y_flat), out=kd)
    torch.add(rows.zd, kd, alpha=lo, out=d_lo)  # -inf at the true class
    torch.add(rows.zd, kd, alpha=hi, out=d_hi)
    k_abs = k.amax(dim=0) if nonneg else torch.maximum(k.amax(dim=0), -k.amin(dim=0))
    tol = _TOL * (rows.zmax + max(abs(lo), abs(hi)) * k_abs)
    d_max = torch.maximum(d_lo, d_hi, out=kd)
    d_min = torch.minimum(d_lo, d_hi, out=d_lo)
    sure_wrong = d_min.amax(dim=0) > tol  # some class above the true one by the margin at every alpha
    cand = torch.ge(d_max, -tol, out=rows._mask)  # could tie or beat the true class somewhere
    cand &= ~sure_wrong
    f = torch.nonzero(cand.view(-1)).squeeze(1)
    c, r = f // R, f % R
    ft = rows.y_flat.index_select(0, r)
    zr_flat = rows.zr.view(-1)
    wrong = pair_wrong(zr_flat.index_select(0, f), k_flat.index_select(0, f), zr_flat.index_select(0, ft),
                       k_flat.index_select(0, ft), c, rows.yr.index_select(0, r), r, R, al,
                       tol.index_select(0, r))
    wrong |= sure_wrong.unsqueeze(1)
    correct = ~wrong
    if not bool((perm == torch.arange(A, device=perm.device)).all()):
        out = torch.empty_like(correct)
        out[:, perm] = correct
        correct = out
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
