"""Figures from the cache: the numbers behind them equal literal computations; the report draws them."""
from __future__ import annotations

import json
import math

import torch
from click.testing import CliRunner

from cachekit.attnpool import attention_map, attnpool_single_query
from cachekit.cli.main import cli
from cachekit.figures import refinement_stats
from cachekit.methods.refine import refine


def _params(c_in=8, d=6, hw=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.5  # noqa: E731
    return {"positional_embedding": r(hw + 1, c_in), "q_proj.weight": r(c_in, c_in), "q_proj.bias": r(c_in),
            "k_proj.weight": r(c_in, c_in), "k_proj.bias": r(c_in), "v_proj.weight": r(c_in, c_in),
            "v_proj.bias": r(c_in), "c_proj.weight": r(d, c_in), "c_proj.bias": r(d)}


def test_attention_map_is_token_zeros_softmax_over_the_map():
    """Literal: per head, softmax over the HW+1 tokens of q0·k/sqrt(hd); drop the mean token, average heads.
    And the attention it reports is the one that pools: weighting the values by it (plus the mean token's
    weight) and projecting gives the layer's output."""
    p, heads = _params(), 2
    x = torch.randn(3, 8, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = attention_map(x, p, heads)
    t = x.reshape(3, 8, 4).transpose(1, 2)
    t = torch.cat([t.mean(1, keepdim=True), t], 1) + p["positional_embedding"]
    hd = 8 // heads
    for b in range(3):
        per_head, pooled = [], torch.zeros(8, dtype=torch.float64)
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            q = (t[b, 0] @ p["q_proj.weight"].T + p["q_proj.bias"])[sl]
            k = (t[b] @ p["k_proj.weight"].T + p["k_proj.bias"])[:, sl]
            v = (t[b] @ p["v_proj.weight"].T + p["v_proj.bias"])[:, sl]
            w = torch.softmax(k @ q / math.sqrt(hd), dim=0)
            per_head.append(w)
            pooled[sl] = w @ v
        want = torch.stack(per_head).mean(0)[1:].reshape(2, 2)
        assert torch.allclose(got[b], want, atol=1e-12)
        out = pooled @ p["c_proj.weight"].T + p["c_proj.bias"]
        assert torch.allclose(out, attnpool_single_query(x[b:b + 1], p, heads)[0], atol=1e-10)
    assert bool((got.sum(dim=(1, 2)) < 1).all())


def test_refinement_stats_equal_literal_means():
    g = torch.Generator().manual_seed(3)
    C, K, D, M = 4, 3, 10, 12
    nrm = torch.nn.functional.normalize
    W = nrm(torch.randn(C, D, generator=g, dtype=torch.float64), dim=-1)
    F = nrm(torch.randn(C * K, D, generator=g, dtype=torch.float64), dim=-1)
    ky = torch.arange(C).repeat_interleave(K)
    vf = nrm(torch.randn(M, D, generator=g, dtype=torch.float64), dim=-1)
    vy = torch.arange(M) % C
    idx = torch.tensor([0, 3, 4, 7, 9])
    st = refinement_stats(W, F, ky, vf, vy, idx)
    for name, sel in (("all", None), ("refined", idx)):
        Wr, Fr, vr = (W, F, vf) if sel is None else (refine(W, sel), refine(F, sel), refine(vf, sel))
        members = [[Wr[i]] + [Fr[n] for n in range(C * K) if ky[n] == i] for i in range(C)]
        pairs = [float(a @ b) for i in range(C) for j in range(C) if i != j for a in members[i] for b in members[j]]
        assert math.isclose(st[name]["inter_class"], sum(pairs) / len(pairs), rel_tol=1e-9, abs_tol=1e-12)
        own = [float(vr[m] @ Wr[vy[m]]) for m in range(M)]
        other = [sum(float(vr[m] @ Wr[c]) for c in range(C) if c != vy[m]) / (C - 1) for m in range(M)]
        assert math.isclose(st[name]["image_text_own"], sum(own) / M, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(st[name]["image_text_other"], sum(other) / M, rel_tol=1e-9, abs_tol=1e-12)


def test_report_draws_the_figures_from_a_cache(tiny_cache, tmp_path):
    import shutil

    cache = tmp_path / "c.h5"
    shutil.copy(tiny_cache, cache)
    out = tmp_path / "r.jsonl"
    run = lambda *a: CliRunner().invoke(cli, [str(x) for x in a])  # noqa: E731
    assert run("eval", cache, "--method", "zeroshot", "--out", out, "-q").exit_code == 0
    res = run("report", out, "--out", tmp_path / "rep", "--figures", cache, "--set", "safe.epochs=2", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    md = (tmp_path / "rep" / "report.md").read_text()
    for png in ("ape_refinement.png", "safe_attention.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 5000 and f"]({png})" in md
    assert "| Q | val acc | test acc |" in md and d["report"].endswith("report.md")
