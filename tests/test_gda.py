"""GDA scores in float64: a planted case where float32 cancellation flips the argmax.

The features are unit vectors close to one common direction u; the class means differ by about 1e-4 and the
views of a class spread by about 1e-5 around their mean. The shared covariance is then tiny, so the precision
P = D pinv((n - 1) Sigma + tr(Sigma) I) is about 1e10 and every class score f W_c + b_c is about 6e9, while
the scores of two classes differ by hundreds. float32 resolves 6e9 to about 500: rounding W_gda and b to
float32, or adding f W_gda^T and b in float32, scrambles the argmax. In float64 the error is about 1e-6.

The reference is written here from the formula of /work/shared/reference/methods.md, in float64 with literal
loops (numpy only for the pseudo-inverse).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cachekit.methods import gda
from cachekit.methods.grids import gda_alpha_grid

C, D = 3, 16


def _draw(rng, offsets, per_class):
    """per_class views of every class: normalize(u + offset_c + 1e-5 noise off u), float32, with labels."""
    y = np.repeat(np.arange(C), per_class)
    noise = 1e-5 * rng.standard_normal((y.size, D))
    noise[:, 0] = 0.0
    x = offsets[y] + noise
    x[:, 0] += 1.0  # u = e_0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    offsets = np.zeros((C, D))
    offsets[:, 1:] = 1e-4 * rng.standard_normal((C, D - 1))  # the class means nearly coincide
    X, y = _draw(rng, offsets, 20)  # the augmented views GDA fits on
    val_f, val_y = _draw(rng, offsets, 40)
    test_f, test_y = _draw(rng, offsets, 40)
    # Every text row is u: the zero-shot term is the same for every class, so the GDA term decides.
    W = torch.zeros(C, D)
    W[:, 0] = 1.0
    return {"X": X, "y": y, "W": W, "val_f": val_f, "val_y": val_y, "test_f": test_f, "test_y": test_y}


def ref_fit(X, y):
    """methods.md, literally, in float64: mu_c, Sigma (ddof 1) of the class-centred views, P, W_c, b_c."""
    X = X.double().numpy()
    y = y.numpy()
    n = X.shape[0]
    mu = [sum(X[i] for i in range(n) if y[i] == c) / sum(1 for i in range(n) if y[i] == c) for c in range(C)]
    sigma = sum(np.outer(X[i] - mu[y[i]], X[i] - mu[y[i]]) for i in range(n)) / (n - 1)
    P = D * np.linalg.pinv((n - 1) * sigma + np.trace(sigma) * np.eye(D))
    W = [[sum(P[d, e] * mu[c][e] for e in range(D)) for d in range(D)] for c in range(C)]
    b = [math.log(1.0 / C) - 0.5 * sum(mu[c][d] * W[c][d] for d in range(D)) for c in range(C)]
    return W, b


def ref_predictions(f, W_text, W_gda, b, alpha):
    """argmax_c of 100 f w_c + alpha (f W_gda_c + b_c), every product and sum a Python float (float64)."""
    f, W_text = f.double().tolist(), W_text.double().tolist()
    preds = []
    for x in f:
        row = [100.0 * sum(x[d] * W_text[c][d] for d in range(D))
               + alpha * (sum(x[d] * W_gda[c][d] for d in range(D)) + b[c]) for c in range(C)]
        preds.append(max(range(C), key=lambda c: (row[c], -c)))  # first maximum
    return torch.tensor(preds)


def float32_path(f, W_text, X, y, alpha):
    """The former scoring: parameters returned in the features' dtype (float32), logits in float32."""
    W_gda, b = gda.fit(X, y, C)
    assert W_gda.dtype == torch.float32
    return (100.0 * f @ W_text.t() + alpha * (f @ W_gda.t() + b)).argmax(dim=-1)


@pytest.fixture(scope="module")
def reference(planted):
    return ref_fit(planted["X"], planted["y"])


def test_the_planted_case_is_sensitive_to_float32(planted, reference):
    """The float64 reference classifies the planted test set perfectly; float32 scoring flips many argmaxes."""
    W_ref, b_ref = reference
    f, ty = planted["test_f"], planted["test_y"]
    for alpha in gda_alpha_grid():
        want = ref_predictions(f, planted["W"], W_ref, b_ref, alpha)
        assert torch.equal(want, ty)  # the discriminant is right on every sample
        old = float32_path(f, planted["W"], planted["X"], planted["y"], alpha)
        flipped = int((old != want).sum())
        assert flipped >= 0.1 * ty.numel(), f"alpha={alpha}: float32 flips only {flipped} of {ty.numel()}"


def test_logits_in_float64_equal_the_reference(planted, reference):
    W_ref, b_ref = reference
    W_gda, b = gda.fit(planted["X"], planted["y"], C, dtype=torch.float64)
    assert W_gda.dtype == b.dtype == torch.float64
    W_ref_t = torch.tensor(W_ref, dtype=torch.float64)
    assert (W_gda - W_ref_t).abs().max() <= 1e-9 * W_ref_t.abs().max()
    assert (b - torch.tensor(b_ref, dtype=torch.float64)).abs().max() <= 1e-9 * max(abs(v) for v in b_ref)
    f = planted["test_f"]  # float32 features: scored in float64 all the same
    for alpha in gda_alpha_grid():
        out = gda.logits(f, planted["W"], W_gda, b, alpha)
        assert out.dtype == torch.float64
        assert torch.equal(out.argmax(dim=-1), ref_predictions(f, planted["W"], W_ref, b_ref, alpha))


def test_select_equals_the_reference_search(planted, reference):
    """select (fit, alpha on val, test once) gives the reference's choice and accuracies, and float32 would not."""
    W_ref, b_ref = reference
    p = planted
    best, best_alpha = -1, None
    for alpha in gda_alpha_grid():  # naive loop, first best
        ok = int((ref_predictions(p["val_f"], p["W"], W_ref, b_ref, alpha) == p["val_y"]).sum())
        if ok > best:
            best, best_alpha = ok, alpha
    want_test = ref_predictions(p["test_f"], p["W"], W_ref, b_ref, best_alpha)
    sel = gda.select(p["val_f"], p["val_y"], p["W"], p["X"], p["y"], p["test_f"], p["test_y"])
    assert sel.params["alpha"] == best_alpha
    assert sel.val_acc == 100.0 * best / p["val_y"].numel() == 100.0
    assert sel.test_acc == 100.0 * int((want_test == p["test_y"]).sum()) / p["test_y"].numel() == 100.0
    old_val = [int((float32_path(p["val_f"], p["W"], p["X"], p["y"], a) == p["val_y"]).sum())
               for a in gda_alpha_grid()]
    assert max(old_val) < 0.9 * p["val_y"].numel()  # the float32 search could not have found it
