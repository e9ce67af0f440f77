"""APE, training-free (tri-edge): zero-shot on all channels + KL-weighted cache on refined channels.

    R_fW   = 100 f W^T                              (all D channels)
    A      = f' F'^T                                (x' = channels idx of x, re-L2-normalised)
    P      = softmax(F' W'^T) over classes          (no x100 scale)
    div_n  = -log2(P[n, y_n] + 1e-6)                (= KL(onehot(y_n) || P_n) in bits, up to the 1e-6)
    r_n    = exp(gamma * div_n)
    logits = R_fW + alpha * exp(-beta (1 - A)) (L * r)   (r scales row n of L)
"""
from __future__ import annotations

import torch

from ..errors import CachekitError
from . import zeroshot
from .base import Selection, accuracy, first_best
from .grids import alpha_grid, beta_grid, gamma_grid
from .refine import refine
from . import tip
from .tip import cache_logits

#: Added inside the log of the KL term, as in the authors' code.
KL_EPS = 1e-6


def kl_divergence_bits(F_ref: torch.Tensor, W_ref: torch.Tensor, key_labels: torch.Tensor) -> torch.Tensor:
    """div (N,) = -log2(P[n, y_n] + 1e-6) with P = softmax(F_ref @ W_ref.T, over classes), no x100 scale.

    This is KL(onehot(y_n) || P_n) in bits, except for the 1e-6 inside the log.
    """
    P = torch.softmax(F_ref @ W_ref.t(), dim=1)
    p_true = P.gather(1, key_labels.reshape(-1, 1).long()).squeeze(1)
    return -torch.log2(p_true + KL_EPS)


def entry_weights(div: torch.Tensor, gamma: float) -> torch.Tensor:
    """r (N,) = exp(gamma * div): cache entries the text classifier gets wrong weigh more."""
    return torch.exp(gamma * div)


def logits(f: torch.Tensor, W: torch.Tensor, F: torch.Tensor, L: torch.Tensor, key_labels: torch.Tensor,
           idx: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """APE training-free logits (M, C); idx are the refined channels (refine.select_channels)."""
    f_r, F_r, W_r = refine(f, idx), refine(F, idx), refine(W, idx)
    r = entry_weights(kl_divergence_bits(F_r, W_r, key_labels), gamma)
    return zeroshot.logits(f, W) + alpha * cache_logits(f_r @ F_r.t(), L * r.unsqueeze(1), beta)


def _check_one_hot(L: torch.Tensor, key_labels: torch.Tensor, C: int) -> torch.Tensor:
    y = key_labels.reshape(-1).long()
    if L.dim() != 2 or L.shape != (y.numel(), C):
        raise CachekitError(f"cache values L {tuple(L.shape)} do not match {y.numel()} key labels and C={C} "
                            "classes; fix: pass L = one_hot(key_labels, C) as float")
    if y.numel() == 0:
        raise CachekitError("the cache holds no keys; fix: build the cache with at least one shot per class")
    if int(y.min()) < 0 or int(y.max()) >= C:
        raise CachekitError(f"key labels must lie in 0..{C - 1}; fix: pass 0-based labels matching W")
    if not torch.equal(L, torch.nn.functional.one_hot(y, C).to(L.dtype)):
        raise CachekitError("cache values L are not the one-hot of key_labels; "
                            "fix: pass L = one_hot(key_labels, C) as float")
    return y


def _class_layout(y: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, Kmax) key index per class slot (padding points at key 0) and the mask of real slots."""
    order = torch.sort(y, stable=True).indices
    per_class = torch.bincount(y, minlength=C)
    kmax = max(int(per_class.max()), 1)
    start = torch.cumsum(per_class, 0) - per_class
    ys = y[order]
    pos = torch.arange(y.numel()) - start[ys]
    index = torch.zeros(C, kmax, dtype=torch.long)
    mask = torch.zeros(C, kmax, dtype=torch.bool)
    index[ys, pos] = order
    mask[ys, pos] = True
    return index, mask


_BETA_BLOCK = 8  # betas bounded together (see _grid_counts)
_ROW_BUDGET = 1 << 22  # classes x (sample, gamma) rows held at once; samples are processed in chunks
_TOL = 1e-4  # relative margin of the bounds, far above float rounding


def _grid_counts(z: torch.Tensor, y: torch.Tensor, A_m1: torch.Tensor, R: torch.Tensor,
                 betas: list, alphas: list) -> torch.Tensor:
    """Correct val counts (n_beta, n_alpha, n_gamma) of argmax_c(z + alpha * cache(beta, gamma)).

    z (M, C) zero-shot logits, y (M,) labels, A_m1 (C, M, Kmax) = A - 1 per class slot, R (C, Kmax, G)
    per-slot values L[n, c] * exp(gamma_g * div_n) (0 on padding), so that
    cache[m, c](beta, gamma_g) = sum_k exp(beta * A_m1[c, m, k]) * R[c, k, g].

    Exact (counts equal the literal evaluation of these logits) and fast: for a block of consecutive
    betas, the cache of every class lies between its values at the block's smallest and largest beta
    (exp(beta (A - 1)) is monotone in beta as A <= 1, and everything is >= 0). Those two batched matmuls
    bound every logit difference to the true class over the whole block and alpha range; a class below
    the true class by the margin everywhere is dropped, a class above it everywhere makes the sample
    wrong, and only the remaining (sample, gamma, class) triples, usually a few per sample, get their cache
    computed at each beta and are compared exactly (tip.pair_wrong). Rows are (sample, gamma) pairs.
    """
    C, M, K = A_m1.shape
    G = R.shape[2]
    dev, dt = z.device, z.dtype
    al, perm = torch.sort(torch.tensor(alphas, dtype=dt, device=dev))
    A = al.numel()
    lo, hi = float(al[0]), float(al[-1])
    if lo < 0:
        raise CachekitError(f"the alpha grid holds a negative value ({lo}); fix: use a positive alpha scale")
    # Monotone in beta only if no affinity exceeds 1 (normalised features); otherwise bound each beta alone.
    block = _BETA_BLOCK if float(A_m1.max()) <= 1e-6 else 1
    counts = torch.zeros(len(betas), G, A, dtype=torch.long)
    R_rows = R.permute(0, 2, 1).reshape(C * G, K)  # row c * G + g
    chunk = max(1, _ROW_BUDGET // (C * G))
    for m0 in range(0, M, chunk):
        m1 = min(M, m0 + chunk)
        Mc = m1 - m0
        Rn = Mc * G  # rows r = m * G + g
        zt = z[m0:m1].t().contiguous()  # (C, Mc)
        yc = y[m0:m1]
        zd = zt - zt.gather(0, yc.view(1, Mc))
        zd.scatter_(0, yc.view(1, Mc), float("-inf"))
        zd = zd.unsqueeze(2).expand(C, Mc, G).reshape(C, Rn).contiguous()
        y_rows = yc.repeat_interleave(G)
        y_flat = y_rows * Rn + torch.arange(Rn, device=dev)
        zmax = z[m0:m1].abs().amax(dim=1).repeat_interleave(G)
        Am = A_m1[:, m0:m1].contiguous()  # (C, Mc, K)
        A_rows = Am.view(C * Mc, K)  # row c * Mc + m
        z_flat = zt.view(-1)  # index c * Mc + m
        buf = [torch.empty(C, Rn, dtype=dt, device=dev) for _ in range(3)]
        mask = torch.empty(C, Rn, dtype=torch.bool, device=dev)
        for b0 in range(0, len(betas), block):
            bs = betas[b0:b0 + block]
            k_hi = torch.bmm(torch.exp(min(bs) * Am), R).view(C, Rn)
            k_lo = k_hi if len(bs) == 1 else torch.bmm(torch.exp(max(bs) * Am), R).view(C, Rn)
            tol = _TOL * (zmax + hi * k_hi.amax(dim=0))
            # Bounds of d = (z_c - z_y) + alpha (k_c - k_y) over the block and alpha in [lo, hi].
            t = torch.sub(k_hi, k_lo.view(-1).index_select(0, y_flat), out=buf[0])
            d_max = torch.add(zd, t, alpha=lo, out=buf[1])
            d_max.add_(t.clamp_(min=0), alpha=hi - lo)
            t = torch.sub(k_lo, k_hi.view(-1).index_select(0, y_flat), out=buf[0])
            d_min = torch.add(zd, t, alpha=lo, out=buf[2])
            d_min.add_(t.clamp_(max=0), alpha=hi - lo)
            sure_wrong = d_min.amax(dim=0) > tol  # (Rn,)
            cand = torch.ge(d_max, -tol, out=mask)
            cand &= ~sure_wrong
            f = torch.nonzero(cand.view(-1)).squeeze(1)
            base = (~sure_wrong).view(Mc, G).sum(dim=0)  # (G,) rows not surely wrong
            counts[b0:b0 + len(bs)] += base.view(1, G, 1).cpu()
            if f.numel() == 0:
                continue
            c, r = f // Rn, f % Rn
            open_rows, rp = torch.unique(r, return_inverse=True)  # rows needing exact comparison
            n_open = open_rows.numel()
            t_open = y_rows.index_select(0, open_rows)
            all_c = torch.cat([c, t_open])
            all_r = torch.cat([r, open_rows])
            em = all_c * Mc + all_r // G
            uniq, inv = torch.unique(em, return_inverse=True)
            X = A_rows.index_select(0, uniq)  # (U, K)
            Rg = R_rows.index_select(0, all_c * G + all_r % G)  # (P, K)
            zall = z_flat.index_select(0, em)
            P = c.numel()
            zc, zt_p, t_p = zall[:P], zall[P:].index_select(0, rp), t_open.index_select(0, rp)
            tolp = tol.index_select(0, r)
            open_g = open_rows % G
            for i, beta in enumerate(bs):
                kall = (torch.exp(beta * X).index_select(0, inv) * Rg).sum(dim=1)
                kc, kt = kall[:P], kall[P:].index_select(0, rp)
                wrong = tip.pair_wrong(zc, kc, zt_p, kt, c, t_p, rp, n_open, al, tolp)  # (n_open, A)
                lost = torch.zeros(G, A, dtype=torch.long, device=dev)
                lost.index_add_(0, open_g, wrong.to(torch.long))
                counts[b0 + i] -= lost.cpu()
    out = torch.empty_like(counts)
    out[:, :, perm.cpu()] = counts  # back to the caller's alpha order
    return out.permute(0, 2, 1).contiguous()  # (n_beta, n_alpha, n_gamma)


def select(val_f: torch.Tensor, val_y: torch.Tensor, W: torch.Tensor, F: torch.Tensor, L: torch.Tensor,
           key_labels: torch.Tensor, idx: torch.Tensor, test_f: torch.Tensor | None = None,
           test_y: torch.Tensor | None = None, s: tuple = (7, 7, 1), n: tuple = (200, 20, 20)) -> Selection:
    """Grid-search (beta, alpha, gamma) on val by accuracy; apply the best once to test.

    s = (s_beta, s_alpha, s_gamma), n = (n_beta, n_alpha, n_gamma); beta_i = 0.1 + i (s_beta - 0.1)/n_beta,
    alpha_j = 0.1 + j (s_alpha - 0.1)/n_alpha, gamma_k = k s_gamma/n_gamma. Visiting order beta, alpha,
    gamma (gamma innermost); on equal val accuracy the first point in that order wins.
    """
    betas, alphas, gammas = beta_grid(s[0], n[0]), alpha_grid(s[1], n[1]), gamma_grid(s[2], n[2])
    C = W.shape[0]
    y_keys = _check_one_hot(L, key_labels, C)
    dt, dev = val_f.dtype, val_f.device
    z = zeroshot.logits(val_f, W)
    F_r, W_r = refine(F, idx), refine(W, idx)
    A = refine(val_f, idx) @ F_r.t()  # (M, N)
    div = kl_divergence_bits(F_r, W_r, y_keys)  # (N,)
    # Keys laid out per class slot (C, Kmax); padding slots carry zero value.
    index, mask = _class_layout(y_keys.cpu(), C)
    index, mask = index.to(dev), mask.to(dev)
    A_m1 = (A.t()[index] - 1).permute(0, 2, 1).contiguous()  # (C, M, Kmax)
    g_t = torch.tensor(gammas, dtype=dt, device=dev)
    value = L[index, torch.arange(C, device=dev).unsqueeze(1)] * mask.to(dt)  # (C, Kmax)
    R = torch.exp(div[index].unsqueeze(2) * g_t.view(1, 1, -1)) * value.unsqueeze(2)  # (C, Kmax, G)
    y = val_y.reshape(-1).long().to(dev)
    counts = _grid_counts(z, y, A_m1, R, betas, alphas)
    flat = first_best(counts)
    i, rest = divmod(flat, len(alphas) * len(gammas))
    j, k = divmod(rest, len(gammas))
    best = counts.reshape(-1)[flat]
    params = {"beta": betas[i], "alpha": alphas[j], "gamma": gammas[k]}
    val_acc = float(best.item()) * 100.0 / val_y.numel()
    test_acc = None
    if test_f is not None and test_y is not None:
        test_acc = accuracy(logits(test_f, W, F, L, y_keys, idx, params["alpha"], params["beta"],
                                   params["gamma"]), test_y)
    extra = {"grid_index": (i, j, k), "grid_order": ("beta", "alpha", "gamma"),
             "grid": {"s": tuple(s), "n": tuple(n)}, "channels": int(idx.numel()),
             "ties": int((counts == best).sum().item())}
    return Selection(method="ape", params=params, val_acc=val_acc, test_acc=test_acc, extra=extra)
