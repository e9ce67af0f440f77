"""Pictures the papers argue with, made from any cache (`cachekit report RESULTS --figures CACHE`).

- SAFE: where the pooled feature looks. Token 0's attention over the spatial map for a few val images, the
  frozen layer next to the fine-tuned one, over the image (the paper's motivation: task semantics get more weight).
- APE: the refinement's effect. Mean inter-class similarity of the class members (text row and cache keys) and
  image-text similarity of val images (to their own class and to the others), on all channels and on the
  refined ones; and APE's val/test accuracy against Q.

Numbers are computed here (plain functions, tested); `draw_*` only draw them with matplotlib.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .attnpool import attention_map
from .methods import refine as R

__all__ = ["refinement_stats", "accuracy_vs_q", "attention_pairs", "make_figures"]


def refinement_stats(W, F, key_labels, val_f, val_y, idx) -> dict:
    """Similarities on all channels ("all") and on the channels `idx` re-normalised ("refined").

    inter_class: mean x_im·x_jn over members (text row and keys) of different classes i != j;
    image_text_own / image_text_other: mean val f·w over the val image's own class / over the other classes."""
    out = {}
    for name, sel in (("all", None), ("refined", idx)):
        Wr = W if sel is None else R.refine(W, sel)
        Fr = F if sel is None else R.refine(F, sel)
        vf = val_f if sel is None else R.refine(val_f, sel)
        inter = float(R.inter_class_similarity(Wr, Fr, key_labels).double().sum())
        s = vf.double() @ Wr.double().t()  # (M, C)
        own = s.gather(1, val_y.long().view(-1, 1)).squeeze(1)
        C = Wr.shape[0]
        other = (s.sum(dim=1) - own) / max(C - 1, 1)
        out[name] = {"inter_class": inter, "image_text_own": float(own.mean()),
                     "image_text_other": float(other.mean())}
    return out


#: (n_beta, n_alpha, n_gamma) of the accuracy-vs-Q curve: 16x fewer points than APE's default search, so a
#: curve of six Q values costs less than one default search; figures say so.
CURVE_GRID = (50, 10, 10)


def accuracy_vs_q(runner, k: int, seed: int, qs, n=CURVE_GRID, weights=(0.5, 0.5)) -> list[dict]:
    """APE (channels computed by the criterion) at each Q: val and test accuracy, hyper-parameters on val."""
    rows = []
    for q in qs:
        r = runner.run("ape", k, seed, {"top_k": int(q), "weights": list(weights), "channels": "computed",
                                        "n": list(n)})
        rows.append({"q": int(r["config"]["top_k"]), "val_acc": r["metrics"]["val_acc"],
                     "test_acc": r["metrics"]["test_acc"]})
    return rows


def attention_pairs(runner, k: int, seed: int, safe_overrides: dict | None = None, images: int = 4):
    """(rows, frozen maps, fine-tuned maps, fit info) for the first val image of each of `images` classes.
    The SAFE fit of these settings is reused when stored, else trained (and stored)."""
    from .methods.registry import get_method

    task = runner.inputs(k, seed)
    spec = get_method("safe")
    est = spec.estimator(spec.make_config(safe_overrides)).fit(task)
    y = task.val_y.cpu()
    rows = []
    for c in range(int(y.max()) + 1 if len(y) else 0):
        hit = torch.nonzero(y == c)
        if len(hit):
            rows.append(int(hit[0]))
        if len(rows) >= images:
            break
    params0, heads = task.attnpool()
    dense = runner.cache.dense("val", rows)
    with torch.no_grad():
        frozen = attention_map(dense, params0, heads)
        tuned = attention_map(dense, est.params, heads)
    return rows, frozen, tuned, {"trained": est.trained, "epochs": est.config.epochs}


def _image(cache, split: str, row: int):
    from PIL import Image

    root = Path(cache.meta.get("dataset", {}).get("root", "."))
    try:
        im = Image.open(root / cache.paths(split)[row]).convert("RGB")
    except OSError:
        return None
    side = min(im.size)  # CLIP's preprocessing: the centre square is what the dense map covers
    left, top = (im.width - side) // 2, (im.height - side) // 2
    return im.crop((left, top, left + side, top + side))


def draw_attention(cache, rows, frozen, tuned, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = cache.classnames
    labels = cache.labels("val")
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        img = _image(cache, "val", r)
        for j, (name, amap) in enumerate((("image", None), ("frozen layer", frozen[i]), ("fine-tuned (SAFE)", tuned[i]))):
            ax = axes[i][j]
            ax.axis("off")
            if img is not None:
                ax.imshow(img)
            if amap is not None:
                a = amap.numpy()
                a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
                extent = (0, img.width, img.height, 0) if img is not None else None
                ax.imshow(a, cmap="jet", alpha=0.45 if img is not None else 1.0, extent=extent,
                          interpolation="bilinear")
                ax.set_title(f"{name}\nmax weight {float(amap.max()):.2f}", fontsize=8)
            else:
                ax.set_title(f"{names[int(labels[r])]}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def draw_ape(stats: dict, curve: list[dict], D: int, q: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    keys = ("inter_class", "image_text_own", "image_text_other")
    labels = ("inter-class\n(members)", "image-text\n(own class)", "image-text\n(other classes)")
    x = range(len(keys))
    a1.bar([i - 0.2 for i in x], [stats["all"][k] for k in keys], width=0.4, label=f"all {D} channels")
    a1.bar([i + 0.2 for i in x], [stats["refined"][k] for k in keys], width=0.4, label=f"refined, Q={q}")
    a1.set_xticks(list(x))
    a1.set_xticklabels(labels, fontsize=8)
    a1.set_ylabel("mean cosine similarity")
    a1.legend(fontsize=8)
    a1.set_title("APE refinement: similarities")
    qs = [r["q"] for r in curve]
    a2.plot(qs, [r["val_acc"] for r in curve], marker="o", label="val")
    a2.plot(qs, [r["test_acc"] for r in curve], marker="s", label="test")
    a2.set_xlabel("Q (channels kept)")
    a2.set_ylabel("APE accuracy (%)")
    a2.set_title("APE accuracy vs Q (β, α, γ on val, {}x{}x{} grid)".format(*CURVE_GRID), fontsize=10)
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def make_figures(cache, out_dir, k: int | None = None, seed: int | None = None, safe_overrides: dict | None = None,
                 q: int | None = None, progress=None) -> dict:
    """Both figures for (K, seed) (default: the largest K, first seed) into out_dir; returns their numbers."""
    from .runner import Runner

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = max(cache.shots) if k is None else int(k)
    seed = cache.seeds[0] if seed is None else int(seed)
    runner = Runner(cache, progress=progress)
    task = runner.inputs(k, seed)
    D = int(task.W.shape[1])
    q = min(D, max(1, D // 2) if q is None else int(q))
    idx, _ = R.by_criterion(task.W, task.F, task.key_labels, q)
    stats = refinement_stats(task.W, task.F, task.key_labels, task.val_f, task.val_y, idx)
    qs = sorted({max(1, D * f // 16) for f in (1, 2, 4, 8, 12, 16)})
    curve = accuracy_vs_q(runner, k, seed, qs)
    ape_png = draw_ape(stats, curve, D, q, out / "ape_refinement.png")
    rows, frozen, tuned, info = attention_pairs(runner, k, seed, safe_overrides)
    att_png = draw_attention(cache, rows, frozen, tuned, out / "safe_attention.png",
                             f"token 0's attention over the {frozen.shape[1]}x{frozen.shape[2]} map, K={k} seed={seed}\n"
                             f"{cache.weights_label}")
    shift = float((tuned - frozen).abs().sum(dim=(1, 2)).mean()) / 2 if len(rows) else 0.0
    return {"k": k, "seed": seed, "q": q, "ape": {"stats": stats, "accuracy_vs_q": curve, "png": str(ape_png)},
            "safe": {"rows": rows, "attention_shift": shift, "png": str(att_png), **info}}


def figures_markdown(res: dict) -> str:
    """The report section of `make_figures`'s result."""
    st = res["ape"]["stats"]
    lines = [f"## Figures (K={res['k']}, seed {res['seed']})", "",
             f"APE refinement, Q={res['q']}: mean inter-class similarity {st['all']['inter_class']:.4f} on all "
             f"channels, {st['refined']['inter_class']:.4f} refined; val image-text similarity to the own class "
             f"{st['all']['image_text_own']:.4f} -> {st['refined']['image_text_own']:.4f}, to other classes "
             f"{st['all']['image_text_other']:.4f} -> {st['refined']['image_text_other']:.4f}.", "",
             "APE accuracy vs Q: β, α, γ chosen on val over a {}x{}x{} grid (APE's default is 200x20x20), so "
             "these accuracies can differ from `eval`'s.".format(*CURVE_GRID), "",
             "| Q | val acc | test acc |", "|---|---|---|"]
    lines += [f"| {r['q']} | {r['val_acc']:.2f} | {r['test_acc']:.2f} |" for r in res["ape"]["accuracy_vs_q"]]
    s = res["safe"]
    lines += ["", "![APE refinement](ape_refinement.png)", "",
              f"SAFE ({'trained now' if s['trained'] else 'stored fit'}, {s['epochs']} epochs): token 0's attention "
              f"moved by {s['attention_shift']:.3f} of its spatial mass on average (half the L1 distance between the "
              "frozen and fine-tuned maps).", "", "![SAFE attention](safe_attention.png)", ""]
    return "\n".join(lines)
