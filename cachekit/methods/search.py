"""Exact grid search engine shared by the Tip-Adapter and APE searches (and, through tip.select, Tip-F and APE-T).

`LinearArgmaxCounter` / `count_correct` count the correct predictions of argmax_c(z + alpha * k) for every
alpha of a grid exactly (bit for bit the literal evaluation); `row_chunk` sizes the sample chunks that
bound memory. Pure tensor functions: no files, no printing.
"""
from __future__ import annotations

import torch

from ..errors import CachekitError

# ------------------------------------------------------------------------------------------------------
# Exact vectorised counting of correct predictions of z + alpha * k over a grid of alpha.
#
# Searches evaluate argmax_c(z[c] + alpha * k[c]) for many alphas. Doing that literally costs a full pass
# over (alphas x samples x classes) per grid point. The logits are linear in alpha, so almost every
# comparison "does class c beat the true class t" is decided by its sign with a wide margin; only the
# comparisons that are not are made on logits computed literally (z + alpha * k: multiply, then add), so
# the counts are bit-for-bit those of the literal evaluation.

_PAIR_BLOCK = 1 << 22  # bound on (alphas x pairs) evaluated literally at once
_CHUNK_ELEMS = 1 << 23  # samples are processed in chunks of about this many (sample x key) entries


def _literal_beats(zc, kc, zt, kt, c, t, al_row):
    """(P, A): class c beats the true class t, logits computed as z + alpha * k; ties go to the lower class."""
    lc = zc.unsqueeze(1) + kc.unsqueeze(1) * al_row
    lt = zt.unsqueeze(1) + kt.unsqueeze(1) * al_row
    return (lc > lt) | ((lc == lt) & (c < t).unsqueeze(1))


def pair_wrong(zc: torch.Tensor, kc: torch.Tensor, zt: torch.Tensor, kt: torch.Tensor, c: torch.Tensor,
               t: torch.Tensor, row: torch.Tensor, n_rows: int, al: torch.Tensor,
               tolp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the alphas at which some listed class beats the row's true class.

    Returns (prefix, suffix, extra) with A = al.numel(): row r is wrong at alpha index a when a < prefix[r],
    when a >= suffix[r], or when r * A + a is in extra (flat indices, may repeat); prefix and suffix are
    LongTensors (n_rows,).

    Pair p compares class c[p] (zero-shot zc, cache kc) with the true class t[p] (zt, kt) of row row[p];
    al (A,) must be ascending; tolp (P,) is the margin of each pair. Class c beats t at alpha when
    zc + alpha kc > zt + alpha kt as computed literally, or when they are equal and c < t (argmax keeps the
    first maximum). The difference crosses zero once, at alpha* = -(zc - zt) / (kc - kt), so a pair beats
    t on one side of alpha* only: the two grid points next to alpha* are evaluated literally, the others
    follow from the side once the margin at the nearest of them confirms it, and a pair without such a
    clear crossing is evaluated literally at every alpha. Per row, the beaten alphas of all its pairs are
    then one prefix (pairs with kc < kt), one suffix (kc > kt) and rare isolated points (extra).
    """
    A = al.numel()
    dev = al.device
    suffix = torch.full((n_rows,), A, dtype=torch.long, device=dev)
    prefix = torch.zeros(n_rows, dtype=torch.long, device=dev)
    if c.numel() == 0:
        return prefix, suffix, torch.zeros(0, dtype=torch.long, device=dev)
    zd, kd = zc - zt, kc - kt  # rounded: used with the margin only
    nzk = kd != 0
    cross = torch.where(nzk, -zd / torch.where(nzk, kd, torch.ones_like(kd)), torch.zeros_like(kd))
    j = torch.searchsorted(al, cross.contiguous())  # number of grid alphas below alpha*
    sgn = torch.sign(kd)
    right_ok = (j + 1 >= A) | (sgn * (zd + al[(j + 1).clamp(max=A - 1)] * kd) > tolp)
    left_ok = (j - 2 < 0) | (-sgn * (zd + al[(j - 2).clamp(min=0)] * kd) > tolp)
    clear = right_ok & left_ok & nzk

    def literal(jj):  # does c beat t at grid point jj (False outside the grid)
        a = al.index_select(0, jj.clamp(0, A - 1))
        lc = zc + kc * a
        lt = zt + kt * a
        return ((lc > lt) | ((lc == lt) & (c < t))) & (jj >= 0) & (jj < A)

    b1, b2 = literal(j - 1), literal(j)
    pos = kd > 0
    # kd > 0: beaten on [start, A) plus, rarely, the isolated point j - 1 (b1 without b2).
    start = torch.where(b2, torch.where(b1, j - 1, j), j + 1).clamp(0, A)
    # kd < 0: beaten on [0, stop) plus, rarely, the isolated point j (b2 without b1).
    stop = torch.where(b1, torch.where(b2, j + 1, j), j - 1).clamp(0, A)
    # Pairs that do not apply scatter the neutral value (A for the suffix, 0 for the prefix): no masking.
    suffix.scatter_reduce_(0, row, torch.where(clear & pos, start, A), reduce="amin")
    prefix.scatter_reduce_(0, row, torch.where(clear & ~pos, stop, 0), reduce="amax")
    extra = []
    iso = clear & pos & b1 & ~b2
    extra.append(row[iso] * A + (j - 1)[iso])
    iso = clear & ~pos & b2 & ~b1
    extra.append(row[iso] * A + j[iso])

    fb = torch.nonzero(~clear).squeeze(1)  # no clear crossing: every alpha literally
    block = max(1, _PAIR_BLOCK // A)
    al_row = al.unsqueeze(0)
    for s0 in range(0, fb.numel(), block):
        q = fb[s0:s0 + block]
        beats = _literal_beats(zc[q], kc[q], zt[q], kt[q], c[q], t[q], al_row)
        p, a = torch.nonzero(beats, as_tuple=True)
        extra.append(row[q][p] * A + a)
    return prefix, suffix, torch.cat(extra)


class LinearArgmaxCounter:
    """Exact correct counts of argmax_c(z[m] + alpha * k[m, c]) for every alpha, for many cache terms k.

    z (M, C) zero-shot logits and y (M,) labels are fixed; each call to `count` passes one cache term in
    the class-major layout k (C, M * G): column m * G + g is sample m under the g-th cache variant (the
    beta and gamma of a block of APE grid points; betas for Tip-Adapter). alphas (A,) must be >= 0 (any
    order). Before counting, call `set_scale(k_scale)` with k_scale (M * G,) bounding |k| per column; it
    sets the margin tol = 256 eps (max_c |z| + max(alpha) * k_scale) per column, far above the rounding of
    the bounds.

    With kd = k_c - k_y and zd = z_c - z_y, class c could tie or beat the true class y at some alpha in
    [lo, hi] only if zd + alpha kd >= -tol at alpha = lo or hi, i.e. kd >= theta_c; and it beats y at every
    alpha if zd + alpha kd > tol at both ends, i.e. kd > phi_c. theta and phi depend on z and the scale
    only (one value per class and sample, shared by the G variants), so `count` needs a few passes over k
    plus `pair_wrong` on the few remaining candidates.
    """

    def __init__(self, z: torch.Tensor, y: torch.Tensor, alphas: torch.Tensor, G: int = 1,
                 k_scale: torch.Tensor | None = None):
        M, C = z.shape
        y = y.reshape(-1).long().to(z.device)
        if y.numel() != M:
            raise CachekitError(f"{y.numel()} labels for {M} samples; fix: pass one label per sample")
        al, self.perm = torch.sort(alphas.to(dtype=z.dtype, device=z.device).reshape(-1))
        if float(al[0]) < 0:
            raise CachekitError(f"alpha grid holds a negative value ({float(al[0])}); "
                                "fix: use non-negative alphas")
        self.al, self.A = al, al.numel()
        self.M, self.G, self.C, self.R = M, G, C, M * G
        zt = z.t().contiguous()  # (C, M)
        self.z_flat = zt.view(-1)  # index c * M + m
        self.y_rows = y.repeat_interleave(G)
        self.y_flat = self.y_rows * self.R + torch.arange(self.R, device=z.device)  # (y_r, r) in (C, R)
        self.zmax = z.abs().amax(dim=1)  # (M,)
        zd = zt - zt.gather(0, y.view(1, M))
        zd.scatter_(0, y.view(1, M), float("-inf"))
        self.zd = zd  # (C, M)
        self.rel = 256 * torch.finfo(z.dtype).eps
        self._kd = torch.empty(C, M, G, dtype=z.dtype, device=z.device)
        self._mask = torch.empty(C, M, G, dtype=torch.bool, device=z.device)
        self.theta = self.phi = self.tol_col = None
        if k_scale is not None:
            self.set_scale(k_scale)

    def set_scale(self, k_scale: torch.Tensor) -> None:
        """Margins for cache terms with |k[:, r]| <= k_scale[r] (R,).

        Each column gets its own margin (used on candidate pairs); the class filters theta and phi use the
        widest margin of a sample's G columns, which only lets a few more pairs through to the exact check.
        """
        k_scale = k_scale.reshape(-1).to(self.zmax.dtype).abs()
        if k_scale.numel() != self.R:
            raise CachekitError(f"k_scale has {k_scale.numel()} values for {self.R} columns; "
                                "fix: pass one bound per column (M * G)")
        lo, hi = float(self.al[0]), float(self.al[-1])
        # The floor keeps a margin when every value is subnormal (the relative one would underflow).
        self.tol_col = (self.rel * (self.zmax.repeat_interleave(self.G) + hi * k_scale)
                        + torch.finfo(self.zmax.dtype).tiny)  # (R,)
        tol = self.tol_col.view(self.M, self.G).amax(dim=1)  # (M,)
        inf = float("inf")

        def ratio(num, a):  # the smallest kd with a * kd >= num, for a >= 0
            if a > 0:
                return num / a
            return torch.where(num <= 0, torch.full_like(num, -inf), torch.full_like(num, inf))

        need = -tol - self.zd  # c reaches y at alpha iff alpha * kd >= need
        self.theta = torch.minimum(ratio(need, lo), ratio(need, hi)).unsqueeze(2)  # (C, M, 1)
        over = tol - self.zd  # c beats y at alpha iff alpha * kd > over
        if lo > 0:
            phi = torch.maximum(over / lo, over / hi)
        else:
            r_hi = ratio(over, hi)
            phi = torch.where(over < 0, r_hi, torch.full_like(r_hi, inf))
        self.phi = phi.unsqueeze(2)

    def _wrong(self, k: torch.Tensor):
        """pair_wrong's (prefix, suffix, extra) per column r of k, and sure_wrong (R,) bool."""
        if self.theta is None:
            raise CachekitError("LinearArgmaxCounter used before set_scale; fix: call set_scale(k_scale)")
        C, R = k.shape
        if (C, R) != (self.C, self.R):
            raise CachekitError(f"cache term {tuple(k.shape)} does not match ({self.C}, {self.R}); "
                                "fix: pass k as (C, M * G)")
        k = k.contiguous()
        k_flat = k.view(-1)
        k_true = k_flat.index_select(0, self.y_flat)  # (R,)
        M, G = self.M, self.G
        kd = torch.sub(k.view(C, M, G), k_true.view(1, M, G), out=self._kd)
        # A class above phi beats y by the margin at every alpha: its column is wrong everywhere, and that
        # column's pairs need no exact check (found densely, before the candidates are listed).
        sure_wrong = torch.gt(kd, self.phi, out=self._mask).any(dim=0)  # (M, G)
        cand = torch.ge(kd, self.theta, out=self._mask)
        cand &= ~sure_wrong
        c, m, g = torch.nonzero(cand, as_tuple=True)
        r = m * G + g
        f = c * R + r
        sure_wrong = sure_wrong.view(-1)
        t = self.y_rows.index_select(0, r)
        prefix, suffix, extra = pair_wrong(
            self.z_flat.index_select(0, c * self.M + m), k_flat.index_select(0, f),
            self.z_flat.index_select(0, t * self.M + m), k_true.index_select(0, r),
            c, t, r, R, self.al, self.tol_col.index_select(0, r))
        return prefix, suffix, extra, sure_wrong

    def count(self, k: torch.Tensor) -> torch.Tensor:
        """LongTensor (G, A), alphas in the caller's order: correct samples per cache variant and alpha.

        Column r is correct on the alpha indices [prefix, suffix) less its extra points, so the counts are
        a cumulative sum of +1/-1 marks per variant, less the extra points inside those intervals: no
        (columns x alphas) matrix is built.
        """
        prefix, suffix, extra, sure_wrong = self._wrong(k)
        A, G, dev = self.A, self.G, prefix.device
        ok = (prefix < suffix) & ~sure_wrong
        g = torch.arange(self.R, device=dev) % G
        marks = torch.zeros(G, A + 1, dtype=torch.long, device=dev)
        ones = ok.to(torch.long)
        marks.view(-1).index_add_(0, g * (A + 1) + prefix, ones)
        marks.view(-1).index_add_(0, g * (A + 1) + suffix, -ones)
        counts = marks[:, :A].cumsum(dim=1)
        if extra.numel():
            extra = torch.unique(extra)
            r, a = extra // A, extra % A
            inside = ok[r] & (a >= prefix[r]) & (a < suffix[r])
            counts.view(-1).index_add_(0, (g[r] * A + a)[inside], torch.full_like(a[inside], -1))
        out = torch.empty_like(counts)
        out[:, self.perm] = counts
        return out.cpu()


def count_correct(z: torch.Tensor, k: torch.Tensor, labels: torch.Tensor,
                  alphas: torch.Tensor) -> torch.Tensor:
    """Correct-prediction counts of the logits z + alpha * k[g], for every g and every alpha at once.

    z (M, C), k (G, M, C), labels (M,), alphas (A,) >= 0, all of one floating dtype -> LongTensor (G, A)
    with out[g, a] = sum_m [argmax_c(z[m] + alphas[a] * k[g, m]) == labels[m]] (argmax = first maximum),
    exactly as the literal evaluation in that dtype gives it (see LinearArgmaxCounter).
    """
    if z.dim() != 2 or k.dim() != 3 or k.shape[1:] != z.shape:
        raise CachekitError(f"count_correct: z {tuple(z.shape)} and k {tuple(k.shape)} do not match; "
                            "fix: pass z (M, C) and k (G, M, C)")
    if not (z.dtype == k.dtype == alphas.dtype) or not z.is_floating_point():
        raise CachekitError(f"count_correct: z, k and alphas are {z.dtype}, {k.dtype}, {alphas.dtype}; "
                            "fix: pass them in one floating dtype (the literal logits are computed in it)")
    G, M, C = k.shape
    if G == 0:
        return torch.zeros(0, alphas.numel(), dtype=torch.long)
    kk = k.permute(2, 1, 0).reshape(C, M * G)  # column m * G + g
    counter = LinearArgmaxCounter(z, labels, alphas, G, kk.abs().amax(dim=0))
    return counter.count(kk)


def row_chunk(n_cols: int) -> int:
    """Samples per chunk so that a (samples x n_cols) block stays near 8M elements."""
    return max(1, _CHUNK_ELEMS // max(1, n_cols))
