"""APE, training-free (tri-edge): zero-shot on all channels + KL-weighted cache on refined channels.

    R_fW   = 100 f W^T                              (all D channels)
    A      = f' F'^T                                (x' = channels idx of x, re-L2-normalised)
    P      = softmax(F' W'^T) over classes          (no x100 scale)
    div_n  = -log2(P[n, y_n] + 1e-6)                (= KL(onehot(y_n) || P_n) in bits, up to the 1e-6)
    r_n    = exp(gamma * div_n)
    logits = R_fW + alpha * exp(-beta (1 - A)) (L * r)   (r scales row n of L)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CachekitError
from . import zeroshot
from ..params import Config, param
from .base import Estimator, Selection, accuracy, first_best
from .grids import MAX_GRID_POINTS, alpha_grid, beta_grid, gamma_grid
from .refine import channels_for, refine, resolve_channels
from .registry import register
from .search import LinearArgmaxCounter, row_chunk
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
    """APE training-free logits (M, C); idx are the refined channels (refine.select_channels).

    Computed in chunks of samples to bound memory (each sample's logits do not depend on the others).
    """
    F_r, W_r = refine(F, idx), refine(W, idx)
    values = L * entry_weights(kl_divergence_bits(F_r, W_r, key_labels), gamma).unsqueeze(1)
    parts = [zeroshot.logits(fc, W) + alpha * cache_logits(refine(fc, idx) @ F_r.t(), values, beta)
             for fc in f.split(row_chunk(max(F.shape[0], W.shape[0])))]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def check_one_hot(L: torch.Tensor, key_labels: torch.Tensor, C: int) -> torch.Tensor:
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


_ROW_BUDGET = 1 << 22  # (class x sample x beta x gamma) cache entries held at once


def _cache_blocks(A_m1: torch.Tensor, R: torch.Tensor, betas: list):
    """Yield (i0, B, cache) per block of betas: cache (C, M * B * G) holds cache[m, c](beta_{i0+b}, gamma_g)
    = sum_k exp(beta * A_m1[c, m, k]) * R[c, k, g] at column (m * B + b) * G + g.

    A_m1 (C, M, Kmax) = A - 1 per class slot, R (C, Kmax, G) the slot values L[n, c] * exp(gamma_g * div_n)
    (0 on padding slots). Betas go in blocks as large as the memory budget allows: one exp and one batched
    matmul give the cache of every (beta, gamma) in the block.
    """
    C, M, K = A_m1.shape
    G = R.shape[2]
    nb = len(betas)
    block = max(1, min(nb, _ROW_BUDGET // max(1, C * M * max(G, K))))
    b_all = torch.tensor(betas, dtype=A_m1.dtype, device=A_m1.device)
    for i0 in range(0, nb, block):
        b = b_all[i0:i0 + block]
        B = b.numel()
        E = torch.empty(C, M, B, K, dtype=A_m1.dtype, device=A_m1.device)  # row-major whatever the broadcast
        torch.exp(torch.mul(A_m1.unsqueeze(2), b.view(1, 1, B, 1), out=E), out=E)  # exp(-beta (1 - A))
        cache = torch.bmm(E.view(C, M * B, K), R).view(C, M * B * G)
        del E
        yield i0, B, cache


def _chunk_counts(z: torch.Tensor, y: torch.Tensor, A_m1: torch.Tensor, R: torch.Tensor,
                  betas: list, al: torch.Tensor) -> torch.Tensor:
    """Correct counts (n_beta, n_alpha, n_gamma) of argmax_c(z + alpha * cache(beta, gamma)) on some samples.

    z (M, C) zero-shot logits, y (M,) labels, A_m1 and R as in `_cache_blocks`. One search.LinearArgmaxCounter
    pass counts every alpha of a whole block of (beta, gamma) exactly, so a small cache costs a handful of
    tensor ops per search instead of a few hundred.
    """
    G = R.shape[2]
    counts = torch.zeros(len(betas), al.numel(), G, dtype=torch.long)
    counter = None
    for i0, B, cache in _cache_blocks(A_m1, R, betas):
        if counter is None or counter.G != B * G:
            counter = LinearArgmaxCounter(z, y, al, B * G)
        counter.set_scale(cache.amax(dim=0))  # cache >= 0: one-hot values, positive weights
        counts[i0:i0 + B] = counter.count(cache).view(B, G, -1).permute(0, 2, 1)  # CPU counts
    return counts


def _search_inputs(val_f, val_y, W, F, L, key_labels, idx, s, n):
    """What every point of the search shares: (betas, alphas tensor, R (C, Kmax, G), chunks), where chunks
    yields (z, y, A_m1) per chunk of val samples (see `_cache_blocks` for R and A_m1)."""
    betas, alphas, gammas = beta_grid(s[0], n[0]), alpha_grid(s[1], n[1]), gamma_grid(s[2], n[2])
    C = W.shape[0]
    y_keys = check_one_hot(L, key_labels, C)
    dt, dev = val_f.dtype, val_f.device
    F_r, W_r = refine(F, idx), refine(W, idx)
    div = kl_divergence_bits(F_r, W_r, y_keys)  # (N,)
    # Keys laid out per class slot (C, Kmax); padding slots carry zero value.
    index, mask = _class_layout(y_keys.cpu(), C)
    index, mask = index.to(dev), mask.to(dev)
    value = L[index, torch.arange(C, device=dev).unsqueeze(1)] * mask.to(dt)  # (C, Kmax)
    g_t = torch.tensor(gammas, dtype=dt, device=dev)
    R = torch.exp(div[index].unsqueeze(2) * g_t.view(1, 1, -1)) * value.unsqueeze(2)  # (C, Kmax, G)
    al = torch.tensor(alphas, dtype=dt, device=dev)
    y = val_y.reshape(-1).long().to(dev)
    step = max(1, min(_ROW_BUDGET // (C * len(gammas)), row_chunk(F.shape[0])))

    def chunks():
        for fc, yc in zip(val_f.split(step), y.split(step)):
            A = refine(fc, idx) @ F_r.t()  # (Mc, N)
            A_m1 = (A.t()[index] - 1).permute(0, 2, 1).contiguous()  # (C, Mc, Kmax)
            del A
            yield zeroshot.logits(fc, W), yc, A_m1

    return betas, al, R, chunks()


def grid_counts(val_f: torch.Tensor, val_y: torch.Tensor, W: torch.Tensor, F: torch.Tensor, L: torch.Tensor,
                key_labels: torch.Tensor, idx: torch.Tensor, s: tuple = (7, 7, 1),
                n: tuple = (200, 20, 20)) -> torch.Tensor:
    """Number of correct val predictions at every grid point: LongTensor (n_beta, n_alpha, n_gamma).

    Equal to evaluating `logits` at each point and counting argmax hits, but one exp and one batched
    matmul serve a whole block of betas with every gamma, and every alpha is counted at once
    (search.LinearArgmaxCounter).
    """
    betas, al, R, chunks = _search_inputs(val_f, val_y, W, F, L, key_labels, idx, s, n)
    counts = torch.zeros(len(betas), al.numel(), R.shape[2], dtype=torch.long)
    for z, yc, A_m1 in chunks:
        counts += _chunk_counts(z, yc, A_m1, R, betas, al)
    return counts


def cache_values_only(val_f: torch.Tensor, val_y: torch.Tensor, W: torch.Tensor, F: torch.Tensor,
                      L: torch.Tensor, key_labels: torch.Tensor, idx: torch.Tensor, s: tuple = (7, 7, 1),
                      n: tuple = (200, 20, 20)) -> int:
    """The part of `grid_counts` before any counting: the cache value of every (sample, class, beta, gamma),
    computed block by block and dropped. Returns how many values that is. `cachekit bench grid` times it
    as the floor of an exact search that visits every grid point."""
    betas, _, R, chunks = _search_inputs(val_f, val_y, W, F, L, key_labels, idx, s, n)
    total = 0
    for _, _, A_m1 in chunks:
        for _, _, cache in _cache_blocks(A_m1, R, betas):
            total += cache.numel()
    return total


def select(val_f: torch.Tensor, val_y: torch.Tensor, W: torch.Tensor, F: torch.Tensor, L: torch.Tensor,
           key_labels: torch.Tensor, idx: torch.Tensor, test_f: torch.Tensor | None = None,
           test_y: torch.Tensor | None = None, s: tuple = (7, 7, 1), n: tuple = (200, 20, 20)) -> Selection:
    """Grid-search (beta, alpha, gamma) on val by accuracy; apply the best once to test.

    s = (s_beta, s_alpha, s_gamma), n = (n_beta, n_alpha, n_gamma); beta_i = 0.1 + i (s_beta - 0.1)/n_beta,
    alpha_j = 0.1 + j (s_alpha - 0.1)/n_alpha, gamma_k = k s_gamma/n_gamma. Visiting order beta, alpha,
    gamma (gamma innermost); on equal val accuracy the first point in that order wins. Test data, when
    given, is used only after the choice is made.
    """
    betas, alphas, gammas = beta_grid(s[0], n[0]), alpha_grid(s[1], n[1]), gamma_grid(s[2], n[2])
    counts = grid_counts(val_f, val_y, W, F, L, key_labels, idx, s, n)
    y_keys = key_labels.reshape(-1).long()
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


# ----------------------------------------------------------------------------------------------- registration


CHANNEL_SOURCES = ("auto", "stored", "computed")


@dataclass
class APEConfig(Config):
    """APE: refinement criterion and tri-edge search grid (docs/methods-training-free.md)."""

    OWNER = "ape"
    top_k: int = param(500, "int", "Q, channels kept by the refinement (clipped to the cache's width, with a note)",
                       ge=1)
    weights: tuple = param((0.5, 0.5), "floats", "(w0, w1) of the criterion J = -w0 sim + w1 var", length=2)
    channels: str = param("auto", "str", "channel source: a refinement stored by `cachekit refine`, the "
                          "criterion, or auto (stored when exactly one is stored and top_k/weights are not set)",
                          choices=CHANNEL_SOURCES)
    s: tuple = param((7, 7, 1), "floats", "search scales (s_beta, s_alpha, s_gamma)", length=3, ge=0,
                     search=True)
    n: tuple = param((200, 20, 20), "ints", "search steps (n_beta, n_alpha, n_gamma)", length=3, ge=1,
                     search=True, max_points=MAX_GRID_POINTS)

class APE(Estimator):
    @classmethod
    def resolve(cls, config, task, explicit):
        return resolve_channels(config, task, explicit, "text+cache")

    def select(self, task) -> Selection:
        cfg = self.config
        idx, self.source = channels_for(cfg, task, "text+cache")
        searches = getattr(task, "searches", None)
        self.reused = False
        if searches is not None:
            return_sel, self.reused = searches.select((task.k, task.seed), task, idx, cfg.s, cfg.n)
            return return_sel
        return select(task.val_f, task.val_y, task.W, task.F, task.L, task.key_labels, idx, task.test_f,
                      task.test_y, s=cfg.s, n=cfg.n)

    def extra(self) -> dict:
        out = {"channels": self.source}
        if self.reused:
            out["search"] = "reused: an earlier configuration selected the same channels"
        return out


register("ape", config=APEConfig, estimator=APE, doc="docs/methods-training-free.md",
         summary="APE: refined channels, tri-edge cache logits with KL entry weights, (β, α, γ) on val")
