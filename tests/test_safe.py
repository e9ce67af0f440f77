"""SAFE on cached dense maps: training, determinism, blending, val-only selection, a planted-structure problem."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cachekit.attnpool import PARAM_NAMES, attnpool_single_query
from cachekit.errors import CachekitError
from cachekit.methods.base import Selection, accuracy
from cachekit.methods.safe import (
    DEFAULT_GRID,
    DenseMapSource,
    SafeConfig,
    SafeFit,
    TensorSource,
    blend_features,
    blend_logits,
    blended_logits,
    fit,
    lr_schedule,
    pool,
    select_blend,
)

# A planted problem. Dense maps have C_IN channels on a HW x HW grid. The class is visible only in 1-2
# random spatial tokens holding the class pattern; every other token holds one of a few class-independent,
# larger-magnitude distractors, so the mean token (the attention query) and a near-uniform attention are
# dominated by the distractors. The "frozen CLIP" layer is a seeded random-init attnpool (open_clip's init
# scales). The classifier W is what zero-shot text would be in this world: the frozen layer's own pooled
# feature of a *clean* map of each class pattern (every token = the pattern), L2-normalised. So W is right
# about what each class looks like, and the frozen layer fails only because its pooling does not focus on
# the class tokens -- exactly what SAFE is meant to fix by re-learning where to pool.
C_IN, HW, NCLS, D, HEADS = 32, 4, 5, 16, 4
DISTRACTOR_SCALE = 3.0


def random_params(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = C_IN ** -0.5
    p = {"positional_embedding": torch.randn(HW * HW + 1, C_IN, generator=g) * s}
    for n in ("k_proj", "q_proj", "v_proj"):
        p[n + ".weight"] = torch.randn(C_IN, C_IN, generator=g) * s
        p[n + ".bias"] = (torch.rand(C_IN, generator=g) * 2 - 1) * s
    p["c_proj.weight"] = torch.randn(D, C_IN, generator=g) * s
    p["c_proj.bias"] = (torch.rand(D, generator=g) * 2 - 1) * s
    return p


def make_world(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    patterns = torch.zeros(NCLS, C_IN)
    for c in range(NCLS):
        patterns[c, 4 * c:4 * c + 4] = 2.0
    patterns += torch.rand(NCLS, C_IN, generator=g) * 0.2
    distractors = torch.rand(6, C_IN, generator=g) * DISTRACTOR_SCALE
    return patterns, distractors


def sample(n: int, patterns, distractors, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % NCLS)[torch.randperm(n, generator=g)]
    T = HW * HW
    x = distractors[torch.randint(0, len(distractors), (n, T), generator=g)]
    x = x * (0.8 + 0.4 * torch.rand(n, T, 1, generator=g))
    k = 1 + torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        where = torch.randperm(T, generator=g)[: int(k[i])]
        x[i, where] = patterns[y[i]] * (0.8 + 0.4 * torch.rand(len(where), 1, generator=g))
    x = x + 0.05 * torch.rand(n, T, C_IN, generator=g)
    return x.transpose(1, 2).reshape(n, C_IN, HW, HW).contiguous(), y


@pytest.fixture(scope="module")
def problem():
    params = random_params(0)
    patterns, distractors = make_world(0)
    clean = patterns[:, :, None, None].expand(NCLS, C_IN, HW, HW).contiguous()
    W = pool(TensorSource(clean), params, HEADS)
    xtr, ytr = sample(160, patterns, distractors, 1)
    xva, yva = sample(200, patterns, distractors, 2)
    xte, yte = sample(500, patterns, distractors, 3)
    return dict(params=params, W=W, tr=(TensorSource(xtr), ytr), va=(TensorSource(xva), yva),
                te=(TensorSource(xte), yte))


@pytest.fixture(scope="module")
def default_fit(problem):
    """SAFE with the shipped defaults (RAFT: 50 epochs, lr 1e-4, batch 64, L1 consistency 0.5, T=2)."""
    cfg = SafeConfig()
    src, y = problem["tr"]
    seen = []
    out = fit(src, y, problem["W"], problem["params"], HEADS, cfg, val=problem["va"], callback=seen.append)
    return out, seen


FAST = dict(epochs=8, warmup_epochs=1, lr=1e-3, batch_size=32)


def test_fit_log_and_callback(default_fit):
    out, seen = default_fit
    assert isinstance(out, SafeFit)
    assert len(out.log) == 50 and seen == out.log
    assert [e["epoch"] for e in out.log] == list(range(1, 51))
    for e in out.log:
        assert set(e) == {"epoch", "loss", "ce", "consistency", "lr", "train_acc", "val_acc"}
        assert math.isclose(e["loss"], e["ce"] + 0.5 * e["consistency"], rel_tol=1e-5)
        assert e["val_acc"] is not None
    assert set(out.params) == set(PARAM_NAMES)
    assert out.config == SafeConfig()
    # warm-up for 10 epochs, then cosine to min_lr
    assert out.log[9]["lr"] == pytest.approx(1e-4)
    assert out.log[-1]["lr"] < 2e-6


def test_training_lowers_loss(problem):
    src, y = problem["tr"]
    out = fit(src, y, problem["W"], problem["params"], HEADS, SafeConfig(**FAST))
    first, last = out.log[0], out.log[-1]
    assert last["loss"] < 0.6 * first["loss"], (first, last)
    assert last["ce"] < first["ce"]
    assert last["train_acc"] > first["train_acc"] + 20


def test_same_seed_identical_different_seed_differs(problem):
    src, y = problem["tr"]
    args = (src, y, problem["W"], problem["params"], HEADS)
    a = fit(*args, SafeConfig(**{**FAST, "epochs": 3, "seed": 5}))
    b = fit(*args, SafeConfig(**{**FAST, "epochs": 3, "seed": 5}))
    c = fit(*args, SafeConfig(**{**FAST, "epochs": 3, "seed": 6}))
    for k in PARAM_NAMES:
        assert torch.equal(a.params[k], b.params[k]), k
    assert a.log == b.log
    assert any(not torch.equal(a.params[k], c.params[k]) for k in PARAM_NAMES)
    # training changed every trained parameter, and left the caller's dict alone
    for k in PARAM_NAMES:
        assert not torch.equal(a.params[k], problem["params"][k]), k
    assert torch.equal(problem["params"]["q_proj.weight"], random_params(0)["q_proj.weight"])


def test_only_selected_groups_train(problem):
    src, y = problem["tr"]
    out = fit(src, y, problem["W"], problem["params"], HEADS,
              SafeConfig(**{**FAST, "epochs": 2, "train_groups": ("c_proj",)}))
    for k in PARAM_NAMES:
        same = torch.equal(out.params[k], problem["params"][k])
        assert same == (not k.startswith("c_proj")), k


@pytest.mark.parametrize("kind", ["kl", "none"])
def test_consistency_kinds(problem, kind):
    src, y = problem["tr"]
    out = fit(src, y, problem["W"], problem["params"], HEADS,
              SafeConfig(**{**FAST, "epochs": 3, "consistency": kind}))
    if kind == "none":
        assert all(e["consistency"] == 0.0 and e["loss"] == pytest.approx(e["ce"]) for e in out.log)
    else:
        assert all(e["consistency"] >= 0.0 for e in out.log)
        assert out.log[-1]["consistency"] > 0.0
    assert out.log[-1]["loss"] < out.log[0]["loss"]


def test_pool_is_normalised_batched_single_query(problem):
    src, _ = problem["te"]
    f256 = pool(src, problem["params"], HEADS)
    f7 = pool(src, problem["params"], HEADS, batch_size=7)
    assert f256.shape == (500, D)
    assert torch.allclose(f256.norm(dim=-1), torch.ones(500), atol=1e-6)
    assert torch.allclose(f7, f256, atol=1e-6)
    with torch.no_grad():
        ref = F.normalize(attnpool_single_query(src.get(np.arange(10)), problem["params"], HEADS), dim=-1)
    assert torch.allclose(f256[:10], ref, atol=1e-6)
    assert isinstance(src, DenseMapSource)


def test_blend_endpoints_exact(problem, default_fit):
    out, _ = default_fit
    src, _ = problem["te"]
    W = problem["W"]
    f_orig = pool(src, problem["params"], HEADS)
    f_ft = pool(src, out.params, HEADS)
    frozen_logits = 100.0 * f_orig @ W.t()
    ft_logits = 100.0 * f_ft @ W.t()
    assert not torch.equal(f_ft, f_orig)
    assert torch.equal(blend_features(f_ft, f_orig, 0.0), f_orig)
    assert torch.equal(blend_features(f_ft, f_orig, 1.0), f_ft)
    assert torch.equal(blend_logits(ft_logits, frozen_logits, 0.0), frozen_logits)
    assert torch.equal(blend_logits(ft_logits, frozen_logits, 1.0), ft_logits)
    for mode in ("feature", "logit"):
        assert torch.equal(blended_logits(f_ft, f_orig, W, 0.0, mode), frozen_logits)
        assert torch.equal(blended_logits(f_ft, f_orig, W, 1.0, mode), ft_logits)
    mid = blend_features(f_ft, f_orig, 0.3)
    assert torch.allclose(mid, F.normalize(0.3 * f_ft + 0.7 * f_orig, dim=-1))
    assert torch.allclose(mid.norm(dim=-1), torch.ones(len(mid)), atol=1e-6)
    assert torch.allclose(blend_logits(ft_logits, frozen_logits, 0.3), 0.3 * ft_logits + 0.7 * frozen_logits)


def test_planted_structure_safe_beats_frozen(problem, default_fit):
    out, _ = default_fit
    W = problem["W"]
    (vs, vy), (ts, ty) = problem["va"], problem["te"]
    fo_v, fo_t = pool(vs, problem["params"], HEADS), pool(ts, problem["params"], HEADS)
    ff_v, ff_t = pool(vs, out.params, HEADS), pool(ts, out.params, HEADS)
    frozen_val, frozen_test = accuracy(fo_v @ W.t(), vy), accuracy(fo_t @ W.t(), ty)
    ft_test = accuracy(ff_t @ W.t(), ty)
    assert frozen_test < 45  # the planted problem really defeats the frozen pooling (chance is 20)
    assert ft_test >= frozen_test + 15, (frozen_test, ft_test)
    assert out.log[-1]["val_acc"] == pytest.approx(accuracy(ff_v @ W.t(), vy))
    curves = {}
    for mode in ("feature", "logit"):
        sel = select_blend(ff_v, fo_v, vy, W, mode=mode, test_f_ft=ff_t, test_f_orig=fo_t, test_y=ty)
        assert isinstance(sel, Selection) and sel.method == "safe" and sel.params["mode"] == mode
        assert sel.extra["val_acc_frozen"] == pytest.approx(frozen_val)
        assert sel.extra["test_acc_frozen"] == pytest.approx(frozen_test)
        assert sel.val_acc >= frozen_val
        assert sel.val_acc == max(sel.extra["val_curve"])
        assert sel.extra["val_curve"][0] == pytest.approx(frozen_val)  # beta = 0 is the frozen model
        assert sel.test_acc >= frozen_test + 15, (frozen_test, sel.test_acc)
        curves[mode] = sel.extra["val_curve"]
    # With a plain linear classifier both modes rank classes identically (normalisation is a positive
    # per-sample factor), so their accuracy curves coincide; they differ once other logits are added.
    assert curves["feature"] == curves["logit"]


def test_selection_never_reads_test_labels(problem, default_fit):
    out, _ = default_fit
    W = problem["W"]
    (vs, vy), (ts, ty) = problem["va"], problem["te"]
    args = (pool(vs, out.params, HEADS), pool(vs, problem["params"], HEADS), vy, W)
    ff_t, fo_t = pool(ts, out.params, HEADS), pool(ts, problem["params"], HEADS)
    a = select_blend(*args, test_f_ft=ff_t, test_f_orig=fo_t, test_y=ty)
    perm = ty[torch.randperm(len(ty), generator=torch.Generator().manual_seed(0))]
    b = select_blend(*args, test_f_ft=ff_t, test_f_orig=fo_t, test_y=perm)
    c = select_blend(*args)
    assert a.params == b.params == c.params
    assert a.val_acc == b.val_acc == c.val_acc
    assert a.test_acc != b.test_acc  # the permuted labels really were different
    assert c.test_acc is None


def test_selection_first_best_and_grid():
    # logits of the blend: [0.8b, 1 - 0.4b] (up to a positive factor); class 0 wins for b > 5/6.
    W = torch.eye(2)
    f_ft = torch.tensor([[0.8, 0.6], [0.8, 0.6]])
    f_orig = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    sel = select_blend(f_ft, f_orig, y, W)
    assert sel.extra["grid"] == list(DEFAULT_GRID) and len(DEFAULT_GRID) == 51
    assert DEFAULT_GRID[0] == 0.0 and DEFAULT_GRID[-1] == 1.0 and DEFAULT_GRID[1] == pytest.approx(0.02)
    # every beta > 5/6 gets both right; the first such grid value is 0.84
    assert sel.params["beta"] == pytest.approx(0.84) and sel.val_acc == 100.0
    assert sel.extra["val_curve"][:42] == [0.0] * 42 and sel.extra["val_curve"][42:] == [100.0] * 9
    with pytest.raises(CachekitError, match="grid"):
        select_blend(f_ft, f_orig, y, W, grid=[0.5, 1.5])
    with pytest.raises(CachekitError, match="mode"):
        select_blend(f_ft, f_orig, y, W, mode="average")
    with pytest.raises(CachekitError, match="all three"):
        select_blend(f_ft, f_orig, y, W, test_f_ft=f_ft)


def test_lr_schedule_shape():
    cfg = SafeConfig(epochs=5, warmup_epochs=2, lr=1e-3, min_lr=1e-6)
    lrs = lr_schedule(cfg, 3)
    assert len(lrs) == 15
    assert lrs[0] == pytest.approx(1e-3 / 6) and lrs[5] == pytest.approx(1e-3)
    assert np.all(np.diff(lrs[:6]) > 0) and np.all(np.diff(lrs[6:]) < 0)
    assert lrs[6] == pytest.approx(1e-3)  # the cosine starts at the peak
    assert lrs[-1] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 8 / 9)))
    assert lr_schedule(SafeConfig(epochs=2, warmup_epochs=0), 2)[0] == pytest.approx(1e-4)


@pytest.mark.parametrize("bad", [
    {"epochs": 0}, {"epochs": 2.5}, {"lr": 0.0}, {"lr": float("nan")}, {"eps": -1.0},
    {"weight_decay": -0.1}, {"warmup_epochs": 60}, {"warmup_epochs": -1}, {"min_lr": 1.0},
    {"batch_size": 0}, {"train_groups": ()}, {"train_groups": ("pos", "mlp")}, {"train_groups": ("pos", "pos")},
    {"temperature": 0.0}, {"logit_scale": -1.0}, {"consistency": "l2"}, {"consistency_weight": -0.5},
    {"seed": "one"}, {"device": "not-a-device"}, {"epochs": True},
])
def test_config_validation(bad):
    with pytest.raises(CachekitError, match=next(iter(bad))):
        SafeConfig(**bad).validate()


def test_config_roundtrip_and_unknown_keys():
    cfg = SafeConfig(epochs=7, warmup_epochs=2, train_groups=["qkv"], consistency="kl")
    assert cfg.train_groups == ("qkv",)
    d = cfg.to_dict()
    assert d["train_groups"] == ["qkv"]
    assert SafeConfig.from_dict(d) == cfg
    d0 = SafeConfig().to_dict()
    assert d0 == {"epochs": 50, "lr": 1e-4, "eps": 1e-4, "weight_decay": 0.01, "warmup_epochs": 10,
                  "min_lr": 1e-6, "batch_size": 64, "train_groups": ["pos", "qkv", "c_proj"],
                  "logit_scale": 100.0, "temperature": 2.0, "consistency": "l1", "consistency_weight": 0.5,
                  "seed": 1, "device": "cpu", "blend": "feature"}
    with pytest.raises(CachekitError, match="learning_rate"):
        SafeConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(CachekitError, match="consistency"):
        SafeConfig.from_dict({"consistency": "mse"})


def test_fit_input_errors(problem):
    src, y = problem["tr"]
    cfg = SafeConfig(**{**FAST, "epochs": 1})
    with pytest.raises(CachekitError, match="labels"):
        fit(src, y[:-1], problem["W"], problem["params"], HEADS, cfg)
    with pytest.raises(CachekitError, match="classifier"):
        fit(src, y, problem["W"][:, :-1], problem["params"], HEADS, cfg)
    with pytest.raises(CachekitError, match="0..3"):
        fit(src, y, problem["W"][:4], problem["params"], HEADS, cfg)
    with pytest.raises(CachekitError, match="num_heads"):
        fit(src, y, problem["W"], problem["params"], 3, cfg)
    with pytest.raises(CachekitError, match="TensorSource"):
        fit(src.tensor, y, problem["W"], problem["params"], HEADS, cfg)
