"""Tip-Adapter-F (cachekit.methods.tipf) and APE-T (cachekit.methods.apet) on synthetic cached features."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

from cachekit.errors import CachekitError
from cachekit.methods import apet, refine, tip, tipf, training
from cachekit.methods.base import accuracy
from cachekit.methods.grids import alpha_grid, beta_grid


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is far faster than two contended OpenMP threads (and it is restored)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(seed=0, C=6, K=4, D=16, V=8, M=200, sig=0.9, text_noise=3.0, cycle=(0, 1, 2), swap_text=False):
    """Clustered unit features. Keys are the mean of V views per shot, re-normalised.

    cycle: classes whose keys are planted at the next listed class's cluster (labels kept), so the initial
    cache votes wrongly for them. swap_text: the text rows of classes 0 and 1 are exchanged.
    """
    g = torch.Generator().manual_seed(seed)
    mu = TF.normalize(torch.randn(C, D, generator=g), dim=1)

    def draw(labels):
        return TF.normalize(mu[labels] + sig * torch.randn(len(labels), D, generator=g) / D ** 0.5, dim=1)

    W = TF.normalize(mu + text_noise * torch.randn(C, D, generator=g) / D ** 0.5, dim=1)
    if swap_text:
        W[[0, 1]] = W[[1, 0]]
    ky = torch.arange(C).repeat_interleave(K)
    views = torch.stack([draw(ky) for _ in range(V)])  # (V, N, D)
    F_true = TF.normalize(views.sum(0), dim=1)
    F = F_true.clone()
    cyc = list(cycle)
    for a, b in zip(cyc, cyc[1:] + cyc[:1]):
        F[ky == a] = F_true[ky == b]
    vy = torch.randint(0, C, (M,), generator=g)
    ty = torch.randint(0, C, (M,), generator=g)
    return dict(X=views.reshape(-1, D), y=ky.repeat(V), W=W, F=F, L=TF.one_hot(ky, C).float(), ky=ky,
                vf=draw(vy), vy=vy, tf=draw(ty), ty=ty)


def rand_unit(g, *shape, dtype=torch.float32):
    return TF.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


# ----------------------------------------------------------------------------------------------- literal
def literal_tip(f, W, F, V, alpha, beta):
    """Python loops over samples, classes and cache entries, in float64."""
    M, C, N = f.shape[0], W.shape[0], F.shape[0]
    out = torch.zeros(M, C, dtype=torch.float64)
    for m in range(M):
        for c in range(C):
            s = 100.0 * sum(float(f[m, d]) * float(W[c, d]) for d in range(f.shape[1]))
            for n in range(N):
                a = sum(float(f[m, d]) * float(F[n, d]) for d in range(f.shape[1]))
                s += alpha * math.exp(-beta * (1.0 - a)) * float(V[n, c])
            out[m, c] = s
    return out


def literal_apet(f, W, F, L, key_labels, idx, R, v, alpha, beta, normalize):
    """Build W~ and F~ entry by entry (python loops), then the literal Tip-Adapter sum with values L * v."""
    def adapt(row, r):
        x = [float(t) for t in row]
        for q, d in enumerate(idx.tolist()):
            x[d] += float(r[q])
        if normalize:
            nrm = math.sqrt(sum(t * t for t in x))
            x = [t / nrm for t in x]
        return x

    Wt = torch.tensor([adapt(W[c], R[c]) for c in range(W.shape[0])], dtype=torch.float64)
    Ft = torch.tensor([adapt(F[n], R[int(key_labels[n])]) for n in range(F.shape[0])], dtype=torch.float64)
    V = torch.tensor([[float(L[n, c]) * float(v[n]) for c in range(L.shape[1])] for n in range(L.shape[0])],
                     dtype=torch.float64)
    return literal_tip(f, Wt, Ft, V, alpha, beta)


def test_tipf_logits_equal_literal():
    g = torch.Generator().manual_seed(3)
    M, C, K, D = 5, 4, 3, 10
    f, W = rand_unit(g, M, D), rand_unit(g, C, D)
    keys = rand_unit(g, C * K, D) * 1.3 + 0.05  # trained keys are not unit-norm
    L = TF.one_hot(torch.arange(C).repeat_interleave(K), C).float()
    for alpha, beta in ((1.0, 1.0), (2.5, 5.5)):
        ref = literal_tip(f, W, keys, L, alpha, beta)
        out32 = tipf.logits(f, W, keys, L, alpha, beta)
        assert out32.dtype == torch.float32 and out32.shape == (M, C)
        assert (out32.double() - ref).abs().max() < 1e-4 * (1 + ref.abs().max())
        out64 = tipf.logits(f.double(), W.double(), keys.double(), L.double(), alpha, beta)
        assert (out64 - ref).abs().max() < 1e-5


@pytest.mark.parametrize("normalize", [True, False])
def test_apet_logits_equal_literal(normalize):
    g = torch.Generator().manual_seed(4)
    M, C, K, D, Q = 4, 3, 3, 12, 5
    f, W, F = rand_unit(g, M, D), rand_unit(g, C, D), rand_unit(g, C * K, D)
    ky = torch.tensor([2, 0, 1, 1, 0, 2, 0, 2, 1])  # not class-grouped on purpose
    L = TF.one_hot(ky, C).float()
    idx = torch.randperm(D, generator=g)[:Q]
    R = 0.3 * torch.randn(C, Q, generator=g)
    v = 1 + 0.5 * torch.randn(C * K, generator=g)
    ref = literal_apet(f, W, F, L, ky, idx, R, v, 1.7, 3.2, normalize)
    out64 = apet.logits(f.double(), W.double(), F.double(), L.double(), ky, idx, R.double(), v.double(), 1.7, 3.2,
                        normalize=normalize)
    assert (out64 - ref).abs().max() < 1e-5
    out32 = apet.logits(f, W, F, L, ky, idx, R, v, 1.7, 3.2, normalize=normalize)
    assert (out32.double() - ref).abs().max() < 1e-4 * (1 + ref.abs().max())
    # the residual really acts: a different residual changes the logits
    other = apet.logits(f.double(), W.double(), F.double(), L.double(), ky, idx, 0 * R.double(), v.double(), 1.7,
                        3.2, normalize=normalize)
    assert (other - ref).abs().max() > 1e-2


def test_default_channels_text_only_criterion():
    g = torch.Generator().manual_seed(5)
    C, D, q = 7, 20, 6
    W = rand_unit(g, C, D)
    # literal: mean over ordered pairs i != j of W[i, d] W[j, d]; unbiased variance over classes
    J = []
    for d in range(D):
        col = [float(W[i, d]) for i in range(C)]
        sim = sum(col[i] * col[j] for i in range(C) for j in range(C) if i != j) / (C * (C - 1))
        mean = sum(col) / C
        var = sum((x - mean) ** 2 for x in col) / (C - 1)
        J.append(-0.2 * sim + 0.8 * var)
    expected = sorted(range(D), key=lambda d: -J[d])[:q]
    assert apet.default_channels(W, q).tolist() == expected
    assert torch.equal(apet.default_channels(W, q, weights=(0.5, 0.5)),
                       refine.select_channels(refine.scores(W, None, None, 0.5, 0.5, text_only=True), q))


def test_cosine_lr_matches_torch_scheduler():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    total = 37
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    for it in range(total):
        assert math.isclose(opt.param_groups[0]["lr"], training.cosine_lr(1e-3, it, total), rel_tol=1e-9, abs_tol=1e-15)
        opt.step()
        sched.step()


# ----------------------------------------------------------------------------------------------- configs
def test_configs_roundtrip_and_validation():
    for cls in (tipf.TipFConfig, apet.APETConfig):
        cfg = cls(epochs=3, lr=2e-3, seed=7)
        assert cls.from_dict(cfg.to_dict()) == cfg
        with pytest.raises(CachekitError, match="unknown"):
            cls.from_dict({**cfg.to_dict(), "lrr": 1})
        for bad in ({"epochs": 0}, {"epochs": 2.0}, {"lr": -1.0}, {"lr": float("nan")}, {"eps": 0},
                    {"weight_decay": -0.1}, {"batch_size": 0}, {"epoch_size": 0}, {"init_alpha": -1},
                    {"init_beta": float("inf")}, {"seed": 1.5}, {"device": "nope"}, {"epochs": True}):
            with pytest.raises(CachekitError, match="fix:"):
                cls(**bad).validate()
    assert tipf.TipFConfig().to_dict() == {"epochs": 20, "lr": 1e-3, "eps": 1e-4, "weight_decay": 0.01,
                                           "batch_size": 256, "epoch_size": None, "init_alpha": 1.0,
                                           "init_beta": 1.0, "seed": 1, "device": "cpu", "s": [7.0, 7.0],
                                           "n": [200, 20]}
    a = apet.APETConfig()
    assert (a.lr, a.eps, a.weight_decay, a.batch_size, a.epochs, a.normalize) == (1e-3, 1e-3, 0.1, 256, 20, True)
    with pytest.raises(CachekitError, match="normalize"):
        apet.APETConfig(normalize="yes").validate()


def test_input_errors():
    d = make()
    D = d["W"].shape[1]
    idx = apet.default_channels(d["W"], 4)
    with pytest.raises(CachekitError, match="labels"):
        tipf.fit(d["X"], d["y"] + 100, d["W"], d["F"], d["L"], d["vf"], d["vy"], tipf.TipFConfig(epochs=1))
    with pytest.raises(CachekitError, match="cache values"):
        tipf.fit(d["X"], d["y"], d["W"], d["F"], d["L"][:, :3], d["vf"], d["vy"], tipf.TipFConfig(epochs=1))
    with pytest.raises(CachekitError, match="features"):
        tipf.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["vf"][:, :3], d["vy"], tipf.TipFConfig(epochs=1))
    cfg = apet.APETConfig(epochs=1)
    for bad_idx in (torch.tensor([0, 0, 1]), torch.tensor([D]), torch.tensor([0.5])):
        with pytest.raises(CachekitError, match="channel"):
            apet.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["ky"], bad_idx, d["vf"], d["vy"], cfg)
    with pytest.raises(CachekitError, match="one-hot"):
        apet.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["ky"].roll(1), idx, d["vf"], d["vy"], cfg)


# ----------------------------------------------------------------------------------------------- training
def same_acc(a, b):
    """Accuracies in percent from counts vs from base.accuracy's float32 mean: equal up to float32 rounding."""
    return math.isclose(a, b, rel_tol=0, abs_tol=1e-4)


def _ce(lg, y):
    return float(TF.cross_entropy(lg, y))


def test_tipf_training_lowers_loss_and_is_seeded():
    d = make(seed=1)
    cfg = tipf.TipFConfig(epochs=6, lr=1e-2, batch_size=32, init_alpha=5.0, init_beta=5.0)
    seen = []
    r1 = tipf.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["vf"], d["vy"], cfg, callback=seen.append)
    assert seen == r1.log and [e["epoch"] for e in seen] == list(range(1, 7))
    assert r1.log[-1]["loss"] < 0.85 * r1.log[0]["loss"]
    before = _ce(tipf.logits(d["X"], d["W"], d["F"], d["L"], 5.0, 5.0), d["y"])
    after = _ce(tipf.logits(d["X"], d["W"], r1.keys, d["L"], 5.0, 5.0), d["y"])
    assert after < 0.85 * before
    r2 = tipf.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["vf"], d["vy"], cfg)
    assert torch.equal(r1.keys, r2.keys) and r1.best_epoch == r2.best_epoch and r1.log == r2.log
    r3 = tipf.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["vf"], d["vy"], tipf.TipFConfig(**{**cfg.to_dict(),
                                                                                              "seed": 2}))
    assert not torch.equal(r1.keys, r3.keys)
    # the inputs are not modified in place
    assert torch.equal(d["F"], make(seed=1)["F"])
    # cosine schedule over all iterations: 6 epochs x ceil(192 / 32) iterations
    assert r1.log[-1]["lr"] == training.cosine_lr(1e-2, 35, 36)
    r4 = tipf.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["vf"], d["vy"],
                  tipf.TipFConfig(**{**cfg.to_dict(), "epoch_size": 40}))
    assert r4.log[-1]["lr"] == training.cosine_lr(1e-2, 11, 12)  # 6 epochs x ceil(40 / 32)


def test_apet_training_lowers_loss_and_is_seeded():
    d = make(seed=2, cycle=(), swap_text=True, text_noise=1.0)
    idx = apet.default_channels(d["W"], 8)
    cfg = apet.APETConfig(epochs=6, lr=1e-2, batch_size=32)
    r1 = apet.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["ky"], idx, d["vf"], d["vy"], cfg)
    assert r1.residual.shape == (6, 8) and r1.values.shape == (24,) and torch.equal(r1.idx, idx)
    assert r1.log[-1]["loss"] < 0.85 * r1.log[0]["loss"]
    before = _ce(tip.logits(d["X"], d["W"], d["F"], d["L"], 1.0, 1.0), d["y"])
    after = _ce(apet.logits(d["X"], d["W"], d["F"], d["L"], d["ky"], idx, r1.residual, r1.values, 1.0, 1.0), d["y"])
    assert after < 0.85 * before
    r2 = apet.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["ky"], idx, d["vf"], d["vy"], cfg)
    assert torch.equal(r1.residual, r2.residual) and torch.equal(r1.values, r2.values) and r1.log == r2.log
    r3 = apet.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["ky"], idx, d["vf"], d["vy"],
                  apet.APETConfig(**{**cfg.to_dict(), "seed": 9}))
    assert not torch.equal(r1.residual, r3.residual)


def test_zero_learning_rate_changes_nothing():
    d = make(seed=3)
    r = tipf.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["vf"], d["vy"], tipf.TipFConfig(epochs=2, lr=0.0))
    assert torch.equal(r.keys, d["F"]) and r.best_epoch == 1
    assert r.val_acc_init == r.log[0]["val_acc"]
    assert same_acc(r.val_acc_init, accuracy(tip.logits(d["vf"], d["W"], d["F"], d["L"], 1, 1), d["vy"]))
    idx = apet.default_channels(d["W"], 5)
    for normalize in (True, False):
        ra = apet.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["ky"], idx, d["vf"], d["vy"],
                      apet.APETConfig(epochs=2, lr=0.0, normalize=normalize))
        assert torch.equal(ra.residual, torch.zeros(6, 5)) and torch.equal(ra.values, torch.ones(24))
        for a, b in ((1.0, 1.0), (3.0, 6.0)):
            ref = tip.logits(d["tf"], d["W"], d["F"], d["L"], a, b)
            out = apet.logits(d["tf"], d["W"], d["F"], d["L"], d["ky"], idx, ra.residual, ra.values, a, b,
                              normalize=normalize)
            # re-normalising unit rows moves them by float32 rounding only (a few ulp of ~50)
            assert (out - ref).abs().max() < 1e-6 * (1 + ref.abs().max())
            if not normalize:
                assert torch.equal(out, ref)


def test_tipf_planted_wrong_keys_are_repaired():
    """Keys of classes 0, 1, 2 sit at the next class's cluster; training the keys must fix that."""
    d = make(seed=0)
    a, b = 5.0, 5.0
    before = accuracy(tip.logits(d["tf"], d["W"], d["F"], d["L"], a, b), d["ty"])
    cfg = tipf.TipFConfig(epochs=20, lr=1e-2, batch_size=32, init_alpha=a, init_beta=b)
    r = tipf.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["vf"], d["vy"], cfg)
    after = accuracy(tipf.logits(d["tf"], d["W"], r.keys, d["L"], a, b), d["ty"])
    assert after > before + 20, (before, after)
    # also after re-searching (beta, alpha) on val for both
    s0 = tip.select(d["vf"], d["vy"], d["W"], d["F"], d["L"], d["tf"], d["ty"], n_beta=50, n_alpha=10)
    s1 = tipf.select(r, d["vf"], d["vy"], d["W"], d["L"], d["tf"], d["ty"], n=(50, 10))
    assert s1.test_acc > s0.test_acc + 20 and s1.val_acc > s0.val_acc + 20, (s0, s1)
    assert s1.method == "tipf" and set(s1.params) == {"beta", "alpha", "epoch"}
    # the planted classes are the ones repaired: keys of class 0 moved towards class 0's train views
    mean0 = TF.normalize(d["X"][d["y"] == 0].mean(0), dim=0)
    assert float((r.keys[d["ky"] == 0] @ mean0).mean()) > float((d["F"][d["ky"] == 0] @ mean0).mean()) + 0.1


def test_apet_planted_swapped_text_is_repaired():
    """Text rows of classes 0 and 1 are exchanged: the class residual must move them back."""
    d = make(seed=0, cycle=(), swap_text=True, text_noise=1.0)
    idx = apet.default_channels(d["W"], 8)
    before = accuracy(tip.logits(d["tf"], d["W"], d["F"], d["L"], 1.0, 1.0), d["ty"])
    r = apet.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["ky"], idx, d["vf"], d["vy"],
                 apet.APETConfig(lr=1e-2, batch_size=32))
    after = accuracy(apet.logits(d["tf"], d["W"], d["F"], d["L"], d["ky"], idx, r.residual, r.values, 1.0, 1.0),
                     d["ty"])
    assert after > before + 15, (before, after)
    s = apet.select(r, d["vf"], d["vy"], d["W"], d["F"], d["L"], d["ky"], d["tf"], d["ty"], n=(40, 10))
    assert s.method == "apet" and s.params["epoch"] == r.best_epoch and s.test_acc > before + 15


# ----------------------------------------------------------------------------------------------- selection
def test_epoch_is_first_best_on_val():
    d = make(seed=4)
    cfg = tipf.TipFConfig(epochs=8, lr=1e-2, batch_size=64, init_alpha=5.0, init_beta=5.0)
    r = tipf.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["vf"], d["vy"], cfg)
    accs = [e["val_acc"] for e in r.log]
    assert r.best_epoch == 1 + accs.index(max(accs))
    assert r.best_epoch < len(accs)  # these data make "first best" differ from "last epoch"
    assert same_acc(accuracy(tipf.logits(d["vf"], d["W"], r.keys, d["L"], 5.0, 5.0), d["vy"]), accs[r.best_epoch - 1])
    idx = apet.default_channels(d["W"], 6)
    ra = apet.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["ky"], idx, d["vf"], d["vy"],
                  apet.APETConfig(epochs=8, lr=1e-2, batch_size=64))
    accs = [e["val_acc"] for e in ra.log]
    assert ra.best_epoch == 1 + accs.index(max(accs))
    assert ra.best_epoch < len(accs) and accs[ra.best_epoch - 1] == accs[ra.best_epoch]  # a tie: first wins
    lg = apet.logits(d["vf"], d["W"], d["F"], d["L"], d["ky"], idx, ra.residual, ra.values, 1.0, 1.0)
    assert same_acc(accuracy(lg, d["vy"]), accs[ra.best_epoch - 1])


def _naive(logit_fn, val_f, val_y, s, n):
    best, choice = -1.0, None
    for beta in beta_grid(s[0], n[0]):
        for alpha in alpha_grid(s[1], n[1]):
            acc = accuracy(logit_fn(val_f, alpha, beta), val_y)
            if acc > best:
                best, choice = acc, {"beta": beta, "alpha": alpha}
    return choice, best


def test_search_never_reads_test_labels_and_equals_naive_loop():
    d = make(seed=5)
    r = tipf.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["vf"], d["vy"],
                 tipf.TipFConfig(epochs=4, lr=1e-2, batch_size=64, init_alpha=5.0, init_beta=5.0))
    idx = apet.default_channels(d["W"], 6)
    ra = apet.fit(d["X"], d["y"], d["W"], d["F"], d["L"], d["ky"], idx, d["vf"], d["vy"],
                  apet.APETConfig(epochs=4, lr=1e-2, batch_size=64))
    assert not torch.allclose(ra.values, torch.ones_like(ra.values))  # a non-one-hot value matrix is searched
    g = torch.Generator().manual_seed(0)
    other_f = rand_unit(g, 150, d["W"].shape[1])  # a different distribution, other size
    other_y = torch.randint(0, 6, (150,), generator=g)
    perm_y = d["ty"][torch.randperm(d["ty"].numel(), generator=g)]
    runs = [
        (lambda **kw: tipf.select(r, d["vf"], d["vy"], d["W"], d["L"], **kw),
         lambda f, a, b: tipf.logits(f, d["W"], r.keys, d["L"], a, b)),
        (lambda **kw: apet.select(ra, d["vf"], d["vy"], d["W"], d["F"], d["L"], d["ky"], **kw),
         lambda f, a, b: apet.logits(f, d["W"], d["F"], d["L"], d["ky"], idx, ra.residual, ra.values, a, b)),
    ]
    # any value matrix, negative weights included (the search must not assume one-hot or >= 0 values)
    neg = apet.APETFit(residual=0.2 * torch.randn(6, 6, generator=g), values=torch.randn(24, generator=g) + 0.5,
                       best_epoch=3, idx=idx, config=apet.APETConfig(normalize=False))
    assert (neg.values < 0).any()
    runs.append((lambda **kw: apet.select(neg, d["vf"], d["vy"], d["W"], d["F"], d["L"], d["ky"], **kw),
                 lambda f, a, b: apet.logits(f, d["W"], d["F"], d["L"], d["ky"], idx, neg.residual, neg.values, a,
                                             b, normalize=False)))
    for k, (sel_fn, logit_fn) in enumerate(runs):
        grids = [((3, 11), (37, 9))] + ([((7, 7), (200, 20))] if k == 0 else [])  # default grid once (time)
        for s, n in grids:
            base = sel_fn(s=s, n=n)
            assert base.test_acc is None
            choice, best = _naive(logit_fn, d["vf"], d["vy"], s, n)
            assert {"beta": base.params["beta"], "alpha": base.params["alpha"]} == choice
            assert same_acc(base.val_acc, best)
        s, n = (3, 11), (37, 9)
        base = sel_fn(s=s, n=n)
        with_test = sel_fn(test_f=d["tf"], test_y=d["ty"], s=s, n=n)
        permuted = sel_fn(test_f=d["tf"], test_y=perm_y, s=s, n=n)
        shifted = sel_fn(test_f=other_f, test_y=other_y, s=s, n=n)
        for other in (with_test, permuted, shifted):
            assert other.params == base.params and other.val_acc == base.val_acc
        assert with_test.test_acc == accuracy(logit_fn(d["tf"], base.params["alpha"], base.params["beta"]), d["ty"])
        assert shifted.test_acc == accuracy(logit_fn(other_f, base.params["alpha"], base.params["beta"]), other_y)
