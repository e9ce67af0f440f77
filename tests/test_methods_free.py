"""Training-free methods (zero-shot, Tip-Adapter, APE, GDA): formulas, searches, refinement, presets.

Every method is checked against a slow literal re-implementation written here independently (per-sample
loops / numpy), the vectorised searches against naive loops over the grid, and the channel criterion's
closed form against the literal pairwise definition.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

from cachekit.errors import CachekitError
from cachekit.methods import ape, gda, grids, presets, refine, search, tip, zeroshot
from cachekit.methods.base import accuracy

F64 = torch.float64


@pytest.fixture(autouse=True)
def _single_thread():
    """These tensors are small: one thread avoids OpenMP overhead on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------------
# Synthetic data


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_task(seed, C=5, D=24, shots=(4, 2, 5, 3, 4), M=30, noise=0.9, dtype=F64):
    """Random few-shot task with unequal class sizes: (W, F, L, key_labels, val_f, val_y)."""
    g = torch.Generator().manual_seed(seed)
    proto = Fn.normalize(torch.randn(C, D, generator=g, dtype=F64), dim=1)
    W = Fn.normalize(proto + 0.7 * torch.randn(C, D, generator=g, dtype=F64), dim=1)
    ky = torch.cat([torch.full((k,), c, dtype=torch.long) for c, k in enumerate(shots)])
    ky = ky[torch.randperm(ky.numel(), generator=g)]  # keys not class-grouped
    F = Fn.normalize(proto[ky] + noise * torch.randn(ky.numel(), D, generator=g, dtype=F64), dim=1)
    L = Fn.one_hot(ky, C).to(F64)
    vy = torch.randint(0, C, (M,), generator=g)
    vf = Fn.normalize(proto[vy] + noise * torch.randn(M, D, generator=g, dtype=F64), dim=1)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in (W, F, L, ky, vf, vy))


def planted_task(seed):
    """C=10, D=256: 32 channels separate the classes; the other 224 carry a shared offset plus per-sample
    noise of much larger energy; the text classifier is weak. Returns dict of tensors (float32)."""
    g = torch.Generator().manual_seed(seed)
    C, D, K, Q = 10, 256, 16, 32
    info = torch.randperm(D, generator=g)[:Q]
    noise_ch = torch.ones(D, dtype=torch.bool)
    noise_ch[info] = False
    mu = torch.zeros(C, D)
    mu[:, info] = torch.randn(C, Q, generator=g)
    u = torch.zeros(D)
    u[noise_ch] = 0.6 * torch.randn(int(noise_ch.sum()), generator=g)

    def images(labels):
        x = mu[labels] + 0.5 * torch.randn(len(labels), D, generator=g) * (~noise_ch)
        x = x + u + 2.5 * torch.randn(len(labels), D, generator=g) * noise_ch
        return Fn.normalize(x, dim=1)

    W = mu.clone()
    W[:, info] += 2.0 * torch.randn(C, Q, generator=g)
    W = Fn.normalize(W + u + 0.05 * torch.randn(C, D, generator=g) * noise_ch, dim=1)
    ky = torch.arange(C).repeat_interleave(K)
    vy = torch.arange(C).repeat_interleave(10)
    ty = torch.arange(C).repeat_interleave(30)
    return dict(info=info, W=W, F=images(ky), L=Fn.one_hot(ky, C).float(), ky=ky,
                vf=images(vy), vy=vy, tf=images(ty), ty=ty)


# --------------------------------------------------------------------------------------------------------
# Literal references (numpy float64, loops), written independently of the package


def ref_zeroshot(f, W):
    f, W = np.asarray(f, float), np.asarray(W, float)
    out = np.zeros((len(f), len(W)))
    for m in range(len(f)):
        for c in range(len(W)):
            out[m, c] = 100.0 * sum(f[m, d] * W[c, d] for d in range(f.shape[1]))
    return out


def ref_tip(f, W, F, L, alpha, beta):
    f, W, F, L = (np.asarray(x, float) for x in (f, W, F, L))
    out = ref_zeroshot(f, W)
    for m in range(len(f)):
        for n in range(len(F)):
            out[m] += alpha * math.exp(-beta * (1.0 - float(np.dot(f[m], F[n])))) * L[n]
    return out


def ref_refine(x, idx):
    x = np.asarray(x, float)[:, np.asarray(idx)]
    return np.stack([row / math.sqrt(sum(v * v for v in row)) for row in x])


def ref_kl_bits(F, W, ky, idx):
    Fr, Wr = ref_refine(F, idx), ref_refine(W, idx)
    div = []
    for n in range(len(Fr)):
        e = [math.exp(float(np.dot(Fr[n], Wr[c]))) for c in range(len(Wr))]
        p_true = e[int(ky[n])] / sum(e)
        div.append(-math.log(p_true + 1e-6, 2))
    return np.array(div)


def ref_ape(f, W, F, L, ky, idx, alpha, beta, gamma):
    f, W, F, L = (np.asarray(x, float) for x in (f, W, F, L))
    fr, Fr = ref_refine(f, idx), ref_refine(F, idx)
    r = np.exp(gamma * ref_kl_bits(F, W, ky, idx))
    out = ref_zeroshot(f, W)
    for m in range(len(f)):
        for n in range(len(F)):
            out[m] += alpha * math.exp(-beta * (1.0 - float(np.dot(fr[m], Fr[n])))) * r[n] * L[n]
    return out


def ref_pairwise_similarity(W, F, ky, text_only=False):
    """Literal definition: mean over ordered class pairs i != j of the mean over all members m of class i
    and n of class j of x_im[d] * x_jn[d] (members: text row + that class's keys). O(C^2 S^2 D)."""
    W, F = np.asarray(W, float), np.asarray(F, float)
    C, D = W.shape
    members = [[W[i]] + ([] if text_only else [F[n] for n in range(len(F)) if int(ky[n]) == i]) for i in range(C)]
    total = np.zeros(D)
    for i in range(C):
        for j in range(C):
            if i == j:
                continue
            pair = np.zeros(D)
            for xm in members[i]:
                for xn in members[j]:
                    for d in range(D):
                        pair[d] += xm[d] * xn[d]
            total += pair / (len(members[i]) * len(members[j]))
    return total / (C * (C - 1))


def ref_gda(X, y, C):
    X = np.asarray(X, float)
    y = np.asarray(y)
    n, D = X.shape
    mus = np.stack([X[y == c].mean(axis=0) for c in range(C)])
    centred = X - mus[y]
    sigma = np.cov(centred, rowvar=False, ddof=1)
    P = D * np.linalg.pinv((n - 1) * sigma + np.trace(sigma) * np.eye(D))
    W = np.stack([P @ mus[c] for c in range(C)])
    b = np.array([math.log(1.0 / C) - 0.5 * mus[c] @ P @ mus[c] for c in range(C)])
    return W, b


def naive_search(logit_fn, grid_axes, labels):
    """Literal nested loops (first axis outermost); keeps the first best. Returns (best index, best acc,
    table of accuracies)."""
    labels = np.asarray(labels)
    shape = tuple(len(a) for a in grid_axes)
    table = np.zeros(shape)
    best, best_idx = -1.0, None
    for idx in np.ndindex(*shape):
        point = [axis[i] for axis, i in zip(grid_axes, idx)]
        acc = 100.0 * float(np.mean(np.argmax(logit_fn(*point), axis=1) == labels))
        table[idx] = acc
        if acc > best:
            best, best_idx = acc, idx
    return best_idx, best, table


def tip_fast_np(f, W, F, L):
    f, W, F, L = (np.asarray(x, float) for x in (f, W, F, L))
    z, A = 100.0 * np.einsum("md,cd->mc", f, W), np.einsum("md,nd->mn", f, F)
    return lambda beta, alpha: z + alpha * np.einsum("mn,nc->mc", np.exp(-beta * (1.0 - A)), L)


def ape_fast_np(f, W, F, L, ky, idx):
    f, W, F, L = (np.asarray(x, float) for x in (f, W, F, L))
    z = 100.0 * np.einsum("md,cd->mc", f, W)
    A = np.einsum("md,nd->mn", ref_refine(f, idx), ref_refine(F, idx))
    div = ref_kl_bits(F, W, ky, idx)
    return lambda beta, alpha, gamma: z + alpha * np.einsum(
        "mn,nc->mc", np.exp(-beta * (1.0 - A)), L * np.exp(gamma * div)[:, None])


def grid_values(start, scale, steps):
    return [start + i * (scale - start) / steps for i in range(steps)]


# --------------------------------------------------------------------------------------------------------
# Grids


def test_grids_follow_the_reference_formulas():
    b = grids.beta_grid(7, 200)
    assert len(b) == 200 and b[0] == pytest.approx(0.1) and b[1] == pytest.approx(0.1 + 6.9 / 200)
    assert b[-1] == pytest.approx(0.1 + 199 * 6.9 / 200) and b[-1] < 7
    a = grids.alpha_grid(10, 20)
    assert len(a) == 20 and a[5] == pytest.approx(0.1 + 5 * 9.9 / 20)
    gm = grids.gamma_grid(0.5, 5)
    assert gm == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert grids.gda_alpha_grid() == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    with pytest.raises(CachekitError, match="fix:"):
        grids.beta_grid(7, 0)


# --------------------------------------------------------------------------------------------------------
# Refinement criterion


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_similarity_closed_form_equals_pairwise_literal(seed):
    W, F, L, ky, _, _ = make_task(seed, C=4, D=6, shots=(3, 1, 4, 2))
    got = refine.inter_class_similarity(W, F, ky).numpy()
    want = ref_pairwise_similarity(W, F, ky)
    assert np.abs(got - want).max() < 1e-6
    assert np.abs(want).max() > 1e-3  # not trivially zero


def test_similarity_handles_a_class_without_keys_and_float32():
    W, F, L, ky, _, _ = make_task(3, C=4, D=6, shots=(3, 0, 4, 2), dtype=torch.float32)
    got = refine.inter_class_similarity(W, F, ky).double().numpy()
    assert np.abs(got - ref_pairwise_similarity(W, F, ky)).max() < 1e-6


@pytest.mark.parametrize("seed", [0, 4])
def test_similarity_text_only_equals_pairwise_literal(seed):
    W, F, L, ky, _, _ = make_task(seed, C=5, D=7)
    got = refine.inter_class_similarity(W, None, None, text_only=True).numpy()
    assert np.abs(got - ref_pairwise_similarity(W, F, ky, text_only=True)).max() < 1e-6
    assert not np.allclose(got, refine.inter_class_similarity(W, F, ky).numpy())


def test_variance_and_scores_formula():
    W, F, L, ky, _, _ = make_task(5, C=6, D=9)
    var = refine.channel_variance(W).numpy()
    assert np.abs(var - np.var(W.numpy(), axis=0, ddof=1)).max() < 1e-12
    J = refine.scores(W, F, ky, w0=0.3, w1=0.7).numpy()
    want = -0.3 * ref_pairwise_similarity(W, F, ky) + 0.7 * np.var(W.numpy(), axis=0, ddof=1)
    assert np.abs(J - want).max() < 1e-6


def test_select_channels_orders_by_score_and_breaks_ties_by_lower_index():
    s = torch.tensor([0.1, 0.5, 0.3, 0.5, -1.0, 0.3])
    assert refine.select_channels(s, 4).tolist() == [1, 3, 2, 5]
    assert refine.select_channels(s, 6).tolist() == [1, 3, 2, 5, 0, 4]
    assert refine.select_channels(torch.zeros(5), 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("q", [0, -3, 7, 2.5, True, None])
def test_select_channels_rejects_out_of_range_q(q):
    with pytest.raises(CachekitError) as err:
        refine.select_channels(torch.randn(6), q)
    msg = str(err.value)
    assert repr(q) in msg and "1..6" in msg and "fix:" in msg


def test_refine_keeps_channels_and_renormalises():
    x = torch.tensor([[3.0, 0.0, 4.0, 12.0], [1.0, 1.0, 1.0, 1.0]])
    out = refine.refine(x, torch.tensor([2, 0]))
    assert torch.allclose(out, torch.tensor([[0.8, 0.6], [2 ** -0.5, 2 ** -0.5]]))


def test_criterion_runs_at_imagenet_scale():
    g = torch.Generator().manual_seed(0)
    C, K, D = 1000, 16, 1024
    W = Fn.normalize(torch.randn(C, D, generator=g), dim=1)
    F = Fn.normalize(torch.randn(C * K, D, generator=g), dim=1)
    ky = torch.arange(C).repeat_interleave(K)
    idx = refine.select_channels(refine.scores(W, F, ky), 500)
    assert idx.shape == (500,) and len(set(idx.tolist())) == 500


def test_planted_channels_are_recovered():
    t = planted_task(0)
    info = set(t["info"].tolist())
    for text_only in (False, True):
        idx = refine.select_channels(refine.scores(t["W"], t["F"], t["ky"], text_only=text_only), 32)
        precision = len(info & set(idx.tolist())) / 32
        assert precision >= 0.9, (text_only, precision)


# --------------------------------------------------------------------------------------------------------
# Logits versus literal re-implementations


def test_zeroshot_logits_equal_literal():
    W, F, L, ky, vf, vy = make_task(0, M=8)
    assert np.abs(zeroshot.logits(vf, W).numpy() - ref_zeroshot(vf, W)).max() < 1e-5


@pytest.mark.parametrize("alpha,beta", [(1.7, 5.5), (0.1, 0.1), (6.9, 12.0)])
def test_tip_logits_equal_literal(alpha, beta):
    W, F, L, ky, vf, vy = make_task(1, M=8)
    got = tip.logits(vf, W, F, L, alpha, beta).numpy()
    assert np.abs(got - ref_tip(vf, W, F, L, alpha, beta)).max() < 1e-5
    got32 = tip.logits(vf.float(), W.float(), F.float(), L.float(), alpha, beta).double().numpy()
    assert np.abs(got32 - ref_tip(vf, W, F, L, alpha, beta)).max() < 1e-3


def test_ape_kl_weights_equal_literal():
    W, F, L, ky, vf, vy = make_task(2)
    idx = torch.tensor([0, 3, 5, 7, 11, 13, 17, 20])
    div = ape.kl_divergence_bits(refine.refine(F, idx), refine.refine(W, idx), ky).numpy()
    assert np.abs(div - ref_kl_bits(F, W, ky, idx)).max() < 1e-9
    # it is KL(onehot || P) in bits up to the 1e-6: all other terms of the sum vanish
    P = torch.softmax(refine.refine(F, idx) @ refine.refine(W, idx).t(), dim=1).numpy()
    kl = np.array([-math.log2(P[n, int(ky[n])]) for n in range(len(ky))])
    assert np.abs(div - kl).max() < 1e-4
    r = ape.entry_weights(torch.from_numpy(div), 0.7).numpy()
    assert np.allclose(r, np.exp(0.7 * div))


@pytest.mark.parametrize("alpha,beta,gamma", [(2.3, 4.1, 0.6), (0.1, 0.1, 0.0), (6.0, 9.0, 1.5)])
def test_ape_logits_equal_literal(alpha, beta, gamma):
    W, F, L, ky, vf, vy = make_task(3, M=8)
    idx = refine.select_channels(refine.scores(W, F, ky), 10)
    got = ape.logits(vf, W, F, L, ky, idx, alpha, beta, gamma).numpy()
    assert np.abs(got - ref_ape(vf, W, F, L, ky, idx, alpha, beta, gamma)).max() < 1e-5


def test_ape_zero_shot_term_uses_all_channels():
    W, F, L, ky, vf, vy = make_task(3, M=8)
    idx = torch.arange(6)
    diff = ape.logits(vf, W, F, L, ky, idx, 0.0, 1.0, 0.0) - zeroshot.logits(vf, W)
    assert diff.abs().max() == 0


def test_gda_fit_and_logits_equal_numpy():
    g = torch.Generator().manual_seed(7)
    C, D, views = 4, 12, 9
    y = torch.arange(C).repeat_interleave(views)
    X = Fn.normalize(torch.randn(C, D, generator=g, dtype=F64)[y] + 0.8 * torch.randn(len(y), D, generator=g,
                                                                                     dtype=F64), dim=1)
    W_gda, b = gda.fit(X, y, C)
    W_ref, b_ref = ref_gda(X, y, C)
    assert np.abs(W_gda.numpy() - W_ref).max() < 1e-6 * max(1.0, np.abs(W_ref).max())
    assert np.abs(b.numpy() - b_ref).max() < 1e-6 * max(1.0, np.abs(b_ref).max())
    Wt, _, _, _, vf, _ = make_task(0, C=C, D=D, shots=(1,) * C, M=6)
    got = gda.logits(vf, Wt, W_gda, b, 0.01).numpy()
    want = 100.0 * vf.numpy() @ Wt.numpy().T + 0.01 * (vf.numpy() @ W_ref.T + b_ref)
    assert np.abs(got - want).max() < 1e-5
    W32, b32 = gda.fit(X.float(), y, C)
    assert W32.dtype == torch.float32 and np.abs(W32.double().numpy() - W_ref).max() < 1e-3 * np.abs(W_ref).max()


def test_gda_needs_every_class():
    X = Fn.normalize(torch.randn(6, 5, dtype=F64), dim=1)
    with pytest.raises(CachekitError, match="no training features"):
        gda.fit(X, torch.tensor([0, 0, 1, 1, 3, 3]), 4)


# --------------------------------------------------------------------------------------------------------
# The exact vectorised counter


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_count_correct_equals_literal_argmax_with_exact_ties(dtype):
    g = torch.Generator().manual_seed(11)
    G, M, C = 3, 300, 8
    z = (3 * torch.randn(M, C, generator=g)).to(dtype)
    k = torch.rand(G, M, C, generator=g).to(dtype)
    z[:, 1], k[:, :, 1] = z[:, 0], k[:, :, 0]  # class 1 duplicates class 0: exact ties, argmax takes 0
    z[:100, 4], k[:, :100, 4] = z[:100, 6], k[:, :100, 6]
    z[100:150, 5] = z[100:150, 2]  # equal zero-shot, different cache: ties only at alpha = 0
    y = torch.randint(0, C, (M,), generator=g)
    y[:40] = 1
    alphas = torch.tensor([0.0, 2.0, 0.5, 7.0, 0.1, 1.0, 3.3], dtype=dtype)  # unsorted, includes 0
    got = search.count_correct(z, k, y, alphas)
    want = torch.stack([torch.stack([((z + a * k[gi]).argmax(dim=1) == y).sum() for a in alphas])
                        for gi in range(G)])
    assert torch.equal(got, want)
    with pytest.raises(CachekitError, match="non-negative"):
        search.count_correct(z, k, y, torch.tensor([-1.0, 1.0], dtype=dtype))


# --------------------------------------------------------------------------------------------------------
# Vectorised searches versus naive loops


@pytest.mark.parametrize("seed,min_ties", [(0, 2), (2, 1), (4, 2)])
def test_tip_search_equals_naive_loop(seed, min_ties):
    W, F, L, ky, vf, vy = make_task(seed, M=14)
    s_beta, s_alpha, n_beta, n_alpha = 7, 7, 20, 10
    betas, alphas = grid_values(0.1, s_beta, n_beta), grid_values(0.1, s_alpha, n_alpha)
    best_idx, best_acc, table = naive_search(tip_fast_np(vf, W, F, L), [betas, alphas], vy)
    sel = tip.select(vf, vy, W, F, L, s_beta=s_beta, s_alpha=s_alpha, n_beta=n_beta, n_alpha=n_alpha)
    assert sel.extra["grid_index"] == best_idx
    assert sel.params == pytest.approx({"beta": betas[best_idx[0]], "alpha": alphas[best_idx[1]]})
    assert sel.val_acc == pytest.approx(best_acc)
    counts = tip.grid_counts(vf, vy, W, F, L, s_beta, s_alpha, n_beta, n_alpha).numpy()
    assert np.array_equal(counts, np.rint(table * len(vy) / 100).astype(int))
    assert sel.extra["ties"] == int((table == best_acc).sum()) >= min_ties  # small val sets tie often


def flat_task():
    """Val images equal their text rows (zero-shot is perfect) and every key is one vector orthogonal to all
    of them, two per class: the cache adds the same amount to every class, so every grid point ties."""
    eye = torch.eye(8, dtype=F64)
    W = eye[:3]
    ky = torch.tensor([2, 0, 1, 0, 2, 1])
    F = eye[7].repeat(6, 1)
    vy = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    return W, F, Fn.one_hot(ky, 3).to(F64), ky, W[vy], vy


def test_tip_search_first_best_on_a_flat_grid():
    W, F, L, ky, vf, vy = flat_task()
    sel = tip.select(vf, vy, W, F, L, n_beta=6, n_alpha=4)
    assert sel.val_acc == 100.0 and sel.extra["ties"] == 24
    assert sel.extra["grid_index"] == (0, 0) and sel.params == pytest.approx({"beta": 0.1, "alpha": 0.1})


def test_tip_search_matches_its_own_logits_in_float32():
    W, F, L, ky, vf, vy = make_task(5, M=40, dtype=torch.float32)
    sel = tip.select(vf, vy, W, F, L, n_beta=30, n_alpha=20)
    direct = accuracy(tip.logits(vf, W, F, L, sel.params["alpha"], sel.params["beta"]), vy)
    assert direct == pytest.approx(sel.val_acc)
    counts = tip.grid_counts(vf, vy, W, F, L, 7, 7, 30, 20)
    for i, beta in enumerate(grids.beta_grid(7, 30)):
        for j in (0, 7, 19):
            alpha = grids.alpha_grid(7, 20)[j]
            hits = (tip.logits(vf, W, F, L, alpha, beta).argmax(dim=1) == vy).sum()
            assert counts[i, j] == hits


@pytest.mark.parametrize("seed,shots", [(0, (4, 2, 5, 3, 4)), (1, (4, 2, 5, 3, 4)), (2, (1,) * 5)])
def test_ape_search_equals_naive_loop(seed, shots):
    W, F, L, ky, vf, vy = make_task(seed + 10, M=16, shots=shots)  # 1-shot: one key slot per class
    idx = refine.select_channels(refine.scores(W, F, ky), 12)
    s, n = (7, 7, 1), (20, 10, 5)
    axes = [grid_values(0.1, s[0], n[0]), grid_values(0.1, s[1], n[1]), [k * s[2] / n[2] for k in range(n[2])]]
    best_idx, best_acc, table = naive_search(ape_fast_np(vf, W, F, L, ky, idx), axes, vy)
    sel = ape.select(vf, vy, W, F, L, ky, idx, s=s, n=n)
    assert sel.extra["grid_index"] == best_idx
    assert sel.params == pytest.approx({"beta": axes[0][best_idx[0]], "alpha": axes[1][best_idx[1]],
                                        "gamma": axes[2][best_idx[2]]})
    assert sel.val_acc == pytest.approx(best_acc)
    counts = ape.grid_counts(vf, vy, W, F, L, ky, idx, s, n).numpy()
    assert np.array_equal(counts, np.rint(table * len(vy) / 100).astype(int))
    assert sel.extra["ties"] == int((table == best_acc).sum()) >= 2


def test_ape_search_first_best_on_a_flat_grid():
    W, F, L, ky, vf, vy = flat_task()
    idx = torch.arange(8)
    sel = ape.select(vf, vy, W, F, L, ky, idx, n=(5, 4, 3))
    assert sel.val_acc == 100.0 and sel.extra["ties"] == 60
    assert sel.extra["grid_index"] == (0, 0, 0)
    assert sel.params == pytest.approx({"beta": 0.1, "alpha": 0.1, "gamma": 0.0})


def test_ape_search_float32_agrees_with_naive():
    W, F, L, ky, vf, vy = make_task(12, M=24, dtype=torch.float32)
    idx = refine.select_channels(refine.scores(W, F, ky), 12)
    s, n = (10, 5, 1.5), (12, 6, 4)
    axes = [grid_values(0.1, s[0], n[0]), grid_values(0.1, s[1], n[1]), [k * s[2] / n[2] for k in range(n[2])]]
    _, _, table = naive_search(ape_fast_np(vf, W, F, L, ky, idx), axes, vy)
    counts = ape.grid_counts(vf, vy, W, F, L, ky, idx, s, n).numpy()
    assert np.array_equal(counts, np.rint(table * len(vy) / 100).astype(int))


def test_ape_rejects_values_that_are_not_one_hot():
    W, F, L, ky, vf, vy = make_task(0)
    with pytest.raises(CachekitError, match="one-hot"):
        ape.select(vf, vy, W, F, 2 * L, ky, torch.arange(8), n=(2, 2, 2))


def test_gda_search_equals_naive_loop():
    g = torch.Generator().manual_seed(3)
    W, F, L, ky, vf, vy = make_task(7, M=40)
    C, D = W.shape
    y = torch.arange(C).repeat_interleave(6)
    X = Fn.normalize(W[y] + 0.9 * torch.randn(len(y), D, generator=g, dtype=F64), dim=1)
    W_ref, b_ref = ref_gda(X, y, C)
    z = 100.0 * vf.numpy() @ W.numpy().T
    best_idx, best_acc, _ = naive_search(lambda a: z + a * (vf.numpy() @ W_ref.T + b_ref),
                                         [[10.0 ** e for e in range(-4, 3)]], vy)
    sel = gda.select(vf, vy, W, X, y)
    assert sel.params["alpha"] == pytest.approx(10.0 ** (best_idx[0] - 4))
    assert sel.val_acc == pytest.approx(best_acc)


# --------------------------------------------------------------------------------------------------------
# Planted structure: refinement helps


def test_ape_beats_tip_when_few_channels_carry_the_classes():
    t = planted_task(1)
    idx = refine.select_channels(refine.scores(t["W"], t["F"], t["ky"]), 32)
    tip_sel = tip.select(t["vf"], t["vy"], t["W"], t["F"], t["L"], t["tf"], t["ty"], n_beta=50)
    ape_sel = ape.select(t["vf"], t["vy"], t["W"], t["F"], t["L"], t["ky"], idx, t["tf"], t["ty"],
                         n=(50, 20, 10))
    zs = zeroshot.select(t["vf"], t["vy"], t["W"], t["tf"], t["ty"])
    assert ape_sel.test_acc >= 95.0
    assert ape_sel.test_acc >= tip_sel.test_acc + 10.0
    assert ape_sel.test_acc >= zs.test_acc + 15.0


# --------------------------------------------------------------------------------------------------------
# No test data in the selection


def _shifted_test(seed, C=5, D=24, M=40):
    """Test from another distribution than val: other prototypes' noise level and permuted labels."""
    W, F, L, ky, tf, ty = make_task(seed + 100, C=C, D=D, M=M, noise=1.4)
    return tf, ty[torch.randperm(len(ty), generator=torch.Generator().manual_seed(seed))]


def _assert_same_choice(a, b):
    assert a.params == b.params and a.val_acc == b.val_acc
    assert a.extra.get("grid_index") == b.extra.get("grid_index")


def test_selection_never_sees_test_data():
    W, F, L, ky, vf, vy = make_task(20, M=30)
    tf, ty = _shifted_test(20)
    ty2 = (ty + 1) % W.shape[0]
    idx = refine.select_channels(refine.scores(W, F, ky), 12)
    runs = {
        "tip": lambda *t: tip.select(vf, vy, W, F, L, *t, n_beta=20, n_alpha=10),
        "ape": lambda *t: ape.select(vf, vy, W, F, L, ky, idx, *t, n=(15, 8, 4)),
        "gda": lambda *t: gda.select(vf, vy, W, F, ky, *t),
        "zeroshot": lambda *t: zeroshot.select(vf, vy, W, *t),
    }
    for name, run in runs.items():
        alone, with_test, relabelled = run(), run(tf, ty), run(tf, ty2)
        assert alone.test_acc is None and with_test.test_acc is not None, name
        _assert_same_choice(alone, with_test)
        _assert_same_choice(alone, relabelled)
        assert with_test.test_acc != relabelled.test_acc, name  # the test labels did matter for test_acc
    # the test distribution would have chosen differently, so a leak could not go unnoticed
    on_test = tip.select(tf, ty, W, F, L, n_beta=20, n_alpha=10)
    assert on_test.extra["grid_index"] != runs["tip"]().extra["grid_index"]


# --------------------------------------------------------------------------------------------------------
# Presets


def test_presets_hold_the_reference_table():
    names = {"imagenet", "caltech101", "oxfordpets", "stanfordcars", "flowers102", "food101", "fgvcaircraft",
             "sun397", "dtd", "eurosat", "ucf101"}
    assert names | {"default"} == set(presets.PRESETS)
    p = presets.get_preset("ImageNet")
    assert p["s"] == (7, 7, 0.5) and p["n"] == (200, 20, 5) and p["q_ape"] == 500 and p["q_ape_t"] == 500
    assert p["w"] == (0.7, 0.3) and len(p["templates"]) == 7 and "itap of a {}." in p["templates"]
    e = presets.get_preset("eurosat")
    assert e["s"] == (30, 5, 1.5) and e["n"] == (200, 20, 20) and (e["q_ape"], e["q_ape_t"]) == (700, 900)
    assert e["w"] == (0.9, 0.1) and e["templates"] == ["a centered satellite photo of {}."]
    assert presets.get_preset("fgvc_aircraft")["s"] == (20, 10, 1)
    assert presets.get_preset("oxford_flowers")["templates"] == ["a photo of a {}, a type of flower."]
    assert presets.get_preset("dtd")["templates"] == ["{} texture."]
    assert presets.get_preset("UCF101")["s"] == (10, 7, 1.5)
    assert presets.get_preset("stanford_cars")["w"] == (0.6, 0.4)
    assert all(p["w_ape_t"] == (0.2, 0.8) for p in presets.PRESETS.values())


def test_get_preset_unknown_name_lists_the_valid_ones():
    with pytest.raises(CachekitError) as err:
        presets.get_preset("mnist")
    assert "mnist" in str(err.value) and "caltech101" in str(err.value) and "fix:" in str(err.value)


def test_merge_lets_non_none_overrides_win():
    base = presets.get_preset("dtd")
    merged = presets.merge(base, {"q_ape": 128, "w": None, "s": (5, 5, 1)})
    assert merged["q_ape"] == 128 and merged["w"] == (0.5, 0.5) and merged["s"] == (5, 5, 1)
    assert base["q_ape"] == 400  # inputs untouched
    merged["templates"].append("x")
    assert presets.get_preset("dtd")["templates"] == ["{} texture."]


def test_count_correct_edge_inputs():
    """Subnormal values (the relative margin underflows: a floor keeps it), mixed dtypes refused, G = 0."""
    z = torch.tensor([[-5.605193857299268e-45, -1.2611686178923354e-44, 0.0]])
    k = torch.tensor([[[-1.8216880036222622e-44, -5.605193857299268e-45, -1.961817850054744e-44]]])
    y, al = torch.tensor([2]), torch.tensor([0.8531993627548218])
    literal = int(((z + al[0] * k[0]).argmax(1) == y).sum())
    assert literal == 0 and search.count_correct(z, k, y, al).item() == literal
    with pytest.raises(CachekitError, match="one floating dtype"):
        search.count_correct(z.double(), k, y, al)
    assert search.count_correct(z, k[:0], y, al).shape == (0, 1)
